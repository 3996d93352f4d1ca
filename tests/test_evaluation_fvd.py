"""FVD: metric sanity on synthetic clips, sharded extraction (8 fake devices vs 1), sources, bad inputs and the CLI.

The I3D forward pass costs ~2 s per clip on a CPU core, so the I3D tests share one module-scoped set of features
(4 x 8 clips) and the sharding / batching logic is also checked with a cheap stand-in feature function.
"""

import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from videoldm_jax.data import video as video_lib
from videoldm_jax.evaluation import fvd, statistics

N = 8  # clips per set in the sanity test (FVD(real, real') vs shuffled vs still is robust at this size)
SHAPE = (32, 64)  # rendered small, resized to 224x224 by the protocol like any other video


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("i3d_cache"))


@pytest.fixture(scope="module")
def extractor(cache):
  return fvd.I3DFeatures(batch_size=8, cache_dir=cache)  # all 8 fake devices, one clip each


@pytest.fixture(scope="module")
def clip_sets():
  real = fvd.synthetic_videos(N, 16, *SHAPE, seed=0)
  other = fvd.synthetic_videos(N, 16, *SHAPE, seed=1)
  rng = np.random.default_rng(0)
  shuffled = np.stack([v[rng.permutation(16)] for v in other])
  still = np.repeat(other[:, :1], 16, axis=1)
  return {"real": real, "real2": other, "shuffled": shuffled, "still": still}


@pytest.fixture(scope="module")
def features(extractor, clip_sets):
  return {k: extractor(v) for k, v in clip_sets.items()}


def test_fvd_ranks_real_below_shuffled_and_still(features):
  stats = {k: statistics.FeatureStats.from_features(v) for k, v in features.items()}
  real_real = fvd.fvd_from_stats(stats["real"], stats["real2"])
  shuffled = fvd.fvd_from_stats(stats["real"], stats["shuffled"])
  still = fvd.fvd_from_stats(stats["real"], stats["still"])
  print(f"FVD real-real' {real_real:.1f}, real-shuffled {shuffled:.1f}, real-still {still:.1f} ({N} clips each)")
  assert 1.25 * real_real < shuffled and 1.25 * real_real < still, (real_real, shuffled, still)
  assert features["real"].dtype == np.float64 and features["real"].shape == (N, 400)


def test_sharded_extraction_equals_one_device(features, clip_sets, extractor):
  one = fvd.I3DFeatures(extractor.params, mesh=fvd.default_mesh(jax.devices()[:1]), batch_size=2)
  got = one(clip_sets["real2"][:3])  # two steps, the second padded and trimmed
  assert got.shape == (3, 400) and one.num_compiles == 1
  np.testing.assert_allclose(got, features["real2"][:3], atol=2e-4, rtol=0)
  assert extractor.batch_size == 8 and extractor.local_batch == 8


def _pool_features(params, videos):
  """A cheap stand-in for I3D: per-channel means of the first and last frame, times a weight."""
  x = videos.astype(jnp.float32)
  return jnp.concatenate([x[:, 0].mean(axis=(1, 2)), x[:, -1].mean(axis=(1, 2))], axis=-1) * params


def test_sharded_batching_streaming_and_mixed_sizes():
  rng = np.random.default_rng(1)
  small = rng.integers(0, 256, (11, 5, 8, 6, 3), dtype=np.uint8)
  large = rng.integers(0, 256, (3, 5, 10, 4, 3), dtype=np.uint8)
  eight = fvd.ShardedFeatures(_pool_features, jnp.float32(2.0), 6, batch_size=8, num_frames=4)
  single = fvd.ShardedFeatures(_pool_features, jnp.float32(2.0), 6, mesh=fvd.default_mesh(jax.devices()[:1]),
                               batch_size=3, num_frames=4)
  expected = np.concatenate([_pool_features(2.0, small[:, :4]), _pool_features(2.0, large[:, :4])])
  stream = [(f"s{i}", v) for i, v in enumerate(small)] + [(f"l{i}", v) for i, v in enumerate(large)]
  for ex in (eight, single):
    got = np.concatenate([f for _, _, f in ex.batches(stream)])
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    stats = ex.stats(iter(stream))
    assert stats.count == len(stream)
    np.testing.assert_allclose(stats.cov, np.cov(got, rowvar=False), rtol=1e-9)
    assert ex.num_compiles == 2  # one per frame size
  with pytest.raises(ValueError, match=r"mixed frame sizes .*#11"):
    eight(list(small) + list(large))
  with pytest.raises(ValueError, match=r"video s3: has 3 frames, FVD uses the first 4"):
    list(eight.batches([("s0", small[0]), ("s3", small[3, :3])]))
  with pytest.raises(ValueError, match="expected uint8"):
    eight(small.astype(np.float32))


def test_synthetic_sets_are_deterministic_and_disjoint():
  a = fvd.synthetic_videos(3, 4, 16, 32, seed=0)
  assert a.dtype == np.uint8 and a.shape == (3, 4, 16, 32, 3)
  np.testing.assert_array_equal(a, fvd.synthetic_videos(3, 4, 16, 32, seed=0))
  b = fvd.synthetic_videos(3, 4, 16, 32, seed=1)
  c = fvd.synthetic_videos(3, 4, 16, 32, seed=0, start=3)
  assert all(not np.array_equal(x, y) for x in a for y in np.concatenate([b, c]))
  src = fvd.open_source("synthetic:1", num_frames=4, height=16, width=32)
  np.testing.assert_array_equal(np.stack([v for _, v in fvd.take(src, 3)]), b)


def _write_clips(folder, videos, fps=8):
  os.makedirs(folder, exist_ok=True)
  for i, v in enumerate(videos):
    video_lib.write_video(os.path.join(folder, f"clip_{i:02d}.mp4"), v, fps, crf=10)


def test_folder_source_order_skips_and_errors(tmp_path):
  folder = str(tmp_path / "clips")
  _write_clips(folder, fvd.synthetic_videos(2, 16, 32, 64, seed=3))
  open(os.path.join(folder, "clip_01b.mp4"), "w").write("not a video\n" * 20)
  video_lib.write_video(os.path.join(folder, "short.mp4"), fvd.synthetic_videos(1, 10, 32, 64)[0], 8)
  src = fvd.open_source(folder, num_frames=16)
  assert src.kind == "folder"
  it = src.videos()
  got = [next(it), next(it)]
  assert [name for name, _ in got] == ["clip_00.mp4", "clip_01.mp4"] and got[0][1].shape == (16, 32, 64, 3)
  assert src.skips.as_dict() == {}
  with pytest.raises(ValueError, match=r"short\.mp4: has 10 frames, FVD uses the first 16"):
    next(it)
  assert src.skips.as_dict() == {"unreadable": 1} and "clip_01b.mp4" in src.skips.report()

  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match=f"{empty}: no video files"):
    fvd.open_source(str(empty))
  with pytest.raises(FileNotFoundError, match="nowhere: not a folder"):
    fvd.open_source("nowhere")


def test_workdir_source_reads_the_sample_grid(tmp_path):
  from videoldm_jax import video_io  # the sampler writes the grid with it; evaluation only reads it
  videos = fvd.synthetic_videos(3, 16, 32, 64, seed=4)
  (tmp_path / "config.json").write_text("{}")
  video_io.write_outputs(videos, str(tmp_path / "sample"), fps=8.0)
  src = fvd.open_source(str(tmp_path), num_frames=16)
  tiles = np.stack([v for _, v in src.videos()])
  up = np.repeat(np.repeat(videos, 4, axis=2), 4, axis=3)  # write_outputs upscales 32 px frames to 128
  assert src.kind == "workdir" and tiles.shape == up.shape, tiles.shape
  assert np.abs(tiles.astype(np.float32) - up).mean() < 6.0


def test_tfds_source_uses_the_first_stored_frames(monkeypatch):
  from PIL import Image
  from videoldm_jax.data import pipeline

  def jpeg(frame):
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=95)
    return buf.getvalue()

  clips = fvd.synthetic_videos(3, 16, 32, 48, seed=5)
  records = [{"frames": [jpeg(f) for f in c], "fps": np.float32(8), "file": f"v{i}.mp4"} for i, c in enumerate(clips)]
  records.append({"frames": records[0]["frames"][:12], "fps": np.float32(8), "file": b"cut.mp4"})
  opened = {}
  monkeypatch.setattr(pipeline, "open_tfds_source", lambda name, data_dir, split: opened.update(
      name=name, data_dir=data_dir, split=split) or records)
  src = fvd.open_source("video_folder/rds/validation", data_dir="/data/tfds", num_frames=16)
  it = src.videos()
  got = [next(it) for _ in range(3)]
  assert opened == {"name": "video_folder/rds", "data_dir": "/data/tfds", "split": "validation"}
  assert [n for n, _ in got] == ["v0.mp4", "v1.mp4", "v2.mp4"]
  assert np.abs(np.stack([v for _, v in got]).astype(np.float32) - clips).mean() < 3.0
  with pytest.raises(ValueError, match=r"video cut\.mp4: has 12 frames"):
    next(it)


def test_reference_statistics_checks(tmp_path):
  stats = statistics.FeatureStats.from_features(np.random.default_rng(0).standard_normal((4, 400)))
  path = str(tmp_path / "ref.npz")
  statistics.save_stats(path, {"fvd": stats}, fvd.protocol_meta(8, 4))
  with pytest.raises(ValueError, match="statistics of 8-frame clips, but num_frames=16"):
    fvd.reference_stats(path, num_videos=4)
  assert fvd.reference_stats(path, num_videos=4, num_frames=8).count == 4
  with pytest.raises(ValueError, match="noise floor needs reference videos"):
    fvd.noise_floor(path, 4)


def test_cli_prints_one_json_object(tmp_path, extractor, cache):
  del extractor  # only here so that the weight cache is filled before the CLI runs
  videos, reference = str(tmp_path / "generated"), str(tmp_path / "reference")
  _write_clips(videos, fvd.synthetic_videos(2, 16, 32, 64, seed=6))
  open(os.path.join(videos, "broken.mp4"), "wb").close()  # zero bytes: skipped and counted
  _write_clips(reference, fvd.synthetic_videos(4, 16, 32, 64, seed=7))
  saved = str(tmp_path / "ref_stats.npz")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", VIDEOLDM_JAX_CACHE=cache)
  cmd = [sys.executable, "-m", "videoldm_jax.evaluate", f"--videos={videos}", f"--reference={reference}",
         "--metrics=fvd", "--json", "--num_videos=2", "--batch_size=2", "--noise_floor",
         f"--save_reference_stats={saved}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout)  # the whole of stdout is one JSON object
  assert np.isfinite(out["fvd"]) and out["fvd"] > 0 and np.isfinite(out["fvd_noise_floor"])
  assert out["num_videos"] == 2 and out["num_reference"] == 2 and out["num_frames"] == 16
  assert out["skipped"] == {"videos": {"zero_byte": 1}, "reference": {}}
  assert fvd.load_reference_stats(saved, num_videos=2).count == 2

  bad = subprocess.run(cmd[:5] + ["--metrics=fvd,psnr"], capture_output=True, text=True, env=env, timeout=300)
  assert bad.returncode == 1 and "unknown ['psnr']" in bad.stderr and bad.stdout == ""


_MULTIHOST_WORKER = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from videoldm_jax import parallel
from videoldm_jax.evaluation import fvd
parallel.initialize_distributed()
videos = np.random.default_rng(1).integers(0, 256, (11, 5, 8, 6, 3), dtype=np.uint8)
pool = lambda p, v: jnp.concatenate([v[:, 0].astype(jnp.float32).mean(axis=(1, 2)),
                                     v[:, -1].astype(jnp.float32).mean(axis=(1, 2))], axis=-1) * p
ex = fvd.ShardedFeatures(pool, jnp.float32(2.0), 6, batch_size=8, num_frames=4)  # all 8 devices of 2 processes
src = fvd.array_source(videos)
names = []
stats = ex.stats((names.append(n) or (n, v)) for n, v in fvd.take(src, 11))  # this process: 6 or 5 videos
json.dump({"names": names, "count": stats.count, "sum": stats.sum.tolist(), "outer": stats.outer.tolist(),
           "devices": jax.device_count()}, open(sys.argv[1].format(process=jax.process_index()), "w"))
"""


def test_two_processes_extract_their_shares_and_sum_statistics(tmp_path):
  from videoldm_jax import local_cluster
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
  result = str(tmp_path / "stats_{process}.json")
  runs = local_cluster.run([sys.executable, "-c", _MULTIHOST_WORKER, result], num_processes=2,
                           devices_per_process=4, env=env, cwd=root, timeout=300)
  for r in runs:
    assert r.returncode == 0, f"process {r.process_id} failed:\n{r.output[-3000:]}"
  out = [json.load(open(result.format(process=i))) for i in range(2)]
  assert out[0]["devices"] == 8
  assert out[0]["names"] == [f"arrays[{i}]" for i in range(0, 11, 2)]  # interleaved, disjoint shares
  assert out[1]["names"] == [f"arrays[{i}]" for i in range(1, 11, 2)]
  videos = np.random.default_rng(1).integers(0, 256, (11, 5, 8, 6, 3), dtype=np.uint8)
  expected = statistics.FeatureStats.from_features(np.asarray(_pool_features(2.0, videos[:, :4]), np.float64))
  for o in out:  # both processes hold the all-reduced statistics
    assert o["count"] == 11
    np.testing.assert_allclose(o["sum"], expected.sum, rtol=1e-6)
    np.testing.assert_allclose(o["outer"], expected.outer, rtol=1e-6)


def test_other_metrics_are_wired_to_their_feature_networks(monkeypatch, tmp_path):
  """FID / IS / CLIPSIM through ``evaluate`` with stand-ins for the networks: what each one receives and how its
  outputs become the reported numbers (the networks themselves have their own parity tests)."""
  from videoldm_jax import evaluate
  from videoldm_jax.evaluation import c3d, clip_image, inception

  def fid_features(params, frames):
    assert params == "inception" and frames.ndim == 4 and frames.dtype == np.uint8
    return frames.reshape(len(frames), -1)[:, :64].astype(np.float32)

  def c3d_probs(params, videos):
    assert params == "c3d" and videos.shape[1:] == (16, 16, 32, 3)
    logits = videos.reshape(len(videos), -1)[:, :101].astype(np.float64) / 64
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)

  def clipsim(loaded, videos, prompts):
    assert loaded == ("image", "text", "config") and len(prompts) == len(videos)
    return np.asarray([len(p) for p in prompts], np.float64)

  monkeypatch.setattr(evaluate, "FID_DIM", 64)  # 2048 in the real network; sqrtm of 2048x2048 takes a while
  monkeypatch.setattr(inception, "load_fid_inception", lambda path: "inception")
  monkeypatch.setattr(inception, "fid_features", fid_features)
  monkeypatch.setattr(c3d, "load_c3d", lambda path: "c3d")
  monkeypatch.setattr(c3d, "c3d_probs", c3d_probs)
  monkeypatch.setattr(clip_image, "load_clip", lambda path, variant: ("image", "text", "config"))
  monkeypatch.setattr(clip_image, "clipsim", clipsim)
  prompts = [f"prompt {'x' * i}" for i in range(12)]
  (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")

  out = evaluate.evaluate("synthetic:3", "synthetic:4", metrics=["fid", "is", "clipsim"], num_videos=6,
                          batch_size=4, fid_weights="f.pth", c3d_weights="c.pth", clip_weights="clip/",
                          prompts=str(tmp_path / "prompts.txt"), is_splits=2, synthetic_height=16,
                          synthetic_width=32, progress=False)
  gen = fvd.synthetic_videos(6, 16, 16, 32, seed=3)
  ref = fvd.synthetic_videos(6, 16, 16, 32, seed=4)
  frames = lambda v: statistics.FeatureStats.from_features(fid_features("inception", v.reshape(-1, 16, 32, 3)))
  np.testing.assert_allclose(out["fid"], statistics.frechet_distance_from_stats(frames(gen), frames(ref)),
                             rtol=1e-9)
  np.testing.assert_allclose([out["is"], out["is_std"]],
                             statistics.inception_score(c3d_probs("c3d", gen), splits=2), rtol=1e-9)
  assert out["clipsim"] == pytest.approx(np.mean([len(p) for p in prompts[:6]]))
  assert out["num_videos"] == 6 and out["num_reference"] == 6 and "fvd" not in out

  with pytest.raises(ValueError, match="--prompts=.*: 12 prompts for 20 videos"):
    evaluate.evaluate("synthetic", metrics=["clipsim"], num_videos=20, clip_weights="clip/",
                      prompts=str(tmp_path / "prompts.txt"))
  with pytest.raises(ValueError, match="--metrics=is needs --c3d_weights"):
    evaluate.evaluate("synthetic", metrics=["is"])
  with pytest.raises(ValueError, match=r"--reference is required for \['fid'\]"):
    evaluate.evaluate("synthetic", metrics=["fid"], fid_weights="f.pth")
