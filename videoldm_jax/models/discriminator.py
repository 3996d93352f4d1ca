"""PatchGAN discriminator (pix2pix / taming ``NLayerDiscriminator``) for frames or clips, its losses, and the
adaptive generator weight of VQGAN / LDM autoencoder training.

Layout (``n_layers = 3``, ``ndf = 64``; module names are the indices of taming's ``nn.Sequential`` ``main``)::

  main_0   conv k4 s2, ndf                  LeakyReLU(0.2)
  main_2   conv k4 s2, 2 ndf   main_3 norm  LeakyReLU(0.2)
  main_5   conv k4 s2, 4 ndf   main_6 norm  LeakyReLU(0.2)
  main_8   conv k4 s1, 8 ndf   main_9 norm  LeakyReLU(0.2)
  main_11  conv k4 s1, 1       -> one logit per patch (70x70 px receptive field)

Differences from taming / sgm, on purpose:

* **Norm**: GroupNorm (``norm="group"``, 32 groups or fewer when channels are few) or none, instead of BatchNorm.
  BatchNorm carries running statistics (mutable state outside the param tree) and couples the examples of a
  batch across data-parallel shards; GroupNorm is per example, so the discriminator is a pure function of its
  params and sharding-agnostic. Convs before a norm have no bias (the norm's bias replaces it), as in taming.
* **dims=3** (video): Conv3D with kernel (3, 4, 4), strides (1, 2, 2), zero padding 1 everywhere. The time kernel
  is odd and the time stride 1, so the logits keep the clip length ``[b, t, h', w', 1]`` and a clip of any length
  t >= 1 works; the temporal receptive field is 1 + 2 * (n_layers + 2) = 11 frames for n_layers = 3. GroupNorm on
  ``[b, t, h, w, c]`` normalises over time as well (statistics per clip).
* Init: N(0, 0.02) conv kernels (taming's ``weights_init``); norm scale 1, biases 0.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from videoldm_jax.models.layers import conv, group_norm

Dtype = Any

LEAKY_SLOPE = 0.2


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
  in_channels: int = 3
  ndf: int = 64
  n_layers: int = 3
  dims: int = 2          # 2: frames [b, h, w, c]; 3: clips [b, t, h, w, c] (Conv3D, kernel (time_kernel, 4, 4))
  norm: str = "group"    # group | none
  time_kernel: int = 3   # dims=3 only; odd, so time padding (k - 1) / 2 keeps t

  def __post_init__(self):
    if self.dims not in (2, 3):
      raise ValueError(f"DiscriminatorConfig.dims={self.dims}: expected 2 (frames) or 3 (clips)")
    if self.norm not in ("group", "none"):
      raise ValueError(f"DiscriminatorConfig.norm={self.norm!r}: expected 'group' or 'none'")
    if self.time_kernel % 2 != 1:
      raise ValueError(f"DiscriminatorConfig.time_kernel={self.time_kernel} must be odd")
    if self.n_layers < 1:
      raise ValueError(f"DiscriminatorConfig.n_layers={self.n_layers} must be >= 1")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict())

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "DiscriminatorConfig":
    return cls(**d)

  @classmethod
  def from_json(cls, s: str) -> "DiscriminatorConfig":
    return cls.from_dict(json.loads(s))

  @classmethod
  def patchgan(cls) -> "DiscriminatorConfig":
    """taming / LDM ``NLayerDiscriminator(input_nc=3, ndf=64, n_layers=3)`` for frames (2.8M params)."""
    return cls()

  @classmethod
  def patchgan_3d(cls) -> "DiscriminatorConfig":
    """The same for clips: the Video LDM decoder's patch-wise temporal discriminator."""
    return cls(dims=3)

  @classmethod
  def tiny(cls, dims: int = 2) -> "DiscriminatorConfig":
    return cls(ndf=8, n_layers=2, dims=dims)

  def channels(self) -> Tuple[int, ...]:
    """Output channels of the hidden convs: ``ndf * min(2^i, 8)`` for i = 0 .. n_layers."""
    return tuple(self.ndf * min(2 ** i, 8) for i in range(self.n_layers + 1))


def _groups(channels: int) -> int:
  """32 groups like the rest of the project when channels allow it, else the largest divisor <= 32."""
  return max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)


class NLayerDiscriminator(nn.Module):
  """Frames ``[b, h, w, c]`` (dims=2) or clips ``[b, t, h, w, c]`` (dims=3) -> patch logits ``[..., h', w', 1]``."""
  config: DiscriminatorConfig = DiscriminatorConfig()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    if x.ndim != cfg.dims + 2:
      raise ValueError(f"NLayerDiscriminator(dims={cfg.dims}) expects a {cfg.dims + 2}-D input, got {x.shape}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    kt = cfg.time_kernel
    kernel = (4, 4) if cfg.dims == 2 else (kt, 4, 4)
    pad = [(1, 1), (1, 1)] if cfg.dims == 2 else [(kt // 2, kt // 2), (1, 1), (1, 1)]
    stride = lambda s: (s, s) if cfg.dims == 2 else (1, s, s)  # noqa: E731  (never strided in time)
    init = nn.initializers.normal(0.02)
    use_norm = cfg.norm == "group"

    x = x.astype(self.dtype)
    chans = cfg.channels()
    x = conv(chans[0], kernel, strides=stride(2), padding=pad, kernel_init=init, name="main_0", **kw)(x)
    x = nn.leaky_relu(x, LEAKY_SLOPE)
    idx = 2
    for i in range(1, cfg.n_layers + 1):
      s = 2 if i < cfg.n_layers else 1  # the last hidden conv keeps the resolution
      x = conv(chans[i], kernel, strides=stride(s), padding=pad, use_bias=not use_norm, kernel_init=init,
               name=f"main_{idx}", **kw)(x)
      if use_norm:
        x = group_norm(num_groups=_groups(chans[i]), name=f"main_{idx + 1}", **kw)(x)
      x = nn.leaky_relu(x, LEAKY_SLOPE)
      idx += 3
    return conv(1, kernel, strides=stride(1), padding=pad, kernel_init=init, name=f"main_{idx}", **kw)(x)


def example_input(config: DiscriminatorConfig, batch: int = 1, size: int = 32, frames: int = 2,
                  dtype: Dtype = jnp.float32) -> jax.Array:
  """A small valid input for ``init`` (params do not depend on the size)."""
  shape = (batch, size, size, config.in_channels) if config.dims == 2 else (batch, frames, size, size,
                                                                             config.in_channels)
  return jnp.zeros(shape, dtype)


# ----------------------------------------------------------------------------------------------------------
# Losses. Logits of any shape; means over every element (patches, frames, batch).

def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """``0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))``."""
  real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
  fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
  return 0.5 * (real + fake)


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """Binary cross-entropy with logits: ``0.5 * (mean(softplus(-real)) + mean(softplus(fake)))``."""
  real = jnp.mean(jax.nn.softplus(-logits_real.astype(jnp.float32)))
  fake = jnp.mean(jax.nn.softplus(logits_fake.astype(jnp.float32)))
  return 0.5 * (real + fake)


D_LOSSES: Mapping[str, Callable[[jax.Array, jax.Array], jax.Array]] = {"hinge": hinge_d_loss,
                                                                        "vanilla": vanilla_d_loss}


def d_loss(kind: str, logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  if kind not in D_LOSSES:
    raise ValueError(f"discriminator loss {kind!r}: expected one of {sorted(D_LOSSES)}")
  return D_LOSSES[kind](logits_real, logits_fake)


def generator_loss(logits_fake: jax.Array) -> jax.Array:
  """``-mean(logits_fake)``: the generator term of taming / LDM / sgm for both hinge and vanilla discriminators."""
  return -jnp.mean(logits_fake.astype(jnp.float32))


def adaptive_weight(loss_fn: Callable[[jax.Array], Tuple[jax.Array, jax.Array]], last_layer: jax.Array, *,
                    disc_weight: float = 1.0, max_weight: float = 1e4, eps: float = 1e-4
                    ) -> Tuple[jax.Array, Tuple[jax.Array, jax.Array]]:
  """VQGAN's balance of reconstruction and adversarial gradients at the generator's last layer.

  ``w = clip(||d nll / d last|| / (||d g / d last|| + eps), 0, max_weight) * disc_weight``, a constant (no
  gradient flows through it).

  Args:
    loss_fn: ``last_layer -> (nll, g_loss)``: both losses recomputed with the generator's last-layer param
      replaced by the argument (every other param closed over), so the gradients are w.r.t. that leaf only.
    last_layer: the current value of that param (e.g. the decoder's ``conv_out`` kernel).
  Returns:
    ``(w, (nll, g_loss))``.
  """
  (nll, g), vjp = jax.vjp(loss_fn, last_layer)
  # One forward pass, two pullbacks: d nll / d last and d g / d last.
  (nll_grad,) = vjp((jnp.ones_like(nll), jnp.zeros_like(g)))
  (g_grad,) = vjp((jnp.zeros_like(nll), jnp.ones_like(g)))
  ratio = jnp.linalg.norm(nll_grad.astype(jnp.float32)) / (jnp.linalg.norm(g_grad.astype(jnp.float32)) + eps)
  w = jax.lax.stop_gradient(jnp.clip(ratio, 0.0, max_weight)) * disc_weight
  return w, (nll, g)
