"""``implementation="blockwise"``: flash-style attention in plain JAX against ``jax.nn.dot_product_attention`` (values,
masks, fully masked rows, gradients, bf16), its wiring through the U-Net and the VAE, and the memory it saves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from videoldm_jax.models import layers
from videoldm_jax.models import unet as unet_lib
from videoldm_jax.models import vae as vae_lib
from videoldm_jax.models.temporal import TemporalConfig, frame_window_mask


def _rel_err(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _qkv(b, nq, nk, h, d, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((b, nq, h, d), (b, nk, h, d), (b, nk, h, d)))


def _masks(b, h, nq, nk, seed=0):
  """None, a temporal window (self-attention only), a random per-example mask with one fully masked row, a key
  padding mask per head."""
  rng = np.random.default_rng(seed)
  dense_mask = rng.random((b, 1, nq, nk)) > 0.4
  dense_mask[0, 0, 1] = False
  masks = {"none": None, "random": jnp.asarray(dense_mask),
           "keys": jnp.asarray(rng.random((1, h, 1, nk)) > 0.3)}
  if nq == nk:
    masks["window"] = frame_window_mask(nq, 2)
  return masks


def _attention(impl, mask, q_block=None, kv_block=None):
  if impl == "blockwise":
    return lambda q, k, v: layers.blockwise_attention(q, k, v, mask, q_block=q_block, kv_block=kv_block)
  return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask)


def _loss(attend):
  return lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v).astype(jnp.float32)))


def _outputs_and_grads(impl, masks, q_block=None, kv_block=None):
  """One jitted function (one compile) giving, per mask, the output and the gradient of ``sum(sin(out))``."""
  def run(q, k, v):
    results = {}
    for name, mask in masks.items():
      out, vjp = jax.vjp(_attention(impl, mask, q_block, kv_block), q, k, v)
      results[name] = (out, vjp(jnp.cos(out.astype(jnp.float32)).astype(out.dtype)))
    return results
  return jax.jit(run)


# (b, n_q, n_k, heads, head_dim, q_block, kv_block): ragged self-attention, cross-attention with ragged key blocks,
# and the default blocks clipped to a short sequence (text cross-attention).
SHAPES = [(2, 37, 37, 3, 8, 16, 16), (2, 50, 7, 2, 16, 16, 3), (1, 24, 77, 1, 40, None, None)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
def test_values_and_gradients_match_xla(shape):
  b, nq, nk, h, d, qb, kb = shape
  q, k, v = _qkv(b, nq, nk, h, d)
  masks = _masks(b, h, nq, nk)
  refs = _outputs_and_grads(None, masks)(q, k, v)
  results = _outputs_and_grads("blockwise", masks, qb, kb)(q, k, v)
  for name in masks:
    (out, grads), (ref, ref_grads) = results[name], refs[name]
    assert out.shape == ref.shape and out.dtype == jnp.float32
    assert _rel_err(out, ref) < 1e-5, name
    for g, r, what in zip(grads, ref_grads, "qkv"):
      assert _rel_err(g, r) < 2e-5, (name, what)


def test_fully_masked_row_is_the_mean_of_the_values():
  # As jax.nn.dot_product_attention: masked logits are a large finite negative, so an all-False row attends
  # uniformly to every real key (no NaN, padding keys excluded) and passes no gradient to q.
  q, k, v = _qkv(1, 5, 7, 2, 4)
  mask = jnp.ones((1, 1, 5, 7), bool).at[0, 0, 2].set(False)
  # 7 keys -> 3 blocks of 3, 2 of them padding
  out, (dq, _, _) = _outputs_and_grads("blockwise", {"row": mask}, 2, 3)(q, k, v)["row"]
  np.testing.assert_allclose(out[0, 2], v[0].mean(0), rtol=1e-5, atol=1e-6)
  assert np.all(np.isfinite(dq)) and np.all(np.asarray(dq[0, 2]) == 0)
  everything_masked = jnp.zeros((1, 1, 1, 7), bool)
  np.testing.assert_allclose(jax.jit(_attention("blockwise", everything_masked, None, 3))(q, k, v),
                             jax.nn.dot_product_attention(q, k, v, mask=everything_masked), rtol=1e-5, atol=1e-6)


def test_bfloat16_as_accurate_as_xla():
  # bf16 in, bf16 out, fp32 statistics: the error against the fp32 result is XLA's own bf16 error (observed equal).
  b, nq, nk, h, d = 2, 150, 70, 2, 40
  q, k, v = _qkv(b, nq, nk, h, d, seed=1)
  masks = {"random": _masks(b, h, nq, nk, seed=1)["random"]}
  bf = lambda *xs: tuple(x.astype(jnp.bfloat16) for x in xs)
  exact, exact_grads = _outputs_and_grads(None, masks)(q, k, v)["random"]
  xla, xla_grads = _outputs_and_grads(None, masks)(*bf(q, k, v))["random"]
  out, grads = _outputs_and_grads("blockwise", masks, 64, 32)(*bf(q, k, v))["random"]
  assert out.dtype == jnp.bfloat16
  assert _rel_err(out, exact) <= 1.5 * _rel_err(xla, exact) + 1e-3 and _rel_err(out, xla) < 1e-2
  for g, x, e in zip(grads, xla_grads, exact_grads):
    assert g.dtype == jnp.bfloat16 and _rel_err(g, e) <= 1.5 * _rel_err(x, e) + 1e-3


def test_implementation_option_is_validated():
  q = jnp.zeros((1, 4, 8))
  with pytest.raises(ValueError, match=r"implementation='flash'.*'blockwise'"):
    layers.dot_product_attention(q, q, q, num_heads=2, implementation="flash")
  with pytest.raises(ValueError, match=r"UNetConfig.attention_implementation='flash'.*'blockwise'"):
    unet_lib.tiny(attention_implementation="flash")
  assert unet_lib.tiny(attention_implementation="blockwise").attention_implementation == "blockwise"


def test_video_unet_blockwise_equals_xla(monkeypatch):
  # Small blocks so that every attention of the tiny video model is split: spatial self-attention (64 and 16
  # tokens), text cross-attention (5 tokens) and windowed temporal attention (3 frames, ragged: 2 blocks of 2).
  monkeypatch.setattr(layers, "BLOCKWISE_Q_BLOCK", 16)
  monkeypatch.setattr(layers, "BLOCKWISE_KV_BLOCK", 2)
  temporal = TemporalConfig(zero_init=False, max_frame_distance=1)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, 3, 8, 8, 4)), jnp.float32)
  ts, ctx = jnp.asarray([500.0]), jnp.asarray(rng.standard_normal((1, 5, 32)), jnp.float32)
  # Random params from the abstract tree (cheaper than compiling init).
  params = jax.tree.map(lambda p: jnp.asarray(0.1 * rng.standard_normal(p.value.shape), jnp.float32),
                        unet_lib.abstract_params(unet_lib.tiny(temporal=temporal)),
                        is_leaf=lambda p: hasattr(p, "value"))
  calls = []
  blockwise = layers.blockwise_attention
  monkeypatch.setattr(layers, "blockwise_attention", lambda *a, **kw: calls.append(1) or blockwise(*a, **kw))
  outs = {}
  for impl in ("xla", "blockwise"):
    model = unet_lib.UNet(unet_lib.tiny(temporal=temporal, attention_implementation=impl))
    outs[impl] = jax.jit(model.apply)({"params": params}, x, ts, ctx)
  assert outs["xla"].shape == x.shape
  paths = jax.tree_util.tree_flatten_with_path(params)[0]
  num_attention = sum(1 for path, _ in paths if "to_q" in jax.tree_util.keystr(path))
  assert num_attention >= 8 and len(calls) == num_attention  # every attention layer went blockwise
  assert _rel_err(outs["blockwise"], outs["xla"]) < 1e-5


def test_vae_mid_block_attention_blockwise_equals_xla(monkeypatch):
  monkeypatch.setattr(layers, "BLOCKWISE_Q_BLOCK", 16)
  monkeypatch.setattr(layers, "BLOCKWISE_KV_BLOCK", 24)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 7, 16)), jnp.float32)  # 42 pixels
  params = jax.jit(vae_lib.Attention(num_groups=4).init)(jax.random.PRNGKey(0), x)
  ref = jax.jit(vae_lib.Attention(num_groups=4).apply)(params, x)
  out = jax.jit(vae_lib.Attention(num_groups=4, implementation="blockwise").apply)(params, x)
  assert _rel_err(out - x, ref - x) < 1e-5


def test_blockwise_compiles_to_less_temporary_memory():
  # Compile only: n = 4096 tokens, one 64-dim head. XLA holds the [4096, 4096] fp32 scores (64 MiB, and the
  # probabilities besides); blockwise holds [512, 1024] blocks. The backward pass saves no score matrix either.
  x = jax.ShapeDtypeStruct((1, 4096, 64), jnp.float32)

  def temp_bytes(impl, grad):
    attend = lambda q, k, v: layers.dot_product_attention(q, k, v, num_heads=1, implementation=impl)
    fn = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) ** 2), (0, 1, 2)) if grad else attend
    return jax.jit(fn).lower(x, x, x).compile().memory_analysis().temp_size_in_bytes

  for grad in (False, True):
    blockwise, xla = temp_bytes("blockwise", grad), temp_bytes("xla", grad)
    assert blockwise < 4096 * 4096 * 4 / 2 and blockwise < xla / 4, (grad, blockwise, xla)


def _lowered_text(impl, tokens, platform):
  y = jax.ShapeDtypeStruct((1, tokens, 64), jnp.float32)
  attend = lambda q, k, v: layers.dot_product_attention(q, k, v, num_heads=1, implementation=impl)
  return jax.jit(attend).trace(y, y, y).lower(lowering_platforms=(platform,)).as_text()


def test_default_runs_huge_attention_blockwise():
  """implementation=None switches to blockwise at ``AUTO_BLOCKWISE_SCORES`` logits (8192 tokens of self-attention:
  a pixel upsampler's bottleneck at 128x256, SVD's first level), seen in the program lowered for TPU (blockwise is
  a loop; XLA's attention is none). On CPU None is blockwise from ``CPU_BLOCKWISE_TOKENS``."""
  assert 8192 * 8192 >= layers.AUTO_BLOCKWISE_SCORES > 4096 * 4096
  assert "stablehlo.while" in _lowered_text(None, 8192, "tpu")
  assert "stablehlo.while" not in _lowered_text(None, 4096, "tpu")  # below the threshold: XLA's attention
  assert "stablehlo.while" not in _lowered_text("xla", 8192, "tpu")
  assert "stablehlo.while" in _lowered_text(None, layers.CPU_BLOCKWISE_TOKENS, "cpu")
  assert "stablehlo.while" not in _lowered_text(None, layers.CPU_BLOCKWISE_TOKENS - 1, "cpu")


@pytest.mark.parametrize("shape", [(2, 600, 520, 2, 8), (2, 37, 77, 3, 8), (3, 5, 5, 2, 4)],
                         ids=["blockwise", "one_piece", "frames"])
def test_cpu_default_matches_xla(shape):
  """The CPU default (heads-major; blockwise in CPU blocks from ``CPU_BLOCKWISE_TOKENS``): values and gradients
  equal XLA's attention, with every mask kind, through ``dot_product_attention``'s [b, n, h * d] interface."""
  b, nq, nk, h, d = shape
  q, k, v = (x.reshape(x.shape[0], x.shape[1], h * d) for x in _qkv(b, nq, nk, h, d, seed=2))
  masks = _masks(b, h, nq, nk, seed=2)

  def run(impl):
    def fn(q, k, v):
      results = {}
      for name, mask in masks.items():
        attend = lambda q, k, v: layers.dot_product_attention(q, k, v, num_heads=h, mask=mask, implementation=impl)
        results[name] = jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(attend(*a))), (0, 1, 2))(q, k, v)
        results[name + "/out"] = attend(q, k, v)
      return results
    return jax.jit(fn)(q, k, v)

  cpu, xla = run(None), run("xla")
  for name in masks:
    assert _rel_err(cpu[name + "/out"], xla[name + "/out"]) < 1e-5, name
    for g, r, what in zip(cpu[name][1], xla[name][1], "qkv"):
      assert _rel_err(g, r) < 2e-5, (name, what)


@pytest.mark.parametrize("shape", [(3, 8, 8, 8, 40), (2, 5, 16, 3, 8), (1, 32, 32, 2, 16)],
                         ids=["frames", "cross", "threshold"])
def test_short_attention_matches_xla(shape):
  """Attention over a few tokens as a multiply-reduce (TPU / GPU default for temporal attention): values and
  gradients equal XLA's attention with every mask kind (a fully masked row included)."""
  b, nq, nk, h, d = shape
  q, k, v = _qkv(b, nq, nk, h, d, seed=3)
  masks = _masks(b, h, nq, nk, seed=3)

  def run(attend):
    def fn(q, k, v):
      out = {}
      for name, mask in masks.items():
        f = lambda q, k, v: attend(q, k, v, mask)
        out[name] = (f(q, k, v), jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), (0, 1, 2))(q, k, v))
      return out
    return jax.jit(fn)(q, k, v)

  short = run(layers._short_attention)  # pylint: disable=protected-access
  xla = run(lambda q, k, v, mask: jax.nn.dot_product_attention(q, k, v, mask=mask))
  for name in masks:
    assert _rel_err(short[name][0], xla[name][0]) < 1e-5, name
    for g, r, what in zip(short[name][1], xla[name][1], "qkv"):
      assert _rel_err(g, r) < 2e-5, (name, what)


def test_default_runs_short_attention_without_matmuls_on_tpu():
  """The TPU program of the default (and of "splash", whose kernel is for long sequences) has no dot_general for
  attention over up to ``SHORT_ATTENTION_TOKENS`` tokens, one above it does; "xla" keeps XLA's attention."""
  n = layers.SHORT_ATTENTION_TOKENS
  assert "dot_general" not in _lowered_text(None, n, "tpu")
  assert "dot_general" not in _lowered_text("splash", n, "tpu")
  assert "dot_general" in _lowered_text(None, n + 1, "tpu")
  assert "dot_general" in _lowered_text("xla", n, "tpu")
