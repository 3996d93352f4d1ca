"""Stored examples -> clips: frame selection by time, JPEG frame decoding, latent-moment records.

Prepared video datasets (``data_pipelines``) hold frames at a constant stored rate ``F``; a clip of ``t`` frames
at ``fps`` takes stored frames ``round((start + k / fps) * F)``. Pre-encoded latent datasets hold VAE posterior
moments ``[n, h/8, w/8, 2c]`` (mean | logvar) per stored frame, serialised with msgpack (no pickle).
"""

from __future__ import annotations

import io
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import msgpack
import numpy as np

from videoldm_jax.data import video as video_lib

LOGVAR_RANGE = (-30.0, 20.0)  # the VAE clamps its log-variance to this range


class ClipError(ValueError):
  """A stored example cannot provide the requested clip; ``reason`` is counted like VideoDecodeError's."""

  def __init__(self, name: str, reason: str, detail: str = ""):
    self.name, self.reason, self.detail = name, reason, detail
    super().__init__(f"{name}: {reason}" + (f" ({detail})" if detail else ""))

  def __reduce__(self):
    return (type(self), (self.name, self.reason, self.detail))


def text(value: Any) -> str:
  """TFDS returns Text features as bytes; everything downstream wants str."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray):
    return text(value.item())
  return str(value)


# ----------------------------------------------------------------------------------------------------------
# Frame selection.

def select_frame_indices(num_stored: int, stored_fps: float, num_frames: int, fps: float,
                         rng: Optional[np.random.Generator] = None, start: Optional[float] = None,
                         name: str = "") -> np.ndarray:
  """Indices of the stored frames nearest to ``start + k / fps``; random ``start`` when ``rng`` is given.

  Raises ``ClipError('too_short')`` when the clip does not fit, ``ClipError('fps_too_high')`` when the
  requested rate exceeds the stored one (frames would repeat).
  """
  if fps > stored_fps * (1 + 1e-3):
    raise ClipError(name, "fps_too_high", f"requested {fps} fps from frames stored at {stored_fps:.3f} fps")
  available = (num_stored - 1) / stored_fps
  span = (num_frames - 1) / fps
  if span > available + 1e-6:
    raise ClipError(name, video_lib.VideoDecodeError.TOO_SHORT,
                    f"{num_frames} frames at {fps} fps need {span:.2f}s, have {available:.2f}s")
  if start is None:
    start = float(rng.uniform(0.0, available - span)) if (rng is not None and available > span) else 0.0
  times = start + np.arange(num_frames) / fps
  # Half-frame rounding ties go down (the frame on screen at that instant), matching the PyAV decoder.
  idx = np.ceil(times * stored_fps - 0.5 - 1e-6).astype(np.int64)
  return np.clip(idx, 0, num_stored - 1)


def decode_jpeg_frames(frames: Sequence[bytes], indices: Sequence[int], size: Optional[Tuple[int, int]] = None,
                       rng: Optional[np.random.Generator] = None) -> np.ndarray:
  """uint8 ``[len(indices), h, w, 3]``: decodes only the selected JPEG frames; ``size`` = resize-cover + crop."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  cache: Dict[int, np.ndarray] = {}
  out = []
  for i in indices:
    i = int(i)
    if i not in cache:
      with Image.open(io.BytesIO(frames[i])) as im:
        if size is not None:
          rh, rw = video_lib.cover_size((im.height, im.width), size)
          if (rh, rw) != (im.height, im.width):
            im.draft("RGB", (rw, rh))  # JPEG DCT-domain downscale when much larger: cheap
            im = im.convert("RGB").resize((rw, rh), Image.BILINEAR)
        cache[i] = np.asarray(im.convert("RGB"))
    out.append(cache[i])
  frames_arr = np.stack(out)
  if size is not None:
    y, x = video_lib.crop_offsets(frames_arr.shape[1:3], size, rng)
    frames_arr = frames_arr[:, y:y + size[0], x:x + size[1]]
  return frames_arr


# ----------------------------------------------------------------------------------------------------------
# Latent records.

def _pack_default(obj):
  if isinstance(obj, np.ndarray):
    return {"__nd__": True, "dtype": obj.dtype.str, "shape": list(obj.shape), "data": obj.tobytes()}
  if isinstance(obj, np.generic):
    return obj.item()
  raise TypeError(f"cannot serialise {type(obj)}")


def _unpack_hook(obj):
  if obj.get("__nd__"):
    return np.frombuffer(obj["data"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
  return obj


def serialize(record: Mapping[str, Any]) -> bytes:
  """dict of numpy arrays / scalars / str / nested dicts -> bytes."""
  return msgpack.packb(dict(record), default=_pack_default, use_bin_type=True)


def deserialize(data: bytes) -> Dict[str, Any]:
  return msgpack.unpackb(data, object_hook=_unpack_hook, raw=False)


def sample_latents(moments: np.ndarray, rng: np.random.Generator, scale: float) -> np.ndarray:
  """``(mean + std * eps) * scale`` from moments ``[..., 2c]`` (mean | logvar); float32 ``[..., c]``."""
  moments = np.asarray(moments, np.float32)
  mean, logvar = np.split(moments, 2, axis=-1)
  std = np.exp(0.5 * np.clip(logvar, *LOGVAR_RANGE))
  return ((mean + std * rng.standard_normal(mean.shape, dtype=np.float32)) * scale).astype(np.float32)
