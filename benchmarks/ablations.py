r"""The paper's ablations on the synthetic driving scenes, at runlocal size, measured by our FVD (and FID).

Each row trains its variants from the same initialisation, on the same data in the same order (both digested and
compared, not assumed), with the same step budget and seeds, samples the same held-out conditions with the same
noise seeds and scores them against held-out synthetic clips, next to the real-vs-real noise floor at that sample
size; every number is given per seed and as mean +- std over ``--seeds``.

  1. ``image`` (the image LDM sampled frame by frame: independent noise per frame) vs ``video`` (the key-frame
     video LDM: its temporal layers trained on top of the frozen image LDM); the image arm gets the same budget as
     further image fine-tuning on the frames of the same clips.
  2. ``attention`` (temporal attention only: ``model.temporal.conv_blocks=False``) vs ``conv_attention`` (3D-conv
     ResBlocks + attention, = row 1's ``video``).
  3. ``end_to_end`` (every layer trained from scratch on clips for the image pre-training + temporal budget, in
     steps) vs ``image_pretrained`` (= row 1's ``video``: image pre-training, then temporal layers).
  4. ``s=1`` vs ``s=2``: the predictor (trained from row 1's ``video``) rolled out from the first 2 true frames
     of each held-out clip, with context guidance 1 (none) and 2; scored on the 16 generated frames.
  5. ``image`` (the trained autoencoder's decoder), ``image_ft`` (its decoder fine-tuned on the frames of the clips
     the video arm sees, 2D PatchGAN) vs ``video`` (the ``decoder`` stage: temporal layers, 3D PatchGAN):
     reconstruction FVD of held-out 30 fps clips from per-frame posterior samples (a stand-in for generated
     latents whose frames disagree slightly); the posterior mode is recorded too.
  6. ``image`` (the pixel upsampler pre-trained on frames, then fine-tuned on the frames of the clips the video
     arm sees) vs ``video`` (the ``upsampler`` stage: temporal layers on top of the pre-trained one): 4x
     upsampling of the ground-truth low-res held-out clips, scored at the training patch size (the U-Net is
     convolutional; whole 128x256 frames cost ~2 min per clip on a 2-core CPU); ``bilinear`` for reference.

Shared by every row: one autoencoder (trained once, seed 0: the frozen VAE of every latent model, as the paper's
pre-trained VAE). Key-frame clips have 8 frames at 1.875 fps; I3D needs at least 9, so rows 1-3 score each
clip with every frame repeated up to 16 frames, generated and real alike. FID needs the pytorch-fid Inception
weights (``--fid_weights``, not shipped); without them the FID fields are null and the JSON says why.

  python benchmarks/ablations.py --workdir=/tmp/ablations                  # the table (~2 h on a 2-core CPU)
  python benchmarks/ablations.py --workdir=/tmp/ablations --rows=1,2 --seeds=0,1,2
  python benchmarks/ablations.py --workdir=/tmp/ablations_long --rows=1 --seeds=0 --budget=temporal=600
  python benchmarks/ablations.py --workdir=/tmp/ablations_tiny --tiny      # end to end in minutes, no results

Finished runs under ``--workdir`` are reused (WORKDIR/budget.json records the budget; another budget needs another
workdir); the table goes to WORKDIR/ablations.json, rewritten after every row.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from typing import Any, Callable, Dict, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # stage_runs, when run as a script

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import stage_runs  # noqa: E402
from configs import rds  # noqa: E402
from videoldm_jax import checkpoint, optim, parallel, pipeline, sampling, tasks, workdirs  # noqa: E402
from videoldm_jax.data import synthetic  # noqa: E402
from videoldm_jax.evaluation import fvd, statistics  # noqa: E402
from videoldm_jax.models import vae as vae_lib  # noqa: E402
from videoldm_jax.tasks.autoencoder import psnr  # noqa: E402
from videoldm_jax.tasks.decoder import flicker_error  # noqa: E402
from videoldm_jax.tasks.upsampler import downsample  # noqa: E402

ROWS = {
    1: ("image_vs_video", "FVD: video < image (temporal layers on a frozen image LDM beat frame-by-frame sampling)"),
    2: ("attention_vs_conv_attention", "FVD: conv_attention < attention (paper 534 vs 704)"),
    3: ("end_to_end_vs_image_pretrained", "FVD: image_pretrained < end_to_end (paper 534 vs 1155)"),
    4: ("context_guidance", "FVD: s=2 < s=1 (paper 534 -> 509), at some FID cost"),
    5: ("image_vs_video_decoder", "reconstruction FVD: video < image (paper 390.88 -> 32.94)"),
    6: ("image_vs_video_upsampler", "FVD: video < image (paper 165.98 -> 45.39)"),
}
# Row -> (the variant the paper finds better, the one it beats): the direction each seed is checked for.
DIRECTION = {1: ("video", "image"), 2: ("conv_attention", "attention"), 3: ("image_pretrained", "end_to_end"),
             4: ("s=2", "s=1"), 5: ("video", "image_ft"), 6: ("video", "image")}
CONTEXT = 2        # predictor context frames
REAL_SEED, FLOOR_SEED = 0, 1  # held-out synthetic streams: the reference set and the disjoint noise-floor set
IMAGE_LDM = "spatial U-Net, label tokens, VAE (the pre-trained image LDM)"
IMAGE_LDM_PARAMS = r"(unet|label_encoder|vae)/.*"  # temporal params are left out of every init digest


@dataclasses.dataclass(frozen=True)
class Budget:
  """Steps of every run, sampler steps and the evaluation size."""
  autoencoder: int = 100          # the runlocal chain's
  image_pretrain: int = 300
  temporal: int = 150             # each arm of rows 1-3 after pre-training
  predictor: int = 150
  decoder: int = 60               # the runlocal chain's
  upsampler_pretrain: int = 150   # the runlocal chain's
  upsampler: int = 60             # the runlocal chain's
  sampler_steps: int = 10         # DDIM, every latent row
  upsampler_sampler_steps: int = 10
  clips: int = 24                 # held-out clips (and generated videos) per variant
  key_frames: int = 8             # frames of the key-frame clips (the base stage's)
  fast_compile: bool = False      # XLA -O0 (compile-bound smoke runs)
  clip_frames: int = 8            # frames of the decoder / upsampler training clips


FULL = Budget()
TINY = Budget(autoencoder=2, image_pretrain=2, temporal=2, predictor=2, decoder=2, upsampler_pretrain=2, upsampler=2,
              sampler_steps=2, upsampler_sampler_steps=2, clips=4, key_frames=4, fast_compile=True, clip_frames=3)

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("workdir", "/tmp/ablations", "root of the runs; the table goes to WORKDIR/ablations.json")
  flags.DEFINE_list("rows", [str(r) for r in ROWS], "rows to run (1-6)")
  flags.DEFINE_list("seeds", ["0", "1"], "seeds of every run after the shared autoencoder")
  flags.DEFINE_bool("tiny", False, "a few steps and clips: checks the script end to end, claims nothing")
  flags.DEFINE_list("budget", [], "overrides of the budget, e.g. temporal=600,clips=32 (see Budget)")
  flags.DEFINE_float("guidance", 2.0, "row 4's context guidance s > 1")
  flags.DEFINE_string("fid_weights", "", "pytorch-fid Inception weights (pt_inception-2015-12-05 .pth / "
                      ".safetensors) for the FID fields")


# ----------------------------------------------------------------------------------------------------------------
# Held-out clips and scoring.
# ----------------------------------------------------------------------------------------------------------------

def held_out(seed: int, n: int, frames: int, height: int, width: int, fps: float) -> Dict[str, Any]:
  """Held-out synthetic scenes (``fvd``'s stream ``seed``): uint8 ``clips`` ``[n, t, h, w, 3]`` and their
  ``labels`` (day/night, crowdedness), the conditioning the generated videos get."""
  batch = synthetic.render_batch(fvd.HELD_OUT_SEED + seed, range(n), num_frames=frames, height=height, width=width,
                                 fps=fps)
  return {"clips": np.asarray(vae_lib.to_uint8(batch["video"])), "labels": batch["labels"]}


def to_fvd_length(clips: np.ndarray) -> np.ndarray:
  """Clips shorter than the FVD protocol's 16 frames with every frame repeated (nearest neighbour in time)."""
  t = clips.shape[1]
  if t >= fvd.NUM_FRAMES:
    return clips
  return np.repeat(clips, -(-fvd.NUM_FRAMES // t), axis=1)[:, :fvd.NUM_FRAMES]


class Scorer:
  """FVD (and FID, with Inception weights) of generated clips against a reference set, cached per reference."""

  def __init__(self, fid_weights: str = "", batch_size: int = 8):
    self.i3d = fvd.I3DFeatures(batch_size=batch_size)
    self.fid = None
    if fid_weights:
      from videoldm_jax import evaluate  # pylint: disable=g-import-not-at-top
      self.fid = evaluate.FIDAccumulator(fid_weights)
    self._refs: Dict[str, Dict[str, Any]] = {}

  def _fid_stats(self, clips: np.ndarray):
    stats = self.fid.new()
    self.fid.update(stats, clips)
    return stats

  def reference(self, name: str, real: np.ndarray, floor: np.ndarray) -> Dict[str, Any]:
    """Statistics of the reference clips ``real`` and the noise floor (``floor``: a disjoint real set)."""
    if name not in self._refs:
      ref = {"fvd": self.i3d.stats(to_fvd_length(real))}
      ref["floor_fvd"] = fvd.fvd_from_stats(ref["fvd"], self.i3d.stats(to_fvd_length(floor)))
      # The reference against a second extraction of itself: 0 up to the matrix square root's error.
      ref["self_fvd"] = fvd.fvd_from_stats(ref["fvd"], self.i3d.stats(to_fvd_length(real)))
      if self.fid is not None:
        ref["fid"] = self._fid_stats(real)
        ref["floor_fid"] = statistics.frechet_distance_from_stats(ref["fid"], self._fid_stats(floor))
      self._refs[name] = ref
    return self._refs[name]

  def score(self, ref: Dict[str, Any], clips: np.ndarray) -> Dict[str, Optional[float]]:
    out = {"fvd": fvd.fvd_from_stats(ref["fvd"], self.i3d.stats(to_fvd_length(clips))), "fid": None}
    if self.fid is not None:
      out["fid"] = statistics.frechet_distance_from_stats(ref["fid"], self._fid_stats(clips))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Runs.
# ----------------------------------------------------------------------------------------------------------------

def init_digest(config, source: str, pattern: str) -> str:
  """Digest of the params matching ``pattern`` (temporal ones left out: not every variant has them) that a run of
  ``config`` starts from when initialised from ``source`` (EMA weights, as ``model_init`` loads them)."""
  rx = re.compile(pattern)
  config = tasks.get(config.stage).resolve_config(config)
  _, abstract = workdirs.abstract_params(config, parallel.make_mesh(config))
  wanted = {k: v for k, v in abstract.items() if rx.fullmatch(k) and "temporal" not in k}
  if not wanted:
    raise ValueError(f"init_digest: no param of stage {config.stage!r} matches {pattern!r}")
  return stage_runs.digest(checkpoint.load_model_init(source, wanted, missing_ok="", use_ema=True))


@dataclasses.dataclass
class Variant:
  """One arm of a row at one seed: its workdir (None: nothing trained), the config it trained with (or, untrained,
  one that describes its params), where its params started (``init_source``) and a digest of its data."""
  workdir: Optional[str]
  steps: int = 0
  config: Any = None
  init_source: Optional[str] = None
  data_digest: Optional[str] = None

  @property
  def trainable(self) -> str:
    return str(self.config.trainable) if self.config is not None and self.steps else ""


class Runs:
  """Every training run of the table under ``root``, each trained once and reused by the rows that share it."""

  def __init__(self, root: str, budget: Budget):
    self.root, self.b = root, budget
    self._done: Dict[str, Any] = {}

  def _config(self, stage: str, steps: int, seed: int, **overrides):
    c = stage_runs.stage_config(stage, steps, seed, **overrides)
    c.cpu_fast_compile = self.b.fast_compile
    if "data.seed" not in overrides:
      c.data.seed = seed  # the data order varies with the seed too; the variants of a row share it
    return c

  def _run(self, name: str, config) -> Variant:
    if name in self._done:
      return self._done[name]
    t0 = time.time()
    d = stage_runs.trained(config, os.path.join(self.root, name))
    print(f"  run {name}: {config.stage}, {config.total_steps} steps ({time.time() - t0:.0f} s)", flush=True)
    v = Variant(d, int(config.total_steps), config, str(config.model_init) or None,
                stage_runs.first_batches_digest(config))
    self._done[name] = v
    return v

  # The shared autoencoder and the per-seed pre-trained models.
  def autoencoder(self) -> str:
    c = self._config("autoencoder", self.b.autoencoder, 0)
    return self._run("autoencoder", c).workdir

  def image_pretrain(self, seed: int) -> str:
    c = self._config("image", self.b.image_pretrain, seed, model_init=self.autoencoder())
    return self._run(f"s{seed}/image_pretrain", c).workdir

  def upsampler_pretrain(self, seed: int) -> str:
    c = self._config("upsampler_image", self.b.upsampler_pretrain, seed)
    return self._run(f"s{seed}/upsampler_pretrain", c).workdir

  # Rows 1-4: key-frame clips.
  def _key(self, stage: str, steps: int, seed: int, **overrides):
    return self._config(stage, steps, seed, **{"data.num_frames": self.b.key_frames,
                                                "data.fps": float(rds.get_config("stage=base").data.fps),
                                                "optimizer.lr": 5e-4, **overrides})

  def key_image(self, seed: int) -> Variant:
    c = self._key("image", self.b.temporal, seed, model_init=self.image_pretrain(seed))
    return self._run(f"s{seed}/key_image", c)

  def key_video(self, seed: int) -> Variant:
    c = self._key("base", self.b.temporal, seed, model_init=self.image_pretrain(seed))
    return self._run(f"s{seed}/key_video", c)

  def key_attention(self, seed: int) -> Variant:
    c = self._key("base", self.b.temporal, seed, model_init=self.image_pretrain(seed),
                  **{"model.temporal.conv_blocks": False})
    return self._run(f"s{seed}/key_attention", c)

  def key_end_to_end(self, seed: int) -> Variant:
    c = self._key("base", self.b.image_pretrain + self.b.temporal, seed, model_init=self.autoencoder(),
                  trainable=r"(unet|label_encoder)/.*", model_init_missing_ok=r"(unet|label_encoder)/.*",
                  **{"optimizer.lr": 1e-3})  # the image stage's rate: the spatial layers learn from scratch here
    return self._run(f"s{seed}/key_end_to_end", c)

  def predictor(self, seed: int) -> Variant:
    c = self._key("predictor", self.b.predictor, seed, model_init=self.key_video(seed).workdir)
    return self._run(f"s{seed}/predictor", c)

  # Row 5: decoders, on 30 fps clips.
  def _clips(self, stage: str, steps: int, seed: int, **overrides):
    return self._config(stage, steps, seed, **{"data.num_frames": self.b.clip_frames, "data.fps": 30.0,
                                                **overrides})

  def decoder_image(self) -> Variant:
    """The autoencoder as trained (nothing more: its init is the others' init)."""
    ae = self.autoencoder()
    return Variant(ae, 0, self._config("autoencoder", self.b.autoencoder, 0), init_source=ae)

  def decoder_image_ft(self, seed: int) -> Variant:
    video = rds.get_config("stage=decoder,runlocal")
    c = self._clips("autoencoder", self.b.decoder, seed, model_init=self.autoencoder(),
                    trainable=r"vae/(decoder|post_quant_conv)/.*|discriminator/.*", batch_size=video.batch_size,
                    **{"optimizer.lr": video.optimizer.lr, "autoencoder.disc_start": 0})
    return self._run(f"s{seed}/decoder_image_ft", c)

  def decoder_video(self, seed: int) -> Variant:
    c = self._clips("decoder", self.b.decoder, seed, model_init=self.autoencoder())
    return self._run(f"s{seed}/decoder_video", c)

  # Row 6: pixel upsamplers, on 30 fps clips.
  def upsampler_image(self, seed: int) -> Variant:
    video = rds.get_config("stage=upsampler,runlocal")
    c = self._clips("upsampler_image", self.b.upsampler, seed, model_init=self.upsampler_pretrain(seed),
                    batch_size=video.batch_size)
    return self._run(f"s{seed}/upsampler_image", c)

  def upsampler_video(self, seed: int) -> Variant:
    c = self._clips("upsampler", self.b.upsampler, seed, model_init=self.upsampler_pretrain(seed))
    return self._run(f"s{seed}/upsampler_video", c)


# ----------------------------------------------------------------------------------------------------------------
# Generation.
# ----------------------------------------------------------------------------------------------------------------

def _loaded(stage_dir: str, n: int, steps: int, frames: Optional[int] = None):
  config, mesh = sampling.sampling_config(stage_dir, n, steps=steps)
  if frames:
    config.data.num_frames = int(frames)  # an image model samples each frame on its own
  task, trainable, frozen = workdirs.load_trained(stage_dir, config, mesh)
  return task, trainable, frozen, mesh


def sample_key_frames(stage_dir: str, labels: Dict[str, np.ndarray], frames: int, steps: int, seed: int
                      ) -> np.ndarray:
  """uint8 ``[n, frames, h, w, 3]`` from a ``base`` or ``image`` workdir (DDIM, its guidance), one video per
  held-out label set, noise from ``seed``."""
  n = len(next(iter(labels.values())))
  task, trainable, frozen, mesh = _loaded(stage_dir, n, steps, frames)
  h, w = int(task.config.data.height), int(task.config.data.width)
  batch = {"video": np.zeros((n, frames, h, w, 3), np.float32), "labels": dict(labels),
           "cond_mask": np.ones((n,), np.float32)}
  return sampling.generate(task, trainable, frozen, batch, num_samples=n, batch_size=min(n, 8), seed=seed,
                           progress=False, mesh=mesh)


def rollout_videos(stage_dir: str, real: np.ndarray, labels: Dict[str, np.ndarray], scale: float, steps: int,
                   seed: int) -> np.ndarray:
  """The predictor rolled out from the first ``CONTEXT`` frames of each clip of ``real`` ``[n, t, h, w, 3]``
  to ``t`` frames with context guidance ``scale``: the generated frames, uint8 ``[n, t - CONTEXT, h, w, 3]``."""
  n, t = real.shape[:2]
  task, trainable, frozen, _ = _loaded(stage_dir, n, steps)
  task.config.sampling.context_guidance = float(scale)  # read when the window step is traced
  params = optim.merge(trainable, frozen)
  z_ctx = jax.jit(task.encode)(params, {"video": stage_runs.as_float(real[:, :CONTEXT])}, jax.random.PRNGKey(0))
  step = pipeline.predictor_step(task)
  cond = {"labels": {k: jnp.asarray(v) for k, v in labels.items()}}
  chunks = list(pipeline.rollout(lambda b, ctx, rng: step(trainable, frozen, b, ctx, rng), cond,
                                 np.asarray(z_ctx), t, jax.random.PRNGKey(seed), num_context=CONTEXT))
  z = np.concatenate(chunks, axis=1)[:, CONTEXT:]
  return np.asarray(jax.jit(task.decode_latents)(params, jnp.asarray(z)))


# ----------------------------------------------------------------------------------------------------------------
# Rows.
# ----------------------------------------------------------------------------------------------------------------

class Table:
  def __init__(self, runs: Runs, scorer: Scorer, seeds: Sequence[int], guidance: float):
    self.runs, self.scorer, self.seeds, self.guidance = runs, scorer, list(seeds), float(guidance)
    self.b = runs.b
    base = rds.get_config("stage=base,runlocal")
    self.h, self.w, self.key_fps = int(base.data.height), int(base.data.width), float(base.data.fps)
    self._key_scores: Dict[Any, Dict[str, Any]] = {}
    self._digests: Dict[Any, str] = {}

  def _row(self, row: int, ref: Dict[str, Any], arms: Dict[str, Callable[[int], Variant]],
           evaluate: Callable[[str, Variant, int], Dict[str, Any]], shared: str, shared_params: str,
           direction: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Scores every arm at every seed; ``shared_params``: the regex of the params the arms start from alike (their
    digests must agree), ``shared`` says what they are in words."""
    variants: Dict[str, Dict[str, Any]] = {name: {"seeds": {}} for name in arms}
    checks = {}
    for seed in self.seeds:
      got = {name: fn(seed) for name, fn in arms.items()}
      inits = {name: self._init_digest(v, shared_params) for name, v in got.items()}
      for name, v in got.items():
        t0 = time.time()
        scores = evaluate(name, v, seed)
        print(f"  row {row} {name} seed {seed}: " + ", ".join(
            f"{k} {x:.1f}" for k, x in scores.items() if isinstance(x, float)) + f" ({time.time() - t0:.0f} s)",
              flush=True)
        variants[name]["seeds"][str(seed)] = dict(scores, workdir=v.workdir, steps=v.steps, trainable=v.trainable,
                                                  init_digest=inits[name], data_digest=v.data_digest)
      init_set = {d for d in inits.values() if d}
      data_set = {v.data_digest for v in got.values() if v.data_digest and v.steps}
      checks[str(seed)] = {"same_init": len(init_set) == 1, "same_data": len(data_set) <= 1,
                           "init_compared": len([d for d in inits.values() if d]),
                           "data_compared": len([v for v in got.values() if v.data_digest and v.steps])}
    for v in variants.values():
      for metric in ("fvd", "fid"):
        vals = [s[metric] for s in v["seeds"].values() if s.get(metric) is not None]
        v[metric] = {"mean": float(np.mean(vals)), "std": float(np.std(vals))} if vals else None
    better, worse = direction or DIRECTION[row]
    holds = [variants[better]["seeds"][s]["fvd"] < variants[worse]["seeds"][s]["fvd"] for s in map(str, self.seeds)]
    return {"row": row, "name": ROWS[row][0], "paper": ROWS[row][1], "variants": variants,
            "noise_floor_fvd": ref["floor_fvd"], "noise_floor_fid": ref.get("floor_fid"),
            "reference_self_fvd": ref["self_fvd"],
            "shared_init_params": shared, "shared_init_pattern": shared_params, "checks": checks,
            "paper_direction": f"{better} < {worse}", "direction_holds_in_seeds": int(sum(holds))}

  def _init_digest(self, v: Variant, pattern: str) -> Optional[str]:
    if v.init_source is None:
      return None
    key = (v.init_source, v.config.stage, pattern)
    if key not in self._digests:
      self._digests[key] = init_digest(v.config, v.init_source, pattern)
    return self._digests[key]

  # Rows 1-3.
  def _key_reference(self):
    n, t = self.b.clips, self.b.key_frames
    real = held_out(REAL_SEED, n, t, self.h, self.w, self.key_fps)
    floor = held_out(FLOOR_SEED, n, t, self.h, self.w, self.key_fps)["clips"]
    return real, self.scorer.reference(f"key{t}", real["clips"], floor)

  def _key_eval(self, real, ref):
    def evaluate(name, v, seed):
      del name
      key = (v.workdir, seed)  # rows 1-3 share the video arm: sampled and scored once
      if key not in self._key_scores:
        clips = sample_key_frames(v.workdir, real["labels"], self.b.key_frames, self.b.sampler_steps, seed)
        self._key_scores[key] = self.scorer.score(ref, clips)
      return self._key_scores[key]
    return evaluate

  def _key_row(self, row: int, arms: Dict[str, Callable[[int], Variant]], shared: str, shared_params: str):
    real, ref = self._key_reference()
    return self._row(row, ref, arms, self._key_eval(real, ref), shared, shared_params)

  def row1(self):
    return self._key_row(1, {"image": self.runs.key_image, "video": self.runs.key_video}, IMAGE_LDM, IMAGE_LDM_PARAMS)

  def row2(self):
    return self._key_row(2, {"attention": self.runs.key_attention, "conv_attention": self.runs.key_video}, IMAGE_LDM,
                         IMAGE_LDM_PARAMS)

  def row3(self):
    return self._key_row(3, {"end_to_end": self.runs.key_end_to_end, "image_pretrained": self.runs.key_video},
                         "VAE (the U-Nets start from scratch and from the image LDM)", r"vae/.*")

  def row4(self):
    n, t = self.b.clips, CONTEXT + fvd.NUM_FRAMES
    real = held_out(REAL_SEED, n, t, self.h, self.w, self.key_fps)
    floor = held_out(FLOOR_SEED, n, t, self.h, self.w, self.key_fps)["clips"][:, CONTEXT:]
    ref = self.scorer.reference("rollout", real["clips"][:, CONTEXT:], floor)
    scales = {"s=1": 1.0, f"s={self.guidance:g}": self.guidance}

    def evaluate(name, v, seed):
      clips = rollout_videos(v.workdir, real["clips"], real["labels"], scales[name], self.b.sampler_steps, seed)
      return self.scorer.score(ref, clips)
    return self._row(4, ref, {name: self.runs.predictor for name in scales}, evaluate,
                     "the same predictor (guidance is a sampling setting)", IMAGE_LDM_PARAMS,
                     direction=list(scales)[::-1])

  # Rows 5-6: 30 fps clips at the runlocal frame size (the upsampler's training patch).
  def _clip_reference(self):
    n = self.b.clips
    real = held_out(REAL_SEED, n, fvd.NUM_FRAMES, self.h, self.w, 30.0)["clips"]
    floor = held_out(FLOOR_SEED, n, fvd.NUM_FRAMES, self.h, self.w, 30.0)["clips"]
    return real, self.scorer.reference("clips30", real, floor)

  @staticmethod
  def _quality(real: np.ndarray, out: np.ndarray) -> Dict[str, float]:
    x, y = stage_runs.as_float(real), stage_runs.as_float(out)
    frames = lambda v: v.reshape((-1,) + v.shape[2:])  # noqa: E731
    return {"psnr": float(jnp.mean(psnr(frames(x), frames(y)))), "flicker": float(jnp.mean(flicker_error(x, y)))}

  def row5(self):
    real, ref = self._clip_reference()

    scores = {}

    def evaluate(name, v, seed):
      del name, seed  # the posterior samples have fixed seeds: the untrained image arm scores once
      if v.workdir not in scores:
        rec = stage_runs.reconstruct(v.workdir, real, sample=True)
        mode = stage_runs.reconstruct(v.workdir, real, sample=False)
        scores[v.workdir] = dict(self.scorer.score(ref, rec), **self._quality(real, rec),
                                 fvd_posterior_mode=self.scorer.score(ref, mode)["fvd"])
      return scores[v.workdir]
    return self._row(5, ref, {"image": lambda s: self.runs.decoder_image(), "image_ft": self.runs.decoder_image_ft,
                              "video": self.runs.decoder_video}, evaluate,
                     "VAE encoder and decoder (the trained autoencoder)", r"vae/.*")

  def row6(self):
    real, ref = self._clip_reference()
    factor = int(rds.get_config("stage=upsampler,runlocal").upsampler.factor)
    low = np.asarray(downsample(stage_runs.as_float(real), factor))

    def evaluate(name, v, seed):
      if v.workdir is None:  # bilinear
        out = np.asarray(vae_lib.to_uint8(jax.image.resize(jnp.asarray(low), real.shape, method="linear")))
      else:
        fn = stage_runs.upsample_fn(v.workdir, self.b.upsampler_sampler_steps)
        out = np.concatenate([fn(low[i:i + 1], jax.random.fold_in(jax.random.PRNGKey(seed), i))
                              for i in range(len(low))])
      return dict(self.scorer.score(ref, out), **self._quality(real, out))
    return self._row(6, ref, {"bilinear": lambda s: Variant(None), "image": self.runs.upsampler_image,
                              "video": self.runs.upsampler_video}, evaluate,
                     "spatial U-Net (the pre-trained image upsampler)", r"unet/.*")


# ----------------------------------------------------------------------------------------------------------------
# Output.
# ----------------------------------------------------------------------------------------------------------------

def _mean_std(v: Optional[Dict[str, float]]) -> str:
  return "n/a" if v is None else f"{v['mean']:.1f} ± {v['std']:.1f}"


def markdown(results: Dict[str, Any]) -> str:
  """The README table: one line per variant."""
  lines = ["| row | variant | FVD (mean ± std over seeds) | per seed | FID | noise floor FVD | paper's direction |",
           "|---|---|---|---|---|---|---|"]
  n = len(results["seeds"])
  for r in results["rows"]:
    for i, (name, v) in enumerate(r["variants"].items()):
      per_seed = " / ".join(f"{s['fvd']:.1f}" for s in v["seeds"].values())
      direction = f"{r['paper_direction']}: {r['direction_holds_in_seeds']} of {n} seeds" if i == 0 else ""
      lines.append(f"| {r['row']} {r['name']} | {name} | {_mean_std(v['fvd'])} | {per_seed} | {_mean_std(v['fid'])} | "
                   f"{r['noise_floor_fvd']:.1f} | {direction} |")
  return "\n".join(lines)


def parse_budget(budget: Budget, overrides: Sequence[str]) -> Budget:
  """``budget`` with ``["temporal=600", "clips=32", ...]`` applied; a ValueError names an unknown field."""
  fields = {f.name: f.type for f in dataclasses.fields(Budget)}
  changes = {}
  for item in overrides:
    key, _, value = item.partition("=")
    if key not in fields or not value:
      raise ValueError(f"--budget={item!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}")
    changes[key] = value.lower() in ("1", "true") if fields[key] in (bool, "bool") else int(value)
  return dataclasses.replace(budget, **changes)


def check_budget(root: str, budget: Budget) -> None:
  """Records ``budget`` in ROOT/budget.json; a root whose runs were made with another budget is refused (its
  finished runs would be reused as they are)."""
  path = os.path.join(root, "budget.json")
  want = dataclasses.asdict(budget)
  if os.path.exists(path):
    with open(path) as f:
      have = json.load(f)
    diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    if diff:
      used = ", ".join(f"{k}={have.get(k)}" for k in diff)
      asked = ", ".join(f"{k}={want.get(k)}" for k in diff)
      raise ValueError(f"{path}: the runs under {root} used another budget ({used}; asked {asked}): use another "
                       "--workdir")
    return
  os.makedirs(root, exist_ok=True)
  with open(path, "w") as f:
    json.dump(want, f, indent=2)


def run(root: str, rows: Sequence[int], seeds: Sequence[int], budget: Budget, *, guidance: float = 2.0,
        fid_weights: str = "") -> Dict[str, Any]:
  """Trains what ``rows`` need under ``root``, scores them and writes ``root/ablations.json``; returns the table."""
  unknown = sorted(set(rows) - set(ROWS))
  if unknown:
    raise ValueError(f"--rows: no row {unknown}; rows are {sorted(ROWS)}")
  if not seeds:
    raise ValueError("--seeds: at least one seed")
  if guidance <= 1.0:
    raise ValueError(f"--guidance={guidance}: row 4 compares s=1 with an s > 1")
  check_budget(root, budget)
  t0 = time.time()
  table = Table(Runs(root, budget), Scorer(fid_weights, min(8, budget.clips)), seeds, guidance)
  results = {"budget": dataclasses.asdict(budget), "seeds": list(seeds), "clips": budget.clips,
             "fid": "computed" if fid_weights else "null: no --fid_weights (pytorch-fid Inception, not shipped)",
             "fvd_protocol": f"I3D, {fvd.NUM_FRAMES} frames (shorter clips: frames repeated), 224x224",
             "rows": []}
  os.makedirs(root, exist_ok=True)
  for row in rows:
    print(f"row {row}: {ROWS[row][0]} ({ROWS[row][1]})", flush=True)
    results["rows"].append(getattr(table, f"row{row}")())
    results["seconds"] = time.time() - t0
    with open(os.path.join(root, "ablations.json"), "w") as f:  # after every row: a long run keeps what it has
      json.dump(results, f, indent=2)
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  budget = parse_budget(TINY if FLAGS.tiny else FULL, FLAGS.budget)
  results = run(FLAGS.workdir, [int(r) for r in FLAGS.rows], [int(s) for s in FLAGS.seeds], budget,
                guidance=FLAGS.guidance, fid_weights=FLAGS.fid_weights)
  print(markdown(results))
  for r in results["rows"]:
    print(f"row {r['row']}: paper {r['paper']}; {r['paper_direction']} in {r['direction_holds_in_seeds']} of "
          f"{len(results['seeds'])} seeds; checks {r['checks']}")
  print(f"total {results['seconds']:.0f} s; {os.path.join(FLAGS.workdir, 'ablations.json')}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
