"""LPIPS (VGG16): parity with the lpips package's own ``LPIPS(net="vgg", version="0.1")`` (its ScalingLayer, the v0.1
linear heads it ships in ``lpips/weights/v0.1/vgg.pth`` and its forward, on torchvision's VGG16), strict conversion
from the two weight files, and the behaviour of the distance."""

import importlib.util
import os
import subprocess
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

# Max error on the distances relative to their size; fp32 on both sides (measured: ~3e-7).
RTOL = 1e-5

# The released heads, as the lpips PyPI package ships them (found without importing the package).
LPIPS_HEADS = os.path.join(importlib.util.find_spec("lpips").submodule_search_locations[0], "weights", "v0.1",
                           "vgg.pth")

# Run in a fresh interpreter: the lpips package imports torchvision, whose package __init__ fails on this torch
# build (it registers C++ ops the build lacks). VGG16 itself is pure Python, so the script loads
# torchvision.models.vgg alone (package __init__ files skipped), hands it to lpips and runs lpips' own forward:
# its ScalingLayer, normalisation, NetLinLayer heads loaded from the shipped vgg.pth and spatial average. The VGG16
# trunk is torchvision's random init (ImageNet weights are not available offline) with non-zero biases.
_REFERENCE_SCRIPT = r"""
import importlib.util, os, sys, types
import numpy as np
import torch

root = os.path.dirname(importlib.util.find_spec("torchvision").origin)
for name, sub in (("torchvision", ""), ("torchvision.models", "models")):
  package = types.ModuleType(name)
  package.__path__ = [os.path.join(root, sub)]
  sys.modules[name] = package
from torchvision.models import vgg
sys.modules["torchvision"].models = sys.modules["torchvision.models"]
sys.modules["torchvision.models"].vgg16 = vgg.vgg16
import lpips

torch.manual_seed(0)
net = lpips.LPIPS(net="vgg", version="0.1", pretrained=False, pnet_rand=True, verbose=False).eval()
heads = torch.load(sys.argv[2], map_location="cpu", weights_only=True)
assert not net.load_state_dict(heads, strict=False).unexpected_keys
state = net.state_dict()
assert all(torch.equal(state[k], v) for k, v in heads.items())
trunk = {}
for stage in (net.net.slice1, net.net.slice2, net.net.slice3, net.net.slice4, net.net.slice5):
  for key, value in stage.state_dict().items():  # keys keep torchvision's vgg16().features indices
    trunk[key] = value
with torch.no_grad():
  for key, value in trunk.items():
    if key.endswith("bias"):
      value.normal_(0.0, 0.05)
rng = np.random.default_rng(1)
x0 = rng.uniform(-1, 1, (2, 3, 48, 64)).astype(np.float32)
x1 = np.clip(x0 + 0.3 * (rng.uniform(-1, 1, x0.shape) - x0), -1, 1).astype(np.float32)  # a related pair
with torch.no_grad():
  d = net(torch.from_numpy(x0), torch.from_numpy(x1)).reshape(-1).numpy()
np.savez(sys.argv[1], x0=x0, x1=x1, d=d, shift=net.scaling_layer.shift.reshape(-1).numpy(),
         scale=net.scaling_layer.scale.reshape(-1).numpy(),
         **{"features." + k: v.numpy() for k, v in trunk.items()},
         **{k: state[k].numpy() for k in heads})
"""


@pytest.fixture(scope="module")
def lpips_reference(tmp_path_factory):
  """The lpips package's distances on a random VGG16 + the shipped heads, with the tensors and inputs it used."""
  out = tmp_path_factory.mktemp("lpips") / "reference.npz"
  res = subprocess.run([sys.executable, "-c", _REFERENCE_SCRIPT, str(out), LPIPS_HEADS], capture_output=True,
                       text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  with np.load(out) as f:
    return {k: f[k] for k in f.files}


# ----------------------------------------------------------------------------------------------------------
# State dicts laid out like torchvision ``vgg16()`` and the lpips heads, at any size (the tiny configs below).

class TorchVGG(nn.Module):
  """torchvision ``vgg16()`` layout: ``features`` (``nn.Sequential``, conv/ReLU/max-pool at torchvision's indices)
  and a ``classifier`` (present in the ImageNet file, unused by LPIPS)."""

  def __init__(self, channels, convs_per_stage):
    super().__init__()
    layers, c_in = [], 3
    for stage, (c, n) in enumerate(zip(channels, convs_per_stage)):
      if stage:
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
      for _ in range(n):
        layers += [nn.Conv2d(c_in, c, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
        c_in = c
    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    self.features = nn.Sequential(*layers)
    self.classifier = nn.Sequential(nn.Linear(c_in, 10), nn.ReLU(), nn.Linear(10, 10))


class TorchLins(nn.Module):
  """lpips ``NetLinLayer`` heads: ``linK.model = Sequential(Dropout(), Conv2d(c, 1, 1, bias=False))``."""

  def __init__(self, channels):
    super().__init__()
    for k, c in enumerate(channels):
      setattr(self, f"lin{k}", nn.Module())
      getattr(self, f"lin{k}").model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, 1, 0, bias=False))


def torch_models(config: LPIPSConfig, seed: int = 0):
  torch.manual_seed(seed)
  vgg, lins = TorchVGG(config.channels, config.convs_per_stage), TorchLins(config.channels)
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

def test_input_scaling_is_the_lpips_packages(lpips_reference):
  np.testing.assert_allclose(SHIFT, lpips_reference["shift"], rtol=0, atol=1e-7)
  np.testing.assert_allclose(SCALE, lpips_reference["scale"], rtol=0, atol=1e-7)


def test_parity_with_the_lpips_package(lpips_reference):
  ref = lpips_reference
  vgg = {k: v for k, v in ref.items() if k.startswith("features.")}
  lins = {k: v for k, v in ref.items() if k.startswith("lin")}
  params = convert_lpips(DictSource(vgg), DictSource(lins), LPIPSConfig.vgg16())
  x0, x1 = ref["x0"].transpose(0, 2, 3, 1), ref["x1"].transpose(0, 2, 3, 1)
  ours = np.asarray(jax.jit(LPIPS(LPIPSConfig.vgg16()).apply)({"params": params}, x0, x1))
  err = float(np.max(np.abs(ours - ref["d"])) / np.max(ref["d"]))
  print(f"lpips vgg16 parity: ours {ours} lpips {ref['d']} relative error {err:.2e}")
  assert ours.shape == (2,)
  assert np.all(ref["d"] > 1e-3)  # not trivially zero
  assert err <= RTOL


def test_shipped_heads_and_a_vgg16_file_convert(lpips_reference, tmp_path):
  """``load_lpips`` on the lpips package's own ``v0.1/vgg.pth`` and a torchvision-layout VGG16 trunk file."""
  trunk = {k.removeprefix("features."): torch.from_numpy(v) for k, v in lpips_reference.items()
           if k.startswith("features.")}
  torch.save(trunk, tmp_path / "vgg16_features.pth")  # ``vgg16().features.state_dict()``: keys ``N.weight``
  params = load_lpips(str(tmp_path / "vgg16_features.pth"), LPIPS_HEADS, LPIPSConfig.vgg16())
  heads = torch.load(LPIPS_HEADS, map_location="cpu", weights_only=True)
  assert sorted(heads) == [f"lin{k}.model.1.weight" for k in range(5)]
  for k in range(5):
    w = heads[f"lin{k}.model.1.weight"].numpy()  # [1, c, 1, 1]
    assert w.min() >= 0  # the released heads are non-negative
    np.testing.assert_array_equal(params[f"lin{k}"]["model_1"]["kernel"], w.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["features_28"]["kernel"],
                                lpips_reference["features.28.weight"].transpose(2, 3, 1, 0))


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
    convert_lpips(DictSource(vgg_sd), DictSource(state_dict_numpy(TorchLins(LPIPSConfig.vgg16().channels))),
                  config)


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
