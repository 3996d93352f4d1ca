"""CLIP text encoder weights: transformers / CompVis (SD 1.x) / OpenCLIP (SD 2.x) -> Flax, and back.

All three layouts are first viewed as ``transformers.CLIPTextModel`` state-dict keys without the ``text_model.``
prefix (the names of our param tree, see ``models/clip.py``), then converted strictly by
:func:`~videoldm_jax.conversion.core.convert_strict`: every model param must be found and every checkpoint
tensor used. What is dropped, and why, is explicit:

* ``embeddings.position_ids`` (an ``arange`` buffer stored by old transformers versions) in
  :func:`convert_clip_text`; our model always uses ``arange``, and a warning names the file if the stored ids
  differ (some SD 1.x fine-tunes carry corrupted float ids).
* ``logit_scale`` (CLIP's contrastive temperature, not part of the text tower) by :func:`openclip_text_source`'s
  default ``drop``. An OpenCLIP vision tower (``visual.*``) is NOT dropped by default: converting a full OpenCLIP
  model file reports it as unexpected unless the caller passes ``drop=("logit_scale", "visual.")``.

The OpenCLIP last block and ``text_projection`` are converted too (SD 2.x conditions on the penultimate block;
those params feed only ``text_embeds``), so an SD 2.x text tower round-trips without loss.
"""

from __future__ import annotations

import logging
import re
from typing import Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from videoldm_jax.conversion.core import (ConversionError, FilteredSource, PrefixSource, RenamedSource,
                                          TensorSource, convert_strict, export_torch)
from videoldm_jax.models.clip import CLIPTextConfig, CLIPTextEncoder

COMPVIS_CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
TEXT_MODEL_PREFIX = "text_model."
POSITION_IDS_KEY = "embeddings.position_ids"
HEAD_DIM = 64  # every SD text encoder (ViT-L/14: 768/12, ViT-H/14: 1024/16, bigG: 1280/20)

_LAYER_RE = re.compile(r"^encoder\.layers\.(\d+)\.")


def abstract_clip_params(config: CLIPTextConfig) -> Mapping:
  """Param shapes (``jax.ShapeDtypeStruct``, logical-axis boxes removed) of :class:`CLIPTextEncoder`; no allocation."""
  model = CLIPTextEncoder(config)
  ids = jax.ShapeDtypeStruct((1, config.max_position_embeddings), jnp.int32)
  return nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), ids)["params"])


def strip_text_model_prefix(source: TensorSource) -> TensorSource:
  """Accepts both ``text_model.``-prefixed (transformers <5 files) and flat (transformers 5 modules) keys."""
  keys = source.keys()
  renames = {k[len(TEXT_MODEL_PREFIX):]: k for k in keys if k.startswith(TEXT_MODEL_PREFIX)}
  if not renames:
    return source
  clashes = sorted(set(renames) & set(keys))
  if clashes:
    raise ConversionError(f"{source.name}: keys present both with and without '{TEXT_MODEL_PREFIX}': {clashes[:4]}")
  return RenamedSource(source, renames)


def convert_clip_text(source: TensorSource, config: CLIPTextConfig, dtype=np.float32) -> Dict:
  """transformers-named CLIP text weights -> Flax params of ``CLIPTextEncoder(config)``.

  Strict: raises :class:`ConversionError` naming every missing / unexpected / mis-shaped key. Only the
  ``embeddings.position_ids`` buffer is dropped.
  """
  source = strip_text_model_prefix(source)
  if POSITION_IDS_KEY in source.keys():
    ids = source.get(POSITION_IDS_KEY).reshape(-1)
    if not np.array_equal(ids, np.arange(ids.size, dtype=ids.dtype)):
      logging.warning("%s: stored %s are not 0..%d (max deviation %g); the model uses arange positions.",
                      source.name, POSITION_IDS_KEY, ids.size - 1, float(np.max(np.abs(ids - np.arange(ids.size)))))
    source = FilteredSource(source, lambda k: k != POSITION_IDS_KEY)
  return convert_strict(source, abstract_clip_params(config), dtype=dtype, what="CLIP text encoder")


def compvis_clip_source(source: TensorSource) -> TensorSource:
  """The SD 1.x text encoder of a CompVis single file: ``cond_stage_model.transformer.*`` are transformers keys
  (usually ``text_model.``-prefixed, which :func:`convert_clip_text` tolerates). ``source`` may be the whole file
  or already stripped of ``cond_stage_model.transformer.``."""
  has_prefix = any(k.startswith(COMPVIS_CLIP_PREFIX) for k in source.keys())
  view = PrefixSource(source, COMPVIS_CLIP_PREFIX if has_prefix else "")
  if not any(k.endswith("embeddings.token_embedding.weight") for k in view.keys()):
    raise ConversionError(f"{source.name}: no CLIP text encoder keys "
                          f"('{COMPVIS_CLIP_PREFIX}[text_model.]embeddings.token_embedding.weight')")
  view.clip_layout = "compvis"
  return view


def openclip_text_source(source: TensorSource, prefix: Optional[str] = None,
                         drop: Sequence[str] = ("logit_scale",)) -> TensorSource:
  """An OpenCLIP text tower (SD 2.x single file: ``cond_stage_model.model.*``) under transformers names.

  ``attn.in_proj_weight/bias`` (fused ``[3d, d]``) are split into ``q_proj``/``k_proj``/``v_proj``;
  ``text_projection`` (used as ``x @ P``, ``[d, proj]``) becomes a ``Linear`` weight ``[proj, d]``.
  ``prefix``: stripped first; default ``cond_stage_model.model.`` when the keys carry it, else none (a source
  already stripped, or a bare OpenCLIP text tower state dict).
  ``drop``: keys (after ``prefix``) to discard explicitly; an entry ending in ``.`` drops that key prefix.
  Anything else not mapped (e.g. ``visual.*``) stays visible and fails strict conversion.
  """
  if prefix is None:
    prefix = OPENCLIP_PREFIX if any(k.startswith(OPENCLIP_PREFIX) for k in source.keys()) else ""
  view: TensorSource = PrefixSource(source, prefix)
  if not view.keys():
    raise ConversionError(f"{source.name}: no '{prefix}*' keys (not an OpenCLIP / SD 2.x file?)")
  dropped = {k for k in view.keys() if any(k == d or (d.endswith(".") and k.startswith(d)) for d in drop)}
  view = FilteredSource(view, lambda k: k not in dropped)
  keys = set(view.keys())

  renames: Dict[str, str] = {}
  derived: Dict[str, Tuple[str, object, Tuple[int, ...]]] = {}

  def rename(new: str, old: str):
    if old in keys:
      renames[new] = old

  rename("embeddings.token_embedding.weight", "token_embedding.weight")
  rename("embeddings.position_embedding.weight", "positional_embedding")
  for leaf in ("weight", "bias"):
    rename(f"final_layer_norm.{leaf}", f"ln_final.{leaf}")
  if "text_projection" in keys:
    width, proj = view.shape("text_projection")
    derived["text_projection.weight"] = ("text_projection", lambda a: a.T, (proj, width))

  openclip_block_names(view, "transformer.resblocks.", "", renames, derived)
  if "embeddings.token_embedding.weight" not in renames:
    raise ConversionError(f"{source.name}: no OpenCLIP text tower keys ('{prefix}token_embedding.weight')")
  out = RenamedSource(view, renames, derived)
  out.clip_layout = "openclip"
  return out


def openclip_block_names(view: TensorSource, old_prefix: str, new_prefix: str, renames: Dict[str, str],
                         derived: Dict[str, Tuple[str, object, Tuple[int, ...]]]) -> None:
  """Adds to ``renames`` / ``derived`` the transformers names of OpenCLIP residual blocks
  ``{old_prefix}{i}.*`` (``ln_1``, ``attn``, ``mlp.c_fc`` ...) as ``{new_prefix}encoder.layers.{i}.*``; the fused
  ``attn.in_proj_weight/bias`` ``[3d, ...]`` are split into ``q_proj`` / ``k_proj`` / ``v_proj``."""
  keys = set(view.keys())
  blocks = re.compile(re.escape(old_prefix) + r"(\d+)\.")
  for i in sorted({int(m.group(1)) for k in keys if (m := blocks.match(k))}):
    old, new = f"{old_prefix}{i}.", f"{new_prefix}encoder.layers.{i}."
    for leaf in ("weight", "bias"):
      for ours, theirs in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj", "attn.out_proj"),
                           ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
        if f"{old}{theirs}.{leaf}" in keys:
          renames[f"{new}{ours}.{leaf}"] = f"{old}{theirs}.{leaf}"
      fused = f"{old}attn.in_proj_{leaf}"
      if fused in keys:
        shape = view.shape(fused)
        d = shape[0] // 3
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
          derived[f"{new}self_attn.{name}.{leaf}"] = (fused, lambda a, j=j, d=d: a[j * d:(j + 1) * d],
                                                      (d,) + tuple(shape[1:]))


def _clip_view(source: TensorSource) -> TensorSource:
  """Whole single file, stripped file, or a view from :func:`compvis_clip_source` / :func:`openclip_text_source`."""
  if getattr(source, "clip_layout", None):
    return source
  keys = source.keys()
  if any(k.startswith(COMPVIS_CLIP_PREFIX) for k in keys):
    return compvis_clip_source(source)
  if any(k.startswith(OPENCLIP_PREFIX) for k in keys) or "positional_embedding" in keys:
    return openclip_text_source(source)
  if any(k.endswith("embeddings.token_embedding.weight") for k in keys):
    return compvis_clip_source(source)
  raise ConversionError(f"{source.name}: found neither '{COMPVIS_CLIP_PREFIX}*' (SD 1.x) nor "
                        f"'{OPENCLIP_PREFIX}*' (SD 2.x) text encoder keys")


def clip_config_from_compvis(source: TensorSource, num_attention_heads: Optional[int] = None) -> CLIPTextConfig:
  """Infers the text-encoder config of an SD single file from tensor shapes.

  ``source``: the whole file, the file stripped of its ``cond_stage_model.*.`` prefix, or the view returned by
  :func:`compvis_clip_source` / :func:`openclip_text_source`.
  SD 1.x (``cond_stage_model.transformer.*``): OpenAI CLIP, ``quick_gelu``, last-layer output.
  SD 2.x (``cond_stage_model.model.*``): OpenCLIP, ``gelu``, penultimate-layer output, ``text_projection`` if
  stored. Heads are not stored; default width / 64 (true for every SD text encoder).
  """
  view = _clip_view(source)
  if view.clip_layout == "openclip":
    hidden_act, output_layer = "gelu", -2
    projection_dim = view.shape("text_projection.weight")[0] if "text_projection.weight" in view.keys() else None
  else:
    view = strip_text_model_prefix(view)
    hidden_act, output_layer, projection_dim = "quick_gelu", -1, None
  vocab_size, hidden = view.shape("embeddings.token_embedding.weight")
  if num_attention_heads is None:
    if hidden % HEAD_DIM:
      raise ConversionError(f"{source.name}: width {hidden} is not a multiple of {HEAD_DIM}; "
                            f"pass num_attention_heads")
    num_attention_heads = hidden // HEAD_DIM
  num_layers = 1 + max(int(m.group(1)) for k in view.keys() if (m := _LAYER_RE.match(k)))
  return CLIPTextConfig(
      vocab_size=vocab_size,
      max_position_embeddings=view.shape("embeddings.position_embedding.weight")[0],
      hidden_size=hidden,
      intermediate_size=view.shape("encoder.layers.0.mlp.fc1.weight")[0],
      num_hidden_layers=num_layers,
      num_attention_heads=num_attention_heads,
      hidden_act=hidden_act,
      output_layer=output_layer,
      projection_dim=projection_dim,
  )


def convert_single_file_clip(source: TensorSource, dtype=np.float32,
                             num_attention_heads: Optional[int] = None) -> Tuple[CLIPTextConfig, Dict]:
  """``(config, params)`` of the text encoder in an SD 1.x or 2.x single-file checkpoint (only its
  ``cond_stage_model.*`` keys are read; the rest of the file is ignored here)."""
  view = _clip_view(source)
  config = clip_config_from_compvis(view, num_attention_heads=num_attention_heads)
  return config, convert_clip_text(view, config, dtype=dtype)


def clip_to_transformers(params: Mapping, prefix: str = TEXT_MODEL_PREFIX) -> Dict[str, np.ndarray]:
  """Flax params -> ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` state dict (numpy).

  With the default ``text_model.`` prefix the keys are those of saved transformers checkpoints, which both
  transformers 4.x and 5.x ``from_pretrained`` load; ``prefix=""`` gives transformers 5 module keys
  (``CLIPTextModel.load_state_dict``). ``text_projection.weight`` is never prefixed.
  """
  out = {}
  for key, value in export_torch(params).items():
    out[key if key.startswith("text_projection.") else prefix + key] = value
  return out
