"""LPIPS (VGG16) weights: torchvision ``vgg16`` features + lpips ``v0.1/vgg.pth`` linear heads -> Flax.

Two user-supplied files make one :class:`~videoldm_jax.models.lpips.LPIPS` param tree:

* the VGG16 trunk, a torchvision state dict: either the whole ``vgg16()`` (``features.N.*`` + ``classifier.*``, e.g.
  ``vgg16-397923af.pth``; the classifier is not part of LPIPS and is dropped) or ``vgg16().features`` alone
  (``N.weight`` / ``N.bias``);
* the linear heads, ``lin0.model.1.weight`` ... ``lin4.model.1.weight`` (``[1, c, 1, 1]``) from the lpips package's
  ``lpips/weights/v0.1/vgg.pth``.

Everything else is strict: any missing, unexpected or mis-shaped tensor raises ``ConversionError`` naming it.
"""

from __future__ import annotations

import re
from typing import Dict, List, Union

import numpy as np

from videoldm_jax.conversion.core import ConversionError, TensorSource, convert_strict
from videoldm_jax.conversion.io import open_checkpoint
from videoldm_jax.models.lpips import LPIPSConfig, abstract_params

_BARE_FEATURE = re.compile(r"^\d+\.(weight|bias)$")
_CLASSIFIER = "classifier."


class _VGGFeaturesSource(TensorSource):
  """A torchvision VGG state dict as ``features.N.*`` keys: bare ``N.*`` keys are prefixed, ``classifier.*`` (the
  ImageNet head, unused by LPIPS) is dropped; anything else stays and is reported as unexpected."""

  def __init__(self, source: TensorSource):
    self.source = source
    self.name = source.name
    self._map = {}
    for k in source.keys():
      if k.startswith(_CLASSIFIER):
        continue
      self._map["features." + k if _BARE_FEATURE.match(k) else k] = k

  def keys(self) -> List[str]:
    return list(self._map)

  def shape(self, key):
    return self.source.shape(self._map[key])

  def _read(self, key):
    return self.source._read(self._map[key])


class _UnionSource(TensorSource):
  """Disjoint union of two sources (a key present in both is an error: it would be ambiguous)."""

  def __init__(self, first: TensorSource, second: TensorSource):
    both = sorted(set(first.keys()) & set(second.keys()))
    if both:
      raise ConversionError(f"lpips: keys {both[:8]} are in both {first.name} and {second.name}")
    self.name = f"{first.name} + {second.name}"
    self._where = {k: first for k in first.keys()}
    self._where.update({k: second for k in second.keys()})

  def keys(self) -> List[str]:
    return list(self._where)

  def shape(self, key):
    return self._where[key].shape(key)

  def _read(self, key):
    return self._where[key]._read(key)


def convert_lpips(vgg_source: TensorSource, lin_source: TensorSource, config: LPIPSConfig = LPIPSConfig.vgg16(),
                  dtype=np.float32) -> Dict:
  """torchvision VGG16 tensors + lpips linear-head tensors -> Flax params of ``LPIPS(config)`` (strict)."""
  source = _UnionSource(_VGGFeaturesSource(vgg_source), lin_source)
  return convert_strict(source, abstract_params(config), dtype=dtype, what="lpips")


def load_lpips(vgg_path: Union[str, TensorSource], lin_path: Union[str, TensorSource],
               config: LPIPSConfig = LPIPSConfig.vgg16(), dtype=np.float32) -> Dict:
  """Opens the two files (``.pth`` via ``torch.load(weights_only=True)``, or ``.safetensors``) and converts them."""
  vgg = vgg_path if isinstance(vgg_path, TensorSource) else open_checkpoint(vgg_path)
  lin = lin_path if isinstance(lin_path, TensorSource) else open_checkpoint(lin_path)
  return convert_lpips(vgg, lin, config, dtype)
