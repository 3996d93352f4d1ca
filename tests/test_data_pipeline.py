"""grain input pipeline: determinism, per-process shards, exact resume, global arrays, CFG dropout, bad records."""

import os
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipelines import encode_latents, prepare
from videoldm_jax.data import pipeline, video
from videoldm_jax.data.video import VideoDecodeError

tfds.disable_progress_bar()
SMALL = dict(num_frames=3, height=16, width=32, fps=7.5, read_threads=2, prefetch=2,
             synthetic=dict(num_examples=64))


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    jax.tree_util.tree_map(np.testing.assert_array_equal, x, y)


def test_synthetic_batch_layout():
  batch = next(pipeline.make_iterator({**SMALL, "cond_drop_prob": 0.0}, 4))
  assert batch["video"].shape == (4, 3, 16, 32, 3) and batch["video"].dtype == np.float32
  assert set(batch["labels"]) == {"day_night", "crowdedness"}
  assert all(v.dtype == np.int32 and v.shape == (4,) for v in batch["labels"].values())
  assert batch["fps"].dtype == np.float32 and (batch["fps"] == 7.5).all()
  assert batch["caption"].shape == (4,) and all("drive" in c for c in batch["caption"])
  assert (batch["cond_mask"] == 1).all() and (batch["num_skipped"] == 0).all()


def test_label_selection_and_host_tokenization():
  def tokenize(text):  # stands in for a CLIP tokenizer: fixed-length ids
    return [len(text), text.count(" ")]

  batch = next(pipeline.make_iterator({**SMALL, "label_fields": ("crowdedness",), "cond_drop_prob": 0.5}, 8,
                                      tokenize_fn=tokenize))
  assert set(batch["labels"]) == {"crowdedness"}
  assert batch["caption_ids"].dtype == np.int32 and batch["caption_ids"].shape == (8, 2)
  np.testing.assert_array_equal(batch["caption_ids"][:, 0], [len(c) for c in batch["caption"]])
  with pytest.raises(KeyError, match="unknown data config"):
    pipeline.make_iterator({**SMALL, "num_frame": 4}, 2)


def test_tokenize_fn_first_runs_in_the_calling_thread():
  first = []

  def tokenize(text):
    if not first:
      first.append(threading.get_ident())
    return [len(text)]

  it = pipeline.make_iterator({**SMALL, "read_threads": 4}, 4, tokenize_fn=tokenize)
  assert first == [threading.get_ident()]  # loaded here, before the read threads call it concurrently
  assert next(it)["caption_ids"].shape == (4, 1)


# Fresh interpreters: the failure needs transformers' first import to happen in several threads at once.
_CLIP_FROM_THREADS = r"""
import sys, threading
from videoldm_jax.models import tokenizer
assert "transformers" not in sys.modules
barrier = threading.Barrier(8)
got, errors = [], []

def load():
  barrier.wait()  # all eight reach the first import together
  try:
    tok = tokenizer.load_clip_tokenizer()
    got.append((id(tok), tuple(tokenizer.tokenize(tok, "a red car at night")[0, :7].tolist())))
  except Exception as e:
    errors.append(repr(e))

threads = [threading.Thread(target=load) for _ in range(8)]
for t in threads:
  t.start()
for t in threads:
  t.join()
assert not errors, errors
assert len(got) == 8 and len(set(got)) == 1, got  # one tokenizer object, built once
print(list(got[0][1]))
"""

_CLIP_PIPELINE = r"""
import numpy as np
from videoldm_jax.data import pipeline
from videoldm_jax.models import tokenizer

def tokenize(text):  # what the text-to-video task hands the pipeline
  return tokenizer.tokenize(tokenizer.load_clip_tokenizer(), text)[0]

config = dict(num_frames=2, height=16, width=32, read_threads=8, prefetch=8, cond_drop_prob=0.0,
              synthetic=dict(num_examples=64))
batch = next(pipeline.make_iterator(config, 8, tokenize_fn=tokenize))
assert batch["caption_ids"].shape == (8, 77) and (batch["caption_ids"][:, 0] == 49406).all()
print("ok")
"""


@pytest.mark.parametrize("script", [_CLIP_FROM_THREADS, _CLIP_PIPELINE], ids=["threads", "pipeline"])
def test_clip_tokenizer_first_loaded_from_many_threads(script, tmp_path):
  env = dict(os.environ, VIDEOLDM_JAX_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  if script is _CLIP_FROM_THREADS:
    assert out.stdout.split("\n")[-2] == "[49406, 320, 736, 1615, 536, 930, 49407]"  # CLIP ids of the caption


def test_same_seed_same_batches_other_seed_differs():
  a = take(pipeline.make_iterator(SMALL, 4), 3)
  b = take(pipeline.make_iterator(SMALL, 4), 3)
  c = take(pipeline.make_iterator({**SMALL, "seed": 1}, 4), 3)
  assert_same_batches(a, b)
  assert not np.array_equal(a[0]["index"], c[0]["index"])


def test_process_shards_are_disjoint_and_cover_the_data():
  config = {**SMALL, "num_epochs": 1, "synthetic": dict(num_examples=24)}
  seen = []
  for p in range(3):
    batches = list(pipeline.make_dataset(config, 4, process_index=p, process_count=3))
    assert len(batches) == 2
    seen.append(set(np.concatenate([b["index"] for b in batches]).tolist()))
  assert all(len(s) == 8 for s in seen)
  assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
  assert set.union(*seen) == set(range(24))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iterator_state_resumes_exactly(num_workers):
  config = {**SMALL, "num_workers": num_workers, "fps": (7.5, 30.0)}
  it = pipeline.make_iterator(config, 4)
  take(it, 3)
  state = pipeline.get_iterator_state(it)
  expected = take(it, 3)
  fresh = pipeline.make_iterator(config, 4)
  pipeline.set_iterator_state(fresh, state)
  assert_same_batches(take(fresh, 3), expected)
  for i in (it, fresh):
    if hasattr(i, "close"):
      i.close()


def test_orbax_checkpoint_of_the_iterator(tmp_path):
  import orbax.checkpoint as ocp
  it = pipeline.make_iterator(SMALL, 2)
  take(it, 2)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mgr:
    mgr.save(7, args=ocp.args.Composite(data=pipeline.iterator_checkpoint_args(it)))
    mgr.wait_until_finished()
    expected = take(it, 2)
    fresh = pipeline.make_iterator(SMALL, 2)
    mgr.restore(7, args=ocp.args.Composite(data=pipeline.iterator_checkpoint_args(fresh, restore=True)))
  assert_same_batches(take(fresh, 2), expected)


def test_global_batch_on_a_mesh():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "fsdp"))
  spec = jax.sharding.PartitionSpec(("data", "fsdp"))
  batch = next(pipeline.make_iterator(SMALL, 8, mesh=mesh, partition_spec=spec))
  assert isinstance(batch["video"], jax.Array) and batch["video"].shape == (8, 3, 16, 32, 3)
  assert batch["video"].sharding.spec == spec and len(batch["video"].addressable_shards) == 8
  assert batch["video"].addressable_shards[0].data.shape == (1, 3, 16, 32, 3)
  assert isinstance(batch["labels"]["day_night"], jax.Array)
  assert isinstance(batch["caption"], np.ndarray)  # strings stay on the host
  local = next(pipeline.make_iterator(SMALL, 8))
  np.testing.assert_array_equal(np.asarray(batch["video"]), local["video"])


def test_conditioning_dropout():
  dropped = next(pipeline.make_iterator({**SMALL, "cond_drop_prob": 1.0}, 4))
  assert all((v == pipeline.NULL_LABEL).all() for v in dropped["labels"].values())
  assert (dropped["caption"] == "").all() and (dropped["cond_mask"] == 0).all()
  mixed = take(pipeline.make_iterator({**SMALL, "cond_drop_prob": 0.5}, 8), 8)
  mask = np.concatenate([b["cond_mask"] for b in mixed])
  assert 0.25 < mask.mean() < 0.75
  for b in mixed:  # labels and caption are dropped together
    np.testing.assert_array_equal(b["cond_mask"] == 0, b["caption"] == "")
    np.testing.assert_array_equal(b["cond_mask"] == 0, b["labels"]["crowdedness"] == pipeline.NULL_LABEL)


class FlakySource:
  """Synthetic scenes where some indices are 'unreadable'."""

  def __init__(self, n, bad):
    from videoldm_jax.data import synthetic
    self.inner, self.bad = synthetic.SyntheticDrivingSource(n), set(bad)

  def __len__(self):
    return len(self.inner)

  def __getitem__(self, i):
    if i in self.bad:
      raise VideoDecodeError(f"video_{i}.mp4", VideoDecodeError.TRUNCATED)
    return self.inner[i]


def test_bad_records_are_replaced_and_counted():
  bad = set(range(0, 40, 3))
  config = {**SMALL, "num_epochs": 1}
  batches = list(pipeline.make_dataset(config, 4, process_index=0, process_count=1, source=FlakySource(40, bad)))
  assert len(batches) == 10  # every element still delivered
  used = np.concatenate([b["index"] for b in batches])
  assert not set(used.tolist()) & bad
  assert sum(int(b["num_skipped"].sum()) for b in batches) >= len(bad)  # each bad record drawn once at least
  with pytest.raises(RuntimeError, match="consecutive bad records"):
    next(pipeline.make_iterator({**SMALL, "max_retries": 3}, 2, source=FlakySource(8, range(8))))


def _pattern(n, h=32, w=48):
  out = np.zeros((n, h, w, 3), np.uint8)
  for k in range(n):
    for b in range(8):
      if (k >> b) & 1:
        out[k, :, b * w // 8:(b + 1) * w // 8] = 255
  return out


def _read(frames):
  w = frames.shape[-2]
  bars = [frames[..., b * w // 8 + 1:(b + 1) * w // 8 - 1, :].mean(axis=(-1, -2, -3)) > 0 for b in range(8)]
  return sum(bars[b].astype(np.int64) << b for b in range(8))


@pytest.fixture(scope="module")
def tfds_dataset(tmp_path_factory):
  src = str(tmp_path_factory.mktemp("src"))
  for i, (fps, n) in enumerate([(30, 90), (15, 45), (15, 20)]):  # 3 s, 3 s, 1.33 s
    video.write_video(os.path.join(src, f"v{i}.mp4"), _pattern(n), fps)
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  prepare.build("video_folder", src, data_dir, "t", val_fraction=0.0, max_fps=30.0, min_short_side=32)
  return data_dir


def test_tfds_source_clips_at_target_fps(tfds_dataset):
  config = {**SMALL, "source": "video_folder/t", "data_dir": tfds_dataset, "num_frames": 4, "fps": 3.75,
            "height": 32, "width": 48, "cond_drop_prob": 0.0}
  batches = take(pipeline.make_iterator(config, 4), 3)
  for b in batches:
    assert b["video"].shape == (4, 4, 32, 48, 3) and b["labels"] == {}
    for clip, fps_src, skipped in zip(b["video"], b["fps"], b["num_skipped"]):
      idx = _read(clip)
      assert fps_src == 3.75
      assert set(np.diff(idx).tolist()) <= {4, 8}, idx  # 15 fps source: every 4th; 30 fps: every 8th frame
  # 5 frames at 2 fps span 2 s: v2 (1.33 s) is too short, so it is redrawn (counted) whenever it comes up.
  config.update(fps=2.0, num_frames=5)
  batches = take(pipeline.make_iterator(config, 4), 4)
  names = {int(i) for b in batches for i in b["index"]}
  assert len(names) <= 2 and sum(int(b["num_skipped"].sum()) for b in batches) > 0


def test_latent_source_samples_scaled_moments(tmp_path):
  class Frames:
    def __len__(self):
      return 4

    def __getitem__(self, i):
      return {"frames": np.full((8, 16, 16, 3), i * 10, np.uint8), "fps": 8.0, "labels": {"day_night": i % 2},
              "caption": f"scene {i}", "key": f"k{i}"}

  def encode_fn(x):  # mean = frame's value, logvar = -30 (std ~ 3e-7): the sample is the mean
    n = x.shape[0]
    mean = np.broadcast_to(x[:, ::8, ::8, :1], (n, 2, 2, 4))
    return np.concatenate([mean, np.full((n, 2, 2, 4), -30.0, np.float32)], -1)

  out = str(tmp_path / "lat")
  encode_latents.encode_split(Frames(), encode_fn, out, records_per_shard=3, frames_per_batch=4, dtype="float32",
                              info={"scaling_factor": 0.5})
  config = {**SMALL, "source": "latents", "data_dir": out, "num_frames": 3, "fps": 4.0, "cond_drop_prob": 0.0}
  batch = next(pipeline.make_iterator(config, 4))
  assert batch["latents"].shape == (4, 3, 2, 2, 4)
  for z, i, label in zip(batch["latents"], batch["index"], batch["labels"]["day_night"]):
    np.testing.assert_allclose(z, (i * 10 / 127.5 - 1) * 0.5, atol=1e-5)  # mean * scaling factor from info
    assert label == i % 2
