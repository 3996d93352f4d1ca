"""Writing sampled videos: a grid of videos as mp4 / gif, a contact sheet as png (host numpy, uint8), streamed
chunk by chunk (``VideoWriter``) so long videos never sit whole in host memory."""

from __future__ import annotations

import os
from fractions import Fraction
from typing import Dict, Optional

import av
import numpy as np

from videoldm_jax import writers


def _upscale(frames: np.ndarray, factor: int) -> np.ndarray:
  """Nearest-neighbour upscaling of the two axes before the channel axis."""
  if factor <= 1:
    return frames
  return np.repeat(np.repeat(frames, factor, axis=-3), factor, axis=-2)


def tile_videos(videos: np.ndarray, cols: Optional[int] = None, gap: int = 2, fill: int = 255) -> np.ndarray:
  """``[n, t, h, w, c]`` -> ``[t, H, W, c]``: the videos in a grid (``cols`` columns, ~square by default), ``gap``
  pixels of ``fill`` between them."""
  n, t, h, w = videos.shape[:4]
  cols = cols or int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / cols))
  grid = np.full((t, rows * (h + gap) - gap, cols * (w + gap) - gap) + videos.shape[4:], fill, videos.dtype)
  for i in range(n):
    r, k = divmod(i, cols)
    grid[:, r * (h + gap):r * (h + gap) + h, k * (w + gap):k * (w + gap) + w] = videos[i]
  return grid


def _untile(grid: np.ndarray, n: int, h: int, w: int, gap: int) -> np.ndarray:
  """Inverse of ``tile_videos`` for ``n`` videos of ``h x w``: ``[t, H, W, ...]`` -> ``[n, t, h, w, ...]``."""
  cols = int(np.ceil(np.sqrt(n)))
  return np.stack([grid[:, (i // cols) * (h + gap):(i // cols) * (h + gap) + h,
                        (i % cols) * (w + gap):(i % cols) * (w + gap) + w] for i in range(n)])


def contact_sheet(videos: np.ndarray, gap: int = 2) -> np.ndarray:
  """``[n, t, h, w, 3]`` -> one image: a row per video, a column per frame."""
  n, t, h, w, c = videos.shape
  sheet = np.full((n * (h + gap) - gap, t * (w + gap) - gap, c), 255, np.uint8)
  for i in range(n):
    for j in range(t):
      sheet[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = videos[i, j]
  return sheet


class _Mp4Encoder:
  """RGB frames -> H.264 mp4 one at a time (PyAV; MPEG-4 part 2 where libx264 is missing). Odd sizes are padded
  by one pixel (4:2:0 chroma needs even sizes)."""

  def __init__(self, path: str, height: int, width: int, fps: float):
    self.pad = ((0, height % 2), (0, width % 2), (0, 0))
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    self.container = av.open(path, "w")
    self.stream = self.container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
    self.stream.width, self.stream.height, self.stream.pix_fmt = width + width % 2, height + height % 2, "yuv420p"
    if codec == "libx264":  # "veryfast": ~4x the default preset's speed at about the same size for crf 12
      self.stream.options = {"crf": "12", "preset": "veryfast"}

  def add(self, frame: np.ndarray) -> None:
    frame = np.ascontiguousarray(np.pad(frame, self.pad, mode="edge"))
    self.container.mux(self.stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))

  def close(self) -> None:
    self.container.mux(self.stream.encode())
    self.container.close()


def quantize(frame: np.ndarray, colours: int = 256):
  """``[h, w, 3]`` uint8 -> (``[h, w]`` uint8 palette indices, ``[colours, 3]`` uint8 palette): PIL's median cut
  (what PIL's own GIF writer does). Its cost follows the pixel and distinct-colour counts: 0.6 ms for a 32x128
  frame of smooth colours, 6 ms for one of uniform noise (FFmpeg's ``palettegen`` took ~110 ms per frame)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  quantized = Image.fromarray(np.ascontiguousarray(frame)).quantize(colours, method=Image.Quantize.MEDIANCUT)
  palette = np.zeros((colours, 3), np.uint8)
  used = np.asarray(quantized.getpalette() or [], np.uint8).reshape(-1, 3)[:colours]
  palette[:len(used)] = used
  return np.asarray(quantized, np.uint8), palette


class _GifEncoder:
  """Palette-indexed frames -> looping animated GIF one at a time (PyAV / FFmpeg's GIF encoder), each frame with
  its own 256-colour palette, so nothing waits for the whole video."""

  def __init__(self, path: str, height: int, width: int, fps: float):
    rate = Fraction(fps).limit_denominator(1000)
    self.time_base, self.count = 1 / rate, 0
    self.container = av.open(path, "w", format="gif")
    self.stream = self.container.add_stream("gif", rate=rate)
    self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "pal8"

  def add(self, indices: np.ndarray, palette: np.ndarray) -> None:
    """``indices`` ``[h, w]`` uint8 into ``palette`` ``[256, 3]`` uint8 RGB."""
    argb = np.concatenate([np.full((256, 1), 255, np.uint8), palette], axis=1)
    f = av.VideoFrame.from_ndarray((np.ascontiguousarray(indices), argb), format="pal8")
    f.pts, f.time_base = self.count, self.time_base
    self.count += 1
    self.container.mux(self.stream.encode(f))

  def close(self) -> None:
    self.container.mux(self.stream.encode())
    self.container.close()


class FrameSelector:
  """Keeps the frames at ``indices`` (of the whole video) of streamed chunks ``[n, k, h, w, c]``."""

  def __init__(self, indices):
    self.indices = np.asarray(sorted(set(int(i) for i in indices)), np.int64)
    self.kept: list = []
    self.seen = 0

  def add(self, chunk: np.ndarray) -> None:
    k = chunk.shape[1]
    local = self.indices[(self.indices >= self.seen) & (self.indices < self.seen + k)] - self.seen
    if len(local):
      self.kept.append(np.asarray(chunk[:, local]))
    self.seen += k

  def result(self) -> np.ndarray:
    """``[n, len(indices), h, w, c]`` (the indices seen so far)."""
    return np.concatenate(self.kept, axis=1)


class VideoWriter:
  """Streams uint8 chunks ``[n, k, h, w, 3]`` of ``num_frames``-frame videos into OUTPUT.mp4 and OUTPUT.gif (the
  n videos in a grid) and, on ``close``, OUTPUT.png (contact sheet); holds only the sheet's frames, so host memory
  does not grow with the video length. ``upscale`` 0: nearest-neighbour to at least 128 px high (the runlocal
  models make 32 px frames). ``sheet_frames`` > 0: the sheet shows that many evenly spaced frames."""

  def __init__(self, output: str, fps: float, num_frames: int, upscale: int = 0, sheet_frames: int = 0):
    root, ext = os.path.splitext(output)
    output = root if ext.lower() in (".mp4", ".gif", ".png") else output
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    self.paths = {"mp4": output + ".mp4", "gif": output + ".gif", "png": output + ".png"}
    self.fps, self.upscale = float(fps), int(upscale)
    sheet = np.arange(num_frames)
    if sheet_frames and num_frames > sheet_frames:
      sheet = np.linspace(0, num_frames - 1, sheet_frames).round().astype(int)
    self.sheet = FrameSelector(sheet)
    self.encoders = None

  def add(self, chunk: np.ndarray) -> None:
    chunk = np.asarray(chunk)
    n, _, h, w = chunk.shape[:4]
    if self.encoders is None:
      self.factor = self.upscale or max(1, int(np.ceil(128 / h)))
    big = _upscale(chunk, self.factor)
    grid = tile_videos(big)
    if self.encoders is None:
      gh, gw = grid.shape[1:3]
      self.mp4, self.gif = _Mp4Encoder(self.paths["mp4"], gh, gw, self.fps), _GifEncoder(self.paths["gif"], gh, gw, self.fps)
      self.encoders = [self.mp4, self.gif]
    # The gif palette comes from the frames before upscaling (with a 1-pixel gap): nearest-neighbour upscaling
    # multiplies every colour's count alike, so the median cut is about the same at 1/factor^2 of the cost.
    for frame, small in zip(grid, tile_videos(chunk, gap=1)):
      self.mp4.add(frame)
      indices, palette = quantize(small)
      gap_index = int(indices[0, w]) if n > 1 else 0
      cells = _upscale(_untile(indices[None, ..., None], n, h, w, gap=1), self.factor)
      self.gif.add(tile_videos(cells, fill=gap_index)[0, ..., 0], palette)
    self.sheet.add(big)

  def close(self) -> Dict[str, str]:
    if self.encoders is None:
      raise ValueError(f"{self.paths['mp4']}: no frames were written")
    for enc in self.encoders:
      enc.close()
    with open(self.paths["png"], "wb") as f:
      f.write(writers.encode_png(contact_sheet(self.sheet.result())))
    return self.paths

  def __enter__(self) -> "VideoWriter":
    return self

  def __exit__(self, exc_type, *_) -> None:
    if exc_type is not None and self.encoders is not None:  # keep what was written readable
      for enc in self.encoders:
        enc.close()


def write_outputs(videos: np.ndarray, output: str, fps: float, upscale: int = 0,
                  sheet_frames: int = 0) -> Dict[str, str]:
  """``OUTPUT.mp4`` / ``OUTPUT.gif`` (grid of the videos ``[n, t, h, w, 3]``) and ``OUTPUT.png`` (contact sheet);
  see ``VideoWriter``."""
  writer = VideoWriter(output, fps, videos.shape[1], upscale, sheet_frames)
  writer.add(videos)
  return writer.close()
