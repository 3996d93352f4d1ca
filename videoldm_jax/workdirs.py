"""Reading training workdirs: their config, their stages, and a trained stage's params."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import ml_collections
from etils import epath
from flax import traverse_util

from videoldm_jax import checkpoint, config_lib, optim, parallel, tasks


def _tuples(value):
  """JSON lists back to the tuples the configs hold (dicts become ConfigDicts in the caller)."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The ``config.json`` a training run wrote into ``workdir``, as a ConfigDict."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir!r} has no config.json: not a training workdir")
  with open(path) as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))


def resolve_stage(workdir: str, stage: Optional[str] = None) -> str:
  """The workdir of ``stage`` (default: the last stage) inside a chain's workdir, or ``workdir`` itself when it
  is one stage's workdir."""
  config = load_run_config(workdir)
  if config_lib.is_chain(config):
    chain = tuple(config.chain)
    stage = stage or chain[-1]
    if stage not in chain:
      raise ValueError(f"--stage={stage!r}: the chain in {workdir} has stages {chain}")
    if not os.path.exists(os.path.join(workdir, stage, "config.json")):
      raise FileNotFoundError(f"{workdir}: a chain workdir whose stage {stage!r} has not started training yet "
                              f"(no {stage}/config.json)")
    return os.path.join(workdir, stage)
  if stage and stage != config.stage:
    raise ValueError(f"--stage={stage!r}: {workdir} is the workdir of stage {config.stage!r}")
  return workdir


def pipeline_stage_dirs(spec: str) -> Dict[str, str]:
  """``{stage: workdir}`` of the long-video pipeline stages (those whose task has a ``pipeline_order``) named by
  ``spec``: a chain's workdir, or a comma list of stage workdirs (the stage read from each config.json)."""
  out: Dict[str, str] = {}
  for d in filter(None, (s.strip() for s in spec.split(","))):
    config = load_run_config(d)
    if config_lib.is_chain(config):
      out.update({s: os.path.join(d, s) for s in config.chain if tasks.get(s).pipeline_order(s) is not None})
    elif tasks.get(config.stage).pipeline_order(config.stage) is not None:
      if config.stage in out:
        raise ValueError(f"--pipeline names two {config.stage!r} workdirs: {out[config.stage]} and {d}")
      out[config.stage] = d
    else:
      raise ValueError(f"--pipeline: {d} is a {config.stage!r} workdir, which is not a pipeline stage")
  if not out:
    raise ValueError(f"--pipeline={spec!r}: no pipeline stage found")
  return out


def check_trained(stage_dir: str) -> None:
  """Raises ``FileNotFoundError`` naming what a training workdir lacks to be loaded: ``checkpoints/``, or a
  finished step in it."""
  ckdir = epath.Path(stage_dir) / "checkpoints"
  if not ckdir.exists():
    raise FileNotFoundError(f"{stage_dir}: a training workdir (config.json) with no checkpoints/ yet")
  if not any(p.name.isdigit() and (p / "state").exists() for p in ckdir.iterdir()):
    raise FileNotFoundError(f"{stage_dir}: a training workdir whose checkpoints/ holds no finished step yet")


def load_trained(stage_dir: str, config, mesh) -> Tuple[Any, Any, Any]:
  """``(task, trainable, frozen)`` of a trained stage: trainable params from its latest checkpoint (EMA when
  saved), frozen params from its ``frozen/`` or the ``model_init`` it was started from, sharded over ``mesh``."""
  check_trained(stage_dir)
  return load_params(stage_dir, config, mesh)


def abstract_params(config, mesh) -> Tuple[Any, Dict[str, jax.ShapeDtypeStruct]]:
  """``(task, {flat path: ShapeDtypeStruct})`` of ``config``'s stage, each param sharded over ``mesh`` by the
  config's logical rules (nothing allocated)."""
  task = tasks.get(config.stage)(config)
  boxed = jax.eval_shape(task.init, jax.random.key(0, impl="rbg"))
  shardings = parallel.param_shardings(boxed, mesh, parallel.logical_rules(config))
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed),
                          shardings)
  return task, optim.flat_paths(abstract)


def load_params(source: str, config, mesh) -> Tuple[Any, Any, Any]:
  """``(task, trainable, frozen)`` of ``config``'s stage with every param from ``source`` (a training workdir or a
  converted checkpoint; nothing is initialised at random), split by ``config.trainable``, sharded over ``mesh``."""
  task, abstract = abstract_params(config, mesh)
  loaded = checkpoint.load_model_init(source, abstract, missing_ok="", use_ema=True)
  trainable, frozen = optim.split(traverse_util.unflatten_dict(loaded, sep=optim.SEP), config.trainable)
  return task, trainable, frozen
