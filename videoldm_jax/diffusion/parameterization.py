"""ε / v / x0 parameterisations, the forward process q(x_τ | x_0) and training inputs.

With x_τ = α x_0 + σ ε and α² + σ² = 1, the velocity is v = α ε − σ x_0 (Salimans & Ho 2022), so
x_0 = α x_τ − σ v and ε = σ x_τ + α v. The conversion helpers take α, σ already broadcast against the data
(see `schedules.alpha_sigma(schedule, t, x.ndim)`); timestep-based helpers gather and broadcast themselves, for
per-example `t: [b]` as well as per-frame `t: [b, t]` on video data `[b, t, h, w, c]`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from videoldm_jax.diffusion.schedules import Schedule, alpha_sigma, canonical_prediction_type

# ----------------------------------------------------------------------------------------------------------------
# Conversions between x0, ε and v at a given (x_τ, α, σ).
# ----------------------------------------------------------------------------------------------------------------


def v_from_x0_eps(x0: jax.Array, eps: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  return alpha * eps - sigma * x0


def x0_from_eps(x_t: jax.Array, eps: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  return (x_t - sigma * eps) / alpha


def eps_from_x0(x_t: jax.Array, x0: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  return (x_t - alpha * x0) / sigma


def x0_from_v(x_t: jax.Array, v: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  return alpha * x_t - sigma * v


def eps_from_v(x_t: jax.Array, v: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  return sigma * x_t + alpha * v


def v_from_eps(x_t: jax.Array, eps: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  return v_from_x0_eps(x0_from_eps(x_t, eps, alpha, sigma), eps, alpha, sigma)


def v_from_x0(x_t: jax.Array, x0: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  return v_from_x0_eps(x0, eps_from_x0(x_t, x0, alpha, sigma), alpha, sigma)


def prediction_to_x0_eps(kind: str, prediction: jax.Array, x_t: jax.Array, alpha: jax.Array,
                         sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(x̂_0, ε̂) from a model output of the given kind ("eps", "v", "x0" or a diffusers alias)."""
  kind = canonical_prediction_type(kind)
  if kind == "eps":
    return x0_from_eps(x_t, prediction, alpha, sigma), prediction
  if kind == "v":
    return x0_from_v(x_t, prediction, alpha, sigma), eps_from_v(x_t, prediction, alpha, sigma)
  return prediction, eps_from_x0(x_t, prediction, alpha, sigma)


def x0_eps_to_prediction(kind: str, x0: jax.Array, eps: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  """The quantity a model of the given kind should output for (x_0, ε)."""
  kind = canonical_prediction_type(kind)
  if kind == "eps":
    return eps
  if kind == "v":
    return v_from_x0_eps(x0, eps, alpha, sigma)
  return x0


# ----------------------------------------------------------------------------------------------------------------
# Forward process and training inputs.
# ----------------------------------------------------------------------------------------------------------------


def q_sample(x0: jax.Array, t: Any, noise: jax.Array, schedule: Schedule) -> jax.Array:
  """x_τ = α_τ x_0 + σ_τ ε. `t`: int, `[b]` or `[b, t]` (a prefix of `x0.shape`). Same dtype as `x0`/`noise`."""
  alpha, sigma = alpha_sigma(schedule, t, x0.ndim)
  return (alpha * x0 + sigma * noise).astype(jnp.result_type(x0, noise))


def training_target(kind: Optional[str], x0: jax.Array, noise: jax.Array, t: Any, schedule: Schedule) -> jax.Array:
  """Regression target for a model of `kind` ("eps", "v", "x0"; None: `schedule.prediction_type`)."""
  kind = schedule.prediction_type if kind is None else kind
  alpha, sigma = alpha_sigma(schedule, t, x0.ndim)
  return x0_eps_to_prediction(kind, x0, noise, alpha, sigma).astype(jnp.result_type(x0, noise))


def sample_training_inputs(
    rng: jax.Array,
    x0: jax.Array,
    schedule: Schedule,
    timestep_shape: Optional[Sequence[int]] = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Draws τ ~ U{0, ..., T−1} and ε ~ N(0, I) and noises `x0`.

  Args:
    rng: PRNG key.
    x0: clean data, e.g. latents `[b, h, w, c]` or `[b, t, h, w, c]`.
    schedule: the noise schedule.
    timestep_shape: shape of τ, a prefix of `x0.shape`: `(b,)` (default, one level per example) or `(b, t)` for
      an independent noise level per video frame.

  Returns:
    (t int32 `timestep_shape`, noise like `x0`, x_t like `x0`).
  """
  timestep_shape = tuple(x0.shape[:1] if timestep_shape is None else timestep_shape)
  if x0.shape[:len(timestep_shape)] != timestep_shape:
    raise ValueError(f"timestep_shape {timestep_shape} must be a prefix of x0.shape {x0.shape}")
  t_rng, noise_rng = jax.random.split(rng)
  t = jax.random.randint(t_rng, timestep_shape, 0, schedule.num_train_timesteps, dtype=jnp.int32)
  noise = jax.random.normal(noise_rng, x0.shape, dtype=jnp.float32).astype(x0.dtype)
  return t, noise, q_sample(x0, t, noise, schedule)
