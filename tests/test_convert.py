"""The converter CLI end to end: sources, output format, strictness, safety, round trip."""

import functools
import json
import os
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from videoldm_jax import convert
from videoldm_jax.conversion.core import flatten_paths

import reference_models
from reference_models import write_tiny_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
  """A tiny random diffusers pipeline folder (unet/ vae/ text_encoder/ scheduler/), written offline."""
  root = tmp_path_factory.mktemp("pipe")
  write_tiny_pipeline(root, prediction_type="v_prediction")
  return root


def _run_cli(*args):
  return subprocess.run([sys.executable, "-m", "videoldm_jax.convert", *args], capture_output=True, text=True,
                        cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)


def _assert_no_output(out):
  parent = os.path.dirname(str(out))
  assert not os.path.exists(out)
  assert not [p for p in os.listdir(parent) if ".tmp-" in p], "temporary output left behind"


def _state_dict_file(folder, name):
  for fname in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
    path = os.path.join(folder, name, fname)
    if os.path.exists(path):
      return path
  raise FileNotFoundError(folder)


def test_pipeline_folder_converts_and_loads(pipeline_dir, tmp_path):
  out = tmp_path / "sd_tiny"
  res = _run_cli("--source", str(pipeline_dir), "--output", str(out))
  assert res.returncode == 0, res.stderr
  meta = json.loads((out / "config.json").read_text())
  assert meta["format"] == convert.FORMAT
  assert set(meta["components"]) == {"unet", "vae", "text_encoder"}
  assert meta["schedule"]["prediction_type"] == "v_prediction"
  assert meta["schedule"]["beta_schedule"] == "scaled_linear"

  loaded = convert.load_converted(str(out))
  # Every parameter of the PyTorch models arrives, value for value.
  from safetensors.numpy import load_file
  for name in ("unet", "vae", "text_encoder"):
    torch_sd = load_file(_state_dict_file(pipeline_dir, name))
    n_torch = sum(v.size for v in torch_sd.values())
    n_flax = sum(np.size(v) for _, v in flatten_paths(loaded.params[name]))
    assert n_torch == n_flax, name
  # Exported back, the tensors equal the originals exactly.
  exported = tmp_path / "exported"
  res = _run_cli("--source", str(out), "--output", str(exported), "--to", "diffusers")
  assert res.returncode == 0, res.stderr
  for name in ("unet", "vae", "text_encoder"):
    original = load_file(_state_dict_file(pipeline_dir, name))
    back = load_file(_state_dict_file(exported, name))
    original = {k.removeprefix("text_model."): v for k, v in original.items() if not k.endswith("position_ids")}
    back = {k.removeprefix("text_model."): v for k, v in back.items()}
    assert set(original) == set(back), name
    for k in original:
      np.testing.assert_array_equal(original[k], back[k], err_msg=k)


def test_bfloat16_output(pipeline_dir, tmp_path):
  out = tmp_path / "bf16"
  res = _run_cli("--source", str(pipeline_dir / "vae"), "--output", str(out), "--dtype", "bfloat16")
  assert res.returncode == 0, res.stderr
  loaded = convert.load_converted(str(out))
  assert set(loaded.params) == {"vae"}
  dtypes = {str(np.asarray(v).dtype) for _, v in flatten_paths(loaded.params["vae"])}
  assert dtypes == {"bfloat16"}


def _mutated_vae_dir(pipeline_dir, tmp_path, mutate):
  from safetensors.numpy import load_file, save_file
  import shutil
  dst = tmp_path / "vae_mut"
  shutil.copytree(pipeline_dir / "vae", dst)
  path = dst / "diffusion_pytorch_model.safetensors"
  sd = load_file(str(path))
  mutate(sd)
  save_file(sd, str(path))
  return dst


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape"])
def test_strict_failures_name_the_key_and_leave_nothing(pipeline_dir, tmp_path, case):
  key = "decoder.conv_in.weight"

  def mutate(sd):
    if case == "missing":
      del sd[key]
    elif case == "unexpected":
      sd["decoder.extra_layer.weight"] = np.zeros((3,), np.float32)
    else:
      sd[key] = np.zeros((1, 2, 3, 3), np.float32)

  src = _mutated_vae_dir(pipeline_dir, tmp_path, mutate)
  out = tmp_path / "out"
  res = _run_cli("--source", str(src), "--output", str(out))
  assert res.returncode != 0
  expected = {"missing": ["missing keys", key], "unexpected": ["unexpected keys", "decoder.extra_layer.weight"],
              "shape": ["shape mismatches", key]}[case]
  for text in expected:
    assert text in res.stderr, res.stderr
  assert "Traceback" not in res.stderr
  _assert_no_output(out)


def test_wrong_file_type_is_refused(tmp_path):
  bogus = tmp_path / "weights.txt"
  bogus.write_text("hello")
  res = _run_cli("--source", str(bogus), "--output", str(tmp_path / "out"))
  assert res.returncode != 0 and "unsupported checkpoint type" in res.stderr
  fake = tmp_path / "fake.safetensors"
  fake.write_bytes(b"\x00\x01garbage")
  res = _run_cli("--source", str(fake), "--output", str(tmp_path / "out2"))
  assert res.returncode != 0 and "fake.safetensors" in res.stderr and "Traceback" not in res.stderr
  _assert_no_output(tmp_path / "out")
  _assert_no_output(tmp_path / "out2")


class _Exploit:
  """A pickle payload that would run a command on load."""

  def __init__(self, sentinel):
    self.sentinel = sentinel

  def __reduce__(self):
    return (os.system, (f"touch {self.sentinel}",))


def test_code_executing_pickle_is_refused(tmp_path):
  sentinel = tmp_path / "pwned"
  ckpt = tmp_path / "evil.ckpt"
  torch.save({"state_dict": {"model.diffusion_model.conv_in.weight": torch.zeros(1), "x": _Exploit(sentinel)}},
             ckpt, pickle_protocol=pickle.DEFAULT_PROTOCOL)
  res = _run_cli("--source", str(ckpt), "--output", str(tmp_path / "out"))
  assert res.returncode != 0
  assert "refused" in res.stderr and "evil.ckpt" in res.stderr, res.stderr
  assert not sentinel.exists(), "checkpoint code was executed"
  _assert_no_output(tmp_path / "out")


def test_existing_output_is_not_overwritten(pipeline_dir, tmp_path):
  out = tmp_path / "exists"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  res = _run_cli("--source", str(pipeline_dir / "vae"), "--output", str(out))
  assert res.returncode != 0 and "already exists" in res.stderr
  assert (out / "keep.txt").read_text() == "mine"


def test_config_round_trip_rejects_unknown_fields():
  from videoldm_jax.models.vae import VAEConfig
  cfg = VAEConfig.tiny() if hasattr(VAEConfig, "tiny") else VAEConfig()
  data = json.loads(json.dumps(convert.config_to_dict(cfg)))
  assert convert.config_from_dict(VAEConfig, data["config"]) == cfg
  with pytest.raises(ValueError, match="not_a_field"):
    convert.config_from_dict(VAEConfig, {**data["config"], "not_a_field": 1})


# ----------------------------------------------------------------------------------------------------------
# Single-file CompVis checkpoints through the CLI. The tiny models use what the converter infers for real SD 1.x
# files (32 norm groups, 8 heads at a 768-wide context, 64-wide text heads), since a single file stores no config.

@pytest.fixture(scope="module")
def compvis_case(tmp_path_factory):
  from diffusers import AutoencoderKL, UNet2DConditionModel
  from test_unet import _to_compvis
  from test_vae import diffusers_to_compvis
  from reference_models import tiny_clip
  from videoldm_jax.models.unet import unet_config_from_diffusers
  torch.manual_seed(1)
  root = tmp_path_factory.mktemp("compvis")
  unet = UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
  vae = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32)
  text = tiny_clip(hidden_size=64)
  for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text)):
    module.save_pretrained(root / "pipe" / name)
  reference_models.tiny_scheduler().save_pretrained(root / "pipe" / "scheduler")

  state = {k: v.numpy() for k, v in _to_compvis(unet.state_dict(), unet_config_from_diffusers(dict(unet.config))).items()}
  vae_sd = {k: v.numpy() for k, v in vae.state_dict().items()}
  state.update(diffusers_to_compvis(vae_sd, 2))
  for k, v in text.state_dict().items():
    k = k if k.startswith("text_model.") else "text_model." + k
    state["cond_stage_model.transformer." + k] = v.numpy()
  state["betas"] = (np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2).astype(np.float32)
  state["alphas_cumprod"] = np.cumprod(1.0 - state["betas"].astype(np.float64)).astype(np.float32)
  return root, state


def test_compvis_fixture_is_the_layout_diffusers_reads(compvis_case):
  """The fixture's CompVis file is built with this test suite's own renaming; diffusers' single-file converters
  (``diffusers.loaders.single_file_utils``, CompVis keys -> diffusers keys) read it back into exactly the pipeline
  folder's state dicts, so it is the real CompVis layout and not one only our converter understands."""
  from diffusers.loaders import single_file_utils as sfu
  from safetensors.numpy import load_file
  root, state = compvis_case
  ckpt = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
  pipe = root / "pipe"
  read_back = {
      "unet": sfu.convert_ldm_unet_checkpoint(ckpt, json.loads((pipe / "unet" / "config.json").read_text())),
      "vae": sfu.convert_ldm_vae_checkpoint(ckpt, json.loads((pipe / "vae" / "config.json").read_text())),
      "text_encoder": sfu.convert_ldm_clip_checkpoint(ckpt),
  }
  for name, back in read_back.items():
    original = load_file(_state_dict_file(pipe, name))
    if name == "text_encoder":  # transformers may save CLIPTextModel with or without its "text_model." prefix
      back = {k.removeprefix("text_model."): v for k, v in back.items()}
      original = {k.removeprefix("text_model."): v for k, v in original.items() if not k.endswith("position_ids")}
    assert set(back) == set(original), (name, sorted(set(back) ^ set(original))[:8])
    for k, v in original.items():  # diffusers reshapes the VAE's 1x1-conv attention weights to linear ones
      np.testing.assert_array_equal(back[k].numpy().reshape(v.shape), v, err_msg=f"{name}: {k}")


def _params_equal(a, b):
  fa, fb = dict(flatten_paths(a)), dict(flatten_paths(b))
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_equals_the_pipeline_folder(compvis_case, tmp_path, suffix):
  from safetensors.numpy import save_file
  root, state = compvis_case
  path = tmp_path / f"sd{suffix}"
  if suffix == ".safetensors":
    save_file(state, str(path))
  else:
    torch.save({"state_dict": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}}, path)
  res = _run_cli("--source", str(path), "--output", str(tmp_path / "single"))
  assert res.returncode == 0, res.stderr
  single = convert.load_converted(str(tmp_path / "single"))
  folder_configs, folder_params, _ = convert.convert_source(str(root / "pipe"))
  assert set(single.params) == {"unet", "vae", "text_encoder"}
  for name in single.params:
    _params_equal(single.params[name], folder_params[name])
  assert single.configs["unet"] == folder_configs["unet"]
  assert single.schedule["beta_schedule"] == "scaled_linear"


def test_single_file_samples_like_the_pipeline_folder(compvis_case, tmp_path):
  """A single file stores no scheduler config: its converted schedule must still carry SD's DDIM settings (no x̂_0
  clipping, steps_offset=1, final ᾱ = ᾱ_0), so both conversions of the same weights sample the same latents."""
  from safetensors.numpy import save_file
  from videoldm_jax import diffusion
  from videoldm_jax.models.unet import UNet
  root, state = compvis_case
  save_file(state, str(tmp_path / "sd.safetensors"))
  _, folder_params, folder_schedule = convert.convert_source(str(root / "pipe"))
  single_configs, single_params, single_schedule = convert.convert_source(str(tmp_path / "sd.safetensors"))
  assert {k: folder_schedule[k] for k in ("clip_sample", "steps_offset", "set_alpha_to_one")} == \
      {"clip_sample": False, "steps_offset": 1, "set_alpha_to_one": False}
  assert single_schedule == folder_schedule

  unet = UNet(config=single_configs["unet"])
  rng = np.random.default_rng(0)
  x_T = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
  context = rng.standard_normal((1, 77, 768)).astype(np.float32)

  @functools.partial(jax.jit, static_argnums=2)  # one compile when both conversions agree
  def ddim(params, schedule, config):
    model_fn = lambda x, t: unet.apply({"params": params}, x, t, context)  # noqa: E731
    return diffusion.ddim_sample(model_fn, x_T, schedule, 4, config=config)

  def sample(params, schedule):
    return np.asarray(ddim(params, diffusion.from_diffusers_scheduler_config(schedule),
                           diffusion.DDIMConfig.from_diffusers_scheduler_config(schedule)))

  np.testing.assert_array_equal(sample(single_params["unet"], single_schedule),
                                sample(folder_params["unet"], folder_schedule))


def test_single_file_with_ema_or_stray_keys_is_refused(compvis_case, tmp_path):
  from safetensors.numpy import save_file
  _, state = compvis_case
  ema = dict(state, **{"model_ema.decay": np.ones((), np.float32),
                       "model_ema.diffusion_modelconv_inweight": np.zeros((1,), np.float32)})
  save_file(ema, str(tmp_path / "ema.safetensors"))
  res = _run_cli("--source", str(tmp_path / "ema.safetensors"), "--output", str(tmp_path / "out"))
  assert res.returncode != 0 and "model_ema" in res.stderr and "--drop_ema" in res.stderr
  _assert_no_output(tmp_path / "out")
  res = _run_cli("--source", str(tmp_path / "ema.safetensors"), "--output", str(tmp_path / "out"), "--drop_ema")
  assert res.returncode == 0, res.stderr
  stray = dict(state, **{"cond_stage_model.extra.weight": np.zeros((2,), np.float32)})
  save_file(stray, str(tmp_path / "stray.safetensors"))
  res = _run_cli("--source", str(tmp_path / "stray.safetensors"), "--output", str(tmp_path / "out2"))
  assert res.returncode != 0 and "cond_stage_model.extra.weight" in res.stderr
  _assert_no_output(tmp_path / "out2")


# ----------------------------------------------------------------------------------------------------------
# Completeness: a source lacking a component or blocks is refused in one line naming what is missing.

def test_pipeline_lacking_listed_components_is_refused_unless_named(pipeline_dir, tmp_path, capsys):
  import shutil
  src = tmp_path / "unet_only"
  shutil.copytree(pipeline_dir / "unet", src / "unet")
  (src / "model_index.json").write_text(json.dumps({
      "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
      "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
      "safety_checker": [None, None]}))
  out = tmp_path / "out"
  assert convert.main(["--source", str(src), "--output", str(out)]) == 2
  err = capsys.readouterr().err
  assert "lacks vae, text_encoder, which its model_index.json lists" in err and "--components=unet " in err, err
  _assert_no_output(out)
  assert convert.main(["--source", str(src), "--output", str(out), "--components=unet"]) == 0
  assert set(convert.load_converted_configs(str(out))[0]) == {"unet"}


def test_single_file_with_missing_blocks_names_them(compvis_case, tmp_path, capsys):
  from safetensors.numpy import save_file
  _, state = compvis_case
  gap = "model.diffusion_model.output_blocks.1."
  save_file({k: v for k, v in state.items() if not k.startswith(gap)}, str(tmp_path / "gap.safetensors"))
  assert convert.main(["--source", str(tmp_path / "gap.safetensors"), "--output", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert "incomplete checkpoint, missing keys model.diffusion_model.output_blocks.1.*" in err, err
  assert "Traceback" not in err
  _assert_no_output(tmp_path / "out")
  save_file({k: v for k, v in state.items() if not k.startswith("first_stage_model.")},
            str(tmp_path / "no_vae.safetensors"))
  assert convert.main(["--source", str(tmp_path / "no_vae.safetensors"), "--output", str(tmp_path / "out")]) == 2
  assert "lacks vae, which a Stable Diffusion single file holds" in capsys.readouterr().err
  _assert_no_output(tmp_path / "out")


def test_random_bytes_named_ckpt_are_not_a_readable_checkpoint(tmp_path, capsys):
  path = tmp_path / "random.ckpt"
  path.write_bytes(np.random.default_rng(0).bytes(4096))  # starts with a byte the unpickler takes as an opcode
  assert convert.main(["--source", str(path), "--output", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert "random.ckpt: not a readable checkpoint" in err and "execute code" not in err, err
