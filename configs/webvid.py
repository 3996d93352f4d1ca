r"""Text-to-video Video LDM on a Stable Diffusion 1.x / 2.x backbone (the paper's WebVid pipeline).

Stage ``base``: SD's U-Net, VAE and text encoder frozen (loaded from a converted checkpoint), temporal layers
(3D-conv ResBlocks + temporal attention with text cross-attention, learned α) trained on 8 key frames at
1.875 fps, 320x512 px (latents 40x64x4). ``variant=sd15`` (CLIP ViT-L/14, ε) or ``variant=sd21`` (OpenCLIP
ViT-H, v-prediction); ``sd21_base`` for the ε-prediction 512 model.

  python -m videoldm_jax.convert ...                       # writes /ckpt/sd15 (config.json + params/)
  python -m videoldm_jax.train --config=configs/webvid.py:stage=base,variant=sd15 --workdir=/tmp/t2v_sd15 \
      --config.model_init=/ckpt/sd15 --config.data.source=webvid/<name> --config.data.data_dir=/data/tfds

  # CPU smoke run (tiny text model, synthetic captioned driving clips, random frozen backbone):
  python -m videoldm_jax.train --config=configs/webvid.py:stage=base,runlocal --workdir=/tmp/t2v_local

Stages ``predictor`` (the base model + mask conditioning on 0-2 context frames; temporal layers train) and
``interpolator`` (3 frames between key frames, 1.875 -> 7.5 and 7.5 -> 30 fps with a regime label; as in the
paper's T2V interpolator **all** U-Net params train), both initialised from the previous stage's workdir:

  python -m videoldm_jax.train --config=configs/webvid.py:stage=predictor,variant=sd15 --workdir=/tmp/t2v_pred \
      --config.model_init=/tmp/t2v_sd15 ...

Stage ``upsampler`` (Sec. 3.4): the converted SD x4 upscaler (U-Net with 4 latent + 3 low-res channels and the
noise level as class label, f=4 VAE, OpenCLIP text) is the frozen spatial backbone; temporal layers train on 8-frame
clips, 320x512 -> 1280x2048, on 512x512 crops (latents 128x128), conditioned on the noise-augmented low-res clip
(its ``low_res_scheduler``):

  python -m videoldm_jax.convert --source=/models/stable-diffusion-x4-upscaler --output=/ckpt/x4
  python -m videoldm_jax.train --config=configs/webvid.py:stage=upsampler --workdir=/tmp/t2v_up \
      --config.model_init=/ckpt/x4 --config.data.source=webvid/<name> --config.data.data_dir=/data/tfds

Pre-encoded latents (data_pipelines/) train much faster: ``--config.data.source=latents`` (not the upsampler,
which needs the pixels of both resolutions).
"""

from videoldm_jax import config_lib, tasks


def get_config(arg=None):
  a = config_lib.parse_arg(arg, stage="base", variant="sd15", runlocal=False)
  c = tasks.default_config(a.stage)
  config_lib.apply_variant(c, "tiny" if a.runlocal else a.variant)

  c.data.source = "synthetic"  # a prepared TFDS dataset ("webvid/<name>") or "latents" for real runs
  c.data.height, c.data.width = 320, 512
  c.data.cond_drop_prob = 0.1
  c.sampling.guidance_scale = 7.5

  if a.stage == "image":  # optional: brief fine-tuning of the spatial layers on video frames
    c.data.num_frames = 1
    c.trainable = r"unet/.*"
    c.batch_size = 256
    c.total_steps = 10_000
    c.optimizer.lr = 1e-5
  elif a.stage == "base":
    c.data.num_frames = 8
    c.data.fps = 1.875
    c.model.temporal = config_lib.video_temporal(cross_attention=True)
    c.trainable = ".*temporal.*"
    c.model_init_missing_ok = ".*temporal.*"
    c.batch_size = 32
    c.total_steps = 14_000
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 500
  elif a.stage == "predictor":
    c.data.num_frames = 8
    c.data.fps = 1.875
    c.model.temporal = config_lib.video_temporal(cross_attention=True, mask_conditioning=True)
    c.trainable = ".*temporal.*"
    c.model_init_missing_ok = ".*temporal_cond.*"  # model_init: a base workdir
    c.sampling.context_guidance = 1.5
    c.batch_size = 32
    c.total_steps = 10_000
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 500
  elif a.stage == "interpolator":
    c.data.num_frames = 13  # 4 key frames
    c.data.fps = (7.5, 30.0)
    c.masked.regime_fps = (7.5, 30.0)
    c.model.temporal = config_lib.video_temporal(cross_attention=True, mask_conditioning=True, num_regimes=2)
    c.trainable = r"unet/.*"  # the paper's T2V interpolator trains all U-Net params
    c.model_init_missing_ok = ".*temporal_cond.*"
    c.sampling.context_guidance = 1.0
    c.batch_size = 32
    c.total_steps = 10_000
    c.optimizer.lr = 5e-5
    c.optimizer.warmup_steps = 500
  elif a.stage == "upsampler":  # the SD x4 upscaler, frozen, + temporal layers
    c.model.unet, c.model.vae, c.model.unet_overrides, c.model.vae_overrides = "sd_x4_upscaler", "sd_x4_upscaler", {}, {}
    c.model.text_encoder, c.model.tokenizer_pad = "openclip_vit_h14", "!"
    c.diffusion.update(schedule="scaled_linear", beta_start=0.0001, beta_end=0.02, prediction="v")  # its scheduler
    c.upsampler.space = "latents"
    c.data.height, c.data.width = 1280, 2048
    c.upsampler.crop_height, c.upsampler.crop_width = 512, 512
    c.data.num_frames = 8
    c.data.fps = 30.0
    c.model.temporal = config_lib.video_temporal(cross_attention=True)
    c.trainable = ".*temporal.*"
    c.model_init_missing_ok = ".*temporal.*"  # model_init: the converted x4 upscaler
    c.sampling.guidance_scale = 9.0
    c.sampling.num_steps = 50
    c.batch_size = 32
    c.total_steps = 10_000
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 500
  else:
    raise ValueError(f"configs/webvid.py: stage={a.stage!r} is not available (image, base, predictor, "
                     "interpolator, upsampler)")

  if a.runlocal:
    config_lib.runlocal(c)
    c.optimizer.lr = 5e-4
    c.sampling.guidance_scale = 3.0
    if a.stage == "interpolator":
      c.data.num_frames = 9
    if a.stage in ("predictor", "interpolator"):
      c.batch_size = 4
      c.total_steps = 30
    if a.stage == "upsampler":  # tiny x4-shaped U-Net (4 levels) and f=4 VAE, 32x64 -> 128x256 on 64x64 crops
      c.model.unet, c.model.text_encoder, c.model.tokenizer_pad = "tiny_x4_upscaler", "tiny", "<|endoftext|>"
      c.model.unet_overrides = dict(cross_attention_dim=32)  # the tiny text encoder's width
      c.model.vae = "tiny"
      c.model.vae_overrides = dict(block_out_channels=(16, 32, 32), scaling_factor=0.08333)
      c.data.height, c.data.width = 128, 256
      c.upsampler.crop_height, c.upsampler.crop_width = 64, 64
      c.model.temporal = config_lib.video_temporal(cross_attention=True)
      c.batch_size = 4
      c.total_steps = 20
      c.sampling.num_steps = 4
  return c
