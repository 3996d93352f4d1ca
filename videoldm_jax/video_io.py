"""Writing sampled videos: a grid of videos as mp4 / gif, a contact sheet as png (host numpy, uint8)."""

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


def tile_videos(videos: np.ndarray, cols: Optional[int] = None, gap: int = 2) -> np.ndarray:
  """``[n, t, h, w, 3]`` -> ``[t, H, W, 3]``: the videos in a grid (``cols`` columns, ~square by default)."""
  n, t, h, w, c = videos.shape
  cols = cols or int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / cols))
  grid = np.full((t, rows * (h + gap) - gap, cols * (w + gap) - gap, c), 255, np.uint8)
  for i in range(n):
    r, k = divmod(i, cols)
    grid[:, r * (h + gap):r * (h + gap) + h, k * (w + gap):k * (w + gap) + w] = videos[i]
  return grid


def contact_sheet(videos: np.ndarray, gap: int = 2) -> np.ndarray:
  """``[n, t, h, w, 3]`` -> one image: a row per video, a column per frame."""
  n, t, h, w, c = videos.shape
  sheet = np.full((n * (h + gap) - gap, t * (w + gap) - gap, c), 255, np.uint8)
  for i in range(n):
    for j in range(t):
      sheet[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = videos[i, j]
  return sheet


def write_mp4(frames: np.ndarray, path: str, fps: float) -> None:
  """``[t, h, w, 3]`` uint8 -> H.264 mp4 (PyAV; MPEG-4 part 2 where libx264 is missing). Odd sizes are padded
  by one pixel (4:2:0 chroma needs even sizes)."""
  t, h, w, _ = frames.shape
  frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
  codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
  with av.open(path, "w") as container:
    stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
    stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    if codec == "libx264":
      stream.options = {"crf": "12"}
    for f in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
    container.mux(stream.encode())


def write_outputs(videos: np.ndarray, output: str, fps: float, upscale: int = 0,
                  sheet_frames: int = 0) -> Dict[str, str]:
  """``OUTPUT.mp4`` / ``OUTPUT.gif`` (grid of the videos) and ``OUTPUT.png`` (contact sheet). ``upscale`` 0:
  nearest-neighbour to at least 128 px high (the runlocal models make 32 px frames). ``sheet_frames`` > 0: the
  contact sheet shows that many evenly spaced frames (long videos)."""
  factor = upscale or max(1, int(np.ceil(128 / videos.shape[2])))
  videos = _upscale(videos, factor)
  root, ext = os.path.splitext(output)
  output = root if ext.lower() in (".mp4", ".gif", ".png") else output
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  grid = tile_videos(videos)
  paths = {"mp4": output + ".mp4", "gif": output + ".gif", "png": output + ".png"}
  write_mp4(grid, paths["mp4"], fps)
  with open(paths["gif"], "wb") as f:
    f.write(writers.encode_gif(grid, fps))
  with open(paths["png"], "wb") as f:
    sheet = videos
    if sheet_frames and videos.shape[1] > sheet_frames:
      sheet = videos[:, np.linspace(0, videos.shape[1] - 1, sheet_frames).round().astype(int)]
    f.write(writers.encode_png(contact_sheet(sheet)))
  return paths
