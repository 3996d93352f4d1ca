"""Stable Diffusion U-Net weights: diffusers ``UNet2DConditionModel`` and CompVis ``model.diffusion_model`` <-> Flax.

The Flax tree mirrors diffusers names, so a diffusers state dict converts with the default key rule
(``down_blocks_0/attentions_1/transformer_blocks_0/attn1/to_out_0/kernel`` <-> ``...to_out.0.weight``).

CompVis (``ldm.modules.diffusionmodules.openaimodel.UNetModel``, used by SD 1.x / 2.x / the x4 upscaler
single-file checkpoints) keeps every block in three flat ``nn.ModuleList``s of ``TimestepEmbedSequential``s.
:func:`compvis_unet_source` walks them and renames to diffusers names:

```
CompVis                                        diffusers
time_embed.0 / time_embed.2                    time_embedding.linear_1 / linear_2
label_emb (nn.Embedding)                       class_embedding
label_emb.0.0 / label_emb.0.2 ("sequential")   add_embedding.linear_1 / linear_2
input_blocks.0.0                               conv_in
input_blocks.k.0 (ResBlock)                    down_blocks.i.resnets.j      (k walks levels i, layers j)
input_blocks.k.1 (SpatialTransformer)          down_blocks.i.attentions.j
input_blocks.k.0.op (Downsample)               down_blocks.i.downsamplers.0.conv   (ends level i)
middle_block.0 / .1 / .2                       mid_block.resnets.0 / attentions.0 / resnets.1
output_blocks.k.0 / .1                         up_blocks.i.resnets.j / attentions.j
output_blocks.k.{1|2}.conv (Upsample)          up_blocks.i.upsamplers.0.conv       (ends up block i)
out.0 / out.2                                  conv_norm_out / conv_out
ResBlock in_layers.0 / in_layers.2             norm1 / conv1
         emb_layers.1                          time_emb_proj
         out_layers.0 / out_layers.3           norm2 / conv2
         skip_connection                       conv_shortcut
```

Inside a SpatialTransformer the names already agree (``norm``, ``proj_in``, ``transformer_blocks.N.attn1.to_q``,
``ff.net.0.proj``, ...). SD 1.x stores ``proj_in`` / ``proj_out`` as 1x1 convs, SD 2.x as Linear.
"""

from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np

from videoldm_jax.conversion.core import PrefixSource, RenamedSource, TensorSource, convert_strict, export_torch
from videoldm_jax.models.unet import UNetConfig, abstract_params

COMPVIS_PREFIX = "model.diffusion_model."

_RESNET_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                 "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_TOP_LEVEL_NAMES = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
                    "label_emb": "class_embedding", "label_emb.0.0": "add_embedding.linear_1",
                    "label_emb.0.2": "add_embedding.linear_2", "input_blocks.0.0": "conv_in",
                    "out.0": "conv_norm_out", "out.2": "conv_out"}


def convert_unet(source: TensorSource, config: UNetConfig, dtype=np.float32) -> Dict:
  """Diffusers-named U-Net tensors -> Flax params of ``UNet(config)`` (strict: every key, every shape).

  For a CompVis checkpoint pass ``compvis_unet_source(source)``. Raises ``ConversionError`` naming missing /
  unexpected / mis-shaped keys.
  """
  return convert_strict(source, abstract_params(config), dtype=dtype, what="unet")


def unet_to_diffusers(params: Mapping) -> Dict[str, np.ndarray]:
  """Flax params (with or without the ``{"params": ...}`` wrapper) -> diffusers ``UNet2DConditionModel`` state dict."""
  if set(params) == {"params"}:
    params = params["params"]
  return export_torch(params)


# ----------------------------------------------------------------------------------------------------------
# CompVis layout -> diffusers names.

def _indices(keys: Sequence[str], prefix: str) -> List[int]:
  pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
  return sorted({int(m[1]) for k in keys if (m := pattern.match(k))})


def _has_prefix(keys: Set[str], prefix: str) -> bool:
  return any(k.startswith(prefix) for k in keys)


def _is_sampler(keys: Set[str], module: str, conv: str) -> bool:
  """A CompVis Downsample (``op``) / Upsample (``conv``): nothing but ``<module>.<conv>.{weight,bias}``."""
  own = {k[len(module) + 1:] for k in keys if k.startswith(module + ".")}
  return bool(own) and own <= {f"{conv}.weight", f"{conv}.bias"}


def _compvis_module_map(keys: Set[str]) -> Dict[str, Tuple[str, bool]]:
  """CompVis module prefix -> (diffusers module prefix, is_resnet)."""
  modules: Dict[str, Tuple[str, bool]] = {old: (new, False) for old, new in _TOP_LEVEL_NAMES.items()}
  level, j = 0, 0
  for k in _indices(keys, "input_blocks."):
    if k == 0:
      continue
    block = f"input_blocks.{k}"
    if _is_sampler(keys, f"{block}.0", "op"):
      modules[f"{block}.0.op"] = (f"down_blocks.{level}.downsamplers.0.conv", False)
      level, j = level + 1, 0
      continue
    modules[f"{block}.0"] = (f"down_blocks.{level}.resnets.{j}", True)
    if _has_prefix(keys, f"{block}.1."):
      modules[f"{block}.1"] = (f"down_blocks.{level}.attentions.{j}", False)
    j += 1
  modules["middle_block.0"] = ("mid_block.resnets.0", True)
  modules["middle_block.1"] = ("mid_block.attentions.0", False)
  modules["middle_block.2"] = ("mid_block.resnets.1", True)
  level, j = 0, 0
  for k in _indices(keys, "output_blocks."):
    block = f"output_blocks.{k}"
    modules[f"{block}.0"] = (f"up_blocks.{level}.resnets.{j}", True)
    ends_level = False
    for m in (1, 2):
      sub = f"{block}.{m}"
      if _is_sampler(keys, sub, "conv"):
        modules[f"{sub}.conv"] = (f"up_blocks.{level}.upsamplers.0.conv", False)
        ends_level = True
      elif m == 1 and _has_prefix(keys, sub + "."):
        modules[sub] = (f"up_blocks.{level}.attentions.{j}", False)
    level, j = (level + 1, 0) if ends_level else (level, j + 1)
  return modules


def _rename(key: str, modules: Dict[str, Tuple[str, bool]]) -> Optional[str]:
  parts = key.split(".")
  for n in range(len(parts) - 1, 0, -1):  # longest module prefix first
    hit = modules.get(".".join(parts[:n]))
    if hit is None:
      continue
    new, is_resnet = hit
    rest = ".".join(parts[n:])
    if is_resnet:
      for old_sub, new_sub in _RESNET_NAMES.items():
        if rest.startswith(old_sub + "."):
          return f"{new}.{new_sub}{rest[len(old_sub):]}"
      return None
    return f"{new}.{rest}"
  return None


def compvis_unet_source(source: TensorSource) -> TensorSource:
  """A view of a CompVis U-Net (``model.diffusion_model.*``, prefix stripped or not) under diffusers names.

  The level / layer structure is read from the keys (downsamplers end a down level, upsamplers an up block).
  Keys the mapping does not know keep their names, so strict conversion reports them as unexpected.
  """
  if any(k.startswith(COMPVIS_PREFIX) for k in source.keys()):
    source = PrefixSource(source, COMPVIS_PREFIX)
  keys = set(source.keys())
  modules = _compvis_module_map(keys)
  renames: Dict[str, str] = {}
  for key in sorted(keys):
    new = _rename(key, modules)
    if new is not None:
      renames[new] = key
  return RenamedSource(source, renames)


# ----------------------------------------------------------------------------------------------------------
# Config inference from tensor shapes.

def _count(keys: Set[str], prefix: str) -> int:
  return len(_indices(list(keys), prefix))


def unet_config_from_compvis(source: TensorSource, *, num_heads: Union[int, Sequence[int], None] = None,
                             head_dim: Optional[int] = None, norm_num_groups: int = 32) -> UNetConfig:
  """Infers a :class:`UNetConfig` from the tensor shapes of a CompVis (or already renamed) U-Net.

  Read from the weights: channels per level, layers per level, attention levels, transformer depth, context
  width (``attn2.to_k``), conv vs linear ``proj_in`` (4-D vs 2-D), ``only_cross_attention`` (``attn1.to_k``
  reading the context width), class / added embeddings. Not in the weights: the head count. Unless
  ``num_heads`` (int or per level) or ``head_dim`` is given, it follows the SD family the weights identify:
  x4 upscaler (class embedding) 8 heads, SD 1.x (context 768) 8 heads, SD 2.x (context 1024) 64-channel
  heads. ``norm_num_groups`` is not in the weights either (32 in every SD model).

  ``only_cross_attention`` cannot be seen where a level's width equals the context width (the x4 upscaler's
  last level); such levels are taken as self-attending (as in every SD checkpoint). Levels without attention
  copy the nearest attention level's flag (no effect on the network).
  """
  if "conv_in.weight" not in source.keys():  # CompVis names (not yet renamed)
    source = compvis_unet_source(source)
  keys = set(source.keys())

  def shape(key: str) -> Tuple[int, ...]:
    if key not in keys:
      raise ValueError(f"{source.name}: no U-Net tensor {key} (not a Stable Diffusion U-Net?)")
    return tuple(source.shape(key))

  levels = _count(keys, "down_blocks.")
  if levels == 0:
    raise ValueError(f"{source.name}: no down blocks found (not a Stable Diffusion U-Net?)")
  if _count(keys, "up_blocks.") != levels:
    raise ValueError(f"{source.name}: {levels} down levels but {_count(keys, 'up_blocks.')} up blocks")
  block_out = tuple(shape(f"down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(levels))
  layers = tuple(_count(keys, f"down_blocks.{i}.resnets.") for i in range(levels))
  for i in range(levels):
    want = layers[levels - 1 - i] + 1
    if _count(keys, f"up_blocks.{i}.resnets.") != want:
      raise ValueError(f"{source.name}: up_blocks.{i} has {_count(keys, f'up_blocks.{i}.resnets.')} resnets, "
                       f"the layout needs {want}")
  down_attn = [_has_prefix(keys, f"down_blocks.{i}.attentions.") for i in range(levels)]
  up_attn = [_has_prefix(keys, f"up_blocks.{i}.attentions.") for i in range(levels)]

  def level_attention(i: int) -> Optional[str]:
    """Prefix of one transformer at down level ``i`` (or its up block), None without attention."""
    if down_attn[i]:
      return f"down_blocks.{i}.attentions.0"
    if up_attn[levels - 1 - i]:
      return f"up_blocks.{levels - 1 - i}.attentions.0"
    return None

  attn_levels = [i for i in range(levels) if level_attention(i)]
  if not attn_levels:
    raise ValueError(f"{source.name}: no attention layers found")
  first = level_attention(attn_levels[0])
  context_dim = shape(f"{first}.transformer_blocks.0.attn2.to_k.weight")[1]
  use_linear = len(shape(f"{first}.proj_in.weight")) == 2
  depth = tuple(_count(keys, f"{level_attention(i)}.transformer_blocks.") if level_attention(i) else 1
                for i in range(levels))
  if _count(keys, "mid_block.attentions.0.transformer_blocks.") != depth[-1]:
    raise ValueError(f"{source.name}: mid block transformer depth differs from the last level's (unsupported)")
  if shape("mid_block.attentions.0.transformer_blocks.0.attn1.to_k.weight")[1] != block_out[-1]:
    raise ValueError(f"{source.name}: mid-block attn1 attends to the context (disable_middle_self_attn), "
                     "which UNetMidBlock2DCrossAttn does not support")

  only_cross: Dict[int, bool] = {}
  for i in attn_levels:
    width = shape(f"{level_attention(i)}.transformer_blocks.0.attn1.to_k.weight")[1]
    only_cross[i] = width != block_out[i] and width == context_dim
  flags = tuple(only_cross[min(attn_levels, key=lambda a: (abs(a - i), a))] for i in range(levels))

  num_class_embeds = shape("class_embedding.weight")[0] if "class_embedding.weight" in keys else None
  addition_dim = shape("add_embedding.linear_1.weight")[1] if "add_embedding.linear_1.weight" in keys else None
  time_dim = shape("time_embedding.linear_1.weight")[0]

  if num_heads is not None:
    heads = num_heads
  elif head_dim is not None:
    heads = tuple(c // head_dim for c in block_out)
  elif num_class_embeds is not None or context_dim == 768:
    heads = 8  # x4 upscaler / SD 1.x
  elif context_dim == 1024:
    heads = tuple(c // 64 for c in block_out)  # SD 2.x
  else:
    raise ValueError(f"{source.name}: cannot tell the attention head count from the weights (context width "
                     f"{context_dim} matches no SD family); pass num_heads= or head_dim=")

  return UNetConfig(
      in_channels=shape("conv_in.weight")[1],
      out_channels=shape("conv_out.weight")[0],
      block_out_channels=block_out,
      down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn),
      up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn),
      layers_per_block=layers,
      transformer_layers_per_block=depth,
      num_attention_heads=heads,
      cross_attention_dim=context_dim,
      use_linear_projection=use_linear,
      only_cross_attention=flags,
      norm_num_groups=norm_num_groups,
      time_embedding_dim=None if time_dim == 4 * block_out[0] else time_dim,
      num_class_embeds=num_class_embeds,
      addition_embed_dim=addition_dim)


def convert_compvis_unet(source: TensorSource, config: Optional[UNetConfig] = None, dtype=np.float32) -> Dict:
  """Shortcut: CompVis checkpoint (``model.diffusion_model.*``) -> Flax params (config inferred if not given)."""
  view = compvis_unet_source(source)
  return convert_unet(view, config or unet_config_from_compvis(view), dtype=dtype)
