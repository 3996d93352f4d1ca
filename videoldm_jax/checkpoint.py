"""Checkpoints: orbax manager for the train state + data iterator, frozen params, model_init, preemption.

Workdir layout::

  WORKDIR/config.json                      the run's config
  WORKDIR/checkpoints/<step>/state         trainable params, optimizer state, EMA, step (orbax PyTree)
  WORKDIR/checkpoints/<step>/data          data iterator state (grain CheckpointHandler, one file per process)
  WORKDIR/frozen/                          frozen params, written ONCE, only when they were not loaded from
                                           ``config.model_init`` (random init) so a restart or a later stage finds
                                           exactly the same backbone
  WORKDIR/model_init.json                  ``{"model_init": PATH}`` when the frozen params came from PATH

Restore order (``restore_or_init``): the newest checkpoint in WORKDIR that restores (a damaged newer step is moved
to ``checkpoints/corrupt-<step>``; none restoring is an error, never a fresh start) -> ``config.resume`` (another
workdir's checkpoint) -> ``config.model_init`` (``videoldm_jax.convert`` output or a trained workdir, loaded leaf by
leaf into the fresh tree; only leaves matching ``config.model_init_missing_ok`` may be absent, e.g. new temporal
layers) -> scratch. Frozen params are re-loaded from ``WORKDIR/frozen`` or ``model_init`` on every start, never
re-saved.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import flax
import flax.linen as nn
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from videoldm_jax import optim, parallel

# orbax's default replica-parallel save slices every replicated array per replica, compiling one small program per
# distinct shape (hundreds for a U-Net's replicated norms/biases: ~80 s vs 0.3 s on an 8-device CPU mesh). Large
# params here are FSDP-sharded, not replicated, so plain per-shard writes lose nothing.
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)

try:  # grain registers orbax args for its iterators (exact resume of the input pipeline).
  from grain.checkpoint import CheckpointRestore as DataRestore, CheckpointSave as DataSave
except ImportError:  # pragma: no cover
  DataRestore = DataSave = None

SEP = optim.SEP


class CheckpointError(RuntimeError):
  """A workdir's checkpoints cannot be used (none restores); the message names the directory."""


def _one_line(e: BaseException, limit: int = 300) -> str:
  """``Type: first line of the message`` of an exception, shortened (orbax / tensorstore errors run long)."""
  text = (str(e).strip().splitlines() or [""])[0]
  text = text if len(text) <= limit else text[:limit] + " ..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _on_every_process(ok: bool) -> bool:
  """True when ``ok`` holds on every process (all processes must restore the same step)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


# ---------------------------------------------------------------------------------------------------------------
# Train-state checkpoints.
# ---------------------------------------------------------------------------------------------------------------

class Checkpointer:
  """Orbax ``CheckpointManager`` over ``directory``: items ``state`` (TrainState as a dict) and ``data``."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = epath.Path(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> List[int]:
    """The steps held (``keep`` removes the oldest), ascending."""
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: optim.TrainState, data_iter=None) -> None:
    items = {"state": ocp.args.StandardSave(flax.serialization.to_state_dict(state))}
    if data_iter is not None and DataSave is not None and hasattr(data_iter, "get_state"):
      items["data"] = DataSave(data_iter)
    self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)

  def restore(self, abstract_state: optim.TrainState, data_iter=None, step: Optional[int] = None
              ) -> optim.TrainState:
    """Restores into ``abstract_state`` (``ShapeDtypeStruct`` leaves with shardings) and, when saved, the data
    iterator in place."""
    step = self.latest_step() if step is None else step
    target = flax.serialization.to_state_dict(abstract_state)
    items = {"state": ocp.args.StandardRestore(target)}
    has_data = (self.directory / str(step) / "data").exists()
    if data_iter is not None and has_data and DataRestore is not None:
      items["data"] = DataRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("Restored step %d from %s%s", step, self.directory, " (with data iterator)" if "data" in items
                 else "")
    return flax.serialization.from_state_dict(abstract_state, restored["state"])

  def restore_intact(self, abstract_state: optim.TrainState, data_iter=None) -> Tuple[optim.TrainState, int]:
    """``(state, step)`` of the newest step that restores, trying the steps newest first.

    A newer step that does not restore (a truncated or emptied file, no ``state/``, an empty step folder left by a
    crash) is moved aside to ``corrupt-<step>`` in the same directory, outside orbax's step naming and never
    deleted, with one warning naming it and why. When no step restores nothing is moved (the cause may be the
    config rather than the files, e.g. other param shapes) and ``CheckpointError`` names the directory.
    """
    failed = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      state, why = None, None
      try:
        state = self.restore(abstract_state, data_iter, step)
      except Exception as e:  # pylint: disable=broad-except  (orbax, tensorstore and JSON errors of a damaged step)
        why = _one_line(e)
      if not _on_every_process(why is None):
        failed.append((step, why or "failed on another process"))
        continue
      for bad, reason in failed:
        moved = self._move_aside(bad)
        logging.warning("Checkpoint step %d in %s does not restore (%s): moved to %s; resuming from step %d",
                        bad, self.directory, reason, moved, step)
      if failed:
        self.manager.reload()
      return state, step
    steps = ", ".join(str(s) for s, _ in failed)
    raise CheckpointError(f"{self.directory}: no checkpoint restores (steps {steps}; step {failed[0][0]}: "
                          f"{failed[0][1]}); nothing was moved: check that the config is the run's, or move the "
                          "damaged step folders away to resume from an earlier one")

  def _move_aside(self, step: int) -> epath.Path:
    """Renames the folder of ``step`` to ``corrupt-<step>`` (``corrupt-<step>.<n>`` if taken); returns it."""
    target, n = self.directory / f"corrupt-{step}", 0
    while target.exists():
      n += 1
      target = self.directory / f"corrupt-{step}.{n}"
    if jax.process_index() == 0:
      (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"checkpoint_move_aside_{step}")
    return target

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


# ---------------------------------------------------------------------------------------------------------------
# Plain param trees (frozen params, model_init sources).
# ---------------------------------------------------------------------------------------------------------------

INFO_FILE = "info.json"


def write_info(workdir: str, info: Dict[str, Any]) -> None:
  """``WORKDIR/info.json`` (what a finished stage measured for later stages), written atomically."""
  path = epath.Path(workdir) / INFO_FILE
  tmp = path.parent / (INFO_FILE + ".tmp")
  tmp.write_text(json.dumps(info, indent=2, sort_keys=True))
  tmp.rename(path)


def read_info(workdir: str) -> Dict[str, Any]:
  """The ``info.json`` of a workdir ({} when it has none)."""
  path = epath.Path(workdir) / INFO_FILE
  return json.loads(path.read_text()) if path.exists() else {}


def save_params(path: str, params) -> None:
  """Blocking orbax save of a param tree (all processes participate)."""
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(epath.Path(path).absolute(), params, force=True)
  ckpt.wait_until_finished()


# tree_metadata per (directory, modification time of its commit marker): orbax reads the metadata of every array
# of a train state (optimizer moments included) on each call, ~1 s per SD-free runlocal state on a CPU host, and
# loading a pipeline asks for the same source directories many times (each stage's model_init chain).
_METADATA_CACHE: Dict[Tuple[str, Any], Dict[str, Any]] = {}


def _version(root: epath.Path) -> Any:
  """What changes when an orbax directory is written again: its commit marker's (or its own) stat."""
  marker = root / "_CHECKPOINT_METADATA"
  target = marker if marker.exists() else root
  if "://" not in str(target):
    st = os.stat(str(target))
    return (st.st_mtime_ns, st.st_ino, st.st_size)
  st = target.stat()
  return (st.mtime, st.length)


def tree_metadata(path: str) -> Dict[str, Any]:
  """Flat ``{path: ArrayMetadata}`` of an orbax PyTree directory (no array is read)."""
  root = epath.Path(path).absolute()
  key = (str(root), _version(root))
  if key not in _METADATA_CACHE:
    md = ocp.PyTreeCheckpointer().metadata(root)
    tree = md.item_metadata.tree if hasattr(md, "item_metadata") else md.tree
    _METADATA_CACHE[key] = traverse_util.flatten_dict(tree, sep=SEP)
  return dict(_METADATA_CACHE[key])


def restore_subset(path: str, target_flat: Dict[str, jax.ShapeDtypeStruct]) -> Dict[str, jax.Array]:
  """Restores only the leaves named in ``target_flat`` (flat paths -> ShapeDtypeStruct with sharding), each read
  straight into its sharding and cast to the target dtype."""
  if not target_flat:
    return {}
  target = traverse_util.unflatten_dict(target_flat, sep=SEP)
  args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype),
                      target)
  restored = ocp.PyTreeCheckpointer().restore(
      epath.Path(path).absolute(), args=ocp.args.PyTreeRestore(item=target, restore_args=args, partial_restore=True))
  return traverse_util.flatten_dict(restored, sep=SEP)


def is_training_config(path) -> bool:
  """Whether the ``config.json`` at ``path`` is a training run's (it names a stage) rather than the one
  ``videoldm_jax.convert`` writes next to its component checkpoints."""
  try:
    data = json.loads(epath.Path(path).read_text())
  except (OSError, ValueError):
    return False
  return isinstance(data, dict) and "stage" in data and "format" not in data


def _latest_state_dir(workdir: epath.Path) -> Optional[epath.Path]:
  ckdir = workdir / "checkpoints"
  if not ckdir.exists():
    return None
  steps = sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit() and (p / "state").exists())
  return ckdir / str(steps[-1]) / "state" if steps else None


def source_metadata(path: str, use_ema: bool = True) -> Dict[str, Tuple[str, str]]:
  """Flat param path -> (orbax directory, path inside it) for every param a ``model_init`` source provides.

  Sources: (1) a converted checkpoint directory (``python -m videoldm_jax.convert``: ``config.json`` + one orbax
  tree per component ``unet/``, ``vae/``, ``text_encoder/``); (2) a training workdir: trainable params from its latest checkpoint (EMA when
  ``use_ema`` and present), frozen params from its ``frozen/`` or, recursively, its own ``model_init``.
  """
  root = epath.Path(path)
  out: Dict[str, Tuple[str, str]] = {}
  if (root / "config.json").exists() and not (root / "checkpoints").exists():
    if is_training_config(root / "config.json"):
      raise FileNotFoundError(f"config.model_init={path!r}: a training workdir (config.json) with no checkpoints/ "
                              "yet")
    # videoldm_jax.convert output: config.json + one orbax tree per component (unet/, vae/, text_encoder/).
    components = [p for p in root.iterdir() if p.is_dir() and (p / "_CHECKPOINT_METADATA").exists()]
    if not components:
      raise FileNotFoundError(f"config.model_init={path!r}: config.json but no component checkpoints")
    for comp in components:
      for k in tree_metadata(str(comp)):
        out[f"{comp.name}{SEP}{k}"] = (str(comp), k)
    return out
  if not (root / "checkpoints").exists():
    raise FileNotFoundError(f"config.model_init={path!r}: neither a converted checkpoint (config.json + unet/ "
                            "vae/ ...) nor a training workdir (checkpoints/)")
  if (root / "frozen").exists():
    for k in tree_metadata(str(root / "frozen")):
      out[k] = (str(root / "frozen"), k)
  elif (root / "model_init.json").exists():
    out.update(source_metadata(json.loads((root / "model_init.json").read_text())["model_init"], use_ema))
  state_dir = _latest_state_dir(root)
  if state_dir is None:
    raise FileNotFoundError(f"config.model_init={path!r}: workdir has no finished checkpoint")
  flat = tree_metadata(str(state_dir))
  prefix = "ema_params" + SEP if use_ema and any(k.startswith("ema_params" + SEP) for k in flat) else "params" + SEP
  for k in flat:
    if k.startswith(prefix):
      out[k[len(prefix):]] = (str(state_dir), k)
  return out


def load_model_init(path: str, abstract_flat: Dict[str, jax.ShapeDtypeStruct], *, missing_ok: str,
                    use_ema: bool = True) -> Dict[str, jax.Array]:
  """Loads every leaf of ``abstract_flat`` (flat path -> sharded ShapeDtypeStruct) that ``path`` provides.

  Raises ``ValueError`` listing params that are absent (unless they match the regex ``missing_ok``) or have a
  different shape; params the source has but the model does not are ignored (e.g. an unused text encoder).
  """
  src = source_metadata(path, use_ema)
  rx = re.compile(missing_ok) if missing_ok else None
  missing = [k for k in abstract_flat if k not in src and not (rx and rx.fullmatch(k))]
  by_dir: Dict[str, Dict[str, jax.ShapeDtypeStruct]] = {}
  shapes = {}
  for k, s in abstract_flat.items():
    if k in src:
      d, inner = src[k]
      by_dir.setdefault(d, {})[inner] = s
      shapes[k] = (d, inner)
  metadata = {d: tree_metadata(d) for d in by_dir}
  mismatched = [f"{k}: checkpoint {tuple(metadata[d][inner].shape)} vs model {tuple(abstract_flat[k].shape)}"
                for k, (d, inner) in shapes.items()
                if tuple(metadata[d][inner].shape) != tuple(abstract_flat[k].shape)]
  if missing or mismatched:
    raise ValueError(f"config.model_init={path!r} does not fit the model:\n  missing ({len(missing)}): "
                     f"{missing[:20]}\n  mis-shaped ({len(mismatched)}): {mismatched[:20]}")
  loaded: Dict[str, jax.Array] = {}
  for d, tgt in by_dir.items():
    got = restore_subset(d, tgt)
    for k, (dd, inner) in shapes.items():
      if dd == d:
        loaded[k] = got[inner]
  unused = len(src) - len(loaded)
  logging.info("model_init %s: loaded %d params, kept %d freshly initialised, ignored %d from the source",
               path, len(loaded), len(abstract_flat) - len(loaded), unused)
  return loaded


# ---------------------------------------------------------------------------------------------------------------
# Restore order.
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Restored:
  state: optim.TrainState
  frozen: Dict[str, Any]
  state_shardings: optim.TrainState
  frozen_shardings: Dict[str, Any]
  source: str                     # "checkpoint" | "resume" | "model_init" | "scratch"
  initialised: Tuple[str, ...] = ()  # flat paths of the params freshly initialised (no source provided them)


def state_shardings(tx: optax.GradientTransformation, abstract_state: optim.TrainState, param_shardings,
                    mesh) -> optim.TrainState:
  """Optimizer moments take the sharding of their param; counters etc. are replicated."""
  repl = parallel.replicated(mesh)
  opt = optax.tree_map_params(tx, lambda _, s: s, abstract_state.opt_state, param_shardings,
                              transform_non_params=lambda _: repl)
  return optim.TrainState(step=repl, params=param_shardings, opt_state=opt,
                          ema_params=param_shardings if abstract_state.ema_params is not None else None)


def _with_sharding(shapes, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


class AbstractTrainState(NamedTuple):
  """Shapes and shardings of a run before anything is allocated (``restore_or_init`` and the planner)."""
  shapes: Any              # the full param tree (frozen + trainable), ShapeDtypeStructs
  shardings: Any           # and its shardings
  frozen_shapes: Any
  frozen_shardings: Any
  state: Any               # optim.TrainState of ShapeDtypeStructs (trainable params, optimizer state, EMA)
  state_shardings: Any


def abstract_train_state(config, init_fn: Callable, rng: jax.Array, mesh, rules,
                         tx: optax.GradientTransformation) -> AbstractTrainState:
  """Param shapes split by ``config.trainable`` and the train state's shapes, with their shardings."""
  boxed = jax.eval_shape(init_fn, rng)
  shardings = parallel.param_shardings(boxed, mesh, rules)
  shapes = nn.meta.unbox(boxed)
  train_shapes, frozen_shapes = optim.split(shapes, config.trainable)
  train_sh, frozen_sh = optim.split(shardings, config.trainable)
  if not jax.tree.leaves(train_shapes):
    raise ValueError(f"config.trainable={config.trainable!r} matches no parameter")
  ema = bool(config.get("ema_decay", 0.0))
  state = jax.eval_shape(lambda p: optim.init_state(p, tx, ema), train_shapes)
  return AbstractTrainState(shapes, shardings, frozen_shapes, frozen_sh, state,
                            state_shardings(tx, state, train_sh, mesh))


def restore_or_init(config, workdir: str, init_fn: Callable, rng: jax.Array, mesh, rules,
                    tx: optax.GradientTransformation, ckpt: Checkpointer, data_iter=None,
                    compiler_options: Optional[Dict[str, Any]] = None) -> Restored:
  """Materialises params and train state, sharded from the logical rules, in the documented restore order.

  ``init_fn(rng)`` returns the full boxed param tree (frozen + trainable). Only the params no source provides are
  initialised: the trainable ones come from the checkpoint (or ``config.resume``) when there is one, the frozen
  ones from ``WORKDIR/frozen`` or ``config.model_init``; the init is compiled for the missing leaves alone (XLA
  drops the rest of it), so restarting an SD-sized run costs no full random init.
  """
  wd = epath.Path(workdir)
  a = abstract_train_state(config, init_fn, rng, mesh, rules, tx)
  abstract_state, st_sh = a.state, a.state_shardings
  abstract_flat = optim.flat_paths(_with_sharding(a.shapes, a.shardings))
  trainable_keys = set(optim.flat_paths(a.state.params))
  frozen_dir = wd / "frozen"
  model_init = config.get("model_init") or ""

  # Where the train state comes from decides whether the trainable params are needed at all.
  other = None
  if ckpt.latest_step() is not None:
    source = "checkpoint"
  elif config.get("resume"):
    other = Checkpointer(os.path.join(config.resume, "checkpoints"), async_save=False)
    if other.latest_step() is None:
      other.close()
      raise FileNotFoundError(f"config.resume={config.resume!r}: no checkpoint found")
    source = "resume"
  else:
    source = "model_init" if model_init else "scratch"
  needed = {k: v for k, v in abstract_flat.items() if source in ("model_init", "scratch") or k not in trainable_keys}

  values: Dict[str, jax.Array] = {}
  if frozen_dir.exists():
    frozen_needed = {k: v for k, v in needed.items() if k not in trainable_keys}
    values.update(restore_subset(str(frozen_dir), frozen_needed))
    logging.info("Frozen params from %s", frozen_dir)
  if model_init:
    skip = re.compile(config.get("model_init_skip", "") or "(?!)")  # fresh even where the source has them
    values.update(load_model_init(model_init, {k: v for k, v in needed.items()
                                               if k not in values and not skip.fullmatch(k)},
                                  missing_ok=config.get("model_init_missing_ok", ""),
                                  use_ema=config.get("model_init_use_ema", True)))
  missing = sorted(k for k in needed if k not in values)
  if missing:
    fresh_shardings = {k: abstract_flat[k].sharding for k in missing}

    def init_missing_fn(r):
      flat = optim.flat_paths(nn.meta.unbox(init_fn(r)))
      return {k: flat[k] for k in missing}

    init_missing = jax.jit(init_missing_fn, out_shardings=fresh_shardings, compiler_options=compiler_options)
    values.update(init_missing(rng))
  trainable = traverse_util.unflatten_dict({k: v for k, v in values.items() if k in trainable_keys}, sep=SEP)
  frozen_flat = {k: v for k, v in values.items() if k not in trainable_keys}
  frozen = traverse_util.unflatten_dict(frozen_flat, sep=SEP) if frozen_flat else {}

  if jax.process_index() == 0:
    wd.mkdir(parents=True, exist_ok=True)
  if model_init:
    if jax.process_index() == 0:
      (wd / "model_init.json").write_text(json.dumps({"model_init": str(epath.Path(model_init).absolute())}))
  elif not frozen_dir.exists() and frozen_flat:
    save_params(str(frozen_dir), frozen)   # random-init backbone: keep it for restarts and later stages

  abstract_sharded = _with_sharding(abstract_state, st_sh)
  if source == "checkpoint":
    state, _ = ckpt.restore_intact(abstract_sharded, data_iter)
  elif source == "resume":
    state = other.restore(abstract_sharded, data_iter)
    other.close()
  else:
    state = jax.jit(lambda p: optim.init_state(p, tx, abstract_state.ema_params is not None), out_shardings=st_sh,
                    compiler_options=compiler_options)(trainable)
  logging.info("State from %s at step %d", source, int(state.step))
  # Frozen params are kept (and saved above) in float32; the step sees them in their storage dtype.
  frozen = optim.cast_frozen(frozen, config.get("frozen_dtype", "float32"))
  return Restored(state=state, frozen=frozen, state_shardings=st_sh, frozen_shardings=a.frozen_shardings,
                  source=source, initialised=tuple(missing))


# ---------------------------------------------------------------------------------------------------------------
# Preemption.
# ---------------------------------------------------------------------------------------------------------------

class PreemptionWatcher:
  """SIGTERM sets a flag; ``should_stop(step)`` is true once any process got it (multi-host: JAX's preemption
  sync point, so every process stops at the same step)."""

  def __init__(self):
    self.received = False
    self._previous = None
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not in the main thread (e.g. some test runners): rely on the multi-host sync only
      pass

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: stopping at the next step boundary (a checkpoint is saved once training "
                    "has started)")
    self.received = True

  def should_stop(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.received
    # Several processes: all must stop at the same step, so only JAX's preemption service decides (it also
    # catches SIGTERM); a flag seen by one process alone would leave the others waiting in a collective.
    try:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return bool(multihost_utils.reached_preemption_sync_point(step))
    except (RuntimeError, AttributeError):
      return False

  def restore(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
