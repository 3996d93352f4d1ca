"""Long videos from the stage models (paper Sec. 3.2-3.3): a list of steps, one per stage, that a video flows
through as a stream of chunks.

The sampler (``videoldm_jax/sampling.py``) loads the stages it is given, sorts them by their task's
``pipeline_order`` and asks each task for its :class:`Step` (``task.pipeline_step(trainable, frozen)``); nothing
here names a stage. Between steps the video is a :class:`Stream` of chunks ``[b, k, h, w, c]`` (host numpy,
latents or uint8 frames), so a video of any length goes through fixed-shape jitted window steps that compile
once each, and device memory does not grow with the length. The step kinds:

* :class:`FirstWindow`: key frames from one window of a key-frame model (``base``).
* :class:`Rollout`: extends the key frames window by window, each conditioned on the last ``num_context``
  generated frames (``predictor``); without an earlier step it makes the first window itself, unconditioned.
  The context frames are re-imposed bit for bit, never regenerated.
* :class:`Interpolation`: ``K`` key frames per window -> ``stride (K - 1) + 1`` frames with the key frames at
  positions ``0, stride, ...`` unchanged; consecutive windows share their boundary key frame, so ``n`` key frames
  become ``stride (n - 1) + 1`` frames (``4n - 3`` for stride 4), once per regime (``interpolator``: T -> 4T,
  then 4T -> 16T). Windows are batched ``group`` at a time (one call, one compile).
* A stream still in latents after the last step is decoded by the VAE of the step that made them
  (:func:`decode`, fixed-size chunks); a decoder or upsampler stage adds its own step to change that.

:func:`run` folds the steps; given a length in seconds it works back from the final frame rate through each
step's ``frames_in`` to the number of key frames to make.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import queue
import threading
import zlib
from typing import Any, Callable, ContextManager, Dict, Iterable, Iterator, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from videoldm_jax import optim


class CountingJit:
  """A jitted window sampler that counts its traces (one per distinct input shape: it must stay at one)."""

  def __init__(self, fn: Callable, compiler_options: Optional[Dict[str, Any]] = None):
    self.traces = 0

    def traced(*args):
      self.traces += 1
      return fn(*args)

    self._jit = jax.jit(traced, compiler_options=compiler_options)

  def __call__(self, *args):
    return self._jit(*args)


def predictor_step(task, num_context: Optional[int] = None, compiler_options=None) -> CountingJit:
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

  return CountingJit(step, compiler_options)


def interpolator_step(task, compiler_options=None) -> CountingJit:
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

  return CountingJit(step, compiler_options)


def num_windows(num_frames: int, window: int, num_context: int) -> int:
  """Windows (the first included) a rollout needs for ``num_frames`` frames."""
  return 1 + max(0, math.ceil((num_frames - window) / (window - num_context)))


def frames_of_windows(windows: int, window: int, num_context: int) -> int:
  return window + (windows - 1) * (window - num_context)


def rollout(window_fn: Callable, batch, first: np.ndarray, num_frames: int, rng: jax.Array,
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
    window = window_fn(batch, ctx, jax.random.fold_in(rng, i))
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


def interpolate(window_fn: Callable, batch, keys: Iterable[np.ndarray], rng: jax.Array, *,
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
    out = np.asarray(window_fn(tiled, jnp.asarray(stacked), regimes, jax.random.fold_in(rng, calls)))
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


_DONE = object()


def prefetched(chunks: Iterable[Any], depth: int = 1,
               context: Optional[Callable[[], ContextManager]] = None) -> Iterator[Any]:
  """``chunks`` pulled by a worker thread up to ``depth`` items ahead of the consumer, so one step computes while
  the next consumes (XLA:CPU keeps ~1.6 of 2 cores busy on the small window programs; jax's dispatch and waits,
  PyAV and PIL release the GIL). Host memory stays bounded: at most ``depth`` finished items wait. ``context`` is
  entered in the worker (jax's mesh and flax's axis rules are per thread). The worker's exceptions are raised here;
  closing this generator stops the worker."""
  items: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        items.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def work():
    try:
      with context() if context is not None else contextlib.nullcontext():
        for chunk in chunks:
          if not put((chunk, None)):
            return
      put((_DONE, None))
    except BaseException as e:  # pylint: disable=broad-except  # re-raised in the consumer
      put((_DONE, e))
    finally:  # a stopped consumer: close the upstream steps (and their threads) too
      getattr(chunks, "close", lambda: None)()

  worker = threading.Thread(target=work, daemon=True, name="pipeline-step")
  worker.start()
  try:
    while True:
      item, error = items.get()
      if item is _DONE:
        if error is not None:
          raise error
        return
      yield item
  finally:
    stop.set()


def _counted(chunks: Iterable[np.ndarray], bar) -> Iterator[np.ndarray]:
  for c in chunks:
    if bar is not None:
      bar.update(c.shape[1])
    yield c


# ---------------------------------------------------------------------------------------------------------------
# Steps.
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Stream:
  """The video between steps: ``chunks`` ``[b, k, h, w, c]`` in order, ``num_frames`` in all at ``fps``;
  ``decode`` (latents ``[b, n, h, w, c]`` -> uint8 ``[b, n, H, W, 3]``) while they are latents, None for pixels."""
  chunks: Iterable[np.ndarray]
  num_frames: int
  fps: float
  decode: Optional[Callable] = None


@dataclasses.dataclass
class Context:
  """What every step may read: ``batch`` (host numpy, ``b`` videos: their conditioning, and the ``video`` /
  ``latents`` fields that give the key-frame shape), ``rng``, ``num_key_frames`` (None: each key-frame step's
  default), ``options`` (sampler settings a step understands, e.g. ``num_windows``, ``interpolations``)."""
  batch: Dict[str, Any]
  rng: jax.Array
  num_key_frames: Optional[int] = None
  key_frames_made: int = 0  # set by the key-frame steps
  options: Dict[str, Any] = dataclasses.field(default_factory=dict)
  progress: bool = True
  bars: List[Any] = dataclasses.field(default_factory=list)
  overlap: bool = True
  thread_context: Optional[Callable[[], ContextManager]] = None

  def overlapped(self, chunks: Iterable[np.ndarray]) -> Iterable[np.ndarray]:
    """``chunks`` made in a thread of their own when ``overlap`` (see the class docstring)."""
    if not self.overlap or jax.process_count() > 1:
      return chunks
    return prefetched(chunks, context=self.thread_context)

  @property
  def cond(self) -> Dict[str, Any]:
    """The conditioning fields of ``batch`` (labels / caption ids)."""
    return {k: v for k, v in self.batch.items() if k in ("labels", "caption_ids")}

  def rng_for(self, name: str) -> jax.Array:
    return jax.random.fold_in(self.rng, zlib.crc32(name.encode()))

  def bar(self, total: int, desc: str):
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    b = tqdm(total=total, desc=desc, unit="frame", position=len(self.bars), leave=True,
             disable=not self.progress or jax.process_index() != 0)
    self.bars.append(b)
    return b


class Step:
  """One stage's part of the pipeline. Key-frame steps (the first) set ``key_fps``."""
  name: str = "step"
  key_fps: Optional[float] = None

  def fps_factor(self, options: Dict[str, Any]) -> float:
    del options
    return 1.0

  def frames_in(self, frames_out: int, options: Dict[str, Any]) -> int:
    """Input frames this step needs to give ``frames_out`` frames."""
    del options
    return frames_out

  def __call__(self, stream: Optional[Stream], ctx: Context) -> Stream:
    raise NotImplementedError


class FirstWindow(Step):
  """Key frames: one window of ``sample(batch, rng) -> latents [b, window, h, w, c]``, trimmed to the requested
  number of key frames."""

  def __init__(self, name: str, sample: Callable, decode: Callable, fps: float):
    self.name, self.sample, self.decode, self.key_fps = name, sample, decode, float(fps)

  def __call__(self, stream, ctx):
    if stream is not None:
      raise ValueError(f"pipeline step {self.name!r} makes the first key frames; it cannot follow another step")
    first = np.asarray(self.sample(ctx.batch, ctx.rng_for(self.name)))
    n = min(first.shape[1], ctx.num_key_frames or first.shape[1])
    ctx.key_frames_made = n
    return Stream(_counted([first[:, :n]], ctx.bar(n, f"{self.name}: key frames")), n, self.key_fps, self.decode)


class Rollout(Step):
  """Key frames extended window by window: ``window_fn(cond, z_ctx [b, S, h, w, c], rng) -> [b, window, ...]``
  whose first S frames are ``z_ctx``. Without an earlier step the first window has no context (S = 0) and
  ``latent_shape`` ``(h, w, c)`` gives its size. Default length: ``options["num_windows"]`` (4) windows."""

  def __init__(self, name: str, window_fn: Callable, decode: Callable, *, window: int, num_context: int,
               fps: float, latent_shape: Sequence[int]):
    self.name, self.window_fn, self.decode, self.key_fps = name, window_fn, decode, float(fps)
    self.window, self.num_context, self.latent_shape = int(window), int(num_context), tuple(latent_shape)

  def __call__(self, stream, ctx):
    windows = ctx.options.get("num_windows") or 4
    target = ctx.num_key_frames or frames_of_windows(int(windows), self.window, self.num_context)
    cond = ctx.cond
    rng = ctx.rng_for(self.name)
    if stream is None:
      b = jax.tree.leaves(cond)[0].shape[0]
      z_ctx = jnp.zeros((b, 0) + self.latent_shape, jnp.float32)
      first = np.asarray(self.window_fn(cond, z_ctx, ctx.rng_for(self.name + '/first window')))
      decode = self.decode
    else:
      first, decode = np.concatenate(list(stream.chunks), axis=1), stream.decode or self.decode
    chunks = rollout(self.window_fn, cond, first, target, rng, self.num_context)
    ctx.key_frames_made = target
    return Stream(_counted(chunks, ctx.bar(target, f"{self.name}: key frames")), target, self.key_fps, decode)


class Interpolation(Step):
  """``options["interpolations"]`` passes (default: one per regime, at most 2) of ``window_fn(cond, keys [b, K,
  h, w, c], regime [b], rng) -> [b, stride (K - 1) + 1, ...]``; pass i uses regime i."""

  def __init__(self, name: str, window_fn: Callable, *, stride: int, window_keys: int, num_regimes: int,
               group: int = 8):
    self.name, self.window_fn = name, window_fn
    self.stride, self.window_keys, self.num_regimes, self.group = int(stride), int(window_keys), int(num_regimes), group

  def passes(self, options) -> int:
    n = options.get("interpolations")
    n = min(2, max(1, self.num_regimes)) if n is None else int(n)
    if not 0 <= n <= max(1, self.num_regimes):
      raise ValueError(f"--interpolations={n}: the {self.name} stage has {self.num_regimes} regimes "
                       f"(0..{max(1, self.num_regimes)} passes)")
    return n

  def fps_factor(self, options):
    return float(self.stride ** self.passes(options))

  def frames_in(self, frames_out, options):
    return int(math.ceil((frames_out - 1) / self.stride ** self.passes(options))) + 1

  def __call__(self, stream, ctx):
    if stream is None:
      raise ValueError(f"pipeline step {self.name!r} interpolates key frames: it needs a key-frame stage before it")
    chunks, total, fps = stream.chunks, stream.num_frames, stream.fps
    for i in range(self.passes(ctx.options)):
      total, fps = self.stride * (total - 1) + 1, fps * self.stride
      chunks = _counted(interpolate(self.window_fn, ctx.cond, chunks, jax.random.fold_in(ctx.rng_for(self.name), i),
                                    window_keys=self.window_keys, stride=self.stride, regime=i, group=self.group),
                        ctx.bar(total, f"{self.name}: x{self.stride} (regime {i})"))
      if i + 1 < self.passes(ctx.options):
        chunks = ctx.overlapped(chunks)
    return Stream(chunks, total, fps, stream.decode)


class WindowedDecode(Step):
  """Latents -> pixels with a video decoder: ``decode_clip(z [b, window + 2 halo, h, w, c]) -> uint8 [b, same, H,
  W, 3]`` over ``models.vae.decode_windows`` of the stream (exact when ``halo`` is the decoder's temporal receptive
  field), replacing the image decoder the key-frame stage attached."""

  def __init__(self, name: str, decode_clip: Callable, *, window: int, halo: int):
    self.name, self.decode_clip, self.window, self.halo = name, decode_clip, int(window), int(halo)

  def _decoded(self, chunks: Iterable[np.ndarray], total: int) -> Iterator[np.ndarray]:
    from videoldm_jax.models.vae import decode_windows  # pylint: disable=g-import-not-at-top
    windows = decode_windows(total, self.window, self.halo)
    buffered: List[np.ndarray] = []  # latent chunks from frame ``offset`` on (host memory: one window's worth)
    offset, have = 0, 0
    source = iter(chunks)
    for i, (start, stop, keep_start, keep_stop) in enumerate(windows):
      while have < stop:
        chunk = np.asarray(next(source))
        buffered.append(chunk)
        have += chunk.shape[1]
      z = np.concatenate(buffered, axis=1)
      out = np.asarray(self.decode_clip(z[:, start - offset:stop - offset]))
      yield out[:, keep_start - start:keep_stop - start]
      next_start = windows[i + 1][0] if i + 1 < len(windows) else have  # frames before it are not read again
      buffered, offset = [z[:, next_start - offset:]], next_start

  def __call__(self, stream, ctx):
    if stream is None or stream.decode is None:
      raise ValueError(f"pipeline step {self.name!r} decodes latents: it needs latent frames from earlier stages")
    chunks = _counted(self._decoded(stream.chunks, stream.num_frames),
                      ctx.bar(stream.num_frames, f"{self.name}: video decoder"))
    return Stream(chunks, stream.num_frames, stream.fps, None)


class Upsample(Step):
  """Pixels -> ``factor`` x larger pixels, ``window`` frames at a time: ``window_fn(cond, uint8 [b, window, h, w,
  3], rng) -> uint8 [b, window, factor h, factor w, 3]`` (the last window padded by repeating its last frame).
  A stream still in latents is decoded first."""

  def __init__(self, name: str, window_fn: Callable, *, window: int, factor: int, decode_chunk: int = 16):
    self.name, self.window_fn, self.window, self.factor = name, window_fn, int(window), int(factor)
    self.decode_chunk = int(decode_chunk)

  def _upsampled(self, chunks: Iterable[np.ndarray], cond, rng) -> Iterator[np.ndarray]:
    pending: List[np.ndarray] = []
    count, calls = 0, 0

    def call(frames: np.ndarray) -> np.ndarray:
      nonlocal calls
      out = np.asarray(self.window_fn(cond, frames, jax.random.fold_in(rng, calls)))
      calls += 1
      return out

    for chunk in chunks:
      pending.append(np.asarray(chunk))
      count += chunk.shape[1]
      while count >= self.window:
        frames = np.concatenate(pending, axis=1)
        yield call(frames[:, :self.window])
        pending, count = [frames[:, self.window:]], count - self.window
    if count:
      frames = np.concatenate(pending, axis=1)
      padded = np.concatenate([frames, np.repeat(frames[:, -1:], self.window - count, axis=1)], axis=1)
      yield call(padded)[:, :count]

  def __call__(self, stream, ctx):
    if stream is None:
      raise ValueError(f"pipeline step {self.name!r} upsamples a video: it needs earlier stages")
    chunks = stream.chunks
    if stream.decode is not None:
      chunks = decode(stream.decode, chunks, self.decode_chunk)
    out = _counted(self._upsampled(chunks, ctx.cond, ctx.rng_for(self.name)),
                   ctx.bar(stream.num_frames, f"{self.name}: x{self.factor}"))
    return Stream(out, stream.num_frames, stream.fps, None)


def run(steps: Sequence[Step], ctx: Context, *, seconds: Optional[float] = None,
        decode_chunk: int = 16) -> Stream:
  """Folds ``steps`` (in pipeline order) into a stream of uint8 frame chunks ``[b, k, H, W, 3]``.

  ``seconds``: the length of the final video; the number of key frames is worked back from it through each step's
  ``frames_in`` (a key-frame step may still give fewer, e.g. a lone base window).
  """
  if not steps or steps[0].key_fps is None:
    raise ValueError(f"the pipeline needs a key-frame stage first; got steps {[s.name for s in steps]}")
  if seconds:
    fps = steps[0].key_fps * math.prod(s.fps_factor(ctx.options) for s in steps[1:])
    frames = max(2, int(round(float(seconds) * fps)))
    for s in reversed(steps[1:]):
      frames = s.frames_in(frames, ctx.options)
    ctx.num_key_frames = frames
  stream = None
  for s in steps:
    stream = s(stream, ctx)
    stream = dataclasses.replace(stream, chunks=ctx.overlapped(stream.chunks))
  if stream.decode is not None:
    chunks = _counted(decode(stream.decode, stream.chunks, decode_chunk), ctx.bar(stream.num_frames, "decode"))
    stream = Stream(ctx.overlapped(chunks), stream.num_frames, stream.fps, None)
  return stream
