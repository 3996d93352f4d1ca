"""Host memory of writing long sampled videos: streamed into the mp4 / gif encoders vs held whole first.

Each measurement is a fresh process that feeds ``--videos`` videos of ``--frames`` (and 4x as many) frames at the
RDS pipeline's final 512x1024, in 16-frame chunks as the long-video pipeline yields them, to

* ``streamed``: ``sampling.write_stream(..., keep_videos=False)`` (what ``sample --pipeline`` and the chain's
  closing videos do: frames go to the encoders as they come; only the contact sheet's frames are kept);
* ``whole``: the chunks concatenated into one array, then written (what the sampler did before), and prints its peak
  RSS. Streamed should stay flat from 1x to 4x the length; whole grows by the size of the frames.

  python benchmarks/video_writer_memory.py [--frames=120] [--videos=2]
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout first

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("frames", 120, "frames of the 1x videos (4 s at 30 fps)")
flags.DEFINE_integer("videos", 2, "videos side by side")
flags.DEFINE_integer("height", 512, "frame height")
flags.DEFINE_integer("width", 1024, "frame width")
flags.DEFINE_string("_child", "", "internal: MODE,FRAMES of one measurement")

CHUNK = 16


def _chunks(videos: int, frames: int, height: int, width: int):
  """Moving gradients (cheap to make, not trivially compressible), uint8 ``[videos, k, h, w, 3]``."""
  y, x = np.mgrid[0:height, 0:width]
  for start in range(0, frames, CHUNK):
    k = min(CHUNK, frames - start)
    t = np.arange(start, start + k)[:, None, None]
    base = ((x[None] + 4 * t + y[None] // 2) % 256).astype(np.uint8)
    frame = np.stack([base, np.roll(base, 7, axis=2), 255 - base], axis=-1)
    yield np.stack([np.roll(frame, 13 * v, axis=1) for v in range(videos)])


def child(mode: str, frames: int) -> None:
  from videoldm_jax import sampling, video_io  # pylint: disable=g-import-not-at-top
  out = os.path.join(tempfile.mkdtemp(), "sample")
  t0 = time.perf_counter()
  chunks = _chunks(FLAGS.videos, frames, FLAGS.height, FLAGS.width)
  if mode == "streamed":
    sampling.write_stream(chunks, frames, 30.0, out, upscale=1, sheet_frames=16, keep_videos=False)
  else:
    videos = np.concatenate(list(chunks), axis=1)
    video_io.write_outputs(videos, out, 30.0, upscale=1, sheet_frames=16)
  seconds = time.perf_counter() - t0
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
  print(json.dumps({"mode": mode, "frames": frames, "peak_rss_mib": peak, "seconds": seconds,
                    "mp4_mib": os.path.getsize(out + ".mp4") / 2**20}))


def measure(mode: str, frames: int) -> dict:
  args = [sys.executable, os.path.abspath(__file__), f"--_child={mode},{frames}", f"--videos={FLAGS.videos}",
          f"--height={FLAGS.height}", f"--width={FLAGS.width}"]
  res = subprocess.run(args, capture_output=True, text=True, check=False, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  if res.returncode != 0:
    raise RuntimeError(res.stderr[-3000:])
  return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS._child:  # pylint: disable=protected-access
    mode, frames = FLAGS._child.split(",")  # pylint: disable=protected-access
    child(mode, int(frames))
    return 0
  frame_mib = FLAGS.videos * FLAGS.height * FLAGS.width * 3 / 2**20
  print(f"{FLAGS.videos} videos of {FLAGS.height}x{FLAGS.width} frames ({frame_mib:.1f} MiB per time step), "
        f"written to mp4 + gif + contact sheet")
  print(f"{'mode':>9} {'frames':>7} {'peak RSS MiB':>13} {'seconds':>8}")
  rows = {}
  for mode in ("streamed", "whole"):
    for frames in (FLAGS.frames, 4 * FLAGS.frames):
      r = measure(mode, frames)
      rows[mode, frames] = r
      print(f"{mode:>9} {frames:>7} {r['peak_rss_mib']:>13.1f} {r['seconds']:>8.1f}")
  for mode in ("streamed", "whole"):
    a, b = rows[mode, FLAGS.frames], rows[mode, 4 * FLAGS.frames]
    print(f"{mode}: 1x -> 4x length: peak RSS {b['peak_rss_mib'] - a['peak_rss_mib']:+.1f} MiB "
          f"(the frames themselves: {3 * FLAGS.frames * frame_mib:.0f} MiB)")
  return 0


if __name__ == "__main__":
  app.run(main)
