"""End to end on a mesh: runlocal ``image`` then ``base`` (initialised from the image workdir) on synthetic
driving scenes. The loss on a fixed batch with fixed noise must go down, frozen params must stay put."""

import functools

import jax
import numpy as np
import pytest

from configs import rds
from videoldm_jax import optim, parallel, train


def _mesh(config):
  config.mesh.ici_data_parallelism = 2
  config.mesh.ici_fsdp_parallelism = 4
  return config


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("rds_image")
  config = _mesh(rds.get_config("stage=image,runlocal"))
  config.total_steps = 30
  config.eval_every_steps = 30
  config.eval_noise_draws = 1
  config.sample_every_steps = 30
  config.sampling.num_steps = 2
  config.checkpoint_every_steps = 0  # the final checkpoint only
  return workdir, train.train_and_evaluate(config, str(workdir))


def test_image_stage_trains(image_run):
  workdir, res = image_run
  first, last = res.eval_history[0], res.eval_history[-1]
  assert first["step"] == 0 and last["step"] == 30
  assert last["eval_loss"] < 0.9 * first["eval_loss"], res.eval_history
  assert all(np.isfinite(h["loss"]) for h in res.history)
  # The U-Net and the label tokens trained; the VAE is frozen (and saved once).
  assert set(res.state.params) == {"unet", "label_encoder"} and set(res.frozen) == {"vae"}
  assert (workdir / "frozen").exists()
  assert (workdir / "samples" / "step_0000030.gif").stat().st_size > 0
  assert list(workdir.glob("events.out.tfevents.*"))
  # Params are sharded by the fsdp rules on the (data=2, fsdp=4) mesh.
  kernel = res.state.params["unet"]["conv_in"]["kernel"]
  assert kernel.sharding.spec[-1] == "fsdp"


def test_base_stage_trains_temporal_layers_only(image_run, tmp_path, monkeypatch):
  # On one device: this test is about freezing and initialising from the image run (saved on the 2x4 mesh, so
  # the restore reshards); meshes are covered above, and on 8 fake CPU devices every compile and save of this
  # run costs several times more.
  monkeypatch.setattr(parallel, "make_mesh", functools.partial(parallel.make_mesh, devices=jax.devices()[:1]))
  image_dir, image_res = image_run
  config = rds.get_config("stage=base,runlocal")
  config.model_init = str(image_dir)
  config.data.num_frames = 4
  config.total_steps = 20
  config.eval_every_steps = 20
  config.eval_noise_draws = 1
  config.sample_every_steps = 0
  config.checkpoint_every_steps = 0
  res = train.train_and_evaluate(config, str(tmp_path))
  first, last = res.eval_history[0], res.eval_history[-1]
  assert last["eval_loss"] < first["eval_loss"], res.eval_history
  # Only temporal params train; everything else is frozen and came from the image run (its EMA weights).
  flat_train = optim.flat_paths(res.state.params)
  assert flat_train and all("temporal" in k for k in flat_train)
  assert "alpha" in res.history[-1]
  flat_frozen = optim.flat_paths(res.frozen)
  image_ema = optim.flat_paths(image_res.state.ema_params)
  image_frozen = optim.flat_paths(image_res.frozen)
  for k, v in flat_frozen.items():
    ref = image_ema[k] if k in image_ema else image_frozen[k]
    np.testing.assert_array_equal(np.asarray(v), np.asarray(ref), err_msg=k)
  assert set(flat_frozen) == set(image_ema) | set(image_frozen)


def test_model_init_from_converted_checkpoint(tmp_path):
  """A ``videoldm_jax.convert`` output directory fills every non-temporal param, sharded; gaps are named."""
  import flax.linen as nn
  from configs import webvid
  from videoldm_jax import checkpoint, convert, tasks

  config = webvid.get_config("stage=image,runlocal")
  task = tasks.get("image")(config)
  shapes = nn.meta.unbox(jax.eval_shape(task.init, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
  configs = {"unet": task.unet_config, "vae": task.vae_config, "text_encoder": task.text_config}
  convert.save_converted(str(tmp_path / "sd"), configs, params, {"prediction_type": "epsilon"})

  mesh = parallel.make_mesh(_mesh(config))
  shardings = parallel.param_shardings(jax.eval_shape(task.init, jax.random.PRNGKey(0)), mesh,
                                       parallel.logical_rules(config))
  abstract = optim.flat_paths(jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                           shapes, shardings))
  loaded = checkpoint.load_model_init(str(tmp_path / "sd"), abstract, missing_ok="")
  expected = optim.flat_paths(params)
  assert set(loaded) == set(expected)
  for k, v in loaded.items():
    assert v.sharding == abstract[k].sharding, k
    np.testing.assert_array_equal(np.asarray(v), expected[k], err_msg=k)

  # A param the source lacks (a new layer) must be allowed explicitly; a shape change is always an error.
  extra = dict(abstract, **{"unet/temporal_new/kernel": jax.ShapeDtypeStruct((2, 2), np.float32)})
  with pytest.raises(ValueError, match=r"missing \(1\): \['unet/temporal_new/kernel'\]"):
    checkpoint.load_model_init(str(tmp_path / "sd"), extra, missing_ok="")
  assert "unet/temporal_new/kernel" not in checkpoint.load_model_init(str(tmp_path / "sd"), extra,
                                                                     missing_ok=".*temporal.*")
  k = "unet/conv_in/kernel"
  bad = dict(abstract, **{k: jax.ShapeDtypeStruct((1,) + abstract[k].shape[1:], np.float32)})
  with pytest.raises(ValueError, match=r"mis-shaped \(1\): \['unet/conv_in/kernel: checkpoint"):
    checkpoint.load_model_init(str(tmp_path / "sd"), bad, missing_ok="")
  # The converted checkpoint says eps; a v-prediction config on top of it is refused, naming the key.
  config.model_init = str(tmp_path / "sd")
  config.diffusion.prediction = "v"
  with pytest.raises(ValueError, match=r"config\.diffusion\.prediction='v'"):
    tasks.get("image")(config)
