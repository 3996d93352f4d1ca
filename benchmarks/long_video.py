r"""Where the long-video pipeline spends its time: the chain's closing videos (``sample --pipeline``) of a trained
chain workdir, timed step by step.

  python benchmarks/long_video.py --workdir=/tmp/videoldm_rds [--seconds=32] [--num_samples=2] [--repeat=1]

Each repeat runs the pipeline twice, side by side: with the steps one after the other (``overlap`` false: the
per-step breakdown is only meaningful then) and as the sampler runs by default, each step in its own thread
(``overlap`` true). Prints one JSON object per run: wall seconds in all and per pipeline step (each step's own time:
the time its chunks took to come minus what the step before it took; ``write`` is the mp4 / gif / contact-sheet
encoding), the XLA compiles (count and seconds, per jitted function name), frames made and frames/s, and after
each pair ``overlap_speedup`` (sequential wall / overlapped wall). Each run builds its steps again, so every run
pays the compiles.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout first
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from videoldm_jax import pipeline, sampling, workdirs  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "a trained chain workdir (every pipeline stage finished)")
flags.DEFINE_float("seconds", None, "video length (default: the chain's sample_seconds)")
flags.DEFINE_integer("num_samples", 2, "videos (the chain's closing call makes config.sample_videos)")
flags.DEFINE_integer("repeat", 1, "runs")
flags.DEFINE_string("output", "", "output prefix (default: a temporary folder)")
flags.DEFINE_integer("num_windows", None, "key-frame windows instead of --seconds")
flags.DEFINE_integer("steps", None, "DDIM steps of every stage (default: each stage's own)")
flags.DEFINE_list("skip", None, "pipeline stages left out (default: the chain's sample_skip)")


class CompileLog(logging.Handler):
  """Collects jax's "Finished XLA compilation of NAME in S sec" records (``jax_log_compiles``)."""

  def __init__(self):
    super().__init__()
    self.records = []

  def emit(self, record):
    m = re.search(r"Finished XLA compilation of (.*?) in ([0-9.eE+-]+) sec", record.getMessage())
    if m:
      self.records.append((m.group(1), float(m.group(2))))


class _Bar:
  """Stands in for a step's progress bar: carries the step's description to :func:`_timed_counted`."""

  def __init__(self, total, desc):
    self.total, self.desc, self.n = total, desc, 0

  def update(self, n):
    self.n += n

  def close(self):
    pass


def _bar(ctx, total, desc):
  b = _Bar(total, desc)
  ctx.bars.append(b)
  return b


def _timed_counted(totals):
  """A ``pipeline._counted`` that also adds the time each chunk took to arrive to ``totals[bar description]``."""
  original = pipeline._counted  # pylint: disable=protected-access

  def counted(chunks, bar):
    name = bar.desc

    def timed():
      it = iter(chunks)
      while True:
        t0 = time.perf_counter()
        try:
          chunk = next(it)
        except StopIteration:
          totals[name] += time.perf_counter() - t0
          return
        totals[name] += time.perf_counter() - t0
        yield chunk

    return original(timed(), bar)

  return counted


def profile_once(workdir: str, seconds, num_samples: int, output: str, *, num_windows=None, steps=None, skip=None,
                 overlap=False):
  run = workdirs.load_run_config(workdir)
  seconds = None if num_windows else (seconds or run.get("sample_seconds") or None)
  skip = tuple(run.get("sample_skip") or ()) if skip is None else tuple(skip)
  inclusive = collections.OrderedDict()
  totals = collections.defaultdict(float)
  log = CompileLog()
  logging.getLogger("jax").addHandler(log)
  # pylint: disable=protected-access
  original, original_bar, original_run = pipeline._counted, pipeline.Context.bar, pipeline.run
  marks = {}

  def run_marked(*args, **kwargs):  # the steps are built (models loaded) before; eager steps run inside
    marks["run"] = time.perf_counter()
    stream = original_run(*args, **kwargs)
    marks["eager"] = time.perf_counter() - marks["run"]
    return stream

  pipeline._counted = _timed_counted(totals)
  pipeline.Context.bar, pipeline.run = _bar, run_marked
  t0 = time.perf_counter()
  try:
    out = sampling.sample_pipeline(workdir, num_samples=num_samples, seconds=seconds, output=output,
                                   skip=skip, keep_videos=False, num_windows=num_windows, steps=steps,
                                   overlap=overlap)
  finally:
    pipeline._counted, pipeline.Context.bar, pipeline.run = original, original_bar, original_run
    logging.getLogger("jax").removeHandler(log)
  wall = time.perf_counter() - t0
  # Each step's chunks pull the step before it: its inclusive time minus the previous one's is its own.
  own, previous = {}, 0.0
  for name, t in totals.items():
    inclusive[name] = t
    own[name] = round(t - previous, 2)
    previous = t
  compiles = collections.defaultdict(lambda: [0, 0.0])
  for name, s in log.records:
    compiles[name][0] += 1
    compiles[name][1] += s
  return {
      "overlap": overlap, "seconds_of_video": seconds, "videos": num_samples, "frames": int(out["num_frames"]),
      "fps": float(out["fps"]), "wall_seconds": round(wall, 2),
      "frames_per_second": round(num_samples * int(out["num_frames"]) / wall, 3),
      "load_seconds": round(marks["run"] - t0, 2), "first_window_seconds": round(marks["eager"], 2),
      "steps_seconds": own, "write_seconds": round(wall - (marks["run"] - t0) - marks["eager"] - previous, 2),
      "compiles": {"count": len(log.records), "seconds": round(sum(s for _, s in log.records), 2),
                   "by_function": {k: {"count": c, "seconds": round(s, 2)}
                                   for k, (c, s) in sorted(compiles.items(), key=lambda kv: -kv[1][1])}},
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  jax.config.update("jax_log_compiles", True)
  logging.getLogger("jax").setLevel(logging.WARNING)
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(FLAGS.repeat):
      for overlap in (False, True):
        output = FLAGS.output or os.path.join(tmp, f"run{i}")
        results.append(profile_once(FLAGS.workdir, FLAGS.seconds, FLAGS.num_samples, output,
                                    num_windows=FLAGS.num_windows, steps=FLAGS.steps, skip=FLAGS.skip,
                                    overlap=overlap))
        print(json.dumps(results[-1]), flush=True)
      print(json.dumps({"overlap_speedup": round(results[-2]["wall_seconds"] / results[-1]["wall_seconds"], 3)}),
            flush=True)
  return 0


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
