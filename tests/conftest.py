"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One XLA compilation cache for the session, inherited by the CLI subprocesses: many tests (and the runs inside
# benchmarks/ablations.py) compile the same tiny programs from fresh closures, which the in-memory jit cache
# misses. Fresh per session, so a stale entry can never decide a result.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit  # noqa: E402
  import shutil  # noqa: E402
  import tempfile  # noqa: E402
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="videoldm_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import sys  # noqa: E402

import pytest  # noqa: E402

# The PyPI torchvision wheel does not match the CPU torch build (its C++ ops fail to register). Nothing here
# needs it; marking it absent makes diffusers/transformers take their "torchvision not installed" paths.
sys.modules.setdefault("torchvision", None)

import jax  # noqa: E402  (after the environment is set)

jax.config.update("jax_default_matmul_precision", "highest")  # parity tests compare fp32 against PyTorch


def pytest_configure(config):
  assert jax.device_count() == 8, f"expected 8 fake CPU devices, got {jax.devices()}"


@pytest.fixture(scope="session")
def tiny_svd_pipeline():
  """``reference_models.tiny_svd_pipeline()``: a tiny random diffusers SVD pipeline, shared (do not modify it)."""
  import reference_models  # pylint: disable=g-import-not-at-top
  return reference_models.tiny_svd_pipeline()


@pytest.fixture(scope="session")
def tiny_svd_pipeline_dir(tiny_svd_pipeline, tmp_path_factory):
  """That pipeline written with ``save_pretrained`` (model_index.json, unet/, vae/, image_encoder/, scheduler/,
  feature_extractor/); read-only: copy it before changing anything."""
  path = tmp_path_factory.mktemp("tiny_svd") / "pipeline"
  tiny_svd_pipeline.save_pretrained(path)
  return path
