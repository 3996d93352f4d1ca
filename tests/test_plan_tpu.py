"""The planner compiles the real ``base`` train step (tiny runlocal model) for compile-only TPU slices on this CPU
host: it fits on v5p-8 and v6e-8 with sane per-device numbers, and an absurd batch is reported as "does not fit"
with the compiler's sizes instead of raising; the command line prints parseable JSON, plans a stage of a chain
config and exits non-zero when nothing fits. Gated on libtpu (installed by the ``dev`` extra on x86_64 Linux)."""

import dataclasses
import json
import os
import subprocess
import sys
from concurrent import futures

import pytest

from configs import rds
from videoldm_jax import aot, plan, tasks

pytestmark = pytest.mark.skipif(not aot.libtpu_available(), reason="libtpu not installed (pip install 'jax[tpu]')")

GiB = 2**30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {"v5p-8": dict(topology="v5p-8", per_device_batch=2), "v6e-8": dict(topology="v6e-8", per_device_batch=1)}


def _config():
  config = rds.get_config("stage=base,runlocal")
  config.dtype = "bfloat16"
  return config


# Command lines: a stage of the runlocal rds chain (fits), and the same with an absurd batch (does not fit; the
# planner's report of it is checked through the JSON, which is the report's ``to_dict``).
CLI = {
    "chain_stage": ["--config=configs/rds.py:runlocal", "--stage=base", "--topology=v5p-8", "--json"],
    "absurd": ["--config=configs/rds.py:stage=base,runlocal", "--topology=v6e-8", f"--per_device_batch={1 << 17}",
               "--json", "--config.dtype=bfloat16"],
}


def _cli(args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # no fake CPU devices needed: the devices are the TPU topology's
  return subprocess.run([sys.executable, "-m", "videoldm_jax.plan", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=900)


@pytest.fixture(scope="module")
def runs():
  tasks.get("base")  # register the stage before the worker threads look it up
  # The TPU compiles dominate this file's time: run them side by side (the compiler releases the GIL; the command
  # lines are processes of their own).
  with futures.ThreadPoolExecutor(len(CASES) + len(CLI)) as pool:
    jobs = {k: pool.submit(plan.plan_on_topology, _config(), **v) for k, v in CASES.items()}
    cli = {k: pool.submit(_cli, v) for k, v in CLI.items()}
    return {k: j.result() for k, j in jobs.items()}, {k: j.result() for k, j in cli.items()}


@pytest.fixture(scope="module")
def plans(runs):
  return runs[0]


@pytest.mark.parametrize("name", ["v5p-8", "v6e-8"])
def test_tiny_base_step_fits(plans, name):
  p = plans[name]
  r = p.report
  chip = aot.topology(name).chip
  assert r.fits, r.summary()
  assert r.num_devices == aot.topology(name).num_devices
  assert p.mesh == {"data": r.num_devices, "fsdp": 1, "tensor": 1}
  assert p.label == f"base b{CASES[name]['per_device_batch']}/dev remat=none fsdp" and p.remat == "none"
  assert p.global_batch == CASES[name]["per_device_batch"] * r.num_devices
  assert r.hbm_bytes == chip.hbm_bytes and 0 < r.peak_bytes < 1 * GiB
  assert r.argument_bytes > 0 and r.temp_bytes >= 0
  # Donated state: the updated train state aliases its input buffers.
  assert r.alias_bytes > 0
  # The compiled per-device FLOPs and the model FLOPs (unpartitioned count / devices) agree closely without
  # remat: both count the same convolutions and matmuls.
  assert r.flops > 0 and r.model_flops > 0
  assert 0.8 < r.flops / r.model_flops < 1.25, (r.flops, r.model_flops)
  if r.compiler_seconds is not None:
    assert 0 < r.mfu <= 1.0
  assert r.summary().startswith("fits: peak ")
  assert p.label in plan.format_plans([p])
  # What the estimate covers: the attention the U-Net compiled with, and no Pallas kernel left out of it.
  assert p.attention == "auto" and r.pallas_kernels == 0 and "Pallas" not in r.summary()


def test_pallas_roofline_term_is_added_and_labelled(plans):
  base = plans["v5p-8"].report
  assert base.compiler_seconds is not None and base.pallas_seconds is None
  chip = aot.CHIPS["v5p"]
  attention = aot.kernel_cost('  %splash_mha_fwd_residuals.3 = (bf16[2,4,2048,128]{3,2,1,0}) custom-call(%a, %b), '
                              'custom_call_target="tpu_custom_call", operand_layout_constraints={s8[1,4,4]{2,1,0}, '
                              'bf16[2,4,2048,128]{3,2,1,0}, bf16[2,4,1024,128]{3,2,1,0}, bf16[2,4,1024,128]{3,2,1,0}}, '
                              'backend_config={}')
  assert attention.source == "shapes" and attention.flops == 2 * 2 * 2 * 4 * 2048 * 1024 * 128
  assert attention.bytes == 2 * (2 * 4 * 2048 * 128 * 2) + 2 * 2 * 4 * 1024 * 128 * 2 + 16
  # Sequence-minor q / k ([b, h, d, n]) with a 40-dim head: the head is the shorter dim, run in a 128-lane tile.
  seq_minor = aot.kernel_cost('%splash_mha_dkv_no_residuals = (bf16[2,1,4,2048,40]{4,3,2,1,0}, bf16[2,4,1024,40]) '
                              'custom-call(%a), custom_call_target="tpu_custom_call", operand_layout_constraints={'
                              'bf16[2,4,40,2048]{3,2,1,0}, bf16[2,4,40,1024]{3,2,1,0}}, backend_config={}')
  assert seq_minor.source == "shapes" and seq_minor.flops == 2 * 5 * 2 * 4 * 2048 * 1024 * 128
  own = aot.kernel_cost('%k = f32[8]{0} custom-call(%a), custom_call_target="tpu_custom_call", backend_config='
                        '{"custom_call_config":{"body":"x","cost_estimate":{"flops": 5e12, "transcendentals": 0, '
                        '"bytes_accessed": 1e9}}}')
  assert (own.source, own.flops, own.bytes) == ("kernel", 5e12, 1e9)
  unknown = aot.kernel_cost('%my_kernel.1 = f32[8]{0} custom-call(%a), custom_call_target="tpu_custom_call"')
  assert unknown.source == "unknown" and unknown.seconds(chip) is None

  r = dataclasses.replace(base)
  aot.add_pallas_roofline(r, [attention, own, unknown], chip)
  term = max(attention.flops / chip.peak_bf16_flops, attention.bytes / chip.hbm_bytes_per_second) + 5e12 / 459e12
  assert r.pallas_kernels == 3 and r.pallas_uncosted == 1 and abs(r.pallas_seconds - term) < 1e-12
  assert r.estimated_seconds == r.compiler_seconds + r.pallas_seconds
  assert abs(r.mfu - r.useful_flops / (r.estimated_seconds * chip.peak_bf16_flops)) < 1e-12 and r.mfu < base.mfu
  summary = r.summary()
  assert f"est. {r.estimated_seconds * 1e3:.1f} ms/step ({r.pallas_seconds * 1e3:.1f} ms of it a roofline term for " \
      "2 Pallas kernel(s))" in summary
  assert summary.endswith("(estimate leaves out 1 Pallas kernel(s) of unknown cost)")
  d = r.to_dict()
  assert d["roofline_term_added"] is True and d["estimated_seconds"] == r.estimated_seconds
  assert base.to_dict()["roofline_term_added"] is False and base.estimated_seconds == base.compiler_seconds


def test_flops_scale_with_the_batch(plans):
  # Same model, per-device batch 2 vs 1 and twice as many devices on v6e-8: per-device model FLOPs of v5p-8 (2
  # clips per device) are about twice those of v6e-8 (1 clip per device).
  ratio = plans["v5p-8"].report.model_flops / plans["v6e-8"].report.model_flops
  assert 1.8 < ratio < 2.2, ratio


def test_cli_plans_a_chain_stage_as_json(runs):
  out = runs[1]["chain_stage"]
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout)
  assert result["fits"] is True and list(result["stages"]) == ["base"]
  best = result["stages"]["base"]["best"]
  assert best["report"]["fits"] and best["report"]["topology"] == "v5p-8"
  assert 0 < best["report"]["peak_bytes"] < best["report"]["hbm_bytes"]
  assert best["report"]["model_flops"] > 0 and best["report"]["summary"].startswith("fits: peak ")
  assert best["attention"] == "auto"
  assert best["report"]["pallas_kernels"] == 0 and best["report"]["roofline_term_added"] is False


def test_cli_absurd_batch_exits_nonzero_with_sizes(runs):
  out = runs[1]["absurd"]
  assert out.returncode == 1, (out.returncode, out.stderr[-3000:])
  assert "Traceback" not in out.stderr
  result = json.loads(out.stdout)
  assert result["fits"] is False and result["best"] is None
  report = result["plans"][0]["report"]
  assert report["fits"] is False and report["needed_bytes"] > report["hbm_bytes"] == aot.CHIPS["v6e"].hbm_bytes
  assert report["summary"] == f"does not fit: needs {report['needed_bytes'] / GiB:.2f} of 31.25 GiB per device"
