"""Temporal layers: init behaviour, alpha strategies, attention window, parity with diffusers (fp32)."""

import einops
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.attention import TemporalBasicTransformerBlock
from diffusers.models.embeddings import TimestepEmbedding as TorchTimestepEmbedding
from diffusers.models.embeddings import Timesteps
from diffusers.models.resnet import AlphaBlender as TorchAlphaBlender
from diffusers.models.resnet import TemporalResnetBlock

from videoldm_jax.conversion.core import DictSource, convert_strict
from videoldm_jax.models import layers
from videoldm_jax.models.temporal import (AlphaBlender, TemporalConfig, TemporalResBlock, TemporalTransformerBlock,
                                          frame_position_features, frame_window_mask)

PARITY_TOL = 1e-4  # max-abs on unit-scale outputs, fp32


def _convert(module, torch_module, *args, **kwargs):
  abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), *args, **kwargs)["params"]
  params = convert_strict(DictSource(torch_module.state_dict()), abstract)
  return jax.tree_util.tree_map(jnp.asarray, params)


def _randn(rng, *shape):
  return rng.standard_normal(shape).astype(np.float32)


def _randomise(torch_module, seed=0):
  """Non-trivial weights everywhere (norm affine params and biases too)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in torch_module.parameters():
      scale = 1.0 / np.sqrt(np.prod(p.shape[1:])) if p.ndim > 1 else 0.5  # fan-in scaled, unit-scale outputs
      p.copy_(torch.randn(p.shape, generator=g) * scale)
  return torch_module.eval()


# ----------------------------------------------------------------------------------------------------------
# TemporalResBlock

def test_temporal_resblock_is_identity_at_init():
  rng = np.random.default_rng(0)
  x = jnp.asarray(_randn(rng, 2, 5, 4, 4, 64))
  emb = jnp.asarray(_randn(rng, 2, 5, 128))
  block = TemporalResBlock(64)
  params = block.init(jax.random.PRNGKey(1), x, emb)
  assert not np.any(params["params"]["conv2"]["kernel"].value)
  assert params["params"]["conv1"]["kernel"].value.shape == (3, 1, 1, 64, 64)
  np.testing.assert_array_equal(np.asarray(block.apply(params, x, emb)), np.asarray(x))
  # Without zero-init the block is not the identity (the test above can fail).
  params = TemporalResBlock(64, zero_init=False).init(jax.random.PRNGKey(1), x, emb)
  assert np.abs(np.asarray(block.apply(params, x, emb) - x)).max() > 1e-2


def test_temporal_resblock_matches_diffusers():
  b, t, h, w, c, e = 2, 5, 3, 4, 64, 96
  ref = _randomise(TemporalResnetBlock(c, c, temb_channels=e, eps=1e-5))
  rng = np.random.default_rng(1)
  x = _randn(rng, b, t, h, w, c)
  emb = _randn(rng, b, t, e)
  block = TemporalResBlock(c, eps=1e-5)
  params = _convert(block, ref, x, emb)
  ours = np.asarray(block.apply({"params": params}, x, emb))
  with torch.no_grad():
    theirs = ref(torch.from_numpy(einops.rearrange(x, "b t h w c -> b c t h w")), torch.from_numpy(emb)).numpy()
  theirs = einops.rearrange(theirs, "b c t h w -> b t h w c")
  err = np.abs(ours - theirs).max()
  print(f"TemporalResBlock max abs err vs diffusers: {err:.2e}")
  assert err < PARITY_TOL
  # Mixing across time really happens: the first frame depends on the second one.
  x2 = x.copy()
  x2[:, 1] += 1.0
  assert np.abs(np.asarray(block.apply({"params": params}, x2, emb))[:, 0] - ours[:, 0]).max() > 1e-3


# ----------------------------------------------------------------------------------------------------------
# AlphaBlender

def test_alpha_blender_strategies():
  rng = np.random.default_rng(2)
  xs = jnp.asarray(_randn(rng, 2, 3, 4, 4, 8))
  xt = jnp.asarray(_randn(rng, 2, 3, 4, 4, 8))

  fixed = AlphaBlender("fixed", 0.3)
  variables = fixed.init(jax.random.PRNGKey(0), xs, xt)
  assert not variables  # a constant, not a parameter
  np.testing.assert_allclose(fixed.apply(variables, xs, xt), 0.3 * xs + 0.7 * xt, rtol=1e-6, atol=1e-6)

  learned = AlphaBlender("learned", 0.5)
  variables = learned.init(jax.random.PRNGKey(0), xs, xt)
  mix = variables["params"]["mix_factor"].value
  assert mix.shape == (1,) and float(mix[0]) == 0.5
  a = 1 / (1 + np.exp(-0.5))
  np.testing.assert_allclose(learned.apply(variables, xs, xt), a * xs + (1 - a) * xt, rtol=1e-6, atol=1e-6)
  swapped = AlphaBlender("learned", 0.5, switch_spatial_to_temporal_mix=True)
  np.testing.assert_allclose(swapped.apply(variables, xs, xt), a * xt + (1 - a) * xs, rtol=1e-6, atol=1e-6)

  images = AlphaBlender("learned_with_images", 0.5)
  variables = images.init(jax.random.PRNGKey(0), xs, xt)
  indicator = jnp.array([[1, 0, 0], [0, 0, 1]])
  out = np.asarray(images.apply(variables, xs, xt, indicator))
  for bi in range(2):
    for ti in range(3):
      want = xs[bi, ti] if indicator[bi, ti] else a * xs[bi, ti] + (1 - a) * xt[bi, ti]
      np.testing.assert_allclose(out[bi, ti], want, rtol=1e-6, atol=1e-6)
  # Flattened-frame layout [(b t), n, c] gets the same per-frame alpha.
  tok_s = einops.rearrange(xs, "b t h w c -> (b t) (h w) c")
  tok_t = einops.rearrange(xt, "b t h w c -> (b t) (h w) c")
  out_tok = images.apply(variables, tok_s, tok_t, indicator)
  np.testing.assert_allclose(out_tok, einops.rearrange(out, "b t h w c -> (b t) (h w) c"), rtol=1e-6, atol=1e-6)
  # No indicator = all frames are video frames.
  np.testing.assert_allclose(images.apply(variables, xs, xt), a * xs + (1 - a) * xt, rtol=1e-6, atol=1e-6)

  with pytest.raises(ValueError):
    AlphaBlender("bogus").init(jax.random.PRNGKey(0), xs, xt)


@pytest.mark.parametrize("switch", [False, True])
def test_alpha_blender_matches_diffusers(switch):
  rng = np.random.default_rng(3)
  xs = _randn(rng, 2, 3, 4, 4, 8)
  xt = _randn(rng, 2, 3, 4, 4, 8)
  indicator = np.array([[1, 0, 0], [0, 1, 0]], np.float32)
  ref = TorchAlphaBlender(0.7, "learned_with_images", switch_spatial_to_temporal_mix=switch)
  with torch.no_grad():
    ref.mix_factor.fill_(-0.4)
  blender = AlphaBlender("learned_with_images", 0.7, switch_spatial_to_temporal_mix=switch)
  params = _convert(blender, ref, xs, xt, indicator)
  ours = np.asarray(blender.apply({"params": params}, xs, xt, indicator))
  to_t = lambda a: torch.from_numpy(einops.rearrange(a, "b t h w c -> b c t h w"))  # noqa: E731
  with torch.no_grad():
    theirs = ref(to_t(xs), to_t(xt), torch.from_numpy(indicator)).numpy()
  np.testing.assert_allclose(ours, einops.rearrange(theirs, "b c t h w -> b t h w c"), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Temporal transformer block

def _ref_block(c, heads, cross_dim, seed):
  return _randomise(TemporalBasicTransformerBlock(c, c, heads, c // heads, cross_attention_dim=cross_dim), seed)


@pytest.mark.parametrize("cross", [True, False])
def test_temporal_transformer_block_matches_diffusers(cross):
  b, s, t, c, heads, m, d = 2, 6, 5, 64, 4, 7, 48
  ref = _ref_block(c, heads, d if cross else None, seed=4)
  rng = np.random.default_rng(4)
  x = _randn(rng, b * s, t, c)
  ctx = _randn(rng, b, m, d)
  block = TemporalTransformerBlock(c, heads, c // heads, cross_attention=cross)
  params = _convert(block, ref, x, ctx if cross else None)
  ours = np.asarray(block.apply({"params": params}, x, ctx if cross else None))
  # diffusers input: [(b t), s, c] with num_frames, context broadcast to [(b s), m, d].
  x_ref = einops.rearrange(x, "(b s) t c -> (b t) s c", b=b)
  ctx_ref = einops.repeat(ctx, "b m d -> (b s) m d", s=s)
  with torch.no_grad():
    theirs = ref(torch.from_numpy(x_ref), num_frames=t,
                 encoder_hidden_states=torch.from_numpy(ctx_ref) if cross else None).numpy()
  theirs = einops.rearrange(theirs, "(b t) s c -> (b s) t c", b=b)
  err = np.abs(ours - theirs).max()
  print(f"TemporalTransformerBlock (cross={cross}) max abs err vs diffusers: {err:.2e}")
  assert err < PARITY_TOL
  if cross:  # a per-token-row context gives the same result
    per_row = np.asarray(block.apply({"params": params}, x, jnp.asarray(ctx_ref)))
    np.testing.assert_allclose(per_row, ours, atol=1e-5)
    assert "attn2" in params and params["attn2"]["to_k"]["kernel"].shape == (d, c)
  else:
    assert "attn2" not in params and "norm2" not in params


def test_window_mask_limits_receptive_field():
  t, window, k = 10, 2, 4
  mask = np.asarray(frame_window_mask(t, window))[0, 0]
  assert mask.shape == (t, t) and mask[0, 2] and not mask[0, 3] and mask[5, 3]
  assert frame_window_mask(t, t - 1) is None and frame_window_mask(t, None) is None

  rng = np.random.default_rng(5)
  x = _randn(rng, 6, t, 32)
  ctx = _randn(rng, 2, 5, 16)
  windowed = TemporalTransformerBlock(32, 4, 8, max_frame_distance=window)
  full = TemporalTransformerBlock(32, 4, 8)
  params = windowed.init(jax.random.PRNGKey(0), x, ctx)
  x2 = x.copy()
  x2[:, k] += _randn(rng, 6, 32)  # not a constant shift: LayerNorm would remove that
  for block, limit in ((windowed, window), (full, t)):
    delta = np.abs(np.asarray(block.apply(params, x2, ctx) - block.apply(params, x, ctx))).max(axis=(0, 2))
    for j in range(t):
      if abs(j - k) <= limit:
        assert delta[j] > 1e-4, (block.max_frame_distance, j)
      else:
        assert delta[j] == 0.0, (block.max_frame_distance, j, delta[j])


def test_window_equals_unmasked_block_on_subclip():
  """With a window w, frame i sees exactly frames [i-w, i+w]: same as the unmasked block on that sub-clip."""
  t, window = 9, 2
  rng = np.random.default_rng(6)
  x = _randn(rng, 4, t, 32)
  ctx = _randn(rng, 2, 5, 16)
  windowed = TemporalTransformerBlock(32, 4, 8, max_frame_distance=window)
  params = windowed.init(jax.random.PRNGKey(1), x, ctx)
  out = np.asarray(windowed.apply(params, x, ctx))
  full = jax.jit(TemporalTransformerBlock(32, 4, 8).apply)
  for i in range(t):
    lo, hi = max(0, i - window), min(t, i + window + 1)
    sub = np.asarray(full(params, x[:, lo:hi], ctx))
    np.testing.assert_allclose(out[:, i], sub[:, i - lo], atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Frame position embedding

def test_frame_position_embedding_matches_diffusers():
  t, c = 7, 64
  feats = frame_position_features(t, c)
  with torch.no_grad():
    ref_feats = Timesteps(c, True, 0)(torch.arange(t)).numpy()
  np.testing.assert_allclose(np.asarray(feats), ref_feats, atol=1e-5)

  ref = _randomise(TorchTimestepEmbedding(c, 4 * c, out_dim=c), seed=7)
  mlp = layers.TimestepEmbedding(4 * c, c)
  params = _convert(mlp, ref, feats)
  with torch.no_grad():
    theirs = ref(torch.from_numpy(ref_feats)).numpy()
  np.testing.assert_allclose(np.asarray(mlp.apply({"params": params}, feats)), theirs, atol=PARITY_TOL)


def test_temporal_config_json_round_trip():
  import dataclasses
  import json
  cfg = TemporalConfig(max_frame_distance=8, merge_strategy="learned", kernel_size=(3, 1, 1))
  back = TemporalConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg))))
  assert back == cfg and isinstance(back.kernel_size, tuple)
  with pytest.raises(ValueError):
    TemporalConfig(merge_strategy="nope")
