"""Long videos from the stage models (paper Sec. 3.2-3.3): key frames -> rollout -> interpolation -> decoding.

Sampling logic only (the command line is ``videoldm_jax.sample --pipeline``). Every step is a generator of latent
chunks ``[b, k, h, w, c]`` (host numpy), so a video of any length goes through fixed-shape jitted window steps
that compile once each, and device memory does not grow with the length:

* :func:`rollout`: the first window (the ``base`` key-frame model, or the predictor with no context), then
  windows of the ``predictor`` conditioned on the last ``num_context`` (2) generated frames; each window adds
  ``T - 2`` frames. The context frames are re-imposed bit for bit, never regenerated.
* :func:`interpolate`: windows of ``K`` key frames -> ``stride (K - 1) + 1`` frames with the key frames at
  positions ``0, stride, ...`` unchanged; consecutive windows share their boundary key frame. A sequence of
  ``n`` key frames becomes ``stride (n - 1) + 1`` frames (``4n - 3`` for stride 4); the last window is moved back
  to end on the last key frame when ``n - 1`` is not a multiple of ``K - 1``.
  Windows are batched ``group`` at a time (one call, one compile).
* :func:`decode`: fixed-size chunks of latents -> uint8 frames.

:func:`long_video` chains them: key frames at the base fps (1.875), x4 (regime 0) -> 7.5 fps, x4 (regime 1)
-> 30 fps.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from videoldm_jax import optim


class Step:
  """A jitted window sampler that counts its traces (one per distinct input shape: it must stay at one)."""

  def __init__(self, fn: Callable, compiler_options: Optional[Dict[str, Any]] = None):
    self.traces = 0

    def traced(*args):
      self.traces += 1
      return fn(*args)

    self._jit = jax.jit(traced, compiler_options=compiler_options)

  def __call__(self, *args):
    return self._jit(*args)


def predictor_step(task, num_context: Optional[int] = None, compiler_options=None) -> Step:
  """``(trainable, frozen, batch, z_ctx [b, S, h, w, c], rng) -> window [b, T, h, w, c]`` whose first S frames
  are ``z_ctx`` exactly (S = 0: an unconditional window)."""
  del num_context

  def step(trainable, frozen, batch, z_ctx, rng):
    params = optim.merge(trainable, frozen)
    b, s = z_ctx.shape[:2]
    t = task.num_frames
    z_known = jnp.zeros((b, t) + z_ctx.shape[2:], jnp.float32).at[:, :s].set(z_ctx.astype(jnp.float32))
    mask = task.context_mask(jnp.full((b,), s), t)
    return task.sample_window(params, batch, z_known, mask, rng)

  return Step(step, compiler_options)


def interpolator_step(task, compiler_options=None) -> Step:
  """``(trainable, frozen, batch, keys [b, K, h, w, c], regime [b] int, rng) -> [b, stride (K - 1) + 1, h, w, c]``
  with ``out[:, stride * i] == keys[:, i]`` exactly; ``regime`` selects T->4T (0) or 4T->16T (1) (an argument,
  so both passes share one compile)."""
  stride = int(task.config.masked.stride)

  def step(trainable, frozen, batch, keys, regime, rng):
    params = optim.merge(trainable, frozen)
    b = keys.shape[0]
    z_known = jnp.zeros((b, task.num_frames) + keys.shape[2:], jnp.float32).at[:, ::stride].set(
        keys.astype(jnp.float32))
    regime_ids = jnp.asarray(regime, jnp.int32) if task.unet_config.temporal.num_regimes else None
    return task.sample_window(params, batch, z_known, task.interpolation_mask(b), rng, regime=regime_ids)

  return Step(step, compiler_options)


def num_windows(num_frames: int, window: int, num_context: int) -> int:
  """Windows (the first included) a rollout needs for ``num_frames`` frames."""
  return 1 + max(0, math.ceil((num_frames - window) / (window - num_context)))


def frames_of_windows(windows: int, window: int, num_context: int) -> int:
  return window + (windows - 1) * (window - num_context)


def rollout(step: Step, trainable, frozen, batch, first: np.ndarray, num_frames: int, rng: jax.Array,
            num_context: int = 2) -> Iterator[np.ndarray]:
  """Yields latent chunks ``[b, k, h, w, c]`` that add up to exactly ``num_frames`` frames: ``first`` (the first
  window, trimmed), then the new frames of each predictor window conditioned on the previous window's last
  ``num_context`` frames (window i uses ``fold_in(rng, i)``)."""
  first = np.asarray(first)[:, :num_frames]
  yield first
  total = first.shape[1]
  ctx = jnp.asarray(first[:, -num_context:])
  i = 0
  while total < num_frames:
    window = step(trainable, frozen, batch, ctx, jax.random.fold_in(rng, i))
    new = np.asarray(window[:, num_context:num_context + num_frames - total])
    yield new
    ctx = window[:, -num_context:]
    total += new.shape[1]
    i += 1


def _interpolation_jobs(keys: Iterable[np.ndarray], k: int, stride: int):
  """Windows of ``k`` key frames ``[b, h, w, c]`` and the slice of each window's output to emit; a lone final
  key frame comes as ``(None, frame)``."""
  buf: List[np.ndarray] = []  # the last k key frames
  seen = start = 0  # keys seen; first key of the next window
  for chunk in keys:
    for j in range(chunk.shape[1]):
      buf = (buf + [np.asarray(chunk[:, j])])[-k:]
      seen += 1
      if seen - start == k:  # keys start .. start + k - 1 are in buf
        yield list(buf), slice(0, stride * (k - 1))  # the last key opens the next window
        start += k - 1
  left = seen - start  # keys start .. seen - 1, key `start` not yet written
  if seen == 0:
    return
  if left == 1:
    yield None, buf[-1][:, None]
    return
  frames = buf + [buf[-1]] * (k - len(buf))  # fewer than k keys in all: pad, then trim
  offset = stride * (start - (seen - len(buf)))
  yield frames, slice(offset, offset + stride * (left - 1) + 1)


def interpolate(step: Step, trainable, frozen, batch, keys: Iterable[np.ndarray], rng: jax.Array, *,
                window_keys: int, stride: int, regime: int = 0, group: int = 1) -> Iterator[np.ndarray]:
  """Key-frame chunks ``[b, k, h, w, c]`` (any chunking) -> interpolated chunks; ``n`` keys in total give
  ``stride (n - 1) + 1`` frames, key ``i`` at position ``stride i`` unchanged (see the module docstring).
  ``group`` windows go through one ``step`` call (stacked along the batch; the last group padded)."""
  pending: List[tuple] = []
  calls = 0
  tiled = jax.tree.map(lambda x: np.concatenate([np.asarray(x)] * group, axis=0), batch)

  def flush():
    nonlocal calls
    jobs = pending + [pending[-1]] * (group - len(pending))
    stacked = np.concatenate([np.stack(frames, axis=1) for frames, _ in jobs], axis=0)  # [(g b), k, ...]
    regimes = jnp.full((stacked.shape[0],), regime, jnp.int32)
    out = np.asarray(step(trainable, frozen, tiled, jnp.asarray(stacked), regimes, jax.random.fold_in(rng, calls)))
    calls += 1
    b = out.shape[0] // group
    results = [out[i * b:(i + 1) * b][:, sl] for i, (_, sl) in enumerate(pending)]
    pending.clear()
    return results

  for frames, sl in _interpolation_jobs(keys, window_keys, stride):
    if frames is None:
      if pending:
        yield from flush()
      yield sl
      continue
    pending.append((frames, sl))
    if len(pending) == group:
      yield from flush()
  if pending:
    yield from flush()


def decode(decode_fn: Callable, chunks: Iterable[np.ndarray], chunk_frames: int) -> Iterator[np.ndarray]:
  """Latent chunks -> uint8 frame chunks ``[b, k, H, W, 3]`` via ``decode_fn([b, chunk_frames, h, w, c])``
  (fixed shape: the last chunk is padded and trimmed)."""
  pending: List[np.ndarray] = []
  count = 0
  for chunk in chunks:
    pending.append(np.asarray(chunk))
    count += chunk.shape[1]
    while count >= chunk_frames:
      z = np.concatenate(pending, axis=1)
      yield np.asarray(decode_fn(z[:, :chunk_frames]))
      pending, count = [z[:, chunk_frames:]], count - chunk_frames
  if count:
    z = np.concatenate(pending, axis=1)
    pad = np.repeat(z[:, -1:], chunk_frames - count, axis=1)
    yield np.asarray(decode_fn(np.concatenate([z, pad], axis=1)))[:, :count]


def _counted(chunks: Iterable[np.ndarray], bar) -> Iterator[np.ndarray]:
  for c in chunks:
    if bar is not None:
      bar.update(c.shape[1])
    yield c


def long_video(*, batch, rng: jax.Array, num_key_frames: int, base=None, predictor=None, interpolator=None,
               interpolations: int = 2, decode_chunk: int = 16, interpolation_group: int = 8,
               progress: bool = True, compiler_options=None) -> Iterator[np.ndarray]:
  """Yields uint8 frame chunks ``[b, k, H, W, 3]`` of ``stride**interpolations (num_key_frames - 1) + 1`` frames.

  ``base`` / ``predictor`` / ``interpolator``: ``(task, trainable, frozen)`` of trained stages (any may be None:
  without ``predictor`` the key frames are one base window; without ``base`` the predictor makes the first window
  with no context; without ``interpolator`` nothing is interpolated). ``batch``: the conditioning of the ``b``
  videos (labels / caption ids, and ``video`` for the base sampler's shape).
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  if base is None and predictor is None:
    raise ValueError("the pipeline needs a base or a predictor stage for the key frames")
  bars = []

  def bar(total, desc):
    b = tqdm(total=total, desc=desc, unit="frame", position=len(bars), leave=True,
             disable=not progress or jax.process_index() != 0)
    bars.append(b)
    return b

  cond = {k: v for k, v in batch.items() if k in ("labels", "caption_ids")}
  r_base, r_roll, r_interp = jax.random.split(rng, 3)
  # Key frames: the first window, then the rollout.
  if base is not None:
    task, trainable, frozen = base
    task.config.sampling.num_samples = jax.tree.leaves(batch)[0].shape[0]
    first = jax.jit(lambda p, f, b, r: task.sample_latents(optim.merge(p, f), b, r),
                    compiler_options=compiler_options)(trainable, frozen, batch, r_base)
  else:
    task, trainable, frozen = predictor
    video = batch.get("video")
    b = jax.tree.leaves(cond)[0].shape[0]
    h, w = (video.shape[2] // task.vae_config.downsample_factor, video.shape[3] // task.vae_config.downsample_factor)
    z_ctx = jnp.zeros((b, 0, h, w, task.vae_config.latent_channels), jnp.float32)
    first = predictor_step(task, compiler_options=compiler_options)(trainable, frozen, cond, z_ctx, r_base)
  decoder_task, decoder_params = task, optim.merge(trainable, frozen)
  first = np.asarray(first)
  if predictor is None:
    num_key_frames = min(num_key_frames, first.shape[1])
    keys: Iterable[np.ndarray] = [first[:, :num_key_frames]]
  else:
    ptask, ptrain, pfrozen = predictor
    nc = int(ptask.config.masked.num_context)
    keys = rollout(predictor_step(ptask, compiler_options=compiler_options), ptrain, pfrozen, cond, first,
                   num_key_frames, r_roll, nc)
  chunks = _counted(keys, bar(num_key_frames, "key frames"))
  total = num_key_frames
  if interpolator is not None:
    itask, itrain, ifrozen = interpolator
    stride = int(itask.config.masked.stride)
    step = interpolator_step(itask, compiler_options)
    for i in range(interpolations):
      total = stride * (total - 1) + 1
      chunks = _counted(interpolate(step, itrain, ifrozen, cond, chunks, jax.random.fold_in(r_interp, i),
                                    window_keys=len(itask.key_positions), stride=stride, regime=i,
                                    group=interpolation_group),
                        bar(total, f"interpolate x{stride} (regime {i})"))
  decode_fn = jax.jit(lambda p, z: decoder_task.decode_latents(p, z), compiler_options=compiler_options)
  yield from _counted(decode(lambda z: decode_fn(decoder_params, z), chunks, decode_chunk), bar(total, "decode"))
  for b in bars:
    b.close()
