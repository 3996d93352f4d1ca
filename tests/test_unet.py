"""Image U-Net vs diffusers ``UNet2DConditionModel`` (random init, fp32) and its weight conversion.

Covers SD 1.x (conv proj), SD 2.x (linear proj, 64-channel heads) and the x4 upscaler (7 input channels, class
labels, only-cross attention) as tiny models, plus the full SD 1.5 architecture; CompVis single-file names;
strictness; export back to diffusers.
"""

import dataclasses
import gc
import sys
from typing import Dict, Tuple

# torchvision in this environment does not match torch; transformers (imported by diffusers) only probes for it
# via importlib.util.find_spec, which reports a ``None`` entry in sys.modules as "not installed".
sys.modules.setdefault("torchvision", None)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

from videoldm_jax.conversion.core import ConversionError, DictSource, default_torch_key, flatten_paths  # noqa: E402
from videoldm_jax.conversion.unet import (compvis_unet_source, convert_unet, unet_config_from_compvis,  # noqa: E402
                                          unet_to_diffusers)
from videoldm_jax.models import unet as unet_lib  # noqa: E402
from videoldm_jax.models.unet import UNet, UNetConfig, unet_config_from_diffusers  # noqa: E402

# Max-abs error allowed on outputs of std ~0.3-0.6 (fp32 on both sides; observed ~2e-6).
TOL = 1e-4

# ----------------------------------------------------------------------------------------------------------
# diffusers configs, written out as in the public ``unet/config.json`` files.

_DOWN = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
_UP = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
SD15_DIFFUSERS = {  # runwayml/stable-diffusion-v1-5
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": _DOWN, "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64, "up_block_types": _UP}
SD21_DIFFUSERS = {  # stabilityai/stable-diffusion-2-1
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0", "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 1024, "down_block_types": _DOWN, "downsample_padding": 1,
    "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "num_class_embeds": None,
    "only_cross_attention": False, "out_channels": 4, "sample_size": 96, "up_block_types": _UP,
    "upcast_attention": True, "use_linear_projection": True}
X4_DIFFUSERS = {  # stabilityai/stable-diffusion-x4-upscaler
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.8.0", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [256, 512, 512, 1024], "center_input_sample": False, "cross_attention_dim": 1024,
    "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3, "downsample_padding": 1,
    "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 7, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "num_class_embeds": 1000,
    "only_cross_attention": [True, True, True, False], "out_channels": 4, "sample_size": 128,
    "up_block_types": ["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"], "upcast_attention": False,
    "use_linear_projection": True}

TINY_DIFFUSERS = {
    "sd1": dict(in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
                norm_num_groups=8),
    "sd2": dict(layers_per_block=1, block_out_channels=(32, 64, 64),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=48,
                attention_head_dim=(2, 4, 4), use_linear_projection=True, norm_num_groups=8),
    "x4": dict(in_channels=7, layers_per_block=1, block_out_channels=(32, 64, 64, 128),
               down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
               up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",), attention_head_dim=8,
               cross_attention_dim=128, use_linear_projection=True, only_cross_attention=[True, True, True, False],
               num_class_embeds=1000, norm_num_groups=8),
}
TINY_PRESETS = {"sd1": unet_lib.tiny, "sd2": unet_lib.tiny_sd2, "x4": unet_lib.tiny_x4_upscaler}
# What unet_config_from_compvis cannot read from the weights, for the tiny models.
TINY_COMPVIS_HINTS = {"sd1": dict(num_heads=4, norm_num_groups=8), "sd2": dict(head_dim=16, norm_num_groups=8),
                      "x4": dict(norm_num_groups=8)}


def _max_err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _nhwc(t: torch.Tensor) -> jnp.ndarray:
  return jnp.asarray(t.numpy().transpose(0, 2, 3, 1))


def _apply(config: UNetConfig, params, sample, timesteps, context, class_labels=None):
  fn = jax.jit(lambda p, x, t, c, y: UNet(config).apply({"params": p}, x, t, c, class_labels=y))
  return np.asarray(fn(params, sample, timesteps, context, class_labels))


@pytest.fixture(scope="module")
def tiny_models() -> Dict[str, Tuple[UNet2DConditionModel, UNetConfig, dict]]:
  """Random-init diffusers models, their configs mapped to ours, and the converted params."""
  out = {}
  for i, (name, kwargs) in enumerate(TINY_DIFFUSERS.items()):
    torch.manual_seed(i)
    model = UNet2DConditionModel(**kwargs).eval()
    config = unet_config_from_diffusers(dict(model.config))
    out[name] = model, config, convert_unet(DictSource(model.state_dict()), config)
  return out


# ----------------------------------------------------------------------------------------------------------
# Configs.

def test_config_json_roundtrip():
  for preset in (unet_lib.sd15, unet_lib.sd21, unet_lib.sd_x4_upscaler, unet_lib.tiny, unet_lib.tiny_sd2,
                 unet_lib.tiny_x4_upscaler):
    config = preset()
    again = UNetConfig.from_json(config.to_json())
    assert again == config and isinstance(again.num_attention_heads, tuple)
  with pytest.raises(ValueError, match="levels"):
    UNetConfig(block_out_channels=(320, 640), layers_per_block=(2, 2, 2))


def test_presets_match_diffusers_configs():
  assert unet_config_from_diffusers(SD15_DIFFUSERS) == unet_lib.sd15()
  # SD 2.1's config sets diffusers' fp16 attention upcast; it changes nothing here (logits are fp32 anyway).
  assert unet_config_from_diffusers(SD21_DIFFUSERS) == dataclasses.replace(unet_lib.sd21(), upcast_attention=True)
  assert unet_config_from_diffusers(X4_DIFFUSERS) == unet_lib.sd_x4_upscaler()
  for name, kwargs in TINY_DIFFUSERS.items():
    assert unet_config_from_diffusers(kwargs) == TINY_PRESETS[name](), name


@pytest.mark.parametrize("entry, value", [("resnet_time_scale_shift", "scale_shift"), ("class_embed_type", "timestep"),
                                          ("addition_embed_type", "text_time"), ("some_new_option", 3),
                                          ("down_block_types", ["SimpleCrossAttnDownBlock2D"] * 4),
                                          ("cross_attention_dim", [768, 1024, 1024, 1024])])
def test_diffusers_config_unsupported_values_are_named(entry, value):
  with pytest.raises(ValueError, match=entry):
    unet_config_from_diffusers({**SD15_DIFFUSERS, entry: value})


def _meta_model(config: dict) -> UNet2DConditionModel:
  with torch.device("meta"):
    return UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})


def _torch_shape(leaf: str, shape: Tuple[int, ...]) -> Tuple[int, ...]:
  if leaf == "kernel" and len(shape) == 2:
    return shape[::-1]
  if leaf == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return shape


@pytest.mark.parametrize("name, preset, diffusers_config", [
    ("sd15", unet_lib.sd15, SD15_DIFFUSERS), ("sd21", unet_lib.sd21, SD21_DIFFUSERS),
    ("x4", unet_lib.sd_x4_upscaler, X4_DIFFUSERS)])
def test_full_size_param_tree_matches_diffusers(name, preset, diffusers_config):
  """Param count and every name / shape of the full-size presets vs diffusers (no weights allocated)."""
  abstract = unet_lib.abstract_params(preset())
  ours = {default_torch_key(path): _torch_shape(path[-1], tuple(getattr(leaf, "value", leaf).shape))
          for path, leaf in flatten_paths(abstract)}
  theirs = {k: tuple(v.shape) for k, v in _meta_model(diffusers_config).state_dict().items()}
  assert ours == theirs
  count = unet_lib.count_params(abstract)
  assert count == sum(int(np.prod(s)) for s in theirs.values())
  if name == "sd15":
    assert count == 859_520_964


# ----------------------------------------------------------------------------------------------------------
# Forward parity.

# (batch timesteps or a scalar, spatial size, tokens): sd2 also runs a size that is no multiple of 2**levels.
_CASES = {"sd1": (torch.tensor([10.0, 500.0]), (16, 16), 5), "sd2": (777.0, (13, 11), 7),
          "x4": (torch.tensor([1.0, 999.0]), (16, 16), 3)}


def _inputs(name: str, config: UNetConfig):
  timesteps, (h, w), tokens = _CASES[name]
  gen = torch.Generator().manual_seed(7)
  sample = torch.randn(2, config.in_channels, h, w, generator=gen)
  context = torch.randn(2, tokens, config.cross_attention_dim, generator=gen)
  labels = torch.tensor([20, 300]) if config.num_class_embeds else None
  return sample, timesteps, context, labels


@pytest.fixture(scope="module")
def tiny_outputs(tiny_models):
  """{name: (ours, diffusers)} outputs, NHWC."""
  out = {}
  for name, (model, config, params) in tiny_models.items():
    sample, timesteps, context, labels = _inputs(name, config)
    with torch.no_grad():
      ref = model(sample, timesteps, context, class_labels=labels).sample.numpy().transpose(0, 2, 3, 1)
    t = jnp.asarray(timesteps.numpy() if isinstance(timesteps, torch.Tensor) else timesteps)
    ours = _apply(config, params, _nhwc(sample), t, jnp.asarray(context.numpy()),
                  None if labels is None else jnp.asarray(labels.numpy()))
    out[name] = ours, ref
  return out


@pytest.mark.parametrize("name", ["sd1", "sd2", "x4"])
def test_tiny_forward_matches_diffusers(name, tiny_outputs):
  ours, ref = tiny_outputs[name]
  assert ours.shape == ref.shape
  assert ref.std() > 0.1  # a meaningful, non-degenerate output
  err = _max_err(ours, ref)
  print(f"{name}: max abs err {err:.2e} (output std {ref.std():.3f})")
  assert err < TOL


def test_full_sd15_forward_matches_diffusers():
  """The full SD 1.5 U-Net (859.5M params) at a 16x16 latent: build, run, convert, free torch, run ours."""
  config = unet_config_from_diffusers(SD15_DIFFUSERS)
  model = _meta_model(SD15_DIFFUSERS).to_empty(device="cpu").eval()
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():  # unit-scale random weights; faster than the default init
    for name, p in model.named_parameters():
      if p.ndim >= 2:
        p.normal_(0.0, p[0].numel() ** -0.5, generator=gen)
      else:
        p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1, generator=gen)
  sample = torch.randn(1, 4, 16, 16, generator=gen)
  context = torch.randn(1, 77, 768, generator=gen)
  timesteps = torch.tensor([321.0])
  with torch.no_grad():
    ref = model(sample, timesteps, context).sample.numpy().transpose(0, 2, 3, 1)
  params = convert_unet(DictSource(model.state_dict()), config)
  del model
  gc.collect()
  leaves, treedef = jax.tree_util.tree_flatten(params)
  del params
  for i in range(len(leaves)):  # numpy -> device one leaf at a time, so only one copy is alive
    leaves[i] = jnp.asarray(leaves[i])
  params = jax.tree_util.tree_unflatten(treedef, leaves)
  del leaves
  assert unet_lib.count_params(params) == 859_520_964
  ours = _apply(config, params, _nhwc(sample), jnp.asarray(timesteps.numpy()), jnp.asarray(context.numpy()))
  err = _max_err(ours, ref)
  print(f"sd15 full: max abs err {err:.2e} (output std {ref.std():.3f})")
  assert ref.std() > 0.1 and err < TOL


def test_class_labels_and_added_cond_are_checked():
  x4 = unet_lib.tiny_x4_upscaler()
  inputs = unet_lib.dummy_inputs(x4)
  del inputs["class_labels"]
  with pytest.raises(ValueError, match="class_labels"):
    jax.eval_shape(lambda: UNet(x4).init(jax.random.PRNGKey(0), **inputs))
  config = unet_lib.tiny(addition_embed_dim=6)
  params = unet_lib.abstract_params(config)
  assert params["add_embedding"]["linear_1"]["kernel"].value.shape == (6, config.time_embed_dim)
  inputs = unet_lib.dummy_inputs(config)
  del inputs["added_cond"]
  with pytest.raises(ValueError, match="added_cond"):
    jax.eval_shape(lambda: UNet(config).init(jax.random.PRNGKey(0), **inputs))


# ----------------------------------------------------------------------------------------------------------
# CompVis single-file layout.

_COMPVIS_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                   "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _compvis_modules(config: UNetConfig) -> Dict[str, str]:
  """diffusers module -> CompVis module, enumerated in the construction order of openaimodel.UNetModel."""
  m = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
       "class_embedding": "label_emb", "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
       "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
       "mid_block.resnets.1": "middle_block.2"}
  n, k = config.num_levels, 1
  for i in range(n):  # input_blocks: per level `layers` x [ResBlock, SpatialTransformer?], then a Downsample
    for j in range(config.layers_per_block[i]):
      m[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{k}.0"
      if config.down_block_types[i] == "CrossAttnDownBlock2D":
        m[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{k}.1"
      k += 1
    if i < n - 1:
      m[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{k}.0.op"
      k += 1
  k = 0
  for i in range(n):  # output_blocks: per level `layers + 1` x [ResBlock, SpatialTransformer?, Upsample on the last]
    level = n - 1 - i
    attention = config.up_block_types[i] == "CrossAttnUpBlock2D"
    for j in range(config.layers_per_block[level] + 1):
      m[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{k}.0"
      if attention:
        m[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{k}.1"
      if i < n - 1 and j == config.layers_per_block[level]:
        m[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{k}.{2 if attention else 1}.conv"
      k += 1
  return m


def _to_compvis(state_dict, config: UNetConfig) -> dict:
  """A diffusers state dict under CompVis single-file names (``model.diffusion_model.*``)."""
  modules = _compvis_modules(config)
  out = {}
  for key, value in state_dict.items():
    parts = key.split(".")
    n = next(n for n in range(len(parts) - 1, 0, -1) if ".".join(parts[:n]) in modules)
    prefix, rest = ".".join(parts[:n]), parts[n:]
    if ".resnets." in prefix:
      rest = _COMPVIS_RESNET[rest[0]].split(".") + rest[1:]
    out["model.diffusion_model." + ".".join([modules[prefix]] + rest)] = value
  assert len(out) == len(state_dict)
  return out


@pytest.mark.parametrize("name", ["sd1", "sd2", "x4"])
def test_compvis_checkpoint_gives_the_same_params(name, tiny_models):
  model, config, params = tiny_models[name]
  compvis = _to_compvis(model.state_dict(), config)
  assert "model.diffusion_model.input_blocks.1.0.in_layers.0.weight" in compvis
  view = compvis_unet_source(DictSource(compvis))
  assert unet_config_from_compvis(view, **TINY_COMPVIS_HINTS[name]) == config
  converted = convert_unet(view, config)
  a, b = dict(flatten_paths(converted)), dict(flatten_paths(params))
  assert a.keys() == b.keys()
  assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("preset, diffusers_config", [
    (unet_lib.sd15, SD15_DIFFUSERS), (unet_lib.sd21, SD21_DIFFUSERS), (unet_lib.sd_x4_upscaler, X4_DIFFUSERS)])
def test_compvis_full_size_layouts_infer_the_presets(preset, diffusers_config):
  """Config inference and renaming on the full-size CompVis key sets (meta tensors: shapes only)."""
  state = _meta_model(diffusers_config).state_dict()
  view = compvis_unet_source(DictSource(_to_compvis(state, preset())))
  assert set(view.keys()) == set(state)
  assert all(view.shape(k) == tuple(state[k].shape) for k in state)
  assert unet_config_from_compvis(view) == preset()


# ----------------------------------------------------------------------------------------------------------
# Strictness and export.

def test_conversion_is_strict(tiny_models):
  model, config, _ = tiny_models["sd1"]
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  dropped = "down_blocks.0.attentions.0.proj_in.weight"
  with pytest.raises(ConversionError, match=r"missing keys: " + dropped):
    convert_unet(DictSource({k: v for k, v in state.items() if k != dropped}), config)
  with pytest.raises(ConversionError, match=r"unexpected keys: down_blocks\.0\.resnets\.0\.extra\.weight"):
    convert_unet(DictSource({**state, "down_blocks.0.resnets.0.extra.weight": np.zeros(3)}), config)
  with pytest.raises(ConversionError, match=r"shape mismatches: conv_in\.weight"):
    convert_unet(DictSource({**state, "conv_in.weight": np.zeros((32, 5, 3, 3), np.float32)}), config)
  # A CompVis key the renaming does not know stays visible under its own name.
  compvis = _to_compvis(state, config)
  compvis["model.diffusion_model.input_blocks.1.0.mystery.weight"] = np.zeros(2, np.float32)
  with pytest.raises(ConversionError, match=r"input_blocks\.1\.0\.mystery\.weight"):
    convert_unet(compvis_unet_source(DictSource(compvis)), config)


@pytest.mark.parametrize("name", ["sd1", "x4"])
def test_export_roundtrip_loads_strictly_into_diffusers(name, tiny_models, tiny_outputs):
  model, config, params = tiny_models[name]
  exported = unet_to_diffusers({"params": params})
  original = model.state_dict()
  assert exported.keys() == original.keys()
  assert all(np.array_equal(exported[k], original[k].numpy()) for k in original)
  torch.manual_seed(123)
  fresh = UNet2DConditionModel(**TINY_DIFFUSERS[name]).eval()
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  sample, timesteps, context, labels = _inputs(name, config)
  with torch.no_grad():
    again = fresh(sample, timesteps, context, class_labels=labels).sample.numpy().transpose(0, 2, 3, 1)
  ours, _ = tiny_outputs[name]
  assert _max_err(ours, again) < TOL
