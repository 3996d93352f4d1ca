"""Helpers the quality benchmarks share: short runlocal stage runs, reuse of finished ones, and the per-clip
reconstruct / upsample functions the decoder and upsampler comparisons score. No flags: importable by every script
in this folder."""

from __future__ import annotations

import hashlib
from typing import Callable, Dict, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from configs import rds
from videoldm_jax import config_lib, optim, parallel, train, workdirs
from videoldm_jax.models import vae as vae_lib


def stage_config(stage: str, steps: int, seed: int, **overrides):
  """``configs/rds.py:stage=STAGE,runlocal`` for ``steps`` steps with run seed ``seed``, no previews or periodic
  evaluation (the benchmark's own scoring is the evaluation), one checkpoint at the end."""
  c = rds.get_config(f"stage={stage},runlocal")
  c.total_steps, c.seed, c.checkpoint_every_steps = int(steps), int(seed), int(steps)
  c.sample_every_steps = c.eval_every_steps = 0
  for key, value in overrides.items():
    node = c
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return c


def trained(config, workdir: str) -> str:
  """Trains ``config`` into ``workdir`` unless a checkpoint at its ``total_steps`` is already there."""
  if not train.finished(config, workdir):
    train.train_and_evaluate(config, workdir)
  return workdir


def digest(arrays: Dict[str, object]) -> str:
  """sha256 (16 hex digits) over the sorted names, dtypes, shapes and bytes of ``arrays``."""
  h = hashlib.sha256()
  for name in sorted(arrays):
    a = np.asarray(jax.device_get(arrays[name]))
    h.update(f"{name}|{a.dtype}|{a.shape}|".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:16]


def first_batches_digest(config, num_batches: int = 2) -> str:
  """Digest of the first ``num_batches`` training batches ``config``'s input pipeline yields: the data (clips,
  labels, conditioning dropout) and its order, as the train loop will read them."""
  from videoldm_jax import tasks  # pylint: disable=g-import-not-at-top
  config = tasks.get(config.stage).resolve_config(config)
  mesh = parallel.make_mesh(config)
  data = tasks.get(config.stage)(config).input_pipeline(mesh)
  try:
    flat = {}
    for i in range(num_batches):
      batch = parallel.to_host(next(data))
      flat.update({f"{i}/{k}": v for k, v in optim.flat_paths(batch).items()})
  finally:
    if hasattr(data, "close"):
      data.close()
  return digest(flat)


def reconstruct(stage_dir: str, clips: np.ndarray, sample: bool) -> np.ndarray:
  """uint8 clips ``[n, t, h, w, 3]`` -> their reconstructions through the workdir's VAE: the posterior mode, or a
  sample with a fixed seed per clip (the same for every workdir sharing the frozen encoder). A video decoder sees
  each whole clip."""
  config = workdirs.load_run_config(stage_dir)
  config.mesh = config_lib.mesh_defaults()  # data parallel over this machine's devices
  mesh = parallel.make_mesh(config)
  task, trainable, frozen = workdirs.load_trained(stage_dir, config, mesh)
  vae_params = optim.merge({k: v for k, v in trainable.items() if k != "discriminator"}, frozen)["vae"]
  video = bool(task.vae_config.temporal_decoder)

  @jax.jit
  def fn(params, clip, rng):  # [t, h, w, 3] in [-1, 1]
    posterior = vae_lib.DiagonalGaussian(task.vae.apply({"params": params}, clip, method="encode"))
    z = posterior.sample(rng) if sample else posterior.mode()
    return task.vae.apply({"params": params}, z, clip.shape[0] if video else None, method="decode")

  out = [np.asarray(fn(vae_params, jnp.asarray(c, jnp.float32) / 127.5 - 1.0, jax.random.PRNGKey(i)))
         for i, c in enumerate(clips)]
  return np.clip(np.round((np.stack(out) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def upsample_fn(stage_dir: str, sampler_steps: int) -> Callable[[np.ndarray, jax.Array], np.ndarray]:
  """``(low [1, t, h, w, 3] in [-1, 1], rng) -> uint8 [1, t, 4h, 4w, 3]`` with the workdir's upsampler (DDIM,
  ``sampler_steps``): a video model in windows of its training clip length, an image model on the whole clip
  (frame by frame inside the U-Net)."""
  config = workdirs.load_run_config(stage_dir)
  config.mesh = config_lib.mesh_defaults()
  config.sampling.num_steps = int(sampler_steps)
  task, trainable, frozen = workdirs.load_trained(stage_dir, config, parallel.make_mesh(config))
  params = optim.merge(trainable, frozen)
  cond = {"cond_mask": jnp.ones((1,), jnp.float32)}  # no conditioning besides the low-res clip
  fn = jax.jit(lambda p, low, rng: vae_lib.to_uint8(task.upsample(p, low, cond, rng)))

  def run(low, rng):
    frames = low.shape[1]
    window = int(config.data.num_frames) if task.video else frames
    return np.concatenate([np.asarray(fn(params, low[:, i:i + window], jax.random.fold_in(rng, i)))
                           for i in range(0, frames, window)], axis=1)

  return run


def as_float(clips: Iterable) -> jax.Array:
  """uint8 clips -> float32 in [-1, 1]."""
  return jnp.asarray(np.asarray(clips), jnp.float32) / 127.5 - 1.0
