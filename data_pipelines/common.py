"""Shared machinery of the video TFDS builders: validation, frame encoding, skip accounting, splits.

Every builder turns a list of :class:`VideoTask` (a file plus its labels / caption) into examples:

  probe (demux only: catches unreadable / zero-byte / non-video / truncated / too-short / too-small files)
  -> decode at ``min(source fps, max_fps)`` with the short side resized down to ``short_side`` (never up)
  -> JPEG-encode every frame -> one example per video (or per ``clip_seconds`` segment).

Probing and decoding run in worker processes (:class:`videoldm_jax.data.isolated.IsolatedPool`, reused across
files): FFmpeg is C code fed untrusted files, and a file that crashes or hangs its worker is skipped as
``decoder_crashed`` / ``decoder_timeout`` while the other files go on.

Frames are stored as a list of JPEG bytes so that training decodes only the frames a clip uses. Each example
records ``fps`` (the stored, constant frame rate), ``num_frames``, ``duration``, ``start_time`` in the source,
the source fps and the file name. Bad inputs are skipped, counted by reason, logged at the end and saved in
the dataset info (``info.metadata["skipped"]``); a dataset without a single usable video fails.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
import logging
import os
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from videoldm_jax.data import isolated
from videoldm_jax.data import video as video_lib
from videoldm_jax.data.skips import SkipCounter
from videoldm_jax.data.video import VideoDecodeError

TRAIN, VALIDATION = "train", "validation"

# Reasons for skipping an input, besides the VideoDecodeError ones.
BAD_METADATA = "bad_metadata"
BAD_CAPTION = "bad_caption"
NOT_VIDEO = "not_video"  # a file whose extension is not a video container's
TOO_SMALL = "too_small"  # short side below ``min_short_side``: training would only see an upscaled blur
DECODER_CRASHED = isolated.DECODER_CRASHED  # its worker process died (segfault, abort, out of memory)
DECODER_TIMEOUT = isolated.DECODER_TIMEOUT  # its worker ran past ``decode_timeout``


class NoUsableVideosError(ValueError):
  """Raised when every input was skipped (the message lists the reasons)."""


# ----------------------------------------------------------------------------------------------------------
# Skip accounting.

def check_utf8(text: str) -> bool:
  """True when ``text`` (read with errors='surrogateescape') holds no undecodable bytes."""
  try:
    text.encode("utf-8")
    return True
  except UnicodeEncodeError:
    return False


def stable_split(key: str, val_fraction: float) -> str:
  """``validation`` for a fixed ``val_fraction`` of keys (by SHA-256 of the key), else ``train``."""
  h = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()[:8], "big")
  return VALIDATION if h / 2.0 ** 64 < val_fraction else TRAIN


# ----------------------------------------------------------------------------------------------------------
# Labels.

@dataclasses.dataclass(frozen=True)
class LabelSpec:
  """An integer label; with ``names`` it is a class label whose values may be given by name or index."""
  name: str
  names: Tuple[str, ...] = ()

  @classmethod
  def parse(cls, spec: str) -> "LabelSpec":
    """``"crowdedness"`` (any integer) or ``"day_night=day|night"`` (class names, stored as indices)."""
    name, _, names = spec.partition("=")
    return cls(name.strip(), tuple(n.strip() for n in names.split("|") if n.strip()))

  def feature(self):
    if self.names:
      return tfds.features.ClassLabel(names=list(self.names))
    return tfds.features.Scalar(dtype=np.int64)

  def value(self, raw: Any) -> int:
    """The stored integer for a raw metadata value; raises ValueError when it is not valid."""
    if isinstance(raw, bool) or raw is None:
      raise ValueError(f"{self.name}: {raw!r} is not a label")
    if isinstance(raw, str):
      raw = raw.strip()
      if raw in self.names:
        return self.names.index(raw)
    value = float(raw)
    if value != int(value):
      raise ValueError(f"{self.name}: {raw!r} is not an integer")
    value = int(value)
    if self.names and not 0 <= value < len(self.names):
      raise ValueError(f"{self.name}: {value} outside 0..{len(self.names) - 1}")
    return value


def parse_label_specs(specs: Iterable[str] | str | None) -> Tuple[LabelSpec, ...]:
  if not specs:
    return ()
  if isinstance(specs, str):
    specs = [s for s in specs.split(",") if s.strip()]
  return tuple(LabelSpec.parse(s) for s in specs)


# ----------------------------------------------------------------------------------------------------------
# Per-video work.

@dataclasses.dataclass(frozen=True)
class VideoTask:
  """One source video and its metadata, ready for (picklable) processing in a worker."""
  key: str  # unique, stable: the split hash and the example keys derive from it
  path: str
  caption: str = ""
  labels: Tuple[Tuple[str, int], ...] = ()
  extra: Tuple[Tuple[str, str], ...] = ()  # builder-specific text fields (e.g. WebVid videoid)


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
  short_side: int = 256
  min_short_side: int = 64
  max_fps: float = 30.0
  min_seconds: float = 1.0
  max_seconds: Optional[float] = 60.0
  clip_seconds: Optional[float] = None
  jpeg_quality: int = 90


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def probe_task(task: VideoTask, options: EncodeOptions) -> video_lib.VideoInfo:
  """Container checks (raise VideoDecodeError) plus the minimum duration and frame size."""
  info = video_lib.probe(task.path)
  if min(info.height, info.width) < options.min_short_side:
    raise VideoDecodeError(task.path, TOO_SMALL,
                           f"{info.width}x{info.height}: short side < min_short_side={options.min_short_side}")
  if info.duration + 1e-6 < options.min_seconds:
    raise VideoDecodeError(task.path, VideoDecodeError.TOO_SHORT,
                           f"{info.duration:.2f}s < min_seconds={options.min_seconds}")
  return info


def encode_task(task: VideoTask, options: EncodeOptions) -> List[Tuple[str, Dict[str, Any]]]:
  """Decodes one video into ``[(key, example)]``; raises VideoDecodeError for bad input."""
  info = probe_task(task, options)
  fps = float(min(info.fps, options.max_fps))
  end = options.max_seconds
  short_side = min(options.short_side, info.height, info.width)  # never upscale
  frames = [encode_jpeg(f, options.jpeg_quality)
            for _, f in video_lib.iter_frames(task.path, fps=fps, short_side=short_side, end=end)]
  height, width = video_lib.short_side_size((info.height, info.width), short_side)
  min_frames = max(1, int(round(options.min_seconds * fps)))
  if len(frames) < min_frames:
    raise VideoDecodeError(task.path, VideoDecodeError.TOO_SHORT, f"{len(frames)} frames at {fps:.3f} fps")
  seg = len(frames) if not options.clip_seconds else max(1, int(round(options.clip_seconds * fps)))
  out = []
  for i, s in enumerate(range(0, len(frames), seg)):
    chunk = frames[s:s + seg]
    if len(chunk) < min_frames:
      break
    example = {
        "frames": chunk,
        "fps": np.float32(fps),
        "num_frames": np.int32(len(chunk)),
        "duration": np.float32(len(chunk) / fps),
        "start_time": np.float32(s / fps),
        "height": np.int32(height),
        "width": np.int32(width),
        "source_fps": np.float32(info.fps),
        "file": task.key,
        "caption": task.caption,
    }
    if task.labels:
      example["labels"] = dict(task.labels)
    example.update(dict(task.extra))
    out.append((f"{task.key}#{i}", example))
  return out


def _call(fn, task, options):
  """Worker side: ``(result, None)`` or ``(None, (reason, detail))`` for a bad input."""
  try:
    return fn(task, options), None
  except VideoDecodeError as e:
    return None, (e.reason, e.detail)


def parallel_map(fn: Callable[[VideoTask, EncodeOptions], Any], tasks: Sequence[VideoTask], options: EncodeOptions,
                 pool: isolated.IsolatedPool, desc: str = "", progress: bool = False
                 ) -> Iterator[Tuple[VideoTask, Any, Optional[Tuple[str, str]]]]:
  """Ordered ``(task, fn(task, options), None)`` or ``(task, None, (reason, detail))``, run in ``pool``.

  ``fn`` must be a module-level function (it is pickled by name). A bad input (VideoDecodeError) and a worker
  lost while running a task (``decoder_crashed`` / ``decoder_timeout``) both give a reason.
  """
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=len(tasks), desc=desc, unit="video")
  try:
    for task, out in zip(tasks, pool.map(_call, [(fn, t, options) for t in tasks])):
      if bar:
        bar.update(1)
      if isinstance(out, isolated.WorkerLost):
        logging.warning("%s: %s while reading %s (%s); skipping it", desc or "decoding", out.reason, task.path,
                        out.detail)
        yield task, None, (out.reason, out.detail)
      else:
        yield (task,) + out
  finally:
    if bar:
      bar.close()


# ----------------------------------------------------------------------------------------------------------
# Builder base.

def video_features(label_specs: Sequence[LabelSpec], extra_text: Sequence[str] = ()) -> tfds.features.FeaturesDict:
  feats = {
      "frames": tfds.features.Tensor(shape=(None,), dtype=np.object_),  # JPEG bytes, one per frame
      "fps": tfds.features.Scalar(dtype=np.float32),
      "num_frames": tfds.features.Scalar(dtype=np.int32),
      "duration": tfds.features.Scalar(dtype=np.float32),
      "start_time": tfds.features.Scalar(dtype=np.float32),
      "height": tfds.features.Scalar(dtype=np.int32),
      "width": tfds.features.Scalar(dtype=np.int32),
      "source_fps": tfds.features.Scalar(dtype=np.float32),
      "file": tfds.features.Text(),
      "caption": tfds.features.Text(),
  }
  if label_specs:
    feats["labels"] = tfds.features.FeaturesDict({s.name: s.feature() for s in label_specs})
  for name in extra_text:
    feats[name] = tfds.features.Text()
  return tfds.features.FeaturesDict(feats)


@dataclasses.dataclass
class VideoBuilderConfig(tfds.core.BuilderConfig):
  """Options shared by the video builders (the config ``name`` is the dataset's config directory)."""
  source: str = ""
  short_side: int = 256
  min_short_side: int = 64  # smaller videos are skipped (``too_small``), not upscaled
  max_fps: float = 30.0
  min_seconds: float = 1.0
  max_seconds: Optional[float] = 60.0
  clip_seconds: Optional[float] = None
  val_fraction: float = 0.05
  max_examples: Optional[int] = None  # number of source videos used (in sorted order), for quick runs
  jpeg_quality: int = 90
  num_workers: int = 0  # decoding worker processes; 0 or 1: one (files are never decoded in this process)
  decode_timeout: Optional[float] = None  # seconds per file before its worker is killed (``decoder_timeout``)
  progress: bool = False

  @property
  def encode_options(self) -> EncodeOptions:
    return EncodeOptions(short_side=self.short_side, min_short_side=self.min_short_side, max_fps=self.max_fps,
                         min_seconds=self.min_seconds, max_seconds=self.max_seconds,
                         clip_seconds=self.clip_seconds, jpeg_quality=self.jpeg_quality)


class VideoBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the video builders: subclasses implement ``_list_tasks(skips) -> [VideoTask]`` and features."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "JPEG frames at min(source fps, max_fps), short side resized."}
  EXTRA_TEXT: Tuple[str, ...] = ()

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS' own lookup reaches for the `importlib_resources` backport, which it only installs on Python < 3.9.
    return epath.Path(inspect.getfile(cls))

  def __init__(self, *, config: VideoBuilderConfig, **kwargs):
    super().__init__(config=config, **kwargs)
    self._skips = SkipCounter()
    self._num_videos = 0
    self._num_examples = 0
    self._pool: Optional[isolated.IsolatedPool] = None

  # Subclass hooks.
  def _label_specs(self) -> Tuple[LabelSpec, ...]:
    return ()

  def _list_tasks(self, skips: SkipCounter) -> List[VideoTask]:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__,
        features=video_features(self._label_specs(), self.EXTRA_TEXT),
        metadata=tfds.core.MetadataDict())

  @property
  def skips(self) -> SkipCounter:
    return self._skips

  def _decode_pool(self) -> isolated.IsolatedPool:
    """The decoding workers, started on first use and shared by probing and every split's encoding."""
    if self._pool is None:
      cfg: VideoBuilderConfig = self.builder_config
      self._pool = isolated.IsolatedPool(max(1, cfg.num_workers), timeout=cfg.decode_timeout)
    return self._pool

  def _fail(self, what: str):
    raise NoUsableVideosError(
        f"{self.name}: no usable videos in {self.builder_config.source!r} ({what}).\n{self._skips.report()}")

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg: VideoBuilderConfig = self.builder_config
    if not cfg.source or not os.path.exists(cfg.source):
      raise FileNotFoundError(f"{self.name}: source {cfg.source!r} does not exist")
    tasks = sorted(self._list_tasks(self._skips), key=lambda t: t.key)
    options = cfg.encode_options
    usable: List[VideoTask] = []
    pending = tasks
    # Probe in chunks so that max_examples stops early on huge sources.
    while pending and (cfg.max_examples is None or len(usable) < cfg.max_examples):
      want = len(pending) if cfg.max_examples is None else cfg.max_examples - len(usable)
      chunk, pending = pending[:want], pending[want:]
      for task, _, err in parallel_map(probe_task, chunk, options, self._decode_pool(), "probing", cfg.progress):
        if err:
          self._skips.add(err[0], task.key, err[1])
        else:
          usable.append(task)
    if not usable:
      self._fail(f"{len(tasks)} candidate(s)")
    by_split: Dict[str, List[VideoTask]] = {TRAIN: [], VALIDATION: []}
    for task in usable:
      by_split[stable_split(task.key, cfg.val_fraction)].append(task)
    self._split_sizes = {k: len(v) for k, v in by_split.items()}
    return {name: self._generate_examples(split_tasks, name) for name, split_tasks in by_split.items()
            if split_tasks}

  def _generate_examples(self, tasks: Sequence[VideoTask], split: str = ""):
    cfg: VideoBuilderConfig = self.builder_config
    for task, examples, err in parallel_map(encode_task, tasks, cfg.encode_options, self._decode_pool(),
                                            f"encoding {split}".strip(), cfg.progress):
      if err:
        self._skips.add(err[0], task.key, err[1])
        continue
      self._num_videos += 1
      for key, example in examples:
        self._num_examples += 1
        yield key, example

  def _download_and_prepare(self, dl_manager, download_config):
    try:
      super()._download_and_prepare(dl_manager, download_config)
    except AssertionError as e:  # the TFDS writer's "No examples were yielded." for a split gone all-bad
      if "No examples" not in str(e):
        raise
      self._fail("a split lost all its videos while decoding")
    finally:
      if self._pool is not None:
        self._pool.close()
        self._pool = None
    if self._num_examples == 0:
      self._fail("every video failed to decode")
    self.info.metadata["skipped"] = self._skips.as_dict()
    self.info.metadata["num_videos"] = self._num_videos
    cfg = self.builder_config
    self.info.metadata["options"] = {k: getattr(cfg, k) for k in (
        "source", "short_side", "min_short_side", "max_fps", "min_seconds", "max_seconds", "clip_seconds",
        "val_fraction", "max_examples", "jpeg_quality")}
    logging.warning("%s: %d videos -> %d examples; %s", self.name, self._num_videos, self._num_examples,
                    self._skips.report())
