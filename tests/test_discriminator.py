"""PatchGAN discriminator (frames and clips), GAN losses and the adaptive generator weight."""

import math
import sys

sys.modules.setdefault("torchvision", None)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from videoldm_jax.conversion.core import DictSource, convert_strict  # noqa: E402
from videoldm_jax.models import discriminator as D  # noqa: E402

TOL = 1e-4  # max-abs on logits of unit scale, fp32 both sides


class TamingNLayerDiscriminator(nn.Module):
  """The pix2pix / taming-transformers PatchGAN ``NLayerDiscriminator(input_nc, ndf, n_layers)``, written here from
  the published architecture because no installed package ships one (diffusers, timm and open_clip do not; sgm's
  3-D variant is not installed). It takes nothing from the module under test.

  4x4 convs with padding 1 and LeakyReLU(0.2): ``ndf`` channels at stride 2, then ``n_layers`` convs of
  ``ndf * min(2^n, 8)`` channels (stride 2, the last one stride 1), each without bias and followed by ``norm``,
  then a stride-1 conv to one logit per patch. taming's norm is BatchNorm2d; ``video=True`` is the clip version
  (Conv3d, kernel (3, 4, 4), never strided in time, padding 1 in time too).
  """

  def __init__(self, input_nc=3, ndf=64, n_layers=3, norm=nn.BatchNorm2d, video=False):
    super().__init__()
    conv = nn.Conv3d if video else nn.Conv2d
    kernel = (3, 4, 4) if video else 4
    stride = (lambda s: (1, s, s)) if video else (lambda s: s)
    layers = [conv(input_nc, ndf, kernel, stride(2), 1), nn.LeakyReLU(0.2)]
    mult = 1
    for n in range(1, n_layers + 1):
      prev, mult = mult, min(2 ** n, 8)
      layers += [conv(ndf * prev, ndf * mult, kernel, stride(2 if n < n_layers else 1), 1, bias=False),
                 norm(ndf * mult), nn.LeakyReLU(0.2)]
    layers.append(conv(ndf * mult, 1, kernel, stride(1), 1))
    self.main = nn.Sequential(*layers)

  def forward(self, x):
    return self.main(x)


def _group_norm(channels):
  return nn.GroupNorm(min(32, channels), channels)  # 32 groups; every channel count here is a power of two


def _out(n: int, stride: int) -> int:  # k=4, padding 1
  return (n + 2 - 4) // stride + 1


@pytest.mark.parametrize("dims", [2, 3])
def test_shapes_and_parity_with_torch(dims):
  config = D.DiscriminatorConfig(ndf=8, n_layers=3, dims=dims)
  torch.manual_seed(dims)
  ref = TamingNLayerDiscriminator(3, 8, 3, norm=_group_norm, video=dims == 3).eval()
  with torch.no_grad():
    for p in ref.parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  model = D.NLayerDiscriminator(config)
  abstract = jax.eval_shape(model.init, jax.random.key(0), D.example_input(config))["params"]
  sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  params = convert_strict(DictSource(sd), abstract, what="discriminator")

  shape = (2, 40, 72, 3) if dims == 2 else (2, 5, 40, 72, 3)
  x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
  ours = np.asarray(jax.jit(model.apply)({"params": params}, x))
  h, w = 40, 72
  for s in (2, 2, 2, 1, 1):
    h, w = _out(h, s), _out(w, s)
  expected = (2, h, w, 1) if dims == 2 else (2, 5, h, w, 1)  # time is never strided, padding keeps t
  assert ours.shape == expected and expected[-3:-1] == (3, 7)
  with torch.no_grad():
    t = torch.from_numpy(x).permute(0, 3, 1, 2) if dims == 2 else torch.from_numpy(x).permute(0, 4, 1, 2, 3)
    r = ref(t)
    r = r.permute(0, 2, 3, 1) if dims == 2 else r.permute(0, 2, 3, 4, 1)
  err = float(np.max(np.abs(ours - r.numpy())))
  print(f"discriminator dims={dims} parity max-abs {err:.2e}")
  assert err <= TOL * max(1.0, float(r.std()))


def test_full_size_param_count_and_example_independence():
  # taming's NLayerDiscriminator(3, 64, 3): 2,765,633 params (BatchNorm's affine has GroupNorm's param count).
  full = jax.eval_shape(D.NLayerDiscriminator(D.DiscriminatorConfig.patchgan()).init, jax.random.key(0),
                        D.example_input(D.DiscriminatorConfig.patchgan()))
  taming = sum(p.numel() for p in TamingNLayerDiscriminator(3, 64, 3).parameters())
  assert sum(x.size for x in jax.tree.leaves(full)) == taming == 2_765_633

  # GroupNorm keeps examples independent (BatchNorm would couple them); the 3-D kernel mixes neighbouring frames.
  for dims in (2, 3):
    config = D.DiscriminatorConfig.tiny(dims)
    model = D.NLayerDiscriminator(config)
    x = np.random.default_rng(1).uniform(-1, 1, (2, 4, 32, 32, 3) if dims == 3 else (2, 32, 32, 3))
    x = x.astype(np.float32)
    params = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x)  # rbg: threefry init compiles slowly on CPU
    apply = jax.jit(model.apply)
    base = np.asarray(apply(params, x))
    y = x.copy()
    if dims == 2:
      y[0] = -y[0]
      out = np.asarray(apply(params, y))
      np.testing.assert_array_equal(out[1], base[1])
      assert np.abs(out[0] - base[0]).max() > 1e-4
    else:
      y[:, 0, :4, :4] = 1.0  # a corner of frame 0 only
      out = np.asarray(apply(params, y))
      assert np.abs(out[:, 1] - base[:, 1]).max() > 1e-6  # frame 1 sees frame 0
  with pytest.raises(ValueError, match="expects a 5-D input"):
    D.NLayerDiscriminator(D.DiscriminatorConfig.tiny(3)).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


def test_gan_losses_on_known_logits():
  real = np.array([2.0, 0.5, -1.0], np.float32)
  fake = np.array([-2.0, 0.0, 1.5], np.float32)
  # hinge: mean(relu(1 - real)) = (0 + 0.5 + 2) / 3, mean(relu(1 + fake)) = (0 + 1 + 2.5) / 3.
  assert float(D.hinge_d_loss(real, fake)) == pytest.approx(0.5 * (2.5 / 3 + 3.5 / 3), abs=1e-6)
  assert float(D.d_loss("hinge", real, fake)) == pytest.approx(1.0, abs=1e-6)
  softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
  vanilla = 0.5 * (sum(softplus(-r) for r in real) / 3 + sum(softplus(f) for f in fake) / 3)
  assert float(D.vanilla_d_loss(real, fake)) == pytest.approx(vanilla, abs=1e-6)
  assert float(D.d_loss("vanilla", real[:, None], fake[:, None])) == pytest.approx(vanilla, abs=1e-6)
  assert float(D.generator_loss(fake)) == pytest.approx(0.5 / 3, abs=1e-6)
  # A perfect discriminator (|logits| >= 1 on the right side) has zero hinge loss.
  assert float(D.hinge_d_loss(np.ones(4) * 3, -np.ones(4) * 3)) == 0.0
  with pytest.raises(ValueError, match="discriminator loss 'wgan'"):
    D.d_loss("wgan", real, fake)


def test_adaptive_weight_equals_hand_computed_ratio():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((5, 3)).astype(np.float32)
  b = rng.standard_normal(5).astype(np.float32)
  c = rng.standard_normal(3).astype(np.float32)
  w = rng.standard_normal(3).astype(np.float32)

  def losses(last):  # nll = ||A w - b||^2, g = -mean(c * w^2)
    return jnp.sum((a @ last - b) ** 2), -jnp.mean(c * last ** 2)

  grad_nll = 2 * a.T @ (a @ w - b)
  grad_g = -2 * c * w / 3
  expected = np.linalg.norm(grad_nll) / (np.linalg.norm(grad_g) + 1e-4)
  weight, (nll, g) = D.adaptive_weight(losses, jnp.asarray(w), disc_weight=0.5)
  assert float(weight) == pytest.approx(0.5 * expected, rel=1e-5)
  assert float(nll) == pytest.approx(float(np.sum((a @ w - b) ** 2)), rel=1e-5)
  assert float(g) == pytest.approx(float(-np.mean(c * w ** 2)), rel=1e-5)
  # Clamped to [0, 1e4] (times disc_weight) when the adversarial gradient vanishes ...
  weight, _ = D.adaptive_weight(lambda last: (jnp.sum((a @ last - b) ** 2), 0.0 * jnp.sum(last)), jnp.asarray(w),
                                disc_weight=2.0)
  assert float(weight) == pytest.approx(2e4)
  # ... and a constant: no gradient flows through it.
  dw = jax.grad(lambda last: D.adaptive_weight(losses, last)[0])(jnp.asarray(w))
  np.testing.assert_array_equal(np.asarray(dw), np.zeros(3, np.float32))
