"""The EDM (Karras et al. 2022) formulation used by Stable Video Diffusion: σ-parameterised, v-prediction.

Noise process (variance-exploding): x_σ = x_0 + σ·ε, σ ∈ (0, ∞); there is no signal scale α as in the VP schedules
of `schedules.py`. The network F never sees x_σ directly: it is called on the preconditioned input c_in·x_σ with the
noise embedding c_noise, and the denoiser is

    D(x_σ; σ) = c_skip(σ)·x_σ + c_out(σ)·F(c_in(σ)·x_σ; c_noise(σ))

with sgm's `VScalingWithEDMcNoise` coefficients (v-prediction, σ_data = 1 for SVD):

    c_skip = σd² / (σ² + σd²),  c_out = −σ·σd / √(σ² + σd²),  c_in = 1 / √(σ² + σd²),  c_noise = ¼·log σ.

Training draws log σ ~ N(p_mean, p_std²) and weights ‖D − x_0‖² by (σ² + σd²) / (σ·σd)². Sampling is the
deterministic Euler ODE solver on Karras σ steps ending in σ = 0, as diffusers' `EulerDiscreteScheduler` runs it
for SVD (`use_karras_sigmas`, continuous timesteps, v_prediction, no churn).

Coefficients take σ as a scalar, `[b]` or per-frame `[b, t]` and broadcast against video data `[b, t, h, w, c]`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from videoldm_jax.diffusion.schedules import broadcast_to_rank

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")

# ----------------------------------------------------------------------------------------------------------------
# Preconditioning.
# ----------------------------------------------------------------------------------------------------------------


def _sigma_like(sigma: Any, x: jax.Array) -> jax.Array:
  """σ as float32 with trailing singleton axes so it broadcasts against `x`."""
  return broadcast_to_rank(jnp.asarray(sigma, jnp.float32), jnp.ndim(x))


def precondition(sigma: Any, sigma_data: float = 1.0) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(c_skip, c_out, c_in, c_noise) for v-prediction with EDM's c_noise, each shaped like `sigma`."""
  sigma = jnp.asarray(sigma, jnp.float32)
  total = sigma**2 + sigma_data**2
  c_skip = sigma_data**2 / total
  c_out = -sigma * sigma_data / jnp.sqrt(total)
  c_in = 1.0 / jnp.sqrt(total)
  c_noise = 0.25 * jnp.log(sigma)
  return c_skip, c_out, c_in, c_noise


def scale_model_input(x: jax.Array, sigma: Any, sigma_data: float = 1.0) -> jax.Array:
  """The network input c_in·x_σ, computed as x / √(σ² + σd²) like diffusers' `scale_model_input`.

  Args:
    x: `[b, t, h, w, c]` noisy data x_σ.
    sigma: a scalar, `[b]` or `[b, t]`.
  """
  sigma = _sigma_like(sigma, x)
  return x / jnp.sqrt(sigma**2 + sigma_data**2)


def denoised(model_output: jax.Array, x: jax.Array, sigma: Any, sigma_data: float = 1.0) -> jax.Array:
  """D = c_skip·x + c_out·F: the x_0 estimate from the network output F at (c_in·x, c_noise).

  Written as F·(−σ·σd/√(σ²+σd²)) + x·σd²/(σ²+σd²), the float32 operation order of diffusers' Euler step (which
  has σd = 1), so samplers agree to rounding.

  Args:
    model_output: `[b, t, h, w, c]` network output F.
    x: `[b, t, h, w, c]` noisy data x_σ.
    sigma: a scalar, `[b]` or `[b, t]`.
  """
  sigma = _sigma_like(sigma, x)
  total = sigma**2 + sigma_data**2
  return model_output * (-sigma * sigma_data / jnp.sqrt(total)) + (x * sigma_data**2 / total)


# ----------------------------------------------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------------------------------------------


def sample_sigmas(rng: jax.Array, shape: tuple[int, ...], p_mean: float = -1.2, p_std: float = 1.2) -> jax.Array:
  """σ = exp(p_mean + p_std·N(0, 1)), float32 of `shape` (sgm's `EDMSampling`; its defaults)."""
  return jnp.exp(p_mean + p_std * jax.random.normal(rng, shape, jnp.float32))


def loss_weight(sigma: Any, sigma_data: float = 1.0) -> jax.Array:
  """λ(σ) = (σ² + σd²) / (σ·σd)², which makes the weighted x_0 loss a unit-weight loss on F (sgm `EDMWeighting`)."""
  sigma = jnp.asarray(sigma, jnp.float32)
  return (sigma**2 + sigma_data**2) / (sigma * sigma_data)**2


def noisy(x0: jax.Array, noise: jax.Array, sigma: Any) -> jax.Array:
  """x_σ = x_0 + σ·ε (variance-exploding: no signal scaling). The network input is then c_in·x_σ.

  Args:
    x0: `[b, t, h, w, c]` clean data.
    noise: ε, same shape.
    sigma: a scalar, `[b]` or per-frame `[b, t]`.
  """
  return x0 + _sigma_like(sigma, x0) * noise


# ----------------------------------------------------------------------------------------------------------------
# Sampler settings.
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EulerEDMConfig:
  """Deterministic Euler sampling on Karras σ steps.

  Attributes:
    sigma_min: the last non-zero σ of the schedule.
    sigma_max: the first σ.
    rho: Karras' ρ; steps are uniform in σ^(1/ρ).
    timestep_spacing: diffusers' spacing name; with Karras σ it only sets the initial noise scale:
      √(σ_max² + 1) for "leading" (as SVD and sgm use), σ_max for "linspace" / "trailing".
  """

  sigma_min: float = 0.002
  sigma_max: float = 700.0
  rho: float = 7.0
  timestep_spacing: str = "leading"

  def __post_init__(self):
    if not 0 < self.sigma_min < self.sigma_max:
      raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={self.sigma_min}, sigma_max={self.sigma_max}")
    if self.rho <= 0:
      raise ValueError(f"rho must be positive, got rho={self.rho}")
    if self.timestep_spacing not in TIMESTEP_SPACINGS:
      raise ValueError(f"timestep_spacing={self.timestep_spacing!r} is not supported; expected one of "
                       f"{TIMESTEP_SPACINGS}")

  @classmethod
  def from_diffusers_scheduler_config(cls, cfg: Mapping[str, Any]) -> EulerEDMConfig:
    """Settings from an `EulerDiscreteScheduler` config (SVD's `scheduler/scheduler_config.json`).

    Only the SVD form is implemented: Karras σ with explicit sigma_min / sigma_max, continuous timesteps
    (¼·log σ), v_prediction, a final σ of 0. Any other value raises ValueError naming the field. Fields that cannot
    change this sampler under those settings (betas, steps_offset, ...) are ignored. Missing fields take diffusers'
    class defaults, most of which are refused.
    """

    def refuse(key, value, expected):
      raise ValueError(f"scheduler config field {key}={value!r} is not supported; expected {expected}")

    name = cfg.get("_class_name", "EulerDiscreteScheduler")
    if name != "EulerDiscreteScheduler":
      refuse("_class_name", name, "'EulerDiscreteScheduler'")
    required = {  # key: (diffusers default, the only value implemented)
        "use_karras_sigmas": (False, True),
        "timestep_type": ("discrete", "continuous"),
        "prediction_type": ("epsilon", "v_prediction"),
        "interpolation_type": ("linear", "linear"),
        "final_sigmas_type": ("zero", "zero"),
    }
    for key, (default, expected) in required.items():
      value = cfg.get(key, default)
      if value != expected:
        refuse(key, value, repr(expected))
    for key in ("use_exponential_sigmas", "use_beta_sigmas"):
      if cfg.get(key):
        refuse(key, cfg[key], "false")
    # Without explicit bounds diffusers takes them from the interpolated training schedule, which depends on the
    # spacing and the step count; SVD always gives both.
    for key in ("sigma_min", "sigma_max"):
      if cfg.get(key) is None:
        refuse(key, cfg.get(key), "a number")
    spacing = cfg.get("timestep_spacing", "linspace")
    if spacing not in TIMESTEP_SPACINGS:
      refuse("timestep_spacing", spacing, f"one of {TIMESTEP_SPACINGS}")
    # diffusers fixes ρ = 7 for its Karras conversion.
    return cls(sigma_min=float(cfg["sigma_min"]), sigma_max=float(cfg["sigma_max"]), rho=7.0, timestep_spacing=spacing)


def karras_sigmas(num_steps: int, config: EulerEDMConfig = EulerEDMConfig()) -> np.ndarray:
  """Karras σ steps `[num_steps + 1]`, float32, decreasing from σ_max to σ_min then a final 0.

  Computed in float64 and rounded once, as diffusers does.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  ramp = np.linspace(0.0, 1.0, num_steps)
  min_inv_rho = config.sigma_min**(1.0 / config.rho)
  max_inv_rho = config.sigma_max**(1.0 / config.rho)
  sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho))**config.rho
  return np.concatenate([sigmas, [0.0]]).astype(np.float32)


def sampling_timesteps(sigmas: Any) -> jax.Array:
  """The continuous timesteps fed to the network, c_noise = ¼·log σ for every σ but the final 0: `[num_steps]`."""
  return 0.25 * jnp.log(jnp.asarray(sigmas, jnp.float32)[:-1])


def init_noise_scale(sigmas: Any, config: EulerEDMConfig = EulerEDMConfig()) -> jax.Array:
  """Std of the initial sample x = noise·scale: √(max σ² + 1) for "leading" spacing, max σ otherwise (diffusers'
  `init_noise_sigma`). A float32 scalar."""
  sigma_max = jnp.max(jnp.asarray(sigmas, jnp.float32))
  if config.timestep_spacing in ("linspace", "trailing"):
    return sigma_max
  return jnp.sqrt(sigma_max**2 + 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Guidance.
# ----------------------------------------------------------------------------------------------------------------


def linear_frame_guidance(num_frames: int, min_scale: float = 1.0, max_scale: float = 3.0) -> np.ndarray:
  """SVD's per-frame guidance scale, rising linearly from `min_scale` (first frame) to `max_scale` (last): `[t]`,
  float32 (the pipeline's `torch.linspace(min, max, num_frames)`)."""
  return np.linspace(min_scale, max_scale, num_frames).astype(np.float32)


def guided(uncond: jax.Array, cond: jax.Array, scale: Any) -> jax.Array:
  """uncond + s·(cond − uncond) on `[b, t, h, w, c]` outputs.

  Args:
    uncond: `[b, t, h, w, c]` output without the condition.
    cond: `[b, t, h, w, c]` output with it.
    scale: a scalar, per-frame `[t]` or `[b, t]`.
  """
  scale = jnp.asarray(scale, uncond.dtype)
  if scale.ndim == 1:
    scale = scale[None]  # [t] -> [1, t]: the frame axis is axis 1
  return uncond + broadcast_to_rank(scale, uncond.ndim) * (cond - uncond)


# ----------------------------------------------------------------------------------------------------------------
# Sampling.
# ----------------------------------------------------------------------------------------------------------------

ModelFn = Callable[[jax.Array, jax.Array], Any]


def euler_sample(model_fn: ModelFn, noise: jax.Array, sigmas: Any, config: EulerEDMConfig = EulerEDMConfig(), *,
                 guidance_scales: Any | None = None) -> jax.Array:
  """Deterministic Euler EDM sampling (diffusers' `EulerDiscreteScheduler.step` for v_prediction, s_churn = 0;
  stochastic churn is not supported), as one `jax.lax.scan`; jit-friendly.

  Per step, at σ → σ_next:
    F = model_fn(x / √(σ² + 1), ¼·log σ)                 (with guidance: F_u + s·(F_c − F_u), per frame)
    D = c_skip·x + c_out·F,  d = (x − D) / σ,  x ← x + d·(σ_next − σ).
  Guidance combines the raw network outputs before the denoiser formula, as the SVD pipeline does. σ_data is 1.

  Args:
    model_fn: `(x_in [b, t, h, w, c], c_noise) -> F [b, t, h, w, c]`; with `guidance_scales`, it returns the pair
      `(F_uncond, F_cond)` (e.g. from one call on the batch doubled). c_noise is a float32 scalar shared by the
      batch; broadcast it to `[b]` as the network needs. Extra conditioning is closed over.
    noise: `[b, t, h, w, c]` standard normal noise.
    sigmas: `[num_steps + 1]` decreasing σ ending in 0, e.g. `karras_sigmas(num_steps, config)`.
    config: sets the initial noise scale (`init_noise_scale`).
    guidance_scales: None (no guidance), a scalar, per-frame `[t]` (e.g. `linear_frame_guidance`) or `[b, t]`.

  Returns:
    float32 `[b, t, h, w, c]` samples (the state is kept in float32 whatever the model's dtype).
  """
  sigmas = jnp.asarray(sigmas, jnp.float32)
  x = noise.astype(jnp.float32) * init_noise_scale(sigmas, config)

  def step(x, sigma_pair):
    sigma, sigma_next = sigma_pair
    out = model_fn(scale_model_input(x, sigma), 0.25 * jnp.log(sigma))
    if guidance_scales is not None:
      out = guided(*out, guidance_scales)
    x0 = denoised(out.astype(jnp.float32), x, sigma)
    derivative = (x - x0) / sigma
    return x + derivative * (sigma_next - sigma), None

  x, _ = jax.lax.scan(step, x, (sigmas[:-1], sigmas[1:]))
  return x
