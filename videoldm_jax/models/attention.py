"""Spatial transformer layers of the Stable Diffusion U-Net (diffusers ``Transformer2DModel`` family).

Module and parameter names mirror diffusers (``attn1/to_q``, ``to_out_0``, ``ff/net_0/proj``, ``ff/net_2``,
``transformer_blocks_0``, ...) so diffusers state dicts map onto them mechanically. Tokens are ``[b, n, c]``,
images ``[b, h, w, c]``. ``Attention`` / ``GEGLU`` / ``FeedForward`` live in ``layers`` (shared with the temporal
transformer) and are re-exported here.

With a :class:`~videoldm_jax.models.temporal.TemporalConfig`, ``Transformer2DModel`` is the video transformer of
sgm's ``SpatialVideoTransformer`` / diffusers' ``TransformerSpatioTemporalModel``: after each spatial block a
temporal block mixes the frames, blended by ``temporal_mixer``.
"""

from __future__ import annotations

from typing import Any, Optional

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from videoldm_jax.models import layers
from videoldm_jax.models import temporal as temporal_lib
from videoldm_jax.models.layers import GEGLU, Attention, FeedForward  # noqa: F401  (re-exported)

Dtype = Any


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

  ``temporal`` (None = image model) adds, inside this module: ``temporal_pos_embed`` (frame-index MLP),
  ``temporal_transformer_blocks_{i}`` after each spatial block and one ``temporal_mixer`` shared by the depths.
  The spatial params are unchanged. The image model ignores ``num_frames`` / ``image_only_indicator`` /
  ``temporal_context``.
  """
  heads: int
  head_dim: int
  num_layers: int = 1
  cross_attention_dim: Optional[int] = None
  use_linear_projection: bool = False
  only_cross_attention: bool = False
  attention_implementation: Optional[str] = None
  norm_num_groups: int = 32
  temporal: Optional[temporal_lib.TemporalConfig] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: Optional[jax.Array] = None, num_frames: Optional[int] = None,
               image_only_indicator: Optional[jax.Array] = None,
               temporal_context: Optional[jax.Array] = None) -> jax.Array:
    """``x`` ``[b, h, w, c]``, ``context`` ``[b, m, d]`` -> ``[b, h, w, c]``.

    Video model: ``b = videos * num_frames`` frame-major, ``image_only_indicator`` ``[videos, num_frames]``,
    ``temporal_context`` ``[videos, m', d']`` (when given, the temporal cross-attention's context).
    """
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
    tc = self.temporal
    if tc is not None:
      if num_frames is None:
        raise ValueError("the video transformer needs num_frames")
      # Frame-index embedding (sinusoidal -> MLP), added to the temporal branch's input only. With a position
      # window (long clips at sampling) the index is the one inside the frame's window: in the trained range.
      windows = temporal_lib.frame_windows(num_frames, tc.position_window)
      frame_emb = layers.TimestepEmbedding(4 * channels, channels, name="temporal_pos_embed", **kw)(
          temporal_lib.frame_position_features(windows.size if windows else num_frames, channels).astype(self.dtype))
      mixer = temporal_lib.AlphaBlender(tc.merge_strategy, tc.merge_factor, name="temporal_mixer",
                                        param_dtype=self.param_dtype)
      time_context = temporal_lib.select_temporal_context(tc, context, temporal_context, num_frames)
    for i in range(self.num_layers):
      h = BasicTransformerBlock(
          heads=self.heads, head_dim=self.head_dim, cross_attention_dim=self.cross_attention_dim,
          only_cross_attention=self.only_cross_attention, attention_implementation=self.attention_implementation,
          name=f"transformer_blocks_{i}", **kw)(h, context)
      if tc is not None:
        video = einops.rearrange(h, "(b t) s c -> b t s c", t=num_frames)
        tokens = (einops.rearrange(video + frame_emb[None, :, None, :], "b t s c -> (b s) t c") if windows is None
                  else windows.gather(video, frame_emb))
        mixed = temporal_lib.TemporalTransformerBlock(
            inner, self.heads, self.head_dim, cross_attention=tc.cross_attention,
            max_frame_distance=tc.max_frame_distance, attention_implementation=self.attention_implementation,
            lora_rank=tc.lora_rank, lora_alpha=tc.lora_alpha, name=f"temporal_transformer_blocks_{i}", **kw)(
                tokens, time_context)
        mixed = (einops.rearrange(mixed, "(b s) t c -> (b t) s c", s=height * width) if windows is None
                 else einops.rearrange(windows.scatter(mixed, height * width), "b t s c -> (b t) s c"))
        h = mixer(h, mixed, image_only_indicator)
    if self.use_linear_projection:
      h = layers.dense(channels, axes=("mlp", "embed"), name="proj_out", **kw)(h)
      h = h.reshape(b, height, width, channels)
    else:
      h = h.reshape(b, height, width, inner)
      h = layers.conv(channels, (1, 1), name="proj_out", **kw)(h)
    return h + residual
