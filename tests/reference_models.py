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
