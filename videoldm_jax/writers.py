"""Metric writers and progress reporting for the train loop (process 0 only).

``create_writer`` returns a TensorBoard writer built on the ``tensorboard`` package's own event-file writer and
summary protos (pure Python, no TensorFlow): scalars (also logged), images, sample videos as animated GIF image
summaries (TensorBoard plays them) and hparams (the HPARAMS dashboard). Other processes get a logging-only writer.
The train loop also writes sample videos as ``.gif`` files under ``WORKDIR/samples``.
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any, Mapping, Optional

import numpy as np


def encode_png(img: np.ndarray) -> bytes:
  """``[h, w, c]`` uint8 -> PNG bytes."""
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


def _log_scalars(step: int, scalars: Mapping[str, Any]) -> None:
  logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.6g}" for k, v in scalars.items()))


class TensorBoardWriter:
  """Event file under ``logdir`` (scalars, images, GIF videos, hparams) + logging of scalars."""

  def __init__(self, logdir: str):
    from tensorboard.summary.writer import event_file_writer  # pylint: disable=g-import-not-at-top
    self._writer = event_file_writer.EventFileWriter(logdir)

  def _write(self, step: int, values) -> None:
    from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
    summary = values if isinstance(values, summary_pb2.Summary) else summary_pb2.Summary(value=values)
    self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  @staticmethod
  def _image(tag: str, encoded: bytes, height: int, width: int, channels: int):
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    image = summary_pb2.Summary.Image(height=height, width=width, colorspace=channels,
                                      encoded_image_string=encoded)
    return summary_pb2.Summary.Value(tag=tag, image=image)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    self._write(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()])
    _log_scalars(step, scalars)

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """``[h, w, c]`` or ``[n, h, w, c]`` uint8 per key; several images get tags ``key/i``."""
    values = []
    for k, v in images.items():
      v = np.asarray(v)
      for i, img in enumerate(v if v.ndim == 4 else v[None]):
        tag = k if v.ndim == 3 or len(v) == 1 else f"{k}/{i}"
        values.append(self._image(tag, encode_png(img), *img.shape))
    self._write(step, values)

  def write_videos(self, step: int, videos: Mapping[str, np.ndarray], fps: float = 4.0) -> None:
    """``[n, t, h, w, 3]`` uint8 videos: one animated GIF image per key, the n clips side by side."""
    values = []
    for k, v in videos.items():
      grid = video_grid(np.asarray(v))
      values.append(self._image(k, encode_gif(grid, fps), grid.shape[1], grid.shape[2], 3))
    self._write(step, values)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """bool / int / float / str values, shown in TensorBoard's HPARAMS dashboard; also logged."""
    from tensorboard.plugins.hparams import summary_v2  # pylint: disable=g-import-not-at-top
    self._write(0, summary_v2.hparams_pb(dict(hparams)))
    logging.info("hparams: %s", dict(hparams))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class _LoggingOnly:
  """The writer of processes other than 0: scalars to the log, nothing else."""

  def write_scalars(self, step, scalars):
    _log_scalars(step, scalars)

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


def create_writer(workdir: str, *, just_logging: bool = False):
  """A ``TensorBoardWriter`` on ``workdir``, or a logging-only writer when ``just_logging``."""
  return _LoggingOnly() if just_logging else TensorBoardWriter(workdir)


class ReportProgress:
  """Steps/s and ETA, written as a scalar and logged every ``every_secs`` (or every ``every_steps`` steps)."""

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
