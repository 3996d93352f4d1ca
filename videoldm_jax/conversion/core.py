"""Strict, target-driven PyTorch -> Flax weight mapping.

The Flax model defines what must exist: we walk its abstract param tree (``jax.eval_shape``), ask a
key function for the PyTorch name of every leaf, fetch that tensor (one at a time, so a multi-GB
checkpoint converts in little RAM), transpose it to Flax layout and check the shape. Every problem is
collected -- missing keys, unexpected (unconsumed) keys, shape mismatches -- and raised together in a
:class:`ConversionError` naming the keys.

The default key rule relies on the naming contract of ``models/layers.py``: ``down_blocks_0/resnets_1/conv1/kernel``
<-> ``down_blocks.0.resnets.1.conv1.weight``.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

Path = Tuple[str, ...]
KeyFn = Callable[[Path], str]

# Names that really end in ``_<digit>`` in PyTorch module trees (not list indices).
LITERAL_UNDERSCORE_NAMES = frozenset({"linear_1", "linear_2"})
_INDEX_RE = re.compile(r"^(.*)_(\d+)$")
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


class ConversionError(ValueError):
  """Raised when a checkpoint does not match the target model exactly (or cannot be read safely)."""


def _summarise(label: str, items: Sequence[str], limit: int = 8) -> str:
  shown = ", ".join(items[:limit])
  more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
  return f"{len(items)} {label}: {shown}{more}"


def path_component_to_torch(name: str) -> str:
  if name in LITERAL_UNDERSCORE_NAMES:
    return name
  m = _INDEX_RE.match(name)
  if m and m.group(1):
    return f"{path_component_to_torch(m.group(1))}.{m.group(2)}"
  return name


def default_torch_key(path: Path) -> str:
  """``('down_blocks_0', 'resnets_1', 'conv1', 'kernel')`` -> ``'down_blocks.0.resnets.1.conv1.weight'``."""
  *modules, leaf = path
  parts = [path_component_to_torch(m) for m in modules]
  parts.append(_LEAF_TO_TORCH.get(leaf, leaf))
  return ".".join(parts)


# ----------------------------------------------------------------------------------------------------------
# Layout transforms.

def torch_to_flax_array(leaf_name: str, array: np.ndarray, target_shape: Sequence[int]) -> np.ndarray:
  """Transposes a PyTorch tensor into the Flax layout of ``target_shape`` (or returns it unchanged)."""
  target_shape = tuple(target_shape)
  if leaf_name == "kernel":
    if array.ndim == 4 and len(target_shape) == 2 and array.shape[2:] == (1, 1):
      array = array[:, :, 0, 0]  # 1x1 conv stored where we use a Dense (CompVis proj_in / VAE attention)
    if array.ndim == 2 and len(target_shape) == 4 and target_shape[:2] == (1, 1):
      array = array[:, :, None, None]  # Dense stored where we use a 1x1 conv
    if array.ndim == 2:
      array = array.T  # Linear [out, in] -> [in, out]
    elif array.ndim == 4:
      array = array.transpose(2, 3, 1, 0)  # Conv2d [o, i, h, w] -> [h, w, i, o]
    elif array.ndim == 5:
      array = array.transpose(2, 3, 4, 1, 0)  # Conv3d [o, i, t, h, w] -> [t, h, w, i, o]
  if array.shape != target_shape and array.size == int(np.prod(target_shape)) and array.ndim <= 1:
    array = array.reshape(target_shape)  # scalars stored as [1] (e.g. mix_factor) or vice versa
  return array


def flax_to_torch_array(leaf_name: str, array: np.ndarray) -> np.ndarray:
  """Inverse of :func:`torch_to_flax_array` for the canonical (diffusers) layout."""
  if leaf_name == "kernel":
    if array.ndim == 2:
      return array.T
    if array.ndim == 4:
      return array.transpose(3, 2, 0, 1)
    if array.ndim == 5:
      return array.transpose(4, 3, 0, 1, 2)
  return array


# ----------------------------------------------------------------------------------------------------------
# Tensor sources: read-only, lazy views of a checkpoint.

class TensorSource:
  """A lazily-read mapping from PyTorch key to tensor. Subclasses implement ``keys``/``shape``/``_read``."""

  name: str = "<tensors>"

  def keys(self) -> List[str]:
    raise NotImplementedError

  def shape(self, key: str) -> Tuple[int, ...]:
    raise NotImplementedError

  def _read(self, key: str) -> np.ndarray:
    raise NotImplementedError

  def get(self, key: str) -> np.ndarray:
    """Returns the tensor as a float32 numpy array (bf16/fp16 upcast)."""
    return np.asarray(self._read(key), dtype=np.float32)

  def __contains__(self, key: str) -> bool:
    return key in set(self.keys())


class FilteredSource(TensorSource):
  """The keys of ``source`` for which ``keep(key)`` holds (explicit, documented drops / sub-models only: every
  other key stays visible and fails strict conversion)."""

  def __init__(self, source: TensorSource, keep: Callable[[str], bool]):
    self.source, self.name = source, source.name
    self._keys = [k for k in source.keys() if keep(k)]

  def keys(self) -> List[str]:
    return list(self._keys)

  def shape(self, key: str) -> Tuple[int, ...]:
    return self.source.shape(key)

  def _read(self, key: str) -> np.ndarray:
    return self.source._read(key)  # pylint: disable=protected-access


class DictSource(TensorSource):
  """In-memory tensors (numpy arrays or torch tensors)."""

  def __init__(self, tensors: Mapping[str, object], name: str = "<dict>"):
    self._tensors = dict(tensors)
    self.name = name

  def keys(self):
    return list(self._tensors)

  def shape(self, key):
    return tuple(self._tensors[key].shape)

  def _read(self, key):
    t = self._tensors[key]
    if hasattr(t, "detach"):  # torch tensor
      t = t.detach().float().cpu().numpy()
    return t


class MergedSource(TensorSource):
  """The union of sources with disjoint keys (e.g. a checkpoint plus tensors a format leaves implicit)."""

  def __init__(self, *sources: TensorSource):
    self._owner: Dict[str, TensorSource] = {}
    for source in sources:
      for key in source.keys():
        if key in self._owner:
          raise ConversionError(f"{source.name}: key {key} is also in {self._owner[key].name}")
        self._owner[key] = source
    self.name = sources[0].name if sources else "<empty>"

  def keys(self):
    return list(self._owner)

  def shape(self, key):
    return self._owner[key].shape(key)

  def _read(self, key):
    return self._owner[key]._read(key)  # pylint: disable=protected-access


class PrefixSource(TensorSource):
  """The keys of ``source`` that start with ``prefix``, with the prefix stripped."""

  def __init__(self, source: TensorSource, prefix: str):
    self.source, self.prefix = source, prefix
    self.name = f"{source.name}[{prefix}*]"
    self._keys = [k[len(prefix):] for k in source.keys() if k.startswith(prefix)]

  def keys(self):
    return list(self._keys)

  def shape(self, key):
    return self.source.shape(self.prefix + key)

  def _read(self, key):
    return self.source._read(self.prefix + key)


class RenamedSource(TensorSource):
  """A view with renamed keys, and optionally derived keys (e.g. slices of a fused qkv tensor).

  ``renames`` maps new key -> old key. ``derived`` maps new key -> (old key, fn(array) -> array, shape).
  Old keys used by neither keep their own names, so strict conversion reports them as unexpected.
  """

  def __init__(self, source: TensorSource, renames: Mapping[str, str],
               derived: Optional[Mapping[str, Tuple[str, Callable[[np.ndarray], np.ndarray], Tuple[int, ...]]]] = None):
    self.source = source
    self.name = source.name
    self._renames = dict(renames)
    self._derived = dict(derived or {})
    used = set(self._renames.values()) | {old for old, _, _ in self._derived.values()}
    self._keys = list(self._renames) + list(self._derived) + [k for k in source.keys() if k not in used]

  def keys(self):
    return list(self._keys)

  def shape(self, key):
    if key in self._derived:
      return tuple(self._derived[key][2])
    return self.source.shape(self._renames.get(key, key))

  def _read(self, key):
    if key in self._derived:
      old, fn, _ = self._derived[key]
      return fn(self.source.get(old))
    return self.source._read(self._renames.get(key, key))


# ----------------------------------------------------------------------------------------------------------
# Strict conversion.

def flatten_paths(tree, prefix: Path = ()) -> Iterator[Tuple[Path, object]]:
  """Yields ``(path, leaf)`` of a nested dict in sorted order."""
  for key in sorted(tree):
    value = tree[key]
    if isinstance(value, Mapping):
      yield from flatten_paths(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def unflatten_paths(items: Iterable[Tuple[Path, object]]) -> Dict:
  out: Dict = {}
  for path, value in items:
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return out


def _leaf_shape(leaf) -> Tuple[int, ...]:
  value = getattr(leaf, "value", leaf)  # nn.Partitioned boxes
  return tuple(value.shape)


def convert_strict(source: TensorSource, abstract_params: Mapping, *, key_fn: KeyFn = default_torch_key,
                   dtype=np.float32, what: str = "model", progress: Optional[Callable[[int], None]] = None) -> Dict:
  """Fills every leaf of ``abstract_params`` from ``source``; raises :class:`ConversionError` on any mismatch.

  Args:
    source: the checkpoint view (PyTorch key names).
    abstract_params: nested dict of shapes (``jax.ShapeDtypeStruct``, arrays, or logical ``Partitioned`` boxes).
    key_fn: Flax path -> PyTorch key.
    dtype: numpy dtype of the returned arrays (``ml_dtypes.bfloat16`` for bf16).
    what: model name used in error messages.
  Returns:
    nested dict of numpy arrays with exactly the structure of ``abstract_params`` (boxes removed).
  """
  source_keys = set(source.keys())
  consumed = set()
  missing: List[str] = []
  mismatched: List[str] = []
  out: List[Tuple[Path, np.ndarray]] = []
  for path, leaf in flatten_paths(_unbox(abstract_params)):
    target_shape = _leaf_shape(leaf)
    torch_key = key_fn(path)
    flax_name = "/".join(path)
    if torch_key not in source_keys:
      missing.append(f"{torch_key} (for {flax_name})")
      continue
    consumed.add(torch_key)
    array = torch_to_flax_array(path[-1], source.get(torch_key), target_shape)
    if tuple(array.shape) != target_shape:
      mismatched.append(f"{torch_key}: checkpoint {tuple(source.shape(torch_key))} -> {tuple(array.shape)}, "
                        f"model {flax_name} expects {target_shape}")
      continue
    out.append((path, array.astype(dtype)))
    if progress:
      progress(1)
  unexpected = sorted(source_keys - consumed)
  problems = []
  if missing:
    problems.append(_summarise("missing keys", missing))
  if unexpected:
    problems.append(_summarise("unexpected keys", unexpected))
  if mismatched:
    problems.append(_summarise("shape mismatches", mismatched))
  if problems:
    raise ConversionError(f"{what}: checkpoint {source.name} does not match the model:\n  " + "\n  ".join(problems))
  return unflatten_paths(out)


def export_torch(params: Mapping, *, key_fn: KeyFn = default_torch_key) -> Dict[str, np.ndarray]:
  """Flax params -> ``{pytorch_key: array}`` in diffusers/transformers layout (for safetensors export)."""
  return {key_fn(path): np.ascontiguousarray(flax_to_torch_array(path[-1], np.asarray(leaf)))
          for path, leaf in flatten_paths(_unbox(params))}


def _unbox(tree):
  """Removes flax ``Partitioned`` boxes and FrozenDicts, leaving plain nested dicts."""
  if isinstance(tree, Mapping):
    return {k: _unbox(v) for k, v in tree.items()}
  return getattr(tree, "value", tree) if type(tree).__name__ in ("Partitioned", "LogicallyPartitioned") else tree
