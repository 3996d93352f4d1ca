r"""The full-size planner table (README "Training on Cloud TPU"): each run of configs/tpu.py compiled for TPU slices
on this machine (compile-only devices; needs libtpu), one planner process per row, run one after the other.

  python benchmarks/plan_table.py                        # every row of ROWS (each SD-sized compile takes minutes)
  python benchmarks/plan_table.py --rows=t2v_sd15:v5p     # rows whose "run:chip" starts with this
  python benchmarks/plan_table.py --json=/tmp/plans.json  # also keep the planner's JSON per row

Per row: the run's plan for that chip (configs/tpu.py PLANS: per-device batch, mesh preset, remat policy, bf16
compute, frozen backbone in bf16, pre-encoded latents) on the smallest slice of the generation; the per-device
numbers do not depend on the slice size for the "dp" preset (parameters replicated). ``slice for batch`` is the
slice that gives the run's global batch at that per-device batch. MFU = model FLOPs / (compiler's estimated step
time x peak bf16 FLOP/s): an estimate, not a measurement.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import tpu  # noqa: E402  pylint: disable=g-import-not-at-top
from videoldm_jax import aot  # noqa: E402  pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_string("rows", "", "comma-separated prefixes of run:topology")
flags.DEFINE_string("json", "", "write every row's planner JSON here")

ROWS = [("t2v_sd15", "v5p-8"), ("t2v_sd15", "v6e-8"), ("t2v_sd21", "v5p-8"), ("t2v_sd21", "v6e-8"),
        ("rds_image", "v5p-8"), ("rds_image", "v6e-8"), ("rds_base", "v5p-8"), ("rds_base", "v6e-8"),
        ("rds_predictor", "v5p-8"), ("rds_predictor", "v6e-8"), ("rds_interpolator", "v5p-8"),
        ("rds_interpolator", "v6e-8")]


def plan_row(run: str, topology: str, extra: Optional[List[str]] = None) -> Dict[str, Any]:
  """Runs the planner for one row in its own process; returns its JSON (plus wall seconds)."""
  chip = aot.topology(topology).chip.generation
  pdb = tpu.PLANS[(run, tpu.SIMILAR.get(chip, chip))]["per_device_batch"]
  cmd = [sys.executable, "-m", "videoldm_jax.plan", f"--config=configs/tpu.py:run={run},chip={chip}",
         f"--topology={topology}", f"--per_device_batch={pdb}", "--json", *(extra or [])]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  t0 = time.time()
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
  if out.returncode not in (0, 1) or not out.stdout.strip():
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
  result = json.loads(out.stdout)
  result["wall_seconds"] = time.time() - t0
  result["command"] = " ".join(cmd[1:])
  return result


def slice_for_batch(run: str, topology: str, per_device_batch: int) -> str:
  """The smallest slice of ``topology``'s generation whose data-parallel size gives the run's global batch."""
  gen = aot.topology(topology).chip.generation
  devices = tpu.get_config(f"run={run},chip={gen}").batch_size // per_device_batch
  for name in aot.known_topologies(gen):
    if aot.topology(name).num_devices >= devices:
      return name
  return f"> {aot.known_topologies(gen)[-1]}"


def format_row(run: str, result: Dict[str, Any]) -> str:
  p = result["plans"][0]
  r = p["report"]
  peak = (r["peak_bytes"] if r["fits"] else r["needed_bytes"] or 0) / aot.GiB
  flops = "-" if r["useful_flops"] is None else f"{r['useful_flops'] / 1e12:.2f}"
  step = "-" if r["compiler_seconds"] is None else f"{r['compiler_seconds'] * 1e3:.0f}"
  mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
  return (f"| {run} | {r['topology']} | {'yes' if r['fits'] else 'no'} | {p['per_device_batch']} | {p['rules']} | "
          f"{p['remat']} | {peak:.1f} / {r['hbm_bytes'] / aot.GiB:.1f} | {flops} | {step} | {mfu} | "
          f"{slice_for_batch(run, r['topology'], p['per_device_batch'])} |")


HEADER = ("| run | slice | fits | batch/device | mesh | remat | peak / HBM GiB | TFLOP/step/device | est. ms/step | "
          "est. MFU | slice for the global batch |\n|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  args = FLAGS
  prefixes = [p for p in args.rows.split(",") if p]
  rows = list(ROWS) if not prefixes else [  # in the order of --rows
      row for p in prefixes for row in ROWS if f"{row[0]}:{row[1]}".startswith(p)]
  rows = list(dict.fromkeys(rows))
  print(HEADER, flush=True)
  results = {}
  for run, topology in rows:
    res = plan_row(run, topology)
    results[f"{run}:{topology}"] = res
    print(format_row(run, res) + f"  <!-- {res['wall_seconds']:.0f} s -->", flush=True)
    if args.json:
      with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
  return 0


if __name__ == "__main__":
  app.run(main)
