"""LPIPS (VGG16): parity with a PyTorch reference laid out like torchvision ``vgg16()`` + lpips v0.1 heads, strict
conversion from the two weight files, and the behaviour of the distance."""

import sys

sys.modules.setdefault("torchvision", None)  # the installed torchvision is broken; nothing here needs it

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from videoldm_jax.conversion.core import ConversionError, DictSource  # noqa: E402
from videoldm_jax.conversion.lpips import convert_lpips, load_lpips  # noqa: E402
from videoldm_jax.models.lpips import LPIPS, SCALE, SHIFT, LPIPSConfig, normalize_channels  # noqa: E402

# Max-abs error on the distances (values ~1e-2 .. 1); fp32 on both sides.
TOL = 1e-4


# ----------------------------------------------------------------------------------------------------------
# PyTorch reference, written from the lpips package's algorithm with plain torch modules.

class TorchVGG(nn.Module):
  """torchvision ``vgg16()`` layout: ``features`` (``nn.Sequential``, conv/ReLU/max-pool at torchvision's indices)
  and a ``classifier`` (present in the ImageNet file, unused by LPIPS)."""

  def __init__(self, config: LPIPSConfig):
    super().__init__()
    layers, c_in = [], 3
    for stage, (c, n) in enumerate(zip(config.channels, config.convs_per_stage)):
      if stage:
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
      for _ in range(n):
        layers += [nn.Conv2d(c_in, c, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
        c_in = c
    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))  # pool5: in torchvision's features, not tapped by LPIPS
    self.features = nn.Sequential(*layers)
    self.classifier = nn.Sequential(nn.Linear(c_in, 10), nn.ReLU(), nn.Linear(10, 10))
    self.taps = []  # indices of the ReLU after each stage's last conv (relu1_2, ..., relu5_3)
    i = -1
    for stage, n in enumerate(config.convs_per_stage):
      i += (1 if stage else 0) + 2 * n
      self.taps.append(i)


class TorchLin(nn.Module):
  """lpips ``NetLinLayer``: ``model = Sequential(Dropout(), Conv2d(c, 1, 1, bias=False))``."""

  def __init__(self, c: int):
    super().__init__()
    self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, 1, 0, bias=False))


class TorchLins(nn.Module):
  def __init__(self, config: LPIPSConfig):
    super().__init__()
    for k, c in enumerate(config.channels):
      setattr(self, f"lin{k}", TorchLin(c))


def torch_lpips(vgg: TorchVGG, lins: TorchLins, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
  """lpips ``LPIPS(net='vgg', version='0.1').forward(x0, x1)`` (NCHW in [-1, 1]) -> ``[n]``."""
  shift = torch.tensor(SHIFT).view(1, 3, 1, 1)
  scale = torch.tensor(SCALE).view(1, 3, 1, 1)

  def taps(x):
    out, h = [], (x - shift) / scale
    for i, layer in enumerate(vgg.features):
      h = layer(h)
      if i in vgg.taps:
        out.append(h)
      if i == vgg.taps[-1]:
        break
    return out

  def normalize(f, eps=1e-10):
    return f / (torch.sqrt(torch.sum(f ** 2, dim=1, keepdim=True)) + eps)

  total = 0
  for k, (f0, f1) in enumerate(zip(taps(x0), taps(x1))):
    d = (normalize(f0) - normalize(f1)) ** 2
    total = total + getattr(lins, f"lin{k}").model(d).mean(dim=(2, 3), keepdim=True)
  return total.view(-1)


def torch_models(config: LPIPSConfig, seed: int = 0):
  torch.manual_seed(seed)
  vgg, lins = TorchVGG(config).eval(), TorchLins(config).eval()
  with torch.no_grad():
    for name, p in vgg.named_parameters():
      if name.endswith("bias"):
        p.copy_(0.05 * torch.randn_like(p))  # non-trivial biases
    for p in lins.parameters():
      p.abs_()  # the released heads are non-negative
  return vgg, lins


def state_dict_numpy(module) -> dict:
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def images(seed: int, n: int = 2, h: int = 48, w: int = 64) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1, 1, (n, h, w, 3)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------

def test_parity_with_torch_vgg16():
  config = LPIPSConfig.vgg16()
  vgg, lins = torch_models(config)
  params = convert_lpips(DictSource(state_dict_numpy(vgg)), DictSource(state_dict_numpy(lins)), config)
  x0, x1 = images(1), images(2)
  x1 = np.clip(x0 + 0.3 * (x1 - x0), -1, 1)  # a related pair, like a reconstruction
  with torch.no_grad():
    ref = torch_lpips(vgg, lins, torch.from_numpy(x0).permute(0, 3, 1, 2), torch.from_numpy(x1).permute(0, 3, 1, 2))
  ours = jax.jit(LPIPS(config).apply)({"params": params}, x0, x1)
  err = float(np.max(np.abs(np.asarray(ours) - ref.numpy())))
  print(f"lpips vgg16 parity: ours {np.asarray(ours)} ref {ref.numpy()} max-abs {err:.2e}")
  assert ours.shape == (2,)
  assert np.all(ref.numpy() > 1e-3)  # not trivially zero
  assert err <= TOL


def test_conversion_is_strict_and_reads_files(tmp_path):
  config = LPIPSConfig.tiny()
  vgg, lins = torch_models(config, seed=1)
  vgg_sd, lin_sd = state_dict_numpy(vgg), state_dict_numpy(lins)
  full = convert_lpips(DictSource(vgg_sd), DictSource(lin_sd), config)
  assert set(full) == {f"features_{i}" for s in config.layer_indices() for i in s} | {f"lin{k}" for k in range(5)}
  np.testing.assert_array_equal(full["features_0"]["kernel"], vgg_sd["features.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(full["lin4"]["model_1"]["kernel"], lin_sd["lin4.model.1.weight"].transpose(2, 3, 1, 0))

  # ``vgg16().features`` saved alone (keys ``N.weight``) converts the same; files load through torch.load.
  torch.save(vgg.features.state_dict(), tmp_path / "vgg16_features.pth")
  torch.save(lins.state_dict(), tmp_path / "vgg.pth")
  from_files = load_lpips(str(tmp_path / "vgg16_features.pth"), str(tmp_path / "vgg.pth"), config)
  jax.tree.map(np.testing.assert_array_equal, from_files, full)

  missing = dict(lin_sd)
  del missing["lin2.model.1.weight"]
  with pytest.raises(ConversionError, match=r"missing keys: lin2\.model\.1\.weight"):
    convert_lpips(DictSource(vgg_sd), DictSource(missing), config)
  extra = dict(vgg_sd, **{"features.1.weight": np.zeros((3,), np.float32)})
  with pytest.raises(ConversionError, match=r"unexpected keys: features\.1\.weight"):
    convert_lpips(DictSource(extra), DictSource(lin_sd), config)
  with pytest.raises(ConversionError, match="shape mismatches"):  # VGG16-sized heads on the tiny trunk
    convert_lpips(DictSource(vgg_sd), DictSource(state_dict_numpy(TorchLins(LPIPSConfig.vgg16()))), config)


def test_identity_is_zero_and_distance_grows_with_distortion():
  config = LPIPSConfig.tiny()
  vgg, lins = torch_models(config, seed=2)
  params = {"params": convert_lpips(DictSource(state_dict_numpy(vgg)), DictSource(state_dict_numpy(lins)), config)}
  model = LPIPS(config)
  fn = jax.jit(model.apply)
  x = images(3, n=2, h=32, w=64)
  # 0 up to float rounding (XLA may fuse the two trunk passes differently): ~1e-16 observed.
  np.testing.assert_allclose(np.asarray(fn(params, x, x)), np.zeros(2, np.float32), rtol=0, atol=1e-9)
  noise = np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)
  d = [np.asarray(fn(params, x, np.clip(x + s * noise, -1, 1))) for s in (0.02, 0.1, 0.4)]
  assert np.all(d[0] > 0)
  assert np.all(d[1] > d[0]) and np.all(d[2] > d[1]), d
  # Usable as a loss: the gradient is finite everywhere (also at x0 == x1, where feature differences vanish and
  # dead-ReLU pixels have zero-norm features) and vanishes at x0 == x1.
  grad = jax.jit(jax.grad(lambda a, b: model.apply(params, a, b).sum()))
  g_same = np.asarray(grad(jnp.asarray(x), jnp.asarray(x)))
  g_diff = np.asarray(grad(jnp.asarray(x), jnp.asarray(x + 0.1 * noise)))
  assert np.all(np.isfinite(g_same)) and np.all(np.isfinite(g_diff))
  assert np.abs(g_diff).max() > 0 and np.abs(g_same).max() <= 1e-6 * np.abs(g_diff).max()


def test_normalize_channels_handles_dead_pixels():
  """A pixel whose features are all zero (every ReLU dead) normalises to 0 with a finite gradient (a plain sqrt has
  an infinite derivative there, which turns the whole LPIPS gradient into NaN); elsewhere it is x / (||x|| + 1e-10)."""
  x = np.random.default_rng(0).standard_normal((2, 3, 4, 8)).astype(np.float32)
  x[0, 1, 2] = 0.0
  np.testing.assert_allclose(np.asarray(normalize_channels(x)),
                             x / (np.sqrt((x ** 2).sum(-1, keepdims=True)) + 1e-10), rtol=1e-6, atol=1e-7)
  g = np.asarray(jax.grad(lambda a: jnp.sum(normalize_channels(a) * jnp.arange(8.0)))(jnp.asarray(x)))
  assert np.all(np.isfinite(g))
