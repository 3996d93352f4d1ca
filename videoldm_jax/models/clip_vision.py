"""CLIP ViT image tower (CLIPSIM's image side, SVD's first-frame encoder) and SVD's image-encoder preprocessing.

Param paths mirror ``transformers.CLIPVisionModelWithProjection`` without the ``vision_model.`` prefix; the
transformer blocks are ``models/clip.py``'s (``CLIPEncoder``, unmasked here):

```
embeddings/patch_embedding/kernel [p, p, 3, d]   <-> vision_model.embeddings.patch_embedding.weight (conv, no bias)
embeddings/class_embedding [d]                   <-> vision_model.embeddings.class_embedding
embeddings/position_embedding/embedding [n+1, d] <-> vision_model.embeddings.position_embedding.weight
pre_layrnorm, encoder/layers_i/..., post_layernorm  <-> vision_model.pre_layrnorm (sic), ...
visual_projection/kernel [d, proj]               <-> visual_projection.weight (no bias)
```

SVD (``StableVideoDiffusionPipeline._encode_image``) feeds the tower the conditioning frame resized to 224x224 by
``_resize_with_antialiasing`` -- a separable Gaussian blur (sigma from the shrink factor, reflect padding) followed by
PyTorch's bicubic ``interpolate(align_corners=True)`` -- then maps [-1, 1] to [0, 1] and normalises with the feature
extractor's mean / std. :func:`svd_image_encoder_input` reproduces that arithmetic in float32 under ``jit``: the
blur kernels and the 4-tap bicubic indices / weights depend only on the static shapes, so they are computed on the
host in float32 the way PyTorch's CPU kernels compute them, and applied as shifted sums and gathers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from videoldm_jax.models.clip import ACTIVATIONS, CLIPEncoder, CLIPTextConfig, embed_table
from videoldm_jax.models.layers import conv, dense, layer_norm

Dtype = Any

# OpenAI CLIP's normalisation (also transformers' CLIPImageProcessor default and SVD's feature extractor).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """Hyper-parameters of a CLIP ViT image tower (field names follow ``transformers.CLIPVisionConfig``)."""
  image_size: int = 224
  patch_size: int = 32
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 512

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

  @property
  def num_positions(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + 1

  def transformer_config(self) -> CLIPTextConfig:
    """The shared blocks (``models/clip.py``) read only width, depth, heads, activation and eps from their config."""
    return CLIPTextConfig(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                          num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                          hidden_act=self.hidden_act, layer_norm_eps=self.layer_norm_eps)


def openclip_vit_h14() -> CLIPVisionConfig:
  """OpenCLIP ViT-H/14 (LAION-2B), SVD's ``image_encoder``: 224 px, 1024-d ``image_embeds``."""
  return CLIPVisionConfig(patch_size=14, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                          num_attention_heads=16, hidden_act="gelu", projection_dim=1024)


def tiny(**overrides) -> CLIPVisionConfig:
  """CPU-sized image tower for runlocal and tests: 224 px in 14 px patches (SVD's preprocessing), width 32, two
  layers, 32-d ``image_embeds``."""
  base = dict(patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              hidden_act="gelu", projection_dim=32)
  return CLIPVisionConfig(**{**base, **overrides})


def clip_vision_config_from_transformers(config: Any, *, projection_dim: Optional[int] = None) -> CLIPVisionConfig:
  """:class:`CLIPVisionConfig` from a transformers ``CLIPVisionConfig`` (object, dict or ``config.json`` contents of
  a ``CLIPVisionModelWithProjection``). A full ``CLIPConfig`` gives its ``vision_config`` and its top-level
  ``projection_dim``; ``projection_dim`` overrides either."""
  d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  if d.get("vision_config") is not None:
    d = dict(d["vision_config"], projection_dim=d.get("projection_dim", 512))
  default = CLIPVisionConfig()
  get = lambda name, kind: kind(d[name]) if d.get(name) is not None else getattr(default, name)
  return CLIPVisionConfig(
      image_size=get("image_size", int), patch_size=get("patch_size", int), hidden_size=get("hidden_size", int),
      intermediate_size=get("intermediate_size", int), num_hidden_layers=get("num_hidden_layers", int),
      num_attention_heads=get("num_attention_heads", int), hidden_act=get("hidden_act", str),
      layer_norm_eps=get("layer_norm_eps", float),
      projection_dim=int(projection_dim) if projection_dim is not None else get("projection_dim", int))


# ----------------------------------------------------------------------------------------------------------
# Modules.

class CLIPVisionEmbeddings(nn.Module):
  """Patchify (conv, stride = patch) + class token + learned positions. ``[b, s, s, 3] -> [b, 1 + (s/p)^2, d]``."""
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    p = cfg.patch_size
    patches = conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                   name="patch_embedding", **kw)(pixel_values)  # [b, s/p, s/p, d]
    patches = patches.reshape(patches.shape[0], -1, cfg.hidden_size)
    cls = self.param("class_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                     (cfg.hidden_size,), self.param_dtype)
    cls = jnp.broadcast_to(cls.astype(patches.dtype), (patches.shape[0], 1, cfg.hidden_size))
    x = jnp.concatenate([cls, patches], axis=1)
    positions = embed_table(cfg.num_positions, cfg.hidden_size, name="position_embedding", axes=(None, "embed"),
                            std=0.02, **kw)
    if x.shape[1] != cfg.num_positions:
      raise ValueError(f"{x.shape[1]} tokens for {cfg.num_positions} positions: images must be "
                       f"{cfg.image_size}x{cfg.image_size}, got {pixel_values.shape[1:3]}")
    return x + positions(jnp.arange(cfg.num_positions))[None]


class CLIPVisionEncoder(nn.Module):
  """CLIP ViT image tower.

  ``__call__(pixel_values [b, s, s, 3])`` (normalised with the tower's mean / std) returns ``last_hidden_state``
  ``[b, n, d]``, ``pooled`` ``[b, d]`` (``post_layernorm`` of the class token, transformers' ``pooler_output``) and
  ``image_embeds`` ``[b, projection_dim]`` (unnormalised, = OpenCLIP ``encode_image``; SVD's context).
  """
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_implementation: Optional[str] = None

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> Dict[str, jax.Array]:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = CLIPVisionEmbeddings(cfg, name="embeddings", **kw)(pixel_values)
    x = layer_norm(name="pre_layrnorm", epsilon=cfg.layer_norm_eps, **kw)(x)
    x = CLIPEncoder(cfg.transformer_config(), attention_implementation=self.attention_implementation,
                    name="encoder", **kw)(x, None)[-1]
    pooled = layer_norm(name="post_layernorm", epsilon=cfg.layer_norm_eps, **kw)(x[:, 0])
    embeds = dense(cfg.projection_dim, use_bias=False, axes=("embed", "mlp"), name="visual_projection", **kw)(pooled)
    return {"last_hidden_state": x, "pooled": pooled, "image_embeds": embeds}


def abstract_params(config: CLIPVisionConfig) -> Dict:
  """Param shapes (``jax.ShapeDtypeStruct``, logical boxes removed) of ``CLIPVisionEncoder(config)``; no allocation."""
  s = config.image_size
  pixels = jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)
  return nn.unbox(jax.eval_shape(CLIPVisionEncoder(config).init, jax.random.key(0), pixels)["params"])


@functools.partial(jax.jit, static_argnames=("config",))
def image_embeds_batch(params: Mapping, pixel_values: jax.Array, config: CLIPVisionConfig) -> jax.Array:
  """Jittable core: normalised ``[n, s, s, 3]`` -> unnormalised ``image_embeds`` ``[n, projection_dim]``."""
  return CLIPVisionEncoder(config).apply({"params": params}, pixel_values)["image_embeds"]


# ----------------------------------------------------------------------------------------------------------
# SVD preprocessing: diffusers' _resize_with_antialiasing + CLIP normalisation.

def _gaussian_taps(sigma: float) -> np.ndarray:
  """Normalised float32 Gaussian of the odd length SVD derives from ``sigma`` (2 sigma each side, at least 3)."""
  size = int(max(4.0 * sigma, 3))
  size += 1 - size % 2
  x = np.arange(size, dtype=np.float32) - np.float32(size // 2)
  sigma = np.float32(sigma)
  g = np.exp(-x * x / (np.float32(2) * sigma * sigma))
  return g / g.sum(dtype=np.float32)


def _blur_axis(x: jax.Array, taps: np.ndarray, axis: int) -> jax.Array:
  """Correlates ``x`` with ``taps`` along ``axis`` after reflect padding (length kept)."""
  k = taps.shape[0]
  if k == 1:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = ((k - 1) // 2, k - 1 - (k - 1) // 2)
  padded = jnp.pad(x, pad, mode="reflect")
  n = x.shape[axis]
  out = None
  for j, w in enumerate(taps):
    term = jax.lax.slice_in_dim(padded, j, j + n, axis=axis) * jnp.float32(w)
    out = term if out is None else out + term
  return out


def _cubic_taps(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray]:
  """Indices ``[out, 4]`` and float32 weights ``[out, 4]`` of PyTorch's bicubic ``align_corners=True`` resampling.

  As ATen's CPU kernel: float32 scale ``(in - 1) / (out - 1)``, source ``scale * i``, Keys' cubic with A = -0.75,
  taps at ``floor(src) - 1 .. floor(src) + 2`` clamped to the border (so edge pixels repeat).
  """
  f32 = np.float32
  scale = f32(in_size - 1) / f32(out_size - 1) if out_size > 1 else f32(0)
  src = scale * np.arange(out_size, dtype=f32)
  base = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  t = np.clip(src - base.astype(f32), f32(0), f32(1)).astype(f32)
  a = f32(-0.75)

  def near(x):  # |x| <= 1
    return ((a + f32(2)) * x - (a + f32(3))) * x * x + f32(1)

  def far(x):  # 1 < |x| < 2
    return ((a * x - f32(5) * a) * x + f32(8) * a) * x - f32(4) * a

  u = (f32(1) - t).astype(f32)
  weights = np.stack([far((t + f32(1)).astype(f32)), near(t), near(u), far((u + f32(1)).astype(f32))], axis=-1)
  index = np.clip(base[:, None] + np.arange(-1, 3)[None], 0, in_size - 1)
  return index.astype(np.int32), weights.astype(f32)


def _cubic_axis(x: jax.Array, out_size: int, axis: int) -> jax.Array:
  """Bicubic (align_corners) resampling of ``x`` along ``axis`` to ``out_size`` samples."""
  index, weights = _cubic_taps(x.shape[axis], out_size)
  shape = [1] * (x.ndim + 1)
  shape[axis], shape[axis + 1] = out_size, 4
  gathered = jnp.take(x, jnp.asarray(index.reshape(-1)), axis=axis)
  gathered = gathered.reshape(x.shape[:axis] + (out_size, 4) + x.shape[axis + 1:])
  w = jnp.asarray(weights.reshape(shape))
  # Left-to-right sum of the 4 taps, in PyTorch's order.
  terms = [jax.lax.index_in_dim(gathered, j, axis + 1, keepdims=False) *
           jax.lax.index_in_dim(w, j, axis + 1, keepdims=False) for j in range(4)]
  return ((terms[0] + terms[1]) + terms[2]) + terms[3]


def resize_with_antialiasing(images: jax.Array, size: Union[int, Tuple[int, int]] = 224) -> jax.Array:
  """diffusers' SVD ``_resize_with_antialiasing``: ``[b, h, w, c]`` -> ``[b, size_h, size_w, c]`` float32.

  Per axis, a Gaussian blur with sigma ``max((in / out - 1) / 2, 0.001)`` (length ``int(max(4 sigma, 3))`` made
  odd, reflect padding; width first, then height), then PyTorch bicubic ``align_corners=True`` (width taps inside,
  height taps outside, as ATen sums them). Upsampling blurs with a one-hot kernel, i.e. not at all.
  """
  out_h, out_w = (size, size) if isinstance(size, int) else tuple(size)
  if images.ndim != 4:
    raise ValueError(f"expected images [b, h, w, c], got shape {images.shape}")
  x = jnp.asarray(images, jnp.float32)
  _, h, w, _ = x.shape
  sigma_h = max((h / out_h - 1.0) / 2.0, 0.001)
  sigma_w = max((w / out_w - 1.0) / 2.0, 0.001)
  x = _blur_axis(x, _gaussian_taps(sigma_w), axis=2)
  x = _blur_axis(x, _gaussian_taps(sigma_h), axis=1)
  x = _cubic_axis(x, out_w, axis=2)
  return _cubic_axis(x, out_h, axis=1)


def svd_image_encoder_input(images: jax.Array, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                            size: Union[int, Tuple[int, int]] = 224) -> jax.Array:
  """SVD's image-encoder input: frames ``[b, h, w, 3]`` in [-1, 1] -> ``[b, size, size, 3]`` float32.

  :func:`resize_with_antialiasing` to ``size``, then ``(x + 1) / 2`` to [0, 1], then ``(x - mean) / std`` (the
  feature extractor's ``image_mean`` / ``image_std``), as ``StableVideoDiffusionPipeline._encode_image`` does for
  PIL / numpy conditioning frames. Jittable; ``size`` must be static.
  """
  x = resize_with_antialiasing(images, size)
  x = (x + 1.0) / 2.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
