r"""Device memory of decoding a long video with the video VAE decoder: whole video at once vs windows with halo.

Compiles (does not run) the decoder on ``[frames, h/8, w/8, 4]`` latents and prints XLA's memory analysis
(arguments + temporaries) for each video length: decoding the whole video grows with its length, decoding in
windows of ``--window`` frames plus the receptive-field halo (``models.vae.decode_windows``, exact for per-frame
temporal norms) compiles one window shape whatever the length.

  python benchmarks/decode_memory.py [--vae=sd] [--height=128 --width=256] [--frames=16,64,256]
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from absl import app, flags

from videoldm_jax.models import vae as vae_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("vae", "tiny", "VAEConfig preset given a video decoder (tiny | sd)")
flags.DEFINE_integer("height", 32, "frame height in pixels")
flags.DEFINE_integer("width", 64, "frame width in pixels")
flags.DEFINE_list("frames", ["16", "64", "256"], "video lengths")
flags.DEFINE_integer("window", 16, "frames kept per window")


def _bytes(config, num_frames: int) -> int:
  model = vae_lib.AutoencoderKL(config)
  f = config.downsample_factor
  z = jax.ShapeDtypeStruct((num_frames, FLAGS.height // f, FLAGS.width // f, config.latent_channels), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), vae_lib.example_image(config, batch=3))["params"]
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                        jax.tree.map(lambda a: getattr(a, "value", a), params, is_leaf=lambda a: hasattr(a, "value")))
  fn = jax.jit(lambda p, z: model.apply({"params": p}, z, num_frames, method="decode"))
  stats = fn.lower(params, z).compile().memory_analysis()
  return int(stats.argument_size_in_bytes + stats.temp_size_in_bytes + stats.output_size_in_bytes)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = dataclasses.replace(getattr(vae_lib.VAEConfig, FLAGS.vae)(), temporal_decoder=True)
  halo = vae_lib.temporal_receptive_field(config)
  span = FLAGS.window + 2 * halo
  window_mib = _bytes(config, span) / 2 ** 20
  print(f"video decoder ({FLAGS.vae}), {FLAGS.height}x{FLAGS.width} frames, receptive field +-{halo} frames; "
        f"windows of {FLAGS.window} kept frames read {span}")
  print(f"{'frames':>7s} {'whole video MiB':>16s} {'windowed MiB':>13s} {'windows':>8s}")
  for n in (int(v) for v in FLAGS.frames):
    windows = len(vae_lib.decode_windows(n, FLAGS.window, halo))
    windowed = window_mib if n > span else _bytes(config, n) / 2 ** 20
    print(f"{n:7d} {_bytes(config, n) / 2 ** 20:16.1f} {windowed:13.1f} {windows:8d}")


if __name__ == "__main__":
  app.run(main)
