"""Stage registry: ``tasks.get(config.stage)(config) -> task``.

A task owns everything stage-specific; ``train.py`` is one generic loop over it. Interface:

* ``init(rng) -> params``: the full param tree (frozen + trainable), boxed with logical axes
  (``nn.Partitioned`` leaves) so ``jax.eval_shape(task.init, rng)`` gives shapes *and* shardings.
* ``input_pipeline(mesh) -> iterator`` of global batches with ``get_state`` / ``set_state`` (checkpointed).
* ``fixed_batch(mesh) -> batch``: deterministic batch for the evaluation loss and the sample conditioning.
* ``loss_fn(trainable, frozen, batch, rng) -> (loss, aux_metrics)``; ``eval_loss(trainable, frozen, batch, rng)``.
* ``train_step(state, frozen, batch, rng) -> (state, metrics)`` (default: ``optim.default_train_step``).
* ``sample_fn(trainable, frozen, batch, rng) -> uint8 videos [b, t, h, w, 3]`` for previews.
* ``validate(config)`` (checks that need the stage; raise ``ValueError`` naming the config key) and
  ``needs_model_init`` (the run is refused without ``config.model_init`` outside runlocal).
* ``tx``, ``schedule``: the optimizer over trainable params and its learning-rate schedule.

``tasks.common.TaskDefaults`` provides ``tx``, ``train_step`` and ``eval_loss`` from ``loss_fn``.
Stages are registered by module on first ``get`` so importing the package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Callable, Dict

_REGISTRY: Dict[str, Callable] = {}

# stage -> module (relative to this package) that registers it.
_MODULES: Dict[str, str] = {
    "image": "latent_diffusion",
    "base": "latent_diffusion",
    "autoencoder": "autoencoder",
    "predictor": "masked",
    "interpolator": "masked",
}


def register(*stages: str):
  """Class decorator: ``@register("image", "base")``."""

  def deco(cls):
    for s in stages:
      _REGISTRY[s] = cls
    return cls

  return deco


def get(stage: str) -> Callable:
  if stage not in _REGISTRY and stage in _MODULES:
    importlib.import_module(f"{__name__}.{_MODULES[stage]}")
  if stage not in _REGISTRY:
    raise ValueError(f"config.stage={stage!r}: unknown stage; available: {sorted(set(_MODULES) | set(_REGISTRY))}")
  return _REGISTRY[stage]
