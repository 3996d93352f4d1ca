"""Low-rank temporal adapters: a fresh adapter is the identity, only adapters train under ``.*/lora/.*``, merged
weights equal the adapters, the safetensors file round-trips and ``apply_lora`` is strict."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from safetensors import safe_open

from videoldm_jax import lora, optim
from videoldm_jax.models import layers
from videoldm_jax.models import unet as unet_lib
from videoldm_jax.models.temporal import TemporalConfig

FRAMES = 3
RANK = 4
LORA_TC = TemporalConfig(lora_rank=RANK, lora_alpha=8.0, lora_convs=True)  # scale 2: a wrong scale shows


def _unet(tc):
  return unet_lib.UNet(unet_lib.tiny(temporal=tc))


def _inputs():
  rng = np.random.default_rng(0)
  return dict(sample=jnp.asarray(rng.standard_normal((FRAMES, 8, 8, 4)), jnp.float32),
              timesteps=jnp.full((FRAMES,), 500.0, jnp.float32),
              encoder_hidden_states=jnp.asarray(rng.standard_normal((FRAMES, 2, 32)), jnp.float32))


# -O0: these tiny programs are compile-bound on CPU (as with config.cpu_fast_compile).
_FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compiled(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options=_FAST)


def _randomised(flat, keys, seed, std):
  rng = np.random.default_rng(seed)
  return {k: (jnp.asarray(rng.standard_normal(v.shape) * std, v.dtype) if k in keys else v) for k, v in flat.items()}


@pytest.fixture(scope="module")
def models():
  """(base model apply, adapted model apply, adapted params): rank 0 and rank 4 (+ conv adapters) tiny video U-Nets."""
  inputs = _inputs()
  base, adapted = _unet(TemporalConfig()), _unet(LORA_TC)
  rng = jax.random.key(0, impl="unsafe_rbg")  # compiles several times faster than threefry
  params = nn.meta.unbox(_compiled(lambda r: adapted.init(r, **inputs, num_frames=FRAMES), rng)(rng)["params"])
  base_params = {k: v for k, v in optim.flat_paths(params).items() if not lora.is_adapter(k)}
  fwd = lambda model, p: _compiled(lambda p: model.apply({"params": p}, **inputs, num_frames=FRAMES), p)  # noqa: E731
  return fwd(base, traverse_util.unflatten_dict(base_params, sep="/")), fwd(adapted, params), params, base


def test_adapters_placed_where_configured(models):
  *_, params, base = models
  flat = optim.flat_paths(params)
  adapters = lora.lora_params(params)
  # The trainable regex selects exactly the adapters, all under temporal layers.
  assert set(optim.flat_paths(optim.split(params, lora.TRAINABLE)[0])) == set(adapters)
  assert all("temporal" in k for k in adapters)
  kinds = {k.split("/")[-3] for k in adapters}
  assert kinds == {"to_q", "to_k", "to_v", "to_out_0", "conv1", "conv2"}
  # 4 temporal transformers x 2 attentions x 4 projections + 8 temporal ResBlocks x 2 convs, each A and B.
  assert len(adapters) == 2 * (4 * 2 * 4 + 8 * 2)
  a = flat["down_blocks_0/attentions_0/temporal_transformer_blocks_0/attn1/to_q/lora/lora_a"]
  b = flat["down_blocks_0/attentions_0/temporal_transformer_blocks_0/attn1/to_q/lora/lora_b"]
  assert a.shape == (32, RANK) and b.shape == (RANK, 32) and float(jnp.abs(a).max()) > 0
  assert flat["down_blocks_0/resnets_0/temporal_res/conv1/lora/lora_a"].shape == (3, 1, 1, 32, RANK)
  assert flat["down_blocks_0/resnets_0/temporal_res/conv1/lora/lora_b"].shape == (RANK, 32)
  # Base paths and shapes are those of the model without adapters (checkpoints and converters keep working).
  base_shapes = optim.flat_paths(nn.meta.unbox(jax.eval_shape(
      lambda: base.init(jax.random.PRNGKey(0), **_inputs(), num_frames=FRAMES))["params"]))
  assert {k: v.shape for k, v in base_shapes.items()} == {k: v.shape for k, v in flat.items() if k not in adapters}
  # Logical axes: the rank dimension has its own name (replicated by every rule preset).
  specs = optim.flat_paths(nn.get_partition_spec(jax.eval_shape(
      lambda: _unet(LORA_TC).init(jax.random.PRNGKey(0), **_inputs(), num_frames=FRAMES))["params"]))
  assert tuple(specs["mid_block/attentions_0/temporal_transformer_blocks_0/attn2/to_k/lora/lora_a"]) == (
      "embed", layers.LORA_AXIS)
  assert tuple(specs["mid_block/attentions_0/temporal_transformer_blocks_0/attn2/to_k/lora/lora_b"]) == (
      layers.LORA_AXIS, "heads")


def test_fresh_adapters_give_the_base_output(models):
  base_fwd, lora_fwd, params, _ = models
  base_params = {k: v for k, v in optim.flat_paths(params).items() if not lora.is_adapter(k)}
  ref = np.asarray(base_fwd(traverse_util.unflatten_dict(base_params, sep="/")))
  out = np.asarray(lora_fwd(params))
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)


def _live(params, adapters: bool = True):
  """``params`` with random zero-initialised base kernels (each temporal ResBlock's conv2, which would otherwise
  cut its conv1 adapter off the output) and, with ``adapters``, random adapters B."""
  flat = optim.flat_paths(params)
  zero_kernels = {k for k, v in flat.items() if k.endswith("/kernel") and not np.any(np.asarray(v))}
  flat = _randomised(flat, zero_kernels, 2, 0.05)
  if adapters:
    flat = _randomised(flat, {k for k in flat if k.endswith("/lora/lora_b")}, 3, 0.2)
  return traverse_util.unflatten_dict(flat, sep="/")


def test_training_changes_only_adapters(models):
  params = _live(models[2], adapters=False)
  model = _unet(LORA_TC)
  inputs = _inputs()
  target = jnp.asarray(np.random.default_rng(1).standard_normal((FRAMES, 8, 8, 4)), jnp.float32)

  def loss_fn(trainable, frozen, batch, rng):
    del batch, rng
    out = model.apply({"params": optim.merge(trainable, frozen)}, **inputs, num_frames=FRAMES)
    return jnp.mean((out - target) ** 2), {}

  trainable, frozen = optim.split(params, lora.TRAINABLE)
  tx = optax.adam(1e-2)
  state = optim.init_state(trainable, tx, ema=False)
  rng = jax.random.PRNGKey(0)
  step = _compiled(optim.default_train_step(loss_fn, tx, optax.constant_schedule(1e-2), 0.99), state, frozen, {},
                   rng)
  for _ in range(3):
    state, metrics = step(state, frozen, {}, rng)
    assert int(metrics["finite"]) == 1
  before, after = optim.flat_paths(params), optim.flat_paths(optim.merge(state.params, frozen))
  assert set(before) == set(after)
  for k, v in after.items():
    if lora.is_adapter(k):  # B moves at step 1, then A (its gradient is B^T-weighted, zero while B is zero)
      assert not np.array_equal(np.asarray(v), np.asarray(before[k])), k
    else:
      np.testing.assert_array_equal(np.asarray(v), np.asarray(before[k]), err_msg=k)


def test_merged_weights_equal_the_adapters(models):
  base_fwd, lora_fwd, params, _ = models
  live = _live(params)
  merged = lora.merge_lora(live, LORA_TC)
  assert not lora.lora_params(merged)
  out = np.asarray(lora_fwd(live))
  without = {k: v for k, v in optim.flat_paths(live).items() if not lora.is_adapter(k)}
  plain = np.asarray(base_fwd(traverse_util.unflatten_dict(without, sep="/")))
  assert np.abs(out - plain).max() > 1e-2  # the adapters are live
  np.testing.assert_allclose(np.asarray(base_fwd(merged)), out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "conv3d", "conv2d_strided"])
def test_merge_single_layer(kind):
  """Each adapter kind folds exactly, including a conv whose strides / padding the adapter must share."""
  if kind == "dense":
    make = lambda rank: layers.dense(6, name="to_q", lora_rank=rank, lora_alpha=3.0)  # noqa: E731
    x = np.random.default_rng(0).standard_normal((2, 5, 7)).astype(np.float32)
  elif kind == "conv3d":
    make = lambda rank: layers.conv(6, (3, 1, 1), name="conv1", lora_rank=rank, lora_alpha=3.0)  # noqa: E731
    x = np.random.default_rng(0).standard_normal((2, 4, 3, 3, 7)).astype(np.float32)
  else:
    make = lambda rank: layers.conv(6, (3, 3), strides=(2, 2), padding=[(0, 1), (0, 1)], name="conv",  # noqa: E731
                                    lora_rank=rank, lora_alpha=3.0)
    x = np.random.default_rng(0).standard_normal((2, 5, 5, 7)).astype(np.float32)
  params = nn.meta.unbox(make(2).init(jax.random.PRNGKey(0), x)["params"])
  params["lora"]["lora_b"] = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6)), jnp.float32)
  out = make(2).apply({"params": params}, x)
  merged = lora.merge_lora({"layer": params}, {"rank": 2, "alpha": 3.0})["layer"]
  assert set(merged) == {"kernel", "bias"}
  ref = make(0).apply({"params": merged}, x)
  assert np.abs(np.asarray(out) - np.asarray(make(0).apply({"params": {k: params[k] for k in merged}}, x))).max() > 0.1
  np.testing.assert_allclose(np.asarray(ref), np.asarray(out), rtol=0, atol=1e-5)


def test_save_load_apply_round_trip(models, tmp_path):
  *_, params, _ = models
  live = _live(params)
  path = str(tmp_path / "motion.safetensors")
  written = lora.save_lora(path, live, LORA_TC)
  with safe_open(path, framework="numpy") as f:
    keys, meta = set(f.keys()), f.metadata()
  assert keys == set(lora.lora_params(params)) == set(written)
  assert meta["rank"] == "4" and meta["convs"] == "true" and float(meta["alpha"]) == 8.0
  adapters, info = lora.load_lora(path)
  assert info == {"rank": 4, "alpha": 8.0, "convs": True}
  # Into the freshly initialised tree: exactly the saved adapters, the rest untouched.
  applied = optim.flat_paths(lora.apply_lora(params, adapters))
  fresh, saved = optim.flat_paths(params), optim.flat_paths(live)
  assert set(applied) == set(fresh)
  for k, v in applied.items():
    np.testing.assert_array_equal(np.asarray(v), np.asarray(saved[k] if lora.is_adapter(k) else fresh[k]), err_msg=k)
  assert lora.merge_lora(live, info).keys() == lora.merge_lora(live, LORA_TC).keys()

  key = "up_blocks_1/attentions_0/temporal_transformer_blocks_0/attn2/to_v/lora/lora_b"
  with pytest.raises(ValueError, match=f"{key} has shape"):
    lora.apply_lora(params, dict(adapters, **{key: np.zeros((RANK + 1, 64), np.float32)}))
  with pytest.raises(ValueError, match=f"{key} is missing"):
    lora.apply_lora(params, {k: v for k, v in adapters.items() if k != key})
  with pytest.raises(ValueError, match="up_blocks_1/extra/lora/lora_a is not in the params"):
    lora.apply_lora(params, dict(adapters, **{"up_blocks_1/extra/lora/lora_a": np.zeros((2, 2), np.float32)}))
  with pytest.raises(ValueError, match="conv_in/kernel is not an adapter"):
    lora.apply_lora(params, dict(adapters, **{"conv_in/kernel": np.zeros((3, 3, 4, 32), np.float32)}))
  # A rank-0 tree has no adapters to receive; a file without adapters is refused.
  with pytest.raises(ValueError, match="is not in the params"):
    lora.apply_lora(lora.merge_lora(live, LORA_TC), adapters)
  with pytest.raises(ValueError, match="no adapter"):
    lora.save_lora(str(tmp_path / "none.safetensors"), lora.merge_lora(live, LORA_TC), LORA_TC)
  with pytest.raises(ValueError, match="lora_convs=False"):
    lora.save_lora(str(tmp_path / "x.safetensors"), live, dataclasses.replace(LORA_TC, lora_convs=False))


def test_config_validation():
  with pytest.raises(ValueError, match="lora_convs needs"):
    TemporalConfig(lora_convs=True)
  with pytest.raises(ValueError, match="lora_rank=-1"):
    TemporalConfig(lora_rank=-1)
  assert TemporalConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(LORA_TC)))) == LORA_TC
  assert layers.lora_scale(4, 0.0) == 1.0 and layers.lora_scale(4, 8.0) == 2.0
