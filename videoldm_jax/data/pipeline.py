"""grain input pipelines: synthetic driving scenes, prepared TFDS video datasets, pre-encoded latents.

::

  MapDataset.range(len(source))[process_index::process_count]     # disjoint per-process shards
    .shuffle(seed).repeat(num_epochs)
    .random_map(load -> clip selection -> augmentation -> conditioning dropout)   # seeded per element
    .batch(per_process_batch, drop_remainder=True)
    .to_iter_dataset(ReadOptions(read_threads, prefetch))
    [.mp_prefetch(num_workers)]
    [.map(make_global_batch)]                                       # with a mesh: global jax.Arrays

Elements (numpy, then batched): ``video`` float32 ``[t, h, w, 3]`` in [-1, 1] (or ``latents`` float32
``[t, h/8, w/8, 4]``, already multiplied by the VAE scaling factor), ``labels`` ``{name: int32}``,
``caption`` str (``caption_ids`` int32 too when a ``tokenize_fn`` is given), ``fps`` float32, ``cond_mask``
float32 (0 where conditioning was dropped for classifier-free guidance: labels set to ``NULL_LABEL``, caption to
""), ``index`` int32 (the record used) and ``num_skipped`` int32 (bad records replaced before this one).

Bad records (unreadable, too short, ...) never stop training: the element is redrawn from another record of the
same shard (deterministically, from the element's own RNG), counted in ``num_skipped`` and logged.

Iterator state (``it.get_state()`` / ``it.set_state()``, or orbax via ``iterator_checkpoint_args``) restores the
exact position: every element is a pure function of (seed, position).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import grain
import jax
import ml_collections
import numpy as np

from videoldm_jax.data import records as records_lib
from videoldm_jax.data import synthetic
from videoldm_jax.data import video as video_lib

NULL_LABEL = -1  # label value of an element whose conditioning was dropped
SYNTHETIC, LATENTS = "synthetic", "latents"
LATENT_INFO_FILE = "latents_info.json"
DEFAULT_LATENT_SCALE = 0.18215  # SD 1.x / 2.x VAE
_MAX_LOGGED_SKIPS = 20


def default_config() -> ml_collections.ConfigDict:
  """Every field the pipeline reads; task configs override what they need.

  Not type-safe, so that ``fps`` may be set to a single rate or a tuple of rates.
  """
  c = ml_collections.ConfigDict(type_safe=False)
  c.source = SYNTHETIC  # "synthetic" | "latents" | a prepared TFDS dataset "video_folder/<name>", "webvid/<name>"
  c.data_dir = ""  # TFDS data_dir, or the folder written by data_pipelines.encode_latents
  c.split = "train"
  c.num_frames = 8
  c.fps = 2.0  # float, or a tuple of rates drawn uniformly per element (e.g. (7.5, 30.0))
  c.height = 32  # pixels (video sources); latents keep their stored size
  c.width = 64
  c.random_crop = False
  c.hflip_prob = 0.0
  c.cond_drop_prob = 0.1
  c.label_fields = ()  # labels to emit; () = all the source has (synthetic: day_night, crowdedness)
  c.seed = 0
  c.num_epochs = ml_collections.config_dict.placeholder(int)  # None: repeat forever
  c.read_threads = 4  # threads computing elements in each process
  c.prefetch = 4  # batches buffered per process (>= read_threads, or threads idle)
  c.num_workers = 0  # > 0: grain mp_prefetch worker processes
  c.max_retries = 32  # consecutive bad records tolerated before giving up
  c.latent_scale = ml_collections.config_dict.placeholder(float)  # None: from latents_info.json, else 0.18215
  c.synthetic = ml_collections.ConfigDict(dict(num_examples=100_000, max_cars=4, seed=0, max_time_offset=30.0))
  return c


def with_defaults(config: Optional[Mapping[str, Any]]) -> ml_collections.ConfigDict:
  """``default_config()`` updated by ``config`` (ConfigDict or dict). Unknown keys are an error (typos)."""
  merged = default_config().to_dict()
  if config is not None:
    user = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    unknown = sorted(set(user) - set(merged))
    if unknown:
      raise KeyError(f"unknown data config field(s) {unknown}; known: {sorted(merged)}")
    for key, value in user.items():
      if key == "synthetic" and value is not None:
        merged[key] = {**merged[key], **dict(value)}
      else:
        merged[key] = tuple(value) if isinstance(value, list) else value
  return ml_collections.ConfigDict(merged)


# ----------------------------------------------------------------------------------------------------------
# Sources: random access (len, [i]) and picklable, so grain can shard / shuffle indices and workers can load.

class LatentSource:
  """Records written by ``data_pipelines.encode_latents``: finished array_record shards of one split."""

  def __init__(self, directory: str, split: str = "train"):
    self.directory, self.split = directory, split
    info_path = os.path.join(directory, LATENT_INFO_FILE)
    self.info = json.load(open(info_path)) if os.path.exists(info_path) else {}
    prefix = f"{split}-"
    self.paths = sorted(os.path.join(directory, f) for f in os.listdir(directory)
                        if f.startswith(prefix) and f.endswith(".array_record"))
    if not self.paths:
      raise FileNotFoundError(f"no finished '{split}' latent shards in {directory}")
    self._source = grain.sources.ArrayRecordDataSource(self.paths)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Dict[str, Any]:
    return records_lib.deserialize(self._source[index])

  def __repr__(self) -> str:
    return f"LatentSource({self.directory!r}, split={self.split!r}, shards={len(self.paths)})"


def open_tfds_source(name: str, data_dir: str, split: str = "train"):
  """A TFDS array_record data source (no TensorFlow): ``name`` like ``"video_folder/rds"``."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.data_source(name, data_dir=data_dir or None, split=split, try_gcs=False)


def make_source(config: ml_collections.ConfigDict):
  if config.source == SYNTHETIC:
    s = config.synthetic
    return synthetic.SyntheticDrivingSource(s.num_examples, seed=s.seed, max_cars=s.max_cars)
  if config.source == LATENTS:
    return LatentSource(config.data_dir, config.split)
  return open_tfds_source(config.source, config.data_dir, config.split)


# ----------------------------------------------------------------------------------------------------------
# Element processing.

def _pick_fps(fps, rng: np.random.Generator) -> float:
  if isinstance(fps, (tuple, list)):
    return float(fps[int(rng.integers(len(fps)))]) if len(fps) > 1 else float(fps[0])
  return float(fps)


def _labels(raw: Mapping[str, Any], fields: Sequence[str]) -> Dict[str, np.int32]:
  keys = fields or sorted(raw)
  return {k: np.int32(raw[k]) for k in keys}


def _process_synthetic(scene: synthetic.DrivingScene, rng, config) -> Dict[str, Any]:
  fps = _pick_fps(config.fps, rng)
  offset = float(rng.uniform(0.0, config.synthetic.max_time_offset))
  frames = synthetic.render_clip(scene, config.num_frames, config.height, config.width, fps,
                                 start_time=scene.start_time + offset)
  return {"video": frames, "labels": scene.labels, "caption": scene.caption, "fps": fps}


def _process_tfds(record: Mapping[str, Any], rng, config) -> Dict[str, Any]:
  name = records_lib.text(record.get("file", ""))
  fps = _pick_fps(config.fps, rng)
  frames = record["frames"]
  idx = records_lib.select_frame_indices(len(frames), float(record["fps"]), config.num_frames, fps, rng=rng,
                                         name=name)
  try:
    clip = records_lib.decode_jpeg_frames(frames, idx, (config.height, config.width),
                                          rng=rng if config.random_crop else None)
  except (OSError, ValueError) as e:  # PIL: corrupt JPEG bytes
    raise records_lib.ClipError(name, "bad_frame", str(e)) from None
  return {"video": video_lib.to_unit_range(clip), "labels": dict(record.get("labels", {})),
          "caption": records_lib.text(record.get("caption", "")), "fps": fps}


def _process_latents(record: Mapping[str, Any], rng, config, scale: float) -> Dict[str, Any]:
  name = records_lib.text(record.get("key", ""))
  fps = _pick_fps(config.fps, rng)
  moments = record["moments"]
  idx = records_lib.select_frame_indices(len(moments), float(record["fps"]), config.num_frames, fps, rng=rng,
                                         name=name)
  return {"latents": records_lib.sample_latents(moments[idx], rng, scale), "labels": dict(record.get("labels", {})),
          "caption": records_lib.text(record.get("caption", "")), "fps": fps}


@dataclasses.dataclass
class ElementFn:
  """``(record index, rng) -> element``, redrawing from the shard on bad records. Picklable for mp_prefetch."""
  source: Any
  config: ml_collections.ConfigDict
  shard: Tuple[int, int]  # (process_index, process_count)
  latent_scale: float = DEFAULT_LATENT_SCALE
  tokenize_fn: Optional[Callable[[str], np.ndarray]] = None

  def _process(self, index: int, rng: np.random.Generator) -> Dict[str, Any]:
    record = self.source[index]
    if self.config.source == SYNTHETIC:
      return _process_synthetic(record, rng, self.config)
    if self.config.source == LATENTS:
      return _process_latents(record, rng, self.config, self.latent_scale)
    return _process_tfds(record, rng, self.config)

  def __call__(self, index: int, rng: np.random.Generator) -> Dict[str, Any]:
    config = self.config
    shard_index, shard_count = self.shard
    shard_size = len(range(shard_index, len(self.source), shard_count))
    failures = []
    for _ in range(config.max_retries + 1):
      try:
        element = self._process(int(index), rng)
        element["labels"] = _labels(element["labels"], tuple(config.label_fields))
        break
      except Exception as e:  # pylint: disable=broad-except  (a bad record must never stop training)
        reason = getattr(e, "reason", type(e).__name__)
        failures.append(f"{index}: {reason}")
        if _count_skip():
          logging.warning("skipping record %d of %s: %s", index, config.source, e)
        index = shard_index + shard_count * int(rng.integers(shard_size))
    else:
      raise RuntimeError(f"{config.max_retries + 1} consecutive bad records in {config.source!r}: "
                         f"{failures[-5:]} ...; check the dataset")
    element = self._augment(element, rng)
    element["index"] = np.int32(index)
    element["num_skipped"] = np.int32(len(failures))
    return element

  def _augment(self, element: Dict[str, Any], rng: np.random.Generator) -> Dict[str, Any]:
    config = self.config
    if "video" in element and config.hflip_prob > 0 and rng.random() < config.hflip_prob:
      element["video"] = np.ascontiguousarray(element["video"][:, :, ::-1])
    labels = element["labels"]
    keep = not (config.cond_drop_prob > 0 and rng.random() < config.cond_drop_prob)
    if not keep:
      labels = {k: np.int32(NULL_LABEL) for k in labels}
      element["caption"] = ""
    element["labels"] = labels
    element["cond_mask"] = np.float32(keep)
    element["fps"] = np.float32(element["fps"])
    if self.tokenize_fn is not None:
      element["caption_ids"] = np.asarray(self.tokenize_fn(element["caption"]), np.int32)
    return element


_SKIPS_LOGGED = [0]


def _count_skip() -> bool:
  """True for the first few skips of this process (the rest are only counted in ``num_skipped``)."""
  _SKIPS_LOGGED[0] += 1
  return _SKIPS_LOGGED[0] <= _MAX_LOGGED_SKIPS


def latent_scale_for(config: ml_collections.ConfigDict, source) -> float:
  return latent_scale_from_info(config, getattr(source, "info", {}) or {})


def latent_scale_from_info(config: ml_collections.ConfigDict, info: Dict[str, Any]) -> float:
  """The factor pre-encoded latents are scaled by: ``config.latent_scale``, else the one they were encoded with
  (``latents_info.json``), else SD's."""
  if config.latent_scale is not None:
    return float(config.latent_scale)
  return float(info.get("scaling_factor", DEFAULT_LATENT_SCALE))


# ----------------------------------------------------------------------------------------------------------
# Datasets and iterators.

def make_dataset(config: Mapping[str, Any], batch_size: int, *, process_index: Optional[int] = None,
                 process_count: Optional[int] = None, source=None,
                 tokenize_fn: Optional[Callable[[str], np.ndarray]] = None,
                 drop_remainder: bool = True) -> grain.IterDataset:
  """Per-process ``grain.IterDataset`` of numpy batches of ``batch_size`` (this process's share).

  ``process_index / process_count`` default to JAX's; ``source`` overrides ``make_source(config)``.
  ``tokenize_fn`` is called once here, in the calling thread, before grain's read threads call it concurrently.
  """
  config = with_defaults(config)
  if tokenize_fn is not None:
    # The first call loads the tokenizer (a CLIP tokenizer imports transformers, whose lazy module fails when
    # several threads import through it at once), and a missing dependency fails here, not in a read thread.
    tokenize_fn("")
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  source = make_source(config) if source is None else source
  if len(source) < process_count:
    raise ValueError(f"{config.source!r} has {len(source)} records for {process_count} processes")
  element_fn = ElementFn(source, config, (process_index, process_count), latent_scale_for(config, source),
                         tokenize_fn)
  ds = grain.MapDataset.range(len(source))[process_index::process_count]
  ds = ds.shuffle(seed=config.seed).repeat(config.num_epochs)
  ds = ds.random_map(element_fn, seed=config.seed + 1)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.prefetch))
  if config.num_workers > 0:
    _ensure_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
  return ds


def _ensure_flags_parsed() -> None:
  """grain's worker processes read absl flags; outside ``absl.app.run`` (tests, notebooks) use the defaults."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_global_batch(batch: Mapping[str, Any], mesh: jax.sharding.Mesh,
                      partition_spec: jax.sharding.PartitionSpec) -> Dict[str, Any]:
  """Process-local numpy batch -> global ``jax.Array``s sharded by ``partition_spec`` (batch axis first).

  Every numeric leaf ``[b_local, ...]`` becomes ``[b_local * process_count, ...]`` sharded over the mesh axes
  named by ``partition_spec`` (only as many entries as the leaf has dims are used; the rest replicate).
  Strings (captions) stay host-local numpy: tokenize them in the task, outside jit.
  """
  num_processes = jax.process_count()

  def convert(x):
    x = np.asarray(x)
    if x.dtype.kind in "OUS":
      return x
    spec = jax.sharding.PartitionSpec(*tuple(partition_spec)[:x.ndim])
    global_shape = (x.shape[0] * num_processes,) + x.shape[1:]
    return jax.make_array_from_process_local_data(jax.sharding.NamedSharding(mesh, spec), x, global_shape)

  return jax.tree_util.tree_map(convert, dict(batch))


def make_iterator(config: Mapping[str, Any], global_batch_size: int, mesh: Optional[jax.sharding.Mesh] = None,
                  partition_spec: Optional[jax.sharding.PartitionSpec] = None, **kwargs) -> grain.DatasetIterator:
  """The training loop's input: a checkpointable grain iterator of (global, when ``mesh`` is given) batches.

  ``global_batch_size`` is split evenly over JAX processes. With a mesh, batches are ``jax.Array``s sharded by
  ``partition_spec`` (default: the batch axis over every mesh axis). Extra kwargs go to ``make_dataset``.
  """
  process_count = kwargs.get("process_count") or jax.process_count()
  if global_batch_size % process_count:
    raise ValueError(f"global batch {global_batch_size} is not divisible by {process_count} processes")
  ds = make_dataset(config, global_batch_size // process_count, **kwargs)
  if mesh is not None:
    spec = partition_spec if partition_spec is not None else jax.sharding.PartitionSpec(mesh.axis_names)
    ds = ds.map(functools.partial(make_global_batch, mesh=mesh, partition_spec=spec))
  return iter(ds)


# ----------------------------------------------------------------------------------------------------------
# Iterator state.

def get_iterator_state(it: grain.DatasetIterator) -> str:
  """JSON text of the iterator position (per process), for checkpoints."""
  return json.dumps(it.get_state())


def set_iterator_state(it: grain.DatasetIterator, state: str) -> grain.DatasetIterator:
  it.set_state(json.loads(state) if isinstance(state, (str, bytes)) else state)
  return it


def iterator_checkpoint_args(it: grain.DatasetIterator, restore: bool = False):
  """orbax ``CheckpointArgs`` for the iterator: ``ocp.args.Composite(..., data=iterator_checkpoint_args(it))``.

  Handled by ``grain.checkpoint.CheckpointHandler`` (one JSON file per process).
  """
  return grain.checkpoint.CheckpointRestore(it) if restore else grain.checkpoint.CheckpointSave(it)
