"""LPIPS perceptual distance, VGG16 variant (Zhang et al. 2018, "v0.1" linear heads), in linen, channels-last.

``d(x0, x1) = sum_k mean_hw( w_k . (n(f_k(x0)) - n(f_k(x1)))^2 )`` where ``f_k`` are the activations after relu1_2,
relu2_2, relu3_3, relu4_3 and relu5_3 of VGG16, ``n`` normalises every pixel's feature vector to unit length and
``w_k`` is a learned non-negative 1x1 projection to one channel. Inputs are RGB in [-1, 1]; a fixed affine layer maps
them to ImageNet-normalised values first.

Param names mirror the two PyTorch files the weights come from, so they convert with the default key rule:

```
features_N/{kernel,bias}   <-> torchvision vgg16().features[N].{weight,bias}   (N = index in the nn.Sequential)
linK/model_1/kernel        <-> lpips v0.1 vgg.pth  linK.model.1.weight        (model.0 is a parameter-free Dropout)
```

The network is only ever used frozen, as a loss; its weights are user-supplied files (see
``videoldm_jax/conversion/lpips.py``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, List, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from videoldm_jax.models.layers import conv

Dtype = Any

# The lpips package's ScalingLayer: ImageNet mean / std rewritten for inputs in [-1, 1] (2 * mean - 1, 2 * std).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10  # lpips.normalize_tensor: x / (||x|| + eps)


@dataclasses.dataclass(frozen=True)
class LPIPSConfig:
  """VGG-style trunk: ``len(channels)`` stages of ``convs_per_stage[i]`` 3x3 convs + ReLU, 2x2 max-pool between
  stages; one LPIPS tap (and linear head) after each stage's last ReLU."""
  channels: Tuple[int, ...] = (64, 128, 256, 512, 512)
  convs_per_stage: Tuple[int, ...] = (2, 2, 3, 3, 3)
  in_channels: int = 3

  def __post_init__(self):
    object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
    object.__setattr__(self, "convs_per_stage", tuple(int(c) for c in self.convs_per_stage))
    if len(self.channels) != len(self.convs_per_stage) or not self.channels:
      raise ValueError(f"LPIPSConfig: channels {self.channels} and convs_per_stage {self.convs_per_stage} must be "
                       "non-empty and of equal length")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict())

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "LPIPSConfig":
    return cls(**d)

  @classmethod
  def from_json(cls, s: str) -> "LPIPSConfig":
    return cls.from_dict(json.loads(s))

  @classmethod
  def vgg16(cls) -> "LPIPSConfig":
    """torchvision ``vgg16().features`` (13 convs, 14.7M params) + the lpips v0.1 VGG heads (1,472 params)."""
    return cls()

  @classmethod
  def tiny(cls) -> "LPIPSConfig":
    """Same layer layout (and torch indices) with few channels, for CPU tests."""
    return cls(channels=(8, 16, 16, 32, 32))

  def layer_indices(self) -> List[List[int]]:
    """torchvision ``features`` index of every conv, per stage: ``[[0, 2], [5, 7], [10, 12, 14], ...]`` for VGG16.

    The ``nn.Sequential`` holds, per stage, (a MaxPool2d unless first) then (Conv2d, ReLU) pairs.
    """
    out, i = [], 0
    for s, n in enumerate(self.convs_per_stage):
      i += 1 if s else 0  # the max-pool
      out.append([i + 2 * j for j in range(n)])
      i += 2 * n
    return out


def normalize_channels(x: jax.Array) -> jax.Array:
  """``x / (||x||_c + 1e-10)`` per pixel, with a finite gradient where a feature vector is all zero (dead ReLUs;
  the plain ``sqrt`` has an infinite derivative at 0). Values are identical to the lpips package."""
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  positive = sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  return x / (norm + NORM_EPS)


class LinLayer(nn.Module):
  """lpips ``NetLinLayer``: (Dropout, identity at eval) -> 1x1 conv to one channel without bias, named ``model_1``."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return conv(1, (1, 1), use_bias=False, name="model_1", dtype=self.dtype, param_dtype=self.param_dtype)(x)


class LPIPS(nn.Module):
  """``LPIPS(x0, x1)`` with images ``[b, h, w, 3]`` in [-1, 1] -> distance ``[b]`` (fp32)."""
  config: LPIPSConfig = LPIPSConfig()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    cfg = self.config
    convs = {idx: conv(cfg.channels[s], (3, 3), name=f"features_{idx}", **kw)
             for s, indices in enumerate(cfg.layer_indices()) for idx in indices}
    lins = [LinLayer(name=f"lin{k}", **kw) for k in range(len(cfg.channels))]

    def taps(x):
      """Images ``[b, h, w, 3]`` in [-1, 1] -> unit-normalised activations per stage ``[b, h/2^k, w/2^k, c_k]``."""
      x = ((x.astype(jnp.float32) - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)).astype(self.dtype)
      out = []
      for s, indices in enumerate(cfg.layer_indices()):
        if s:
          x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")  # MaxPool2d(2, 2), floor mode
        for idx in indices:
          x = nn.relu(convs[idx](x))
        out.append(normalize_channels(x.astype(jnp.float32)))
      return out

    total = jnp.zeros((x0.shape[0],), jnp.float32)
    for k, (f0, f1) in enumerate(zip(taps(x0), taps(x1))):
      per_pixel = lins[k](jnp.square(f0 - f1).astype(self.dtype)).astype(jnp.float32)
      total = total + jnp.mean(per_pixel, axis=(1, 2, 3))
    return total


def example_images(batch: int = 1, size: int = 16, dtype: Dtype = jnp.float32) -> jax.Array:
  """Smallest convenient input for ``init`` / ``eval_shape`` (params do not depend on the image size)."""
  return jnp.zeros((batch, size, size, 3), dtype)


def abstract_params(config: LPIPSConfig, param_dtype: Dtype = jnp.float32) -> Mapping:
  """Shape tree of the (logically partitioned) params, without allocating them."""
  model = LPIPS(config, param_dtype=param_dtype)
  x = example_images()
  return jax.eval_shape(model.init, jax.random.key(0), x, x)["params"]
