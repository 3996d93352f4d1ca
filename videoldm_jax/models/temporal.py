"""Video LDM temporal alignment layers (Blattmann et al. 2023, Sec. 3.1).

Temporal layers are interleaved with frozen spatial layers and merged with an :class:`AlphaBlender`::

  out = alpha * z_spatial + (1 - alpha) * z_temporal

* :class:`TemporalResBlock`: 3D-conv residual block, kernel (3, 1, 1), zero padding in time, per-frame diffusion
  timestep embedding added after the first conv, last conv zero-initialised (so it starts as the identity).
* :class:`TemporalTransformerBlock`: temporal self-attention over frames (optionally windowed to
  ``max_frame_distance``), optional cross-attention to a conditioning sequence, GEGLU feed-forwards.
* :func:`frame_position_features`: sinusoidal frame-index features; the caller owns the ``temporal_pos_embed`` MLP.
  :func:`frame_windows` runs the temporal transformer over sliding windows with window-relative positions, for
  clips longer than the trained ones (``TemporalConfig.position_window``, sampling only).
* :class:`TemporalConditionEncoder` (``temporal_cond``, prediction / interpolation models, Sec. 3.2-3.3): the
  masked context ``c = concat(m * z0, m)`` ``[(b t), h, w, C + 1]`` goes through a learned strided-conv
  downsampling to one feature map per U-Net level; the conditioning-augmentation noise level (sinusoidal -> MLP)
  and an optional regime label (interpolator T->4T vs 4T->16T) are embedded and added to its first features.
  Every :class:`TemporalResBlock` at a level adds a zero-initialised 1x1x1 projection (``temporal_cond_proj``) of
  that level's features to its hidden state where the per-frame timestep embedding is added.

  Why this placement: the paper feeds c_S "into the temporal layers after a learned downsampling" without saying
  where; the 3D-conv ResBlocks are the temporal layers that see the spatial grid at every resolution, and their
  timestep-embedding slot is the natural place for an additive per-frame, per-pixel signal. The projections
  start at zero, so a key-frame (base) checkpoint loaded into a predictor / interpolator initially gives exactly
  the base model's output, and every new param sits under a ``temporal`` path (trained by ``.*temporal.*``).
  With an all-zero mask the input is exactly zero whatever ``z0`` is, so "no context" (``None``) is the
  all-zero-mask call: the unconditional branch of context guidance is well defined.

Module and parameter names mirror diffusers (``TemporalResnetBlock``, ``TemporalBasicTransformerBlock``,
``AlphaBlender``) so SVD weights map mechanically. Layouts: videos ``[b, t, h, w, c]``, temporal tokens
``[(b h w), t, c]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional, Sequence, Tuple

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from videoldm_jax.models import layers

Dtype = Any

MERGE_STRATEGIES = ("fixed", "learned", "learned_with_images")


@dataclasses.dataclass(frozen=True)
class TemporalConfig:
  """Options of the temporal layers of a video U-Net (``UNetConfig.temporal``; ``None`` there = image model).

  Attributes:
    merge_strategy: ``fixed`` (alpha = merge_factor), ``learned`` (alpha = sigmoid(mix_factor)) or
      ``learned_with_images`` (as ``learned`` but alpha = 1 on frames flagged by ``image_only_indicator``).
    merge_factor: initial ``mix_factor`` (a logit for the learned strategies; sgm / SVD use 0.5).
    max_frame_distance: temporal attention window; frame i attends to j only if |i - j| <= this (None = all).
    cross_attention: whether the temporal transformer blocks cross-attend to a conditioning sequence (text for
      T2V, the CLIP image embedding for SVD); False = no ``norm2`` / ``attn2``.
    use_spatial_context: the temporal cross-attention context is the first frame's spatial context (sgm /
      SVD) unless the U-Net is given a ``temporal_context`` (e.g. a second text encoder's tokens), which always
      wins; False: only ``temporal_context``. Its width sets the ``attn2`` key / value input width.
    context_dim: width of that ``temporal_context`` (None = the spatial cross-attention width); read only to
      build example inputs (``unet.dummy_inputs``).
    kernel_size: temporal ResBlock conv kernel ``(t, h, w)``.
    zero_init: zero-initialise the last conv of each temporal ResBlock (sgm); diffusers does not.
    dropout: dropout rate inside temporal ResBlocks.
    mask_conditioning: build the ``temporal_cond`` encoder (masked context frames into the temporal ResBlocks;
      predictor / interpolator). False keeps the key-frame model's param tree exactly.
    num_regimes: number of regime labels embedded by ``temporal_cond`` (interpolator: 2, T->4T and 4T->16T);
      0 = no regime input.
    eps: GroupNorm epsilon of the temporal ResBlocks (None = the spatial block's; the video VAE decoder uses 1e-5
      next to its spatial 1e-6).
    switch_spatial_to_temporal_mix: the VAE decoder's convention ``alpha * temporal + (1 - alpha) * spatial``.
    frame_norm: GroupNorm statistics of the temporal ResBlocks per frame instead of over the whole clip. The
      reference blocks normalise over time, which makes every output frame depend on every input frame; per-frame
      statistics bound the temporal receptive field, so long videos can be processed exactly in windows.
    position_window: sampling-time option for clips longer than the trained ones (paper App. B, "convolutional
      in time"): each frame's temporal transformer output is computed on the ``position_window`` frames around it
      (:func:`frame_windows`), those frames getting window-relative positions ``0..W-1``, so positions stay in the
      trained range; ``max_frame_distance`` still masks inside the window. None, or >= the clip length: the whole
      clip as one window (the training computation, bit for bit). Adds no params.
    lora_rank: rank of low-rank adapters (``layers.LoRA``) on every projection of the temporal attentions
      (to_q / to_k / to_v / to_out_0 of attn1 and attn2); 0 = none. Adapter params sit under ``.../lora/`` (train
      them alone with ``config.trainable = ".*/lora/.*"``; ``videoldm_jax.lora`` merges and exports them).
    lora_alpha: adapter scale ``alpha / rank`` (0 = rank, i.e. scale 1).
    lora_convs: adapters on the temporal ResBlocks' 3D convs too (conv1 / conv2).
    conv_blocks: the 3D-conv ``temporal_res`` blocks (and their ``temporal_mixer``) after the spatial ResNet
      blocks; False leaves only the temporal attention (the paper's attention-only ablation).
  """
  merge_strategy: str = "learned_with_images"
  merge_factor: float = 0.5
  max_frame_distance: Optional[int] = None
  cross_attention: bool = True
  use_spatial_context: bool = True
  context_dim: Optional[int] = None
  kernel_size: Tuple[int, int, int] = (3, 1, 1)
  zero_init: bool = True
  dropout: float = 0.0
  mask_conditioning: bool = False
  num_regimes: int = 0
  eps: Optional[float] = None
  switch_spatial_to_temporal_mix: bool = False
  frame_norm: bool = False
  position_window: Optional[int] = None
  lora_rank: int = 0
  lora_alpha: float = 0.0
  lora_convs: bool = False
  conv_blocks: bool = True

  def __post_init__(self):
    if not self.conv_blocks and (self.mask_conditioning or self.lora_convs):
      raise ValueError("conv_blocks=False: the mask conditioning and the conv LoRA live in the temporal ResBlocks "
                       f"(mask_conditioning={self.mask_conditioning}, lora_convs={self.lora_convs})")
    if self.merge_strategy not in MERGE_STRATEGIES:
      raise ValueError(f"merge_strategy must be one of {MERGE_STRATEGIES}, got {self.merge_strategy!r}")
    if self.num_regimes < 0 or (self.num_regimes and not self.mask_conditioning):
      raise ValueError(f"num_regimes={self.num_regimes} needs mask_conditioning=True and must be >= 0")
    if self.position_window is not None and self.position_window < 1:
      raise ValueError(f"position_window={self.position_window} must be None or >= 1")
    if self.lora_rank < 0 or self.lora_alpha < 0 or (self.lora_convs and not self.lora_rank):
      raise ValueError(f"lora_rank={self.lora_rank}, lora_alpha={self.lora_alpha}: must be >= 0 (lora_convs needs "
                       "lora_rank > 0)")
    object.__setattr__(self, "kernel_size", tuple(self.kernel_size))  # JSON round-trip gives a list

  @classmethod
  def from_dict(cls, d: Optional[dict]) -> Optional["TemporalConfig"]:
    return None if d is None else cls(**d)


# ----------------------------------------------------------------------------------------------------------
# Alpha blending.

class AlphaBlender(nn.Module):
  """``alpha * x_spatial + (1 - alpha) * x_temporal`` with one scalar alpha per layer (sgm ``AlphaBlender``).

  Inputs are either videos ``[b, t, ...]`` (5D, e.g. ``[b, t, h, w, c]``) or frame-major flattened tensors
  ``[(b t), ...]`` (3D/4D, e.g. tokens ``[(b t), n, c]``); ``image_only_indicator`` ``[b, t]`` (bool / 0-1) is
  broadcast accordingly. ``switch_spatial_to_temporal_mix`` swaps the roles (the temporal VAE decoder convention).
  """
  merge_strategy: str = "learned_with_images"
  merge_factor: float = 0.5
  switch_spatial_to_temporal_mix: bool = False
  param_dtype: Dtype = jnp.float32

  def get_alpha(self, image_only_indicator: Optional[jax.Array] = None) -> jax.Array:
    """Returns alpha as a ``[1]`` fp32 array, or ``[b, t]`` for ``learned_with_images`` with an indicator."""
    if self.merge_strategy not in MERGE_STRATEGIES:
      raise ValueError(f"merge_strategy must be one of {MERGE_STRATEGIES}, got {self.merge_strategy!r}")
    if self.merge_strategy == "fixed":
      # A constant (a buffer in PyTorch), not a trainable parameter.
      return jnp.full((1,), self.merge_factor, jnp.float32)
    mix_factor = self.param("mix_factor", nn.with_logical_partitioning(
        nn.initializers.constant(self.merge_factor), (None,)), (1,), self.param_dtype)
    alpha = jax.nn.sigmoid(jnp.asarray(mix_factor, jnp.float32))
    if self.merge_strategy == "learned_with_images" and image_only_indicator is not None:
      alpha = jnp.where(jnp.asarray(image_only_indicator) != 0, jnp.float32(1.0), alpha)
    return alpha

  @nn.compact
  def __call__(self, x_spatial: jax.Array, x_temporal: jax.Array,
               image_only_indicator: Optional[jax.Array] = None) -> jax.Array:
    alpha = self.get_alpha(image_only_indicator)
    if alpha.ndim == 2:  # [b, t]
      if x_spatial.ndim == 5:
        alpha = alpha[:, :, None, None, None]
      else:
        alpha = alpha.reshape((-1,) + (1,) * (x_spatial.ndim - 1))
    if self.switch_spatial_to_temporal_mix:
      alpha = 1.0 - alpha
    alpha = alpha.astype(x_spatial.dtype)
    return alpha * x_spatial + (1.0 - alpha) * x_temporal


# ----------------------------------------------------------------------------------------------------------
# 3D-conv temporal residual block.

class TemporalResBlock(nn.Module):
  """diffusers ``TemporalResnetBlock`` / sgm ``ResBlock(dims=3)``: ``[b, t, h, w, c] -> [b, t, h, w, c]``.

  GN -> SiLU -> Conv3D -> (+ time_emb_proj(SiLU(emb)) per frame) -> GN -> SiLU -> dropout -> Conv3D; identity skip.
  """
  features: int
  kernel_size: Sequence[int] = (3, 1, 1)
  eps: float = 1e-5
  num_groups: int = 32
  dropout: float = 0.0
  zero_init: bool = True
  frame_norm: bool = False  # GroupNorm statistics per frame (see TemporalConfig.frame_norm)
  lora_rank: int = 0  # > 0: low-rank adapters on conv1 / conv2 (TemporalConfig.lora_convs)
  lora_alpha: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _norm(self, name: str, x: jax.Array) -> jax.Array:
    norm = layers.group_norm(name=name, num_groups=self.num_groups, epsilon=self.eps, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    if not self.frame_norm:
      return norm(x)
    b, t = x.shape[:2]
    return norm(x.reshape((b * t,) + x.shape[2:])).reshape(x.shape)

  @nn.compact
  def __call__(self, x: jax.Array, emb: Optional[jax.Array] = None, *, cond: Optional[jax.Array] = None,
               deterministic: bool = True) -> jax.Array:
    """``x``: ``[b, t, h, w, c]``; ``emb``: per-frame diffusion-time embedding ``[b, t, E]`` (or None);
    ``cond``: ``temporal_cond`` features of this level ``[b, t, h, w, c']`` (or None: no such projection)."""
    if x.shape[-1] != self.features:
      raise ValueError(f"TemporalResBlock keeps the channel count: input has {x.shape[-1]}, features={self.features}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # Keep the time axis unsharded into each 3D conv: XLA's SPMD partitioner (jax 0.10 CPU at least) miscompiles a
    # conv whose input is sharded along the conv's time axis and whose kernel is sharded over the same mesh axis.
    unsharded_time = lambda a: nn.with_logical_constraint(a, ("batch", "frames", None, None, None))  # noqa: E731
    h = self._norm("norm1", x)
    lora = dict(lora_rank=self.lora_rank, lora_alpha=self.lora_alpha)
    h = layers.conv(self.features, self.kernel_size, name="conv1", **lora, **kw)(unsharded_time(nn.silu(h)))
    if emb is not None:
      e = layers.dense(self.features, name="time_emb_proj", **kw)(nn.silu(emb))
      h = h + e[:, :, None, None, :].astype(h.dtype)
    if cond is not None:  # zero-init: a key-frame checkpoint loaded into a predictor is unchanged at first
      h = h + layers.conv(self.features, (1, 1, 1), name="temporal_cond_proj",
                          kernel_init=nn.initializers.zeros_init(), **kw)(cond.astype(self.dtype))
    h = self._norm("norm2", h)
    h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=deterministic)
    # Zero-init makes the block the identity at init, so inserting it leaves the image model unchanged.
    out_init = nn.initializers.zeros_init() if self.zero_init else nn.initializers.lecun_normal()
    h = layers.conv(self.features, self.kernel_size, name="conv2", kernel_init=out_init, **lora, **kw)(
        unsharded_time(h))
    return x + h


# ----------------------------------------------------------------------------------------------------------
# Temporal transformer block.

def frame_window_mask(num_frames: int, max_frame_distance: Optional[int]) -> Optional[jax.Array]:
  """Boolean ``[1, 1, t, t]`` mask, True where ``|i - j| <= max_frame_distance`` (None when unrestricted)."""
  if max_frame_distance is None or max_frame_distance >= num_frames - 1:
    return None
  idx = jnp.arange(num_frames)
  return (jnp.abs(idx[:, None] - idx[None, :]) <= max_frame_distance)[None, None]


class TemporalTransformerBlock(nn.Module):
  """diffusers ``TemporalBasicTransformerBlock`` / sgm ``VideoTransformerBlock`` on ``[(b h w), t, c]`` tokens.

  norm_in + ff_in (GEGLU, residual), norm1 + temporal self-attention (attn1, optionally windowed), optional
  norm2 + cross-attention (attn2), norm3 + ff (GEGLU, residual). The inner width equals ``features`` (as in sgm /
  SVD, where ``time_mix_inner_dim`` is the block width).
  """
  features: int
  num_heads: int
  head_dim: int
  cross_attention: bool = True
  max_frame_distance: Optional[int] = None
  eps: float = 1e-5
  attention_implementation: Optional[str] = None
  lora_rank: int = 0  # > 0: low-rank adapters on the attention projections (TemporalConfig.lora_rank)
  lora_alpha: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
    """Args:
      x: ``[n, t, c]`` with ``n = b * s`` b-major (s = h * w spatial positions per video).
      context: ``[b, m, d]`` (one sequence per video, e.g. the first frame's text) or ``[n, m, d]``; used by attn2.
        None makes attn2 a (windowed) self-attention over frames, as sgm does without a time context.
    Returns:
      ``[n, t, c]``.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n, t, c = x.shape
    if c != self.features:
      raise ValueError(f"expected {self.features} channels, got {c}")
    mask = frame_window_mask(t, self.max_frame_distance)

    def attention(name):
      return layers.Attention(self.num_heads, self.head_dim, implementation=self.attention_implementation,
                              lora_rank=self.lora_rank, lora_alpha=self.lora_alpha, name=name, **kw)

    def norm(name):
      return layers.layer_norm(name=name, epsilon=self.eps, **kw)

    x = layers.FeedForward(name="ff_in", **kw)(norm("norm_in")(x)) + x
    x = attention("attn1")(norm("norm1")(x), mask=mask) + x
    if self.cross_attention:
      h = norm("norm2")(x)
      if context is None:
        h = attention("attn2")(h, mask=mask)
      else:
        # Cross-attention has no query-query interaction, so the queries of all (s, t) of one video can share one
        # copy of that video's context: [b, s*t, c] x [b, m, d] instead of broadcasting the context s times.
        groups = context.shape[0]
        if n % groups:
          raise ValueError(f"context batch {groups} does not divide token batch {n}")
        h = attention("attn2")(h.reshape(groups, (n // groups) * t, c), context.astype(h.dtype)).reshape(n, t, c)
      x = h + x
    return layers.FeedForward(name="ff", **kw)(norm("norm3")(x)) + x


def select_temporal_context(config: TemporalConfig, context: Optional[jax.Array],
                            temporal_context: Optional[jax.Array], num_frames: int) -> Optional[jax.Array]:
  """The temporal cross-attention context ``[b, m, d]`` (None: no cross-attention / self-attention in time).

  ``context`` is the spatial context ``[(b t), m, d]`` (frame-major). An explicit ``temporal_context``
  ``[b, m', d']`` wins (e.g. a second text encoder's tokens: a personalized backbone's spatial layers read its own
  text encoder, the temporal layers the one they trained with); without one, ``use_spatial_context`` takes the first
  frame of ``context`` per video (sgm ``SpatialVideoTransformer``).
  """
  if not config.cross_attention:
    return None
  if temporal_context is not None or not config.use_spatial_context:
    return temporal_context
  return None if context is None else context[::num_frames]


def frame_position_features(num_frames: int, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal (cos | sin) features of frame indices ``0..t-1``: ``[t, dim]`` fp32 (input of temporal_pos_embed)."""
  return layers.sinusoidal_embedding(jnp.arange(num_frames), dim, flip_sin_to_cos=True, downscale_freq_shift=0.0,
                                     max_period=max_period)


class FrameWindows(NamedTuple):
  """Sliding windows of ``size`` frames over a clip of ``t`` (``TemporalConfig.position_window``).

  ``starts`` ``[k]``: first frame of each distinct window; ``window_of`` ``[t]``: the window frame i is computed in;
  ``offset`` ``[t]``: frame i's position inside it. Static numpy: the clip length is a Python int.
  """
  size: int
  starts: np.ndarray
  window_of: np.ndarray
  offset: np.ndarray

  def gather(self, x: jax.Array, pos_emb: jax.Array) -> jax.Array:
    """``x`` ``[b, t, s, c]`` -> tokens ``[(b s k), W, c]`` (video-major) of every window's frames, each plus the
    embedding ``pos_emb`` ``[W, c]`` of its window-relative position."""
    idx = self.starts[:, None] + np.arange(self.size)[None, :]  # [k, W]
    return einops.rearrange(x[:, idx] + pos_emb[None, None, :, None, :], "b k w s c -> (b s k) w c")

  def scatter(self, out: jax.Array, spatial: int) -> jax.Array:
    """Per-window outputs ``[(b s k), W, c]`` -> ``[b, t, s, c]``, frame i taken from its own window."""
    out = einops.rearrange(out, "(b s k) w c -> b k w s c", s=spatial, k=len(self.starts))
    return out[:, self.window_of, self.offset]


def frame_windows(num_frames: int, window: Optional[int]) -> Optional[FrameWindows]:
  """Frame i's window is ``[s_i, s_i + W)``, ``s_i = clip(i - W // 2, 0, t - W)``: centred on i where the clip
  allows, shifted inwards at its ends, so every window is full and its positions ``0..W-1`` are those of a
  ``W``-frame training clip. Frames with the same window share one computation (``t - W + 1`` windows).
  None when ``window`` is None or covers the clip (no windows: the training computation)."""
  if window is None or window >= num_frames:
    return None
  s = np.clip(np.arange(num_frames) - window // 2, 0, num_frames - window)
  starts, window_of = np.unique(s, return_inverse=True)
  return FrameWindows(int(window), starts, window_of.reshape(-1), np.arange(num_frames) - s)


# ----------------------------------------------------------------------------------------------------------
# Mask conditioning of the prediction / interpolation models.

class TemporalConditionEncoder(nn.Module):
  """``temporal_cond``: masked context frames -> one feature map per U-Net level (see the module docstring).

  Per frame: conv_in (3x3) + embedding bias, then for each level a (stride-2 for levels > 0) 3x3 conv and a 3x3
  conv, SiLU in between; the stride-2 convs pad like the U-Net's ``Downsample2D`` so the sizes match its levels.
  """
  level_channels: Tuple[int, ...]
  embed_dim: int
  num_regimes: int = 0
  downsample_padding: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, cond: jax.Array, noise_level: jax.Array, regime: Optional[jax.Array] = None):
    """Args:
      cond: ``[n, h, w, C + 1]`` per-frame ``concat(m * z0, m)`` (n = videos * frames).
      noise_level: ``[n]`` conditioning-augmentation level (diffusion timestep of the noise on known frames).
      regime: ``[n]`` int regime label (only with ``num_regimes``).
    Returns:
      list over levels of ``[n, h / 2**i, w / 2**i, level_channels[i]]``.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ch0 = self.level_channels[0]
    h = layers.conv(ch0, name="conv_in", **kw)(cond.astype(self.dtype))
    level = layers.sinusoidal_embedding(jnp.asarray(noise_level, jnp.float32).reshape(-1), ch0)
    emb = layers.TimestepEmbedding(self.embed_dim, name="noise_level_embedding", **kw)(level.astype(self.dtype))
    if self.num_regimes:
      if regime is None:
        raise ValueError("temporal_cond has a regime embedding (num_regimes): pass the regime label")
      table = nn.Embed(self.num_regimes, self.embed_dim, name="regime_embedding", param_dtype=self.param_dtype,
                       embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")))
      ids = jnp.asarray(regime, jnp.int32).reshape(-1)
      if not isinstance(ids, jax.core.Tracer):
        bad = np.asarray(ids)[(np.asarray(ids) < 0) | (np.asarray(ids) >= self.num_regimes)]
        if bad.size:
          raise ValueError(f"regime labels {sorted(set(bad.tolist()))} out of range: temporal_cond has "
                           f"num_regimes={self.num_regimes}")
      # Traced ids cannot raise: an out-of-range id gives NaN features (the loop's non-finite check stops there)
      # instead of silently borrowing the nearest regime's embedding.
      ids = jnp.where(ids < 0, self.num_regimes, ids)  # take() would wrap negative ids around
      emb = emb + jnp.take(table.embedding, ids, axis=0, mode="fill", fill_value=jnp.nan).astype(emb.dtype)
    h = h + layers.dense(ch0, name="emb_proj", **kw)(nn.silu(emb))[:, None, None, :]
    pad = [(1, 1), (1, 1)] if self.downsample_padding == 1 else [(0, 1), (0, 1)]
    features = []
    for i, ch in enumerate(self.level_channels):
      if i > 0:
        h = layers.conv(ch, strides=(2, 2), padding=pad, name=f"down_{i}", **kw)(nn.silu(h))
      h = h + layers.conv(ch, name=f"block_{i}", **kw)(nn.silu(h))
      features.append(h)
    return features
