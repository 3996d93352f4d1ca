r"""Sampling from trained workdirs and converted checkpoints.

Videos from a training workdir (a chain such as ``configs/rds.py:runlocal``, or a single stage's workdir): loads
the stage's params (EMA when saved, frozen parts from where the run took them), runs the stage's own ``sample_fn``
(DDIM + classifier-free guidance on its conditioning: labels for RDS, captions for text) and decodes with the VAE::

  python -m videoldm_jax.sample --workdir=/tmp/videoldm_rds --num_samples=8 --guidance=2 --steps=25 --seed=1
  python -m videoldm_jax.sample --workdir=/tmp/videoldm_rds --stage=image --labels=day_night=1,crowdedness=4

writes ``OUTPUT.mp4`` and ``OUTPUT.gif`` (the videos tiled in a grid) and ``OUTPUT.png`` (contact sheet: one row per
video, one column per frame); ``--output`` defaults to ``WORKDIR/sample``.

Long videos with the whole pipeline (``--pipeline``: a chain's workdir, or a comma list of stage workdirs whose
stages are read from their config.json): key frames from ``base``, rolled out by ``predictor`` windows conditioned
on the last two generated frames (``--num_windows`` windows, or enough for ``--seconds`` of final video),
interpolated x4 twice by ``interpolator`` (regime 0: 1.875 -> 7.5 fps, regime 1: 7.5 -> 30 fps; ``--interpolations``
0-2), decoded and written at the final fps; each stage is optional (a missing predictor: one base window; a
missing interpolator: key frames only). ``--context_guidance`` sets the predictor's context-guidance scale. A
chain workdir with these stages samples this way by default (``--workdir``; ``--stage`` picks one stage)::

  python -m videoldm_jax.sample --pipeline=/tmp/videoldm_rds --seconds=30 --num_samples=2
  python -m videoldm_jax.sample --pipeline=/tmp/rds_base,/tmp/rds_pred,/tmp/rds_interp --num_windows=6

Text-to-image with a converted Stable Diffusion (DDIM + classifier-free guidance)::

  python -m videoldm_jax.sample --checkpoint=/ckpt/sd15 --prompt="a red car on a mountain road" \
      --steps=50 --guidance=7.5 --height=512 --width=512 --seed=0 --output=/tmp/car.png
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from videoldm_jax import diffusion


def _tokenizer_for(text_config):
  """SD 1.x (OpenAI CLIP, quick_gelu) pads with <|endoftext|>; SD 2.x (OpenCLIP, gelu) pads with '!' (id 0)."""
  from videoldm_jax.models.tokenizer import load_clip_tokenizer
  return load_clip_tokenizer(pad_with="!" if text_config.hidden_act == "gelu" else "<|endoftext|>")


def encode_prompts(converted, prompts: Sequence[str]) -> jax.Array:
  """Prompts -> text conditioning ``[b, 77, d]`` with the checkpoint's text encoder."""
  from videoldm_jax.models.clip import CLIPTextEncoder
  from videoldm_jax.models.tokenizer import tokenize
  cfg = converted.configs["text_encoder"]
  ids = tokenize(_tokenizer_for(cfg), list(prompts), max_length=cfg.max_position_embeddings)
  out = jax.jit(CLIPTextEncoder(config=cfg).apply)({"params": converted.params["text_encoder"]}, jnp.asarray(ids))
  return out["last_hidden_state"]


def schedule_of(converted) -> diffusion.Schedule:
  return diffusion.from_diffusers_scheduler_config(converted.schedule or {"beta_schedule": "scaled_linear",
                                                                         "beta_start": 0.00085, "beta_end": 0.012})


def text_to_image_latents(converted, prompts: Sequence[str], *, negative_prompts: Optional[Sequence[str]] = None,
                          steps: int = 50, guidance_scale: float = 7.5, eta: float = 0.0, height: int = 512,
                          width: int = 512, rng: jax.Array, latents: Optional[jax.Array] = None) -> jax.Array:
  """DDIM + CFG in the (scaled) latent space; returns latents ``[b, h/f, w/f, c]`` ready for ``vae.decode(z / s)``.

  ``latents`` is the initial noise (``[b, h/f, w/f, c]``); drawn from ``rng`` when not given.
  """
  from videoldm_jax.models.unet import UNet
  ucfg = converted.configs["unet"]
  factor = 2 ** (len(converted.configs["vae"].block_out_channels) - 1) if "vae" in converted.configs else 8
  b = len(prompts)
  cond = encode_prompts(converted, prompts)
  uncond = encode_prompts(converted, negative_prompts or [""] * b)
  noise_rng, ddim_rng = jax.random.split(rng)
  if latents is None:
    latents = jax.random.normal(noise_rng, (b, height // factor, width // factor, ucfg.out_channels))
  unet = UNet(config=ucfg)
  params = {"params": converted.params["unet"]}

  def unet_fn(x, t, context):
    return unet.apply(params, x, t, context)

  def model_fn(x, t):
    return diffusion.guided_prediction(unet_fn, x, t, cond, uncond, guidance_scale)

  schedule = schedule_of(converted)
  config = diffusion.DDIMConfig.from_diffusers_scheduler_config(converted.schedule or {})
  sample = jax.jit(lambda x, r: diffusion.ddim_sample(model_fn, x, schedule, steps, eta=eta, rng=r, config=config))
  return sample(latents, ddim_rng)


def decode_latents(converted, latents: jax.Array) -> np.ndarray:
  """Scaled latents -> images ``[b, h, w, 3]`` uint8."""
  from videoldm_jax.models.vae import AutoencoderKL
  vcfg = converted.configs["vae"]
  decode = jax.jit(lambda p, z: AutoencoderKL(config=vcfg).apply(p, z, method="decode"))
  images = decode({"params": converted.params["vae"]}, latents / vcfg.scaling_factor)
  return np.asarray(jnp.clip((images + 1.0) * 127.5 + 0.5, 0, 255)).astype(np.uint8)


def save_image_grid(images: np.ndarray, path: str) -> None:
  """``[b, h, w, 3]`` uint8 -> one PNG, images side by side."""
  from PIL import Image
  grid = np.concatenate(list(images), axis=1)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(grid).save(path)


# ---------------------------------------------------------------------------------------------------------------
# Videos from a training workdir.
# ---------------------------------------------------------------------------------------------------------------

def _tuples(value):
  """JSON lists back to the tuples the configs hold (dicts become ConfigDicts in the caller)."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def load_run_config(workdir: str):
  """The ``config.json`` a training run wrote into ``workdir``, as a ConfigDict."""
  import json  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir!r} has no config.json: not a training workdir")
  with open(path) as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))


def resolve_stage(workdir: str, stage: Optional[str] = None) -> str:
  """The workdir of ``stage`` (default: the last stage) inside a chain's workdir, or ``workdir`` itself when it
  is one stage's workdir."""
  from configs import common  # pylint: disable=g-import-not-at-top
  config = load_run_config(workdir)
  if common.is_chain(config):
    chain = tuple(config.chain)
    stage = stage or chain[-1]
    if stage not in chain:
      raise ValueError(f"--stage={stage!r}: the chain in {workdir} has stages {chain}")
    return os.path.join(workdir, stage)
  if stage and stage != config.stage:
    raise ValueError(f"--stage={stage!r}: {workdir} is the workdir of stage {config.stage!r}")
  return workdir


def load_trained(stage_dir: str, config, mesh) -> Tuple[Any, Any, Any]:
  """``(task, trainable, frozen)`` of a trained stage: trainable params from its latest checkpoint (EMA when
  saved), frozen params from its ``frozen/`` or the ``model_init`` it was started from, sharded over ``mesh``."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from videoldm_jax import checkpoint, optim, parallel, tasks  # pylint: disable=g-import-not-at-top
  task = tasks.get(config.stage)(config)
  boxed = jax.eval_shape(task.init, jax.random.key(0, impl="rbg"))
  shardings = parallel.param_shardings(boxed, mesh, parallel.logical_rules(config))
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed),
                          shardings)
  loaded = checkpoint.load_model_init(stage_dir, optim.flat_paths(abstract), missing_ok="", use_ema=True)
  trainable, frozen = optim.split(traverse_util.unflatten_dict(loaded, sep=optim.SEP), config.trainable)
  return task, trainable, frozen


def _parse_labels(text: str) -> Dict[str, int]:
  out = {}
  for item in filter(None, (t.strip() for t in (text or "").split(","))):
    key, eq, value = item.partition("=")
    if not eq:
      raise ValueError(f"--labels item {item!r}: expected name=int")
    out[key] = int(value)
  return out


def _host(tree):
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, jax.device_get(tree))
  return multihost_utils.process_allgather(tree, tiled=True)


def generate(task, trainable, frozen, batch, *, num_samples: int, batch_size: int = 1, seed: int = 0,
             progress: bool = True) -> np.ndarray:
  """``num_samples`` videos uint8 ``[n, t, h, w, 3]`` from ``task.sample_fn``, ``batch_size`` per call (one
  compile), conditioned on the first ``num_samples`` rows of the host ``batch``; video i uses noise from
  ``fold_in(PRNGKey(seed), i // batch_size)``."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  n, bs = int(num_samples), max(1, min(int(batch_size), int(num_samples)))
  task.config.sampling.num_samples = bs  # read by sample_fn when it is traced
  from videoldm_jax.train import compiler_options  # pylint: disable=g-import-not-at-top
  fn = jax.jit(task.sample_fn, compiler_options=compiler_options(task.config))
  key = jax.random.PRNGKey(seed)
  out = []
  with tqdm(total=n, unit="video", desc="sampling", disable=not progress or jax.process_index() != 0) as bar:
    for i in range(0, n, bs):
      idx = np.arange(i, i + bs) % n  # the last call is padded with earlier conditions and trimmed
      chunk = jax.tree.map(lambda x: x[idx], batch)
      videos = _host(fn(trainable, frozen, chunk, jax.random.fold_in(key, i // bs)))
      out.append(videos[:min(bs, n - i)])
      bar.update(len(out[-1]))
  return np.concatenate(out)


def _upscale(frames: np.ndarray, factor: int) -> np.ndarray:
  """Nearest-neighbour upscaling of the two axes before the channel axis."""
  if factor <= 1:
    return frames
  return np.repeat(np.repeat(frames, factor, axis=-3), factor, axis=-2)


def tile_videos(videos: np.ndarray, cols: Optional[int] = None, gap: int = 2) -> np.ndarray:
  """``[n, t, h, w, 3]`` -> ``[t, H, W, 3]``: the videos in a grid (``cols`` columns, ~square by default)."""
  n, t, h, w, c = videos.shape
  cols = cols or int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / cols))
  grid = np.full((t, rows * (h + gap) - gap, cols * (w + gap) - gap, c), 255, np.uint8)
  for i in range(n):
    r, k = divmod(i, cols)
    grid[:, r * (h + gap):r * (h + gap) + h, k * (w + gap):k * (w + gap) + w] = videos[i]
  return grid


def contact_sheet(videos: np.ndarray, gap: int = 2) -> np.ndarray:
  """``[n, t, h, w, 3]`` -> one image: a row per video, a column per frame."""
  n, t, h, w, c = videos.shape
  sheet = np.full((n * (h + gap) - gap, t * (w + gap) - gap, c), 255, np.uint8)
  for i in range(n):
    for j in range(t):
      sheet[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = videos[i, j]
  return sheet


def write_mp4(frames: np.ndarray, path: str, fps: float) -> None:
  """``[t, h, w, 3]`` uint8 -> H.264 mp4 (PyAV; MPEG-4 part 2 where libx264 is missing). Odd sizes are padded
  by one pixel (4:2:0 chroma needs even sizes)."""
  import av  # pylint: disable=g-import-not-at-top
  from fractions import Fraction  # pylint: disable=g-import-not-at-top
  t, h, w, _ = frames.shape
  frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
  codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
  with av.open(path, "w") as container:
    stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
    stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    if codec == "libx264":
      stream.options = {"crf": "12"}
    for f in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
    container.mux(stream.encode())


def write_outputs(videos: np.ndarray, output: str, fps: float, upscale: int = 0,
                  sheet_frames: int = 0) -> Dict[str, str]:
  """``OUTPUT.mp4`` / ``OUTPUT.gif`` (grid of the videos) and ``OUTPUT.png`` (contact sheet). ``upscale`` 0:
  nearest-neighbour to at least 128 px high (the runlocal models make 32 px frames). ``sheet_frames`` > 0: the
  contact sheet shows that many evenly spaced frames (long videos)."""
  from videoldm_jax import writers  # pylint: disable=g-import-not-at-top
  factor = upscale or max(1, int(np.ceil(128 / videos.shape[2])))
  videos = _upscale(videos, factor)
  root, ext = os.path.splitext(output)
  output = root if ext.lower() in (".mp4", ".gif", ".png") else output
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  grid = tile_videos(videos)
  paths = {"mp4": output + ".mp4", "gif": output + ".gif", "png": output + ".png"}
  write_mp4(grid, paths["mp4"], fps)
  with open(paths["gif"], "wb") as f:
    f.write(writers.encode_gif(grid, fps))
  with open(paths["png"], "wb") as f:
    sheet = videos
    if sheet_frames and videos.shape[1] > sheet_frames:
      sheet = videos[:, np.linspace(0, videos.shape[1] - 1, sheet_frames).round().astype(int)]
    f.write(writers.encode_png(contact_sheet(sheet)))
  return paths


def sample_workdir(workdir: str, *, stage: Optional[str] = None, num_samples: int = 4, batch_size: int = 1,
                   guidance: Optional[float] = None, steps: Optional[int] = None, seed: int = 0,
                   labels: Optional[Dict[str, int]] = None, prompt: Optional[str] = None,
                   num_frames: Optional[int] = None, output: Optional[str] = None, upscale: int = 0,
                   progress: bool = True) -> Dict[str, Any]:
  """Samples ``num_samples`` videos of a trained stage and writes them (see the module docstring).

  The conditioning comes from the stage's fixed evaluation batch (its data config, no dropout): for RDS the
  day/night and crowdedness labels of held-out synthetic scenes, overridden by ``labels``; for text stages their
  captions, overridden by ``prompt``. ``num_frames`` (video stages) samples clips of another length than the
  stage trained on (the temporal layers take any length). Returns the written paths plus ``videos``
  ``[n, t, h, w, 3]`` uint8.
  """
  from configs import common  # pylint: disable=g-import-not-at-top
  from videoldm_jax import parallel  # pylint: disable=g-import-not-at-top
  run = load_run_config(workdir)
  if stage is None and common.is_chain(run) and set(run.chain) & {"predictor", "interpolator"}:
    return sample_pipeline(workdir, num_samples=num_samples, guidance=guidance, steps=steps, seed=seed,
                           labels=labels, prompt=prompt, output=output, upscale=upscale, progress=progress,
                           seconds=run.get("sample_seconds") or None)
  stage_dir = resolve_stage(workdir, stage)
  config = load_run_config(stage_dir)
  config.mesh = common.mesh_defaults()  # the training mesh may not fit this machine: data parallel over it
  if guidance is not None:
    config.sampling.guidance_scale = float(guidance)
  if steps is not None:
    config.sampling.num_steps = int(steps)
  if num_frames:
    if config.model.get("temporal") is None and int(num_frames) != int(config.data.num_frames):
      raise ValueError(f"--num_frames={num_frames}: stage {config.stage!r} is an image model (1 frame)")
    config.data.num_frames = int(num_frames)
  mesh = parallel.make_mesh(config)
  dp = parallel.data_parallel_size(mesh)
  config.batch_size = int(np.ceil(num_samples / dp)) * dp
  task, trainable, frozen = load_trained(stage_dir, config, mesh)
  batch = _host(task.fixed_batch(mesh))
  for name, value in (labels or {}).items():
    if name not in batch.get("labels", {}):
      raise ValueError(f"--labels {name}={value}: stage {config.stage!r} has labels {sorted(batch.get('labels', {}))}")
    batch["labels"][name] = np.full_like(batch["labels"][name], value)
  if prompt is not None:
    if getattr(task, "tokenize", None) is None or "caption_ids" not in batch:
      raise ValueError(f"--prompt: stage {config.stage!r} is not text-conditioned")
    batch["caption_ids"] = np.broadcast_to(task.tokenize(prompt), batch["caption_ids"].shape).copy()
  videos = generate(task, trainable, frozen, batch, num_samples=num_samples, batch_size=batch_size, seed=seed,
                    progress=progress)
  paths = {}
  if jax.process_index() == 0:
    paths = write_outputs(videos, output or os.path.join(workdir, "sample"), float(config.sampling.fps), upscale)
  return dict(paths, videos=videos, stage_dir=stage_dir)


# ---------------------------------------------------------------------------------------------------------------
# Long videos: key frames -> rollout -> interpolation (videoldm_jax/pipeline.py).
# ---------------------------------------------------------------------------------------------------------------

PIPELINE_STAGES = ("base", "predictor", "interpolator")


def pipeline_stage_dirs(spec: str) -> Dict[str, str]:
  """``{stage: workdir}`` of the pipeline stages named by ``spec``: a chain's workdir (its stages among
  base / predictor / interpolator) or a comma list of stage workdirs (stage read from each config.json)."""
  from configs import common  # pylint: disable=g-import-not-at-top
  dirs = [d for d in (s.strip() for s in spec.split(",")) if d]
  out: Dict[str, str] = {}
  for d in dirs:
    config = load_run_config(d)
    if common.is_chain(config):
      out.update({s: os.path.join(d, s) for s in config.chain if s in PIPELINE_STAGES})
    elif config.stage in PIPELINE_STAGES:
      if config.stage in out:
        raise ValueError(f"--pipeline names two {config.stage!r} workdirs: {out[config.stage]} and {d}")
      out[config.stage] = d
    else:
      raise ValueError(f"--pipeline: {d} is a {config.stage!r} workdir; expected one of {PIPELINE_STAGES}")
  if "base" not in out and "predictor" not in out:
    raise ValueError(f"--pipeline={spec!r}: needs a base or predictor stage (has {sorted(out)})")
  return out


def sample_pipeline(spec: str, *, num_samples: int = 4, seconds: Optional[float] = None,
                    num_windows: Optional[int] = None, interpolations: Optional[int] = None,
                    guidance: Optional[float] = None, context_guidance: Optional[float] = None,
                    steps: Optional[int] = None, seed: int = 0, labels: Optional[Dict[str, int]] = None,
                    prompt: Optional[str] = None, output: Optional[str] = None, upscale: int = 0,
                    progress: bool = True) -> Dict[str, Any]:
  """Long videos through the stages of ``spec`` (see the module docstring); writes OUTPUT.{mp4,gif,png}
  (default: the first workdir's ``sample``) at the final fps. Returns the paths, ``videos`` uint8
  ``[n, t, h, w, 3]``, ``fps`` and ``num_key_frames``."""
  import math  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  from videoldm_jax import parallel, pipeline  # pylint: disable=g-import-not-at-top
  from videoldm_jax.train import compiler_options  # pylint: disable=g-import-not-at-top
  dirs = pipeline_stage_dirs(spec)
  loaded = {}
  for name, d in dirs.items():
    config = load_run_config(d)
    config.mesh = common.mesh_defaults()
    if guidance is not None:
      config.sampling.guidance_scale = float(guidance)
    if context_guidance is not None and name != "base":
      config.sampling.context_guidance = float(context_guidance)
    if steps is not None:
      config.sampling.num_steps = int(steps)
    mesh = parallel.make_mesh(config)
    dp = parallel.data_parallel_size(mesh)
    config.batch_size = int(np.ceil(num_samples / dp)) * dp
    loaded[name] = (*load_trained(d, config, mesh), mesh)
  first = loaded.get("base") or loaded["predictor"]
  task, _, _, mesh = first
  batch = jax.tree.map(lambda x: x[:num_samples], _host(task.fixed_batch(mesh)))
  for name, value in (labels or {}).items():
    if name not in batch.get("labels", {}):
      raise ValueError(f"--labels {name}={value}: the pipeline has labels {sorted(batch.get('labels', {}))}")
    batch["labels"][name] = np.full_like(batch["labels"][name], value)
  if prompt is not None:
    if getattr(task, "tokenize", None) is None or "caption_ids" not in batch:
      raise ValueError("--prompt: the pipeline is not text-conditioned")
    batch["caption_ids"] = np.broadcast_to(task.tokenize(prompt), batch["caption_ids"].shape).copy()

  interp = loaded.get("interpolator")
  passes = 0 if interp is None else (2 if interpolations is None else int(interpolations))
  if interp is not None and passes > max(1, interp[0].unet_config.temporal.num_regimes):
    raise ValueError(f"--interpolations={passes}: the interpolator has "
                     f"{interp[0].unet_config.temporal.num_regimes} regimes")
  stride = int(interp[0].config.masked.stride) if interp is not None else 1
  key_fps = float(first[0].config.data.fps)
  fps = key_fps * stride ** passes
  window = int(loaded["predictor"][0].num_frames) if "predictor" in loaded else int(first[0].num_frames)
  nc = int(loaded["predictor"][0].config.masked.num_context) if "predictor" in loaded else 0
  if seconds:
    frames = max(2, int(round(float(seconds) * fps)))
    num_key_frames = int(math.ceil((frames - 1) / stride ** passes)) + 1
  else:
    windows = 4 if num_windows is None else int(num_windows)
    num_key_frames = pipeline.frames_of_windows(windows, window, nc) if "predictor" in loaded else window
  if "predictor" not in loaded:
    num_key_frames = min(num_key_frames, int(first[0].num_frames))

  stages = {k: v[:3] for k, v in loaded.items()}
  copts = compiler_options(first[0].config)
  chunks = pipeline.long_video(batch=batch, rng=jax.random.PRNGKey(seed), num_key_frames=num_key_frames,
                               base=stages.get("base"), predictor=stages.get("predictor"),
                               interpolator=stages.get("interpolator"), interpolations=passes, progress=progress,
                               compiler_options=copts)
  videos = np.concatenate([_host(c) for c in chunks], axis=1)
  root = spec.split(",")[0].strip()
  paths = {}
  if jax.process_index() == 0:
    paths = write_outputs(videos, output or os.path.join(root, "sample"), fps, upscale, sheet_frames=16)
  return dict(paths, videos=videos, fps=fps, num_key_frames=num_key_frames)


# ---------------------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m videoldm_jax.sample", description=__doc__.split("\n")[0])
  mode = parser.add_mutually_exclusive_group(required=True)
  mode.add_argument("--workdir", help="training workdir (a chain's or one stage's): write videos")
  mode.add_argument("--checkpoint", help="output directory of videoldm_jax.convert: text-to-image")
  mode.add_argument("--pipeline", help="long video: a chain workdir, or a comma list of base / predictor / "
                    "interpolator workdirs (key frames -> rollout -> interpolate x4 -> x4 -> decode)")
  parser.add_argument("--stage", default=None, help="workdir mode: which stage of a chain (default: the last)")
  parser.add_argument("--num_samples", type=int, default=4, help="workdir mode: number of videos")
  parser.add_argument("--batch_size", type=int, default=1, help="workdir mode: videos per sampler call")
  parser.add_argument("--num_frames", type=int, default=0, help="workdir mode: clip length (0: as trained)")
  parser.add_argument("--labels", default="", help="workdir mode: e.g. day_night=1,crowdedness=3 (RDS labels)")
  parser.add_argument("--upscale", type=int, default=0, help="workdir mode: pixel repeat factor (0: >= 128 px)")
  parser.add_argument("--seconds", type=float, default=None, help="pipeline mode: length of the final video")
  parser.add_argument("--num_windows", type=int, default=None, help="pipeline mode: key-frame windows (the "
                      "first + predictor windows; default 4 unless --seconds)")
  parser.add_argument("--interpolations", type=int, default=None, help="pipeline mode: x4 interpolation passes "
                      "(0-2; default 2 with an interpolator)")
  parser.add_argument("--context_guidance", type=float, default=None, help="predictor / interpolator context "
                      "guidance scale s: f(no context) + s (f(context) - f(no context)) (default: config)")
  parser.add_argument("--prompt", action="append", help="text (repeat for a batch in checkpoint mode)")
  parser.add_argument("--negative_prompt", default="")
  parser.add_argument("--steps", type=int, default=None, help="DDIM steps (checkpoint mode: 50; workdir: config)")
  parser.add_argument("--guidance", type=float, default=None, help="CFG scale (checkpoint mode: 7.5; workdir: "
                      "config)")
  parser.add_argument("--eta", type=float, default=0.0)
  parser.add_argument("--height", type=int, default=512)
  parser.add_argument("--width", type=int, default=512)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--output", default=None, help="checkpoint mode: PNG path (required); workdir mode: path "
                      "without extension for .mp4/.gif/.png (default WORKDIR/sample)")
  args = parser.parse_args(argv)

  if args.pipeline:
    try:
      out = sample_pipeline(args.pipeline, num_samples=args.num_samples, seconds=args.seconds,
                            num_windows=args.num_windows, interpolations=args.interpolations,
                            guidance=args.guidance, context_guidance=args.context_guidance, steps=args.steps,
                            seed=args.seed, labels=_parse_labels(args.labels),
                            prompt=args.prompt[0] if args.prompt else None, output=args.output, upscale=args.upscale)
    except (ValueError, FileNotFoundError) as e:
      parser.error(str(e))
    print(f"{out['videos'].shape[1]} frames at {out['fps']:g} fps from {out['num_key_frames']} key frames")
    for kind in ("mp4", "gif", "png"):
      if kind in out:
        print(f"wrote {out[kind]}")
    return 0

  if args.workdir:
    if args.prompt and len(args.prompt) > 1:
      parser.error("--prompt: one prompt in workdir mode (it conditions every video)")
    try:
      out = sample_workdir(args.workdir, stage=args.stage, num_samples=args.num_samples, batch_size=args.batch_size,
                           guidance=args.guidance, steps=args.steps, seed=args.seed,
                           labels=_parse_labels(args.labels), prompt=args.prompt[0] if args.prompt else None,
                           num_frames=args.num_frames, output=args.output, upscale=args.upscale)
    except (ValueError, FileNotFoundError) as e:
      parser.error(str(e))
    for kind in ("mp4", "gif", "png"):
      if kind in out:
        print(f"wrote {out[kind]}")
    return 0

  if not args.prompt:
    parser.error("--prompt is required with --checkpoint")
  if not args.output:
    parser.error("--output is required with --checkpoint")
  steps = 50 if args.steps is None else args.steps
  guidance = 7.5 if args.guidance is None else args.guidance
  from videoldm_jax.convert import load_converted
  converted = load_converted(args.checkpoint)
  missing = {"unet", "vae", "text_encoder"} - set(converted.configs)
  if missing:
    parser.error(f"--checkpoint {args.checkpoint} lacks {sorted(missing)}; text-to-image needs a full pipeline")
  latents = text_to_image_latents(converted, args.prompt, negative_prompts=[args.negative_prompt] * len(args.prompt),
                                  steps=steps, guidance_scale=guidance, eta=args.eta, height=args.height,
                                  width=args.width, rng=jax.random.PRNGKey(args.seed))
  save_image_grid(decode_latents(converted, latents), args.output)
  print(f"wrote {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
