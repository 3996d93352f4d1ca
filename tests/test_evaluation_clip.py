"""CLIP image tower, projections and CLIPSIM vs transformers ``CLIPModel`` and OpenCLIP (random weights, fp32).

References: ``transformers.CLIPModel`` from a small ``CLIPConfig`` (224 px / patch 32 images, the real 49408-token
vocabulary so the package tokenizer drives both), ``CLIPImageProcessorPil`` for the preprocessing, and OpenCLIP's
``CLIP`` built from its ``ViT-B-32`` model config -- what ``open_clip.create_model("ViT-B-32", pretrained=None)``
constructs. ``open_clip/__init__.py`` (and ``factory.py``, through ``transform.py``) import torchvision, which does
not import against this torch build, so ``model.py`` is imported from the installed package under another name
with ``utils`` (torchvision's FrozenBatchNorm) replaced by a stub holding the helpers the ViT code needs.

Tolerance: max-abs error <= 1e-4 on embeddings of magnitude ~1 (relative to their max-abs value), CLIPSIM within
1e-5.
"""

import importlib
import importlib.util
import json
import os
import sys
import types

import numpy as np
import pytest
import torch
import transformers

from videoldm_jax.conversion.core import ConversionError, DictSource, flatten_paths
from videoldm_jax.evaluation import clip_image

REL_TOL = 1e-4
PROMPTS = ["a red car driving through the city at night", "two dogs playing in the snow"]


def _open_clip_model_module():
  """OpenCLIP's ``model.py`` as ``_openclip_eval_ref.model`` (no package ``__init__``, no torchvision)."""
  name = "_openclip_eval_ref"
  if name not in sys.modules:
    spec = importlib.util.find_spec("open_clip")
    pkg = types.ModuleType(name)
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules[name] = pkg
    utils = types.ModuleType(f"{name}.utils")
    utils.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)

    def _unused(*args, **kwargs):
      raise NotImplementedError("not used by the ViT forward")
    utils.feature_take_indices = utils.freeze_batch_norm_2d = _unused
    sys.modules[f"{name}.utils"] = utils
  return importlib.import_module(f"{name}.model")


def _randomize(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
  """Perturbs every parameter (norm scales, biases, class token included) away from its init value."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(scale * torch.randn(p.shape, generator=gen))
  return module.eval()


def _rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _frames(n, h, w, seed):
  return (np.random.default_rng(seed).random((n, h, w, 3)) * 256).astype(np.uint8)


def _features(output) -> torch.Tensor:
  """transformers 5 returns a ModelOutput whose ``pooler_output`` holds the projected features (4.x: a tensor)."""
  return output if torch.is_tensor(output) else output.pooler_output


def _cosines(image_embeds, text_embeds, n, t):
  images = torch.nn.functional.normalize(torch.as_tensor(image_embeds, dtype=torch.float64), dim=-1)
  texts = torch.nn.functional.normalize(torch.as_tensor(text_embeds, dtype=torch.float64), dim=-1)
  return torch.einsum("ntd,nd->nt", images.reshape(n, t, -1), texts).mean(1).numpy()


@pytest.fixture(scope="module")
def small_hf():
  torch.manual_seed(0)
  config = transformers.CLIPConfig(
      text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       vocab_size=49408, max_position_embeddings=77, eos_token_id=49407, bos_token_id=49406,
                       pad_token_id=49407),
      vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         image_size=224, patch_size=32),
      projection_dim=24)
  return _randomize(transformers.CLIPModel(config), seed=0)


def test_preprocessing_matches_transformers_processor():
  """PIL bicubic shortest-side resize + centre crop + CLIP mean/std, landscape and portrait frames (sizes whose
  crop offset is even: transformers floors where OpenAI CLIP rounds)."""
  processor = transformers.CLIPImageProcessorPil()
  for h, w in ((96, 128), (480, 300), (224, 224)):
    frames = _frames(2, h, w, seed=h)
    expected = processor(images=list(frames), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    ours = clip_image.preprocess_images(frames)
    assert ours.shape == (2, 224, 224, 3)
    assert np.max(np.abs(ours - expected)) < 1e-5, (h, w)


def test_small_parity_with_transformers(small_hf):
  config = clip_image.config_from_transformers(small_hf.config)
  loaded = clip_image.LoadedCLIP(config, clip_image.convert_clip_transformers(small_hf.state_dict(), config))
  videos = _frames(6, 96, 128, seed=1).reshape(2, 3, 96, 128, 3)
  frames = videos.reshape(6, 96, 128, 3)
  pixels = torch.from_numpy(clip_image.preprocess_images(frames).transpose(0, 3, 1, 2).copy())
  ids = clip_image.tokenize(loaded, PROMPTS)
  with torch.no_grad():
    image_ref = _features(small_hf.get_image_features(pixel_values=pixels)).numpy()
    text_ref = _features(small_hf.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))).numpy()
  image_err = _rel_err(clip_image.encode_images(loaded, frames, batch_size=4), image_ref)  # 4 + 2 (padded)
  text_err = _rel_err(clip_image.encode_texts(loaded, PROMPTS), text_ref)
  scores = clip_image.clipsim(loaded, videos, PROMPTS)
  expected = _cosines(image_ref, text_ref, 2, 3)
  print(f"CLIP small vs transformers: image rel err {image_err:.2e}, text rel err {text_err:.2e}, "
        f"CLIPSIM max err {np.max(np.abs(scores - expected)):.2e}")
  assert image_err < REL_TOL and text_err < REL_TOL
  assert scores.shape == (2,) and np.max(np.abs(scores - expected)) < 1e-5


def test_load_transformers_folder_and_file(small_hf, tmp_path):
  config = clip_image.config_from_transformers(small_hf.config)
  small_hf.save_pretrained(str(tmp_path / "clip"))  # config.json + model.safetensors (text_model.* keys)
  from_folder = clip_image.load_clip(str(tmp_path / "clip"), variant=None)
  assert from_folder.config == config
  state = dict(small_hf.state_dict(), **{"text_model.embeddings.position_ids": torch.arange(77)[None],
                                         "vision_model.embeddings.position_ids": torch.arange(50)[None]})
  torch.save(state, str(tmp_path / "pytorch_model.bin"))
  from_file = clip_image.load_clip(str(tmp_path / "pytorch_model.bin"), variant=config)
  for (path, a), (_, b) in zip(flatten_paths(from_folder.params), flatten_paths(from_file.params)):
    np.testing.assert_array_equal(a, b, err_msg="/".join(path))
  np.testing.assert_array_equal(from_file.params["vision"]["visual_projection"]["kernel"],
                                small_hf.visual_projection.weight.detach().numpy().T)
  with pytest.raises(ValueError, match="variant"):
    clip_image.load_clip(str(tmp_path / "pytorch_model.bin"), variant=None)


@pytest.mark.parametrize("variant", ["vit_b32", "vit_l14"])
def test_real_configs_match_transformers_layout(variant):
  """OpenAI ViT-B/32 and ViT-L/14 as transformers builds them (meta device: shapes only): the key set maps one to
  one onto our param tree with matching shapes."""
  hf_configs = {
      "vit_b32": dict(text_config=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8),
                      vision_config=dict(patch_size=32), projection_dim=512),
      "vit_l14": dict(text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12),
                      vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                         num_attention_heads=16, patch_size=14), projection_dim=768),
  }
  hf_config = transformers.CLIPConfig(**hf_configs[variant])
  ours = clip_image.VARIANTS[variant]()
  assert clip_image.config_from_transformers(hf_config) == ours
  with torch.device("meta"):
    ref = transformers.CLIPModel(hf_config)
  shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
  shapes.pop("logit_scale")
  for path, leaf in flatten_paths(clip_image.abstract_params(ours)):
    key = clip_image.transformers_key(path)
    expected = shapes.pop(key)
    if path[-1] == "kernel" and len(leaf.shape) == 2:
      expected = expected[::-1]
    elif path[-1] == "kernel":
      expected = (expected[2], expected[3], expected[1], expected[0])
    assert tuple(leaf.shape) == expected, key
  assert not shapes, f"unmapped transformers keys: {sorted(shapes)[:5]}"


def test_strictness_names_the_key(small_hf):
  config = clip_image.config_from_transformers(small_hf.config)
  state = small_hf.state_dict()
  missing = {k: v for k, v in state.items() if k != "vision_model.encoder.layers.1.mlp.fc2.bias"}
  with pytest.raises(ValueError, match=r"missing keys: vision_model\.encoder\.layers\.1\.mlp\.fc2\.bias"):
    clip_image.convert_clip_transformers(missing, config)
  extra = dict(state, **{"vision_model.encoder.layers.2.mlp.fc1.weight": torch.zeros(96, 48)})
  with pytest.raises(ConversionError, match=r"unexpected keys: vision_model\.encoder\.layers\.2\.mlp\.fc1\.weight"):
    clip_image.convert_clip_transformers(extra, config)
  bad = dict(state, **{"visual_projection.weight": torch.zeros(24, 47)})
  with pytest.raises(ConversionError, match=r"shape mismatches: visual_projection\.weight"):
    clip_image.convert_clip_transformers(bad, config)


@pytest.fixture(scope="module")
def openclip_b32():
  """OpenCLIP ``ViT-B-32`` (nn.GELU, as ``create_model("ViT-B-32")`` builds it), random weights, and its state
  dict in the layout of a released checkpoint (with OpenAI's metadata scalars)."""
  model_module = _open_clip_model_module()
  configs = os.path.join(list(importlib.util.find_spec("open_clip").submodule_search_locations)[0], "model_configs")
  with open(os.path.join(configs, "ViT-B-32.json"), encoding="utf-8") as f:
    model_config = json.load(f)
  torch.manual_seed(0)
  model = _randomize(model_module.CLIP(**model_config), seed=1, scale=0.02)
  state = dict(model.state_dict(), input_resolution=torch.tensor(224), context_length=torch.tensor(77),
               vocab_size=torch.tensor(49408))
  return model, state


def test_openclip_vit_b32_parity(openclip_b32):
  model, state = openclip_b32
  assert sum(p.numel() for p in model.parameters()) == 151_277_313
  config = clip_image.vit_b32(hidden_act="gelu")
  assert clip_image.openclip_config(state, hidden_act="gelu") == config
  # DataParallel-style "module." keys (file reading itself is covered with the small model).
  loaded = clip_image.load_clip(DictSource({"module." + k: v for k, v in state.items()}), variant="vit_b32",
                                hidden_act="gelu")
  videos = _frames(4, 180, 240, seed=5).reshape(2, 2, 180, 240, 3)
  frames = videos.reshape(4, 180, 240, 3)
  ids = clip_image.tokenize(loaded, PROMPTS)
  with torch.no_grad():
    pixels = torch.from_numpy(clip_image.preprocess_images(frames).transpose(0, 3, 1, 2).copy())
    image_ref = model.encode_image(pixels).numpy()
    text_ref = model.encode_text(torch.from_numpy(ids.astype(np.int64))).numpy()
  image_err = _rel_err(clip_image.encode_images(loaded, frames), image_ref)
  text_err = _rel_err(clip_image.encode_texts(loaded, PROMPTS), text_ref)
  scores = clip_image.clipsim(loaded, videos, PROMPTS)
  expected = _cosines(image_ref, text_ref, 2, 2)
  print(f"OpenCLIP ViT-B-32: image rel err {image_err:.2e}, text rel err {text_err:.2e}, "
        f"CLIPSIM max err {np.max(np.abs(scores - expected)):.2e}")
  assert image_err < REL_TOL and text_err < REL_TOL
  assert np.max(np.abs(scores - expected)) < 1e-5


def test_openclip_strictness(openclip_b32):
  _, state = openclip_b32
  config = clip_image.vit_b32(hidden_act="gelu")
  unknown = dict(state, **{"visual.attn_pool.query": torch.zeros(1, 768)})
  with pytest.raises(ConversionError, match=r"unexpected keys: visual\.attn_pool\.query"):
    clip_image.convert_clip_openclip(unknown, config)
  missing = {k: v for k, v in state.items() if k != "visual.transformer.resblocks.3.attn.in_proj_bias"}
  with pytest.raises(ConversionError, match=r"missing keys: vision_model\.encoder\.layers\.3\.self_attn\.k_proj\.bias"):
    clip_image.convert_clip_openclip(missing, config)
  with pytest.raises(ConversionError, match=r"shape mismatches: text_model\.encoder\.layers\.0\.mlp\.fc1\.weight"):
    clip_image.convert_clip_openclip(dict(state, **{"transformer.resblocks.0.mlp.c_fc.weight": torch.zeros(8, 8)}),
                                     config)
