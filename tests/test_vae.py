"""KL autoencoder: parity with diffusers ``AutoencoderKL``, CompVis key layout, strict conversion, export."""

import dataclasses
import functools
import re
import sys
import time

# torchvision in this environment does not match torch; transformers (imported by diffusers) only probes for it
# via importlib.util.find_spec, which reports a ``None`` entry in sys.modules as "not installed".
sys.modules.setdefault("torchvision", None)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL as TorchAutoencoderKL  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: E402

from videoldm_jax.conversion.core import ConversionError, DictSource, PrefixSource, flatten_paths  # noqa: E402
from videoldm_jax.conversion.vae import (compvis_vae_source, convert_compvis_vae, convert_vae,  # noqa: E402
                                         vae_config_from_compvis, vae_to_diffusers)
from videoldm_jax.models.vae import (AutoencoderKL, DiagonalGaussian, VAEConfig, abstract_params,  # noqa: E402
                                     vae_config_from_diffusers)

# Max-abs error allowed, relative to max(1, std of the reference output). fp32 on both sides; observed <= 8e-6.
TOL = 1e-4

TINY_F8 = VAEConfig.tiny()
TINY_F4 = dataclasses.replace(VAEConfig.tiny(), block_out_channels=(16, 32, 32), layers_per_block=2,
                              scaling_factor=VAEConfig.sd_x4_upscaler().scaling_factor)


def torch_vae(config: VAEConfig, seed: int = 0) -> TorchAutoencoderKL:
  """Random-init diffusers model; 1-D params (norm scales/biases, conv biases) perturbed so none is trivial."""
  torch.manual_seed(seed)
  n = len(config.block_out_channels)
  model = TorchAutoencoderKL(
      in_channels=config.in_channels, out_channels=config.out_channels,
      down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
      block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
      latent_channels=config.latent_channels, norm_num_groups=config.norm_num_groups,
      scaling_factor=config.scaling_factor).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(0.2 * torch.randn_like(p))
  return model


def state_dict_numpy(model) -> dict:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / max(1.0, ref.std()))


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def check_parity(config: VAEConfig, h: int, w: int, batch: int = 2):
  """Encode moments and decode outputs against diffusers; returns (encode error, decode error)."""
  ref = torch_vae(config)
  params = {"params": convert_vae(DictSource(ref.state_dict()), config)}
  model = AutoencoderKL(config)
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (batch, h, w, config.in_channels)).astype(np.float32)
  f = config.downsample_factor
  z = rng.standard_normal((batch, h // f, w // f, config.latent_channels)).astype(np.float32)
  encode = jax.jit(functools.partial(model.apply, method="encode"))
  decode = jax.jit(functools.partial(model.apply, method="decode"))
  moments, image = encode(params, x), decode(params, z)
  assert moments.shape == (batch, h // f, w // f, 2 * config.latent_channels)
  assert image.shape == (batch, h, w, config.out_channels)
  with torch.no_grad():
    ref_moments = nhwc(ref.encode(nchw(x)).latent_dist.parameters)
    ref_image = nhwc(ref.decode(nchw(z)).sample)
  return rel_err(moments, ref_moments), rel_err(image, ref_image)


# ----------------------------------------------------------------------------------------------------------
# Config.

def test_config_json_round_trip_and_presets():
  for cfg in (VAEConfig.sd(), VAEConfig.sd_x4_upscaler(), VAEConfig.tiny(), TINY_F4):
    back = VAEConfig.from_json(cfg.to_json())
    assert back == cfg and isinstance(back.block_out_channels, tuple)
  assert VAEConfig.sd().downsample_factor == 8 and VAEConfig.sd_x4_upscaler().downsample_factor == 4
  assert VAEConfig.tiny().downsample_factor == 8 and TINY_F4.downsample_factor == 4
  assert VAEConfig.sd_x4_upscaler().scaling_factor == 0.08333 and VAEConfig.sd().scaling_factor == 0.18215
  with pytest.raises(ValueError, match="norm_num_groups"):
    VAEConfig(block_out_channels=(48, 64))


def test_config_from_diffusers():
  for cfg in (VAEConfig.sd(), VAEConfig.sd_x4_upscaler(), TINY_F4):
    with torch.device("meta"):
      ref = torch_vae(cfg)
    assert vae_config_from_diffusers(dict(ref.config)) == cfg
  base = dict(torch_vae(TINY_F4).config)
  for key, value in [("act_fn", "relu"), ("use_quant_conv", False), ("shift_factor", 0.1),
                     ("mid_block_add_attention", False), ("down_block_types", ["DownBlock2D"] * 3),
                     ("up_block_types", ["UpDecoderBlock2D"] * 2), ("norm_type", "spatial")]:
    with pytest.raises(ValueError, match=key):
      vae_config_from_diffusers({**base, key: value})


def test_full_size_param_counts():
  """The full SD (83,653,863) and x4-upscaler VAEs match diffusers' parameter counts (shapes only)."""
  def count(tree):  # Partitioned boxes are pytrees; their leaves are the ShapeDtypeStructs
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))
  for cfg, expected in ((VAEConfig.sd(), 83_653_863), (VAEConfig.sd_x4_upscaler(), None)):
    with torch.device("meta"):
      ref = torch_vae(cfg)
    ref_count = sum(p.numel() for p in ref.parameters())
    ours = count(abstract_params(cfg))
    assert ours == ref_count
    if expected is not None:
      assert ours == expected


# ----------------------------------------------------------------------------------------------------------
# Numerical parity.

@pytest.mark.parametrize("config,h,w", [(TINY_F8, 32, 48), (TINY_F4, 24, 20)], ids=["tiny_f8", "tiny_f4"])
def test_parity_tiny(config, h, w):
  enc_err, dec_err = check_parity(config, h, w)
  print(f"f={config.downsample_factor}: encode max err {enc_err:.2e}, decode max err {dec_err:.2e}")
  assert enc_err < TOL and dec_err < TOL


@pytest.mark.slow
def test_parity_full_sd_64px():
  start = time.time()
  enc_err, dec_err = check_parity(VAEConfig.sd(), 64, 64, batch=1)
  print(f"full SD VAE 64x64: encode max err {enc_err:.2e}, decode max err {dec_err:.2e} ({time.time() - start:.1f}s)")
  assert enc_err < TOL and dec_err < TOL


def test_call_reconstructs_from_posterior_mode():
  """__call__ = decode(mode of encode) like diffusers' forward(sample_posterior=False); with an rng it samples."""
  config = TINY_F8
  ref = torch_vae(config)
  params = {"params": convert_vae(DictSource(ref.state_dict()), config)}
  model = AutoencoderKL(config)
  x = np.random.default_rng(1).uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)
  recon, moments = jax.jit(model.apply)(params, x)
  with torch.no_grad():
    ref_recon = nhwc(ref(nchw(x)).sample)
  assert rel_err(recon, ref_recon) < TOL and moments.shape == (2, 2, 3, 8)
  sampled = jax.eval_shape(model.apply, params, x, jax.random.key(3))  # shapes only: sampling is tested below
  assert sampled[0].shape == recon.shape


def test_diagonal_gaussian_matches_diffusers():
  rng = np.random.default_rng(2)
  moments = rng.standard_normal((2, 3, 5, 8)).astype(np.float32)
  moments[..., 4:] *= 3
  moments[0, 0, 0, 4], moments[0, 0, 1, 4] = -50.0, 40.0  # outside the logvar clip range
  other = rng.standard_normal((2, 3, 5, 8)).astype(np.float32)
  ours, ours_other = DiagonalGaussian(jnp.asarray(moments)), DiagonalGaussian(jnp.asarray(other))
  ref, ref_other = DiagonalGaussianDistribution(nchw(moments)), DiagonalGaussianDistribution(nchw(other))
  np.testing.assert_allclose(ours.mean, nhwc(ref.mean), rtol=1e-6)
  np.testing.assert_allclose(ours.mode(), nhwc(ref.mode()), rtol=1e-6)
  np.testing.assert_allclose(ours.logvar, nhwc(ref.logvar), rtol=1e-6)
  np.testing.assert_allclose(ours.std, nhwc(ref.std), rtol=1e-5)
  np.testing.assert_allclose(ours.kl(), ref.kl().numpy(), rtol=1e-4)
  np.testing.assert_allclose(ours.kl(ours_other), ref.kl(ref_other).numpy(), rtol=1e-4)
  sample = np.asarray(ours.sample(jax.random.key(0)))
  np.testing.assert_allclose(ours.nll(sample), ref.nll(nchw(sample)).numpy(), rtol=1e-4)
  # The sample is mean + std * N(0,1): standardised residuals have unit scale, and a clipped tiny
  # variance pins the sample to the mean.
  eps = (sample - np.asarray(ours.mean)) / np.asarray(ours.std)
  assert 0.7 < eps.std() < 1.3 and abs(sample[0, 0, 0, 0] - moments[0, 0, 0, 0]) < 1e-5


# ----------------------------------------------------------------------------------------------------------
# CompVis layout, strictness, export.

def diffusers_to_compvis(state: dict, num_levels: int) -> dict:
  """Test-side renaming to the CompVis ``first_stage_model.*`` layout (validated against diffusers' converter)."""
  out = {}
  for key, value in state.items():
    k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
    k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
    k = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", k)
    k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.block.", k)
    k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
               lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.", k)
    if "mid_block.attentions.0." in k:
      k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
      for new, old in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
        k = k.replace(f"attn_1.{new}.", f"attn_1.{old}.")
      if value.ndim == 2:
        value = value[:, :, None, None]  # CompVis uses 1x1 convs
    out["first_stage_model." + k] = value
  return out


@pytest.mark.parametrize("config", [TINY_F8, TINY_F4], ids=["tiny_f8", "tiny_f4"])
def test_compvis_layout_gives_identical_params(config):
  ref = torch_vae(config)
  state = state_dict_numpy(ref)
  compvis = diffusers_to_compvis(state, len(config.block_out_channels))
  # The test's CompVis layout is the one diffusers' own single-file converter reads.
  back = convert_ldm_vae_checkpoint(compvis, dict(ref.config))
  assert set(back) == set(state)
  for k in state:
    np.testing.assert_array_equal(np.asarray(back[k]).reshape(state[k].shape), state[k])

  source = DictSource(compvis)
  assert vae_config_from_compvis(source, scaling_factor=config.scaling_factor,
                                 norm_num_groups=config.norm_num_groups) == config
  expected = dict(flatten_paths(convert_vae(DictSource(state), config)))
  got = dict(flatten_paths(convert_vae(compvis_vae_source(source), config)))
  assert got.keys() == expected.keys()
  for path in expected:
    np.testing.assert_array_equal(got[path], expected[path], err_msg="/".join(path))
  # As the single-file converter calls it: prefix stripped first, config read from the renamed view.
  view = compvis_vae_source(PrefixSource(source, "first_stage_model."))
  assert vae_config_from_compvis(view, norm_num_groups=config.norm_num_groups) == config
  got = dict(flatten_paths(convert_vae(view, config)))
  assert all(np.array_equal(got[p], expected[p]) for p in expected)
  got = dict(flatten_paths(convert_compvis_vae(source, config)))
  assert all(np.array_equal(got[p], expected[p]) for p in expected)


def test_compvis_config_inference_defaults_and_errors():
  x4 = DictSource(diffusers_to_compvis(state_dict_numpy(torch_vae(TINY_F4)), 3))
  assert vae_config_from_compvis(x4, norm_num_groups=8).scaling_factor == 0.08333
  sd = DictSource(diffusers_to_compvis(state_dict_numpy(torch_vae(TINY_F8)), 4))
  assert vae_config_from_compvis(sd, norm_num_groups=8).scaling_factor == 0.18215
  with_attn = dict(sd._tensors, **{"first_stage_model.encoder.down.1.attn.0.q.weight": np.zeros((32, 32, 1, 1))})
  with pytest.raises(ValueError, match=r"encoder\.down\.1\.attn\.0\.q\.weight"):
    vae_config_from_compvis(DictSource(with_attn), norm_num_groups=8)
  with pytest.raises(ValueError, match="not a CompVis autoencoder"):
    vae_config_from_compvis(DictSource({"model.diffusion_model.x": np.zeros(1)}))


def test_strict_conversion_names_the_key():
  config = TINY_F8
  state = state_dict_numpy(torch_vae(config))
  missing = dict(state)
  del missing["decoder.up_blocks.1.resnets.1.conv1.weight"]
  with pytest.raises(ConversionError, match=r"missing keys: decoder\.up_blocks\.1\.resnets\.1\.conv1\.weight"):
    convert_vae(DictSource(missing), config)
  extra = dict(state, **{"encoder.mid_block.attentions.0.extra.weight": np.zeros(3)})
  with pytest.raises(ConversionError, match=r"unexpected keys: encoder\.mid_block\.attentions\.0\.extra\.weight"):
    convert_vae(DictSource(extra), config)
  bad = dict(state, **{"post_quant_conv.weight": np.zeros((4, 4, 3, 3), np.float32)})
  with pytest.raises(ConversionError, match=r"shape mismatches: post_quant_conv\.weight"):
    convert_vae(DictSource(bad), config)
  compvis = diffusers_to_compvis(state, 4)
  compvis["first_stage_model.loss.logvar"] = np.zeros(())
  with pytest.raises(ConversionError, match=r"unexpected keys: loss\.logvar"):
    convert_vae(compvis_vae_source(DictSource(compvis)), config)


def test_export_round_trip_into_diffusers():
  config = TINY_F4
  ref = torch_vae(config)
  params = convert_vae(DictSource(ref.state_dict()), config)
  exported = vae_to_diffusers({"params": params})
  fresh = torch_vae(config, seed=1)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  for k, v in ref.state_dict().items():
    torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=0, msg=k)
