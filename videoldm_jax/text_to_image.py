r"""Text-to-image with a converted Stable Diffusion (``python -m videoldm_jax.convert`` output): DDIM +
classifier-free guidance in latent space, then the VAE decoder. A quick check that a conversion is right (the
latents match diffusers' ``StableDiffusionPipeline``; tests/test_sample.py); the CLI is
``python -m videoldm_jax.sample --checkpoint=...``.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from videoldm_jax import diffusion
from videoldm_jax.models.clip import CLIPTextEncoder
from videoldm_jax.models.tokenizer import load_clip_tokenizer, tokenize
from videoldm_jax.models.unet import UNet
from videoldm_jax.models.vae import AutoencoderKL, to_uint8


def _tokenizer_for(text_config):
  """SD 1.x (OpenAI CLIP, quick_gelu) pads with <|endoftext|>; SD 2.x (OpenCLIP, gelu) pads with '!' (id 0)."""
  return load_clip_tokenizer(pad_with="!" if text_config.hidden_act == "gelu" else "<|endoftext|>")


def encode_prompts(converted, prompts: Sequence[str]) -> jax.Array:
  """Prompts -> text conditioning ``[b, 77, d]`` with the checkpoint's text encoder."""
  cfg = converted.configs["text_encoder"]
  ids = tokenize(_tokenizer_for(cfg), list(prompts), max_length=cfg.max_position_embeddings)
  out = jax.jit(CLIPTextEncoder(config=cfg).apply)({"params": converted.params["text_encoder"]}, jnp.asarray(ids))
  return out["last_hidden_state"]


def schedule_of(converted) -> diffusion.Schedule:
  return diffusion.from_diffusers_scheduler_config(converted.schedule or {"beta_schedule": "scaled_linear",
                                                                         "beta_start": 0.00085, "beta_end": 0.012})


def text_to_image_latents(converted, prompts: Sequence[str], *, negative_prompts: Optional[Sequence[str]] = None,
                          steps: int = 50, guidance_scale: float = 7.5, eta: float = 0.0, height: int = 512,
                          width: int = 512, rng: jax.Array, latents: Optional[jax.Array] = None) -> jax.Array:
  """DDIM + CFG in the (scaled) latent space; returns latents ``[b, h/f, w/f, c]`` ready for ``vae.decode(z / s)``.

  ``latents`` is the initial noise (``[b, h/f, w/f, c]``); drawn from ``rng`` when not given.
  """
  ucfg = converted.configs["unet"]
  factor = 2 ** (len(converted.configs["vae"].block_out_channels) - 1) if "vae" in converted.configs else 8
  b = len(prompts)
  cond = encode_prompts(converted, prompts)
  uncond = encode_prompts(converted, negative_prompts or [""] * b)
  noise_rng, ddim_rng = jax.random.split(rng)
  if latents is None:
    latents = jax.random.normal(noise_rng, (b, height // factor, width // factor, ucfg.out_channels))
  unet = UNet(config=ucfg)
  params = {"params": converted.params["unet"]}

  def unet_fn(x, t, context):
    return unet.apply(params, x, t, context)

  def model_fn(x, t):
    return diffusion.guided_prediction(unet_fn, x, t, cond, uncond, guidance_scale)

  schedule = schedule_of(converted)
  config = diffusion.DDIMConfig.from_diffusers_scheduler_config(converted.schedule or {})
  sample = jax.jit(lambda x, r: diffusion.ddim_sample(model_fn, x, schedule, steps, eta=eta, rng=r, config=config))
  return sample(latents, ddim_rng)


def decode_latents(converted, latents: jax.Array) -> np.ndarray:
  """Scaled latents -> images ``[b, h, w, 3]`` uint8."""
  vcfg = converted.configs["vae"]
  decode = jax.jit(lambda p, z: AutoencoderKL(config=vcfg).apply(p, z, method="decode"))
  images = decode({"params": converted.params["vae"]}, latents / vcfg.scaling_factor)
  return np.asarray(to_uint8(images))


def save_image_grid(images: np.ndarray, path: str) -> None:
  """``[b, h, w, 3]`` uint8 -> one PNG, images side by side."""
  grid = np.concatenate(list(images), axis=1)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(grid).save(path)
