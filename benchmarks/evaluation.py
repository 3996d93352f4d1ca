"""FVD feature extraction: I3D clips/s by batch size, host memory while streaming, projected time for 2,048 videos.

Three measurements, all through the library path the CLI and the training loop use (``fvd.I3DFeatures`` /
``ShardedFeatures`` on a mesh of the local devices, protocol preprocessing inside the jitted step):

  * **throughput**: 16-frame clips (128x256 uint8, resized to 224x224 in the step) per second at each batch size,
    after one compile per batch size; ``--steps`` timed steps.
  * **host memory**: peak RSS of a fresh process that streams ``--rss_videos`` videos (128x256, 16 frames) into
    ``FeatureStats``; it should not grow with the number of videos. The features are I3D's (``--rss_features=i3d``)
    or, by default on CPU where I3D needs ~2 s per clip, a per-channel mean pooling through the same sharded
    streaming path (source -> chunks -> padded sharded steps -> float64 statistics).
  * **projection**: 2,048 videos (the usual FVD sample size) at the best measured clips/s per device.

  python benchmarks/evaluation.py                              # CPU: batches 1,4,8; RSS at 32 vs 128 videos
  python benchmarks/evaluation.py --batches=8,32,64 --rss_features=i3d   # an accelerator
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout first

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from videoldm_jax.evaluation import fvd  # noqa: E402

HEIGHT, WIDTH, FRAMES = 128, 256, 16
PROJECTED_VIDEOS = 2048

FLAGS = flags.FLAGS
flags.DEFINE_string("batches", "1,4,8", "global batch sizes to time")
flags.DEFINE_integer("steps", 2, "timed steps per batch size (after the compile)")
flags.DEFINE_string("rss_videos", "32,128", "video counts whose peak RSS is compared")
flags.DEFINE_enum("rss_features", None, ["pool", "i3d"],
                  "features of the RSS runs (default: i3d on accelerators, pool on CPU)")
flags.DEFINE_integer("rss_batch", 8, "batch size of the RSS runs")
flags.DEFINE_integer("_rss_child", 0, "internal: this process is one RSS run over this many videos")


def throughput(batch: int, steps: int, params) -> dict:
  ex = fvd.I3DFeatures(params, batch_size=batch)
  videos = np.random.default_rng(0).integers(0, 256, (ex.local_batch, FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8)
  t0 = time.perf_counter()
  ex(videos)  # compile + first step
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    ex(videos)
  dt = (time.perf_counter() - t0) / steps
  return {"batch": ex.batch_size, "compile_s": compile_s, "step_s": dt, "clips_per_s": ex.batch_size / dt}


def _random_videos(n: int):
  rng = np.random.default_rng(1)
  for i in range(n):
    yield f"random/{i}", rng.integers(0, 256, (FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8)


def _pool(params, videos):
  x = videos.astype(jnp.float32)
  return jnp.tile(x.mean(axis=(1, 2, 3)), (1, fvd.FEATURE_DIM // 3 + 1))[:, :fvd.FEATURE_DIM] * params


def rss_child(n: int, features: str, batch: int) -> None:
  """Streams ``n`` videos into statistics; prints the peak RSS (MiB) as JSON."""
  if features == "i3d":
    ex = fvd.I3DFeatures(batch_size=batch)
  else:
    ex = fvd.ShardedFeatures(_pool, jnp.float32(1.0), fvd.FEATURE_DIM, batch_size=batch)
  t0 = time.perf_counter()
  stats = ex.stats(_random_videos(n))
  seconds = time.perf_counter() - t0
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
  print(json.dumps({"videos": stats.count, "peak_rss_mib": peak, "seconds": seconds}))


def rss(n: int, features: str, batch: int) -> dict:
  out = subprocess.run([sys.executable, os.path.abspath(__file__), f"--_rss_child={n}",
                        f"--rss_features={features}", f"--rss_batch={batch}"],
                       capture_output=True, text=True, check=False)
  if out.returncode != 0:
    raise RuntimeError(out.stderr[-2000:])
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  args = FLAGS
  platform = jax.devices()[0].platform
  features = args.rss_features or ("pool" if platform == "cpu" else "i3d")
  if args._rss_child:  # pylint: disable=protected-access
    rss_child(args._rss_child, features, args.rss_batch)  # pylint: disable=protected-access
    return 0

  devices = jax.local_device_count()
  print(f"JAX {jax.__version__}, {devices} x {jax.devices()[0].device_kind} ({platform}); clips "
        f"{FRAMES}x{HEIGHT}x{WIDTH} uint8 -> 224x224 I3D")
  params = fvd.i3d_lib.load_i3d()
  rows = [throughput(int(b), args.steps, params) for b in args.batches.split(",")]
  print(f"{'batch':>6} {'compile s':>10} {'step s':>8} {'clips/s':>8} {'clips/s/device':>15}")
  for r in rows:
    print(f"{r['batch']:>6} {r['compile_s']:>10.1f} {r['step_s']:>8.2f} {r['clips_per_s']:>8.2f} "
          f"{r['clips_per_s'] / devices:>15.2f}")

  counts = [int(n) for n in args.rss_videos.split(",")]
  mem = [rss(n, features, args.rss_batch) for n in counts]
  print(f"host memory while streaming ({features} features, batch {args.rss_batch}):")
  for m in mem:
    print(f"  {m['videos']:>5} videos: peak RSS {m['peak_rss_mib']:8.1f} MiB ({m['seconds']:.1f} s)")
  growth = mem[-1]["peak_rss_mib"] - mem[0]["peak_rss_mib"]
  print(f"  growth {counts[0]} -> {counts[-1]} videos: {growth:+.1f} MiB "
        f"({growth / max(counts[-1] - counts[0], 1) * 1024:+.1f} KiB per video)")

  best = max(rows, key=lambda r: r["clips_per_s"])
  per_device = best["clips_per_s"] / devices
  seconds = PROJECTED_VIDEOS / per_device
  print(f"projected FVD feature time for {PROJECTED_VIDEOS} videos on one device: {seconds:.0f} s "
        f"({seconds / 60:.1f} min) at batch {best['batch']} ({per_device:.2f} clips/s/device); x2 with the "
        f"reference videos, x3 with the noise floor")
  return 0


if __name__ == "__main__":
  app.run(main)
