"""C3D (Tran et al. 2015) UCF-101 classifier for the video Inception Score, in linen, channels-last.

Architecture: the Caffe C3D network as ported to PyTorch (``C3D`` modules with ``conv1, conv2, conv3a, conv3b, conv4a,
conv4b, conv5a, conv5b, fc6, fc7, fc8``; e.g. DavideA/c3d-pytorch with ``fc8`` -> 101 UCF-101 classes): eight
3x3x3 convs (+ReLU), five max-pools (the first spatial only), fc6 / fc7 (+ReLU, dropout = identity at eval) and
fc8. Input ``[b, 16, 112, 112, 3]``; after ``pool5`` the activations are ``[b, 1, 4, 4, 512]`` and are flattened in
PyTorch's ``[c, t, h, w]`` order (8192 values) so ``fc6`` weights load without permutation.

``pool5`` must turn the 7x7 map of ``conv5b`` into 4x4; two conventions exist:

* ``"ceil"`` (default): Caffe's ceil-mode pooling, windows ``[0,1], [2,3], [4,5], [6]``. The network that defined
  the published numbers (Caffe C3D fine-tuned on UCF-101, run through Chainer by TGAN / TGANv2, whose
  ``max_pooling_nd`` is ceil-mode too) computes this.
* ``"pad"``: the PyTorch port's ``MaxPool3d(2, 2, padding=(0, 1, 1))``, windows ``[-1,0], [1,2], [3,4], [5,6]``.
  Choose it for weights trained from scratch with that port.

IS protocol (TGAN / TGANv2 ``calc_is``, followed by Make-A-Video and Video LDM; 16 frames, 10 splits), implemented
by :func:`preprocess` and the module:

1. every frame (uint8 RGB, any size) is resized to 128x128 -- aspect ratio not kept -- with bicubic
   interpolation as ``cv2.resize(..., INTER_CUBIC)`` does it on float input (Keys kernel ``a = -0.75``, half-pixel
   centres, replicated border, no antialiasing, no clipping). TGAN resized to 128x128, not to 112 directly,
   because C3D was trained on 128x171 frames centre-cropped to 112;
2. the central 112x112 is cropped (offset 8);
3. RGB -> BGR (Caffe C3D was trained on OpenCV-decoded BGR frames);
4. the mean is subtracted: by default the per-channel BGR constants ``(90.2516, 97.6570, 101.4083)`` that TGANv2's
   C3D UCF-101 wrapper lists as the alternative to its per-pixel mean clip; pass that clip (``mean2.npz``,
   ``[3, 16, 128, 171]``) to :func:`load_c3d` to reproduce the per-pixel subtraction exactly. The mean is a param
   of the module (``input_mean [16, 112, 112, 3]``, like the Chainer wrapper's ``Bias`` link), so
   ``c3d_probs(params, videos)`` is self-contained.

The probabilities are ``softmax(fc8)``; the score itself (``exp E[KL(p(y|x) || p(y))]`` over 10 splits,
mean +- std) is computed by ``evaluation/statistics.py``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Mapping, Optional, Tuple, Union

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from videoldm_jax.conversion.core import DictSource, PrefixSource, TensorSource, convert_strict
from videoldm_jax.conversion.io import open_checkpoint
from videoldm_jax.evaluation import batching

NUM_FRAMES = 16
RESIZE = 128
CROP = 112
CROP_OFFSET = (RESIZE - CROP) // 2
NUM_CLASSES = 101
CUBIC_A = -0.75  # OpenCV's (and PyTorch's) bicubic coefficient
DEFAULT_MEAN_BGR = (90.25164795, 97.65701294, 101.4083252)
MEAN_CLIP_SHAPE = (3, NUM_FRAMES, 128, 171)  # Caffe C3D mean clip: BGR, channel-first, 128x171 frames
POOL5_MODES = ("ceil", "pad")
MEAN_KEY = "input_mean"


@dataclasses.dataclass(frozen=True)
class C3DConfig:
  """``widths``: output channels of conv1, conv2, conv3*, conv4*, conv5*; ``fc_features``: width of fc6/fc7."""
  num_classes: int = NUM_CLASSES
  widths: Tuple[int, ...] = (64, 128, 256, 512, 512)
  fc_features: int = 4096
  pool5: str = "ceil"

  def __post_init__(self):
    object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
    if len(self.widths) != 5:
      raise ValueError(f"C3DConfig.widths needs 5 entries (conv1, conv2, conv3, conv4, conv5), got {self.widths}")
    if self.pool5 not in POOL5_MODES:
      raise ValueError(f"C3DConfig.pool5 must be one of {POOL5_MODES}, got {self.pool5!r}")

  @classmethod
  def tiny(cls, **overrides) -> "C3DConfig":
    """Same layer layout and input size with few channels, for CPU tests."""
    return cls(**{"widths": (4, 8, 8, 16, 16), "fc_features": 32, **overrides})


# ----------------------------------------------------------------------------------------------------------
# Preprocessing.

def _cubic(x: np.ndarray) -> np.ndarray:
  """Keys cubic convolution kernel with ``a = -0.75``."""
  a, x = CUBIC_A, np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """``[out_size, in_size]`` float32 weights of ``cv2.resize(INTER_CUBIC)`` / ``F.interpolate(mode="bicubic",
  align_corners=False)`` along one axis: 4 taps around ``(dst + 0.5) * in / out - 0.5``, indices clamped."""
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
  base = np.floor(src).astype(np.int64)
  frac = src - base
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  for tap in (-1, 0, 1, 2):
    np.add.at(m, (rows, np.clip(base + tap, 0, in_size - 1)), _cubic(frac - tap))
  return m.astype(np.float32)


def preprocess(videos: jax.Array) -> jax.Array:
  """uint8 RGB ``[n, 16, h, w, 3]`` -> BGR float32 ``[n, 16, 112, 112, 3]`` (steps 1-3 of the module doc; the
  mean is subtracted by the module)."""
  if videos.ndim != 5 or videos.shape[1] != NUM_FRAMES or videos.shape[-1] != 3:
    raise ValueError(f"C3D expects videos [n, {NUM_FRAMES}, h, w, 3], got shape {tuple(videos.shape)}")
  n, t, h, w, _ = videos.shape
  x = einops.rearrange(videos.astype(jnp.float32), "n t h w c -> (n t) h w c")
  if (h, w) != (RESIZE, RESIZE):
    mh, mw = bicubic_matrix(h, RESIZE), bicubic_matrix(w, RESIZE)
    x = jnp.einsum("oh,nhwc->nowc", jnp.asarray(mh), x, precision=jax.lax.Precision.HIGHEST)
    x = jnp.einsum("pw,nowc->nopc", jnp.asarray(mw), x, precision=jax.lax.Precision.HIGHEST)
  x = x[:, CROP_OFFSET:CROP_OFFSET + CROP, CROP_OFFSET:CROP_OFFSET + CROP, ::-1]  # crop, RGB -> BGR
  return einops.rearrange(x, "(n t) h w c -> n t h w c", n=n, t=t)


def mean_from_array(mean) -> np.ndarray:
  """A C3D input mean as the module's ``input_mean`` ``[16, 112, 112, 3]`` (BGR, float32).

  Accepts ``None`` (the default per-channel constants), ``[3]`` BGR per-channel values, Caffe's mean clip
  ``[3, 16, 128, 171]`` / ``[1, 3, 16, 128, 171]`` (centre 128 columns, then the 112 crop at offset 8, as TGAN
  does), or ``[16, 112, 112, 3]`` as is.
  """
  if mean is None:
    mean = np.asarray(DEFAULT_MEAN_BGR, np.float32)
  mean = np.asarray(mean, np.float32)
  if mean.shape == (1,) + MEAN_CLIP_SHAPE:
    mean = mean[0]
  if mean.shape == (3,):
    return np.broadcast_to(mean, (NUM_FRAMES, CROP, CROP, 3)).copy()
  if mean.shape == MEAN_CLIP_SHAPE:
    left = (MEAN_CLIP_SHAPE[3] - RESIZE) // 2 + CROP_OFFSET  # 21 + 8
    clip = mean[:, :, CROP_OFFSET:CROP_OFFSET + CROP, left:left + CROP]
    return np.ascontiguousarray(clip.transpose(1, 2, 3, 0))
  if mean.shape == (NUM_FRAMES, CROP, CROP, 3):
    return mean.copy()
  raise ValueError(f"C3D mean: expected shape (3,), {MEAN_CLIP_SHAPE}, (1, *{MEAN_CLIP_SHAPE}) or "
                   f"({NUM_FRAMES}, {CROP}, {CROP}, 3), got {mean.shape}")


def read_mean(path: str) -> np.ndarray:
  """A mean clip from ``.npy`` / ``.npz`` (``allow_pickle=False``: arrays only; an ``.npz`` needs one array or a
  ``mean`` entry), as ``input_mean`` ``[16, 112, 112, 3]``."""
  with np.load(path, allow_pickle=False) as data:
    if isinstance(data, np.ndarray):
      return mean_from_array(data)
    names = list(data.keys())
    if "mean" in names:
      return mean_from_array(data["mean"])
    if len(names) != 1:
      raise ValueError(f"{path}: expected a 'mean' array or a single array, found {names}")
    return mean_from_array(data[names[0]])


# ----------------------------------------------------------------------------------------------------------
# Network. Plain (unpartitioned) params: a frozen classifier, replicated on every device.

def _max_pool(x: jax.Array, window: Tuple[int, int, int], mode: str = "floor") -> jax.Array:
  """Max-pool ``[b, t, h, w, c]`` with stride = window. ``mode``: ``"floor"`` (VALID), ``"ceil"`` (Caffe: a last
  partial window when the size is not divisible) or ``"pad"`` (PyTorch port's pool5: one -inf pixel on both sides
  of h and w)."""
  if mode == "pad":
    padding = ((0, 0), (1, 1), (1, 1))
  elif mode == "ceil":
    padding = tuple((0, -(-(n - k) // k) * k + k - n) for n, k in zip(x.shape[1:4], window))
  else:
    padding = "VALID"
  return nn.max_pool(x, window, strides=window, padding=padding)


class C3D(nn.Module):
  """``[b, 16, 112, 112, 3]`` BGR pixel values (0..255) -> ``fc8`` logits ``[b, num_classes]``; ``input_mean``
  is subtracted first."""
  config: C3DConfig = C3DConfig()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    x = x - self.param(MEAN_KEY, lambda _, s: jnp.broadcast_to(jnp.asarray(DEFAULT_MEAN_BGR, jnp.float32), s),
                       (NUM_FRAMES, CROP, CROP, 3))
    conv = lambda features, name: nn.Conv(features, (3, 3, 3), padding=[(1, 1)] * 3, name=name)
    w1, w2, w3, w4, w5 = cfg.widths
    x = _max_pool(nn.relu(conv(w1, "conv1")(x)), (1, 2, 2))  # [b, 16, 56, 56, w1]
    x = _max_pool(nn.relu(conv(w2, "conv2")(x)), (2, 2, 2))  # [b, 8, 28, 28, w2]
    for names, width, mode in ((("conv3a", "conv3b"), w3, "floor"), (("conv4a", "conv4b"), w4, "floor"),
                               (("conv5a", "conv5b"), w5, cfg.pool5)):
      for name in names:
        x = nn.relu(conv(width, name)(x))
      x = _max_pool(x, (2, 2, 2), mode)  # -> [b, 4, 14, 14], [b, 2, 7, 7], [b, 1, 4, 4]
    x = einops.rearrange(x, "b t h w c -> b (c t h w)")  # PyTorch's view(-1, 8192) of [b, c, t, h, w]
    x = nn.relu(nn.Dense(cfg.fc_features, name="fc6")(x))
    x = nn.relu(nn.Dense(cfg.fc_features, name="fc7")(x))
    return nn.Dense(cfg.num_classes, name="fc8")(x)


def abstract_params(config: C3DConfig = C3DConfig()) -> Mapping:
  """Param shapes of :class:`C3D` (``jax.ShapeDtypeStruct``), without allocating them."""
  x = jax.ShapeDtypeStruct((1, NUM_FRAMES, CROP, CROP, 3), jnp.float32)
  return jax.eval_shape(C3D(config).init, jax.random.key(0), x)["params"]


# ----------------------------------------------------------------------------------------------------------
# Weights.

def _strip_module_prefix(source: TensorSource) -> TensorSource:
  """``nn.DataParallel`` checkpoints prefix every key with ``module.``; anything mixed is left to fail strictly."""
  keys = source.keys()
  if keys and all(k.startswith("module.") for k in keys):
    return PrefixSource(source, "module.")
  return source


def convert_c3d(source: Union[TensorSource, Mapping[str, object]], config: C3DConfig = C3DConfig(), *,
                mean=None, dtype=np.float32) -> Dict:
  """PyTorch C3D state dict (``conv1.weight`` ... ``fc8.bias``) -> :class:`C3D` params (numpy).

  Strict: every conv / fc tensor must be present with its shape and nothing else may be in the file (a
  ``module.`` prefix on every key is removed). Raises :class:`~videoldm_jax.conversion.core.ConversionError` (a
  ``ValueError``) naming the keys. ``mean``: see :func:`mean_from_array` (an array, or None for the defaults).
  """
  if not isinstance(source, TensorSource):
    source = DictSource(source)
  abstract = dict(abstract_params(config))
  abstract.pop(MEAN_KEY)
  params = convert_strict(_strip_module_prefix(source), abstract, dtype=dtype, what="C3D")
  params[MEAN_KEY] = mean_from_array(mean).astype(dtype)
  return params


def load_c3d(path: Union[str, TensorSource], config: C3DConfig = C3DConfig(), *,
             mean: Optional[Union[str, np.ndarray]] = None) -> Dict:
  """Reads user-supplied UCF-101 C3D weights (``.pth``/``.pt``/``.bin`` via ``torch.load(weights_only=True)``, or
  ``.safetensors``) and converts them strictly (float32, on the default device). ``mean``: None (per-channel
  defaults), an array, or a ``.npy``/``.npz`` path (e.g. TGAN's ``mean2.npz``)."""
  source = path if isinstance(path, TensorSource) else open_checkpoint(path)
  if isinstance(mean, str):
    mean = read_mean(mean)
  return jax.device_put(convert_c3d(source, config, mean=mean))


# ----------------------------------------------------------------------------------------------------------
# Probabilities.

@functools.partial(jax.jit, static_argnames=("config",))
def c3d_probs_batch(params: Mapping, videos: jax.Array, config: C3DConfig = C3DConfig()) -> jax.Array:
  """Jittable core: uint8 RGB videos ``[n, 16, h, w, 3]`` -> class probabilities ``[n, num_classes]`` float32.
  :func:`c3d_probs` calls it under ``jax.default_matmul_precision(batching.PRECISION)`` (full fp32 convolutions)."""
  logits = C3D(config).apply({"params": params}, preprocess(videos))
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def c3d_probs(params: Mapping, videos_uint8, *, batch_size: int = 8, config: Optional[C3DConfig] = None) -> np.ndarray:
  """UCF-101 class probabilities ``[n, 101]`` of ``videos_uint8 [n, 16, h, w, 3]`` (RGB) under the protocol of
  the module doc. Fixed-size batches (the last one zero-padded), one compilation.

  ``config``: default :class:`C3DConfig` with ``num_classes`` taken from the ``fc8`` params.
  """
  videos = np.asarray(videos_uint8)
  if videos.ndim != 5 or videos.shape[1] != NUM_FRAMES or videos.shape[-1] != 3:
    raise ValueError(f"C3D expects videos [n, {NUM_FRAMES}, h, w, 3], got shape {videos.shape}")
  if config is None:
    config = C3DConfig(num_classes=int(np.shape(params["fc8"]["bias"])[0]))
  n = videos.shape[0]
  if n == 0:
    return np.zeros((0, config.num_classes), np.float32)
  params = jax.device_put(params)
  return batching.map_padded(lambda chunk: c3d_probs_batch(params, chunk, config=config), videos, batch_size)
