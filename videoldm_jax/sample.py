r"""Sampling from converted / trained models.

Text-to-image with a converted Stable Diffusion (DDIM + classifier-free guidance)::

  python -m videoldm_jax.sample --checkpoint=/ckpt/sd15 --prompt="a red car on a mountain road" \
      --steps=50 --guidance=7.5 --height=512 --width=512 --seed=0 --output=/tmp/car.png
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from videoldm_jax import diffusion


def _tokenizer_for(text_config):
  """SD 1.x (OpenAI CLIP, quick_gelu) pads with <|endoftext|>; SD 2.x (OpenCLIP, gelu) pads with '!' (id 0)."""
  from videoldm_jax.models.tokenizer import load_clip_tokenizer
  return load_clip_tokenizer(pad_with="!" if text_config.hidden_act == "gelu" else "<|endoftext|>")


def encode_prompts(converted, prompts: Sequence[str]) -> jax.Array:
  """Prompts -> text conditioning ``[b, 77, d]`` with the checkpoint's text encoder."""
  from videoldm_jax.models.clip import CLIPTextEncoder
  from videoldm_jax.models.tokenizer import tokenize
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
  from videoldm_jax.models.unet import UNet
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
  from videoldm_jax.models.vae import AutoencoderKL
  vcfg = converted.configs["vae"]
  decode = jax.jit(lambda p, z: AutoencoderKL(config=vcfg).apply(p, z, method="decode"))
  images = decode({"params": converted.params["vae"]}, latents / vcfg.scaling_factor)
  return np.asarray(jnp.clip((images + 1.0) * 127.5 + 0.5, 0, 255)).astype(np.uint8)


def save_image_grid(images: np.ndarray, path: str) -> None:
  """``[b, h, w, 3]`` uint8 -> one PNG, images side by side."""
  from PIL import Image
  grid = np.concatenate(list(images), axis=1)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(grid).save(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m videoldm_jax.sample", description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", required=True, help="output directory of videoldm_jax.convert")
  parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
  parser.add_argument("--negative_prompt", default="")
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--guidance", type=float, default=7.5)
  parser.add_argument("--eta", type=float, default=0.0)
  parser.add_argument("--height", type=int, default=512)
  parser.add_argument("--width", type=int, default=512)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--output", required=True, help="PNG path")
  args = parser.parse_args(argv)
  from videoldm_jax.convert import load_converted
  converted = load_converted(args.checkpoint)
  missing = {"unet", "vae", "text_encoder"} - set(converted.configs)
  if missing:
    parser.error(f"--checkpoint {args.checkpoint} lacks {sorted(missing)}; text-to-image needs a full pipeline")
  latents = text_to_image_latents(converted, args.prompt, negative_prompts=[args.negative_prompt] * len(args.prompt),
                                  steps=args.steps, guidance_scale=args.guidance, eta=args.eta, height=args.height,
                                  width=args.width, rng=jax.random.PRNGKey(args.seed))
  save_image_grid(decode_latents(converted, latents), args.output)
  print(f"wrote {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
