"""Stable Diffusion image U-Net (diffusers ``UNet2DConditionModel``) in Flax linen, channels-last.

One module family covers SD 1.x, SD 2.x and the SD x4 upscaler; the differences are config options. The module
tree mirrors diffusers exactly (``conv_in``, ``time_embedding/linear_1``, ``down_blocks_0/resnets_1/conv1``,
``mid_block/attentions_0``, ``up_blocks_2/upsamplers_0/conv``, ``conv_out``, ...), so a diffusers state dict maps
onto the params by name alone (see ``conversion/unet.py``).

The Video LDM model is this same module with ``UNetConfig.temporal`` set (sgm ``VideoUNet`` / diffusers
``UNetSpatioTemporalConditionModel``): every ``ResnetBlock2D`` is followed by a ``temporal_res`` 3D-conv block and
a ``temporal_mixer``, every ``Transformer2DModel`` runs a temporal transformer block after each spatial one. The
spatial param tree is unchanged (image weights load as they are) and every temporal param has ``temporal`` in its
path. Frames are folded into the batch ``[(b t), h, w, c]`` (or given as ``[b, t, h, w, c]``) with ``num_frames``
static; ``image_only_indicator`` ``[b, t]`` makes flagged frames bypass the temporal layers (alpha = 1).

With ``temporal.mask_conditioning`` (prediction / interpolation models) a ``temporal_cond`` encoder turns the
masked context frames ``concat(m * z0, m)`` into one feature map per level, added (zero-initialised projection)
inside every ``temporal_res`` block of that level; see ``models/temporal.py`` for the design.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from videoldm_jax.models import layers
from videoldm_jax.models import temporal as temporal_lib
from videoldm_jax.models.attention import Transformer2DModel

Dtype = Any

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
# Fields stored per resolution level; an int given for any of them is broadcast to every level.
_PER_LEVEL_FIELDS = ("layers_per_block", "transformer_layers_per_block", "num_attention_heads",
                     "only_cross_attention")


# ----------------------------------------------------------------------------------------------------------
# Config.

@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Hyper-parameters of the image U-Net, named as in diffusers' ``UNet2DConditionModel`` config.

  Per-level tuples index the resolution levels from high to low resolution (the down path); the up path uses
  them reversed, as diffusers does. ``num_attention_heads`` is the real number of heads per level (diffusers'
  historical ``attention_head_dim`` field holds the same numbers: SD 1.x 8 heads, SD 2.x (5, 10, 20, 20)).
  The mid block uses the last level's heads and never only-cross attention (as ``UNetMidBlock2DCrossAttn``).
  """
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
  down_block_types: Tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: Tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  # Per-level fields: an int / bool default is broadcast to a tuple over the levels in __post_init__.
  layers_per_block: Tuple[int, ...] = 2
  transformer_layers_per_block: Tuple[int, ...] = 1
  num_attention_heads: Tuple[int, ...] = 8
  cross_attention_dim: int = 768
  use_linear_projection: bool = False
  only_cross_attention: Tuple[bool, ...] = False  # attn1 attends to the context too (x4 upscaler)
  # diffusers' fp16 safeguard; kept for config round-trips only: attention logits / softmax are always fp32 here.
  upcast_attention: bool = False
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  time_embedding_dim: Optional[int] = None  # default 4 * block_out_channels[0]
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  dropout: float = 0.0
  num_class_embeds: Optional[int] = None  # class-label embedding table added to the time embedding
  addition_embed_dim: Optional[int] = None  # width of the optional ``added_cond`` vector (``add_embedding``)
  # If set, ``added_cond`` holds raw scalars (SVD: fps id, motion bucket, noise-augmentation level), each embedded
  # sinusoidally to this width (``add_time_proj``) and concatenated: addition_embed_dim = n_scalars * this.
  addition_time_embed_dim: Optional[int] = None
  temporal: Optional[temporal_lib.TemporalConfig] = None  # None: image model; else the video U-Net
  # Runtime options (no effect on parameters).
  # layers.IMPLEMENTATIONS: None / "xla" / "cudnn" (jax.nn.dot_product_attention), "splash" (TPU kernel for long
  # self-attention), "blockwise" (flash-style in plain JAX: no attention holds scores larger than one block).
  attention_implementation: Optional[str] = None
  # Rematerialisation of every ResnetBlock2D / Transformer2DModel (with its temporal layers) in the backward pass:
  # a REMAT_POLICIES name; bools are accepted (False = "none", True = "full").
  remat: Any = "none"

  def __post_init__(self):
    levels = len(self.block_out_channels)
    for name in ("block_out_channels", "down_block_types", "up_block_types") + _PER_LEVEL_FIELDS:
      value = getattr(self, name)
      value = tuple(value) if isinstance(value, (list, tuple)) else (value,) * levels
      object.__setattr__(self, name, value)
      if len(value) != levels:
        raise ValueError(f"UNetConfig.{name} has {len(value)} entries for {levels} levels: {value}")
    object.__setattr__(self, "only_cross_attention", tuple(bool(v) for v in self.only_cross_attention))
    for name in ("freq_shift", "norm_eps", "mid_block_scale_factor", "dropout"):  # JSON may give ints
      object.__setattr__(self, name, float(getattr(self, name)))
    for t in self.down_block_types:
      if t not in DOWN_BLOCK_TYPES:
        raise ValueError(f"UNetConfig.down_block_types: unsupported block type {t!r} (supported: {DOWN_BLOCK_TYPES})")
    for t in self.up_block_types:
      if t not in UP_BLOCK_TYPES:
        raise ValueError(f"UNetConfig.up_block_types: unsupported block type {t!r} (supported: {UP_BLOCK_TYPES})")
    for ch, heads in zip(self.block_out_channels, self.num_attention_heads):
      if ch % heads:
        raise ValueError(f"UNetConfig: {ch} channels not divisible by {heads} heads")
      if ch % self.norm_num_groups:
        raise ValueError(f"UNetConfig: {ch} channels not divisible by {self.norm_num_groups} norm groups")
    object.__setattr__(self, "remat", remat_name(self.remat))
    layers.check_implementation(self.attention_implementation, "UNetConfig.attention_implementation")
    if self.downsample_padding not in (0, 1):
      raise ValueError(f"UNetConfig.downsample_padding must be 0 or 1, got {self.downsample_padding}")
    if isinstance(self.temporal, dict):  # from JSON
      object.__setattr__(self, "temporal", temporal_lib.TemporalConfig(**self.temporal))
    if self.addition_time_embed_dim is not None and (
        self.addition_embed_dim is None or self.addition_embed_dim % self.addition_time_embed_dim):
      raise ValueError(f"UNetConfig.addition_embed_dim={self.addition_embed_dim} must be a multiple of "
                       f"addition_time_embed_dim={self.addition_time_embed_dim}")

  @property
  def num_levels(self) -> int:
    return len(self.block_out_channels)

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or 4 * self.block_out_channels[0]

  @property
  def head_dims(self) -> Tuple[int, ...]:
    return tuple(c // h for c, h in zip(self.block_out_channels, self.num_attention_heads))

  def to_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Dict[str, Any]) -> "UNetConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"UNetConfig: unknown fields {unknown}")
    return cls(**d)  # lists become tuples in __post_init__

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, s: str) -> "UNetConfig":
    return cls.from_dict(json.loads(s))


def sd15() -> UNetConfig:
  """SD 1.x (1.1-1.5): 320 channels, mult (1, 2, 4, 4), 8 heads, CLIP ViT-L/14 context 768, 1x1-conv proj."""
  return UNetConfig()


def sd21() -> UNetConfig:
  """SD 2.x (2.0 / 2.1, base and 768-v): 64-channel heads, OpenCLIP ViT-H context 1024, linear proj.

  The prediction type (eps for 512-base, v for 768-v) is a property of the diffusion wrapper, not of the U-Net.
  """
  return UNetConfig(num_attention_heads=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True)


def sd_x4_upscaler() -> UNetConfig:
  """stabilityai/stable-diffusion-x4-upscaler U-Net: 4 latent + 3 low-res RGB input channels, noise level as
  a class label (1000 classes), no attention at the first level, attn1 cross-attends at the first three."""
  return UNetConfig(
      in_channels=7, block_out_channels=(256, 512, 512, 1024),
      down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
      up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
      num_attention_heads=8, cross_attention_dim=1024, use_linear_projection=True,
      only_cross_attention=(True, True, True, False), num_class_embeds=1000)


def tiny(**overrides) -> UNetConfig:
  """SD 1.x-shaped test model (0.8M params): two levels, conv proj, context 32."""
  base = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, num_attention_heads=4,
              cross_attention_dim=32, norm_num_groups=8)
  return UNetConfig(**{**base, **overrides})


def tiny_sd2(**overrides) -> UNetConfig:
  """SD 2.x-shaped test model: 16-channel heads (2, 4), linear proj, three levels, context 48."""
  base = dict(block_out_channels=(32, 64, 64), down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2, layers_per_block=1,
              num_attention_heads=(2, 4, 4), cross_attention_dim=48, use_linear_projection=True, norm_num_groups=8)
  return UNetConfig(**{**base, **overrides})


def tiny_x4_upscaler(**overrides) -> UNetConfig:
  """x4-upscaler-shaped test model: 7 input channels, class labels, DownBlock2D first, only-cross attention."""
  base = dict(in_channels=7, block_out_channels=(32, 64, 64, 128),
              down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
              up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",), layers_per_block=1,
              num_attention_heads=8, cross_attention_dim=128, use_linear_projection=True,
              only_cross_attention=(True, True, True, False), num_class_embeds=1000, norm_num_groups=8)
  return UNetConfig(**{**base, **overrides})


def svd(**overrides) -> UNetConfig:
  """Stable Video Diffusion (SVD / SVD-XT) video U-Net: SD 2.x-shaped, 8 input channels (noisy latents + the first
  frame's latents), CLIP image-embedding context 1024, three added time ids (fps - 1, motion bucket, cond_aug) of
  256 sinusoidal features each, SVD's temporal layers (``TemporalConfig`` defaults). 1,524,623,082 params."""
  base = dict(in_channels=8, num_attention_heads=(5, 10, 20, 20), cross_attention_dim=1024,
              use_linear_projection=True, addition_embed_dim=768, addition_time_embed_dim=256,
              temporal=temporal_lib.TemporalConfig())
  return UNetConfig(**{**base, **overrides})


def tiny_svd(**overrides) -> UNetConfig:
  """SVD-shaped test model: two levels, 8 input channels, context 32, three added time ids of 8 features."""
  base = dict(in_channels=8, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, num_attention_heads=(2, 4),
              cross_attention_dim=32, use_linear_projection=True, norm_num_groups=32, addition_embed_dim=24,
              addition_time_embed_dim=8, temporal=temporal_lib.TemporalConfig())
  return UNetConfig(**{**base, **overrides})


# diffusers ``UNet2DConditionModel`` config entries that do not change the network we build.
_DIFFUSERS_IGNORED = frozenset({
    "_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "sample_size",
    "addition_embed_type_num_heads",  # only read for addition_embed_type="text"
    "mid_block_only_cross_attention",  # only read by UNetMidBlock2DSimpleCrossAttn
})
# Entries accepted only at these values (anything else is a network this implementation does not build).
_DIFFUSERS_FIXED: Dict[str, Tuple[Any, ...]] = {
    "center_input_sample": (False,), "act_fn": ("silu", "swish"), "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "dual_cross_attention": (False,), "reverse_transformer_layers_per_block": (None,), "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,), "class_embed_type": (None,), "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,), "resnet_time_scale_shift": ("default",), "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,), "time_embedding_type": ("positional",), "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,), "time_cond_proj_dim": (None,), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,), "attention_type": ("default",),
    "class_embeddings_concat": (False,), "cross_attention_norm": (None,), "num_attention_heads": (None,),
}
# diffusers' own defaults for entries a config.json leaves out.
_DIFFUSERS_DEFAULTS: Dict[str, Any] = dict(
    in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, only_cross_attention=False,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1.0,
    dropout=0.0, norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1280, transformer_layers_per_block=1,
    attention_head_dim=8, use_linear_projection=False, num_class_embeds=None, upcast_attention=False,
    time_embedding_dim=None)


def unet_config_from_diffusers(config: Dict[str, Any]) -> UNetConfig:
  """Builds a :class:`UNetConfig` from a diffusers ``UNet2DConditionModel`` config dict (``unet/config.json``).

  diffusers' ``attention_head_dim`` holds the number of heads (its historical naming); it becomes
  ``num_attention_heads``. Raises ``ValueError`` naming every entry whose value this implementation does not build.
  """
  config = dict(config)
  cls_name = config.get("_class_name", "UNet2DConditionModel")
  if cls_name != "UNet2DConditionModel":
    raise ValueError(f"unet config: _class_name={cls_name!r} is not supported (only UNet2DConditionModel)")
  problems = []
  unknown = sorted(set(config) - _DIFFUSERS_IGNORED - set(_DIFFUSERS_FIXED) - set(_DIFFUSERS_DEFAULTS))
  if unknown:
    problems.append(f"unknown entries {unknown}")
  for key, allowed in _DIFFUSERS_FIXED.items():
    if key in config and config[key] not in allowed:
      problems.append(f"{key}={config[key]!r} (supported: {' or '.join(repr(a) for a in allowed)})")
  d = {k: config.get(k, v) for k, v in _DIFFUSERS_DEFAULTS.items()}
  if d["norm_num_groups"] is None:
    problems.append("norm_num_groups=None (supported: an int)")
  cross = d["cross_attention_dim"]
  if isinstance(cross, (list, tuple)):
    if len(set(cross)) != 1:
      problems.append(f"cross_attention_dim={cross!r} (supported: one width for every level)")
    cross = cross[0]
  for key in ("transformer_layers_per_block", "attention_head_dim"):
    value = d[key]
    if isinstance(value, (list, tuple)) and any(not isinstance(v, int) for v in value):
      problems.append(f"{key}={value!r} (supported: an int or one int per level)")
  if problems:
    raise ValueError("unet config: unsupported " + "; ".join(problems))
  fields = dict(
      in_channels=d["in_channels"], out_channels=d["out_channels"], block_out_channels=d["block_out_channels"],
      down_block_types=d["down_block_types"], up_block_types=d["up_block_types"],
      layers_per_block=d["layers_per_block"], transformer_layers_per_block=d["transformer_layers_per_block"],
      num_attention_heads=d["attention_head_dim"], cross_attention_dim=cross,
      use_linear_projection=d["use_linear_projection"], only_cross_attention=d["only_cross_attention"],
      upcast_attention=d["upcast_attention"], norm_num_groups=d["norm_num_groups"], norm_eps=d["norm_eps"],
      flip_sin_to_cos=d["flip_sin_to_cos"], freq_shift=d["freq_shift"], time_embedding_dim=d["time_embedding_dim"],
      downsample_padding=d["downsample_padding"], mid_block_scale_factor=d["mid_block_scale_factor"],
      dropout=d["dropout"], num_class_embeds=d["num_class_embeds"])
  try:
    return UNetConfig(**fields)
  except ValueError as e:
    raise ValueError(f"unet config: {e}") from e


# ----------------------------------------------------------------------------------------------------------
# Building blocks.

def _constrain(x: jax.Array) -> jax.Array:
  """Shards activations over the batch at block boundaries (no-op without a mesh / logical rules)."""
  return nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))


def nearest_resize(x: jax.Array, size: Tuple[int, int]) -> jax.Array:
  """Nearest-neighbour resize of ``[b, h, w, c]`` to ``size``, index rule of PyTorch ``mode="nearest"``."""
  h, w = x.shape[1:3]
  if size == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  rows = np.floor(np.arange(size[0]) * (h / size[0])).astype(np.int32)
  cols = np.floor(np.arange(size[1]) * (w / size[1])).astype(np.int32)
  return x[:, rows][:, :, cols]


class ResnetBlock2D(nn.Module):
  """GN-SiLU-conv, + projected time embedding, GN-SiLU-dropout-conv, + (1x1-projected) input.

  With ``temporal`` (sgm ``VideoResBlock`` / diffusers ``SpatioTemporalResBlock``) the output then goes through
  ``temporal_res`` (3D-conv ResBlock over ``[b, t, h, w, c]``) blended by ``temporal_mixer``; the image model
  ignores ``num_frames`` / ``image_only_indicator``.
  """
  out_channels: int
  norm_num_groups: int = 32
  eps: float = 1e-5
  dropout: float = 0.0
  output_scale_factor: float = 1.0
  temporal: Optional[temporal_lib.TemporalConfig] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: Optional[jax.Array], num_frames: Optional[int] = None,
               image_only_indicator: Optional[jax.Array] = None, deterministic: bool = True,
               frame_cond: Optional[jax.Array] = None) -> jax.Array:
    """``x`` ``[b, h, w, c_in]``, ``temb`` ``[b, d]`` -> ``[b, h, w, out_channels]`` (video: b = videos * frames).

    ``frame_cond`` ``[b, h, w, c']``: ``temporal_cond`` features of this level (mask-conditioned models only).
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = dict(num_groups=self.norm_num_groups, epsilon=self.eps, **kw)
    h = nn.silu(layers.group_norm(name="norm1", **norm)(x))
    h = layers.conv(self.out_channels, name="conv1", **kw)(h)
    if temb is not None:
      h = h + layers.dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb))[:, None, None, :]
    h = nn.silu(layers.group_norm(name="norm2", **norm)(h))
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    h = layers.conv(self.out_channels, name="conv2", **kw)(h)
    if x.shape[-1] != self.out_channels:
      x = layers.conv(self.out_channels, (1, 1), name="conv_shortcut", **kw)(x)
    out = x + h
    out = out if self.output_scale_factor == 1.0 else out / self.output_scale_factor
    tc = self.temporal
    if tc is not None and tc.conv_blocks:
      if num_frames is None:
        raise ValueError("the video ResnetBlock2D needs num_frames")
      video = einops.rearrange(out, "(b t) h w c -> b t h w c", t=num_frames)
      frame_temb = None if temb is None else einops.rearrange(temb, "(b t) e -> b t e", t=num_frames)
      cond = None if frame_cond is None else einops.rearrange(frame_cond, "(b t) h w c -> b t h w c", t=num_frames)
      mixed = temporal_lib.TemporalResBlock(
          self.out_channels, tc.kernel_size, eps=self.eps if tc.eps is None else tc.eps,
          num_groups=self.norm_num_groups, dropout=tc.dropout, zero_init=tc.zero_init, frame_norm=tc.frame_norm,
          lora_rank=tc.lora_rank if tc.lora_convs else 0, lora_alpha=tc.lora_alpha, name="temporal_res", **kw)(
              video, frame_temb, cond=cond, deterministic=deterministic)
      video = temporal_lib.AlphaBlender(tc.merge_strategy, tc.merge_factor, tc.switch_spatial_to_temporal_mix,
                                        name="temporal_mixer", param_dtype=self.param_dtype)(
                                            video, mixed, image_only_indicator)
      out = _constrain(einops.rearrange(video, "b t h w c -> (b t) h w c"))
    return out


class Downsample2D(nn.Module):
  """Stride-2 3x3 conv (``downsamplers_0/conv``). ``padding`` 1: symmetric; 0: pad right/bottom by one."""
  channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pad = [(1, 1), (1, 1)] if self.padding == 1 else [(0, 1), (0, 1)]
    return layers.conv(self.channels, strides=(2, 2), padding=pad, name="conv", dtype=self.dtype,
                       param_dtype=self.param_dtype)(x)


class Upsample2D(nn.Module):
  """Nearest 2x (or to ``size``) then 3x3 conv (``upsamplers_0/conv``)."""
  channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, size: Optional[Tuple[int, int]] = None) -> jax.Array:
    x = nearest_resize(x, size or (2 * x.shape[1], 2 * x.shape[2]))
    return layers.conv(self.channels, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)


# ---------------------------------------------------------------------------------------------------------------
# Rematerialisation policies (per block).
# ---------------------------------------------------------------------------------------------------------------

def _save_dots_and_convs(prim, *_, **__) -> bool:
  """``jax.checkpoint`` policy: keep matmul and convolution outputs, recompute everything between them."""
  return prim.name in ("dot_general", "conv_general_dilated")


# name -> jax.checkpoint policy (None: save nothing, recompute the whole block)
REMAT_POLICIES = {
    "none": None,                  # no remat: every activation of the block kept for the backward pass
    "full": None,                  # jax.checkpoint_policies.nothing_saveable: the block's forward runs twice
    "dots": _save_dots_and_convs,  # norms / SiLU / softmax / residual adds recomputed, matmuls and convs saved
}


def remat_name(value) -> str:
  """``UNetConfig.remat`` value -> a ``REMAT_POLICIES`` name (bools: False -> "none", True -> "full")."""
  if isinstance(value, bool):
    return "full" if value else "none"
  if value not in REMAT_POLICIES:
    raise ValueError(f"UNetConfig.remat={value!r}: expected one of {sorted(REMAT_POLICIES)} (or a bool)")
  return value


def _rematted(cls, config: UNetConfig, static_argnums: Tuple[int, ...]):
  if config.remat == "none":
    return cls
  return nn.remat(cls, static_argnums=static_argnums, policy=REMAT_POLICIES[config.remat])


def _resnet_cls(config: UNetConfig):
  # Positional call (x, temb, num_frames, image_only_indicator, deterministic, frame_cond); indices count ``self``
  # as 0.
  return _rematted(ResnetBlock2D, config, (3, 5))


def _transformer_cls(config: UNetConfig):
  # Positional call (x, context, num_frames, image_only_indicator, temporal_context).
  return _rematted(Transformer2DModel, config, (3,))


def _resnet(config: UNetConfig, out_channels: int, name: str, dtype, param_dtype, scale: float = 1.0):
  return _resnet_cls(config)(out_channels, norm_num_groups=config.norm_num_groups, eps=config.norm_eps,
                             dropout=config.dropout, output_scale_factor=scale, temporal=config.temporal,
                             dtype=dtype, param_dtype=param_dtype, name=name)


def _transformer(config: UNetConfig, channels: int, heads: int, depth: int, only_cross: bool, name: str,
                 dtype, param_dtype):
  return _transformer_cls(config)(
      heads=heads, head_dim=channels // heads, num_layers=depth, cross_attention_dim=config.cross_attention_dim,
      use_linear_projection=config.use_linear_projection, only_cross_attention=only_cross,
      attention_implementation=config.attention_implementation, norm_num_groups=config.norm_num_groups,
      temporal=config.temporal, dtype=dtype, param_dtype=param_dtype, name=name)


class UNetDownBlock(nn.Module):
  """Down level ``level``: ``layers_per_block`` x (ResnetBlock2D [+ Transformer2DModel]) [+ Downsample2D].

  ``CrossAttnDownBlock2D`` and ``DownBlock2D`` are this module with and without attention. Returns the output
  and the skip activations (one per layer, plus the downsampled output).
  """
  config: UNetConfig
  level: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, context=None, num_frames=None, image_only_indicator=None, deterministic=True,
               temporal_context=None, frame_cond=None):
    cfg, i = self.config, self.level
    frame_cond = None if frame_cond is None else frame_cond[i]
    channels = cfg.block_out_channels[i]
    has_attention = cfg.down_block_types[i] == "CrossAttnDownBlock2D"
    skips: List[jax.Array] = []
    for j in range(cfg.layers_per_block[i]):
      x = _resnet(cfg, channels, f"resnets_{j}", self.dtype, self.param_dtype)(
          x, temb, num_frames, image_only_indicator, deterministic, frame_cond)
      if has_attention:
        x = _transformer(cfg, channels, cfg.num_attention_heads[i], cfg.transformer_layers_per_block[i],
                         cfg.only_cross_attention[i], f"attentions_{j}", self.dtype, self.param_dtype)(
                             x, context, num_frames, image_only_indicator, temporal_context)
      skips.append(x)
    if i < cfg.num_levels - 1:
      x = Downsample2D(channels, cfg.downsample_padding, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="downsamplers_0")(x)
      skips.append(x)
    return _constrain(x), skips


class UNetMidBlock(nn.Module):
  """``UNetMidBlock2DCrossAttn``: resnets_0 -> attentions_0 -> resnets_1 at the lowest resolution."""
  config: UNetConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, context=None, num_frames=None, image_only_indicator=None, deterministic=True,
               temporal_context=None, frame_cond=None):
    cfg = self.config
    frame_cond = None if frame_cond is None else frame_cond[-1]
    channels = cfg.block_out_channels[-1]
    scale = cfg.mid_block_scale_factor
    x = _resnet(cfg, channels, "resnets_0", self.dtype, self.param_dtype, scale)(
        x, temb, num_frames, image_only_indicator, deterministic, frame_cond)
    x = _transformer(cfg, channels, cfg.num_attention_heads[-1], cfg.transformer_layers_per_block[-1],
                     False, "attentions_0", self.dtype, self.param_dtype)(
                         x, context, num_frames, image_only_indicator, temporal_context)
    x = _resnet(cfg, channels, "resnets_1", self.dtype, self.param_dtype, scale)(
        x, temb, num_frames, image_only_indicator, deterministic, frame_cond)
    return _constrain(x)


class UNetUpBlock(nn.Module):
  """Up block ``index`` (0 = lowest resolution): ``layers + 1`` x (concat skip, ResnetBlock2D
  [+ Transformer2DModel]) [+ Upsample2D]. ``CrossAttnUpBlock2D`` / ``UpBlock2D`` with / without attention.

  ``skips`` are consumed from the end; ``upsample_size`` is the spatial size of the next level's skips.
  """
  config: UNetConfig
  index: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, skips: Sequence[jax.Array], temb, context=None, upsample_size=None, num_frames=None,
               image_only_indicator=None, deterministic=True, temporal_context=None, frame_cond=None):
    cfg, i = self.config, self.index
    level = cfg.num_levels - 1 - i  # the matching down level
    frame_cond = None if frame_cond is None else frame_cond[level]
    channels = cfg.block_out_channels[level]
    has_attention = cfg.up_block_types[i] == "CrossAttnUpBlock2D"
    skips = list(skips)
    for j in range(cfg.layers_per_block[level] + 1):
      x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = _resnet(cfg, channels, f"resnets_{j}", self.dtype, self.param_dtype)(
          x, temb, num_frames, image_only_indicator, deterministic, frame_cond)
      if has_attention:
        x = _transformer(cfg, channels, cfg.num_attention_heads[level], cfg.transformer_layers_per_block[level],
                         cfg.only_cross_attention[level], f"attentions_{j}", self.dtype, self.param_dtype)(
                             x, context, num_frames, image_only_indicator, temporal_context)
    if i < cfg.num_levels - 1:
      x = Upsample2D(channels, dtype=self.dtype, param_dtype=self.param_dtype, name="upsamplers_0")(x, upsample_size)
    return _constrain(x)


# ----------------------------------------------------------------------------------------------------------
# The U-Net.

def _per_frame(a: jax.Array, n: int, num_frames: Optional[int], what: str) -> jax.Array:
  """Leading dim ``n`` (one per frame) as is; one per video (``n / num_frames``) repeated over its frames."""
  if a.shape[0] == n:
    return a
  if num_frames and a.shape[0] * num_frames == n:
    return jnp.repeat(a, num_frames, axis=0)
  raise ValueError(f"{what}: leading dim {a.shape[0]} is neither the number of frames {n} nor of videos "
                   f"{n // (num_frames or 1)}")


class UNet(nn.Module):
  """Conditional image / video U-Net: ``[b, h, w, in_channels]`` -> ``[b, h, w, out_channels]`` (eps / v / x0).

  With ``config.temporal``: ``[b, t, h, w, c]`` -> ``[b, t, h, w, c]``, or frames folded into the batch
  ``[(b t), h, w, c]`` with ``num_frames=t``.
  """
  config: UNetConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: Optional[jax.Array] = None,
               *, class_labels: Optional[jax.Array] = None, added_cond: Optional[jax.Array] = None,
               num_frames: Optional[int] = None, image_only_indicator: Optional[jax.Array] = None,
               temporal_context: Optional[jax.Array] = None, cond_latents: Optional[jax.Array] = None,
               cond_mask: Optional[jax.Array] = None, cond_noise_level: Optional[jax.Array] = None,
               cond_regime: Optional[jax.Array] = None, deterministic: bool = True) -> jax.Array:
    """Denoiser forward pass.

    Args:
      sample: ``[b, h, w, in_channels]`` noisy latents (any h, w; non-multiples of 2**levels are handled
        like diffusers, by upsampling to the skip sizes).
      timesteps: ``[b]``, ``[1]`` or scalar diffusion timesteps (may be fractional).
      encoder_hidden_states: ``[b, n, cross_attention_dim]`` text tokens.
      class_labels: ``[b]`` int labels when ``config.num_class_embeds`` (x4 upscaler: noise level).
      added_cond: ``[b, addition_embed_dim]`` extra vector added (after ``add_embedding``) to the time
        embedding; only with ``config.addition_embed_dim`` (with ``addition_time_embed_dim``: ``[b, n_scalars]``).
      num_frames: video clip length t (static); implied by a 5D ``sample``. Video inputs: ``b`` above counts
        frames, and per-video ``timesteps`` / ``encoder_hidden_states`` / ``class_labels`` / ``added_cond``
        (leading dim ``b / t``) are repeated over the frames; per-frame values are used as they are.
      image_only_indicator: ``[b / t, t]``; true frames skip the temporal layers (alpha = 1). None = all video.
      temporal_context: ``[b / t, m, d]`` context of the temporal cross-attention (None: with
        ``config.temporal.use_spatial_context`` the first frame's ``encoder_hidden_states``).
      cond_latents: ``[b / t, t, h, w, out_channels]`` (or frame-folded ``[b, h, w, out_channels]``) latents of
        the context frames (``temporal.mask_conditioning`` only; None = zeros). Unknown frames' values never
        matter: they are multiplied by the mask.
      cond_mask: ``[b / t, t]`` 1 on known (context) frames (None = all zero: the unconditional model).
      cond_noise_level: ``[b / t]`` (or per frame) conditioning-augmentation level of the known frames (None = 0).
      cond_regime: ``[b / t]`` int regime label (``temporal.num_regimes`` > 0; None = 0).
      deterministic: disables dropout.
    Returns:
      ``[b, h, w, out_channels]`` (``[b, t, h, w, out_channels]`` for a 5D ``sample``) in ``dtype``.
    """
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    video_input = sample.ndim == 5
    if video_input:
      if cfg.temporal is None:
        raise ValueError("a [b, t, h, w, c] sample needs the video U-Net (config.temporal)")
      if num_frames not in (None, sample.shape[1]):
        raise ValueError(f"num_frames={num_frames} but the sample has {sample.shape[1]} frames")
      num_frames = sample.shape[1]
      sample = einops.rearrange(sample, "b t h w c -> (b t) h w c")
    if cfg.temporal is not None:
      if num_frames is None:
        raise ValueError("the video U-Net needs num_frames (or a [b, t, h, w, c] sample)")
      if sample.shape[0] % num_frames:
        raise ValueError(f"batch {sample.shape[0]} is not a multiple of num_frames={num_frames}")
    else:
      num_frames = None  # the image model treats every sample as one image
    b = sample.shape[0]
    sample = sample.astype(self.dtype)
    if encoder_hidden_states is not None:
      encoder_hidden_states = _per_frame(encoder_hidden_states.astype(self.dtype), b, num_frames,
                                         "encoder_hidden_states")
    if class_labels is not None:
      class_labels = _per_frame(jnp.asarray(class_labels).reshape(-1), b, num_frames, "class_labels")
    if added_cond is not None:
      added_cond = _per_frame(added_cond, b, num_frames, "added_cond")

    # Time (+ class / added) embedding.
    t = jnp.asarray(timesteps, jnp.float32).reshape(-1)
    t = jnp.broadcast_to(t, (b,)) if t.shape[0] == 1 else _per_frame(t, b, num_frames, "timesteps")
    t_emb = layers.sinusoidal_embedding(t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                        downscale_freq_shift=cfg.freq_shift).astype(self.dtype)
    emb = layers.TimestepEmbedding(cfg.time_embed_dim, name="time_embedding", **kw)(t_emb)
    if cfg.num_class_embeds is not None:
      if class_labels is None:
        raise ValueError("this U-Net has a class embedding (num_class_embeds): pass class_labels")
      table = nn.Embed(cfg.num_class_embeds, cfg.time_embed_dim, name="class_embedding",
                       embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
                       **kw)
      emb = emb + table(jnp.asarray(class_labels, jnp.int32).reshape(-1))
    elif class_labels is not None:
      raise ValueError("class_labels given, but the config has no num_class_embeds")
    if cfg.addition_embed_dim is not None:
      if added_cond is None:
        raise ValueError("this U-Net has an add_embedding (addition_embed_dim): pass added_cond")
      if cfg.addition_time_embed_dim is not None:  # SVD's add_time_proj: each scalar -> cos|sin features
        added_cond = layers.sinusoidal_embedding(added_cond.reshape(-1), cfg.addition_time_embed_dim).reshape(b, -1)
      emb = emb + layers.TimestepEmbedding(cfg.time_embed_dim, name="add_embedding", **kw)(
          added_cond.astype(self.dtype))
    elif added_cond is not None:
      raise ValueError("added_cond given, but the config has no addition_embed_dim")

    frame_cond = self._frame_cond(sample, num_frames, cond_latents, cond_mask, cond_noise_level, cond_regime)
    block_kw = dict(num_frames=num_frames, image_only_indicator=image_only_indicator, deterministic=deterministic,
                    temporal_context=temporal_context, frame_cond=frame_cond)
    x = _constrain(layers.conv(cfg.block_out_channels[0], name="conv_in", **kw)(sample))
    skips = [x]
    for i in range(cfg.num_levels):
      x, res = UNetDownBlock(cfg, i, name=f"down_blocks_{i}", **kw)(x, emb, encoder_hidden_states, **block_kw)
      skips.extend(res)
    x = UNetMidBlock(cfg, name="mid_block", **kw)(x, emb, encoder_hidden_states, **block_kw)
    for i in range(cfg.num_levels):
      n = cfg.layers_per_block[cfg.num_levels - 1 - i] + 1
      res, skips = skips[-n:], skips[:-n]
      size = tuple(skips[-1].shape[1:3]) if skips else None
      x = UNetUpBlock(cfg, i, name=f"up_blocks_{i}", **kw)(x, res, emb, encoder_hidden_states, size, **block_kw)

    x = nn.silu(layers.group_norm(num_groups=cfg.norm_num_groups, epsilon=cfg.norm_eps, name="conv_norm_out",
                                  **kw)(x))
    x = layers.conv(cfg.out_channels, name="conv_out", **kw)(x)
    return einops.rearrange(x, "(b t) h w c -> b t h w c", t=num_frames) if video_input else x

  def _frame_cond(self, sample, num_frames, latents, mask, noise_level, regime) -> Optional[List[jax.Array]]:
    """``temporal_cond`` features per level (None for models without mask conditioning)."""
    cfg = self.config
    tc = cfg.temporal
    if tc is None or not tc.mask_conditioning:
      if any(v is not None for v in (latents, mask, noise_level, regime)):
        raise ValueError("cond_latents / cond_mask / cond_noise_level / cond_regime need temporal.mask_conditioning")
      return None
    n, h, w = sample.shape[:3]
    c = cfg.out_channels
    mask = jnp.zeros((n // num_frames, num_frames), jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    mask = mask.reshape(n, 1, 1, 1)
    if latents is None:
      latents = jnp.zeros((n, h, w, c), self.dtype)
    latents = latents.reshape(n, h, w, c).astype(self.dtype)
    # m * z0: unknown frames (m = 0) contribute exact zeros, whatever their latents hold.
    cond = jnp.concatenate([mask.astype(self.dtype) * latents, jnp.broadcast_to(mask, (n, h, w, 1)).astype(
        self.dtype)], axis=-1)
    level = jnp.zeros((n,), jnp.float32) if noise_level is None else _per_frame(
        jnp.asarray(noise_level, jnp.float32).reshape(-1), n, num_frames, "cond_noise_level")
    if tc.num_regimes:
      regime = jnp.zeros((n,), jnp.int32) if regime is None else _per_frame(
          jnp.asarray(regime, jnp.int32).reshape(-1), n, num_frames, "cond_regime")
    elif regime is not None:
      raise ValueError("cond_regime given, but temporal.num_regimes is 0")
    return temporal_lib.TemporalConditionEncoder(
        cfg.block_out_channels, cfg.time_embed_dim, tc.num_regimes, cfg.downsample_padding, dtype=self.dtype,
        param_dtype=self.param_dtype, name="temporal_cond")(cond, level, regime)


def dummy_inputs(config: UNetConfig, batch: int = 1, size: int = 8, tokens: int = 2) -> Dict[str, Any]:
  """Minimal inputs (as ``UNet.__call__`` kwargs) for ``init`` / ``eval_shape``; params do not depend on them."""
  inputs: Dict[str, Any] = dict(
      sample=jnp.zeros((batch, size, size, config.in_channels), jnp.float32),
      timesteps=jnp.zeros((batch,), jnp.float32),
      encoder_hidden_states=jnp.zeros((batch, tokens, config.cross_attention_dim), jnp.float32))
  if config.num_class_embeds is not None:
    inputs["class_labels"] = jnp.zeros((batch,), jnp.int32)
  if config.addition_embed_dim is not None:
    width = config.addition_embed_dim // (config.addition_time_embed_dim or 1)
    inputs["added_cond"] = jnp.zeros((batch, width), jnp.float32)
  tc = config.temporal
  if tc is not None:  # the batch is one clip of ``batch`` frames
    inputs["num_frames"] = batch
    if tc.cross_attention and not tc.use_spatial_context:
      inputs["temporal_context"] = jnp.zeros((1, tokens, tc.context_dim or config.cross_attention_dim), jnp.float32)
  return inputs


def abstract_params(config: UNetConfig, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
  """Param tree of shapes (logical ``Partitioned`` boxes kept), without allocating anything."""
  model = UNet(config, dtype=dtype, param_dtype=param_dtype)
  return jax.eval_shape(lambda rng: model.init(rng, **dummy_inputs(config)), jax.random.PRNGKey(0))["params"]


def count_params(tree) -> int:
  return int(sum(np.prod(getattr(x, "value", x).shape) for x in jax.tree_util.tree_leaves(
      tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))))
