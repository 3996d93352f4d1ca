"""Video U-Net training-step speed: our Flax ``UNet`` (with ``TemporalConfig``) vs diffusers'
``UNetSpatioTemporalConditionModel``, identical weights, forward + backward w.r.t. the temporal params only
(the Video LDM setting: spatial layers frozen).

  python benchmarks/video_unet.py                                  # CPU, fp32
  python benchmarks/video_unet.py --device=gpu --dtype=bfloat16    # GPU: torch SDPA vs XLA (or --attention=cudnn)

Prints the median step time of each and the ratio diffusers / ours (> 1: ours is faster). Both outputs are checked
against each other first.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np
from absl import app, flags

# JAX is imported in main, after --device picked its platform.
FLAGS = flags.FLAGS
flags.DEFINE_enum("device", "cpu", ["cpu", "gpu"], "device of both models")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "params and activations dtype")
flags.DEFINE_string("attention", None, "jax.nn.dot_product_attention implementation (e.g. cudnn)")
flags.DEFINE_integer("batch", 1, "clips per step")
flags.DEFINE_integer("frames", 8, "frames per clip")
flags.DEFINE_integer("size", 32, "latent height = width")
flags.DEFINE_string("channels", "64,128,256", "block_out_channels (multiples of 64: 64-dim heads)")
flags.DEFINE_integer("steps", 3, "timed steps (after one warm-up step)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  args = FLAGS
  if args.device == "cpu":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.modules.setdefault("torchvision", None)  # a mismatched torchvision breaks diffusers' imports; it is not needed

  import jax
  import jax.numpy as jnp
  import torch
  from diffusers.models.unets.unet_spatio_temporal_condition import UNetSpatioTemporalConditionModel

  from videoldm_jax.conversion.core import DictSource, flatten_paths, unflatten_paths
  from videoldm_jax.conversion.svd import convert_svd_unet, svd_config_from_diffusers
  from videoldm_jax.models.unet import UNet

  channels = tuple(int(c) for c in args.channels.split(","))
  levels = len(channels)
  diffusers_config = dict(
      block_out_channels=channels, num_attention_heads=tuple(c // 64 for c in channels),
      down_block_types=("CrossAttnDownBlockSpatioTemporal",) * (levels - 1) + ("DownBlockSpatioTemporal",),
      up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * (levels - 1),
      cross_attention_dim=256, layers_per_block=2)
  torch_device = "cuda" if args.device == "gpu" else "cpu"
  torch_dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
  jax_dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32

  torch.manual_seed(0)
  ref = UNetSpatioTemporalConditionModel(**diffusers_config).eval()
  config = svd_config_from_diffusers(diffusers_config)
  if args.attention:
    import dataclasses
    config = dataclasses.replace(config, attention_implementation=args.attention)
  params = convert_svd_unet(DictSource(ref.state_dict()), config)
  ref = ref.to(torch_device)
  if torch_dtype != torch.float32:
    ref = ref.to(torch_dtype)
  for name, p in ref.named_parameters():
    p.requires_grad_(any(s in name for s in ("temporal_", "time_mixer", "time_pos_embed")))
  n_params = sum(p.numel() for p in ref.parameters())
  n_trainable = sum(p.numel() for p in ref.parameters() if p.requires_grad)

  b, t, s = args.batch, args.frames, args.size
  rng = np.random.default_rng(0)
  x = rng.standard_normal((b, t, 8, s, s)).astype(np.float32)
  ts = np.full((b,), 500.0, np.float32)
  ctx = rng.standard_normal((b, 1, 256)).astype(np.float32)
  ids = np.tile(np.array([[6.0, 127.0, 0.02]], np.float32), (b, 1))

  # ----- diffusers -----
  tt = lambda a: torch.from_numpy(a).to(torch_device, torch_dtype)  # noqa: E731
  t_inputs = (tt(x), tt(ts), tt(ctx), tt(ids))

  def torch_step():
    ref.zero_grad(set_to_none=True)
    out = ref(*t_inputs).sample
    loss = out.float().pow(2).mean()
    loss.backward()
    if torch_device == "cuda":
      torch.cuda.synchronize()
    return out

  # ----- ours -----
  model = UNet(config, dtype=jax_dtype)
  flat = [(path, jnp.asarray(v, jax_dtype)) for path, v in flatten_paths(params)]
  temporal = unflatten_paths([(p, v) for p, v in flat if any("temporal" in k for k in p)])
  frozen = unflatten_paths([(p, v) for p, v in flat if not any("temporal" in k for k in p)])
  j_inputs = (jnp.asarray(x.transpose(0, 1, 3, 4, 2), jax_dtype), jnp.asarray(ts), jnp.asarray(ctx, jax_dtype),
              jnp.asarray(ids))

  @jax.jit
  def jax_step(temporal, frozen, x, ts, ctx, ids):
    def loss_fn(temporal):
      merged = unflatten_paths(list(flatten_paths(frozen)) + list(flatten_paths(temporal)))
      out = model.apply({"params": merged}, x, ts, ctx, added_cond=ids)
      return jnp.mean(jnp.square(out.astype(jnp.float32))), out
    (_, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(temporal)
    return out, grads

  def ours_step():
    out, grads = jax_step(temporal, frozen, *j_inputs)
    jax.block_until_ready(grads)
    return out

  # ----- check, warm up, time -----
  start = time.perf_counter()
  ours_out = np.asarray(ours_step(), np.float32)
  compile_s = time.perf_counter() - start
  theirs_out = torch_step().detach().float().cpu().numpy().transpose(0, 1, 3, 4, 2)
  err = float(np.abs(ours_out - theirs_out).max())

  # Alternate the two so that load from other processes hits both alike.
  torch_times, ours_times = [], []
  for _ in range(args.steps):
    for fn, times in ((torch_step, torch_times), (ours_step, ours_times)):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
  torch_s, ours_s = statistics.median(torch_times), statistics.median(ours_times)
  print(f"device={args.device} dtype={args.dtype} clips={b} frames={t} latents={s}x{s} channels={channels} "
        f"params={n_params / 1e6:.1f}M (temporal, trained: {n_trainable / 1e6:.1f}M) "
        f"jax={jax.__version__} torch={torch.__version__} threads={torch.get_num_threads()}")
  print(f"outputs agree: max abs diff {err:.2e}; jax compile + first step {compile_s:.1f}s")
  print(f"diffusers fwd+bwd (temporal grads): {torch_s * 1e3:8.1f} ms/step (median of {args.steps})")
  print(f"ours      fwd+bwd (temporal grads): {ours_s * 1e3:8.1f} ms/step (median of {args.steps})")
  print(f"ratio diffusers / ours: {torch_s / ours_s:.2f}x")


if __name__ == "__main__":
  app.run(main)
