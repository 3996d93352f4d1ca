r"""Plan a training run before paying for it: parameters and optimizer memory, then the real train step compiled
for a Cloud TPU slice on this machine (a CPU host is enough; needs ``libtpu``, see ``videoldm_jax/aot.py``).

  # parameter summary (shapes only)
  python -m videoldm_jax.plan --config=configs/webvid.py:stage=base,variant=sd15 [--json]
  # compile the stage's train step for a slice: per-device HBM, fit, FLOPs, compiler step-time estimate, MFU
  python -m videoldm_jax.plan --config=configs/webvid.py:stage=base,variant=sd15 --topology=v5p-8 \
      --per_device_batch=2 [--num_slices=2] [--inputs=latents|pixels] [--json] [--config.dtype=bfloat16 ...]
  # try per-device batch x remat x mesh presets, print every plan and the best one that fits
  python -m videoldm_jax.plan --config=... --topology=v5p-8 --search [--search_attention=auto,splash,blockwise]
  # the U-Net's attention implementation (auto | xla | blockwise | splash | cudnn); Pallas kernels (splash) are
  # costed with a roofline term (see aot.pallas_kernels)
  python -m videoldm_jax.plan --config=... --topology=v5p-8 --attention=splash
  # a chain config (configs/rds.py without stage=): every stage of config.stages, or one with --stage
  python -m videoldm_jax.plan --config=configs/rds.py --topology=v5p-8 [--stage=base]

Without ``--topology`` it prints total / trainable / frozen parameter counts (per top-level component, with the
temporal share of the U-Net) and the bytes implied by the freeze mask ``config.trainable``: fp32 trainable params,
optimizer state (built by the run's own optimizer on the trainable tree only), the EMA copy and the frozen params.

With ``--topology`` the train step is the one ``train.py`` compiles: the task's ``train_step`` jitted with the
config's logical-axis shardings on the mesh the config's ``ici_*``/``dcn_*`` knobs make of the slice's devices,
state donated, on abstract inputs (nothing is allocated). The batch is ``per_device_batch`` x the data-parallel
size (data x fsdp); default: the config's global ``batch_size``. ``--inputs=latents`` (default) feeds pre-encoded
latents (what full-size runs train on, see data_pipelines/encode_latents.py); ``pixels`` includes the frozen VAE
encoder in the step. Numbers are per device: ``peak`` is the compiler's peak HBM; FLOPs are *model* FLOPs (the
step without rematerialisation, counted on the unpartitioned program, divided by the device count); the step time
is the TPU compiler's own estimate (``optimal_seconds``), so MFU is an estimate, not a measurement. A plan that
does not fit prints "does not fit: needs X of Y GiB per device" and the program exits with status 1.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags, logging
from ml_collections import config_flags

from videoldm_jax import aot, checkpoint, cli, config_lib, optim, parallel, tasks
from videoldm_jax.models import layers
from videoldm_jax.models import unet as unet_lib

FLAGS = flags.FLAGS


def _count(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def _bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def plan(config) -> Dict[str, Any]:
  """Counts and bytes for ``config`` via ``jax.eval_shape`` of the task's init and optimizer init."""
  tasks.validate(config)
  task = tasks.get(config.stage)(config)
  shapes = nn.meta.unbox(jax.eval_shape(task.init, jax.random.PRNGKey(0)))
  trainable, frozen = optim.split(shapes, config.trainable)
  frozen = optim.cast_frozen(frozen, config.frozen_dtype)
  opt_state = jax.eval_shape(task.tx.init, trainable)
  ema = bool(config.ema_decay)
  temporal = re.compile(r".*temporal.*")
  components = {}
  for name, sub in shapes.items():
    flat = optim.flat_paths(sub)
    train_rx = re.compile(config.trainable)
    components[name] = {
        "total": _count(sub),
        "trainable": int(sum(v.size for k, v in flat.items() if train_rx.fullmatch(f"{name}/{k}"))),
        "temporal": int(sum(v.size for k, v in flat.items() if temporal.fullmatch(f"{name}/{k}"))),
    }
  return {
      "config": {"stage": config.stage, "trainable": config.trainable, "dtype": config.dtype,
                 "frozen_dtype": config.frozen_dtype},
      "params": {"total": _count(shapes), "trainable": _count(trainable), "frozen": _count(frozen)},
      "components": components,
      "bytes": {"trainable_params": _bytes(trainable), "frozen_params": _bytes(frozen),
                "optimizer_state": _bytes(opt_state), "ema": _bytes(trainable) if ema else 0},
  }


def _fmt(n: int) -> str:
  for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= div:
      return f"{n / div:.2f}{unit}"
  return str(n)


def _gib(n: int) -> str:
  return f"{n / 2**30:.3f} GiB"


def format_table(p: Dict[str, Any]) -> str:
  lines = [f"stage={p['config']['stage']}  trainable={p['config']['trainable']!r}  compute={p['config']['dtype']}  "
           f"frozen params in {p['config']['frozen_dtype']}", "",
           f"{'component':<16}{'total':>12}{'trainable':>12}{'temporal':>12}"]
  for name, c in p["components"].items():
    lines.append(f"{name:<16}{_fmt(c['total']):>12}{_fmt(c['trainable']):>12}{_fmt(c['temporal']):>12}")
  pr = p["params"]
  lines += [f"{'all':<16}{_fmt(pr['total']):>12}{_fmt(pr['trainable']):>12}", "",
            f"params: {pr['total']:,} total = {pr['trainable']:,} trainable + {pr['frozen']:,} frozen"]
  for k, v in p["bytes"].items():
    lines.append(f"{k:<18}{_gib(v):>14}")
  lines.append(f"{'sum':<18}{_gib(sum(p['bytes'].values())):>14}   (before activations; divided by the FSDP size "
               "when sharded)")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The train step on a TPU slice.
# ---------------------------------------------------------------------------------------------------------------

INPUTS = ("latents", "pixels")


def _sds(shape, dtype, sharding=None) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(int(d) for d in shape), jnp.dtype(dtype), sharding=sharding)


def abstract_batch(config, task, batch_size: int, inputs: str = "latents") -> Dict[str, Any]:
  """Unsharded ``ShapeDtypeStruct`` batch of ``batch_size`` clips: what the task declares its input pipeline
  yields (``task.abstract_batch``; ``inputs`` "latents" pre-encoded or "pixels" where the stage can take either)."""
  del config
  if inputs not in INPUTS:
    raise ValueError(f"inputs={inputs!r}: expected one of {INPUTS}")
  return task.abstract_batch(int(batch_size), inputs)


def _shard_batch(batch, mesh):
  return jax.tree.map(lambda x: _sds(x.shape, x.dtype, parallel.batch_sharding(mesh, len(x.shape))), batch)


def abstract_train_inputs(config, task, mesh, rules, batch_size: int, inputs: str = "latents"):
  """``(state, frozen, batch, rng)`` as sharded ``ShapeDtypeStruct``s plus ``(state_sh, frozen_sh)``: exactly the
  arguments and shardings ``train.py`` compiles its step with (see ``checkpoint.restore_or_init``)."""
  rng = jax.random.key(int(config.seed), impl="rbg")
  a = checkpoint.abstract_train_state(config, task.init, rng, mesh, rules, task.tx)
  state_sh, frozen_sh = a.state_shardings, a.frozen_shardings
  with_sh = lambda tree, sh: jax.tree.map(lambda x, s: _sds(x.shape, x.dtype, s), tree, sh)
  state = with_sh(a.state, state_sh)
  frozen = optim.cast_frozen(with_sh(a.frozen_shapes, frozen_sh), config.frozen_dtype)
  batch = _shard_batch(abstract_batch(config, task, batch_size, inputs), mesh)
  step_rng = _sds((2,), jnp.uint32, parallel.replicated(mesh))  # jax.random.PRNGKey(seed), as train.run_rngs
  return (state, frozen, batch, step_rng), (state_sh, frozen_sh)


def lower_train_step(config, task, mesh, batch_size: int, inputs: str = "latents"):
  """``jax.stages.Lowered`` of ``task.train_step`` on ``mesh``, sharded and donated as in ``train.py``."""
  rules = parallel.logical_rules(config)
  args, (state_sh, frozen_sh) = abstract_train_inputs(config, task, mesh, rules, batch_size, inputs)
  return aot.lower_train_step(task.train_step, args, state_sh, frozen_sh, mesh, rules)


def set_remat(config, remat):
  """The U-Net's rematerialisation policy (``UNetConfig.remat``, per ResNet / transformer block): a
  ``unet.REMAT_POLICIES`` name ("none" | "full" | "dots") or a bool."""
  config.model.unet_overrides = dict(config.model.unet_overrides or {}, remat=unet_lib.remat_name(remat))
  return config


def set_attention(config, implementation: Optional[str]):
  """The U-Net's attention implementation (``UNetConfig.attention_implementation``: one of
  ``layers.IMPLEMENTATIONS``; None / "auto": XLA's, blockwise for very long sequences)."""
  impl = None if implementation in (None, "", "auto") else str(implementation)
  layers.check_implementation(impl, "attention")
  overrides = dict(config.model.unet_overrides or {})
  overrides.pop("attention_implementation", None)
  if impl is not None:
    overrides["attention_implementation"] = impl
  config.model.unet_overrides = overrides
  return config


def _remat_of(config) -> str:
  return unet_lib.remat_name((config.model.unet_overrides or {}).get("remat", "none"))


def model_flops(config, batch_size: int, inputs: str = "latents") -> Optional[float]:
  """FLOPs of one train step of the whole global batch, without rematerialisation: XLA's count on the
  unpartitioned program lowered for this host (no compile). Divide by the device count for per-device."""
  config = set_remat(_copy(config), "none")
  task = tasks.get(config.stage)(config)
  # The abstract arguments without shardings: the same computation as one device would run it.
  boxed = jax.eval_shape(task.init, jax.random.key(0, impl="rbg"))
  train_shapes, frozen_shapes = optim.split(nn.meta.unbox(boxed), config.trainable)
  frozen_shapes = optim.cast_frozen(frozen_shapes, config.frozen_dtype)
  ema = bool(config.get("ema_decay", 0.0))
  state = jax.eval_shape(lambda p: optim.init_state(p, task.tx, ema), train_shapes)
  batch = abstract_batch(config, task, batch_size, inputs)
  strip = lambda t: jax.tree.map(lambda x: _sds(x.shape, x.dtype), t)
  with nn.logical_axis_rules(()):
    traced = jax.jit(task.train_step).trace(strip(state), strip(frozen_shapes), batch, _sds((2,), jnp.uint32))
  return aot.cost_numbers(traced.lower(lowering_platforms=("cpu",)))[0]


def _copy(config):
  c = copy.deepcopy(config)
  if hasattr(c, "unlock"):
    c.unlock()
  return c


@dataclasses.dataclass
class SlicePlan:
  """One planned configuration on one slice."""
  label: str
  per_device_batch: int
  global_batch: int
  remat: str
  rules: str
  mesh: Dict[str, int]
  report: aot.CompileReport
  compile_seconds: float
  # The U-Net's attention implementation (``layers.dot_product_attention``); "auto": XLA's attention, blockwise
  # for score matrices of ``layers.AUTO_BLOCKWISE_SCORES`` or more.
  attention: str = "auto"

  def to_dict(self) -> Dict[str, Any]:
    d = dataclasses.asdict(self)
    d["report"] = self.report.to_dict()
    return d


def plan_on_topology(config, topology: str, *, num_slices: int = 1, per_device_batch: Optional[int] = None,
                     inputs: str = "latents", remat=None, mesh: Optional[str] = None, rules: Optional[str] = None,
                     attention: Optional[str] = None, with_model_flops: bool = True) -> SlicePlan:
  """Compiles ``config``'s train step for ``num_slices`` x ``topology`` and reports per-device memory and speed.

  ``per_device_batch`` (per data-parallel replica, i.e. per device of the ``data x fsdp`` axes; default: the
  config's global ``batch_size``), ``remat`` (U-Net blocks: "none" | "dots" | "full"), ``mesh`` (a
  ``parallel.PRESETS`` name: ICI knobs + rules), ``rules`` (a ``parallel.RULES`` preset alone) and ``attention``
  (the U-Net's attention implementation, see :func:`set_attention`) override the config. Out of memory gives
  ``report.fits == False`` with the sizes, not an exception.
  """
  config = _copy(config)
  if remat is not None:
    set_remat(config, remat)
  if attention is not None:
    set_attention(config, attention)
  preset = mesh
  if preset is not None:
    parallel.apply_preset(config, preset)
  if rules is not None:
    config.mesh.rules = rules
  config.mesh.num_slices = int(num_slices)
  tasks.validate(config)
  devices = aot.topology_devices(topology, num_slices)
  mesh = parallel.make_mesh(config, devices)
  dp = parallel.data_parallel_size(mesh)
  if per_device_batch is not None:
    config.batch_size = int(per_device_batch) * dp
  config_lib.validate_for_mesh(config, dp)
  task = tasks.get(config.stage)(config)
  t0 = time.time()
  lowered = lower_train_step(config, task, mesh, int(config.batch_size), inputs)
  report = aot.compile_report(lowered, topology, num_slices)
  seconds = time.time() - t0
  if with_model_flops and report.fits:
    total = model_flops(config, int(config.batch_size), inputs)
    report.model_flops = None if total is None else total / len(devices)
  pdb = int(config.batch_size) // dp
  impl = attention_of(task)
  label = f"{config.stage} b{pdb}/dev remat={_remat_of(config)} {preset or config.mesh.rules}"
  label += f" attn={impl}" if impl != "auto" else ""
  return SlicePlan(label=label, per_device_batch=pdb, global_batch=int(config.batch_size), remat=_remat_of(config),
                   rules=str(config.mesh.rules), mesh={k: int(v) for k, v in mesh.shape.items()}, report=report,
                   compile_seconds=seconds, attention=impl)


def attention_of(task) -> str:
  """The attention implementation of ``task``'s U-Net (of its VAE for the autoencoder stages)."""
  for name in ("unet_config", "vae_config"):
    cfg = getattr(task, name, None)
    if cfg is not None and hasattr(cfg, "attention_implementation"):
      return cfg.attention_implementation or "auto"
  return "auto"


SEARCH_BATCHES = (1, 2, 4, 8, 16, 32)
SEARCH_REMATS = ("none", "dots", "full")
SEARCH_MESHES = ("dp", "fsdp")
SEARCH_ATTENTIONS = (None,)  # the config's own


def search(config, topology: str, *, num_slices: int = 1, inputs: str = "latents",
           batches: Sequence[int] = SEARCH_BATCHES, remats: Sequence[str] = SEARCH_REMATS,
           meshes: Sequence[str] = SEARCH_MESHES, attentions: Sequence[Optional[str]] = SEARCH_ATTENTIONS,
           log=print) -> Tuple[List[SlicePlan], Optional[SlicePlan]]:
  """Attention implementation x mesh preset (``parallel.PRESETS``) x remat policy x per-device batch. For each
  (attention, mesh, remat) the batch grows until it no longer fits. Returns every plan tried and the fitting plan
  with the highest estimated MFU (Pallas kernels costed by their roofline term; ties, or no step-time estimate:
  the larger batch)."""
  plans: List[SlicePlan] = []
  for attention in attentions:
    for preset in meshes:
      for remat in remats:
        for b in batches:
          p = plan_on_topology(config, topology, num_slices=num_slices, per_device_batch=b, inputs=inputs,
                               remat=remat, mesh=preset, attention=attention)
          plans.append(p)
          log(f"{p.label:<40} {p.report.summary()}  [{p.compile_seconds:.0f}s]")
          if not p.report.fits:
            break
  fitting = [p for p in plans if p.report.fits]
  best = max(fitting, key=lambda p: (p.report.mfu or 0.0, p.per_device_batch), default=None)
  return plans, best


def format_plans(plans: Iterable[SlicePlan]) -> str:
  return aot.format_reports([(p.label, p.report) for p in plans])


def stage_configs(config, stage: Optional[str] = None) -> List[Tuple[str, Any]]:
  """``[(stage, config)]``: the config itself, or for a chain config (``config_lib.is_chain``) every stage of
  ``config.chain`` in order (only ``stage`` when given)."""
  if not config_lib.is_chain(config):
    if stage and stage != config.stage:
      raise ValueError(f"--stage={stage!r}: the config is a single stage ({config.stage!r}), not a chain")
    return [(str(config.stage), config)]
  names = list(config.chain)
  if stage:
    if stage not in names:
      raise ValueError(f"--stage={stage!r} is not in the chain {names}")
    names = [stage]
  return [(s, config.stages[s]) for s in names]


def _plan_stage(config) -> Tuple[List[SlicePlan], Optional[SlicePlan]]:
  if FLAGS.search:
    return search(config, FLAGS.topology, num_slices=FLAGS.num_slices, inputs=FLAGS.inputs,
                  remats=FLAGS.search_remat, meshes=FLAGS.search_mesh,
                  attentions=FLAGS.search_attention or [FLAGS.attention],
                  batches=[int(b) for b in FLAGS.search_batches], log=lambda line: logging.info("%s", line))
  p = plan_on_topology(config, FLAGS.topology, num_slices=FLAGS.num_slices, per_device_batch=FLAGS.per_device_batch,
                       inputs=FLAGS.inputs, remat=FLAGS.remat, mesh=FLAGS.mesh, attention=FLAGS.attention)
  return [p], (p if p.report.fits else None)


def _stage_text(plans: List[SlicePlan], best: Optional[SlicePlan]) -> List[str]:
  lines = [format_plans(plans), ""]
  where = f"{FLAGS.num_slices} x {FLAGS.topology}" if FLAGS.num_slices > 1 else FLAGS.topology
  for p in plans if not FLAGS.search else ([best] if best else []):
    lines.append(f"{p.label} on {where} (mesh {p.mesh}, global batch {p.global_batch}): {p.report.summary()}")
  if FLAGS.search:
    lines.append(f"best: {best.label}, global batch {best.global_batch}: {best.report.summary()}" if best
                 else "no tried plan fits")
  return lines


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  stages = stage_configs(FLAGS.config, FLAGS.stage)
  chain = config_lib.is_chain(FLAGS.config)
  if not FLAGS.topology:
    summaries = {name: plan(c) for name, c in stages}
    if FLAGS.json:
      out = summaries if chain else summaries[stages[0][0]]
      sys.stdout.write(json.dumps(out, indent=2) + "\n")
    else:
      sys.stdout.write("\n\n".join(format_table(p) for p in summaries.values()) + "\n")
    return 0
  # Compile-only TPU devices come from libtpu; the host itself runs JAX on CPU (no TPU needed, none used).
  if "JAX_PLATFORMS" not in os.environ:
    jax.config.update("jax_platforms", "cpu")
  if not aot.libtpu_available():
    raise app.UsageError("--topology needs libtpu: pip install 'jax[tpu]' (x86_64 Linux)")
  results = {}
  for name, c in stages:
    results[name] = _plan_stage(c)
  all_fit = all(best is not None for _, best in results.values())
  if FLAGS.json:
    def one(plans, best):
      return {"topology": FLAGS.topology, "num_slices": FLAGS.num_slices, "inputs": FLAGS.inputs,
              "plans": [p.to_dict() for p in plans], "best": best.to_dict() if best else None,
              "fits": best is not None}
    out = ({"stages": {n: one(*r) for n, r in results.items()}, "fits": all_fit} if chain
           else one(*results[stages[0][0]]))
    sys.stdout.write(json.dumps(out, indent=2) + "\n")
  else:
    lines = []
    for name, (plans, best) in results.items():
      if chain:
        lines.append(f"== stage {name}")
      lines += _stage_text(plans, best) + [""]
    sys.stdout.write("\n".join(lines))
  if not all_fit:
    logging.error("no plan fits %s (see above)", FLAGS.topology)
    return 1
  return 0


def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so importing this module has no side effects)."""
  config_flags.DEFINE_config_file("config", None, "Training config file (path[:args]).", lock_config=True)
  flags.DEFINE_bool("json", False, "Print JSON instead of a table.")
  flags.DEFINE_string("topology", None, "TPU slice to compile for (v5p-8, v5p-128, v5e-256, v6e-256, v4-32, ...); "
                      "without it only the parameter summary is printed.")
  flags.DEFINE_integer("num_slices", 1, "Number of slices (multi-slice over DCN).")
  flags.DEFINE_integer("per_device_batch", None, "Clips per data-parallel device (default: config.batch_size).")
  flags.DEFINE_enum("inputs", "latents", list(INPUTS), "Pre-encoded latents or pixels (VAE encoder in the step).")
  flags.DEFINE_bool("search", False, "Try per-device batch x remat x mesh presets; print the best plan that fits.")
  flags.DEFINE_string("stage", None, "Chain configs: plan only this stage (default: every stage of the chain).")
  flags.DEFINE_enum("remat", None, list(unet_lib.REMAT_POLICIES), "U-Net remat policy (default: the config's).")
  flags.DEFINE_enum("mesh", None, list(parallel.PRESETS), "Mesh preset: ICI knobs + rules (default: the config's).")
  flags.DEFINE_list("search_batches", [str(b) for b in SEARCH_BATCHES], "--search: per-device batches to try.")
  flags.DEFINE_list("search_remat", list(SEARCH_REMATS), "--search: remat policies to try.")
  flags.DEFINE_list("search_mesh", list(SEARCH_MESHES), "--search: mesh presets to try.")
  flags.DEFINE_enum("attention", None, ["auto"] + [i for i in layers.IMPLEMENTATIONS if i],
                    "U-Net attention implementation (default: the config's; auto: XLA's, blockwise when very long).")
  flags.DEFINE_list("search_attention", [], "--search: attention implementations to try (default: --attention).")


if __name__ == "__main__":
  cli.run_config_program("videoldm_jax.plan", define_flags, main, required=("config",))
