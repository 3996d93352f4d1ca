r"""Driving-scene Video LDM (the paper's RDS pipeline) on the embedded synthetic driving scenes.

Stages (``stage=``): ``autoencoder`` (optional: the KL-f8 VAE on single frames, L1 + LPIPS + KL + PatchGAN),
``decoder`` (the autoencoder's decoder given temporal layers and fine-tuned on 30 fps clips against a 3D
PatchGAN, encoder frozen; the pipeline decodes with it), ``upsampler_image`` / ``upsampler`` (the 4x pixel-space
super-resolution diffusion model, 128x256 -> 512x1024, conditioned on the noise-augmented low-res clip: image
pre-training on frames, then its temporal layers on clips; the pipeline's last step),
``image`` (image LDM on single frames, labels day/night + crowdedness, CFG dropout 0.1) and ``base`` (key-frame
video LDM: the image LDM frozen, only the temporal layers train), ``predictor`` (the base model + mask
conditioning on 0-2 context frames, for long rollouts) and ``interpolator`` (3 frames between key frames, one
model for 1.875 -> 7.5 and 7.5 -> 30 fps). Conditioning: label tokens.
Full size: 128x256 px (latents 16x32x4), 8 key frames at 1.875 fps, v-prediction, linear schedule.
The VAE's latent scaling factor of a stage initialised from an ``autoencoder`` workdir is the one that run
measured (``1 / z_std`` of its latents, LDM's ``scale_by_std``), read from the workdir when training starts.

Without ``stage=`` the config trains the whole chain (``CHAIN``), each stage in WORKDIR/<stage>, initialised from
the previous stages, then writes sample videos to WORKDIR (rerunning skips finished stages):

  python -m videoldm_jax.train --config=configs/rds.py:runlocal --workdir=/tmp/videoldm_rds
  python -m videoldm_jax.sample --workdir=/tmp/videoldm_rds --num_samples=8

The same chain stage by stage, on a CPU in a few minutes with ``runlocal`` (tiny U-Net + tiny VAE, 32x64 px,
8 frames, 40 steps):

  # 0) optional: the VAE itself (without it, step 1 uses a random frozen VAE, saved once in WORKDIR/frozen)
  python -m videoldm_jax.train --config=configs/rds.py:stage=autoencoder,runlocal --workdir=/tmp/videoldm_rds_ae
  # 1) image LDM (U-Net + label tokens train; the frozen VAE is step 0's with --config.model_init=/tmp/videoldm_rds_ae)
  python -m videoldm_jax.train --config=configs/rds.py:stage=image,runlocal --workdir=/tmp/videoldm_rds_image
  # 2) temporal layers on top of it (spatial U-Net, VAE and label tokens loaded from step 1 and frozen)
  python -m videoldm_jax.train --config=configs/rds.py:stage=base,runlocal --workdir=/tmp/videoldm_rds_base \
      --config.model_init=/tmp/videoldm_rds_image

Step 2 alone uses a random frozen image LDM; it still exercises the whole video pipeline:

  python -m videoldm_jax.train --config=configs/rds.py:stage=base,runlocal --workdir=/tmp/videoldm_rds_base

Without ``runlocal``, ``base`` requires ``--config.model_init`` (a trained ``image`` workdir or converted checkpoint).
Real data: ``--config.data.source=video_folder/<name> --config.data.data_dir=...`` (see data_pipelines/), or
pre-encoded latents ``--config.data.source=latents --config.data.data_dir=...``.
"""

from videoldm_jax import config_lib, tasks

# The stages of the default run (no ``stage=``), trained in this order, each initialised from the previous.
CHAIN = ("autoencoder", "image", "base", "predictor", "interpolator", "decoder", "upsampler_image", "upsampler")
# The video decoder starts from the autoencoder, not the interpolator; the pixel-space upsampler from scratch.
INIT_FROM = {"decoder": "autoencoder", "upsampler_image": ""}
# runlocal chain: more steps than the stage-by-stage smoke runs (on a CPU a step costs far less than compiling it),
# so that its videos show a road under a day or night sky.
RUNLOCAL_CHAIN_STEPS = {"autoencoder": 100, "image": 400, "base": 80, "predictor": 200, "interpolator": 200,
                        "decoder": 60, "upsampler_image": 150, "upsampler": 60}
RUNLOCAL_CHAIN_SECONDS = 32.0  # length of the chain's closing pipeline video (at the interpolated 30 fps)


def _runlocal_chain(c) -> None:
  for stage, steps in RUNLOCAL_CHAIN_STEPS.items():
    s = c.stages[stage]
    s.total_steps = steps
    s.checkpoint_every_steps = s.sample_every_steps = min(100, steps)
    s.ema_decay = 0.9  # the next stage loads EMA weights: they must forget the random init within the run
  for stage in ("base", "predictor", "interpolator", "upsampler"):  # the chain's own videos are the preview
    c.stages[stage].sample_every_steps = 0
  c.stages.upsampler.sampling.num_steps = 5  # it samples every frame of the closing videos at 128x256
  # The interpolator makes 15 of every 16 frames of the closing videos. Without label guidance (one U-Net pass per
  # step: the key frames it fills in between carry the labels) and at 5 DDIM steps, the closing videos' FVD stayed
  # within noise (64 clips of 4 videos, same seeds: 1969 at guidance 2 / 10 steps, 1967 at 1 / 10, 1955 at 1 / 5;
  # real vs real 152) and sampling took 92 s instead of 173.
  c.stages.interpolator.sampling.guidance_scale = 1.0
  c.stages.interpolator.sampling.num_steps = 5
  # The video decoder reads its temporal receptive field (21 frames) on each side of every window: 128 kept frames
  # per window decode 1.3x the video's frames instead of 3.6x at the default 16 (small frames: memory is no issue).
  c.stages.decoder.decoder.decode_window = 128
  for stage in ("upsampler_image", "upsampler"):  # each evaluation samples whole 128x256 frames
    c.stages[stage].eval_every_steps = RUNLOCAL_CHAIN_STEPS[stage] // 2


def get_config(arg=None):
  a = config_lib.parse_arg(arg, stage=config_lib.CHAIN, runlocal=False)
  if a.stage == config_lib.CHAIN:
    c = config_lib.chain_config(get_config, CHAIN, a)
    c.init_from = dict(INIT_FROM)
    c.sample_seconds = RUNLOCAL_CHAIN_SECONDS  # the closing video: key frames -> rollout -> x4 -> x4 (30 fps)
    if a.runlocal:
      _runlocal_chain(c)
      c.sample_videos = 2  # each long video costs minutes of CPU sampling
      c.sample_fvd_clips = 16  # 8 clips of 16 frames per video, against 16 held-out synthetic clips
      # The 4x pixel upsampler runs at ~0.2-0.4 frames/s x 5 steps on a 2-core CPU: the closing 2 x 961 frames would
      # take hours. The closing videos stop at the video decoder; `sample --pipeline=WORKDIR --seconds=2` upsamples.
      c.sample_skip = ("upsampler",)
    return c
  c = tasks.default_config(a.stage)
  config_lib.apply_variant(c, "tiny_rds" if a.runlocal else "rds")

  c.data.source = "synthetic"
  c.data.height, c.data.width = 128, 256
  c.data.cond_drop_prob = 0.1
  c.data.label_fields = ("day_night", "crowdedness")
  c.model.label_fields = ("day_night", "crowdedness")
  c.model.label_classes = (2, c.data.synthetic.max_cars + 1)
  if "guidance_scale" in c.sampling:
    c.sampling.guidance_scale = 2.0

  if a.stage == "autoencoder":
    c.data.num_frames = 1
    c.data.fps = 1.0
    c.data.cond_drop_prob = 0.0
    c.trainable = r"(vae|discriminator)/.*"
    c.model_init_missing_ok = r"(discriminator|lpips)/.*"  # model_init: e.g. a converted SD VAE to fine-tune
    c.batch_size = 64
    c.total_steps = 200_000
    c.optimizer.lr = 2.9e-4  # LDM: 4.5e-6 x batch
    c.optimizer.b1, c.optimizer.b2 = 0.5, 0.9
    c.optimizer.warmup_steps = 0
    c.optimizer.grad_clip = 0.0
    c.sampling.fps = 1.0
  elif a.stage == "decoder":  # Sec. 3.3: video fine-tuning of the decoder on clips at the pipeline's final 30 fps
    c.data.num_frames = 8
    c.data.fps = 30.0
    c.data.cond_drop_prob = 0.0
    c.model.vae_overrides = dict(temporal_decoder=True)
    c.trainable = r"vae/(decoder|post_quant_conv)/.*|discriminator/.*"
    c.model_init_missing_ok = r"vae/decoder/.*temporal.*|(discriminator|lpips)/.*"  # model_init: an autoencoder
    c.model_init_skip = r"discriminator/.*"  # the autoencoder's judges frames; this one judges clips
    c.batch_size = 8  # clips: 64 frames, as the autoencoder's batch
    c.total_steps = 50_000
    c.optimizer.lr = 2.9e-4
    c.optimizer.b1, c.optimizer.b2 = 0.5, 0.9
    c.optimizer.warmup_steps = 0
    c.optimizer.grad_clip = 0.0
    c.autoencoder.disc_start = 0  # the decoder starts from a trained one: the video discriminator judges at once
    c.sampling.fps = 30.0
  elif a.stage in ("upsampler_image", "upsampler"):  # Sec. 3.4: pixel-space 4x, 128x256 -> 512x1024
    c.data.height, c.data.width = 512, 1024
    c.data.cond_drop_prob = 0.0
    c.model.conditioning = "none"  # the low-res clip and its noise level are the conditioning
    c.sampling.guidance_scale = 1.0  # nothing to guide on
    # No attention at the three high-resolution levels (millions of pixels); the noise level is the class label.
    c.model.unet_overrides = dict(c.model.unet_overrides, in_channels=6, out_channels=3, num_class_embeds=1000,
                                  down_block_types=("DownBlock2D",) * 3 + ("CrossAttnDownBlock2D",),
                                  up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * 3)
    c.upsampler.crop_height, c.upsampler.crop_width = 128, 256  # patches; sampling runs on whole frames
    c.batch_size = 64
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 1000
    if a.stage == "upsampler_image":
      c.data.num_frames = 1
      c.data.fps = 1.0
      c.trainable = r"unet/.*"
      c.total_steps = 100_000
    else:
      c.data.num_frames = 8
      c.data.fps = 30.0
      c.model.temporal = config_lib.video_temporal()
      c.trainable = ".*temporal.*"
      c.model_init_missing_ok = ".*temporal.*"  # model_init: an upsampler_image workdir
      c.total_steps = 50_000
      c.sampling.fps = 30.0
  elif a.stage == "image":
    c.data.num_frames = 1
    c.data.fps = 1.0
    c.trainable = r"(unet|label_encoder)/.*"
    c.model_init_missing_ok = r"(unet|label_encoder)/.*"  # model_init may be a stage=autoencoder workdir (VAE only)
    c.batch_size = 256
    c.total_steps = 200_000
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 1000
  elif a.stage == "base":
    c.data.num_frames = 8
    c.data.fps = 1.875
    c.model.temporal = config_lib.video_temporal()
    c.trainable = ".*temporal.*"
    c.model_init_missing_ok = ".*temporal.*"
    c.batch_size = 640  # 40 per GPU x 16 in the paper
    c.total_steps = 73_000
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 1000
  elif a.stage == "predictor":  # base model + mask conditioning: first S in {0, 1, 2} frames known
    c.data.num_frames = 8
    c.data.fps = 1.875
    c.model.temporal = config_lib.video_temporal(mask_conditioning=True)
    c.trainable = ".*temporal.*"
    c.model_init_missing_ok = ".*temporal_cond.*"  # model_init: a base workdir (only temporal_cond is new)
    c.masked.context_probs = (0.1, 0.3, 0.6)
    c.sampling.context_guidance = 1.5
    c.sampling.fps = 1.875
    c.batch_size = 640
    c.total_steps = 50_000
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 1000
  elif a.stage == "interpolator":  # key frame every 4th frame; regime 0: 7.5 fps clips, regime 1: 30 fps clips
    c.data.num_frames = 13  # 4 key frames
    c.data.fps = (7.5, 30.0)
    c.masked.regime_fps = (7.5, 30.0)
    c.model.temporal = config_lib.video_temporal(mask_conditioning=True, num_regimes=2)
    c.trainable = ".*temporal.*"
    c.model_init_missing_ok = ".*temporal_cond.*"  # model_init: a predictor (or base) workdir
    c.sampling.context_guidance = 1.0
    c.sampling.fps = 7.5
    c.batch_size = 640
    c.total_steps = 50_000
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 1000
  else:
    raise ValueError(f"configs/rds.py: stage={a.stage!r} is not available (autoencoder, decoder, image, base, "
                     "predictor, interpolator, upsampler_image, upsampler)")

  if a.runlocal:
    config_lib.runlocal(c)
    if a.stage == "autoencoder":
      c.optimizer.lr = 1e-3
      c.autoencoder.disc_start = 30
      # LDM's weight 0.5 (x an adaptive factor of ~800 here) turns the decoder into stripes before reconstruction
      # has converged (held-out PSNR 23.5 dB vs 25.2 dB without it); at 0.05 the GAN still learns (d_loss 0.99 ->
      # 0.24) and the decoder stays smooth (25.2 dB; mean-frame baseline 15.0 dB).
      c.autoencoder.disc_weight = 0.05
      c.autoencoder.discriminator = dict(ndf=8, n_layers=2)
    elif a.stage == "decoder":
      # Fine-tuning a trained decoder: at 5e-4 (the other stages' runlocal rate) the held-out L1 rose over 40 steps
      # (0.047 -> 0.053); at 1e-4 it falls (0.0438 -> 0.0411).
      c.optimizer.lr = 1e-4
      c.batch_size = 4
      c.total_steps = 40
      c.autoencoder.disc_weight = 0.05  # as the runlocal autoencoder
      c.autoencoder.discriminator = dict(ndf=8, n_layers=2)
    elif a.stage in ("upsampler_image", "upsampler"):
      c.data.height, c.data.width = 128, 256  # 4x the runlocal key frames' 32x64
      c.upsampler.crop_height, c.upsampler.crop_width = 32, 64
      c.model.unet_overrides = dict(c.model.unet_overrides, down_block_types=("DownBlock2D",) * 2,
                                    up_block_types=("UpBlock2D",) * 2)
      c.optimizer.lr = 1e-3
      c.batch_size = 8 if a.stage == "upsampler_image" else 4
    elif a.stage == "image":
      c.total_steps = 60
      c.optimizer.lr = 1e-3
    else:
      c.optimizer.lr = 5e-4
    if a.stage == "interpolator":
      c.data.num_frames = 9  # 3 key frames
    if a.stage in ("predictor", "interpolator"):
      c.batch_size = 4
      c.total_steps = 30
  return c
