"""Procedural driving scenes: the embedded, always-offline default dataset.

A pinhole camera 1.5 m above a straight-or-gently-curving three-lane road. Lane marks flow towards the camera at
the ego speed, roadside posts pass by, cars (coloured boxes with windows; tail lights at night) ride in the lanes
with smooth speed changes relative to the ego car. Everything is a continuous function of time, so clips of
one scene at 1.875, 7.5 and 30 fps are sub-samplings of the same motion (what interpolation training needs).

Labels follow the RDS conditioning: ``day_night`` (0 day, 1 night) and ``crowdedness`` (number of cars,
0..max_cars). A caption describes the same scene for text conditioning.

Rendering is numpy only and anti-aliased by exact box filtering of the road marks and car boxes, so consecutive
frames change smoothly even at 32x64.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

CAMERA_HEIGHT = 1.5  # m
FOCAL = 1.0  # in units of the image height (vertical field of view ~53 degrees)
HORIZON = 0.42  # image row of the horizon, fraction of the height
LANE_WIDTH = 3.5  # m
NUM_LANES = 3
MARK_WIDTH = 0.15  # m
DASH_LENGTH, DASH_PERIOD = 3.0, 9.0  # m
POST_SPACING, POST_OFFSET, POST_HEIGHT, POST_WIDTH = 25.0, 1.8, 4.0, 0.25  # m
CAR_WIDTH, CAR_HEIGHT = 1.8, 1.5  # m
NEAR = 2.0  # m; nearer objects are not drawn

CAR_COLOURS = {
    "red": (0.80, 0.10, 0.10), "blue": (0.10, 0.25, 0.80), "green": (0.10, 0.60, 0.20),
    "yellow": (0.90, 0.80, 0.10), "white": (0.92, 0.92, 0.92), "black": (0.08, 0.08, 0.08),
    "orange": (0.95, 0.50, 0.05), "silver": (0.65, 0.67, 0.70),
}
CROWD_WORDS = ("an empty", "a quiet", "a light-traffic", "a busy", "a crowded")
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

DAY, NIGHT = 0, 1


@dataclasses.dataclass(frozen=True)
class Car:
  lane: int  # -1, 0, 1 (left, centre, right)
  depth: float  # mean distance ahead, m
  amplitude: float  # m; distance oscillates as traffic speeds up / slows down
  period: float  # s
  phase: float  # rad
  colour: str


@dataclasses.dataclass(frozen=True)
class DrivingScene:
  """Everything that defines one continuous scene; ``render_clip`` turns a time window of it into frames."""
  day_night: int
  cars: Tuple[Car, ...]
  ego_speed: float  # m/s, how fast the road flows past
  curvature: float  # x offset of the road centre = curvature * z^2
  sway: float  # m, lateral ego oscillation amplitude
  sway_period: float  # s
  start_time: float  # s, where clips of this scene start by default
  tint: Tuple[float, float, float]  # small per-scene colour jitter

  @property
  def labels(self) -> Dict[str, int]:
    return {"day_night": int(self.day_night), "crowdedness": len(self.cars)}

  @property
  def caption(self) -> str:
    when = "night" if self.day_night == NIGHT else "daytime"
    crowd = CROWD_WORDS[min(len(self.cars), len(CROWD_WORDS) - 1)]
    road = "road"
    if self.curvature > 0.0006:
      road = "road curving right"
    elif self.curvature < -0.0006:
      road = "road curving left"
    n = len(self.cars)
    if n == 0:
      return f"a {when} drive on {crowd} {road}"
    if n == 1:
      return f"a {when} drive on {crowd} {road} with one {self.cars[0].colour} car"
    word = NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)
    return f"a {when} drive on {crowd} {road} with {word} cars"


def make_scene(seed: int, index: int, max_cars: int = 4) -> DrivingScene:
  """The scene number ``index`` of the stream ``seed`` (deterministic, independent of everything else)."""
  rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index) & 0xFFFFFFFFFFFF, 0x5CE9E])
  day_night = int(rng.integers(0, 2))
  num_cars = int(rng.integers(0, max_cars + 1))
  names = list(CAR_COLOURS)
  cars = []
  for k in range(num_cars):
    lane = int(rng.integers(-1, 2))
    # Spread cars in depth so that they rarely overlap; the k-th car sits in its own depth band.
    band = 32.0 / num_cars
    depth = float(rng.uniform(7.0 + k * band, 7.0 + (k + 1) * band))
    cars.append(Car(lane=lane, depth=depth, amplitude=float(rng.uniform(0.5, min(5.0, depth - 4.5))),
                    period=float(rng.uniform(5.0, 14.0)), phase=float(rng.uniform(0, 2 * np.pi)),
                    colour=names[int(rng.integers(len(names)))]))
  return DrivingScene(
      day_night=day_night, cars=tuple(cars), ego_speed=float(rng.uniform(8.0, 25.0)),
      curvature=float(rng.choice([0.0, 1.0]) * rng.uniform(-0.0015, 0.0015)),
      sway=float(rng.uniform(0.0, 0.4)), sway_period=float(rng.uniform(4.0, 10.0)),
      start_time=float(rng.uniform(0.0, 60.0)), tint=tuple(float(v) for v in rng.uniform(-0.04, 0.04, 3)))


# ----------------------------------------------------------------------------------------------------------
# Rendering helpers.

def _square_wave_integral(p: np.ndarray, length: float, period: float) -> np.ndarray:
  """Integral over [0, p] of the periodic indicator of [0, length) + k * period."""
  return np.floor(p / period) * length + np.minimum(np.mod(p, period), length)


def _box_coverage(lo: np.ndarray, hi: np.ndarray, centres: np.ndarray, size) -> np.ndarray:
  """Fraction of each pixel footprint [c - size/2, c + size/2] inside [lo, hi] (broadcasting)."""
  overlap = np.minimum(hi, centres + size / 2) - np.maximum(lo, centres - size / 2)
  return np.clip(overlap / size, 0.0, 1.0)


def _palette(scene: DrivingScene) -> Dict[str, np.ndarray]:
  tint = np.asarray(scene.tint, np.float32)
  if scene.day_night == NIGHT:
    p = dict(sky_top=(0.01, 0.01, 0.04), sky_horizon=(0.06, 0.06, 0.12), grass=(0.02, 0.04, 0.02),
             road=(0.05, 0.05, 0.06), mark=(0.55, 0.55, 0.50), post=(0.10, 0.10, 0.10), lamp=(1.0, 0.85, 0.5),
             window=(0.02, 0.02, 0.03), tail=(1.0, 0.12, 0.08))
    scale_tint = 0.3
  else:
    p = dict(sky_top=(0.30, 0.50, 0.90), sky_horizon=(0.75, 0.85, 0.95), grass=(0.25, 0.50, 0.20),
             road=(0.38, 0.38, 0.40), mark=(0.95, 0.95, 0.90), post=(0.45, 0.45, 0.45), lamp=(0.6, 0.6, 0.6),
             window=(0.15, 0.20, 0.25), tail=(0.6, 0.1, 0.1))
    scale_tint = 1.0
  return {k: np.clip(np.asarray(v, np.float32) + scale_tint * tint, 0.0, 1.0) for k, v in p.items()}


def _ego_offset(scene: DrivingScene, times: np.ndarray) -> np.ndarray:
  return scene.sway * np.sin(2 * np.pi * times / scene.sway_period)


def car_depths(scene: DrivingScene, times: np.ndarray) -> np.ndarray:
  """``[len(times), num_cars]`` distance ahead of every car at ``times``."""
  if not scene.cars:
    return np.zeros((len(times), 0))
  c = scene.cars
  depth = np.array([x.depth for x in c])
  amp = np.array([x.amplitude for x in c])
  period = np.array([x.period for x in c])
  phase = np.array([x.phase for x in c])
  return depth + amp * np.sin(2 * np.pi * times[:, None] / period + phase)


def render_clip(scene: DrivingScene, num_frames: int, height: int, width: int, fps: float,
                start_time: Optional[float] = None) -> np.ndarray:
  """float32 ``[num_frames, height, width, 3]`` in [-1, 1]: frames at ``start + k / fps`` seconds."""
  start = scene.start_time if start_time is None else start_time
  times = start + np.arange(num_frames, dtype=np.float64) / fps
  return 2.0 * render_frames(scene, times, height, width) - 1.0


def render_frames(scene: DrivingScene, times: np.ndarray, height: int, width: int) -> np.ndarray:
  """float32 ``[len(times), height, width, 3]`` in [0, 1] at absolute scene ``times`` (seconds)."""
  times = np.asarray(times, np.float64)
  t = len(times)
  pal = _palette(scene)
  night = scene.day_night == NIGHT
  px = 1.0 / height  # one pixel in image-height units
  v = (np.arange(height) + 0.5) * px  # row centres
  u = (np.arange(width) + 0.5 - width / 2) * px  # column centres, 0 at the image centre

  # Sky: vertical gradient above the horizon.
  g = np.clip(v / HORIZON, 0, 1)[:, None, None]
  sky = pal["sky_top"] * (1 - g) + pal["sky_horizon"] * g  # [h, 1, 3]
  img = np.broadcast_to(sky, (t, height, width, 3)).astype(np.float32).copy()

  # Ground: every row below the horizon sees one depth; columns give the lateral position.
  below = v > HORIZON + 0.5 * px
  rows = np.nonzero(below)[0]
  if rows.size:
    z = FOCAL * CAMERA_HEIGHT / (v[rows] - HORIZON)  # [r]
    dz = z ** 2 / (FOCAL * CAMERA_HEIGHT) * px  # depth covered by one pixel row
    dx = z / FOCAL * px  # metres covered by one pixel column
    ego = _ego_offset(scene, times)  # [t]
    x = u[None, None, :] * z[None, :, None] / FOCAL + ego[:, None, None]  # [t, r, w] world lateral position
    x = x - scene.curvature * (z ** 2)[None, :, None]  # road-centred lateral position
    road_half = NUM_LANES * LANE_WIDTH / 2 + 0.5
    on_road = _box_coverage(-road_half, road_half, x, dx[None, :, None])
    ground = pal["grass"] * (1 - on_road[..., None]) + pal["road"] * on_road[..., None]

    # Lane marks: solid outer lines, dashed inner ones flowing towards the camera at the ego speed.
    bounds = (np.arange(NUM_LANES + 1) - NUM_LANES / 2) * LANE_WIDTH
    travelled = scene.ego_speed * times  # [t]
    p = z[None, :] + travelled[:, None]  # [t, r]
    dash = (_square_wave_integral(p + dz / 2, DASH_LENGTH, DASH_PERIOD)
            - _square_wave_integral(p - dz / 2, DASH_LENGTH, DASH_PERIOD)) / dz  # [t, r]
    marks = np.zeros_like(x)
    for i, b in enumerate(bounds):
      lateral = _box_coverage(b - MARK_WIDTH / 2, b + MARK_WIDTH / 2, x, dx[None, :, None])
      solid = i in (0, NUM_LANES)
      marks = np.maximum(marks, lateral if solid else lateral * dash[:, :, None])
    ground = ground * (1 - marks[..., None]) + pal["mark"] * marks[..., None]

    if night:  # headlights: the road is lit near the car, dark further away
      light = 0.25 + 2.5 * np.exp(-z / 12.0)[None, :, None] * np.exp(-np.abs(x) / 6.0)
      ground = ground * light[..., None]
    else:  # haze towards the horizon
      haze = (1 - np.exp(-z / 180.0))[None, :, None, None]
      ground = ground * (1 - haze) + pal["sky_horizon"] * haze
    img[:, rows] = ground

  # Objects (posts, cars) are boxes standing on the ground, drawn far to near.
  ego = _ego_offset(scene, times)

  def paint(frame, zk, xk, box_w, box_h, colour, lift=0.0):
    """Composites a box (m) at depth zk, lateral xk (camera frame), bottom ``lift`` m above the ground."""
    bottom = (HORIZON + FOCAL * (CAMERA_HEIGHT - lift) / zk) * height
    top = (HORIZON + FOCAL * (CAMERA_HEIGHT - lift - box_h) / zk) * height
    left = (xk - box_w / 2) * FOCAL / zk * height + width / 2
    right = (xk + box_w / 2) * FOCAL / zk * height + width / 2
    r0, r1 = max(0, int(np.floor(top))), min(height, int(np.ceil(bottom)))
    c0, c1 = max(0, int(np.floor(left))), min(width, int(np.ceil(right)))
    if r0 >= r1 or c0 >= c1:
      return  # off screen
    ay = _box_coverage(top, bottom, np.arange(r0, r1) + 0.5, 1.0)
    ax = _box_coverage(left, right, np.arange(c0, c1) + 0.5, 1.0)
    alpha = (ay[:, None] * ax[None, :])[..., None]
    window = frame[r0:r1, c0:c1]
    window[:] = window * (1 - alpha) + colour * alpha

  depths = car_depths(scene, times)
  for f in range(t):
    objects = []  # (depth, lateral position in the camera frame, car or None for a post)
    phase = np.mod(-scene.ego_speed * times[f], POST_SPACING)  # posts are fixed in the world
    for k in range(5):
      zk = phase + k * POST_SPACING + NEAR
      for side in (-1, 1):
        xw = side * (NUM_LANES * LANE_WIDTH / 2 + POST_OFFSET) + scene.curvature * zk ** 2
        objects.append((zk, xw - ego[f], None))
    for ci, car in enumerate(scene.cars):
      zk = depths[f, ci]
      objects.append((zk, car.lane * LANE_WIDTH + scene.curvature * zk ** 2 - ego[f], car))
    frame = img[f]
    for zk, xk, car in sorted(objects, key=lambda o: -o[0]):
      if zk < NEAR:
        continue
      if car is None:
        paint(frame, zk, xk, POST_WIDTH, POST_HEIGHT, pal["post"])
        paint(frame, zk, xk, 3 * POST_WIDTH, 0.4, pal["lamp"], lift=POST_HEIGHT - 0.2)
      else:
        colour = np.asarray(CAR_COLOURS[car.colour], np.float32) * (0.25 if night else 1.0)
        paint(frame, zk, xk, CAR_WIDTH, CAR_HEIGHT, colour)
        paint(frame, zk, xk, 0.8 * CAR_WIDTH, 0.35 * CAR_HEIGHT, pal["window"], lift=0.55 * CAR_HEIGHT)
        for side in (-1, 1):
          paint(frame, zk, xk + side * 0.35 * CAR_WIDTH, 0.3, 0.2, pal["tail"], lift=0.45)
  return np.clip(img, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Dataset interface.

def driving_example(seed: int, index: int, *, num_frames: int, height: int, width: int, fps: float,
                    max_cars: int = 4, time_offset: float = 0.0) -> Dict[str, object]:
  """One example: ``video`` float32 [t, h, w, 3] in [-1, 1], ``labels``, ``caption``, ``fps``."""
  scene = make_scene(seed, index, max_cars)
  video = render_clip(scene, num_frames, height, width, fps, start_time=scene.start_time + time_offset)
  return {"video": video, "labels": scene.labels, "caption": scene.caption, "fps": np.float32(fps)}


def render_batch(seed: int, indices: Sequence[int], *, num_frames: int, height: int, width: int, fps: float,
                 max_cars: int = 4) -> Dict[str, object]:
  """Stacked examples: ``video`` [b, t, h, w, 3], ``labels`` {name: int32 [b]}, ``caption`` [b] str, ``fps``."""
  examples = [driving_example(seed, i, num_frames=num_frames, height=height, width=width, fps=fps,
                              max_cars=max_cars) for i in indices]
  return {
      "video": np.stack([e["video"] for e in examples]),
      "labels": {k: np.asarray([e["labels"][k] for e in examples], np.int32) for k in ("day_night", "crowdedness")},
      "caption": np.asarray([e["caption"] for e in examples], dtype=object),
      "fps": np.full((len(examples),), fps, np.float32),
  }


class SyntheticDrivingSource:
  """Random-access source of ``DrivingScene`` descriptions (``len`` and ``[i]``), rendered later in the map.

  Keeping the source cheap lets grain shuffle / shard indices and render only what a process consumes.
  """

  def __init__(self, num_examples: int = 100_000, seed: int = 0, max_cars: int = 4):
    self.num_examples, self.seed, self.max_cars = int(num_examples), int(seed), int(max_cars)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> DrivingScene:
    if not 0 <= index < self.num_examples:
      raise IndexError(index)
    return make_scene(self.seed, index, self.max_cars)

  def __repr__(self) -> str:
    return f"SyntheticDrivingSource(num_examples={self.num_examples}, seed={self.seed}, max_cars={self.max_cars})"
