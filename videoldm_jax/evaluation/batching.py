"""Running a jitted feature network over many inputs on the host, in fixed-size batches."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

PRECISION = "highest"  # metrics in full fp32 on every platform, like their references (GPUs would use TF32)


def map_padded(fn: Callable[[np.ndarray], jax.Array], inputs: np.ndarray, batch_size: int) -> np.ndarray:
  """``fn`` over batches of ``batch_size`` rows of ``inputs`` ``[n, ...]``, concatenated ``[n, ...]``. The last
  batch is zero-padded and trimmed, so ``fn`` compiles once; every call runs in ``PRECISION``."""
  n = inputs.shape[0]
  size = min(batch_size, n)
  out = []
  for start in range(0, n, size):
    chunk = inputs[start:start + size]
    valid = chunk.shape[0]
    if valid < size:
      chunk = np.concatenate([chunk, np.zeros((size - valid,) + chunk.shape[1:], chunk.dtype)])
    with jax.default_matmul_precision(PRECISION):
      out.append(np.asarray(fn(chunk))[:valid])
  return np.concatenate(out)
