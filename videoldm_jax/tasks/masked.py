"""Mask-conditioned video latent diffusion: stages ``predictor`` (Sec. 3.2) and ``interpolator`` (Sec. 3.3).

Both are the key-frame video LDM (``tasks/latent_diffusion.py``, whose loop, encoders, conditioning and sampler
this reuses by subclassing) with ``temporal.mask_conditioning``: a binary per-frame mask ``m`` ``[b, t]`` marks
known frames, and ``c = concat(m * z0, m)`` enters the temporal layers through the ``temporal_cond`` encoder
(``models/temporal.py``). Its projections are zero-initialised, so a ``base`` workdir given as
``config.model_init`` yields exactly the base model at step 0; only the new ``temporal_cond`` params start fresh
(``model_init_missing_ok = .*temporal_cond.*``).

* ``predictor``: S in {0, 1, 2} first frames known per example (``config.masked.context_probs``); S = 0 is the
  unconditional branch of context guidance. Sampling conditions on the first ``masked.num_context`` frames; the
  long rollout (``videoldm_jax/pipeline.py``) conditions each window on the last two generated frames.
* ``interpolator``: a key frame every ``masked.stride`` (4) frames of a ``4 (K - 1) + 1``-frame window; three
  new frames between each pair (T -> 4T - 3 over a key-frame sequence; key frames stay exactly where they are).
  One model for T->4T and 4T->16T: clips come at ``data.fps`` in ``masked.regime_fps`` (7.5 / 30 fps, i.e. key
  frames at 1.875 / 7.5 fps) and the regime label (the index of the clip's fps there) is embedded in
  ``temporal_cond``. With ``masked.uncond_prob`` the mask is all zero (unconditional branch).

Conditioning augmentation: with ``masked.cond_aug_prob`` the known frames are noised to a level
``s ~ U{1..cond_aug_max_level}`` (same schedule as the diffusion), and ``s`` (0 otherwise) is an input of
``temporal_cond``; sampling uses ``masked.sample_noise_level``.

Loss: on the frames to predict only (``masked.loss_on_known=False``, the default): known frames are re-imposed at
sampling, their prediction is never used, and counting them would reward copying the conditioning.

Sampling: known frames of ``x_t`` are re-imposed at every step as ``q(x_t | z_known)`` (what the model saw in
training) and exactly at the end; context guidance ``f(∅) + s (f(c_S) - f(∅))`` composes with label / text CFG
(``diffusion.composed_guided_prediction``): conditions ``[(∅, ∅), (y, ∅), (y, c_S)]``, terms
``[(s_y, 1, 0), (s, 2, 1)]``, dropping the conditions a scale of exactly 1 (labels) or 0 (context) makes unused.
At a context scale of exactly 1 there is no context guidance: label CFG is taken with the context present,
conditions ``[(∅, c_S), (y, c_S)]`` (two U-Net passes per step instead of three; the interpolator's default).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from videoldm_jax import aot, diffusion, optim, pipeline, tasks
from videoldm_jax.tasks.common import sds
from videoldm_jax.tasks.latent_diffusion import LatentDiffusionTask

PREDICTOR, INTERPOLATOR = "predictor", "interpolator"


def _validate_masked(config) -> None:
  """Static checks of the mask settings; ``ValueError`` names the key."""
  m = config.masked
  temporal = dict(config.model.temporal or {})
  if not temporal.get("mask_conditioning"):
    raise ValueError(f"config.model.temporal.mask_conditioning must be True for stage {config.stage!r}")
  t = int(config.data.num_frames)
  for key in ("cond_aug_prob",):
    if not 0.0 <= float(m[key]) <= 1.0:
      raise ValueError(f"config.masked.{key}={m[key]} must be in [0, 1]")
  num_train = int(config.diffusion.num_train_timesteps)
  for key in ("cond_aug_max_level", "sample_noise_level"):
    if not 0 <= int(m[key]) < num_train:
      raise ValueError(f"config.masked.{key}={m[key]} must be in [0, {num_train - 1}] (a diffusion timestep)")
  if float(config.sampling.context_guidance) < 0:
    raise ValueError(f"config.sampling.context_guidance={config.sampling.context_guidance} must be >= 0")
  if config.stage == INTERPOLATOR:
    stride = int(m.stride)
    if stride < 2 or t < stride + 1 or (t - 1) % stride:
      raise ValueError(f"config.data.num_frames={t} must be stride * (K - 1) + 1 with K >= 2 key frames "
                       f"(config.masked.stride={stride} >= 2)")
    regimes = tuple(float(f) for f in m.regime_fps)
    if int(temporal.get("num_regimes", 0)) != len(regimes):
      raise ValueError(f"config.model.temporal.num_regimes={temporal.get('num_regimes', 0)} must equal the "
                       f"number of config.masked.regime_fps {regimes}")
    fps = config.data.fps if isinstance(config.data.fps, (tuple, list)) else (config.data.fps,)
    for f in fps:
      if not any(abs(float(f) - r) < 1e-3 for r in regimes):
        raise ValueError(f"config.data.fps={tuple(fps)}: {f} is not one of config.masked.regime_fps {regimes}")
    if not 0.0 <= float(m.uncond_prob) <= 1.0:
      raise ValueError(f"config.masked.uncond_prob={m.uncond_prob} must be in [0, 1]")
  else:
    probs = tuple(float(p) for p in m.context_probs)
    if len(probs) != 3 or min(probs) < 0 or abs(sum(probs) - 1.0) > 1e-6:
      raise ValueError(f"config.masked.context_probs={probs} must be 3 probabilities (S = 0, 1, 2) summing to 1")
    if not 1 <= int(m.num_context) < t:
      raise ValueError(f"config.masked.num_context={m.num_context} must be in [1, num_frames={t})")
    if t < 3:
      raise ValueError(f"config.data.num_frames={t}: the predictor needs > 2 frames (2 context + new ones)")


@tasks.register(PREDICTOR, INTERPOLATOR)
class MaskedTask(LatentDiffusionTask):
  """Predictor / interpolator (see module docstring)."""

  def __init__(self, config):
    self.interpolator = config.stage == INTERPOLATOR
    super().__init__(config)

  # ----- declaration --------------------------------------------------------------------------------------------
  @classmethod
  def config_defaults(cls, stage: str):
    out = super().config_defaults(stage)
    out["sampling"] = dict(out["sampling"], context_guidance=1.0)  # f(∅) + s (f(c_S) - f(∅))
    out["masked"] = dict(
        context_probs=(0.1, 0.3, 0.6),  # predictor: P(S = 0, 1, 2 first frames known); S = 0 is the uncond. branch
        num_context=2,           # predictor: known frames at sampling / in the rollout (the last generated ones)
        stride=4,                # interpolator: a key frame every `stride` frames (3 new frames between two keys)
        regime_fps=(7.5, 30.0),  # interpolator: clip fps of regime 0 (T->4T) and 1 (4T->16T); data.fps draws these
        uncond_prob=0.1,         # interpolator: P(all-zero mask), the unconditional branch for context guidance
        cond_aug_prob=0.5,       # conditioning augmentation: P(known frames are noised) ...
        cond_aug_max_level=250,  # ... to a level ~ U{1..this} (diffusion timesteps; the level is an input)
        sample_noise_level=0,    # conditioning-augmentation level given at sampling
        loss_on_known=False,     # False: the loss covers only the frames to predict
    )
    return out

  @classmethod
  def validate_config(cls, config) -> None:
    _validate_masked(config)  # first: a missing mask conditioning is named as such
    super().validate_config(config)

  @classmethod
  def pipeline_order(cls, stage: str) -> int:
    return 2 if stage == INTERPOLATOR else 1  # after the key frames: extend them (predictor), then interpolate

  def abstract_batch(self, batch_size: int, inputs: Optional[str] = None) -> Dict[str, Any]:
    """The key-frame batch plus ``fps`` ``[b]`` (the interpolator's regime; carried by the predictor too)."""
    return dict(super().abstract_batch(batch_size, inputs), fps=sds((batch_size,), jnp.float32))

  # ----- conditioning -------------------------------------------------------------------------------------------
  @property
  def key_positions(self) -> np.ndarray:
    """Interpolator: window positions of the key frames (0, stride, 2 stride, ...)."""
    return np.arange(0, self.num_frames, int(self.config.masked.stride))

  def interpolation_mask(self, b: int, t: Optional[int] = None) -> jax.Array:
    """``[b, t]`` 1 at every ``stride``-th frame."""
    t = t or self.num_frames
    return jnp.broadcast_to((jnp.arange(t) % int(self.config.masked.stride) == 0).astype(jnp.float32), (b, t))

  @staticmethod
  def context_mask(num_known, t: int) -> jax.Array:
    """``[b, t]`` 1 on the first ``num_known[b]`` frames."""
    return (jnp.arange(t)[None, :] < jnp.asarray(num_known)[:, None]).astype(jnp.float32)

  def regime(self, batch, b: int) -> Optional[jax.Array]:
    """Interpolator: ``[b]`` index of each clip's fps in ``masked.regime_fps`` (None for the predictor)."""
    if not self.interpolator:
      return None
    if "fps" not in batch:
      return jnp.zeros((b,), jnp.int32)
    regimes = jnp.asarray(tuple(float(f) for f in self.config.masked.regime_fps), jnp.float32)
    dist = jnp.abs(jnp.asarray(batch["fps"], jnp.float32)[:, None] - regimes[None, :])
    # A clip at an fps of no regime gets -1 (refused by the model: NaN features), never the nearest regime.
    return jnp.where(jnp.min(dist, axis=1) < 1e-3, jnp.argmin(dist, axis=1), -1)

  def sample_training_mask(self, rng, b: int) -> jax.Array:
    t = self.num_frames
    if self.interpolator:
      keep = jax.random.uniform(rng, (b, 1)) >= float(self.config.masked.uncond_prob)
      return self.interpolation_mask(b) * keep
    probs = jnp.asarray(tuple(float(p) for p in self.config.masked.context_probs))
    s = jax.random.choice(rng, 3, (b,), p=probs)
    return self.context_mask(s, t)

  def augment(self, rng, z_known, level) -> jax.Array:
    """Known latents noised to ``level`` ``[b]`` (level 0: exactly ``z_known``)."""
    noise = jax.random.normal(rng, z_known.shape, jnp.float32)
    a = self.noise_schedule.sqrt_alphas_cumprod[level][:, None, None, None, None]
    s = self.noise_schedule.sqrt_one_minus_alphas_cumprod[level][:, None, None, None, None]
    lv = level[:, None, None, None, None]
    return jnp.where(lv > 0, a * z_known + s * noise, z_known)

  def sample_training_level(self, rng, b: int) -> jax.Array:
    m = self.config.masked
    r_on, r_level = jax.random.split(rng)
    on = jax.random.uniform(r_on, (b,)) < float(m.cond_aug_prob)
    level = jax.random.randint(r_level, (b,), 1, max(2, int(m.cond_aug_max_level) + 1))
    return jnp.where(on & (int(m.cond_aug_max_level) > 0), level, 0).astype(jnp.int32)

  def unet_cond(self, latents, mask, level, regime) -> Dict[str, Any]:
    """U-Net keyword arguments of the mask conditioning."""
    kw = dict(cond_latents=latents, cond_mask=mask, cond_noise_level=level)
    if regime is not None:
      kw["cond_regime"] = regime
    return kw

  # ----- training -----------------------------------------------------------------------------------------------
  def loss_fn(self, trainable, frozen, batch, rng):
    params = optim.merge(trainable, frozen)
    enc_rng, mask_rng, level_rng, aug_rng, diff_rng = jax.random.split(rng, 5)
    z0 = self.encode(params, batch, enc_rng)
    b = z0.shape[0]
    mask = self.sample_training_mask(mask_rng, b)
    level = self.sample_training_level(level_rng, b)
    z_cond = self.augment(aug_rng, z0, level)
    t, noise, x_t = diffusion.sample_training_inputs(diff_rng, z0, self.noise_schedule)
    pred = self.denoise(params, x_t.astype(self.dtype), t, self.context(params, batch),
                        **self.unet_cond(z_cond, mask, level, self.regime(batch, b)))
    target = diffusion.training_target(None, z0, noise, t, self.noise_schedule)
    err = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=(2, 3, 4))  # [b, t]
    weight = jnp.ones_like(mask) if self.config.masked.loss_on_known else 1.0 - mask
    loss = jnp.sum(weight * err) / jnp.maximum(jnp.sum(weight), 1.0)
    return loss, dict(self.aux_metrics(trainable), known_frames=jnp.mean(jnp.sum(mask, axis=1)))

  def clip_frames(self, at_least: int) -> int:
    """The interpolator's windows are ``stride (K - 1) + 1`` frames long."""
    if not self.interpolator:
      return int(at_least)
    stride = int(self.config.masked.stride)
    return stride * math.ceil((int(at_least) - 1) / stride) + 1

  # ----- long-video pipeline ------------------------------------------------------------------------------------
  def pipeline_step(self, trainable, frozen) -> pipeline.Step:
    """Predictor: the key frames extended window by window (``pipeline.Rollout``); interpolator: ``stride``x
    more frames per pass, one pass per regime (``pipeline.Interpolation``)."""
    copts = aot.compiler_options(self.config, execution_bound=True)
    if self.interpolator:
      window = pipeline.interpolator_step(self, copts)
      return pipeline.Interpolation(self.config.stage, functools.partial(window, trainable, frozen),
                                    stride=int(self.config.masked.stride), window_keys=len(self.key_positions),
                                    num_regimes=int(self.unet_config.temporal.num_regimes))
    window = pipeline.predictor_step(self, compiler_options=copts)
    return pipeline.Rollout(self.config.stage, functools.partial(window, trainable, frozen),
                            self.latent_decoder(trainable, frozen), window=self.num_frames,
                            num_context=int(self.config.masked.num_context), fps=float(self.config.data.fps),
                            latent_shape=self.latent_shape())

  # ----- sampling -----------------------------------------------------------------------------------------------
  def guided_model_fn(self, params, batch, z_known, mask, *, regime=None, level=None,
                      guidance_scale: Optional[float] = None, context_guidance: Optional[float] = None):
    """``(x [b, t, h, w, c], t [b]) -> guided prediction`` (see the module docstring for the composition).

    ``z_known`` ``[b, t, h, w, c]`` (only frames with ``mask`` ``[b, t]`` = 1 matter), ``batch``: the label /
    caption conditioning of the ``b`` videos. Scales default to ``config.sampling``.
    """
    sc = self.config.sampling
    s_y = float(sc.guidance_scale if guidance_scale is None else guidance_scale)
    s_c = float(sc.context_guidance if context_guidance is None else context_guidance)
    b = z_known.shape[0]
    level = jnp.full((b,), int(self.config.masked.sample_noise_level), jnp.int32) if level is None else level
    ctx_y = self.context(params, batch)
    has_y = self.text_encoder is not None or self.label_encoder is not None
    ctx_null = self.context(params, self.null_condition(batch)) if has_y and s_y != 1.0 else None
    shared = dict(latents=z_known, level=level)
    if regime is not None:
      shared["regime"] = regime

    def cond(ctx, m):
      return dict(shared, context=ctx, mask=m)

    off = jnp.zeros_like(mask)
    if s_c == 1.0:  # no context guidance: the context is present in every pass; label CFG when s_y != 1
      conditions, terms = (([cond(ctx_y, mask)], []) if ctx_null is None else
                           ([cond(ctx_null, mask), cond(ctx_y, mask)], [(s_y, 1, 0)]))
    elif ctx_null is None:  # label CFG at scale 1 (or no labels): f(y, ∅) + s (f(y, c) - f(y, ∅))
      conditions, terms = [cond(ctx_y, off), cond(ctx_y, mask)], [(s_c, 1, 0)]
    else:
      conditions, terms = [cond(ctx_null, off), cond(ctx_y, off), cond(ctx_y, mask)], [(s_y, 1, 0), (s_c, 2, 1)]
    if s_c == 0.0:  # the context term vanishes
      conditions, terms = conditions[:-1], terms[:-1]

    def unet_fn(x, t, c):
      return self.denoise(params, x.astype(self.dtype), t, c["context"],
                          **self.unet_cond(c["latents"], c["mask"], c["level"], c.get("regime"))).astype(jnp.float32)

    def model_fn(x, t):
      return diffusion.composed_guided_prediction(unet_fn, x, t, conditions, terms)

    return model_fn

  def sample_window(self, params, batch, z_known, mask, rng, *, regime=None, guidance_scale=None,
                    context_guidance=None) -> jax.Array:
    """DDIM over one window: latents ``[b, t, h, w, c]`` with the known frames (``mask`` ``[b, t]``) equal to
    ``z_known`` bit for bit; the others generated conditioned on them."""
    sc = self.config.sampling
    b = z_known.shape[0]
    z_known = z_known.astype(jnp.float32)
    noise_rng, known_rng, aug_rng, ddim_rng = jax.random.split(rng, 4)
    level = jnp.full((b,), int(self.config.masked.sample_noise_level), jnp.int32)
    z_cond = self.augment(aug_rng, z_known, level)
    guided = self.guided_model_fn(params, batch, z_cond, mask, regime=regime, level=level,
                                  guidance_scale=guidance_scale, context_guidance=context_guidance)
    known = mask[:, :, None, None, None] > 0
    known_noise = jax.random.normal(known_rng, z_known.shape, jnp.float32)
    alphas, sigmas = self.noise_schedule.sqrt_alphas_cumprod, self.noise_schedule.sqrt_one_minus_alphas_cumprod

    def model_fn(x, t):  # the known frames of x_t are q(x_t | z_known), as in training
      a, s = alphas[t][:, None, None, None, None], sigmas[t][:, None, None, None, None]
      return guided(jnp.where(known, a * z_known + s * known_noise, x), t)

    x_T = jax.random.normal(noise_rng, z_known.shape, jnp.float32)
    z = diffusion.ddim_sample(model_fn, x_T, self.noise_schedule, int(sc.num_steps), eta=float(sc.eta),
                              rng=ddim_rng if sc.eta else None)
    return jnp.where(known, z_known, z)

  def preview_condition(self, params, batch, rng):
    """``(z_known, mask, regime)`` from the ground truth of ``batch``: its first ``num_context`` frames
    (predictor) or its key frames (interpolator)."""
    z0 = self.encode(params, batch, rng)
    b, t = z0.shape[:2]
    if self.interpolator:
      mask = self.interpolation_mask(b, t)
    else:
      mask = self.context_mask(jnp.full((b,), int(self.config.masked.num_context)), t)
    return z0 * mask[:, :, None, None, None], mask, self.regime(batch, b)

  def sample_fn(self, trainable, frozen, batch, rng) -> jax.Array:
    """Previews: the first ``sampling.num_samples`` clips of ``batch`` completed from their ground-truth context
    / key frames; uint8 ``[n, t, H, W, 3]``."""
    params = optim.merge(trainable, frozen)
    n = int(self.config.sampling.num_samples)
    batch = jax.tree.map(lambda x: x[:n], batch)
    enc_rng, rng = jax.random.split(rng)
    z_known, mask, regime = self.preview_condition(params, batch, enc_rng)
    return self.decode_latents(params, self.sample_window(params, batch, z_known, mask, rng, regime=regime))
