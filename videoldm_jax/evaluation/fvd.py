r"""Fréchet Video Distance: the protocol, sharded I3D feature extraction and the sources of videos / statistics.

The FVD protocol (one implementation, used by the CLI, the training loop and the benchmarks):

1. **Frames**: the first ``num_frames`` (default 16) frames of each video, at the video's own frame rate (no
   resampling). A video with fewer frames is an error that names it (its file name when it came from a file).
2. **Resize**: every frame to 224x224 with ``jax.image.resize(method="bilinear", antialias=False)``: no low-pass
   filter when shrinking, like TF1's ``resize_bilinear`` in the original FVD code, but half-pixel centres (which
   that op lacks); aspect ratio not kept. Frames already 224x224 are not resampled.
3. **Range**: uint8 ``x`` -> ``x / 127.5 - 1`` in [-1, 1] (after the resize, on float32 values).
4. **Features**: the 400 Kinetics logits of I3D (``evaluation.i3d``, the TF-Hub ``i3d-kinetics-400`` model),
   averaged over time by the network, computed in float32 with full-precision convolutions.
5. **Statistics**: float64 mean and unbiased covariance (``np.cov(rowvar=False)``), streamed
   (``statistics.FeatureStats``).
6. **Distance**: ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2))`` with the real part of ``scipy.linalg.sqrtm``.

FVD depends on the number of videos; compare numbers only at the same sample size, next to the real-vs-real noise
floor at that size (two disjoint reference sets, ``noise_floor``).

Extraction (``I3DFeatures``) runs batches sharded over the mesh's data axes (``parallel.BATCH_AXES``); the last
batch is padded and trimmed, so each frame size compiles once. With several processes each one extracts its own
share of the videos and the statistics are summed across processes (``allreduce_stats``).

Sources (``open_source``): a folder of video files, a prepared TFDS dataset (``name/split`` + ``data_dir``),
``synthetic[:SEED]`` (held-out synthetic driving clips), a training workdir (its written samples) or a ``.npz`` of
cached statistics::

  extractor = I3DFeatures(batch_size=16)
  ref = reference_stats("synthetic", num_videos=256, extractor=extractor, height=128, width=256)
  fake = extractor.stats(generated_uint8)                  # [n, t, h, w, 3]
  print(fvd_from_stats(fake, ref))
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import os
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from videoldm_jax import parallel
from videoldm_jax.data import synthetic as synthetic_lib
from videoldm_jax.data import video as video_lib
from videoldm_jax.data.skips import SkipCounter
from videoldm_jax.evaluation import i3d as i3d_lib
from videoldm_jax.evaluation import statistics
from videoldm_jax.models.vae import to_uint8

NUM_FRAMES = 16
SIZE = i3d_lib.INPUT_SIZE
FEATURE_DIM = i3d_lib.NUM_CLASSES
RESIZE = "bilinear 224x224, jax.image.resize(antialias=False), skipped at 224x224"
STATS_NAME = "fvd"
# Held-out synthetic clips come from seed streams far from the small seeds training configs use.
HELD_OUT_SEED = 1_000_003
SYNTHETIC_FPS = 30.0

Video = Tuple[str, np.ndarray]  # (name, uint8 [t, h, w, 3])


# ----------------------------------------------------------------------------------------------------------------
# Protocol.
# ----------------------------------------------------------------------------------------------------------------

def preprocess(videos: jax.Array, num_frames: int = NUM_FRAMES) -> jax.Array:
  """uint8 ``[b, t, h, w, 3]`` -> float32 ``[b, num_frames, 224, 224, 3]`` in [-1, 1] (steps 1-3 above)."""
  b, t, h, w, c = videos.shape
  if t < num_frames:
    raise ValueError(f"preprocess: videos have {t} frames, FVD needs {num_frames}")
  x = videos[:, :num_frames].astype(jnp.float32)
  if (h, w) != (SIZE, SIZE):
    x = jax.image.resize(x, (b, num_frames, SIZE, SIZE, c), method="bilinear", antialias=False)
  return x / 127.5 - 1.0


def check_video(video, num_frames: int, name: str) -> np.ndarray:
  """One video as uint8 ``[num_frames, h, w, 3]`` (its first frames); a ``ValueError`` naming it otherwise."""
  v = np.asarray(video)
  if v.dtype != np.uint8:
    raise ValueError(f"video {name}: expected uint8 frames, got {v.dtype}")
  if v.ndim != 4 or v.shape[-1] != 3:
    raise ValueError(f"video {name}: expected [t, h, w, 3], got shape {v.shape}")
  if v.shape[0] < num_frames:
    raise ValueError(f"video {name}: has {v.shape[0]} frames, FVD uses the first {num_frames}")
  return v[:num_frames]


def fvd_from_stats(a: statistics.FeatureStats, b: statistics.FeatureStats) -> float:
  """FVD between two sets of I3D statistics."""
  if a.dim != FEATURE_DIM or b.dim != FEATURE_DIM:
    raise ValueError(f"fvd_from_stats: expected {FEATURE_DIM}-d I3D statistics, got {a.dim} and {b.dim}")
  return statistics.frechet_distance_from_stats(a, b)


def protocol_meta(num_frames: int, num_videos: int, source: str = "") -> Dict[str, Any]:
  """What a saved ``.npz`` of statistics records about how it was made (checked when it is used)."""
  return {"metric": "fvd", "features": "i3d-kinetics-400 logits", "num_frames": int(num_frames),
          "resize": RESIZE, "range": "x/127.5-1", "num_videos": int(num_videos), "source": source}


# ----------------------------------------------------------------------------------------------------------------
# Multi-host reductions.
# ----------------------------------------------------------------------------------------------------------------

def _allgather_int(values: Sequence[int]) -> np.ndarray:
  """``[process_count, len(values)]`` int64 (one row per process)."""
  local = np.asarray(values, np.int64)
  if jax.process_count() == 1:
    return local[None]
  # int64 / float64 would be narrowed by JAX without x64: move them as pairs of uint32.
  out = np.asarray(multihost_utils.process_allgather(local.view(np.uint32)))
  return out.reshape(jax.process_count(), -1).view(np.int64)


def allreduce_stats(stats: statistics.FeatureStats) -> statistics.FeatureStats:
  """Sums count / sum / outer products over all processes (exact float64); identity with one process."""
  if jax.process_count() == 1:
    return stats
  packed = np.concatenate([[float(stats.count)], stats.sum, stats.outer.ravel()]).astype(np.float64)
  gathered = np.asarray(multihost_utils.process_allgather(packed.view(np.uint32)))
  total = gathered.reshape(jax.process_count(), -1).view(np.float64).sum(axis=0)
  out = statistics.FeatureStats(stats.dim)
  out.count = int(round(total[0]))
  out.sum = total[1:1 + stats.dim].copy()
  out.outer = total[1 + stats.dim:].reshape(stats.dim, stats.dim).copy()
  return out


def shard_count(total: int, index: Optional[int] = None, count: Optional[int] = None) -> int:
  """How many of ``total`` videos process ``index`` of ``count`` handles (videos ``index, index + count, ...``)."""
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  return len(range(index, total, count))


# ----------------------------------------------------------------------------------------------------------------
# Sharded extraction.
# ----------------------------------------------------------------------------------------------------------------

def default_mesh(devices: Optional[Sequence[Any]] = None) -> Mesh:
  """Every device on the ``data`` axis."""
  devices = list(devices if devices is not None else jax.devices())
  return Mesh(np.asarray(devices, dtype=object).reshape(len(devices), 1, 1), parallel.MESH_AXES)


def iter_chunks(videos: Iterable[Video], size: int, num_frames: int
                ) -> Iterator[Tuple[List[str], np.ndarray]]:
  """Groups ``(name, uint8 video)`` pairs into ``(names, uint8 [k, num_frames, h, w, 3])``, ``k <= size``.

  Videos are checked and cut to their first ``num_frames`` frames; a chunk ends early where the frame size
  changes, so a stream of mixed sizes compiles once per size.
  """
  names: List[str] = []
  chunk: List[np.ndarray] = []
  for name, video in videos:
    video = check_video(video, num_frames, name)
    if chunk and video.shape != chunk[0].shape:
      yield names, np.stack(chunk)
      names, chunk = [], []
    names.append(name)
    chunk.append(video)
    if len(chunk) == size:
      yield names, np.stack(chunk)
      names, chunk = [], []
  if chunk:
    yield names, np.stack(chunk)


class ShardedFeatures:
  """Runs ``fn(params, videos_uint8 [b, t, h, w, 3]) -> [b, d]`` over the mesh's data axes, in fixed-size batches.

  ``batch_size`` is the global number of videos per step (all processes together), rounded up to a multiple of
  the data-parallel size; each process contributes ``batch_size / process_count`` of them. Short batches are
  padded with black videos and trimmed, so every frame size compiles once. Results come back as float64 on the
  host. With several processes every call is collective: all processes call it, each with its own videos (a
  process that raises, e.g. on a too-short video, leaves the others waiting; check inputs before a pod run).
  """

  def __init__(self, fn: Callable[[Any, jax.Array], jax.Array], params: Any, dim: int, *,
               mesh: Optional[Mesh] = None, batch_size: Optional[int] = None, num_frames: int = NUM_FRAMES):
    self.mesh = mesh if mesh is not None else default_mesh()
    self.dim, self.num_frames = int(dim), int(num_frames)
    dp = parallel.data_parallel_size(self.mesh)
    batch_size = int(batch_size) if batch_size else 4 * dp
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    self.batch_size = -(-batch_size // dp) * dp
    if self.batch_size % jax.process_count():
      raise ValueError(f"batch_size {self.batch_size} does not split over {jax.process_count()} processes")
    self.local_batch = self.batch_size // jax.process_count()
    self._spec = P(parallel.BATCH_AXES)
    self.params = jax.device_put(params, NamedSharding(self.mesh, P()))
    self._fn = jax.jit(fn, in_shardings=(NamedSharding(self.mesh, P()), NamedSharding(self.mesh, self._spec)),
                       out_shardings=NamedSharding(self.mesh, self._spec))
    self.num_compiles = 0
    self._shapes = set()

  def _step(self, local: np.ndarray) -> np.ndarray:
    """One step on ``local`` uint8 ``[local_batch, t, h, w, 3]`` -> float64 ``[local_batch, dim]``."""
    if local.shape not in self._shapes:
      self._shapes.add(local.shape)
      self.num_compiles += 1
    x = multihost_utils.host_local_array_to_global_array(local, self.mesh, self._spec)
    out = multihost_utils.global_array_to_host_local_array(self._fn(self.params, x), self.mesh, self._spec)
    return np.asarray(out, np.float64)

  def _padded(self, chunk: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
    if len(chunk) == self.local_batch:
      return chunk
    batch = np.zeros((self.local_batch,) + tuple(shape), np.uint8)
    batch[:len(chunk)] = chunk
    return batch

  def _agree(self, count: int, shape: Optional[Tuple[int, ...]]) -> Optional[Tuple[int, ...]]:
    """The frame shape all processes use this step (None: every process is done)."""
    if jax.process_count() == 1:
      return shape if count else None
    rows = _allgather_int([count] + list(shape if shape is not None else (0, 0, 0, 0)))
    active = {tuple(int(v) for v in r[1:]) for r in rows if r[0] > 0}
    if not active:
      return None
    if len(active) > 1:
      raise ValueError(f"processes hold videos of different sizes in one step ({sorted(active)}); multi-host "
                       f"extraction needs every process to stream videos of one size")
    return active.pop()

  def batches(self, videos: Iterable[Video], progress: Optional[Callable[[int], None]] = None
              ) -> Iterator[Tuple[List[str], np.ndarray, np.ndarray]]:
    """Streams ``(names, videos uint8 [k, num_frames, h, w, 3], features [k, dim])`` for this process's
    ``(name, uint8 video)`` pairs, ``k <= local_batch`` (see ``iter_chunks``). Collective with several processes:
    a process that has run out of videos keeps stepping on padding until every process is done."""
    chunks = iter_chunks(videos, self.local_batch, self.num_frames)
    while True:
      names, chunk = next(chunks, ([], None))
      shape = self._agree(len(names), chunk.shape[1:] if chunk is not None else None)
      if shape is None:
        return
      if chunk is None:
        chunk = np.zeros((0,) + tuple(shape), np.uint8)
      feats = self._step(self._padded(chunk, shape))[:len(names)]
      if progress is not None and names:
        progress(len(names))
      yield names, chunk, feats

  def __call__(self, videos) -> np.ndarray:
    """float64 ``[n, dim]`` for this process's uint8 videos ``[n, t, h, w, 3]`` (or a list of ``[t, h, w, 3]``).

    Every video needs the same frame size here (a batch is one array); stream mixed sizes with :meth:`batches`.
    """
    if isinstance(videos, np.ndarray) and videos.ndim != 5:
      raise ValueError(f"expected uint8 videos [n, t, h, w, 3], got shape {videos.shape}")
    items = [(f"#{i}", check_video(v, self.num_frames, f"#{i}")) for i, v in enumerate(videos)]
    sizes = collections.Counter(v.shape[1:3] for _, v in items)
    if len(sizes) > 1:
      odd = [name for name, v in items if v.shape[1:3] != sizes.most_common(1)[0][0]]
      raise ValueError(f"videos of mixed frame sizes {sorted(sizes)}: {', '.join(odd[:8])} differ from the rest; "
                       f"resize them or pass them one size at a time")
    out = [f for _, _, f in self.batches(items)]
    return np.concatenate(out) if out else np.zeros((0, self.dim), np.float64)

  def stats(self, videos: Iterable[Video] | np.ndarray, *, progress: bool = False, desc: str = "features",
            total: Optional[int] = None) -> statistics.FeatureStats:
    """``FeatureStats`` of all processes' videos (summed across processes); memory does not grow with ``n``.

    ``videos``: uint8 ``[n, t, h, w, 3]`` or an iterable of ``(name, uint8 [t, h, w, 3])``.
    """
    if isinstance(videos, np.ndarray):
      if videos.ndim != 5:
        raise ValueError(f"expected uint8 videos [n, t, h, w, 3], got shape {videos.shape}")
      videos = ((f"#{i}", v) for i, v in enumerate(videos))
    stats = statistics.FeatureStats(self.dim)
    bar = None
    if progress and jax.process_index() == 0:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      bar = tqdm(total=total, desc=desc, unit="video", leave=False)
    try:
      for _, _, feats in self.batches(videos, progress=bar.update if bar is not None else None):
        stats.update(feats)
    finally:
      if bar is not None:
        bar.close()
    return allreduce_stats(stats)

  def update(self, stats: statistics.FeatureStats, videos) -> statistics.FeatureStats:
    """Adds this process's videos to ``stats`` (not reduced across processes; see ``allreduce_stats``)."""
    return stats.update(self(videos))


def _i3d_fn(num_frames: int):
  model = i3d_lib.InceptionI3d()

  def fn(params, videos):
    return model.apply({"params": params}, preprocess(videos, num_frames))
  return fn


class I3DFeatures(ShardedFeatures):
  """The FVD feature extractor: uint8 videos -> 400-d I3D logits (float64), sharded over ``mesh``.

  Args:
    params: ``InceptionI3d`` params (default: ``i3d.load_i3d(weights, cache=cache_dir)``).
    mesh: a mesh with ``parallel.MESH_AXES`` (default: every device on ``data``). The train loop passes its own.
    batch_size: global videos per step (default 4 per data-parallel device).
    num_frames: frames per video (protocol default 16; I3D needs at least 9).
  """

  def __init__(self, params: Any = None, *, mesh: Optional[Mesh] = None, batch_size: Optional[int] = None,
               num_frames: int = NUM_FRAMES, weights: Optional[str] = None, cache_dir: Optional[str] = None):
    if num_frames < 9:
      raise ValueError(f"num_frames={num_frames}: I3D needs at least 9 frames")
    if params is None:
      params = i3d_lib.load_i3d(weights, cache=cache_dir)
    super().__init__(_i3d_fn(int(num_frames)), params, FEATURE_DIM, mesh=mesh, batch_size=batch_size,
                     num_frames=num_frames)


# ----------------------------------------------------------------------------------------------------------------
# Video sources. Each yields this process's share of ``(name, uint8 [>= num_frames, h, w, 3])`` in a fixed order.
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class VideoSource:
  """A named, ordered collection of videos; ``iterate(index, count)`` yields process ``index``'s share."""
  spec: str
  kind: str  # folder | tfds | synthetic | workdir | arrays
  iterate: Callable[[int, int], Iterator[Video]]
  skips: SkipCounter = dataclasses.field(default_factory=SkipCounter)

  def videos(self) -> Iterator[Video]:
    return self.iterate(jax.process_index(), jax.process_count())


def synthetic_videos(num_videos: int, num_frames: int = NUM_FRAMES, height: int = 128, width: int = 256,
                     seed: int = 0, *, fps: float = SYNTHETIC_FPS, start: int = 0) -> np.ndarray:
  """Held-out synthetic driving clips, uint8 ``[num_videos, num_frames, height, width, 3]``.

  Scenes ``start .. start + num_videos - 1`` of the stream ``HELD_OUT_SEED + seed``, which no training
  configuration reads (training draws from ``config.data.synthetic.seed``, a small number). Different ``seed``s,
  or disjoint ``start`` ranges of one seed, give disjoint sets (for the real-vs-real noise floor).
  """
  return np.stack([v for _, v in _synthetic_iter(seed, num_frames, height, width, fps, start, 1, 0, num_videos)])


def _synthetic_iter(seed: int, num_frames: int, height: int, width: int, fps: float, start: int, count: int,
                    index: int, limit: Optional[int] = None) -> Iterator[Video]:
  stream = HELD_OUT_SEED + int(seed)
  indices = itertools.count(start + index, count) if limit is None else range(start + index, start + limit, count)
  for i in indices:
    scene = synthetic_lib.make_scene(stream, i)
    yield f"synthetic:{seed}/{i}", np.asarray(to_uint8(synthetic_lib.render_clip(scene, num_frames, height, width, fps)))


def synthetic_source(seed: int = 0, *, num_frames: int = NUM_FRAMES, height: int = 128, width: int = 256,
                     fps: float = SYNTHETIC_FPS) -> VideoSource:
  return VideoSource(f"synthetic:{seed}", "synthetic",
                     lambda index, count: _synthetic_iter(seed, num_frames, height, width, fps, 0, count, index))


def list_video_files(path: str) -> List[str]:
  """Video files under ``path`` (recursive), sorted by relative path."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such folder of videos")
  files = []
  for root, _, names in os.walk(path):
    files += [os.path.join(root, n) for n in names if n.lower().endswith(video_lib.VIDEO_EXTENSIONS)]
  files.sort(key=lambda f: os.path.relpath(f, path))
  if not files:
    raise FileNotFoundError(f"{path}: no video files (looked for {', '.join(video_lib.VIDEO_EXTENSIONS)})")
  return files


def read_first_frames(path: str, num_frames: int) -> np.ndarray:
  """uint8 ``[num_frames, h, w, 3]``: the first decoded frames of a file (its own rate, no resampling).

  Raises ``VideoDecodeError`` for unreadable files and ``ValueError`` naming the file when it is too short.
  """
  frames = []
  for _, frame in video_lib.iter_frames(path):
    frames.append(frame)
    if len(frames) == num_frames:
      return np.stack(frames)
  raise ValueError(f"video {path}: has {len(frames)} frames, FVD uses the first {num_frames}")


def folder_source(path: str, *, num_frames: int = NUM_FRAMES) -> VideoSource:
  """Video files under ``path`` sorted by name; unreadable ones are skipped and counted."""
  files = list_video_files(path)
  source = VideoSource(path, "folder", lambda index, count: iter(()))

  def iterate(index: int, count: int) -> Iterator[Video]:
    for f in files[index::count]:
      try:
        video = read_first_frames(f, num_frames)
      except video_lib.VideoDecodeError as e:
        source.skips.add(e.reason, os.path.relpath(f, path))
        continue
      yield os.path.relpath(f, path), video
  source.iterate = iterate
  return source


def tfds_source(spec: str, data_dir: Optional[str], *, num_frames: int = NUM_FRAMES) -> VideoSource:
  """A dataset prepared by ``data_pipelines`` (``builder/config/split``, e.g. ``video_folder/rds/validation``).

  Uses each record's first ``num_frames`` stored JPEG frames (stored at the dataset's constant rate), decoded at
  their stored size; records with corrupt frames are skipped and counted.
  """
  from videoldm_jax.data import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from videoldm_jax.data import records  # pylint: disable=g-import-not-at-top
  if "/" not in spec:
    raise ValueError(f"TFDS source {spec!r}: expected NAME/SPLIT (e.g. video_folder/rds/validation)")
  name, split = spec.rsplit("/", 1)
  try:
    data = pipeline_lib.open_tfds_source(name, data_dir or "", split)
  except Exception as e:  # TFDS raises its own DatasetNotFoundError / AssertionError types
    raise FileNotFoundError(f"{spec}: no such folder, and no TFDS dataset {name!r} with split {split!r} in "
                            f"data_dir={data_dir!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                            ) from None
  source = VideoSource(spec, "tfds", lambda index, count: iter(()))

  def iterate(index: int, count: int) -> Iterator[Video]:
    for i in range(index, len(data), count):
      record = data[i]
      label = records.text(record.get("file", "")) or f"{spec}[{i}]"
      frames = record["frames"]
      if len(frames) < num_frames:
        raise ValueError(f"video {label}: has {len(frames)} frames, FVD uses the first {num_frames}")
      try:
        video = records.decode_jpeg_frames(frames, range(num_frames))
      except (OSError, ValueError):
        source.skips.add("bad_frame", label)
        continue
      yield label, video
  source.iterate = iterate
  return source


def split_grid(grid: np.ndarray, threshold: int = 235) -> np.ndarray:
  """Cuts the tiles out of a grid video written by ``video_io.write_outputs`` (white gaps between tiles).

  ``grid``: uint8 ``[t, H, W, 3]``. Separator rows / columns are white in every frame; tiles that are white all
  over (empty grid cells) are dropped; tiles are cropped to the smallest tile size (codec padding). Returns uint8
  ``[n, t, h, w, 3]``.
  """
  lo = grid.min(axis=(0, 3))  # [H, W]: darkest value over frames and channels
  rows = _runs(lo.min(axis=1) < threshold)
  cols = _runs(lo.min(axis=0) < threshold)
  if not rows or not cols:
    raise ValueError("split_grid: no tiles found (the video is white all over)")
  h, w = min(b - a for a, b in rows), min(b - a for a, b in cols)
  tiles = [grid[:, r0:r0 + h, c0:c0 + w] for r0, _ in rows for c0, _ in cols]
  tiles = [t for t in tiles if t.min() < threshold]
  return np.stack(tiles)


def _runs(mask: np.ndarray) -> List[Tuple[int, int]]:
  """``[start, end)`` of the runs of True in a 1-D mask, ignoring runs of 1-2 pixels (codec ringing)."""
  out, start = [], None
  for i, m in enumerate(list(mask) + [False]):
    if m and start is None:
      start = i
    elif not m and start is not None:
      if i - start > 2:
        out.append((start, i))
      start = None
  return out


def workdir_source(path: str, *, num_frames: int = NUM_FRAMES) -> VideoSource:
  """The videos a training workdir holds: ``WORKDIR/videos/`` (one file per video) when present, else the tiles
  of ``WORKDIR/sample.mp4`` (the grid ``python -m videoldm_jax.sample`` / the chain's closing sample writes)."""
  per_video = os.path.join(path, "videos")
  if os.path.isdir(per_video):
    try:
      list_video_files(per_video)
      return dataclasses.replace(folder_source(per_video, num_frames=num_frames), kind="workdir")
    except FileNotFoundError:
      pass
  grid_path = os.path.join(path, "sample.mp4")
  if not os.path.isfile(grid_path):
    raise FileNotFoundError(f"{path}: a workdir source needs videos/ (one file per video) or sample.mp4 (written "
                            f"by python -m videoldm_jax.sample --workdir={path}); found neither")

  def iterate(index: int, count: int) -> Iterator[Video]:
    frames = np.stack([f for _, f in video_lib.iter_frames(grid_path)])
    tiles = split_grid(frames)
    for i in range(index, len(tiles), count):
      yield f"{grid_path}[{i}]", tiles[i]
  return VideoSource(path, "workdir", iterate)


def array_source(videos: np.ndarray, name: str = "arrays") -> VideoSource:
  """In-memory uint8 videos ``[n, t, h, w, 3]`` as a source."""
  videos = np.asarray(videos)
  if videos.ndim != 5:
    raise ValueError(f"{name}: expected uint8 videos [n, t, h, w, 3], got shape {videos.shape}")
  return VideoSource(name, "arrays", lambda index, count: ((f"{name}[{i}]", videos[i])
                                                          for i in range(index, len(videos), count)))


def is_stats_file(spec: str) -> bool:
  return str(spec).endswith(".npz")


def open_source(spec: Union[str, np.ndarray, VideoSource], *, num_frames: int = NUM_FRAMES,
                data_dir: Optional[str] = None, height: int = 128, width: int = 256,
                fps: float = SYNTHETIC_FPS) -> VideoSource:
  """A ``VideoSource`` from a spec (statistics files are handled by ``reference_stats``).

  ``synthetic`` / ``synthetic:SEED``: held-out synthetic clips (``height`` x ``width`` at ``fps``); an existing
  folder with a ``config.json`` (a training workdir) or without (a folder of videos); otherwise ``NAME/SPLIT`` of a
  TFDS dataset in ``data_dir``.
  """
  if isinstance(spec, VideoSource):
    return spec
  if isinstance(spec, np.ndarray):
    return array_source(spec)
  spec = str(spec)
  if is_stats_file(spec):
    raise ValueError(f"{spec}: a statistics file holds no videos")
  if spec == "synthetic" or spec.startswith("synthetic:"):
    seed = spec.partition(":")[2] or "0"
    if not seed.lstrip("-").isdigit():
      raise ValueError(f"{spec!r}: expected synthetic or synthetic:SEED (an integer)")
    return synthetic_source(int(seed), num_frames=num_frames, height=height, width=width, fps=fps)
  if os.path.isdir(spec):
    if os.path.isfile(os.path.join(spec, "config.json")):
      return workdir_source(spec, num_frames=num_frames)
    return folder_source(spec, num_frames=num_frames)
  if data_dir or (spec.count("/") >= 1 and not os.path.isabs(spec) and not spec.startswith(".")):
    return tfds_source(spec, data_dir, num_frames=num_frames)
  raise FileNotFoundError(f"{spec}: not a folder, a .npz of statistics, 'synthetic[:SEED]' or a TFDS NAME/SPLIT")


def take(source: VideoSource, num_videos: int, videos: Optional[Iterator[Video]] = None) -> Iterator[Video]:
  """This process's share of the next ``num_videos`` videos of ``source`` (from ``videos`` when given, so two
  successive calls on one iterator give disjoint sets)."""
  it = videos if videos is not None else source.videos()
  return itertools.islice(it, shard_count(num_videos))


# ----------------------------------------------------------------------------------------------------------------
# Reference statistics and the noise floor.
# ----------------------------------------------------------------------------------------------------------------

def load_reference_stats(path: str, *, num_frames: int = NUM_FRAMES,
                         num_videos: Optional[int] = None) -> statistics.FeatureStats:
  """FVD statistics saved by ``--save_reference_stats`` (``statistics.save_stats``), checked against the
  protocol (``num_frames``); a different video count only warns (FVD depends on it)."""
  stats, meta = statistics.load_stats(path)
  if STATS_NAME not in stats:
    raise ValueError(f"{path}: no FVD statistics (has {sorted(stats)})")
  if meta.get("num_frames") not in (None, num_frames):
    raise ValueError(f"{path}: statistics of {meta['num_frames']}-frame clips, but num_frames={num_frames}")
  s = stats[STATS_NAME]
  if s.dim != FEATURE_DIM:
    raise ValueError(f"{path}: FVD statistics are {s.dim}-d, expected {FEATURE_DIM}")
  if num_videos and s.count != num_videos:
    logging.warning("%s holds statistics of %d videos, not %d: FVD depends on the sample size", path, s.count,
                    num_videos)
  return s


def reference_stats(source, num_videos: int, num_frames: int = NUM_FRAMES, *,
                    extractor: Optional[ShardedFeatures] = None, data_dir: Optional[str] = None,
                    height: int = 128, width: int = 256, fps: float = SYNTHETIC_FPS, progress: bool = False
                    ) -> statistics.FeatureStats:
  """FVD statistics of the first ``num_videos`` usable videos of ``source`` (a spec for ``open_source``, a
  ``VideoSource``, uint8 ``[n, t, h, w, 3]``, or a ``.npz`` path of saved statistics)."""
  if isinstance(source, str) and is_stats_file(source):
    return load_reference_stats(source, num_frames=num_frames, num_videos=num_videos)
  src = open_source(source, num_frames=num_frames, data_dir=data_dir, height=height, width=width, fps=fps)
  extractor = extractor or I3DFeatures(num_frames=num_frames)
  stats = extractor.stats(take(src, num_videos), progress=progress, desc=f"I3D {src.spec}", total=num_videos)
  check_count(stats, num_videos, src)
  return stats


def check_count(stats: statistics.FeatureStats, wanted: int, src: VideoSource) -> None:
  if stats.count < 2:
    raise ValueError(f"{src.spec}: {stats.count} usable video(s); FVD needs at least 2 ({src.skips.report()})")
  if stats.count < wanted:
    logging.warning("%s: %d of the %d requested videos (%s)", src.spec, stats.count, wanted, src.skips.report())


def noise_floor(source, num_videos: int, num_frames: int = NUM_FRAMES, *,
                extractor: Optional[ShardedFeatures] = None, data_dir: Optional[str] = None,
                height: int = 128, width: int = 256, fps: float = SYNTHETIC_FPS, progress: bool = False
                ) -> Tuple[float, statistics.FeatureStats, statistics.FeatureStats]:
  """Real-vs-real FVD at sample size ``num_videos``: videos ``[0, n)`` against the next ``n`` of ``source``.

  Returns ``(fvd, stats of the first set, stats of the second)``; the first set is the usual reference.
  """
  if isinstance(source, str) and is_stats_file(source):
    raise ValueError(f"{source}: the noise floor needs reference videos, not saved statistics")
  src = open_source(source, num_frames=num_frames, data_dir=data_dir, height=height, width=width, fps=fps)
  extractor = extractor or I3DFeatures(num_frames=num_frames)
  it = src.videos()
  a = extractor.stats(take(src, num_videos, it), progress=progress, desc=f"I3D {src.spec} (1)", total=num_videos)
  b = extractor.stats(take(src, num_videos, it), progress=progress, desc=f"I3D {src.spec} (2)", total=num_videos)
  check_count(a, num_videos, src)
  check_count(b, num_videos, src)
  return fvd_from_stats(a, b), a, b
