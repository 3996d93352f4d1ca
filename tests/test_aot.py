"""TPU slice table, out-of-memory message parsing and MFU arithmetic of ``videoldm_jax/aot.py``; compile-only
devices from libtpu (gated on libtpu, which the ``dev`` extra installs on x86_64 Linux)."""

import pytest

from videoldm_jax import aot

needs_libtpu = pytest.mark.skipif(not aot.libtpu_available(), reason="libtpu not installed (pip install 'jax[tpu]')")

GiB = 2**30


# (name, runtime topology name, JAX devices): Cloud TPU docs' slice shapes (v5p-8 = 2x2x1 chips, ...).
SLICES = [("v5p-8", "v5:2x2x1", 4), ("v5p-128", "v5:4x4x4", 64), ("v6e-8", "v6e:2x4", 8),
          ("v6e-256", "v6e:16x16", 256), ("v5e-256", "v5e:16x16", 256), ("v4-32", "v4:2x2x4", 16),
          ("v5litepod-16", "v5e:4x4", 16), ("tpu7x-8", "tpu7x:2x2x1", 8)]


@pytest.mark.parametrize("name,runtime,devices", SLICES)
def test_slice_table(name, runtime, devices):
  t = aot.topology(name)
  assert (t.topology_name, t.num_devices) == (runtime, devices)


def test_torus_wraparound():
  assert aot.topology("v5p-128").wrap == (True, True, True)   # a full 4x4x4 cube
  assert aot.topology("v5p-64").wrap == (False, False, False)
  assert aot.topology("v6e-256").wrap == (True, True, False)  # 2D: the 16-chip edges wrap


def test_unknown_slices_are_refused_with_the_known_sizes():
  with pytest.raises(ValueError, match=r"v5p sizes known here are \[8, 16, 32"):
    aot.topology("v5p-12")
  with pytest.raises(ValueError, match="generation in"):
    aot.topology("v9-8")
  assert aot.known_topologies("v6e")[:3] == ["v6e-1", "v6e-4", "v6e-8"]


def test_chip_numbers():
  # Peak bf16 TFLOP/s per chip from the Cloud TPU docs; TPU7x exposes two devices per chip.
  assert {g: c.peak_bf16_flops * c.devices_per_chip / 1e12 for g, c in aot.CHIPS.items()} == \
      {"v4": 275, "v5e": 197, "v5p": 459, "v6e": 918, "tpu7x": 2307}
  assert aot.CHIPS["v5p"].hbm_bytes == int(95.74 * GiB) and aot.CHIPS["v6e"].hbm_bytes == int(31.25 * GiB)


def test_parse_oom_messages():
  # Messages as libtpu prints them (the first verified with libtpu 0.0.42 on a compile-only v5p-8).
  temp = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (512.00G) "
          "exceeds available HBM (95.74G).")
  assert aot.parse_oom(temp) == (512 * GiB, int(95.74 * GiB))
  used = "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Used 33.27G of 30.75G hbm. Exceeded hbm capacity by 2.52G."
  assert aot.parse_oom(used) == (int(33.27 * GiB), int(30.75 * GiB))
  assert aot.parse_oom("INVALID_ARGUMENT: something else") is None
  assert aot.is_oom(temp) and not aot.is_oom("INVALID_ARGUMENT: shapes")


def test_report_summary_and_mfu():
  r = aot.CompileReport(topology="v5p-8", num_slices=1, num_devices=4, fits=True, hbm_bytes=int(95.74 * GiB),
                        peak_bytes=10 * GiB, flops=300e12, model_flops=229.5e12, compiler_seconds=1.0,
                        peak_flops=459e12)
  assert r.mfu == pytest.approx(0.5)  # model FLOPs, not the (recomputing) program's
  assert "fits: peak 10.00 of 95.74 GiB" in r.summary() and "MFU 50.0%" in r.summary()
  oom = aot.CompileReport(topology="v6e-8", num_slices=1, num_devices=8, fits=False, hbm_bytes=int(31.25 * GiB),
                          needed_bytes=40 * GiB)
  assert oom.summary() == "does not fit: needs 40.00 of 31.25 GiB per device"
  assert aot.mfu(None, 1.0, 1.0) is None and aot.mfu(1.0, None, 1.0) is None


@needs_libtpu
@pytest.mark.parametrize("name,num_slices", [("v5p-8", 1), ("v6e-8", 1), ("v5p-128", 1), ("v6e-256", 2)])
def test_compile_only_devices(name, num_slices):
  devices = aot.topology_devices(name, num_slices)
  t = aot.topology(name)
  assert len(devices) == t.num_devices * num_slices
  assert {d.device_kind for d in devices} == {t.chip.device_kind}
  assert {getattr(d, "slice_index", 0) for d in devices} == set(range(num_slices))
