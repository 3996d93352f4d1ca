"""Image-to-video task: stage ``svd``, fine-tuning Stable Video Diffusion (Blattmann et al. 2023) on this loop.

Conditioning (as SVD and diffusers' ``StableVideoDiffusionPipeline``), for clips ``[b, t, h, w, 3]`` in [-1, 1]:

* **CLIP image embedding** of the clean first frame: resized to 224 with SVD's anti-aliasing, normalised with
  CLIP's mean / std (``models/clip_vision.svd_image_encoder_input``), through the frozen ``image_encoder`` (OpenCLIP
  ViT-H/14 + projection): ``image_embeds`` ``[b, 1, 1024]`` is the cross-attention context of every frame.
* **First-frame latent**: the first frame plus ``cond_aug`` Gaussian noise, encoded by the frozen VAE encoder (the
  posterior mode, **unscaled**, as the pipeline does), repeated over the frames and concatenated to the noisy
  latents on channels (4 + 4 = the U-Net's 8 input channels).
* **Added time ids** ``[fps - 1, motion bucket id, cond_aug]`` through the U-Net's ``add_time_proj`` /
  ``add_embedding``. Training uses ``config.data.fps`` and a motion bucket that is either fixed
  (``svd.motion_bucket_id`` >= 0) or measured from the clip (-1): ``motion_scale`` times the mean absolute
  frame-to-frame pixel change (in [-1, 1] units), rounded and clipped to [0, 255]. That heuristic stands in for SVD's
  optical-flow magnitude (not public): it orders clips by motion, which is what the bucket conditions on.
* ``cond_aug`` is drawn per clip from a log-normal (``svd.cond_aug_p_mean`` / ``cond_aug_p_std``); both image
  conditions are dropped together (zeros, the pipeline's unconditional input) with ``svd.cond_drop_prob`` for
  classifier-free guidance.

Diffusion (``diffusion/edm.py``): EDM in σ with SVD's v-scaling preconditioning (σ_data 1): the network sees
``c_in x_σ`` and ``c_noise = ¼ log σ``, the denoiser is ``D = c_skip x_σ + c_out F``; training draws
``log σ ~ N(edm.p_mean, edm.p_std²)`` per clip and minimises ``λ(σ) |D - z_0|²`` with ``λ = (σ² + 1) / σ²``.
Sampling is the Euler EDM sampler on Karras σ (``edm.sigma_min`` .. ``sigma_max``) with guidance that rises
linearly over the frames (``sampling.min_guidance_scale`` -> ``max_guidance_scale``), decoded by the temporal VAE
decoder in chunks of ``sampling.decode_chunk_size`` frames.

Param tree: ``unet`` (``models/unet.py`` ``svd``), ``vae`` (``VAEConfig.svd``: temporal decoder), ``image_encoder``
(``models/clip_vision.py``). ``config.trainable``: ``unet/.*temporal.*`` (temporal layers only) or ``unet/.*`` (the
whole U-Net); the VAE and the image encoder are always frozen. ``config.model_init``: a converted SVD pipeline
(``python -m videoldm_jax.convert --source=stable-video-diffusion-img2vid-xt``) or an ``svd`` workdir.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Dict, Optional

import einops
import jax
import jax.numpy as jnp

from videoldm_jax import aot, optim, tasks
from videoldm_jax.data import pipeline as data_pipeline
from videoldm_jax.diffusion import edm
from videoldm_jax.models import clip_vision
from videoldm_jax.models import unet as unet_lib
from videoldm_jax.models import vae as vae_lib
from videoldm_jax.tasks.common import Task, sds
from videoldm_jax.tasks.latent_diffusion import DTYPES, LatentDiffusionTask, unet_config, vae_config

NUM_TIME_IDS = 3  # fps - 1, motion bucket id, cond_aug


def image_encoder_config(config) -> clip_vision.CLIPVisionConfig:
  """``config.svd.image_encoder`` preset of ``models/clip_vision.py`` + ``image_encoder_overrides``."""
  preset = getattr(clip_vision, config.svd.image_encoder, None)
  if not callable(preset):
    raise ValueError(f"config.svd.image_encoder={config.svd.image_encoder!r}: no such preset in "
                     "videoldm_jax.models.clip_vision")
  cfg = preset()
  overrides = dict(config.svd.image_encoder_overrides)
  fields = {f.name for f in dataclasses.fields(cfg)}
  for k in overrides:
    if k not in fields:
      raise ValueError(f"config.svd.image_encoder_overrides.{k}: not a field of CLIPVisionConfig")
  return dataclasses.replace(cfg, **overrides) if overrides else cfg


def motion_bucket(video: jax.Array, scale: float) -> jax.Array:
  """The clip-measured motion bucket id ``[b]`` of ``video`` ``[b, t, h, w, 3]`` in [-1, 1]: ``scale`` times the
  mean absolute frame-to-frame change, rounded, in [0, 255] (see the module docstring)."""
  change = jnp.mean(jnp.abs(jnp.diff(video.astype(jnp.float32), axis=1)), axis=(1, 2, 3, 4))
  return jnp.clip(jnp.round(scale * change), 0.0, 255.0)


@tasks.register("svd")
class SVDTask(LatentDiffusionTask):
  """Stable Video Diffusion image-to-video fine-tuning (see the module docstring)."""

  image_stages = ()
  free_form = ("svd.image_encoder_overrides",)  # CLIPVisionConfig fields, checked by image_encoder_config

  @classmethod
  def config_defaults(cls, stage: str):
    del stage
    return {
        "edm": dict(p_mean=0.7, p_std=1.6,       # training log σ ~ N(p_mean, p_std²) (a high-noise shift)
                    sigma_min=0.002, sigma_max=700.0),  # the sampler's Karras σ range (SVD's scheduler config)
        "svd": dict(
            image_encoder="openclip_vit_h14", image_encoder_overrides={},
            cond_aug_p_mean=-3.0, cond_aug_p_std=0.5,  # training cond_aug ~ LogNormal
            cond_drop_prob=0.1,      # both image conditions zeroed together (classifier-free guidance)
            motion_bucket_id=-1,     # >= 0: this id for every clip; -1: measured from the clip (motion_scale)
            motion_scale=1000.0,
        ),
        # Euler EDM + guidance rising over the frames; sampling.fps is both the fps condition (fps - 1) and the
        # preview's frame rate, as in the SVD pipeline.
        "sampling": dict(num_steps=25, min_guidance_scale=1.0, max_guidance_scale=3.0, fps=7.0,
                         motion_bucket_id=127, cond_aug=0.02, decode_chunk_size=0),  # 0: decode the whole clip
    }

  @classmethod
  def samples_videos(cls, stage: str) -> bool:
    return True

  @classmethod
  def pipeline_order(cls, stage: str) -> Optional[int]:
    return None  # its own pipeline (``sample --svd``): image in, clip out

  @classmethod
  def spatial_factor(cls, config) -> int:
    return vae_config(config).downsample_factor * 2 ** (unet_config(config).num_levels - 1)

  @classmethod
  def validate_config(cls, config) -> None:
    if config.model.conditioning != "image":
      raise ValueError(f"config.model.conditioning={config.model.conditioning!r}: the svd stage conditions on the "
                       "first frame ('image')")
    if config.data.source == data_pipeline.LATENTS:
      raise ValueError("config.data.source='latents': the svd stage needs the first frame's pixels (CLIP image "
                       "embedding)")
    if int(config.data.num_frames) < 2:
      raise ValueError(f"config.data.num_frames={config.data.num_frames}: the svd stage trains on clips")
    uc, vc = unet_config(config), vae_config(config)
    if uc.temporal is None:
      raise ValueError(f"config.model.unet={config.model.unet!r} has no temporal layers (use 'svd' / 'tiny_svd')")
    if uc.in_channels != 2 * vc.latent_channels or uc.out_channels != vc.latent_channels:
      raise ValueError(f"config.model.unet in/out channels {uc.in_channels}/{uc.out_channels}: SVD's U-Net takes "
                       f"the noisy latents and the first frame's latents ({2 * vc.latent_channels} in, "
                       f"{vc.latent_channels} out)")
    if uc.addition_time_embed_dim is None or uc.addition_embed_dim != NUM_TIME_IDS * uc.addition_time_embed_dim:
      raise ValueError(f"config.model.unet: the svd stage feeds {NUM_TIME_IDS} added time ids (fps, motion, "
                       f"cond_aug); the U-Net has addition_embed_dim={uc.addition_embed_dim}, "
                       f"addition_time_embed_dim={uc.addition_time_embed_dim}")
    ic = image_encoder_config(config)
    if ic.projection_dim != uc.cross_attention_dim:
      raise ValueError(f"config.svd.image_encoder projects to {ic.projection_dim} but the U-Net cross-attends to "
                       f"{uc.cross_attention_dim} (config.model.unet)")
    trainable = re.compile(config.trainable)
    for frozen in ("vae/encoder/conv_in/kernel", "image_encoder/visual_projection/kernel"):
      if trainable.fullmatch(frozen):
        raise ValueError(f"config.trainable={config.trainable!r} matches {frozen}: the VAE and the image encoder "
                         "stay frozen (train 'unet/.*temporal.*' or 'unet/.*')")
    for key in ("p_std", "sigma_min", "sigma_max"):
      if float(config.edm[key]) <= 0:
        raise ValueError(f"config.edm.{key}={config.edm[key]} must be > 0")
    if float(config.edm.sigma_min) >= float(config.edm.sigma_max):
      raise ValueError(f"config.edm.sigma_min={config.edm.sigma_min} must be below sigma_max={config.edm.sigma_max}")
    s = config.svd
    if not 0.0 <= float(s.cond_drop_prob) < 1.0:
      raise ValueError(f"config.svd.cond_drop_prob={s.cond_drop_prob} must be in [0, 1)")
    if not -1 <= int(s.motion_bucket_id) <= 255:
      raise ValueError(f"config.svd.motion_bucket_id={s.motion_bucket_id}: -1 (from the clip) or 0..255")
    if float(config.data.fps) < 1:
      raise ValueError(f"config.data.fps={config.data.fps}: the svd stage conditions on fps - 1 (fps >= 1)")
    if int(config.sampling.decode_chunk_size) < 0:
      raise ValueError(f"config.sampling.decode_chunk_size={config.sampling.decode_chunk_size} must be >= 0")
    f = cls.spatial_factor(config)
    for key in ("height", "width"):
      if int(config.data[key]) % f:
        raise ValueError(f"config.data.{key}={config.data[key]} must be a multiple of {f} (VAE factor x U-Net "
                         "downsampling)")

  @classmethod
  def resolve_config(cls, config):
    return config  # SVD's VAE scale is its preset's (0.18215), whatever the source

  def __init__(self, config):  # pylint: disable=super-init-not-called
    # The latent-diffusion pieces this stage shares (encode, aux_metrics); no DDPM schedule, text or labels.
    self.config = config
    self.video, self.num_frames = True, int(config.data.num_frames)
    self.dtype = DTYPES[config.dtype]
    self.unet_config, self.vae_config = unet_config(config), vae_config(config)
    self.image_config = image_encoder_config(config)
    kw = dict(dtype=self.dtype, param_dtype=jnp.float32)
    self.unet = unet_lib.UNet(self.unet_config, **kw)
    self.vae = vae_lib.AutoencoderKL(self.vae_config, **kw)
    self.image_encoder = clip_vision.CLIPVisionEncoder(self.image_config, **kw)
    self.text_encoder = self.label_encoder = self.tokenize = None
    self.sampler = edm.EulerEDMConfig(sigma_min=float(config.edm.sigma_min), sigma_max=float(config.edm.sigma_max))
    Task.__init__(self, config)

  # ----- params -------------------------------------------------------------------------------------------------
  def init(self, rng) -> Dict[str, Any]:
    r_unet, r_vae, r_image = jax.random.split(rng, 3)
    t = self.num_frames
    inputs = unet_lib.dummy_inputs(self.unet_config, batch=t)
    inputs.update(num_frames=t, image_only_indicator=jnp.zeros((1, t), jnp.float32))
    s = self.image_config.image_size
    return {"unet": self.unet.init(r_unet, **inputs)["params"],
            "vae": self.vae.init(r_vae, vae_lib.example_image(self.vae_config))["params"],
            "image_encoder": self.image_encoder.init(r_image, jnp.zeros((1, s, s, 3)))["params"]}

  # ----- data ---------------------------------------------------------------------------------------------------
  def abstract_batch(self, batch_size: int, inputs: Optional[str] = None) -> Dict[str, Any]:
    """``video`` ``[b, t, h, w, 3]`` in [-1, 1] (the first frame is the condition): this stage trains on pixels
    whatever ``inputs`` prefers (its CLIP and VAE conditioning need the first frame)."""
    del inputs
    b, t = int(batch_size), int(self.config.data.num_frames)
    return {"video": sds((b, t, int(self.config.data.height), int(self.config.data.width), 3), jnp.float32)}

  # ----- conditioning -------------------------------------------------------------------------------------------
  def image_embeddings(self, params, images) -> jax.Array:
    """First frames ``[b, h, w, 3]`` in [-1, 1] -> CLIP ``image_embeds`` ``[b, 1, d]`` (the U-Net's context)."""
    pixels = clip_vision.svd_image_encoder_input(images.astype(jnp.float32), size=self.image_config.image_size)
    out = self.image_encoder.apply({"params": params["image_encoder"]}, pixels.astype(self.dtype))
    return jax.lax.stop_gradient(out["image_embeds"][:, None].astype(jnp.float32))

  def image_latents(self, params, images) -> jax.Array:
    """Noise-augmented first frames ``[b, h, w, 3]`` -> the VAE posterior mode ``[b, h/8, w/8, 4]``, unscaled."""
    moments = self.vae.apply({"params": params["vae"]}, images.astype(self.dtype), method="encode")
    return jax.lax.stop_gradient(vae_lib.DiagonalGaussian(moments).mode().astype(jnp.float32))

  def time_ids(self, fps, motion, cond_aug) -> jax.Array:
    """``[b, 3]``: fps - 1, motion bucket id, cond_aug (each a scalar or ``[b]``)."""
    b = jnp.shape(cond_aug)[0] if jnp.ndim(cond_aug) else jnp.shape(motion)[0]
    return jnp.stack([jnp.broadcast_to(jnp.asarray(v, jnp.float32), (b,)) for v in (fps - 1.0, motion, cond_aug)],
                     axis=-1)

  def network(self, params, x_in, c_noise, embeds, latents, time_ids) -> jax.Array:
    """The U-Net on ``[b, t, h, w, c]`` inputs: ``x_in`` (already scaled by c_in), the first frame's ``latents``
    ``[b, h, w, c]`` concatenated on channels, ``c_noise`` ``[b]``, context ``embeds`` ``[b, 1, d]``. Returns F."""
    b, t = x_in.shape[:2]
    cond = jnp.broadcast_to(latents[:, None], x_in.shape[:-1] + (latents.shape[-1],))
    x = einops.rearrange(jnp.concatenate([x_in, cond], axis=-1), "b t h w c -> (b t) h w c")
    out = self.unet.apply({"params": params["unet"]}, x.astype(self.dtype), c_noise, embeds.astype(self.dtype),
                          added_cond=time_ids, num_frames=t, image_only_indicator=jnp.zeros((b, t), jnp.float32))
    return einops.rearrange(out, "(b t) h w c -> b t h w c", b=b).astype(jnp.float32)

  # ----- training -----------------------------------------------------------------------------------------------
  def loss_fn(self, trainable, frozen, batch, rng):
    params = optim.merge(trainable, frozen)
    s, e = self.config.svd, self.config.edm
    r_enc, r_aug, r_aug_noise, r_drop, r_sigma, r_noise = jax.random.split(rng, 6)
    video = batch["video"].astype(jnp.float32)
    b = video.shape[0]
    z0 = self.encode(params, {"video": video}, r_enc)
    first = video[:, 0]
    cond_aug = jnp.exp(float(s.cond_aug_p_mean) + float(s.cond_aug_p_std) * jax.random.normal(r_aug, (b,)))
    latents = self.image_latents(params, first + cond_aug[:, None, None, None] * jax.random.normal(
        r_aug_noise, first.shape))
    embeds = self.image_embeddings(params, first)
    keep = (jax.random.uniform(r_drop, (b,)) >= float(s.cond_drop_prob)).astype(jnp.float32)
    latents, embeds = latents * keep[:, None, None, None], embeds * keep[:, None, None]
    motion = (motion_bucket(video, float(s.motion_scale)) if int(s.motion_bucket_id) < 0
              else jnp.full((b,), float(s.motion_bucket_id)))
    ids = self.time_ids(float(self.config.data.fps), motion, cond_aug)
    sigma = edm.sample_sigmas(r_sigma, (b,), float(e.p_mean), float(e.p_std))
    x = edm.noisy(z0, jax.random.normal(r_noise, z0.shape), sigma)
    c_noise = edm.precondition(sigma)[3]
    out = self.network(params, edm.scale_model_input(x, sigma), c_noise, embeds, latents, ids)
    d = edm.denoised(out, x, sigma)
    per_clip = jnp.mean((d - z0) ** 2, axis=(1, 2, 3, 4))
    loss = jnp.mean(edm.loss_weight(sigma) * per_clip)
    return loss, {**self.aux_metrics(trainable), "loss_unweighted": jnp.mean(per_clip)}

  # ----- sampling -----------------------------------------------------------------------------------------------
  def generate(self, params, image, cond_noise, noise, *, fps: float, motion_bucket_id: float, cond_aug: float,
               num_steps: int, min_guidance_scale: float, max_guidance_scale: float) -> jax.Array:
    """Image-to-video sampling (the SVD pipeline's loop): conditioning images ``[b, h, w, 3]`` in [-1, 1], their
    augmentation noise ``cond_noise`` (same shape) and the initial noise ``[b, t, h/8, w/8, 4]`` -> latents of
    the same shape (scaled: divide by the VAE's ``scaling_factor`` to decode)."""
    t = noise.shape[1]
    embeds = self.image_embeddings(params, image)
    latents = self.image_latents(params, image + cond_aug * cond_noise)
    b = image.shape[0]
    ids = self.time_ids(float(fps), jnp.full((b,), float(motion_bucket_id)), jnp.full((b,), float(cond_aug)))
    sigmas = edm.karras_sigmas(int(num_steps), self.sampler)
    guidance = edm.linear_frame_guidance(t, float(min_guidance_scale), float(max_guidance_scale))
    use_cfg = float(max(min_guidance_scale, max_guidance_scale)) > 1.0  # the pipeline's do_classifier_free_guidance

    def model_fn(x_in, c_noise):
      c = jnp.full((b,), c_noise)
      if not use_cfg:
        return self.network(params, x_in, c, embeds, latents, ids)
      out = self.network(params, jnp.concatenate([x_in, x_in]), jnp.concatenate([c, c]),
                         jnp.concatenate([jnp.zeros_like(embeds), embeds]),
                         jnp.concatenate([jnp.zeros_like(latents), latents]), jnp.concatenate([ids, ids]))
      return out[:b], out[b:]

    return edm.euler_sample(model_fn, noise, sigmas, self.sampler, guidance_scales=guidance if use_cfg else None)

  def decode_latents(self, params, z) -> jax.Array:
    """Scaled latents ``[n, t, h, w, c]`` -> uint8 videos ``[n, t, H, W, 3]``: the temporal decoder on chunks of
    ``sampling.decode_chunk_size`` frames (0: the whole clip), each chunk one clip, as the SVD pipeline does."""
    n, t = z.shape[:2]
    chunk = int(self.config.sampling.decode_chunk_size) or t
    frames = einops.rearrange(z, "b t h w c -> (b t) h w c") / self.vae_config.scaling_factor
    out = []
    for start in range(0, n * t, chunk):
      part = frames[start:start + chunk]
      out.append(self.vae.apply({"params": params["vae"]}, part.astype(self.dtype), part.shape[0],
                                method="decode"))
    images = jnp.concatenate(out)
    return einops.rearrange(vae_lib.to_uint8(images), "(b t) h w c -> b t h w c", b=n)

  def sample_latents(self, params, batch, rng) -> jax.Array:
    """Videos from the first frames of the first ``config.sampling.num_samples`` clips of ``batch`` (as long as
    those clips), with ``config.sampling``'s conditioning and guidance."""
    sc = self.config.sampling
    video = batch["video"][:int(sc.num_samples)].astype(jnp.float32)
    n, t, h, w, _ = video.shape
    f = self.vae_config.downsample_factor
    r_cond, r_noise = jax.random.split(rng)
    image = video[:, 0]
    noise = jax.random.normal(r_noise, (n, t, h // f, w // f, self.vae_config.latent_channels))
    return self.generate(params, image, jax.random.normal(r_cond, image.shape), noise, fps=float(sc.fps),
                         motion_bucket_id=float(sc.motion_bucket_id), cond_aug=float(sc.cond_aug),
                         num_steps=int(sc.num_steps), min_guidance_scale=float(sc.min_guidance_scale),
                         max_guidance_scale=float(sc.max_guidance_scale))

  def sample_fn(self, trainable, frozen, batch, rng) -> jax.Array:
    params = optim.merge(trainable, frozen)
    return self.decode_latents(params, self.sample_latents(params, batch, rng))

  def image_to_video_fn(self, trainable, frozen):
    """Jitted ``(image [b, h, w, 3] in [-1, 1], num_frames, rng) -> uint8 [b, num_frames, h, w, 3]`` with
    ``config.sampling``'s settings (``sample --svd``)."""
    sc = self.config.sampling
    f = self.vae_config.downsample_factor

    def fn(p, fr, image, rng, num_frames):
      params = optim.merge(p, fr)
      b, h, w, _ = image.shape
      r_cond, r_noise = jax.random.split(rng)
      noise = jax.random.normal(r_noise, (b, num_frames, h // f, w // f, self.vae_config.latent_channels))
      z = self.generate(params, image, jax.random.normal(r_cond, image.shape), noise, fps=float(sc.fps),
                        motion_bucket_id=float(sc.motion_bucket_id), cond_aug=float(sc.cond_aug),
                        num_steps=int(sc.num_steps), min_guidance_scale=float(sc.min_guidance_scale),
                        max_guidance_scale=float(sc.max_guidance_scale))
      return self.decode_latents(params, z)

    jitted = jax.jit(fn, static_argnums=(4,), compiler_options=aot.compiler_options(self.config))
    return functools.partial(jitted, trainable, frozen)

