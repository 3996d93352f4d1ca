"""Key-frame clips longer than trained, "convolutionally in time" (paper App. B): ``TemporalConfig.position_window``
(temporal attention over sliding windows, positions relative to the window), and its sampling-time plumbing
(``config.sampling.temporal_window``, ``sampling.sample_workdir(temporal_window=...)``, ``--temporal_window``)."""

import dataclasses
import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from videoldm_jax import sample, sampling, tasks, workdirs
from videoldm_jax.models import attention
from videoldm_jax.models import unet as unet_lib
from videoldm_jax.models.temporal import TemporalConfig, frame_windows


def _random_params(abstract, seed):
  """Non-trivial values everywhere (the temporal layers are far from their identity init)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    shape, name = tuple(leaf.shape), getattr(path[-1], "key", "")
    if name == "kernel":
      return jnp.asarray(rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1])), jnp.float32)
    if name == "scale":
      return jnp.asarray(1.0 + 0.2 * rng.standard_normal(shape), jnp.float32)
    return jnp.asarray(0.2 * rng.standard_normal(shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def _shapes(tree):
  return {jax.tree_util.keystr(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


# ----------------------------------------------------------------------------------------------------------
# The windows.

def test_frame_windows_are_full_and_centred():
  t, w = 11, 4
  win = frame_windows(t, w)
  assert frame_windows(t, t) is None and frame_windows(t, t + 3) is None and frame_windows(t, None) is None
  assert list(win.starts) == list(range(t - w + 1))  # one computation per distinct window
  for i in range(t):
    s = win.starts[win.window_of[i]]
    assert 0 <= s <= t - w and s + win.offset[i] == i  # frame i inside its own full window
    assert s == min(max(i - w // 2, 0), t - w)  # centred where the clip allows


# ----------------------------------------------------------------------------------------------------------
# One video transformer: every frame's output is that of the unwindowed model on its window's sub-clip.

@pytest.mark.parametrize("max_frame_distance", [None, 1])
def test_windowed_transformer_equals_trained_length_model_on_each_window(max_frame_distance):
  """W = T frames per window on a 2T clip: frame i's output is exactly what the T-frame (trained-length) model
  gives on the sub-clip of i's window, at i's place in it (positions 0..T-1, ``max_frame_distance`` masking inside
  the window). Absolute positions (no window) give something else on the frames past T."""
  T, b, hw, c = 4, 2, 2, 32
  t = 2 * T
  temporal = TemporalConfig(zero_init=False, max_frame_distance=max_frame_distance)
  kw = dict(heads=4, head_dim=8, cross_attention_dim=16, norm_num_groups=8)
  plain = attention.Transformer2DModel(temporal=temporal, **kw)
  windowed = attention.Transformer2DModel(temporal=dataclasses.replace(temporal, position_window=T), **kw)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((b, t, hw, hw, c)).astype(np.float32)
  ctx = np.repeat(rng.standard_normal((b, 1, 3, 16)).astype(np.float32), t, axis=1)  # one text per video

  def abstract(model, n):
    return jax.eval_shape(functools.partial(model.init, num_frames=n), jax.random.PRNGKey(0),
                          x[:, :n].reshape(-1, hw, hw, c), ctx[:, :n].reshape(-1, 3, 16))["params"]

  params = _random_params(abstract(plain, T), seed=1)
  assert _shapes(params) == _shapes(abstract(windowed, t))  # the window adds no params

  @functools.partial(jax.jit, static_argnums=0)
  def apply(model, frames):
    n = frames.shape[1]
    out = model.apply({"params": params}, frames.reshape(-1, hw, hw, c), ctx[:, :n].reshape(-1, 3, 16),
                      num_frames=n)
    return out.reshape(b, n, hw, hw, c)

  def run(model, frames):
    return np.asarray(apply(model, frames))

  out = run(windowed, x)
  win = frame_windows(t, T)
  for w, s in enumerate(win.starts):
    sub = run(plain, x[:, s:s + T])
    for i in np.flatnonzero(win.window_of == w):
      np.testing.assert_allclose(out[:, i], sub[:, win.offset[i]], atol=2e-5, err_msg=f"frame {i}, window {s}")
  absolute = run(plain, x)
  assert np.abs(absolute[:, T:] - out[:, T:]).max() > 1e-3


# ----------------------------------------------------------------------------------------------------------
# The video U-Net.

@pytest.fixture(scope="module")
def tiny_video():
  """Tiny SD-shaped video U-Net, random temporal layers, per-frame GroupNorm in the temporal ResBlocks (so the
  receptive field in time is bounded: the reference statistics over the clip would couple every frame)."""
  temporal = TemporalConfig(zero_init=False, frame_norm=True)
  cfg = unet_lib.tiny(temporal=temporal)
  params = _random_params(unet_lib.abstract_params(cfg), seed=0)
  ctx = jnp.asarray(np.random.default_rng(2).standard_normal((1, 5, 32)), jnp.float32)

  def apply_fn(window):
    model = unet_lib.UNet(dataclasses.replace(cfg, temporal=dataclasses.replace(temporal, position_window=window)))
    return jax.jit(lambda x: model.apply({"params": params}, x, jnp.full((1,), 500.0), ctx))

  return dict(cfg=cfg, params=params, apply_fn=apply_fn)


def test_window_covering_the_clip_is_the_trained_model(tiny_video):
  """W >= t: the very computation of the model without a window (the same jaxpr, hence the same output bit for bit);
  W < t changes it. The window adds no params."""
  cfg, params = tiny_video["cfg"], tiny_video["params"]
  x = jnp.zeros((1, 3, 8, 8, 4), jnp.float32)

  def jaxpr(window):
    model = unet_lib.UNet(dataclasses.replace(cfg, temporal=dataclasses.replace(cfg.temporal, position_window=window)))
    return str(jax.make_jaxpr(lambda p, x: model.apply({"params": p}, x, jnp.full((1,), 500.0),
                                                       jnp.zeros((1, 5, 32))))(params, x))

  want = jaxpr(None)
  assert jaxpr(3) == want and jaxpr(7) == want
  assert jaxpr(2) != want
  windowed_cfg = dataclasses.replace(cfg, temporal=dataclasses.replace(cfg.temporal, position_window=2))
  assert _shapes(unet_lib.abstract_params(windowed_cfg)) == _shapes(params)


def test_long_clip_has_a_bounded_temporal_receptive_field(tiny_video):
  """A 2T-frame clip with W-frame windows keeps its length, and perturbing frame k leaves every frame beyond the
  reach of the temporal layers unchanged: each temporal ResBlock reaches 2 frames per side (two kernel-3 convs),
  each windowed temporal transformer at most W - 1. Without a window the attention couples all frames."""
  params, apply_fn = tiny_video["params"], tiny_video["apply_fn"]
  T, W, k = 18, 4, 0
  t = 2 * T
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  res_blocks = {p.split("['temporal_res']")[0] for p in paths if "['temporal_res']" in p}
  attn_blocks = {p.split("['attn1']")[0] for p in paths if "temporal_transformer_blocks" in p and "['attn1']" in p}
  assert (len(res_blocks), len(attn_blocks)) == (8, 4)  # down 2 + mid 2 + up 4; down 1 + mid 1 + up 2
  reach = 2 * len(res_blocks) + (W - 1) * len(attn_blocks)
  assert reach < t - 1 - k  # frames beyond the reach exist

  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((1, t, 8, 8, 4)), jnp.float32)
  x2 = x.at[:, k].add(jnp.asarray(rng.standard_normal((8, 8, 4)), jnp.float32))
  windowed = apply_fn(W)
  out = np.asarray(windowed(x))
  assert out.shape == (1, t, 8, 8, 4) and np.isfinite(out).all()
  delta = np.abs(np.asarray(windowed(x2)) - out).max(axis=(0, 2, 3, 4))
  assert (delta[:k + 3] > 1e-4).all(), delta
  assert delta[k + reach + 1:].max() <= 1e-6, (reach, delta)
  full = apply_fn(None)
  delta_full = np.abs(np.asarray(full(x2)) - np.asarray(full(x))).max(axis=(0, 2, 3, 4))
  assert delta_full[k + reach + 1:].min() > 1e-6, delta_full  # what the window prevents


# ----------------------------------------------------------------------------------------------------------
# Config and sampling plumbing (stage ``base``).

def _base_config(**sampling_overrides):
  from configs import rds
  config = rds.get_config("stage=base,runlocal")
  for key, value in sampling_overrides.items():
    config.sampling[key] = value
  return config


def test_base_task_samples_with_the_window_and_trains_without():
  config = _base_config(temporal_window=4)
  tasks.validate(config)
  task = tasks.get("base")(config)
  assert task.unet.config.temporal.position_window is None  # training / planning: the trained computation
  assert task.sample_unet.config == dataclasses.replace(
      task.unet.config, temporal=dataclasses.replace(task.unet.config.temporal, position_window=4))
  off = tasks.get("base")(_base_config())
  assert off.sample_unet is off.unet

  # The sampler applies the windowed U-Net (recorded here instead of run).
  calls = []
  task.sample_unet = types.SimpleNamespace(apply=lambda variables, x, *a, **kw: calls.append(kw) or x)
  labels = {f: jnp.zeros((1,), jnp.int32) for f in config.model.label_fields}
  params = {"unet": {}, "label_encoder": nn.meta.unbox(task.label_encoder.init(jax.random.PRNGKey(0), labels))[
      "params"]}
  config.sampling.num_samples, config.sampling.num_steps = 1, 1
  z = task.sample_latents(params, {"latents": jnp.zeros((1, 8, 2, 4, 4)), "labels": labels}, jax.random.PRNGKey(0))
  assert z.shape == (1, 8, 2, 4, 4) and calls and all(kw["num_frames"] == 8 for kw in calls)


@pytest.mark.parametrize("window, message", [(1, "temporal_window=1"), (-2, "temporal_window=-2"),
                                             (9, r"temporal_window=9.*num_frames=8")])
def test_training_refuses_windows_it_cannot_apply(window, message):
  with pytest.raises(ValueError, match=r"config\.sampling\." + message):
    tasks.validate(_base_config(temporal_window=window))


def test_the_window_is_a_sampling_setting_of_the_key_frame_stage():
  config = _base_config()
  config.model.temporal = dict(config.model.temporal, position_window=4)
  with pytest.raises(ValueError, match=r"config\.model\.temporal\.position_window"):
    tasks.validate(config)
  from configs import rds
  predictor = rds.get_config("stage=predictor,runlocal")
  predictor.sampling.temporal_window = 4
  with pytest.raises(ValueError, match="temporal_window"):
    tasks.validate(predictor)


@pytest.fixture
def fake_workdir(tmp_path, monkeypatch):
  """A base-stage workdir (its config.json) whose loading and sampling are recorded instead of run."""
  (tmp_path / "config.json").write_text(_base_config().to_json_best_effort())
  seen = {}

  def load_trained(stage_dir, config, mesh):
    del stage_dir, mesh
    seen["task"] = tasks.get(config.stage)(config)
    return types.SimpleNamespace(config=config, fixed_batch=lambda mesh: {}), None, None

  monkeypatch.setattr(workdirs, "load_trained", load_trained)
  monkeypatch.setattr(sampling, "generate", lambda task, *a, num_samples, **kw: np.zeros(
      (num_samples, int(task.config.data.num_frames), 8, 8, 3), np.uint8))
  return tmp_path, seen


def test_sample_workdir_twice_the_trained_length(fake_workdir):
  workdir, seen = fake_workdir
  out = sampling.sample_workdir(str(workdir), num_samples=1, num_frames=16, temporal_window=8, progress=False)
  assert out["videos"].shape[1] == 16
  task = seen["task"]
  assert int(task.config.data.num_frames) == 16 and int(task.config.sampling.temporal_window) == 8
  assert task.sample_unet.config.temporal.position_window == 8 and task.unet.config.temporal.position_window is None
  # A window over the whole sampled clip is no window; longer than the trained clips is refused.
  sampling.sample_workdir(str(workdir), num_samples=1, num_frames=4, temporal_window=8, progress=False)
  assert seen["task"].sample_unet is seen["task"].unet
  with pytest.raises(ValueError, match=r"--temporal_window=16: 0 \(off\) or 2\.\.8"):
    sampling.sample_workdir(str(workdir), num_samples=1, num_frames=32, temporal_window=16, progress=False)


def test_sample_cli_passes_the_window(tmp_path, monkeypatch, capsys):
  calls = []
  monkeypatch.setattr(sampling, "sample_workdir", lambda *a, **kw: calls.append((a, kw)) or {})
  assert sample.main([f"--workdir={tmp_path}", "--stage=base", "--num_frames=32", "--temporal_window=8"]) == 0
  assert calls[0][1]["temporal_window"] == 8 and calls[0][1]["num_frames"] == 32
  assert sample.main([f"--workdir={tmp_path}", "--stage=base"]) == 0
  assert calls[1][1]["temporal_window"] is None  # the config's
  with pytest.raises(SystemExit):
    sample.main([f"--pipeline={tmp_path}", "--temporal_window=8"])
  assert "--temporal_window goes with --workdir" in capsys.readouterr().err
