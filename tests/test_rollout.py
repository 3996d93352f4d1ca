"""Long-video sampling (videoldm_jax/pipeline.py): predictor rollout and interpolation with tiny random models
(their zero-initialised conditioning projections perturbed so the conditioning acts)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import rds
from videoldm_jax import optim, pipeline, tasks
from test_masked import _perturb

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
OPTS = FAST if jax.default_backend() == "cpu" else None
B, H, W, C = 1, 4, 8, 4


def _task(stage, num_frames):
  config = rds.get_config(f"stage={stage},runlocal")
  config.data.num_frames = num_frames
  config.sampling.num_steps = 2
  config.sampling.guidance_scale = 1.0  # one model call per step (context guidance is tested in test_masked)
  config.sampling.context_guidance = 1.0
  task = tasks.get(stage)(config)
  params = _perturb(nn.meta.unbox(jax.jit(task.init, compiler_options=OPTS)(jax.random.PRNGKey(0))))
  trainable, frozen = optim.split(params, config.trainable)
  return task, trainable, frozen


BATCH = {"labels": {"day_night": np.array([1]), "crowdedness": np.array([2])}}


def test_rollout_frame_count_context_and_one_compile():
  task, trainable, frozen = _task("predictor", 5)
  step = pipeline.predictor_step(task, compiler_options=OPTS)
  rng = jax.random.PRNGKey(0)
  first = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (B, 5, H, W, C)))
  # Window k's first frames are the context passed in, bit for bit.
  ctx = first[:, -2:]
  window = np.asarray(step(trainable, frozen, BATCH, jnp.asarray(ctx), rng))
  assert window.shape == (B, 5, H, W, C)
  np.testing.assert_array_equal(window[:, :2], ctx)
  assert not np.allclose(window[:, 2:], 0)
  # 4 windows (the first one given): 5 + 3 * 3 = 14 frames; ask for 13 -> exactly 13, trimmed at the end.
  assert pipeline.num_windows(13, 5, 2) == 4 and pipeline.frames_of_windows(4, 5, 2) == 14
  chunks = list(pipeline.rollout(functools.partial(step, trainable, frozen), BATCH, first, 13, rng,
                                num_context=2))
  assert [c.shape[1] for c in chunks] == [5, 3, 3, 2]
  video = np.concatenate(chunks, axis=1)
  assert video.shape == (B, 13, H, W, C)
  np.testing.assert_array_equal(video[:, :5], first)
  assert step.traces == 1  # every window reused the one compiled step
  # Each window continues from the previous one's last two frames: rerunning window 1 from frames 3, 4 gives
  # frames 5..7.
  again = np.asarray(step(trainable, frozen, BATCH, jnp.asarray(video[:, 3:5]), jax.random.fold_in(rng, 0)))
  np.testing.assert_array_equal(again[:, 2:], video[:, 5:8])
  assert step.traces == 1


@pytest.mark.parametrize("num_keys, chunking, group", [(6, (2, 4), 1), (5, (5,), 1), (2, (1, 1), 1),
                                                       (8, (3, 5), 2)])
def test_interpolation_length_and_key_frames(interp, num_keys, chunking, group):
  task, trainable, frozen, step = interp
  if group > 1:
    step = pipeline.interpolator_step(task, OPTS)
  keys = np.asarray(jax.random.normal(jax.random.PRNGKey(num_keys), (B, num_keys, H, W, C)))
  bounds = np.cumsum((0,) + chunking)
  chunks = [keys[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])]
  out = np.concatenate(list(pipeline.interpolate(functools.partial(step, trainable, frozen), BATCH, chunks,
                                                 jax.random.PRNGKey(0), window_keys=3, stride=4, group=group)), axis=1)
  assert out.shape[1] == 4 * num_keys - 3
  np.testing.assert_array_equal(out[:, ::4], keys)  # key frames kept exactly at 0, 4, 8, ...
  assert step.traces == 1


@pytest.fixture(scope="module")
def interp():
  task, trainable, frozen = _task("interpolator", 9)
  return task, trainable, frozen, pipeline.interpolator_step(task, OPTS)


def test_regime_label_changes_the_interpolation(interp):
  task, trainable, frozen, step = interp
  keys = jnp.asarray(jax.random.normal(jax.random.PRNGKey(3), (B, 3, H, W, C)))
  rng = jax.random.PRNGKey(0)
  a = np.asarray(step(trainable, frozen, BATCH, keys, jnp.zeros((B,), jnp.int32), rng))
  b = np.asarray(step(trainable, frozen, BATCH, keys, jnp.ones((B,), jnp.int32), rng))
  np.testing.assert_array_equal(a[:, ::4], b[:, ::4])
  assert np.abs(a - b).max() > 1e-4


def test_predictor_alone_makes_the_first_window_and_the_pipeline_decodes(interp):
  """A pipeline with no key-frame model before the predictor: its first window is unconditioned (no context),
  the rollout extends it, and the stream is decoded by the predictor's own VAE. With the interpolator after it,
  the steps running in threads of their own (``overlap``) give the same frames as one after the other."""
  task, trainable, frozen = _task("predictor", 5)
  ctx = pipeline.Context(batch=BATCH, rng=jax.random.PRNGKey(0), options={"num_windows": 2}, progress=False)
  stream = pipeline.run([task.pipeline_step(trainable, frozen)], ctx)
  frames = np.concatenate(list(stream.chunks), axis=1)
  assert ctx.key_frames_made == 8 and stream.num_frames == 8  # 5 + (5 - 2)
  assert frames.shape == (B, 8, task.config.data.height, task.config.data.width, 3) and frames.dtype == np.uint8
  interp_task, interp_trainable, interp_frozen, _ = interp
  steps = [task.pipeline_step(trainable, frozen), interp_task.pipeline_step(interp_trainable, interp_frozen)]
  videos = {}
  for overlap in (False, True):
    ctx = pipeline.Context(batch=BATCH, rng=jax.random.PRNGKey(0), options={"num_windows": 2}, progress=False,
                           overlap=overlap)
    stream = pipeline.run(steps, ctx)
    videos[overlap] = np.concatenate(list(stream.chunks), axis=1)
  assert videos[False].shape[1] == 16 * (8 - 1) + 1  # two x4 passes
  np.testing.assert_array_equal(videos[True], videos[False])
  np.testing.assert_array_equal(videos[False][:, ::16], frames)  # the key frames survive both passes


def test_prefetched_keeps_order_raises_and_stops():
  """The worker thread behind ``overlap``: items in order, its exception raised in the consumer, the context
  entered in the worker, and a consumer that stops early stops the worker (no more than ``depth`` + 1 made)."""
  import threading  # pylint: disable=g-import-not-at-top
  import contextlib  # pylint: disable=g-import-not-at-top
  threads = []

  @contextlib.contextmanager
  def context():
    threads.append(threading.current_thread())
    yield

  assert list(pipeline.prefetched(iter(range(7)), context=context)) == list(range(7))
  assert threads and threads[0] is not threading.current_thread()

  def failing():
    yield 1
    raise KeyError("window 2")

  it = pipeline.prefetched(failing())
  assert next(it) == 1
  with pytest.raises(KeyError, match="window 2"):
    next(it)
  made = []
  done = threading.Event()

  def endless():
    try:
      for i in range(10_000):
        made.append(i)
        yield i
    finally:
      done.set()

  it = pipeline.prefetched(endless(), depth=2)
  assert [next(it) for _ in range(3)] == [0, 1, 2]
  it.close()
  assert done.wait(5) and len(made) <= 3 + 2 + 1
