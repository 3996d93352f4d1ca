"""Stable Video Diffusion weights and inputs: the CLIP image encoder vs ``transformers.CLIPVisionModelWithProjection``,
the image-encoder preprocessing vs diffusers' ``_resize_with_antialiasing`` + CLIP normalisation, and a tiny SVD
pipeline folder through ``videoldm_jax.convert`` and back.

Tolerances (fp32 both sides): ``image_embeds`` max-abs <= 1e-5 (values ~1); preprocessed pixels max-abs <= 1e-5
(values up to ~2.2; observed ~2e-6: the blur / bicubic taps are computed as ATen does, in float32, leaving only
summation-order rounding).
"""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing
from PIL import Image

import reference_models
from videoldm_jax import convert
from videoldm_jax.conversion.clip_vision import (POSITION_IDS_KEY, clip_vision_to_transformers, clip_vision_torch_key,
                                                 convert_clip_vision)
from videoldm_jax.conversion.core import ConversionError, DictSource, flatten_paths
from videoldm_jax.conversion.svd import convert_svd_unet, svd_config_from_diffusers
from videoldm_jax.conversion.vae import convert_vae
from videoldm_jax.models import clip_vision
from videoldm_jax.models.vae import vae_config_from_diffusers

TOL = 1e-5


def _config(model):
  return clip_vision.clip_vision_config_from_transformers(model.config.to_dict())


def _state(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------
# Image encoder.

def test_image_encoder_matches_transformers_and_exports_strictly(tiny_svd_pipeline):
  model = tiny_svd_pipeline.image_encoder
  config = _config(model)
  assert config == clip_vision.CLIPVisionConfig(image_size=224, patch_size=14, hidden_size=32, intermediate_size=37,
                                                num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu",
                                                projection_dim=32)
  params = convert_clip_vision(DictSource(model.state_dict()), config)
  pixels = np.random.default_rng(0).standard_normal((2, 224, 224, 3)).astype(np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(pixels).permute(0, 3, 1, 2)).image_embeds.numpy()
  ours = np.asarray(clip_vision.image_embeds_batch(jax.device_put(params), pixels, config=config))
  assert ours.shape == ref.shape == (2, 32)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)

  fresh = type(model)(model.config)
  fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in clip_vision_to_transformers(params).items()},
                        strict=True)
  for k, v in _state(model).items():
    np.testing.assert_array_equal(fresh.state_dict()[k].numpy(), v, err_msg=k)


def test_image_encoder_conversion_is_strict(tiny_svd_pipeline):
  model = tiny_svd_pipeline.image_encoder
  config, state = _config(model), _state(model)
  with_ids = dict(state, **{POSITION_IDS_KEY: np.arange(config.num_positions)[None]})
  np.testing.assert_array_equal(convert_clip_vision(with_ids, config)["visual_projection"]["kernel"],
                                state["visual_projection.weight"].T)
  with pytest.raises(ConversionError, match=r"unexpected keys: vision_model\.extra"):
    convert_clip_vision(dict(state, **{"vision_model.extra": np.zeros(1)}), config)
  with pytest.raises(ConversionError, match=r"missing keys: visual_projection\.weight"):
    convert_clip_vision({k: v for k, v in state.items() if k != "visual_projection.weight"}, config)
  with pytest.raises(ConversionError, match="shape mismatches"):
    convert_clip_vision(state, dataclasses.replace(config, projection_dim=16))
  assert clip_vision_torch_key(("encoder", "layers_1", "mlp", "fc2", "kernel")) == \
      "vision_model.encoder.layers.1.mlp.fc2.weight"
  quick = clip_vision.clip_vision_config_from_transformers({**model.config.to_dict(), "hidden_act": "quick_gelu"})
  assert quick.hidden_act == "quick_gelu"


# ----------------------------------------------------------------------------------------------------------
# Preprocessing.

def _diffusers_preprocess(images, feature_extractor):
  """``_encode_image``'s arithmetic on frames in [-1, 1]: antialiased resize, to [0, 1], processor normalisation."""
  x = _resize_with_antialiasing(torch.from_numpy(images).permute(0, 3, 1, 2), (224, 224))
  x = (x + 1.0) / 2.0
  x = feature_extractor(images=x, do_normalize=True, do_center_crop=False, do_resize=False, do_rescale=False,
                        return_tensors="pt").pixel_values
  return x.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("height,width", [(64, 96), (576, 1024), (320, 512)])
def test_image_encoder_input_matches_diffusers(tiny_svd_pipeline, height, width):
  images = np.random.default_rng(height).uniform(-1, 1, (2, height, width, 3)).astype(np.float32)
  ref = _diffusers_preprocess(images, tiny_svd_pipeline.feature_extractor)
  ours = np.asarray(jax.jit(clip_vision.svd_image_encoder_input)(images))
  assert ours.shape == ref.shape == (2, 224, 224, 3)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)


def test_bicubic_taps_clamp_at_the_border():
  index, weights = clip_vision._cubic_taps(5, 9)  # pylint: disable=protected-access
  np.testing.assert_array_equal(index[0], [0, 0, 1, 2])  # tap -1 repeats the first pixel
  np.testing.assert_array_equal(index[-1], [3, 4, 4, 4])
  np.testing.assert_allclose(weights.sum(-1), 1, atol=1e-6)
  np.testing.assert_allclose(weights[0], [0, 1, 0, 0], atol=1e-7)  # align_corners: the corners are exact
  np.testing.assert_allclose(weights[1], [-0.09375, 0.59375, 0.59375, -0.09375], atol=1e-7)  # A = -0.75 at t = 1/2


def test_encode_image_end_to_end(tiny_svd_pipeline):
  """diffusers' whole ``_encode_image`` on a PIL frame vs preprocessing + tower here: context ``[b, 1, proj]``."""
  pipe = tiny_svd_pipeline
  frame = np.random.default_rng(1).integers(0, 256, (320, 512, 3), dtype=np.uint8)
  with torch.no_grad():
    ref = pipe._encode_image(Image.fromarray(frame), "cpu", 1, False).numpy()  # pylint: disable=protected-access
  config = _config(pipe.image_encoder)
  params = jax.device_put(convert_clip_vision(DictSource(pipe.image_encoder.state_dict()), config))
  images = (frame[None].astype(np.float32) / 255.0) * 2.0 - 1.0
  ours = np.asarray(clip_vision.image_embeds_batch(params, clip_vision.svd_image_encoder_input(images),
                                                   config=config))[:, None]
  assert ours.shape == ref.shape == (1, 1, 32)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)


# ----------------------------------------------------------------------------------------------------------
# Pipeline folder.

def _assert_trees_equal(a, b, what):
  a, b = dict(flatten_paths(a)), dict(flatten_paths(b))
  assert set(a) == set(b), what
  for path, value in a.items():
    np.testing.assert_array_equal(np.asarray(b[path]), np.asarray(value), err_msg=f"{what}: {'/'.join(path)}")


def test_svd_pipeline_folder_round_trip(tiny_svd_pipeline, tiny_svd_pipeline_dir, tmp_path):
  pipe, src = tiny_svd_pipeline, str(tiny_svd_pipeline_dir)
  metadata = convert.pipeline_metadata(src)
  configs, params, schedule = convert.convert_source(src)
  assert set(configs) == {"unet", "vae", "image_encoder"}
  unet_cfg = svd_config_from_diffusers(dict(pipe.unet.config))
  vae_cfg = vae_config_from_diffusers(dict(pipe.vae.config, _class_name="AutoencoderKLTemporalDecoder"))
  assert configs == {"unet": unet_cfg, "vae": vae_cfg, "image_encoder": _config(pipe.image_encoder)}
  assert unet_cfg.temporal is not None and vae_cfg.temporal_decoder
  expected = {"unet": convert_svd_unet(DictSource(pipe.unet.state_dict()), unet_cfg),
              "vae": convert_vae(DictSource(pipe.vae.state_dict()), vae_cfg),
              "image_encoder": convert_clip_vision(DictSource(pipe.image_encoder.state_dict()),
                                                   configs["image_encoder"])}
  for name, tree in expected.items():
    _assert_trees_equal(tree, params[name], name)
  assert schedule["prediction_type"] == "v_prediction"

  with open(os.path.join(src, "scheduler", "scheduler_config.json")) as f:
    scheduler_json = json.load(f)
  assert {k: scheduler_json[k] for k in reference_models.SVD_SCHEDULER_CONFIG} == reference_models.SVD_SCHEDULER_CONFIG
  preprocess = {"image_mean": list(clip_vision.CLIP_MEAN), "image_std": list(clip_vision.CLIP_STD), "size": [224, 224]}
  assert metadata == {"scheduler_config": scheduler_json, "image_encoder_preprocess": preprocess}

  out = tmp_path / "converted"
  convert.save_converted(str(out), configs, params, schedule, source=src, metadata=metadata)
  loaded = convert.load_converted(str(out))
  assert loaded.configs == configs  # UNetConfig with its TemporalConfig, VAEConfig, CLIPVisionConfig
  for name, tree in params.items():
    _assert_trees_equal(tree, loaded.params[name], name)
  assert loaded.scheduler_config == scheduler_json
  assert loaded.image_encoder_preprocess == preprocess
  assert loaded.low_res_schedule is None

  written = convert.export_diffusers(str(out), str(tmp_path / "torch"))
  assert sorted(os.path.relpath(p, tmp_path / "torch") for p in written) == [
      "image_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
      "vae/diffusion_pytorch_model.safetensors"]
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  for name in ("unet", "image_encoder"):
    exported = load_file(next(p for p in written if f"/{name}/" in p))
    state = _state(getattr(pipe, name))
    assert set(exported) == set(state), name
    for k, v in state.items():
      np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_svd_folder_without_image_encoder_is_refused(tiny_svd_pipeline_dir, tmp_path):
  src = tmp_path / "svd"
  shutil.copytree(tiny_svd_pipeline_dir, src, ignore=lambda d, names: ["image_encoder"] if d == str(
      tiny_svd_pipeline_dir) else [])
  assert not (src / "image_encoder").exists() and (src / "unet").exists()
  with pytest.raises(ConversionError, match="lacks image_encoder, which its model_index.json lists"):
    convert.convert_source(str(src))
  with pytest.raises(ConversionError, match="holds no image_encoder"):
    convert.convert_source(str(src), components=["image_encoder"])


def _write_json(path, data):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(data))


def test_image_encoder_preprocess_and_scheduler_metadata(tmp_path):
  """Only the JSON files matter: the processor's mean / std / crop are read, CLIP's fill the gaps, and only an Euler
  scheduler is recorded."""
  index = {"_class_name": "StableVideoDiffusionPipeline", "image_encoder": ["transformers",
                                                                          "CLIPVisionModelWithProjection"]}
  _write_json(tmp_path / "model_index.json", index)
  _write_json(tmp_path / "scheduler" / "scheduler_config.json", {"_class_name": "DDIMScheduler"})
  assert convert.pipeline_metadata(str(tmp_path)) == {
      "image_encoder_preprocess": {"image_mean": list(clip_vision.CLIP_MEAN), "image_std": list(clip_vision.CLIP_STD),
                                   "size": [224, 224]}}
  _write_json(tmp_path / "feature_extractor" / "preprocessor_config.json",
              {"image_mean": [0.5, 0.5, 0.5], "crop_size": {"height": 256, "width": 192}})
  meta = convert.pipeline_metadata(str(tmp_path))
  assert meta["image_encoder_preprocess"] == {"image_mean": [0.5, 0.5, 0.5], "image_std": list(clip_vision.CLIP_STD),
                                              "size": [256, 192]}
  _write_json(tmp_path / "feature_extractor" / "preprocessor_config.json", {"image_std": [0.5, 0.0, 0.5]})
  with pytest.raises(ConversionError, match="preprocessor_config.json: image_std"):
    convert.pipeline_metadata(str(tmp_path))
  _write_json(tmp_path / "model_index.json", {"_class_name": "StableDiffusionPipeline"})
  shutil.rmtree(tmp_path / "feature_extractor")
  assert convert.pipeline_metadata(str(tmp_path)) == {}  # an SD folder records nothing new


def test_svd_image_encoder_preset_matches_transformers_shapes():
  """``openclip_vit_h14()`` (SVD's image_encoder) has exactly the param shapes of the transformers model it loads."""
  from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection  # pylint: disable=g-import-not-at-top
  with torch.device("meta"):
    ref = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
        patch_size=14, projection_dim=1024, hidden_act="gelu"))
  ours = {clip_vision_torch_key(p): tuple(leaf.shape)
          for p, leaf in flatten_paths(clip_vision.abstract_params(clip_vision.openclip_vit_h14()))}
  ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k != POSITION_IDS_KEY}
  assert set(ours) == set(ref_shapes)
  for k, shape in ref_shapes.items():
    assert int(np.prod(ours[k])) == int(np.prod(shape)), k
  assert sum(int(np.prod(s)) for s in ours.values()) == 632_076_800
