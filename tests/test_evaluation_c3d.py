"""C3D (UCF-101 Inception Score network) vs a plain-PyTorch reference (random weights, fp32).

No installable package ships a C3D module, so the reference below is written here with ``torch.nn.Conv3d`` /
``Linear`` under the PyTorch port's attribute names (``conv1`` ... ``fc8``); its ``state_dict()`` goes through our
strict converter. ``pool5`` is either Caffe's ceil mode or the port's ``padding=(0, 1, 1)``.

Tolerance: max-abs logit error over max-abs logit <= 1e-4; probabilities within 1e-5.
"""

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from videoldm_jax.conversion.core import ConversionError
from videoldm_jax.evaluation import c3d

REL_TOL = 1e-4


class TorchC3D(nn.Module):
  """Reference C3D forward on ``[b, 3, 16, 112, 112]``."""

  def __init__(self, config: c3d.C3DConfig):
    super().__init__()
    w1, w2, w3, w4, w5 = config.widths
    conv = lambda i, o: nn.Conv3d(i, o, kernel_size=3, padding=1)
    self.conv1, self.conv2 = conv(3, w1), conv(w1, w2)
    self.conv3a, self.conv3b = conv(w2, w3), conv(w3, w3)
    self.conv4a, self.conv4b = conv(w3, w4), conv(w4, w4)
    self.conv5a, self.conv5b = conv(w4, w5), conv(w5, w5)
    self.pool5 = (nn.MaxPool3d(2, 2, ceil_mode=True) if config.pool5 == "ceil"
                  else nn.MaxPool3d(2, 2, padding=(0, 1, 1)))
    self.fc6 = nn.Linear(w5 * 16, config.fc_features)
    self.fc7 = nn.Linear(config.fc_features, config.fc_features)
    self.fc8 = nn.Linear(config.fc_features, config.num_classes)

  def forward(self, x):
    h = F.max_pool3d(F.relu(self.conv1(x)), (1, 2, 2))
    h = F.max_pool3d(F.relu(self.conv2(h)), 2)
    h = F.max_pool3d(F.relu(self.conv3b(F.relu(self.conv3a(h)))), 2)
    h = F.max_pool3d(F.relu(self.conv4b(F.relu(self.conv4a(h)))), 2)
    h = self.pool5(F.relu(self.conv5b(F.relu(self.conv5a(h)))))  # [b, c, 1, 4, 4]
    h = F.relu(self.fc7(F.relu(self.fc6(h.flatten(1)))))
    return self.fc8(h)


def _reference(config, seed=0, fc8_scale=1.0):
  torch.manual_seed(seed)
  ref = TorchC3D(config).eval()
  with torch.no_grad():
    ref.fc8.weight.mul_(fc8_scale)
  return ref


def _videos(n, h, w, seed=0):
  return (np.random.default_rng(seed).random((n, 16, h, w, 3)) * 256).astype(np.uint8)


def _torch_logits(ref, net_input):
  """``net_input [b, 16, 112, 112, 3]`` (BGR, mean-subtracted) through the reference."""
  with torch.no_grad():
    return ref(torch.from_numpy(np.ascontiguousarray(np.asarray(net_input).transpose(0, 4, 1, 2, 3)))).numpy()


def _rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("pool5", ["ceil", "pad"])
def test_tiny_parity(pool5):
  config = c3d.C3DConfig.tiny(pool5=pool5)
  ref = _reference(config, fc8_scale=100.0)  # peaked probabilities, so the softmax comparison means something
  params = c3d.convert_c3d(ref.state_dict(), config)
  videos = _videos(2, 90, 120)
  x = c3d.preprocess(videos)
  expected = _torch_logits(ref, np.asarray(x) - params["input_mean"])
  logits = jax.jit(c3d.C3D(config).apply)({"params": params}, x)
  err = _rel_err(logits, expected)
  probs = c3d.c3d_probs(params, videos, batch_size=1, config=config)
  expected_probs = torch.softmax(torch.from_numpy(expected), -1).numpy()
  print(f"C3D tiny ({pool5}): logits rel err {err:.2e}, probs max err {np.max(np.abs(probs - expected_probs)):.2e}")
  assert err < REL_TOL
  assert probs.shape == (2, 101) and np.max(np.abs(probs - expected_probs)) < 1e-5
  assert expected_probs.max() > 0.05  # not uniform (1 / 101)
  # The two pool5 conventions really differ on the same weights.
  other = c3d.C3DConfig.tiny(pool5="pad" if pool5 == "ceil" else "ceil")
  assert _rel_err(jax.jit(c3d.C3D(other).apply)({"params": params}, x[:1]), expected[:1]) > 1e-3


def test_full_size_parity():
  ref = _reference(c3d.C3DConfig(), seed=1)
  state = ref.state_dict()
  assert sum(v.numel() for v in state.values()) == 78_409_573  # 50.3M of it in fc6 / fc7
  params = c3d.convert_c3d(state)
  x = np.random.default_rng(1).normal(0, 50, (1, 16, 112, 112, 3)).astype(np.float32)
  expected = _torch_logits(ref, x - params["input_mean"])
  del ref
  err = _rel_err(jax.jit(c3d.C3D().apply)({"params": params}, x), expected)
  print(f"C3D full size: logits rel err {err:.2e}")
  assert err < REL_TOL


def test_preprocess_matches_torch_bicubic():
  """128x128 bicubic (= cv2 INTER_CUBIC on float input: a = -0.75, half-pixel, replicated border), centre 112,
  RGB -> BGR; for down- and upsampling."""
  for h, w in ((240, 320), (64, 80)):
    videos = _videos(1, h, w, seed=2)
    frames = torch.from_numpy(videos[0].astype(np.float32)).permute(0, 3, 1, 2)
    resized = F.interpolate(frames, size=(128, 128), mode="bicubic", align_corners=False)
    expected = resized[:, [2, 1, 0], 8:120, 8:120].permute(0, 2, 3, 1).numpy()
    ours = np.asarray(c3d.preprocess(videos))[0]
    assert ours.shape == (16, 112, 112, 3)
    assert np.max(np.abs(ours - expected)) < 2e-3, (h, w)  # pixel values 0..255


def test_mean_handling(tmp_path):
  rng = np.random.default_rng(3)
  clip = rng.random((1, 3, 16, 128, 171)).astype(np.float32) * 255
  # TGAN: mean.reshape(3, 1, 16, 128, 171)[..., 21:21 + 128], then x[..., 8:8 + 112, 8:8 + 112] after subtraction.
  expected = clip.reshape(3, 1, 16, 128, 171)[:, 0, :, :, 21:149][:, :, 8:120, 8:120].transpose(1, 2, 3, 0)
  np.savez(tmp_path / "mean2.npz", mean=clip)
  np.testing.assert_array_equal(c3d.read_mean(str(tmp_path / "mean2.npz")), expected)
  default = c3d.mean_from_array(None)
  assert default.shape == (16, 112, 112, 3)
  np.testing.assert_allclose(default[3, 5, 7], c3d.DEFAULT_MEAN_BGR, rtol=1e-6)
  with pytest.raises(ValueError, match="mean"):
    c3d.mean_from_array(np.zeros((3, 16, 112, 112)))


def test_load_file_and_strictness(tmp_path):
  config = c3d.C3DConfig.tiny()
  state = _reference(config, seed=4).state_dict()
  path = tmp_path / "c3d_ucf101.pth"
  torch.save({"module." + k: v for k, v in state.items()}, str(path))  # DataParallel-style keys
  np.savez(tmp_path / "mean.npz", np.full(3, 100.0, np.float32))
  params = c3d.load_c3d(str(path), config, mean=str(tmp_path / "mean.npz"))
  np.testing.assert_array_equal(params["conv3b"]["kernel"], state["conv3b.weight"].numpy().transpose(2, 3, 4, 1, 0))
  np.testing.assert_array_equal(params["fc6"]["kernel"], state["fc6.weight"].numpy().T)
  assert np.all(params["input_mean"] == 100.0)

  with pytest.raises(ValueError, match=r"missing keys: conv4b\.bias"):
    c3d.convert_c3d({k: v for k, v in state.items() if k != "conv4b.bias"}, config)
  with pytest.raises(ConversionError, match=r"unexpected keys: conv6\.weight"):
    c3d.convert_c3d(dict(state, **{"conv6.weight": torch.zeros(1)}), config)
  with pytest.raises(ConversionError, match=r"shape mismatches: fc8\.weight"):
    c3d.convert_c3d(dict(state, **{"fc8.weight": torch.zeros(487, 32)}), config)  # Sports-1M head, not UCF-101


def test_rejects_clips_that_are_not_16_frames():
  params = c3d.convert_c3d(_reference(c3d.C3DConfig.tiny()).state_dict(), c3d.C3DConfig.tiny())
  with pytest.raises(ValueError, match="16"):
    c3d.c3d_probs(params, np.zeros((1, 8, 112, 112, 3), np.uint8))
