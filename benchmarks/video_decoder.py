r"""Image decoder vs video-fine-tuned decoder (Video LDM Sec. 3.3) on held-out synthetic driving clips.

From one trained ``autoencoder`` workdir (``--autoencoder``; trained here at the runlocal chain's budget when
absent), with the same step budget and frames per step:

* ``image``: the autoencoder's decoder as trained, frame by frame;
* ``image_ft``: that decoder fine-tuned ``--steps`` more steps on frames (the ``autoencoder`` stage with only the
  decoder trainable, 2D PatchGAN): what the budget buys without temporal layers;
* ``video``: the ``decoder`` stage for ``--steps`` steps on 8-frame 30 fps clips (temporal layers + 3D PatchGAN).

Each reconstructs the same ``--clips`` held-out clips of 16 frames (frozen encoder; the video decoder sees each
whole clip) from the posterior mode and, as a stand-in for generated latents whose frames disagree slightly, from
posterior samples drawn independently per frame (``latents=sample``), and reports per-frame L1 and PSNR, the flicker error
``mean |(x̂_{t+1} - x̂_t) - (x_{t+1} - x_t)|`` and the reconstruction FVD (I3D features of reconstructions vs
the original clips), next to the FVD of two disjoint real sets of the same size (the noise floor).

  python benchmarks/video_decoder.py --workdir=/tmp/video_decoder [--autoencoder=/tmp/videoldm_rds/autoencoder]
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
from absl import app, flags

import stage_runs
from configs import rds
from videoldm_jax.evaluation import fvd
from videoldm_jax.tasks.autoencoder import psnr
from videoldm_jax.tasks.decoder import flicker_error

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "/tmp/video_decoder", "root of the runs")
flags.DEFINE_string("autoencoder", "", "trained autoencoder workdir (default: WORKDIR/autoencoder, trained here)")
flags.DEFINE_integer("steps", 60, "fine-tuning steps of the image_ft and video arms")
flags.DEFINE_integer("clips", 32, "held-out clips")
flags.DEFINE_integer("seed", 0, "seed of the fine-tuning runs")
flags.DEFINE_list("rows", ["image", "image_ft", "video"], "arms to evaluate")

FRAMES = 16  # FVD clip length
FPS = 30.0   # the pipeline's final frame rate, where the decoder works


def _arm_dirs(root: str, ae_dir: str, steps: int, seed: int):
  image_ft = rds.get_config("stage=autoencoder,runlocal")
  video = rds.get_config("stage=decoder,runlocal")
  for c in (image_ft, video):
    c.model_init, c.total_steps, c.seed = ae_dir, steps, seed
    c.sample_every_steps = 0
    c.checkpoint_every_steps = steps
    c.optimizer.lr = video.optimizer.lr
    c.autoencoder.disc_start = 0
  # Same frames per step: the video arm's batch of clips x clip length.
  image_ft.batch_size = video.batch_size * video.data.num_frames
  image_ft.trainable = r"vae/(decoder|post_quant_conv)/.*|discriminator/.*"
  return {"image": ae_dir, "image_ft": stage_runs.trained(image_ft, os.path.join(root, f"image_ft_{steps}_{seed}")),
          "video": stage_runs.trained(video, os.path.join(root, f"video_{steps}_{seed}"))}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  root = FLAGS.workdir
  ae_dir = FLAGS.autoencoder
  if not ae_dir:
    ae = rds.get_config("stage=autoencoder,runlocal")
    ae.total_steps = rds.RUNLOCAL_CHAIN_STEPS["autoencoder"]
    ae_dir = stage_runs.trained(ae, os.path.join(root, "autoencoder"))
  dirs = _arm_dirs(root, ae_dir, FLAGS.steps, FLAGS.seed)
  config = rds.get_config("stage=decoder,runlocal")
  h, w = int(config.data.height), int(config.data.width)
  clips = fvd.synthetic_videos(FLAGS.clips, FRAMES, h, w, fps=FPS)
  extractor = fvd.I3DFeatures(num_frames=FRAMES)
  real = extractor.stats(clips)
  floor = fvd.fvd_from_stats(real, extractor.stats(fvd.synthetic_videos(FLAGS.clips, FRAMES, h, w, seed=1,
                                                                         fps=FPS)))
  results = {"noise_floor_fvd": floor, "clips": FLAGS.clips, "frames": FRAMES, "size": [h, w],
             "steps": FLAGS.steps, "seed": FLAGS.seed, "rows": {}}
  x = jnp.asarray(clips, jnp.float32) / 127.5 - 1.0
  print(f"{FLAGS.clips} held-out clips of {FRAMES} frames at {FPS:g} fps, {h}x{w}; real vs real FVD {floor:.1f}")
  print(f"{'arm':10s} {'latents':8s} {'L1':>8s} {'PSNR dB':>8s} {'flicker':>8s} {'rec FVD':>8s}")
  for name in FLAGS.rows:
    for latents in ("mode", "sample"):
      rec = stage_runs.reconstruct(dirs[name], clips, latents == "sample")
      y = jnp.asarray(rec, jnp.float32) / 127.5 - 1.0
      row = {"l1": float(jnp.mean(jnp.abs(y - x))),
             "psnr": float(jnp.mean(psnr(x.reshape((-1,) + x.shape[2:]), y.reshape((-1,) + y.shape[2:])))),
             "flicker": float(jnp.mean(flicker_error(x, y))),
             "fvd": fvd.fvd_from_stats(real, extractor.stats(rec)), "workdir": dirs[name]}
      results["rows"][f"{name}/{latents}"] = row
      print(f"{name:10s} {latents:8s} {row['l1']:8.4f} {row['psnr']:8.2f} {row['flicker']:8.4f} {row['fvd']:8.1f}")
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, f"results_{FLAGS.steps}_{FLAGS.seed}.json"), "w") as f:
    json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
