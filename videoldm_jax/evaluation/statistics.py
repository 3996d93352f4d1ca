"""Feature statistics for FVD / FID and the Inception Score, all in float64 on the host.

``FeatureStats`` streams features into a count, a float64 sum and a float64 sum of outer products, so memory stays
``O(d^2)`` however many videos pass through; two of them ``merge`` by adding (the multi-host all-reduce sums the
same three arrays). The mean is ``sum / n`` and the covariance the unbiased one, ``(outer - n mu mu^T) / (n - 1)``,
which is what ``np.cov(features, rowvar=False)`` returns.

``frechet_distance`` is ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` with the real part of
``scipy.linalg.sqrtm`` (the FID / FVD reference implementations do the same).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import scipy.linalg

_FIELDS = ("count", "sum", "outer")
_META_KEY = "meta"


class FeatureStats:
  """Streaming first and second moments of ``d``-dimensional features (float64)."""

  def __init__(self, dim: int):
    if dim <= 0:
      raise ValueError(f"FeatureStats: dim must be positive, got {dim}")
    self.dim = int(dim)
    self.count = 0
    self.sum = np.zeros((self.dim,), np.float64)
    self.outer = np.zeros((self.dim, self.dim), np.float64)

  def update(self, features) -> "FeatureStats":
    """Adds features ``[n, d]`` (any float dtype; accumulated in float64). Returns ``self``."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[1] != self.dim:
      raise ValueError(f"FeatureStats.update: expected features [n, {self.dim}], got shape {x.shape}")
    if not np.all(np.isfinite(x)):
      raise ValueError("FeatureStats.update: features contain NaN or inf")
    self.count += x.shape[0]
    self.sum += x.sum(axis=0)
    self.outer += x.T @ x
    return self

  def merge(self, other: "FeatureStats") -> "FeatureStats":
    """A new ``FeatureStats`` holding the features of both."""
    if other.dim != self.dim:
      raise ValueError(f"FeatureStats.merge: dimensions differ ({self.dim} vs {other.dim})")
    out = FeatureStats(self.dim)
    out.count = self.count + other.count
    out.sum = self.sum + other.sum
    out.outer = self.outer + other.outer
    return out

  @classmethod
  def from_features(cls, features) -> "FeatureStats":
    x = np.asarray(features)
    return cls(x.shape[-1]).update(x.reshape(-1, x.shape[-1]))

  @property
  def mean(self) -> np.ndarray:
    """``[d]`` float64."""
    if self.count < 1:
      raise ValueError("FeatureStats: no features yet")
    return self.sum / self.count

  @property
  def cov(self) -> np.ndarray:
    """``[d, d]`` float64 unbiased covariance (divides by ``n - 1``)."""
    if self.count < 2:
      raise ValueError(f"FeatureStats: a covariance needs at least 2 samples, have {self.count}")
    mu = self.mean
    cov = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
    return 0.5 * (cov + cov.T)  # exact symmetry; the rounding of the two triangles can differ

  # -- (de)serialisation: plain arrays only, read back with allow_pickle=False. ---------------------------------

  def to_arrays(self, prefix: str = "") -> Dict[str, np.ndarray]:
    return {f"{prefix}count": np.asarray(self.count, np.int64), f"{prefix}sum": self.sum,
            f"{prefix}outer": self.outer}

  @classmethod
  def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str = "", where: str = "<arrays>"
                  ) -> "FeatureStats":
    missing = [prefix + f for f in _FIELDS if prefix + f not in arrays]
    if missing:
      raise ValueError(f"{where}: missing statistics {missing} (has {sorted(arrays)})")
    total = np.asarray(arrays[prefix + "sum"], np.float64)
    outer = np.asarray(arrays[prefix + "outer"], np.float64)
    if total.ndim != 1 or outer.shape != (total.shape[0],) * 2:
      raise ValueError(f"{where}: {prefix}sum {total.shape} and {prefix}outer {outer.shape} do not match")
    out = cls(total.shape[0])
    out.count, out.sum, out.outer = int(arrays[prefix + "count"]), total.copy(), outer.copy()
    return out

  def save(self, path: str, name: str = "fvd", meta: Optional[Mapping[str, Any]] = None) -> None:
    save_stats(path, {name: self}, meta)

  @classmethod
  def load(cls, path: str, name: str = "fvd") -> "FeatureStats":
    stats, _ = load_stats(path)
    if name not in stats:
      raise ValueError(f"{path}: no {name!r} statistics (has {sorted(stats)})")
    return stats[name]

  def __repr__(self) -> str:
    return f"FeatureStats(dim={self.dim}, count={self.count})"


def save_stats(path: str, stats: Mapping[str, FeatureStats], meta: Optional[Mapping[str, Any]] = None) -> None:
  """Writes ``{name: FeatureStats}`` (and JSON ``meta``) to a ``.npz``, atomically (temporary file + rename)."""
  arrays: Dict[str, np.ndarray] = {}
  for name, s in stats.items():
    if "/" in name:
      raise ValueError(f"save_stats: statistics name {name!r} may not contain '/'")
    arrays.update(s.to_arrays(prefix=f"{name}/"))
  arrays[_META_KEY] = np.asarray(json.dumps(dict(meta or {}), sort_keys=True))
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}.npz"  # np.savez appends .npz to names without it
  try:
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def load_stats(path: str) -> Tuple[Dict[str, FeatureStats], Dict[str, Any]]:
  """``({name: FeatureStats}, meta)`` from a file written by :func:`save_stats` (no pickles are read)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such statistics file")
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = {k: data[k] for k in data.files}
  except (ValueError, OSError) as e:
    raise ValueError(f"{path}: not a statistics .npz ({e})") from None
  meta = json.loads(str(arrays.pop(_META_KEY))) if _META_KEY in arrays else {}
  names = sorted({k.split("/", 1)[0] for k in arrays if "/" in k})
  if not names:
    raise ValueError(f"{path}: holds no statistics (keys {sorted(arrays)})")
  return {n: FeatureStats.from_arrays(arrays, prefix=f"{n}/", where=path) for n in names}, meta


# ----------------------------------------------------------------------------------------------------------------
# Distances and scores.
# ----------------------------------------------------------------------------------------------------------------

def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """Fréchet distance between the Gaussians ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (float64).

  When ``sigma1 @ sigma2`` is singular enough that its square root is not finite, ``eps * I`` is added to both
  covariances (as the FID reference implementation does). The imaginary part that rounding leaves in the square
  root of a rank-deficient product is dropped.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or mu1.ndim != 1:
    raise ValueError(f"frechet_distance: means must be vectors of one shape, got {mu1.shape} and {mu2.shape}")
  d = mu1.shape[0]
  if sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f"frechet_distance: covariances must be [{d}, {d}], got {sigma1.shape} and {sigma2.shape}")
  diff = mu1 - mu2
  with warnings.catch_warnings():
    # Fewer samples than dimensions make the product singular; sqrtm warns but its square root is still right
    # (checked against an eigendecomposition in the tests). A non-finite result takes the eps path below.
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(covmean)):
      offset = np.eye(d) * eps
      covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  covmean = np.real(covmean)
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_distance_from_stats(a: FeatureStats, b: FeatureStats) -> float:
  return frechet_distance(a.mean, a.cov, b.mean, b.cov)


def inception_score(probs, splits: int = 10) -> Tuple[float, float]:
  """Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` over ``splits`` equal parts: ``(mean, std)`` of the parts.

  ``probs``: ``[n, k]`` class probabilities (rows sum to 1). Part ``i`` is rows ``[i n // splits, (i + 1) n //
  splits)`` (every row used); ``p(y)`` is each part's mean; terms with ``p(y|x) = 0`` contribute 0.
  """
  p = np.asarray(probs, np.float64)
  if p.ndim != 2:
    raise ValueError(f"inception_score: probs must be [n, k], got shape {p.shape}")
  if splits < 1 or p.shape[0] < splits:
    raise ValueError(f"inception_score: {p.shape[0]} samples cannot be split into {splits} parts")
  if np.any(p < 0) or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
    raise ValueError("inception_score: probs must be non-negative rows summing to 1")
  n = p.shape[0]
  scores = []
  for k in range(splits):
    part = p[k * n // splits:(k + 1) * n // splits]
    py = part.mean(axis=0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
      kl = np.where(part > 0, part * (np.log(part) - np.log(py)), 0.0)
    scores.append(np.exp(kl.sum(axis=1).mean()))
  return float(np.mean(scores)), float(np.std(scores))
