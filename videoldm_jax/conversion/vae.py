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

Video decoders (``VAEConfig.temporal_decoder``) follow diffusers ``AutoencoderKLTemporalDecoder`` in the decoder:

```
ours                                         diffusers                                   sgm (single file)
decoder/**/resnets_j/<spatial>               **.resnets.j.spatial_res_block.<spatial>    **.block_*.<spatial>
decoder/**/resnets_j/temporal_res/norm1      **.resnets.j.temporal_res_block.norm1       **.time_stack.in_layers.0
                          .../conv1, norm2, conv2                       conv1, norm2, conv2   in_layers.2, out_layers.0, .3
decoder/**/resnets_j/temporal_mixer/mix_factor  **.resnets.j.time_mixer.mix_factor       **.block_*.mix_factor
decoder/temporal_conv_out                    decoder.time_conv_out                       decoder.conv_out.time_mix_conv
```

sgm's ``AutoencodingEngine`` (SVD) has no ``quant_conv``: a single file without one gets the identity 1x1 conv,
which computes the same.
"""

from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional

import numpy as np

from videoldm_jax.conversion.core import (DictSource, MergedSource, Path, PrefixSource, RenamedSource, TensorSource,
                                          convert_strict, default_torch_key, export_torch)
from videoldm_jax.conversion.svd import svd_torch_key
from videoldm_jax.models.vae import VAEConfig, abstract_params

COMPVIS_PREFIX = "first_stage_model."

_ATTN_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def video_vae_torch_key(path: Path) -> str:
  """Flax path -> diffusers ``AutoencoderKLTemporalDecoder`` key (the decoder's resnets wrap spatial and temporal
  parts like SVD's U-Net; see the module docstring)."""
  if path[0] != "decoder":
    return default_torch_key(path)
  if path[1] == "temporal_conv_out":
    return default_torch_key(("decoder", "time_conv_out") + tuple(path[2:]))
  return svd_torch_key(path)


def _key_fn(params_or_config) -> object:
  video = (params_or_config.temporal_decoder if isinstance(params_or_config, VAEConfig)
           else "temporal_conv_out" in params_or_config.get("decoder", {}))
  return video_vae_torch_key if video else default_torch_key


def convert_vae(source: TensorSource, config: VAEConfig, dtype=np.float32) -> Dict:
  """Diffusers-named VAE tensors -> Flax params of ``AutoencoderKL(config)`` (strict: every key, every shape).

  For a full diffusers pipeline checkpoint pass ``PrefixSource(source, "vae.")``; for CompVis checkpoints
  pass ``compvis_vae_source(source)``; video decoders use ``AutoencoderKLTemporalDecoder`` names. Raises
  ``ConversionError`` naming missing / unexpected / mis-shaped keys.
  """
  what = "video vae" if config.temporal_decoder else "vae"
  return convert_strict(source, abstract_params(config), key_fn=_key_fn(config), dtype=dtype, what=what)


def vae_to_diffusers(params: Mapping) -> Dict[str, np.ndarray]:
  """Flax params (with or without the ``{"params": ...}`` wrapper) -> diffusers ``AutoencoderKL`` state dict
  (``AutoencoderKLTemporalDecoder`` names for a video decoder)."""
  if set(params) == {"params"}:
    params = params["params"]
  return export_torch(params, key_fn=_key_fn(params))


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


_SGM_TIME_STACK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "out_layers.0": "norm2", "out_layers.3": "conv2"}
_DECODER_RESNET = re.compile(r"(decoder\.(?:mid_block|up_blocks\.\d+)\.resnets\.\d+)\.(.+)")


def _video_decoder_renames(keys) -> Dict[str, str]:
  """sgm ``VideoDecoder`` keys (after the CompVis -> diffusers resnet renaming) -> ``AutoencoderKLTemporalDecoder``
  names: ``{new: old}``."""
  renames = {}
  for key in keys:
    m = _DECODER_RESNET.fullmatch(key)
    if m:
      head, rest = m.groups()
      if rest.startswith("time_stack."):
        module, _, leaf = rest[len("time_stack."):].rpartition(".")
        if module in _SGM_TIME_STACK:
          renames[f"{head}.temporal_res_block.{_SGM_TIME_STACK[module]}.{leaf}"] = key
      elif rest == "mix_factor":
        renames[f"{head}.time_mixer.mix_factor"] = key
      else:
        renames[f"{head}.spatial_res_block.{rest}"] = key
    elif key.startswith("decoder.conv_out.time_mix_conv."):
      renames["decoder.time_conv_out." + key[len("decoder.conv_out.time_mix_conv."):]] = key
  return renames


def is_video_decoder(source: TensorSource) -> bool:
  """True when a CompVis / sgm autoencoder's decoder has temporal layers (sgm ``VideoDecoder``)."""
  return any(".time_stack." in k or k.endswith("time_mix_conv.weight") for k in source.keys())


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
  renamed = RenamedSource(view, renames)
  if not is_video_decoder(view):
    return renamed
  renamed = RenamedSource(renamed, _video_decoder_renames(renamed.keys()))
  if "quant_conv.weight" not in renamed.keys() and "encoder.conv_out.weight" in renamed.keys():
    c = renamed.shape("encoder.conv_out.weight")[0]  # 2 * latent channels
    identity = {"quant_conv.weight": np.eye(c, dtype=np.float32)[:, :, None, None],
                "quant_conv.bias": np.zeros((c,), np.float32)}
    renamed = MergedSource(renamed, DictSource(identity, name=f"{view.name} (identity quant_conv)"))
  return renamed


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
  video = {}
  if "decoder.time_conv_out.weight" in keys:  # sgm VideoDecoder (SVD): clip statistics like the reference
    video = dict(temporal_decoder=True, temporal_norm="clip", temporal_kernel=shape("decoder.time_conv_out.weight")[2],
                 use_post_quant_conv="post_quant_conv.weight" in keys)
  return VAEConfig(
      in_channels=shape("encoder.conv_in.weight")[1],
      out_channels=shape("decoder.conv_out.weight")[0],
      block_out_channels=tuple(shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0]
                               for i in range(num_levels)),
      layers_per_block=layers,
      latent_channels=shape("decoder.conv_in.weight")[1],
      norm_num_groups=norm_num_groups,
      scaling_factor=scaling_factor, **video)


def convert_compvis_vae(source: TensorSource, config: Optional[VAEConfig] = None, prefix: Optional[str] = None,
                        dtype=np.float32) -> Dict:
  """Shortcut: CompVis checkpoint -> Flax params (config inferred from the shapes when not given)."""
  view = compvis_vae_source(source, prefix)
  return convert_vae(view, config or vae_config_from_compvis(view), dtype=dtype)

