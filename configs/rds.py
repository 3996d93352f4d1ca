r"""Driving-scene Video LDM (the paper's RDS pipeline) on the embedded synthetic driving scenes.

Stages (``stage=``): ``autoencoder`` (optional: the KL-f8 VAE on single frames, L1 + LPIPS + KL + PatchGAN),
``image`` (image LDM on single frames, labels day/night + crowdedness, CFG dropout 0.1) and ``base`` (key-frame
video LDM: the image LDM frozen, only the temporal layers train). Conditioning: label tokens.
Full size: 128x256 px (latents 16x32x4), 8 key frames at 1.875 fps, v-prediction, linear schedule.
Argument ``vae_scale=S`` sets the VAE's latent scaling factor (1 / the ``z_std`` an autoencoder run logs).

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

from configs import common

# The stages of the default run (no ``stage=``), trained in this order, each initialised from the previous.
CHAIN = ("autoencoder", "image", "base")


def get_config(arg=None):
  a = common.parse_arg(arg, stage=common.CHAIN, runlocal=False, vae_scale=0.0)
  if a.stage == common.CHAIN:
    return common.chain_config(get_config, CHAIN, a)
  c = common.base_config()
  c.stage = a.stage
  common.apply_variant(c, "tiny_rds" if a.runlocal else "rds")

  c.data.source = "synthetic"
  c.data.height, c.data.width = 128, 256
  c.data.cond_drop_prob = 0.1
  c.data.label_fields = ("day_night", "crowdedness")
  c.model.label_fields = ("day_night", "crowdedness")
  c.model.label_classes = (2, c.data.synthetic.max_cars + 1)
  c.sampling.guidance_scale = 2.0

  if a.vae_scale:  # latent scaling of a VAE trained by stage=autoencoder (1 / its z_std metric)
    c.model.vae_overrides = dict(c.model.vae_overrides, scaling_factor=a.vae_scale)

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
    c.model.temporal = common.video_temporal()
    c.trainable = ".*temporal.*"
    c.model_init_missing_ok = ".*temporal.*"
    c.batch_size = 640  # 40 per GPU x 16 in the paper
    c.total_steps = 73_000
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 1000
  else:
    raise ValueError(f"configs/rds.py: stage={a.stage!r} is not available yet (autoencoder, image, base)")

  if a.runlocal:
    common.runlocal(c)
    if a.stage == "autoencoder":
      c.optimizer.lr = 1e-3
      c.autoencoder.disc_start = 30
      c.autoencoder.discriminator = dict(ndf=8, n_layers=2)
    elif a.stage == "image":
      c.total_steps = 60
      c.optimizer.lr = 1e-3
    else:
      c.optimizer.lr = 5e-4
  return c
