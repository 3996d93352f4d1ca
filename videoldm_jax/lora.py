r"""Low-rank adapters (LoRA) on the temporal layers: merge into the base weights, export, load, apply.

``TemporalConfig.lora_rank = r`` (``config.model.temporal.lora_rank``) gives every projection of the temporal
attentions (``to_q`` / ``to_k`` / ``to_v`` / ``to_out_0`` of ``attn1`` and ``attn2``) an adapter
``y = W x + (alpha / r) * B(A x)``; ``lora_convs`` adds one to the temporal ResBlocks' 3D convs. Adapter params
are ``<layer>/lora/lora_a`` and ``<layer>/lora/lora_b`` (``models/layers.py``: ``LoRA``); ``B`` starts at zero, so a
fresh adapter leaves the model's output unchanged. The base params keep their paths, so a trained video model
loads as ``model_init`` and only the adapters train::

  python -m videoldm_jax.train --config=configs/rds.py:stage=base --workdir=/tmp/rds_lora \
      --config.model.temporal.lora_rank=8 --config.trainable='.*/lora/.*' \
      --config.model_init=/tmp/rds_base --config.model_init_missing_ok='.*/lora/.*'

Export the adapters of the run (its EMA params when saved) to one safetensors file, holding the adapter tensors
under their '/'-joined param paths and ``rank`` / ``alpha`` / ``convs`` in its header metadata::

  python -m videoldm_jax.lora --workdir=/tmp/rds_lora --output=/tmp/motion_lora.safetensors

In Python: ``load_lora`` reads such a file, ``apply_lora`` inserts it into a param tree built with the same rank,
``merge_lora`` folds the adapters into the base kernels (the result loads into the model built with
``lora_rank=0``: no extra cost at sampling).
"""

from __future__ import annotations

import os
import sys
import typing
from typing import Any, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import traverse_util

from videoldm_jax import cli, optim
from videoldm_jax.models import layers

SEP = optim.SEP
TRAINABLE = r".*/lora/.*"  # config.trainable that trains the adapters alone
FORMAT = "videoldm_jax.lora"
_A, _B = f"{SEP}lora{SEP}lora_a", f"{SEP}lora{SEP}lora_b"


def is_adapter(key: str) -> bool:
  """Whether the flat param path ``key`` is an adapter tensor (``.../lora/lora_a`` or ``.../lora/lora_b``)."""
  return key.endswith(_A) or key.endswith(_B)


def lora_params(params) -> Dict[str, Any]:
  """The adapter tensors of a (nested or flat) param tree: ``{'.../to_q/lora/lora_a': [in, r], ...}``."""
  return {k: v for k, v in optim.flat_paths(params).items() if is_adapter(k)}


def _rank_alpha(config) -> Tuple[int, float]:
  """``(rank, alpha)`` of a ``TemporalConfig`` or of ``load_lora``'s metadata."""
  if isinstance(config, Mapping):
    return int(config["rank"]), float(config["alpha"])
  return int(config.lora_rank), float(config.lora_alpha)


def merge_lora(params, temporal_config) -> Dict[str, Any]:
  """Folds every adapter into its base kernel and drops the adapter params.

  Dense: ``W [in, out] += scale * A [in, r] @ B [r, out]``. Conv: ``A`` is a ``[*k, in, r]`` kernel and ``B`` a 1x1
  conv ``[r, out]``, so ``A`` then ``B`` is the conv with kernel ``A @ B`` ``[*k, in, out]`` (same strides, same
  padding): ``W += scale * A @ B`` as well. The sum is taken in fp32 and cast back to ``W``'s dtype.

  Args:
    params: nested param tree holding adapters (e.g. a U-Net built with ``lora_rank > 0``).
    temporal_config: the ``TemporalConfig`` the adapters were built with (or ``load_lora``'s metadata): its
      ``lora_rank`` / ``lora_alpha`` give the scale.
  Returns:
    the nested tree without adapters; it loads into the model built with ``lora_rank=0``.
  """
  rank, alpha = _rank_alpha(temporal_config)
  flat = dict(optim.flat_paths(params))
  adapters = [k for k in flat if k.endswith(_A)]
  if adapters and rank <= 0:
    raise ValueError(f"merge_lora: the params hold adapters ({adapters[0]}, ...) but lora_rank={rank}")
  scale = layers.lora_scale(rank, alpha) if rank else 0.0
  for key_a in adapters:
    prefix = key_a[:-len(_A)]
    key_b, key_w = prefix + _B, prefix + f"{SEP}kernel"
    if key_b not in flat or key_w not in flat:
      raise ValueError(f"merge_lora: {key_a} has no {key_b if key_b not in flat else key_w}")
    a, b, w = flat.pop(key_a), flat.pop(key_b), flat[key_w]
    if a.shape[-1] != rank:
      raise ValueError(f"merge_lora: {key_a} has rank {a.shape[-1]}, the config says lora_rank={rank}")
    delta = jnp.tensordot(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), axes=1, precision="highest")
    if delta.shape != w.shape:
      raise ValueError(f"merge_lora: {prefix}: adapter product {delta.shape} vs kernel {tuple(w.shape)}")
    flat[key_w] = (jnp.asarray(w, jnp.float32) + scale * delta).astype(w.dtype)
  leftover = [k for k in flat if is_adapter(k)]
  if leftover:
    raise ValueError(f"merge_lora: {leftover[0]} has no matching lora_a")
  return traverse_util.unflatten_dict(flat, sep=SEP)


def save_lora(path: str, params, temporal_config) -> Dict[str, np.ndarray]:
  """Writes the adapters of ``params`` (nested tree, or flat ``lora_params``) to ONE safetensors file.

  Keys are the '/'-joined param paths; the header metadata holds ``format``, ``rank``, ``alpha`` and ``convs``
  (strings). Raises ``ValueError`` when there is no adapter, or one disagrees with ``temporal_config``.
  Returns the written tensors.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  rank, alpha = _rank_alpha(temporal_config)
  convs = bool(temporal_config["convs"] if isinstance(temporal_config, Mapping) else temporal_config.lora_convs)
  tensors = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in lora_params(params).items()}
  if not tensors:
    raise ValueError("save_lora: the params hold no adapter (.../lora/lora_a, .../lora/lora_b)")
  for k, v in tensors.items():
    if v.shape[-1 if k.endswith(_A) else 0] != rank:
      raise ValueError(f"save_lora: {k} {v.shape} does not have rank {rank}")
    if k.endswith(_A) and v.ndim > 2 and not convs:
      raise ValueError(f"save_lora: {k} is a conv adapter but the config has lora_convs=False")
  meta = {"format": FORMAT, "rank": str(rank), "alpha": repr(alpha), "convs": str(convs).lower()}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_file(tensors, path, metadata=meta)
  return tensors


def load_lora(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
  """``(flat adapters, {"rank": int, "alpha": float, "convs": bool})`` of a ``save_lora`` file."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  with safe_open(path, framework="numpy") as f:
    meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
      raise ValueError(f"{path}: not a {FORMAT} file (header metadata format={meta.get('format')!r})")
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  bad = [k for k in tensors if not is_adapter(k)]
  if bad:
    raise ValueError(f"{path}: {bad[0]} is not an adapter tensor")
  return tensors, {"rank": int(meta["rank"]), "alpha": float(meta["alpha"]), "convs": meta["convs"] == "true"}


def apply_lora(params, adapters: Mapping[str, Any]) -> Dict[str, Any]:
  """``params`` (nested, built with the adapters' rank) with its adapters replaced by ``adapters`` (flat).

  Strict: every adapter of ``adapters`` must exist in ``params`` with the same shape and every adapter of
  ``params`` must be given, else ``ValueError`` naming the key. Values take the dtype (and sharding) of the leaf
  they replace.
  """
  flat = dict(optim.flat_paths(params))
  expected = {k for k in flat if is_adapter(k)}
  for k, v in adapters.items():
    if k not in expected:
      what = "is not an adapter param" if k in flat else "is not in the params (built with another rank / layout?)"
      raise ValueError(f"apply_lora: {k} {what}")
    if tuple(np.shape(v)) != tuple(flat[k].shape):
      raise ValueError(f"apply_lora: {k} has shape {tuple(np.shape(v))}, the params {tuple(flat[k].shape)}")
  missing = sorted(expected - set(adapters))
  if missing:
    raise ValueError(f"apply_lora: {missing[0]} is missing from the adapters ({len(missing)} missing)")
  for k, v in adapters.items():
    old = flat[k]
    new = np.asarray(v, old.dtype)
    flat[k] = jax.device_put(new, old.sharding) if isinstance(old, jax.Array) else new
  return traverse_util.unflatten_dict(flat, sep=SEP)


# ----------------------------------------------------------------------------------------------------------
# Export from a training workdir.
# ----------------------------------------------------------------------------------------------------------

def export_workdir(workdir: str, output: str, *, use_ema: bool = True) -> Dict[str, np.ndarray]:
  """Writes the adapters of a training workdir's latest checkpoint (EMA params when saved and ``use_ema``) to
  ``output`` with ``save_lora``; rank / alpha / convs come from the run's ``config.model.temporal``."""
  from videoldm_jax import checkpoint, workdirs  # pylint: disable=g-import-not-at-top
  from videoldm_jax.models.temporal import TemporalConfig  # pylint: disable=g-import-not-at-top
  config = workdirs.load_run_config(workdir)
  temporal = config.get("model", {}).get("temporal")
  tc = TemporalConfig(**dict(temporal or {}))
  if not tc.lora_rank:
    raise ValueError(f"{workdir}: its config.model.temporal has no lora_rank (no adapters were trained)")
  workdirs.check_trained(workdir)
  src = {k: v for k, v in checkpoint.source_metadata(workdir, use_ema).items() if is_adapter(k)}
  if not src:
    raise ValueError(f"{workdir}: its checkpoint holds no adapter params (was config.trainable {TRAINABLE!r}?)")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  values = {}
  for d in sorted({d for d, _ in src.values()}):
    meta = checkpoint.tree_metadata(d)
    inner = {i: k for k, (dd, i) in src.items() if dd == d}
    got = checkpoint.restore_subset(d, {i: jax.ShapeDtypeStruct(tuple(meta[i].shape), np.float32, sharding=device)
                                        for i in inner})
    values.update({inner[i]: v for i, v in got.items()})
  return save_lora(output, values, tc)


def define_flags(fv: flags.FlagValues) -> None:
  """The command's flags, defined in ``fv`` (the global FLAGS when run as a program)."""
  flags.DEFINE_string("workdir", None, "training workdir whose adapters to export (or a chain's; see --stage)",
                      flag_values=fv)
  flags.DEFINE_string("stage", None, "stage of a chain workdir (default: its last)", flag_values=fv)
  flags.DEFINE_string("output", None, "output .safetensors file", flag_values=fv)
  flags.DEFINE_bool("use_ema", True, "export the EMA params when the checkpoint has them", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "replace --output if it exists", flag_values=fv)


def run(fv: flags.FlagValues) -> int:
  """Exports the adapters; a workdir without adapters prints the error and returns 2."""
  cli.require(fv, "workdir", "output")
  if os.path.exists(fv.output) and not fv.overwrite:
    print(f"error: {fv.output}: already exists (pass --overwrite to replace it)", file=sys.stderr)
    return 2
  from videoldm_jax import workdirs  # pylint: disable=g-import-not-at-top
  try:
    tensors = export_workdir(workdirs.resolve_stage(fv.workdir, fv.stage), fv.output, use_ema=fv.use_ema)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  n = sum(int(np.prod(v.shape)) for v in tensors.values())
  print(f"wrote {os.path.abspath(fv.output)}: {len(tensors)} adapter tensors, {n:,} params")
  return 0


def main(argv: typing.Sequence[str]) -> int:
  """The command with ``argv`` (its flags, as on the command line)."""
  return cli.main("videoldm_jax.lora", define_flags, run, argv)


if __name__ == "__main__":
  cli.run_program(define_flags, run)
