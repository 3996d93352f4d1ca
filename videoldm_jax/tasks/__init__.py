"""Stages. A stage is one task class in one module of this package; everything about it is declared there.

The stage contract
------------------
A task module registers its class with ``@tasks.register("stage", ...)`` (no other list names it: every module of
this package is imported on the first lookup). The class (subclass of ``tasks.common.Task``) declares:

* **Its config section**: ``config_defaults(stage) -> {section: {key: default}}``, the keys this stage adds to
  the generic schema ``config_lib.base_config()`` (new sections, or new keys in an existing one such as
  ``sampling``), plus ``free_form`` (dotted sub-dicts checked by the task itself). ``default_config(stage)`` is
  that schema with its defaults; the files in ``configs/`` start from it and only choose values.
* **Its validation**: ``validate_config(config)`` (classmethod, static: no devices, no params), raising
  ``ValueError`` that names the key. ``validate(config)`` runs the key check, the generic checks and this, for a
  single stage or every stage of a chain, before anything compiles. ``needs_model_init``: a run without
  ``config.model_init`` is refused outside runlocal.
* **Its batch**: ``input_pipeline(mesh)`` (checkpointable iterator of global batches), ``fixed_batch(mesh)``
  (deterministic evaluation batch) and ``abstract_batch(batch_size, inputs)``: the batch as ``ShapeDtypeStruct``s.
  The planner compiles on the abstract batch and the loop checks its first real batch against it, so the two
  cannot drift apart.
* **Its model and step**: ``init(rng)`` (full param tree, boxed with logical axes), ``loss_fn(trainable, frozen,
  batch, rng) -> (loss, metrics)``, ``eval_loss``, ``train_step(state, frozen, batch, rng) -> (state, metrics)``
  (default: one optimizer over ``loss_fn``), ``tx`` / ``schedule``, ``sample_fn`` (uint8 preview videos).
* **Its role in the long-video pipeline** (``videoldm_jax/pipeline.py``): ``pipeline_order`` (None: not a
  pipeline stage; lower runs first) and ``pipeline_step(trainable, frozen) -> pipeline.Step``, the step the
  sampler runs: make key frames, extend them, interpolate, decode or upsample. The sampler sorts the stages it
  is given by ``pipeline_order`` and folds the stream through their steps.

Adding a stage therefore takes one task module here and a config branch in ``configs/``.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Dict

import ml_collections

from videoldm_jax import config_lib

_REGISTRY: Dict[str, Callable] = {}
_DISCOVERED = False
_NOT_TASK_MODULES = ("common",)


def register(*stages: str):
  """Class decorator: ``@register("image", "base")``."""

  def deco(cls):
    for s in stages:
      if s in _REGISTRY and _REGISTRY[s] is not cls:
        raise ValueError(f"stage {s!r} is registered twice: {_REGISTRY[s].__name__} and {cls.__name__}")
      _REGISTRY[s] = cls
    return cls

  return deco


def _discover() -> None:
  """Imports every task module of this package once (each registers its stages)."""
  global _DISCOVERED
  if _DISCOVERED:
    return
  for info in pkgutil.iter_modules(__path__):
    if info.name not in _NOT_TASK_MODULES:
      importlib.import_module(f"{__name__}.{info.name}")
  _DISCOVERED = True


def stages() -> Dict[str, Callable]:
  """``{stage: task class}`` of every registered stage."""
  _discover()
  return dict(_REGISTRY)


def get(stage: str) -> Callable:
  """The task class of ``stage``."""
  registry = stages()
  if stage not in registry:
    raise ValueError(f"config.stage={stage!r}: unknown stage; available: {sorted(registry)}")
  return registry[stage]


def default_config(stage: str) -> ml_collections.ConfigDict:
  """The schema of ``stage`` with its defaults: ``config_lib.base_config()`` plus its task's sections."""
  cls = get(stage)
  c = config_lib.base_config()
  for section, values in cls.config_defaults(stage).items():
    if section not in c:
      c[section] = ml_collections.ConfigDict()
    for k, v in values.items():
      c[section][k] = v
  c.stage = stage
  return c


def validate(config) -> None:
  """Static checks of a stage config or a chain config (``config_lib.chain_config``); ``ValueError`` names the
  key."""
  if config_lib.is_chain(config):
    _validate_chain(config)
    return
  cls = get(config.stage)
  config_lib.check_keys(config, default_config(config.stage), cls.free_form)
  config_lib.validate_generic(config)
  if int(config.evaluation.every_steps) and not cls.samples_videos(config.stage):
    raise ValueError(f"config.evaluation.every_steps={config.evaluation.every_steps}: stage {config.stage!r} does "
                     "not sample videos to evaluate")
  cls.validate_config(config)


def _validate_chain(config) -> None:
  config_lib.check_keys(config, config_lib.chain_schema(), free_form=("stages", "init_from"))
  if not config.chain:
    raise ValueError("config.chain is empty: name the stages to train in order")
  for s in config.chain:
    if s not in config.stages:
      raise ValueError(f"config.chain names stage {s!r} but config.stages has no entry for it "
                       f"(has: {sorted(config.stages)})")
    sub = config.stages[s]
    if sub.get("stage") != s:
      raise ValueError(f"config.stages.{s}.stage={sub.get('stage')!r} differs from its name in the chain")
    try:
      validate(sub)
    except ValueError as e:
      raise ValueError(f"config.stages.{s}: {e}") from None
  for i, s in enumerate(config.chain):
    config_lib.chain_init_stage(config, s, config.chain[i - 1] if i else None)
  for s in config.sample_skip:
    if s not in config.chain:
      raise ValueError(f"config.sample_skip: no stage {s!r} in config.chain {tuple(config.chain)}")
  for s in config.init_from:
    if s not in config.chain:
      raise ValueError(f"config.init_from.{s}: no stage {s!r} in config.chain {tuple(config.chain)}")
  if int(config.sample_videos) < 0:
    raise ValueError(f"config.sample_videos={config.sample_videos} must be >= 0")
  if int(config.sample_fvd_clips) and int(config.sample_fvd_clips) < 2:
    raise ValueError(f"config.sample_fvd_clips={config.sample_fvd_clips} must be 0 or >= 2")
  if float(config.sample_seconds) < 0:
    raise ValueError(f"config.sample_seconds={config.sample_seconds} must be >= 0")
