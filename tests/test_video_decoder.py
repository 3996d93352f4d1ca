"""Video VAE decoder: parity with diffusers ``AutoencoderKLTemporalDecoder`` (SVD's VAE), sgm single-file names,
export, image identity, temporal mixing, bounded receptive field and exact windowed decoding."""

import dataclasses
import functools
import sys

sys.modules.setdefault("torchvision", None)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKLTemporalDecoder  # noqa: E402
from flax import traverse_util  # noqa: E402

from videoldm_jax.conversion.core import ConversionError, DictSource, flatten_paths  # noqa: E402
from videoldm_jax.conversion.vae import compvis_vae_source, convert_vae, vae_config_from_compvis  # noqa: E402
from videoldm_jax.conversion.vae import vae_to_diffusers  # noqa: E402
from videoldm_jax.models import vae as vae_lib  # noqa: E402
from videoldm_jax.models.vae import AutoencoderKL, VAEConfig, abstract_params, vae_config_from_diffusers  # noqa: E402

# Max-abs error relative to max(1, std of the reference), fp32 on both sides (observed ~1e-6).
TOL = 1e-4

# The smallest diffusers temporal VAE: its norms hard-code 32 groups, and only layers_per_block=2 is the SD
# mid-block structure.
TINY_DIFFUSERS = dict(_class_name="AutoencoderKLTemporalDecoder", in_channels=3, out_channels=3,
                      down_block_types=["DownEncoderBlock2D"] * 2, block_out_channels=[32, 64], layers_per_block=2,
                      latent_channels=4, sample_size=32, scaling_factor=0.18215, force_upcast=True)
# Our own video decoder at test size (per-frame norm: bounded receptive field).
TINY_VIDEO = dataclasses.replace(VAEConfig.tiny(), temporal_decoder=True)


@pytest.fixture(scope="module")
def reference():
  """Random diffusers temporal VAE (1-D params and mix factors perturbed so none is trivial) + our params."""
  torch.manual_seed(0)
  kwargs = {k: v for k, v in TINY_DIFFUSERS.items() if not k.startswith("_")}
  model = AutoencoderKLTemporalDecoder(**kwargs).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(0.3 * torch.randn_like(p))
  config = vae_config_from_diffusers(TINY_DIFFUSERS)
  params = convert_vae(DictSource(model.state_dict()), config)
  return model, config, params


def _unboxed(tree):
  return jax.tree.map(lambda a: getattr(a, "value", a), tree, is_leaf=lambda a: hasattr(a, "value"))


def _decode_torch(model, z, num_frames):
  with torch.no_grad():
    out = model.decode(torch.from_numpy(z.transpose(0, 3, 1, 2).copy()), num_frames=num_frames).sample
  return out.numpy().transpose(0, 2, 3, 1)


def _rel(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / max(1.0, ref.std()))


@pytest.mark.parametrize("num_frames", [3, 5])
def test_parity_with_diffusers_temporal_decoder(reference, num_frames):
  model, config, params = reference
  assert config.temporal_decoder and config.temporal_norm == "clip" and not config.use_post_quant_conv
  rng = np.random.default_rng(num_frames)
  z = rng.standard_normal((2 * num_frames, 4, 6, 4)).astype(np.float32)  # 2 clips, frame-major
  ours = AutoencoderKL(config).apply({"params": params}, jnp.asarray(z), num_frames=num_frames, method="decode")
  assert _rel(ours, _decode_torch(model, z, num_frames)) < TOL
  x = rng.uniform(-1, 1, (2, 8, 12, 3)).astype(np.float32)
  moments = AutoencoderKL(config).apply({"params": params}, jnp.asarray(x), method="encode")
  with torch.no_grad():
    ref = model.encode(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).latent_dist.parameters
  assert _rel(moments, ref.numpy().transpose(0, 2, 3, 1)) < TOL


def test_export_loads_strictly_into_diffusers(reference):
  model, config, params = reference
  exported = vae_to_diffusers(params)
  fresh = AutoencoderKLTemporalDecoder(**{k: v for k, v in vae_lib.vae_config_to_diffusers(config).items()
                                          if not k.startswith("_")})
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  for k, v in model.state_dict().items():
    np.testing.assert_array_equal(fresh.state_dict()[k].numpy(), v.numpy(), err_msg=k)


def _sgm_names(state_dict):
  """diffusers AutoencoderKLTemporalDecoder names -> sgm AutoencodingEngine (VideoDecoder) names, no quant_conv."""
  import re  # pylint: disable=g-import-not-at-top
  time_stack = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3"}
  attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
  levels = 2
  out = {}
  for key, value in state_dict.items():
    new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    new = new.replace("decoder.time_conv_out.", "decoder.conv_out.time_mix_conv.")
    new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
    new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
    new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.",
                 lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", new)
    new = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                 lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", new)
    new = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
    m = re.match(r"(.*)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", new)
    if m:
      new = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
      if value.ndim == 2:
        value = value[:, :, None, None]
    new = new.replace(".spatial_res_block.", ".").replace(".time_mixer.mix_factor", ".mix_factor")
    new = re.sub(r"\.temporal_res_block\.(norm1|conv1|norm2|conv2)\.",
                 lambda m: f".time_stack.{time_stack[m[1]]}.", new)
    if not new.startswith("quant_conv."):
      out["first_stage_model." + new] = value
  return out


def test_sgm_single_file_names_and_missing_quant_conv(reference):
  model, config, params = reference
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  view = compvis_vae_source(DictSource(_sgm_names(sd)))
  inferred = vae_config_from_compvis(view, norm_num_groups=32)
  assert inferred == config
  converted = convert_vae(view, inferred)
  flat, want = dict(flatten_paths(converted)), dict(flatten_paths(params))
  for path, value in want.items():
    if path[0] == "quant_conv":  # sgm's engine has none: the identity 1x1 conv
      continue
    np.testing.assert_array_equal(flat[path], value, err_msg="/".join(path))
  c = 2 * config.latent_channels
  np.testing.assert_array_equal(flat[("quant_conv", "kernel")].reshape(c, c), np.eye(c))


def test_full_svd_vae_parameter_count():
  with torch.device("meta"):
    ref = AutoencoderKLTemporalDecoder(block_out_channels=[128, 256, 512, 512],
                                       down_block_types=["DownEncoderBlock2D"] * 4, layers_per_block=2)
  ours = sum(int(np.prod(leaf.shape)) for _, leaf in flatten_paths(_unboxed(abstract_params(VAEConfig.svd()))))
  assert ours == sum(p.numel() for p in ref.parameters())


def test_converter_names_bad_input(reference):
  model, config, _ = reference
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  sd.pop("decoder.time_conv_out.weight")
  with pytest.raises(ConversionError, match="time_conv_out.weight"):
    convert_vae(DictSource(sd), config)
  with pytest.raises(ValueError, match="layers_per_block=1"):
    vae_config_from_diffusers(dict(TINY_DIFFUSERS, layers_per_block=1))


# ------------------------------------------------------------------------------------------------------------
# Our video decoder: identity at init, temporal mixing, bounded receptive field, exact windows.

@pytest.fixture(scope="module")
def fresh_params():
  model = AutoencoderKL(TINY_VIDEO)
  return _unboxed(jax.jit(model.init)(jax.random.key(0), jnp.zeros((3, 8, 8, 3)))["params"])


@pytest.fixture(scope="module")
def video_params(fresh_params):
  """Video-decoder params with every temporal weight random (no identity left); the spatial ones as at init."""
  flat = traverse_util.flatten_dict(fresh_params)
  rng = np.random.default_rng(1)
  for k, v in flat.items():
    if any("temporal" in part for part in k):
      flat[k] = jnp.asarray(0.2 * rng.standard_normal(v.shape), v.dtype)
  return traverse_util.unflatten_dict(flat)


def _image_part(params):
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if not any("temporal" in p for p in k)})


def _decode(config, params, z, num_frames=None):
  fn = jax.jit(lambda p, z: AutoencoderKL(config).apply({"params": p}, z, num_frames=num_frames, method="decode"))
  return np.asarray(fn(params, z))


def test_fresh_video_decoder_equals_image_decoder(fresh_params):
  params = fresh_params
  z = jax.random.normal(jax.random.key(2), (6, 2, 3, 4))
  video = _decode(TINY_VIDEO, params, z, 3)
  image = _decode(VAEConfig.tiny(), _image_part(params), z)
  np.testing.assert_allclose(video, image, atol=2e-5)  # alpha * x + (1 - alpha) * x rounds differently
  assert all("temporal" in "/".join(k) for k in traverse_util.flatten_dict(params)
             if "/".join(k) not in {"/".join(i) for i in traverse_util.flatten_dict(_image_part(params))})


def test_alpha_on_the_spatial_side_gives_the_image_decoder(video_params):
  flat = traverse_util.flatten_dict(video_params)
  k = TINY_VIDEO.temporal_kernel
  for key, v in flat.items():
    if key[-1] == "mix_factor":
      flat[key] = jnp.full_like(v, -40.0)  # alpha = sigmoid(-40): the spatial path
    elif key[-2] == "temporal_conv_out":
      flat[key] = (vae_lib.identity_in_time(None, v.shape) if key[-1] == "kernel" else jnp.zeros_like(v))
  params = traverse_util.unflatten_dict(flat)
  assert k == 3
  z = jax.random.normal(jax.random.key(3), (6, 2, 3, 4))
  video = _decode(TINY_VIDEO, params, z, 3)
  image = _decode(VAEConfig.tiny(), _image_part(params), z)
  np.testing.assert_allclose(video, image, atol=1e-5)


def test_temporal_layers_mix_time_within_the_receptive_field(video_params):
  """Perturbing latent frame k changes output frames j != k (through the temporal layers only) up to the
  receptive field R, and none further."""
  r = vae_lib.temporal_receptive_field(TINY_VIDEO)
  assert r == TINY_VIDEO.num_temporal_convs == 21
  n = r + 4
  decode = jax.jit(lambda z: AutoencoderKL(TINY_VIDEO).apply({"params": video_params}, z, num_frames=n,
                                                             method="decode"))
  z = jax.random.normal(jax.random.key(4), (n, 1, 1, 4))
  bumped = z.at[0].add(1.0)
  diff = np.abs(np.asarray(decode(bumped) - decode(z))).reshape(n, -1).max(axis=1)
  assert diff[1] > 1e-4 and diff[r] > 0, diff
  np.testing.assert_array_equal(diff[r + 1:], 0.0)
  image = _decode(VAEConfig.tiny(), _image_part(video_params), bumped)
  image_ref = _decode(VAEConfig.tiny(), _image_part(video_params), z)
  np.testing.assert_array_equal(np.asarray(image - image_ref)[1:], 0.0)  # the image decoder does not mix time


@pytest.mark.parametrize("num_frames,window", [(23, 4), (30, 7), (9, 16), (50, 1)])
def test_windowed_decoding_equals_whole_video(video_params, num_frames, window):
  halo = vae_lib.temporal_receptive_field(TINY_VIDEO)
  model = AutoencoderKL(TINY_VIDEO)

  @functools.partial(jax.jit, static_argnums=1)
  def decode(z, t):
    frames = z.reshape((-1,) + z.shape[2:])
    return model.apply({"params": video_params}, frames, num_frames=t, method="decode").reshape(
        z.shape[:2] + (8, 8, 3))

  z = np.asarray(jax.random.normal(jax.random.key(5), (2, num_frames, 1, 1, 4)))
  whole = np.asarray(decode(z, num_frames))
  shapes = set()
  chunked = vae_lib.decode_in_windows(lambda c: shapes.add(c.shape[1]) or decode(c, c.shape[1]), z, window, halo)
  np.testing.assert_allclose(chunked, whole, atol=2e-5)
  assert shapes == {min(num_frames, window + 2 * halo)}  # one compiled shape for every window


def test_decode_windows_tile_the_video():
  for n, w, h in [(1, 1, 0), (10, 3, 2), (100, 16, 21), (7, 16, 21)]:
    windows = vae_lib.decode_windows(n, w, h)
    kept = [i for _, _, a, b in windows for i in range(a, b)]
    assert kept == list(range(n))
    for start, stop, a, b in windows:
      assert stop - start == min(n, w + 2 * h) and 0 <= start <= a < b <= stop <= n
      assert (a - start >= h or start == 0) and (stop - b >= h or stop == n)
  with pytest.raises(ValueError, match="window=0"):
    vae_lib.decode_windows(5, 0, 1)


def test_convert_command_takes_a_diffusers_folder_and_an_sgm_single_file(reference, tmp_path):
  """``videoldm_jax.convert``'s readers: the SVD VAE folder (config.json + weights) and an autoencoder-only sgm file
  (``first_stage_model.*``, converted with ``--components=vae``) give the same params."""
  from videoldm_jax import convert  # pylint: disable=g-import-not-at-top
  from videoldm_jax.conversion import io as ckpt_io  # pylint: disable=g-import-not-at-top
  model, config, params = reference
  model.save_pretrained(tmp_path / "vae", safe_serialization=True)
  configs, converted, _ = convert.convert_source(str(tmp_path / "vae"))
  assert configs == {"vae": config}
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  ckpt_io.save_safetensors(_sgm_names(sd), str(tmp_path / "svd_vae.safetensors"))
  with pytest.raises(ConversionError, match="--components=vae"):
    convert.convert_source(str(tmp_path / "svd_vae.safetensors"))
  configs_file, from_file, _ = convert.convert_source(str(tmp_path / "svd_vae.safetensors"), components=["vae"])
  assert configs_file == {"vae": config}
  ours, folder, single = (dict(flatten_paths(t)) for t in (params, converted["vae"], from_file["vae"]))
  for path, value in ours.items():
    np.testing.assert_array_equal(folder[path], value, err_msg="/".join(path))
    if path[0] != "quant_conv":
      np.testing.assert_array_equal(single[path], value, err_msg="/".join(path))
