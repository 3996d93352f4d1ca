"""Personalized text-to-video (paper Sec. 4.2): a tiny trained T2V ``base`` workdir's temporal layers inserted into
a "personalized" Stable Diffusion pipeline folder (diffusers layout, written from Flax params through the package's
exporters, so it has the runlocal model's architecture), two text encoders, the ``personalize`` command and sampling
from its output.

``PERSONALIZED_SHEET_COPY=/path.png`` copies the contact sheet the sampling test writes there."""

import contextlib
import functools
import io
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import rds, webvid
from videoldm_jax import aot, convert, optim, parallel, personalize, sample, tasks, train
from videoldm_jax.conversion import clip as clip_conv
from videoldm_jax.conversion import io as ckpt_io
from videoldm_jax.conversion import unet as unet_conv
from videoldm_jax.conversion import vae as vae_conv
from videoldm_jax.models import clip as clip_lib
from videoldm_jax.models import unet as unet_lib
from videoldm_jax.models import vae as vae_lib

FRAMES = 3


@pytest.fixture(scope="module", autouse=True)
def one_device():
  """One of the 8 test devices: every compile and checkpoint of these tiny models costs several times more on 8."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(parallel, "make_mesh", functools.partial(parallel.make_mesh, devices=jax.devices()[:1]))
    yield


def _base_config():
  config = webvid.get_config("stage=base,runlocal")
  config.data.num_frames = FRAMES
  config.batch_size = 1
  config.total_steps = 2
  config.eval_every_steps = config.sample_every_steps = config.checkpoint_every_steps = 0
  config.cpu_fast_compile = True
  config.sampling.num_steps = 2
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """``(workdir, task, {component: flat params})``: the tiny T2V base stage, 2 steps (random frozen backbone, its
  temporal layers' EMA moved off their init)."""
  workdir = str(tmp_path_factory.mktemp("t2v") / "base")
  train.train_and_evaluate(_base_config(), workdir)
  return (workdir, *_load(workdir))


# ----------------------------------------------------------------------------------------------------------
# Personalized pipelines (diffusers folders) from Flax params.

def _unet_json(cfg):
  return {"_class_name": "UNet2DConditionModel", "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
          "block_out_channels": list(cfg.block_out_channels), "down_block_types": list(cfg.down_block_types),
          "up_block_types": list(cfg.up_block_types), "layers_per_block": list(cfg.layers_per_block),
          "cross_attention_dim": cfg.cross_attention_dim, "attention_head_dim": list(cfg.num_attention_heads),
          "norm_num_groups": cfg.norm_num_groups, "use_linear_projection": cfg.use_linear_projection}


def _clip_json(cfg):
  return {"architectures": ["CLIPTextModel"], "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
          "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
          "num_attention_heads": cfg.num_attention_heads, "max_position_embeddings": cfg.max_position_embeddings,
          "hidden_act": cfg.hidden_act, "layer_norm_eps": cfg.layer_norm_eps}


def write_pipeline(root, unet_cfg, unet_params, text_cfg, text_params, vae_cfg, vae_params):
  """A diffusers SD pipeline folder (unet/, text_encoder/, vae/, scheduler/, model_index.json)."""
  parts = {"unet": (_unet_json(unet_cfg), unet_conv.unet_to_diffusers, unet_params),
           "text_encoder": (_clip_json(text_cfg), clip_conv.clip_to_transformers, text_params),
           "vae": (vae_lib.vae_config_to_diffusers(vae_cfg), vae_conv.vae_to_diffusers, vae_params)}
  for name, (cfg, export, params) in parts.items():
    os.makedirs(os.path.join(root, name))
    with open(os.path.join(root, name, "config.json"), "w") as f:
      json.dump(cfg, f)
    filename = "model.safetensors" if name == "text_encoder" else "diffusion_pytorch_model.safetensors"
    tensors = export(traverse_util.unflatten_dict(params, sep="/") if "/" in next(iter(params)) else params)
    ckpt_io.save_safetensors({k: np.asarray(v, np.float32) for k, v in tensors.items()},
                             os.path.join(root, name, filename))
  os.makedirs(os.path.join(root, "scheduler"))
  with open(os.path.join(root, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump({"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
               "beta_end": 0.012, "num_train_timesteps": 1000, "prediction_type": "epsilon"}, f)
  with open(os.path.join(root, "model_index.json"), "w") as f:
    json.dump({"_class_name": "StableDiffusionPipeline", **{n: ["diffusers", "x"] for n in parts}}, f)
  return str(root)


def _spatial(flat):
  return {k: v for k, v in flat.items() if not personalize.is_temporal(k)}


def _perturbed(flat, seed, scale=0.05):
  rng = np.random.default_rng(seed)
  return {k: v + scale * rng.standard_normal(v.shape).astype(v.dtype) for k, v in flat.items()}


def _random_flat(abstract, seed):
  rng = np.random.default_rng(seed)
  return {k: (0.1 * rng.standard_normal(s.shape)).astype(np.float32)
          for k, s in optim.flat_paths(nn.meta.unbox(abstract)).items()}


@pytest.fixture(scope="module")
def original(trained, tmp_path_factory):
  """The workdir's own image backbone exported unchanged, and the personalized workdir made from it."""
  workdir, task, params = trained
  root = tmp_path_factory.mktemp("sd_original")
  src = write_pipeline(root / "pipeline", task.unet_config, _spatial(params["unet"]), task.text_config,
                       params["text_encoder"], task.vae_config, params["vae"])
  out = personalize.personalize(workdir, src, str(root / "out"), log=lambda _: None)
  return src, out["output"]


@pytest.fixture(scope="module")
def dreambooth(trained, tmp_path_factory):
  """A personalized backbone (every spatial U-Net and text-encoder tensor moved, as fine-tuning would; another VAE,
  not used) and the workdir the command makes from it. Returns ``(src, out, spatial params, text params, printed
  lines)``."""
  workdir, task, params = trained
  root = tmp_path_factory.mktemp("sd_dreambooth")
  unet, text = _perturbed(_spatial(params["unet"]), 1), _perturbed(params["text_encoder"], 2)
  src = write_pipeline(root / "pipeline", task.unet_config, unet, task.text_config, text, task.vae_config,
                       _perturbed(params["vae"], 3))
  out = str(root / "out")
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    assert personalize.main([f"--workdir={workdir}", f"--personalized={src}", f"--output={out}"]) == 0
  return src, out, unet, text, printed.getvalue().splitlines()


def _load(out):
  """``(task, {component: flat params})`` of a workdir, loaded as the sampler does (EMA over its model_init chain)."""
  from videoldm_jax import workdirs
  return personalize.load_workdir_params(out, workdirs.load_run_config(out))


_FORWARD = {}


def _forward(task):
  """Jitted ``(params, caption_ids) -> U-Net prediction`` [1, t, h, w, c] at fixed noisy latents and timestep; one
  compile per model (one or two text encoders), whichever workdir's task asks."""
  if task.temporal_text not in _FORWARD:
    h, w, c = task.latent_shape()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, FRAMES, h, w, c)), jnp.float32)
    fn = lambda p, ids: task.denoise(p, x, jnp.full((1,), 400), task.context(p, {"caption_ids": ids}))  # noqa: E731
    _FORWARD[task.temporal_text] = jax.jit(fn, compiler_options=aot.compiler_options(task.config))
  return _FORWARD[task.temporal_text]


def _nested(flat_by_component):
  return {c: traverse_util.unflatten_dict(p, sep="/") for c, p in flat_by_component.items()}


def _ids(task, text="a red car drives on a road at night"):
  return jnp.asarray(task.tokenize(text))[None]


# ----------------------------------------------------------------------------------------------------------
# (a) The original backbone back in: the same model, bit for bit.

def test_unchanged_backbone_gives_the_workdirs_model_bit_for_bit(trained, original):
  workdir, w_task, w_params = trained
  _, out = original
  task, params = _load(out)
  assert task.temporal_text
  for component in ("unet", "vae", "text_encoder"):
    assert set(params[component]) == set(w_params[component]), component
    for k, v in w_params[component].items():
      np.testing.assert_array_equal(params[component][k], v, err_msg=f"{component}/{k}")
  for k, v in w_params["text_encoder"].items():
    np.testing.assert_array_equal(params["temporal_text_encoder"][k], v, err_msg=k)
  ids = _ids(task)
  ours = np.asarray(_forward(task)(_nested(params), ids))
  theirs = np.asarray(_forward(w_task)(_nested(w_params), ids))
  assert np.abs(theirs).max() > 0
  np.testing.assert_array_equal(ours, theirs)


# ----------------------------------------------------------------------------------------------------------
# (b) A personalized backbone: spatial tensors from it, temporal ones from the workdir.

def test_spatial_tensors_from_the_personalized_model_temporal_from_the_workdir(trained, dreambooth):
  workdir, w_task, w_params = trained
  src, out, unet, text, lines = dreambooth
  task, params = _load(out)
  temporal = {k: v for k, v in w_params["unet"].items() if personalize.is_temporal(k)}
  assert temporal and unet and set(params["unet"]) == set(temporal) | set(unet)
  for k, v in unet.items():
    np.testing.assert_array_equal(params["unet"][k], v, err_msg=k)
    assert not np.array_equal(v, w_params["unet"][k]), k  # the test would not see a mix-up otherwise
  for k, v in temporal.items():
    np.testing.assert_array_equal(params["unet"][k], v, err_msg=k)
  for k, v in text.items():
    np.testing.assert_array_equal(params["text_encoder"][k], v, err_msg=k)
  for component, source in (("temporal_text_encoder", "text_encoder"), ("vae", "vae")):
    for k, v in w_params[source].items():
      np.testing.assert_array_equal(params[component][k], v, err_msg=f"{component}/{k}")
  assert lines[0] == f"unet: {len(unet)} spatial tensors from {src}, {len(temporal)} temporal from {workdir} (step 2)"
  # The run's settings carry over; the trainable set is the workdir's (the second encoder stays frozen).
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["model"]["temporal_text_encoder"] and config["model_init"] == os.path.join(out, "backbone")
  assert set(optim.flat_paths(optim.split(_nested(params), config["trainable"])[0])) == {
      f"unet/{k}" for k in temporal}
  from videoldm_jax import workdirs
  tasks.validate(workdirs.load_run_config(out))


# ----------------------------------------------------------------------------------------------------------
# (d) Two text encoders: the spatial layers read the first, the temporal layers the second.

def test_temporal_layers_read_the_second_text_encoder(trained, dreambooth):
  _, w_task, w_params = trained
  _, out, _, text, _ = dreambooth
  task, params = _load(out)
  nested = _nested(params)
  ids = _ids(task)
  # Each encoder's tokens, and each encoder's own null text for classifier-free guidance.
  for batch in ({"caption_ids": ids}, task.null_condition({"caption_ids": ids})):
    ctx = task.context(nested, batch)
    spatial = task.text_encoder.apply({"params": nested["text_encoder"]}, batch["caption_ids"])["last_hidden_state"]
    temporal = w_task.context(_nested(w_params), batch)
    np.testing.assert_array_equal(ctx["spatial"], spatial)
    np.testing.assert_array_equal(ctx["temporal"], temporal)
    assert np.abs(np.asarray(ctx["spatial"]) - np.asarray(ctx["temporal"])).max() > 1e-3
  fwd = _forward(task)
  base = np.asarray(fwd(nested, ids))
  # Only the temporal layers read the second encoder: moving it moves the output...
  moved = dict(nested, temporal_text_encoder=traverse_util.unflatten_dict(
      _perturbed(params["temporal_text_encoder"], 4, 0.5), sep="/"))
  assert np.abs(np.asarray(fwd(moved, ids)) - base).max() > 1e-5
  # ... and with the first encoder in its place the model is the one-encoder model (temporal layers reading the
  # spatial context), bit for bit.
  same = dict(nested, temporal_text_encoder=nested["text_encoder"])
  one = dict(_nested(params), text_encoder=nested["text_encoder"])
  one.pop("temporal_text_encoder")
  np.testing.assert_array_equal(np.asarray(fwd(same, ids)), np.asarray(_forward(w_task)(one, ids)))


# ----------------------------------------------------------------------------------------------------------
# (c) Refusals.

def test_other_architectures_are_refused_naming_the_key(trained, tmp_path):
  workdir, task, params = trained
  text, vae = params["text_encoder"], params["vae"]
  wide = unet_lib.tiny(block_out_channels=(32, 96))
  wide_params = _random_flat(unet_lib.abstract_params(wide), 5)
  spatial = _spatial(params["unet"])
  first = sorted(k for k in spatial if k in wide_params and wide_params[k].shape != spatial[k].shape)[0]
  src = write_pipeline(tmp_path / "wide", wide, wide_params, task.text_config, text, task.vae_config, vae)
  with pytest.raises(personalize.PersonalizeError, match=rf"another unet architecture than the workdir's: unet/{first} "
                     r"has shape \(.*\), the workdir's \(.*\) \(0 missing, \d+ mis-shaped, 0 extra"):
    personalize.personalize(workdir, src, str(tmp_path / "out"), log=print)
  assert not (tmp_path / "out").exists()

  narrow_cfg = clip_lib.tiny(intermediate_size=48)
  narrow = _random_flat(jax.eval_shape(lambda: clip_lib.CLIPTextEncoder(narrow_cfg).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 77), jnp.int32))["params"]), 6)
  src = write_pipeline(tmp_path / "narrow", task.unet_config, spatial, narrow_cfg, narrow, task.vae_config, vae)
  with pytest.raises(personalize.PersonalizeError,
                     match=r"another text_encoder architecture than the workdir's: text_encoder/encoder/layers_0/mlp/"
                           r"fc1/bias has shape \(48,\), the workdir's \(64,\)"):
    personalize.personalize(workdir, src, str(tmp_path / "out"), log=print)
  # With the original text encoder for both, the personalized one is not read: one encoder, the workdir's.
  personalize.personalize(workdir, src, str(tmp_path / "one"), text_encoder="original", log=print)
  assert not json.load(open(tmp_path / "one" / "config.json"))["model"]["temporal_text_encoder"]
  one = convert.load_converted(str(tmp_path / "one" / "backbone"))
  assert set(one.params) == {"unet", "vae", "text_encoder"}
  for k, v in optim.flat_paths(one.params["text_encoder"]).items():
    np.testing.assert_array_equal(v, text[k], err_msg=k)
  # Same shapes, other heads: another network all the same.
  heads = unet_lib.tiny(num_attention_heads=8)
  src = write_pipeline(tmp_path / "heads", heads, spatial, task.text_config, text, task.vae_config, vae)
  with pytest.raises(personalize.PersonalizeError, match=r"unet config field num_attention_heads: personalized "
                     r"\(8, 8\), workdir \(4, 4\)"):
    personalize.personalize(workdir, src, str(tmp_path / "out"), log=print)
  assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


@pytest.mark.parametrize("get_config, message", [
    (lambda: webvid.get_config("stage=image,runlocal"), "is an image-stage ('image') workdir"),
    (lambda: rds.get_config("stage=base,runlocal"), "stage 'base' is conditioned on 'labels', not text"),
    (lambda: rds.get_config("runlocal"), "is a chain workdir: pass the folder of its text-to-video stage"),
])
def test_image_label_and_chain_workdirs_are_refused(tmp_path, capsys, get_config, message):
  (tmp_path / "config.json").write_text(get_config().to_json_best_effort())
  with pytest.raises(SystemExit) as e:
    personalize.main([f"--workdir={tmp_path}", f"--personalized={tmp_path}", f"--output={tmp_path / 'out'}"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert message in err and err.count("\n") == 1, err


def test_a_workdir_that_trained_spatial_layers_is_refused(trained, original, tmp_path):
  workdir, _, _ = trained
  src, _ = original
  copy = tmp_path / "w"
  shutil.copytree(workdir, copy)
  config = json.load(open(copy / "config.json"))
  config["trainable"] = "unet/.*"
  (copy / "config.json").write_text(json.dumps(config))
  with pytest.raises(personalize.PersonalizeError, match=r"its spatial layers were trained \(config.trainable="
                     r"'unet/\.\*' matches unet/\S+\)"):
    personalize.personalize(str(copy), src, str(tmp_path / "out"))


# ----------------------------------------------------------------------------------------------------------
# (e) The command, then the sampler on its output.

def test_command_then_sample(trained, dreambooth, tmp_path, capsys):
  workdir, _, _ = trained
  src, out, _, _, printed = dreambooth
  assert printed[1] == (f"text_encoder (spatial layers) from {src}; temporal_text_encoder (temporal layers) from "
                        f"{workdir}")
  with pytest.raises(SystemExit):  # no silent overwrite
    personalize.main([f"--workdir={workdir}", f"--personalized={src}", f"--output={out}"])
  assert "already exists (pass --overwrite" in capsys.readouterr().err
  assert sample.main([f"--workdir={out}", "--num_samples=1", "--steps=2", "--prompt=a sks car on a road at night",
                      f"--output={tmp_path / 'clip'}"]) == 0
  sheet = tmp_path / "clip.png"
  assert sheet.stat().st_size > 0 and (tmp_path / "clip.mp4").stat().st_size > 0
  copy = os.environ.get("PERSONALIZED_SHEET_COPY")
  if copy:
    os.makedirs(os.path.dirname(os.path.abspath(copy)), exist_ok=True)
    shutil.copyfile(sheet, copy)
