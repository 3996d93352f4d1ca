r"""XLA attention (``jax.nn.dot_product_attention``) vs ``implementation="blockwise"`` (flash-style attention in plain
JAX) on self-attention over ``n`` tokens: compiled temporary memory and median time of the forward pass and of
forward + backward (gradients w.r.t. q, k, v), side by side for each length.

  python benchmarks/attention_blockwise.py                                        # CPU, fp32, 1024/2560/4096
  python benchmarks/attention_blockwise.py --device=gpu --dtype=bfloat16 --batch=16
  python benchmarks/attention_blockwise.py --lengths=256,640 --steps=2             # a quick check

Defaults: SD 1.5's first level (8 heads of 40 channels); 2560 tokens is its 40x64 latent. Both paths are checked
against each other before timing.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# JAX is imported in main, after --device picked its platform.
FLAGS = flags.FLAGS
flags.DEFINE_enum("device", "cpu", ["cpu", "gpu", "tpu"], "platform")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "q / k / v dtype")
flags.DEFINE_string("lengths", "1024,2560,4096", "comma-separated sequence lengths")
flags.DEFINE_integer("batch", 1, "sequences per call (frames)")
flags.DEFINE_integer("heads", 8, "attention heads")
flags.DEFINE_integer("head_dim", 40, "channels per head")
flags.DEFINE_integer("q_block", None, "blockwise query block (default layers.BLOCKWISE_Q_BLOCK)")
flags.DEFINE_integer("kv_block", None, "blockwise key/value block (default layers.BLOCKWISE_KV_BLOCK)")
flags.DEFINE_integer("steps", 5, "timed calls per measurement (after one warm-up call)")


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  args = FLAGS
  if args.device == "cpu":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from videoldm_jax.models import layers  # pylint: disable=g-import-not-at-top

  if args.q_block:
    layers.BLOCKWISE_Q_BLOCK = args.q_block
  if args.kv_block:
    layers.BLOCKWISE_KV_BLOCK = args.kv_block
  dtype = jnp.dtype(args.dtype)
  width = args.heads * args.head_dim

  def functions(impl):
    attend = lambda q, k, v: layers.dot_product_attention(q, k, v, num_heads=args.heads, implementation=impl,
                                                          self_attention=True)
    loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) ** 2)
    return {"fwd": jax.jit(attend), "fwd+bwd": jax.jit(jax.grad(loss, argnums=(0, 1, 2)))}

  def median_seconds(fn, xs):
    jax.block_until_ready(fn(*xs))  # warm-up
    times = []
    for _ in range(args.steps):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*xs))
      times.append(time.perf_counter() - t0)
    return statistics.median(times)

  print(f"{jax.devices()[0].platform} {args.dtype}, batch {args.batch}, {args.heads} heads x {args.head_dim}, "
        f"blocks q {layers.BLOCKWISE_Q_BLOCK} / kv {layers.BLOCKWISE_KV_BLOCK}")
  print(f"{'n':>6} {'pass':<8} {'impl':<10} {'temp MiB':>10} {'ms':>10} {'vs xla':>8}")
  for n in (int(s) for s in args.lengths.split(",")):
    rng = np.random.default_rng(n)
    xs = tuple(jnp.asarray(rng.standard_normal((args.batch, n, width)), dtype) for _ in range(3))
    fns = {impl: functions(impl) for impl in ("xla", "blockwise")}
    ref, out = fns["xla"]["fwd"](*xs), fns["blockwise"]["fwd"](*xs)
    err = float(jnp.max(jnp.abs(ref.astype(jnp.float32) - out.astype(jnp.float32))))
    for name in ("fwd", "fwd+bwd"):
      base = None
      for impl in ("xla", "blockwise"):
        fn = fns[impl][name]
        temp = fn.lower(*xs).compile().memory_analysis().temp_size_in_bytes / 2 ** 20
        seconds = median_seconds(fn, xs)
        base = base or seconds
        print(f"{n:>6} {name:<8} {impl:<10} {temp:>10.1f} {seconds * 1e3:>10.2f} {seconds / base:>7.2f}x")
    print(f"{n:>6} max |blockwise - xla| = {err:.2e}")
  return 0


if __name__ == "__main__":
  app.run(main)
