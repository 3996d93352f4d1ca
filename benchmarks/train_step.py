"""Train-step speed of the ``base`` stage (video LDM, temporal layers training on a frozen image LDM).

Each case builds the stage's task from its config, initialises params on the mesh of all local devices, AOT-compiles
the real train step (VAE encoding of the clips where the batch holds pixels, text / label encoders, U-Net forward
and backward, optimizer, EMA) and times ``--steps`` steps on one fixed batch after ``--warmup`` steps. Prints
steps/s, examples (clips)/s and frames/s side by side, the compile time and, from XLA's ``cost_analysis`` flops of
the step, the achieved TFLOP/s and the model-flops utilisation against the device's peak.

  python benchmarks/train_step.py                               # CPU: RDS runlocal size vs a mid size
  python benchmarks/train_step.py --device=gpu                  # SD 1.5 backbone, 8 frames of 32x32x4 latents, bf16
  python benchmarks/train_step.py --device=gpu --batch=16 --remat
  python benchmarks/train_step.py --cases=sd15_latents --tiny   # the GPU case's code path with a tiny U-Net (CPU)

Cases:
  * ``runlocal``: ``configs/rds.py:stage=base,runlocal`` (tiny U-Net + tiny VAE, 8 clips of 8 frames at 32x64 px).
  * ``mid``: the RDS base stage with a 3-level U-Net (64/128/128 channels, 8 heads), 4 clips of 8 frames at 64x128 px.
  * ``sd15_latents``: ``configs/webvid.py:stage=base,variant=sd15`` (SD 1.5 U-Net + temporal layers, CLIP ViT-L
    text encoder), batches of pre-encoded latents ``[b, 8, 32, 32, 4]`` (256x256 px clips) and caption tokens.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ of this checkout

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from configs import rds, webvid  # noqa: E402
from videoldm_jax import optim, parallel, tasks  # noqa: E402
from videoldm_jax.data import pipeline as data_pipeline  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("device", "cpu", ["cpu", "gpu"], "cpu: cases runlocal,mid; gpu: case sd15_latents in bfloat16")
flags.DEFINE_string("cases", "", "comma-separated cases (overrides --device's default cases)")
flags.DEFINE_integer("batch", 0, "clips per step (0: the case's default)")
flags.DEFINE_string("dtype", "", "float32 | bfloat16 (default: the case's)")
flags.DEFINE_bool("remat", False, "rematerialise U-Net blocks (less memory, more flops)")
flags.DEFINE_bool("tiny", False, "sd15_latents with the tiny text U-Net (checks the code path)")
flags.DEFINE_integer("steps", 10, "timed steps")
flags.DEFINE_integer("warmup", 2, "untimed steps before them")
flags.DEFINE_float("peak_tflops", 0.0, "per-device peak for MFU (default: by device kind)")

# Dense bf16 peak of one device (TFLOP/s), by substring of ``device.device_kind``.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "v5p": 459.0, "v5 lite": 197.0,
               "v5e": 197.0, "v4": 275.0, "v6": 918.0}


def case_config(name: str, args):
  if name == "runlocal":
    c = rds.get_config("stage=base,runlocal")
  elif name == "mid":
    c = rds.get_config("stage=base,runlocal")
    c.model.unet_overrides = dict(
        cross_attention_dim=128, block_out_channels=(64, 128, 128), num_attention_heads=8, layers_per_block=1,
        transformer_layers_per_block=1, only_cross_attention=False,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    c.batch_size = 4
    c.data.height, c.data.width = 64, 128
  elif name == "sd15_latents":
    c = webvid.get_config("stage=base,runlocal" if args.tiny else "stage=base,variant=sd15")
    c.data.source = data_pipeline.LATENTS  # batches are made here; no pixels, no VAE encoder in the step
    c.batch_size = 1 if args.tiny else 8  # tiny: a code-path check that fits a laptop's memory
    c.dtype = "bfloat16"
  else:
    raise ValueError(f"unknown case {name!r}")
  if args.batch:
    c.batch_size = args.batch
  if args.dtype:
    c.dtype = args.dtype
  if args.remat:
    c.model.unet_overrides = dict(c.model.unet_overrides, remat=True)
  c.data.num_workers = 0
  return c


def latent_batch(task, config, mesh) -> Dict[str, Any]:
  """Random latents ``[b, 8, 32, 32, 4]`` and caption tokens (or labels), sharded over the batch axes."""
  b, t = int(config.batch_size), int(config.data.num_frames)
  rng = np.random.default_rng(0)
  batch = {"latents": rng.standard_normal((b, t, 32, 32, task.vae_config.latent_channels)).astype(np.float32),
           "cond_mask": np.ones((b,), np.float32)}
  if task.text_encoder is not None:
    ids = task.tokenize("a red car drives along a mountain road at night")
    batch["caption_ids"] = np.broadcast_to(ids, (b,) + ids.shape).astype(np.int32)
  labels = {}
  if task.label_encoder is not None:
    labels = {k: np.zeros((b,), np.int32) for k in task.label_encoder.fields}
  out = parallel.global_batch(batch, mesh)
  if labels:
    out["labels"] = parallel.global_batch(labels, mesh)
  return out


def run_case(name: str, args) -> Dict[str, Any]:
  config = case_config(name, args)
  mesh = parallel.make_mesh(config)
  rules = parallel.logical_rules(config)
  task = tasks.get(config.stage)(config)
  rng = jax.random.key(0, impl="rbg")
  boxed = jax.eval_shape(task.init, rng)
  shardings = parallel.param_shardings(boxed, mesh, rules)
  params = jax.jit(lambda r: nn.meta.unbox(task.init(r)), out_shardings=shardings)(rng)
  trainable, frozen = optim.split(params, config.trainable)
  del params
  state = jax.jit(lambda p: optim.init_state(p, task.tx, bool(config.ema_decay)))(trainable)
  if config.data.source == data_pipeline.LATENTS:
    batch = latent_batch(task, config, mesh)
  else:
    it = task.input_pipeline(mesh)
    batch = next(it)
    if hasattr(it, "close"):
      it.close()
  n_train = sum(x.size for x in jax.tree.leaves(trainable))
  n_frozen = sum(x.size for x in jax.tree.leaves(frozen))

  t0 = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = jax.jit(task.train_step, donate_argnums=0).lower(state, frozen, batch, jax.random.PRNGKey(0)).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0

  key = jax.random.PRNGKey(1)
  for _ in range(args.warmup):
    state, metrics = compiled(state, frozen, batch, key)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = compiled(state, frozen, batch, key)
  jax.block_until_ready((state, metrics))
  dt = (time.perf_counter() - t0) / args.steps

  b, t = int(config.batch_size), int(config.data.num_frames)
  out = dict(case=name, batch=b, frames=t, dtype=config.dtype, trainable_m=n_train / 1e6, frozen_m=n_frozen / 1e6,
             compile_s=compile_s, step_s=dt, steps_per_s=1.0 / dt, examples_per_s=b / dt, frames_per_s=b * t / dt,
             loss=float(metrics["loss"]), tflops_step=flops / 1e12, achieved_tflops=flops / dt / 1e12)
  kind = jax.devices()[0].device_kind.lower()
  peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k.lower() in kind), None)
  if peak and jax.default_backend() != "cpu":
    # cost_analysis counts the flops of one device's (partitioned) program, the peak is per device.
    out["mfu"] = out["achieved_tflops"] / peak
  return out


ROWS = (("batch (clips x frames)", lambda r: f"{r['batch']} x {r['frames']}"),
        ("dtype", lambda r: r["dtype"]),
        ("params trainable / frozen (M)", lambda r: f"{r['trainable_m']:.2f} / {r['frozen_m']:.2f}"),
        ("compile (s)", lambda r: f"{r['compile_s']:.1f}"),
        ("step (ms)", lambda r: f"{r['step_s'] * 1e3:.1f}"),
        ("steps/s", lambda r: f"{r['steps_per_s']:.3f}"),
        ("examples/s (clips)", lambda r: f"{r['examples_per_s']:.2f}"),
        ("frames/s", lambda r: f"{r['frames_per_s']:.1f}"),
        ("TFLOP per step (XLA)", lambda r: f"{r['tflops_step']:.4f}"),
        ("achieved TFLOP/s", lambda r: f"{r['achieved_tflops']:.3f}"),
        ("MFU", lambda r: f"{r['mfu'] * 100:.1f}%" if "mfu" in r else "-"))


def print_table(results) -> None:
  width = max(len(k) for k, _ in ROWS)
  print(f"{'':{width}}  " + "  ".join(f"{r['case']:>16}" for r in results))
  for label, fmt in ROWS:
    print(f"{label:{width}}  " + "  ".join(f"{fmt(r):>16}" for r in results))


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  args = FLAGS
  if args.device == "gpu" and jax.default_backend() != "gpu":
    raise SystemExit(f"--device=gpu but JAX's backend is {jax.default_backend()!r} (install jax[cuda12])")
  cases = args.cases.split(",") if args.cases else (["sd15_latents"] if args.device == "gpu" else ["runlocal", "mid"])
  print(f"JAX {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()})")
  results = []
  for name in cases:
    results.append(run_case(name, args))
    print(f"{name}: {results[-1]['steps_per_s']:.3f} steps/s, {results[-1]['examples_per_s']:.2f} clips/s", flush=True)
  print()
  print_table(results)
  if len(results) == 2:
    a, b = results
    print(f"\n{b['case']} / {a['case']}: step time x{b['step_s'] / a['step_s']:.2f}, "
          f"frames/s x{b['frames_per_s'] / a['frames_per_s']:.2f}")


if __name__ == "__main__":
  app.run(main)
