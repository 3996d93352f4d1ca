"""Device mesh, logical-axis sharding rules and multi-host set-up.

Mesh axes are ``("data", "fsdp", "tensor")``. Their sizes come from maxtext-style knobs in ``config.mesh``:
``ici_{data,fsdp,tensor}_parallelism`` (inside a slice / process) and ``dcn_{...}_parallelism`` (across slices or
processes); at most one ``-1`` per group, resolved against the device count.

Parameters carry logical axis names (``nn.with_logical_partitioning`` in ``models/layers.py``); ``config.mesh.rules``
names one of the presets in ``RULES`` that map logical names to mesh axes:

* ``data_parallel``: every parameter replicated; the batch split over ``(data, fsdp)``.
* ``fsdp``: one dimension of each large parameter (``embed`` of dense kernels, ``conv_out`` of conv kernels,
  ``vocab`` of embedding tables) split over ``fsdp``; XLA all-gathers weights per layer (ZeRO-3 style).
* ``fsdp_tensor``: ``fsdp`` plus Megatron-style tensor parallelism: ``mlp`` / ``heads`` over ``tensor``
  (attention projections and feed-forwards). Conv kernels are split over ``fsdp`` only: a ``conv_in -> tensor``
  rule makes XLA's CPU SPMD partitioner return wrong convolution results, so it is deliberately absent.

The batch is always split over ``(data, fsdp)``; the time axis of a video ``[b, t, h, w, c]`` is never sharded,
so temporal reshapes stay device-local. A dimension that a mesh axis does not divide stays replicated
(``fit_spec``), so tiny test models and odd channel counts never fail to shard.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES: Tuple[str, ...] = ("data", "fsdp", "tensor")
BATCH_AXES: Tuple[str, ...] = ("data", "fsdp")

Rules = Tuple[Tuple[str, Any], ...]

_ACTIVATION_RULES: Rules = (("batch", BATCH_AXES), ("frames", None))
RULES: Dict[str, Rules] = {
    "data_parallel": _ACTIVATION_RULES,
    "fsdp": _ACTIVATION_RULES + (("embed", "fsdp"), ("conv_out", "fsdp"), ("vocab", "fsdp")),
    "fsdp_tensor": _ACTIVATION_RULES + (("embed", "fsdp"), ("conv_out", "fsdp"), ("vocab", "fsdp"),
                                        ("mlp", "tensor"), ("heads", "tensor")),
}

# Mesh presets: the ``ici_*`` knobs and the rules preset that go together (``apply_preset``; used by the planner's
# search and by configs/tpu.py). The DCN knobs are left alone (multi-slice: data parallel across slices).
PRESETS: Dict[str, Dict[str, Any]] = {
    # parameters replicated, the batch over every device of the slice
    "dp": dict(ici_data_parallelism=-1, ici_fsdp_parallelism=1, ici_tensor_parallelism=1, rules="data_parallel"),
    # parameters and optimizer state sharded over every device of the slice; the batch too (ZeRO-3)
    "fsdp": dict(ici_data_parallelism=1, ici_fsdp_parallelism=-1, ici_tensor_parallelism=1, rules="fsdp"),
    # fsdp over the slice / 2, attention heads and MLPs over pairs of devices
    "fsdp_tensor": dict(ici_data_parallelism=1, ici_fsdp_parallelism=-1, ici_tensor_parallelism=2,
                        rules="fsdp_tensor"),
}


def apply_preset(config, name: str):
  """Sets ``config.mesh``'s ICI knobs and rules to the preset ``name`` (see ``PRESETS``); returns ``config``."""
  if name not in PRESETS:
    raise ValueError(f"mesh preset {name!r} unknown; choose one of {sorted(PRESETS)}")
  for k, v in PRESETS[name].items():
    config.mesh[k] = v
  return config


# ---------------------------------------------------------------------------------------------------------------
# Multi-host initialisation.
# ---------------------------------------------------------------------------------------------------------------

def initialize_distributed(config=None) -> None:
  """Calls ``jax.distributed.initialize`` when this is one process of several; a no-op otherwise.

  ``config.distributed`` (default ``"auto"``):
    * ``"none"``: never initialise.
    * ``"auto"``: GPU/CPU clusters when ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
      are set (with ``JAX_PLATFORMS=cpu`` the CPU processes use gloo collectives: ``videoldm_jax.local_cluster``
      starts such a cluster on one machine); multi-host TPU VMs (``TPU_WORKER_HOSTNAMES`` lists several hosts,
      or ``MEGASCALE_COORDINATOR_ADDRESS`` is set: multi-slice) by JAX's own TPU auto-detection; SLURM / Open MPI
      jobs the same way. Single-process runs: no-op.
    * ``"force"``: always call ``jax.distributed.initialize()`` with auto-detection.
  Must run before anything touches a JAX backend (``jax.devices()`` etc.).
  """
  mode = (config.get("distributed", "auto") if config is not None else "auto") or "auto"
  if mode == "none" or _distributed_is_initialized():
    return
  env = os.environ
  if mode == "force":
    jax.distributed.initialize()
  elif "JAX_COORDINATOR_ADDRESS" in env and "JAX_NUM_PROCESSES" in env:
    if env.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
      # CPU processes exchange data through gloo (TCP); the default CPU backend has no cross-process collectives.
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(env["JAX_NUM_PROCESSES"]),
                               process_id=int(env.get("JAX_PROCESS_ID", "0")))
  elif ("," in env.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in env
        or int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1):
    jax.distributed.initialize()
  else:
    return
  logging.info("jax.distributed initialised: process %d of %d", jax.process_index(), jax.process_count())


def _distributed_is_initialized() -> bool:
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    return distributed.global_state.client is not None
  except (ImportError, AttributeError):
    return False


# ---------------------------------------------------------------------------------------------------------------
# Mesh.
# ---------------------------------------------------------------------------------------------------------------

def _fill(shape: Sequence[int], total: int, what: str) -> Tuple[int, ...]:
  """Resolves at most one -1 in ``shape`` so that ``prod(shape) == total``."""
  shape = [int(s) for s in shape]
  if shape.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one {what}_*_parallelism may be -1, got {shape}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if total % known:
      raise ValueError(f"config.mesh: {what} parallelism {shape} cannot fill {total} devices")
    shape[shape.index(-1)] = total // known
  if math.prod(shape) != total:
    raise ValueError(f"config.mesh: {what} parallelism {dict(zip(MESH_AXES, shape))} uses {math.prod(shape)} "
                     f"devices but {total} are available")
  return tuple(shape)


def mesh_shapes(mesh_config, num_devices: int, num_slices: int = 1) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
  """Returns resolved ``(ici_shape, dcn_shape)`` over ``MESH_AXES``."""
  ici = [mesh_config.get(f"ici_{a}_parallelism", 1) for a in MESH_AXES]
  dcn = [mesh_config.get(f"dcn_{a}_parallelism", 1) for a in MESH_AXES]
  if num_devices % num_slices:
    raise ValueError(f"config.mesh.num_slices={num_slices} does not divide {num_devices} devices")
  return _fill(ici, num_devices // num_slices, "ici"), _fill(dcn, num_slices, "dcn")


def make_mesh(config, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """Builds the ``("data", "fsdp", "tensor")`` mesh described by ``config.mesh``.

  With ``num_slices > 1`` (multi-slice TPU) or a DCN shape over several processes (multi-host GPU) the mesh is
  hybrid: DCN axes across slices / processes, ICI axes inside them.
  """
  mc = config.mesh
  devices = list(devices if devices is not None else jax.devices())
  num_slices = int(mc.get("num_slices", 1))
  dcn_requested = any(mc.get(f"dcn_{a}_parallelism", 1) not in (1,) for a in MESH_AXES)
  granules = num_slices
  process_is_granule = False
  if num_slices == 1 and dcn_requested and jax.process_count() > 1:
    granules, process_is_granule = jax.process_count(), True
  ici, dcn = mesh_shapes(mc, len(devices), granules)
  if granules > 1:
    arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=process_is_granule,
                                               allow_split_physical_axes=True)
  else:
    try:
      arr = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):  # unusual topologies: plain order
      arr = np.asarray(devices).reshape(ici)
  mesh = Mesh(arr, MESH_AXES)
  logging.info("Mesh %s over %d devices (%d processes)", dict(mesh.shape), len(devices), jax.process_count())
  return mesh


def logical_rules(config) -> Rules:
  """Logical-to-mesh rules: the preset named by ``config.mesh.rules`` plus ``config.mesh.extra_rules``."""
  name = config.mesh.get("rules", "fsdp")
  if name not in RULES:
    raise ValueError(f"config.mesh.rules={name!r}: unknown preset, choose one of {sorted(RULES)}")
  extra = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in (config.mesh.get("extra_rules") or ()))
  return tuple(extra) + RULES[name]


# ---------------------------------------------------------------------------------------------------------------
# Shardings.
# ---------------------------------------------------------------------------------------------------------------

def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def fit_spec(shape: Sequence[int], spec: P, mesh: Mesh) -> P:
  """Drops mesh axes from ``spec`` where they do not divide the dimension (that dimension stays replicated)."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  return P(*[a if a is not None and dim % _axis_size(mesh, a) == 0 else None for dim, a in zip(shape, entries)])


def param_shardings(abstract_boxed, mesh: Mesh, rules: Rules):
  """NamedShardings for a (boxed, abstract) param tree: logical names -> mesh axes via ``rules``.

  ``abstract_boxed`` is the output of ``jax.eval_shape(model.init, ...)`` with ``nn.Partitioned`` leaves; unboxed
  leaves (no logical names) are replicated. The result has the structure of the *unboxed* tree.
  """
  specs = nn.get_partition_spec(abstract_boxed)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  shapes = nn.meta.unbox(abstract_boxed)
  return jax.tree.map(lambda x, s: NamedSharding(mesh, fit_spec(x.shape, s.spec, mesh)), shapes, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) axis over ``(data, fsdp)``; every other axis, the time axis included, unsharded."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
  return _axis_size(mesh, BATCH_AXES)


def global_batch(local: Mapping[str, Any], mesh: Mesh) -> Dict[str, jax.Array]:
  """Per-process numpy batch -> global ``jax.Array`` batch sharded over ``(data, fsdp)``."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
          for k, v in local.items()}


class GlobalBatchIterator:
  """Wraps a per-process iterator of numpy batches; yields global arrays and exposes the iterator state.

  ``get_state`` / ``set_state`` / ``start_prefetch`` follow the contract of grain's orbax ``CheckpointHandler``
  (bytes state), so the wrapped iterator (grain ``DatasetIterator`` / ``DataLoaderIterator`` or anything with
  ``get_state``/``set_state``) is checkpointed with the train state.
  """

  def __init__(self, local_iter: Iterator[Mapping[str, Any]], mesh: Mesh):
    self.local_iter = local_iter
    self.mesh = mesh

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, jax.Array]:
    return global_batch(next(self.local_iter), self.mesh)

  def get_state(self) -> bytes:
    state = self.local_iter.get_state()
    if isinstance(state, bytes):
      return b"b" + state
    return b"j" + json.dumps(state).encode()

  def set_state(self, state: bytes) -> None:
    kind, payload = state[:1], state[1:]
    self.local_iter.set_state(payload if kind == b"b" else json.loads(payload.decode()))

  def start_prefetch(self) -> None:
    if hasattr(self.local_iter, "start_prefetch"):
      self.local_iter.start_prefetch()


def to_host(tree):
  """A pytree of (possibly multi-process sharded) arrays as host numpy arrays, whole on every process
  (``jax.device_get`` only works where every shard is addressable, i.e. on one process)."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, jax.device_get(tree))
  return multihost_utils.process_allgather(tree, tiled=True)
