"""Shared linen building blocks: logically-partitioned Dense/Conv, norms, embeddings, attention.

Naming contract: module names mirror the PyTorch (diffusers / transformers) attribute names with list
indices written as ``_N`` (``down_blocks.0`` -> ``down_blocks_0``), kernels are called ``kernel``, norm
weights ``scale``. The converter relies on this to map weights mechanically.

Layouts are channels-last: images ``[b, h, w, c]``, videos ``[b, t, h, w, c]``, tokens ``[b, n, c]``.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

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
          param_dtype: Dtype = jnp.float32) -> nn.Dense:
  """``nn.Dense`` with kernel ``[in, out]`` / bias ``[out]`` annotated with logical ``axes``."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=_partitioned(kernel_init, axes),
                  bias_init=_partitioned(nn.initializers.zeros_init(), axes[-1:]))


def conv(features: int, kernel_size: Sequence[int] = (3, 3), *, name: str, strides: Sequence[int] | None = None,
         padding: Any = None, use_bias: bool = True, kernel_init=nn.initializers.lecun_normal(),
         dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> nn.Conv:
  """2D (``[b,h,w,c]``) or 3D (``[b,t,h,w,c]``) conv with logical axes.

  Default padding is symmetric zero padding of ``k // 2`` per dim, i.e. PyTorch ``padding=k//2``
  (for a (3,1,1) temporal kernel: zero padding in time only).
  """
  ks = tuple(kernel_size)
  padding = padding if padding is not None else [(k // 2, k // 2) for k in ks]
  axes = CONV2D_AXES if len(ks) == 2 else CONV3D_AXES
  return nn.Conv(features, kernel_size=ks, strides=tuple(strides or (1,) * len(ks)), padding=padding,
                 use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                 kernel_init=_partitioned(kernel_init, axes),
                 bias_init=_partitioned(nn.initializers.zeros_init(), ("conv_out",)))


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
# 40x64 = 2560-token level); shorter sequences (lower levels, temporal attention over <= 16 frames, text
# cross-attention) keep XLA's attention, which is as fast there.
SPLASH_MIN_SEQ = 1024
_SPLASH_BLOCK = 512
_LANES = 128


def _splash_attention(q, k, v):
  """``[b, n, h, d]`` self-attention through the TPU splash kernel (head_dim zero-padded to the 128 lanes;
  the batch split over the context mesh's batch axes with ``shard_map``). Lowers for TPU only."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sk  # pylint: disable=g-import-not-at-top
  _, n, h, d = q.shape
  pad = (-d) % _LANES
  to_kernel = lambda x: jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, 0), (0, pad)))  # [b, h, n, d']
  block = math.gcd(n, _SPLASH_BLOCK)
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  kernel = jax.vmap(sk.make_splash_mha(sk.MultiHeadMask([sk.FullMask((n, n))] * h), head_shards=1,
                                       q_seq_shards=1, block_sizes=sizes))
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:  # a Pallas call is opaque to the SPMD partitioner: run it per batch shard
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and q.shape[0] % mesh.shape[a] == 0)
    spec = jax.sharding.PartitionSpec(axes or None)
    kernel = jax.shard_map(kernel, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)
  out = kernel(to_kernel(q) * (d ** -0.5), to_kernel(k), to_kernel(v))
  return jnp.swapaxes(out[..., :d], 1, 2)


def splash_applies(nq: int, nk: int, head_dim: int, mask, self_attention: bool) -> bool:
  """Whether ``implementation="splash"`` uses the kernel for this attention (else XLA's attention)."""
  return (self_attention and mask is None and nq == nk and nq >= SPLASH_MIN_SEQ and nq % _LANES == 0
          and head_dim <= 256)


def dot_product_attention(q, k, v, *, num_heads: int, mask: Optional[jax.Array] = None,
                          implementation: Optional[str] = None, self_attention: bool = False):
  """Multi-head scaled dot-product attention on ``[b, n, c]`` tensors (c = heads * head_dim).

  ``mask``: boolean, broadcastable to ``[b, heads, n_q, n_k]``; True = attend.
  ``implementation``: ``"splash"`` runs long self-attention (``splash_applies``) through the Pallas splash kernel
  when compiled for TPU (XLA's attention on other platforms and for every other attention); anything else is
  passed to ``jax.nn.dot_product_attention`` (None = XLA picks; "cudnn" for fused GPU).
  Softmax runs in fp32 regardless of the input dtype.
  """
  b, nq, c = q.shape
  nk = k.shape[1]
  head_dim = c // num_heads
  q = q.reshape(b, nq, num_heads, head_dim)
  k = k.reshape(b, nk, num_heads, head_dim)
  v = v.reshape(b, nk, num_heads, v.shape[-1] // num_heads)
  if implementation == "splash":
    xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask)
    if splash_applies(nq, nk, head_dim, mask, self_attention):
      out = jax.lax.platform_dependent(q, k, v, tpu=_splash_attention, default=xla)
    else:
      out = xla(q, k, v)
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
      splash kernel on TPU for long self-attention).
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
