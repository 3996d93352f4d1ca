"""Variance-preserving noise schedules: x_τ = α_τ x_0 + σ_τ ε with α_τ² + σ_τ² = 1, τ ∈ {0, ..., T-1}.

Betas are built in float64 NumPy and stored as float32 `jax.Array`s, so a `Schedule` can be closed over or passed
into `jax.jit` (it is a pytree; `prediction_type` is static metadata).

Naming trap: CompVis/SD configs call their schedule "linear" (`linear_start=0.00085, linear_end=0.012`) but space it
linearly in *sqrt(β)*; that is diffusers' "scaled_linear". "linear" here is Ho et al.'s linspace(1e-4, 0.02) in β.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

# Default β range per schedule name (diffusers' class defaults differ for "scaled_linear"; see
# `from_diffusers_scheduler_config`, which follows diffusers when a field is missing).
DEFAULT_BETA_RANGE = {
    "linear": (1e-4, 0.02),  # Ho et al. 2020
    "scaled_linear": (0.00085, 0.012),  # Stable Diffusion / LDM
}
SCHEDULE_NAMES = ("linear", "scaled_linear", "squaredcos_cap_v2")

# Model output kinds. Aliases are the diffusers `prediction_type` spellings.
PREDICTION_TYPES = ("eps", "v", "x0")
_PREDICTION_ALIASES = {"eps": "eps", "epsilon": "eps", "v": "v", "v_prediction": "v", "x0": "x0", "sample": "x0"}


def canonical_prediction_type(name: str) -> str:
  """Maps "eps"/"epsilon", "v"/"v_prediction", "x0"/"sample" to "eps", "v", "x0"."""
  try:
    return _PREDICTION_ALIASES[name]
  except KeyError:
    raise ValueError(f"unsupported prediction_type {name!r}; expected one of {sorted(_PREDICTION_ALIASES)}") from None


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["betas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"],
    meta_fields=["prediction_type"],
)
@dataclasses.dataclass(frozen=True, eq=False)  # array fields: no elementwise __eq__ / __hash__
class Schedule:
  """A discrete VP schedule. All arrays are float32 `[T]`; index them with integer timesteps.

  Attributes:
    betas: β_τ.
    alphas_cumprod: ᾱ_τ = Π_{s≤τ} (1 − β_s) = α_τ².
    sqrt_alphas_cumprod: α_τ, the signal scale.
    sqrt_one_minus_alphas_cumprod: σ_τ, the noise scale.
    prediction_type: what the denoiser outputs by default: "eps", "v" or "x0" (static).
  """

  betas: jax.Array
  alphas_cumprod: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  prediction_type: str = "eps"

  @property
  def num_train_timesteps(self) -> int:
    return self.betas.shape[0]

  @property
  def snr(self) -> jax.Array:
    """Signal-to-noise ratio α_τ² / σ_τ², `[T]`."""
    return self.alphas_cumprod / (1.0 - self.alphas_cumprod)


def make_betas(
    name: str,
    num_train_timesteps: int = 1000,
    beta_start: Optional[float] = None,
    beta_end: Optional[float] = None,
) -> np.ndarray:
  """float64 β_τ `[T]` for a named schedule ("linear", "scaled_linear", "squaredcos_cap_v2")."""
  if name in DEFAULT_BETA_RANGE:
    default_start, default_end = DEFAULT_BETA_RANGE[name]
    beta_start = default_start if beta_start is None else beta_start
    beta_end = default_end if beta_end is None else beta_end
  if name == "linear":
    return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
  if name == "scaled_linear":
    return np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
  if name == "squaredcos_cap_v2":
    # Nichol & Dhariwal's cosine ᾱ(s), discretised per step, β capped at 0.999 to avoid a singular last step.
    def alpha_bar(s):
      return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([
        min(1.0 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), 0.999)
        for i in range(num_train_timesteps)
    ])
  raise ValueError(f"unsupported beta_schedule {name!r}; expected one of {SCHEDULE_NAMES}")


def schedule_from_betas(betas: Any, prediction_type: str = "eps") -> Schedule:
  """Builds a `Schedule` from explicit β_τ `[T]` (cumulative products are taken in float64)."""
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or not np.all((betas > 0) & (betas < 1)):
    raise ValueError("betas must be a 1-D array with values in (0, 1)")
  alphas_cumprod = np.cumprod(1.0 - betas)
  as_f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
  return Schedule(
      betas=as_f32(betas),
      alphas_cumprod=as_f32(alphas_cumprod),
      sqrt_alphas_cumprod=as_f32(np.sqrt(alphas_cumprod)),
      sqrt_one_minus_alphas_cumprod=as_f32(np.sqrt(1.0 - alphas_cumprod)),
      prediction_type=canonical_prediction_type(prediction_type),
  )


def make_schedule(
    name: str = "linear",
    num_train_timesteps: int = 1000,
    beta_start: Optional[float] = None,
    beta_end: Optional[float] = None,
    prediction_type: str = "eps",
) -> Schedule:
  """A named schedule; β range defaults to `DEFAULT_BETA_RANGE[name]` (SD's range for "scaled_linear")."""
  return schedule_from_betas(make_betas(name, num_train_timesteps, beta_start, beta_end), prediction_type)


# Fields of a diffusers scheduler config that change the noise process; anything else (sampler options, class name,
# version) is ignored here. `DDIMConfig.from_diffusers_scheduler_config` reads the sampler options.
_UNSUPPORTED_IF_TRUE = ("rescale_betas_zero_snr", "thresholding")


def from_diffusers_scheduler_config(config: Mapping[str, Any]) -> Schedule:
  """Builds a `Schedule` from a diffusers scheduler config dict (e.g. SD's `scheduler/scheduler_config.json`).

  Reads beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas and prediction_type; missing fields
  take the diffusers class defaults (linear, 1e-4, 0.02, 1000, epsilon). Raises ValueError naming the field for a
  value this package does not implement.
  """
  name = config.get("beta_schedule", "linear")
  if name not in SCHEDULE_NAMES:
    raise ValueError(f"scheduler config field beta_schedule={name!r} is not supported; "
                     f"expected one of {SCHEDULE_NAMES}")
  for field in _UNSUPPORTED_IF_TRUE:
    if config.get(field):
      raise ValueError(f"scheduler config field {field}={config[field]!r} is not supported")
  prediction_type = config.get("prediction_type", "epsilon")
  if prediction_type not in _PREDICTION_ALIASES:
    raise ValueError(f"scheduler config field prediction_type={prediction_type!r} is not supported; "
                     f"expected one of {sorted(_PREDICTION_ALIASES)}")
  if config.get("trained_betas") is not None:
    return schedule_from_betas(config["trained_betas"], prediction_type)
  betas = make_betas(name, int(config.get("num_train_timesteps", 1000)), float(config.get("beta_start", 1e-4)),
                     float(config.get("beta_end", 0.02)))
  return schedule_from_betas(betas, prediction_type)


def broadcast_to_rank(coef: jax.Array, ndim: int) -> jax.Array:
  """Appends singleton axes so per-example `[b]` or per-frame `[b, t]` coefficients broadcast against `ndim` data."""
  coef = jnp.asarray(coef)
  if coef.ndim > ndim:
    raise ValueError(f"coefficient of shape {coef.shape} has more axes than data of rank {ndim}")
  return coef.reshape(coef.shape + (1,) * (ndim - coef.ndim))


def alpha_sigma(schedule: Schedule, t: Any, ndim: Optional[int] = None) -> tuple[jax.Array, jax.Array]:
  """(α_τ, σ_τ) gathered at integer timesteps `t` (scalar, `[b]` or `[b, t]`), shaped to broadcast against data of
  rank `ndim` (`t.shape` must be a prefix of the data's shape). float32."""
  t = jnp.asarray(t, dtype=jnp.int32)
  alpha, sigma = schedule.sqrt_alphas_cumprod[t], schedule.sqrt_one_minus_alphas_cumprod[t]
  if ndim is not None:
    alpha, sigma = broadcast_to_rank(alpha, ndim), broadcast_to_rank(sigma, ndim)
  return alpha, sigma
