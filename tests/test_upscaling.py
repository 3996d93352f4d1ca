"""The x4 upscaler pipeline: a tiny random diffusers StableDiffusionUpscalePipeline folder converted with our
converter, then sampled against diffusers (same initial latents, same augmentation noise)."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch

from videoldm_jax import convert, text_to_image, upscaling
from videoldm_jax.models.clip import clip_config_from_transformers
from videoldm_jax.models.vae import VAEConfig

VOCAB = 49408  # the real CLIP vocabulary, so the shipped tokenizer's ids are valid
MAX_NOISE_LEVEL = 300  # not diffusers' default 350, so reading it from model_index.json is checked
LOW_RES = {"beta_schedule": "scaled_linear", "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 1000}
SIZE = 16  # low-res images 16x16 -> latents 16x16 -> decoded 64x64


def _tiny_modules():
  """Random-init x4-upscaler-shaped models: 7-channel U-Net with 1000 noise-level classes, f=4 VAE, OpenCLIP-like
  (gelu, "!"-padded) text encoder; DDIM v-prediction and the DDPM low-res schedule, as the real pipeline."""
  from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
  from transformers import CLIPTextConfig, CLIPTextModel
  torch.manual_seed(0)
  unet = UNet2DConditionModel(
      sample_size=SIZE, in_channels=7, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
      cross_attention_dim=32, use_linear_projection=True, only_cross_attention=[True, True, False],
      num_class_embeds=1000, norm_num_groups=8)
  vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=1,
                      down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                      latent_channels=4, norm_num_groups=8, sample_size=4 * SIZE,
                      scaling_factor=VAEConfig.sd_x4_upscaler().scaling_factor)
  with torch.no_grad():  # non-trivial norm scales/biases, so the decoder's output is not near-constant
    for p in vae.parameters():
      if p.ndim == 1:
        p.add_(0.2 * torch.randn_like(p))
  text_encoder = CLIPTextModel(CLIPTextConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
      max_position_embeddings=77, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=0))
  scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                            set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
  low_res_scheduler = DDPMScheduler(**LOW_RES)
  return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), scheduler=scheduler,
              low_res_scheduler=low_res_scheduler)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
  """(diffusers pipeline, its saved folder, our converted checkpoint loaded back)."""
  from diffusers import StableDiffusionUpscalePipeline
  root = tmp_path_factory.mktemp("x4")
  modules = _tiny_modules()
  tokenizer = text_to_image._tokenizer_for(clip_config_from_transformers(modules["text_encoder"].config))
  pipe = StableDiffusionUpscalePipeline(**modules, tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
                                        watermarker=None, max_noise_level=MAX_NOISE_LEVEL)
  pipe.set_progress_bar_config(disable=True)
  pipe.save_pretrained(root / "pipe")
  assert convert.main(["--source", str(root / "pipe"), "--output", str(root / "flax")]) == 0
  return pipe, root, convert.load_converted(str(root / "flax"))


def _nhwc(t: torch.Tensor) -> np.ndarray:
  return t.numpy().transpose(0, 2, 3, 1)


# ----------------------------------------------------------------------------------------------------------
# Conversion.

def test_metadata_records_the_low_res_schedule_and_max_noise_level(case, tmp_path, capsys):
  pipe, root, converted = case
  assert json.loads((root / "pipe" / "model_index.json").read_text())["max_noise_level"] == MAX_NOISE_LEVEL
  assert converted.low_res_schedule == LOW_RES
  assert converted.max_noise_level == MAX_NOISE_LEVEL
  assert converted.schedule["prediction_type"] == "v_prediction"  # the DDIM scheduler's, as before
  assert set(converted.configs) == {"unet", "vae", "text_encoder"}
  # The recorded schedule is the pipeline's: same ᾱ as diffusers' DDPMScheduler (float32 there, float64 here).
  ours = np.asarray(upscaling.low_res_schedule(converted).alphas_cumprod)
  np.testing.assert_allclose(ours, pipe.low_res_scheduler.alphas_cumprod.numpy(), rtol=1e-5)

  # Without max_noise_level in model_index.json: StableDiffusionUpscalePipeline's default, 350.
  src = tmp_path / "no_level"
  shutil.copytree(root / "pipe" / "low_res_scheduler", src / "low_res_scheduler")
  index = json.loads((root / "pipe" / "model_index.json").read_text())
  del index["max_noise_level"]
  (src / "model_index.json").write_text(json.dumps(index))
  assert convert.pipeline_metadata(str(src)) == {"low_res_schedule": LOW_RES, "max_noise_level": 350}
  # An ordinary SD pipeline folder records nothing more.
  assert convert.pipeline_metadata(str(tmp_path)) == {}

  # A low-res scheduler whose add_noise is not the VP forward process is refused, naming the file; nothing written.
  config = json.loads((src / "low_res_scheduler" / "scheduler_config.json").read_text())
  (src / "low_res_scheduler" / "scheduler_config.json").write_text(
      json.dumps(dict(config, _class_name="EulerDiscreteScheduler")))
  for name in ("unet", "vae", "text_encoder"):
    shutil.copytree(root / "pipe" / name, src / name)
  assert convert.main(["--source", str(src), "--output", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert "low_res_scheduler/scheduler_config.json: _class_name='EulerDiscreteScheduler'" in err, err
  assert not os.path.exists(tmp_path / "out")
  (src / "low_res_scheduler" / "scheduler_config.json").write_text(json.dumps(config))
  (src / "model_index.json").write_text(json.dumps(dict(index, max_noise_level=1000)))
  assert convert.main(["--source", str(src), "--output", str(tmp_path / "out")]) == 2
  assert "model_index.json: max_noise_level=1000 must be an integer in [0, 999]" in capsys.readouterr().err


def test_export_to_diffusers_gives_back_the_pipeline_weights(case, tmp_path):
  """``--to=diffusers`` of the converted upscaler (class embedding, 7-channel conv_in, f=4 VAE) reproduces every
  tensor of the source folder exactly."""
  from safetensors.numpy import load_file
  _, root, _ = case
  out = tmp_path / "torch"
  assert convert.main(["--source", str(root / "flax"), "--output", str(out), "--to=diffusers"]) == 0
  for name, fname in (("unet", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors"),
                      ("text_encoder", "model.safetensors")):
    original = {k.removeprefix("text_model."): v for k, v in load_file(str(root / "pipe" / name / fname)).items()
                if not k.endswith("position_ids")}
    exported = {k.removeprefix("text_model."): v for k, v in load_file(str(out / name / fname)).items()}
    assert set(exported) == set(original), (name, sorted(set(exported) ^ set(original))[:8])
    for k, v in original.items():
      np.testing.assert_array_equal(exported[k].reshape(v.shape), v, err_msg=f"{name}: {k}")


# ----------------------------------------------------------------------------------------------------------
# Sampling parity with StableDiffusionUpscalePipeline.

PROMPTS = ["a white cat", "a red car on a mountain road"]
NEGATIVE = ["blurry", ""]
STEPS, GUIDANCE, LEVEL = 3, 9.0, 100


def _inputs():
  """Low-res images in [0, 1] (the pipeline's tensor input range) and initial latents, NCHW torch."""
  gen = torch.Generator().manual_seed(1)
  images = torch.rand(len(PROMPTS), 3, SIZE, SIZE, generator=gen)
  latents = torch.randn(len(PROMPTS), 4, SIZE, SIZE, generator=gen)
  return images, latents


def _signed(images: torch.Tensor) -> torch.Tensor:
  """[0, 1] -> [-1, 1], the same op as diffusers' image processor (bit-identical inputs on both sides)."""
  return 2.0 * images - 1.0


def _pipeline_noise(seed: int, shape) -> torch.Tensor:
  """The augmentation noise the pipeline draws with ``generator=torch.Generator().manual_seed(seed)``: with the
  latents given and eta = 0, the image noise is the generator's only draw (randn_tensor of the image's shape)."""
  return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def parity(case):
  pipe, _, converted = case
  images, latents = _inputs()
  low_res = _signed(images)
  with torch.no_grad():
    ref = pipe(PROMPTS, image=images, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
               guidance_scale=GUIDANCE, noise_level=LEVEL, generator=torch.Generator().manual_seed(0),
               latents=latents.clone(), output_type="latent").images
    decoded = pipe.vae.decode(ref / pipe.vae.config.scaling_factor).sample
    ref_images = pipe.image_processor.postprocess(decoded, output_type="np")  # [b, 4h, 4w, 3] in [0, 1]
  noise = _nhwc(_pipeline_noise(0, low_res.shape))
  ours = upscaling.upscale_latents(converted, _nhwc(low_res), PROMPTS, negative_prompts=NEGATIVE,
                                   noise_level=LEVEL, steps=STEPS, guidance_scale=GUIDANCE,
                                   rng=jax.random.PRNGKey(0), latents=_nhwc(latents), noise=noise)
  return dict(ours=np.asarray(ours), ref=_nhwc(ref), ref_images=ref_images, low_res=_nhwc(low_res),
              latents=_nhwc(latents), noise=noise)


def test_latents_and_images_match_stable_diffusion_upscale_pipeline(case, parity):
  _, _, converted = case
  ours, ref = parity["ours"], parity["ref"]
  assert ours.shape == ref.shape == (len(PROMPTS), SIZE, SIZE, 4)
  err = np.abs(ours - ref).max()
  scale = max(1.0, np.abs(ref).max())
  print(f"max abs latent error vs diffusers {err:.2e} (ref max {np.abs(ref).max():.2f})")
  # fp32 on both sides, relative to the latent scale; guidance 9 amplifies the U-Net's fp32 rounding ~17x.
  # Observed 1.0e-5 absolute (3.6e-6 relative, ref max 2.84) against a bound of 2.8e-5.
  assert err < 1e-5 * scale, f"max abs latent error {err}"

  images = upscaling.decode_upscaled(converted, ours)
  assert images.shape == (len(PROMPTS), 4 * SIZE, 4 * SIZE, 3) and images.dtype == np.float32
  assert images.min() >= -1.0 and images.max() <= 1.0
  img_err = np.abs((images + 1) / 2 - parity["ref_images"]).max()
  print(f"max abs image error vs diffusers {img_err:.2e} (in [0, 1])")
  # The decoder sees latents / scaling_factor (12x the latent error); observed 4.4e-6 in [0, 1].
  assert img_err < 2e-5, f"max abs image error {img_err}"


def test_noise_augment_is_the_low_res_schedulers_add_noise(case):
  """``noise_augment`` is diffusers' ``low_res_scheduler.add_noise`` at every level; level 0 is the schedule's
  lowest noise (σ_0 = sqrt(β_0) = 0.01), so the conditioning is the clean image up to that."""
  pipe, _, converted = case
  schedule = upscaling.low_res_schedule(converted)
  low_res = _signed(_inputs()[0])
  noise = _pipeline_noise(3, low_res.shape)
  for level in (0, 20, MAX_NOISE_LEVEL):
    ref = _nhwc(pipe.low_res_scheduler.add_noise(low_res, noise, torch.tensor([level])))
    ours = np.asarray(upscaling.noise_augment(_nhwc(low_res), level, _nhwc(noise), schedule))
    err = np.abs(ours - ref).max()
    print(f"noise_augment vs add_noise at level {level}: max abs error {err:.2e}")
    # diffusers forms σ = sqrt(1 - ᾱ) from a float32 ᾱ, which cancels near level 0 (ᾱ_0 = 0.9999: ~6e-4 relative
    # error in σ_0); ours comes from float64. Observed 3.2e-6 at level 0, <= 2.4e-7 elsewhere.
    assert err < 1e-5, f"level {level}: max abs error {err}"
  clean = np.asarray(upscaling.noise_augment(_nhwc(low_res), 0, _nhwc(noise), schedule))
  assert np.abs(clean - _nhwc(low_res)).max() <= 0.0101 * np.abs(noise.numpy()).max() + 1e-4
  # Per-example levels [b] (training draws one per clip).
  both = upscaling.noise_augment(_nhwc(low_res), np.array([0, 20]), _nhwc(noise), schedule)
  np.testing.assert_allclose(np.asarray(both[0]), clean[0], atol=1e-6)


def test_noise_level_changes_the_output(case, parity):
  """At level 0 the augmentation noise barely reaches the model (the conditioning is nearly clean); a higher level
  changes the result far more."""
  _, _, converted = case
  run = _sampler_at(converted, parity)
  other_noise = np.asarray(jax.random.normal(jax.random.PRNGKey(5), parity["noise"].shape))
  at0 = run(0, parity["noise"])
  at0_other_noise = run(0, other_noise)
  at_level = run(LEVEL, parity["noise"])
  noise_effect_at0 = np.abs(at0 - at0_other_noise).max()
  level_effect = np.abs(at_level - at0).max()
  print(f"level 0: noise changes latents by {noise_effect_at0:.2e}; level {LEVEL} vs 0: {level_effect:.2e}")
  assert level_effect > 1e-2
  assert noise_effect_at0 < 0.2 * level_effect


def _sampler_at(converted, parity):
  """``run(level, noise)``: the parity case's sampling at another noise level / augmentation noise."""

  def run(level, noise):
    return np.asarray(upscaling.upscale_latents(
        converted, parity["low_res"], PROMPTS, negative_prompts=NEGATIVE, noise_level=level, steps=STEPS,
        guidance_scale=GUIDANCE, rng=jax.random.PRNGKey(0), latents=parity["latents"], noise=noise))
  return run


# ----------------------------------------------------------------------------------------------------------
# Refusals.

@pytest.mark.parametrize("level", [-1, MAX_NOISE_LEVEL + 1, 2.5])
def test_noise_level_outside_the_range_is_refused(case, level):
  _, _, converted = case
  low_res = np.zeros((1, SIZE, SIZE, 3), np.float32)
  with pytest.raises(ValueError, match=rf"noise_level={level} must be an integer in \[0, max_noise_level=300\]"):
    upscaling.upscale_latents(converted, low_res, ["x"], noise_level=level, steps=1, rng=jax.random.PRNGKey(0))


def test_bad_inputs_are_refused_naming_them(case):
  _, _, converted = case
  rng = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="low_res size 18x16 is not a multiple of 4"):
    upscaling.upscale_latents(converted, np.zeros((1, 18, 16, 3), np.float32), ["x"], rng=rng)
  with pytest.raises(ValueError, match="low_res holds 1 images but 2 prompts"):
    upscaling.upscale_latents(converted, np.zeros((1, SIZE, SIZE, 3), np.float32), ["x", "y"], rng=rng)
  plain = dataclasses.replace(converted, meta={k: v for k, v in converted.meta.items() if k != "low_res_schedule"})
  with pytest.raises(ValueError, match="config.json has no 'low_res_schedule'"):
    upscaling.upscale_latents(plain, np.zeros((1, SIZE, SIZE, 3), np.float32), ["x"], rng=rng)
