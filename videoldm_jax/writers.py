"""Metric writers and progress reporting for the train loop (process 0 only).

``create_writer`` returns clu's default writer (TensorBoard + logging) when clu's metric writers can be imported
(they need TensorFlow). Otherwise it returns ``EventFileWriter``: a dependency-free TensorBoard event-file writer
(scalars and images; animated GIF previews show as moving images in TensorBoard) plus logging. Sample videos are
also written as ``.gif`` files under ``WORKDIR/samples``.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import struct
import time
from typing import Any, Mapping, Optional

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# TFRecord framing and the few protobuf fields TensorBoard needs (hand-encoded; no TensorFlow required).
# ---------------------------------------------------------------------------------------------------------------

_CRC_TABLE = []
for _i in range(256):
  _c = _i
  for _ in range(8):
    _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
  _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  length = struct.pack("<Q", len(data))
  return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


def _varint(n: int) -> bytes:
  out = bytearray()
  n &= (1 << 64) - 1
  while True:
    b = n & 0x7F
    n >>= 7
    out.append(b | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field_bytes(num: int, payload: bytes) -> bytes:
  return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def _field_varint(num: int, value: int) -> bytes:
  return _varint(num << 3) + _varint(value)


def _event(step: int, *, summary_values: bytes = b"", file_version: Optional[str] = None) -> bytes:
  msg = _varint(1 << 3 | 1) + struct.pack("<d", time.time()) + _field_varint(2, step)
  if file_version:
    msg += _field_bytes(3, file_version.encode())
  if summary_values:
    msg += _field_bytes(5, summary_values)
  return msg


def _scalar_value(tag: str, value: float) -> bytes:
  return _field_bytes(1, _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", float(value)))


def _image_value(tag: str, encoded: bytes, height: int, width: int, channels: int) -> bytes:
  image = (_field_varint(1, height) + _field_varint(2, width) + _field_varint(3, channels)
           + _field_bytes(4, encoded))
  return _field_bytes(1, _field_bytes(1, tag.encode()) + _field_bytes(4, image))


def encode_png(img: np.ndarray) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(np.asarray(img, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def encode_gif(frames: np.ndarray, fps: float = 4.0) -> bytes:
  """``[t, h, w, 3]`` uint8 -> animated GIF bytes (looping)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  imgs = [Image.fromarray(np.asarray(f, np.uint8)) for f in frames]
  buf = io.BytesIO()
  imgs[0].save(buf, format="GIF", save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)
  return buf.getvalue()


def video_grid(videos: np.ndarray) -> np.ndarray:
  """``[n, t, h, w, 3]`` -> ``[t, h, n * w, 3]``: the n clips side by side, frame by frame."""
  n, t, h, w, c = videos.shape
  return videos.transpose(1, 2, 0, 3, 4).reshape(t, h, n * w, c)


class EventFileWriter:
  """TensorBoard event file (scalars, images, GIF videos) + logging; the clu ``MetricWriter`` methods we use."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self._f = open(self.path, "ab")
    self._f.write(tfrecord(_event(0, file_version="brain.Event:2")))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    values = b"".join(_scalar_value(k, float(v)) for k, v in scalars.items())
    self._f.write(tfrecord(_event(step, summary_values=values)))
    logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.6g}" for k, v in scalars.items()))

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    values = b""
    for k, v in images.items():
      v = np.asarray(v)
      for i, img in enumerate(v if v.ndim == 4 else v[None]):
        tag = k if v.ndim == 3 or len(v) == 1 else f"{k}/{i}"
        values += _image_value(tag, encode_png(img), img.shape[0], img.shape[1], img.shape[2])
    self._f.write(tfrecord(_event(step, summary_values=values)))

  def write_videos(self, step: int, videos: Mapping[str, np.ndarray], fps: float = 4.0) -> None:
    """``[n, t, h, w, 3]`` uint8 videos as one animated image per key."""
    values = b""
    for k, v in videos.items():
      grid = video_grid(np.asarray(v))
      values += _image_value(k, encode_gif(grid, fps), grid.shape[1], grid.shape[2], 3)
    self._f.write(tfrecord(_event(step, summary_values=values)))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    logging.info("hparams: %s", dict(hparams))

  def flush(self) -> None:
    self._f.flush()

  def close(self) -> None:
    self._f.close()


class _CluWriter:
  """clu writer + ``write_videos`` (clu's TensorBoard writer has no video support: GIF frames as images)."""

  def __init__(self, writer):
    self._w = writer

  def __getattr__(self, name):
    return getattr(self._w, name)

  def write_videos(self, step: int, videos: Mapping[str, np.ndarray], fps: float = 4.0) -> None:
    del fps
    self._w.write_images(step, {k: video_grid(np.asarray(v)) for k, v in videos.items()})


def create_writer(workdir: str, *, just_logging: bool = False):
  """clu's default writer if importable, else ``EventFileWriter`` (both write TensorBoard files to workdir)."""
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    return _CluWriter(metric_writers.create_default_writer(workdir, just_logging=just_logging))
  except ImportError:
    return EventFileWriter(workdir) if not just_logging else _LoggingOnly()


class _LoggingOnly:
  def write_scalars(self, step, scalars):
    logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.6g}" for k, v in scalars.items()))

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos, fps=4.0):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass


class ReportProgress:
  """Steps/s, ETA and time spent in named sections, written as scalars every ``every_secs`` (clu's
  ``periodic_actions.ReportProgress`` when available, else this small equivalent)."""

  def __init__(self, num_train_steps: int, writer, every_secs: float = 60.0, every_steps: Optional[int] = None):
    self.total, self.writer = num_train_steps, writer
    self.every_secs, self.every_steps = every_secs, every_steps
    self._t0 = self._last_t = time.time()
    self._last_step: Optional[int] = None
    self.steps_per_sec: Optional[float] = None

  def __call__(self, step: int) -> None:
    now = time.time()
    if self._last_step is None:
      self._last_step, self._last_t = step, now
      return
    due = (now - self._last_t >= self.every_secs) or (self.every_steps and step % self.every_steps == 0)
    if not due or step == self._last_step:
      return
    self.steps_per_sec = (step - self._last_step) / max(now - self._last_t, 1e-9)
    eta = (self.total - step) / max(self.steps_per_sec, 1e-9)
    self.writer.write_scalars(step, {"steps_per_sec": self.steps_per_sec})
    logging.info("step %d/%d: %.3f steps/s, ETA %.1f min", step, self.total, self.steps_per_sec, eta / 60)
    self._last_step, self._last_t = step, now
