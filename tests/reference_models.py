"""Tiny random-init PyTorch reference models (diffusers / transformers), built offline from configs."""

import torch


def tiny_unet(cross_attention_dim=32):
  from diffusers import UNet2DConditionModel
  return UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=8)


def tiny_vae():
  from diffusers import AutoencoderKL
  return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                       latent_channels=4, norm_num_groups=8, sample_size=16)


def tiny_clip(vocab_size=99, hidden_size=32):
  from transformers import CLIPTextConfig, CLIPTextModel
  return CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=37,
                                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                      hidden_act="quick_gelu", eos_token_id=vocab_size - 1,
                                      bos_token_id=vocab_size - 2, pad_token_id=vocab_size - 1))


def tiny_scheduler(prediction_type="epsilon"):
  from diffusers import DDIMScheduler
  return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                       set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def write_tiny_pipeline(root, prediction_type="epsilon", vocab_size=99, seed=0):
  """Writes unet/ vae/ text_encoder/ scheduler/ of a tiny random SD pipeline under ``root``; returns the modules."""
  torch.manual_seed(seed)
  modules = {"unet": tiny_unet(), "vae": tiny_vae(), "text_encoder": tiny_clip(vocab_size),
             "scheduler": tiny_scheduler(prediction_type)}
  for name, module in modules.items():
    module.save_pretrained(root / name)
  return modules


# The smallest diffusers SVD U-Net (two levels, 8 input channels = noisy + conditioning latents, 3 added time ids).
TINY_SVD_UNET = dict(in_channels=8, out_channels=4, block_out_channels=(32, 64),
                     down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
                     up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
                     num_attention_heads=(2, 4), cross_attention_dim=32, layers_per_block=1, addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=24)
# SVD's released scheduler/scheduler_config.json (EDM sigmas through diffusers' Euler scheduler, v-prediction).
SVD_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "set_alpha_to_one": False, "sigma_max": 700.0, "sigma_min": 0.002,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "timestep_type": "continuous",
    "trained_betas": None, "use_karras_sigmas": True}


def tiny_clip_vision(projection_dim=32, hidden_act="gelu"):
  """A CLIPVisionModelWithProjection at SVD's input size (224 px, patch 14: 257 tokens) but 32 wide, 2 deep; its 1-D
  params (norms, biases, class token) are perturbed so a swapped scale / bias cannot go unnoticed."""
  from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
  model = CLIPVisionModelWithProjection(CLIPVisionConfig(
      hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=224, patch_size=14,
      projection_dim=projection_dim, hidden_act=hidden_act)).eval()
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 1:
        p.add_(0.3 * torch.randn_like(p))
  return model


def tiny_svd_pipeline(seed=0):
  """A tiny random ``StableVideoDiffusionPipeline`` (seeded): U-Net :data:`TINY_SVD_UNET` (context width = the image
  encoder's projection, 32), temporal-decoder VAE (32/64 channels, 4 latent channels), :func:`tiny_clip_vision`,
  SVD's Euler scheduler config and a default ``CLIPImageProcessor`` (CLIP mean / std, 224 crop)."""
  from diffusers import (AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, StableVideoDiffusionPipeline,
                         UNetSpatioTemporalConditionModel)
  from transformers import CLIPImageProcessor
  torch.manual_seed(seed)
  unet = UNetSpatioTemporalConditionModel(sample_size=8, **TINY_SVD_UNET).eval()
  vae = AutoencoderKLTemporalDecoder(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                     block_out_channels=(32, 64), layers_per_block=2, latent_channels=4,
                                     sample_size=32).eval()
  image_encoder = tiny_clip_vision(projection_dim=TINY_SVD_UNET["cross_attention_dim"])
  scheduler = EulerDiscreteScheduler.from_config(SVD_SCHEDULER_CONFIG)
  return StableVideoDiffusionPipeline(vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler,
                                      feature_extractor=CLIPImageProcessor())
