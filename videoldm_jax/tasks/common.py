"""The task base class: what every stage declares (see ``videoldm_jax/tasks/__init__.py``) and its defaults.

A subclass sets ``self.config`` and implements ``init``, ``loss_fn``, ``input_pipeline``, ``fixed_batch``,
``abstract_batch`` and ``sample_fn``; ``Task.__init__`` validates the config and builds ``tx`` / ``schedule`` and
``train_step`` from ``loss_fn``. Stages with other step structures (the GAN autoencoder's two players) override
``train_step``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from videoldm_jax import optim


class Task:
  """Stage declaration (class level) and the default optimizer, train step and evaluation loss."""

  # ----- declaration --------------------------------------------------------------------------------------------
  free_form: ClassVar[Tuple[str, ...]] = ()  # dotted sub-dicts of the config whose keys the task checks itself
  needs_model_init = False  # True: training without config.model_init is refused (outside runlocal)

  @classmethod
  def config_defaults(cls, stage: str) -> Dict[str, Dict[str, Any]]:
    """``{section: {key: default}}`` this stage adds to ``config_lib.base_config()``."""
    del stage
    return {}

  @classmethod
  def pipeline_order(cls, stage: str) -> Optional[int]:
    """Position of ``stage`` in the long-video pipeline (lower runs first; None: not a pipeline stage)."""
    del stage
    return None

  @classmethod
  def samples_videos(cls, stage: str) -> bool:
    """True when ``sample_fn`` makes videos (clips of any length from ``fixed_batch(mesh, min_frames)``), so the
    loop can evaluate them with video metrics (``config.evaluation``)."""
    del stage
    return False

  @classmethod
  def validate_config(cls, config) -> None:
    """Static checks of the stage's settings; raises ``ValueError`` naming the key."""
    del config

  @classmethod
  def resolve_config(cls, config):
    """The config with the settings its ``model_init`` source dictates filled in (called by the loop before the
    task is built; the result is what the workdir's ``config.json`` records)."""
    return config

  # ----- instance -----------------------------------------------------------------------------------------------
  def __init__(self, config):
    self.config = config
    type(self).validate_config(config)
    self.tx, self.schedule = optim.make_optimizer(config)
    self.train_step = optim.default_train_step(self.loss_fn, self.tx, self.schedule, float(config.ema_decay))

  def loss_fn(self, trainable, frozen, batch, rng) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    raise NotImplementedError

  def abstract_batch(self, batch_size: int, inputs: Optional[str] = None) -> Dict[str, Any]:
    """The global batch ``input_pipeline`` yields, as unsharded ``jax.ShapeDtypeStruct``s."""
    raise NotImplementedError

  def eval_loss(self, trainable, frozen, batch, rng) -> jax.Array:
    """Mean loss over ``config.eval_noise_draws`` fixed noise draws (comparable across steps and runs)."""
    draws = max(1, int(self.config.get("eval_noise_draws", 1)))
    losses = [self.loss_fn(trainable, frozen, batch, jax.random.fold_in(rng, i))[0] for i in range(draws)]
    return jnp.mean(jnp.stack(losses))

  def eval_metrics(self, trainable, frozen, batch, rng) -> Dict[str, jax.Array]:
    """Scalars logged with ``eval_loss`` on the fixed evaluation batch (default: none)."""
    del trainable, frozen, batch, rng
    return {}

  def workdir_info(self, trainable, frozen, batch, rng) -> Dict[str, jax.Array]:
    """Scalars the finished stage records in ``WORKDIR/info.json`` for the stages built on it (default: none)."""
    del trainable, frozen, batch, rng
    return {}

  def pipeline_step(self, trainable, frozen):
    """The ``pipeline.Step`` this stage runs in the long-video pipeline (``pipeline_order`` is not None)."""
    raise NotImplementedError(f"{type(self).__name__} is not a pipeline stage")


def sds(shape, dtype) -> jax.ShapeDtypeStruct:
  """A ``ShapeDtypeStruct`` with int dims (for ``abstract_batch``)."""
  return jax.ShapeDtypeStruct(tuple(int(d) for d in shape), jnp.dtype(dtype))
