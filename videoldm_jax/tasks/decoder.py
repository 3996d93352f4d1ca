"""Decoder task: stage ``decoder``, the video fine-tuning of the VAE decoder (Video LDM Sec. 3.3).

Decoding a video frame by frame flickers: each frame's details are made up independently. This stage gives the
decoder temporal layers (``VAEConfig.temporal_decoder``: a 3D-conv ResBlock after each spatial ResBlock, merged
by a learned alpha, and a temporal conv after ``conv_out``) and trains it on clips of ``config.data.num_frames``
frames. The encoder stays frozen, so the latent space of every diffusion stage is unchanged and this decoder can
replace the image decoder at the end of any pipeline.

Param tree::

  vae/encoder, vae/quant_conv   frozen (from ``model_init``: an ``autoencoder`` workdir or a converted VAE)
  vae/decoder, vae/post_quant_conv
                                trained (``config.trainable``; ``vae/decoder/.*temporal.*|discriminator/.*``
                                trains only the new temporal layers)
  discriminator/...             3D PatchGAN on clips ``[b, t, h, w, c]`` (``config.decoder.discriminator``:
                                ``video``; ``image`` judges frames, the paper's ablation), own optimizer
  lpips/...                     frozen LPIPS when its weight files are configured

Loss: the autoencoder stage's (``config.autoencoder``: L1 + LPIPS per frame, hinge GAN from ``disc_start`` with
LDM's adaptive weight, computed on the decoder's last layer, here ``temporal_conv_out``); the KL term is absent in
effect (``kl_weight`` 0: the encoder does not train). Fresh temporal layers reproduce the image decoder exactly
(zero-initialised last convs, identity ``temporal_conv_out``), so training starts from the image decoder's quality.

Evaluation on the fixed held-out clips (posterior mode, deterministic): ``eval_psnr`` and ``eval_flicker``, the
mean ``|(x̂_{t+1} - x̂_t) - (x_{t+1} - x_t)|`` over consecutive frames (pixels in [-1, 1]): how much the
reconstruction's frame-to-frame change departs from the video's.

In the long-video pipeline this stage decodes the final latents (``pipeline_order`` after the interpolator) in
windows of ``config.decoder.decode_window`` frames with the decoder's temporal receptive field as halo on each
side, which equals decoding the whole video at once (per-frame temporal norms, ``model.vae_overrides.
temporal_norm="frame"``) with device memory independent of the video's length.
"""

from __future__ import annotations

import copy
import functools
import re
from typing import Dict

import einops
import jax
import jax.numpy as jnp

from videoldm_jax import aot, optim, pipeline, tasks
from videoldm_jax.models import vae as vae_lib
from videoldm_jax.tasks.autoencoder import DISC, AutoencoderTask
from videoldm_jax.tasks.latent_diffusion import vae_config, with_source_vae_scale

DISCRIMINATORS = {"video": 3, "image": 2}


def flicker_error(x: jax.Array, x_rec: jax.Array) -> jax.Array:
  """Mean ``|(x̂_{t+1} - x̂_t) - (x_{t+1} - x_t)|`` over clips ``[b, t, h, w, c]`` (t >= 2): ``[b]``."""
  diff = jnp.abs(jnp.diff(x_rec.astype(jnp.float32), axis=1) - jnp.diff(x.astype(jnp.float32), axis=1))
  return jnp.mean(diff, axis=tuple(range(1, diff.ndim)))


@tasks.register("decoder")
class DecoderTask(AutoencoderTask):
  """Video decoder fine-tuning on clips; the autoencoder stage's losses (see the module docstring)."""

  last_layer = ("vae", "decoder", "temporal_conv_out", "kernel")
  last_input = ("decoder", "conv_out")

  @classmethod
  def config_defaults(cls, stage: str):
    defaults = super().config_defaults(stage)
    defaults["autoencoder"]["kl_weight"] = 0.0  # the encoder is frozen: KL has no gradient here
    defaults["decoder"] = dict(
        discriminator="video",  # video: 3D PatchGAN on clips | image: 2D PatchGAN on frames (ablation)
        decode_window=16,       # frames kept per window when the pipeline decodes long videos
    )
    return defaults

  @classmethod
  def pipeline_order(cls, stage: str) -> int:
    del stage
    return 3  # after key frames (0), rollout (1) and interpolation (2): the latents are final

  @classmethod
  def samples_videos(cls, stage: str) -> bool:
    del stage
    return False  # sample_fn shows reconstructions next to their inputs, not generated videos

  @classmethod
  def resolve_config(cls, config):
    """The latent scale of the ``model_init`` autoencoder (what the diffusion stages built on it use), so this
    decoder reads their latents."""
    return with_source_vae_scale(config)

  @classmethod
  def validate_config(cls, config) -> None:
    super().validate_config(config)
    vc = vae_config(config)
    if not vc.temporal_decoder:
      raise ValueError("config.model.vae_overrides.temporal_decoder must be True for the decoder stage (it trains "
                       "the video decoder's temporal layers)")
    if int(config.data.num_frames) < vc.temporal_kernel:
      raise ValueError(f"config.data.num_frames={config.data.num_frames}: clips shorter than the temporal kernel "
                       f"({vc.temporal_kernel} frames) never show a temporal conv a frame on both sides")
    for path in ("vae/encoder/conv_in/kernel", "vae/quant_conv/kernel"):
      if re.fullmatch(config.trainable, path):
        raise ValueError(f"config.trainable={config.trainable!r} matches {path}: the encoder stays frozen so the "
                         "latent space of the diffusion stages is unchanged")
    if int(config.decoder.decode_window) < 1:
      raise ValueError(f"config.decoder.decode_window={config.decoder.decode_window} must be >= 1")

  @classmethod
  def validate_discriminator(cls, config) -> None:
    kind = config.decoder.discriminator
    if kind not in DISCRIMINATORS:
      raise ValueError(f"config.decoder.discriminator={kind!r}: expected one of {sorted(DISCRIMINATORS)}")
    explicit = config.autoencoder.discriminator.get("dims")
    if explicit is not None and int(explicit) != DISCRIMINATORS[kind]:
      raise ValueError(f"config.autoencoder.discriminator.dims={explicit} contradicts config.decoder.discriminator="
                       f"{kind!r} (dims {DISCRIMINATORS[kind]}); set config.decoder.discriminator='image' to judge "
                       "single frames")

  def __init__(self, config):
    dims = DISCRIMINATORS.get(config.decoder.discriminator)
    if dims is not None and "dims" not in config.autoencoder.discriminator:
      config = copy.deepcopy(config)
      config.autoencoder.discriminator = dict(config.autoencoder.discriminator, dims=dims)
    super().__init__(config)

  # ----- model pieces -------------------------------------------------------------------------------------------
  @property
  def clip_frames(self) -> int:
    return int(self.config.data.num_frames)

  def last_input_fn(self, captured: jax.Array) -> jax.Array:
    return captured  # conv_out's output feeds temporal_conv_out directly

  def _clips(self, frames: jax.Array) -> jax.Array:
    return einops.rearrange(frames, "(b t) h w c -> b t h w c", t=self.clip_frames)

  def last_layer_fn(self, vae_params, features):
    """``kernel -> reconstruction`` of ``temporal_conv_out`` (a 3D conv over clips) on fixed frame features."""
    fn = super().last_layer_fn(vae_params, self._clips(features))
    return lambda kernel: einops.rearrange(fn(kernel), "b t h w c -> (b t) h w c")

  def logits(self, disc_params, images) -> jax.Array:
    if self.disc_config.dims == 3:
      images = self._clips(images)
    return super().logits(disc_params, images)

  # ----- evaluation ---------------------------------------------------------------------------------------------
  def eval_metrics(self, trainable, frozen, batch, rng) -> Dict[str, jax.Array]:
    """Held-out reconstruction PSNR (and the mean-frame baseline) and flicker error of the clips."""
    metrics = super().eval_metrics(trainable, frozen, batch, rng)
    params = optim.merge({k: v for k, v in trainable.items() if k != DISC}, frozen)
    x = self.frames(batch)
    x_rec, _, _ = self.reconstruct(params["vae"], x)
    metrics["eval_flicker"] = jnp.mean(flicker_error(self._clips(x), self._clips(jnp.clip(x_rec, -1.0, 1.0))))
    return metrics

  # ----- pipeline -----------------------------------------------------------------------------------------------
  def decode_clip_fn(self, trainable, frozen):
    """Jitted ``scaled latents [b, n, h, w, c] -> uint8 [b, n, H, W, 3]`` with this stage's video decoder."""
    params = optim.merge({k: v for k, v in trainable.items() if k != DISC}, frozen)["vae"]

    def decode(p, z):
      b, n = z.shape[:2]
      frames = einops.rearrange(z, "b t h w c -> (b t) h w c") / self.vae_config.scaling_factor
      images = self.vae.apply({"params": p}, frames.astype(self.dtype), n, method="decode")
      return einops.rearrange(vae_lib.to_uint8(images), "(b t) h w c -> b t h w c", b=b)

    copts = aot.compiler_options(self.config, execution_bound=True)  # called once per window
    return functools.partial(jax.jit(decode, compiler_options=copts), params)

  def pipeline_step(self, trainable, frozen) -> pipeline.Step:
    halo = vae_lib.temporal_receptive_field(self.vae_config)
    window = int(self.config.decoder.decode_window)
    if halo is None:  # clip statistics: windows are an approximation; decode the trained clip length at a time
      halo, window = 0, int(self.config.data.num_frames)
    return pipeline.WindowedDecode(self.config.stage, self.decode_clip_fn(trainable, frozen), window=window,
                                   halo=halo)

