r"""One generic training loop for every stage.

  python -m videoldm_jax.train --config=configs/rds.py:stage=base,runlocal --workdir=/tmp/videoldm_rds_base
  python -m videoldm_jax.train --config=configs/rds.py:runlocal --workdir=/tmp/videoldm_rds   # the whole chain

Everything stage-specific (models, loss, conditioning, sampling, input pipeline) lives in the task
(``videoldm_jax/tasks``); this file builds the mesh, materialises sharded state in the restore order of
``checkpoint.restore_or_init``, AOT-compiles the train step, and runs the loop with logging, evaluation on a fixed
batch, preview samples, checkpoints and preemption handling.
``train_chain`` runs a config's stages one after the other (each initialised from the previous ones).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Dict, List, Optional

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from configs import common
from videoldm_jax import checkpoint, parallel, tasks, writers

FLAGS = flags.FLAGS


class NonFiniteError(FloatingPointError):
  """Raised when a step produced a non-finite loss or gradient norm (the update was skipped)."""


@dataclasses.dataclass
class TrainResult:
  state: Any                   # optim.TrainState at the end
  frozen: Any                  # frozen params
  task: Any
  step: int
  history: List[Dict[str, float]]    # per-step host metrics
  eval_history: List[Dict[str, float]]
  preempted: bool = False
  compile_seconds: float = 0.0
  memory: Optional[Dict[str, int]] = None


def check_model_init(config, task) -> None:
  if task.needs_model_init and not config.model_init and not config.runlocal:
    raise ValueError(f"config.model_init is empty: stage {config.stage!r} trains new layers on a frozen backbone; "
                     "point it at a converted checkpoint directory or a trained 'image' workdir (runlocal runs may "
                     "use a random backbone)")


def compiler_options(config) -> Optional[Dict[str, Any]]:
  """XLA options for every compile of the run (``config.cpu_fast_compile``: the runlocal CPU smoke runs are
  dominated by compile time, not step time)."""
  if config.get("cpu_fast_compile") and jax.default_backend() == "cpu":
    return {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
  return None


def run_rngs(config):
  """``(init, train, eval, sample)`` keys derived from ``config.seed``.

  The init key uses the "rbg" PRNG (XLA RngBitGenerator for the bits): initialising hundreds of parameters with
  threefry makes XLA compile the init for a long time on CPU; rbg halves that.
  """
  train_rng, eval_rng, sample_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
  return jax.random.key(config.seed, impl="rbg"), train_rng, eval_rng, sample_rng


def _memory_stats(compiled) -> Optional[Dict[str, int]]:
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return None
  if m is None:
    return None
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")
  out = {f: int(getattr(m, f, 0) or 0) for f in fields}
  out["total_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"] + out["temp_size_in_bytes"]
                        - out["alias_size_in_bytes"])
  return out


def _flops(compiled) -> Optional[float]:
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) if cost else None
  except Exception:  # pylint: disable=broad-except
    return None


def _write_config(config, workdir: epath.Path) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def train_and_evaluate(config, workdir: str) -> TrainResult:
  """Trains ``config.stage`` in ``workdir`` (resuming if it holds a checkpoint). Returns the final state."""
  # ----------------------------------------------------------------------------------------------------------
  # Set-up: validate, mesh, task, data.
  # ----------------------------------------------------------------------------------------------------------
  common.validate(config)
  wd = epath.Path(workdir)
  is_main = jax.process_index() == 0
  if is_main:
    _write_config(config, wd)
  mesh = parallel.make_mesh(config)
  rules = parallel.logical_rules(config)
  common.validate_for_mesh(config, parallel.data_parallel_size(mesh), jax.process_count())
  task = tasks.get(config.stage)(config)
  check_model_init(config, task)

  init_rng, train_rng, eval_rng, sample_rng = run_rngs(config)
  data = task.input_pipeline(mesh)
  ckpt = checkpoint.Checkpointer(str(wd / "checkpoints"), keep=config.keep_checkpoints,
                                 async_save=config.async_checkpointing)

  # ----------------------------------------------------------------------------------------------------------
  # State: sharded from the logical rules; checkpoint -> resume -> model_init -> scratch.
  # ----------------------------------------------------------------------------------------------------------
  copts = compiler_options(config)
  restored = checkpoint.restore_or_init(config, workdir, task.init, init_rng, mesh, rules, task.tx, ckpt, data,
                                        compiler_options=copts)
  state, frozen = restored.state, restored.frozen
  start_step = int(jax.device_get(state.step))
  n_train = sum(x.size for x in jax.tree.leaves(state.params))
  n_frozen = sum(x.size for x in jax.tree.leaves(frozen))
  logging.info("Params: %d trainable, %d frozen (%s); starting at step %d", n_train, n_frozen, restored.source,
               start_step)

  # ----------------------------------------------------------------------------------------------------------
  # AOT compile of the train step (out-of-memory shows here, before any step runs).
  # ----------------------------------------------------------------------------------------------------------
  batch = next(data)
  batch_sh = jax.tree.map(lambda x: x.sharding, batch)
  repl = parallel.replicated(mesh)
  t0 = time.time()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step_jit = jax.jit(task.train_step, in_shardings=(restored.state_shardings, restored.frozen_shardings, batch_sh,
                                                      repl),
                       out_shardings=(restored.state_shardings, repl), donate_argnums=0, compiler_options=copts)
    compiled = step_jit.lower(state, frozen, batch, train_rng).compile()
  compile_s = time.time() - t0
  mem = _memory_stats(compiled)
  flops = _flops(compiled)
  logging.info("Compiled train step in %.1fs; memory per device: %s; flops per step: %s", compile_s, mem, flops)

  # Fixed evaluation batch (deterministic, independent of the training stream) and noise.
  eval_batch = None
  if config.eval_every_steps or config.sample_every_steps:
    eval_batch = task.fixed_batch(mesh)
  eval_fn = jax.jit(task.eval_loss, compiler_options=copts) if config.eval_every_steps else None
  sample_fn = jax.jit(task.sample_fn, compiler_options=copts) if config.sample_every_steps else None

  # ----------------------------------------------------------------------------------------------------------
  # Loop.
  # ----------------------------------------------------------------------------------------------------------
  writer = writers.create_writer(str(wd), just_logging=not is_main)
  if is_main and start_step == 0:
    writer.write_hparams({k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))})
  progress = writers.ReportProgress(config.total_steps, writer, every_secs=config.progress_every_secs)
  watcher = checkpoint.PreemptionWatcher()
  history: List[Dict[str, float]] = []
  eval_history: List[Dict[str, float]] = []
  window: List[Dict[str, float]] = []
  pending = None  # (step, metrics on device) of the previous step: checked one step late, keeps the device busy
  preempted = False
  last_saved = start_step if restored.source == "checkpoint" else None

  def check(step_metrics):
    step, m = step_metrics
    host = {k: float(v) for k, v in jax.device_get(m).items()}
    if not host.pop("finite", 1.0):
      ckpt.wait()
      raise NonFiniteError(
          f"Non-finite loss or gradient norm at step {step} (loss={host.get('loss')}, "
          f"grad_norm={host.get('grad_norm')}): the update was skipped and training stopped. Last good checkpoint: "
          f"{'step ' + str(last_saved) if last_saved is not None else 'none'} in {wd / 'checkpoints'}. "
          "Lower config.optimizer.lr, raise config.optimizer.warmup_steps, check the inputs, or use "
          "config.dtype='float32'.")
    history.append(dict(host, step=step))
    window.append(host)

  def save(step):
    nonlocal last_saved
    ckpt.save(step, state, data)
    last_saved = step

  def evaluate(step):
    ev = float(eval_fn(state.params, frozen, eval_batch, eval_rng))
    eval_history.append({"step": step, "eval_loss": ev})
    writer.write_scalars(step, {"eval_loss": ev})

  step = start_step
  try:
    if eval_fn is not None and start_step == 0:
      evaluate(0)  # the loss before training, on the same fixed batch and noise as every later evaluation
    for step in range(start_step + 1, config.total_steps + 1):
      if step > start_step + 1:
        batch = next(data)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = compiled(state, frozen, batch, train_rng)
      if pending is not None:
        check(pending)
      pending = (step, metrics)
      progress(step)

      is_last = step == config.total_steps
      if config.log_every_steps and (step % config.log_every_steps == 0 or is_last):
        check(pending)
        pending = None
        means = {k: float(np.mean([w[k] for w in window])) for k in window[0]} if window else {}
        if progress.steps_per_sec:
          means["steps_per_sec"] = progress.steps_per_sec
        writer.write_scalars(step, means)
        window.clear()
      if eval_fn is not None and (step % config.eval_every_steps == 0 or is_last):
        evaluate(step)
      if sample_fn is not None and (step % config.sample_every_steps == 0 or is_last):
        _write_samples(task, sample_fn, state, frozen, eval_batch, sample_rng, wd, step, writer, config)
      stop = watcher.should_stop(step)
      if (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0) or is_last or stop:
        if pending is not None:  # never checkpoint a state whose last step is unchecked
          check(pending)
          pending = None
        save(step)
      if stop:
        preempted = True
        logging.warning("Stopped at step %d after SIGTERM; checkpoint saved.", step)
        break
    if pending is not None:
      check(pending)
  finally:
    ckpt.close()
    watcher.restore()
    writer.flush()
    if hasattr(data, "close"):
      data.close()
  return TrainResult(state=state, frozen=frozen, task=task, step=step, history=history, eval_history=eval_history,
                     preempted=preempted, compile_seconds=compile_s, memory=mem)


def _write_samples(task, sample_fn, state, frozen, batch, rng, wd: epath.Path, step: int, writer, config) -> None:
  params = state.ema_params if state.ema_params is not None else state.params
  videos = np.asarray(jax.device_get(sample_fn(params, frozen, batch, rng)))  # [n, t, h, w, 3] uint8
  if jax.process_index() != 0:
    return
  out = wd / "samples"
  out.mkdir(parents=True, exist_ok=True)
  grid = writers.video_grid(videos)
  (out / f"step_{step:07d}.gif").write_bytes(writers.encode_gif(grid, config.sampling.fps))
  (out / f"step_{step:07d}.png").write_bytes(writers.encode_png(np.concatenate(list(grid), axis=0)))
  writer.write_videos(step, {"samples": videos}, fps=config.sampling.fps)
  logging.info("Wrote samples %s", out / f"step_{step:07d}.gif")


# ---------------------------------------------------------------------------------------------------------------
# Chains: the stages of a pipeline one after the other (configs.common.chain_config), each from the previous ones.
# ---------------------------------------------------------------------------------------------------------------

def finished(config, workdir: str) -> bool:
  """True when ``workdir`` holds a checkpoint at (or past) ``config.total_steps``."""
  if not (epath.Path(workdir) / "checkpoints").exists():
    return False
  ckpt = checkpoint.Checkpointer(str(epath.Path(workdir) / "checkpoints"), async_save=False)
  try:
    step = ckpt.latest_step()
  finally:
    ckpt.close()
  return step is not None and step >= int(config.total_steps)


def train_chain(config, workdir: str) -> Dict[str, Optional[TrainResult]]:
  """Trains the stages of ``config.chain`` in order, stage S with ``config.stages.S`` in ``WORKDIR/S``.

  An empty ``model_init`` of a stage becomes the previous stage's workdir (which names its own sources in turn),
  so every stage starts from all earlier results. A stage already at its ``total_steps`` is skipped and an
  interrupted one resumes, so rerunning the command continues the chain. Afterwards ``config.sample_videos``
  videos of the last stage go to ``WORKDIR/sample.{mp4,gif,png}`` (``videoldm_jax.sample``; rewritten only when a
  stage trained or they are missing). Returns ``{stage: TrainResult, or None when skipped}``; only the last
  trained stage keeps its state in memory.
  """
  import copy  # pylint: disable=g-import-not-at-top
  from videoldm_jax import sample  # pylint: disable=g-import-not-at-top  (sits on top of train as well)
  common.validate_chain(config)
  wd = epath.Path(workdir)
  if jax.process_index() == 0:
    _write_config(config, wd)
  results: Dict[str, Optional[TrainResult]] = {}
  previous = None
  for name in config.chain:
    stage_config = copy.deepcopy(config.stages[name])
    if not stage_config.model_init and previous is not None:
      stage_config.model_init = str(wd / previous)
    stage_dir = str(wd / name)
    if finished(stage_config, stage_dir):
      logging.info("Chain: stage %r already finished in %s, skipped", name, stage_dir)
      results[name] = None
    else:
      logging.info("Chain: stage %r in %s (model_init: %s)", name, stage_dir, stage_config.model_init or "none")
      for done in results.values():  # device memory goes to the stage that trains now
        if done is not None:
          done.state = done.frozen = None
      res = train_and_evaluate(stage_config, stage_dir)
      results[name] = res
      if res.preempted:
        logging.warning("Chain stopped during stage %r; rerun the same command to continue", name)
        return results
    previous = name
  outputs = [wd / f"sample.{k}" for k in ("mp4", "gif", "png")]
  if config.sample_videos and (any(r is not None for r in results.values()) or not all(p.exists()
                                                                                       for p in outputs)):
    t0 = time.time()
    out = sample.sample_workdir(str(wd), num_samples=int(config.sample_videos), batch_size=int(config.sample_videos))
    logging.info("Chain: wrote %s, %s and %s in %.1fs", out.get("mp4"), out.get("gif"), out.get("png"),
                 time.time() - t0)
  return results


def _quiet_library_logs() -> None:
  """Keeps orbax's per-save INFO chatter out of the training log (warnings and errors still show)."""
  import logging as pylogging  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  class _Filter(pylogging.Filter):
    def filter(self, record):
      return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname

  absl_logging.get_absl_handler().addFilter(_Filter())


def main(argv):
  _quiet_library_logs()
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  if config is None or not FLAGS.workdir:
    raise app.UsageError("--config and --workdir are required")
  parallel.initialize_distributed(config)
  logging.info("JAX %s: %d devices (%s), %d processes", jax.__version__, jax.device_count(),
               jax.devices()[0].platform, jax.process_count())
  if common.is_chain(config):
    train_chain(config, FLAGS.workdir)
  else:
    train_and_evaluate(config, FLAGS.workdir)


def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so importing this module has no side effects)."""
  config_flags.DEFINE_config_file("config", None, "Training config file (path[:args]).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events and samples.")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
