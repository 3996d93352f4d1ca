"""Stable Video Diffusion U-Net weights: diffusers ``UNetSpatioTemporalConditionModel`` <-> Flax video ``UNet``.

Our video U-Net is the image U-Net with temporal layers inside the same blocks, so the spatial names are the image
model's and only the wrappers diffusers puts around them differ:

```
diffusers                                              ours
*.resnets.N.spatial_res_block.<p>                      *.resnets_N/<p>
*.resnets.N.temporal_res_block.<p>                     *.resnets_N/temporal_res/<p>
*.resnets.N.time_mixer.mix_factor                      *.resnets_N/temporal_mixer/mix_factor
*.attentions.N.time_mixer.mix_factor                   *.attentions_N/temporal_mixer/mix_factor
*.attentions.N.time_pos_embed.linear_{1,2}             *.attentions_N/temporal_pos_embed/linear_{1,2}
*.attentions.N.temporal_transformer_blocks.M.<p>       (same)
add_embedding.linear_{1,2}                             (same; add_time_proj has no weights)
```

diffusers initialises ``temporal_res_block.conv2`` randomly while sgm (and our default) zero-initialise it; loading
overwrites it either way.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional

import numpy as np

from videoldm_jax.conversion.core import Path, TensorSource, convert_strict, default_torch_key, export_torch
from videoldm_jax.models.temporal import TemporalConfig
from videoldm_jax.models.unet import UNetConfig, abstract_params

# diffusers' UNetSpatioTemporalConditionModel defaults (= the SVD / SVD-XT checkpoints' unet/config.json).
_DIFFUSERS_DEFAULTS: Dict[str, Any] = dict(
    in_channels=8, out_channels=4,
    down_block_types=("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",),
    up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3,
    block_out_channels=(320, 640, 1280, 1280), addition_time_embed_dim=256, projection_class_embeddings_input_dim=768,
    layers_per_block=2, cross_attention_dim=1024, transformer_layers_per_block=1, num_attention_heads=(5, 10, 20, 20),
    num_frames=25)
_BLOCK_TYPES = {"CrossAttnDownBlockSpatioTemporal": "CrossAttnDownBlock2D", "DownBlockSpatioTemporal": "DownBlock2D",
                "CrossAttnUpBlockSpatioTemporal": "CrossAttnUpBlock2D", "UpBlockSpatioTemporal": "UpBlock2D"}
_IGNORED = frozenset({"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "sample_size",
                      "num_frames"})  # num_frames is a runtime input here


def svd_config_from_diffusers(config: Optional[Mapping[str, Any]] = None, **temporal_overrides) -> UNetConfig:
  """:class:`UNetConfig` of a diffusers ``UNetSpatioTemporalConditionModel`` config dict (missing entries: defaults).

  The temporal layers are SVD's: learned alpha with image passthrough (logit 0.5), temporal cross-attention to the
  first frame's context, (3, 1, 1) kernels; ``temporal_overrides`` replace :class:`TemporalConfig` fields.
  """
  config = dict(config or {})
  unknown = sorted(set(config) - set(_DIFFUSERS_DEFAULTS) - _IGNORED)
  if unknown:
    raise ValueError(f"svd unet config: unknown entries {unknown}")
  d = {k: config.get(k, v) for k, v in _DIFFUSERS_DEFAULTS.items()}
  cross = d["cross_attention_dim"]
  if isinstance(cross, (list, tuple)):
    if len(set(cross)) != 1:
      raise ValueError(f"svd unet config: cross_attention_dim={cross!r} (supported: one width for every level)")
    d["cross_attention_dim"] = cross[0]
  try:
    block_types = {k: tuple(_BLOCK_TYPES[t] for t in d[k]) for k in ("down_block_types", "up_block_types")}
  except KeyError as e:
    raise ValueError(f"svd unet config: unsupported block type {e}") from e
  n_ids, rest = divmod(d["projection_class_embeddings_input_dim"], d["addition_time_embed_dim"])
  if rest:
    raise ValueError("svd unet config: projection_class_embeddings_input_dim is not a multiple of "
                     "addition_time_embed_dim")
  temporal = dict(merge_strategy="learned_with_images", merge_factor=0.5, cross_attention=True,
                  use_spatial_context=True, kernel_size=(3, 1, 1))
  temporal.update(temporal_overrides)
  return UNetConfig(
      in_channels=d["in_channels"], out_channels=d["out_channels"], block_out_channels=tuple(d["block_out_channels"]),
      **block_types, layers_per_block=d["layers_per_block"],
      transformer_layers_per_block=d["transformer_layers_per_block"], num_attention_heads=d["num_attention_heads"],
      cross_attention_dim=d["cross_attention_dim"], use_linear_projection=True, norm_num_groups=32, norm_eps=1e-5,
      flip_sin_to_cos=True, freq_shift=0.0, addition_embed_dim=d["projection_class_embeddings_input_dim"],
      addition_time_embed_dim=d["addition_time_embed_dim"], temporal=TemporalConfig(**temporal))


def svd_unet_config(**temporal_overrides) -> UNetConfig:
  """The SVD / SVD-XT U-Net (diffusers defaults): 1,524,623,082 params, 656,076,838 of them temporal."""
  return svd_config_from_diffusers({}, **temporal_overrides)


_RESNET = re.compile(r"^(.*\.resnets\.\d+)\.(.+)$")


def svd_torch_key(path: Path) -> str:
  """Flax path -> diffusers ``UNetSpatioTemporalConditionModel`` key (see the module docstring)."""
  key = default_torch_key(path)
  key = key.replace(".temporal_mixer.", ".time_mixer.").replace(".temporal_pos_embed.", ".time_pos_embed.")
  m = _RESNET.match(key)
  if m:
    head, rest = m.groups()
    if rest.startswith("temporal_res."):
      rest = "temporal_res_block." + rest[len("temporal_res."):]
    elif not rest.startswith("time_mixer."):
      rest = "spatial_res_block." + rest
    key = f"{head}.{rest}"
  return key


def convert_svd_unet(source: TensorSource, config: UNetConfig, dtype=np.float32) -> Dict:
  """diffusers ``UNetSpatioTemporalConditionModel`` tensors -> Flax params of ``UNet(config)`` (strict).

  For a full pipeline checkpoint pass ``PrefixSource(source, "unet.")``. Raises ``ConversionError`` naming
  missing / unexpected / mis-shaped keys.
  """
  if config.temporal is None:
    raise ValueError("convert_svd_unet needs a video UNetConfig (config.temporal)")
  return convert_strict(source, abstract_params(config), key_fn=svd_torch_key, dtype=dtype, what="svd unet")


def svd_unet_to_diffusers(params: Mapping) -> Dict[str, np.ndarray]:
  """Flax params (with or without ``{"params": ...}``) -> diffusers ``UNetSpatioTemporalConditionModel`` state dict."""
  if set(params) == {"params"}:
    params = params["params"]
  return export_torch(params, key_fn=svd_torch_key)
