"""Diffusion maths vs diffusers (DDPMScheduler / DDIMScheduler) in fp32; everything runs under jax.jit."""

import functools
import logging
import math

import diffusers
import diffusers.schedulers.scheduling_ddpm as diffusers_ddpm
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from videoldm_jax import diffusion

T = 1000
# Max-abs error of our fp32 steps and whole trajectories (unit-scale samples) vs diffusers' step code run in float64.
# diffusers in fp32 is itself off by up to ~1e-3 near τ = 0 (it forms 1 − ᾱ and 1 − ᾱ_t/ᾱ_s in fp32), so it is the
# float64 run of the same step code that serves as reference.
STEP_TOL = 1e-5
SHAPE = (2, 3, 8, 8, 4)  # a small video batch [b, t, h, w, c]
SD_CONFIG = {  # Stable Diffusion 1.x scheduler_config.json
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}


def fake_model(x, alpha, sigma, kind, sin):
  """A deterministic stand-in denoiser, written once for torch/jax: the optimal x0-estimate for data ~ N(0, 0.25)
  plus a nonlinear perturbation, returned as ε, v or x0; samples stay at unit scale."""
  x0 = alpha * 0.25 / (alpha**2 * 0.25 + sigma**2) * x + 0.1 * sin(1.3 * x)
  eps = (x - alpha * x0) / sigma
  return {"eps": eps, "v": alpha * eps - sigma * x0, "x0": x0}[kind]


def jax_model(schedule, kind):
  def model_fn(x, t):
    alpha, sigma = diffusion.alpha_sigma(schedule, t, x.ndim)
    return fake_model(x, alpha, sigma, kind, jnp.sin)

  return model_fn


def torch_model(scheduler, kind, x, t):
  alpha_cumprod = scheduler.alphas_cumprod[int(t)]
  return fake_model(x, alpha_cumprod.sqrt(), (1 - alpha_cumprod).sqrt(), kind, torch.sin)


def in_float64(scheduler):
  """Switches a diffusers scheduler to float64: its own (fp32) betas, cumulative products redone in double."""
  set_alpha_to_one = getattr(scheduler.config, "set_alpha_to_one", True)
  scheduler.betas = scheduler.betas.double()
  scheduler.alphas = 1.0 - scheduler.betas
  scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, 0)
  scheduler.one = torch.tensor(1.0, dtype=torch.float64)
  scheduler.final_alpha_cumprod = scheduler.one if set_alpha_to_one else scheduler.alphas_cumprod[0]
  return scheduler


def max_abs(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def to_torch(a, dtype=np.float64):
  return torch.from_numpy(np.array(a, dtype=dtype))


# ----------------------------------------------------------------------------------------------------------------
# Schedules.
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,start,end,num_train,rtol", [
    ("linear", 1e-4, 0.02, 1000, 1e-6),
    ("scaled_linear", 0.00085, 0.012, 1000, 1e-6),
    # diffusers' fp32 β = 0.999 cap carries a 1e-4 relative error in 1 − β, which the reference's tail inherits.
    ("squaredcos_cap_v2", 1e-4, 0.02, 1000, 5e-5),
    ("linear", 1e-4, 0.02, 500, 1e-6),
])
def test_schedule_matches_diffusers(name, start, end, num_train, rtol):
  ref = diffusers.DDPMScheduler(num_train_timesteps=num_train, beta_schedule=name, beta_start=start, beta_end=end)
  ours = diffusion.make_schedule(name, num_train, start, end)
  assert ours.num_train_timesteps == num_train
  assert max_abs(ours.betas, ref.betas.numpy()) < 1e-7
  assert max_abs(ours.alphas_cumprod, ref.alphas_cumprod.numpy()) < 1e-6  # diffusers' own fp32 products
  ac = in_float64(ref).alphas_cumprod.numpy()
  rel = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) / b - 1)))
  assert rel(ours.alphas_cumprod, ac) < rtol  # relative: the tail is ~1e-3..1e-9
  assert rel(ours.sqrt_alphas_cumprod, np.sqrt(ac)) < rtol
  assert rel(ours.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - ac)) < 1e-6


def test_named_defaults():
  # "linear" is Ho et al.'s range, "scaled_linear" SD's.
  np.testing.assert_allclose(np.asarray(diffusion.make_schedule("linear").betas)[[0, -1]], [1e-4, 0.02], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(diffusion.make_schedule("scaled_linear").betas)[[0, -1]], [0.00085, 0.012],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="beta_schedule"):
    diffusion.make_schedule("cosine_typo")


def test_from_diffusers_scheduler_config():
  ours = diffusion.from_diffusers_scheduler_config(SD_CONFIG)
  ref = diffusers.DDIMScheduler.from_config(SD_CONFIG)
  assert ours.prediction_type == "eps"
  assert max_abs(ours.alphas_cumprod, ref.alphas_cumprod.numpy()) < 1e-6
  v_config = dict(SD_CONFIG, prediction_type="v_prediction")
  assert diffusion.from_diffusers_scheduler_config(v_config).prediction_type == "v"
  ddim = diffusion.DDIMConfig.from_diffusers_scheduler_config(SD_CONFIG)
  assert ddim == diffusion.DDIMConfig(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
                                      clip_sample_range=None)
  # Missing noise-process fields follow diffusers' class defaults (missing DDIM settings: see the next test).
  ref_default = diffusers.DDIMScheduler.from_config({})
  default = diffusion.from_diffusers_scheduler_config({})
  assert max_abs(default.alphas_cumprod, ref_default.alphas_cumprod.numpy()) < 1e-6
  trained = diffusion.from_diffusers_scheduler_config({"trained_betas": [0.1, 0.2, 0.3]})
  np.testing.assert_allclose(trained.alphas_cumprod, [0.9, 0.72, 0.504], rtol=1e-6)
  for field, value in [("beta_schedule", "sigmoid"), ("prediction_type", "flow"), ("rescale_betas_zero_snr", True),
                       ("thresholding", True)]:
    with pytest.raises(ValueError, match=field):
      diffusion.from_diffusers_scheduler_config(dict(SD_CONFIG, **{field: value}))
  with pytest.raises(ValueError, match="timestep_spacing"):
    diffusion.DDIMConfig.from_diffusers_scheduler_config({"timestep_spacing": "middle"})


def test_missing_ddim_settings_take_sd_values_with_a_warning(caplog):
  """diffusers' class defaults clip x̂_0 to [-1, 1] (pixel-space DDPM); a config without the DDIM fields gets
  Stable Diffusion's settings instead and a warning naming each missing field. Given fields are kept."""
  sd = diffusion.DDIMConfig(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
                            clip_sample_range=None)
  with caplog.at_level(logging.WARNING):
    assert diffusion.DDIMConfig.from_diffusers_scheduler_config({}) == sd
  assert all(k in caplog.text for k in ("clip_sample", "steps_offset", "set_alpha_to_one")), caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    partial = diffusion.DDIMConfig.from_diffusers_scheduler_config({"clip_sample": False, "steps_offset": 0})
  assert partial == diffusion.DDIMConfig(steps_offset=0, set_alpha_to_one=False, clip_sample_range=None)
  assert "set_alpha_to_one" in caplog.text and "steps_offset" not in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):  # a complete config (SD's) warns about nothing
    assert diffusion.DDIMConfig.from_diffusers_scheduler_config(SD_CONFIG) == sd
  assert not caplog.text
  # A pixel-space model that says so keeps clipping (and its range).
  pixel = {"clip_sample": True, "clip_sample_range": 2.0, "steps_offset": 0, "set_alpha_to_one": True}
  assert diffusion.DDIMConfig.from_diffusers_scheduler_config(pixel) == diffusion.DDIMConfig(
      steps_offset=0, set_alpha_to_one=True, clip_sample_range=2.0)


def test_schedule_is_a_pytree():
  schedule = diffusion.make_schedule("scaled_linear", prediction_type="v")
  leaves, treedef = jax.tree.flatten(schedule)
  assert len(leaves) == 4 and jax.tree.unflatten(treedef, leaves).prediction_type == "v"
  snr = jax.jit(lambda s, t: s.snr[t])(schedule, jnp.array([0, 999]))
  ac = np.asarray(schedule.alphas_cumprod)[[0, 999]]
  np.testing.assert_allclose(snr, ac / (1 - ac), rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Timesteps.
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
def test_timesteps_match_diffusers(spacing, offset):
  for num_steps in (1, 3, 7, 10, 25, 50, 100, 333, 999, 1000):
    ref = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(num_steps)
    ours = diffusion.inference_timesteps(num_steps, T, spacing, offset)
    np.testing.assert_array_equal(ours, ref.timesteps.numpy(), err_msg=f"{spacing} {num_steps}")
  with pytest.raises(ValueError):
    diffusion.inference_timesteps(1001, T)


# ----------------------------------------------------------------------------------------------------------------
# Parameterisation and forward process.
# ----------------------------------------------------------------------------------------------------------------


def _data(seed=0, shape=SHAPE):
  rng = np.random.default_rng(seed)
  return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("per_frame", [False, True])
def test_q_sample_and_velocity_match_diffusers(per_frame):
  ref = in_float64(diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
  schedule = diffusion.make_schedule("scaled_linear")
  x0, noise = _data()
  b, f = SHAPE[:2]
  t = np.array([[0, 500, 999], [17, 250, 998]]) if per_frame else np.array([3, 999])
  # diffusers only knows per-example timesteps: fold frames into the batch for the reference.
  t_ref = torch.from_numpy(t.reshape(-1) if per_frame else t)
  fold = (lambda a: a.reshape((b * f,) + SHAPE[2:])) if per_frame else (lambda a: a)
  ref_xt = ref.add_noise(to_torch(fold(x0)), to_torch(fold(noise)), t_ref).numpy().reshape(SHAPE)
  ref_v = ref.get_velocity(to_torch(fold(x0)), to_torch(fold(noise)), t_ref).numpy().reshape(SHAPE)
  fns = jax.jit(lambda x0, n, t: (diffusion.q_sample(x0, t, n, schedule),
                                  diffusion.training_target("v", x0, n, t, schedule),
                                  diffusion.training_target(None, x0, n, t, schedule)))
  xt, v, eps = fns(x0, noise, t)
  assert max_abs(xt, ref_xt) < 1e-6
  assert max_abs(v, ref_v) < 1e-6
  np.testing.assert_array_equal(eps, noise)  # schedule.prediction_type defaults to eps
  np.testing.assert_array_equal(diffusion.training_target("x0", x0, noise, t, schedule), x0)


def test_parameterisation_round_trips():
  schedule = diffusion.make_schedule("linear")
  x0, eps = _data(1)
  t = np.array([0, 999])

  @jax.jit
  def round_trips(x0, eps, t):
    a, s = diffusion.alpha_sigma(schedule, t, x0.ndim)
    x_t = a * x0 + s * eps
    v = diffusion.v_from_x0_eps(x0, eps, a, s)
    return dict(
        x0_from_v=diffusion.x0_from_v(x_t, v, a, s), eps_from_v=diffusion.eps_from_v(x_t, v, a, s),
        x0_from_eps=diffusion.x0_from_eps(x_t, eps, a, s), eps_from_x0=diffusion.eps_from_x0(x_t, x0, a, s),
        v_from_eps=diffusion.v_from_eps(x_t, eps, a, s), v_from_x0=diffusion.v_from_x0(x_t, x0, a, s),
        **{f"{kind}_from_{kind}_pred": diffusion.prediction_to_x0_eps(
            kind, diffusion.x0_eps_to_prediction(kind, x0, eps, a, s), x_t, a, s) for kind in ("eps", "v", "x0")},
        v=v, alpha_sq_plus_sigma_sq=a**2 + s**2)

  out = round_trips(x0, eps, t)
  # Dividing by α (≥ 0.0064 at τ=999 for "linear") or σ (≥ 0.01 at τ=0) amplifies fp32 rounding ~150x: 2e-4.
  assert max_abs(out["x0_from_v"], x0) < 1e-5 and max_abs(out["eps_from_v"], eps) < 1e-5
  assert max_abs(out["x0_from_eps"], x0) < 2e-4 and max_abs(out["eps_from_x0"], eps) < 2e-4
  assert max_abs(out["v_from_eps"], out["v"]) < 2e-4 and max_abs(out["v_from_x0"], out["v"]) < 2e-4
  for kind in ("eps", "v", "x0"):
    got_x0, got_eps = out[f"{kind}_from_{kind}_pred"]
    assert max_abs(got_x0, x0) < 2e-4 and max_abs(got_eps, eps) < 2e-4, kind
  assert max_abs(out["alpha_sq_plus_sigma_sq"], 1.0) < 1e-6


@pytest.mark.parametrize("timestep_shape", [None, (2, 3)])
def test_sample_training_inputs(timestep_shape):
  schedule = diffusion.make_schedule("linear")
  x0 = jnp.asarray(_data(2)[0])
  fn = jax.jit(functools.partial(diffusion.sample_training_inputs, schedule=schedule, timestep_shape=timestep_shape))
  t, noise, x_t = fn(jax.random.key(0), x0)
  assert t.shape == (timestep_shape or (2,)) and t.dtype == jnp.int32
  assert noise.shape == x0.shape and x_t.shape == x0.shape
  assert abs(float(noise.std()) - 1.0) < 0.1
  a = np.asarray(schedule.sqrt_alphas_cumprod)[np.asarray(t)]
  s = np.asarray(schedule.sqrt_one_minus_alphas_cumprod)[np.asarray(t)]
  expand = (slice(None),) * t.ndim + (None,) * (x0.ndim - t.ndim)
  assert max_abs(x_t, a[expand] * x0 + s[expand] * noise) < 1e-6
  if timestep_shape is not None:
    assert len(np.unique(np.asarray(t))) > 1  # frames get independent noise levels
  with pytest.raises(ValueError):
    diffusion.sample_training_inputs(jax.random.key(0), x0, schedule, timestep_shape=(3,))


def test_training_timesteps_are_uniform():
  schedule = diffusion.make_schedule("linear")
  t, _, _ = jax.jit(functools.partial(diffusion.sample_training_inputs, schedule=schedule))(
      jax.random.key(1), jnp.zeros((200_000, 1)))
  t = np.asarray(t)
  assert t.min() == 0 and t.max() == T - 1
  counts = np.bincount(t // 100, minlength=10)
  assert np.all(np.abs(counts / 20_000 - 1) < 0.05), counts


# ----------------------------------------------------------------------------------------------------------------
# DDIM / DDPM vs diffusers.
# ----------------------------------------------------------------------------------------------------------------


def _ddim_reference(config, num_steps, eta, x_T, noises, kind, clip=None, use_clipped=False, float64=True):
  """diffusers DDIMScheduler loop: per-step (t, x_t, model output, x_prev) and the final sample."""
  ref = diffusers.DDIMScheduler(
      beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=clip is not None,
      clip_sample_range=clip or 1.0, set_alpha_to_one=config.set_alpha_to_one, steps_offset=config.steps_offset,
      timestep_spacing=config.timestep_spacing,
      prediction_type={"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[kind])
  ref = in_float64(ref) if float64 else ref
  dtype = np.float64 if float64 else np.float32
  ref.set_timesteps(num_steps)
  x, steps = to_torch(x_T, dtype), []
  for i, t in enumerate(ref.timesteps):
    out = torch_model(ref, kind, x, t)
    noise = None if eta == 0 else to_torch(noises[i], dtype)
    x_prev = ref.step(out, t, x, eta=eta, variance_noise=noise, use_clipped_model_output=use_clipped).prev_sample
    steps.append((int(t), x.numpy().astype(np.float32), out.numpy().astype(np.float32), x_prev.numpy()))
    x = x_prev
  return steps, x.numpy()


@pytest.mark.parametrize("kind", ["eps", "v"])
@pytest.mark.parametrize("eta", [0.0, 0.8])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_ddim_matches_diffusers(kind, eta, set_alpha_to_one):
  schedule = diffusion.make_schedule("scaled_linear", prediction_type=kind)
  config = diffusion.DDIMConfig(steps_offset=1, set_alpha_to_one=set_alpha_to_one)
  num_steps, rng = 25, jax.random.key(3)
  x_T = np.random.default_rng(4).standard_normal(SHAPE).astype(np.float32)
  # The documented per-step noise of ddim_sample, handed to diffusers as `variance_noise`.
  noises = [np.asarray(jax.random.normal(k, SHAPE, jnp.float32)) for k in jax.random.split(rng, num_steps)]
  steps, ref_final = _ddim_reference(config, num_steps, eta, x_T, noises, kind)

  # Single steps, fed diffusers' own states; t / prev_t / eta traced.
  step = jax.jit(lambda out, x, t, prev, eta, noise: diffusion.ddim_step(schedule, out, x, t, prev, eta, noise,
                                                                         config)[0])
  worst_step = 0.0
  for i, (t, x, out, ref_prev) in enumerate(steps):
    got = step(out, x, t, t - T // num_steps, jnp.float32(eta), noises[i])
    worst_step = max(worst_step, max_abs(got, ref_prev))
  assert worst_step < STEP_TOL

  # The whole scan-based trajectory (eta traced when stochastic).
  final = _ddim_sampler(schedule, num_steps, config, eta)(x_T, jnp.float32(eta), rng)
  assert final.shape == SHAPE and final.dtype == jnp.float32
  assert max_abs(final, ref_final) < STEP_TOL, max_abs(final, ref_final)
  # Stock diffusers (fp32 throughout) agrees too; for DDIM its own fp32 error stays ~1e-6 here.
  _, ref32_final = _ddim_reference(config, num_steps, eta, x_T, noises, kind, float64=False)
  assert max_abs(final, ref32_final) < STEP_TOL, max_abs(final, ref32_final)


def _ddim_sampler(schedule, num_steps, config, eta=0.0):
  """jit(ddim_sample) with the fake model; `eta` is traced unless it is 0 (then rng is unused)."""
  model_fn = jax_model(schedule, schedule.prediction_type)
  if eta == 0:
    return jax.jit(lambda x, eta, rng: diffusion.ddim_sample(model_fn, x, schedule, num_steps, 0.0, None, config))
  return jax.jit(lambda x, eta, rng: diffusion.ddim_sample(model_fn, x, schedule, num_steps, eta, rng, config))


@pytest.mark.parametrize("spacing,num_steps,kind", [("leading", 1, "v"), ("leading", 7, "x0"), ("trailing", 10, "eps"),
                                                     ("linspace", 50, "v")])
def test_ddim_step_counts_and_spacings(spacing, num_steps, kind):
  schedule = diffusion.make_schedule("scaled_linear", prediction_type=kind)
  config = diffusion.DDIMConfig(timestep_spacing=spacing, steps_offset=0, set_alpha_to_one=False)
  x_T = np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32)
  _, ref_final = _ddim_reference(config, num_steps, 0.0, x_T, None, kind)
  final = _ddim_sampler(schedule, num_steps, config)(x_T, 0.0, None)
  assert max_abs(final, ref_final) < STEP_TOL


@pytest.mark.parametrize("use_clipped", [False, True])
def test_ddim_clipping_matches_diffusers(use_clipped):
  schedule = diffusion.make_schedule("scaled_linear")
  config = diffusion.DDIMConfig(steps_offset=1, clip_sample_range=1.0, use_clipped_model_output=use_clipped)
  x_T = 3.0 * np.random.default_rng(6).standard_normal(SHAPE).astype(np.float32)
  _, ref_final = _ddim_reference(config, 10, 0.0, x_T, None, "eps", clip=1.0, use_clipped=use_clipped)
  final = _ddim_sampler(schedule, 10, config)(x_T, 0.0, None)
  _, unclipped = _ddim_reference(config, 10, 0.0, x_T, None, "eps")
  assert max_abs(final, ref_final) < STEP_TOL
  assert max_abs(unclipped, ref_final) > 1e-2  # clipping is active in this setting


def test_ddim_needs_noise_for_positive_eta():
  schedule = diffusion.make_schedule("linear")
  x = jnp.zeros(SHAPE)
  with pytest.raises(ValueError, match="noise"):
    diffusion.ddim_step(schedule, x, x, 10, 0, eta=0.5)
  with pytest.raises(ValueError, match="rng"):
    diffusion.ddim_sample(jax_model(schedule, "eps"), x, schedule, 5, eta=0.5)


def test_ddim_per_example_timesteps():
  schedule = diffusion.make_schedule("linear", prediction_type="v")
  x, out = _data(7)
  t, prev = np.array([981, 41]), np.array([961, -19])
  both = jax.jit(lambda out, x, t, prev: diffusion.ddim_step(schedule, out, x, t, prev)[0])(out, x, t, prev)
  for i in range(2):
    single = diffusion.ddim_step(schedule, out[i:i + 1], x[i:i + 1], int(t[i]), int(prev[i]))[0]
    assert max_abs(both[i:i + 1], single) < 1e-6


@pytest.mark.parametrize("num_steps", [None, 20])
def test_ddpm_matches_diffusers(num_steps, monkeypatch):
  # Reference in float64 only: stock fp32 diffusers drifts ~4e-5 from it over 1000 steps (ours: ~2e-6).
  schedule = diffusion.make_schedule("linear", prediction_type="eps")
  rng = jax.random.key(8)
  x_T = np.random.default_rng(9).standard_normal(SHAPE).astype(np.float32)
  n = num_steps or T
  noises = [np.asarray(jax.random.normal(k, SHAPE, jnp.float32)) for k in jax.random.split(rng, n)]
  # diffusers draws its own noise (on every step but the last, t == 0); hand it ours, step by step.
  pending = iter(noises)
  monkeypatch.setattr(diffusers_ddpm, "randn_tensor", lambda *args, **kwargs: to_torch(next(pending)))
  ref = in_float64(diffusers.DDPMScheduler(clip_sample=False))
  if num_steps:
    ref.set_timesteps(num_steps)
  x = to_torch(x_T)
  step = jax.jit(lambda out, x, t, prev, noise: diffusion.ddpm_step(schedule, out, x, t, prev, noise)[0])
  worst_step = 0.0
  for i, t in enumerate(ref.timesteps):
    out = torch_model(ref, "eps", x, t)
    prev = int(ref.timesteps[i + 1]) if i + 1 < n else -1
    if i % 97 == 0 or num_steps:  # a sample of single steps; every one is checked by the trajectory below
      got = step(out.numpy().astype(np.float32), x.numpy().astype(np.float32), int(t), prev, noises[i])
    x_prev = ref.step(out, t, x).prev_sample
    if i % 97 == 0 or num_steps:
      worst_step = max(worst_step, max_abs(got, x_prev.numpy()))
    x = x_prev
  assert worst_step < STEP_TOL
  model_fn = jax_model(schedule, "eps")
  final = jax.jit(lambda x, rng: diffusion.ddpm_sample(model_fn, x, schedule, rng, num_steps))(x_T, rng)
  assert max_abs(final, x.numpy()) < STEP_TOL, max_abs(final, x.numpy())


# ----------------------------------------------------------------------------------------------------------------
# Guidance.
# ----------------------------------------------------------------------------------------------------------------

CALLS = []


def cond_model(x, t, cond):
  """Nonlinear in the condition so that mixing up batch halves would show."""
  CALLS.append(x.shape[0])
  emb = jnp.tanh(cond["emb"].mean(axis=1))  # [b, c]
  t = diffusion.broadcast_to_rank(jnp.asarray(t, jnp.float32), x.ndim)
  return jnp.sin(x * cond["gain"][:, None, None, None, None] + emb[:, None, None, None, :]) + t / 1000.0


def _conditions(n, b=2, seed=10):
  rng = np.random.default_rng(seed)
  return [{"emb": jnp.asarray(rng.standard_normal((b, 5, 4)), jnp.float32),
           "gain": jnp.asarray(rng.uniform(0.5, 1.5, (b,)), jnp.float32)} for _ in range(n)]


def test_cfg_scale_one_and_zero():
  x = jnp.asarray(_data(11)[0])
  t = jnp.array([10, 900])
  uncond, cond = _conditions(2)
  guided = jax.jit(lambda s: diffusion.guided_prediction(cond_model, x, t, cond, uncond, s))
  f_c, f_u = cond_model(x, t, cond), cond_model(x, t, uncond)
  assert max_abs(guided(1.0), f_c) < 1e-6
  assert max_abs(guided(0.0), f_u) < 1e-6
  assert max_abs(guided(7.5), f_u + 7.5 * (f_c - f_u)) < 1e-5
  CALLS.clear()
  jax.jit(lambda s: diffusion.guided_prediction(cond_model, x, t, cond, uncond, s))(2.0)
  assert CALLS == [4]  # one model call on the doubled batch


def test_multi_condition_guidance_is_linear():
  x = jnp.asarray(_data(12)[0])
  t = jnp.int32(500)  # a shared scalar timestep is passed through untiled
  uncond, c1, c2 = _conditions(3)
  guided = jax.jit(lambda s1, s2: diffusion.multi_guided_prediction(cond_model, x, t, [c1, c2], uncond, [s1, s2]))
  f_u, f_1, f_2 = (cond_model(x, t, c) for c in (uncond, c1, c2))
  assert max_abs(guided(2.0, 3.0), f_u + 2.0 * (f_1 - f_u) + 3.0 * (f_2 - f_u)) < 1e-5
  # Linearity in the scales: each term contributes independently.
  lhs = guided(2.0, 3.0) - guided(0.0, 0.0)
  rhs = (guided(2.0, 0.0) - guided(0.0, 0.0)) + (guided(0.0, 3.0) - guided(0.0, 0.0))
  assert max_abs(lhs, rhs) < 1e-5
  assert max_abs(guided(1.0, 0.0), f_1) < 1e-6
  CALLS.clear()
  unbatched = diffusion.multi_guided_prediction(cond_model, x, t, [c1, c2], uncond, [2.0, 3.0], batched=False)
  assert CALLS == [2, 2, 2]
  assert max_abs(unbatched, guided(2.0, 3.0)) < 1e-5


def test_nested_text_and_context_guidance():
  x = jnp.asarray(_data(13)[0])
  t = jnp.array([[1, 2, 3], [4, 5, 6]])  # per-frame timesteps are tiled with the batch
  null, text, text_ctx = _conditions(3)
  conditions, terms = [null, text, text_ctx], [(7.5, 1, 0), (2.0, 2, 1)]
  got = jax.jit(lambda: diffusion.composed_guided_prediction(cond_model, x, t, conditions, terms))()
  f0, f1, f2 = (cond_model(x, t, c) for c in conditions)
  assert max_abs(got, f0 + 7.5 * (f1 - f0) + 2.0 * (f2 - f1)) < 1e-5
  # Per-frame scale (e.g. a ramp over frames) broadcast against [b, t, h, w, c].
  ramp = jnp.linspace(1.0, 2.5, 3)[None, :, None, None, None]
  got = diffusion.guided_prediction(cond_model, x, t, text, null, ramp)
  assert max_abs(got, f0 + ramp * (f1 - f0)) < 1e-5
  with pytest.raises(ValueError, match="structure"):
    diffusion.guided_prediction(cond_model, x, t, text, {"emb": null["emb"]}, 1.0)
  with pytest.raises(ValueError, match="out of range"):
    diffusion.composed_guided_prediction(cond_model, x, t, conditions, [(1.0, 3, 0)])


def test_guided_ddim_sampling_jits():
  """Guidance composes with the sampler: model_fn closes over the conditions."""
  schedule = diffusion.make_schedule("scaled_linear")
  uncond, cond = _conditions(2)
  x_T = jnp.asarray(_data(14)[0])

  @jax.jit
  def sample(x_T, scale):
    model_fn = lambda x, t: diffusion.guided_prediction(cond_model, x, t, cond, uncond, scale)
    return diffusion.ddim_sample(model_fn, x_T, schedule, 4)

  out = sample(x_T, 1.0)
  ref = jax.jit(lambda x_T: diffusion.ddim_sample(lambda x, t: cond_model(x, t, cond), x_T, schedule, 4))(x_T)
  assert out.shape == SHAPE and bool(jnp.all(jnp.isfinite(out)))
  assert max_abs(out, ref) < 1e-4
  assert not math.isclose(float(jnp.abs(sample(x_T, 3.0) - out).max()), 0.0)
