"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import sys  # noqa: E402

# The PyPI torchvision wheel does not match the CPU torch build (its C++ ops fail to register). Nothing here
# needs it; marking it absent makes diffusers/transformers take their "torchvision not installed" paths.
sys.modules.setdefault("torchvision", None)

import jax  # noqa: E402  (after the environment is set)

jax.config.update("jax_default_matmul_precision", "highest")  # parity tests compare fp32 against PyTorch


def pytest_configure(config):
  assert jax.device_count() == 8, f"expected 8 fake CPU devices, got {jax.devices()}"
