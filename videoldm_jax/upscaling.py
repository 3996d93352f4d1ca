r"""x4 super-resolution with a converted ``stabilityai/stable-diffusion-x4-upscaler`` (``python -m videoldm_jax.convert``
output of its pipeline folder): the same computation as diffusers' ``StableDiffusionUpscalePipeline``
(tests/test_upscaling.py checks the latents and images against it).

1. The low-res image ``x`` (RGB in [-1, 1]) is noise-augmented on its own schedule (the pipeline's
   ``low_res_scheduler``) at ``noise_level``: ``c = α_level x + σ_level ε`` (:func:`noise_augment`).
2. DDIM with classifier-free guidance on latents of the low-res image's size (the VAE is f=4): the U-Net input is
   ``concat(latents, c)`` on channels and ``noise_level`` is its class label; the conditional and unconditional
   halves share ``c`` and the level.
3. :func:`decode_upscaled`: the VAE decodes ``latents / scaling_factor`` to ``[b, 4h, 4w, 3]``.

Example::

  converted = convert.load_converted("/ckpt/x4")
  z = upscaling.upscale_latents(converted, low_res, ["a white cat"], rng=jax.random.PRNGKey(0))
  images = upscaling.decode_upscaled(converted, z)
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from videoldm_jax import diffusion
from videoldm_jax.models.unet import UNet
from videoldm_jax.models.vae import AutoencoderKL
from videoldm_jax.text_to_image import encode_prompts, schedule_of

LOW_RES_CHANNELS = 3  # the low-res RGB image concatenated to the latents


def noise_augment(x: jax.Array, level: Any, noise: jax.Array, schedule: diffusion.Schedule) -> jax.Array:
  """Conditioning augmentation of cascaded diffusion models (Imagen; Ho et al. 2021, "Cascaded Diffusion Models"):
  the low-resolution conditioning is itself noised, ``α_level x + σ_level noise``, so the super-resolution model
  learns to correct the artifacts of the stage that produced its input; ``level`` is also given to the model.

  Exactly the forward process ``q(x_level | x)`` of ``schedule`` (diffusers' ``low_res_scheduler.add_noise``).
  Level 0 is the schedule's lowest noise, not zero: ``σ_0 = sqrt(β_0)`` (0.01 for the x4 upscaler's schedule).

  Args:
    x: clean conditioning, e.g. images ``[b, h, w, c]`` or clips ``[b, t, h, w, c]``.
    level: int noise level, ``[b]`` (one per example) or ``[b, t]`` (one per frame).
    noise: standard normal noise like ``x``.
    schedule: the augmentation schedule (:func:`low_res_schedule` for a converted x4 upscaler).
  Returns:
    the augmented conditioning like ``x``.
  """
  return diffusion.q_sample(x, level, noise, schedule)


def _require_upscaler(converted) -> None:
  """Raises ``ValueError`` naming what a checkpoint lacks to be sampled as an x4 upscaler."""
  missing = [c for c in ("unet", "vae", "text_encoder") if c not in converted.configs]
  if missing:
    raise ValueError(f"converted checkpoint {converted.meta.get('source', '')!r} has no {', '.join(missing)}")
  for key in ("low_res_schedule", "max_noise_level"):
    if converted.meta.get(key) is None:
      raise ValueError(f"converted checkpoint {converted.meta.get('source', '')!r}: config.json has no {key!r} "
                       f"(convert a StableDiffusionUpscalePipeline folder, which has low_res_scheduler/)")
  ucfg, vcfg = converted.configs["unet"], converted.configs["vae"]
  if ucfg.in_channels != vcfg.latent_channels + LOW_RES_CHANNELS:
    raise ValueError(f"unet in_channels={ucfg.in_channels} is not vae latent_channels={vcfg.latent_channels} + "
                     f"{LOW_RES_CHANNELS} low-res channels")
  if ucfg.num_class_embeds is None or ucfg.num_class_embeds <= converted.max_noise_level:
    raise ValueError(f"unet num_class_embeds={ucfg.num_class_embeds} cannot embed noise levels up to "
                     f"max_noise_level={converted.max_noise_level}")


def low_res_schedule(converted) -> diffusion.Schedule:
  """The noise-augmentation schedule of a converted x4 upscaler's low-res image."""
  _require_upscaler(converted)
  return diffusion.from_diffusers_scheduler_config(converted.low_res_schedule)


def _check_noise_level(noise_level: Any, max_noise_level: int) -> int:
  level = int(noise_level)
  if level != noise_level or not 0 <= level <= max_noise_level:
    raise ValueError(f"noise_level={noise_level!r} must be an integer in [0, max_noise_level={max_noise_level}]")
  return level


def _check_low_res(low_res: jax.Array, b: int, factor: int) -> None:
  """``[b, h, w, 3]`` with h, w multiples of ``factor`` (diffusers' image processor would resize other sizes
  down to one, so the same image would not give the same result)."""
  if low_res.ndim != 4 or low_res.shape[-1] != LOW_RES_CHANNELS:
    raise ValueError(f"low_res has shape {tuple(low_res.shape)}; expected [b, h, w, {LOW_RES_CHANNELS}]")
  if low_res.shape[0] != b:
    raise ValueError(f"low_res holds {low_res.shape[0]} images but {b} prompts were given")
  h, w = low_res.shape[1:3]
  if h % factor or w % factor or not (h and w):
    raise ValueError(f"low_res size {h}x{w} is not a multiple of {factor} (the VAE's downsampling factor)")


@functools.lru_cache(maxsize=8)
def _sampler(unet_config, ddim_config: diffusion.DDIMConfig, steps: int, eta: float, guided: bool):
  """Jitted DDIM loop for one U-Net config and static sampler options (cached: sampling again at another noise
  level, guidance scale or batch of the same shapes does not recompile)."""
  unet = UNet(config=unet_config)

  def unet_fn(params, x, t, cond):
    # The U-Net input is [latents, augmented low-res image] on channels; the noise level is the class label.
    x = jnp.concatenate([x, cond["image"].astype(x.dtype)], axis=-1)
    return unet.apply({"params": params}, x, t, cond["context"], class_labels=cond["level"])

  def run(params, schedule, latents, cond, uncond, scale, rng):
    def model_fn(x, t):
      if not guided:
        return unet_fn(params, x, t, cond)
      return diffusion.guided_prediction(functools.partial(unet_fn, params), x, t, cond, uncond, scale)

    return diffusion.ddim_sample(model_fn, latents, schedule, steps, eta=eta, rng=rng, config=ddim_config)

  return jax.jit(run)


def upscale_latents(converted, low_res: jax.Array, prompts: Sequence[str], *,
                    negative_prompts: Optional[Sequence[str]] = None, noise_level: int = 20, steps: int = 75,
                    guidance_scale: float = 9.0, eta: float = 0.0, rng: jax.Array,
                    latents: Optional[jax.Array] = None, noise: Optional[jax.Array] = None) -> jax.Array:
  """DDIM + classifier-free guidance of a converted x4 upscaler, as ``StableDiffusionUpscalePipeline``.

  Guidance runs when ``guidance_scale > 1`` (as diffusers; otherwise only the conditional prediction). The
  defaults are diffusers' (75 steps, guidance 9, noise level 20).

  Args:
    converted: :func:`videoldm_jax.convert.load_converted` of an x4-upscaler pipeline folder's conversion.
    low_res: ``[b, h, w, 3]`` RGB in [-1, 1]; h, w multiples of the VAE factor (4).
    prompts: b prompts; ``negative_prompts`` (b, default "") condition the unconditional half.
    noise_level: int in ``[0, converted.max_noise_level]``, one level for the whole batch.
    steps, guidance_scale, eta: DDIM steps (timesteps from the converted scheduler config), CFG scale, DDIM η.
    rng: PRNG key for the initial latents, the augmentation noise and DDIM's noise when ``eta > 0`` (JAX's
      random numbers: with ``eta > 0`` samples differ from diffusers', whose step noise comes from torch).
    latents: initial noise ``[b, h, w, c_latent]`` (default: drawn from ``rng``).
    noise: augmentation noise ``[b, h, w, 3]`` (default: drawn from ``rng``).
  Returns:
    scaled latents ``[b, h, w, c_latent]`` for :func:`decode_upscaled`.
  """
  _require_upscaler(converted)
  ucfg, vcfg = converted.configs["unet"], converted.configs["vae"]
  level = _check_noise_level(noise_level, converted.max_noise_level)
  b = len(prompts)
  low_res = jnp.asarray(low_res, jnp.float32)
  _check_low_res(low_res, b, vcfg.downsample_factor)
  if negative_prompts is not None and len(negative_prompts) != b:
    raise ValueError(f"negative_prompts holds {len(negative_prompts)} prompts but prompts holds {b}")
  h, w = low_res.shape[1:3]
  latent_rng, noise_rng, ddim_rng = jax.random.split(rng, 3)
  if latents is None:
    latents = jax.random.normal(latent_rng, (b, h, w, vcfg.latent_channels))
  if noise is None:
    noise = jax.random.normal(noise_rng, low_res.shape)
  latents, noise = jnp.asarray(latents, jnp.float32), jnp.asarray(noise, jnp.float32)
  if latents.shape != (b, h, w, vcfg.latent_channels):
    raise ValueError(f"latents has shape {tuple(latents.shape)}; expected {(b, h, w, vcfg.latent_channels)}")
  if noise.shape != low_res.shape:
    raise ValueError(f"noise has shape {tuple(noise.shape)}; expected the low_res shape {tuple(low_res.shape)}")

  levels = jnp.full((b,), level, jnp.int32)
  image = noise_augment(low_res, levels, noise, low_res_schedule(converted))
  guided = guidance_scale > 1.0
  cond = {"context": encode_prompts(converted, prompts), "image": image, "level": levels}
  uncond = None
  if guided:
    uncond = dict(cond, context=encode_prompts(converted, negative_prompts or [""] * b))
  ddim_config = diffusion.DDIMConfig.from_diffusers_scheduler_config(converted.schedule or {})
  sample = _sampler(ucfg, ddim_config, int(steps), float(eta), guided)
  return sample(converted.params["unet"], schedule_of(converted), latents, cond, uncond,
                jnp.float32(guidance_scale), ddim_rng)


def decode_upscaled(converted, latents: jax.Array) -> np.ndarray:
  """Scaled latents ``[b, h, w, c_latent]`` -> images ``[b, f h, f w, 3]`` float32 in [-1, 1] (f = 4 for the x4
  upscaler; clipped as diffusers' postprocessing does)."""
  vcfg = converted.configs["vae"]
  decode = jax.jit(lambda p, z: AutoencoderKL(config=vcfg).apply({"params": p}, z, method="decode"))
  images = decode(converted.params["vae"], jnp.asarray(latents, jnp.float32) / vcfg.scaling_factor)
  return np.clip(np.asarray(images, np.float32), -1.0, 1.0)
