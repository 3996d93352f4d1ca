"""Video metrics inside training: ``config.evaluation`` computes FVD of EMA samples against cached reference
statistics and logs it with the evaluation loss; the default chain's closing FVD cuts clips from its long videos
and reports them next to the real-vs-real noise floor."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import rds
from videoldm_jax import parallel, sampling, tasks, train
from videoldm_jax.evaluation import fvd


class _MeanColourFeatures(fvd.ShardedFeatures):
  """Per-frame mean colours through the same sharded streaming path: a cheap stand-in for I3D, whose network and
  FVD protocol are tested in test_evaluation_i3d / test_evaluation_fvd; here the plumbing is under test."""

  def __init__(self, *, mesh=None, batch_size=None, num_frames=fvd.NUM_FRAMES, **unused):
    del unused
    def fn(scale, videos):  # [b, t, h, w, 3] -> [b, 400]: the frames' mean colours, tiled to I3D's width
      colours = scale * jnp.mean(videos[:, :num_frames].astype(jnp.float32), axis=(2, 3)).reshape(len(videos), -1)
      return jnp.tile(colours, (1, -(-fvd.FEATURE_DIM // colours.shape[1])))[:, :fvd.FEATURE_DIM]

    super().__init__(fn, jnp.float32(1.0 / 255), fvd.FEATURE_DIM, mesh=mesh, batch_size=batch_size,
                     num_frames=num_frames)


@pytest.fixture(autouse=True)
def cheap_features_one_device(monkeypatch):
  """The mesh is not under test here (test_evaluation_fvd shards extraction over 8 devices), nor is I3D."""
  monkeypatch.setattr(parallel, "make_mesh", functools.partial(parallel.make_mesh, devices=jax.devices()[:1]))
  monkeypatch.setattr(fvd, "I3DFeatures", _MeanColourFeatures)


def test_fvd_during_training(tmp_path):
  config = rds.get_config("stage=base,runlocal")
  config.batch_size, config.total_steps = 2, 2
  config.eval_every_steps = config.sample_every_steps = config.checkpoint_every_steps = 0
  config.cpu_fast_compile = True
  config.sampling.num_steps, config.sampling.num_samples = 1, 2
  config.data.height, config.data.width = 16, 32
  config.evaluation.every_steps = 2
  config.evaluation.num_videos = 2
  config.evaluation.num_frames = 9  # longer than the 8-frame training clips: sampled at 9
  res = train.train_and_evaluate(config, str(tmp_path))
  (row,) = res.eval_history
  assert row["step"] == 2 and np.isfinite(row["eval_fvd"]) and row["eval_fvd"] > 0
  cached = fvd.load_reference_stats(str(tmp_path / "fvd_reference.npz"), num_frames=9, num_videos=2)
  assert cached.count == 2
  image = rds.get_config("stage=image,runlocal")
  image.evaluation.every_steps = 10
  with pytest.raises(ValueError, match=r"config\.evaluation\.every_steps=10: stage 'image'"):
    tasks.validate(image)


def test_closing_fvd_of_long_videos(tmp_path, capsys):
  videos = fvd.synthetic_videos(2, 40, 16, 32, seed=7, fps=30.0)  # two "long" videos of 40 frames
  chunks = [videos[:, i:i + 7] for i in range(0, 40, 7)]  # streamed in as the pipeline yields them
  got = sampling.write_stream(iter(chunks), 40, 30.0, str(tmp_path / "sample"), keep_videos=False, fvd_clips=4)
  starts = sampling.fvd_clip_starts(40, 2, 4)
  assert list(starts) == [0, 24] and "videos" not in got and got["num_frames"] == 40
  np.testing.assert_array_equal(got["fvd_clips"], np.stack([videos[i, s:s + 16] for i in range(2) for s in starts]))
  assert all(os.path.getsize(got[k]) > 0 for k in ("mp4", "gif", "png"))
  out = train.closing_fvd(got["fvd_clips"], 30.0, tmp_path)
  assert out["num_clips"] == 4 and np.isfinite(out["fvd"]) and np.isfinite(out["noise_floor"])
  assert json.loads((tmp_path / "fvd.json").read_text()) == pytest.approx(out)
  printed = capsys.readouterr().out
  assert "FVD of 4 clips (16 frames at 30 fps)" in printed and "noise floor" in printed
