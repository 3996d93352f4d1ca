r"""Parameter and optimizer-memory plan of a training config, from shapes only (nothing is allocated).

  python -m videoldm_jax.plan --config=configs/webvid.py:stage=base,variant=sd15 [--json]

Prints total / trainable / frozen parameter counts (per top-level component, with the temporal share of the
U-Net), and the bytes implied by the freeze mask ``config.trainable``: fp32 trainable params, optimizer state
(built by the run's own optimizer on the trainable tree only), the EMA copy and the frozen params.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any, Dict

import flax.linen as nn
import jax
from absl import app, flags
from ml_collections import config_flags

from configs import common
from videoldm_jax import optim, tasks

FLAGS = flags.FLAGS


def _count(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def _bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def plan(config) -> Dict[str, Any]:
  """Counts and bytes for ``config`` via ``jax.eval_shape`` of the task's init and optimizer init."""
  common.validate(config)
  task = tasks.get(config.stage)(config)
  shapes = nn.meta.unbox(jax.eval_shape(task.init, jax.random.PRNGKey(0)))
  trainable, frozen = optim.split(shapes, config.trainable)
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
      "config": {"stage": config.stage, "trainable": config.trainable, "dtype": config.dtype},
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
  lines = [f"stage={p['config']['stage']}  trainable={p['config']['trainable']!r}", "",
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  p = plan(FLAGS.config)
  sys.stdout.write((json.dumps(p, indent=2) if FLAGS.json else format_table(p)) + "\n")


def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so importing this module has no side effects)."""
  config_flags.DEFINE_config_file("config", None, "Training config file (path[:args]).", lock_config=True)
  flags.DEFINE_bool("json", False, "Print JSON instead of a table.")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main)
