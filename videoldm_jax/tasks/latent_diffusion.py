"""Latent diffusion task: stages ``image`` (image LDM on single frames) and ``base`` (key-frame video LDM).

Param tree (top-level keys match the converted-checkpoint format)::

  unet/...            spatial layers (+ ``temporal`` layers in the video U-Net: ``*temporal*`` in their paths)
  vae/...             KL autoencoder, always frozen (latents on the fly from pixels, or pre-encoded batches)
  text_encoder/...    CLIP text encoder, frozen (text conditioning)
  temporal_text_encoder/...  with ``config.model.temporal_text_encoder``: a second CLIP text encoder (same
                      architecture), frozen, whose tokens the temporal cross-attention reads instead of the spatial
                      context (a personalized backbone keeps the encoder its temporal layers trained with, paper
                      Sec. 4.2; ``videoldm_jax.personalize``)
  label_encoder/...   label tokens (label conditioning, e.g. RDS day/night + crowdedness)

``image``: ``config.trainable`` usually ``^(unet|label_encoder)/.*``; the U-Net is the plain image U-Net.
``base``: the same U-Net with temporal layers (``config.model.temporal``), ``config.trainable = .*temporal.*``:
the image LDM stays frozen; ``config.model_init`` points at a converted SD checkpoint or a trained ``image`` workdir.
``base`` samples clips longer than it trained on "convolutionally in time" (paper App. B) with
``config.sampling.temporal_window`` = W: its sampling U-Net (``sample_unet``, same params) runs the temporal attention
over W-frame windows with window-relative positions (``TemporalConfig.position_window``); training never does.

Clips ``[b, t, h, w, 3]`` are encoded frame by frame to latents ``[b, t, h/8, w/8, 4]``; one diffusion time per clip;
the U-Net sees frames folded into the batch ``[(b t), h, w, c]`` with ``num_frames=t`` and the conditioning
repeated per frame. Classifier-free guidance: the pipeline drops labels (-> null class) / captions (-> "").
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import re
from typing import Any, Callable, Dict, Optional, Tuple

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from videoldm_jax import aot, checkpoint, config_lib, diffusion, optim, parallel, pipeline, tasks
from videoldm_jax.data import pipeline as data_pipeline
from videoldm_jax.models import clip as clip_lib
from videoldm_jax.models import unet as unet_lib
from videoldm_jax.models import vae as vae_lib
from videoldm_jax.tasks.common import Task, sds

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ---------------------------------------------------------------------------------------------------------------
# Model configs from the run config: preset + overrides (+ temporal options).
# ---------------------------------------------------------------------------------------------------------------

def _replace(cfg, overrides, key: str):
  fields = {f.name for f in dataclasses.fields(cfg)}
  overrides = dict(overrides or {})
  for k in overrides:
    if k not in fields:
      raise ValueError(f"config.model.{key}.{k}: not a field of {type(cfg).__name__}")
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
  return dataclasses.replace(cfg, **overrides) if overrides else cfg


def unet_config(config) -> unet_lib.UNetConfig:
  preset = getattr(unet_lib, config.model.unet, None)
  if not callable(preset):
    raise ValueError(f"config.model.unet={config.model.unet!r}: no such preset in videoldm_jax.models.unet")
  cfg = _replace(preset(), config.model.unet_overrides, "unet_overrides")
  if config.model.temporal is not None:
    if "temporal" not in {f.name for f in dataclasses.fields(cfg)}:
      raise ValueError("config.model.temporal is set but UNetConfig has no temporal option")
    from videoldm_jax.models.temporal import TemporalConfig  # pylint: disable=g-import-not-at-top
    if dict(config.model.temporal).get("position_window") is not None:
      raise ValueError("config.model.temporal.position_window is a sampling-time option, never trained with: set "
                       "config.sampling.temporal_window (key-frame stage) instead")
    tc = _replace(TemporalConfig(), dict(config.model.temporal), "temporal")
    cfg = dataclasses.replace(cfg, temporal=tc)
  return cfg


def vae_config(config) -> vae_lib.VAEConfig:
  preset = getattr(vae_lib.VAEConfig, config.model.vae, None)
  if not callable(preset):
    raise ValueError(f"config.model.vae={config.model.vae!r}: no such VAEConfig preset")
  return _replace(preset(), config.model.vae_overrides, "vae_overrides")


def text_config(config) -> Optional[clip_lib.CLIPTextConfig]:
  if not config.model.text_encoder:
    return None
  preset = getattr(clip_lib, config.model.text_encoder, None)
  if not callable(preset):
    raise ValueError(f"config.model.text_encoder={config.model.text_encoder!r}: no such preset in models.clip")
  return _replace(preset(), config.model.text_overrides, "text_overrides")


def with_source_vae_scale(config):
  """``config`` with the VAE latent scale of its ``model_init`` source (``source_vae_scale``) when that provides
  one; an explicit ``config.model.vae_overrides.scaling_factor`` that disagrees with it is refused, naming both."""
  scale = source_vae_scale(config.model_init) if config.model_init else None
  if scale is None:
    return config
  explicit = dict(config.model.vae_overrides).get("scaling_factor")
  if explicit is not None:
    if abs(float(explicit) - scale) > 1e-6 * scale:
      raise ValueError(f"config.model.vae_overrides.scaling_factor={explicit} but the VAE of config.model_init "
                       f"{config.model_init!r} has latent scale {scale}")
    return config
  config = copy.deepcopy(config)
  config.model.vae_overrides = dict(config.model.vae_overrides, scaling_factor=scale)
  return config


def source_vae_scale(path: str) -> Optional[float]:
  """The latent scale of the VAE a ``model_init`` training workdir provides: what an ``autoencoder`` run measured
  (its ``info.json``), or the scale another stage trained with (its ``config.json``). None for converted
  checkpoints (their VAE preset carries its scale) and unfinished autoencoder runs."""
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(os.path.join(path, "checkpoints")) or not os.path.exists(config_path):
    return None
  with open(config_path) as fh:
    source = json.load(fh)
  if source.get("stage") == "autoencoder":
    scale = checkpoint.read_info(path).get("vae_scaling_factor")
    return None if scale is None else float(scale)
  model = source.get("model") or {}
  if not model.get("vae"):
    return None
  preset = getattr(vae_lib.VAEConfig, model["vae"], None)
  overrides = model.get("vae_overrides") or {}
  if "scaling_factor" in overrides:
    return float(overrides["scaling_factor"])
  return float(preset().scaling_factor) if callable(preset) else None


class LabelEncoder(nn.Module):
  """One learned token per label field: ``{field: [b] int}`` -> ``[b, fields, dim]``; label < 0 = dropped (null)."""
  num_classes: Tuple[int, ...]
  fields: Tuple[str, ...]
  dim: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, labels: Dict[str, jax.Array]) -> jax.Array:
    tokens = []
    for name, n in zip(self.fields, self.num_classes):
      table = nn.Embed(n + 1, self.dim, name=name, param_dtype=self.param_dtype,
                       embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")))
      idx = jnp.asarray(labels[name], jnp.int32)
      tokens.append(table(jnp.where((idx < 0) | (idx >= n), n, idx)))  # index n = the null class
    return jnp.stack(tokens, axis=1)


class Tokenize:
  """Picklable ``caption -> [77] int32`` for the grain pipeline (worker processes load the tokenizer once)."""

  def __init__(self, pad_with: str):
    self.pad_with = pad_with

  def __call__(self, text: str) -> np.ndarray:
    from videoldm_jax.models import tokenizer  # pylint: disable=g-import-not-at-top
    return tokenizer.tokenize(tokenizer.load_clip_tokenizer(self.pad_with), text)[0]


# ---------------------------------------------------------------------------------------------------------------
# The task.
# ---------------------------------------------------------------------------------------------------------------

@tasks.register("image", "base")
class LatentDiffusionTask(Task):
  """Image / key-frame video latent diffusion (see module docstring)."""

  # Stages without temporal layers. They train on single frames; with data.num_frames > 1 every frame of a clip is
  # its own training image (the same clips a video stage reads: benchmarks/ablations.py's equal-data image arm).
  image_stages = ("image",)

  def __init__(self, config):
    self.config = config
    self.video = config.stage not in self.image_stages
    self.num_frames = int(config.data.num_frames)
    self.dtype = DTYPES[config.dtype]
    self.unet_config = unet_config(config)
    self.vae_config = vae_config(config)
    self.text_config = text_config(config) if config.model.conditioning == "text" else None
    kw = dict(dtype=self.dtype, param_dtype=jnp.float32)
    self.unet = unet_lib.UNet(self.unet_config, **kw)
    # Sampling-time U-Net (same params): temporal attention over sliding windows for clips longer than trained.
    window = int(config.sampling.get("temporal_window", 0) or 0)
    self.sample_unet = self.unet if not (window and self.video) else unet_lib.UNet(dataclasses.replace(
        self.unet_config, temporal=dataclasses.replace(self.unet_config.temporal, position_window=window)), **kw)
    self.vae = vae_lib.AutoencoderKL(self.vae_config, **kw)
    self.text_encoder = clip_lib.CLIPTextEncoder(self.text_config, **kw) if self.text_config else None
    self.temporal_text = self.text_encoder is not None and bool(config.model.get("temporal_text_encoder", False))
    self.label_encoder = None
    if config.model.conditioning == "labels":
      self.label_encoder = LabelEncoder(tuple(config.model.label_classes), tuple(config.model.label_fields),
                                        int(config.model.label_dim or self.unet_config.cross_attention_dim))
    d = config.diffusion
    self.noise_schedule = diffusion.make_schedule(d.schedule, d.num_train_timesteps, d.beta_start, d.beta_end,
                                                  d.prediction)
    self.tokenize = Tokenize(config.model.tokenizer_pad) if self.text_encoder is not None else None
    self._null_ids = None
    super().__init__(config)

  # ----- declaration --------------------------------------------------------------------------------------------
  @classmethod
  def samples_videos(cls, stage: str) -> bool:
    return stage != "image"

  @classmethod
  def pipeline_order(cls, stage: str) -> Optional[int]:
    return 0 if stage == "base" else None  # the key frames' first window; the image model is no pipeline stage

  @classmethod
  def config_defaults(cls, stage: str):
    sampling = dict(num_steps=25, guidance_scale=5.0, eta=0.0)  # DDIM + classifier-free guidance
    if stage == "base":
      # Key frames longer than trained, "convolutionally in time" (paper App. B): frames per temporal-attention
      # window, positions relative to the window (TemporalConfig.position_window); 0 = off.
      sampling["temporal_window"] = 0
    return {
        "diffusion": dict(schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                          prediction="eps"),  # eps | v (conditioning dropout for CFG: config.data.cond_drop_prob)
        "sampling": sampling,
    }

  @property
  def needs_model_init(self) -> bool:
    """The video stage trains temporal layers on a frozen image backbone that must come from somewhere."""
    return self.video

  @classmethod
  def validate_config(cls, config) -> None:
    config_lib.check_choices(config, {"diffusion.prediction": ("eps", "v"),
                                      "diffusion.schedule": ("linear", "scaled_linear")})
    if config.stage in cls.image_stages:
      if config.model.temporal is not None:
        raise ValueError(f"config.model.temporal must be None for the {config.stage} stage (plain image U-Net)")
      if int(config.data.num_frames) < 1:
        raise ValueError(f"config.data.num_frames={config.data.num_frames}: the {config.stage} stage needs >= 1 "
                         "frames (each one its own image)")
    else:
      if config.model.temporal is None:
        raise ValueError(f"config.model.temporal is None but stage {config.stage!r} needs temporal layers")
      if int(config.data.num_frames) < 2:
        raise ValueError(f"config.data.num_frames={config.data.num_frames}: stage {config.stage!r} trains on clips")
      window = int(config.sampling.get("temporal_window", 0) or 0)
      if window and not 2 <= window <= int(config.data.num_frames):
        raise ValueError(f"config.sampling.temporal_window={window}: 0 (off) or 2..config.data.num_frames="
                         f"{config.data.num_frames} (a window longer than the trained clips puts positions outside "
                         "the trained range)")
    if config.model.conditioning == "image":
      raise ValueError(f"config.model.conditioning='image' is the svd stage's; stage {config.stage!r} conditions on "
                       "text, labels or none")
    if config.model.conditioning == "labels":
      if len(config.model.label_fields) != len(config.model.label_classes):
        raise ValueError(f"config.model.label_fields {tuple(config.model.label_fields)} and "
                         f"config.model.label_classes {tuple(config.model.label_classes)} differ in length")
    if config.model.conditioning == "text" and not config.model.text_encoder:
      raise ValueError("config.model.text_encoder is empty but config.model.conditioning='text'")
    if config.model.get("temporal_text_encoder", False):
      cls._check_temporal_text_encoder(config)
    vc = vae_config(config)
    f = cls.spatial_factor(config)
    if config.data.source != data_pipeline.LATENTS:
      for key in ("height", "width"):
        if int(config.data[key]) % f:
          raise ValueError(f"config.data.{key}={config.data[key]} must be a multiple of {f} (VAE factor x U-Net "
                           "downsampling)")
    if config.model_init:
      cls._check_prediction_type(config)
    if config.data.source == data_pipeline.LATENTS and config.data.data_dir:
      info_path = os.path.join(config.data.data_dir, data_pipeline.LATENT_INFO_FILE)
      if os.path.exists(info_path):
        with open(info_path) as fh:
          info = json.load(fh)
        stored = info.get("num_frames")
        if stored is not None and int(stored) < int(config.data.num_frames):
          raise ValueError(f"config.data.num_frames={config.data.num_frames} exceeds the {stored} frames per clip "
                           f"stored in {config.data.data_dir}")
        scale = data_pipeline.latent_scale_from_info(config.data, info)
        if abs(scale - vc.scaling_factor) > 1e-6 * max(1.0, abs(scale)):
          raise ValueError(f"the latents in config.data.data_dir={config.data.data_dir!r} are scaled by {scale} "
                           f"(config.data.latent_scale or its {data_pipeline.LATENT_INFO_FILE}) but the model's "
                           f"VAE decodes with scaling_factor {vc.scaling_factor} (config.model.vae_overrides)")

  @classmethod
  def _check_temporal_text_encoder(cls, config) -> None:
    key = "config.model.temporal_text_encoder=True"
    if config.stage in cls.image_stages or config.model.conditioning != "text":
      raise ValueError(f"{key}: a second text encoder for the temporal layers needs a video stage conditioned on "
                       f"text (stage {config.stage!r}, config.model.conditioning={config.model.conditioning!r})")
    if not unet_config(config).temporal.cross_attention:
      raise ValueError(f"{key} but config.model.temporal.cross_attention is False: the temporal layers read no text")
    if re.fullmatch(config.trainable, "temporal_text_encoder/final_layer_norm/scale"):
      raise ValueError(f"{key}: config.trainable={config.trainable!r} matches the temporal text encoder, which "
                       "stays frozen; exclude it, e.g. '(?!temporal_text_encoder/).*temporal.*'")

  @classmethod
  def spatial_factor(cls, config) -> int:
    """What frame sizes must be a multiple of: the VAE's downsampling times the U-Net's."""
    return vae_config(config).downsample_factor * 2 ** (unet_config(config).num_levels - 1)

  @classmethod
  def resolve_config(cls, config):
    return with_source_vae_scale(config)

  @staticmethod
  def _check_prediction_type(config) -> None:
    """The model_init source (converted checkpoint or trained workdir) records its prediction type: training
    another target on top of it would silently fail."""
    path = os.path.join(config.model_init, "config.json")
    if not os.path.exists(path):
      return
    with open(path) as fh:
      source = json.load(fh)
    if os.path.exists(os.path.join(config.model_init, "checkpoints")):  # a training workdir
      kind = (source.get("diffusion") or {}).get("prediction")  # an autoencoder workdir has no diffusion
    else:  # videoldm_jax.convert output
      kind = (source.get("schedule") or {}).get("prediction_type")
    if kind and diffusion.canonical_prediction_type(kind) != config.diffusion.prediction:
      raise ValueError(f"config.diffusion.prediction={config.diffusion.prediction!r} but config.model_init "
                       f"{config.model_init!r} was trained with {kind!r}")

  # ----- params -------------------------------------------------------------------------------------------------
  def init(self, rng) -> Dict[str, Any]:
    r_unet, r_vae, r_cond = jax.random.split(rng, 3)
    t = self.num_frames if self.video else 1
    inputs = unet_lib.dummy_inputs(self.unet_config, batch=t)
    if self.video:
      inputs.update(num_frames=t, image_only_indicator=jnp.zeros((1, t), jnp.float32))
    params = {"unet": self.unet.init(r_unet, **inputs)["params"],
              "vae": self.vae.init(r_vae, vae_lib.example_image(self.vae_config))["params"]}
    if self.text_encoder is not None:
      params["text_encoder"] = self.text_encoder.init(r_cond, jnp.zeros((1, 77), jnp.int32))["params"]
    if self.temporal_text:  # its own key: the other params' init stays what it was without it
      params["temporal_text_encoder"] = self.text_encoder.init(jax.random.fold_in(r_cond, 1),
                                                               jnp.zeros((1, 77), jnp.int32))["params"]
    if self.label_encoder is not None:
      labels = {k: jnp.zeros((1,), jnp.int32) for k in self.label_encoder.fields}
      params["label_encoder"] = self.label_encoder.init(r_cond, labels)["params"]
    return params

  # ----- data ---------------------------------------------------------------------------------------------------
  def _data_config(self, **overrides):
    c = data_pipeline.with_defaults(self.config.data)
    for k, v in overrides.items():
      c[k] = v
    return c

  def _dataset(self, mesh, data_config):
    local = self.config.batch_size // jax.process_count()
    ds = data_pipeline.make_dataset(data_config, local, tokenize_fn=self.tokenize)
    keep = set(self.abstract_batch(1))  # the fields the task declares, nothing else
    spec = P(parallel.BATCH_AXES)
    return ds.map(lambda b: {k: v for k, v in b.items() if k in keep}).map(
        functools.partial(data_pipeline.make_global_batch, mesh=mesh, partition_spec=spec))

  def input_pipeline(self, mesh):
    """Checkpointable grain iterator of global batches: ``video`` ``[b, t, h, w, 3]`` in [-1, 1] (or ``latents``),
    ``labels`` / ``caption_ids``, ``cond_mask``."""
    return iter(self._dataset(mesh, self._data_config()))

  def fixed_batch(self, mesh, min_frames: int = 0):
    """A deterministic batch (own seed, no conditioning dropout) for eval loss and sample conditioning; with
    ``min_frames`` its clips are long enough for a video metric (``clip_frames``; the temporal layers take any
    length)."""
    frames = self.clip_frames(max(int(min_frames), int(self.config.data.num_frames))) if min_frames else None
    cfg = self._data_config(seed=int(self.config.data.seed) + 1_000_003, cond_drop_prob=0.0, read_threads=1,
                            prefetch=1, num_workers=0, **({"num_frames": frames} if frames else {}))
    return next(iter(self._dataset(mesh, cfg)))

  def clip_frames(self, at_least: int) -> int:
    """The shortest clip length >= ``at_least`` this stage samples."""
    return int(at_least)

  def abstract_batch(self, batch_size: int, inputs: Optional[str] = None) -> Dict[str, Any]:
    """``latents`` ``[b, t, h/f, w/f, c]`` (``inputs="latents"``, pre-encoded) or ``video`` ``[b, t, h, w, 3]``
    (``"pixels"``; default: as ``config.data.source``), ``caption_ids`` ``[b, 77]`` / ``labels`` ``{field: [b]}``,
    ``cond_mask`` ``[b]``."""
    if inputs is None:
      inputs = "latents" if self.config.data.source == data_pipeline.LATENTS else "pixels"
    b, t = int(batch_size), int(self.config.data.num_frames)
    h, w = int(self.config.data.height), int(self.config.data.width)
    if inputs == "latents":
      f = self.vae_config.downsample_factor
      batch = {"latents": sds((b, t, h // f, w // f, self.vae_config.latent_channels), jnp.float32)}
    elif inputs == "pixels":
      batch = {"video": sds((b, t, h, w, 3), jnp.float32)}
    else:
      raise ValueError(f"inputs={inputs!r}: expected 'latents' or 'pixels'")
    if self.text_encoder is not None:
      batch["caption_ids"] = sds((b, 77), jnp.int32)
    if self.label_encoder is not None:
      batch["labels"] = {k: sds((b,), jnp.int32) for k in self.label_encoder.fields}
    batch["cond_mask"] = sds((b,), jnp.float32)
    return batch

  # ----- model pieces -------------------------------------------------------------------------------------------
  def context(self, params, batch):
    """Conditioning tokens ``[b, n, d]`` (frozen or trainable encoders, looked up in the merged tree); with
    ``config.model.temporal_text_encoder`` ``{"spatial": [b, n, d], "temporal": [b, n, d]}``, each text encoder's
    tokens for the same captions (``denoise`` takes either; a dropped caption is each encoder's own null text)."""
    if self.text_encoder is not None:
      out = self.text_encoder.apply({"params": params["text_encoder"]}, batch["caption_ids"])
      if self.temporal_text:
        temporal = self.text_encoder.apply({"params": params["temporal_text_encoder"]}, batch["caption_ids"])
        return {"spatial": out["last_hidden_state"], "temporal": temporal["last_hidden_state"]}
      return out["last_hidden_state"]
    if self.label_encoder is not None:
      return self.label_encoder.apply({"params": params["label_encoder"]}, batch["labels"]).astype(self.dtype)
    b = jax.tree.leaves(batch)[0].shape[0]
    return jnp.zeros((b, 1, self.unet_config.cross_attention_dim), self.dtype)

  def null_condition(self, batch):
    """The dropped-conditioning version of ``batch``'s conditioning fields (for CFG at sampling)."""
    out = dict(batch)
    if "labels" in batch:
      out["labels"] = {k: jnp.full_like(v, data_pipeline.NULL_LABEL) for k, v in batch["labels"].items()}
    if "caption_ids" in batch:
      if self._null_ids is None:
        self._null_ids = np.asarray(self.tokenize(""), np.int32)
      out["caption_ids"] = jnp.broadcast_to(jnp.asarray(self._null_ids), batch["caption_ids"].shape)
    return out

  def encode(self, params, batch, rng) -> jax.Array:
    """Scaled latents ``[b, t, h', w', c]`` (pre-encoded, or sampled from the frozen VAE's posterior)."""
    if "latents" in batch:
      return batch["latents"].astype(jnp.float32)
    video = batch["video"]
    b = video.shape[0]
    frames = einops.rearrange(video, "b t h w c -> (b t) h w c").astype(self.dtype)
    moments = self.vae.apply({"params": params["vae"]}, frames, method="encode")
    z = vae_lib.DiagonalGaussian(moments).sample(rng) * self.vae_config.scaling_factor
    return jax.lax.stop_gradient(einops.rearrange(z, "(b t) h w c -> b t h w c", b=b))

  def denoise(self, params, x_t, t, context, *, unet: Optional[nn.Module] = None, **unet_kwargs) -> jax.Array:
    """``x_t`` ``[b, t, h, w, c]``, ``t`` ``[b]``, ``context`` ``[b, n, d]`` (or ``context()``'s two-encoder dict:
    the temporal layers then cross-attend to its ``"temporal"`` tokens) -> prediction ``[b, t, h, w, c]``.
    ``unet``: the module to apply (default: the training U-Net; ``sample_unet`` at sampling). ``unet_kwargs`` go
    to the U-Net as they are (e.g. the mask conditioning of the predictor)."""
    b, nt = x_t.shape[:2]
    x = einops.rearrange(x_t, "b t h w c -> (b t) h w c")
    kw = dict(unet_kwargs)
    if isinstance(context, dict):
      kw["temporal_context"] = context["temporal"]  # [b, n, d], one per video
      context = context["spatial"]
    if self.video:
      kw.update(num_frames=nt, image_only_indicator=jnp.zeros((b, nt), jnp.float32))
    out = (unet or self.unet).apply({"params": params["unet"]}, x, jnp.repeat(t, nt), jnp.repeat(context, nt, axis=0),
                                    **kw)
    return einops.rearrange(out, "(b t) h w c -> b t h w c", b=b)

  # ----- training -----------------------------------------------------------------------------------------------
  def loss_fn(self, trainable, frozen, batch, rng):
    params = optim.merge(trainable, frozen)
    enc_rng, diff_rng = jax.random.split(rng)
    z0 = self.encode(params, batch, enc_rng)
    t, noise, x_t = diffusion.sample_training_inputs(diff_rng, z0, self.noise_schedule)
    pred = self.denoise(params, x_t.astype(self.dtype), t, self.context(params, batch))
    target = diffusion.training_target(None, z0, noise, t, self.noise_schedule)
    loss = jnp.mean((pred.astype(jnp.float32) - target) ** 2)
    return loss, self.aux_metrics(trainable)

  def aux_metrics(self, trainable) -> Dict[str, jax.Array]:
    """Mean merge factor α = sigmoid(mix_factor) of the temporal AlphaBlenders (1 = purely spatial)."""
    mix = [v for k, v in optim.flat_paths(trainable).items() if k.endswith("mix_factor")]
    if not mix:
      return {}
    return {"alpha": jnp.mean(jnp.stack([jax.nn.sigmoid(m.astype(jnp.float32)).mean() for m in mix]))}

  # ----- sampling -----------------------------------------------------------------------------------------------
  def sample_fn(self, trainable, frozen, batch, rng) -> jax.Array:
    """DDIM + classifier-free guidance for the first ``config.sampling.num_samples`` conditions of ``batch``;
    returns uint8 videos ``[n, t, H, W, 3]``."""
    params = optim.merge(trainable, frozen)
    return self.decode_latents(params, self.sample_latents(params, batch, rng))

  def decode_latents(self, params, z) -> jax.Array:
    """Scaled latents ``[n, t, h, w, c]`` -> uint8 videos ``[n, t, H, W, 3]`` (frozen VAE decoder)."""
    n = z.shape[0]
    frames = einops.rearrange(z, "b t h w c -> (b t) h w c") / self.vae_config.scaling_factor
    images = self.vae.apply({"params": params["vae"]}, frames.astype(self.dtype), method="decode")
    return einops.rearrange(vae_lib.to_uint8(images), "(b t) h w c -> b t h w c", b=n)

  def latent_shape(self) -> Tuple[int, int, int]:
    """``(h, w, c)`` of one frame's latents at the configured frame size."""
    f = self.vae_config.downsample_factor
    return (int(self.config.data.height) // f, int(self.config.data.width) // f, self.vae_config.latent_channels)

  def latent_decoder(self, trainable, frozen) -> Callable:
    """Jitted ``latents [b, n, h, w, c] -> uint8 [b, n, H, W, 3]`` with this stage's frozen VAE."""
    fn = jax.jit(self.decode_latents, compiler_options=aot.compiler_options(self.config, execution_bound=True))
    return functools.partial(fn, optim.merge(trainable, frozen))

  def pipeline_step(self, trainable, frozen) -> pipeline.Step:
    """Key frames: one window of this model (``config.sampling`` guidance and steps) for each video's
    conditioning."""
    # Fully optimised even in CPU smoke runs: one call runs the whole DDIM loop (at -O0 the runlocal chain's
    # 10-step first window took 16 s of its closing videos).
    fn = jax.jit(lambda p, f, b, r: self.sample_latents(optim.merge(p, f), b, r),
                 compiler_options=aot.compiler_options(self.config, execution_bound=True))
    return pipeline.FirstWindow(self.config.stage, functools.partial(fn, trainable, frozen),
                                self.latent_decoder(trainable, frozen), fps=float(self.config.data.fps))

  def sample_latents(self, params, batch, rng) -> jax.Array:
    """DDIM + classifier-free guidance: latents ``[n, t, h, w, c]`` for the first ``config.sampling.num_samples``
    conditions of ``batch`` (merged ``params``)."""
    sc = self.config.sampling
    n = int(sc.num_samples)
    batch = jax.tree.map(lambda x: x[:n], batch)
    cond = self.context(params, batch)
    uncond = self.context(params, self.null_condition(batch))
    if "latents" in batch:
      shape = batch["latents"].shape
    else:
      f = self.vae_config.downsample_factor
      _, nt, h, w, _ = batch["video"].shape
      shape = (n, nt, h // f, w // f, self.vae_config.latent_channels)
    noise_rng, ddim_rng = jax.random.split(rng)
    x_T = jax.random.normal(noise_rng, shape, jnp.float32)

    def model_fn(x, t, ctx):  # x [(k b), t, h, w, c] for k stacked conditions
      return self.denoise(params, x.astype(self.dtype), t, ctx, unet=self.sample_unet).astype(jnp.float32)

    def guided(x, t):
      return diffusion.guided_prediction(model_fn, x, t, cond, uncond, float(sc.guidance_scale))

    return diffusion.ddim_sample(guided, x_T, self.noise_schedule, int(sc.num_steps), eta=float(sc.eta),
                                 rng=ddim_rng if sc.eta else None)
