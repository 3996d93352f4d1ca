"""Ahead-of-time compilation for Cloud TPU slices on any host (a CPU laptop or CI runner included).

With ``libtpu`` installed (``pip install "jax[tpu]"``, x86_64 Linux), JAX can describe a TPU slice it does not have:
``jax.experimental.topologies.get_topology_desc`` returns *compile-only* devices, a ``jax.jit(...).lower(...)`` on
abstract inputs sharded over them compiles with the real TPU compiler, and the compiled program reports its
per-device memory (``memory_analysis``), its FLOPs and the compiler's own step-time estimate (``cost_analysis``:
``flops``, ``optimal_seconds``). A program that does not fit in HBM fails to compile with ``RESOURCE_EXHAUSTED``;
:func:`compile_report` turns that into "does not fit: needs X of Y GiB" instead of a traceback.

This module knows TPU slice names (``v5p-128``, ``v6e-256``, ...), the chips' peak bf16 FLOP/s and HBM (``CHIPS``,
with sources), and computes model-FLOPs utilisation (MFU) from the compiler's numbers. It is independent of the
model: ``plan.py`` builds the train step and calls it.

Conventions: one JAX *device* is what the compiler partitions over: one chip on v4 / v5p (megacore), v5e and v6e;
one TensorCore (half a chip) on TPU7x. FLOP/s and HBM below are per device. ``cost_analysis()['flops']`` is per
device too (the SPMD program of one partition).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

GiB = 2**30


# ---------------------------------------------------------------------------------------------------------------
# Chips.
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-device numbers of one TPU generation.

  ``hbm_bytes`` is the HBM the compiler lets a program use (what it prints in its out-of-memory message), a little
  under the nominal chip capacity.
  """
  generation: str
  device_kind: str             # jax ``Device.device_kind`` of its devices
  peak_bf16_flops: float       # per device
  hbm_bytes: int               # per device, usable
  devices_per_chip: int
  source: str
  hbm_bytes_per_second: float = 0.0  # per device: the roofline term for Pallas kernels (see pallas_kernels)


CHIPS: Dict[str, Chip] = {c.generation: c for c in (
    Chip("v4", "TPU v4", 275e12, int(30.75 * GiB), 1,
         "cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM and 1228 GB/s per chip (one megacore device)",
         1228e9),
    Chip("v5e", "TPU v5 lite", 197e12, int(15.75 * GiB), 1,
         "cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GB HBM and 819 GB/s per chip", 819e9),
    Chip("v5p", "TPU v5", 459e12, int(95.74 * GiB), 1,
         "cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB HBM and 2765 GB/s per chip (one megacore device)",
         2765e9),
    Chip("v6e", "TPU v6 lite", 918e12, int(31.25 * GiB), 1,
         "cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GB HBM and 1640 GB/s per chip", 1640e9),
    Chip("tpu7x", "TPU7x", 2307e12 / 2, int(94.75 * GiB), 2,
         "cloud.google.com/tpu/docs/tpu7x: 2307 TFLOP/s bf16, 192 GiB HBM and 7380 GB/s per chip, two TensorCores "
         "(devices)", 7380e9 / 2),
)}
# Usable HBM: the limits libtpu 0.0.42 prints when a compile-only program overflows ("exceeds available HBM").


# ---------------------------------------------------------------------------------------------------------------
# Slices.
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice type as ``gcloud`` names it (``v5p-128``) and as the TPU runtime describes it."""
  name: str
  chip: Chip
  shape: Tuple[int, ...]           # chips per dimension
  chip_config: str                 # "megacore" (v4, v5p) or "default"
  wrap: Tuple[bool, bool, bool]    # torus wrap-around per dimension
  host_bounds: Tuple[int, int, int]

  @property
  def num_chips(self) -> int:
    n = 1
    for s in self.shape:
      n *= s
    return n

  @property
  def num_devices(self) -> int:
    return self.num_chips * self.chip.devices_per_chip

  @property
  def topology_name(self) -> str:
    prefix = {"v4": "v4", "v5e": "v5e", "v5p": "v5", "v6e": "v6e", "tpu7x": "tpu7x"}[self.chip.generation]
    return f"{prefix}:{'x'.join(map(str, self.shape))}"


# Chip grids per chip count. 3D tori (v4, v5p, TPU7x) wrap around once every dimension spans a full 4-chip cube
# face; 2D slices (v5e, v6e) wrap only in the dimensions that span the 16-chip pod edge.
_GRID_3D = {1: (1, 1, 1), 4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
            256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16)}
_GRID_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
# Name suffix = TensorCores for v4 / v5p (two per chip), chips for v5e / v6e, TensorCores for TPU7x.
_SUFFIX_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1, "tpu7x": 2}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v7x": "tpu7x"}


def _make(generation: str, chips: int) -> Topology:
  chip = CHIPS[generation]
  if generation in ("v5e", "v6e"):
    shape = _GRID_2D[chips]
    wrap = (shape[0] == 16, shape[1] == 16, False)
    config = "default"
  else:
    shape = _GRID_3D[chips]
    full = all(s >= 4 for s in shape)
    wrap = (full, full, full)
    config = "megacore" if generation in ("v4", "v5p") else "default"
  host = tuple(min(s, b) for s, b in zip(shape + (1,) * (3 - len(shape)), (2, 2, 1)))
  name = f"{generation}-{chips * _SUFFIX_PER_CHIP[generation]}"
  return Topology(name, chip, shape, config, wrap, host)


def topology(name: str) -> Topology:
  """``"v5p-128"`` -> :class:`Topology` (64 chips 4x4x4). Raises ``ValueError`` naming the accepted sizes."""
  gen, _, size = name.strip().lower().rpartition("-")
  gen = _ALIASES.get(gen, gen)
  if gen not in CHIPS or not size.isdigit():
    raise ValueError(f"unknown TPU topology {name!r}: expected <generation>-<size> with generation in "
                     f"{sorted(CHIPS)}, e.g. v5p-128, v6e-256")
  per_chip = _SUFFIX_PER_CHIP[gen]
  grid = _GRID_2D if gen in ("v5e", "v6e") else _GRID_3D
  chips, rem = divmod(int(size), per_chip)
  sizes = [c * per_chip for c in sorted(grid) if (c > 1 or per_chip == 1)]
  if rem or chips not in grid or (chips == 1 and per_chip > 1):
    raise ValueError(f"unknown TPU topology {name!r}: {gen} sizes known here are {sizes}")
  return _make(gen, chips)


def known_topologies(generation: str) -> List[str]:
  """Slice names of one generation, smallest first (``v5p`` -> ``["v5p-8", "v5p-16", ...]``)."""
  per_chip = _SUFFIX_PER_CHIP[generation]
  grid = _GRID_2D if generation in ("v5e", "v6e") else _GRID_3D
  return [f"{generation}-{c * per_chip}" for c in sorted(grid) if c > 1 or per_chip == 1]


def libtpu_available() -> bool:
  """True when the TPU compiler plugin (PyPI ``libtpu``) is importable, i.e. compile-only topologies work."""
  return importlib.util.find_spec("libtpu") is not None


def topology_devices(name: str, num_slices: int = 1) -> List[Any]:
  """Compile-only devices of ``num_slices`` slices of type ``name`` (needs ``libtpu``; no TPU needed).

  Works on a CPU-only host when JAX runs with ``JAX_PLATFORMS=cpu``; ``TPU_SKIP_MDS_QUERY=1`` keeps libtpu from
  asking a (non-existent) GCE metadata server about the local machine. Must run before anything else loads libtpu
  in this process (it sets libtpu's environment).
  """
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) so two processes never drive one TPU; compile-only
  # devices drive nothing, and planners / test runs must be able to run side by side.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if not libtpu_available():
    raise RuntimeError("compiling for a TPU topology needs libtpu: pip install 'jax[tpu]' (x86_64 Linux)")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  topo = topology(name)
  desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.topology_name,
                                      chip_config_name=topo.chip_config, chips_per_host_bounds=topo.host_bounds,
                                      num_slices=int(num_slices), wrap=topo.wrap)
  devices = list(desc.devices)
  expected = topo.num_devices * int(num_slices)
  if len(devices) != expected:
    raise RuntimeError(f"{name} x {num_slices}: libtpu described {len(devices)} devices, expected {expected}")
  return devices


# ---------------------------------------------------------------------------------------------------------------
# Compile and report.
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class CompileReport:
  """What the TPU compiler says about one program on one slice (all byte and FLOP numbers per device)."""
  topology: str
  num_slices: int
  num_devices: int
  fits: bool
  hbm_bytes: int                          # usable HBM per device
  argument_bytes: int = 0
  output_bytes: int = 0
  alias_bytes: int = 0
  temp_bytes: int = 0
  generated_code_bytes: int = 0
  peak_bytes: int = 0                     # the compiler's peak (arguments + live temporaries + code)
  needed_bytes: Optional[int] = None      # when it does not fit: what the compiler asked for
  flops: Optional[float] = None           # per device per step, the compiled program (remat recompute included)
  model_flops: Optional[float] = None     # per device per step, the model's own work (no recompute; see plan.py)
  compiler_seconds: Optional[float] = None  # the compiler's estimated step time ("optimal_seconds")
  peak_flops: float = 0.0                 # per device, bf16
  error: Optional[str] = None             # first line of the compiler's message when it failed
  # Pallas kernels (``tpu_custom_call``) in the compiled step: the compiler's cost model does not see inside them
  # (``compiler_seconds`` and ``flops`` leave them out), so a roofline term from their FLOPs and bytes is added to
  # the step time (``pallas_seconds``, see :func:`pallas_kernels`); ``pallas_uncosted`` of them had no known cost.
  pallas_kernels: int = 0
  pallas_uncosted: int = 0
  pallas_flops: float = 0.0               # per device per step, as the kernels run (head_dim padding included)
  pallas_bytes: float = 0.0
  pallas_seconds: Optional[float] = None  # the roofline term; None without costed kernels

  @property
  def roofline_term_added(self) -> bool:
    return bool(self.pallas_kernels) and self.pallas_seconds is not None

  @property
  def estimated_seconds(self) -> Optional[float]:
    """The compiler's step-time estimate plus the Pallas roofline term."""
    if self.compiler_seconds is None:
      return None
    return self.compiler_seconds + (self.pallas_seconds or 0.0)

  @property
  def useful_flops(self) -> Optional[float]:
    """Model FLOPs when known, else the compiled program's FLOPs."""
    return self.model_flops if self.model_flops is not None else self.flops

  @property
  def mfu(self) -> Optional[float]:
    """Model FLOPs / (estimated step time x peak FLOP/s); None without a step-time estimate."""
    return mfu(self.useful_flops, self.estimated_seconds, self.peak_flops)

  def summary(self) -> str:
    cap = self.hbm_bytes / GiB
    if not self.fits:
      if self.needed_bytes:
        return f"does not fit: needs {self.needed_bytes / GiB:.2f} of {cap:.2f} GiB per device"
      return f"does not fit: {self.error or 'compile failed'}"
    s = f"fits: peak {self.peak_bytes / GiB:.2f} of {cap:.2f} GiB per device"
    if self.useful_flops is not None:
      s += f", {self.useful_flops / 1e12:.3g} TFLOP/step/device"
    if self.estimated_seconds is not None:
      s += f", est. {self.estimated_seconds * 1e3:.1f} ms/step"
      if self.roofline_term_added:
        s += (f" ({self.pallas_seconds * 1e3:.1f} ms of it a roofline term for "
              f"{self.pallas_kernels - self.pallas_uncosted} Pallas kernel(s))")
    if self.mfu is not None:
      s += f", MFU {100 * self.mfu:.1f}%"
    if self.pallas_uncosted:
      s += f" (estimate leaves out {self.pallas_uncosted} Pallas kernel(s) of unknown cost)"
    return s

  def to_dict(self) -> Dict[str, Any]:
    d = dataclasses.asdict(self)
    d.update(useful_flops=self.useful_flops, mfu=self.mfu, summary=self.summary(),
             roofline_term_added=self.roofline_term_added, estimated_seconds=self.estimated_seconds)
    return d


def mfu(flops: Optional[float], seconds: Optional[float], peak_flops: float) -> Optional[float]:
  """FLOPs per device per step over (step seconds x peak FLOP/s per device)."""
  if not flops or not seconds or seconds <= 0 or not peak_flops:
    return None
  return flops / (seconds * peak_flops)


_UNIT = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": GiB, "T": 2**40}
_NUM = r"([0-9.]+)\s*([KMGT]?)i?B?"
_OOM_PATTERNS = (
    # libtpu: "... the total memory required for HLO temporaries (512.00G) exceeds available HBM (95.74G)."
    re.compile(r"\(" + _NUM + r"\)\s*exceeds available HBM\s*\(" + _NUM + r"\)", re.I),
    # libtpu: "Used 33.27G of 30.75G hbm. Exceeded hbm capacity by 2.52G."
    re.compile(r"Used\s+" + _NUM + r"\s+of\s+" + _NUM + r"\s+hbm", re.I),
)


def parse_oom(message: str) -> Optional[Tuple[int, int]]:
  """``(needed_bytes, available_bytes)`` from a TPU compiler out-of-memory message, else None."""
  for rx in _OOM_PATTERNS:
    m = rx.search(message)
    if m:
      return (int(float(m.group(1)) * _UNIT[m.group(2).upper()]),
              int(float(m.group(3)) * _UNIT[m.group(4).upper()]))
  return None


def is_oom(message: str) -> bool:
  return "RESOURCE_EXHAUSTED" in message or parse_oom(message) is not None


def cost_numbers(compiled) -> Tuple[Optional[float], Optional[float]]:
  """``(flops, optimal_seconds)`` from ``compiled.cost_analysis()``; None where the backend gives none."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return None, None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost:
    return None, None
  flops = cost.get("flops")
  seconds = cost.get("optimal_seconds")
  return (float(flops) if flops is not None and flops >= 0 else None,
          float(seconds) if seconds is not None and seconds > 0 else None)


def memory_numbers(compiled) -> Dict[str, int]:
  """Per-device bytes from ``compiled.memory_analysis()`` (empty when the backend has none)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return {}
  if m is None:
    return {}
  out = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
         for k in ("argument", "output", "alias", "temp", "generated_code")}
  peak = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
  # Buffers live at once in the worst case when the compiler gives no peak: maxtext's accounting.
  out["peak"] = peak or (out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"])
  return out


def compiler_options(config, execution_bound: bool = False) -> Optional[Dict[str, Any]]:
  """XLA options for every compile of a run (``config.cpu_fast_compile``: the runlocal CPU smoke runs are dominated
  by compile time, not step time). ``execution_bound``: a function called many times per compile (the long-video
  pipeline's window steps), always fully optimised: at -O0 the tiny chain's 49-frame pipeline sample took 402 s on a
  2-core host, optimised 237 s."""
  import jax  # pylint: disable=g-import-not-at-top  (this module reads topologies without importing jax)
  if config.get("cpu_fast_compile") and not execution_bound and jax.default_backend() == "cpu":
    return {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
  return None


def lower_train_step(train_step, args, state_shardings, frozen_shardings, mesh, rules):
  """``jax.stages.Lowered`` of ``train_step(state, frozen, batch, rng) -> (state, metrics)`` exactly as the train
  loop runs it: state / frozen / batch in their shardings (``args[2]``'s), state donated, metrics replicated,
  the model's logical-axis constraints active. ``args`` may be arrays or sharded ``ShapeDtypeStruct``s."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  batch_sh = jax.tree.map(lambda x: x.sharding, args[2])
  repl = NamedSharding(mesh, PartitionSpec())
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = jax.jit(train_step, in_shardings=(state_shardings, frozen_shardings, batch_sh, repl),
                   out_shardings=(state_shardings, repl), donate_argnums=0)
    return step.lower(*args)


@dataclasses.dataclass
class StepStats:
  """What the compiler reports about a compiled program on the devices it runs on (per device)."""
  memory: Dict[str, int]        # memory_numbers (argument / output / alias / temp / generated_code / peak bytes)
  flops: Optional[float]
  compile_seconds: float


def compile_with_stats(lowered, compiler_options: Optional[Mapping[str, Any]] = None):
  """``(compiled, StepStats)``: compiles ``lowered`` (for the local devices) and reads its memory and FLOPs."""
  import time  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  compiled = lowered.compile(compiler_options=dict(compiler_options)) if compiler_options else lowered.compile()
  return compiled, StepStats(memory=memory_numbers(compiled), flops=cost_numbers(compiled)[0],
                             compile_seconds=time.time() - t0)


# Pallas kernels: a roofline term. ------------------------------------------------------------------------------

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_COST_ESTIMATE = re.compile(r'\\?"cost_estimate\\?":\s*\{\s*\\?"flops\\?":\s*([0-9.eE+]+)[^}]*?'
                            r'\\?"bytes_accessed\\?":\s*([0-9.eE+]+)')
# Attention kernels costed from their shapes: name -> matmuls of [nq, d] x [d, nk] size each. Forward: S = Q K^T,
# O = P V. Backward (flash-style, P recomputed): dq kernel S, dP = dO V^T, dQ = dS K; dkv kernel S, dP,
# dV = P^T dO, dK = dS^T Q; a fused backward kernel does both (5: a dkv kernel that also returns dq per key
# block).
_LANES = 128
_ATTENTION_KERNELS = ((re.compile(r"(splash|flash)\w*_dkv"), 4), (re.compile(r"(splash|flash)\w*_dq"), 3),
                      (re.compile(r"(splash|flash)\w*fwd"), 2))


@dataclasses.dataclass(frozen=True)
class KernelCost:
  """One Pallas TPU kernel call (``tpu_custom_call``) of a compiled program, per device.

  ``flops`` / ``bytes``: the kernel's own ``pl.CostEstimate`` when it carries one (``source="kernel"``); else, for
  the attention kernels above, ``2 x matmuls x b x h x nq x nk x d`` from its q / k operands ``[b, h, n, d]`` or
  ``[b, h, d, n]``, with ``d`` the head dim as the MXU runs it (rounded up to whole 128-lane tiles: a 40-dim head
  counts 128), and every operand and result moved once (a lower bound on its HBM traffic) (``source="shapes"``);
  else ``flops`` None (``source="unknown"``).
  """
  name: str
  flops: Optional[float]
  bytes: float
  source: str

  def seconds(self, chip: Chip) -> Optional[float]:
    """Roofline time: compute at the chip's peak or HBM traffic at its full bandwidth, whichever is longer."""
    if self.flops is None or not chip.hbm_bytes_per_second:
      return None
    return max(self.flops / chip.peak_bf16_flops, self.bytes / chip.hbm_bytes_per_second)


def _shapes(text: str) -> List[Tuple[str, Tuple[int, ...]]]:
  return [(m.group(1), tuple(int(d) for d in m.group(2).split(",") if d)) for m in _SHAPE.finditer(text)]


def _nbytes(shapes) -> float:
  total = 0.0
  for dtype, dims in shapes:
    n = 1
    for d in dims:
      n *= d
    total += n * _DTYPE_BYTES[dtype]
  return total


def kernel_cost(instruction: str) -> KernelCost:
  """:class:`KernelCost` of one ``tpu_custom_call`` instruction line of a compiled program's HLO text."""
  m = re.match(r"\s*(?:ROOT\s+)?%?([\w.-]+?)(?:\.\d+)?\s*=\s*(.*?)\s*custom-call\(", instruction)
  name, result = (m.group(1), m.group(2)) if m else ("tpu_custom_call", "")
  constraints = re.search(r"operand_layout_constraints=\{(.*?)\}(?:, \w+=|$)", instruction)
  operands = _shapes(re.sub(r"\{[^{}]*\}", "", constraints.group(1))) if constraints else []
  moved = _nbytes(_shapes(re.sub(r"\{[^{}]*\}", "", result))) + _nbytes(operands)
  est = _COST_ESTIMATE.search(instruction)
  if est:
    return KernelCost(name, float(est.group(1)), float(est.group(2)), "kernel")
  matmuls = next((n for rx, n in _ATTENTION_KERNELS if rx.search(name)), 0)
  if matmuls == 4 and any(len(dims) == 5 for _, dims in _shapes(result)):
    matmuls = 5  # a fused backward kernel: it also returns dq, unreduced over key blocks (rank 5)
  qk = [dims for _, dims in operands if len(dims) == 4][:2]
  # q / k are [b, h, n, d] (head-minor) or [b, h, d, n] (sequence-minor): the head is the shorter of the two, as
  # these kernels run sequences longer than their heads; the MXU runs it in whole 128-lane tiles.
  if matmuls and len(qk) == 2 and qk[0][:2] == qk[1][:2] and min(qk[0][2:]) == min(qk[1][2:]):
    (b, h), d = qk[0][:2], -(-min(qk[0][2:]) // _LANES) * _LANES
    nq, nk = max(qk[0][2:]), max(qk[1][2:])
    return KernelCost(name, 2.0 * matmuls * b * h * nq * nk * d, moved, "shapes")
  return KernelCost(name, None, moved, "unknown")


_INSTRUCTION_START = re.compile(r"\s*(ROOT\s+)?%[\w.-]+\s*=\s")


def _instructions(text: str) -> Iterable[str]:
  """HLO instructions of a module's text, each on one line: the printer wraps long attributes (a kernel's
  metadata) onto the lines that follow, so an instruction runs until its braces balance."""
  current: List[str] = []
  depth = 0
  for line in text.splitlines():
    if current:
      current.append(line.strip())
    elif _INSTRUCTION_START.match(line):
      current = [line]
    else:
      continue
    depth += line.count("{") - line.count("}")
    if depth <= 0:
      yield " ".join(current)
      current, depth = [], 0
  if current:
    yield " ".join(current)


def pallas_kernels(compiled) -> List[KernelCost]:
  """Every Pallas TPU kernel call in a compiled program's HLO, costed (see :class:`KernelCost`). A kernel inside a
  loop body counts once (the U-Nets here are unrolled)."""
  try:
    text = compiled.as_text()
  except Exception:  # pylint: disable=broad-except  (some runtimes cannot print a compiled program)
    return []
  return [kernel_cost(ins) for ins in _instructions(text or "")
          if 'custom_call_target="tpu_custom_call"' in ins]


def count_pallas_kernels(compiled) -> int:
  """Pallas TPU kernels (custom calls to ``tpu_custom_call``) in a compiled program's HLO."""
  return len(pallas_kernels(compiled))


def add_pallas_roofline(report: "CompileReport", kernels: Sequence[KernelCost], chip: Chip) -> None:
  """Sets ``report``'s Pallas fields from ``kernels``: count, the uncosted ones, FLOPs, bytes, roofline seconds."""
  costed = [k for k in kernels if k.seconds(chip) is not None]
  report.pallas_kernels = len(kernels)
  report.pallas_uncosted = len(kernels) - len(costed)
  report.pallas_flops = float(sum(k.flops for k in costed))
  report.pallas_bytes = float(sum(k.bytes for k in kernels))
  report.pallas_seconds = float(sum(k.seconds(chip) for k in costed)) if costed else None


def compile_report(lowered, topology_name: str, num_slices: int = 1,
                   compiler_options: Optional[Mapping[str, Any]] = None) -> CompileReport:
  """Compiles ``lowered`` (a ``jax.stages.Lowered`` for ``topology_name`` devices) and reports fit, memory, FLOPs,
  the compiler's step-time estimate and MFU. Out-of-memory becomes ``fits=False`` with the sizes; other compile
  errors propagate."""
  topo = topology(topology_name)
  report = CompileReport(topology=topo.name, num_slices=int(num_slices), num_devices=topo.num_devices * num_slices,
                         fits=False, hbm_bytes=topo.chip.hbm_bytes, peak_flops=topo.chip.peak_bf16_flops)
  try:
    compiled = lowered.compile(compiler_options=dict(compiler_options)) if compiler_options else lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    message = str(e)
    if not is_oom(message):
      raise
    sizes = parse_oom(message)
    if sizes:
      report.needed_bytes, report.hbm_bytes = sizes
    report.error = next((line.strip() for line in message.splitlines() if line.strip()), message)[:300]
    return report
  mem = memory_numbers(compiled)
  report.argument_bytes = mem.get("argument", 0)
  report.output_bytes = mem.get("output", 0)
  report.alias_bytes = mem.get("alias", 0)
  report.temp_bytes = mem.get("temp", 0)
  report.generated_code_bytes = mem.get("generated_code", 0)
  report.peak_bytes = mem.get("peak", 0)
  report.flops, report.compiler_seconds = cost_numbers(compiled)
  add_pallas_roofline(report, pallas_kernels(compiled), topo.chip)
  report.fits = report.peak_bytes <= report.hbm_bytes
  if not report.fits:
    report.needed_bytes = report.peak_bytes
  return report


def format_reports(rows: Sequence[Tuple[str, CompileReport]]) -> str:
  """A text table: label, slice, fit, peak HBM, TFLOP/step, est. step time, MFU (per device)."""
  head = f"{'plan':<34}{'slice':>10}{'fit':>5}{'peak GiB':>10}{'HBM GiB':>9}{'TFLOP/dev':>11}{'est. ms':>9}{'MFU':>7}"
  lines = [head]
  for label, r in rows:
    flops = f"{r.useful_flops / 1e12:.3g}" if r.useful_flops is not None else "-"
    ms = f"{r.estimated_seconds * 1e3:.1f}" if r.estimated_seconds is not None else "-"
    util = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "-"
    peak = (r.peak_bytes if r.fits else (r.needed_bytes or 0)) / GiB
    slices = r.topology if r.num_slices == 1 else f"{r.num_slices}x{r.topology}"
    lines.append(f"{label:<34}{slices:>10}{'yes' if r.fits else 'no':>5}{peak:>10.2f}{r.hbm_bytes / GiB:>9.2f}"
                 f"{flops:>11}{ms:>9}{util:>7}")
  return "\n".join(lines)
