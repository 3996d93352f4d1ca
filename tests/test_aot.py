"""``videoldm_jax/aot.py``: TPU slice names -> chips, grids and devices (checked against libtpu's own compile-only
topologies where libtpu is installed, as the ``dev`` extra does on x86_64 Linux), out-of-memory messages as the TPU
compiler prints them, and FLOPs / MFU of a real compiled program."""

import math

import jax
import jax.numpy as jnp
import pytest

from videoldm_jax import aot

needs_libtpu = pytest.mark.skipif(not aot.libtpu_available(), reason="libtpu not installed (pip install 'jax[tpu]')")

GiB, MiB = 2**30, 2**20

# Cloud TPU naming: the number in a slice name counts TensorCores for v4, v5p and TPU7x (two per chip) and chips
# for v5e and v6e. JAX sees one device per chip, except on TPU7x, whose two TensorCores are two devices (v4 / v5p
# fuse theirs into one megacore device). v4 / v5p / TPU7x slices are 3-D tori, v5e / v6e 2-D grids.
CORES_IN_NAME = {"v4": 2, "v5p": 2, "tpu7x": 2, "v5e": 1, "v6e": 1}
DEVICES_PER_CHIP = {"v4": 1, "v5p": 1, "tpu7x": 2, "v5e": 1, "v6e": 1}
GRID_RANK = {"v4": 3, "v5p": 3, "tpu7x": 3, "v5e": 2, "v6e": 2}
ALL_SLICES = [name for gen in CORES_IN_NAME for name in aot.known_topologies(gen)]


def _chips_from_name(name: str) -> int:
  gen, _, size = name.rpartition("-")
  return int(size) // CORES_IN_NAME[gen]


@pytest.mark.parametrize("gen", sorted(CORES_IN_NAME))
def test_slice_names_give_chips_grids_and_devices(gen):
  names = aot.known_topologies(gen)
  assert names and all(name.startswith(f"{gen}-") for name in names)
  sizes = [int(n.rpartition("-")[2]) for n in names]
  assert sizes == sorted(set(sizes))  # smallest first, no repeats
  for name in names:
    t = aot.topology(name)
    chips = _chips_from_name(name)
    assert t.name == name and t.chip.generation == gen
    assert t.num_chips == math.prod(t.shape) == chips, name
    assert t.num_devices == chips * DEVICES_PER_CHIP[gen], name
    assert len(t.shape) == GRID_RANK[gen], name
    # Near-cubic grids of powers of two (a 4x4x4 cube, not 1x1x64), named as the runtime expects.
    assert all(s & (s - 1) == 0 for s in t.shape) and (max(t.shape) <= 2 * min(t.shape) or chips < 4), t.shape
    assert t.topology_name.endswith(":" + "x".join(map(str, t.shape))), t.topology_name


def test_documented_slices_and_spellings():
  # Cloud TPU docs: v5p-8 is 4 chips 2x2x1, v5p-128 a 4x4x4 cube, v6e-256 a 16x16 pod, v4-32 2x2x4.
  assert aot.topology("v5p-8").shape == (2, 2, 1) and aot.topology("v5p-128").shape == (4, 4, 4)
  assert aot.topology("v6e-256").shape == (16, 16) and aot.topology("v4-32").shape == (2, 2, 4)
  assert aot.topology("v5litepod-16") == aot.topology("v5e-16") == aot.topology(" V5E-16 ")
  assert aot.topology("v7x-8") == aot.topology("tpu7x-8")
  assert aot.topology("v5p-8").topology_name == "v5:2x2x1"  # the runtime calls v5p "v5"


def test_torus_wraparound():
  assert aot.topology("v5p-128").wrap == (True, True, True)   # a full 4x4x4 cube
  assert aot.topology("v5p-64").wrap == (False, False, False)
  assert aot.topology("v6e-256").wrap == (True, True, False)  # 2D: the 16-chip edges wrap


def test_unknown_slices_are_refused_with_the_known_sizes():
  with pytest.raises(ValueError, match=r"v5p sizes known here are \[8, 16, 32"):
    aot.topology("v5p-12")
  with pytest.raises(ValueError, match=r"'v9-8'.*generation in"):
    aot.topology("v9-8")
  with pytest.raises(ValueError, match="'v5p'"):
    aot.topology("v5p")


@needs_libtpu
def test_libtpu_agrees_on_chips_and_devices_of_every_slice():
  """libtpu's compile-only description of each slice: as many devices, on as many distinct chips (coordinates), with
  as many devices per chip, as the slice name says."""
  for name in ALL_SLICES:
    t = aot.topology(name)
    devices = aot.topology_devices(name)
    gen = t.chip.generation
    assert len(devices) == _chips_from_name(name) * DEVICES_PER_CHIP[gen], name
    assert len({tuple(d.coords) for d in devices}) == _chips_from_name(name), name
    assert len({d.core_on_chip for d in devices}) == DEVICES_PER_CHIP[gen], name
    assert {d.device_kind for d in devices} == {t.chip.device_kind}, name


@needs_libtpu
@pytest.mark.parametrize("name,num_slices", [("v5p-8", 1), ("v6e-256", 2)])
def test_multislice_devices(name, num_slices):
  devices = aot.topology_devices(name, num_slices)
  assert len(devices) == aot.topology(name).num_devices * num_slices
  assert {getattr(d, "slice_index", 0) for d in devices} == set(range(num_slices))  # absent on one slice


# ---------------------------------------------------------------------------------------------------------------
# Out of memory: messages laid out as libtpu prints them (first line, then the usage breakdown).

HBM_OOM = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 40.50G of "
           "31.25G hbm. Exceeded hbm capacity by 9.25G.\n" + """
Total hbm usage >= 41.75G:
    reserved          1.25G
    program          40.50G
    arguments            0B

Output size 0B; shares 0B with arguments.

Program hbm requirement 40.50G:
    global           12.00M
    scoped            3.50M
    HLO temp         40.48G (100.0% utilization: Unpadded (40.40G) Padded (40.40G), 0.2% fragmentation (80.00M))
""")
TEMP_OOM = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (512.00M) "
            "exceeds available HBM (384.00M).\n  Largest program allocations in hbm: ...")
VMEM_OOM = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space vmem. Used 32.42M "
            "of 16.00M vmem. Exceeded vmem capacity by 16.42M.")


def test_parse_oom_reads_the_sizes_not_the_breakdown():
  assert aot.parse_oom(HBM_OOM) == (int(40.50 * GiB), int(31.25 * GiB))  # not "Total hbm usage >= 41.75G"
  assert aot.parse_oom(TEMP_OOM) == (512 * MiB, 384 * MiB)
  assert aot.parse_oom(VMEM_OOM) is None  # vector memory, not HBM: no HBM sizes to report
  assert aot.parse_oom("INVALID_ARGUMENT: something else") is None
  assert aot.is_oom(HBM_OOM) and aot.is_oom(VMEM_OOM) and not aot.is_oom("INVALID_ARGUMENT: shapes")


class _FailingLowered:
  """Stands in for a ``jax.stages.Lowered`` whose compile fails with ``message``."""

  def __init__(self, message):
    self.message = message

  def compile(self, compiler_options=None):
    raise RuntimeError(self.message)


def test_compile_report_turns_oom_into_does_not_fit():
  r = aot.compile_report(_FailingLowered(HBM_OOM), "v6e-8")
  assert not r.fits and (r.needed_bytes, r.hbm_bytes) == (int(40.50 * GiB), int(31.25 * GiB))
  assert r.error.startswith("RESOURCE_EXHAUSTED") and "\n" not in r.error
  assert r.summary() == "does not fit: needs 40.50 of 31.25 GiB per device"
  r = aot.compile_report(_FailingLowered(VMEM_OOM), "v6e-8")
  assert not r.fits and r.needed_bytes is None and r.summary() == f"does not fit: {VMEM_OOM}"
  with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):  # other compile errors are not swallowed
    aot.compile_report(_FailingLowered("INVALID_ARGUMENT: bad sharding"), "v6e-8")


# ---------------------------------------------------------------------------------------------------------------
# FLOPs and MFU.

def test_flops_and_mfu_of_a_compiled_matmul():
  """A real compile (here for the CPU): the program's FLOPs are the matmul's 2mnk, and MFU is model FLOPs over
  step time x the chip's peak, computed by hand."""
  m, n, k = 64, 48, 32
  lowered = jax.jit(lambda a, b: a @ b).lower(jax.ShapeDtypeStruct((m, k), jnp.float32),
                                              jax.ShapeDtypeStruct((k, n), jnp.float32))
  r = aot.compile_report(lowered, "v5p-8")
  assert r.fits and r.flops == 2 * m * n * k
  assert r.peak_bytes >= 4 * (m * k + k * n + m * n)  # both operands and the result are live
  assert r.compiler_seconds is None and r.mfu is None  # the CPU compiler gives no step-time estimate
  r.compiler_seconds = 1e-9
  assert r.mfu == pytest.approx(2 * m * n * k / (1e-9 * r.peak_flops))
  r.model_flops = m * n * k  # a model count below the program's (which recomputes) is what MFU uses
  assert r.mfu == pytest.approx(m * n * k / (1e-9 * r.peak_flops))
  assert f"MFU {100 * r.mfu:.1f}%" in r.summary()
  assert aot.mfu(None, 1.0, 1.0) is None and aot.mfu(1.0, None, 1.0) is None and aot.mfu(1.0, 0.0, 1.0) is None


def test_report_summary():
  r = aot.CompileReport(topology="v5p-8", num_slices=1, num_devices=4, fits=True, hbm_bytes=96 * GiB,
                        peak_bytes=10 * GiB, model_flops=2e12, compiler_seconds=0.05, peak_flops=400e12)
  # 2 TFLOP in 50 ms on a 400 TFLOP/s device: 40 TFLOP/s, 10% of peak.
  assert r.summary() == "fits: peak 10.00 of 96.00 GiB per device, 2 TFLOP/step/device, est. 50.0 ms/step, MFU 10.0%"
  assert r.to_dict()["mfu"] == pytest.approx(0.1)
