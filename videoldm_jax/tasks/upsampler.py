"""Upsampler task: stages ``upsampler_image`` and ``upsampler``, the pipeline's 4x super-resolution diffusion model
(Video LDM Sec. 3.4).

Conditioning by noise augmentation (Imagen / cascaded diffusion): the low-resolution clip ``x_lr`` (the
high-resolution one area-downsampled by ``upsampler.factor``) is noised to a level ``gamma``,
``c = alpha_gamma x_lr + sigma_gamma eps`` on its own schedule (``upsampler.aug_*``, the x4 upscaler's
``low_res_scheduler``), resized to the denoised space and concatenated to the U-Net input on channels; ``gamma`` is
the U-Net's class label (``num_class_embeds``, as the SD x4 upscaler's ``class_labels``). Training draws ``gamma``
uniformly in ``[0, upsampler.max_noise_level]`` per clip (all frames of a clip share it); sampling uses
``upsampler.sample_noise_level``. The augmentation lets the model correct the artifacts of the stages before it.

Two spaces (``upsampler.space``):

* ``pixels`` (driving, ``configs/rds.py``): the diffusion runs on pixels in [-1, 1]; the U-Net takes 3 + 3 channels
  and the low-res clip is upsampled bilinearly to the output size. No VAE.
* ``latents`` (text-to-video, ``configs/webvid.py``): the SD x4 upscaler: the high-res clip is encoded by an f=4 VAE,
  the low-res clip has the latents' size and is concatenated as is (4 + 3 channels), text conditioning.

Stages: ``upsampler_image`` trains the image model on frames (temporal layers off); ``upsampler`` adds the
temporal layers (``model_init``: an ``upsampler_image`` workdir or a converted x4 upscaler) and trains only them on
clips. Training is patch-wise: a random crop of ``upsampler.crop_height x crop_width`` output pixels (and the
matching low-res crop) per clip (0: whole frames). The U-Net is convolutional, so sampling runs on whole frames.

In the long-video pipeline this stage is the last step (``pipeline_order`` 4): it upsamples the decoded video in
windows of the trained clip length ``config.data.num_frames``, so device memory does not grow with the video.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional

import einops
import jax
import jax.numpy as jnp

from videoldm_jax import aot, config_lib, diffusion, optim, pipeline, tasks
from videoldm_jax.data import pipeline as data_pipeline
from videoldm_jax.models import vae as vae_lib
from videoldm_jax.tasks.latent_diffusion import LatentDiffusionTask, unet_config, vae_config
from videoldm_jax.upscaling import noise_augment

SPACES = ("pixels", "latents")


def downsample(video: jax.Array, factor: int) -> jax.Array:
  """Area (box) downsampling of ``[..., h, w, c]`` by ``factor`` (h, w multiples of it)."""
  *lead, h, w, c = video.shape
  x = video.reshape(tuple(lead) + (h // factor, factor, w // factor, factor, c))
  return jnp.mean(x, axis=(-4, -2))


@tasks.register("upsampler_image", "upsampler")
class UpsamplerTask(LatentDiffusionTask):
  """4x super-resolution diffusion with noise-augmented low-res conditioning (see the module docstring)."""

  image_stages = ("upsampler_image",)

  @classmethod
  def config_defaults(cls, stage: str):
    defaults = super().config_defaults(stage)
    defaults["upsampler"] = dict(
        space="pixels",           # pixels (driving) | latents (SD x4 upscaler, text-to-video)
        factor=4,                 # output size / input size
        crop_height=0,            # training crop of the output frame (0: whole frames)
        crop_width=0,
        max_noise_level=350,      # training gamma ~ U{0..this}
        sample_noise_level=20,    # gamma at sampling (the x4 upscaler pipeline's default)
        aug_schedule="scaled_linear", aug_beta_start=0.0001, aug_beta_end=0.02, aug_num_train_timesteps=1000,
    )
    defaults["sampling"]["guidance_scale"] = 1.0  # the low-res clip says most; 1 = one U-Net call per step
    return defaults

  @classmethod
  def samples_videos(cls, stage: str) -> bool:
    return stage == "upsampler"

  @classmethod
  def pipeline_order(cls, stage: str) -> Optional[int]:
    return 4 if stage == "upsampler" else None  # last: after the video is decoded

  @classmethod
  def spatial_factor(cls, config) -> int:
    levels = 2 ** (unet_config(config).num_levels - 1)
    if config.upsampler.space == "pixels":
      return levels * int(config.upsampler.factor)  # the low-res frame too must divide
    return levels * max(vae_config(config).downsample_factor, int(config.upsampler.factor))

  @classmethod
  def validate_config(cls, config) -> None:
    u = config.upsampler
    config_lib.check_choices(config, {"upsampler.space": SPACES,
                                      "upsampler.aug_schedule": ("linear", "scaled_linear")})
    super().validate_config(config)
    if config.data.source == data_pipeline.LATENTS:
      raise ValueError("config.data.source='latents': the upsampler needs the pixels to make its low-res input")
    factor = int(u.factor)
    if factor < 1:
      raise ValueError(f"config.upsampler.factor={factor} must be >= 1")
    if not 0 <= int(u.max_noise_level) < int(u.aug_num_train_timesteps):
      raise ValueError(f"config.upsampler.max_noise_level={u.max_noise_level} is outside the augmentation "
                       f"schedule [0, {int(u.aug_num_train_timesteps) - 1}]")
    uc = unet_config(config)
    vc = vae_config(config)
    want = 3 + (3 if u.space == "pixels" else vc.latent_channels)
    if uc.in_channels != want:
      raise ValueError(f"config.model.unet in_channels={uc.in_channels}: the {u.space} upsampler's U-Net takes "
                       f"the noisy sample and the low-res RGB ({want} channels)")
    if uc.num_class_embeds is None or uc.num_class_embeds <= int(u.max_noise_level):
      raise ValueError(f"config.model.unet num_class_embeds={uc.num_class_embeds} must exceed "
                       f"config.upsampler.max_noise_level={u.max_noise_level} (the noise level is its class label)")
    if u.space == "latents" and vc.downsample_factor != factor:
      raise ValueError(f"config.upsampler.factor={factor}: the latent upsampler's low-res input has the latents' "
                       f"size, so it must equal the VAE factor {vc.downsample_factor}")
    if not 0 <= int(u.sample_noise_level) <= int(u.max_noise_level):
      raise ValueError(f"config.upsampler.sample_noise_level={u.sample_noise_level} is outside the trained range "
                       f"[0, config.upsampler.max_noise_level={u.max_noise_level}]")
    f = cls.spatial_factor(config)
    for key, full in (("crop_height", "height"), ("crop_width", "width")):
      crop = int(u[key])
      if crop > int(config.data[full]):
        raise ValueError(f"config.upsampler.{key}={crop} is larger than the frame (config.data.{full}="
                         f"{config.data[full]})")
      if crop < 0 or crop % f:
        raise ValueError(f"config.upsampler.{key}={crop} must be 0 or a positive multiple of {f}")

  def __init__(self, config):
    super().__init__(config)
    u = config.upsampler
    self.pixels = u.space == "pixels"
    self.factor = int(u.factor)
    self.aug_schedule = diffusion.make_schedule(u.aug_schedule, int(u.aug_num_train_timesteps),
                                                float(u.aug_beta_start), float(u.aug_beta_end))

  # ----- params -------------------------------------------------------------------------------------------------
  def init(self, rng) -> Dict[str, Any]:
    params = super().init(rng)
    if self.pixels:
      params.pop("vae")  # the diffusion runs on pixels
    return params

  # ----- model pieces -------------------------------------------------------------------------------------------
  def to_space(self, params, video, rng) -> jax.Array:
    """High-res clips ``[b, t, H, W, 3]`` in [-1, 1] -> the denoised space (pixels, or scaled VAE latents)."""
    return video.astype(jnp.float32) if self.pixels else self.encode(params, {"video": video}, rng)

  def condition(self, low_res, level, noise, size) -> jax.Array:
    """Noise-augmented low-res clips ``[b, t, h, w, 3]`` at ``level`` ``[b]``, resized to ``size`` ``(H', W')``."""
    b, t = low_res.shape[:2]
    c = noise_augment(low_res.astype(jnp.float32), level, noise, self.aug_schedule)
    if tuple(c.shape[2:4]) != tuple(size):
      c = jax.image.resize(c, (b, t) + tuple(size) + (c.shape[-1],), method="linear")
    return c

  def predict(self, params, x_t, t, cond, level, context) -> jax.Array:
    """Noise prediction for clips ``x_t`` ``[b, t, h, w, c]`` with their conditioning ``cond`` and ``level`` ``[b]``."""
    if not self.video:  # the image model folds the frames into the batch: a label per frame (the video U-Net repeats)
      level = jnp.repeat(level, x_t.shape[1])
    return self.denoise(params, jnp.concatenate([x_t, cond], axis=-1).astype(self.dtype), t, context,
                        class_labels=level)

  def crop(self, video, rng) -> jax.Array:
    """A random crop per clip, ``[b, t, H, W, 3]`` -> ``[b, t, ch, cw, 3]``, aligned to the upsampling factor (so
    the low-res crop is the crop of the low-res clip)."""
    u = self.config.upsampler
    b, _, hh, ww, _ = video.shape
    ch, cw = int(u.crop_height) or hh, int(u.crop_width) or ww
    if (ch, cw) == (hh, ww):
      return video
    align = self.spatial_factor(self.config) // 2 ** (self.unet_config.num_levels - 1)
    r_y, r_x = jax.random.split(rng)
    ys = jax.random.randint(r_y, (b,), 0, (hh - ch) // align + 1) * align
    xs = jax.random.randint(r_x, (b,), 0, (ww - cw) // align + 1) * align
    return jax.vmap(lambda v, y, x: jax.lax.dynamic_slice(v, (0, y, x, 0), (v.shape[0], ch, cw, v.shape[-1])))(
        video, ys, xs)

  # ----- training -----------------------------------------------------------------------------------------------
  def loss_fn(self, trainable, frozen, batch, rng):
    params = optim.merge(trainable, frozen)
    r_crop, r_enc, r_level, r_aug, r_diff = jax.random.split(rng, 5)
    video = self.crop(batch["video"], r_crop)
    x0 = self.to_space(params, video, r_enc)
    low_res = downsample(video.astype(jnp.float32), self.factor)
    b = video.shape[0]
    level = jax.random.randint(r_level, (b,), 0, int(self.config.upsampler.max_noise_level) + 1)
    cond = self.condition(low_res, level, jax.random.normal(r_aug, low_res.shape), x0.shape[2:4])
    t, noise, x_t = diffusion.sample_training_inputs(r_diff, x0, self.noise_schedule)
    pred = self.predict(params, x_t, t, cond, level, self.context(params, batch))
    target = diffusion.training_target(None, x0, noise, t, self.noise_schedule)
    return jnp.mean((pred.astype(jnp.float32) - target) ** 2), self.aux_metrics(trainable)

  # ----- sampling -----------------------------------------------------------------------------------------------
  def upsample(self, params, low_res, batch, rng, noise_level: Optional[int] = None) -> jax.Array:
    """Low-res clips ``[n, t, h, w, 3]`` in [-1, 1] -> high-res ``[n, t, factor h, factor w, 3]`` in [-1, 1] (DDIM,
    ``config.sampling``; CFG over ``batch``'s conditioning when its scale is not 1). Whole frames: the U-Net is
    convolutional, whatever crop it trained on."""
    sc, u = self.config.sampling, self.config.upsampler
    n, t, h, w, _ = low_res.shape
    batch = jax.tree.map(lambda x: x[:n], batch)  # the conditioning of these clips
    level = jnp.full((n,), int(u.sample_noise_level if noise_level is None else noise_level), jnp.int32)
    r_aug, r_noise, r_ddim = jax.random.split(rng, 3)
    f = 1 if self.pixels else self.vae_config.downsample_factor
    size = (h * self.factor // f, w * self.factor // f)
    channels = 3 if self.pixels else self.vae_config.latent_channels
    cond = self.condition(low_res, level, jax.random.normal(r_aug, low_res.shape), size)
    context = self.context(params, batch)
    # Unconditional but for the low-res clip (config.model.conditioning "none"): guidance would only double the calls.
    scale = 1.0 if self.config.model.conditioning == "none" else float(sc.guidance_scale)

    def model_fn(x, ts, ctx):  # x [(k n), t, ...] for k stacked conditions
      k = x.shape[0] // n
      return self.predict(params, x, ts, jnp.tile(cond, (k, 1, 1, 1, 1)), jnp.tile(level, k),
                          ctx).astype(jnp.float32)

    if scale == 1.0:
      guided = lambda x, ts: model_fn(x, ts, context)  # noqa: E731
    else:
      uncond = self.context(params, self.null_condition(batch))
      guided = lambda x, ts: diffusion.guided_prediction(model_fn, x, ts, context, uncond, scale)  # noqa: E731
    x_T = jax.random.normal(r_noise, (n, t) + size + (channels,), jnp.float32)
    x0 = diffusion.ddim_sample(guided, x_T, self.noise_schedule, int(sc.num_steps), eta=float(sc.eta),
                               rng=r_ddim if sc.eta else None)
    if self.pixels:
      return jnp.clip(x0, -1.0, 1.0)
    frames = einops.rearrange(x0, "b t h w c -> (b t) h w c") / self.vae_config.scaling_factor
    images = self.vae.apply({"params": params["vae"]}, frames.astype(self.dtype), method="decode")
    return einops.rearrange(images.astype(jnp.float32), "(b t) h w c -> b t h w c", b=n)

  def sample_fn(self, trainable, frozen, batch, rng) -> jax.Array:
    """Upsampled ground-truth low-res clips of the first ``config.sampling.num_samples`` videos of ``batch``:
    uint8 ``[n, t, H, W, 3]``."""
    n = int(self.config.sampling.num_samples)
    batch = jax.tree.map(lambda x: x[:n], batch)
    low_res = downsample(batch["video"].astype(jnp.float32), self.factor)
    return vae_lib.to_uint8(self.upsample(optim.merge(trainable, frozen), low_res, batch, rng))

  def eval_metrics(self, trainable, frozen, batch, rng) -> Dict[str, jax.Array]:
    """PSNR of the upsampled ground-truth low-res clips of the fixed batch against the high-res ones (the first
    ``config.sampling.num_samples``), next to the PSNR of bilinear upsampling: the baseline to beat."""
    from videoldm_jax.tasks.autoencoder import psnr  # pylint: disable=g-import-not-at-top
    n = int(self.config.sampling.num_samples)
    video = batch["video"][:n].astype(jnp.float32)
    low_res = downsample(video, self.factor)
    out = self.upsample(optim.merge(trainable, frozen), low_res, jax.tree.map(lambda x: x[:n], batch), rng)
    bilinear = jax.image.resize(low_res, video.shape, method="linear")
    frames = lambda v: v.reshape((-1,) + v.shape[2:])  # noqa: E731
    return {"eval_psnr": jnp.mean(psnr(frames(video), frames(out))),
            "eval_psnr_bilinear": jnp.mean(psnr(frames(video), frames(jnp.clip(bilinear, -1.0, 1.0))))}

  # ----- pipeline -----------------------------------------------------------------------------------------------
  def window_fn(self, trainable, frozen) -> Callable:
    """Jitted ``(cond, uint8 low-res [b, T, h, w, 3], rng) -> uint8 [b, T, 4h, 4w, 3]``."""
    def fn(p, f, cond, low_res, rng):
      x = low_res.astype(jnp.float32) / 127.5 - 1.0
      return vae_lib.to_uint8(self.upsample(optim.merge(p, f), x, cond, rng))

    jitted = jax.jit(fn, compiler_options=aot.compiler_options(self.config, execution_bound=True))
    return functools.partial(jitted, trainable, frozen)

  def pipeline_step(self, trainable, frozen) -> pipeline.Step:
    return pipeline.Upsample(self.config.stage, self.window_fn(trainable, frozen),
                             window=int(self.config.data.num_frames), factor=self.factor)

