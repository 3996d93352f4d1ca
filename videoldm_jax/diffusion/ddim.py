"""DDIM (Song et al. 2021) and DDPM ancestral sampling, the same updates as diffusers' `DDIMScheduler.step` /
`DDPMScheduler.step` (fixed_small variance) for the same timesteps.

The maths runs in float32 but avoids forming 1 − ᾱ and 1 − ᾱ_τ/ᾱ_τ' by cancellation (σ is stored from float64), so
steps agree with diffusers' own step code run in float64 to < 1e-6; diffusers in float32 drifts further near τ = 0.

A step maps x_τ -> x_τ' (τ' < τ):
  x̂_0, ε̂ = from the model output (ε, v or x0), x̂_0 optionally clipped
  σ_η = η · sqrt((1 − ᾱ_τ') / (1 − ᾱ_τ) · (1 − ᾱ_τ / ᾱ_τ'))
  x_τ' = sqrt(ᾱ_τ') x̂_0 + sqrt(1 − ᾱ_τ' − σ_η²) ε̂ + σ_η z
For the last step τ' < 0 and ᾱ_τ' is 1 (`set_alpha_to_one=True`) or ᾱ_0 (`False`, Stable Diffusion's setting).

Samplers take `model_fn(x, t) -> prediction` with `t` int32 `[b]`; wrap guidance and conditioning into it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from videoldm_jax.diffusion.parameterization import prediction_to_x0_eps
from videoldm_jax.diffusion.schedules import Schedule, broadcast_to_rank

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# ----------------------------------------------------------------------------------------------------------------
# Timesteps.
# ----------------------------------------------------------------------------------------------------------------


def inference_timesteps(num_steps: int, num_train_timesteps: int = 1000, spacing: str = "leading",
                        steps_offset: int = 0) -> np.ndarray:
  """Descending int64 sampling timesteps, as diffusers' `set_timesteps` (Table 2 of Lin et al., WACV 2024).

  "leading": (0, r, 2r, ...) + steps_offset with r = T // n; "trailing": round(T, T − T/n, ...) − 1;
  "linspace": round(linspace(0, T − 1, n)). `steps_offset` only applies to "leading", as in diffusers.
  """
  if not 1 <= num_steps <= num_train_timesteps:
    raise ValueError(f"num_steps={num_steps} must be in [1, {num_train_timesteps}]")
  if spacing == "leading":
    timesteps = np.arange(num_steps) * (num_train_timesteps // num_steps) + steps_offset
  elif spacing == "trailing":  # already descending
    return (np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)) - 1).astype(np.int64)
  elif spacing == "linspace":
    timesteps = np.linspace(0, num_train_timesteps - 1, num_steps).round()
  else:
    raise ValueError(f"unsupported timestep_spacing {spacing!r}; expected one of {TIMESTEP_SPACINGS}")
  return timesteps[::-1].astype(np.int64)


def ddim_previous_timesteps(timesteps: np.ndarray, num_train_timesteps: int = 1000) -> np.ndarray:
  """τ' = τ − T // n for each τ, as `DDIMScheduler.step` (negative on the last step). For "linspace" spacing this
  is not the next listed timestep; it is what diffusers does, kept for parity."""
  return np.asarray(timesteps) - num_train_timesteps // len(timesteps)


@dataclasses.dataclass(frozen=True)
class DDIMConfig:
  """Static DDIM options. Defaults are Stable Diffusion's (diffusers' own class defaults are steps_offset=0,
  set_alpha_to_one=True, clip_sample=True, pixel-space settings).

  Attributes:
    timestep_spacing: "leading", "trailing" or "linspace".
    steps_offset: added to "leading" timesteps (SD: 1, so 50 steps run 981, 961, ..., 1).
    set_alpha_to_one: final ᾱ after the last step is 1 (True) or ᾱ_0 (False).
    clip_sample_range: clip x̂_0 to [−r, r]; None disables (latent models must not clip).
    use_clipped_model_output: recompute ε̂ from the clipped x̂_0.
  """

  timestep_spacing: str = "leading"
  steps_offset: int = 1
  set_alpha_to_one: bool = False
  clip_sample_range: Optional[float] = None
  use_clipped_model_output: bool = False

  @classmethod
  def from_diffusers_scheduler_config(cls, config: Mapping[str, Any]) -> "DDIMConfig":
    """Sampler options of a diffusers scheduler config dict.

    A missing ``clip_sample``, ``steps_offset`` or ``set_alpha_to_one`` takes Stable Diffusion's value (no clipping,
    1, False; this class's defaults) and logs a warning naming the missing fields. diffusers' own class defaults
    (clip x̂_0 to ±1, 0, True) are pixel-space DDPM settings: clipping would silently damage samples of the latent
    models this package converts. Pixel-space models must say ``clip_sample=True``. A missing ``timestep_spacing``
    is "leading" (SD's and diffusers' default alike).
    """
    spacing = config.get("timestep_spacing", "leading")
    if spacing not in TIMESTEP_SPACINGS:
      raise ValueError(f"scheduler config field timestep_spacing={spacing!r} is not supported; "
                       f"expected one of {TIMESTEP_SPACINGS}")
    if config.get("thresholding"):
      raise ValueError(f"scheduler config field thresholding={config['thresholding']!r} is not supported")
    sd = {"clip_sample": cls.clip_sample_range is not None, "steps_offset": cls.steps_offset,
          "set_alpha_to_one": cls.set_alpha_to_one}
    missing = [k for k in sd if k not in config]
    if missing:
      logging.warning("scheduler config has no %s: using Stable Diffusion's %s (diffusers' class defaults would "
                      "clip x̂_0 to [-1, 1], wrong for latent models)", ", ".join(missing),
                      ", ".join(f"{k}={sd[k]}" for k in missing))
    clip = bool(config.get("clip_sample", sd["clip_sample"]))
    return cls(
        timestep_spacing=spacing,
        steps_offset=int(config.get("steps_offset", sd["steps_offset"])),
        set_alpha_to_one=bool(config.get("set_alpha_to_one", sd["set_alpha_to_one"])),
        clip_sample_range=float(config.get("clip_sample_range", 1.0)) if clip else None,
    )


# ----------------------------------------------------------------------------------------------------------------
# Steps.
# ----------------------------------------------------------------------------------------------------------------


def _is_static_zero(value: Any) -> bool:
  return isinstance(value, (int, float)) and value == 0


def _alpha_sigma_at(schedule: Schedule, t: Any, final: tuple[Any, Any], ndim: int) -> tuple[jax.Array, jax.Array]:
  """(α_t, σ_t) broadcast to rank `ndim`, with (α, σ) := `final` where t < 0."""
  t = jnp.asarray(t, jnp.int32)
  safe_t = jnp.maximum(t, 0)
  alpha = jnp.where(t >= 0, schedule.sqrt_alphas_cumprod[safe_t], final[0])
  sigma = jnp.where(t >= 0, schedule.sqrt_one_minus_alphas_cumprod[safe_t], final[1])
  return broadcast_to_rank(alpha, ndim), broadcast_to_rank(sigma, ndim)


def _one_minus_ratio(schedule: Schedule, t: Any, prev_t: Any, alpha_t: jax.Array, sigma_t: jax.Array,
                     alpha_s: jax.Array, sigma_s: jax.Array) -> jax.Array:
  """1 − ᾱ_t / ᾱ_s (the β of the jump s = prev_t -> t) without fp32 cancellation.

  Near τ = 0, ᾱ ≈ 1 and 1 − ᾱ_t/ᾱ_s loses ~3 digits in fp32; there (σ_t² − σ_s²) / ᾱ_s is exact to rounding because
  σ² is stored from float64. For small ᾱ the ratio form is the accurate one; single steps use β_t itself.
  """
  a_t, a_s = alpha_t**2, alpha_s**2
  jump = jnp.where(a_s > 0.5, (sigma_t**2 - sigma_s**2) / a_s, 1.0 - a_t / a_s)
  t, prev_t = jnp.asarray(t, jnp.int32), jnp.asarray(prev_t, jnp.int32)
  single = broadcast_to_rank((prev_t == t - 1) & (prev_t >= 0), alpha_t.ndim)
  return jnp.where(single, broadcast_to_rank(schedule.betas[jnp.clip(t, 0, None)], alpha_t.ndim), jump)


def _x0_eps(schedule: Schedule, model_output: jax.Array, x_t: jax.Array, alpha: jax.Array, sigma: jax.Array,
            prediction_type: Optional[str], clip_sample_range: Optional[float], use_clipped_model_output: bool):
  kind = schedule.prediction_type if prediction_type is None else prediction_type
  x_t = x_t.astype(jnp.float32)
  x0, eps = prediction_to_x0_eps(kind, model_output.astype(jnp.float32), x_t, alpha, sigma)
  if clip_sample_range is not None:
    x0 = jnp.clip(x0, -clip_sample_range, clip_sample_range)
    if use_clipped_model_output:
      eps = (x_t - alpha * x0) / sigma
  return x0, eps


def ddim_step(
    schedule: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: Any,
    prev_t: Any,
    eta: Any = 0.0,
    noise: Optional[jax.Array] = None,
    config: DDIMConfig = DDIMConfig(),
    prediction_type: Optional[str] = None,
) -> tuple[jax.Array, jax.Array]:
  """One DDIM update x_τ -> x_τ' (float32 maths).

  Args:
    schedule: noise schedule.
    model_output: model prediction at (x_t, t), like `x_t`.
    x_t: current sample `[b, ...]`.
    t, prev_t: current and target timesteps: ints, scalars or per-example `[b]` / per-frame `[b, t]` arrays;
      `prev_t < 0` means the final step.
    eta: η ≥ 0 (0: deterministic DDIM, 1: DDPM-like variance).
    noise: z ~ N(0, I) like `x_t`; required unless η is the Python number 0.
    config: static options (final ᾱ, clipping).
    prediction_type: "eps", "v" or "x0"; None: `schedule.prediction_type`.

  Returns:
    (x_prev like `x_t` in `x_t.dtype`, x̂_0 float32).
  """
  if noise is None and not _is_static_zero(eta):
    raise ValueError("ddim_step with eta != 0 needs `noise`")
  final = (1.0, 0.0) if config.set_alpha_to_one else (schedule.sqrt_alphas_cumprod[0],
                                                      schedule.sqrt_one_minus_alphas_cumprod[0])
  alpha_t, sigma_t = _alpha_sigma_at(schedule, t, final, x_t.ndim)
  alpha_p, sigma_p = _alpha_sigma_at(schedule, prev_t, final, x_t.ndim)
  x0, eps = _x0_eps(schedule, model_output, x_t, alpha_t, sigma_t, prediction_type, config.clip_sample_range,
                    config.use_clipped_model_output)
  variance = sigma_p**2 / sigma_t**2 * _one_minus_ratio(schedule, t, prev_t, alpha_t, sigma_t, alpha_p, sigma_p)
  std = eta * jnp.sqrt(variance)
  # max(., 0) only matters for η > 1, where the direction term would otherwise be NaN.
  x_prev = alpha_p * x0 + jnp.sqrt(jnp.maximum(sigma_p**2 - std**2, 0.0)) * eps
  if noise is not None:
    x_prev = x_prev + std * noise
  return x_prev.astype(x_t.dtype), x0


def ddpm_step(
    schedule: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: Any,
    prev_t: Any = None,
    noise: Optional[jax.Array] = None,
    clip_sample_range: Optional[float] = None,
    prediction_type: Optional[str] = None,
) -> tuple[jax.Array, jax.Array]:
  """One ancestral step from the posterior q(x_τ' | x_τ, x̂_0) with the "fixed_small" variance (Ho et al. eq. 7).

  `prev_t` defaults to t − 1; no noise is added where t == 0 (diffusers' rule). ᾱ_τ' = 1 for τ' < 0.
  Returns (x_prev in `x_t.dtype`, x̂_0 float32).
  """
  t = jnp.asarray(t, jnp.int32)
  prev_t = t - 1 if prev_t is None else jnp.asarray(prev_t, jnp.int32)
  alpha_t, sigma_t = _alpha_sigma_at(schedule, t, (1.0, 0.0), x_t.ndim)
  alpha_p, sigma_p = _alpha_sigma_at(schedule, prev_t, (1.0, 0.0), x_t.ndim)
  x0, _ = _x0_eps(schedule, model_output, x_t, alpha_t, sigma_t, prediction_type, clip_sample_range, False)
  beta = _one_minus_ratio(schedule, t, prev_t, alpha_t, sigma_t, alpha_p, sigma_p)
  mean = (alpha_p * beta * x0 + (alpha_t / alpha_p) * sigma_p**2 * x_t.astype(jnp.float32)) / sigma_t**2
  if noise is not None:
    variance = jnp.maximum(sigma_p**2 / sigma_t**2 * beta, 1e-20)
    std = jnp.where(broadcast_to_rank(t, x_t.ndim) > 0, jnp.sqrt(variance), 0.0)
    mean = mean + std * noise
  return mean.astype(x_t.dtype), x0


# ----------------------------------------------------------------------------------------------------------------
# Sampling loops.
# ----------------------------------------------------------------------------------------------------------------


def _scan_sampler(step: Callable, model_fn: ModelFn, x_T: jax.Array, timesteps: np.ndarray, prev_timesteps: np.ndarray,
                  rng: Optional[jax.Array]) -> jax.Array:
  """Runs `step(model_output, x, t, prev_t, noise)` over the timesteps with `lax.scan`.

  Step i draws its noise as `jax.random.normal(jax.random.split(rng, n)[i], x.shape, float32)`.
  """
  keys = None if rng is None else jax.random.split(rng, len(timesteps))

  def body(x, inputs):
    t, prev_t, key = inputs
    out = model_fn(x, jnp.full((x.shape[0],), t, jnp.int32))
    noise = None if key is None else jax.random.normal(key, x.shape, jnp.float32)
    x_prev, _ = step(out, x, t, prev_t, noise)
    return x_prev.astype(x.dtype), None

  xs = (jnp.asarray(timesteps, jnp.int32), jnp.asarray(prev_timesteps, jnp.int32), keys)
  x, _ = jax.lax.scan(body, x_T, xs)
  return x


def ddim_sample(
    model_fn: ModelFn,
    x_T: jax.Array,
    schedule: Schedule,
    num_steps: int,
    eta: Any = 0.0,
    rng: Optional[jax.Array] = None,
    config: DDIMConfig = DDIMConfig(),
    prediction_type: Optional[str] = None,
) -> jax.Array:
  """Runs `num_steps` DDIM steps from x_T `[b, ...]` (a `lax.scan`, so the model is traced once).

  Args:
    model_fn: `(x [b, ...], t int32 [b]) -> prediction` of kind `prediction_type` (default
      `schedule.prediction_type`).
    x_T: initial noise.
    schedule: noise schedule.
    num_steps: static number of steps; timesteps as diffusers `DDIMScheduler.set_timesteps` with `config`.
    eta: η (may be traced); needs `rng` unless it is the Python number 0.
    rng: PRNG key; step i uses noise `normal(split(rng, num_steps)[i], x.shape, float32)`.
    config: static DDIM options.
    prediction_type: overrides `schedule.prediction_type`.

  Returns:
    x_0 like `x_T`.
  """
  if rng is None and not _is_static_zero(eta):
    raise ValueError("ddim_sample with eta != 0 needs `rng`")
  rng = None if _is_static_zero(eta) else rng
  timesteps = inference_timesteps(num_steps, schedule.num_train_timesteps, config.timestep_spacing,
                                  config.steps_offset)
  prev_timesteps = ddim_previous_timesteps(timesteps, schedule.num_train_timesteps)

  def step(out, x, t, prev_t, noise):
    return ddim_step(schedule, out, x, t, prev_t, eta, noise, config, prediction_type)

  return _scan_sampler(step, model_fn, x_T, timesteps, prev_timesteps, rng)


def ddpm_sample(
    model_fn: ModelFn,
    x_T: jax.Array,
    schedule: Schedule,
    rng: jax.Array,
    num_steps: Optional[int] = None,
    steps_offset: int = 0,
    clip_sample_range: Optional[float] = None,
    prediction_type: Optional[str] = None,
) -> jax.Array:
  """Ancestral sampling over all T steps (default) or `num_steps` "leading" timesteps, each step going to the next
  timestep in the list (as diffusers' `DDPMScheduler`). Noise per step as in `ddim_sample`."""
  num_train = schedule.num_train_timesteps
  timesteps = inference_timesteps(num_train if num_steps is None else num_steps, num_train, "leading",
                                  0 if num_steps is None else steps_offset)
  prev_timesteps = np.append(timesteps[1:], -1)

  def step(out, x, t, prev_t, noise):
    return ddpm_step(schedule, out, x, t, prev_t, noise, clip_sample_range, prediction_type)

  return _scan_sampler(step, model_fn, x_T, timesteps, prev_timesteps, rng)
