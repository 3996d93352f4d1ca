"""Safe checkpoint readers: safetensors directly, PyTorch pickles only through ``weights_only=True``.

Nothing here ever executes code from a checkpoint. Tensors are read lazily, one at a time.
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence

import numpy as np

from videoldm_jax.conversion.core import ConversionError, TensorSource

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


class SafetensorsSource(TensorSource):
  """One or more ``.safetensors`` files (sharded diffusers/transformers weights) as one lazy source."""

  def __init__(self, paths: Sequence[str]):
    from safetensors import safe_open  # light dependency, no torch needed
    self.name = ", ".join(os.path.basename(p) for p in paths) if len(paths) > 1 else str(paths[0])
    self._handles = {}
    self._where: Dict[str, object] = {}
    for path in paths:
      try:
        handle = safe_open(path, framework="numpy")
      except Exception as e:  # safetensors raises SafetensorError for anything malformed
        raise ConversionError(f"{path}: not a readable safetensors file ({e})") from e
      self._handles[path] = handle
      for key in handle.keys():
        self._where[key] = handle

  def keys(self) -> List[str]:
    return list(self._where)

  def shape(self, key):
    return tuple(self._where[key].get_slice(key).get_shape())

  def _read(self, key):
    handle = self._where[key]
    if handle.get_slice(key).get_dtype() != "BF16":
      return handle.get_tensor(key)
    # numpy has no bfloat16; the flax reader does (one tensor at a time, on the host CPU).
    import jax
    from safetensors import safe_open
    path = next(p for p, h in self._handles.items() if h is handle)
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
      return np.asarray(safe_open(path, framework="flax").get_tensor(key), dtype=np.float32)


class TorchPickleSource(TensorSource):
  """A PyTorch ``.ckpt``/``.bin`` state dict loaded with ``torch.load(weights_only=True)`` (memory-mapped)."""

  def __init__(self, path: str):
    try:
      import torch
    except ImportError as e:
      raise ConversionError(f"{path}: reading PyTorch pickles needs torch installed "
                            f"(pip install -e '.[dev]'); safetensors files need no torch") from e
    self.name = str(path)
    with open(path, "rb") as f:
      head = f.read(4)
    # torch.save writes a zip archive (or, legacy, a pickle: protocol 2+ starts with PROTO); anything else is not
    # a checkpoint at all, whatever its name, and must not be reported as a malicious pickle.
    if head != b"PK\x03\x04" and not head.startswith(b"\x80"):
      raise ConversionError(f"{path}: not a readable checkpoint (neither a PyTorch zip archive nor a pickle)")
    try:
      try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
      except RuntimeError as e:
        if "mmap" not in str(e):
          raise
        obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format cannot mmap
    except Exception as e:
      text = str(e)
      lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
      # torch wraps the unpickler's own words in a preamble and an epilogue about weights_only
      noise = ("Weights only load failed", "Please file an issue", "Check the documentation", "WeightsUnpickler")
      words = [ln for ln in lines if not ln.startswith(noise)]
      reason = (words[0] if words else (lines[0] if lines else type(e).__name__)).rstrip(".")
      blocked = [ln for ln in words if "global" in ln.lower()]  # an import the weights-only reader refused
      if blocked:
        raise ConversionError(
            f"{path}: refused -- this pickle needs more than plain tensors to load (it would execute code: "
            f"{blocked[0].rstrip('.')}). Only weights-only checkpoints are accepted; convert it to .safetensors "
            "with a trusted tool.") from e
      if "Weights only load failed" in text and (head == b"PK\x03\x04" or _starts_with_a_pickle(path)):
        raise ConversionError(
            f"{path}: refused -- this pickle uses more than the weights-only reader allows ({reason}). Only "
            "weights-only checkpoints are accepted; convert it to .safetensors with a trusted tool.") from e
      raise ConversionError(f"{path}: not a readable checkpoint ({reason})") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
      obj = obj["state_dict"]
    if not isinstance(obj, dict):
      raise ConversionError(f"{path}: expected a state dict, found {type(obj).__name__}")
    self._tensors = {k: v for k, v in obj.items() if hasattr(v, "shape")}
    skipped = sorted(k for k, v in obj.items() if not hasattr(v, "shape"))
    if skipped:
      raise ConversionError(f"{path}: non-tensor entries in the state dict: {', '.join(skipped[:8])}")

  def keys(self):
    return list(self._tensors)

  def shape(self, key):
    return tuple(self._tensors[key].shape)

  def _read(self, key):
    return self._tensors[key].detach().float().numpy()


def _starts_with_a_pickle(path: str) -> bool:
  """Whether the file starts with one well-formed pickle (torch's legacy format is several in a row), as opposed
  to bytes that only happen to begin like one."""
  import pickletools
  try:
    with open(path, "rb") as f:
      for _ in pickletools.genops(f):
        pass
    return True
  except Exception:  # pylint: disable=broad-except  (pickletools raises ValueError and others on garbage)
    return False


def open_checkpoint(paths: Sequence[str] | str) -> TensorSource:
  """Opens one checkpoint file (or the shards of one) by extension; unknown types are refused."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [str(paths)]
  paths = [str(p) for p in paths]
  for p in paths:
    if not os.path.isfile(p):
      raise ConversionError(f"{p}: no such file")
  suffixes = {os.path.splitext(p)[1].lower() for p in paths}
  if suffixes <= set(SAFETENSORS_SUFFIXES):
    return SafetensorsSource(paths)
  if len(paths) == 1 and suffixes <= set(PICKLE_SUFFIXES):
    return TorchPickleSource(paths[0])
  raise ConversionError(f"{', '.join(paths)}: unsupported checkpoint type {sorted(suffixes)}; expected "
                        f"{SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES}")


def save_safetensors(tensors: Dict[str, np.ndarray], path: str) -> None:
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path)
