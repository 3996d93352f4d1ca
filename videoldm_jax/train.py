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

import collections
import copy
import dataclasses
import functools
import json
import logging
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from videoldm_jax import aot, checkpoint, cli, config_lib, optim, parallel, sampling, tasks, writers
from videoldm_jax.evaluation import fvd

FLAGS = flags.FLAGS


class NonFiniteError(FloatingPointError):
  """Raised when a step produced a non-finite loss or gradient norm (the update was skipped)."""


class ConfigError(ValueError):
  """The config cannot run (a bad value, a path that does not exist); raised before any device work and before
  anything is written into the workdir. The message names the key."""


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


def _exists(path: str) -> Optional[bool]:
  """Whether ``path`` exists; None when that cannot be told here (e.g. a remote filesystem without access)."""
  try:
    return epath.Path(path).exists()
  except Exception:  # pylint: disable=broad-except
    return None


def config_paths(config) -> List[Tuple[str, str]]:
  """``(key, path)`` of every file or folder a stage config reads, for the keys that are set and in use."""
  out = [(k, config.get(k) or "") for k in ("model_init", "resume")]
  if config.data.source != "synthetic":
    out.append(("data.data_dir", config.data.data_dir or ""))
  if "autoencoder" in config:
    out += [(f"autoencoder.{k}", config.autoencoder.get(k) or "") for k in ("lpips_vgg", "lpips_lin")]
  if int(config.evaluation.every_steps) and str(config.evaluation.reference).endswith(".npz"):
    out.append(("evaluation.reference", str(config.evaluation.reference)))
  return [(k, str(v)) for k, v in out if v]


def check_paths(config, prefix: str = "config") -> None:
  """Raises ``ConfigError`` naming the first path of ``config_paths`` that does not exist, or a ``resume`` /
  ``model_init`` folder of the wrong kind (checked before any device work: a typo costs seconds, not an init and
  a compile)."""
  for key, path in config_paths(config):
    if _exists(path) is False:
      raise ConfigError(f"{prefix}.{key}={path!r}: no such file or directory")
  resume = config.get("resume") or ""
  if resume and _exists(os.path.join(resume, "checkpoints")) is False:
    raise ConfigError(f"{prefix}.resume={resume!r}: not a training workdir (no checkpoints/)")
  model_init = config.get("model_init") or ""
  if model_init and all(_exists(os.path.join(model_init, n)) is False for n in ("config.json", "checkpoints")):
    raise ConfigError(f"{prefix}.model_init={model_init!r}: neither a converted checkpoint (config.json + unet/ "
                      "vae/ ...) nor a training workdir (checkpoints/)")


def run_rngs(config):
  """``(init, train, eval, sample)`` keys derived from ``config.seed``.

  The init key uses the "rbg" PRNG (XLA RngBitGenerator for the bits): initialising hundreds of parameters with
  threefry makes XLA compile the init for a long time on CPU; rbg halves that.
  """
  train_rng, eval_rng, sample_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
  return jax.random.key(config.seed, impl="rbg"), train_rng, eval_rng, sample_rng


def check_batch(batch, expected) -> None:
  """The input pipeline's batch must be what the task declares (``task.abstract_batch``, which the planner
  compiles with): same fields, shapes and dtypes. ``ValueError`` names the first field that differs."""
  got = {k: (tuple(v.shape), str(v.dtype)) for k, v in optim.flat_paths(batch).items()}
  want = {k: (tuple(v.shape), str(v.dtype)) for k, v in optim.flat_paths(expected).items()}
  for k in sorted(set(got) | set(want)):
    if got.get(k) != want.get(k):
      raise ValueError(f"batch field {k!r}: the input pipeline gives {got.get(k, 'nothing')} but the task's "
                       f"abstract_batch declares {want.get(k, 'nothing')}")


def _write_config(config, workdir: epath.Path) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def train_and_evaluate(config, workdir: str,
                       watcher: Optional[checkpoint.PreemptionWatcher] = None) -> TrainResult:
  """Trains ``config.stage`` in ``workdir`` (resuming if it holds a checkpoint). Returns the final state.

  SIGTERM is handled from the first line on (``watcher``: the caller's, else one installed here for the call): a
  stop during start-up (validation, init, restore, compile) ends the run before its first step with nothing new
  to save, a later one at the next step with a checkpoint; ``TrainResult.preempted`` says so either way.
  """
  own_watcher = watcher is None
  if own_watcher:
    watcher = checkpoint.PreemptionWatcher()
  try:
    return _train_and_evaluate(config, workdir, watcher)
  finally:
    if own_watcher:
      watcher.restore()


def _train_and_evaluate(config, workdir: str, watcher: checkpoint.PreemptionWatcher) -> TrainResult:
  # ----------------------------------------------------------------------------------------------------------
  # Set-up: validate (keys, values, the paths the config names), settings from the model_init source, mesh,
  # task. Nothing is written into the workdir until all of it passed.
  # ----------------------------------------------------------------------------------------------------------
  try:
    tasks.validate(config)
    check_paths(config)
    config = tasks.get(config.stage).resolve_config(config)
    mesh = parallel.make_mesh(config)
    rules = parallel.logical_rules(config)
    config_lib.validate_for_mesh(config, parallel.data_parallel_size(mesh), jax.process_count())
    task = tasks.get(config.stage)(config)
    check_model_init(config, task)
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from e
  wd = epath.Path(workdir)
  is_main = jax.process_index() == 0
  if is_main:
    _write_config(config, wd)

  init_rng, train_rng, eval_rng, sample_rng = run_rngs(config)
  data = task.input_pipeline(mesh)
  ckpt = checkpoint.Checkpointer(str(wd / "checkpoints"), keep=config.keep_checkpoints,
                                 async_save=config.async_checkpointing)

  def close_inputs():
    ckpt.close()
    if hasattr(data, "close"):
      data.close()

  def stopped_in_start_up(restored, start_step: int, when: str) -> Optional[TrainResult]:
    """A TrainResult (preempted, nothing trained) when SIGTERM came during start-up, else None."""
    if not watcher.should_stop(start_step):
      return None
    logging.warning("Stopped by SIGTERM during start-up (%s), before step %d: nothing new to save; rerun the same "
                    "command to continue from %s", when, start_step + 1,
                    f"step {start_step}" if restored.source == "checkpoint" else "the start")
    close_inputs()
    return TrainResult(state=restored.state, frozen=restored.frozen, task=task, step=start_step, history=[],
                       eval_history=[], preempted=True)

  try:
    # --------------------------------------------------------------------------------------------------------
    # State: sharded from the logical rules; checkpoint -> resume -> model_init -> scratch.
    # --------------------------------------------------------------------------------------------------------
    copts = aot.compiler_options(config)
    restored = checkpoint.restore_or_init(config, workdir, task.init, init_rng, mesh, rules, task.tx, ckpt, data,
                                          compiler_options=copts)
    state, frozen = restored.state, restored.frozen
    start_step = int(jax.device_get(state.step))
    n_train = sum(x.size for x in jax.tree.leaves(state.params))
    n_frozen = sum(x.size for x in jax.tree.leaves(frozen))
    logging.info("Params: %d trainable, %d frozen (%s; %d freshly initialised); starting at step %d", n_train,
                 n_frozen, restored.source, len(restored.initialised), start_step)
    stopped = stopped_in_start_up(restored, start_step, "after the restore")
    if stopped is not None:
      return stopped

    # --------------------------------------------------------------------------------------------------------
    # AOT compile of the train step (out-of-memory shows here, before any step runs).
    # --------------------------------------------------------------------------------------------------------
    batch = next(data)
    check_batch(batch, task.abstract_batch(int(config.batch_size)))
    lowered = aot.lower_train_step(task.train_step, (state, frozen, batch, train_rng), restored.state_shardings,
                                   restored.frozen_shardings, mesh, rules)
    compiled, stats = aot.compile_with_stats(lowered, copts)
    logging.info("Compiled train step in %.1fs; memory per device: %s; flops per step: %s", stats.compile_seconds,
                 stats.memory, stats.flops)
    stopped = stopped_in_start_up(restored, start_step, "after the compile")
    if stopped is not None:
      return stopped
  except BaseException:
    close_inputs()
    raise

  # Fixed evaluation batch (deterministic, independent of the training stream) and noise. Evaluation and
  # previews are jitted under the run's mesh and logical-axis rules, as the train step, so the model's sharding
  # constraints hold there too.
  eval_batch = None
  if config.eval_every_steps or config.sample_every_steps:
    eval_batch = task.fixed_batch(mesh)

  def with_rules(fn):
    jitted = jax.jit(fn, compiler_options=copts)

    def call(*args):
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return jitted(*args)

    return call

  eval_fn = with_rules(lambda *a: dict(task.eval_metrics(*a), eval_loss=task.eval_loss(*a))) \
      if config.eval_every_steps else None
  sample_fn = with_rules(task.sample_fn) if config.sample_every_steps or config.evaluation.every_steps else None
  video_eval = VideoEvaluation(config, task, mesh, sample_fn, wd) if config.evaluation.every_steps else None

  # ----------------------------------------------------------------------------------------------------------
  # Loop. Step metrics stay on the device until a log step (or a checkpoint) fetches them all at once; every
  # step's "finite" flag is checked then, in order, and a non-finite step stops the run before anything is saved.
  # ----------------------------------------------------------------------------------------------------------
  writer = writers.create_writer(str(wd), just_logging=not is_main)
  if is_main and start_step == 0:
    writer.write_hparams({k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))})
  progress = writers.ReportProgress(config.total_steps, writer, every_secs=config.progress_every_secs)
  loss_scale = LossScale()
  history: List[Dict[str, float]] = []
  eval_history: List[Dict[str, float]] = []
  pending: List[Tuple[int, Any]] = []  # (step, metrics on device) not yet fetched
  preempted = False
  last_saved = start_step if restored.source == "checkpoint" else None

  def fetch() -> List[Dict[str, float]]:
    """Host metrics of the pending steps; raises at the first non-finite one."""
    fetched = jax.device_get([m for _, m in pending])
    steps = [s for s, _ in pending]
    pending.clear()
    out = []
    for step, m in zip(steps, fetched):
      host = {k: float(v) for k, v in m.items()}
      if not host.pop("finite", 1.0):
        ckpt.wait()
        raise NonFiniteError(
            f"Non-finite loss or gradient norm at step {step} (loss={host.get('loss')}, "
            f"grad_norm={host.get('grad_norm')}): the update was skipped and training stopped. "
            f"{loss_scale.last_good(step, last_saved, ckpt.all_steps(), wd / 'checkpoints')} Lower "
            "config.optimizer.lr, raise config.optimizer.warmup_steps, check the inputs, or use "
            "config.dtype='float32'.")
      if "loss" in host:
        loss_scale.update(step, host["loss"])
      history.append(dict(host, step=step))
      out.append(host)
    return out

  def save(step):
    nonlocal last_saved
    fetch()  # never checkpoint a state whose steps are unchecked
    ckpt.save(step, state, data)
    last_saved = step

  def evaluate(step):
    metrics = {k: float(v) for k, v in jax.device_get(eval_fn(state.params, frozen, eval_batch, eval_rng)).items()}
    eval_history.append(dict(metrics, step=step))
    writer.write_scalars(step, metrics)

  step = start_step
  try:
    if eval_fn is not None and start_step == 0:
      evaluate(0)  # the loss before training, on the same fixed batch and noise as every later evaluation
    for step in range(start_step + 1, config.total_steps + 1):
      if step > start_step + 1:
        batch = next(data)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = compiled(state, frozen, batch, train_rng)
      pending.append((step, metrics))
      progress(step)

      is_last = step == config.total_steps
      if config.log_every_steps and (step % config.log_every_steps == 0 or is_last):
        window = fetch()
        means = {k: float(np.mean([w[k] for w in window])) for k in window[0]} if window else {}
        if progress.steps_per_sec:
          means["steps_per_sec"] = progress.steps_per_sec
        writer.write_scalars(step, means)
      if eval_fn is not None and (step % config.eval_every_steps == 0 or is_last):
        evaluate(step)
      if config.sample_every_steps and (step % config.sample_every_steps == 0 or is_last):
        _write_samples(sample_fn, state, frozen, eval_batch, sample_rng, wd, step, writer, config)
      if video_eval is not None and (step % config.evaluation.every_steps == 0 or is_last):
        metrics = video_eval(state, frozen, sample_rng)
        eval_history.append(dict(metrics, step=step))
        writer.write_scalars(step, metrics)
      stop = watcher.should_stop(step)
      if (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0) or is_last or stop:
        save(step)
      if stop:
        preempted = True
        logging.warning("Stopped at step %d after SIGTERM; checkpoint saved.", step)
        break
    fetch()
    if not preempted and step == config.total_steps:
      _write_info(task, state, frozen, eval_batch if eval_batch is not None else batch, eval_rng, wd)
  finally:
    ckpt.close()
    writer.flush()
    if hasattr(data, "close"):
      data.close()
  return TrainResult(state=state, frozen=frozen, task=task, step=step, history=history, eval_history=eval_history,
                     preempted=preempted, compile_seconds=stats.compile_seconds, memory=stats.memory)


class LossScale:
  """The scale of the training loss, to tell a diverging run from a merely finite one.

  A running median of the last ``window`` finite losses; a loss above ``factor`` x that median (once ``min_count``
  losses are known) starts a divergence and the first loss back under it ends it. While a divergence lasts the
  median stays at its value before the onset, so a slow climb does not drag it along.
  """

  def __init__(self, factor: float = 10.0, window: int = 200, min_count: int = 4):
    self.factor, self.min_count = factor, min_count
    self.losses: collections.deque = collections.deque(maxlen=window)
    self.diverging_since: Optional[int] = None  # first step of the current divergence
    self.onset: Tuple[float, float] = (0.0, 0.0)  # (median before it, loss) at that step

  @property
  def median(self) -> Optional[float]:
    return float(np.median(self.losses)) if len(self.losses) >= self.min_count else None

  def update(self, step: int, loss: float) -> None:
    if not np.isfinite(loss):
      return
    median = self.median
    if median is not None and median > 0 and loss > self.factor * median:
      if self.diverging_since is None:
        self.diverging_since, self.onset = step, (median, loss)
      return
    self.diverging_since = None
    self.losses.append(loss)

  def last_good(self, step: int, last_saved: Optional[int], kept: List[int], directory) -> str:
    """One or two sentences naming the checkpoint to go back to after a non-finite ``step``: the newest one
    (of the ``kept`` steps) saved before the divergence, or plainly that the newest one is only finite."""
    k = f"{self.factor:g}x"
    if self.diverging_since is None:
      if last_saved is None:
        return f"No checkpoint was saved in {directory}."
      median = self.median
      scale = (f"no divergence seen: the loss was within {k} its running median {median:.4g} before step {step}"
               if median is not None and median > 0 else "the loss scale is unknown: it is only known to be finite")
      return f"Last good checkpoint: step {last_saved} in {directory} ({scale})."
    onset = self.diverging_since
    median, loss = self.onset
    head = (f"The loss diverged before that: from step {onset} on it stayed above {k} its running median "
            f"{median:.4g} (loss {loss:.4g} at step {onset}).")
    before = [s for s in kept if s < onset]
    if before:
      after = (f"; step {last_saved} is finite but was saved after the divergence began"
               if last_saved is not None and last_saved >= onset else "")
      return f"{head} Last good checkpoint: step {max(before)} in {directory}, saved before it{after}."
    newest = f"; the newest, step {last_saved}, is only finite" if last_saved is not None else ""
    return f"{head} No checkpoint from before step {onset} is kept in {directory}{newest}."


class VideoEvaluation:
  """``config.evaluation``: FVD (README "Evaluation") of ``num_videos`` clips the EMA model samples for the
  conditions of the fixed evaluation batch (clips at least ``num_frames`` long), against reference clips whose
  statistics are computed once and kept in ``WORKDIR/fvd_reference.npz``. Extraction runs on the run's mesh."""

  def __init__(self, config, task, mesh, sample_fn, wd: epath.Path):
    ec = config.evaluation
    self.num_videos, self.sample_fn = int(ec.num_videos), sample_fn
    self.batch = task.fixed_batch(mesh, min_frames=int(ec.num_frames))
    self.extractor = fvd.I3DFeatures(mesh=mesh, batch_size=int(ec.batch_size) or None, num_frames=int(ec.num_frames))
    cache = wd / "fvd_reference.npz"
    if cache.exists():
      self.reference = fvd.load_reference_stats(str(cache), num_frames=int(ec.num_frames), num_videos=self.num_videos)
    else:
      fps = config.data.fps[0] if isinstance(config.data.fps, (tuple, list)) else config.data.fps
      self.reference = fvd.reference_stats(ec.reference, self.num_videos, int(ec.num_frames), extractor=self.extractor,
                                           data_dir=config.data.data_dir or None, height=int(config.data.height),
                                           width=int(config.data.width), fps=float(fps))
      if jax.process_index() == 0:
        self.reference.save(str(cache), fvd.STATS_NAME,
                            fvd.protocol_meta(int(ec.num_frames), self.reference.count, str(ec.reference)))

  def __call__(self, state, frozen, rng) -> Dict[str, float]:
    params = state.ema_params if state.ema_params is not None else state.params
    videos, i = [], 0
    while sum(len(v) for v in videos) < self.num_videos:
      videos.append(parallel.to_host(self.sample_fn(params, frozen, self.batch, jax.random.fold_in(rng, i))))
      i += 1
    stats = self.extractor.stats(np.concatenate(videos)[:self.num_videos])
    return {"eval_fvd": fvd.fvd_from_stats(stats, self.reference)}


def _write_samples(sample_fn, state, frozen, batch, rng, wd: epath.Path, step: int, writer, config) -> None:
  params = state.ema_params if state.ema_params is not None else state.params
  videos = parallel.to_host(sample_fn(params, frozen, batch, rng))  # [n, t, h, w, 3] uint8, on every process
  if jax.process_index() != 0:
    return
  out = wd / "samples"
  out.mkdir(parents=True, exist_ok=True)
  grid = writers.video_grid(videos)
  (out / f"step_{step:07d}.gif").write_bytes(writers.encode_gif(grid, config.sampling.fps))
  (out / f"step_{step:07d}.png").write_bytes(writers.encode_png(np.concatenate(list(grid), axis=0)))
  writer.write_videos(step, {"samples": videos}, fps=config.sampling.fps)
  logging.info("Wrote samples %s", out / f"step_{step:07d}.gif")


def _write_info(task, state, frozen, batch, rng, wd: epath.Path) -> None:
  """``WORKDIR/info.json``: what the finished stage measured for the stages built on it (``task.workdir_info``,
  from the EMA params that later stages load)."""
  params = state.ema_params if state.ema_params is not None else state.params
  info = {k: float(v) for k, v in jax.device_get(task.workdir_info(params, frozen, batch, rng)).items()}
  if info and jax.process_index() == 0:
    checkpoint.write_info(str(wd), info)
    logging.info("Stage info %s: %s", wd / checkpoint.INFO_FILE, info)


# ---------------------------------------------------------------------------------------------------------------
# Chains: the stages of a pipeline one after the other (config_lib.chain_config), each from the previous ones.
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


def train_chain(config, workdir: str,
                watcher: Optional[checkpoint.PreemptionWatcher] = None) -> Dict[str, Optional[TrainResult]]:
  """Trains the stages of ``config.chain`` in order, stage S with ``config.stages.S`` in ``WORKDIR/S``.

  An empty ``model_init`` of a stage becomes the previous stage's workdir (which names its own sources in turn),
  so every stage starts from all earlier results, or the workdir of the stage ``config.init_from`` names. A stage already at its ``total_steps`` is skipped and an
  interrupted one resumes, so rerunning the command continues the chain. Afterwards ``config.sample_videos``
  long videos through the chain's pipeline stages go to ``WORKDIR/sample.{mp4,gif,png}`` (``sampling``;
  rewritten only when a stage trained or they are missing). Returns ``{stage: TrainResult, or None when skipped}``; only the last
  trained stage keeps its state in memory. The config (every stage's keys, values and paths) is checked before
  anything is written; ``watcher`` as in ``train_and_evaluate``.
  """
  try:
    tasks.validate(config)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  for name in config.chain:
    check_paths(config.stages[name], prefix=f"config.stages.{name}")
  wd = epath.Path(workdir)
  if jax.process_index() == 0:
    _write_config(config, wd)
  results: Dict[str, Optional[TrainResult]] = {}
  previous = None
  for name in config.chain:
    stage_config = copy.deepcopy(config.stages[name])
    source = config_lib.chain_init_stage(config, name, previous)
    if not stage_config.model_init and source is not None:
      stage_config.model_init = str(wd / source)
    stage_dir = str(wd / name)
    if finished(stage_config, stage_dir):
      logging.info("Chain: stage %r already finished in %s, skipped", name, stage_dir)
      results[name] = None
    else:
      logging.info("Chain: stage %r in %s (model_init: %s)", name, stage_dir, stage_config.model_init or "none")
      for done in results.values():  # device memory goes to the stage that trains now
        if done is not None:
          done.state = done.frozen = None
      res = train_and_evaluate(stage_config, stage_dir, watcher)
      results[name] = res
      if res.preempted:
        logging.warning("Chain stopped during stage %r; rerun the same command to continue", name)
        return results
    previous = name
  outputs = [wd / f"sample.{k}" for k in ("mp4", "gif", "png")]
  if config.sample_videos and (any(r is not None for r in results.values()) or not all(p.exists()
                                                                                       for p in outputs)):
    t0 = time.time()
    out = sampling.sample_workdir(str(wd), num_samples=int(config.sample_videos),
                                  batch_size=int(config.sample_videos), keep_videos=False,
                                  fvd_clips=int(config.sample_fvd_clips))
    logging.info("Chain: wrote %s, %s and %s in %.1fs", out.get("mp4"), out.get("gif"), out.get("png"),
                 time.time() - t0)
    if int(config.sample_fvd_clips):
      last = config.stages[config.chain[-1]]
      closing_fvd(out["fvd_clips"], float(out["fps"]), wd, source=str(last.data.source),
                  data_dir=str(last.data.data_dir) or None)
  return results


def closing_fvd(clips: np.ndarray, fps: float, wd: epath.Path, *, source: str = "synthetic",
                data_dir: Optional[str] = None) -> Dict[str, float]:
  """FVD of ``clips`` ``[N, num_frames, h, w, 3]`` (cut from the closing long videos by the sampler,
  ``sampling.fvd_clip_starts``) against as many held-out real clips at the same fps and size, printed next to the
  FVD of two disjoint real sets of that size (the noise floor: what "no difference" measures at this sample size),
  and written to ``WORKDIR/fvd.json``."""
  num_frames = clips.shape[1]
  extractor = fvd.I3DFeatures(num_frames=num_frames)
  generated = extractor.stats(clips)
  floor, reference, _ = fvd.noise_floor(source, len(clips), num_frames, extractor=extractor, data_dir=data_dir,
                                        height=clips.shape[2], width=clips.shape[3], fps=fps)
  out = {"fvd": fvd.fvd_from_stats(generated, reference), "noise_floor": floor, "num_clips": len(clips),
         "num_frames": num_frames, "fps": fps}
  message = (f"FVD of {len(clips)} clips ({num_frames} frames at {fps:g} fps) of the sampled videos vs held-out "
             f"{source} clips: {out['fvd']:.1f}; real vs real at this sample size (noise floor): {floor:.1f}")
  logging.info("Chain: %s", message)
  if jax.process_index() == 0:
    print(message)
    (wd / "fvd.json").write_text(json.dumps(out, indent=2))
  return out


def _quiet_library_logs() -> None:
  """Keeps orbax's per-save INFO chatter out of the training log (warnings and errors still show)."""
  import logging as pylogging  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  class _Filter(pylogging.Filter):
    def filter(self, record):
      return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname

  absl_logging.get_absl_handler().addFilter(_Filter())


def main(argv, watcher: Optional[checkpoint.PreemptionWatcher] = None) -> int:
  """The command: trains a stage or a chain. Exit status 0 when done, ``--preemption_exit_code`` after a stop on
  SIGTERM (restart it to continue), 2 for a config that cannot run and 1 for a run that cannot go on (no
  checkpoint restores, a non-finite loss), each with one line on stderr."""
  watcher = watcher or checkpoint.PreemptionWatcher()
  _quiet_library_logs()
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  if config is None or not FLAGS.workdir:
    raise app.UsageError("--config and --workdir are required")
  parallel.initialize_distributed(config)
  logging.info("JAX %s: %d devices (%s), %d processes", jax.__version__, jax.device_count(),
               jax.devices()[0].platform, jax.process_count())
  try:
    if config_lib.is_chain(config):
      results = train_chain(config, FLAGS.workdir, watcher)
      preempted = any(r is not None and r.preempted for r in results.values())
    else:
      preempted = train_and_evaluate(config, FLAGS.workdir, watcher).preempted
  except (ConfigError, checkpoint.CheckpointError, NonFiniteError) as e:
    print(f"videoldm_jax.train: {e}", file=sys.stderr)
    return 2 if isinstance(e, ConfigError) else 1
  return int(FLAGS.preemption_exit_code) if preempted else 0


def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so importing this module has no side effects)."""
  config_flags.DEFINE_config_file("config", None, "Training config file (path[:args]).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events and samples.")
  flags.DEFINE_integer("preemption_exit_code", 0, "Exit status after a stop on SIGTERM (checkpoint saved, or "
                       "nothing to save yet): 0, or a code the launcher restarts on (launch/: 42).")


if __name__ == "__main__":
  # SIGTERM is handled from here on: a preemption during start-up (imports aside) stops cleanly too.
  _WATCHER = checkpoint.PreemptionWatcher()
  cli.run_config_program("videoldm_jax.train", define_flags, functools.partial(main, watcher=_WATCHER),
                         required=("config", "workdir"))
