r"""Image-to-video: fine-tuning Stable Video Diffusion (SVD 14 frames / SVD-XT 25 frames) on this loop.

Stage ``svd`` (``videoldm_jax/tasks/svd.py``): SVD's video U-Net, its temporal-decoder VAE and its CLIP image encoder,
loaded from a converted pipeline folder; clips at 576x1024 (latents 72x128x4), conditioned on their first frame.
``frames=14`` (SVD) or ``25`` (SVD-XT); ``train=temporal`` (the temporal layers only: 656M of 1.52B U-Net params) or
``full`` (the whole U-Net). bf16 compute, frozen weights in bf16, blockwise attention (no 9216x9216 score matrix at
the first level), full remat, parameters and optimizer state sharded over the slice (``fsdp``).

  python -m videoldm_jax.convert --source=/models/stable-video-diffusion-img2vid-xt --output=/ckpt/svd_xt
  python -m videoldm_jax.plan --config=configs/svd.py:frames=25 --topology=v5p-8
  python -m videoldm_jax.train --config=configs/svd.py:frames=25,train=temporal --workdir=/runs/svd_xt \
      --config.model_init=/ckpt/svd_xt --config.data.source=video_folder/clips --config.data.data_dir=/data/tfds
  python -m videoldm_jax.sample --svd=/runs/svd_xt --image=first_frame.png --num_frames=25

  # CPU smoke run (tiny SVD-shaped model, synthetic driving clips, random frozen backbone):
  python -m videoldm_jax.train --config=configs/svd.py:runlocal --workdir=/tmp/svd_local
"""

from videoldm_jax import config_lib, parallel, tasks

TRAINABLE = {"temporal": r"unet/.*temporal.*", "full": r"unet/.*"}


def get_config(arg=None):
  a = config_lib.parse_arg(arg, frames=14, train="temporal", runlocal=False)
  if a.train not in TRAINABLE:
    raise ValueError(f"configs/svd.py: train={a.train!r}; expected one of {sorted(TRAINABLE)}")
  if int(a.frames) < 2:
    raise ValueError(f"configs/svd.py: frames={a.frames} must be >= 2")
  c = tasks.default_config("svd")
  c.model.update(unet="svd", vae="svd", text_encoder="", conditioning="image")
  c.svd.image_encoder = "openclip_vit_h14"
  c.trainable = TRAINABLE[a.train]
  c.data.source = "synthetic"  # a prepared TFDS dataset ("video_folder/<name>", "webvid/<name>") for real runs
  c.data.num_frames = int(a.frames)
  c.data.fps = 7.0  # the clips' frame rate, and the fps condition (fps - 1)
  c.data.height, c.data.width = 576, 1024
  c.sampling.num_steps = 25 if int(a.frames) <= 14 else 30  # SVD's / SVD-XT's defaults
  c.sampling.decode_chunk_size = 14
  c.batch_size = 4
  c.total_steps = 20_000
  c.optimizer.lr = 1e-5 if a.train == "full" else 3e-5
  c.optimizer.warmup_steps = 500
  c.optimizer.weight_decay = 0.0
  c.ema_decay = 0.9999
  c.dtype, c.frozen_dtype = "bfloat16", "bfloat16"
  c.model.unet_overrides = dict(remat="full", attention_implementation="blockwise")
  parallel.apply_preset(c, "fsdp")

  if a.runlocal:
    config_lib.runlocal(c)
    c.model.update(unet="tiny_svd", vae="tiny")
    c.model.unet_overrides = {}
    # The tiny VAE with SVD's video decoder (temporal layers, clip-wide GroupNorm statistics).
    c.model.vae_overrides = dict(temporal_decoder=True, temporal_norm="clip")
    c.svd.image_encoder = "tiny"
    c.dtype, c.frozen_dtype = "float32", "float32"
    c.data.num_frames = 8
    c.data.fps = 30.0
    c.batch_size = 4
    c.sampling.num_steps = 5
    c.sampling.decode_chunk_size = 0
    c.optimizer.lr = 5e-4
    c.mesh = config_lib.mesh_defaults()
  return c
