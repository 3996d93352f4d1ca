"""Video decoding with PyAV: clips of ``t`` frames at a target fps, resize + crop, values in [-1, 1].

Frames are chosen by their container timestamps (never by assuming a constant source rate): for every target
time ``start + k / fps`` the decoded frame whose presentation time is nearest is taken (ties go to the earlier
frame, the one on screen at that instant). A 30 fps source read at 7.5 fps therefore gives frames 0, 4, 8, ...

Anything that cannot deliver the requested clip raises :class:`VideoDecodeError` with a short ``reason`` that
callers count (``zero_byte``, ``unreadable``, ``no_video_stream``, ``truncated``, ``too_short``, ``missing_file``).
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Iterable, Iterator, Optional, Sequence, Tuple, Union

import av
import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".gif", ".flv",
                    ".wmv", ".3gp")

PathOrBytes = Union[str, os.PathLike, bytes]


class VideoDecodeError(Exception):
  """A video could not provide the requested frames. ``reason`` is one of the class constants."""

  MISSING_FILE = "missing_file"
  ZERO_BYTE = "zero_byte"
  UNREADABLE = "unreadable"
  NO_VIDEO_STREAM = "no_video_stream"
  TRUNCATED = "truncated"
  TOO_SHORT = "too_short"

  def __init__(self, path, reason: str, detail: str = ""):
    self.path = str(path)
    self.reason = reason
    self.detail = detail
    super().__init__(f"{self.path}: {reason}" + (f" ({detail})" if detail else ""))

  def __reduce__(self):  # keep path/reason when raised inside grain worker processes
    return (type(self), (self.path, self.reason, self.detail))


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  """What the container's timestamps say about the first video stream (times in seconds from its start)."""
  fps: float
  duration: float  # first frame to the end of the last one
  num_frames: int
  height: int
  width: int
  declared_duration: Optional[float]  # from the container header; None when it does not say


# ----------------------------------------------------------------------------------------------------------
# Opening and probing.

def _name(src: PathOrBytes) -> str:
  return "<bytes>" if isinstance(src, (bytes, bytearray)) else os.fspath(src)


def _open(src: PathOrBytes) -> Tuple["av.container.InputContainer", "av.video.stream.VideoStream"]:
  """Opens ``src`` and returns (container, first video stream), mapping failures to reasons."""
  if isinstance(src, (bytes, bytearray)):
    if not src:
      raise VideoDecodeError(_name(src), VideoDecodeError.ZERO_BYTE)
    handle = io.BytesIO(src)
  else:
    path = os.fspath(src)
    if not os.path.exists(path):
      raise VideoDecodeError(path, VideoDecodeError.MISSING_FILE)
    if os.path.getsize(path) == 0:
      raise VideoDecodeError(path, VideoDecodeError.ZERO_BYTE)
    handle = path
  try:
    container = av.open(handle, mode="r")
  except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as e:
    raise VideoDecodeError(_name(src), VideoDecodeError.UNREADABLE, str(e)) from None
  if not container.streams.video:
    container.close()
    raise VideoDecodeError(_name(src), VideoDecodeError.NO_VIDEO_STREAM)
  stream = container.streams.video[0]
  codec = stream.codec_context  # None when FFmpeg has no decoder for the stream (e.g. a mangled codec tag)
  if codec is None:
    detail = "no decoder for the video stream"
  elif codec.width <= 0 or codec.height <= 0:  # e.g. a declared size FFmpeg refused as absurd
    detail = f"frame size {codec.width}x{codec.height}"
  else:
    detail = ""
  if detail:  # (worded before close(): the stream is freed with the container)
    container.close()
    raise VideoDecodeError(_name(src), VideoDecodeError.UNREADABLE, detail)
  stream.thread_type = "AUTO"
  return container, stream


def _stream_start(stream) -> float:
  if stream.start_time is not None and stream.time_base is not None:
    return float(stream.start_time * stream.time_base)
  return 0.0


def _declared_duration(container, stream) -> Optional[float]:
  if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
    return float(stream.duration * stream.time_base)
  if container.duration is not None and container.duration > 0:
    return container.duration / av.time_base
  return None


def _nominal_fps(stream) -> Optional[float]:
  for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
    if rate is not None and rate > 0:
      return float(rate)
  return None


def probe(src: PathOrBytes) -> VideoInfo:
  """Reads every packet timestamp of the first video stream (demux only, no decoding).

  Raises ``VideoDecodeError`` for missing / zero-byte / unreadable / non-video inputs, and ``truncated`` when
  the packets stop early (demux error, or they cover < 90% of the duration the header declares).
  """
  container, stream = _open(src)
  try:
    times = []
    try:
      for packet in container.demux(stream):
        if packet.size == 0:
          continue
        ts = packet.pts if packet.pts is not None else packet.dts
        if ts is not None:
          times.append(float(ts * packet.time_base))
    except (av.FFmpegError, OSError) as e:
      raise VideoDecodeError(_name(src), VideoDecodeError.TRUNCATED, f"demux: {e}") from None
    # Everything read from the stream must be read now: its FFmpeg structures are freed by close(), and touching
    # them afterwards is a use after free (it crashed on one-frame videos).
    declared = _declared_duration(container, stream)
    height, width = stream.codec_context.height, stream.codec_context.width
    nominal_fps = _nominal_fps(stream) or 30.0
  finally:
    container.close()
  if not times:
    raise VideoDecodeError(_name(src), VideoDecodeError.TRUNCATED, "no video packets")
  times = np.sort(np.asarray(times))
  if len(times) > 1:
    dt = float(np.median(np.diff(times)))
    fps = 1.0 / dt if dt > 0 else nominal_fps
  else:
    fps = nominal_fps
  duration = float(times[-1] - times[0]) + 1.0 / fps
  if declared is not None and duration < 0.9 * declared - 1.0 / fps:
    raise VideoDecodeError(_name(src), VideoDecodeError.TRUNCATED,
                           f"packets cover {duration:.2f}s of a declared {declared:.2f}s")
  return VideoInfo(fps=fps, duration=duration, num_frames=len(times), height=height, width=width,
                   declared_duration=declared)


# ----------------------------------------------------------------------------------------------------------
# Geometry.

def cover_size(src_hw: Tuple[int, int], out_hw: Tuple[int, int]) -> Tuple[int, int]:
  """Smallest (h, w) with the source aspect ratio that covers ``out_hw`` (resize before a crop)."""
  src_h, src_w = src_hw
  scale = max(out_hw[0] / src_h, out_hw[1] / src_w)
  return max(out_hw[0], int(round(src_h * scale))), max(out_hw[1], int(round(src_w * scale)))


def short_side_size(src_hw: Tuple[int, int], short_side: int) -> Tuple[int, int]:
  """(h, w) with the short side resized to ``short_side``, aspect kept (rounded to even sizes for codecs)."""
  src_h, src_w = src_hw
  scale = short_side / min(src_h, src_w)
  return max(2, 2 * int(round(src_h * scale / 2))), max(2, 2 * int(round(src_w * scale / 2)))


def crop_offsets(resized_hw: Tuple[int, int], out_hw: Tuple[int, int],
                 rng: Optional[np.random.Generator] = None) -> Tuple[int, int]:
  """Top-left corner of the crop: centred, or uniformly random when ``rng`` is given."""
  dy, dx = resized_hw[0] - out_hw[0], resized_hw[1] - out_hw[1]
  if rng is None:
    return dy // 2, dx // 2
  return int(rng.integers(0, dy + 1)), int(rng.integers(0, dx + 1))


def to_unit_range(frames: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [-1, 1]."""
  return frames.astype(np.float32) * (2.0 / 255.0) - 1.0


# ----------------------------------------------------------------------------------------------------------
# Decoding.

def _frame_times(container, stream, start0: float) -> Iterator[Tuple[float, "av.VideoFrame"]]:
  """Decoded frames with their presentation time relative to the stream start."""
  fallback_dt = 1.0 / (_nominal_fps(stream) or 30.0)
  last = None
  for frame in container.decode(stream):
    if frame.pts is not None and frame.time is not None:
      t = float(frame.time) - start0
    else:  # no timestamp: continue from the previous frame
      t = 0.0 if last is None else last + fallback_dt
    last = t
    yield t, frame


def nearest_frames(frames: Iterable[Tuple[float, object]], targets: Iterable[float], tail: Optional[float] = None
                   ) -> Iterator[Tuple[float, float, object]]:
  """Streams ``(target, frame_time, frame)``: for each (ascending) target, the frame nearest in time.

  ``frames`` are ``(time, frame)`` in presentation order. Targets after the last frame still get it while they
  lie within ``tail`` seconds of it (default: half the median frame interval); the stream then stops.
  """
  targets = iter(targets)
  target = next(targets, None)
  prev = None
  intervals = []
  for cur in frames:
    if prev is not None and len(intervals) < 16:
      intervals.append(cur[0] - prev[0])
    while target is not None and target <= cur[0]:
      if prev is not None and target - prev[0] <= cur[0] - target:
        yield target, prev[0], prev[1]
      else:
        yield target, cur[0], cur[1]
      target = next(targets, None)
    if target is None:
      return
    prev = cur
  if prev is None:
    return
  if tail is None:
    tail = 0.5 * float(np.median(intervals)) if intervals else 0.0
  while target is not None and target <= prev[0] + tail + 1e-6:
    yield target, prev[0], prev[1]
    target = next(targets, None)


def _to_rgb(frame, size_hw: Optional[Tuple[int, int]]) -> np.ndarray:
  if size_hw is None or (frame.height, frame.width) == tuple(size_hw):
    return frame.to_ndarray(format="rgb24")
  return frame.to_ndarray(format="rgb24", width=size_hw[1], height=size_hw[0], interpolation="AREA")


def decode_frames_at(src: PathOrBytes, times: Sequence[float], *, size: Optional[Tuple[int, int]] = None,
                     short_side: Optional[int] = None, rng: Optional[np.random.Generator] = None,
                     seek_threshold: float = 1.0) -> np.ndarray:
  """uint8 ``[len(times), h, w, 3]``: the frames nearest to ``times`` (seconds from the stream start).

  ``size=(h, w)`` resizes to cover and crops (random crop when ``rng`` is given); ``short_side`` only resizes.
  Seeks to the keyframe before ``times[0]`` when it is later than ``seek_threshold`` seconds.
  """
  times = [float(t) for t in times]
  if sorted(times) != times:
    raise ValueError("times must be ascending")
  container, stream = _open(src)
  try:
    start0 = _stream_start(stream)
    declared = _declared_duration(container, stream)
    src_hw = (stream.codec_context.height, stream.codec_context.width)
    if size is not None:
      resize_hw = cover_size(src_hw, size)
      crop_yx = crop_offsets(resize_hw, size, rng)
    elif short_side is not None:
      resize_hw, crop_yx = short_side_size(src_hw, short_side), (0, 0)
    else:
      resize_hw, crop_yx = None, (0, 0)

    def run(seek: bool):
      if seek:
        container.seek(int((start0 + times[0]) / stream.time_base), stream=stream, backward=True, any_frame=False)
      out, cache = [], (None, None)
      decoded = _frame_times(container, stream, start0)
      for i, (_, ftime, frame) in enumerate(nearest_frames(decoded, times)):
        if i == 0 and seek and ftime > times[0] + 1e-6 and times[0] > 0:
          return None  # the seek overshot: no frame at or before the first target, decode from the start
        if cache[0] is not frame:
          cache = (frame, _to_rgb(frame, resize_hw))
        out.append(cache[1])
      return out

    try:
      out = None
      if times and times[0] > seek_threshold:
        try:
          out = run(seek=True)
        except av.FFmpegError:
          out = None
        if out is None:
          container.close()
          container, stream = _open(src)
      if out is None:
        out = run(seek=False)
    except (av.FFmpegError, OSError) as e:
      raise VideoDecodeError(_name(src), VideoDecodeError.TRUNCATED, f"decode: {e}") from None
  finally:
    container.close()
  if len(out) < len(times):
    missing = times[len(out)]
    if declared is not None and missing < 0.9 * declared:
      raise VideoDecodeError(_name(src), VideoDecodeError.TRUNCATED,
                             f"frames end before {missing:.2f}s of a declared {declared:.2f}s")
    raise VideoDecodeError(_name(src), VideoDecodeError.TOO_SHORT,
                           f"needs a frame at {times[-1]:.2f}s, video ends near {missing:.2f}s")
  frames = np.stack(out)
  if size is not None:
    frames = frames[:, crop_yx[0]:crop_yx[0] + size[0], crop_yx[1]:crop_yx[1] + size[1]]
  return frames


def clip_times(num_frames: int, fps: float, start: float = 0.0) -> np.ndarray:
  """Presentation times ``start + k / fps`` of a clip, seconds."""
  return start + np.arange(num_frames, dtype=np.float64) / fps


def clip_span(num_frames: int, fps: float) -> float:
  """Seconds between the first and the last frame of a clip."""
  return (num_frames - 1) / fps


def decode_clip(src: PathOrBytes, num_frames: int, fps: float, *, start: Optional[float] = None,
                size: Optional[Tuple[int, int]] = None, short_side: Optional[int] = None,
                rng: Optional[np.random.Generator] = None, random_crop: bool = False,
                info: Optional[VideoInfo] = None) -> np.ndarray:
  """float32 ``[num_frames, h, w, 3]`` in [-1, 1]: ``num_frames`` frames at ``fps`` from ``start`` seconds.

  ``start=None`` picks a uniformly random start that fits when ``rng`` is given, else 0. ``size=(h, w)``
  resizes the short side to cover it and crops (centre, or random with ``random_crop`` and ``rng``).
  Raises ``VideoDecodeError`` (``too_short`` if the clip does not fit in the video).
  """
  if start is None:
    start = 0.0
    if rng is not None:
      info = info or probe(src)
      room = info.duration - 1.0 / info.fps - clip_span(num_frames, fps)
      if room < -1e-6:
        raise VideoDecodeError(_name(src), VideoDecodeError.TOO_SHORT,
                               f"{info.duration:.2f}s holds no {num_frames} frames at {fps} fps")
      start = float(rng.uniform(0.0, max(room, 0.0)))
  frames = decode_frames_at(src, clip_times(num_frames, fps, start), size=size, short_side=short_side,
                            rng=rng if random_crop else None)
  return to_unit_range(frames)


def iter_frames(src: PathOrBytes, fps: Optional[float] = None, *, short_side: Optional[int] = None,
                start: float = 0.0, end: Optional[float] = None) -> Iterator[Tuple[float, np.ndarray]]:
  """Streams ``(time, uint8 [h, w, 3])`` over the whole video (or ``[start, end)``).

  With ``fps`` the stream is resampled to a constant rate (nearest frame for each ``start + k / fps``);
  without it every decoded frame is returned with its own timestamp. Raises ``VideoDecodeError``.
  """
  container, stream = _open(src)
  try:
    start0 = _stream_start(stream)
    src_hw = (stream.codec_context.height, stream.codec_context.width)
    resize_hw = short_side_size(src_hw, short_side) if short_side else None
    decoded = _frame_times(container, stream, start0)
    if fps is None:
      selected = ((t, t, f) for t, f in decoded if t >= start - 1e-6)
    else:
      def targets():
        k = 0
        while True:
          yield start + k / fps
          k += 1
      selected = nearest_frames(decoded, targets())
    cache = (None, None)
    try:
      for target, _, frame in selected:
        if end is not None and target >= end - 1e-9:
          return
        if cache[0] is not frame:
          cache = (frame, _to_rgb(frame, resize_hw))
        yield target, cache[1]
    except (av.FFmpegError, OSError) as e:
      raise VideoDecodeError(_name(src), VideoDecodeError.TRUNCATED, f"decode: {e}") from None
  finally:
    container.close()


def write_video(path: str, frames: np.ndarray, fps: float, *, codec: str = "libx264", crf: int = 18,
                gop: Optional[int] = None, faststart: bool = False) -> None:
  """Writes uint8 ``[t, h, w, 3]`` frames (even h, w) to a video file; used for fixtures and previews."""
  import fractions  # pylint: disable=g-import-not-at-top
  options = {"movflags": "faststart"} if faststart else {}
  with av.open(path, mode="w", options=options) as container:
    stream = container.add_stream(codec, rate=fractions.Fraction(fps).limit_denominator(1001))
    stream.height, stream.width = frames.shape[1], frames.shape[2]
    stream.pix_fmt = "yuv420p"
    codec_options = {}
    if codec == "libx264":
      codec_options["crf"] = str(crf)
    if gop is not None:
      codec_options["g"] = str(gop)
    stream.options = codec_options
    for frame in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
