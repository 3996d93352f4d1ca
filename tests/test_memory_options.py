"""Memory / speed options: U-Net remat policies (names -> jax.checkpoint policies, same values and gradients), the
frozen backbone stored in bf16 (half the frozen bytes, trainable state stays fp32) and their config validation."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from configs import rds
from videoldm_jax import aot, checkpoint, optim, parallel, plan, tasks
from videoldm_jax.models import layers
from videoldm_jax.models import unet as unet_lib


def test_remat_names():
  assert unet_lib.remat_name(False) == "none" and unet_lib.remat_name(True) == "full"
  assert unet_lib.UNetConfig(remat=True).remat == "full"
  assert unet_lib.UNetConfig(remat="dots").remat == "dots"
  with pytest.raises(ValueError, match=r"UNetConfig.remat='some'"):
    unet_lib.UNetConfig(remat="some")


def test_dots_policy_keeps_matmuls_and_convs_only():
  policy = unet_lib.REMAT_POLICIES["dots"]
  assert policy(lax.dot_general_p) and policy(lax.conv_general_dilated_p)
  assert not policy(lax.exp_p) and not policy(lax.add_p) and not policy(lax.logistic_p)
  # On a real function: with the policy the residuals of the backward pass are the matmul outputs only.
  w = jnp.ones((8, 8))
  f = lambda x: jnp.sum(jnp.tanh(jnp.tanh(x @ w) @ w))
  from jax._src.ad_checkpoint import saved_residuals  # pylint: disable=g-import-not-at-top
  names = [why for _, why in saved_residuals(jax.checkpoint(f, policy=policy), jnp.ones((4, 8)))]
  full = [why for _, why in saved_residuals(jax.checkpoint(f), jnp.ones((4, 8)))]
  assert sum("dot_general" in n for n in names) == 2, names
  assert not any("tanh" in n for n in names), names
  assert not any("dot_general" in n for n in full), full


def _max_err(a, b):
  return float(jnp.max(jnp.abs(jnp.asarray(a) - jnp.asarray(b))))


@pytest.mark.parametrize("policy", [True, "dots", "full"])  # True: the boolean form, = "full"
def test_remat_policies_give_same_values_and_gradients(policy):
  # The mid block holds both rematerialised module kinds (ResnetBlock2D, Transformer2DModel); the down / up
  # blocks build them through the same helpers.
  config = unet_lib.tiny()
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 4, 4, 64), np.float32)
  temb = rng.standard_normal((2, config.time_embed_dim), np.float32)
  context = rng.standard_normal((2, 3, config.cross_attention_dim), np.float32)
  shapes = jax.eval_shape(lambda: unet_lib.UNetMidBlock(config).init(jax.random.PRNGKey(0), x, temb, context))
  params = jax.tree.map(lambda v: jnp.asarray(0.2 * rng.standard_normal(v.shape, np.float32)),
                        jax.tree.map(lambda v: getattr(v, "value", v), shapes["params"],
                                     is_leaf=lambda v: hasattr(v, "value")))

  def loss(p, cfg):
    return jnp.mean(unet_lib.UNetMidBlock(cfg).apply({"params": p}, x, temb, context, num_frames=None) ** 2)

  cfg = dataclasses.replace(config, remat=policy)
  jaxpr = str(jax.make_jaxpr(lambda p: loss(p, cfg))(params))
  assert jaxpr.count("remat") == 3, "2 resnets + 1 transformer rematerialised"
  assert "checkpoint[" not in str(jax.make_jaxpr(lambda p: loss(p, config))(params))
  plain = jax.jit(jax.value_and_grad(lambda p: loss(p, config)))(params)
  remat = jax.jit(jax.value_and_grad(lambda p: loss(p, cfg)))(params)
  assert _max_err(plain[0], remat[0]) < 1e-6
  assert max(_max_err(a, b) for a, b in zip(jax.tree.leaves(plain[1]), jax.tree.leaves(remat[1]))) < 1e-6


def test_frozen_bf16_halves_frozen_bytes_in_the_plan():
  config = rds.get_config("stage=base,runlocal")
  fp32 = plan.plan(config)
  config.frozen_dtype = "bfloat16"
  bf16 = plan.plan(config)
  assert bf16["bytes"]["frozen_params"] * 2 == fp32["bytes"]["frozen_params"] > 0
  for key in ("trainable_params", "optimizer_state", "ema"):
    assert bf16["bytes"][key] == fp32["bytes"][key] > 0
  assert "frozen params in bfloat16" in plan.format_table(bf16)


def test_cast_frozen_keeps_non_floats_and_shardings():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  tree = {"w": jnp.ones((2, 2)), "ids": jnp.arange(3), "s": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=sh)}
  out = optim.cast_frozen(tree, "bfloat16")
  assert out["w"].dtype == jnp.bfloat16 and out["ids"].dtype == tree["ids"].dtype
  assert out["s"].dtype == jnp.bfloat16 and out["s"].sharding == sh
  assert optim.cast_frozen(tree, "float32")["w"] is tree["w"]


def test_frozen_dtype_is_validated():
  config = rds.get_config("stage=base,runlocal")
  config.frozen_dtype = "float16"
  with pytest.raises(ValueError, match=r"config.frozen_dtype='float16'"):
    tasks.validate(config)


def test_restore_or_init_stores_frozen_params_in_bf16(tmp_path):
  config = rds.get_config("stage=base,runlocal")
  config.frozen_dtype = "bfloat16"
  config.cpu_fast_compile = True
  config.mesh.ici_data_parallelism = 1
  devices = jax.devices()[:1]
  mesh = parallel.make_mesh(config, devices)
  task = tasks.get(config.stage)(config)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  restored = checkpoint.restore_or_init(config, str(tmp_path), task.init, jax.random.PRNGKey(0), mesh,
                                        parallel.logical_rules(config), task.tx, ckpt,
                                        compiler_options=aot.compiler_options(config))
  ckpt.close()
  frozen_dtypes = {x.dtype for x in jax.tree.leaves(restored.frozen)}
  assert frozen_dtypes == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(restored.state.params)} == {jnp.dtype(jnp.float32)}
  # The frozen params written once for later stages keep full precision.
  meta = checkpoint.tree_metadata(str(tmp_path / "frozen"))
  assert meta and all("float32" in str(getattr(m, "dtype", m)) for m in meta.values())


# ---------------------------------------------------------------------------------------------------------------
# Fused attention: "splash" (Pallas splash kernel on TPU for long self-attention, XLA's attention elsewhere).

def test_splash_only_for_long_self_attention():
  assert layers.splash_applies(2560, 2560, 40, None, True)        # SD 1.5 level 0 at 40x64 latents
  assert layers.splash_applies(640, 640, 80, None, True)          # level 1
  assert not layers.splash_applies(160, 160, 160, None, True)     # lower levels: XLA
  assert not layers.splash_applies(8, 8, 64, None, True)          # temporal attention over 8 frames
  assert not layers.splash_applies(2560, 77, 40, None, False)     # text cross-attention
  assert not layers.splash_applies(2560, 2560, 40, jnp.ones((1, 1, 2560, 2560), bool), True)


def test_splash_falls_back_to_xla_off_tpu():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 1024, 32), np.float32)) for _ in range(3))
  f = lambda impl: jax.value_and_grad(
      lambda q: jnp.sum(layers.dot_product_attention(q, k, v, num_heads=2, implementation=impl,
                                                     self_attention=True) ** 2))(q)
  (a, ga), (b, gb) = f(None), f("splash")
  assert _max_err(a, b) < 1e-5 * abs(float(a)) and _max_err(ga, gb) < 1e-5


@pytest.mark.parametrize("shape", [(1, 1024, 2, 40), (1, 3072, 1, 16)])  # whole-sequence blocks; 512-token ones
def test_splash_kernel_matches_xla_attention_in_the_pallas_interpreter(shape):
  """The TPU path itself (the scale, sequence-minor q / k / v, whole-sequence key blocks, the fused backward
  kernel), run by Pallas' interpreter on CPU: values and gradients equal XLA's attention."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(3))
  loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
  splash = functools.partial(layers._splash_attention, interpret=True)  # pylint: disable=protected-access
  (a, ga), (b, gb) = (jax.value_and_grad(loss(f), argnums=(0, 1, 2))(q, k, v)
                      for f in (splash, jax.nn.dot_product_attention))
  assert abs(float(a) - float(b)) < 1e-4 * max(1.0, abs(float(b)))
  for x, y in zip(ga, gb):
    assert _max_err(x, y) < 1e-4 * float(jnp.max(jnp.abs(y))), _max_err(x, y)


@pytest.mark.skipif(not aot.libtpu_available(), reason="libtpu not installed (pip install 'jax[tpu]')")
def test_splash_compiles_for_tpu_and_saves_memory():
  devices = aot.topology_devices("v5p-8")
  mesh = jax.sharding.Mesh(np.asarray(devices).reshape(4, 1, 1), parallel.MESH_AXES)
  x = jax.ShapeDtypeStruct((8, 2048, 160), jnp.bfloat16, sharding=parallel.batch_sharding(mesh, 3))

  def compiled(impl):
    def loss(q, k, v):
      return jnp.sum(layers.dot_product_attention(q, k, v, num_heads=4, implementation=impl,
                                                  self_attention=True).astype(jnp.float32) ** 2)
    # conftest asks for "highest" matmul precision (fp32 parity tests); bf16 kernels run at the default one.
    with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
      lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x)
    return lowered.as_text(), lowered.compile(), lowered

  text, splash, lowered = compiled("splash")
  xla_text, xla, _ = compiled(None)
  assert "tpu_custom_call" in text and "tpu_custom_call" not in xla_text
  # What the planner adds to the compiler's estimate: the forward (2 matmuls) and the fused backward (5) kernel on
  # each device's 2 clips x 4 heads x 2048 tokens, the 40-dim head run in a 128-lane MXU tile.
  kernels = aot.pallas_kernels(splash)
  assert aot.count_pallas_kernels(xla) == 0
  assert sorted(k.name for k in kernels) == ["splash_mha_dkv_no_residuals", "splash_mha_fwd_residuals"], kernels
  assert all(k.source == "shapes" and k.bytes > 3 * 2 * 4 * 2048 * 40 * 2 for k in kernels)
  assert sum(k.flops for k in kernels) == (2 + 5) * 2 * 2 * 4 * 2048 * 2048 * 128
  report = aot.compile_report(lowered, "v5p-8")
  assert report.pallas_kernels == 2 and report.pallas_uncosted == 0 and report.roofline_term_added
  assert report.pallas_seconds == pytest.approx(sum(k.seconds(aot.CHIPS["v5p"]) for k in kernels), rel=1e-9)
  assert report.estimated_seconds > report.compiler_seconds
  # The kernel never materialises the [b, heads, n, n] logits.
  assert splash.memory_analysis().temp_size_in_bytes < xla.memory_analysis().temp_size_in_bytes / 2
