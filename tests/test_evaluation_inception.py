"""FID InceptionV3 vs torch-fidelity's ``FeatureExtractorInceptionV3`` (random weights, fp32).

The reference is torch-fidelity's pure-torch port of the TensorFlow FID graph (pytorch-fid's ``FIDInception*``
blocks need torchvision, which does not import against this torch build). Its modules are imported without the
package ``__init__`` (which imports torchvision through other extractors), and it is built without loading any
file: ``load_state_dict`` is bypassed during construction, so it keeps PyTorch's random init. BatchNorm running
statistics are then set to the batch statistics of a random input (activations stay O(1) through the 94 convs)
and perturbed, with random affine params, so a wrong epsilon, a swapped mean / variance or a missing
``count_include_pad=False`` fails the test.

Tolerance: max-abs error over max-abs value <= 1e-4 on the 2048-d pool features and the 1008 logits (fp32,
``jax_default_matmul_precision=highest``, set by conftest).
"""

import functools
import importlib
import importlib.util
import sys
import types

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from videoldm_jax.conversion.core import ConversionError
from videoldm_jax.evaluation import inception

REL_TOL = 1e-4
TRUNK = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
         "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
         "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool")


def _torch_fidelity_module(name: str):
  """``torch_fidelity.<name>`` without running ``torch_fidelity/__init__.py``."""
  if "torch_fidelity" not in sys.modules:
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
      pytest.skip("torch-fidelity is not installed (pip install -e '.[dev]')")
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = pkg
  return importlib.import_module(f"torch_fidelity.{name}")


def _rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _frames(n, h, w, seed):
  return (np.random.default_rng(seed).random((n, h, w, 3)) * 256).astype(np.uint8)


@pytest.fixture(scope="module")
def reference():
  """``(torch reference, its state dict, our converted params)``."""
  mod = _torch_fidelity_module("feature_extractor_inceptionv3")
  cls = mod.FeatureExtractorInceptionV3
  load, download = cls.load_state_dict, mod.load_state_dict_from_url
  cls.load_state_dict = lambda self, *a, **k: None  # keep the random init: no file, no network
  mod.load_state_dict_from_url = lambda *a, **k: {}
  try:
    torch.manual_seed(0)
    ref = cls("inception-v3-compat", ["2048", "logits"])
  finally:
    cls.load_state_dict, mod.load_state_dict_from_url = load, download
  bns = [m for m in ref.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  gen = torch.Generator().manual_seed(1)
  for m in bns:
    m.momentum = None  # cumulative average: the running stats become this batch's statistics
    m.reset_running_stats()
  ref.train()
  with torch.no_grad():
    ref(torch.from_numpy(_frames(4, 120, 120, seed=1)).permute(0, 3, 1, 2).contiguous())
  ref.eval()
  with torch.no_grad():
    for m in bns:
      c = m.num_features
      m.running_mean.add_(0.2 * m.running_var.sqrt() * torch.randn(c, generator=gen))
      m.running_var.mul_(torch.empty(c).uniform_(0.7, 1.4, generator=gen))
      m.weight.copy_(torch.empty(c).uniform_(0.6, 1.5, generator=gen))
      m.bias.copy_(0.2 * torch.randn(c, generator=gen))
    ref.fc.weight.mul_(20.0)
  state = ref.state_dict()
  assert any(k.endswith("num_batches_tracked") for k in state)  # real files may carry them: dropped
  return ref, state, inception.convert_fid_inception(state)


@functools.partial(jax.jit, static_argnames=("protocol",))
def _apply(params, frames, protocol):
  """Pool features and logits (``fid_features`` returns the former only)."""
  return inception.FIDInceptionV3().apply({"params": params}, inception.preprocess(frames, protocol))


def test_parity_tensorflow_protocol(reference):
  """End to end against torch-fidelity's own forward (TF1 bilinear resize, (x - 128) / 128), upsampling input."""
  ref, _, params = reference
  frames = _frames(2, 180, 240, seed=2)
  with torch.no_grad():
    pool, logits = ref(torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous())
  ours = _apply(params, frames, "tensorflow")
  err, err_logits = _rel_err(ours["pool"], pool), _rel_err(ours["logits"], logits)
  print(f"FID Inception (tensorflow protocol): pool rel err {err:.2e}, logits rel err {err_logits:.2e}")
  assert err < REL_TOL and err_logits < REL_TOL


def test_parity_pytorch_fid_protocol(reference):
  """pytorch-fid's input path (x / 255, ``F.interpolate`` bilinear, 2x - 1) into the reference's blocks, in
  pytorch-fid's order; downsampling input, odd batch split over two calls."""
  ref, _, params = reference
  frames = _frames(3, 320, 360, seed=3)
  with torch.no_grad():
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    x = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    for name in TRUNK:
      x = getattr(ref, name)(x)
    pool = torch.flatten(x, 1)
  ours = inception.fid_features(params, frames, batch_size=2)
  assert ours.shape == (3, 2048) and ours.dtype == np.float32
  err = _rel_err(ours, pool)
  print(f"FID Inception (pytorch_fid protocol): pool rel err {err:.2e}")
  assert err < REL_TOL


@pytest.mark.parametrize("in_size", [(37, 300), (299, 512)])
def test_bilinear_matrices_match_references(in_size):
  h, w = in_size
  image = torch.from_numpy(np.random.default_rng(4).random((1, 2, h, w)).astype(np.float32) * 255)
  interp = _torch_fidelity_module("interpolate_compat_tensorflow")
  expected = {
      "pytorch_fid": F.interpolate(image, size=(299, 299), mode="bilinear", align_corners=False),
      "tensorflow": interp.interpolate_bilinear_2d_like_tensorflow1x(image, size=(299, 299), align_corners=False),
  }
  for mode, ref in expected.items():
    mh, mw = inception.bilinear_matrix(h, 299, mode), inception.bilinear_matrix(w, 299, mode)
    ours = mh.astype(np.float64) @ image[0].numpy().astype(np.float64) @ mw.T.astype(np.float64)
    # Pixel values 0..255; torch computes source coordinates in float32 (~3e-5 apart at x ~ 500).
    assert np.max(np.abs(ours - ref[0].numpy())) < 2e-2, mode


def test_load_file_and_strictness(reference, tmp_path):
  _, state, params = reference
  path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  torch.save(state, str(path))
  loaded = inception.load_fid_inception(str(path))
  np.testing.assert_array_equal(loaded["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"],
                                params["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"])
  np.testing.assert_array_equal(loaded["Mixed_7c"]["branch_pool"]["bn"]["running_var"],
                                state["Mixed_7c.branch_pool.bn.running_var"].numpy())

  missing = {k: v for k, v in state.items() if k != "Mixed_6b.branch7x7_2.bn.running_var"}
  with pytest.raises(ValueError, match=r"missing keys: Mixed_6b\.branch7x7_2\.bn\.running_var"):
    inception.convert_fid_inception(missing)
  with pytest.raises(ConversionError, match=r"unexpected keys: AuxLogits\.fc\.weight"):
    inception.convert_fid_inception(dict(state, **{"AuxLogits.fc.weight": torch.zeros(1000, 768)}))
  with pytest.raises(ConversionError, match=r"shape mismatches: fc\.bias"):
    inception.convert_fid_inception(dict(state, **{"fc.bias": torch.zeros(1000)}))


def test_rejects_bad_input():
  with pytest.raises(ValueError, match="protocol"):
    inception.preprocess(np.zeros((1, 8, 8, 3), np.uint8), "torchvision")
  with pytest.raises(ValueError, match=r"\[n, h, w, 3\]"):
    inception.fid_features({}, np.zeros((8, 8, 3), np.uint8))
