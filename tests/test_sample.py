"""Text-to-image sampling (DDIM + CFG) against diffusers' StableDiffusionPipeline on the same random weights."""

import numpy as np
import pytest
import torch

from reference_models import write_tiny_pipeline
from videoldm_jax import convert, text_to_image

VOCAB = 49408  # the real CLIP vocabulary, so the shipped tokenizer's ids are valid


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_cfg_matches_stable_diffusion_pipeline(tmp_path, prediction_type):
  from diffusers import StableDiffusionPipeline
  modules = write_tiny_pipeline(tmp_path / "pipe", prediction_type=prediction_type, vocab_size=VOCAB)
  configs, params, schedule = convert.convert_source(str(tmp_path / "pipe"))
  convert.save_converted(str(tmp_path / "flax"), configs, params, schedule)
  converted = convert.load_converted(str(tmp_path / "flax"))

  tokenizer = text_to_image._tokenizer_for(converted.configs["text_encoder"])
  pipe = StableDiffusionPipeline(vae=modules["vae"], text_encoder=modules["text_encoder"], tokenizer=tokenizer,
                                 unet=modules["unet"], scheduler=modules["scheduler"], safety_checker=None,
                                 feature_extractor=None, requires_safety_checker=False)
  prompts = ["a night drive on a busy road", "a red car"]
  steps, guidance, size = 6, 7.5, 32
  noise = torch.randn(len(prompts), 4, size // 2, size // 2, generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    ref = pipe(prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
               latents=noise.clone(), output_type="latent").images.numpy().transpose(0, 2, 3, 1)

  import jax
  ours = text_to_image.text_to_image_latents(converted, prompts, steps=steps, guidance_scale=guidance, height=size,
                                      width=size, rng=jax.random.PRNGKey(0),
                                      latents=noise.numpy().transpose(0, 2, 3, 1))
  ours = np.asarray(ours)
  err = np.abs(ours - ref).max()
  print(f"{prediction_type}: max abs latent error vs diffusers {err:.2e} (ref max {np.abs(ref).max():.2f})")
  # fp32 on both sides, relative to the latent scale (measured: ~2e-6 relative for eps and v).
  assert err < 1e-5 * max(1.0, np.abs(ref).max()), f"max abs error {err}"
  # The decoded images exist and are valid uint8 pictures.
  images = text_to_image.decode_latents(converted, ours)
  assert images.shape == (len(prompts), size, size, 3) and images.dtype == np.uint8


def test_workdir_without_checkpoints_is_named_as_a_training_workdir(tmp_path, capsys):
  """A training workdir that has only its config.json (the run never saved) is not taken for a converted
  checkpoint; the message says what it lacks."""
  from configs import rds
  from videoldm_jax import sample
  (tmp_path / "config.json").write_text(rds.get_config("stage=image,runlocal").to_json_best_effort())
  with pytest.raises(SystemExit) as e:
    sample.main([f"--workdir={tmp_path}"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert f"{tmp_path}: a training workdir (config.json) with no checkpoints/ yet" in err, err
  assert "component checkpoints" not in err
