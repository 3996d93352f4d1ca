"""Latent pre-encoding: shard layout, resume after an interruption, skipped examples, device-sharded encoder."""

import json
import os

import jax
import numpy as np
import pytest

from data_pipelines import encode_latents
from videoldm_jax.data import pipeline, records
from videoldm_jax.data.video import VideoDecodeError


class Frames:
  """10 tiny clips; clip i has value i in every pixel. Indices in ``bad`` are unreadable."""

  def __init__(self, n=10, bad=()):
    self.n, self.bad = n, set(bad)

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if i in self.bad:
      raise VideoDecodeError(f"clip{i}.mp4", VideoDecodeError.TRUNCATED)
    return {"frames": np.full((3 + i % 2, 16, 16, 3), i, np.uint8), "fps": 7.5, "labels": {"crowdedness": i},
            "caption": f"clip {i}", "key": f"clip{i}"}


class CountingEncoder:
  """moments [n, 2, 2, 8]: mean = pixel value, logvar = 0. Optionally fails after ``fail_after`` calls."""

  def __init__(self, fail_after=None):
    self.calls, self.fail_after = 0, fail_after

  def __call__(self, x):
    self.calls += 1
    if self.fail_after is not None and self.calls > self.fail_after:
      raise KeyboardInterrupt("simulated preemption")
    mean = np.broadcast_to(x[:, ::8, ::8, :1], (x.shape[0], 2, 2, 4))
    return np.concatenate([mean, np.zeros_like(mean)], -1)


def read_all(out, split="train"):
  paths = sorted(p for p in os.listdir(out) if p.startswith(split) and p.endswith(".array_record"))
  from array_record.python import array_record_module
  result = []
  for p in paths:
    reader = array_record_module.ArrayRecordReader(os.path.join(out, p))
    result += [records.deserialize(r) for r in reader.read_all()]
    reader.close()
  return paths, result


def test_resume_skips_finished_shards(tmp_path):
  clean = str(tmp_path / "clean")
  encode_latents.encode_split(Frames(), CountingEncoder(), clean, records_per_shard=3, frames_per_batch=2)
  out = str(tmp_path / "resumed")
  # Each clip takes 2 encoder calls (3-4 frames, 2 per call): preempted inside shard 1 (clips 3..5).
  with pytest.raises(KeyboardInterrupt):
    encode_latents.encode_split(Frames(), CountingEncoder(fail_after=9), out, records_per_shard=3,
                                frames_per_batch=2)
  done = sorted(p for p in os.listdir(out) if p.endswith(".array_record"))
  assert done == ["train-00000-of-00004.array_record"]  # the interrupted shard only left a temporary file
  assert any(p.endswith(".tmp") for p in os.listdir(out))
  encoder = CountingEncoder()
  summary = encode_latents.encode_split(Frames(), encoder, out, records_per_shard=3, frames_per_batch=2)
  assert summary["shards_skipped"] == 1 and summary["shards_written"] == 3
  assert encoder.calls == 2 * 7  # clips 3..9 only
  (paths_a, recs_a), (paths_b, recs_b) = read_all(clean), read_all(out)
  assert paths_a == paths_b and len(recs_b) == 10
  for a, b in zip(recs_a, recs_b):
    assert a["key"] == b["key"] and a["caption"] == b["caption"] and a["labels"] == b["labels"]
    np.testing.assert_array_equal(a["moments"], b["moments"])
  assert recs_b[5]["key"] == "clip5" and recs_b[5]["fps"] == 7.5
  assert recs_b[5]["moments"].shape == (4, 2, 2, 8) and recs_b[5]["moments"].dtype == np.float16
  np.testing.assert_allclose(recs_b[5]["moments"][..., :4], 5 / 127.5 - 1, atol=1e-3)
  # A third run has nothing left to do.
  encoder = CountingEncoder()
  assert encode_latents.encode_split(Frames(), encoder, out, records_per_shard=3)["shards_skipped"] == 4
  assert encoder.calls == 0


def test_bad_examples_are_counted_and_processes_split_shards(tmp_path):
  out = str(tmp_path / "lat")
  for p in range(2):
    encode_latents.encode_split(Frames(bad=[1, 7]), CountingEncoder(), out, records_per_shard=3,
                                process_index=p, process_count=2)
    if p == 0:  # process 0 writes shards 0 and 2 only
      assert sorted(f for f in os.listdir(out) if f.endswith(".array_record")) == [
          "train-00000-of-00004.array_record", "train-00002-of-00004.array_record"]
  info = json.load(open(os.path.join(out, pipeline.LATENT_INFO_FILE)))["splits"]["train"]
  assert info["skipped"] == {"truncated": 2} and info["records"] == 8 and info["shards_done"] == 4
  assert (info["min_frames"], info["max_frames"]) == (3, 4)  # clips have 3 or 4 frames
  assert json.load(open(os.path.join(out, pipeline.LATENT_INFO_FILE)))["num_frames"] == 3
  _, recs = read_all(out)
  assert sorted(r["key"] for r in recs) == sorted(f"clip{i}" for i in range(10) if i not in (1, 7))
  with pytest.raises(ValueError, match="fresh --output"):  # a different source cannot resume into it
    encode_latents.encode_split(Frames(n=13), CountingEncoder(), out, records_per_shard=3)


def test_sharded_encode_fn_over_local_devices():
  def apply_fn(params, x):  # 8x8 average pooling + a linear map to 8 channels
    n, h, w, c = x.shape
    pooled = x.reshape(n, h // 8, 8, w // 8, 8, c).mean(axis=(2, 4))
    return pooled @ params["w"]

  params = {"w": np.arange(24, dtype=np.float32).reshape(3, 8) / 24}
  encode = encode_latents.make_sharded_encode_fn(apply_fn, params)
  x = np.random.default_rng(0).uniform(-1, 1, (16, 32, 64, 3)).astype(np.float32)
  out = encode(x)
  assert out.shape == (16, 4, 8, 8)
  np.testing.assert_allclose(out, apply_fn(params, x), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="multiple"):
    encode(x[:5])
  assert jax.local_device_count() == 8


def test_cli_with_a_random_tiny_vae_then_train_reads_it(tmp_path):
  out = str(tmp_path / "lat")
  argv = ["--vae=random:tiny", "--source=synthetic", "--num_examples=3", "--num_frames=4", "--fps=7.5",
          "--height=32", "--width=64", f"--output={out}", "--records_per_shard=2", "--frames_per_batch=8"]
  assert encode_latents.main(argv) == 0
  info = json.load(open(os.path.join(out, pipeline.LATENT_INFO_FILE)))
  assert info["scaling_factor"] > 0 and info["splits"]["train"]["records"] == 3
  batch = next(pipeline.make_iterator(dict(source="latents", data_dir=out, num_frames=2, fps=3.75,
                                           read_threads=1, prefetch=1), 2))
  assert batch["latents"].shape == (2, 2, 4, 8, 4) and np.isfinite(batch["latents"]).all()
  assert encode_latents.main(argv) == 0  # resumes: nothing to redo
