"""The generic train loop on a small two-subtree model: freezing, exact resume, SIGTERM, non-finite stop.

The model is deliberately not a diffusion model so these tests exercise the loop, the optimizer split and the
checkpoint logic in seconds; the real stages are tested in ``test_train_ldm.py``.
"""

import functools
import os
import signal

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from videoldm_jax import checkpoint, config_lib, optim, parallel, tasks, train
from videoldm_jax.models import layers
from videoldm_jax.tasks import common as task_common

FRAMES, DIM = 4, 8


class ToyNet(nn.Module):
  """Per-frame MLP ("spatial") + a mixer over frames ("temporal"), params with logical axes."""

  @nn.compact
  def __call__(self, x):  # [b, t, d]
    h = nn.gelu(layers.dense(32, name="spatial_in")(x))
    h = h + layers.dense(32, axes=("mlp", "embed"), name="temporal_mix")(h.mean(axis=1, keepdims=True))
    return layers.dense(DIM, axes=("mlp", "embed"), name="spatial_out")(h)


def _example(i):
  rng = np.random.default_rng(int(i))
  x = rng.standard_normal((FRAMES, DIM)).astype(np.float32)
  y = np.roll(x, 1, axis=0) * 0.5 + x.mean(0, keepdims=True)  # needs information across frames
  return {"x": x, "y": y.astype(np.float32), "idx": np.int32(i)}


class _HookedIterator:
  """Local iterator with test hooks: a SIGTERM to this process or NaN inputs at the k-th ``next``, inputs scaled
  up 1000x from the k-th ``next`` on (a loss that blows up)."""

  def __init__(self, it, sigterm_at=None, nan_at=None, blow_up_from=None):
    self.it, self.count, self.sigterm_at, self.nan_at, self.blow_up_from = it, 0, sigterm_at, nan_at, blow_up_from

  def __next__(self):
    b = dict(next(self.it))
    self.count += 1
    if self.blow_up_from is not None and self.count >= self.blow_up_from:
      b["x"] = b["x"] * 1000.0
    if self.count == self.nan_at:
      b["x"] = np.full_like(b["x"], np.nan)
    if self.count == self.sigterm_at:
      # Only with the train loop's handler installed (else SIGTERM would end the test process).
      assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
      os.kill(os.getpid(), signal.SIGTERM)
    return b

  def get_state(self):
    return self.it.get_state()

  def set_state(self, s):
    self.it.set_state(s)


class ToyTask(task_common.Task):
  sigterm_at = None
  nan_at = None
  blow_up_from = None

  def __init__(self, config):
    self.model = ToyNet()
    super().__init__(config)

  def init(self, rng):
    return self.model.init(rng, jnp.zeros((1, FRAMES, DIM)))["params"]

  def loss_fn(self, trainable, frozen, batch, rng):
    del rng
    pred = self.model.apply({"params": optim.merge(trainable, frozen)}, batch["x"])
    return jnp.mean((pred - batch["y"]) ** 2), {"idx_sum": jnp.sum(batch["idx"]).astype(jnp.float32)}

  def _dataset(self, seed):
    local = self.config.batch_size // jax.process_count()
    return grain.MapDataset.range(10_000).shuffle(seed=seed).repeat().map(_example).batch(local)

  def input_pipeline(self, mesh):
    it = iter(self._dataset(self.config.seed).to_iter_dataset())
    return parallel.GlobalBatchIterator(_HookedIterator(it, self.sigterm_at, self.nan_at, self.blow_up_from), mesh)

  def fixed_batch(self, mesh):
    return parallel.global_batch(self._dataset(12345)[0], mesh)

  def abstract_batch(self, batch_size, inputs=None):
    del inputs
    return {"x": task_common.sds((batch_size, FRAMES, DIM), jnp.float32),
            "y": task_common.sds((batch_size, FRAMES, DIM), jnp.float32),
            "idx": task_common.sds((batch_size,), jnp.int32)}

  def sample_fn(self, trainable, frozen, batch, rng):
    raise NotImplementedError


@tasks.register("toy")
class _Toy(ToyTask):
  pass


@tasks.register("toy_sigterm")
class _ToySigterm(ToyTask):
  sigterm_at = 5


@tasks.register("toy_nan")
class _ToyNan(ToyTask):
  nan_at = 7


@tasks.register("toy_diverge")
class _ToyDiverge(ToyTask):
  blow_up_from = 5
  nan_at = 10


@tasks.register("toy_sigterm_init")
class _ToySigtermInit(ToyTask):
  """SIGTERM to this process while the params are initialised (start-up, before any step)."""
  sent = False

  def init(self, rng):
    if not type(self).sent:
      type(self).sent = True
      # Only with the train loop's handler installed (else SIGTERM would end the test process).
      assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
      os.kill(os.getpid(), signal.SIGTERM)
    return super().init(rng)


def toy_config(**kw):
  c = config_lib.base_config()
  c.stage = "toy"
  c.trainable = ".*temporal.*"
  c.batch_size = 8
  c.total_steps = 8
  c.optimizer.lr = 3e-2
  c.optimizer.warmup_steps = 2
  c.optimizer.schedule = "constant"
  c.ema_decay = 0.9
  c.log_every_steps = 2
  c.eval_every_steps = 4
  c.sample_every_steps = 0
  c.checkpoint_every_steps = 4
  c.async_checkpointing = True
  c.model.conditioning = "none"
  c.mesh.ici_data_parallelism = 2
  c.mesh.ici_fsdp_parallelism = 4
  for k, v in kw.items():
    c[k] = v
  return c


def _tree_equal(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)))


def test_freeze_and_optimizer_state_only_for_trainable(tmp_path):
  config = toy_config()
  task = tasks.get("toy")(config)
  init = nn.meta.unbox(task.init(train.run_rngs(config)[0]))
  _, frozen0 = optim.split(init, config.trainable)
  res = train.train_and_evaluate(config, str(tmp_path))
  assert res.step == 8 and int(res.state.step) == 8
  # Frozen params: bit-identical to their initial values after 8 steps.
  assert set(optim.flat_paths(res.frozen)) == {"spatial_in/kernel", "spatial_in/bias", "spatial_out/kernel",
                                              "spatial_out/bias"}
  assert _tree_equal(res.frozen, frozen0)
  # Trainable params moved; the optimizer holds moments for them and nothing else.
  assert set(optim.flat_paths(res.state.params)) == {"temporal_mix/kernel", "temporal_mix/bias"}
  assert not _tree_equal(res.state.params, optim.split(init, config.trainable)[0])
  adam = res.state.opt_state[1][0]
  assert set(optim.flat_paths(adam.mu)) == set(optim.flat_paths(adam.nu)) == {"temporal_mix/kernel",
                                                                              "temporal_mix/bias"}
  n_opt = sum(x.size for x in jax.tree.leaves(res.state.opt_state) if x.ndim > 0)
  n_train = sum(x.size for x in jax.tree.leaves(res.state.params))
  assert n_opt == 2 * n_train
  # Frozen params are saved once (random init), never inside the step checkpoints.
  assert (tmp_path / "frozen").exists()
  state_meta = checkpoint.tree_metadata(str(tmp_path / "checkpoints" / "8" / "state"))
  assert not any("spatial" in k for k in state_meta), sorted(state_meta)
  # The loss on the fixed batch went down.
  assert res.eval_history[-1]["eval_loss"] < res.eval_history[0]["eval_loss"]


def test_sharded_params_follow_logical_rules(tmp_path):
  config = toy_config(total_steps=2, eval_every_steps=0, checkpoint_every_steps=0)
  res = train.train_and_evaluate(config, str(tmp_path))
  # temporal_mix kernel axes ("mlp", "embed"): embed -> fsdp under the fsdp preset.
  assert res.state.params["temporal_mix"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert res.state.opt_state[1][0].mu["temporal_mix"]["kernel"].sharding.spec == \
      jax.sharding.PartitionSpec(None, "fsdp")
  assert res.frozen["spatial_in"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)


def test_resume_is_exact(tmp_path):
  straight = train.train_and_evaluate(toy_config(), str(tmp_path / "a"))
  half = train.train_and_evaluate(toy_config(total_steps=4), str(tmp_path / "b"))
  assert int(half.state.step) == 4
  resumed = train.train_and_evaluate(toy_config(), str(tmp_path / "b"))
  assert resumed.history[0]["step"] == 5
  assert _tree_equal(straight.state.params, resumed.state.params)
  assert _tree_equal(straight.state.ema_params, resumed.state.ema_params)
  assert _tree_equal(straight.state.opt_state, resumed.state.opt_state)
  # Same data in the same order: the iterator state came back with the checkpoint.
  seen = [h["idx_sum"] for h in half.history + resumed.history]
  assert seen == [h["idx_sum"] for h in straight.history]


def test_sigterm_saves_and_exits_then_resumes(tmp_path):
  res = train.train_and_evaluate(toy_config(stage="toy_sigterm"), str(tmp_path))
  assert res.preempted and res.step == 5
  ck = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  assert ck.latest_step() == 5
  ck.close()
  done = train.train_and_evaluate(toy_config(), str(tmp_path))
  assert not done.preempted and int(done.state.step) == 8
  straight = train.train_and_evaluate(toy_config(), str(tmp_path / "straight"))
  assert _tree_equal(straight.state.params, done.state.params)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
  with pytest.raises(train.NonFiniteError, match="Non-finite loss or gradient norm at step 7.*Last good checkpoint: "
                                                  "step 4"):
    train.train_and_evaluate(toy_config(stage="toy_nan"), str(tmp_path))
  ck = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  assert ck.latest_step() == 4
  ck.close()
  meta = checkpoint.tree_metadata(str(tmp_path / "checkpoints" / "4" / "state"))
  flat = checkpoint.restore_subset(str(tmp_path / "checkpoints" / "4" / "state"),
                                   {k: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=parallel.replicated(
                                       parallel.make_mesh(toy_config()))) for k, m in meta.items()})
  assert all(np.isfinite(np.asarray(v)).all() for v in flat.values())


def test_model_init_from_workdir_loads_frozen_and_trainable(tmp_path):
  first = train.train_and_evaluate(toy_config(total_steps=4), str(tmp_path / "first"))
  config = toy_config(total_steps=1, eval_every_steps=0, model_init=str(tmp_path / "first"),
                      model_init_use_ema=False, seed=7)
  second = train.train_and_evaluate(config, str(tmp_path / "second"))
  # Frozen subtree comes from first/frozen (not from seed 7); trainable started from first's params.
  assert _tree_equal(second.frozen, first.frozen)
  assert not (tmp_path / "second" / "frozen").exists()
  assert (tmp_path / "second" / "model_init.json").exists()
  diff = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), second.state.params,
                      first.state.params)
  assert max(jax.tree.leaves(diff)) < 0.1  # one small step away from first's params, not a fresh init


def test_schedule_warmup_then_cosine():
  c = toy_config(total_steps=110)
  c.optimizer.warmup_steps = 10
  c.optimizer.schedule = "cosine"
  c.optimizer.end_lr_factor = 0.1
  sched = optim.make_schedule(c.optimizer, c.total_steps)
  lr = c.optimizer.lr
  assert float(sched(0)) == 0.0
  assert abs(float(sched(5)) - lr / 2) < 1e-7
  assert abs(float(sched(10)) - lr) < 1e-7
  assert abs(float(sched(60)) - lr * 0.55) < 1e-6  # half-way through the cosine: (1 + 0.1) / 2
  assert abs(float(sched(110)) - lr * 0.1) < 1e-7
  c.optimizer.schedule = "constant"
  assert abs(float(optim.make_schedule(c.optimizer, c.total_steps)(100)) - lr) < 1e-7


def test_ema_warms_up_then_follows_the_configured_decay():
  """The EMA decay is min(decay, (1 + n) / (10 + n)): the first update weighs the new params by 0.8, the EMA of a
  constant sequence of params converges to them, and late updates use the configured decay."""
  ema, target = {"w": jnp.zeros((3,))}, {"w": jnp.ones((3,))}
  one = optim.ema_update(ema, target, 0.999, jnp.int32(1))
  np.testing.assert_allclose(np.asarray(one["w"]), 1.0 - 2.0 / 11.0, rtol=1e-6)
  for n in range(2, 41):
    one = optim.ema_update(one, target, 0.999, jnp.int32(n))
  assert float(one["w"][0]) > 0.97  # 40 updates of a 0.999 EMA without warm-up would give 0.04
  assert abs(float(optim.ema_decay_at(0.999, jnp.int32(100_000))) - 0.999) < 1e-7
  plain = optim.ema_update(ema, target, 0.5)
  np.testing.assert_allclose(np.asarray(plain["w"]), 0.5)


@tasks.register("toy_traced")
class _ToyTraced(ToyTask):
  """Counts how often the train step is traced (a retrace per step would show as one per step)."""
  traces = 0

  def __init__(self, config):
    super().__init__(config)
    step = self.train_step

    def counted(*args):
      type(self).traces += 1
      return step(*args)

    self.train_step = counted


def test_train_step_traced_once_and_mesh_matches_one_device(tmp_path, monkeypatch):
  """8 steps trace the step once; the run on a data=4 x fsdp=2 mesh gives the same losses and params as on one
  device (up to float reassociation across shards)."""
  _ToyTraced.traces = 0
  config = toy_config(stage="toy_traced", eval_every_steps=0, checkpoint_every_steps=0, log_every_steps=1)
  config.mesh.ici_data_parallelism, config.mesh.ici_fsdp_parallelism = 4, 2
  sharded = train.train_and_evaluate(config, str(tmp_path / "mesh"))
  assert _ToyTraced.traces == 1 and sharded.step == 8
  assert sharded.state.params["temporal_mix"]["kernel"].sharding.mesh.shape == {"data": 4, "fsdp": 2, "tensor": 1}
  monkeypatch.setattr(parallel, "make_mesh", functools.partial(parallel.make_mesh, devices=jax.devices()[:1]))
  config.mesh.ici_data_parallelism, config.mesh.ici_fsdp_parallelism = 1, 1
  single = train.train_and_evaluate(config, str(tmp_path / "one"))
  assert len(single.state.params["temporal_mix"]["kernel"].sharding.device_set) == 1
  losses = lambda r: np.array([h["loss"] for h in r.history])  # noqa: E731
  assert len(losses(sharded)) == 8
  np.testing.assert_allclose(losses(sharded), losses(single), rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(sharded.state.params), jax.tree.leaves(single.state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@tasks.register("toy_mesh_eval")
class _ToyMeshEval(ToyTask):
  """Reports, from inside its jitted evaluation, how many mesh axes the trace saw."""

  def eval_metrics(self, trainable, frozen, batch, rng):
    return {"mesh_axes": jnp.float32(len(jax.sharding.get_abstract_mesh().axis_names))}


def test_eval_runs_under_the_mesh_and_metrics_are_fetched_at_log_steps(tmp_path, monkeypatch):
  """Evaluation is traced under the run's mesh (so the model's sharding constraints apply there as in the step),
  and step metrics reach the host once per log / checkpoint step, not every step."""
  fetched = []
  real_get = jax.device_get

  def counting_get(x):
    if isinstance(x, list):  # the loop's batched fetch of pending step metrics
      fetched.append(len(x))
    return real_get(x)

  monkeypatch.setattr(train.jax, "device_get", counting_get)
  config = toy_config(stage="toy_mesh_eval", log_every_steps=4, eval_every_steps=4, checkpoint_every_steps=0)
  res = train.train_and_evaluate(config, str(tmp_path))
  assert [h["mesh_axes"] for h in res.eval_history] == [3.0, 3.0, 3.0]  # data, fsdp, tensor
  assert sum(fetched) == 8 and max(fetched) == 4 and len([n for n in fetched if n]) == 2  # steps 1-4, 5-8
  assert [h["step"] for h in res.history] == list(range(1, 9))


def test_restore_initialises_only_what_no_source_provides(tmp_path):
  """From scratch every param is initialised; resuming from a checkpoint (trainable) with the saved frozen params
  initialises nothing; a model_init source that lacks a layer initialises just that layer."""
  config = toy_config(total_steps=2, eval_every_steps=0)
  task = tasks.get("toy")(config)
  mesh = parallel.make_mesh(config)
  rules = parallel.logical_rules(config)

  def restore(cfg, wd):
    ckpt = checkpoint.Checkpointer(str(wd / "checkpoints"), async_save=False)
    try:
      return checkpoint.restore_or_init(cfg, str(wd), task.init, train.run_rngs(cfg)[0], mesh, rules, task.tx, ckpt)
    finally:
      ckpt.close()

  assert set(restore(config, tmp_path / "fresh").initialised) == {
      "spatial_in/kernel", "spatial_in/bias", "spatial_out/kernel", "spatial_out/bias", "temporal_mix/kernel",
      "temporal_mix/bias"}
  train.train_and_evaluate(config, str(tmp_path / "run"))
  again = restore(config, tmp_path / "run")
  assert again.source == "checkpoint" and again.initialised == ()
  child = toy_config(total_steps=2, eval_every_steps=0, model_init=str(tmp_path / "run"),
                     model_init_missing_ok="temporal_mix/bias")
  # The source's checkpoint lacks nothing, so even the allowed-missing bias comes from it ...
  assert restore(child, tmp_path / "child").initialised == ()
  # ... but a layer the source does not have is the only one initialised.
  import shutil  # pylint: disable=g-import-not-at-top
  src = tmp_path / "run_without_bias"
  shutil.copytree(tmp_path / "run", src)
  child.model_init = str(src)
  (src / "frozen").rename(src / "frozen_moved")  # frozen params now come from nowhere but the init ...
  child.model_init_missing_ok = "spatial_.*"     # ... which the source may lack
  assert set(restore(child, tmp_path / "child2").initialised) == {
      "spatial_in/kernel", "spatial_in/bias", "spatial_out/kernel", "spatial_out/bias"}


# ---------------------------------------------------------------------------------------------------------------
# Restarts: damaged checkpoints, bad configs, SIGTERM during start-up, divergence.
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_workdir(tmp_path_factory):
  """A toy run of 8 steps with checkpoints at steps 4 and 8 (each damage case below works on a copy)."""
  wd = tmp_path_factory.mktemp("toy") / "run"
  train.train_and_evaluate(toy_config(eval_every_steps=0), str(wd))
  return wd


def _damage(step_dir, kind):
  if kind == "truncated_data":
    for f in step_dir.glob("state/**/d/*"):
      f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
  elif kind == "empty_metadata":
    (step_dir / "state" / "_METADATA").write_text("")
  elif kind == "empty_iterator_json":
    for f in (step_dir / "data").glob("*.json"):
      f.write_text("")
  elif kind == "no_state":
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(step_dir / "state")
  elif kind == "empty_folder":
    step_dir.mkdir()


@pytest.mark.parametrize("kind", ["truncated_data", "empty_metadata", "empty_iterator_json", "no_state",
                                  "empty_folder"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(toy_workdir, tmp_path, kind, caplog):
  """A damaged newest step (or an empty step folder past it) is moved aside, never deleted, with one warning
  naming it and why; the run resumes from the newest step that restores."""
  import shutil  # pylint: disable=g-import-not-at-top
  wd = tmp_path / "run"
  shutil.copytree(toy_workdir, wd)
  bad, resumed_from = (9, 8) if kind == "empty_folder" else (8, 4)
  _damage(wd / "checkpoints" / str(bad), kind)
  with caplog.at_level("WARNING"):
    res = train.train_and_evaluate(toy_config(total_steps=10, eval_every_steps=0), str(wd))
  assert res.history[0]["step"] == resumed_from + 1 and int(res.state.step) == 10
  assert (wd / "checkpoints" / f"corrupt-{bad}").is_dir()
  warnings = [r.getMessage() for r in caplog.records if f"Checkpoint step {bad} " in r.getMessage()]
  assert len(warnings) == 1 and f"corrupt-{bad}" in warnings[0] and f"resuming from step {resumed_from}" in \
      warnings[0], warnings
  ck = checkpoint.Checkpointer(str(wd / "checkpoints"), async_save=False)
  assert ck.latest_step() == 10
  ck.close()


def test_no_restorable_checkpoint_is_an_error_naming_the_directory(toy_workdir, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  wd = tmp_path / "run"
  shutil.copytree(toy_workdir, wd)
  for step in (4, 8):
    _damage(wd / "checkpoints" / str(step), "no_state")
  with pytest.raises(checkpoint.CheckpointError, match=f"{wd / 'checkpoints'}: no checkpoint restores"):
    train.train_and_evaluate(toy_config(total_steps=10, eval_every_steps=0), str(wd))
  # Nothing was moved (the cause might be the config) and nothing trained from scratch.
  assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["4", "8"]


@pytest.mark.parametrize("key,value,message", [
    ("model_init", "missing", r"config\.model_init='.*missing': no such file or directory"),
    ("resume", ".", r"config\.resume='.*': not a training workdir \(no checkpoints/\)"),
])
def test_bad_paths_fail_before_any_device_work_and_write_nothing(tmp_path, monkeypatch, key, value, message):
  def no_device_work(*args, **kwargs):
    raise AssertionError("device work before the config was checked")

  monkeypatch.setattr(checkpoint, "restore_or_init", no_device_work)
  monkeypatch.setattr(parallel, "make_mesh", no_device_work)
  config = toy_config(**{key: str(tmp_path / value)})
  with pytest.raises(train.ConfigError, match=message):
    train.train_and_evaluate(config, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


def test_unknown_config_override_is_one_line_naming_the_closest_key(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from videoldm_jax import cli  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  argv = ["train", "--config=configs/rds.py:stage=image,runlocal", f"--workdir={tmp_path / 'wd'}"]
  proc = subprocess.run([sys.executable, "-m", "videoldm_jax.train", *argv[1:], "--config.optimizer.lrr=1"],
                        cwd=root, capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  lines = [ln for ln in proc.stderr.splitlines() if "lrr" in ln]
  assert lines == ["videoldm_jax.train: --config.optimizer.lrr: unknown config key 'lrr' in config.optimizer "
                   "(closest: config.optimizer.lr)"], proc.stderr
  assert not (tmp_path / "wd").exists()
  assert "config.stages.base" in cli.unknown_override(["x", "--config=configs/rds.py:runlocal",
                                                        "--config.stages.bsae.total_steps=3"])
  assert cli.unknown_override(argv + ["--config.optimizer.lr=1"]) is None


def test_sigterm_during_start_up_stops_cleanly_before_step_one(tmp_path, caplog):
  _ToySigtermInit.sent = False
  before = signal.getsignal(signal.SIGTERM)
  with caplog.at_level("WARNING"):
    res = train.train_and_evaluate(toy_config(stage="toy_sigterm_init", eval_every_steps=0), str(tmp_path))
  assert _ToySigtermInit.sent and res.preempted and res.step == 0 and res.history == []
  assert any("by SIGTERM during start-up (after the restore), before step 1" in r.getMessage()
             for r in caplog.records)
  assert signal.getsignal(signal.SIGTERM) == before  # the handler is the caller's again
  ck = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  assert ck.latest_step() is None
  ck.close()


def test_non_finite_stop_names_the_checkpoint_saved_before_the_loss_diverged(tmp_path):
  """Inputs scaled up 1000x from step 5 (the loss jumps far above its running median), NaN at step 10: step 8 is
  finite but diverged; the message names step 4."""
  config = toy_config(stage="toy_diverge", total_steps=12, eval_every_steps=0)
  with pytest.raises(train.NonFiniteError) as e:
    train.train_and_evaluate(config, str(tmp_path))
  msg = str(e.value)
  assert "at step 10" in msg and "from step 5 on" in msg, msg
  assert "Last good checkpoint: step 4 " in msg and "step 8 is finite but was saved after the divergence" in msg, msg



def test_tree_metadata_is_read_again_after_a_rewrite(tmp_path):
  """Metadata is cached per directory and version: the same directory written again (``save_params`` with
  force) gives the new tree, not the cached one."""
  path = str(tmp_path / "frozen")
  checkpoint.save_params(path, {"a": np.zeros((2, 3), np.float32)})
  first = checkpoint.tree_metadata(path)
  assert checkpoint.tree_metadata(path) == first and tuple(first["a"].shape) == (2, 3)
  checkpoint.save_params(path, {"a": np.zeros((4,), np.float32), "b": np.zeros((1,), np.float32)})
  second = checkpoint.tree_metadata(path)
  assert sorted(second) == ["a", "b"] and tuple(second["a"].shape) == (4,)
