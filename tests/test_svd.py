"""Stage ``svd`` (image-to-video fine-tuning of Stable Video Diffusion): the whole sampling loop against diffusers'
``StableVideoDiffusionPipeline`` through our converters, temporal-only fine-tuning from a converted pipeline
(frozen params bit-identical, fixed-batch loss down), the ``sample --svd`` command, and bad input named."""

import functools
import json
import os
import shutil

import av
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from configs import svd as svd_configs
from videoldm_jax import config_lib, convert, image_to_video, optim, parallel, sample, tasks, train
from videoldm_jax.tasks.svd import motion_bucket

H, W, T = 32, 48, 4  # frame size (latents 16x24 with the tiny f=2 VAE) and clip length of these tests


@pytest.fixture(scope="module", autouse=True)
def one_device():
  """The mesh is not under test here (test_train_ldm covers it): one device compiles and runs several times faster."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(parallel, "make_mesh", functools.partial(parallel.make_mesh, devices=jax.devices()[:1]))
    yield


@pytest.fixture(scope="module")
def converted(tiny_svd_pipeline_dir, tmp_path_factory):
  """The tiny diffusers SVD pipeline converted by ``videoldm_jax.convert`` (unet, vae, image_encoder, scheduler)."""
  out = str(tmp_path_factory.mktemp("svd_converted") / "svd")
  configs, params, schedule = convert.convert_source(str(tiny_svd_pipeline_dir))
  convert.save_converted(out, configs, params, schedule, source=str(tiny_svd_pipeline_dir),
                         metadata=convert.pipeline_metadata(str(tiny_svd_pipeline_dir)))
  return out


def _converted_config(path):
  config, _ = image_to_video.converted_run_config(path)
  config.data.height, config.data.width, config.data.num_frames = H, W, T
  config.mesh = config_lib.mesh_defaults()
  return config


def test_sampling_matches_the_diffusers_pipeline(tiny_svd_pipeline, converted):
  """Same image, same noise (the pipeline's generator draws the conditioning noise; the initial latents are passed):
  3 Euler steps with guidance rising 1 -> 2.5 over the frames, fps / motion / cond_aug conditioning."""
  config = _converted_config(converted)
  task, trainable, frozen = image_to_video.load(converted, config, parallel.make_mesh(config))
  params = optim.merge(trainable, frozen)
  rng = np.random.default_rng(0)
  image = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
  cond_noise = torch.randn((1, 3, H, W), generator=torch.Generator().manual_seed(0))  # the pipeline's first draw
  latents = torch.randn((1, T, 4, H // 2, W // 2), generator=torch.Generator().manual_seed(1))
  settings = dict(fps=8, motion_bucket_id=100, cond_aug=0.05, num_steps=3, min_guidance_scale=1.0,
                  max_guidance_scale=2.5)
  with torch.no_grad():
    ref = tiny_svd_pipeline(image, height=H, width=W, num_frames=T, num_inference_steps=settings["num_steps"],
                            min_guidance_scale=1.0, max_guidance_scale=2.5, fps=settings["fps"],
                            motion_bucket_id=settings["motion_bucket_id"], noise_aug_strength=settings["cond_aug"],
                            generator=torch.Generator().manual_seed(0), latents=latents.clone(),
                            output_type="latent").frames
  ref = ref.permute(0, 1, 3, 4, 2).numpy()
  pixels = jnp.asarray(np.asarray(image, np.float32) / 127.5 - 1.0)[None]
  ours = jax.jit(lambda p, x, c, n: task.generate(p, x, c, n, **settings))(
      params, pixels, jnp.asarray(cond_noise.permute(0, 2, 3, 1).numpy()),
      jnp.asarray(latents.permute(0, 1, 3, 4, 2).numpy()))
  ours = np.asarray(ours)
  scale = float(np.abs(ref).max())
  # fp32 through 3 steps that start at sigma 700: the first state is ~700 (an fp32 ulp there is 6e-5) and
  # becomes ~1, so single elements carry a few 1e-5 of rounding; the bulk is far tighter.
  print("max / mean abs diff", np.abs(ours - ref).max(), np.abs(ours - ref).mean(), "scale", scale)
  np.testing.assert_allclose(ours, ref, atol=5e-4 * scale, rtol=0)
  assert np.abs(ours - ref).mean() < 4e-5 * scale
  # Guidance matters here: without it the result is far from the pipeline's.
  plain = jax.jit(lambda p, x, c, n: task.generate(p, x, c, n, **dict(settings, max_guidance_scale=1.0)))(
      params, pixels, jnp.asarray(cond_noise.permute(0, 2, 3, 1).numpy()),
      jnp.asarray(latents.permute(0, 1, 3, 4, 2).numpy()))
  assert np.abs(np.asarray(plain) - ref).max() > 20 * 5e-4 * scale


def test_motion_bucket_orders_clips_by_motion():
  still = jnp.zeros((1, 4, 8, 8, 3))
  slow = jnp.broadcast_to(jnp.linspace(-0.1, 0.1, 4)[None, :, None, None, None], (1, 4, 8, 8, 3))
  fast = jnp.broadcast_to(jnp.linspace(-1.0, 1.0, 4)[None, :, None, None, None], (1, 4, 8, 8, 3))
  ids = np.asarray(motion_bucket(jnp.concatenate([still, slow, fast]), 1000.0))
  assert ids[0] == 0 and 0 < ids[1] < ids[2] == 255  # 1000 * 2/3 clips to 255
  np.testing.assert_allclose(ids[1], round(1000 * 0.2 / 3))


@pytest.fixture(scope="module")
def finetuned(converted, tmp_path_factory):
  """``configs/svd.py:runlocal`` (temporal layers only) started from the converted pipeline, a few steps."""
  config = svd_configs.get_config("runlocal")
  source = _converted_config(converted)
  config.model, config.svd, config.edm = source.model, source.svd, source.edm
  config.model_init = converted
  config.data.height, config.data.width, config.data.num_frames = H, W, T
  config.batch_size = 2
  config.total_steps = config.checkpoint_every_steps = 8
  config.eval_every_steps = 4
  config.sample_every_steps = 0
  config.optimizer.lr = 1e-3
  workdir = str(tmp_path_factory.mktemp("svd_run"))
  return workdir, train.train_and_evaluate(config, workdir)


def test_temporal_finetuning_from_a_converted_pipeline(finetuned, converted):
  _, result = finetuned
  history = result.eval_history
  assert history[-1]["eval_loss"] < history[0]["eval_loss"], history
  source = optim.flat_paths(convert.load_converted(converted).params)
  frozen = optim.flat_paths(result.frozen)
  trained = optim.flat_paths(result.state.params)
  assert set(frozen) | set(trained) == set(source)
  assert all("temporal" in k and k.startswith("unet/") for k in trained)
  assert any(k.startswith("unet/") for k in frozen) and any(k.startswith("image_encoder/") for k in frozen)
  for k, v in frozen.items():  # spatial U-Net, VAE, image encoder: bit for bit the converted weights
    np.testing.assert_array_equal(np.asarray(v), np.asarray(source[k]), err_msg=k)
  changed = [k for k, v in trained.items() if not np.array_equal(np.asarray(v), np.asarray(source[k]))]
  assert len(changed) > len(trained) // 2, f"only {len(changed)} of {len(trained)} temporal params moved"


def _decode(path):
  with av.open(str(path)) as f:
    return np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)])


def test_sample_cli_from_the_finetuned_workdir(finetuned, tmp_path, capsys):
  workdir, _ = finetuned
  image = tmp_path / "frame.png"
  Image.fromarray(np.random.default_rng(1).integers(0, 256, (2 * H, 2 * W, 3), dtype=np.uint8)).save(image)
  out = tmp_path / "clip"
  assert sample.main([f"--svd={workdir}", f"--image={image}", "--num_frames=5", "--steps=2", "--fps=10",
                      f"--output={out}"]) == 0
  assert "1 clips of 5 frames at 10 fps" in capsys.readouterr().out
  frames = _decode(str(out) + ".mp4")
  assert frames.shape == (5, 4 * H, 4 * W, 3)  # the image resized to the trained 32x48, written x4 (>= 128 px)
  assert Image.open(str(out) + ".gif").n_frames == 5
  with av.open(str(out) + ".mp4") as f:
    assert float(f.streams.video[0].average_rate) == 10.0

  odd = tmp_path / "square.png"
  Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(odd)
  with pytest.raises(SystemExit):
    sample.main([f"--svd={workdir}", f"--image={odd}", "--steps=1"])
  err = capsys.readouterr().err
  assert str(odd) in err and "40x40" in err and "48x32" in err
  with pytest.raises(SystemExit):
    sample.main([f"--svd={workdir}", f"--image={image}", "--num_frames=1"])
  assert "--num_frames=1" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    sample.main([f"--svd={workdir}"])
  assert "--image" in capsys.readouterr().err


def test_bad_configs_are_named(converted):
  config = svd_configs.get_config("runlocal")
  tasks.validate(config)
  bad = svd_configs.get_config("runlocal")
  bad.trainable = ".*"  # would train the VAE and the image encoder
  with pytest.raises(ValueError, match="config.trainable"):
    tasks.validate(bad)
  bad = svd_configs.get_config("runlocal")
  bad.svd.image_encoder_overrides = dict(projection_dim=64)
  with pytest.raises(ValueError, match="config.svd.image_encoder projects to 64"):
    tasks.validate(bad)
  bad = svd_configs.get_config("runlocal")
  bad.data.height = 30
  with pytest.raises(ValueError, match="config.data.height=30"):
    tasks.validate(bad)
  bad = svd_configs.get_config("runlocal")
  bad.model.conditioning = "text"
  with pytest.raises(ValueError, match="config.model.conditioning='text'"):
    tasks.validate(bad)
  with pytest.raises(ValueError, match="train='lora'"):
    svd_configs.get_config("train=lora")
  # A converted checkpoint without its image encoder is named.
  partial = converted + "_no_image_encoder"
  shutil.copytree(converted, partial)
  shutil.rmtree(os.path.join(partial, "image_encoder"))
  with open(os.path.join(partial, "config.json")) as f:
    meta = json.load(f)
  del meta["components"]["image_encoder"]
  with open(os.path.join(partial, "config.json"), "w") as f:
    json.dump(meta, f)
  with pytest.raises(ValueError, match="lacks \\['image_encoder'\\]"):
    image_to_video.converted_run_config(partial)
