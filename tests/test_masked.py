"""Mask conditioning (``temporal_cond``) of the predictor / interpolator U-Net and their task (context guidance,
training masks, config checks); their runlocal training runs are in test_train_masked.py.

The ``temporal_cond_proj`` projections and the last conv of each temporal ResBlock are zero-initialised, which
hides any effect of the conditioning at init; tests that need the conditioning to act perturb them first
(``_perturb``; a trained base model has a non-zero ``conv2``).
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import rds, webvid
from videoldm_jax import optim, tasks
from videoldm_jax.models import unet as unet_lib
from videoldm_jax.models.temporal import TemporalConfig

T = 4
# XLA -O0 on CPU: these tiny graphs are compile-bound.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST if jax.default_backend() == "cpu" else None)


def _perturb(params, scale=0.3, seed=0):
  """Random values in every zero-initialised temporal_cond projection and temporal ResBlock output conv."""
  flat = traverse_util.flatten_dict(params, sep="/")
  rng = np.random.default_rng(seed)
  for k, v in flat.items():
    if "temporal_cond_proj" in k or "temporal_res/conv2" in k:
      flat[k] = jnp.asarray(rng.normal(0, scale, v.shape), v.dtype)
  return traverse_util.unflatten_dict(flat, sep="/")


@pytest.fixture(scope="module")
def tiny():
  """A tiny mask-conditioned video U-Net with two regimes, its params (perturbed) and inputs."""
  cfg = unet_lib.tiny(temporal=TemporalConfig(mask_conditioning=True, num_regimes=2))
  model = unet_lib.UNet(cfg)
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(k[0], (2, T, 8, 8, 4))
  z0 = jax.random.normal(k[1], (2, T, 8, 8, 4))
  ctx = jax.random.normal(k[2], (2, 2, 32))
  ts = jnp.array([100, 700])
  params = nn.meta.unbox(jit(model.init)(k[3], x, ts, ctx)["params"])
  apply = jit(lambda p, z, m, lvl=None, reg=None: model.apply(
      {"params": p}, x, ts, ctx, cond_latents=z, cond_mask=m, cond_noise_level=lvl, cond_regime=reg))
  uncond = jit(lambda p: model.apply({"params": p}, x, ts, ctx))
  return dict(cfg=cfg, model=model, params=params, perturbed=_perturb(params), x=x, z0=z0, ctx=ctx, ts=ts,
              apply=apply, uncond=uncond)


def test_param_tree_only_adds_temporal_cond(tiny):
  base = unet_lib.abstract_params(dataclasses.replace(tiny["cfg"], temporal=TemporalConfig()))
  flat_base = traverse_util.flatten_dict(base, sep="/")
  flat = traverse_util.flatten_dict(tiny["params"], sep="/")
  new = set(flat) - set(flat_base)
  assert set(flat_base) <= set(flat)
  assert new and all("temporal_cond" in k for k in new)
  assert any(k.startswith("temporal_cond/regime_embedding") for k in new)
  assert any("temporal_res/temporal_cond_proj" in k for k in new)
  # The default trainable regex covers every new param.
  assert set(optim.flat_paths(optim.split(tiny["params"], ".*temporal.*")[0])) >= new


def test_known_frames_condition_the_output(tiny):
  p, z0, apply = tiny["perturbed"], tiny["z0"], tiny["apply"]
  mask = jnp.array([[1, 1, 0, 0], [1, 1, 0, 0]], jnp.float32)
  out = apply(p, z0, mask)
  # A known frame's latent matters ...
  z_known = z0.at[:, 1].add(1.0)
  assert float(jnp.abs(apply(p, z_known, mask) - out).max()) > 1e-3
  # ... an unknown frame's does not (m * z0 = 0), bit for bit.
  z_unknown = z0.at[:, 3].add(5.0)
  np.testing.assert_array_equal(np.asarray(apply(p, z_unknown, mask)), np.asarray(out))
  # The conditioning is active at all: the unconditional output differs.
  assert float(jnp.abs(tiny["uncond"](p) - out).max()) > 1e-3


def test_no_context_equals_all_zero_mask(tiny):
  p, apply = tiny["perturbed"], tiny["apply"]
  zeros = jnp.zeros((2, T), jnp.float32)
  ref = np.asarray(tiny["uncond"](p))
  np.testing.assert_array_equal(np.asarray(apply(p, tiny["z0"], zeros)), ref)
  np.testing.assert_array_equal(np.asarray(apply(p, 3.0 * tiny["z0"] + 1.0, zeros)), ref)  # z0 ignored


def test_regime_and_noise_level_change_the_output(tiny):
  p, z0, apply = tiny["perturbed"], tiny["z0"], tiny["apply"]
  mask = jnp.array([[1, 0, 0, 1], [1, 0, 0, 1]], jnp.float32)
  r0 = apply(p, z0, mask, jnp.zeros(2), jnp.zeros(2, jnp.int32))
  r1 = apply(p, z0, mask, jnp.zeros(2), jnp.ones(2, jnp.int32))
  l1 = apply(p, z0, mask, jnp.full((2,), 250.0), jnp.zeros(2, jnp.int32))
  assert float(jnp.abs(r1 - r0).max()) > 1e-3
  assert float(jnp.abs(l1 - r0).max()) > 1e-3


def test_base_params_give_the_base_output(tiny):
  """Zero-init: a key-frame model's params in a predictor (new temporal_cond params fresh) = the base model."""
  base_cfg = dataclasses.replace(tiny["cfg"], temporal=TemporalConfig())
  base = unet_lib.UNet(base_cfg)
  x, ts, ctx = tiny["x"], tiny["ts"], tiny["ctx"]
  base_params = nn.meta.unbox(jit(base.init)(jax.random.PRNGKey(7), x, ts, ctx)["params"])
  flat = traverse_util.flatten_dict(tiny["params"], sep="/")  # fresh predictor params (unperturbed)
  flat.update(traverse_util.flatten_dict(base_params, sep="/"))
  loaded = traverse_util.unflatten_dict(flat, sep="/")
  ref = jit(base.apply)({"params": base_params}, x, ts, ctx)
  mask = jnp.array([[1, 1, 0, 0], [1, 0, 0, 0]], jnp.float32)
  out = tiny["apply"](loaded, tiny["z0"], mask, jnp.array([0.0, 100.0]), jnp.array([0, 1]))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_image_and_base_models_do_not_take_mask_inputs(tiny):
  base = unet_lib.UNet(dataclasses.replace(tiny["cfg"], temporal=TemporalConfig()))
  with pytest.raises(ValueError, match="mask_conditioning"):
    base.init(jax.random.PRNGKey(0), tiny["x"], tiny["ts"], tiny["ctx"], cond_mask=jnp.ones((2, T)))
  with pytest.raises(ValueError, match="num_regimes"):
    TemporalConfig(num_regimes=2)


# ----------------------------------------------------------------------------------------------------------
# The task: context guidance, config checks.

@pytest.fixture(scope="module")
def predictor():
  config = rds.get_config("stage=predictor,runlocal")
  config.data.num_frames = T
  task = tasks.get("predictor")(config)
  params = _perturb(nn.meta.unbox(jit(task.init)(jax.random.PRNGKey(0))))
  return task, params


def test_context_guidance_scales(predictor):
  task, params = predictor
  b = 2
  z = jax.random.normal(jax.random.PRNGKey(1), (b, T, 4, 8, 4))
  x = jax.random.normal(jax.random.PRNGKey(2), (b, T, 4, 8, 4))
  t = jnp.array([300, 600])
  batch = {"labels": {"day_night": jnp.array([0, 1]), "crowdedness": jnp.array([2, 3])}}
  mask = task.context_mask(jnp.array([2, 2]), T)
  level = jnp.zeros((b,), jnp.int32)

  @functools.partial(jit, static_argnums=(0, 1))
  def guided(s_y, s_c):
    return task.guided_model_fn(params, batch, z, mask, guidance_scale=s_y, context_guidance=s_c)(x, t)

  @functools.partial(jit, static_argnums=1)
  def direct(m, labels_on):
    b_ = batch if labels_on else task.null_condition(batch)
    return task.denoise(params, x, t, task.context(params, b_), **task.unet_cond(z, m, level, None))

  cond, uncond = direct(mask, True), direct(jnp.zeros_like(mask), True)
  assert float(jnp.abs(cond - uncond).max()) > 1e-3
  np.testing.assert_allclose(guided(1.0, 1.0), cond, atol=1e-5)
  np.testing.assert_allclose(guided(1.0, 0.0), uncond, atol=1e-5)
  np.testing.assert_allclose(guided(1.0, 2.5), uncond + 2.5 * (cond - uncond), atol=1e-4)
  # Composed with label CFG (labels inner, context outer).
  null_off = direct(jnp.zeros_like(mask), False)
  want = null_off + 2.0 * (uncond - null_off) + 1.5 * (cond - uncond)
  np.testing.assert_allclose(guided(2.0, 1.5), want, atol=1e-4)
  np.testing.assert_allclose(guided(2.0, 0.0), null_off + 2.0 * (uncond - null_off), atol=1e-4)
  # Context scale 1: no context term; label CFG with the context frames present (two U-Net passes).
  null_on = direct(mask, False)
  assert float(jnp.abs(null_on - null_off).max()) > 1e-3
  np.testing.assert_allclose(guided(2.0, 1.0), null_on + 2.0 * (cond - null_on), atol=1e-4)


def test_training_masks(predictor):
  task, _ = predictor
  masks = np.asarray(task.sample_training_mask(jax.random.PRNGKey(0), 2000))
  s = masks.sum(1)
  # First S frames known, S in {0, 1, 2} with the configured probabilities.
  np.testing.assert_array_equal(masks, (np.arange(T)[None] < s[:, None]).astype(np.float32))
  np.testing.assert_allclose(np.bincount(s.astype(int), minlength=3) / 2000, task.config.masked.context_probs,
                             atol=0.04)
  levels = np.asarray(task.sample_training_level(jax.random.PRNGKey(1), 2000))
  assert levels.min() == 0 and levels.max() <= task.config.masked.cond_aug_max_level
  assert abs((levels > 0).mean() - task.config.masked.cond_aug_prob) < 0.04


@pytest.mark.parametrize("stage, key, value, match", [
    ("predictor", "masked.context_probs", (0.5, 0.5, 0.5), r"config\.masked\.context_probs"),
    ("predictor", "masked.context_probs", (0.5, 0.5), r"config\.masked\.context_probs"),
    ("predictor", "masked.cond_aug_prob", 1.5, r"config\.masked\.cond_aug_prob"),
    ("predictor", "masked.cond_aug_max_level", 1000, r"config\.masked\.cond_aug_max_level"),
    ("predictor", "sampling.context_guidance", -1.0, r"config\.sampling\.context_guidance"),
    ("predictor", "model.temporal", None, r"config\.model\.temporal\.mask_conditioning"),
    ("interpolator", "data.num_frames", 8, r"config\.data\.num_frames"),
    ("interpolator", "masked.stride", 1, r"config\.data\.num_frames"),
    ("interpolator", "data.fps", (7.5, 15.0), r"config\.data\.fps"),
    ("interpolator", "masked.regime_fps", (7.5,), r"config\.model\.temporal\.num_regimes"),
])
def test_bad_mask_settings_name_the_key(stage, key, value, match):
  config = rds.get_config(f"stage={stage},runlocal")
  tasks.validate(config)
  section, _, leaf = key.rpartition(".")
  config[section][leaf] = value
  with pytest.raises(ValueError, match=match):
    tasks.validate(config)


def test_stage_configs():
  for get, arg in ((rds.get_config, "stage=predictor"), (rds.get_config, "stage=interpolator"),
                   (webvid.get_config, "stage=predictor"), (webvid.get_config, "stage=interpolator"),
                   (webvid.get_config, "stage=interpolator,runlocal")):
    c = get(arg)
    tasks.validate(c)
    assert c.model.temporal["mask_conditioning"]
  assert webvid.get_config("stage=interpolator").trainable == r"unet/.*"  # the T2V interpolator trains all
  assert rds.get_config("stage=interpolator").trainable == ".*temporal.*"
  assert rds.get_config("stage=interpolator").data.num_frames == 13  # 4 key frames, 3 new frames between


def test_out_of_range_regimes_are_refused():
  """A regime id the interpolator has no embedding for is an error (concrete ids) or NaN features (traced ids,
  which the train loop's non-finite check stops on), never silently the nearest regime; an fps of no regime
  maps to such an id."""
  from videoldm_jax.models.temporal import TemporalConditionEncoder  # pylint: disable=g-import-not-at-top
  enc = TemporalConditionEncoder(level_channels=(8, 16), embed_dim=16, num_regimes=2)
  cond, level = jnp.zeros((2, 8, 8, 5)), jnp.zeros((2,), jnp.int32)
  params = enc.init(jax.random.PRNGKey(0), cond, level, jnp.zeros((2,), jnp.int32))
  ok = enc.apply(params, cond, level, jnp.array([0, 1]))
  assert all(np.isfinite(np.asarray(f)).all() for f in ok)
  with pytest.raises(ValueError, match=r"regime labels \[2\] out of range.*num_regimes=2"):
    enc.apply(params, cond, level, jnp.array([0, 2]))
  traced = jax.jit(lambda r: enc.apply(params, cond, level, r))(jnp.array([0, -1]))
  assert np.isfinite(np.asarray(traced[0][0])).all() and np.isnan(np.asarray(traced[0][1])).all()
  config = rds.get_config("stage=interpolator,runlocal")
  task = tasks.get("interpolator")(config)
  ids = task.regime({"fps": jnp.array([7.5, 30.0, 15.0])}, 3)
  np.testing.assert_array_equal(np.asarray(ids), [0, 1, -1])
