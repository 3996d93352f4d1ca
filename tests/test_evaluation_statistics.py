"""Float64 feature statistics, the Fréchet distance and the Inception Score against direct numpy references."""

import numpy as np
import pytest

from videoldm_jax.evaluation import statistics


def _random_gaussian(rng, d, n):
  a = rng.standard_normal((d, d))
  return rng.standard_normal(d) * 3.0, (a @ a.T) / d + 0.1 * np.eye(d), n


def _frechet_by_eigh(mu1, s1, mu2, s2):
  """tr((S1 S2)^(1/2)) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2))), a symmetric route independent of sqrtm."""
  w, v = np.linalg.eigh(s1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))


@pytest.mark.parametrize("seed", [0, 1])
def test_frechet_distance_matches_reference(seed):
  rng = np.random.default_rng(seed)
  mu1, s1, _ = _random_gaussian(rng, 64, 0)
  mu2, s2, _ = _random_gaussian(rng, 64, 0)
  got = statistics.frechet_distance(mu1, s1, mu2, s2)
  np.testing.assert_allclose(got, _frechet_by_eigh(mu1, s1, mu2, s2), rtol=1e-6)
  assert abs(statistics.frechet_distance(mu1, s1, mu1, s1)) < 1e-6 * np.trace(s1)


def test_frechet_distance_rank_deficient_covariances():
  # Fewer samples than dimensions (as with a few hundred videos and 400-d I3D features): still finite and >= 0.
  rng = np.random.default_rng(2)
  a = statistics.FeatureStats.from_features(rng.standard_normal((6, 40)))
  b = statistics.FeatureStats.from_features(rng.standard_normal((6, 40)) + 0.5)
  got = statistics.frechet_distance_from_stats(a, b)
  np.testing.assert_allclose(got, _frechet_by_eigh(a.mean, a.cov, b.mean, b.cov), rtol=1e-6)


def test_streaming_statistics_equal_batch_statistics(tmp_path):
  rng = np.random.default_rng(3)
  x = rng.standard_normal((37, 16)).astype(np.float32) * 4 + 2
  stream = statistics.FeatureStats(16)
  for chunk in np.array_split(x, [5, 6, 20]):
    stream.update(chunk)
  x64 = x.astype(np.float64)
  np.testing.assert_allclose(stream.mean, x64.mean(axis=0), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(stream.cov, np.cov(x64, rowvar=False), rtol=1e-10, atol=1e-12)
  merged = statistics.FeatureStats.from_features(x[:11]).merge(statistics.FeatureStats.from_features(x[11:]))
  assert merged.count == 37
  np.testing.assert_allclose(merged.cov, stream.cov, rtol=1e-12, atol=1e-12)

  path = str(tmp_path / "stats.npz")
  statistics.save_stats(path, {"fvd": stream, "fid": merged}, {"num_frames": 16})
  loaded, meta = statistics.load_stats(path)
  assert meta == {"num_frames": 16} and sorted(loaded) == ["fid", "fvd"]
  np.testing.assert_array_equal(loaded["fvd"].outer, stream.outer)
  assert loaded["fvd"].count == 37
  assert statistics.FeatureStats.load(path, "fid").count == 37


def test_statistics_errors(tmp_path):
  s = statistics.FeatureStats(4)
  with pytest.raises(ValueError, match=r"expected features \[n, 4\]"):
    s.update(np.zeros((2, 5)))
  with pytest.raises(ValueError, match="at least 2 samples"):
    _ = s.update(np.zeros((1, 4))).cov
  with pytest.raises(ValueError, match="dimensions differ"):
    s.merge(statistics.FeatureStats(3))
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    statistics.load_stats(str(tmp_path / "missing.npz"))
  np.savez(tmp_path / "other.npz", x=np.zeros(3))
  with pytest.raises(ValueError, match="other.npz: holds no statistics"):
    statistics.load_stats(str(tmp_path / "other.npz"))
  statistics.FeatureStats.from_features(np.ones((3, 4))).save(str(tmp_path / "s.npz"))
  with pytest.raises(ValueError, match=r"no 'fid' statistics \(has \['fvd'\]\)"):
    statistics.FeatureStats.load(str(tmp_path / "s.npz"), "fid")


def test_inception_score():
  rng = np.random.default_rng(4)
  logits = rng.standard_normal((50, 7)) * 3
  probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  scores = []
  for part in np.array_split(probs, 5):  # 50 rows: 5 equal parts, as the implementation splits them
    py = part.mean(axis=0)
    scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(py)), axis=1))))
  mean, std = statistics.inception_score(probs, splits=5)
  np.testing.assert_allclose([mean, std], [np.mean(scores), np.std(scores)], rtol=1e-10)
  # Confident and evenly spread predictions score the number of classes; identical ones score 1.
  assert statistics.inception_score(np.eye(7)[np.arange(70) % 7], splits=10)[0] == pytest.approx(7.0)
  assert statistics.inception_score(np.full((20, 7), 1 / 7), splits=2)[0] == pytest.approx(1.0)
  with pytest.raises(ValueError, match="cannot be split into 10 parts"):
    statistics.inception_score(probs[:5], splits=10)
