r"""XLA attention vs the Pallas splash kernel for the U-Net's longest self-attention, compiled for a TPU slice on
this machine (compile-only devices; needs libtpu): forward + backward, per-device temporaries, FLOPs and the
compiler's step-time estimate.

  python benchmarks/attention_tpu.py [--topology=v5p-8] [--frames_per_device=16] [--tokens=2560] [--width=320] \
      [--heads=8]

Defaults: SD 1.5's first level at 40x64 latents (2560 tokens, 320 channels, 8 heads of 40). Note: the compiler's
cost model does not see inside a Pallas kernel (its FLOPs and time count as ~0), so only the XLA numbers are a
step-time estimate; the splash row shows the memory it saves and the cost of the layout changes around it.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from videoldm_jax import aot, parallel  # noqa: E402
from videoldm_jax.models import layers  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("topology", "v5p-8", "TPU slice to compile for")
flags.DEFINE_integer("frames_per_device", 16, "frames (attention batch) per device")
flags.DEFINE_integer("tokens", 2560, "sequence length (latent pixels per frame)")
flags.DEFINE_integer("width", 320, "channels")
flags.DEFINE_integer("heads", 8, "attention heads")


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  args = FLAGS
  devices = aot.topology_devices(args.topology)
  topo = aot.topology(args.topology)
  mesh = jax.sharding.Mesh(np.asarray(devices).reshape(len(devices), 1, 1), parallel.MESH_AXES)
  x = jax.ShapeDtypeStruct((args.frames_per_device * len(devices), args.tokens, args.width), jnp.bfloat16,
                           sharding=parallel.batch_sharding(mesh, 3))
  # fwd + bwd FLOPs of QK^T and PV per device (the useful work; the MXU runs a 40-dim head in a 128-lane tile)
  useful = 3 * 4 * args.frames_per_device * args.tokens ** 2 * args.width
  print(f"{'impl':<8}{'temp GiB':>10}{'TFLOP (XLA count)':>19}{'est. ms':>9}{'useful TFLOP/s':>16}")
  for impl in (None, "splash"):
    def loss(q, k, v):
      out = layers.dot_product_attention(q, k, v, num_heads=args.heads, implementation=impl, self_attention=True)
      return jnp.sum(out.astype(jnp.float32) ** 2)
    with jax.set_mesh(mesh):
      compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
    flops, seconds = aot.cost_numbers(compiled)
    temp = compiled.memory_analysis().temp_size_in_bytes / aot.GiB
    rate = f"{useful / seconds / 1e12:.0f}" if seconds and impl is None else "-"
    print(f"{impl or 'xla':<8}{temp:>10.2f}{(flops or 0) / 1e12:>19.3f}{(seconds or 0) * 1e3:>9.2f}{rate:>16}")
  print(f"peak bf16: {topo.chip.peak_bf16_flops / 1e12:.0f} TFLOP/s per device ({topo.chip.generation})")
  return 0


if __name__ == "__main__":
  app.run(main)
