r"""Image upsampler vs video upsampler (Video LDM Sec. 3.4) on held-out synthetic driving clips, runlocal size.

Trains (or reuses, under ``--workdir``) a pixel-space ``upsampler_image`` for ``--pretrain_steps``, then spends the
same ``--steps`` budget two ways:

* ``image``: ``--steps`` more image steps on frames (resumed from the pre-trained checkpoint), applied frame by frame;
* ``video``: the ``upsampler`` stage's temporal layers for ``--steps`` steps on 8-frame 30 fps clips (spatial layers
  frozen), applied in windows of 8 frames.

Both upsample the same ground-truth low-res clips (``--clips`` held-out clips of 16 frames, 32x64 -> 128x256, the
same sampler noise) and are scored against the high-res clips: PSNR, the flicker error
``mean |(x̂_{t+1} - x̂_t) - (x_{t+1} - x_t)|`` and FVD, next to bilinear upsampling and the real-vs-real noise
floor. Also prints the upsampler's throughput (frames/s) on this machine.

  python benchmarks/video_upsampler.py --workdir=/tmp/video_upsampler
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import stage_runs
from videoldm_jax.evaluation import fvd
from videoldm_jax.models import vae as vae_lib
from videoldm_jax.tasks.autoencoder import psnr
from videoldm_jax.tasks.decoder import flicker_error
from videoldm_jax.tasks.upsampler import downsample

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "/tmp/video_upsampler", "root of the runs")
flags.DEFINE_integer("pretrain_steps", 150, "image pre-training steps (the runlocal chain's)")
flags.DEFINE_integer("steps", 60, "budget of each arm after pre-training")
flags.DEFINE_integer("clips", 16, "held-out clips")
flags.DEFINE_integer("sampler_steps", 10, "DDIM steps")
flags.DEFINE_integer("seed", 0, "seed of the runs")

FRAMES, FPS = 16, 30.0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  root, steps, seed = FLAGS.workdir, FLAGS.steps, FLAGS.seed
  pre = stage_runs.trained(stage_runs.stage_config("upsampler_image", FLAGS.pretrain_steps, seed),
                           os.path.join(root, f"pretrain_{FLAGS.pretrain_steps}_{seed}"))
  image = stage_runs.stage_config("upsampler_image", FLAGS.pretrain_steps + steps, seed)
  image.resume = pre
  video = stage_runs.stage_config("upsampler", steps, seed)
  video.model_init = pre
  dirs = {"image": stage_runs.trained(image, os.path.join(root, f"image_{steps}_{seed}")),
          "video": stage_runs.trained(video, os.path.join(root, f"video_{steps}_{seed}"))}

  h, w = int(video.data.height), int(video.data.width)
  clips = fvd.synthetic_videos(FLAGS.clips, FRAMES, h, w, fps=FPS)
  x = jnp.asarray(clips, jnp.float32) / 127.5 - 1.0
  low = downsample(x, int(video.upsampler.factor))
  extractor = fvd.I3DFeatures(num_frames=FRAMES)
  real = extractor.stats(clips)
  floor = fvd.fvd_from_stats(real, extractor.stats(fvd.synthetic_videos(FLAGS.clips, FRAMES, h, w, seed=1,
                                                                         fps=FPS)))
  results = {"noise_floor_fvd": floor, "clips": FLAGS.clips, "frames": FRAMES, "size": [h, w], "steps": steps,
             "pretrain_steps": FLAGS.pretrain_steps, "sampler_steps": FLAGS.sampler_steps, "seed": seed, "rows": {}}
  print(f"{FLAGS.clips} held-out clips of {FRAMES} frames at {FPS:g} fps, {h // 4}x{w // 4} -> {h}x{w}; "
        f"real vs real FVD {floor:.1f}")
  print(f"{'arm':9s} {'PSNR dB':>8s} {'flicker':>8s} {'FVD':>8s} {'frames/s':>9s}")
  bilinear = np.asarray(vae_lib.to_uint8(jax.image.resize(low, x.shape, method="linear")))
  outputs = {"bilinear": (bilinear, None)}
  for name, d in dirs.items():
    fn = stage_runs.upsample_fn(d, FLAGS.sampler_steps)
    fn(np.asarray(low[:1]), jax.random.PRNGKey(0))  # compile
    t0 = time.time()
    out = np.concatenate([fn(np.asarray(low[i:i + 1]), jax.random.PRNGKey(i)) for i in range(FLAGS.clips)])
    outputs[name] = (out, FLAGS.clips * FRAMES / (time.time() - t0))
  for name, (out, speed) in outputs.items():
    y = jnp.asarray(out, jnp.float32) / 127.5 - 1.0
    frames = lambda v: v.reshape((-1,) + v.shape[2:])  # noqa: E731
    row = {"psnr": float(jnp.mean(psnr(frames(x), frames(y)))), "flicker": float(jnp.mean(flicker_error(x, y))),
           "fvd": fvd.fvd_from_stats(real, extractor.stats(out)), "frames_per_s": speed}
    results["rows"][name] = row
    print(f"{name:9s} {row['psnr']:8.2f} {row['flicker']:8.4f} {row['fvd']:8.1f} "
          f"{'' if speed is None else f'{speed:9.2f}'}")
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, f"results_{steps}_{seed}.json"), "w") as f:
    json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
