"""CLIP image tower weights: ``transformers.CLIPVisionModelWithProjection`` <-> Flax ``CLIPVisionEncoder``.

The keys are ``vision_model.<our path>`` plus ``visual_projection.weight`` (see ``models/clip_vision.py``).
Conversion is strict (every param found, every tensor used); the only drop is ``vision_model.embeddings.position_ids``,
an ``arange`` buffer that older transformers versions saved (SVD's released ``image_encoder`` has none, but
re-saved copies may).
"""

from __future__ import annotations

from typing import Dict, Mapping, Union

import numpy as np

from videoldm_jax.conversion.core import (DictSource, FilteredSource, Path, TensorSource, convert_strict,
                                          default_torch_key, export_torch)
from videoldm_jax.models.clip_vision import CLIPVisionConfig, abstract_params

VISION_PREFIX = "vision_model."
VISUAL_PROJECTION = "visual_projection.weight"
POSITION_IDS_KEY = VISION_PREFIX + "embeddings.position_ids"


def clip_vision_torch_key(path: Path) -> str:
  """Flax path in ``CLIPVisionEncoder`` params -> ``CLIPVisionModelWithProjection`` state-dict key."""
  if path[0] == "visual_projection":
    return VISUAL_PROJECTION
  return VISION_PREFIX + default_torch_key(path)


def convert_clip_vision(source: Union[TensorSource, Mapping[str, object]], config: CLIPVisionConfig,
                        dtype=np.float32) -> Dict:
  """``CLIPVisionModelWithProjection`` tensors -> Flax params of ``CLIPVisionEncoder(config)`` (strict; raises
  ``ConversionError`` naming missing / unexpected / mis-shaped keys)."""
  if not isinstance(source, TensorSource):
    source = DictSource(source)
  source = FilteredSource(source, lambda k: k != POSITION_IDS_KEY)
  return convert_strict(source, abstract_params(config), key_fn=clip_vision_torch_key, dtype=dtype,
                        what="CLIP image encoder")


def clip_vision_to_transformers(params: Mapping) -> Dict[str, np.ndarray]:
  """Flax params (with or without ``{"params": ...}``) -> ``CLIPVisionModelWithProjection`` state dict."""
  if set(params) == {"params"}:
    params = params["params"]
  return export_torch(params, key_fn=clip_vision_torch_key)
