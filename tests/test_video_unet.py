"""Video U-Net (UNet + TemporalConfig): parameter counts, parity with diffusers' SVD U-Net, image identity at
alpha = 1, temporal mixing, sharded execution.

Parity tolerances (fp32, unit-scale outputs): 1e-5 max-abs against a tiny random diffusers
``UNetSpatioTemporalConditionModel`` whose resnet GroupNorm eps is set to sgm's 1e-5 (diffusers uses 1e-6 in the
cross-attention blocks' resnets; the original sgm SVD uses 1e-5 everywhere, as we do); 1e-3 against the unpatched
diffusers model (that eps difference alone).
"""

import dataclasses
import json
import sys

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from videoldm_jax import parallel
from videoldm_jax.conversion.core import ConversionError, DictSource, _unbox, flatten_paths, unflatten_paths
from videoldm_jax.conversion.svd import (convert_svd_unet, svd_config_from_diffusers, svd_torch_key, svd_unet_config,
                                         svd_unet_to_diffusers)
from videoldm_jax.models import unet as unet_lib
from videoldm_jax.models.temporal import TemporalConfig

sys.modules.setdefault("torchvision", None)  # the installed torchvision does not match torch; diffusers only probes it
import torch  # noqa: E402
from diffusers.models.unets.unet_spatio_temporal_condition import UNetSpatioTemporalConditionModel  # noqa: E402

from reference_models import TINY_SVD_UNET as TINY_SVD  # noqa: E402


def _counts(config):
  """(total, temporal) parameter counts from shapes only."""
  total = temporal = 0
  for path, leaf in flatten_paths(_unbox(unet_lib.abstract_params(config))):
    n = int(np.prod(leaf.shape))
    total += n
    temporal += n if any("temporal" in p for p in path) else 0
  return total, temporal


def _spatial(tree):
  """The param tree without any ``*temporal*`` subtree (what the image U-Net has)."""
  return {k: _spatial(v) if isinstance(v, dict) else v for k, v in tree.items() if "temporal" not in k}


def _shapes(tree):
  return {"/".join(p): tuple(getattr(leaf, "shape")) for p, leaf in flatten_paths(_unbox(tree))}


# ----------------------------------------------------------------------------------------------------------
# Parameter counts (paper Appendix H.2.1 / sgm VideoUNet) and the param-tree contract.

@pytest.mark.parametrize("name, base, want_temporal, want_total", [
    ("sd1x", unet_lib.sd15, 649.69e6, 1509.21e6),
    ("sd2x", unet_lib.sd21, 656.08e6, 1521.99e6),
])
def test_paper_parameter_counts(name, base, want_temporal, want_total):
  image = base()
  video = dataclasses.replace(image, temporal=TemporalConfig())  # temporal cross-attention to the text context
  total, temporal = _counts(video)
  print(f"{name}: total {total:,} temporal {temporal:,}")
  assert abs(temporal - want_temporal) <= 0.005e6
  assert abs(total - want_total) <= 0.005e6
  # The spatial subtree is exactly the image U-Net's tree.
  assert _shapes(_spatial(unet_lib.abstract_params(video))) == _shapes(unet_lib.abstract_params(image))


def test_svd_presets_are_the_diffusers_configs():
  """The training presets (``config.model.unet``) build exactly what the converter builds from diffusers configs."""
  assert unet_lib.svd() == svd_unet_config()
  assert unet_lib.tiny_svd() == svd_config_from_diffusers(TINY_SVD)
  assert unet_lib.svd() != svd_unet_config(max_frame_distance=8)


def test_svd_parameter_count_matches_diffusers():
  total, temporal = _counts(svd_unet_config())
  with torch.device("meta"):
    ref = UNetSpatioTemporalConditionModel()
  named = dict(ref.named_parameters())
  ref_temporal = sum(p.numel() for k, p in named.items()
                     if any(s in k for s in ("temporal_", "time_mixer", "time_pos_embed")))
  print(f"svd: total {total:,} temporal {temporal:,}")
  assert total == sum(p.numel() for p in named.values()) == 1_524_623_082
  assert temporal == ref_temporal == 656_076_838
  assert sum(1 for k in named if k.endswith("mix_factor")) == 38


def test_config_json_roundtrip_with_temporal():
  cfg = svd_unet_config(max_frame_distance=8)
  back = unet_lib.UNetConfig.from_json(json.dumps(json.loads(cfg.to_json())))
  assert back == cfg and isinstance(back.temporal, TemporalConfig)


# ----------------------------------------------------------------------------------------------------------
# Parity with diffusers' UNetSpatioTemporalConditionModel.

@pytest.fixture(scope="module")
def tiny_svd():
  torch.manual_seed(0)
  ref = UNetSpatioTemporalConditionModel(**TINY_SVD).eval()
  cfg = svd_config_from_diffusers(TINY_SVD)
  params = jax.tree_util.tree_map(jnp.asarray, convert_svd_unet(DictSource(ref.state_dict()), cfg))
  rng = np.random.default_rng(0)
  b, t = 2, 3
  inputs = dict(x=rng.standard_normal((b, t, 8, 8, 8)).astype(np.float32),
                ctx=rng.standard_normal((b, 1, 32)).astype(np.float32),
                ids=np.array([[6, 127, 0.02], [3, 60, 0.1]], np.float32),
                ts=np.array([10.0, 500.0], np.float32))
  apply = jax.jit(lambda p, x, ts, ctx, ids, ind: unet_lib.UNet(cfg).apply(
      {"params": p}, x, ts, ctx, added_cond=ids, image_only_indicator=ind))
  return ref, cfg, params, inputs, apply


def _run_diffusers(ref, inputs, indicator):
  """diffusers' forward always uses an all-zero image_only_indicator; inject ours into every block."""
  hooks = []
  if indicator.any():
    ind = torch.from_numpy(indicator)
    for block in [*ref.down_blocks, ref.mid_block, *ref.up_blocks]:
      hooks.append(block.register_forward_pre_hook(
          lambda _, args, kwargs: (args, {**kwargs, "image_only_indicator": ind}), with_kwargs=True))
  try:
    with torch.no_grad():
      out = ref(torch.from_numpy(inputs["x"]), torch.from_numpy(inputs["ts"]), torch.from_numpy(inputs["ctx"]),
                torch.from_numpy(inputs["ids"])).sample.numpy()
  finally:
    for h in hooks:
      h.remove()
  return einops.rearrange(out, "b t c h w -> b t h w c")


def _set_resnet_eps(ref, eps):
  for name, module in ref.named_modules():
    if isinstance(module, torch.nn.GroupNorm) and ".resnets." in name:
      module.eps = eps


@pytest.mark.parametrize("indicator", [np.zeros((2, 3), np.float32), np.array([[0, 1, 0], [1, 1, 1]], np.float32)],
                         ids=["video", "image_only_indicator"])
def test_tiny_svd_matches_diffusers(tiny_svd, indicator):
  ref, _, params, inputs, apply = tiny_svd
  x = einops.rearrange(inputs["x"], "b t c h w -> b t h w c")
  ours = np.asarray(apply(params, x, inputs["ts"], inputs["ctx"], inputs["ids"], indicator))
  diffusers_eps = {n: m.eps for n, m in ref.named_modules() if isinstance(m, torch.nn.GroupNorm)}
  raw_err = np.abs(ours - _run_diffusers(ref, inputs, indicator)).max()
  try:
    _set_resnet_eps(ref, 1e-5)  # sgm's value (diffusers: 1e-6 in the cross-attention blocks' resnets)
    err = np.abs(ours - _run_diffusers(ref, inputs, indicator)).max()
  finally:
    for n, m in ref.named_modules():
      if n in diffusers_eps:
        m.eps = diffusers_eps[n]
  print(f"tiny SVD ({'with' if indicator.any() else 'no'} image_only_indicator): max abs err {err:.2e} "
        f"(sgm eps), {raw_err:.2e} (diffusers' eps)")
  assert err < 1e-5
  assert raw_err < 1e-3


def test_svd_export_loads_strictly_into_diffusers(tiny_svd):
  ref, cfg, params, _, _ = tiny_svd
  exported = svd_unet_to_diffusers(params)
  fresh = UNetSpatioTemporalConditionModel(**TINY_SVD)
  fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in exported.items()}, strict=True)
  for k, v in ref.state_dict().items():
    np.testing.assert_array_equal(fresh.state_dict()[k].numpy(), v.numpy())
  assert svd_torch_key(("down_blocks_0", "resnets_0", "temporal_res", "conv2", "kernel")) == \
      "down_blocks.0.resnets.0.temporal_res_block.conv2.weight"


def test_svd_conversion_is_strict(tiny_svd):
  ref, cfg, _, _, _ = tiny_svd
  state = dict(ref.state_dict())
  missing = dict(state)
  del missing["down_blocks.0.attentions.0.time_mixer.mix_factor"]
  with pytest.raises(ConversionError, match="time_mixer.mix_factor"):
    convert_svd_unet(DictSource(missing), cfg)
  extra = dict(state, **{"down_blocks.0.resnets.0.temporal_res_block.bogus.weight": torch.zeros(1)})
  with pytest.raises(ConversionError, match="bogus"):
    convert_svd_unet(DictSource(extra), cfg)


# ----------------------------------------------------------------------------------------------------------
# Image identity and temporal mixing on an SD-shaped tiny video U-Net.

def _random_params(abstract, seed):
  """Random values for an abstract param tree (no init compile): fan-in scaled kernels, O(1) norms and biases."""
  rng = np.random.default_rng(seed)
  flat = []
  for path, leaf in flatten_paths(_unbox(abstract)):
    shape = tuple(leaf.shape)
    if path[-1] == "kernel":
      value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    elif path[-1] == "scale":
      value = 1.0 + 0.2 * rng.standard_normal(shape)
    else:  # biases, embeddings, mix_factor
      value = 0.2 * rng.standard_normal(shape)
    flat.append((path, jnp.asarray(value, jnp.float32)))
  return unflatten_paths(flat)


@pytest.fixture(scope="module")
def tiny_video():
  """SD-shaped tiny video U-Net with random (non-identity) temporal layers; 4 clips of 3 frames."""
  image_cfg = unet_lib.tiny()
  video_cfg = dataclasses.replace(image_cfg, temporal=TemporalConfig(zero_init=False, max_frame_distance=1))
  b, t = 4, 3
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((b, t, 8, 8, 4)).astype(np.float32))
  ts = jnp.asarray([30.0, 300.0, 600.0, 900.0])
  ctx = jnp.asarray(rng.standard_normal((b, 5, 32)).astype(np.float32))
  video = unet_lib.UNet(video_cfg)
  params = _random_params(unet_lib.abstract_params(video_cfg), seed=0)
  apply = jax.jit(lambda p, x, ind: video.apply({"params": p}, x, ts, ctx, image_only_indicator=ind))
  return dict(image_cfg=image_cfg, video_cfg=video_cfg, params=params, x=x, ts=ts, ctx=ctx, apply=apply)


def test_video_param_tree_is_image_tree_plus_temporal(tiny_video):
  image_cfg, params = tiny_video["image_cfg"], tiny_video["params"]
  image_shapes = _shapes(unet_lib.abstract_params(image_cfg))
  video_shapes = _shapes(params)
  assert _shapes(_spatial(params)) == image_shapes
  extra = set(video_shapes) - set(image_shapes)
  assert extra and all("temporal" in k for k in extra)
  for expected in ("down_blocks_0/resnets_0/temporal_res/conv2/kernel",
                   "down_blocks_0/resnets_0/temporal_mixer/mix_factor",
                   "down_blocks_0/attentions_0/temporal_transformer_blocks_0/attn1/to_q/kernel",
                   "down_blocks_0/attentions_0/temporal_transformer_blocks_0/attn2/to_k/kernel",
                   "down_blocks_0/attentions_0/temporal_pos_embed/linear_1/kernel",
                   "down_blocks_0/attentions_0/temporal_mixer/mix_factor",
                   "mid_block/resnets_1/temporal_res/conv1/kernel",
                   "up_blocks_1/attentions_1/temporal_mixer/mix_factor"):
    assert expected in video_shapes, expected
  assert video_shapes["down_blocks_0/resnets_0/temporal_res/conv1/kernel"] == (3, 1, 1, 32, 32)


def test_alpha_one_recovers_the_image_unet(tiny_video):
  params, x, ts, ctx, apply = (tiny_video[k] for k in ("params", "x", "ts", "ctx", "apply"))
  b, t = x.shape[:2]
  image = unet_lib.UNet(tiny_video["image_cfg"])
  frames = einops.rearrange(x, "b t h w c -> (b t) h w c")
  want = jax.jit(image.apply)({"params": _spatial(params)}, frames, jnp.repeat(ts, t), jnp.repeat(ctx, t, axis=0))
  want = np.asarray(einops.rearrange(want, "(b t) h w c -> b t h w c", b=b))
  # Clip 0 flagged as images (alpha = 1 everywhere), the others are videos.
  flags = np.zeros((b, t), np.float32)
  flags[0] = 1
  out = np.asarray(apply(params, x, flags))
  err = np.abs(out[0] - want[0]).max()
  print(f"alpha=1 vs image U-Net: max abs err {err:.2e}")
  assert err <= 1e-6
  assert np.abs(out[1:] - want[1:]).max() > 1e-3  # the temporal layers do act on video frames


def test_temporal_layers_mix_frames_only_when_active(tiny_video):
  params, x, apply = tiny_video["params"], tiny_video["x"], tiny_video["apply"]
  b, t = x.shape[:2]
  k = 1
  x2 = x.at[:, k].add(jax.random.normal(jax.random.PRNGKey(3), x.shape[2:]))
  for flags, mixes in ((np.zeros((b, t)), True), (np.ones((b, t)), False)):
    delta = np.abs(np.asarray(apply(params, x2, flags) - apply(params, x, flags))).max(axis=(0, 2, 3, 4))
    assert delta[k] > 1e-3
    others = np.delete(delta, k)
    if mixes:
      assert (others > 1e-5).all(), others
    else:
      assert (others == 0).all(), others


def test_attention_only_temporal_layers(tiny_video):
  """``conv_blocks=False`` (the paper's attention-only ablation): the full video tree minus every 3D-conv
  ResBlock and its mixer; with the same values for the params they share it still mixes frames (attention), and
  it differs from the full model (the conv blocks act)."""
  params, x, ts, ctx = (tiny_video[k] for k in ("params", "x", "ts", "ctx"))
  cfg = dataclasses.replace(tiny_video["video_cfg"], temporal=dataclasses.replace(tiny_video["video_cfg"].temporal,
                                                                                  conv_blocks=False))
  shapes = _shapes(unet_lib.abstract_params(cfg))
  full = _shapes(params)
  dropped = set(full) - set(shapes)
  assert not set(shapes) - set(full)
  assert dropped and all("/temporal_res/" in k or ("resnets_" in k and "/temporal_mixer/" in k) for k in dropped)
  assert any("temporal_transformer_blocks" in k for k in shapes)
  kept = unflatten_paths([(p, leaf) for p, leaf in flatten_paths(params) if "/".join(p) in shapes])
  apply = jax.jit(lambda p, x: unet_lib.UNet(cfg).apply({"params": p}, x, ts, ctx))
  out = np.asarray(apply(kept, x))
  x2 = x.at[:, 1].add(1.0)
  delta = np.abs(np.asarray(apply(kept, x2)) - out).max(axis=(0, 2, 3, 4))
  assert (delta > 1e-5).all(), delta  # frame 1's change reaches frames 0 and 2 through temporal attention
  assert np.abs(out - np.asarray(tiny_video["apply"](params, x, None))).max() > 1e-3
  with pytest.raises(ValueError, match="conv_blocks=False"):
    TemporalConfig(conv_blocks=False, mask_conditioning=True)


def test_folded_frames_and_per_frame_inputs_agree(tiny_video):
  params, x, ts, ctx, apply = (tiny_video[k] for k in ("params", "x", "ts", "ctx", "apply"))
  b, t = x.shape[:2]
  cfg = tiny_video["video_cfg"]
  folded = jax.jit(lambda p, x, ts, ctx: unet_lib.UNet(cfg).apply({"params": p}, x, ts, ctx, num_frames=t))(
      params, einops.rearrange(x, "b t h w c -> (b t) h w c"), jnp.repeat(ts, t), jnp.repeat(ctx, t, axis=0))
  np.testing.assert_allclose(einops.rearrange(np.asarray(folded), "(b t) h w c -> b t h w c", b=b),
                             np.asarray(apply(params, x, None)), atol=1e-5)
  with pytest.raises(ValueError, match="num_frames"):
    unet_lib.UNet(cfg).apply({"params": params}, einops.rearrange(x, "b t h w c -> (b t) h w c"), ts, ctx)


# ----------------------------------------------------------------------------------------------------------
# Sharding.

def test_sharded_init_and_forward_match_unsharded(tiny_video):
  """(data=2, fsdp=2, tensor=2) mesh, params sharded by logical rules (embed/conv_out -> fsdp, mlp/heads -> tensor).

  The batch (4 clips) divides data x fsdp. ``conv_in -> tensor`` (in ``parallel.RULES["fsdp_tensor"]``) is left out:
  with it XLA's CPU SPMD partitioner returns wrong convolution results, for the image U-Net too.
  """
  cfg, x, ts, ctx, apply = (tiny_video[k] for k in ("video_cfg", "x", "ts", "ctx", "apply"))
  model = unet_lib.UNet(cfg)
  flags = jnp.asarray([[0, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 1]], jnp.float32)

  def init(rng):
    return model.init(rng, x, ts, ctx)["params"]

  mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2, 2), parallel.MESH_AXES)
  rules = tuple(r for r in parallel.RULES["fsdp_tensor"] if r[0] != "conv_in")
  shardings = parallel.param_shardings(jax.eval_shape(init, jax.random.PRNGKey(0)), mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(jax.random.PRNGKey(0))
    x_sharded = jax.device_put(x, NamedSharding(mesh, P(parallel.BATCH_AXES)))
    out_sharded = jax.jit(lambda p, x: model.apply({"params": p}, x, ts, ctx, image_only_indicator=flags))(
        params, x_sharded)
  layer = params["down_blocks_0"]["attentions_0"]["temporal_transformer_blocks_0"]["attn1"]["to_q"]["kernel"]
  assert layer.sharding.spec == P("fsdp", "tensor")
  conv = params["down_blocks_0"]["resnets_0"]["temporal_res"]["conv1"]["kernel"]
  assert conv.sharding.spec == P(None, None, None, None, "fsdp")

  host = jax.device_get(params)
  assert _shapes(host) == _shapes(tiny_video["params"])
  err = np.abs(np.asarray(out_sharded) - np.asarray(apply(host, x, flags))).max()
  print(f"sharded vs unsharded forward: max abs err {err:.2e}")
  assert err <= 1e-5
