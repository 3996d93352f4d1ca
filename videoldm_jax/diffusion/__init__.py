"""Diffusion maths: VP schedules, ε / v / x0 parameterisations, DDIM / DDPM sampling and guidance.

Pure, jit-friendly functions; a `Schedule` is a pytree that can be closed over or passed through `jax.jit`.
"""

from videoldm_jax.diffusion.ddim import (
    DDIMConfig,
    ddim_previous_timesteps,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
    inference_timesteps,
)
from videoldm_jax.diffusion.guidance import (
    combine_guidance,
    composed_guided_prediction,
    evaluate_conditions,
    guided_prediction,
    multi_guided_prediction,
)
from videoldm_jax.diffusion.parameterization import (
    eps_from_v,
    eps_from_x0,
    prediction_to_x0_eps,
    q_sample,
    sample_training_inputs,
    training_target,
    v_from_eps,
    v_from_x0,
    v_from_x0_eps,
    x0_eps_to_prediction,
    x0_from_eps,
    x0_from_v,
)
from videoldm_jax.diffusion.schedules import (
    PREDICTION_TYPES,
    Schedule,
    alpha_sigma,
    broadcast_to_rank,
    canonical_prediction_type,
    from_diffusers_scheduler_config,
    make_betas,
    make_schedule,
    schedule_from_betas,
)
