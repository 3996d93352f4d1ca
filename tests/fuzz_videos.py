"""Hostile video inputs for the decoding and data-preparation tests, and worker-crash hooks.

``write_fuzz_videos(folder)`` writes ~30 tiny files (well under a second in all): a one-frame video, zero-duration
ones, declared sizes FFmpeg refuses or the bitstream contradicts, odd pixel formats, a 2x2 video, an audio-only
file and a valid mp4 with a corrupted header at many byte offsets. The crash hooks stand in for the builder's
per-file functions inside the decoding workers (they are imported there by name, so they live in this module).
"""

import fractions
import os
import signal
import struct
import time

import av
import numpy as np

from data_pipelines import common
from videoldm_jax.data import video

BITS = 8


def write_silent_audio(path: str) -> None:
  """A file with 0.1 s of silent audio and no video stream."""
  with av.open(path, "w") as c:
    s = c.add_stream("pcm_s16le", rate=8000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
    frame.sample_rate = 8000
    for p in s.encode(frame):
      c.mux(p)
    for p in s.encode():
      c.mux(p)


def pattern_frames(n, h=64, w=64):
  """Frame k shows k in binary as BITS black / white vertical bars."""
  out = np.zeros((n, h, w, 3), np.uint8)
  for k in range(n):
    for b in range(BITS):
      if (k >> b) & 1:
        out[k, :, b * w // BITS:(b + 1) * w // BITS] = 255
  return out


def read_pattern(frames):
  """Frame indices encoded by ``pattern_frames`` (uint8 frames, full width)."""
  w = frames.shape[2]
  bars = [frames[:, :, b * w // BITS + 1:(b + 1) * w // BITS - 1].mean(axis=(1, 2, 3)) > 127.5 for b in range(BITS)]
  return sum(bars[b].astype(np.int64) << b for b in range(BITS))


def write(path, frames, fps, codec="libx264", pix_fmt="yuv420p"):
  """Like ``video.write_video`` with any codec / pixel format."""
  with av.open(path, mode="w") as c:
    s = c.add_stream(codec, rate=fractions.Fraction(fps).limit_denominator(1001))
    s.height, s.width = frames.shape[1], frames.shape[2]
    s.pix_fmt = pix_fmt
    for f in frames:
      for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
        c.mux(p)
    for p in s.encode():
      c.mux(p)


def _patch(data: bytes, offset: int, fmt: str, *values) -> bytes:
  out = bytearray(data)
  struct.pack_into(fmt, out, offset, *values)
  return bytes(out)


# Pixel formats written as (name, codec, pix_fmt, extension); all decode to the same pattern.
PIXEL_FORMATS = (("yuv444p", "libx264", "yuv444p", "mp4"), ("gray", "libx264", "gray", "mp4"),
                 ("rgb24", "libx264rgb", "rgb24", "mkv"), ("yuv420p10le", "libx264", "yuv420p10le", "mp4"),
                 ("rgba_png", "png", "rgba", "mov"), ("gray_gif", "gif", "gray", "gif"))


def write_fuzz_videos(folder: str) -> dict:
  """Writes the hostile inputs into ``folder``; returns ``{name: path}``.

  Expected readings: ``one_frame``, ``same_pts`` (five frames at one timestamp), ``zero_duration`` (header
  durations zeroed), ``contradicted_size`` (mp4 sample entry says 65535x65535, the H.264 stream says 64x64) and the
  ``pix_*`` files are readable 64x64 videos; ``refused_size`` (an AVI declaring 30000x30000 raw frames) is
  ``unreadable``; ``rawbig`` (8000x8000 declared, 16x16 packets) fails to decode; ``tiny_2x2`` is readable but
  tiny; ``audio_only`` has no video stream; ``corrupt_*`` are anything but a crash.
  """
  os.makedirs(folder, exist_ok=True)
  paths = {}

  def path(name, ext="mp4"):
    paths[name] = os.path.join(folder, f"{name}.{ext}")
    return paths[name]

  write(path("one_frame"), pattern_frames(1), 15)
  for name, codec, pix_fmt, ext in PIXEL_FORMATS:
    write(path(f"pix_{name}", ext), pattern_frames(20), 15, codec, pix_fmt)
  write(path("tiny_2x2", "mkv"), pattern_frames(20, 2, 2), 15, "libx264", "yuv444p")

  # Five frames muxed at one timestamp: zero duration between them.
  with av.open(path("same_pts", "mkv"), "w") as c:
    s = c.add_stream("mjpeg", rate=15)
    s.height = s.width = 64
    s.pix_fmt = "yuvj420p"
    for f in pattern_frames(5):
      for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
        p.pts = p.dts = 0
        c.mux(p)

  base = os.path.join(folder, ".base.mp4")
  video.write_video(base, pattern_frames(30), 15)
  data = open(base, "rb").read()
  os.remove(base)
  # Durations in mvhd / mdhd (version 0: 4 size + 4 type + 4 flags + 4 ctime + 4 mtime + 4 timescale) and tkhd.
  zero = data
  for box in (b"mvhd", b"mdhd"):
    zero = _patch(zero, zero.find(box) + 20, ">I", 0)
  zero = _patch(zero, zero.find(b"tkhd") + 24, ">I", 0)
  open(path("zero_duration"), "wb").write(zero)
  # avc1 sample entry: 4 type + 6 reserved + 2 data ref + 16 pre-defined, then width, height.
  open(path("contradicted_size"), "wb").write(_patch(data, data.find(b"avc1") + 28, ">HH", 65535, 65535))

  raw = os.path.join(folder, ".raw.avi")
  write(raw, pattern_frames(10, 16, 16), 15, "rawvideo", "rgb24")
  raw_data = open(raw, "rb").read()
  os.remove(raw)
  strf = raw_data.find(b"strf") + 8  # BITMAPINFOHEADER: size, width, height
  open(path("refused_size", "avi"), "wb").write(_patch(raw_data, strf + 4, "<ii", 30000, 30000))
  open(path("rawbig", "avi"), "wb").write(_patch(raw_data, strf + 4, "<ii", 8000, 8000))

  write_silent_audio(path("audio_only", "mkv"))

  # Eight 0xff bytes over the header of a faststart mp4 (moov first) and over the moov of a plain one (moov last).
  faststart = os.path.join(folder, ".fs.mp4")
  video.write_video(faststart, pattern_frames(30), 15, faststart=True)
  fs = open(faststart, "rb").read()
  os.remove(faststart)
  moov = data.find(b"moov")
  for tag, blob, offsets in (("fs", fs, (0, 4, 8, 24, 40, 100, 200, 300, 400, 550, 700)),
                             ("moov", data, (moov - 4, moov, moov + 12, moov + 120, moov + 300, len(data) - 40))):
    for off in offsets:
      corrupt = bytearray(blob)
      corrupt[off:off + 8] = b"\xff" * 8
      open(path(f"corrupt_{tag}_{off}"), "wb").write(bytes(corrupt))
  return paths


# ----------------------------------------------------------------------------------------------------------
# Crash hooks: the builder's probe / encode functions, except for files whose name asks for a crash.

def _maybe_crash(task, stage):
  name = os.path.basename(task.path)
  if f"segv_{stage}" in name:
    os.kill(os.getpid(), signal.SIGSEGV)
  if f"abort_{stage}" in name:
    os.abort()
  if f"hang_{stage}" in name:
    time.sleep(600)


def probe_or_crash(task, options):
  _maybe_crash(task, "probe")
  return common.probe_task(task, options)


def encode_or_crash(task, options):
  _maybe_crash(task, "encode")
  return common.encode_task(task, options)


def double_or_crash(x):
  """``(2 * x, worker pid)``; the strings "segv", "abort", "hang", "raise" and "none" do what they say."""
  if x == "segv":
    os.kill(os.getpid(), signal.SIGSEGV)
  if x == "abort":
    os.abort()
  if x == "hang":
    time.sleep(600)
  if x == "raise":
    raise ValueError("a bug, not a bad input")
  if x == "none":
    return None
  return 2 * x, os.getpid()
