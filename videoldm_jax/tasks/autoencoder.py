"""Autoencoder task: stage ``autoencoder``, the KL-VAE of the latent diffusion models, trained on single frames.

Param tree::

  vae/...             KL autoencoder (``config.model.vae`` preset + overrides): trained
  discriminator/...   PatchGAN on frames (only when ``config.autoencoder.disc_weight > 0``): trained, own optimizer
  lpips/...           LPIPS VGG16 (only when ``config.autoencoder.lpips_vgg`` / ``lpips_lin`` name the weight files):
                      frozen, converted from the files in ``init``

Loss of LDM / sgm ``LPIPSWithDiscriminator`` (reductions as there: sums over pixels, means over the batch, so
``kl_weight = 1e-6`` and ``disc_weight = 0.5`` keep their published meaning):

  nll = mean_n( sum_pixels |x - x_rec| + perceptual_weight * LPIPS(x, x_rec) * pixels )
  generator = nll + kl_weight * KL(q(z|x) || N(0, I)) + [step >= disc_start] * d_weight * (-mean D(x_rec))
  d_weight = disc_weight * clip(||d nll / d W|| / (||d g / d W|| + 1e-4), 0, 1e4),  W = vae/decoder/conv_out/kernel
  discriminator = [step >= disc_start] * hinge (or vanilla) loss on D(x), D(stop_gradient(x_rec))

Both networks step once per batch: the generator against the current discriminator, the discriminator on that
step's reconstructions. Their two Adam optimizers live in one optax transformation (``gan_optimizer``: per-group
clipping and learning-rate schedules, per-parameter moments), so the loop's single ``TrainState``, its sharding and
its checkpoints are unchanged; ``config.autoencoder.disc_optimizer`` overrides the discriminator's lr / schedule /
clipping. Before ``disc_start`` the discriminator's params are held fixed (its gradients, hence its Adam moments,
are zero) and no adversarial work is executed (``lax.cond``).

The evaluation loss of this stage is the mean absolute reconstruction error of the posterior mode on the fixed
batch (deterministic, comparable across runs). ``eval_metrics`` adds, on the same held-out batch, the
reconstruction PSNR and the PSNR of predicting every frame by the batch's mean frame: the baseline a useful
autoencoder must clearly beat. The ``z_std`` metric is the std of the latents: an image LDM trained on this VAE
should use ``scaling_factor = 1 / z_std`` (LDM's ``scale_by_std``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from typing import Any, Dict, NamedTuple, Optional, Tuple

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import PartitionSpec as P

from videoldm_jax import optim, parallel, tasks
from videoldm_jax.data import pipeline as data_pipeline
from videoldm_jax.models import discriminator as disc_lib
from videoldm_jax.models import lpips as lpips_lib
from videoldm_jax.models import vae as vae_lib
from videoldm_jax.models.layers import conv
from videoldm_jax.tasks.common import Task, sds
from videoldm_jax.tasks.latent_diffusion import DTYPES, vae_config

DISC = "discriminator"


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def psnr(x: jax.Array, y: jax.Array, peak_to_peak: float = 2.0) -> jax.Array:
  """PSNR in dB of each image, ``10 log10(peak_to_peak^2 / mean_pixels (x - y)^2)``: ``[n, h, w, c]`` x2 -> ``[n]``.

  Images in [-1, 1] with ``peak_to_peak = 2`` give the same numbers as [0, 255] images with 255 (both sides scale
  alike); nothing is quantised. The MSE is floored at 1e-10 (100 dB at peak 1) so identical images stay finite.
  """
  mse = jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)), axis=tuple(range(1, x.ndim)))
  return 10.0 * jnp.log10(peak_to_peak ** 2 / jnp.maximum(mse, 1e-10 * peak_to_peak ** 2))


_SHARED_ADAM = ("b1", "b2", "eps", "weight_decay")


def disc_optimizer_config(config) -> ml_collections.ConfigDict:
  """``config.optimizer`` with ``config.autoencoder.disc_optimizer`` overrides of lr, warmup_steps, schedule,
  end_lr_factor, grad_clip (Adam's b1 / b2 / eps and weight decay are shared with the generator)."""
  oc = ml_collections.ConfigDict(config.optimizer.to_dict())
  for k, v in dict(config.autoencoder.disc_optimizer).items():
    if k not in oc or k in _SHARED_ADAM:
      raise ValueError(f"config.autoencoder.disc_optimizer.{k}: not overridable; allowed: "
                       f"{sorted(set(oc) - set(_SHARED_ADAM))}")
    oc[k] = v
  return oc


class GroupLRState(NamedTuple):
  count: jax.Array


def gan_optimizer(config) -> Tuple[optax.GradientTransformation, optax.Schedule, optax.Schedule]:
  """Two Adam optimizers, generator (every trainable param outside ``discriminator/``) and discriminator, as ONE
  optax transformation: ``(tx, generator_schedule, discriminator_schedule)``.

  Each group has its own global-norm clipping and learning-rate schedule (the discriminator's starts at
  ``config.autoencoder.disc_start``); Adam's moments are per parameter, hence per group, and its step count is
  shared, exactly like LDM's two Adam optimizers that both step on every batch. One transformation whose init
  treats the params opaquely keeps ``optax.tree_map_params`` (the loop's optimizer-state sharding) and the
  single-``TrainState`` checkpoints working unchanged; ``optax.partition``'s masked states do not.
  """
  oc, dc = config.optimizer, disc_optimizer_config(config)
  total, start = int(config.total_steps), int(config.autoencoder.disc_start)
  gen_schedule = optim.make_schedule(oc, total)
  disc_after_start = optim.make_schedule(dc, max(1, total - start))
  disc_schedule = lambda step: disc_after_start(jnp.maximum(step - start, 0))  # noqa: E731
  clips = {"generator": float(oc.get("grad_clip", 0.0)), DISC: float(dc.get("grad_clip", 0.0))}

  def groups(tree):
    return {k: v for k, v in tree.items() if k != DISC}, tree[DISC]

  def clip_update(updates, state, params=None):
    del params
    gen, dis = groups(updates)
    out = []
    for name, tree in (("generator", gen), (DISC, dis)):
      if clips[name] > 0:
        norm = optax.global_norm(tree)
        tree = jax.tree.map(lambda u: u * jnp.minimum(1.0, clips[name] / (norm + 1e-12)).astype(u.dtype), tree)
      out.append(tree)
    return dict(out[0], **{DISC: out[1]}), state

  def lr_init(params):
    del params
    return GroupLRState(count=jnp.zeros([], jnp.int32))

  def lr_update(updates, state, params=None):
    del params
    gen, dis = groups(updates)
    g_lr, d_lr = gen_schedule(state.count), disc_schedule(state.count)
    gen = jax.tree.map(lambda u: (-g_lr * u).astype(u.dtype), gen)
    dis = jax.tree.map(lambda u: (-d_lr * u).astype(u.dtype), dis)
    return dict(gen, **{DISC: dis}), GroupLRState(count=optax.safe_int32_increment(state.count))

  parts = [optax.GradientTransformation(lambda params: optax.EmptyState(), clip_update),
           optax.scale_by_adam(b1=float(oc.get("b1", 0.9)), b2=float(oc.get("b2", 0.999)),
                               eps=float(oc.get("eps", 1e-8)))]
  if float(oc.get("weight_decay", 0.0)):
    parts.append(optax.add_decayed_weights(float(oc.weight_decay)))
  parts.append(optax.GradientTransformation(lr_init, lr_update))
  return optax.chain(*parts), gen_schedule, disc_schedule


def discriminator_config(config, in_channels: int = 3) -> disc_lib.DiscriminatorConfig:
  """PatchGAN defaults + ``config.autoencoder.discriminator`` overrides (fields of ``DiscriminatorConfig``)."""
  overrides = dict(config.autoencoder.discriminator)
  fields = {f.name for f in dataclasses.fields(disc_lib.DiscriminatorConfig)}
  for k in overrides:
    if k not in fields:
      raise ValueError(f"config.autoencoder.discriminator.{k}: not a field of DiscriminatorConfig ({sorted(fields)})")
  return disc_lib.DiscriminatorConfig(**dict(dict(in_channels=in_channels), **overrides))


@tasks.register("autoencoder")
class AutoencoderTask(Task):
  """KL-VAE on frames: L1 + LPIPS + KL, optional PatchGAN with adaptive weight (see module docstring)."""

  free_form = ("autoencoder.discriminator", "autoencoder.disc_optimizer")
  # The generator's last layer (adaptive GAN weight), and the module in the VAE whose output, after
  # ``last_input_fn``, is that layer's input.
  last_layer = ("vae", "decoder", "conv_out", "kernel")
  last_input = ("decoder", "conv_norm_out")

  @classmethod
  def config_defaults(cls, stage: str):
    del stage
    return {"autoencoder": dict(
        kl_weight=1e-6,          # LDM KL-f8 values; losses are sums over pixels, means over the batch
        perceptual_weight=1.0,   # LPIPS weight (0 in effect while lpips_vgg / lpips_lin are empty)
        lpips="vgg16",           # LPIPSConfig preset
        lpips_vgg="",            # torchvision vgg16 state dict (.pth / .safetensors), e.g. vgg16-397923af.pth
        lpips_lin="",            # lpips package weights/v0.1/vgg.pth (linear heads)
        disc_weight=0.5,         # 0: no discriminator at all
        disc_start=50001,        # first step with the adversarial loss / discriminator updates
        disc_loss="hinge",       # hinge | vanilla
        discriminator={},        # DiscriminatorConfig overrides (ndf, n_layers, norm, ...)
        disc_optimizer={},       # overrides of config.optimizer for the discriminator (lr, warmup_steps, ...)
    )}

  def __init__(self, config):
    self.config = config
    ac = config.autoencoder
    self.dtype = DTYPES[config.dtype]
    self.vae_config = vae_config(config)
    kw = dict(dtype=self.dtype, param_dtype=jnp.float32)
    self.vae = vae_lib.AutoencoderKL(self.vae_config, **kw)
    self.use_gan = float(ac.disc_weight) > 0.0
    self.disc_config = discriminator_config(config, self.vae_config.out_channels)
    self.discriminator = disc_lib.NLayerDiscriminator(self.disc_config, **kw) if self.use_gan else None
    self.use_lpips = bool(ac.lpips_vgg or ac.lpips_lin)
    preset = getattr(lpips_lib.LPIPSConfig, ac.lpips, None)
    if not callable(preset):
      raise ValueError(f"config.autoencoder.lpips={ac.lpips!r}: no such LPIPSConfig preset")
    self.lpips_config = preset()
    self.lpips = lpips_lib.LPIPS(self.lpips_config) if self.use_lpips else None  # fp32: a loss, not a model
    self.perceptual_weight = float(ac.perceptual_weight) if self.use_lpips else 0.0
    if not self.use_lpips and float(ac.perceptual_weight) > 0:
      logging.warning("config.autoencoder.lpips_vgg / lpips_lin are empty: training without the LPIPS term "
                      "(perceptual_weight %s ignored)", ac.perceptual_weight)
    self._lpips_weights = None  # converted lazily, once
    super().__init__(config)  # without a discriminator: one optimizer and the generic step over ``loss_fn``
    if self.use_gan:
      # Generator and discriminator optimizers in one optax transformation over the trainable tree (see
      # ``gan_optimizer``), and the two-player step.
      self.tx, self.schedule, self.disc_schedule = gan_optimizer(config)
      self.train_step = self.gan_train_step

  # ----- checks -------------------------------------------------------------------------------------------------
  @classmethod
  def validate_config(cls, config) -> None:
    ac = config.autoencoder
    if config.data.source == data_pipeline.LATENTS:
      raise ValueError("config.data.source='latents': the autoencoder stage trains on pixels")
    f = vae_config(config).downsample_factor
    for key in ("height", "width"):
      if int(config.data[key]) % f:
        raise ValueError(f"config.data.{key}={config.data[key]} must be a multiple of the VAE factor {f}")
    if bool(ac.lpips_vgg) != bool(ac.lpips_lin):
      raise ValueError("config.autoencoder.lpips_vgg and lpips_lin: set both (VGG16 features + lpips v0.1 heads) "
                       "or neither")
    for key in ("lpips_vgg", "lpips_lin"):
      if ac[key] and not os.path.isfile(ac[key]):
        raise ValueError(f"config.autoencoder.{key}={ac[key]!r}: no such file")
    if ac.disc_loss not in disc_lib.D_LOSSES:
      raise ValueError(f"config.autoencoder.disc_loss={ac.disc_loss!r}: expected one of {sorted(disc_lib.D_LOSSES)}")
    for key in ("kl_weight", "perceptual_weight", "disc_weight"):
      if float(ac[key]) < 0:
        raise ValueError(f"config.autoencoder.{key}={ac[key]} must be >= 0")
    if int(ac.disc_start) < 0:
      raise ValueError(f"config.autoencoder.disc_start={ac.disc_start} must be >= 0")
    cls.validate_discriminator(config)
    disc_optimizer_config(config)
    if float(ac.disc_weight) > 0 and not re.fullmatch(config.trainable, f"{DISC}/main_0/kernel"):
      raise ValueError(f"config.trainable={config.trainable!r} must include '{DISC}/.*' when "
                       "config.autoencoder.disc_weight > 0 (the discriminator trains)")
    if re.fullmatch(config.trainable, "lpips/features_0/kernel"):
      raise ValueError(f"config.trainable={config.trainable!r} must not include 'lpips/...' (a fixed loss network)")

  @classmethod
  def validate_discriminator(cls, config) -> None:
    if discriminator_config(config).dims != 2:
      raise ValueError("config.autoencoder.discriminator.dims: the autoencoder stage judges single frames (2)")

  # ----- params -------------------------------------------------------------------------------------------------
  def _lpips_params(self, rng):
    """LPIPS params boxed with logical axes, values converted from the configured files (constants of ``init``)."""
    from videoldm_jax.conversion.lpips import load_lpips  # pylint: disable=g-import-not-at-top
    if self._lpips_weights is None:
      ac = self.config.autoencoder
      self._lpips_weights = load_lpips(ac.lpips_vgg, ac.lpips_lin, self.lpips_config)
      logging.info("LPIPS weights from %s + %s", ac.lpips_vgg, ac.lpips_lin)
    x = lpips_lib.example_images()
    boxed = jax.eval_shape(self.lpips.init, rng, x, x)["params"]
    is_box = lambda v: isinstance(v, nn.Partitioned)  # noqa: E731
    return jax.tree.map(lambda box, v: box.replace_boxed(jnp.asarray(v)) if is_box(box) else jnp.asarray(v),
                        boxed, self._lpips_weights, is_leaf=is_box)

  def init(self, rng) -> Dict[str, Any]:
    r_vae, r_disc, r_lpips = jax.random.split(rng, 3)
    params = {"vae": self.vae.init(r_vae, vae_lib.example_image(self.vae_config))["params"]}
    if self.use_gan:
      params[DISC] = self.discriminator.init(r_disc, disc_lib.example_input(self.disc_config))["params"]
    if self.use_lpips:
      params["lpips"] = self._lpips_params(r_lpips)
    return params

  # ----- data ---------------------------------------------------------------------------------------------------
  def _dataset(self, mesh, **overrides):
    c = data_pipeline.with_defaults(self.config.data)
    for k, v in overrides.items():
      c[k] = v
    local = self.config.batch_size // jax.process_count()
    ds = data_pipeline.make_dataset(c, local)
    return ds.map(lambda b: {"video": b["video"]}).map(
        functools.partial(data_pipeline.make_global_batch, mesh=mesh, partition_spec=P(parallel.BATCH_AXES)))

  def input_pipeline(self, mesh):
    """Checkpointable iterator of global batches ``{"video": [b, t, h, w, 3]}`` in [-1, 1] (frames are
    independent examples: ``b * t`` images per step)."""
    return iter(self._dataset(mesh))

  def fixed_batch(self, mesh):
    return next(iter(self._dataset(mesh, seed=int(self.config.data.seed) + 1_000_003, read_threads=1, prefetch=1,
                                   num_workers=0)))

  def abstract_batch(self, batch_size: int, inputs: Optional[str] = None) -> Dict[str, Any]:
    """``{"video": [b, t, h, w, 3]}`` float32: this stage trains on pixels whatever ``inputs`` prefers."""
    del inputs
    d = self.config.data
    return {"video": sds((batch_size, d.num_frames, d.height, d.width, 3), jnp.float32)}

  # ----- model pieces -------------------------------------------------------------------------------------------
  def frames(self, batch) -> jax.Array:
    """``[b, t, h, w, 3]`` -> ``[(b t), h, w, 3]`` float32."""
    return einops.rearrange(batch["video"], "b t h w c -> (b t) h w c").astype(jnp.float32)

  @property
  def clip_frames(self) -> Optional[int]:
    """Frames per clip the decoder sees together (None: every frame on its own)."""
    return None

  def last_input_fn(self, captured: jax.Array) -> jax.Array:
    return nn.silu(captured)  # conv_norm_out -> SiLU -> conv_out

  def reconstruct(self, vae_params, x, rng=None) -> Tuple[jax.Array, vae_lib.DiagonalGaussian, jax.Array]:
    """Images ``[n, h, w, 3]`` -> (reconstruction fp32, posterior, latents); a posterior sample with ``rng``, else
    the mode."""
    x_rec, posterior, z, _ = self.reconstruct_with_features(vae_params, x, rng)
    return x_rec, posterior, z

  def reconstruct_with_features(self, vae_params, x, rng=None):
    """:meth:`reconstruct` plus the input of the decoder's last layer (``last_input_fn`` of the output of
    ``last_input``; captured from the same forward pass; the adaptive GAN weight differentiates only that layer)."""
    moments = self.vae.apply({"params": vae_params}, x.astype(self.dtype), method="encode")
    posterior = vae_lib.DiagonalGaussian(moments)
    z = posterior.sample(rng) if rng is not None else posterior.mode()
    x_rec, state = self.vae.apply({"params": vae_params}, z.astype(self.dtype), self.clip_frames, method="decode",
                                  capture_intermediates=lambda mdl, _: mdl.path == self.last_input)
    features = self.last_input_fn(_get(state["intermediates"], self.last_input)["__call__"][0])
    return x_rec.astype(jnp.float32), posterior, z, features

  def last_layer_fn(self, vae_params, features):
    """``kernel -> reconstruction``: the decoder's last layer on fixed ``features`` with a substitute kernel."""
    kernel = _get(vae_params, self.last_layer[1:])
    layer = conv(kernel.shape[-1], kernel.shape[:-2], name="last", dtype=self.dtype, param_dtype=jnp.float32)
    bias = _get(vae_params, self.last_layer[1:-1])["bias"]
    return lambda k: layer.apply({"params": {"kernel": k, "bias": bias}}, features).astype(jnp.float32)

  def nll(self, frozen, x, x_rec) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """LDM's reconstruction term: ``mean_n(sum_pixels |x - x_rec| + w_p * LPIPS_n * pixels)``."""
    l1 = jnp.abs(x - x_rec)
    per_example = jnp.sum(l1, axis=(1, 2, 3))
    metrics = {"rec_l1": jnp.mean(l1)}
    if self.use_lpips:
      p = self.lpips.apply({"params": frozen["lpips"]}, x, x_rec)
      per_example = per_example + self.perceptual_weight * p * (l1.size // l1.shape[0])
      metrics["lpips"] = jnp.mean(p)
    return jnp.mean(per_example), metrics

  def logits(self, disc_params, images) -> jax.Array:
    return self.discriminator.apply({"params": disc_params}, images.astype(self.dtype)).astype(jnp.float32)

  # ----- training -----------------------------------------------------------------------------------------------
  def loss_fn(self, trainable, frozen, batch, rng):
    """Generator loss without the adversarial term (``nll + kl_weight * KL``) and its parts."""
    gen = {k: v for k, v in trainable.items() if k != DISC}
    params = optim.merge(gen, frozen)
    x = self.frames(batch)
    x_rec, posterior, z = self.reconstruct(params["vae"], x, rng)
    nll, metrics = self.nll(frozen, x, x_rec)
    kl = jnp.mean(posterior.kl())
    metrics.update(nll=nll, kl=kl, z_std=jnp.std(z))
    return nll + float(self.config.autoencoder.kl_weight) * kl, metrics

  def eval_loss(self, trainable, frozen, batch, rng) -> jax.Array:
    """Mean absolute reconstruction error of the posterior mode (deterministic)."""
    del rng
    params = optim.merge({k: v for k, v in trainable.items() if k != DISC}, frozen)
    x = self.frames(batch)
    x_rec, _, _ = self.reconstruct(params["vae"], x)
    return jnp.mean(jnp.abs(x - x_rec))

  def eval_metrics(self, trainable, frozen, batch, rng) -> Dict[str, jax.Array]:
    """Held-out reconstruction quality on the fixed batch (posterior mode, deterministic), scalars in dB.

    ``eval_psnr``: mean over the batch's frames of the PSNR of the reconstruction, clipped to [-1, 1] as previews
    and decoded samples are (:func:`psnr`, peak-to-peak 2 = the PSNR of [0, 255] images).
    ``eval_psnr_mean_frame``: the same for predicting every frame by the batch's mean frame (per pixel), the
    baseline to beat: it already gets the sky / road / grass layout right, so a decoder that has not learnt more
    than that (or that a premature GAN turned into stripes) scores near or below it.
    """
    del rng
    params = optim.merge({k: v for k, v in trainable.items() if k != DISC}, frozen)
    x = self.frames(batch)
    x_rec, _, _ = self.reconstruct(params["vae"], x)
    mean_frame = jnp.broadcast_to(jnp.mean(x, axis=0, keepdims=True), x.shape)
    return {"eval_psnr": jnp.mean(psnr(x, jnp.clip(x_rec, -1.0, 1.0))),
            "eval_psnr_mean_frame": jnp.mean(psnr(x, mean_frame))}

  def workdir_info(self, trainable, frozen, batch, rng) -> Dict[str, jax.Array]:
    """``vae_scaling_factor``: 1 / the std of posterior samples of the fixed batch (LDM's ``scale_by_std``), the
    latent scale every diffusion stage initialised from this workdir uses."""
    params = optim.merge({k: v for k, v in trainable.items() if k != DISC}, frozen)
    _, _, z = self.reconstruct(params["vae"], self.frames(batch), rng)
    return {"vae_scaling_factor": 1.0 / jnp.std(z)}

  def gan_train_step(self, state: optim.TrainState, frozen, batch, rng):
    """One generator update and (from ``disc_start`` on) one discriminator update; metrics as the generic step
    (``loss`` / ``grad_norm`` / ``lr`` are the generator's) plus the adversarial ones."""
    ac = self.config.autoencoder
    rng = jax.random.fold_in(rng, state.step)
    gen_params = {k: v for k, v in state.params.items() if k != DISC}
    disc_params = state.params[DISC]
    disc_on = state.step >= int(ac.disc_start)
    x = self.frames(batch)

    def adversarial(vae_params, x_rec, features):
      """``(g_loss, d_weight)``; d_weight from the gradients of nll and g_loss w.r.t. the decoder's last-layer
      kernel alone, on stopped features (a constant for the outer gradient, as in LDM's ``detach``)."""
      g = disc_lib.generator_loss(self.logits(disc_params, x_rec))
      sg = jax.lax.stop_gradient
      last = self.last_layer_fn(sg(vae_params), sg(features))

      def losses(kernel):
        rec = last(kernel)
        return self.nll(frozen, x, rec)[0], disc_lib.generator_loss(self.logits(disc_params, rec))

      d_weight, _ = disc_lib.adaptive_weight(losses, sg(_get(vae_params, self.last_layer[1:])),
                                             disc_weight=float(ac.disc_weight))
      return g, d_weight

    def gen_loss(gen):
      vae_params = optim.merge(gen, frozen)["vae"]
      x_rec, posterior, z, features = self.reconstruct_with_features(vae_params, x, rng)
      nll, metrics = self.nll(frozen, x, x_rec)
      kl = jnp.mean(posterior.kl())
      zero = jnp.zeros((), jnp.float32)
      g, d_weight = jax.lax.cond(disc_on, lambda: adversarial(vae_params, x_rec, features), lambda: (zero, zero))
      metrics.update(nll=nll, kl=kl, z_std=jnp.std(z), g_loss=g, d_weight=d_weight)
      return nll + float(ac.kl_weight) * kl + d_weight * g, (x_rec, metrics)

    (loss, (x_rec, metrics)), grads = jax.value_and_grad(gen_loss, has_aux=True)(gen_params)
    grad_norm = optax.global_norm(grads)

    fake = jax.lax.stop_gradient(x_rec)

    def disc_loss(dp):
      real_logits, fake_logits = self.logits(dp, x), self.logits(dp, fake)
      return disc_lib.d_loss(ac.disc_loss, real_logits, fake_logits), (jnp.mean(real_logits), jnp.mean(fake_logits))

    def disc_off():
      zero = jnp.zeros((), jnp.float32)
      return (zero, (zero, zero)), jax.tree.map(jnp.zeros_like, disc_params)

    (d_loss, (real_mean, fake_mean)), d_grads = jax.lax.cond(
        disc_on, lambda: jax.value_and_grad(disc_loss, has_aux=True)(disc_params), disc_off)
    d_grad_norm = optax.global_norm(d_grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(d_loss) & jnp.isfinite(d_grad_norm)
    metrics.update(d_loss=d_loss, logits_real=real_mean, logits_fake=fake_mean, disc_grad_norm=d_grad_norm,
                   disc_active=disc_on.astype(jnp.float32))

    # Before disc_start the discriminator's gradients are zero, so its Adam moments stay zero; its params are held
    # explicitly (weight decay would otherwise move them).
    def hold_disc(new, old):
      return dict(new, **{DISC: jax.tree.map(lambda n, o: jnp.where(disc_on, n, o), new[DISC], old[DISC])})

    new_state = optim.apply_update(state, dict(grads, **{DISC: d_grads}), self.tx, float(self.config.ema_decay),
                                   finite, hold=hold_disc)
    metrics.update(loss=loss, grad_norm=grad_norm, lr=self.schedule(state.step), disc_lr=self.disc_schedule(state.step),
                   finite=finite.astype(jnp.int32))
    return new_state, metrics

  # ----- previews -----------------------------------------------------------------------------------------------
  def sample_fn(self, trainable, frozen, batch, rng) -> jax.Array:
    """Inputs next to their reconstructions (posterior mode): uint8 ``[n, t, h, 2 w, 3]``."""
    del rng
    n = int(self.config.sampling.num_samples)
    video = batch["video"][:n]
    params = optim.merge({k: v for k, v in trainable.items() if k != DISC}, frozen)
    x = self.frames({"video": video})
    x_rec, _, _ = self.reconstruct(params["vae"], x)
    pair = jnp.concatenate([x, x_rec], axis=2)
    return vae_lib.to_uint8(einops.rearrange(pair, "(b t) h w c -> b t h w c", b=video.shape[0]))
