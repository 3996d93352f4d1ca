"""Spatial transformer layers of the Stable Diffusion U-Net (diffusers ``Transformer2DModel`` family).

Module and parameter names mirror diffusers (``attn1/to_q``, ``to_out_0``, ``ff/net_0/proj``, ``ff/net_2``,
``transformer_blocks_0``, ...) so diffusers state dicts map onto them mechanically. Tokens are ``[b, n, c]``,
images ``[b, h, w, c]``.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from videoldm_jax.models import layers

Dtype = Any


class Attention(nn.Module):
  """Multi-head attention with separate q/k/v projections (diffusers ``Attention``).

  Self-attention when ``context`` is None, else cross-attention to ``context`` (any width: to_k/to_v
  adapt to it). q/k/v carry no bias, the output projection does (SD convention).

  Attributes:
    heads: number of heads.
    head_dim: channels per head (inner width = heads * head_dim).
    out_features: output width; defaults to the query width.
    implementation: forwarded to ``jax.nn.dot_product_attention`` (None = XLA, "cudnn" = fused GPU kernel).
  """
  heads: int
  head_dim: int
  out_features: Optional[int] = None
  implementation: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: Optional[jax.Array] = None, *,
               mask: Optional[jax.Array] = None) -> jax.Array:
    """``x`` ``[b, n, c]``, ``context`` ``[b, m, d]`` or None, ``mask`` bool broadcastable to ``[b, heads, n, m]``."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    inner = self.heads * self.head_dim
    context = x if context is None else context
    q = layers.dense(inner, use_bias=False, axes=("embed", "heads"), name="to_q", **kw)(x)
    k = layers.dense(inner, use_bias=False, axes=("embed", "heads"), name="to_k", **kw)(context)
    v = layers.dense(inner, use_bias=False, axes=("embed", "heads"), name="to_v", **kw)(context)
    # Logits and softmax are float32 for any input dtype (what diffusers' ``upcast_attention`` buys in fp16).
    out = layers.dot_product_attention(q, k, v, num_heads=self.heads, mask=mask, implementation=self.implementation)
    return layers.dense(self.out_features or x.shape[-1], axes=("heads", "embed"), name="to_out_0", **kw)(out)


class GEGLU(nn.Module):
  """``proj`` to twice the width, then ``value * gelu(gate)`` (exact erf GELU, as PyTorch's default)."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = layers.dense(2 * self.features, name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(x)
    value, gate = jnp.split(h, 2, axis=-1)
    return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """diffusers ``FeedForward`` with GEGLU: ``net_0`` (GEGLU, width ``mult * c``) -> ``net_2`` (Linear)."""
  mult: int = 4
  out_features: Optional[int] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = GEGLU(self.mult * x.shape[-1], name="net_0", **kw)(x)
    # net.1 is a Dropout (p=0 in every SD checkpoint) and holds no parameters.
    return layers.dense(self.out_features or x.shape[-1], axes=("mlp", "embed"), name="net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
  """Pre-LayerNorm transformer block: self-attention, cross-attention, GEGLU feed-forward, each residual.

  Attributes:
    heads, head_dim: attention shape (inner width must equal the token width).
    cross_attention_dim: context width; None drops ``norm2``/``attn2`` (no cross-attention).
    only_cross_attention: ``attn1`` also attends to the context instead of the tokens (SD x4 upscaler).
  """
  heads: int
  head_dim: int
  cross_attention_dim: Optional[int] = None
  only_cross_attention: bool = False
  attention_implementation: Optional[str] = None
  norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
    """``x`` ``[b, n, c]``, ``context`` ``[b, m, cross_attention_dim]`` -> ``[b, n, c]``."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn_kw = dict(heads=self.heads, head_dim=self.head_dim, implementation=self.attention_implementation, **kw)
    if self.only_cross_attention and context is None:
      raise ValueError("only_cross_attention needs a context")
    h = layers.layer_norm(epsilon=self.norm_eps, name="norm1", **kw)(x)
    x = x + Attention(name="attn1", **attn_kw)(h, context if self.only_cross_attention else None)
    if self.cross_attention_dim is not None:
      h = layers.layer_norm(epsilon=self.norm_eps, name="norm2", **kw)(x)
      # Without a context attn2 falls back to self-attention, as diffusers does.
      x = x + Attention(name="attn2", **attn_kw)(h, context)
    h = layers.layer_norm(epsilon=self.norm_eps, name="norm3", **kw)(x)
    return x + FeedForward(name="ff", **kw)(h)


class Transformer2DModel(nn.Module):
  """Spatial transformer on an image (diffusers ``Transformer2DModel``, CompVis ``SpatialTransformer``).

  GroupNorm -> ``proj_in`` (1x1 conv for SD 1.x, Linear for SD 2.x) -> ``num_layers`` transformer blocks on the
  ``h * w`` tokens -> ``proj_out`` -> residual. Width is ``heads * head_dim`` throughout (= input channels).

  ``num_frames`` / ``image_only_indicator`` are accepted for the video model, whose temporal transformer blocks
  run after each spatial block; the image model ignores them.
  """
  heads: int
  head_dim: int
  num_layers: int = 1
  cross_attention_dim: Optional[int] = None
  use_linear_projection: bool = False
  only_cross_attention: bool = False
  attention_implementation: Optional[str] = None
  norm_num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: Optional[jax.Array] = None, num_frames: Optional[int] = None,
               image_only_indicator: Optional[jax.Array] = None) -> jax.Array:
    """``x`` ``[b, h, w, c]``, ``context`` ``[b, m, d]`` -> ``[b, h, w, c]``."""
    del num_frames, image_only_indicator  # used by the video variant only
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, height, width, channels = x.shape
    inner = self.heads * self.head_dim
    residual = x
    h = layers.group_norm(num_groups=self.norm_num_groups, epsilon=1e-6, name="norm", **kw)(x)
    if self.use_linear_projection:
      h = h.reshape(b, height * width, channels)
      h = layers.dense(inner, name="proj_in", **kw)(h)
    else:
      h = layers.conv(inner, (1, 1), name="proj_in", **kw)(h)
      h = h.reshape(b, height * width, inner)
    for i in range(self.num_layers):
      h = BasicTransformerBlock(
          heads=self.heads, head_dim=self.head_dim, cross_attention_dim=self.cross_attention_dim,
          only_cross_attention=self.only_cross_attention, attention_implementation=self.attention_implementation,
          name=f"transformer_blocks_{i}", **kw)(h, context)
    if self.use_linear_projection:
      h = layers.dense(channels, axes=("mlp", "embed"), name="proj_out", **kw)(h)
      h = h.reshape(b, height, width, channels)
    else:
      h = h.reshape(b, height, width, inner)
      h = layers.conv(channels, (1, 1), name="proj_out", **kw)(h)
    return h + residual
