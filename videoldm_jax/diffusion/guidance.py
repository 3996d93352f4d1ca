"""Classifier-free guidance (Ho & Salimans 2022) over any set of conditions, in one batched model call.

The generic form (`composed_guided_prediction`) evaluates the model under conditions c_0, ..., c_{k-1} and returns

    f(c_0) + Σ_(s, i, j) in terms  s · (f(c_i) − f(c_j))

Special cases:
  * CFG:                      conditions [∅, c],          terms [(s, 1, 0)]          -> f(∅) + s (f(c) − f(∅))
  * multi-condition:          conditions [∅, c_1..c_n],   terms [(s_i, i, 0)]        -> f(∅) + Σ s_i (f(c_i) − f(∅))
  * context guidance (Video LDM predictor, f + s (f(c) − f(∅)) with f the unconditional model) is CFG on the
    context frames: conditions [no context, context], terms [(s, 1, 0)].
  * nested, e.g. text CFG and context guidance together (each guidance acting on top of the previous one):
    conditions [(∅, ∅), (text, ∅), (text, ctx)], terms [(s_text, 1, 0), (s_ctx, 2, 1)].
Scale 1 on a single term returns the conditional prediction, scale 0 the base one.

A condition is any pytree whose leaves have the batch axis first (e.g. a dict of text embeddings and masks); all
conditions must share one tree structure (use zeros / null embeddings for "dropped", as in training).
`model_fn(x, t, cond)` is called once on the conditions concatenated along the batch axis (`batched=False`: once
per condition, for memory).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

GuidanceTerm = tuple[Any, int, int]  # (scale, index of the positive condition, index of the negative one)
CondModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def combine_guidance(outputs: Sequence[jax.Array], terms: Sequence[GuidanceTerm]) -> jax.Array:
  """outputs[0] + Σ s · (outputs[i] − outputs[j]). Scales are scalars or arrays broadcastable to the outputs."""
  result = outputs[0]
  for scale, i, j in terms:
    result = result + scale * (outputs[i] - outputs[j])
  return result


def _tile_batch(tree: Any, k: int) -> Any:
  """Repeats every leaf with a batch axis k times along axis 0; scalars (e.g. a shared timestep) stay."""
  return jax.tree.map(lambda a: a if jnp.ndim(a) == 0 else jnp.concatenate([a] * k, axis=0), tree)


def evaluate_conditions(model_fn: CondModelFn, x: jax.Array, t: Any, conditions: Sequence[Any],
                        batched: bool = True) -> list[jax.Array]:
  """[model_fn(x, t, c) for c in conditions], as one call on the batch-concatenated conditions when `batched`."""
  if not conditions:
    raise ValueError("need at least one condition")
  if not batched:
    return [model_fn(x, t, cond) for cond in conditions]
  structures = [jax.tree.structure(c) for c in conditions]
  if any(s != structures[0] for s in structures[1:]):
    raise ValueError(f"all conditions must share one pytree structure, got {structures}")
  k, b = len(conditions), x.shape[0]
  cond = jax.tree.map(lambda *leaves: jnp.concatenate(leaves, axis=0), *conditions)
  out = model_fn(_tile_batch(x, k), _tile_batch(t, k), cond)
  return [out[i * b:(i + 1) * b] for i in range(k)]


def composed_guided_prediction(model_fn: CondModelFn, x: jax.Array, t: Any, conditions: Sequence[Any],
                               terms: Sequence[GuidanceTerm], batched: bool = True) -> jax.Array:
  """f(c_0) + Σ_(s, i, j) s · (f(c_i) − f(c_j)); see the module docstring for the common cases.

  Args:
    model_fn: `(x [k*b, ...], t, cond) -> prediction [k*b, ...]`.
    x: `[b, ...]` noisy input.
    t: timesteps, a scalar or `[b]` / `[b, t]` (tiled with x).
    conditions: k condition pytrees, batch axis first; conditions[0] is the base of the combination.
    terms: (scale, i, j) triples indexing `conditions`.
    batched: one model call on the concatenated batch (True) or one per condition.
  """
  for _, i, j in terms:
    if not (0 <= i < len(conditions) and 0 <= j < len(conditions)):
      raise ValueError(f"guidance term indices ({i}, {j}) out of range for {len(conditions)} conditions")
  return combine_guidance(evaluate_conditions(model_fn, x, t, conditions, batched), terms)


def guided_prediction(model_fn: CondModelFn, x: jax.Array, t: Any, cond: Any, uncond: Any, scale: Any,
                      batched: bool = True) -> jax.Array:
  """Classifier-free guidance f(∅) + s · (f(c) − f(∅)), cond and uncond evaluated in one batched call."""
  return composed_guided_prediction(model_fn, x, t, [uncond, cond], [(scale, 1, 0)], batched)


def multi_guided_prediction(model_fn: CondModelFn, x: jax.Array, t: Any, conds: Sequence[Any], uncond: Any,
                            scales: Sequence[Any], batched: bool = True) -> jax.Array:
  """f(∅) + Σ_i s_i · (f(c_i) − f(∅)) (compositional guidance over independent conditions)."""
  if len(conds) != len(scales):
    raise ValueError(f"got {len(conds)} conditions but {len(scales)} scales")
  terms = [(s, i + 1, 0) for i, s in enumerate(scales)]
  return composed_guided_prediction(model_fn, x, t, [uncond, *conds], terms, batched)
