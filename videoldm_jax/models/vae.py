"""The Stable Diffusion KL autoencoder (diffusers ``AutoencoderKL``) in linen, channels-last.

Module names follow the diffusers attribute tree, so ``encoder/down_blocks_0/resnets_1/conv1/kernel`` is
``encoder.down_blocks.0.resnets.1.conv1.weight``:

```
encoder/ conv_in, down_blocks_i/{resnets_j, downsamplers_0/conv}, mid_block/{resnets_0, attentions_0, resnets_1},
         conv_norm_out, conv_out
quant_conv, post_quant_conv
decoder/ conv_in, mid_block, up_blocks_i/{resnets_j, upsamplers_0/conv}, conv_norm_out, conv_out
```

``encode`` returns the posterior moments (mean | logvar on the channel axis, ``quant_conv`` applied); wrap them in
:class:`DiagonalGaussian` to sample. Latents fed to a diffusion model are ``z * config.scaling_factor`` and are
divided by it again before ``decode`` (the SD and x4-upscaler pipelines both do this).

Video decoder (``VAEConfig.temporal_decoder``, the paper's Sec. 3.3; the structure of diffusers
``AutoencoderKLTemporalDecoder`` / sgm ``VideoDecoder`` with ``time_mode="conv-only"``): after every spatial ResNet
block of the decoder's mid and up blocks, a temporal 3D-conv ResBlock (``temporal_res``, kernel (k, 1, 1)) merged
by a learned ``temporal_mixer`` as ``alpha * temporal + (1 - alpha) * spatial`` (alpha = sigmoid(mix_factor), 0.5
at init), and a temporal conv after ``conv_out`` (``temporal_conv_out``; diffusers ``time_conv_out``). The encoder
is unchanged, so the latent space of every other stage is too. Inputs are frame-major ``[b*t, h, w, c]`` and
``decode`` needs the clip length ``num_frames``. Fresh temporal layers leave the image decoder's output unchanged:
the ResBlocks' last convs start at zero and ``temporal_conv_out`` starts as the identity in time.

With ``temporal_norm="frame"`` the temporal GroupNorms use per-frame statistics, so output frame i depends only on
latent frames within :func:`temporal_receptive_field` of i and long videos decode exactly in windows
(:func:`decode_windows`). ``"clip"`` normalises over the clip like the references (needed for SVD's weights); each
window's statistics then depend on the window.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from videoldm_jax.models.layers import conv, dense, dot_product_attention, group_norm
from videoldm_jax.models.temporal import TemporalConfig
# The U-Net's blocks have the same structure and names as diffusers' (ResnetBlock2D without time embedding).
from videoldm_jax.models.unet import Downsample2D, ResnetBlock2D, Upsample2D

Dtype = Any

# diffusers hard-codes these for every AutoencoderKL block (and CompVis' ``Normalize`` uses the same).
NORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)


# ----------------------------------------------------------------------------------------------------------
# Config.

@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Hyper-parameters of the KL autoencoder (diffusers ``AutoencoderKL`` with Down/UpDecoderBlock2D blocks)."""
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2  # encoder resnets per level; the decoder has one more
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215  # z_diffusion = z * scaling_factor
  use_post_quant_conv: bool = True  # SVD's video VAE has none
  temporal_decoder: bool = False  # video decoder (module docstring)
  temporal_kernel: int = 3  # time extent of the video decoder's 3D convs
  temporal_norm: str = "frame"  # "frame" | "clip": statistics of the video decoder's temporal GroupNorms

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    if not self.block_out_channels:
      raise ValueError("VAEConfig.block_out_channels must not be empty")
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(f"VAEConfig: channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}")
    if self.temporal_norm not in ("frame", "clip"):
      raise ValueError(f"VAEConfig.temporal_norm={self.temporal_norm!r}: expected 'frame' or 'clip'")
    if self.temporal_kernel < 1 or self.temporal_kernel % 2 != 1:
      raise ValueError(f"VAEConfig.temporal_kernel={self.temporal_kernel} must be odd and >= 1")

  def temporal(self) -> Optional[TemporalConfig]:
    """The temporal layers of the video decoder's ResNet blocks (None: image decoder)."""
    if not self.temporal_decoder:
      return None
    return TemporalConfig(merge_strategy="learned", merge_factor=0.0, cross_attention=False,
                          kernel_size=(self.temporal_kernel, 1, 1), eps=1e-5, switch_spatial_to_temporal_mix=True,
                          frame_norm=self.temporal_norm == "frame")

  @property
  def num_temporal_convs(self) -> int:
    """3D convs in time along the video decoder's path: two per temporal ResBlock (mid block: 2 blocks, each up
    block: ``layers_per_block + 1``) and ``temporal_conv_out``."""
    return 2 * (2 + len(self.block_out_channels) * (self.layers_per_block + 1)) + 1 if self.temporal_decoder else 0
  @property
  def downsample_factor(self) -> int:
    """Spatial reduction f: an image ``[h, w]`` encodes to ``[h / f, w / f]``."""
    return 2 ** (len(self.block_out_channels) - 1)

  # JSON round trip.
  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict())

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "VAEConfig":
    return cls(**d)  # __post_init__ restores tuples

  @classmethod
  def from_json(cls, s: str) -> "VAEConfig":
    return cls.from_dict(json.loads(s))

  # Presets.
  @classmethod
  def sd(cls) -> "VAEConfig":
    """SD 1.x / 2.x VAE (also the Video LDM autoencoder): f=8, 83.65M params."""
    return cls()

  @classmethod
  def sd_x4_upscaler(cls) -> "VAEConfig":
    """VAE of stabilityai/stable-diffusion-x4-upscaler: f=4, 55.3M params, latents scaled by 0.08333."""
    return cls(block_out_channels=(128, 256, 512), scaling_factor=0.08333)

  @classmethod
  def tiny(cls) -> "VAEConfig":
    """CPU-test size with the SD structure (f=8, channel changes in encoder and decoder)."""
    return cls(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)

  @classmethod
  def svd(cls) -> "VAEConfig":
    """Stable Video Diffusion's VAE (diffusers ``AutoencoderKLTemporalDecoder``): the SD encoder, a video decoder
    normalising over the clip, no ``post_quant_conv``; 97.7M params."""
    return cls(use_post_quant_conv=False, temporal_decoder=True, temporal_norm="clip")


def temporal_receptive_field(config: VAEConfig) -> Optional[int]:
  """Frames on each side of a frame that its decoded output depends on (0: image decoder; None: unbounded, the
  ``"clip"`` norm)."""
  if not config.temporal_decoder:
    return 0
  if config.temporal_norm == "clip":
    return None
  return config.num_temporal_convs * (config.temporal_kernel // 2)


# diffusers config entries that do not change the computation of encode / decode.
_DIFFUSERS_IGNORED = frozenset({"sample_size", "force_upcast", "_class_name", "_diffusers_version", "_name_or_path",
                                "_use_default_values"})
# diffusers entries we accept only at their SD value (anything else changes the network or the latent scaling).
_DIFFUSERS_FIXED = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True,
                    "mid_block_add_attention": True, "shift_factor": None, "latents_mean": None, "latents_std": None}
TEMPORAL_DECODER_CLASS = "AutoencoderKLTemporalDecoder"


def vae_config_from_diffusers(config: Mapping[str, Any]) -> VAEConfig:
  """Builds a :class:`VAEConfig` from a diffusers ``AutoencoderKL`` config dict (``vae/config.json``).

  ``AutoencoderKLTemporalDecoder`` (SVD's VAE) gives the video decoder with clip statistics and no
  ``post_quant_conv``. Raises ``ValueError`` naming the entry for anything this implementation does not reproduce.
  """
  config = dict(config)
  cls_name = config.get("_class_name", "AutoencoderKL")
  if cls_name == TEMPORAL_DECODER_CLASS:
    return _temporal_vae_config_from_diffusers(config)
  if cls_name != "AutoencoderKL":
    raise ValueError(f"vae config: _class_name={cls_name!r} is not supported (AutoencoderKL, "
                     f"{TEMPORAL_DECODER_CLASS})")
  for key, want in _DIFFUSERS_FIXED.items():
    if key in config and config[key] != want:
      raise ValueError(f"vae config: {key}={config[key]!r} is not supported (only {want!r})")
  block_out = tuple(config.get("block_out_channels", (64,)))
  for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
    types = tuple(config.get(key, (want,)))
    if any(t != want for t in types) or len(types) != len(block_out):
      raise ValueError(f"vae config: {key}={types!r} is not supported (need {len(block_out)} x {want!r})")
  fields = {f.name for f in dataclasses.fields(VAEConfig)}
  unknown = sorted(set(config) - fields - _DIFFUSERS_IGNORED - set(_DIFFUSERS_FIXED)
                   - {"down_block_types", "up_block_types"})
  if unknown:
    raise ValueError(f"vae config: unsupported entries {unknown}")
  # diffusers' own defaults where the dict leaves an entry out.
  defaults = dict(block_out_channels=(64,), layers_per_block=1, in_channels=3, out_channels=3, latent_channels=4,
                  norm_num_groups=32, scaling_factor=0.18215)
  return VAEConfig(**{k: config.get(k, v) for k, v in defaults.items()})


def _temporal_vae_config_from_diffusers(config: Mapping[str, Any]) -> VAEConfig:
  block_out = tuple(config.get("block_out_channels", (64,)))
  types = tuple(config.get("down_block_types", ("DownEncoderBlock2D",)))
  if any(t != "DownEncoderBlock2D" for t in types) or len(types) != len(block_out):
    raise ValueError(f"vae config: down_block_types={types!r} is not supported (need {len(block_out)} x "
                     "'DownEncoderBlock2D')")
  layers = int(config.get("layers_per_block", 1))
  if layers != 2:
    # diffusers' MidBlockTemporalDecoder has layers_per_block resnets around ONE attention; only 2 is the SD
    # structure (resnet, attention, resnet) that every released checkpoint uses.
    raise ValueError(f"vae config: layers_per_block={layers} is not supported for {TEMPORAL_DECODER_CLASS} (only 2)")
  allowed = {"in_channels", "out_channels", "down_block_types", "block_out_channels", "layers_per_block",
             "latent_channels", "scaling_factor"} | _DIFFUSERS_IGNORED
  unknown = sorted(set(config) - allowed)
  if unknown:
    raise ValueError(f"vae config: unsupported entries {unknown}")
  # TemporalDecoder hard-codes 32 groups in its norms; its encoder uses diffusers' default of 32 too.
  return VAEConfig(in_channels=config.get("in_channels", 3), out_channels=config.get("out_channels", 3),
                   block_out_channels=block_out, layers_per_block=layers,
                   latent_channels=config.get("latent_channels", 4), norm_num_groups=32,
                   scaling_factor=config.get("scaling_factor", 0.18215), use_post_quant_conv=False,
                   temporal_decoder=True, temporal_norm="clip")


def vae_config_to_diffusers(config: VAEConfig) -> Dict[str, Any]:
  """The diffusers ``config.json`` of a :class:`VAEConfig` (``AutoencoderKL``, or
  ``AutoencoderKLTemporalDecoder`` for a video decoder with clip statistics and no ``post_quant_conv``)."""
  levels = len(config.block_out_channels)
  common = dict(in_channels=config.in_channels, out_channels=config.out_channels,
                down_block_types=["DownEncoderBlock2D"] * levels, block_out_channels=list(config.block_out_channels),
                layers_per_block=config.layers_per_block, latent_channels=config.latent_channels,
                scaling_factor=config.scaling_factor)
  if not config.temporal_decoder:
    return dict(common, _class_name="AutoencoderKL", up_block_types=["UpDecoderBlock2D"] * levels,
                norm_num_groups=config.norm_num_groups)
  if (config.use_post_quant_conv or config.temporal_norm != "clip" or config.norm_num_groups != 32
      or config.temporal_kernel != 3 or config.layers_per_block != 2):
    raise ValueError(f"VAEConfig {config}: only the SVD structure (clip norm, 32 groups, kernel 3, 2 layers per "
                     f"block, no post_quant_conv) has a diffusers class ({TEMPORAL_DECODER_CLASS})")
  return dict(common, _class_name=TEMPORAL_DECODER_CLASS)


# ----------------------------------------------------------------------------------------------------------
# Posterior.


def to_uint8(images: jax.Array) -> jax.Array:
  """Decoder output in [-1, 1] -> uint8 [0, 255], rounded to the nearest level (the one conversion used for
  previews, samples and evaluation, so every path gives the same pixels)."""
  return jnp.clip(jnp.round((images.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

@flax.struct.dataclass
class DiagonalGaussian:
  """Diagonal Gaussian posterior from encoder moments ``[..., 2 * latent]`` (mean | logvar), computed in fp32.

  ``logvar`` is clipped to [-30, 20] like diffusers / CompVis. It is a pytree, so it can cross ``jit``.
  """
  moments: jax.Array

  @property
  def mean(self) -> jax.Array:
    return jnp.split(self.moments.astype(jnp.float32), 2, axis=-1)[0]

  @property
  def logvar(self) -> jax.Array:
    return jnp.clip(jnp.split(self.moments.astype(jnp.float32), 2, axis=-1)[1], *LOGVAR_RANGE)

  @property
  def var(self) -> jax.Array:
    return jnp.exp(self.logvar)

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  def sample(self, rng: jax.Array) -> jax.Array:
    """``mean + std * eps``, eps ~ N(0, 1); ``[..., latent]`` fp32."""
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, jnp.float32)

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self, other: Optional["DiagonalGaussian"] = None) -> jax.Array:
    """KL(self || other) (other defaults to N(0, I)), summed over all but the batch axis: ``[b]``."""
    if other is None:
      terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
    else:
      terms = (jnp.square(self.mean - other.mean) / other.var + self.var / other.var - 1.0 - self.logvar
               + other.logvar)
    return 0.5 * jnp.sum(terms, axis=tuple(range(1, terms.ndim)))

  def nll(self, x: jax.Array) -> jax.Array:
    """Negative log-likelihood of ``x``, summed over all but the batch axis: ``[b]``."""
    terms = jnp.log(2.0 * jnp.pi) + self.logvar + jnp.square(x.astype(jnp.float32) - self.mean) / self.var
    return 0.5 * jnp.sum(terms, axis=tuple(range(1, terms.ndim)))


# ----------------------------------------------------------------------------------------------------------
# Blocks. Spatial blocks see ``[n, h, w, c]`` (n = b, or b * t for videos).

def _resnet(out_channels: int, num_groups: int, name: str, dtype: Dtype, param_dtype: Dtype,
            temporal: Optional[TemporalConfig] = None) -> ResnetBlock2D:
  """diffusers ``ResnetBlock2D`` as the VAE builds it: no time embedding, eps 1e-6; with ``temporal`` the video
  decoder's ``SpatioTemporalResBlock``."""
  return ResnetBlock2D(out_channels, norm_num_groups=num_groups, eps=NORM_EPS, temporal=temporal, name=name,
                       dtype=dtype, param_dtype=param_dtype)


def identity_in_time(key, shape, dtype=jnp.float32) -> jax.Array:
  """Kernel ``[k, 1, 1, c, c]`` of a 3D conv that passes every frame through unchanged (centre tap = I)."""
  del key
  k, _, _, c_in, c_out = shape
  return jnp.zeros(shape, dtype).at[k // 2, 0, 0].set(jnp.eye(c_in, c_out, dtype=dtype))


class Attention(nn.Module):
  """Single-head self-attention over all pixels with a residual (diffusers ``Attention`` in the mid-block).

  ``implementation``: see ``layers.dot_product_attention``; "blockwise" avoids the ``[h*w, h*w]`` scores, which
  dominate decoder memory at high resolution. A runtime option: the params do not depend on it.
  """
  num_groups: int = 32
  implementation: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n, h, w, c = x.shape
    tokens = group_norm(name="group_norm", num_groups=self.num_groups, epsilon=NORM_EPS, **kw)(x)
    tokens = tokens.reshape(n, h * w, c)
    q, k, v = (dense(c, name=name, axes=("embed", "heads"), **kw)(tokens) for name in ("to_q", "to_k", "to_v"))
    out = dot_product_attention(q, k, v, num_heads=1, implementation=self.implementation)
    out = dense(c, name="to_out_0", axes=("heads", "embed"), **kw)(out)
    return x + out.reshape(n, h, w, c)


class MidBlock(nn.Module):
  """diffusers ``UNetMidBlock2D`` as used by the VAE: resnet, attention, resnet (channels unchanged)."""
  num_groups: int = 32
  temporal: Optional[TemporalConfig] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, num_frames: Optional[int] = None) -> jax.Array:
    kw = dict(num_groups=self.num_groups, dtype=self.dtype, param_dtype=self.param_dtype)
    c = x.shape[-1]
    x = _resnet(c, name="resnets_0", temporal=self.temporal, **kw)(x, None, num_frames=num_frames)
    x = Attention(name="attentions_0", **kw)(x)
    return _resnet(c, name="resnets_1", temporal=self.temporal, **kw)(x, None, num_frames=num_frames)


class DownEncoderBlock(nn.Module):
  """``num_layers`` resnets, then an optional stride-2 downsampler."""
  out_channels: int
  num_layers: int
  add_downsample: bool
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for j in range(self.num_layers):
      x = _resnet(self.out_channels, self.num_groups, name=f"resnets_{j}", **kw)(x, None)
    if self.add_downsample:
      # padding=0: diffusers/CompVis pad bottom/right by one, then a stride-2 conv without padding.
      x = Downsample2D(self.out_channels, padding=0, name="downsamplers_0", **kw)(x)
    return x


class UpDecoderBlock(nn.Module):
  """``num_layers`` resnets, then an optional 2x upsampler."""
  out_channels: int
  num_layers: int
  add_upsample: bool
  num_groups: int = 32
  temporal: Optional[TemporalConfig] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, num_frames: Optional[int] = None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for j in range(self.num_layers):
      x = _resnet(self.out_channels, self.num_groups, name=f"resnets_{j}", temporal=self.temporal,
                  **kw)(x, None, num_frames=num_frames)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x)
    return x


class Encoder(nn.Module):
  """Image ``[n, h, w, in]`` -> moments before ``quant_conv`` ``[n, h/f, w/f, 2 * latent]``."""
  config: VAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    channels = cfg.block_out_channels
    x = conv(channels[0], name="conv_in", **kw)(x)
    for i, ch in enumerate(channels):
      x = DownEncoderBlock(ch, num_layers=cfg.layers_per_block, add_downsample=i < len(channels) - 1,
                           num_groups=cfg.norm_num_groups, name=f"down_blocks_{i}", **kw)(x)
    x = MidBlock(num_groups=cfg.norm_num_groups, name="mid_block", **kw)(x)
    x = nn.silu(group_norm(name="conv_norm_out", num_groups=cfg.norm_num_groups, epsilon=NORM_EPS, **kw)(x))
    return conv(2 * cfg.latent_channels, name="conv_out", **kw)(x)


class Decoder(nn.Module):
  """Latent after ``post_quant_conv`` ``[n, h/f, w/f, latent]`` -> image ``[n, h, w, out]``.

  ``num_frames``: clip length t when ``n = b * t`` frames of videos are decoded (frame-major; the video decoder
  needs it, the image decoder ignores it).
  """
  config: VAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array, num_frames: Optional[int] = None) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    temporal = cfg.temporal()
    if temporal is not None and (num_frames is None or z.shape[0] % num_frames):
      raise ValueError(f"the video decoder needs num_frames dividing the {z.shape[0]} frames; got {num_frames}")
    channels = tuple(reversed(cfg.block_out_channels))
    x = conv(channels[0], name="conv_in", **kw)(z)
    x = MidBlock(num_groups=cfg.norm_num_groups, temporal=temporal, name="mid_block", **kw)(x, num_frames=num_frames)
    for i, ch in enumerate(channels):
      x = UpDecoderBlock(ch, num_layers=cfg.layers_per_block + 1, add_upsample=i < len(channels) - 1,
                         num_groups=cfg.norm_num_groups, temporal=temporal, name=f"up_blocks_{i}",
                         **kw)(x, num_frames=num_frames)
    x = nn.silu(group_norm(name="conv_norm_out", num_groups=cfg.norm_num_groups, epsilon=NORM_EPS, **kw)(x))
    x = conv(cfg.out_channels, name="conv_out", **kw)(x)
    if temporal is None:
      return x
    n, h, w, c = x.shape
    video = x.reshape(n // num_frames, num_frames, h, w, c)
    video = conv(c, (cfg.temporal_kernel, 1, 1), name="temporal_conv_out", kernel_init=identity_in_time,
                 **kw)(video)
    return video.reshape(n, h, w, c)


class AutoencoderKL(nn.Module):
  """KL autoencoder. Call ``model.apply(params, x, method="encode")`` / ``model.apply(params, z, method="decode")``.

  ``__call__`` (encode, then decode the posterior mode or a sample) exists to initialise every parameter.
  """
  config: VAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(cfg, name="encoder", **kw)
    self.quant_conv = conv(2 * cfg.latent_channels, (1, 1), name="quant_conv", **kw)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = conv(cfg.latent_channels, (1, 1), name="post_quant_conv", **kw)
    self.decoder = Decoder(cfg, name="decoder", **kw)

  def encode(self, x: jax.Array) -> jax.Array:
    """Images ``[n, h, w, in]`` (in [-1, 1]) -> moments ``[n, h/f, w/f, 2 * latent]`` (mean | logvar)."""
    return self.quant_conv(self.encoder(x))

  def decode(self, z: jax.Array, num_frames: Optional[int] = None) -> jax.Array:
    """Unscaled latents ``[n, h/f, w/f, latent]`` -> images ``[n, h, w, out]`` (video decoder: ``n = b * t``
    frame-major, ``num_frames = t``)."""
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z, num_frames=num_frames)

  def __call__(self, x: jax.Array, rng: Optional[jax.Array] = None,
               num_frames: Optional[int] = None) -> Tuple[jax.Array, jax.Array]:
    """Reconstruction of ``x`` from the posterior mode (or a sample when ``rng`` is given), and the moments.

    The video decoder treats ``x`` as one clip when ``num_frames`` is not given."""
    if self.config.temporal_decoder and num_frames is None:
      num_frames = x.shape[0]
    moments = self.encode(x)
    posterior = DiagonalGaussian(moments)
    z = posterior.mode() if rng is None else posterior.sample(rng)
    return self.decode(z.astype(moments.dtype), num_frames=num_frames), moments


def example_image(config: VAEConfig, batch: int = 1, dtype: Dtype = jnp.float32) -> jax.Array:
  """Smallest valid input ``[batch, f, f, in]`` (for ``init`` / ``eval_shape``; params do not depend on size)."""
  f = config.downsample_factor
  return jnp.zeros((batch, f, f, config.in_channels), dtype)


def abstract_params(config: VAEConfig, param_dtype: Dtype = jnp.float32) -> Mapping:
  """Shape tree of the (logically partitioned) params, without allocating them."""
  model = AutoencoderKL(config, param_dtype=param_dtype)
  return jax.eval_shape(model.init, jax.random.key(0), example_image(config))["params"]


# ----------------------------------------------------------------------------------------------------------
# Long videos through the video decoder, window by window.

def decode_windows(num_frames: int, window: int, halo: int) -> List[Tuple[int, int, int, int]]:
  """Windows that decode ``num_frames`` frames exactly, ``window`` output frames at a time.

  Each window reads ``window + 2 * halo`` latent frames (all of them when the video is shorter) and keeps the
  frames that lie at least ``halo`` frames from an edge that is not the video's own: with ``halo`` = the
  decoder's :func:`temporal_receptive_field`, every kept frame saw exactly the inputs the whole-video decode
  gives it. One input length for all windows, so one compiled decode serves any video length.

  Returns ``[(read_start, read_stop, keep_start, keep_stop)]`` in frame indices of the video; the kept ranges
  tile ``[0, num_frames)`` in order.
  """
  if window < 1 or halo < 0:
    raise ValueError(f"decode_windows: window={window} must be >= 1 and halo={halo} >= 0")
  span = min(num_frames, window + 2 * halo)
  out = []
  keep = 0
  while keep < num_frames:
    start = min(max(keep - halo, 0), num_frames - span)
    stop = min(keep + window, num_frames)
    out.append((start, start + span, keep, stop))
    keep = stop
  return out


def decode_in_windows(decode_clip: Callable[[Any], Any], latents, window: int, halo: int):
  """``decode_clip`` over :func:`decode_windows` of ``latents`` ``[b, n, h, w, c]`` -> ``[b, n, H, W, C]`` (numpy;
  device memory set by ``window + 2 * halo`` frames, whatever ``n``)."""
  pieces = []
  for start, stop, keep_start, keep_stop in decode_windows(latents.shape[1], window, halo):
    out = np.asarray(decode_clip(latents[:, start:stop]))
    pieces.append(out[:, keep_start - start:keep_stop - start])
  return np.concatenate(pieces, axis=1)
