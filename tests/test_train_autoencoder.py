"""Stage ``autoencoder`` end to end on a mesh (the runlocal chain's first stage: tiny KL-VAE + PatchGAN on synthetic
driving frames), its held-out reconstruction PSNR, its GAN step, and the image stage taking the trained VAE through
``model_init``."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import rds
from videoldm_jax import checkpoint, optim, parallel, tasks, train
from videoldm_jax.models import discriminator as disc_lib
from videoldm_jax.tasks.autoencoder import psnr

CKPT = 15  # a checkpoint (and an evaluation) before the discriminator starts
# Held-out reconstruction PSNR of the chain's autoencoder (100 steps) minus that of the batch's mean frame
# (15.0 dB), at least, in dB. Measured with this fixture: discriminator from step 30 at weight 0.05 +10.2, no GAN
# +10.0, at weight 0.5 (vertical stripes) +8.5; on one device, seeds 0-3: +9.9 to +10.2 and +7.1 to +8.6.
PSNR_MARGIN_DB = 9.25


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("rds_autoencoder")
  # The first stage of the runlocal chain as shipped (the README's first command; every later stage decodes
  # through it): test_reconstruction_beats_the_mean_frame holds its schedule to account. Only settings that leave
  # the trained weights alone are changed here: the mesh and the eval / checkpoint / sample cadence.
  config = rds.get_config("runlocal").stages.autoencoder
  # Data parallel over the 8 devices (an fsdp mesh compiles the step ~2x slower on CPU; the sharding of the GAN
  # optimizer state over an fsdp mesh is checked without compiling, in test_gan_optimizer_state_shards_like_params).
  config.mesh.ici_data_parallelism = 8
  config.mesh.ici_fsdp_parallelism = 1
  config.eval_every_steps = CKPT
  config.checkpoint_every_steps = CKPT
  config.keep_checkpoints = config.total_steps // CKPT + 1  # the one at CKPT too
  config.sample_every_steps = config.total_steps
  assert CKPT < config.autoencoder.disc_start < config.total_steps, "the GAN tests need steps without and with it"
  return workdir, config, train.train_and_evaluate(config, str(workdir))


def _flat(tree):
  return {k: np.asarray(v) for k, v in optim.flat_paths(tree).items()}


def _restore_state(res, workdir, step):
  """The train state saved at ``step`` (numpy leaves)."""
  ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"), async_save=False)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), res.state)
  state = ckpt.restore(abstract, step=step)
  ckpt.close()
  return state


def test_autoencoder_trains_on_mesh(ae_run):
  workdir, config, res = ae_run
  total, disc_start = config.total_steps, config.autoencoder.disc_start
  first, last = res.eval_history[0], res.eval_history[-1]
  assert first["step"] == 0 and last["step"] == total
  # eval_loss = mean |x - D(E(x))| (posterior mode) on the fixed batch.
  assert last["eval_loss"] < 0.5 * first["eval_loss"], res.eval_history
  assert all(np.isfinite(h["loss"]) for h in res.history)
  assert set(res.state.params) == {"vae", "discriminator"} and res.frozen == {}  # no LPIPS files configured
  assert "lpips" not in res.history[-1]
  assert (workdir / "samples" / f"step_{total:07d}.gif").stat().st_size > 0
  # The adversarial part runs from disc_start on, with a positive, clamped adaptive weight.
  for h in res.history:
    on = h["step"] > disc_start  # metrics of step s come from state.step = s - 1
    assert h["disc_active"] == float(on), h
    if on:
      assert h["d_loss"] > 0 and 0 < h["d_weight"] <= 1e4 * config.autoencoder.disc_weight
    else:
      assert h["d_loss"] == 0 and h["d_weight"] == 0 and h["disc_grad_norm"] == 0


def test_discriminator_frozen_before_disc_start_then_updated(ae_run):
  workdir, config, res = ae_run
  mid = _restore_state(res, workdir, CKPT)  # before disc_start
  assert int(mid.step) == CKPT
  task = res.task

  # Before disc_start: the discriminator still has its initial params, and its Adam moments are exactly zero.
  init_rng = train.run_rngs(config)[0]
  r_disc = jax.random.split(init_rng, 3)[1]  # AutoencoderTask.init's split
  disc_init = jax.jit(task.discriminator.init)(r_disc, disc_lib.example_input(task.disc_config))["params"]
  disc_init = _flat(nn.meta.unbox(disc_init))
  mid_params = _flat(mid.params)
  for k, v in disc_init.items():
    np.testing.assert_array_equal(mid_params["discriminator/" + k], v, err_msg=k)
  adam = mid.opt_state[1]  # chain(clip, scale_by_adam, lr)
  mu, nu = _flat(adam.mu), _flat(adam.nu)
  assert all(not np.any(v) for k, v in mu.items() if k.startswith("discriminator/"))
  assert all(not np.any(v) for k, v in nu.items() if k.startswith("discriminator/"))
  assert all(np.any(v) for k, v in nu.items() if k.startswith("vae/"))

  # Between the two checkpoints: encoder, decoder and (after disc_start) the discriminator all changed.
  final = _flat(res.state.params)
  for prefix in ("vae/encoder/", "vae/decoder/", "vae/quant_conv/", "vae/post_quant_conv/", "discriminator/"):
    keys = [k for k in final if k.startswith(prefix)]
    assert keys and any(not np.array_equal(final[k], mid_params[k]) for k in keys), prefix
  # The optimizer state stays consistent: same structure / shapes, one shared step count, finite moments, and
  # the discriminator's moments are now populated.
  fin_adam = res.state.opt_state[1]
  assert jax.tree.structure(res.state.opt_state) == jax.tree.structure(mid.opt_state)
  assert int(fin_adam.count) == config.total_steps and int(res.state.opt_state[2].count) == config.total_steps
  fin_nu = _flat(fin_adam.nu)
  assert all(np.all(np.isfinite(v)) for v in fin_nu.values())
  assert all(np.any(v) for k, v in fin_nu.items() if k.startswith("discriminator/"))


def test_adaptive_weight_shortcut_matches_full_model(ae_run):
  """The task differentiates only the decoder's last conv on the features captured in the forward pass; that conv
  must reproduce the reconstruction exactly, so the gradient w.r.t. its kernel equals the full model's."""
  _, _, res = ae_run
  task = res.task
  vae = jax.device_get(res.state.params["vae"])
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 64, 3)).astype(np.float32))
  x_rec, _, _, feats = jax.jit(task.reconstruct_with_features)(vae, x)
  kernel = vae["decoder"]["conv_out"]["kernel"]
  np.testing.assert_allclose(np.asarray(task.last_layer_fn(vae, feats)(kernel)), np.asarray(x_rec), atol=1e-5)
  # Hence d nll / d kernel through that conv alone is the full model's gradient (features do not depend on it).
  g_short = jax.grad(lambda k: task.nll({}, x, task.last_layer_fn(vae, feats)(k))[0])(kernel)
  assert g_short.shape == kernel.shape and np.all(np.isfinite(g_short)) and np.abs(g_short).max() > 0


def test_reconstruction_beats_the_mean_frame(ae_run):
  """The runlocal chain's autoencoder as shipped reconstructs held-out frames (the fixed batch, posterior mode)
  clearly better than the batch's mean frame does: a discriminator that joins with a large weight before
  reconstruction has converged turns the decoder's output into stripes and fails this."""
  _, config, res = ae_run
  first, last = res.eval_history[0], res.eval_history[-1]
  assert last["step"] == config.total_steps
  assert last["eval_psnr_mean_frame"] == first["eval_psnr_mean_frame"]  # one fixed batch throughout
  gain = last["eval_psnr"] - last["eval_psnr_mean_frame"]
  assert gain >= PSNR_MARGIN_DB, (gain, res.eval_history)
  # The logged value is the final params' PSNR on the fixed batch, whatever the rng (posterior mode).
  task = res.task
  batch = task.fixed_batch(parallel.make_mesh(config))
  again = jax.jit(task.eval_metrics)(res.state.params, res.frozen, batch, jax.random.PRNGKey(123))
  assert float(again["eval_psnr"]) == pytest.approx(last["eval_psnr"], abs=1e-3)
  assert float(again["eval_psnr_mean_frame"]) == pytest.approx(last["eval_psnr_mean_frame"], abs=1e-3)


def test_psnr_in_db_on_either_range():
  """PSNR of [-1, 1] images with peak-to-peak 2 is that of the same images on [0, 255] with peak 255."""
  x = np.random.default_rng(0).uniform(-0.5, 0.5, (2, 4, 6, 3)).astype(np.float32)
  y = x + np.array([0.2, 0.02], np.float32)[:, None, None, None]
  np.testing.assert_allclose(psnr(x, y), [20.0, 40.0], rtol=1e-5)  # 10 log10(2^2 / 0.2^2), 10 log10(2^2 / 0.02^2)
  np.testing.assert_allclose(psnr((x + 1) * 127.5, (y + 1) * 127.5, peak_to_peak=255.0), [20.0, 40.0], rtol=1e-5)
  assert np.all(np.isfinite(psnr(x, x)))


def test_gan_optimizer_state_shards_like_params():
  """On an fsdp mesh the generator's and the discriminator's Adam moments take their params' shardings (the loop's
  ``optax.tree_map_params`` path works on the one-transformation GAN optimizer)."""
  config = rds.get_config("stage=autoencoder,runlocal")
  config.mesh.ici_data_parallelism = 2
  config.mesh.ici_fsdp_parallelism = 4
  task = tasks.get("autoencoder")(config)
  mesh = parallel.make_mesh(config)
  boxed = jax.eval_shape(task.init, jax.random.PRNGKey(0))
  shardings = parallel.param_shardings(boxed, mesh, parallel.logical_rules(config))
  train_shapes, _ = optim.split(nn.meta.unbox(boxed), config.trainable)
  train_sh, _ = optim.split(shardings, config.trainable)
  abstract_state = jax.eval_shape(lambda p: optim.init_state(p, task.tx, True), train_shapes)
  st = checkpoint.state_shardings(task.tx, abstract_state, train_sh, mesh)
  params_sh = optim.flat_paths(train_sh)
  adam = st.opt_state[1]
  assert optim.flat_paths(adam.mu) == params_sh and optim.flat_paths(adam.nu) == params_sh
  k = "discriminator/main_2/kernel"
  assert params_sh[k].spec[-1] == "fsdp" and params_sh["vae/decoder/conv_out/kernel"].spec
  assert st.opt_state[2].count == parallel.replicated(mesh)


def test_image_stage_takes_the_trained_vae(ae_run, tmp_path):
  """``stage=image`` with ``model_init`` = the autoencoder workdir: the frozen VAE is the trained one (EMA), the
  U-Net and label tokens (absent there) start fresh."""
  workdir, _, ae_res = ae_run
  config = rds.get_config("stage=image,runlocal")
  config.model_init = str(workdir)
  task = tasks.get("image")(config)
  mesh = parallel.make_mesh(config)
  boxed = jax.eval_shape(task.init, jax.random.PRNGKey(0))
  shardings = parallel.param_shardings(boxed, mesh, parallel.logical_rules(config))
  abstract = optim.flat_paths(jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                           nn.meta.unbox(boxed), shardings))
  loaded = checkpoint.load_model_init(config.model_init, abstract, missing_ok=config.model_init_missing_ok)
  ema = _flat(ae_res.state.ema_params)
  vae_keys = {k for k in abstract if k.startswith("vae/")}
  assert set(loaded) == vae_keys
  for k in vae_keys:
    np.testing.assert_array_equal(np.asarray(loaded[k]), ema[k], err_msg=k)
  # Without the allowance the missing U-Net is an error naming it (the VAE itself may never be missing).
  with pytest.raises(ValueError, match=r"missing \(\d+\): \[.*'unet/"):
    checkpoint.load_model_init(config.model_init, abstract, missing_ok="")


def test_lpips_term_from_weight_files(tmp_path):
  """LPIPS weight files (torchvision / lpips key layout) become frozen ``lpips/`` params; the reconstruction term
  adds ``perceptual_weight * LPIPS * pixels`` per example; without a discriminator the generic step is used."""
  from videoldm_jax.conversion.core import export_torch
  from videoldm_jax.conversion.io import save_safetensors
  from videoldm_jax.models.lpips import LPIPS, LPIPSConfig, abstract_params

  lp_config = LPIPSConfig.tiny()
  rng = np.random.default_rng(1)
  ref = jax.tree.map(lambda s: np.abs(0.2 * rng.standard_normal(s.shape)).astype(np.float32),
                     nn.meta.unbox(abstract_params(lp_config)))
  tensors = export_torch(ref)
  save_safetensors({k: v for k, v in tensors.items() if k.startswith("features.")}, str(tmp_path / "vgg.safetensors"))
  save_safetensors({k: v for k, v in tensors.items() if k.startswith("lin")}, str(tmp_path / "lin.safetensors"))

  config = rds.get_config("stage=autoencoder,runlocal")
  config.autoencoder.lpips = "tiny"
  config.autoencoder.lpips_vgg = str(tmp_path / "vgg.safetensors")
  config.autoencoder.disc_weight = 0.0
  with pytest.raises(ValueError, match="lpips_vgg and lpips_lin"):
    tasks.get("autoencoder")(config)
  config.autoencoder.lpips_lin = str(tmp_path / "lin.safetensors")
  config.autoencoder.perceptual_weight = 0.7
  task = tasks.get("autoencoder")(config)
  assert task.train_step is not task.gan_train_step  # one optimizer, the generic step over loss_fn

  shapes = nn.meta.unbox(jax.eval_shape(task.init, jax.random.PRNGKey(0)))
  assert set(shapes) == {"vae", "lpips"}
  trainable, frozen = optim.split(shapes, config.trainable)
  assert set(trainable) == {"vae"} and set(frozen) == {"lpips"}
  lp = nn.meta.unbox(task._lpips_params(jax.random.PRNGKey(0)))
  jax.tree.map(np.testing.assert_array_equal, lp, ref)

  x = jnp.asarray(rng.uniform(-1, 1, (2, 32, 64, 3)).astype(np.float32))
  x_rec = jnp.asarray(rng.uniform(-1, 1, (2, 32, 64, 3)).astype(np.float32))
  nll, metrics = jax.jit(task.nll)({"lpips": lp}, x, x_rec)
  d = jax.jit(LPIPS(lp_config).apply)({"params": ref}, x, x_rec)
  expected = np.mean(np.abs(np.asarray(x - x_rec)).sum(axis=(1, 2, 3)) + 0.7 * np.asarray(d) * 32 * 64 * 3)
  assert float(nll) == pytest.approx(float(expected), rel=1e-5)
  assert float(metrics["lpips"]) == pytest.approx(float(np.mean(d)), rel=1e-5)


def test_full_size_config_and_checks():
  """``stage=autoencoder`` at full size: SD-shaped KL-f8 VAE + 3-layer PatchGAN, both trainable; bad keys are named."""
  config = rds.get_config("stage=autoencoder")
  tasks.validate(config)
  task = tasks.get("autoencoder")(config)
  shapes = nn.meta.unbox(jax.eval_shape(task.init, jax.random.PRNGKey(0)))
  trainable, frozen = optim.split(shapes, config.trainable)
  counts = {k: sum(x.size for x in jax.tree.leaves(v)) for k, v in trainable.items()}
  assert counts == {"vae": 83_653_863, "discriminator": 2_765_633} and frozen == {}
  assert (config.data.height, config.data.width, config.data.num_frames) == (128, 256, 1)
  config.autoencoder.disc_optimizer = {"b1": 0.9}
  with pytest.raises(ValueError, match=r"config\.autoencoder\.disc_optimizer\.b1"):
    tasks.get("autoencoder")(config)
  config.autoencoder.disc_optimizer = {}
  config.autoencoder.discriminator = {"dims": 3}
  with pytest.raises(ValueError, match=r"config\.autoencoder\.discriminator\.dims"):
    tasks.get("autoencoder")(config)
  config.autoencoder.discriminator = {}
  config.trainable = r"vae/.*"
  with pytest.raises(ValueError, match=r"config\.trainable=.*discriminator"):
    tasks.get("autoencoder")(config)


# ------------------------------------------------------------------------------------------------------------
# Stage ``decoder``: the autoencoder's decoder with temporal layers, fine-tuned on clips (encoder frozen).

@pytest.fixture(scope="module")
def decoder_run(ae_run, tmp_path_factory):
  ae_workdir, _, _ = ae_run
  workdir = tmp_path_factory.mktemp("rds_decoder")
  config = rds.get_config("runlocal").stages.decoder  # as the chain trains it, from the autoencoder workdir
  config.model_init = str(ae_workdir)
  config.total_steps = config.eval_every_steps = config.checkpoint_every_steps = 20
  config.sample_every_steps = 0
  # One device: the mesh is under test in ae_run; here it would only multiply compile and step time.
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(parallel, "make_mesh", functools.partial(parallel.make_mesh, devices=jax.devices()[:1]))
    return workdir, config, train.train_and_evaluate(config, str(workdir))


def test_decoder_stage_lowers_loss_with_the_encoder_frozen(ae_run, decoder_run):
  _, _, ae_res = ae_run
  workdir, config, res = decoder_run
  first, last = res.eval_history[0], res.eval_history[-1]
  # At step 0 the fresh temporal layers reproduce the autoencoder's image decoder exactly; training on clips lowers
  # the held-out reconstruction error. (The flicker error is logged; whether it falls is a measurement,
  # benchmarks/video_decoder.py, not a property of 40 steps.)
  assert last["eval_loss"] < first["eval_loss"], res.eval_history
  assert 0 < last["eval_flicker"] < 0.1, res.eval_history
  # The latent scale is the autoencoder's (what every diffusion stage built on it uses).
  assert res.task.vae_config.scaling_factor == pytest.approx(checkpoint.read_info(str(ae_run[0]))["vae_scaling_factor"])
  # The encoder (frozen) is bit-identical to the autoencoder's EMA encoder; the decoder trained.
  ema, frozen = _flat(ae_res.state.ema_params), _flat(res.frozen)
  encoder_keys = [k for k in ema if k.startswith(("vae/encoder/", "vae/quant_conv/"))]
  assert encoder_keys and all(k in frozen for k in encoder_keys)
  for k in encoder_keys:
    np.testing.assert_array_equal(frozen[k], ema[k], err_msg=k)
  trained = _flat(res.state.params)
  assert not np.array_equal(trained["vae/decoder/conv_out/kernel"], ema["vae/decoder/conv_out/kernel"])
  # The discriminator judges clips [b, t, h, w, c]: 3D kernels.
  assert trained["discriminator/main_0/kernel"].ndim == 5
  assert all(h["disc_active"] == 1.0 and h["d_weight"] > 0 for h in res.history)


def test_decoder_pipeline_step_decodes_windows_exactly(decoder_run):
  """The pipeline's windowed decode of a long latent stream (arriving in uneven chunks) equals decoding the whole
  video at once; device inputs have one shape whatever the length."""
  from videoldm_jax import pipeline  # pylint: disable=g-import-not-at-top
  from videoldm_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  _, config, res = decoder_run
  task = res.task
  step = task.pipeline_step(res.state.ema_params, res.frozen)
  assert isinstance(step, pipeline.WindowedDecode) and step.halo == vae_lib.temporal_receptive_field(task.vae_config)
  h, w, c = 4, 8, task.vae_config.latent_channels
  n = step.window + 2 * step.halo + 9
  z = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (1, n, h, w, c)))
  decode = task.decode_clip_fn(res.state.ema_params, res.frozen)
  whole = np.asarray(decode(z))
  shapes = []
  step.decode_clip = lambda clip: shapes.append(clip.shape[1]) or decode(clip)
  cuts = [0, 5, 6, 30, n]
  stream = pipeline.Stream((z[:, a:b] for a, b in zip(cuts, cuts[1:])), n, 30.0, decode=lambda x: x)
  ctx = pipeline.Context(batch={}, rng=jax.random.PRNGKey(0), progress=False)
  out = np.concatenate(list(step(stream, ctx).chunks), axis=1)
  assert out.shape == whole.shape and out.dtype == np.uint8
  assert np.abs(out.astype(int) - whole.astype(int)).max() <= 1  # uint8 rounding of fp32 noise
  assert set(shapes) == {step.window + 2 * step.halo}


def test_decoder_config_errors_name_the_key():
  config = rds.get_config("stage=decoder,runlocal")
  config.data.num_frames = 2
  with pytest.raises(ValueError, match="config.data.num_frames=2"):
    tasks.validate(config)
  config = rds.get_config("stage=decoder,runlocal")
  config.autoencoder.discriminator = dict(ndf=8, n_layers=2, dims=2)
  with pytest.raises(ValueError, match=r"discriminator.dims=2 contradicts config.decoder.discriminator='video'"):
    tasks.validate(config)
  config.decoder.discriminator = "image"  # said explicitly: the paper's image-discriminator ablation
  tasks.validate(config)
  config = rds.get_config("stage=decoder,runlocal")
  config.trainable = "(vae|discriminator)/.*"
  with pytest.raises(ValueError, match="vae/encoder/conv_in/kernel"):
    tasks.validate(config)
  config = rds.get_config("stage=decoder,runlocal")
  config.model.vae_overrides = {}
  with pytest.raises(ValueError, match="temporal_decoder"):
    tasks.validate(config)
