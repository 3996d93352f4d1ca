"""Freeze mask, trainable/frozen split, optimizer, LR schedule, EMA and the train state.

Frozen parameters never reach the optimizer: ``split`` cuts the full param tree into a *trainable* tree (paths
matching ``config.trainable``) and a *frozen* tree; gradients are taken w.r.t. the trainable tree only, and the
optimizer / EMA are built on it. So frozen parameters get neither gradients nor Adam moments nor EMA copies,
and no ``set_to_zero`` bookkeeping is needed.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

Params = Dict[str, Any]
SEP = "/"


def flat_paths(params: Params) -> Dict[str, Any]:
  """``{"unet/down_blocks_0/conv1/kernel": leaf, ...}``."""
  return traverse_util.flatten_dict(flax.core.unfreeze(params), sep=SEP)


def trainable_mask(params: Params, pattern: str) -> Params:
  """Tree of bools: True where the '/'-joined path fully matches the regex ``pattern``."""
  rx = re.compile(pattern)
  return traverse_util.unflatten_dict({k: bool(rx.fullmatch(k)) for k in flat_paths(params)}, sep=SEP)


def split(params: Params, pattern: str) -> Tuple[Params, Params]:
  """Full tree -> ``(trainable, frozen)`` nested dicts (regex ``pattern`` over '/'-joined paths)."""
  rx = re.compile(pattern)
  flat = flat_paths(params)
  train = {k: v for k, v in flat.items() if rx.fullmatch(k)}
  frozen = {k: v for k, v in flat.items() if not rx.fullmatch(k)}
  return (traverse_util.unflatten_dict(train, sep=SEP) if train else {},
          traverse_util.unflatten_dict(frozen, sep=SEP) if frozen else {})


def merge(trainable: Params, frozen: Params) -> Params:
  """Inverse of ``split``."""
  flat = dict(flat_paths(frozen))
  overlap = set(flat) & set(flat_paths(trainable))
  if overlap:
    raise ValueError(f"trainable and frozen trees overlap: {sorted(overlap)[:5]}")
  flat.update(flat_paths(trainable))
  return traverse_util.unflatten_dict(flat, sep=SEP) if flat else {}


FROZEN_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def cast_frozen(frozen: Params, dtype_name: str) -> Params:
  """Frozen params in their storage dtype (``config.frozen_dtype``): floating leaves cast, others untouched.

  Works on arrays and on ``jax.ShapeDtypeStruct`` trees (shardings kept). bfloat16 halves the frozen bytes; the
  trainable params, their gradients, Adam moments and EMA stay float32.
  """
  dtype = jnp.dtype(FROZEN_DTYPES[dtype_name])

  def cast(x):
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return x.astype(dtype)

  return jax.tree.map(cast, frozen)


# ---------------------------------------------------------------------------------------------------------------
# Schedule and optimizer.
# ---------------------------------------------------------------------------------------------------------------

def make_schedule(oc, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to ``oc.lr`` over ``oc.warmup_steps``, then ``constant`` or ``cosine`` decay to
  ``oc.lr * oc.end_lr_factor`` at ``total_steps``."""
  lr, warmup = float(oc.lr), int(oc.get("warmup_steps", 0))
  kind = oc.get("schedule", "cosine")
  if kind == "constant":
    after = optax.constant_schedule(lr)
  elif kind == "cosine":
    after = optax.cosine_decay_schedule(lr, max(1, total_steps - warmup), alpha=float(oc.get("end_lr_factor", 0.0)))
  else:
    raise ValueError(f"config.optimizer.schedule={kind!r}: expected 'cosine' or 'constant'")
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(config) -> Tuple[optax.GradientTransformation, optax.Schedule]:
  """``chain(clip_by_global_norm, adamw(schedule))`` from ``config.optimizer``; applied to trainable params only."""
  oc = config.optimizer
  schedule = make_schedule(oc, int(config.total_steps))
  parts = []
  if oc.get("grad_clip", 0.0):
    parts.append(optax.clip_by_global_norm(float(oc.grad_clip)))
  parts.append(optax.adamw(schedule, b1=float(oc.get("b1", 0.9)), b2=float(oc.get("b2", 0.999)),
                           eps=float(oc.get("eps", 1e-8)), weight_decay=float(oc.get("weight_decay", 0.0))))
  return optax.chain(*parts), schedule


# ---------------------------------------------------------------------------------------------------------------
# Train state and the generic step.
# ---------------------------------------------------------------------------------------------------------------

@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (frozen params live outside; they are not donated or saved)."""
  step: jax.Array
  params: Params              # trainable params only (fp32 master copy)
  opt_state: optax.OptState
  ema_params: Optional[Params]


def init_state(trainable: Params, tx: optax.GradientTransformation, ema: bool) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable),
                    ema_params=jax.tree.map(jnp.copy, trainable) if ema else None)


def ema_decay_at(decay: float, num_updates: jax.Array) -> jax.Array:
  """The EMA decay after ``num_updates`` updates: ``min(decay, (1 + n) / (10 + n))`` (LDM's warm-up), so a short
  run's EMA forgets the initial weights instead of staying mostly at them (0.9999 ** 1000 = 0.90)."""
  n = jnp.asarray(num_updates, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))


def ema_update(ema: Params, params: Params, decay: float, num_updates: Optional[jax.Array] = None) -> Params:
  """One EMA update; with ``num_updates`` (the count including this update) the decay warms up (ema_decay_at)."""
  d = ema_decay_at(decay, num_updates) if num_updates is not None else decay
  return jax.tree.map(lambda e, p: (e * d + (1.0 - d) * p.astype(e.dtype)).astype(e.dtype), ema, params)


def all_finite(*trees) -> jax.Array:
  leaves = [x for t in trees for x in jax.tree.leaves(t)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.array(True)


def apply_update(state: TrainState, grads: Params, tx: optax.GradientTransformation, ema_decay: float,
                 finite: jax.Array, hold: Optional[Callable[[Params, Params], Params]] = None) -> TrainState:
  """One optimizer update of ``state`` by ``grads``, kept only when ``finite``: otherwise params, optimizer state
  and EMA stay as they were (the step counter still advances), so the last checkpoint and the in-memory state stay
  valid and the loop can stop with a clear message. ``hold(new_params, old_params) -> params`` may hold some
  params back before the EMA sees them (e.g. a discriminator before its start step)."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if hold is not None:
    params = hold(params, state.params)
  ema = ema_update(state.ema_params, params, ema_decay, state.step + 1) if state.ema_params is not None else None
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
  return TrainState(step=state.step + 1, params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
                    ema_params=keep(ema, state.ema_params) if ema is not None else None)


def apply_gradients(state: TrainState, grads: Params, loss: jax.Array, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, ema_decay: float) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """``apply_update`` with the finiteness of ``loss`` and the gradient norm; metrics ``loss``, ``grad_norm``,
  ``lr`` and ``finite`` (0 when the update was skipped)."""
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = apply_update(state, grads, tx, ema_decay, finite)
  metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step), "finite": finite.astype(jnp.int32)}
  return new_state, metrics


def default_train_step(loss_fn: Callable, tx: optax.GradientTransformation, schedule: optax.Schedule,
                       ema_decay: float) -> Callable:
  """``train_step(state, frozen, batch, rng) -> (state, metrics)`` for ``loss_fn(trainable, frozen, batch, rng)
  -> (loss, aux_metrics)``. The rng is folded with the step so every step (and a resumed run) draws fresh,
  reproducible noise."""

  def train_step(state: TrainState, frozen: Params, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, frozen, batch, rng)
    state, metrics = apply_gradients(state, grads, loss, tx, schedule, ema_decay)
    metrics.update(aux)
    return state, metrics

  return train_step
