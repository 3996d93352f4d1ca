r"""Predictor quality on synthetic driving scenes at runlocal size: context guidance and rollout drift.

Trains (or reuses) a runlocal ``predictor`` (``--workdir``; ``--model_init`` e.g. a runlocal chain's ``base``), then
on held-out ground-truth clips (the stage's fixed batch, latents from the frozen VAE):

1. conditions on the first 2 true frames and predicts the rest, with context guidance s = 1 (none) and s = 2, and
   prints the temporal-consistency score |mean |z_{i+1} - z_i| (generated) - same (ground truth)| and the MSE to
   the true continuation;
2. rolls out 10 windows from the first true window and prints the per-window mean consecutive-frame difference
   (steady motion keeps it flat; drift shows as a trend).

  python benchmarks/rollout_eval.py --workdir=/tmp/rollout_eval [--model_init=/tmp/videoldm_rds/base] [--steps=60]
  python benchmarks/rollout_eval.py --workdir=/tmp/videoldm_rds/predictor   # a trained one, with its own config
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from configs import rds
from videoldm_jax import optim, parallel, pipeline, train, workdirs

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "/tmp/rollout_eval", "predictor workdir (trained here unless it has a config.json)")
flags.DEFINE_string("model_init", "", "init of a new predictor, e.g. a runlocal chain's base workdir")
flags.DEFINE_integer("steps", 60, "training steps of a new predictor")
flags.DEFINE_integer("windows", 10, "rollout windows")
flags.DEFINE_string("scales", "1,2", "comma-separated context guidance scales")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  args = FLAGS
  parallel.make_mesh = functools.partial(parallel.make_mesh, devices=jax.devices()[:1])

  if os.path.exists(os.path.join(args.workdir, "config.json")):  # a trained predictor, e.g. a chain's
    config = workdirs.load_run_config(args.workdir)
  else:
    config = rds.get_config("stage=predictor,runlocal")
    config.total_steps = args.steps
    config.sample_every_steps = 0
    config.eval_every_steps = args.steps
    config.model_init = args.model_init
  if not train.finished(config, args.workdir):
    res = train.train_and_evaluate(config, args.workdir)
    print("train eval loss:", [(h["step"], round(h["eval_loss"], 4)) for h in res.eval_history])
  mesh = parallel.make_mesh(config)
  task, trainable, frozen = workdirs.load_trained(args.workdir, config, mesh)
  batch = task.fixed_batch(mesh)
  params = optim.merge(trainable, frozen)
  z_true = jax.jit(task.encode)(params, batch, jax.random.PRNGKey(0))  # [b, T, h, w, c]
  cond = {k: v for k, v in batch.items() if k in ("labels", "caption_ids")}
  diff = lambda z: float(jnp.mean(jnp.abs(z[:, 1:] - z[:, :-1])))  # noqa: E731
  true_motion = diff(z_true)
  print(f"ground truth: mean |z_(i+1) - z_i| = {true_motion:.4f}")

  for s in (float(x) for x in args.scales.split(",")):
    config.sampling.context_guidance = s
    step = pipeline.predictor_step(task)
    window = step(trainable, frozen, cond, z_true[:, :2], jax.random.PRNGKey(1))
    new = window[:, 2:]
    print(f"context guidance s={s:g}: motion {diff(window):.4f} (|diff - true| {abs(diff(window) - true_motion):.4f}),"
          f" MSE to true continuation {float(jnp.mean((new - z_true[:, 2:]) ** 2)):.4f}")

    chunks = list(pipeline.rollout(functools.partial(step, trainable, frozen), cond, np.asarray(z_true),
                                   pipeline.frames_of_windows(args.windows, task.num_frames, 2),
                                   jax.random.PRNGKey(2)))
    video = np.concatenate(chunks, axis=1)
    per_window = [diff(jnp.asarray(video[:, max(0, i - 1):i + c.shape[1]]))
                  for i, c in zip(np.cumsum([0] + [c.shape[1] for c in chunks[:-1]]), chunks)]
    slope = np.polyfit(np.arange(len(per_window)), per_window, 1)[0]
    print(f"  rollout {args.windows} windows ({video.shape[1]} frames, {step.traces} compile): per-window motion "
          + " ".join(f"{m:.3f}" for m in per_window) + f"; trend {slope:+.4f}/window; latent std first/last window "
          f"{video[:, :task.num_frames].std():.3f}/{video[:, -task.num_frames:].std():.3f}")
  os.makedirs(args.workdir, exist_ok=True)


if __name__ == "__main__":
  app.run(main)
