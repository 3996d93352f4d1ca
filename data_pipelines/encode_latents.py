r"""Pre-encodes a prepared video dataset into VAE latent moments (array_record), so training reads latents.

Usage::

  python -m data_pipelines.encode_latents --vae=/ckpt/sd15 --source=video_folder/rds --data_dir=/data/tfds \
      --output=/data/latents/rds --height=128 --width=256 --fps=7.5 --splits=train,validation
  # offline smoke test: synthetic driving scenes through a randomly initialised tiny VAE
  python -m data_pipelines.encode_latents --vae=random:tiny --source=synthetic --num_examples=64 \
      --num_frames=16 --fps=7.5 --height=64 --width=128 --output=/tmp/latents

Every example's frames (resampled to ``--fps``, resized to cover ``height x width`` and centre-cropped) go
through the frozen encoder in fixed-size batches sharded over the local devices; the posterior moments
``[n, h/8, w/8, 2c]`` (mean | logvar) are stored with ``fps``, labels and caption, ``records_per_shard`` examples
per ``<split>-NNNNN-of-MMMMM.array_record`` shard. A shard is written under a temporary name and renamed when
complete, so an interrupted run resumes by skipping finished shards. With several JAX processes, process ``p``
encodes shards ``p, p + P, ...``. Training reads the folder with ``config.data.source = "latents"``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import numpy as np
from absl import app, flags

from data_pipelines import common
from videoldm_jax import cli
from videoldm_jax.data import pipeline as pipeline_lib
from videoldm_jax.data import records as records_lib
from videoldm_jax.data import synthetic
from videoldm_jax.data import video as video_lib

EncodeFn = Callable[[np.ndarray], np.ndarray]  # frames [n, h, w, 3] in [-1, 1] -> moments [n, h/8, w/8, 2c]
SKIP_ERRORS = (video_lib.VideoDecodeError, records_lib.ClipError)


# ----------------------------------------------------------------------------------------------------------
# Frame sources: random access, each item {frames uint8 [n, h, w, 3], fps, labels, caption, key}.

@dataclasses.dataclass
class TfdsFrames:
  """Frames of a prepared TFDS video dataset, resampled to ``fps`` (None: as stored) and centre-cropped."""
  name: str
  data_dir: str
  split: str
  height: int
  width: int
  fps: Optional[float] = None
  max_frames: Optional[int] = None

  def __post_init__(self):
    self._source = pipeline_lib.open_tfds_source(self.name, self.data_dir, self.split)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Dict[str, Any]:
    record = self._source[index]
    key = records_lib.text(record.get("file", str(index)))
    stored_fps, stored = float(record["fps"]), record["frames"]
    fps = self.fps or stored_fps
    n = int(math.floor((len(stored) - 1) / stored_fps * fps + 1e-6)) + 1
    if self.max_frames:
      n = min(n, self.max_frames)
    idx = records_lib.select_frame_indices(len(stored), stored_fps, n, fps, start=0.0, name=key)
    try:
      frames = records_lib.decode_jpeg_frames(stored, idx, (self.height, self.width))
    except (OSError, ValueError) as e:
      raise records_lib.ClipError(key, "bad_frame", str(e)) from None
    return {"frames": frames, "fps": fps, "labels": dict(record.get("labels", {})),
            "caption": records_lib.text(record.get("caption", "")), "key": key}


@dataclasses.dataclass
class SyntheticFrames:
  """Synthetic driving scenes rendered at ``fps``."""
  num_examples: int
  num_frames: int
  fps: float
  height: int
  width: int
  seed: int = 0
  max_cars: int = 4

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> Dict[str, Any]:
    scene = synthetic.make_scene(self.seed, index, self.max_cars)
    frames = synthetic.render_frames(scene, scene.start_time + np.arange(self.num_frames) / self.fps,
                                     self.height, self.width)
    return {"frames": np.round(frames * 255).astype(np.uint8), "fps": self.fps, "labels": scene.labels,
            "caption": scene.caption, "key": f"synthetic/{self.seed}/{index}"}


# ----------------------------------------------------------------------------------------------------------
# Encoding.

def shard_name(split: str, index: int, num_shards: int) -> str:
  return f"{split}-{index:05d}-of-{num_shards:05d}.array_record"


def encode_frames(frames: np.ndarray, encode_fn: EncodeFn, frames_per_batch: int) -> np.ndarray:
  """Runs ``encode_fn`` on fixed-size batches (the last one zero-padded: one compiled shape) and concatenates."""
  x = video_lib.to_unit_range(frames) if frames.dtype == np.uint8 else np.asarray(frames, np.float32)
  out = []
  for s in range(0, len(x), frames_per_batch):
    chunk = x[s:s + frames_per_batch]
    n = len(chunk)
    if n < frames_per_batch:
      chunk = np.concatenate([chunk, np.zeros((frames_per_batch - n,) + chunk.shape[1:], chunk.dtype)])
    out.append(np.asarray(encode_fn(chunk))[:n])
  return np.concatenate(out)


def _write_json(path: str, data: Mapping[str, Any]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def encode_split(source: Sequence[Dict[str, Any]], encode_fn: EncodeFn, output: str, *, split: str = "train",
                 records_per_shard: int = 256, frames_per_batch: int = 32, dtype: str = "float16",
                 process_index: int = 0, process_count: int = 1, info: Optional[Mapping[str, Any]] = None,
                 progress: bool = False) -> Dict[str, Any]:
  """Encodes ``source`` into ``output/<split>-*.array_record`` shards; returns a summary dict.

  Finished shards (final file present) are skipped, so re-running after an interruption resumes. Bad examples
  are skipped and counted per shard (``<shard>.json``) and in ``latents_info.json``.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  os.makedirs(output, exist_ok=True)
  num_shards = max(1, math.ceil(len(source) / records_per_shard))
  info_path = os.path.join(output, pipeline_lib.LATENT_INFO_FILE)
  existing = json.load(open(info_path)) if os.path.exists(info_path) else {}
  prev = existing.get("splits", {}).get(split)
  if prev and (prev["num_shards"] != num_shards or prev["num_examples"] != len(source)):
    raise ValueError(f"{output}: '{split}' was started with {prev['num_shards']} shards / {prev['num_examples']} "
                     f"examples, now {num_shards} / {len(source)}; use a fresh --output")
  summary = {"split": split, "num_shards": num_shards, "shards_written": 0, "shards_skipped": 0,
             "records": 0, "skipped": {}}
  mine = list(range(process_index, num_shards, process_count))
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=sum(min(records_per_shard, len(source) - i * records_per_shard) for i in mine),
               desc=f"encoding {split}", unit="example")
  for shard in mine:
    path = os.path.join(output, shard_name(split, shard, num_shards))
    lo, hi = shard * records_per_shard, min(len(source), (shard + 1) * records_per_shard)
    if os.path.exists(path):
      summary["shards_skipped"] += 1
      if bar:
        bar.update(hi - lo)
      continue
    skips = common.SkipCounter()
    tmp = path + ".tmp"
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    count, lengths = 0, []
    try:
      for i in range(lo, hi):
        try:
          item = source[i]
        except SKIP_ERRORS as e:
          skips.add(e.reason, getattr(e, "path", None) or getattr(e, "name", str(i)), e.detail)
          continue
        finally:
          if bar:
            bar.update(1)
        moments = encode_frames(item["frames"], encode_fn, frames_per_batch).astype(dtype)
        writer.write(records_lib.serialize({
            "moments": moments, "fps": np.float32(item["fps"]), "num_frames": np.int32(len(moments)),
            "labels": {k: int(v) for k, v in item["labels"].items()}, "caption": item["caption"],
            "key": item["key"]}))
        count += 1
        lengths.append(len(moments))
    finally:
      writer.close()
    _write_json(path + ".json", {"records": count, "skipped": skips.as_dict(),
                                 "min_frames": min(lengths, default=None), "max_frames": max(lengths, default=None)})
    os.replace(tmp, path)  # the shard now counts as finished
    summary["shards_written"] += 1
    summary["records"] += count
    for k, v in skips.counts.items():
      summary["skipped"][k] = summary["skipped"].get(k, 0) + v
  if bar:
    bar.close()

  # Totals over every finished shard of the split (also those of earlier runs / other processes).
  totals, skipped, done, mins, maxs = 0, {}, 0, [], []
  for shard in range(num_shards):
    side = os.path.join(output, shard_name(split, shard, num_shards)) + ".json"
    if os.path.exists(os.path.join(output, shard_name(split, shard, num_shards))) and os.path.exists(side):
      d = json.load(open(side))
      done += 1
      totals += d["records"]
      for k, v in d["skipped"].items():
        skipped[k] = skipped.get(k, 0) + v
      if d.get("min_frames") is not None:
        mins.append(d["min_frames"])
        maxs.append(d["max_frames"])
  merged = dict(existing)
  merged.update(info or {})
  merged.setdefault("splits", {})[split] = {"num_shards": num_shards, "num_examples": len(source),
                                            "shards_done": done, "records": totals, "skipped": skipped,
                                            "dtype": dtype, "min_frames": min(mins, default=None),
                                            "max_frames": max(maxs, default=None)}
  # Frames of the shortest stored clip over all splits (at the stored fps): an upper bound for clip lengths.
  shortest = [sp["min_frames"] for sp in merged["splits"].values() if sp.get("min_frames") is not None]
  merged["num_frames"] = min(shortest) if shortest else None
  _write_json(info_path, merged)
  logging.warning("latents %s: %d/%d shards done, %d records; skipped %s", split, done, num_shards, totals,
                  skipped or "none")
  return summary


def make_sharded_encode_fn(apply_fn: Callable[[Any, Any], Any], params: Any, devices=None) -> EncodeFn:
  """``frames -> moments`` running ``apply_fn(params, x)`` jitted with the batch sharded over ``devices``.

  Params are replicated; batches must be a multiple of the device count (``encode_frames`` keeps them fixed).
  """
  import jax  # pylint: disable=g-import-not-at-top
  devices = list(devices or jax.local_devices())
  mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = jax.device_put(params, replicated)
  fn = jax.jit(apply_fn, in_shardings=(replicated, data), out_shardings=data)

  def encode(frames: np.ndarray) -> np.ndarray:
    if len(frames) % len(devices):
      raise ValueError(f"batch of {len(frames)} frames is not a multiple of {len(devices)} devices")
    return np.asarray(fn(params, jax.device_put(np.asarray(frames, np.float32), data)))

  return encode


def load_vae(spec: str, dtype: str = "float32"):
  """(apply_fn, params, scaling_factor) from a converted checkpoint dir, or ``random:<preset>`` for smoke tests."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from videoldm_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top  (lazy: CLI only)
  compute = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
  if spec.startswith("random:"):
    config = getattr(vae_lib.VAEConfig, spec.split(":", 1)[1])()
    model = vae_lib.AutoencoderKL(config, dtype=compute)
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    params = nn.meta.unbox(model.init(jax.random.key(0), vae_lib.example_image(config))["params"])
  else:
    from videoldm_jax import convert  # pylint: disable=g-import-not-at-top
    converted = convert.load_converted(spec, components=("vae",))
    config, params = converted.configs["vae"], converted.params["vae"]
    model = vae_lib.AutoencoderKL(config, dtype=compute)
  if isinstance(params, Mapping) and set(params) == {"params"}:
    params = params["params"]

  def apply_fn(p, x):
    return model.apply({"params": p}, x.astype(compute), method="encode").astype(jnp.float32)

  return apply_fn, params, float(config.scaling_factor)


# ----------------------------------------------------------------------------------------------------------
# CLI.

def define_flags(fv: flags.FlagValues) -> None:
  """The command's flags, defined in ``fv`` (the global FLAGS when run as a program)."""
  flags.DEFINE_string("vae", None, "converted checkpoint dir (videoldm_jax.convert) or random:tiny", flag_values=fv)
  flags.DEFINE_enum("vae_dtype", "float32", ["float32", "bfloat16"], "VAE compute dtype", flag_values=fv)
  flags.DEFINE_string("source", None, "'synthetic' or a prepared TFDS dataset, e.g. video_folder/rds", flag_values=fv)
  flags.DEFINE_string("data_dir", "", "TFDS data_dir of --source", flag_values=fv)
  flags.DEFINE_string("splits", "train", "comma-separated splits of --source", flag_values=fv)
  flags.DEFINE_string("output", None, "output folder (resumable)", flag_values=fv)
  flags.DEFINE_integer("height", None, "frame crop height (multiple of 8)", flag_values=fv)
  flags.DEFINE_integer("width", None, "frame crop width (multiple of 8)", flag_values=fv)
  flags.DEFINE_float("fps", None, "resample to this rate (default: as stored)", flag_values=fv)
  flags.DEFINE_integer("max_frames", None, "encode at most this many frames per video", flag_values=fv)
  flags.DEFINE_integer("frames_per_batch", 32, "frames per encoder call (all devices)", flag_values=fv)
  flags.DEFINE_integer("records_per_shard", 256, "examples per output shard", flag_values=fv)
  flags.DEFINE_enum("dtype", "float16", ["float16", "float32"], "stored moments dtype", flag_values=fv)
  flags.DEFINE_integer("num_examples", 1000, "synthetic: number of scenes", flag_values=fv)
  flags.DEFINE_integer("num_frames", 16, "synthetic: frames per scene", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "synthetic: scene seed", flag_values=fv)


def run(fv: flags.FlagValues) -> int:
  """Runs the command with parsed flags; bad input raises ``app.UsageError`` naming the flag."""
  cli.require(fv, "vae", "source", "output", "height", "width")
  if fv.height % 8 or fv.width % 8:
    raise app.UsageError("--height and --width must be multiples of 8")
  logging.basicConfig(level=logging.WARNING, format="%(message)s")

  import jax  # pylint: disable=g-import-not-at-top
  apply_fn, params, scale = load_vae(fv.vae, fv.vae_dtype)
  encode_fn = make_sharded_encode_fn(apply_fn, params)
  ndev = jax.local_device_count()
  frames_per_batch = max(ndev, fv.frames_per_batch // ndev * ndev)
  info = {"scaling_factor": scale, "vae": fv.vae, "source": fv.source, "data_dir": fv.data_dir,
          "height": fv.height, "width": fv.width, "fps": fv.fps}
  for split in [s for s in fv.splits.split(",") if s]:
    if fv.source == pipeline_lib.SYNTHETIC:
      source = SyntheticFrames(fv.num_examples, fv.num_frames, fv.fps or 7.5, fv.height, fv.width,
                               seed=fv.seed if split == "train" else fv.seed + 1)
    else:
      source = TfdsFrames(fv.source, fv.data_dir, split, fv.height, fv.width, fv.fps, fv.max_frames)
    summary = encode_split(source, encode_fn, fv.output, split=split, records_per_shard=fv.records_per_shard,
                           frames_per_batch=frames_per_batch, dtype=fv.dtype, process_index=jax.process_index(),
                           process_count=jax.process_count(), info=info, progress=jax.process_index() == 0)
    print(f"{split}: wrote {summary['shards_written']} shard(s), {summary['records']} records; "
          f"{summary['shards_skipped']} finished shard(s) kept; skipped {summary['skipped'] or 'none'}")
  print(f"latents in {os.path.abspath(fv.output)} (config.data.source='latents', data_dir=that folder)")
  return 0


def main(argv: Sequence[str]) -> int:
  """The command with ``argv`` (its flags, as on the command line)."""
  return cli.main("data_pipelines.encode_latents", define_flags, run, argv)


if __name__ == "__main__":
  cli.run_program(define_flags, run)
