"""Video Latent Diffusion Models (Align your Latents) in JAX/Flax."""

import os
from importlib import metadata

# XLA:CPU in jaxlib 0.10 hands convolutions and matmuls to YNNPACK by default. On the AVX2 host we measured, XLA's
# own (Eigen) kernels run the SD 1.5 U-Net forward about 20% faster (benchmarks/unet_forward.py; 3x3 convs at
# 320-1280 channels 72 ms instead of 86-102 ms). The flag is added to XLA_FLAGS only if it is not there already and
# jaxlib is a version known to have it (XLA aborts on an unknown flag), and only takes effect if this package is
# imported before JAX starts its CPU backend. Other backends ignore it.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-individual_dot",)
_CPU_XLA_FLAGS_JAXLIB = ("0.10.",)


def _add_cpu_xla_flags() -> None:
  try:
    jaxlib_version = metadata.version("jaxlib")
  except metadata.PackageNotFoundError:
    return
  if not jaxlib_version.startswith(_CPU_XLA_FLAGS_JAXLIB):
    return
  flags = os.environ.get("XLA_FLAGS", "")
  extra = [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in flags]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([flags] + extra).strip()


_add_cpu_xla_flags()
