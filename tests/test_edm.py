"""EDM / SVD formulation vs float64 formulas and diffusers' EulerDiscreteScheduler (the SVD scheduler config)."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from videoldm_jax.diffusion import edm

SVD_SCHEDULER_CONFIG = {  # stable-video-diffusion scheduler/scheduler_config.json
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "set_alpha_to_one": False, "sigma_max": 700.0, "sigma_min": 0.002,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "timestep_type": "continuous",
    "trained_betas": None, "use_karras_sigmas": True,
}
RTOL = 1e-6  # float32 schedule values vs diffusers (which also rounds float64 maths to float32)
# The full sampler vs diffusers' loop: max |x_jax − x_torch| ≤ LOOP_TOL · max |x_torch| after 10 steps (both fp32;
# the state starts at σ_max = 700 so early steps carry ~1e-7 · 700 rounding that later steps shrink).
LOOP_TOL = 1e-4
SHAPE = (1, 4, 8, 8, 4)  # [b, t, h, w, c]


def diffusers_scheduler(num_steps, **overrides):
  scheduler = diffusers.EulerDiscreteScheduler.from_config({**SVD_SCHEDULER_CONFIG, **overrides})
  scheduler.set_timesteps(num_steps)
  return scheduler


# ---------------------------------------------------------------------------------------------------------------
# Formulas.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_data", [1.0, 0.5])
def test_precondition_and_loss_weight_match_float64_formulas(sigma_data):
  sigma = np.exp(np.linspace(np.log(0.002), np.log(700.0), 50))
  c_skip, c_out, c_in, c_noise = jax.jit(edm.precondition, static_argnums=1)(sigma.astype(np.float32), sigma_data)
  total = sigma**2 + sigma_data**2
  np.testing.assert_allclose(c_skip, sigma_data**2 / total, rtol=RTOL)
  np.testing.assert_allclose(c_out, -sigma * sigma_data / np.sqrt(total), rtol=RTOL)
  np.testing.assert_allclose(c_in, 1 / np.sqrt(total), rtol=RTOL)
  np.testing.assert_allclose(c_noise, 0.25 * np.log(sigma), rtol=RTOL, atol=1e-7)
  np.testing.assert_allclose(edm.loss_weight(sigma.astype(np.float32), sigma_data), total / (sigma * sigma_data)**2,
                             rtol=RTOL)


def test_denoised_noisy_and_model_input_broadcast_per_frame_sigma():
  rng = np.random.default_rng(0)
  x0, noise, model_output = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(3))
  sigma = np.exp(rng.standard_normal(SHAPE[:2])).astype(np.float32)  # per-frame [b, t]
  s = sigma.astype(np.float64)[:, :, None, None, None]
  x = edm.noisy(x0, noise, sigma)
  np.testing.assert_allclose(x, x0 + s * noise, rtol=1e-6, atol=1e-6)
  x64 = np.asarray(x, np.float64)
  np.testing.assert_allclose(edm.scale_model_input(x, sigma), x64 / np.sqrt(s**2 + 1), rtol=1e-6, atol=1e-6)
  expected = x64 / (s**2 + 1) - s / np.sqrt(s**2 + 1) * model_output
  np.testing.assert_allclose(edm.denoised(model_output, x, sigma), expected, rtol=1e-5, atol=1e-6)
  # A per-example [b] sigma broadcasts over frames too.
  np.testing.assert_allclose(edm.denoised(model_output, x, sigma[:, 0]),
                             edm.denoised(model_output, x, np.repeat(sigma[:, :1], SHAPE[1], 1)), rtol=0, atol=0)


def test_sample_sigmas_log_normal_statistics():
  p_mean, p_std = 0.7, 1.6
  sigma = jax.jit(edm.sample_sigmas, static_argnums=1)(jax.random.key(0), (100_000,), p_mean, p_std)
  assert sigma.shape == (100_000,) and sigma.dtype == jnp.float32 and bool(jnp.all(sigma > 0))
  log_sigma = np.log(np.asarray(sigma, np.float64))
  assert abs(log_sigma.mean() - p_mean) < 0.02
  assert abs(log_sigma.std() - p_std) < 0.02


def test_guided_per_frame_scale():
  rng = np.random.default_rng(1)
  uncond, cond = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
  scale = edm.linear_frame_guidance(SHAPE[1], 1.0, 3.0)
  np.testing.assert_allclose(scale, torch.linspace(1.0, 3.0, SHAPE[1]).numpy(), rtol=RTOL)
  out = np.asarray(edm.guided(uncond, cond, scale))
  for f in range(SHAPE[1]):
    np.testing.assert_allclose(out[:, f], uncond[:, f] + scale[f] * (cond[:, f] - uncond[:, f]), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(edm.guided(uncond, cond, scale[None]), out)  # [b, t] form


# ---------------------------------------------------------------------------------------------------------------
# Schedule vs diffusers.
# ---------------------------------------------------------------------------------------------------------------


def test_svd_config_parses():
  config = edm.EulerEDMConfig.from_diffusers_scheduler_config(SVD_SCHEDULER_CONFIG)
  assert config == edm.EulerEDMConfig(sigma_min=0.002, sigma_max=700.0, rho=7.0, timestep_spacing="leading")


@pytest.mark.parametrize("num_steps", [1, 5, 25])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_karras_sigmas_timesteps_and_init_noise_match_diffusers(num_steps, spacing):
  scheduler = diffusers_scheduler(num_steps, timestep_spacing=spacing)
  config = edm.EulerEDMConfig.from_diffusers_scheduler_config(dict(scheduler.config))
  sigmas = edm.karras_sigmas(num_steps, config)
  assert sigmas.dtype == np.float32 and sigmas.shape == (num_steps + 1,) and sigmas[-1] == 0
  np.testing.assert_allclose(sigmas, scheduler.sigmas.numpy(), rtol=RTOL, atol=0)
  # ¼·log σ crosses 0 near σ = 1, where one float32 rounding of the log is an absolute, not relative, error.
  np.testing.assert_allclose(edm.sampling_timesteps(sigmas), scheduler.timesteps.numpy(), rtol=RTOL, atol=1e-7)
  # √(700² + 1) and 700 differ by only 1e-6 relative, so the noise scale is held to float32 rounding.
  np.testing.assert_allclose(edm.init_noise_scale(sigmas, config), float(scheduler.init_noise_sigma), rtol=1e-7)


@pytest.mark.parametrize("key, value", [
    ("use_karras_sigmas", False),
    ("timestep_type", "discrete"),
    ("prediction_type", "epsilon"),
    ("interpolation_type", "log_linear"),
    ("final_sigmas_type", "sigma_min"),
    ("use_exponential_sigmas", True),
    ("use_beta_sigmas", True),
    ("sigma_max", None),
    ("_class_name", "EulerAncestralDiscreteScheduler"),
])
def test_config_refuses_unimplemented_settings(key, value):
  with pytest.raises(ValueError, match=f"{key}={value!r}"):
    edm.EulerEDMConfig.from_diffusers_scheduler_config({**SVD_SCHEDULER_CONFIG, key: value})


def test_config_refuses_missing_karras_flag():
  config = {k: v for k, v in SVD_SCHEDULER_CONFIG.items() if k != "use_karras_sigmas"}
  with pytest.raises(ValueError, match="use_karras_sigmas"):
    edm.EulerEDMConfig.from_diffusers_scheduler_config(config)


# ---------------------------------------------------------------------------------------------------------------
# The sampling loop vs diffusers' SVD pipeline loop.
# ---------------------------------------------------------------------------------------------------------------

_RNG = np.random.default_rng(2)
A_UNCOND, A_COND = (_RNG.uniform(0.5, 1.5, SHAPE[-1]).astype(np.float32) for _ in range(2))
B_NOISE = np.float32(0.7)


def fake_network(x_in, c_noise, a, tanh):
  """A fixed nonlinear stand-in for the U-Net, written once for torch and jax; channels on the last axis."""
  return tanh(a * x_in + B_NOISE * c_noise)


def diffusers_loop(noise, num_steps, min_scale=None, max_scale=None):
  """The SVD pipeline's denoising loop (scale_model_input, network, per-frame CFG, scheduler.step), torch
  layout [b, t, c, h, w]."""
  scheduler = diffusers_scheduler(num_steps)
  to_torch = lambda a: torch.from_numpy(np.ascontiguousarray(a))
  a_uncond, a_cond = (to_torch(a[:, None, None]) for a in (A_UNCOND, A_COND))  # [c, 1, 1]
  latents = to_torch(noise.transpose(0, 1, 4, 2, 3)) * scheduler.init_noise_sigma
  guide = min_scale is not None
  if guide:
    scale = torch.linspace(min_scale, max_scale, noise.shape[1])[None, :, None, None, None]
  for t in scheduler.timesteps:
    model_input = torch.cat([latents] * 2) if guide else latents
    model_input = scheduler.scale_model_input(model_input, t)
    if guide:
      uncond_in, cond_in = model_input.chunk(2)
      out_uncond = fake_network(uncond_in, t, a_uncond, torch.tanh)
      out_cond = fake_network(cond_in, t, a_cond, torch.tanh)
      out = out_uncond + scale * (out_cond - out_uncond)
    else:
      out = fake_network(model_input, t, a_uncond, torch.tanh)
    latents = scheduler.step(out, t, latents).prev_sample
  return latents.numpy().transpose(0, 1, 3, 4, 2)


@pytest.mark.parametrize("guidance", [None, (1.0, 3.0)])
def test_euler_sample_matches_diffusers_loop(guidance):
  num_steps = 10
  noise = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)
  config = edm.EulerEDMConfig.from_diffusers_scheduler_config(SVD_SCHEDULER_CONFIG)
  sigmas = edm.karras_sigmas(num_steps, config)
  if guidance is None:
    model_fn = lambda x_in, c_noise: fake_network(x_in, c_noise, A_UNCOND, jnp.tanh)
    scales = None
  else:
    model_fn = lambda x_in, c_noise: (fake_network(x_in, c_noise, A_UNCOND, jnp.tanh),
                                      fake_network(x_in, c_noise, A_COND, jnp.tanh))
    scales = edm.linear_frame_guidance(SHAPE[1], *guidance)
  sample = jax.jit(lambda n: edm.euler_sample(model_fn, n, sigmas, config, guidance_scales=scales))(noise)
  expected = diffusers_loop(noise, num_steps, *(guidance or ()))
  assert sample.shape == SHAPE and sample.dtype == jnp.float32
  scale = np.abs(expected).max()
  assert scale > 0.1  # the loop produced something of data scale, not a collapsed or exploded state
  np.testing.assert_allclose(sample, expected, rtol=0, atol=LOOP_TOL * scale)
  if guidance is not None:  # guidance really changes the result, so the comparison above covers it
    unguided = diffusers_loop(noise, num_steps)
    assert np.abs(unguided - expected).max() > 100 * LOOP_TOL * scale
