"""CLIP text encoders and tokenizer vs the PyTorch references (random weights, fp32).

References: transformers ``CLIPTextModel`` (SD 1.x / diffusers layout), OpenCLIP ``TextTransformer`` and
``SimpleTokenizer`` loaded from the installed ``open_clip`` files without the package ``__init__`` (which
imports a broken torchvision). Tolerance: max-abs 1e-4 on unit-scale (layer-normed) outputs.
"""

import importlib
import importlib.util
import os
import sys
import types

# torchvision in this environment does not match torch; transformers only probes for it via
# importlib.util.find_spec, which reports a ``None`` entry in sys.modules as "not installed".
sys.modules.setdefault("torchvision", None)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from videoldm_jax.conversion.clip import (abstract_clip_params, clip_config_from_compvis,  # noqa: E402
                                          clip_to_transformers, compvis_clip_source, convert_clip_text,
                                          convert_single_file_clip, openclip_text_source)
from videoldm_jax.conversion.core import (ConversionError, DictSource, PrefixSource, default_torch_key,  # noqa: E402
                                         flatten_paths)
from videoldm_jax.models import clip, tokenizer  # noqa: E402

TOL = 1e-4
OPEN_CLIP_DIR = os.path.join(os.path.dirname(transformers.__file__), os.pardir, "open_clip")


# ----------------------------------------------------------------------------------------------------------
# Utilities.

def _open_clip_module(name: str):
  """Imports ``open_clip/<name>.py`` as ``_openclip_ref.<name>``; ``utils`` (torchvision) is replaced by a stub
  with the two functions ``transformer.py`` imports (only its vision code calls them)."""
  if "_openclip_ref" not in sys.modules:
    pkg = types.ModuleType("_openclip_ref")
    pkg.__path__ = [os.path.abspath(OPEN_CLIP_DIR)]
    sys.modules["_openclip_ref"] = pkg
    utils = types.ModuleType("_openclip_ref.utils")
    utils.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)

    def _unused(*args, **kwargs):
      raise NotImplementedError("vision-only function")
    utils.feature_take_indices = _unused
    sys.modules["_openclip_ref.utils"] = utils
  return importlib.import_module(f"_openclip_ref.{name}")


def _randomize(module: torch.nn.Module, seed: int = 0):
  """Perturbs every parameter (norm scales, biases included) so no weight sits at a trivial init value."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=gen))
  return module.eval()


def _hf_text_model(config: clip.CLIPTextConfig, num_layers=None, seed=0):
  torch.manual_seed(seed)
  cfg = transformers.CLIPTextConfig(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
      num_hidden_layers=num_layers or config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
      max_position_embeddings=config.max_position_embeddings, hidden_act=config.hidden_act,
      layer_norm_eps=config.layer_norm_eps, attn_implementation="eager")
  return _randomize(transformers.CLIPTextModel(cfg), seed)


def _ids(batch_lengths, n=77, pad=49407, seed=0):
  """``[b, n]`` CLIP-style ids: BOS, random tokens, EOS, padding."""
  rng = np.random.default_rng(seed)
  ids = np.full((len(batch_lengths), n), pad, np.int64)
  for i, length in enumerate(batch_lengths):
    ids[i, 0] = 49406
    ids[i, 1:length + 1] = rng.integers(0, 49406, length)
    ids[i, length + 1] = 49407
  return ids


def _apply(config, params, ids):
  return jax.jit(clip.CLIPTextEncoder(config).apply)({"params": params}, jnp.asarray(ids, jnp.int32))


def _max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _param_count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------------------------------------
# Config.

def test_config_json_roundtrip_and_presets():
  for cfg in (clip.vit_l14(), clip.openclip_vit_h14(), clip.tiny()):
    assert clip.CLIPTextConfig.from_json(cfg.to_json()) == cfg
  assert clip.openclip_vit_h14().output_depth == 23
  with pytest.raises(ValueError, match="output_layer"):
    clip.CLIPTextConfig(output_layer=-13)
  hf = transformers.CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                   num_attention_heads=16, hidden_act="gelu")
  ours = clip.clip_config_from_transformers(hf.to_dict())
  assert (ours.num_hidden_layers, ours.hidden_act, ours.output_layer, ours.projection_dim) == (23, "gelu", -1, None)
  full = transformers.CLIPConfig(text_config=hf.to_dict(), architectures=["CLIPTextModelWithProjection"])
  assert clip.clip_config_from_transformers(full.to_dict()).projection_dim == full.text_config.projection_dim


def _openclip_text_transformer(config: clip.CLIPTextConfig, seed=0):
  oc = _open_clip_module("transformer")
  torch.manual_seed(seed)
  return oc.TextTransformer(context_length=config.max_position_embeddings, vocab_size=config.vocab_size,
                            width=config.hidden_size, heads=config.num_attention_heads,
                            layers=config.num_hidden_layers, output_dim=config.projection_dim,
                            mlp_ratio=config.intermediate_size / config.hidden_size)


def test_full_size_param_counts_and_openclip_h_layout():
  """ViT-L/14 = 123,060,480 params; OpenCLIP ViT-H/14 text tower (built on the meta device, no allocation) has
  exactly our param count and its SD 2.x key set maps onto our tree with matching shapes."""
  abstract_l = abstract_clip_params(clip.vit_l14())
  assert _param_count(abstract_l) == 123_060_480
  cfg_h = clip.openclip_vit_h14()
  with torch.device("meta"):
    ref = _openclip_text_transformer(cfg_h)
  state = {"cond_stage_model.model." + k: v for k, v in ref.state_dict().items()}
  state["cond_stage_model.model.logit_scale"] = torch.empty((), device="meta")
  abstract_h = abstract_clip_params(cfg_h)
  assert _param_count(abstract_h) == sum(p.numel() for p in ref.parameters()) == 354_032_640
  source = DictSource(state)
  assert clip_config_from_compvis(source) == cfg_h
  view = openclip_text_source(source)
  got = {k: view.shape(k) for k in view.keys()}
  for path, leaf in flatten_paths(abstract_h):
    key = default_torch_key(path)
    assert key in got, key
    # torch Linear weights are [out, in], our kernels [in, out]
    assert tuple(got.pop(key)) == (leaf.shape[::-1] if path[-1] == "kernel" else leaf.shape), key
  assert not got, f"unmapped OpenCLIP keys: {sorted(got)}"


# ----------------------------------------------------------------------------------------------------------
# transformers CLIPTextModel parity (SD 1.x layout).

@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_tiny_parity_with_transformers(hidden_act):
  cfg = clip.tiny(hidden_act=hidden_act, num_hidden_layers=3)
  ref = _hf_text_model(cfg)
  state = ref.state_dict()
  assert not any(k.startswith("text_model.") for k in state)  # transformers 5 flattened module tree
  params = convert_clip_text(DictSource(state), cfg)
  for pad in (49407, 0):
    ids = _ids([3, 10, 75], pad=pad)
    with torch.no_grad():
      out = ref(torch.from_numpy(ids), output_hidden_states=True)
    ours = _apply(cfg, params, ids)
    err = _max_err(ours["last_hidden_state"], out.last_hidden_state)
    err_pooled = _max_err(ours["pooled"], out.pooler_output)
    assert err < TOL and err_pooled < TOL, (hidden_act, pad, err, err_pooled)
  # Penultimate output = final_layer_norm(hidden_states[-2]) of the same weights.
  cfg_pen = clip.tiny(hidden_act=hidden_act, num_hidden_layers=3, output_layer=-2)
  ours = _apply(cfg_pen, params, ids)
  with torch.no_grad():
    expected = ref.final_layer_norm(out.hidden_states[-2])
  assert _max_err(ours["last_hidden_state"], expected) < TOL
  assert _max_err(ours["pooled"], out.pooler_output) < TOL  # pooled always comes from the last block


def test_export_roundtrip_loads_in_transformers(tmp_path):
  cfg = clip.tiny()
  ref = _hf_text_model(cfg, seed=1)
  prefixed = {"text_model." + k: v for k, v in ref.state_dict().items()}
  prefixed["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # old checkpoints stored it
  params = convert_clip_text(DictSource(prefixed), cfg)
  exported = clip_to_transformers(params)
  assert set(exported) == set(prefixed) - {"text_model.embeddings.position_ids"}
  for k, v in exported.items():
    np.testing.assert_array_equal(v, prefixed[k].numpy())
  # A saved folder (text_model.* keys, as on the hub) loads through from_pretrained.
  from safetensors.numpy import save_file
  save_file(exported, str(tmp_path / "model.safetensors"))
  ref.config.save_pretrained(str(tmp_path))
  loaded = transformers.CLIPTextModel.from_pretrained(str(tmp_path), local_files_only=True,
                                                      attn_implementation="eager").eval()
  loaded_state = loaded.state_dict()
  for k, v in ref.state_dict().items():
    assert torch.equal(loaded_state[k], v), k
  ids = _ids([5, 20])
  with torch.no_grad():
    expected = ref(torch.from_numpy(ids)).last_hidden_state
    got = loaded(torch.from_numpy(ids)).last_hidden_state
  assert _max_err(got, expected) == 0.0


def test_full_vit_l14_parity():
  cfg = clip.vit_l14()
  ref = _hf_text_model(cfg)
  assert sum(p.numel() for p in ref.parameters()) == 123_060_480
  single_file = DictSource({"cond_stage_model.transformer.text_model." + k: v for k, v in ref.state_dict().items()})
  assert clip_config_from_compvis(single_file) == cfg
  params = convert_clip_text(compvis_clip_source(single_file), cfg)
  ids = _ids([4, 11], n=16)
  with torch.no_grad():
    out = ref(torch.from_numpy(ids))
  del ref
  ours = _apply(cfg, params, ids)
  err, err_pooled = _max_err(ours["last_hidden_state"], out.last_hidden_state), _max_err(ours["pooled"],
                                                                                         out.pooler_output)
  print(f"ViT-L/14 parity: last_hidden_state {err:.2e}, pooled {err_pooled:.2e}")
  assert err < TOL and err_pooled < TOL


# ----------------------------------------------------------------------------------------------------------
# OpenCLIP (SD 2.x single file) parity.

def _openclip_sd2_case():
  cfg = clip.CLIPTextConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=2,
                            hidden_act="gelu", output_layer=-2, projection_dim=96)
  ref = _randomize(_openclip_text_transformer(cfg), seed=3)
  state = {"cond_stage_model.model." + k: v for k, v in ref.state_dict().items()}
  state["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
  state["model.diffusion_model.out.0.weight"] = torch.ones(4)  # rest of the single file: not ours
  return cfg, ref, state


def test_openclip_penultimate_parity():
  cfg, ref, state = _openclip_sd2_case()
  config, params = convert_single_file_clip(DictSource(state))
  assert config == cfg
  # The converter CLI's calling pattern: strip the file prefix first, infer the config from the view.
  view = openclip_text_source(PrefixSource(DictSource(state), "cond_stage_model.model."))
  assert clip_config_from_compvis(view) == cfg
  np.testing.assert_array_equal(convert_clip_text(view, cfg)["encoder"]["layers_1"]["self_attn"]["v_proj"]["kernel"],
                                params["encoder"]["layers_1"]["self_attn"]["v_proj"]["kernel"])
  ids = _ids([2, 30, 75], pad=0)  # OpenCLIP pads with 0
  ids_t = torch.from_numpy(ids)
  with torch.no_grad():
    # SD 2.x FrozenOpenCLIPEmbedder(layer="penultimate"): every block but the last, then ln_final.
    x = ref.token_embedding(ids_t) + ref.positional_embedding
    for block in ref.transformer.resblocks[:-1]:
      x = block(x, attn_mask=ref.attn_mask)
    conditioning = ref.ln_final(x)
    text_embeds = ref(ids_t)  # OpenCLIP encode_text (unnormalised): full depth, argmax pooling, projection
  ours = _apply(config, params, ids)
  err = _max_err(ours["last_hidden_state"], conditioning)
  err_proj = _max_err(ours["text_embeds"], text_embeds)
  assert err < TOL and err_proj < TOL, (err, err_proj)

  # diffusers' SD 2.x text_encoder: a (L-1)-layer CLIPTextModel without the last block / projection.
  exported = clip_to_transformers(params, prefix="")
  drop = f"encoder.layers.{cfg.num_hidden_layers - 1}."
  truncated = {k: torch.from_numpy(v) for k, v in exported.items() if not k.startswith(drop)
               and not k.startswith("text_projection")}
  hf = _hf_text_model(cfg, num_layers=cfg.num_hidden_layers - 1)
  hf.load_state_dict(truncated, strict=True)
  with torch.no_grad():
    diffusers_style = hf(ids_t).last_hidden_state
  assert _max_err(ours["last_hidden_state"], diffusers_style) < TOL


def test_openclip_strictness():
  cfg, _, state = _openclip_sd2_case()
  vision = dict(state, **{"cond_stage_model.model.visual.proj": torch.zeros(8, 8)})
  with pytest.raises(ConversionError, match=r"visual\.proj"):
    convert_clip_text(openclip_text_source(DictSource(vision)), cfg)
  convert_clip_text(openclip_text_source(DictSource(vision), drop=("logit_scale", "visual.")), cfg)
  with pytest.raises(ConversionError, match="logit_scale"):
    convert_clip_text(openclip_text_source(DictSource(state), drop=()), cfg)


def test_strictness_names_the_key():
  cfg = clip.tiny()
  state = dict(_hf_text_model(cfg).state_dict())
  missing = {k: v for k, v in state.items() if k != "encoder.layers.1.mlp.fc2.bias"}
  with pytest.raises(ConversionError, match=r"missing keys: encoder\.layers\.1\.mlp\.fc2\.bias"):
    convert_clip_text(DictSource(missing), cfg)
  with pytest.raises(ConversionError, match=r"unexpected keys: encoder\.layers\.2\.mlp\.fc1\.weight"):
    convert_clip_text(DictSource(dict(state, **{"encoder.layers.2.mlp.fc1.weight": torch.zeros(3)})), cfg)
  bad = dict(state, **{"final_layer_norm.weight": torch.zeros(7)})
  with pytest.raises(ConversionError, match=r"shape mismatches: final_layer_norm\.weight"):
    convert_clip_text(DictSource(bad), cfg)
  with pytest.raises(ConversionError, match="both with and without"):
    convert_clip_text(DictSource(dict(state, **{"text_model.final_layer_norm.weight": torch.zeros(32)})), cfg)


# ----------------------------------------------------------------------------------------------------------
# Tokenizer.

TRICKY_TEXTS = [
    "a photo of a cat",
    "",
    "   ",
    "A RED Car, driving FAST!!! at night...",
    "!",
    "literal <|endoftext|> and <|startoftext|> markers",
    "naïve café résumé – façade; Ελλάδα ΟΔΟΣ",
    "北京 東京 서울 Москва",
    "emoji 🚀🔥 test 👩‍👩‍👧",
    "“curly quotes” and ‘single’ — dash",
    "fullwidth ＡＢＣ１２３ and ﬁne ligatures",
    "&amp; &lt;tag&gt; &amp;amp; &#39;",
    "mojibake fÃ¼r schÃ¶n",
    "don't won't I'll we've they're it's",
    "numbers 1234567 3.14 1e-5 #hashtag @user",
    "tabs\tand\nnewlines\r\n  many   spaces ",
    "e\u0301 combining, zero\u200bwidth, a_b-c/d\\e (x) [y] {z}",
    "x" * 300,
    " ".join(f"word{i} and more" for i in range(60)),  # > 77 tokens: truncation
]


def _reference_tokenizer():
  spec = importlib.util.spec_from_file_location("_openclip_ref_tokenizer", os.path.join(OPEN_CLIP_DIR, "tokenizer.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.SimpleTokenizer(bpe_path=tokenizer.BPE_PATH)


def test_vocab_matches_reference():
  ref = _reference_tokenizer()
  vocab, merges = tokenizer.build_vocab_and_merges()
  renamed = {"<start_of_text>": tokenizer.BOS_TOKEN, "<end_of_text>": tokenizer.EOS_TOKEN}
  assert vocab == {renamed.get(k, k): v for k, v in ref.encoder.items()}
  assert len(vocab) == 49408 and [tuple(m.split()) for m in merges] == list(ref.bpe_ranks)


@pytest.mark.parametrize("pad_with", ["!", "<|endoftext|>"])
def test_tokenizer_matches_openclip_simple_tokenizer(pad_with, tmp_path):
  ref = _reference_tokenizer()
  expected = ref(TRICKY_TEXTS, context_length=77).numpy()
  if pad_with != "!":  # SD 1.x pads with EOS instead of 0
    after_eos = np.cumsum(expected == ref.eot_token_id, axis=1) - (expected == ref.eot_token_id) > 0
    expected = np.where(after_eos, ref.eot_token_id, expected)
  tok = tokenizer.load_clip_tokenizer(pad_with=pad_with, cache_root=str(tmp_path))
  got = tokenizer.tokenize(tok, TRICKY_TEXTS)
  assert got.dtype == np.int32 and got.shape == (len(TRICKY_TEXTS), 77)
  bad = [t for t, g, e in zip(TRICKY_TEXTS, got, expected) if not np.array_equal(g, e)]
  assert not bad, f"token ids differ for {bad!r}"
  assert (got[-1, -1], got[-2, -1]) == (49407, 49407)  # truncated texts still end in EOS
  assert set(os.listdir(tokenizer.tokenizer_files(str(tmp_path)))) == {"vocab.json", "merges.txt"}
