"""Shared linen building blocks: logically-partitioned Dense/Conv, norms, embeddings, attention.

Naming contract: module names mirror the PyTorch (diffusers / transformers) attribute names with list
indices written as ``_N`` (``down_blocks.0`` -> ``down_blocks_0``), kernels are called ``kernel``, norm
weights ``scale``. The converter relies on this to map weights mechanically.

Layouts are channels-last: images ``[b, h, w, c]``, videos ``[b, t, h, w, c]``, tokens ``[b, n, c]``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Axes = Tuple[Optional[str], ...]

# Logical axis names used by parameters. Mapping to mesh axes lives in config (see parallel.py).
CONV2D_AXES: Axes = ("conv_h", "conv_w", "conv_in", "conv_out")
CONV3D_AXES: Axes = ("conv_t", "conv_h", "conv_w", "conv_in", "conv_out")
NORM_AXES: Axes = ("norm",)


def _partitioned(init, axes: Axes):
  return nn.with_logical_partitioning(init, axes)


# Factories (not wrapper modules) so param paths stay exactly ``<name>/kernel`` like the PyTorch module tree.

def dense(features: int, *, name: str, axes: Axes = ("embed", "mlp"), use_bias: bool = True,
          kernel_init=nn.initializers.lecun_normal(), dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32, lora_rank: int = 0, lora_alpha: float = 0.0) -> nn.Dense:
  """``nn.Dense`` with kernel ``[in, out]`` / bias ``[out]`` annotated with logical ``axes``.

  ``lora_rank > 0`` adds a low-rank adapter (``LoRA``) under ``<name>/lora``; the base params keep their paths.
  """
  cls, extra = nn.Dense, {}
  if lora_rank:
    cls, extra = LoRADense, dict(lora_rank=lora_rank, lora_alpha=lora_alpha, lora_axes=tuple(axes))
  return cls(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
             kernel_init=_partitioned(kernel_init, axes),
             bias_init=_partitioned(nn.initializers.zeros_init(), axes[-1:]), **extra)


def conv(features: int, kernel_size: Sequence[int] = (3, 3), *, name: str, strides: Sequence[int] | None = None,
         padding: Any = None, use_bias: bool = True, kernel_init=nn.initializers.lecun_normal(),
         dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, lora_rank: int = 0,
         lora_alpha: float = 0.0) -> nn.Conv:
  """2D (``[b,h,w,c]``) or 3D (``[b,t,h,w,c]``) conv with logical axes.

  Default padding is symmetric zero padding of ``k // 2`` per dim, i.e. PyTorch ``padding=k//2``
  (for a (3,1,1) temporal kernel: zero padding in time only). ``lora_rank > 0`` adds a low-rank adapter
  (``LoRA``: a conv of the same kernel size to ``lora_rank`` channels, then a 1x1 conv) under ``<name>/lora``.
  """
  ks = tuple(kernel_size)
  padding = padding if padding is not None else [(k // 2, k // 2) for k in ks]
  axes = CONV2D_AXES if len(ks) == 2 else CONV3D_AXES
  cls, extra = nn.Conv, {}
  if lora_rank:
    cls, extra = LoRAConv, dict(lora_rank=lora_rank, lora_alpha=lora_alpha)
  return cls(features, kernel_size=ks, strides=tuple(strides or (1,) * len(ks)), padding=padding,
             use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
             kernel_init=_partitioned(kernel_init, axes),
             bias_init=_partitioned(nn.initializers.zeros_init(), ("conv_out",)), **extra)


# ----------------------------------------------------------------------------------------------------------
# Low-rank adapters (Hu et al. 2021, "LoRA"): ``y = W x + (alpha / r) * B(A x)``.

LORA_AXIS = "lora_rank"  # logical name of the adapter rank; in no sharding rule, so that dimension is replicated


def lora_scale(rank: int, alpha: float) -> float:
  """``alpha / rank``; ``alpha = 0`` means ``alpha = rank`` (scale 1)."""
  return (alpha or rank) / rank


class LoRA(nn.Module):
  """The low-rank branch ``scale * B(A x)`` of an adapted Dense or Conv; params ``lora_a`` and ``lora_b``.

  Dense: ``lora_a`` ``[in, r]``, ``lora_b`` ``[r, out]``. Conv (``kernel_size`` set): ``lora_a`` is a conv kernel
  ``[*kernel_size, in, r]`` applied with the base conv's strides and padding, ``lora_b`` ``[r, out]`` a 1x1 conv;
  their composition is one conv of the base kernel size, which is what lets ``videoldm_jax.lora`` fold it into the
  base kernel. ``lora_a`` starts like peft's (kaiming-uniform, bound ``1 / sqrt(fan_in)``), ``lora_b`` at zero, so
  an adapted layer initially computes exactly its base layer.

  Input ``[..., in]`` (dense) or ``[b, *spatial, in]`` (conv); output ``[..., out]`` in ``dtype``.
  """
  features: int
  rank: int
  alpha: float = 0.0
  kernel_size: Optional[Tuple[int, ...]] = None  # None: dense
  strides: Optional[Tuple[int, ...]] = None
  padding: Any = None
  axes: Axes = ("embed", "mlp")  # the base kernel's (in, out) logical axes
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ks = tuple(self.kernel_size or ())
    a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    a = self.param("lora_a", _partitioned(a_init, (*self.axes[:-1], LORA_AXIS)), ks + (x.shape[-1], self.rank),
                   self.param_dtype)
    b = self.param("lora_b", _partitioned(nn.initializers.zeros_init(), (LORA_AXIS, self.axes[-1])),
                   (self.rank, self.features), self.param_dtype)
    x, a, b = nn.dtypes.promote_dtype(x, a, b, dtype=self.dtype)
    if ks:
      spatial = "DHW"[-len(ks):]
      padding = self.padding if isinstance(self.padding, str) else tuple(tuple(p) for p in self.padding)
      h = jax.lax.conv_general_dilated(x, a, tuple(self.strides or (1,) * len(ks)), padding,
                                       dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
    else:
      h = x @ a
    return (h @ b) * jnp.asarray(lora_scale(self.rank, self.alpha), h.dtype)


class LoRADense(nn.Dense):
  """``nn.Dense`` (same params, same paths) plus a ``LoRA`` branch named ``lora``."""
  lora_rank: int = 0
  lora_alpha: float = 0.0
  lora_axes: Axes = ("embed", "mlp")

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    y = super().__call__(inputs)
    delta = LoRA(self.features, self.lora_rank, self.lora_alpha, axes=self.lora_axes, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="lora")(inputs)
    return y + delta.astype(y.dtype)


class LoRAConv(nn.Conv):
  """``nn.Conv`` (same params, same paths) plus a ``LoRA`` conv branch named ``lora``."""
  lora_rank: int = 0
  lora_alpha: float = 0.0

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    y = super().__call__(inputs)
    ks = tuple(self.kernel_size)
    dilated = any(d is not None and np.any(np.asarray(d) != 1) for d in (self.input_dilation, self.kernel_dilation))
    if inputs.ndim != len(ks) + 2 or self.feature_group_count != 1 or dilated:
      raise ValueError(f"{self.name}: a conv adapter needs a plain conv on [b, *spatial, c] inputs")
    axes = CONV2D_AXES if len(ks) == 2 else CONV3D_AXES
    delta = LoRA(self.features, self.lora_rank, self.lora_alpha, kernel_size=ks, strides=self.strides,
                 padding=self.padding, axes=axes, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="lora")(inputs)
    return y + delta.astype(y.dtype)


def group_norm(*, name: str, num_groups: int = 32, epsilon: float = 1e-5, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32) -> nn.GroupNorm:
  """GroupNorm over channels (last axis); reduces over every non-batch axis, so on ``[b,t,h,w,c]`` it
  normalises over t too, exactly like PyTorch GroupNorm on ``[b,c,t,h,w]``. Statistics are fp32."""
  return nn.GroupNorm(num_groups=num_groups, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
                      scale_init=_partitioned(nn.initializers.ones_init(), NORM_AXES),
                      bias_init=_partitioned(nn.initializers.zeros_init(), NORM_AXES))


def layer_norm(*, name: str, epsilon: float = 1e-5, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
                      scale_init=_partitioned(nn.initializers.ones_init(), NORM_AXES),
                      bias_init=_partitioned(nn.initializers.zeros_init(), NORM_AXES))


def sinusoidal_embedding(positions: jax.Array, dim: int, *, flip_sin_to_cos: bool = True,
                         downscale_freq_shift: float = 0.0, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) positions/timesteps.

  Args:
    positions: ``[n]`` float or int.
    dim: embedding size.
    flip_sin_to_cos: ``cos | sin`` order (SD / sgm) instead of ``sin | cos``.
    downscale_freq_shift: diffusers' ``freq_shift`` (0 for SD, 1 for some ADM variants).
  Returns:
    ``[n, dim]`` float32.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
  args = positions.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2 == 1:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """diffusers ``TimestepEmbedding``: linear_1 -> SiLU -> linear_2. [n, c_in] -> [n, out]."""
  features: int
  out_features: Optional[int] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = dense(self.features, name="linear_1", **kw)(x)
    x = nn.silu(x)
    return dense(self.out_features or self.features, axes=("mlp", "embed"), name="linear_2", **kw)(x)


# "splash": the Pallas splash-attention kernel on TPU for self-attention over at least this many tokens (SD's
# 20x32 = 640-token level 1 and 40x64 = 2560-token level 0); shorter sequences (lower levels, temporal attention
# over a clip's frames, text cross-attention) keep ``_xla_attention``, which is as fast there.
SPLASH_MIN_SEQ = 512
# Tokens per grid step: a whole sequence while it times the lane-padded head dim stays within these many elements,
# else _SPLASH_BLOCK-token blocks. Whole key blocks (SD's 2560 tokens x 40-dim heads) make one pass over the keys
# per query block and leave no per-key-block dq partials for XLA to sum; the limits keep the fused backward's fp32
# dk / dv accumulators in VMEM (4096 x 128 overflows it on v5p).
_SPLASH_BLOCK = 512
_SPLASH_Q_ELEMENTS, _SPLASH_KV_ELEMENTS = 1024 * 128, 2560 * 128
_LANES = 128


def _splash_attention(q, k, v, *, interpret: bool = False):
  """``[b, n, h, d]`` self-attention through the TPU splash kernel (the batch split over the context mesh's batch
  axes with ``shard_map``). Lowers for TPU only, or anywhere with ``interpret`` (Pallas' interpreter: the same
  kernel, slowly; what the CPU tests check it with).

  q, k and v go in sequence-minor (``[h, d, n]`` per example): a 40-dim head minor in HBM occupies 128 lanes, so
  the head-minor layout (or zero-padding the head to 128) moves 3.2x the bytes through every transpose around the
  kernel; the MXU pads the head inside the kernel either way."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sk  # pylint: disable=g-import-not-at-top
  _, n, h, d = q.shape
  to_kernel = lambda x: jnp.swapaxes(x, 1, 2)  # [b, h, n, d]; the kernel takes its own layout from there
  block = lambda limit: n if n * _LANES * -(-d // _LANES) <= limit else math.gcd(n, _SPLASH_BLOCK)
  block_q, block_kv = block(_SPLASH_Q_ELEMENTS), block(_SPLASH_KV_ELEMENTS)
  seq_minor = sk.QKVLayout.SEQ_MINOR
  # One fused backward kernel (dq, dk, dv from one recomputation of the probabilities: 5 matmuls per block instead
  # of the separate dq and dkv kernels' 3 + 4).
  sizes = sk.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_q, block_q_dkv=block_q,
                        block_kv_dkv=block_kv, block_kv_dkv_compute=block_q, use_fused_bwd_kernel=True,
                        q_layout=seq_minor, k_layout=seq_minor, v_layout=seq_minor)
  kernel = jax.vmap(sk.make_splash_mha(sk.MultiHeadMask([sk.FullMask((n, n))] * h), head_shards=1,
                                       q_seq_shards=1, block_sizes=sizes, interpret=interpret))
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:  # a Pallas call is opaque to the SPMD partitioner: run it per batch shard
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and q.shape[0] % mesh.shape[a] == 0)
    spec = jax.sharding.PartitionSpec(axes or None)
    kernel = jax.shard_map(kernel, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)
  out = kernel(to_kernel(q) * (d ** -0.5), to_kernel(k), to_kernel(v))
  return jnp.swapaxes(out, 1, 2)


# Attention whose queries and keys both number at most this many (temporal attention over a clip's frames) runs as
# a broadcast multiply-reduce on TPU / GPU (``_short_attention``): XLA's dot_general would pad the 8 x 8 score tiles
# and the 40-dim heads to 128 lanes and run memory-bound (SD 1.5 level 0, 8 frames, 8 clips per v5p device: 8.2 ms
# of compiler estimate fwd + bwd per layer, 2.1 ms as multiply-reduce).
SHORT_ATTENTION_TOKENS = 32


def _short_attention(q, k, v, mask=None):
  """``[b, n, h, d]`` attention computed elementwise in fp32 (no matmul): logits ``sum_d q k``, softmax over keys,
  ``sum_k p v``. For a few queries and keys only: the products are ``n_q x n_k x d`` per head."""
  d = q.shape[-1]
  q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
  logits = jnp.sum(q32[:, :, None] * k32[:, None], axis=-1) * (d ** -0.5)  # [b, nq, nk, h]
  if mask is not None:
    mask = jnp.broadcast_to(mask, (logits.shape[0], logits.shape[3]) + logits.shape[1:3])  # [b, h, nq, nk]
    logits = jnp.where(jnp.transpose(mask, (0, 2, 3, 1)), logits, _MASKED_LOGIT)
  p = jax.nn.softmax(logits, axis=2)
  return jnp.sum(p[..., None] * v32[:, None], axis=2).astype(q.dtype)  # [b, nq, h, d]


def _xla_attention(q, k, v, mask=None):
  """XLA's attention (``jax.nn.dot_product_attention``), or ``_short_attention`` for a few queries and keys."""
  if max(q.shape[1], k.shape[1]) <= SHORT_ATTENTION_TOKENS:
    return _short_attention(q, k, v, mask)
  return jax.nn.dot_product_attention(q, k, v, mask=mask)


def splash_applies(nq: int, nk: int, head_dim: int, mask, self_attention: bool) -> bool:
  """Whether ``implementation="splash"`` uses the kernel for this attention (else XLA's attention)."""
  return (self_attention and mask is None and nq == nk and nq >= SPLASH_MIN_SEQ and nq % _LANES == 0
          and head_dim <= 256)


# "blockwise": flash-style attention in plain JAX. Queries and keys/values are split into blocks of at most these
# many tokens; the largest temporary is one [b, heads, q_block, kv_block] fp32 logits block instead of the
# [b, heads, n_q, n_k] score matrix.
BLOCKWISE_Q_BLOCK = 512
BLOCKWISE_KV_BLOCK = 1024
# implementation=None: attention whose score matrix has this many logits per image and head (8192 x 8192: 256 MiB
# in fp32) or more runs blockwise. Below it (SD's 4096-token level 0 at 512 px, text, frames) XLA's attention.
AUTO_BLOCKWISE_SCORES = 8192 * 8192
# The logit jax.nn.dot_product_attention gives masked-out keys: finite, so a fully masked row averages every key.
_MASKED_LOGIT = -0.7 * float(np.finfo(np.float32).max)

# implementation=None on CPU (``_cpu_attention``): self/cross attention with at least this many queries and keys
# runs blockwise in blocks of these sizes (SD's 4096-token self-attention, 8 x 40-dim heads, batch 2, fp32 on 2
# cores: 0.34 s, against 1.8 s for jax.nn.dot_product_attention and 0.30 s for PyTorch's fused CPU kernel).
CPU_BLOCKWISE_TOKENS = 512
CPU_Q_BLOCK, CPU_KV_BLOCK = 256, 512

IMPLEMENTATIONS = (None, "xla", "cudnn", "splash", "blockwise")


def check_implementation(implementation: Optional[str], what: str = "implementation") -> Optional[str]:
  """Returns ``implementation``; raises ``ValueError`` naming ``what`` unless it is one of ``IMPLEMENTATIONS``."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"{what}={implementation!r}: expected one of {IMPLEMENTATIONS}")
  return implementation


def _split(n: int, block: int) -> Tuple[int, int]:
  """``(count, size)``: the fewest blocks of at most ``block`` tokens covering ``n``, as even as possible (the
  padding ``count * size - n`` is below ``count``)."""
  if block < 1:
    raise ValueError(f"attention block size must be >= 1, got {block}")
  count = -(-n // min(block, n))
  return count, -(-n // count)


def _to_blocks(x, count: int, size: int, axis: int = 2):
  """Zero-pads ``axis`` to ``count * size`` and moves the block index to the front: ``[b, h, n, ...]`` ->
  ``[count, b, h, size, ...]`` (for ``axis=2``)."""
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, count * size - x.shape[axis])
  x = jnp.pad(x, pad)
  return jnp.moveaxis(x.reshape(x.shape[:axis] + (count, size) + x.shape[axis + 1:]), axis, 0)


def _from_blocks(x, n: int):
  """``[count, b, h, size, ...]`` -> ``[b, h, n, ...]`` (drops the padding)."""
  x = jnp.moveaxis(x, 0, 2)
  return x.reshape(x.shape[:2] + (-1,) + x.shape[4:])[:, :, :n]


class _Blocks:
  """Static block layout of one blockwise attention call and the logits of block ``(i, j)``."""

  def __init__(self, nq: int, nk: int, head_dim: int, mask, q_block: int, kv_block: int):
    self.nq, self.nk = nq, nk
    self.nqb, self.qb = _split(nq, q_block)
    self.nkb, self.kb = _split(nk, kv_block)
    self.scale = 1.0 / math.sqrt(head_dim)  # jax.nn.dot_product_attention's default, applied to fp32 logits
    self.mask_q = self.mask_k = False
    if mask is not None:
      # [mb, mh, mq, mk] -> [nqb, nkb, mb, mh, qb, kb]; an axis of size 1 stays whole (a key padding mask
      # [b, 1, 1, nk] is not broadcast over the queries). Padded query rows are dropped (True keeps them ordinary
      # rows); padded keys are removed in ``logits``.
      mask = jnp.asarray(mask, bool).reshape((1,) * (4 - mask.ndim) + mask.shape)
      mb, mh, mq, mk = mask.shape
      self.mask_q, self.mask_k = mq != 1, mk != 1
      nqb, qb = (self.nqb, self.qb) if self.mask_q else (1, 1)
      nkb, kb = (self.nkb, self.kb) if self.mask_k else (1, 1)
      mask = jnp.pad(mask, ((0, 0), (0, 0), (0, nqb * qb - mq), (0, 0)), constant_values=True)
      mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, nkb * kb - mk)), constant_values=False)
      mask = mask.reshape(mb, mh, nqb, qb, nkb, kb).transpose(2, 4, 0, 1, 3, 5)
    self.mask = mask

  def logits(self, qi, kj, i, j):
    """fp32 scaled logits ``[b, h, qb, kb]`` of query block ``qi`` ``[b, h, qb, d]`` (index ``i``) against key
    block ``kj`` ``[b, h, kb, d]`` (index ``j``): masked keys at jax's large negative logit, padding keys at -inf."""
    s = jnp.einsum("bhqd,bhkd->bhqk", qi, kj, preferred_element_type=jnp.float32) * self.scale
    if self.mask is not None:
      s = jnp.where(self.mask_block(i, j), s, _MASKED_LOGIT)
    if self.nkb * self.kb != self.nk:  # padding keys never count, not even in a fully masked row
      s = jnp.where(j * self.kb + jnp.arange(self.kb) < self.nk, s, -jnp.inf)
    return s

  def mask_block(self, i, j):
    """``[mb, mh, qb or 1, kb or 1]`` mask of block ``(i, j)``."""
    return self.mask[i if self.mask_q else 0, j if self.mask_k else 0]


# The blockwise kernels work heads-major (``[b, h, n, d]``): every block product is then a plain batched matmul
# over contiguous rows, which XLA:CPU runs 2.5-5x faster than the same einsums on ``[b, n, h, d]`` (and the TPU /
# GPU compilers choose their own layouts either way).

def _blockwise_forward(q, k, v, mask, q_block, kv_block):
  """Online softmax on heads-major ``q`` ``[b, h, nq, d]``, ``k`` / ``v`` ``[b, h, nk, d(v)]``: a ``lax.map``
  over query blocks, each a ``lax.scan`` over key blocks carrying the running max ``m``, the running sum ``l``
  (both ``[b, h, qb]`` fp32) and the unnormalised output (fp32). Returns the output ``[b, h, nq, dv]`` and the
  blocked ``m``, ``l`` ``[nqb, b, h, qb]`` for the backward pass."""
  b, h, nq, d = q.shape
  nk, dv = k.shape[2], v.shape[-1]
  blk = _Blocks(nq, nk, d, mask, q_block, kv_block)
  kbs, vbs = _to_blocks(k, blk.nkb, blk.kb), _to_blocks(v, blk.nkb, blk.kb)

  def q_block_fn(args):
    qi, i = args

    def kv_step(carry, xs):
      m, l, acc = carry
      kj, vj, j = xs
      s = blk.logits(qi, kj, i, j)
      # Every key block holds a real key (padding < one block), so m_new is finite and nothing is inf - inf.
      m_new = jnp.maximum(m, s.max(-1))
      alpha = jnp.exp(m - m_new)
      p = jnp.exp(s - m_new[..., None])
      l = alpha * l + p.sum(-1)
      pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), vj, preferred_element_type=jnp.float32)
      return (m_new, l, acc * alpha[..., None] + pv), None

    init = (jnp.full((b, h, blk.qb), -jnp.inf, jnp.float32), jnp.zeros((b, h, blk.qb), jnp.float32),
            jnp.zeros((b, h, blk.qb, dv), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(kv_step, init, (kbs, vbs, jnp.arange(blk.nkb)))
    return (acc / l[..., None]).astype(q.dtype), m, l

  out, m, l = jax.lax.map(q_block_fn, (_to_blocks(q, blk.nqb, blk.qb), jnp.arange(blk.nqb)))
  return _from_blocks(out, nq), (m, l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blockwise(q, k, v, mask, q_block, kv_block):
  return _blockwise_forward(q, k, v, mask, q_block, kv_block)[0]


def _blockwise_fwd(q, k, v, mask, q_block, kv_block):
  out, stats = _blockwise_forward(q, k, v, mask, q_block, kv_block)
  return out, (q, k, v, mask, out, stats)


def _blockwise_bwd(q_block, kv_block, res, dout):
  """Recomputes each probability block from the saved row statistics (flash-attention's backward): a scan over
  query blocks carrying the fp32 dk / dv accumulators, each a scan over key blocks carrying dq of the block."""
  q, k, v, mask, out, (m, l) = res
  b, h, nq, d = q.shape
  nk = k.shape[2]
  blk = _Blocks(nq, nk, d, mask, q_block, kv_block)
  kbs, vbs = _to_blocks(k, blk.nkb, blk.kb), _to_blocks(v, blk.nkb, blk.kb)
  dout = dout.astype(q.dtype)
  dobs = _to_blocks(dout, blk.nqb, blk.qb)  # zero on padded query rows: they contribute nothing
  # delta_i = sum_j p_ij dp_ij = <dout_i, out_i>
  delta = _to_blocks(jnp.einsum("bhqd,bhqd->bhq", dout, out, preferred_element_type=jnp.float32),
                     blk.nqb, blk.qb)

  def q_step(carry, xs):
    dk_acc, dv_acc = carry
    qi, doi, mi, li, deltai, i = xs

    def kv_step(dqi, xs):
      kj, vj, dkj, dvj, j = xs
      p = jnp.exp(blk.logits(qi, kj, i, j) - mi[..., None]) / li[..., None]
      dvj = dvj + jnp.einsum("bhqk,bhqd->bhkd", p.astype(v.dtype), doi, preferred_element_type=jnp.float32)
      dp = jnp.einsum("bhqd,bhkd->bhqk", doi, vj, preferred_element_type=jnp.float32)
      ds = p * (dp - deltai[..., None])
      if blk.mask is not None:  # a masked logit is a constant: no gradient flows through it
        ds = jnp.where(blk.mask_block(i, j), ds, 0.0)
      ds = (ds * blk.scale).astype(q.dtype)
      dqi = dqi + jnp.einsum("bhqk,bhkd->bhqd", ds, kj, preferred_element_type=jnp.float32)
      dkj = dkj + jnp.einsum("bhqk,bhqd->bhkd", ds, qi, preferred_element_type=jnp.float32)
      return dqi, (dkj, dvj)

    dqi, (dk_acc, dv_acc) = jax.lax.scan(kv_step, jnp.zeros(qi.shape, jnp.float32),
                                         (kbs, vbs, dk_acc, dv_acc, jnp.arange(blk.nkb)))
    return (dk_acc, dv_acc), dqi

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  (dk, dv), dq = jax.lax.scan(q_step, (zeros(kbs), zeros(vbs)),
                              (_to_blocks(q, blk.nqb, blk.qb), dobs, m, l, delta, jnp.arange(blk.nqb)))
  return (_from_blocks(dq, nq).astype(q.dtype), _from_blocks(dk, nk).astype(k.dtype),
          _from_blocks(dv, nk).astype(v.dtype), None)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def _heads_major(*xs):
  """``[b, n, h, d]`` <-> ``[b, h, n, d]`` for each of ``xs``."""
  return tuple(jnp.swapaxes(x, 1, 2) for x in xs)


def blockwise_attention(q, k, v, mask: Optional[jax.Array] = None, *, q_block: Optional[int] = None,
                        kv_block: Optional[int] = None):
  """Attention that never materialises the ``[b, h, n_q, n_k]`` scores, in plain JAX (every backend and XLA's
  cost model see it).

  Queries go in blocks of at most ``q_block`` tokens (default ``BLOCKWISE_Q_BLOCK``), keys/values in blocks of at
  most ``kv_block`` (default ``BLOCKWISE_KV_BLOCK``), both clipped to the sequence and evened out; lengths that
  are not multiples are zero-padded and the padding masked. Softmax statistics and accumulators are fp32, the
  output has the input dtype. The backward pass (``custom_vjp``) saves only the output and two fp32 numbers per
  query row and recomputes the probabilities block by block, so its temporaries are O(q_block * kv_block) per
  head as well. Matches ``jax.nn.dot_product_attention`` (scale ``d ** -0.5``), including a fully masked row:
  the mean of every value, with zero gradient to q and k.

  Args:
    q: ``[b, n_q, h, d]``.
    k: ``[b, n_k, h, d]``.
    v: ``[b, n_k, h, d_v]``.
    mask: boolean, broadcastable to ``[b, h, n_q, n_k]`` (each axis full or 1); True = attend.
  Returns:
    ``[b, n_q, h, d_v]`` in ``q.dtype``.
  """
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_ or mask.ndim > 4:
      raise ValueError(f"blockwise attention: mask must be boolean of rank <= 4, got {mask.dtype}{mask.shape}")
    jnp.broadcast_shapes(mask.shape, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
  out = _blockwise(*_heads_major(q, k, v), mask, BLOCKWISE_Q_BLOCK if q_block is None else q_block,
                   BLOCKWISE_KV_BLOCK if kv_block is None else kv_block)
  return _heads_major(out)[0]


def _heads_major_attention(q, k, v, mask: Optional[jax.Array] = None):
  """``jax.nn.dot_product_attention``'s result (same scale, masked logit and fp32 softmax) computed heads-major
  with the normalisation after the value product. ``[b, n, h, d]`` in and out."""
  q, k, v = _heads_major(q, k, v)
  s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * (1.0 / math.sqrt(q.shape[-1]))
  if mask is not None:
    s = jnp.where(mask, s, _MASKED_LOGIT)
  p = jnp.exp(s - jax.lax.stop_gradient(s.max(-1, keepdims=True)))
  out = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return _heads_major((out / p.sum(-1, keepdims=True)).astype(q.dtype))[0]


def _cpu_attention(q, k, v, mask: Optional[jax.Array] = None):
  """``implementation=None`` on CPU: heads-major, blockwise once queries and keys both reach
  ``CPU_BLOCKWISE_TOKENS`` (CPU-sized blocks), else in one piece. ``[b, n, h, d]`` in and out."""
  if min(q.shape[1], k.shape[1]) >= CPU_BLOCKWISE_TOKENS:
    return blockwise_attention(q, k, v, mask, q_block=CPU_Q_BLOCK, kv_block=CPU_KV_BLOCK)
  return _heads_major_attention(q, k, v, mask)


def dot_product_attention(q, k, v, *, num_heads: int, mask: Optional[jax.Array] = None,
                          implementation: Optional[str] = None, self_attention: bool = False):
  """Multi-head scaled dot-product attention on ``[b, n, c]`` tensors (c = heads * head_dim).

  ``mask``: boolean, broadcastable to ``[b, heads, n_q, n_k]``; True = attend.
  ``implementation`` (one of ``IMPLEMENTATIONS``, else ``ValueError``): ``"splash"`` runs long self-attention
  (``splash_applies``) through the Pallas splash kernel when compiled for TPU (XLA's attention on other platforms
  and for every other attention); ``"blockwise"`` runs attention longer than one block (``BLOCKWISE_Q_BLOCK`` queries or
  ``BLOCKWISE_KV_BLOCK`` keys) through ``blockwise_attention`` (flash-style, plain JAX, no ``n_q x n_k`` scores) and
  shorter attention (frames, text) through XLA's; ``"xla"`` / ``"cudnn"`` are passed to
  ``jax.nn.dot_product_attention`` ("cudnn" for fused GPU). None (the default) is XLA's attention unless its score
  matrix would hold ``AUTO_BLOCKWISE_SCORES`` or more logits per image and head (whole-frame sampling of a model
  trained on crops, 576x1024 latents, ...): those run blockwise, since XLA would materialise gigabytes of logits.
  With None, and for the attention "splash" leaves to XLA, up to ``SHORT_ATTENTION_TOKENS`` queries and keys (a
  clip's frames) run as a multiply-reduce (``_short_attention``).
  On CPU, None is ``_cpu_attention`` (heads-major, blockwise from ``CPU_BLOCKWISE_TOKENS``): same values, several
  times faster there.
  Softmax runs in fp32 regardless of the input dtype.
  """
  check_implementation(implementation)
  b, nq, c = q.shape
  nk = k.shape[1]
  head_dim = c // num_heads
  q = q.reshape(b, nq, num_heads, head_dim)
  k = k.reshape(b, nk, num_heads, head_dim)
  v = v.reshape(b, nk, num_heads, v.shape[-1] // num_heads)
  if implementation == "splash":
    xla = lambda q, k, v: _xla_attention(q, k, v, mask)
    if splash_applies(nq, nk, head_dim, mask, self_attention):
      out = jax.lax.platform_dependent(q, k, v, tpu=_splash_attention, default=xla)
    else:
      out = xla(q, k, v)
  elif implementation == "blockwise" and (nq > BLOCKWISE_Q_BLOCK or nk > BLOCKWISE_KV_BLOCK):
    out = blockwise_attention(q, k, v, mask)
  elif implementation == "blockwise":  # one block: XLA's scores are no larger than a block, and need no loop
    out = jax.nn.dot_product_attention(q, k, v, mask=mask)
  elif implementation is None:
    auto = blockwise_attention if nq * nk >= AUTO_BLOCKWISE_SCORES else _xla_attention
    # The platform of the compile picks the branch: an AOT compile for TPU on a CPU host gets ``auto``.
    out = jax.lax.platform_dependent(q, k, v, cpu=lambda q, k, v: _cpu_attention(q, k, v, mask),
                                     default=lambda q, k, v: auto(q, k, v, mask))
  else:
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
  return out.reshape(b, nq, -1)


# Attention building blocks shared by the spatial (attention.py) and temporal (temporal.py) transformers.

class Attention(nn.Module):
  """Multi-head attention with separate q/k/v projections (diffusers ``Attention``).

  Self-attention when ``context`` is None, else cross-attention to ``context`` (any width: to_k/to_v
  adapt to it). q/k/v carry no bias, the output projection does (SD convention).

  Attributes:
    heads: number of heads.
    head_dim: channels per head (inner width = heads * head_dim).
    out_features: output width; defaults to the query width.
    implementation: see ``dot_product_attention`` (None = XLA, "cudnn" = fused GPU kernel, "splash" = Pallas
      splash kernel on TPU for long self-attention, "blockwise" = flash-style attention in plain JAX).
    lora_rank, lora_alpha: low-rank adapters on the four projections (``<proj>/lora/lora_{a,b}``; 0 = none).
  """
  heads: int
  head_dim: int
  out_features: Optional[int] = None
  implementation: Optional[str] = None
  lora_rank: int = 0  # > 0: low-rank adapters on to_q / to_k / to_v / to_out_0 (``LoRA``)
  lora_alpha: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: Optional[jax.Array] = None, *,
               mask: Optional[jax.Array] = None) -> jax.Array:
    """``x`` ``[b, n, c]``, ``context`` ``[b, m, d]`` or None, ``mask`` bool broadcastable to ``[b, heads, n, m]``."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    inner = self.heads * self.head_dim
    context = x if context is None else context
    kw.update(lora_rank=self.lora_rank, lora_alpha=self.lora_alpha)
    q = dense(inner, use_bias=False, axes=("embed", "heads"), name="to_q", **kw)(x)
    k = dense(inner, use_bias=False, axes=("embed", "heads"), name="to_k", **kw)(context)
    v = dense(inner, use_bias=False, axes=("embed", "heads"), name="to_v", **kw)(context)
    # Logits and softmax are float32 for any input dtype (what diffusers' ``upcast_attention`` buys in fp16).
    out = dot_product_attention(q, k, v, num_heads=self.heads, mask=mask, implementation=self.implementation,
                                self_attention=context is x)
    return dense(self.out_features or x.shape[-1], axes=("heads", "embed"), name="to_out_0", **kw)(out)


class GEGLU(nn.Module):
  """``proj`` to twice the width, then ``value * gelu(gate)`` (exact erf GELU, as PyTorch's default)."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = dense(2 * self.features, name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(x)
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
    return dense(self.out_features or x.shape[-1], axes=("mlp", "embed"), name="net_2", **kw)(h)
