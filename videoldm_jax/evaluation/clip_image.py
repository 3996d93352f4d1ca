"""CLIP image tower + projections for CLIPSIM, next to the text tower of ``models/clip.py``.

CLIPSIM (GODIVA / NUWA / Make-A-Video / Video LDM): for every generated video, the cosine similarity between the
CLIP embedding of each frame and the CLIP embedding of its prompt, averaged over the frames; the dataset score is
the mean over videos. :func:`clipsim` returns the per-video values **unscaled and unclipped** (a cosine in
[-1, 1]; Video LDM reports e.g. 0.2929 on MSR-VTT). torchmetrics' ``CLIPScore`` is ``100 * max(cos, 0)``: multiply
by 100 yourself to compare with such numbers.

Vision tower: ``models/clip_vision.py``'s ``CLIPVisionEncoder`` (param paths = ``transformers`` names without
the ``vision_model.`` prefix; re-exported here with its config and ``image_embeds_batch``).

Text tower: ``models/clip.py``'s ``CLIPTextEncoder`` with ``projection_dim`` set (its ``text_projection`` exists
for OpenCLIP / SD 2.x already; the SD converters' param trees are unchanged), pooled at the EOS token.

Image preprocessing (:func:`preprocess_images`) is OpenAI CLIP's, on the host with PIL, so it matches the
reference bit for bit: resize the shorter side to 224 with PIL bicubic (which antialiases when shrinking), centre
crop 224x224 with torchvision's rounding (``round((h - 224) / 2)``; transformers' processor floors instead, a one
pixel shift when the difference is odd), scale to [0, 1], normalise with CLIP's mean / std.

Weights: a ``transformers`` ``CLIPModel`` (folder with ``config.json`` + ``*.safetensors`` or
``pytorch_model.bin``, or a single file) or an OpenCLIP checkpoint (``visual.*`` + text tower keys; OpenAI's
released ViT-B/32 and ViT-L/14 as converted by open_clip, or LAION's), converted strictly: every param found,
every tensor used, except these explicit drops: ``logit_scale`` (the contrastive temperature, unused by a
cosine), the ``embeddings.position_ids`` buffers (transformers), OpenAI's metadata scalars
``input_resolution`` / ``context_length`` / ``vocab_size``, and a ``module.`` prefix on every key (DDP).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import re
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np

from videoldm_jax.conversion.clip import (abstract_clip_params, clip_config_from_compvis, openclip_block_names,
                                          openclip_text_source)
from videoldm_jax.conversion.clip_vision import VISION_PREFIX, VISUAL_PROJECTION, clip_vision_torch_key
from videoldm_jax.conversion.core import (ConversionError, DictSource, FilteredSource, RenamedSource, TensorSource,
                                          convert_strict, default_torch_key)
from videoldm_jax.conversion.io import open_checkpoint
from videoldm_jax.evaluation import batching
from videoldm_jax.models import clip_vision
from videoldm_jax.models import tokenizer as clip_tokenizer
from videoldm_jax.models.clip import CLIPTextConfig, CLIPTextEncoder
from videoldm_jax.models.clip_vision import (CLIP_MEAN, CLIP_STD, CLIPVisionConfig, CLIPVisionEmbeddings,  # noqa: F401
                                             CLIPVisionEncoder, clip_vision_config_from_transformers,
                                             image_embeds_batch)

# Keys dropped on purpose (see module doc); everything else must map onto the model.
DROPPED_KEYS = ("logit_scale", "input_resolution", "context_length", "vocab_size")
POSITION_IDS_SUFFIX = "embeddings.position_ids"
TEXT_PREFIX, TEXT_PROJECTION = "text_model.", "text_projection.weight"


# ----------------------------------------------------------------------------------------------------------
# Configs.

@dataclasses.dataclass(frozen=True)
class CLIPModelConfig:
  """Both towers; ``text.projection_dim`` must equal ``vision.projection_dim`` (the joint embedding)."""
  vision: CLIPVisionConfig
  text: CLIPTextConfig

  def __post_init__(self):
    if self.text.projection_dim != self.vision.projection_dim:
      raise ValueError(f"text projection_dim {self.text.projection_dim} != vision projection_dim "
                       f"{self.vision.projection_dim}")

  def to_dict(self) -> Dict:
    return {"vision": dataclasses.asdict(self.vision), "text": self.text.to_dict()}


def vit_b32(hidden_act: str = "quick_gelu") -> CLIPModelConfig:
  """CLIP ViT-B/32 (224 px, 512-d joint embedding). ``quick_gelu``: OpenAI's weights; LAION OpenCLIP ``ViT-B-32``
  weights use ``gelu``."""
  return CLIPModelConfig(
      vision=CLIPVisionConfig(hidden_act=hidden_act),
      text=CLIPTextConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                          hidden_act=hidden_act, projection_dim=512))


def vit_l14(hidden_act: str = "quick_gelu") -> CLIPModelConfig:
  """CLIP ViT-L/14 (224 px, 768-d joint embedding); the text tower is SD 1.x's plus ``text_projection``."""
  return CLIPModelConfig(
      vision=CLIPVisionConfig(patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, hidden_act=hidden_act, projection_dim=768),
      text=CLIPTextConfig(hidden_act=hidden_act, projection_dim=768))


VARIANTS: Dict[str, Callable[..., CLIPModelConfig]] = {"vit_b32": vit_b32, "vit_l14": vit_l14}


def config_from_transformers(config) -> CLIPModelConfig:
  """:class:`CLIPModelConfig` from a ``transformers`` ``CLIPConfig`` (object, dict or ``config.json`` contents)."""
  d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  v, t = dict(d.get("vision_config") or {}), dict(d.get("text_config") or {})
  proj = int(d.get("projection_dim", 512))
  tdef = CLIPTextConfig()
  vision = clip_vision_config_from_transformers(v, projection_dim=proj)
  text = CLIPTextConfig(
      vocab_size=int(t.get("vocab_size", tdef.vocab_size)),
      max_position_embeddings=int(t.get("max_position_embeddings", tdef.max_position_embeddings)),
      hidden_size=int(t.get("hidden_size", 512)), intermediate_size=int(t.get("intermediate_size", 2048)),
      num_hidden_layers=int(t.get("num_hidden_layers", tdef.num_hidden_layers)),
      num_attention_heads=int(t.get("num_attention_heads", 8)), hidden_act=str(t.get("hidden_act", tdef.hidden_act)),
      layer_norm_eps=float(t.get("layer_norm_eps", tdef.layer_norm_eps)), projection_dim=proj)
  return CLIPModelConfig(vision=vision, text=text)


def abstract_params(config: CLIPModelConfig) -> Dict:
  """``{"vision": ..., "text": ...}`` param shapes (boxes removed) of both towers, without allocating them."""
  return {"vision": clip_vision.abstract_params(config.vision), "text": abstract_clip_params(config.text)}


# ----------------------------------------------------------------------------------------------------------
# Tensor-source plumbing.

class _Union(TensorSource):
  """Disjoint union of views (a key in two of them is a bug in the caller)."""

  def __init__(self, *sources: TensorSource):
    self.name = sources[0].name
    self._where: Dict[str, TensorSource] = {}
    for source in sources:
      for k in source.keys():
        if k in self._where:
          raise ConversionError(f"{self.name}: key {k} mapped twice")
        self._where[k] = source

  def keys(self):
    return list(self._where)

  def shape(self, key):
    return self._where[key].shape(key)

  def _read(self, key):
    return self._where[key]._read(key)


def _strip_module_prefix(source: TensorSource) -> TensorSource:
  keys = source.keys()
  if keys and all(k.startswith("module.") for k in keys):
    return RenamedSource(source, {k[len("module."):]: k for k in keys})
  return source


def _prepared(source: Union[TensorSource, Mapping[str, object]]) -> TensorSource:
  """``source`` without a ``module.`` prefix and without the documented drops."""
  if not isinstance(source, TensorSource):
    source = DictSource(source)
  source = _strip_module_prefix(source)
  return FilteredSource(source, lambda k: k not in DROPPED_KEYS and not k.endswith(POSITION_IDS_SUFFIX))


def transformers_key(path: Tuple[str, ...]) -> str:
  """Flax path in ``{"vision": ..., "text": ...}`` -> ``transformers.CLIPModel`` state-dict key."""
  tower, *rest = path
  if tower == "vision":
    return clip_vision_torch_key(tuple(rest))
  return TEXT_PROJECTION if rest[0] == "text_projection" else TEXT_PREFIX + default_torch_key(tuple(rest))


def convert_clip_transformers(source: Union[TensorSource, Mapping[str, object]], config: CLIPModelConfig,
                              dtype=np.float32) -> Dict:
  """``transformers.CLIPModel`` state dict -> ``{"vision": ..., "text": ...}`` params (strict, see module doc)."""
  return convert_strict(_prepared(source), abstract_params(config), key_fn=transformers_key, dtype=dtype,
                        what="CLIP")


def _openclip_vision_view(source: TensorSource) -> TensorSource:
  """The ``visual.*`` keys of an OpenCLIP checkpoint under ``transformers.CLIPModel`` names (unknown ``visual.*``
  keys keep their names and fail strict conversion)."""
  visual = FilteredSource(source, lambda k: k.startswith("visual."))
  keys = set(visual.keys())
  renames: Dict[str, str] = {}
  derived: Dict[str, Tuple[str, Callable[[np.ndarray], np.ndarray], Tuple[int, ...]]] = {}

  def rename(new: str, old: str):
    if old in keys:
      renames[VISION_PREFIX + new] = old

  rename("embeddings.class_embedding", "visual.class_embedding")
  rename("embeddings.position_embedding.weight", "visual.positional_embedding")
  rename("embeddings.patch_embedding.weight", "visual.conv1.weight")
  for leaf in ("weight", "bias"):
    rename(f"pre_layrnorm.{leaf}", f"visual.ln_pre.{leaf}")
    rename(f"post_layernorm.{leaf}", f"visual.ln_post.{leaf}")
  if "visual.proj" in keys:  # used as ``x @ proj`` ([d, proj]); a Linear weight is [proj, d]
    width, proj = visual.shape("visual.proj")
    derived[VISUAL_PROJECTION] = ("visual.proj", lambda a: a.T, (proj, width))
  openclip_block_names(visual, "visual.transformer.resblocks.", VISION_PREFIX, renames, derived)
  return RenamedSource(visual, renames, derived)


def _openclip_text_view(source: TensorSource) -> TensorSource:
  """The text tower of an OpenCLIP checkpoint under ``transformers.CLIPModel`` names, via ``conversion/clip.py``."""
  view = openclip_text_source(source, prefix="", drop=("visual.",))
  mapped = ("embeddings.", "encoder.", "final_layer_norm.")
  renames = {(k if k == TEXT_PROJECTION else TEXT_PREFIX + k): k for k in view.keys()
             if k == TEXT_PROJECTION or k.startswith(mapped)}
  return RenamedSource(view, renames)


def openclip_source(source: Union[TensorSource, Mapping[str, object]]) -> TensorSource:
  """An OpenCLIP checkpoint (``visual.*``, ``token_embedding.weight``, ``transformer.resblocks.*``, ...) viewed
  under ``transformers.CLIPModel`` key names; fused ``in_proj`` tensors split, ``proj`` matrices transposed."""
  source = _prepared(source)
  if "visual.conv1.weight" not in source.keys():
    raise ConversionError(f"{source.name}: no OpenCLIP ViT image tower ('visual.conv1.weight')")
  text = FilteredSource(source, lambda k: not k.startswith("visual."))
  return _Union(_openclip_text_view(text), _openclip_vision_view(source))


def convert_clip_openclip(source: Union[TensorSource, Mapping[str, object]], config: CLIPModelConfig,
                          dtype=np.float32) -> Dict:
  """OpenCLIP ``CLIP`` state dict -> ``{"vision": ..., "text": ...}`` params (strict, see module doc)."""
  return convert_strict(openclip_source(source), abstract_params(config), key_fn=transformers_key, dtype=dtype,
                        what="CLIP (OpenCLIP layout)")


def detect_layout(source: TensorSource) -> str:
  """``"transformers"`` (``vision_model.*``) or ``"openclip"`` (``visual.*``), ``module.`` prefixes ignored."""
  keys = {k[len("module."):] if k.startswith("module.") else k for k in source.keys()}
  if VISION_PREFIX + "embeddings.patch_embedding.weight" in keys:
    return "transformers"
  if "visual.conv1.weight" in keys:
    return "openclip"
  raise ConversionError(f"{source.name}: neither a transformers CLIPModel ('{VISION_PREFIX}embeddings."
                        f"patch_embedding.weight') nor an OpenCLIP ViT ('visual.conv1.weight') checkpoint")


# ----------------------------------------------------------------------------------------------------------
# Loading.

@dataclasses.dataclass(frozen=True, eq=False)
class LoadedCLIP:
  """Everything :func:`clipsim` needs: configs, ``{"vision", "text"}`` params and the tokenizer's padding
  (``<|endoftext|>``; padding never changes the EOS-pooled embedding under causal attention)."""
  config: CLIPModelConfig
  params: Dict
  pad_with: str = clip_tokenizer.EOS_TOKEN

  @property
  def context_length(self) -> int:
    return self.config.text.max_position_embeddings


def _weight_files(directory: str) -> List[str]:
  shards = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
  if shards:
    return shards
  pickles = sorted(p for ext in (".bin", ".pt", ".pth") for p in glob.glob(os.path.join(directory, "*" + ext)))
  if len(pickles) != 1:
    raise ConversionError(f"{directory}: expected *.safetensors or exactly one .bin/.pt/.pth file, found "
                          f"{[os.path.basename(p) for p in pickles] or 'none'}")
  return pickles


def load_clip(path: Union[str, TensorSource], variant: Union[str, CLIPModelConfig, None] = "vit_b32", *,
              hidden_act: Optional[str] = None) -> LoadedCLIP:
  """Loads CLIP weights for :func:`clipsim`.

  Args:
    path: a transformers ``CLIPModel`` folder (``*.safetensors`` shards or one ``.bin``; ``config.json`` is used
      when ``variant`` is None), a single checkpoint file (``.safetensors``, or ``.bin``/``.pt``/``.pth`` read with
      ``torch.load(weights_only=True)``) in transformers or OpenCLIP layout, or a ``TensorSource``.
    variant: ``"vit_b32"`` / ``"vit_l14"`` (OpenAI architectures), a :class:`CLIPModelConfig`, or None: read a
      transformers folder's ``config.json``, or infer an OpenCLIP checkpoint's shapes (then ``hidden_act`` is
      required).
    hidden_act: overrides the variant's activation (``"gelu"`` for LAION OpenCLIP weights; OpenAI's are
      ``quick_gelu``, the default).
  """
  config_json = None
  if isinstance(path, TensorSource):
    source = path
  elif os.path.isdir(path):
    source = open_checkpoint(_weight_files(path))
    if os.path.isfile(os.path.join(path, "config.json")):
      config_json = os.path.join(path, "config.json")
  else:
    source = open_checkpoint(path)
  layout = detect_layout(source)
  if isinstance(variant, CLIPModelConfig):
    config = variant
  elif variant is None and layout == "openclip":
    if hidden_act is None:
      raise ValueError(f"{source.name}: an OpenCLIP checkpoint does not store its activation; pass hidden_act "
                       f"('quick_gelu' for OpenAI weights, 'gelu' for LAION's) or a variant")
    config = openclip_config(source, hidden_act)
  elif variant is None:
    if config_json is None:
      raise ValueError(f"{source.name}: no config.json; pass variant= one of {sorted(VARIANTS)}")
    with open(config_json, encoding="utf-8") as f:
      config = config_from_transformers(json.load(f))
  elif variant in VARIANTS:
    config = VARIANTS[variant]()
  else:
    raise ValueError(f"unknown CLIP variant {variant!r}; expected one of {sorted(VARIANTS)}, a CLIPModelConfig "
                     f"or None")
  if hidden_act is not None:
    config = CLIPModelConfig(vision=dataclasses.replace(config.vision, hidden_act=hidden_act),
                             text=dataclasses.replace(config.text, hidden_act=hidden_act))
  if layout == "openclip":
    params = convert_clip_openclip(source, config)
  else:
    params = convert_clip_transformers(source, config)
  return LoadedCLIP(config=config, params=jax.device_put(params))


def openclip_config(source: Union[TensorSource, Mapping[str, object]], hidden_act: str,
                    head_dim: int = 64) -> CLIPModelConfig:
  """Infers a :class:`CLIPModelConfig` from the tensor shapes of an OpenCLIP checkpoint. Not stored, hence
  arguments: the activation (OpenAI weights ``quick_gelu``, LAION's ``gelu``) and the head width (``width /
  head_dim`` heads; 64 for every OpenAI / LAION CLIP ViT)."""
  source = _prepared(source)
  view = _openclip_vision_view(source)
  width, _, patch, _ = view.shape(VISION_PREFIX + "embeddings.patch_embedding.weight")
  grid = int(round((view.shape(VISION_PREFIX + "embeddings.position_embedding.weight")[0] - 1) ** 0.5))
  layer_re = re.compile(re.escape(VISION_PREFIX) + r"encoder\.layers\.(\d+)\.")
  vision = CLIPVisionConfig(
      image_size=grid * patch, patch_size=patch, hidden_size=width,
      intermediate_size=view.shape(VISION_PREFIX + "encoder.layers.0.mlp.fc1.weight")[0],
      num_hidden_layers=1 + max(int(m.group(1)) for k in view.keys() if (m := layer_re.match(k))),
      num_attention_heads=width // head_dim, hidden_act=hidden_act, projection_dim=view.shape(VISUAL_PROJECTION)[0])
  text = clip_config_from_compvis(openclip_text_source(FilteredSource(source, lambda k: not k.startswith("visual.")),
                                                       prefix="", drop=()))
  text = dataclasses.replace(text, hidden_act=hidden_act, output_layer=-1)  # CLIPSIM pools the last block
  return CLIPModelConfig(vision=vision, text=text)


# ----------------------------------------------------------------------------------------------------------
# Preprocessing and embeddings.

def preprocess_images(frames_uint8, image_size: int = 224) -> np.ndarray:
  """OpenAI CLIP preprocessing of uint8 RGB frames ``[n, h, w, 3]`` -> ``[n, s, s, 3]`` float32 (host, PIL)."""
  from PIL import Image  # deferred: only CLIPSIM needs it
  frames = np.asarray(frames_uint8)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f"expected uint8 frames [n, h, w, 3], got {frames.dtype} {frames.shape}")
  n, h, w, _ = frames.shape
  if h <= w:
    new_h, new_w = image_size, int(image_size * w / h)
  else:
    new_h, new_w = int(image_size * h / w), image_size
  top, left = int(round((new_h - image_size) / 2.0)), int(round((new_w - image_size) / 2.0))
  out = np.empty((n, image_size, image_size, 3), np.float32)
  for i in range(n):
    img = Image.fromarray(frames[i]).resize((new_w, new_h), Image.BICUBIC)  # PIL returns a copy at equal size
    out[i] = np.asarray(img, np.float32)[top:top + image_size, left:left + image_size]
  return (out / 255.0 - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


@functools.partial(jax.jit, static_argnames=("config",))
def text_embeds_batch(params: Mapping, input_ids: jax.Array, config: CLIPTextConfig) -> jax.Array:
  """Jittable core: token ids ``[n, 77]`` -> unnormalised ``text_embeds`` ``[n, projection_dim]``."""
  return CLIPTextEncoder(config).apply({"params": params}, input_ids)["text_embeds"]


def tokenize(loaded: LoadedCLIP, prompts: Sequence[str]) -> np.ndarray:
  """``[n, context_length]`` int32 ids with the package's offline CLIP tokenizer."""
  tok = clip_tokenizer.load_clip_tokenizer(pad_with=loaded.pad_with)
  return clip_tokenizer.tokenize(tok, list(prompts), max_length=loaded.context_length)


def encode_images(loaded: LoadedCLIP, frames_uint8, *, batch_size: int = 64) -> np.ndarray:
  """Unnormalised image embeddings ``[n, projection_dim]`` of uint8 RGB frames ``[n, h, w, 3]``."""
  frames = np.asarray(frames_uint8)
  vision = loaded.config.vision
  params = jax.device_put(loaded.params["vision"])
  fn = lambda chunk: image_embeds_batch(params, preprocess_images(chunk, vision.image_size), config=vision)
  return batching.map_padded(fn, frames, batch_size)


def encode_texts(loaded: LoadedCLIP, prompts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
  """Unnormalised text embeddings ``[n, projection_dim]`` of ``prompts``."""
  params = jax.device_put(loaded.params["text"])
  fn = lambda ids: text_embeds_batch(params, ids, config=loaded.config.text)
  return batching.map_padded(fn, tokenize(loaded, prompts), batch_size)


def _normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clipsim(loaded: LoadedCLIP, videos_uint8, prompts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
  """Per-video CLIPSIM ``[n]`` (float64): the cosine between each frame's and the prompt's CLIP embedding,
  averaged over the ``t`` frames of ``videos_uint8 [n, t, h, w, 3]`` (uint8 RGB). Not scaled by 100."""
  videos = np.asarray(videos_uint8)
  if videos.ndim != 5 or videos.shape[-1] != 3:
    raise ValueError(f"expected videos [n, t, h, w, 3], got shape {videos.shape}")
  prompts = list(prompts)
  n, t = videos.shape[:2]
  if len(prompts) != n:
    raise ValueError(f"{n} videos but {len(prompts)} prompts")
  if n == 0:
    return np.zeros((0,), np.float64)
  text = _normalize(encode_texts(loaded, prompts, batch_size=batch_size))  # [n, proj]
  images = _normalize(encode_images(loaded, videos.reshape((n * t,) + videos.shape[2:]), batch_size=batch_size))
  cos = np.einsum("ntd,nd->nt", images.reshape(n, t, -1), text)
  return cos.mean(axis=1)
