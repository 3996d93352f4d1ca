"""PyAV decoding: frames picked by timestamp at a target fps, resize / crop, the error reasons, hostile inputs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fuzz_videos
from videoldm_jax.data import video

BITS = 8


def pattern_frames(n: int, h: int = 64, w: int = 64) -> np.ndarray:
  """Frame k shows k in binary as BITS black / white vertical bars (survives lossy coding and resizing)."""
  out = np.zeros((n, h, w, 3), np.uint8)
  for k in range(n):
    for b in range(BITS):
      if (k >> b) & 1:
        out[k, :, b * w // BITS:(b + 1) * w // BITS] = 255
  return out


def read_pattern(frames: np.ndarray) -> np.ndarray:
  """Frame indices encoded by ``pattern_frames`` (uint8 or [-1, 1] floats, full width)."""
  w = frames.shape[2]
  mid = 127.5 if frames.dtype == np.uint8 else 0.0
  bars = [frames[:, :, b * w // BITS + 1:(b + 1) * w // BITS - 1].mean(axis=(1, 2, 3)) > mid for b in range(BITS)]
  return sum(bars[b].astype(np.int64) << b for b in range(BITS))


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
  d = tmp_path_factory.mktemp("videos")
  paths = {}
  for fps, n in ((30, 150), (24, 120)):
    p = str(d / f"p{fps}.mp4")
    video.write_video(p, pattern_frames(n), fps, gop=12)  # short GOP: seeking lands on real keyframes
    paths[fps] = p
  data = open(paths[30], "rb").read()
  # Header first (faststart) then cut: opens fine, the packets stop early -> "truncated".
  faststart = str(d / "faststart.mp4")
  video.write_video(faststart, pattern_frames(150), 30, faststart=True)
  fs = open(faststart, "rb").read()
  paths["truncated"] = str(d / "truncated.mp4")
  open(paths["truncated"], "wb").write(fs[:len(fs) // 2])
  paths["truncated_tail"] = str(d / "truncated_tail.mp4")  # index (moov) at the end is lost -> unreadable
  open(paths["truncated_tail"], "wb").write(data[:len(data) // 2])
  paths["zero"] = str(d / "zero.mp4")
  open(paths["zero"], "wb").close()
  paths["text"] = str(d / "text.mp4")
  open(paths["text"], "w").write("not a video\n" * 50)
  return paths


@pytest.mark.parametrize("src_fps,fps,start,expected", [
    (30, 30, 0.0, list(range(8))),
    (30, 7.5, 0.0, [0, 4, 8, 12, 16, 20, 24, 28]),
    (30, 2, 0.0, [0, 15, 30, 45, 60, 75, 90, 105]),
    (24, 2, 0.0, [0, 12, 24, 36, 48, 60, 72, 84]),
    (30, 7.5, 2.0, [60, 64, 68, 72, 76, 80, 84, 88]),  # after a seek
    (24, 7.5, 1.5, [36, 39, 42, 46, 49, 52, 55, 58]),  # non-integer ratio: nearest frame in time
])
def test_decode_clip_picks_frames_by_timestamp(videos, src_fps, fps, start, expected):
  clip = video.decode_clip(videos[src_fps], 8, fps, start=start)
  assert clip.shape == (8, 64, 64, 3) and clip.dtype == np.float32
  assert clip.min() >= -1.0 and clip.max() <= 1.0
  np.testing.assert_array_equal(read_pattern(clip), expected)


def test_probe_uses_container_timestamps(videos):
  info = video.probe(videos[24])
  assert info.num_frames == 120 and abs(info.fps - 24) < 1e-3 and abs(info.duration - 5.0) < 1e-3
  assert (info.height, info.width) == (64, 64)


def test_random_start_resize_and_crop(videos):
  rng = np.random.default_rng(0)
  clip = video.decode_clip(videos[30], 6, 7.5, size=(32, 48), rng=rng, random_crop=False)
  assert clip.shape == (6, 32, 48, 3)
  idx = read_pattern(video.decode_clip(videos[30], 6, 7.5, rng=np.random.default_rng(0)))
  np.testing.assert_array_equal(np.diff(idx), 4)  # consecutive at 7.5 fps wherever the clip starts
  assert 0 <= idx[0] and idx[-1] < 150
  # Resize to cover: a 64x64 source for a 32x48 crop is scaled to 48x48, the centre crop keeps all bars.
  uint8 = video.decode_frames_at(videos[30], [0.0, 0.5], size=(32, 48))
  assert uint8.shape == (2, 32, 48, 3)
  np.testing.assert_array_equal(read_pattern(video.decode_frames_at(videos[30], [0.5, 1.0], short_side=32)),
                                [15, 30])


def test_iter_frames_resamples_whole_video(videos):
  times, frames = zip(*video.iter_frames(videos[30], fps=7.5, short_side=32))
  frames = np.stack(frames)
  assert frames.shape[1:] == (32, 32, 3)
  np.testing.assert_array_equal(read_pattern(frames), np.arange(0, 150, 4))
  np.testing.assert_allclose(times, np.arange(len(times)) / 7.5)


@pytest.mark.parametrize("name,reason", [
    ("zero", video.VideoDecodeError.ZERO_BYTE),
    ("text", video.VideoDecodeError.UNREADABLE),
    ("truncated", video.VideoDecodeError.TRUNCATED),
    ("truncated_tail", video.VideoDecodeError.UNREADABLE),
])
def test_bad_files_raise_specific_errors(videos, name, reason):
  for fn in (video.probe, lambda p: video.decode_clip(p, 4, 7.5)):
    with pytest.raises(video.VideoDecodeError) as e:
      fn(videos[name])
    assert e.value.reason == reason and e.value.path == videos[name]


def test_too_short_and_missing(videos, tmp_path):
  with pytest.raises(video.VideoDecodeError) as e:
    video.decode_clip(videos[30], 12, 2.0, start=0.0)  # 5.5 s of a 5 s video
  assert e.value.reason == video.VideoDecodeError.TOO_SHORT
  with pytest.raises(video.VideoDecodeError) as e:
    video.decode_clip(videos[30], 12, 2.0, rng=np.random.default_rng(0))
  assert e.value.reason == video.VideoDecodeError.TOO_SHORT
  with pytest.raises(video.VideoDecodeError) as e:
    video.probe(str(tmp_path / "nope.mp4"))
  assert e.value.reason == video.VideoDecodeError.MISSING_FILE


def test_audio_only_file_has_no_video_stream(tmp_path):
  path = str(tmp_path / "tone.wav")
  fuzz_videos.write_silent_audio(path)
  with pytest.raises(video.VideoDecodeError) as e:
    video.probe(path)
  assert e.value.reason == video.VideoDecodeError.NO_VIDEO_STREAM


def test_decode_error_pickles_with_reason():
  import pickle
  e = pickle.loads(pickle.dumps(video.VideoDecodeError("/x.mp4", "truncated", "detail")))
  assert (e.path, e.reason, e.detail) == ("/x.mp4", "truncated", "detail")
  assert os.fspath("/x.mp4") in str(e)


# A separate interpreter reads the hostile inputs, so that a crash inside FFmpeg fails this test, not the run.
_FUZZ_READER = r"""
import json, sys
import numpy as np
import fuzz_videos
from videoldm_jax.data import video
for name, path in sorted(json.loads(sys.argv[1]).items()):
  got = {}
  print(name, end="\t", flush=True)  # a crash leaves the culprit's name as the last output
  try:
    info = video.probe(path)
    got["probe"] = [info.height, info.width, info.num_frames]
    frames = np.stack([f for _, f in video.iter_frames(path)])
    got["shape"] = list(frames.shape)
    got["pattern"] = fuzz_videos.read_pattern(frames).tolist()
    got["clip"] = list(video.decode_clip(path, 1, 15.0, size=(32, 32), rng=np.random.default_rng(0)).shape)
  except video.VideoDecodeError as e:
    got["error"] = e.reason
  except Exception as e:  # anything else is a bug: a bad file must raise VideoDecodeError
    got["unexpected"] = f"{type(e).__name__}: {e}"
  print(json.dumps(got), flush=True)
"""


def test_fuzzed_inputs_decode_or_raise_a_reason(tmp_path):
  paths = fuzz_videos.write_fuzz_videos(str(tmp_path))
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])))
  out = subprocess.run([sys.executable, "-c", _FUZZ_READER, json.dumps(paths)], capture_output=True, text=True,
                       timeout=120, env=env)
  last = out.stdout.splitlines()[-1:]
  assert out.returncode == 0, f"reader died ({out.returncode}) at {last}: {out.stderr[-1500:]}"
  got = {line.split("\t")[0]: json.loads(line.split("\t")[1]) for line in out.stdout.splitlines()}
  assert sorted(got) == sorted(paths)
  assert not {k: v for k, v in got.items() if "unexpected" in v}
  readable = {"one_frame": 1, "same_pts": 5, "zero_duration": 30, "contradicted_size": 30,
              **{f"pix_{name}": 20 for name, *_ in fuzz_videos.PIXEL_FORMATS}}
  for name, n in readable.items():
    assert got[name]["probe"] == [64, 64, n], (name, got[name])
    assert got[name]["shape"] == [n, 64, 64, 3] and got[name]["pattern"] == list(range(n)), (name, got[name])
    assert got[name]["clip"] == [1, 32, 32, 3], (name, got[name])
  assert got["tiny_2x2"]["shape"] == [20, 2, 2, 3]  # readable; the builders skip it (min_short_side)
  assert got["refused_size"]["error"] == video.VideoDecodeError.UNREADABLE
  assert got["rawbig"] == {"probe": [8000, 8000, 10], "error": video.VideoDecodeError.TRUNCATED}
  assert got["audio_only"]["error"] == video.VideoDecodeError.NO_VIDEO_STREAM
  corrupt = {k: v for k, v in got.items() if k.startswith("corrupt_")}
  assert len(corrupt) >= 15 and any("error" in v for v in corrupt.values())
