"""FID InceptionV3 (the TensorFlow 2015-12-05 graph as ported by pytorch-fid / torch-fidelity) in linen, NHWC.

This is not torchvision's ImageNet InceptionV3: FID's network differs in four places, and all four change the
features, so they are reproduced exactly:

* ``Mixed_5b..5d`` (A), ``Mixed_6b..6e`` (C) and ``Mixed_7b`` (E_1) average-pool with ``count_include_pad=False``
  (TensorFlow's average pool ignores the zero padding);
* ``Mixed_7c`` (E_2) max-pools (3x3, stride 1, pad 1) in its pool branch;
* BatchNorm epsilon is 1e-3 and the classifier ``fc`` has 1008 outputs (the 2015 graph's label set).

``__call__(x [b, 299, 299, 3] in [-1, 1])`` returns ``{"pool": [b, 2048], "logits": [b, 1008]}``; ``pool`` (the
global average pool after ``Mixed_7c``) is the FID feature. Param paths mirror the PyTorch module tree
(``Mixed_6b/branch7x7_2/conv/kernel`` <-> ``Mixed_6b.branch7x7_2.conv.weight``, BatchNorm running statistics are
plain params ``bn/running_mean``, ``bn/running_var``), so the weight file converts key by key.

Input protocols (:func:`preprocess`), both from uint8 frames of any size:

* ``"pytorch_fid"`` (default; pytorch-fid's ``InceptionV3(resize_input=True, normalize_input=True)``, the
  protocol behind the ``pt_inception-2015-12-05-6726825d.pth`` weight file): ``x / 255``, bilinear resize to
  299x299 like ``F.interpolate(mode="bilinear", align_corners=False)`` (half-pixel centres, no antialiasing),
  then ``2x - 1``.
* ``"tensorflow"`` (torch-fidelity, and the original TensorFlow FID graph): TensorFlow 1.x bilinear resize
  (``align_corners=False`` in TF1 means source = ``dst * in / out``, no half-pixel offset), then
  ``(x - 128) / 128``.

Weights: the file FID users already have (pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``, or
torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``: same keys), read with
``torch.load(weights_only=True)`` or from a ``.safetensors`` copy. Nothing is downloaded.
"""

from __future__ import annotations

import functools
from typing import Dict, Mapping, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from videoldm_jax.conversion.core import DictSource, FilteredSource, TensorSource, convert_strict
from videoldm_jax.conversion.io import open_checkpoint
from videoldm_jax.evaluation import batching

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
BN_EPS = 1e-3
PROTOCOLS = ("pytorch_fid", "tensorflow")
# BatchNorm's step counter: a buffer torch stores next to the running statistics; it plays no part in eval.
NUM_BATCHES_TRACKED = "num_batches_tracked"


# ----------------------------------------------------------------------------------------------------------
# Resizing as two small matrices (exact, jittable for any static input size).

def bilinear_matrix(in_size: int, out_size: int, mode: str = "pytorch_fid") -> np.ndarray:
  """``[out_size, in_size]`` float32 weights of 1-D bilinear resampling (no antialiasing).

  ``mode="pytorch_fid"``: ``F.interpolate(..., align_corners=False)``, source ``(dst + 0.5) * in / out - 0.5``
  clamped at 0. ``mode="tensorflow"``: TF 1.x ``resize_bilinear(align_corners=False)``, source ``dst * in / out``.
  Both clamp the upper neighbour to the last pixel.
  """
  if mode not in PROTOCOLS:
    raise ValueError(f"mode must be one of {PROTOCOLS}, got {mode!r}")
  scale = in_size / out_size
  dst = np.arange(out_size, dtype=np.float64)
  src = dst * scale if mode == "tensorflow" else np.maximum((dst + 0.5) * scale - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  m = np.zeros((out_size, in_size), np.float64)
  np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(m, (np.arange(out_size), hi), frac)
  return m.astype(np.float32)


def resize_hw(x: jax.Array, matrix_h: np.ndarray, matrix_w: np.ndarray) -> jax.Array:
  """Separable resampling of ``[n, h, w, c]`` with ``[oh, h]`` and ``[ow, w]`` matrices -> ``[n, oh, ow, c]``."""
  x = jnp.einsum("oh,nhwc->nowc", jnp.asarray(matrix_h), x, precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum("pw,nowc->nopc", jnp.asarray(matrix_w), x, precision=jax.lax.Precision.HIGHEST)


def preprocess(frames: jax.Array, protocol: str = "pytorch_fid") -> jax.Array:
  """uint8 (or float 0..255) frames ``[n, h, w, 3]`` -> network input ``[n, 299, 299, 3]`` float32 (see module doc)."""
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"expected frames [n, h, w, 3], got shape {tuple(frames.shape)}")
  x = frames.astype(jnp.float32)
  _, h, w, _ = x.shape
  if (h, w) != (INPUT_SIZE, INPUT_SIZE):  # both resamplers are the identity at 299x299
    x = resize_hw(x, bilinear_matrix(h, INPUT_SIZE, protocol), bilinear_matrix(w, INPUT_SIZE, protocol))
  if protocol == "tensorflow":
    return (x - 128.0) / 128.0
  return x * (2.0 / 255.0) - 1.0


# ----------------------------------------------------------------------------------------------------------
# Network. Plain (unpartitioned) params: a frozen feature extractor, replicated on every device.

class FrozenBatchNorm(nn.Module):
  """Inference BatchNorm ``(x - running_mean) / sqrt(running_var + eps) * scale + bias`` over the last axis."""
  epsilon: float = BN_EPS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones_init(), (c,))
    bias = self.param("bias", nn.initializers.zeros_init(), (c,))
    mean = self.param("running_mean", nn.initializers.zeros_init(), (c,))
    var = self.param("running_var", nn.initializers.ones_init(), (c,))
    inv = scale * jax.lax.rsqrt(var + self.epsilon)
    return (x - mean) * inv + bias


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU. ``padding`` is symmetric per spatial dim, like PyTorch."""
  features: int
  kernel_size: Tuple[int, int]
  strides: Tuple[int, int] = (1, 1)
  padding: Tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides, padding=[(p, p) for p in self.padding],
                use_bias=False, name="conv")(x)
    return nn.relu(FrozenBatchNorm(name="bn")(x))


def _avg_pool_same(x: jax.Array) -> jax.Array:
  """3x3 / stride 1 / pad 1 average that ignores the padding (TensorFlow's, FID's ``count_include_pad=False``)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_valid(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
    bd = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv2d(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_valid(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv2d(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
    b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv2d(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_valid(x)], axis=-1)


class InceptionE(nn.Module):
  """``pool="avg"``: FID's E_1 (``Mixed_7b``); ``pool="max"``: FID's E_2 (``Mixed_7c``)."""
  pool: str = "avg"

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.pool == "max":
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_same(x)
    bp = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """``[b, 299, 299, 3]`` in [-1, 1] -> ``{"pool": [b, 2048], "logits": [b, 1008]}``."""

  @nn.compact
  def __call__(self, x: jax.Array) -> Dict[str, jax.Array]:
    x = BasicConv2d(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)  # [b, 149, 149, 32]
    x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)  # [b, 147, 147, 32]
    x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_valid(x)  # [b, 73, 73, 64]
    x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)  # [b, 71, 71, 192]
    x = _max_pool_valid(x)  # [b, 35, 35, 192]
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)  # [b, 35, 35, 288]
    x = InceptionB(name="Mixed_6a")(x)  # [b, 17, 17, 768]
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)  # [b, 8, 8, 1280]
    x = InceptionE("avg", name="Mixed_7b")(x)
    x = InceptionE("max", name="Mixed_7c")(x)  # [b, 8, 8, 2048]
    pool = jnp.mean(x, axis=(1, 2))
    return {"pool": pool, "logits": nn.Dense(NUM_CLASSES, name="fc")(pool)}


def abstract_params() -> Mapping:
  """Param shapes of :class:`FIDInceptionV3` (``jax.ShapeDtypeStruct``), without allocating them."""
  x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), x)["params"]


# ----------------------------------------------------------------------------------------------------------
# Weights.

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight"}


def torch_key(path: Tuple[str, ...]) -> str:
  """``('Mixed_6b', 'branch7x7_2', 'conv', 'kernel')`` -> ``'Mixed_6b.branch7x7_2.conv.weight'``.

  A plain join: the default rule of ``conversion/core.py`` would read ``branch7x7_2`` as list index 2.
  """
  *modules, leaf = path
  return ".".join([*modules, _LEAF_TO_TORCH.get(leaf, leaf)])


def convert_fid_inception(source: Union[TensorSource, Mapping[str, object]], dtype=np.float32) -> Dict:
  """FID InceptionV3 state dict (pytorch-fid / torch-fidelity keys) -> params of :class:`FIDInceptionV3`.

  Strict: every param must be present with its shape, every tensor used; only BatchNorm ``num_batches_tracked``
  counters are dropped. Raises :class:`~videoldm_jax.conversion.core.ConversionError` (a ``ValueError``) naming
  the offending keys.
  """
  if not isinstance(source, TensorSource):
    source = DictSource(source)
  return convert_strict(FilteredSource(source, lambda k: k.rsplit(".", 1)[-1] != NUM_BATCHES_TRACKED), abstract_params(), key_fn=torch_key, dtype=dtype,
                        what="FID InceptionV3")


def load_fid_inception(path: Union[str, TensorSource]) -> Dict:
  """Reads ``pt_inception-2015-12-05-6726825d.pth`` (``torch.load(weights_only=True)``) or a ``.safetensors``
  copy and converts it (strictly) to :class:`FIDInceptionV3` params (float32, on the default device)."""
  source = path if isinstance(path, TensorSource) else open_checkpoint(path)
  return jax.device_put(convert_fid_inception(source))


# ----------------------------------------------------------------------------------------------------------
# Features.

@functools.partial(jax.jit, static_argnames=("protocol",))
def fid_features_batch(params: Mapping, frames: jax.Array, protocol: str = "pytorch_fid") -> jax.Array:
  """Jittable core: uint8 frames ``[n, h, w, 3]`` -> pool features ``[n, 2048]`` float32.

  Call it under ``jax.default_matmul_precision(batching.PRECISION)`` for full fp32 convolutions, as :func:`fid_features`
  does (XLA's default lets GPUs use TF32 and TPUs bf16 passes).
  """
  return FIDInceptionV3().apply({"params": params}, preprocess(frames, protocol))["pool"]


def fid_features(params: Mapping, frames_uint8, *, batch_size: int = 50, protocol: str = "pytorch_fid") -> np.ndarray:
  """FID features of ``frames_uint8 [n, h, w, 3]`` (any size; resized per ``protocol``) -> ``[n, 2048]`` float32.

  Runs in fixed-size batches (the last one zero-padded) so one compilation serves every batch, with fp32
  convolutions (``batching.PRECISION``) whatever the platform's default.
  """
  frames = np.asarray(frames_uint8)
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"expected frames [n, h, w, 3], got shape {frames.shape}")
  n = frames.shape[0]
  if n == 0:
    return np.zeros((0, FEATURE_DIM), np.float32)
  params = jax.device_put(params)
  return batching.map_padded(lambda chunk: fid_features_batch(params, chunk, protocol=protocol), frames, batch_size)

