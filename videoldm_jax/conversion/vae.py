"""KL autoencoder weights: diffusers ``AutoencoderKL`` and CompVis ``first_stage_model`` checkpoints <-> Flax.

The Flax tree mirrors diffusers names, so a diffusers state dict converts with the default key rule.
CompVis (``ldm.models.autoencoder.AutoencoderKL``) checkpoints are first renamed to diffusers names by
:func:`compvis_vae_source`; the CompVis tree differs in these places:

```
CompVis                                    diffusers
{encoder,decoder}.norm_out                 conv_norm_out
*.block.j.nin_shortcut                     *.resnets.j.conv_shortcut
encoder.down.i.block.j                     encoder.down_blocks.i.resnets.j
encoder.down.i.downsample.conv             encoder.down_blocks.i.downsamplers.0.conv
{..}.mid.block_1 / attn_1 / block_2        mid_block.resnets.0 / attentions.0 / resnets.1
mid.attn_1.{norm,q,k,v,proj_out}           mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}
decoder.up.i (i = resolution level)        decoder.up_blocks.(n-1-i) (processing order, reversed)
decoder.up.i.upsample.conv                 decoder.up_blocks.(n-1-i).upsamplers.0.conv
```

CompVis stores q/k/v/proj_out as 1x1 convs ``[c, c, 1, 1]``; ``core.torch_to_flax_array`` squeezes them into the
Dense kernels diffusers and we use.
"""

from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional

import numpy as np

from videoldm_jax.conversion.core import PrefixSource, RenamedSource, TensorSource, convert_strict, export_torch
from videoldm_jax.models.vae import VAEConfig, abstract_params

COMPVIS_PREFIX = "first_stage_model."

_ATTN_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def convert_vae(source: TensorSource, config: VAEConfig, dtype=np.float32) -> Dict:
  """Diffusers-named VAE tensors -> Flax params of ``AutoencoderKL(config)`` (strict: every key, every shape).

  For a full diffusers pipeline checkpoint pass ``PrefixSource(source, "vae.")``; for CompVis checkpoints
  pass ``compvis_vae_source(source)``. Raises ``ConversionError`` naming missing / unexpected / mis-shaped keys.
  """
  return convert_strict(source, abstract_params(config), dtype=dtype, what="vae")


def vae_to_diffusers(params: Mapping) -> Dict[str, np.ndarray]:
  """Flax params (with or without the ``{"params": ...}`` wrapper) -> diffusers ``AutoencoderKL`` state dict."""
  if set(params) == {"params"}:
    params = params["params"]
  return export_torch(params)


# ----------------------------------------------------------------------------------------------------------
# CompVis layout.

def _resnet_leaf(rest: str) -> str:
  return "conv_shortcut" + rest[len("nin_shortcut"):] if rest.startswith("nin_shortcut") else rest


def _mid_attention(m: re.Match) -> Optional[str]:
  module, _, leaf = m[2].rpartition(".")
  return f"{m[1]}.mid_block.attentions.0.{_ATTN_NAMES[module]}.{leaf}" if module in _ATTN_NAMES else None


def _compvis_rules(num_levels: int) -> List[tuple]:
  """(regex, fn(match) -> diffusers key or None) pairs; ``num_levels`` reverses the decoder's up blocks."""
  up = lambda i: num_levels - 1 - int(i)  # noqa: E731
  return [
      (r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)", lambda m: m.group(0)),
      (r"(quant_conv|post_quant_conv)\.(weight|bias)", lambda m: m.group(0)),
      (r"(encoder|decoder)\.norm_out\.(weight|bias)", lambda m: f"{m[1]}.conv_norm_out.{m[2]}"),
      (r"encoder\.down\.(\d+)\.block\.(\d+)\.(.+)",
       lambda m: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_resnet_leaf(m[3])}"),
      (r"encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)",
       lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"),
      (r"(encoder|decoder)\.mid\.block_([12])\.(.+)",
       lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_resnet_leaf(m[3])}"),
      (r"(encoder|decoder)\.mid\.attn_1\.(.+)", _mid_attention),
      (r"decoder\.up\.(\d+)\.block\.(\d+)\.(.+)",
       lambda m: f"decoder.up_blocks.{up(m[1])}.resnets.{m[2]}.{_resnet_leaf(m[3])}"),
      (r"decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)",
       lambda m: f"decoder.up_blocks.{up(m[1])}.upsamplers.0.conv.{m[2]}"),
  ]


def _num_levels(keys, prefix: str) -> int:
  levels = {int(m[1]) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
  return max(levels) + 1 if levels else 0


def _strip_prefix(source: TensorSource, prefix: Optional[str]) -> TensorSource:
  if prefix is None:  # auto: a whole LDM checkpoint, or the autoencoder alone
    prefix = COMPVIS_PREFIX if any(k.startswith(COMPVIS_PREFIX) for k in source.keys()) else ""
  return PrefixSource(source, prefix) if prefix else source


def compvis_vae_source(source: TensorSource, prefix: Optional[str] = None) -> TensorSource:
  """A view of a CompVis autoencoder under diffusers names.

  ``source``: the autoencoder's tensors, usually ``PrefixSource(ckpt, "first_stage_model.")``. ``prefix``: strip
  this first; the default strips ``first_stage_model.`` when the keys carry it. Keys the mapping does not know
  (``loss.*``, attention inside resolution levels, ...) keep their names, so strict conversion reports them.
  """
  view = _strip_prefix(source, prefix)
  keys = view.keys()
  rules = [(re.compile(pattern), fn) for pattern, fn in _compvis_rules(_num_levels(keys, "decoder.up."))]
  renames: Dict[str, str] = {}
  for key in keys:
    for pattern, fn in rules:
      m = pattern.fullmatch(key)
      new = fn(m) if m else None
      if new:
        renames[new] = key
        break
  return RenamedSource(view, renames)


def vae_config_from_compvis(source: TensorSource, scaling_factor: Optional[float] = None,
                            norm_num_groups: int = 32, prefix: Optional[str] = None) -> VAEConfig:
  """Infers a :class:`VAEConfig` from the tensor shapes of a CompVis autoencoder.

  ``source``: CompVis-named tensors (``prefix`` as in :func:`compvis_vae_source`) or the diffusers-named view
  :func:`compvis_vae_source` returns. The latent ``scaling_factor`` lives in the LDM yaml, not in the weights:
  by default 0.08333 for f=4 (SD x4 upscaler) and 0.18215 otherwise (SD 1.x / 2.x); pass it for other models.
  The group count is not in the weights either; CompVis' ``Normalize`` always uses 32.
  Raises ``ValueError`` naming the key for layouts this model does not implement.
  """
  if not any(k.startswith("encoder.down_blocks.") for k in source.keys()):
    source = compvis_vae_source(source, prefix)
  keys = set(source.keys())

  def shape(key: str):
    if key not in keys:
      raise ValueError(f"{source.name}: no autoencoder tensor {key} (CompVis name: see conversion/vae.py)")
    return source.shape(key)

  num_levels = _num_levels(keys, "encoder.down_blocks.")
  if num_levels == 0:
    raise ValueError(f"{source.name}: no encoder.down.* keys (not a CompVis autoencoder)")
  level_attn = sorted(k for k in keys if re.match(r"(encoder\.down|decoder\.up)\.\d+\.attn\.", k))
  if level_attn:
    raise ValueError(f"{source.name}: attention inside resolution levels (attn_resolutions) is not supported: "
                     f"{level_attn[0]}")
  if _num_levels(keys, "decoder.up_blocks.") != num_levels:
    raise ValueError(f"{source.name}: encoder and decoder have different numbers of resolution levels")
  layers = len({m[1] for k in keys if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))})
  if scaling_factor is None:
    scaling_factor = 0.08333 if num_levels == 3 else 0.18215  # f = 4: the x4 upscaler's autoencoder
  return VAEConfig(
      in_channels=shape("encoder.conv_in.weight")[1],
      out_channels=shape("decoder.conv_out.weight")[0],
      block_out_channels=tuple(shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0]
                               for i in range(num_levels)),
      layers_per_block=layers,
      latent_channels=shape("post_quant_conv.weight")[0],
      norm_num_groups=norm_num_groups,
      scaling_factor=scaling_factor)


def convert_compvis_vae(source: TensorSource, config: Optional[VAEConfig] = None, prefix: Optional[str] = None,
                        dtype=np.float32) -> Dict:
  """Shortcut: CompVis checkpoint -> Flax params (config inferred from the shapes when not given)."""
  view = compvis_vae_source(source, prefix)
  return convert_vae(view, config or vae_config_from_compvis(view), dtype=dtype)

