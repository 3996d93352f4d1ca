"""Forward-pass speed: our jitted Flax U-Net vs diffusers' PyTorch ``UNet2DConditionModel``, identical weights.

Both models get the same random weights (built in PyTorch, converted with ``convert_unet``); each batch size is
warmed up, then timed as the median of ``--runs`` calls. Prints both times and the ratio ours / torch, plus the
max-abs difference of the outputs as a sanity check.

  python benchmarks/unet_forward.py                                  # SD 1.5, CPU fp32, batch 1 and 2, 64x64
  python benchmarks/unet_forward.py --batch=1 --runs=3
  python benchmarks/unet_forward.py --device=gpu --dtype=bfloat16    # CUDA: torch SDPA vs XLA
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time

# torchvision may not match the installed torch; transformers (imported by diffusers) then treats it as absent.
sys.modules.setdefault("torchvision", None)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from absl import app, flags  # noqa: E402

from videoldm_jax.conversion.core import DictSource  # noqa: E402
from videoldm_jax.conversion.unet import convert_unet  # noqa: E402
from videoldm_jax.models import unet as unet_lib  # noqa: E402

PRESETS = {"sd15": unet_lib.sd15, "sd21": unet_lib.sd21}

FLAGS = flags.FLAGS
flags.DEFINE_enum("config", "sd15", sorted(PRESETS), "U-Net preset")
flags.DEFINE_list("batch", ["1", "2"], "batch sizes (comma-separated)")
flags.DEFINE_integer("size", 64, "latent height = width")
flags.DEFINE_integer("tokens", 77, "text tokens (cross-attention context length)")
flags.DEFINE_enum("device", "cpu", ["cpu", "gpu"], "device of both models")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "params and activations dtype")
flags.DEFINE_string("attention", None, "jax.nn.dot_product_attention implementation (xla, cudnn)")
flags.DEFINE_integer("warmup", 1, "untimed calls per batch size")
flags.DEFINE_integer("runs", 3, "timed calls per batch size (the median is reported)")


def _diffusers_kwargs(config: unet_lib.UNetConfig) -> dict:
  return dict(in_channels=config.in_channels, out_channels=config.out_channels,
              block_out_channels=config.block_out_channels, down_block_types=config.down_block_types,
              up_block_types=config.up_block_types, layers_per_block=config.layers_per_block,
              attention_head_dim=config.num_attention_heads, cross_attention_dim=config.cross_attention_dim,
              use_linear_projection=config.use_linear_projection, norm_num_groups=config.norm_num_groups)


def build_torch_model(config: unet_lib.UNetConfig, seed: int = 0):
  """Random unit-scale weights, filled in place (much faster than PyTorch's default init at this size)."""
  from diffusers import UNet2DConditionModel
  with torch.device("meta"):
    model = UNet2DConditionModel(**_diffusers_kwargs(config))
  model = model.to_empty(device="cpu").eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim >= 2:
        p.normal_(0.0, p[0].numel() ** -0.5, generator=gen)
      else:
        p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1, generator=gen)
  return model


def _median_seconds(fn, warmup: int, runs: int) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def benchmark(args):
  """Times both models for the flags ``args``; returns (batch, ours s, torch s, max |diff|) per batch size."""
  torch_device = "cuda" if args.device == "gpu" else "cpu"
  if torch_device == "cuda" and not torch.cuda.is_available():
    raise SystemExit("--device=gpu: torch has no CUDA device here")
  if args.device == "cpu" and not os.environ.get("JAX_PLATFORMS"):
    # Only the CPU backend: with jax[tpu] installed, JAX would otherwise probe for a TPU first and log its failure.
    jax.config.update("jax_platforms", "cpu")
  jax_device = jax.devices("gpu" if args.device == "gpu" else "cpu")[0]
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
  jax_dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
  config = unet_lib.UNetConfig(**{**PRESETS[args.config]().to_dict(), "attention_implementation": args.attention})
  print(f"{args.config} U-Net, {args.size}x{args.size} latents, {args.dtype}, {args.device} "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads; jax {jax.__version__} on {jax_device}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})")

  model = build_torch_model(config)
  print(f"params: {sum(p.numel() for p in model.parameters()):,}")
  gen = torch.Generator().manual_seed(1)
  inputs = {b: (torch.randn(b, config.in_channels, args.size, args.size, generator=gen),
                torch.rand(b, generator=gen) * 1000, torch.randn(b, args.tokens, config.cross_attention_dim,
                                                                 generator=gen)) for b in map(int, args.batch)}

  # PyTorch first; its outputs are kept for the sanity check and the model is freed before ours runs.
  params = convert_unet(DictSource(model.state_dict()), config)
  model = model.to(torch_device) if torch_dtype == torch.float32 else model.to(device=torch_device, dtype=torch_dtype)
  torch_times, torch_out = {}, {}
  for b, (x, t, ctx) in inputs.items():
    x, t, ctx = (v.to(torch_device) for v in (x, t, ctx))
    x, ctx = x.to(torch_dtype), ctx.to(torch_dtype)

    def run_torch(model=model):
      with torch.inference_mode():
        out = model(x, t, ctx).sample
      if torch_device == "cuda":
        torch.cuda.synchronize()
      return out

    torch_times[b] = _median_seconds(run_torch, args.warmup, args.runs)
    torch_out[b] = run_torch().float().cpu().numpy().transpose(0, 2, 3, 1)
    print(f"  torch batch {b}: {torch_times[b] * 1e3:9.1f} ms")
  del model
  gc.collect()
  if torch_device == "cuda":
    torch.cuda.empty_cache()

  leaves, treedef = jax.tree_util.tree_flatten(params)
  del params
  for i in range(len(leaves)):  # one host copy at a time
    leaves[i] = jax.device_put(leaves[i].astype(jax_dtype, copy=False), jax_device)
  params = jax.tree_util.tree_unflatten(treedef, leaves)
  del leaves
  net = unet_lib.UNet(config, dtype=jax_dtype, param_dtype=jax_dtype)
  forward = jax.jit(lambda p, x, t, c: net.apply({"params": p}, x, t, c))

  print(f"{'batch':>5} {'ours ms':>10} {'torch ms':>10} {'ours/torch':>10} {'max|diff|':>10}")
  rows = []
  for b, (x, t, ctx) in inputs.items():
    x = jax.device_put(jnp.asarray(x.numpy().transpose(0, 2, 3, 1), jax_dtype), jax_device)
    t = jax.device_put(jnp.asarray(t.numpy()), jax_device)
    ctx = jax.device_put(jnp.asarray(ctx.numpy(), jax_dtype), jax_device)
    start = time.perf_counter()
    out = jax.block_until_ready(forward(params, x, t, ctx))
    compile_s = time.perf_counter() - start
    ours = _median_seconds(lambda: jax.block_until_ready(forward(params, x, t, ctx)), args.warmup, args.runs)
    diff = float(np.max(np.abs(np.asarray(out, np.float32) - torch_out[b])))
    rows.append((b, ours, torch_times[b], diff))
    print(f"{b:>5} {ours * 1e3:>10.1f} {torch_times[b] * 1e3:>10.1f} {ours / torch_times[b]:>10.2f} {diff:>10.2e}"
          f"   (first call incl. compile {compile_s:.1f} s)")
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  benchmark(FLAGS)


if __name__ == "__main__":
  app.run(main)
