"""Defaults shared by tasks: optimizer over the trainable tree, the one-optimizer train step, fixed-batch eval.

A task sets ``self.config`` and implements ``init``, ``loss_fn``, ``input_pipeline``, ``fixed_batch`` and
``sample_fn``; ``TaskDefaults.__init__`` builds ``tx`` / ``schedule`` and ``train_step`` from ``loss_fn``.
Stages with other step structures (two optimizers for the decoder) override ``train_step``.
"""

from __future__ import annotations

from typing import Dict, Tuple

import jax
import jax.numpy as jnp

from videoldm_jax import optim


class TaskDefaults:
  """Mixin with the default optimizer, train step and evaluation loss (no model logic)."""

  def __init__(self, config):
    self.config = config
    self.validate(config)
    self.tx, self.schedule = optim.make_optimizer(config)
    self.train_step = optim.default_train_step(self.loss_fn, self.tx, self.schedule, float(config.ema_decay))

  needs_model_init = False  # True: training without config.model_init is refused (outside runlocal)

  def validate(self, config) -> None:
    del config

  def loss_fn(self, trainable, frozen, batch, rng) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    raise NotImplementedError

  def eval_loss(self, trainable, frozen, batch, rng) -> jax.Array:
    """Mean loss over ``config.eval_noise_draws`` fixed noise draws (comparable across steps and runs)."""
    draws = max(1, int(self.config.get("eval_noise_draws", 1)))
    losses = [self.loss_fn(trainable, frozen, batch, jax.random.fold_in(rng, i))[0] for i in range(draws)]
    return jnp.mean(jnp.stack(losses))
