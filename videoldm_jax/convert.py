r"""PyTorch Stable Diffusion weights -> Flax params (strict), and back.

Usage::

  # a diffusers pipeline folder (unet/ vae/ text_encoder/ [scheduler/]), one diffusers model folder,
  # or a single-file CompVis/SD checkpoint (.ckpt / .safetensors):
  python -m videoldm_jax.convert --source=/path/to/stable-diffusion-v1-5 --output=/ckpt/sd15 [--dtype=bfloat16]
  # Flax -> diffusers-layout safetensors (image components):
  python -m videoldm_jax.convert --source=/ckpt/sd15 --output=/tmp/sd15_torch --to=diffusers

OUT is a directory holding ``config.json`` (model configs, schedule, provenance) and one orbax checkpoint per
component (``unet/``, ``vae/``, ``text_encoder/``, ``image_encoder/``). :func:`load_converted` reads it back with no
torch installed.
An x4-upscaler pipeline folder (``StableDiffusionUpscalePipeline``: a ``low_res_scheduler/`` besides the usual
components) also records the low-res image's noise-augmentation schedule and ``max_noise_level``
(:func:`pipeline_metadata`; ``Converted.low_res_schedule`` / ``Converted.max_noise_level``).
A Stable Video Diffusion folder (``StableVideoDiffusionPipeline``: unet/ = ``UNetSpatioTemporalConditionModel``,
vae/ = ``AutoencoderKLTemporalDecoder``, image_encoder/ = ``CLIPVisionModelWithProjection``) converts the three, and
records its Euler scheduler config and the image encoder's normalisation (``Converted.scheduler_config`` /
``Converted.image_encoder_preprocess``).

Every source tensor must be consumed and every Flax param filled with the right shape; otherwise the command
exits non-zero naming the keys, and nothing is left at OUT (it is written to a temporary sibling, then renamed).
A source lacking a component it should hold (one its ``model_index.json`` lists; a single file: any of the three)
is refused, naming it, unless ``--components=unet[,vae,...]`` says which to convert.
PyTorch pickles are only read with ``torch.load(weights_only=True)``; nothing in a checkpoint is executed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import shutil
import sys
import tempfile
import typing
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from absl import flags

from videoldm_jax import cli
from videoldm_jax.conversion import io as ckpt_io
from videoldm_jax.conversion.core import ConversionError, PrefixSource, TensorSource

FORMAT = "videoldm_jax.converted/1"
COMPONENTS = ("unet", "vae", "text_encoder", "image_encoder")
# What a Stable Diffusion single file must hold; a pipeline folder without model_index.json: SD's, or SVD's when
# it has an image_encoder/.
SD_COMPONENTS = ("unet", "vae", "text_encoder")
SVD_COMPONENTS = ("unet", "vae", "image_encoder")

# Non-weight entries of CompVis single-file checkpoints: the DDPM schedule buffers. They are read to recover
# the noise schedule (and checked), so they count as consumed.
_COMPVIS_SCHEDULE_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights",
})


# ----------------------------------------------------------------------------------------------------------
# Config (de)serialisation.

def config_to_dict(config) -> Dict[str, Any]:
  return {"class": type(config).__name__, "config": dataclasses.asdict(config)}


def _coerce(value, hint):
  """JSON value -> the dataclass field type (lists -> tuples, dicts -> nested dataclasses)."""
  origin = typing.get_origin(hint)
  args = typing.get_args(hint)
  if value is None:
    return None
  if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
    return config_from_dict(hint, value)
  if origin is typing.Union:
    for arg in args:
      if arg is type(None):
        continue
      if dataclasses.is_dataclass(arg) and isinstance(value, Mapping):
        return config_from_dict(arg, value)
    non_none = [a for a in args if a is not type(None)]
    return _coerce(value, non_none[0]) if len(non_none) == 1 else _tuplify(value)
  if origin in (tuple, list) or isinstance(value, list):
    return _tuplify(value)
  return value


def _tuplify(value):
  if isinstance(value, list):
    return tuple(_tuplify(v) for v in value)
  return value


def config_from_dict(cls, data: Mapping[str, Any]):
  """Rebuilds a frozen config dataclass from its ``dataclasses.asdict`` form; unknown fields are an error."""
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(data) - names)
  if unknown:
    raise ValueError(f"{cls.__name__}: unknown config fields {unknown}")
  return cls(**{k: _coerce(v, hints.get(k, Any)) for k, v in data.items()})


def _config_classes():
  from videoldm_jax.models import clip, clip_vision, unet, vae
  return {"UNetConfig": unet.UNetConfig, "VAEConfig": vae.VAEConfig, "CLIPTextConfig": clip.CLIPTextConfig,
          "CLIPVisionConfig": clip_vision.CLIPVisionConfig}


# ----------------------------------------------------------------------------------------------------------
# Source discovery.

def _weight_files(folder: str, stems: Tuple[str, ...]) -> List[str]:
  """The weight file(s) of a diffusers/transformers model folder, safetensors preferred (sharded allowed)."""
  for stem in stems:
    single = os.path.join(folder, f"{stem}.safetensors")
    if os.path.isfile(single):
      return [single]
    shards = sorted(glob.glob(os.path.join(folder, f"{stem}-*-of-*.safetensors")))
    if shards:
      return shards
  for stem in stems:
    for suffix in (".bin", ".ckpt", ".pt"):
      path = os.path.join(folder, stem + suffix)
      if os.path.isfile(path):
        return [path]
  raise ConversionError(f"{folder}: no weights found (looked for {', '.join(s + '.safetensors|.bin' for s in stems)})")


class _ProgressSource(TensorSource):
  """Counts tensors as they are read (one at a time) on a shared tqdm bar."""

  def __init__(self, source: TensorSource, bar):
    self.source, self.bar, self.name = source, bar, source.name

  def keys(self):
    return self.source.keys()

  def shape(self, key):
    return self.source.shape(key)

  def _read(self, key):
    self.bar.update(1)
    return self.source._read(key)


_PROGRESS = {"enabled": False}


def _open(paths) -> TensorSource:
  source = ckpt_io.open_checkpoint(paths)
  if not _PROGRESS["enabled"]:
    return source
  from tqdm import tqdm
  bar = tqdm(total=len(source.keys()), desc=os.path.basename(str(source.name))[:40], unit="tensor", leave=False)
  return _ProgressSource(source, bar)


def _read_json(path: str) -> Dict:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise ConversionError(f"{path}: missing") from None
  except json.JSONDecodeError as e:
    raise ConversionError(f"{path}: invalid JSON ({e})") from e


def _component_kind(config_json: Mapping) -> Optional[str]:
  cls = config_json.get("_class_name") or (config_json.get("architectures") or [None])[0]
  return {
      "UNet2DConditionModel": "unet",
      "UNetSpatioTemporalConditionModel": "unet",  # SVD's video U-Net
      "AutoencoderKL": "vae",
      "AutoencoderKLTemporalDecoder": "vae",  # SVD's VAE: a video decoder
      "CLIPTextModel": "text_encoder",
      "CLIPTextModelWithProjection": "text_encoder",
      "CLIPVisionModelWithProjection": "image_encoder",  # SVD's first-frame encoder
  }.get(cls)


def _convert_diffusers_component(kind: str, folder: str, dtype) -> Tuple[Any, Dict]:
  from videoldm_jax.conversion import clip as clip_conv
  from videoldm_jax.conversion import clip_vision as clip_vision_conv
  from videoldm_jax.conversion import svd as svd_conv
  from videoldm_jax.conversion import unet as unet_conv
  from videoldm_jax.conversion import vae as vae_conv
  from videoldm_jax.models import clip, clip_vision, unet, vae
  cfg_json = _read_json(os.path.join(folder, "config.json"))
  if kind == "unet" and cfg_json.get("_class_name") == "UNetSpatioTemporalConditionModel":
    try:
      config = svd_conv.svd_config_from_diffusers(cfg_json)
    except ValueError as e:
      raise ConversionError(f"{folder}/config.json: {e}") from e
    source = _open(_weight_files(folder, ("diffusion_pytorch_model",)))
    return config, svd_conv.convert_svd_unet(source, config, dtype=dtype)
  if kind == "unet":
    config = unet.unet_config_from_diffusers(cfg_json)
    source = _open(_weight_files(folder, ("diffusion_pytorch_model",)))
    return config, unet_conv.convert_unet(source, config, dtype=dtype)
  if kind == "vae":
    config = vae.vae_config_from_diffusers(cfg_json)
    source = _open(_weight_files(folder, ("diffusion_pytorch_model",)))
    return config, vae_conv.convert_vae(source, config, dtype=dtype)
  if kind == "text_encoder":
    config = clip.clip_config_from_transformers(cfg_json)
    source = _open(_weight_files(folder, ("model", "pytorch_model")))
    return config, clip_conv.convert_clip_text(source, config, dtype=dtype)
  if kind == "image_encoder":
    try:
      config = clip_vision.clip_vision_config_from_transformers(cfg_json)
    except ValueError as e:
      raise ConversionError(f"{folder}/config.json: {e}") from e
    source = _open(_weight_files(folder, ("model", "pytorch_model")))
    return config, clip_vision_conv.convert_clip_vision(source, config, dtype=dtype)
  raise ConversionError(f"{folder}: unsupported component {kind!r}")


# DDIM settings of every Stable Diffusion pipeline's scheduler/scheduler_config.json (SD 1.x and 2.x alike): no
# x̂_0 clipping (latents are not in [-1, 1]), "leading" timesteps shifted by 1, final ᾱ = ᾱ_0. A CompVis single file
# stores no scheduler config, so its schedule gets these; otherwise it would sample unlike the same weights in a
# pipeline folder.
SD_DDIM_SETTINGS = {"clip_sample": False, "steps_offset": 1, "set_alpha_to_one": False, "timestep_spacing": "leading"}


def _schedule_from_scheduler_config(cfg: Mapping) -> Dict[str, Any]:
  keys = ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "prediction_type", "steps_offset",
          "set_alpha_to_one", "clip_sample", "timestep_spacing")
  return {k: cfg[k] for k in keys if k in cfg}


# StableDiffusionUpscalePipeline's default when its model_index.json has no max_noise_level.
DEFAULT_MAX_NOISE_LEVEL = 350
# Schedulers whose add_noise is the VP forward process sqrt(ᾱ) x + sqrt(1 - ᾱ) ε, the low-res augmentation.
_LOW_RES_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")


def pipeline_metadata(src: str) -> Dict[str, Any]:
  """Entries of ``config.json`` besides the components that a pipeline folder ``src`` carries ({} for others).

  An x4-upscaler folder (one with ``low_res_scheduler/``, or whose ``model_index.json`` lists it) gives
  ``low_res_schedule`` (the noise-augmentation schedule of the low-res image: beta_schedule, beta_start, beta_end,
  num_train_timesteps, trained_betas when set; diffusers' DDPMScheduler defaults fill absent fields) and
  ``max_noise_level`` (``model_index.json``'s, default 350). Raises ``ConversionError`` naming the file for a
  missing or unsupported low-res scheduler and for a ``max_noise_level`` outside its schedule.

  An SVD folder (``StableVideoDiffusionPipeline``, or one with / listing an ``image_encoder``) gives
  ``scheduler_config`` (``scheduler/scheduler_config.json`` as stored, when it is an ``EulerDiscreteScheduler``: the
  EDM sampler reads sigma_min / sigma_max / Karras spacing from it) and ``image_encoder_preprocess``
  (:func:`image_encoder_preprocess`).
  """
  if not os.path.isdir(src):
    return {}
  index_path = os.path.join(src, "model_index.json")
  index = _read_json(index_path) if os.path.isfile(index_path) else {}
  meta = _upscaler_metadata(src, index_path, index)
  if _is_svd_folder(src, index):
    sched_path = os.path.join(src, "scheduler", "scheduler_config.json")
    if os.path.isfile(sched_path):
      cfg = _read_json(sched_path)
      if cfg.get("_class_name") == "EulerDiscreteScheduler":
        meta["scheduler_config"] = cfg
    meta["image_encoder_preprocess"] = image_encoder_preprocess(src)
  return meta


def _listed(index: Mapping, name: str) -> bool:
  entry = index.get(name)
  return isinstance(entry, list) and bool(entry) and entry[0] is not None


def _is_svd_folder(src: str, index: Mapping) -> bool:
  return (index.get("_class_name") == "StableVideoDiffusionPipeline" or _listed(index, "image_encoder")
          or os.path.isdir(os.path.join(src, "image_encoder")))


def _upscaler_metadata(src: str, index_path: str, index: Mapping) -> Dict[str, Any]:
  from videoldm_jax import diffusion
  sched_path = os.path.join(src, "low_res_scheduler", "scheduler_config.json")
  if not os.path.isfile(sched_path):
    if _listed(index, "low_res_scheduler") or os.path.isdir(os.path.join(src, "low_res_scheduler")):
      raise ConversionError(f"{sched_path}: missing (an x4-upscaler pipeline needs its low-res noise schedule)")
    return {}
  cfg = _read_json(sched_path)
  cls = cfg.get("_class_name", "DDPMScheduler")
  if cls not in _LOW_RES_SCHEDULERS:
    raise ConversionError(f"{sched_path}: _class_name={cls!r} is not supported for the low-res noise augmentation "
                          f"(expected one of {', '.join(_LOW_RES_SCHEDULERS)})")
  try:
    schedule = diffusion.from_diffusers_scheduler_config(cfg)
  except ValueError as e:
    raise ConversionError(f"{sched_path}: {e}") from e
  low_res = {"beta_schedule": cfg.get("beta_schedule", "linear"), "beta_start": float(cfg.get("beta_start", 1e-4)),
             "beta_end": float(cfg.get("beta_end", 0.02)),
             "num_train_timesteps": int(cfg.get("num_train_timesteps", 1000))}
  if cfg.get("trained_betas") is not None:
    low_res["trained_betas"] = [float(b) for b in cfg["trained_betas"]]
  level = index.get("max_noise_level", DEFAULT_MAX_NOISE_LEVEL)
  top = schedule.num_train_timesteps - 1
  if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= top:
    raise ConversionError(f"{index_path}: max_noise_level={level!r} must be an integer in [0, {top}] "
                          f"(the low-res schedule's timesteps)")
  return {"low_res_schedule": low_res, "max_noise_level": level}


# CLIPImageProcessor's defaults (OpenAI CLIP's normalisation, 224 px), for a folder without feature_extractor/.
DEFAULT_IMAGE_ENCODER_PREPROCESS = {"image_mean": [0.48145466, 0.4578275, 0.40821073],
                                    "image_std": [0.26862954, 0.26130258, 0.27577711], "size": [224, 224]}


def _hw(value) -> Optional[List[int]]:
  """``[h, w]`` of a transformers size entry: an int, ``{"height", "width"}`` or ``{"shortest_edge"}``."""
  if isinstance(value, int) and not isinstance(value, bool):
    return [value, value]
  if isinstance(value, Mapping):
    if "height" in value and "width" in value:
      return [int(value["height"]), int(value["width"])]
    if "shortest_edge" in value:
      return [int(value["shortest_edge"])] * 2
  return None


def image_encoder_preprocess(src: str) -> Dict[str, List]:
  """``{"image_mean": [3], "image_std": [3], "size": [h, w]}`` of an SVD folder's
  ``feature_extractor/preprocessor_config.json`` (size: its ``crop_size``, else ``size``); CLIP's defaults for what
  it does not say or when the folder has none. SVD itself resizes to 224x224 whatever the processor says
  (``models/clip_vision.svd_image_encoder_input``)."""
  path = os.path.join(src, "feature_extractor", "preprocessor_config.json")
  out = {k: list(v) for k, v in DEFAULT_IMAGE_ENCODER_PREPROCESS.items()}
  if not os.path.isfile(path):
    return out
  cfg = _read_json(path)
  for key in ("image_mean", "image_std"):
    value = cfg.get(key)
    if value is None:
      continue
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      value = [value] * 3
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)):
      raise ConversionError(f"{path}: {key}={value!r} must be 3 numbers (RGB)")
    out[key] = [float(v) for v in value]
  if min(out["image_std"]) <= 0:
    raise ConversionError(f"{path}: image_std={out['image_std']} must be positive")
  size = _hw(cfg.get("crop_size")) or _hw(cfg.get("size"))
  if size is not None:
    out["size"] = size
  return out


def _schedule_from_compvis(source: TensorSource, prediction_type: str) -> Dict[str, Any]:
  """Recovers the training schedule from a CompVis checkpoint's ``betas`` buffer (or SD's default), with SD's DDIM
  settings."""
  schedule: Dict[str, Any] = {"num_train_timesteps": 1000, "prediction_type": prediction_type, **SD_DDIM_SETTINGS}
  if "betas" not in source.keys():
    schedule.update(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return schedule
  betas = source.get("betas").astype(np.float64)
  schedule["num_train_timesteps"] = int(betas.shape[0])
  start, end = float(betas[0]), float(betas[-1])
  scaled = np.linspace(start ** 0.5, end ** 0.5, betas.shape[0]) ** 2
  linear = np.linspace(start, end, betas.shape[0])
  if np.allclose(betas, scaled, rtol=1e-4, atol=1e-7):
    schedule.update(beta_schedule="scaled_linear", beta_start=round(start, 6), beta_end=round(end, 6))
  elif np.allclose(betas, linear, rtol=1e-4, atol=1e-7):
    schedule.update(beta_schedule="linear", beta_start=round(start, 6), beta_end=round(end, 6))
  else:
    raise ConversionError(f"{source.name}: 'betas' is neither a linear nor a scaled-linear schedule")
  return schedule


def convert_single_file(path: str, dtype, prediction_type: str = "epsilon", drop_ema: bool = False):
  """A CompVis/SD single-file checkpoint -> ({component: config}, {component: params}, schedule)."""
  from videoldm_jax.conversion import clip as clip_conv
  from videoldm_jax.conversion import unet as unet_conv
  from videoldm_jax.conversion import vae as vae_conv
  source = _open(path)
  keys = source.keys()
  prefixes = {
      "unet": "model.diffusion_model.",
      "vae": "first_stage_model.",
      "clip": "cond_stage_model.transformer.",
      "openclip": "cond_stage_model.model.",
  }
  ema = [k for k in keys if k.startswith("model_ema.")]
  if ema and not drop_ema:
    raise ConversionError(f"{path}: contains {len(ema)} 'model_ema.*' entries (an EMA copy of the UNet); "
                          f"pass --drop_ema to convert the raw weights and discard them explicitly")
  known = tuple(prefixes.values()) + ("model_ema.",)
  stray = sorted(k for k in keys if not k.startswith(known) and k not in _COMPVIS_SCHEDULE_KEYS)
  if stray:
    shown = ", ".join(stray[:8]) + (f" (+{len(stray) - 8} more)" if len(stray) > 8 else "")
    raise ConversionError(f"{path}: {len(stray)} unexpected keys outside the UNet/VAE/text encoder: {shown}")
  if not any(k.startswith(prefixes["unet"]) for k in keys):
    if any(k.startswith(prefixes["vae"]) for k in keys):  # an autoencoder alone (e.g. SVD's video VAE)
      vae_src = vae_conv.compvis_vae_source(PrefixSource(source, prefixes["vae"]))
      config = vae_conv.vae_config_from_compvis(vae_src)
      return {"vae": config}, {"vae": vae_conv.convert_vae(vae_src, config, dtype=dtype)}, {}
    raise ConversionError(f"{path}: no 'model.diffusion_model.*' keys -- not a Stable Diffusion checkpoint")

  configs, params = {}, {}
  unet_src = unet_conv.compvis_unet_source(PrefixSource(source, prefixes["unet"]))
  configs["unet"] = unet_conv.unet_config_from_compvis(unet_src)
  params["unet"] = unet_conv.convert_unet(unet_src, configs["unet"], dtype=dtype)
  if any(k.startswith(prefixes["vae"]) for k in keys):
    vae_src = vae_conv.compvis_vae_source(PrefixSource(source, prefixes["vae"]))
    configs["vae"] = vae_conv.vae_config_from_compvis(vae_src)
    params["vae"] = vae_conv.convert_vae(vae_src, configs["vae"], dtype=dtype)
  if any(k.startswith(prefixes["clip"]) for k in keys):
    clip_src = clip_conv.compvis_clip_source(PrefixSource(source, prefixes["clip"]))
  elif any(k.startswith(prefixes["openclip"]) for k in keys):
    clip_src = clip_conv.openclip_text_source(PrefixSource(source, prefixes["openclip"]))
  else:
    clip_src = None
  if clip_src is not None:
    configs["text_encoder"] = clip_conv.clip_config_from_compvis(clip_src)
    params["text_encoder"] = clip_conv.convert_clip_text(clip_src, configs["text_encoder"], dtype=dtype)
  return configs, params, _schedule_from_compvis(source, prediction_type)


# Lists of numbered blocks in CompVis single files: a gap in their numbering is a missing block. And the groups
# every UNet / VAE of such a file has.
_COMPVIS_BLOCK_LISTS = ("input_blocks", "output_blocks", "middle_block", "down", "up", "block", "attn", "layers",
                        "resblocks", "transformer_blocks")
_COMPVIS_GROUPS = {
    "model.diffusion_model.": ("time_embed", "input_blocks", "middle_block", "output_blocks", "out"),
    "first_stage_model.": ("encoder", "decoder", "quant_conv", "post_quant_conv"),
}


def _missing_compvis_blocks(keys) -> List[str]:
  """``prefix.*`` patterns of the blocks a CompVis file lacks: absent groups and gaps in numbered block lists
  (a missing last block shows only in the error of the layout it leaves)."""
  missing = []
  for prefix, groups in _COMPVIS_GROUPS.items():
    inner = [k[len(prefix):] for k in keys if k.startswith(prefix)]
    if inner:
      missing += [f"{prefix}{g}.*" for g in groups if not any(k.startswith(g + ".") for k in inner)]
  numbered: Dict[str, set] = {}
  for key in keys:
    parts = key.split(".")
    for i in range(1, len(parts)):
      if parts[i].isdigit() and parts[i - 1] in _COMPVIS_BLOCK_LISTS:
        numbered.setdefault(".".join(parts[:i]), set()).add(int(parts[i]))
  for parent, seen in sorted(numbered.items()):
    missing += [f"{parent}.{i}.*" for i in range(max(seen)) if i not in seen]
  return missing


def _incomplete_single_file(path: str, error: Exception) -> str:
  """One line for a single file whose layout could not be read: the blocks it lacks, and the layout error."""
  why = (str(error).strip().splitlines() or [type(error).__name__])[0]
  try:
    missing = _missing_compvis_blocks(ckpt_io.open_checkpoint(path).keys())
  except ConversionError:
    missing = []
  if not missing:
    return f"{path}: unsupported or incomplete checkpoint layout ({why})"
  shown = ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
  return f"{path}: incomplete checkpoint, missing keys {shown} ({why})"


def _listed_components(src: str) -> Tuple[str, ...]:
  """The components a pipeline folder should hold: those its ``model_index.json`` lists; without one, SD's three
  (SVD's when it has an ``image_encoder/``)."""
  path = os.path.join(src, "model_index.json")
  if not os.path.isfile(path):
    return SVD_COMPONENTS if os.path.isdir(os.path.join(src, "image_encoder")) else SD_COMPONENTS
  index = _read_json(path)
  return tuple(c for c in COMPONENTS if _listed(index, c))


def _refuse_partial(src: str, have, expected, wanted, what: str) -> None:
  """``ConversionError`` when ``src`` lacks a component: one of ``wanted`` (``--components``) or, without it, one
  of ``expected``; ``what`` says where the expectation comes from."""
  if wanted:
    missing = [c for c in wanted if c not in have]
    if missing:
      raise ConversionError(f"{src}: --components={','.join(wanted)} but it holds no {', '.join(missing)} "
                            f"(it holds {', '.join(sorted(have)) or 'nothing'})")
    return
  missing = [c for c in expected if c not in have]
  if missing:
    holds = [c for c in COMPONENTS if c in have]
    raise ConversionError(f"{src}: lacks {', '.join(missing)}, which {what} (it holds only {', '.join(holds)}); "
                          f"pass --components={','.join(holds)} to convert just those")


def convert_source(src: str, dtype=np.float32, prediction_type: Optional[str] = None, drop_ema: bool = False,
                   components: Optional[Sequence[str]] = None):
  """Any supported source -> ({component: config}, {component: params}, schedule dict).

  A pipeline folder must hold every component its ``model_index.json`` lists (without one: unet, vae and
  text_encoder, or image_encoder instead of text_encoder when it has one) and a single file unet, vae and
  text_encoder; ``components`` converts just those (which must be there), the only way to convert a partial source.
  """
  wanted = tuple(components or ())
  unknown = [c for c in wanted if c not in COMPONENTS]
  if unknown:
    raise ConversionError(f"--components: {', '.join(unknown)} is not one of {', '.join(COMPONENTS)}")
  if os.path.isfile(src):
    try:
      configs, params, schedule = convert_single_file(src, dtype, prediction_type or "epsilon", drop_ema)
    except ConversionError:
      raise
    except (ValueError, KeyError, IndexError) as e:  # the layout inference of a file with blocks missing
      raise ConversionError(_incomplete_single_file(src, e)) from e
    _refuse_partial(src, set(configs), SD_COMPONENTS, wanted, "a Stable Diffusion single file holds")
    keep = wanted or tuple(configs)
    return {c: configs[c] for c in keep}, {c: params[c] for c in keep}, schedule
  if not os.path.isdir(src):
    raise ConversionError(f"{src}: no such file or directory")
  configs, params, schedule = {}, {}, {}
  if os.path.isfile(os.path.join(src, "config.json")):  # one diffusers/transformers model folder
    kind = _component_kind(_read_json(os.path.join(src, "config.json")))
    if kind is None:
      raise ConversionError(f"{src}/config.json: unsupported model class (expected UNet2DConditionModel, "
                            f"UNetSpatioTemporalConditionModel, AutoencoderKL[TemporalDecoder], "
                            f"CLIPTextModel[WithProjection] or CLIPVisionModelWithProjection)")
    _refuse_partial(src, {kind}, (kind,), wanted, "")
    configs[kind], params[kind] = _convert_diffusers_component(kind, src, dtype)
  else:  # pipeline folder
    found = [c for c in COMPONENTS if os.path.isdir(os.path.join(src, c))]
    if not found:
      raise ConversionError(f"{src}: not a diffusers pipeline folder (no {'/, '.join(COMPONENTS)}/) "
                            f"and no config.json")
    listed = os.path.isfile(os.path.join(src, "model_index.json"))
    _refuse_partial(src, set(found), _listed_components(src), wanted,
                    "its model_index.json lists" if listed else "a pipeline folder holds")
    for name in [c for c in found if not wanted or c in wanted]:
      folder = os.path.join(src, name)
      cfg_json = _read_json(os.path.join(folder, "config.json"))
      if _component_kind(cfg_json) != name:
        found_cls = cfg_json.get("_class_name") or (cfg_json.get("architectures") or [None])[0]
        raise ConversionError(f"{folder}/config.json: expected a {name} model, found {found_cls}")
      configs[name], params[name] = _convert_diffusers_component(name, folder, dtype)
    sched_path = os.path.join(src, "scheduler", "scheduler_config.json")
    if os.path.isfile(sched_path):
      schedule = _schedule_from_scheduler_config(_read_json(sched_path))
  if prediction_type:
    schedule["prediction_type"] = prediction_type
  return configs, params, schedule


# ----------------------------------------------------------------------------------------------------------
# Output.

_META_KEYS = ("format", "source", "dtype", "schedule", "components")


def save_converted(output: str, configs: Mapping, params: Mapping, schedule: Mapping, *, source: str = "",
                   dtype_name: str = "float32", overwrite: bool = False,
                   metadata: Optional[Mapping[str, Any]] = None) -> None:
  """Writes OUT atomically: a temporary sibling directory is filled, then renamed into place.

  ``metadata``: extra JSON entries of ``config.json`` (:func:`pipeline_metadata` of the source).
  """
  import orbax.checkpoint as ocp
  clash = sorted(set(metadata or {}) & set(_META_KEYS))
  if clash:
    raise ConversionError(f"save_converted: metadata keys {clash} are reserved")
  output = os.path.abspath(output)
  if os.path.exists(output) and not overwrite:
    raise ConversionError(f"{output}: already exists (pass --overwrite to replace it)")
  with atomic_directory(output) as tmp:
    meta = {"format": FORMAT, "source": source, "dtype": dtype_name, "schedule": dict(schedule),
            "components": {name: config_to_dict(cfg) for name, cfg in configs.items()}, **(metadata or {})}
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(meta, f, indent=2, sort_keys=True)
    with ocp.StandardCheckpointer() as ckptr:
      for name, tree in params.items():
        ckptr.save(os.path.join(tmp, name), tree)
      ckptr.wait_until_finished()


@contextlib.contextmanager
def atomic_directory(output: str):
  """Yields a fresh temporary sibling of ``output`` to fill; when the block succeeds it replaces ``output``, when
  it raises it is removed, so ``output`` is never left half-written."""
  parent = os.path.dirname(os.path.abspath(output))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.tmp-", dir=parent)
  try:
    yield tmp
    if os.path.exists(output):
      shutil.rmtree(output)
    os.rename(tmp, output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


@dataclasses.dataclass
class Converted:
  configs: Dict[str, Any]
  params: Dict[str, Any]
  schedule: Dict[str, Any]
  meta: Dict[str, Any]

  @property
  def low_res_schedule(self) -> Optional[Dict[str, Any]]:
    """x4 upscaler: the low-res image's noise-augmentation scheduler config (diffusers field names); None for
    other checkpoints."""
    return self.meta.get("low_res_schedule")

  @property
  def max_noise_level(self) -> Optional[int]:
    """x4 upscaler: the highest low-res noise level the pipeline accepts; None for other checkpoints."""
    return self.meta.get("max_noise_level")

  @property
  def scheduler_config(self) -> Optional[Dict[str, Any]]:
    """SVD: the pipeline's ``EulerDiscreteScheduler`` config as stored (diffusers field names); None otherwise."""
    return self.meta.get("scheduler_config")

  @property
  def image_encoder_preprocess(self) -> Optional[Dict[str, Any]]:
    """SVD: ``{"image_mean", "image_std", "size"}`` of the image encoder's input; None for other checkpoints."""
    return self.meta.get("image_encoder_preprocess")


def load_converted_configs(path: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Reads only ``config.json``: ({component: config dataclass}, meta)."""
  meta = _read_json(os.path.join(path, "config.json"))
  if meta.get("format") != FORMAT:
    raise ConversionError(f"{path}/config.json: format {meta.get('format')!r}, expected {FORMAT!r}")
  classes = _config_classes()
  configs = {}
  for name, entry in meta["components"].items():
    if entry["class"] not in classes:
      raise ConversionError(f"{path}/config.json: unknown config class {entry['class']!r} for {name}")
    configs[name] = config_from_dict(classes[entry["class"]], entry["config"])
  return configs, meta


def load_converted(path: str, components: Optional[Tuple[str, ...]] = None,
                   targets: Optional[Mapping[str, Any]] = None) -> Converted:
  """Loads a converted checkpoint (no torch needed).

  Args:
    path: the OUT directory of ``videoldm_jax.convert``.
    components: subset to load (default: all present).
    targets: optional ``{component: abstract tree}`` of ``jax.ShapeDtypeStruct`` with shardings, to restore
      directly into sharded arrays on a mesh.
  """
  import orbax.checkpoint as ocp
  path = os.path.abspath(path)
  configs, meta = load_converted_configs(path)
  names = components or tuple(configs)
  missing = [n for n in names if n not in configs]
  if missing:
    raise ConversionError(f"{path}: has no component(s) {missing}; it holds {sorted(configs)}")
  params = {}
  with ocp.StandardCheckpointer() as ckptr:
    for name in names:
      target = (targets or {}).get(name)
      params[name] = ckptr.restore(os.path.join(path, name), target) if target is not None else \
          ckptr.restore(os.path.join(path, name))
  return Converted({n: configs[n] for n in names}, params, meta.get("schedule", {}), meta)


def export_diffusers(converted_path: str, output: str, overwrite: bool = False) -> List[str]:
  """Flax converted checkpoint -> diffusers/transformers-layout safetensors, one folder per component."""
  from videoldm_jax.conversion import clip as clip_conv
  from videoldm_jax.conversion import clip_vision as clip_vision_conv
  from videoldm_jax.conversion import svd as svd_conv
  from videoldm_jax.conversion import unet as unet_conv
  from videoldm_jax.conversion import vae as vae_conv
  conv = load_converted(converted_path)
  video_unet = getattr(conv.configs.get("unet"), "temporal", None) is not None
  exporters: Dict[str, Tuple[Callable, str]] = {
      "unet": (svd_conv.svd_unet_to_diffusers if video_unet else unet_conv.unet_to_diffusers,
               "diffusion_pytorch_model.safetensors"),
      "vae": (vae_conv.vae_to_diffusers, "diffusion_pytorch_model.safetensors"),
      "text_encoder": (clip_conv.clip_to_transformers, "model.safetensors"),
      "image_encoder": (clip_vision_conv.clip_vision_to_transformers, "model.safetensors"),
  }
  output = os.path.abspath(output)
  if os.path.exists(output) and not overwrite:
    raise ConversionError(f"{output}: already exists (pass --overwrite to replace it)")
  os.makedirs(os.path.dirname(output), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.tmp-", dir=os.path.dirname(output))
  written = []
  try:
    for name, tree in conv.params.items():
      fn, filename = exporters[name]
      tensors = {k: np.asarray(v, dtype=np.float32) for k, v in fn(tree).items()}
      os.makedirs(os.path.join(tmp, name))
      ckpt_io.save_safetensors(tensors, os.path.join(tmp, name, filename))
      written.append(os.path.join(output, name, filename))
    if os.path.exists(output):
      shutil.rmtree(output)
    os.rename(tmp, output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return written


# ----------------------------------------------------------------------------------------------------------
# CLI.

def _dtype(name: str):
  if name == "float32":
    return np.float32
  if name == "bfloat16":
    import ml_dtypes
    return ml_dtypes.bfloat16
  raise ConversionError(f"--dtype: {name!r} is not one of float32, bfloat16")


# ----------------------------------------------------------------------------------------------------------
# CLI (absl flags: videoldm_jax.cli).
# ----------------------------------------------------------------------------------------------------------

def define_flags(fv: flags.FlagValues) -> None:
  """The command's flags, defined in ``fv`` (the global FLAGS when run as a program)."""
  flags.DEFINE_string("source", None, "diffusers pipeline/model folder or .ckpt/.safetensors file", flag_values=fv)
  flags.DEFINE_string("output", None, "output directory (must not exist unless --overwrite)", flag_values=fv)
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "dtype of the converted params", flag_values=fv)
  flags.DEFINE_enum("prediction_type", None, ["epsilon", "v_prediction"],
                    "overrides the scheduler config; single files cannot tell (SD 2.x 768-v is v)", flag_values=fv)
  flags.DEFINE_bool("drop_ema", False, "discard model_ema.* weights of CompVis files", flag_values=fv)
  flags.DEFINE_list("components", None, "convert only these of unet,vae,text_encoder,image_encoder (default: all "
                    "the source holds; a source lacking one that it should hold is refused)", flag_values=fv)
  flags.DEFINE_enum("to", "flax", ["flax", "diffusers"],
                    "'diffusers': export a converted Flax checkpoint back to PyTorch-layout safetensors",
                    flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "replace --output if it exists", flag_values=fv)


def run(fv: flags.FlagValues) -> int:
  """Runs the command with parsed flags; a source that does not convert prints the error and returns 2."""
  cli.require(fv, "source", "output")
  try:
    if fv.to == "diffusers":
      for p in export_diffusers(fv.source, fv.output, overwrite=fv.overwrite):
        print(f"wrote {p}")
      return 0
    if os.path.exists(fv.output) and not fv.overwrite:
      raise ConversionError(f"{fv.output}: already exists (pass --overwrite to replace it)")
    dtype = _dtype(fv.dtype)
    metadata = pipeline_metadata(fv.source)  # before the weights: a bad low-res schedule fails fast
    _PROGRESS["enabled"] = True
    configs, params, schedule = convert_source(fv.source, dtype, fv.prediction_type, fv.drop_ema, fv.components)
    save_converted(fv.output, configs, params, schedule, source=os.path.abspath(fv.source),
                   dtype_name=fv.dtype, overwrite=fv.overwrite, metadata=metadata)
  except ConversionError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  counts = {n: sum(int(np.prod(np.shape(x))) for x in _leaves(t)) for n, t in params.items()}
  for name, n in counts.items():
    print(f"{name}: {n:,} params")
  print(f"wrote {os.path.abspath(fv.output)}")
  return 0


def main(argv: typing.Sequence[str]) -> int:
  """The command with ``argv`` (its flags, as on the command line)."""
  return cli.main("videoldm_jax.convert", define_flags, run, argv)


def _leaves(tree):
  if isinstance(tree, Mapping):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree


if __name__ == "__main__":
  cli.run_program(define_flags, run)
