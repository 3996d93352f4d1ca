"""Stages ``upsampler_image`` / ``upsampler``: noise-augmented low-res conditioning, patch training with whole-frame
sampling, the video stage on top of the frozen image model, the pipeline step, and config errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import rds
from videoldm_jax import diffusion, optim, parallel, pipeline, tasks, train
from videoldm_jax.tasks.upsampler import downsample

HIGH = (32, 64)  # output frames of these tests (low-res 8x16); crops of 16x32


def _config(stage):
  config = rds.get_config(f"stage={stage},runlocal")
  config.data.height, config.data.width = HIGH
  config.upsampler.crop_height, config.upsampler.crop_width = 16, 32
  config.sampling.num_steps = 4
  config.eval_every_steps = config.total_steps = 20 if stage == "upsampler_image" else 10
  config.checkpoint_every_steps = config.total_steps
  config.sample_every_steps = 0
  config.cpu_fast_compile = True
  return config


@pytest.fixture(scope="module", autouse=True)
def one_device():
  """The mesh is not under test here (test_train_ldm covers it): one device compiles and runs several times faster."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(parallel, "make_mesh", functools.partial(parallel.make_mesh, devices=jax.devices()[:1]))
    yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  image_dir = tmp_path_factory.mktemp("upsampler_image")
  image = train.train_and_evaluate(_config("upsampler_image"), str(image_dir))
  video_config = _config("upsampler")
  video_config.model_init = str(image_dir)
  video = train.train_and_evaluate(video_config, str(tmp_path_factory.mktemp("upsampler")))
  return image, video


def test_noise_augmentation_of_the_low_res_clip():
  task = tasks.get("upsampler")(_config("upsampler"))
  u = task.config.upsampler
  ref = diffusion.make_schedule(u.aug_schedule, u.aug_num_train_timesteps, u.aug_beta_start, u.aug_beta_end)
  np.testing.assert_allclose(task.aug_schedule.alphas_cumprod, ref.alphas_cumprod)
  rng = np.random.default_rng(0)
  low = jnp.asarray(rng.uniform(-1, 1, (2, 3, 8, 16, 3)), jnp.float32)
  noise = jnp.asarray(rng.standard_normal(low.shape), jnp.float32)
  clean = jax.image.resize(low, (2, 3) + HIGH + (3,), method="linear")
  at0 = task.condition(low, jnp.zeros((2,), jnp.int32), noise, HIGH)
  assert at0.shape == (2, 3) + HIGH + (3,)
  np.testing.assert_allclose(at0, clean, atol=0.05)  # level 0: sigma_0 = sqrt(beta_0) = 0.01
  at300 = task.condition(low, jnp.full((2,), 300), noise, HIGH)
  alpha, sigma = diffusion.alpha_sigma(task.aug_schedule, 300)
  expected = jax.image.resize(alpha * low + sigma * noise, clean.shape, method="linear")
  np.testing.assert_allclose(at300, expected, atol=1e-5)
  # One level per clip, shared by its frames.
  mixed = task.condition(low, jnp.asarray([0, 300]), noise, HIGH)
  np.testing.assert_allclose(mixed[0], at0[0], atol=1e-6)
  np.testing.assert_allclose(mixed[1], at300[1], atol=1e-6)


def test_image_upsampler_trains_on_crops_and_samples_whole_frames(runs):
  image, _ = runs
  first, last = image.eval_history[0], image.eval_history[-1]
  assert last["eval_loss"] < first["eval_loss"], image.eval_history
  task = image.task
  batch = parallel.to_host(task.fixed_batch(parallel.make_mesh(task.config)))
  out = np.asarray(task.sample_fn(image.state.ema_params, image.frozen, batch, jax.random.PRNGKey(0)))
  assert out.shape == (2, 1) + HIGH + (3,) and out.dtype == np.uint8  # trained on 16x32 crops
  assert "vae" not in image.state.params and "vae" not in image.frozen  # pixel space: no VAE
  # The noise level changes the output.
  low = downsample(jnp.asarray(batch["video"][:2], jnp.float32), 4)
  params = optim.merge(image.state.ema_params, image.frozen)
  a = task.upsample(params, low, batch, jax.random.PRNGKey(1), noise_level=0)
  b = task.upsample(params, low, batch, jax.random.PRNGKey(1), noise_level=300)
  assert float(jnp.abs(a - b).mean()) > 1e-3
  # The image model applied to a clip (the image arm of benchmarks/video_upsampler.py): frame by frame, a noise
  # level per frame.
  clip = jnp.concatenate([low[:, :1]] * 3, axis=1)
  out = task.upsample(params, clip, batch, jax.random.PRNGKey(2))
  assert out.shape == (2, 3) + HIGH + (3,) and bool(jnp.all(jnp.isfinite(out)))


def test_video_upsampler_trains_temporal_layers_on_the_frozen_image_model(runs):
  image, video = runs
  assert set(optim.flat_paths(video.state.params)) and all(
      "temporal" in k for k in optim.flat_paths(video.state.params))
  frozen = {k: np.asarray(v) for k, v in optim.flat_paths(video.frozen).items()}
  ema = {k: np.asarray(v) for k, v in optim.flat_paths(image.state.ema_params).items()}
  assert set(frozen) == set(ema)
  for k in ema:  # bit-identical spatial params after training
    np.testing.assert_array_equal(frozen[k], ema[k], err_msg=k)
  assert np.isfinite(video.eval_history[-1]["eval_loss"])


def test_pipeline_step_upsamples_windows_of_the_clip_length(runs):
  _, video = runs
  step = video.task.pipeline_step(video.state.ema_params, video.frozen)
  assert isinstance(step, pipeline.Upsample) and step.window == video.task.config.data.num_frames
  n = 2 * step.window + 3  # a padded last window
  low = np.random.default_rng(0).integers(0, 256, (1, n, 8, 16, 3), dtype=np.uint8)
  cuts = [0, 1, 9, n]
  stream = pipeline.Stream((low[:, a:b] for a, b in zip(cuts, cuts[1:])), n, 30.0)
  batch = {"labels": {k: np.zeros((1,), np.int32) for k in ("day_night", "crowdedness")}}
  ctx = pipeline.Context(batch=batch, rng=jax.random.PRNGKey(0), progress=False)
  out = np.concatenate(list(step(stream, ctx).chunks), axis=1)
  assert out.shape == (1, n) + HIGH + (3,) and out.dtype == np.uint8
  # The output follows its input: brighter low-res frames give brighter high-res ones.
  corr = np.corrcoef(low.reshape(n, -1).mean(1), out.reshape(n, -1).mean(1))[0, 1]
  assert corr > 0.5, corr


@pytest.mark.parametrize("key,value,message", [
    ("data.height", 36, "config.data.height=36 must be a multiple of 8"),
    ("upsampler.sample_noise_level", 400, "sample_noise_level=400 is outside the trained range"),
    ("upsampler.max_noise_level", 1000, "max_noise_level=1000 is outside the augmentation schedule"),
    ("upsampler.crop_height", 64, "crop_height=64 is larger than the frame"),
    ("upsampler.space", "latent", "upsampler.space"),
])
def test_config_errors_name_the_key(key, value, message):
  config = _config("upsampler")
  section, leaf = key.split(".")
  config[section][leaf] = value
  with pytest.raises(ValueError, match=message):
    tasks.validate(config)
