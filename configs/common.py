"""Shared config pieces: ``parse_arg``, the full config schema with defaults, model variants, mesh defaults,
``runlocal`` shrinking and validation.

Every key a run can use is declared in ``base_config()``; ``validate`` rejects anything else (typos fail before
any compile, with the offending key in the message). Free-form sub-dicts (model overrides, data options) are
checked against the dataclass / pipeline they configure by the task.
"""

from __future__ import annotations

import math
import re
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import ml_collections

from videoldm_jax.data import pipeline as data_pipeline

ConfigDict = ml_collections.ConfigDict

# Sub-dicts whose keys are checked elsewhere (model dataclass fields, data pipeline options).
FREE_FORM = ("model.unet_overrides", "model.vae_overrides", "model.text_overrides", "model.temporal",
             "mesh.extra_rules", "autoencoder.discriminator", "autoencoder.disc_optimizer")


def parse_arg(arg: Optional[str], **defaults) -> ConfigDict:
  """``"stage=base,runlocal,variant=sd21"`` -> ConfigDict over ``defaults``.

  Values are cast to the type of their default; a bare name sets a bool to True. Unknown names raise, naming the
  argument.
  """
  out = ConfigDict(dict(defaults))
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, eq, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"config argument {key!r} is unknown; known: {sorted(defaults)}")
    default = defaults[key]
    if not eq:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={value!r}: expected true/false")
      out[key] = value.lower() in ("true", "1")
    elif default is None:
      out[key] = value
    else:
      out[key] = type(default)(value)
  return out


# ---------------------------------------------------------------------------------------------------------------
# Schema with defaults.
# ---------------------------------------------------------------------------------------------------------------

def mesh_defaults() -> ConfigDict:
  """Pure data parallelism over all devices inside a slice, parameters FSDP-sharded where that divides."""
  return ConfigDict(dict(
      ici_data_parallelism=-1, ici_fsdp_parallelism=1, ici_tensor_parallelism=1,
      dcn_data_parallelism=-1, dcn_fsdp_parallelism=1, dcn_tensor_parallelism=1,
      num_slices=1,
      rules="fsdp",            # data_parallel | fsdp | fsdp_tensor (see videoldm_jax/parallel.py)
      extra_rules=(),          # ((logical_name, mesh_axis_or_None), ...) prepended to the preset
  ))


def base_config() -> ConfigDict:
  """Every key a training run understands, with defaults."""
  c = ConfigDict()
  c.stage = "base"
  c.seed = 0
  c.runlocal = False
  c.distributed = "auto"       # see parallel.initialize_distributed

  # Model: presets from videoldm_jax.models.{unet,vae,clip} + overrides of their dataclass fields.
  c.model = ConfigDict(dict(
      unet="sd15", unet_overrides={},
      temporal=None,           # None: image model; a dict of TemporalConfig fields: video model
      vae="sd", vae_overrides={},
      text_encoder="",         # "" (no text) or a CLIPTextConfig preset
      text_overrides={},
      conditioning="text",     # text | labels | none
      tokenizer_pad="<|endoftext|>",  # CLIP tokenizer padding: "<|endoftext|>" (SD 1.x) or "!" (OpenCLIP, SD 2.x)
      label_fields=("day_night", "crowdedness"),  # labels conditioning: fields of batch["labels"] ...
      label_classes=(2, 5),    # ... and their class counts (a null class for CFG is added to each)
      label_dim=0,             # width of the label tokens (0: the U-Net's cross_attention_dim)
  ))
  c.dtype = "float32"          # compute dtype: float32 | bfloat16 (trainable params stay float32)
  c.frozen_dtype = "float32"   # storage dtype of the frozen params (config.trainable's complement): float32 | bfloat16
  c.trainable = ".*"           # regex over '/'-joined param paths; the rest is frozen
  c.model_init = ""            # converted checkpoint dir or a trained workdir to initialise from
  c.model_init_missing_ok = ""  # regex of params that model_init may lack (new layers)
  c.model_init_use_ema = True
  c.resume = ""                # another workdir whose latest checkpoint continues here

  c.diffusion = ConfigDict(dict(
      schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
      prediction="eps",        # eps | v   (conditioning dropout for CFG: config.data.cond_drop_prob)
  ))
  # Stage ``autoencoder`` (videoldm_jax/tasks/autoencoder.py): KL-VAE losses, LPIPS weight files, PatchGAN.
  c.autoencoder = ConfigDict(dict(
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
  ))
  c.sampling = ConfigDict(dict(num_steps=25, guidance_scale=5.0, num_samples=4, eta=0.0, fps=4.0,
                               context_guidance=1.0))  # predictor / interpolator: f(∅) + s (f(c_S) - f(∅))
  # Stages ``predictor`` / ``interpolator`` (videoldm_jax/tasks/masked.py): masked context frames.
  c.masked = ConfigDict(dict(
      context_probs=(0.1, 0.3, 0.6),  # predictor: P(S = 0, 1, 2 first frames known); S = 0 is the uncond. branch
      num_context=2,           # predictor: known frames at sampling / in the rollout (the last generated ones)
      stride=4,                # interpolator: a key frame every `stride` frames (3 new frames between two keys)
      regime_fps=(7.5, 30.0),  # interpolator: clip fps of regime 0 (T->4T) and 1 (4T->16T); data.fps draws these
      uncond_prob=0.1,         # interpolator: P(all-zero mask), the unconditional branch for context guidance
      cond_aug_prob=0.5,       # conditioning augmentation: P(known frames are noised) ...
      cond_aug_max_level=250,  # ... to a level ~ U{1..this} (diffusion timesteps; the level is an input)
      sample_noise_level=0,    # conditioning-augmentation level given at sampling
      loss_on_known=False,     # False: the loss covers only the frames to predict
  ))

  # Input pipeline: exactly the fields of videoldm_jax.data.pipeline.default_config() (checked there).
  c.data = data_pipeline.default_config()

  c.batch_size = 32            # global batch (clips)
  c.total_steps = 100_000
  c.optimizer = ConfigDict(dict(lr=1e-4, warmup_steps=1000, schedule="constant", end_lr_factor=0.0,
                                b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=1.0))
  c.ema_decay = 0.9999         # 0 disables EMA

  c.log_every_steps = 50
  c.eval_every_steps = 1000    # loss on a fixed batch with fixed noise (0: never)
  c.eval_noise_draws = 4
  c.sample_every_steps = 5000  # preview videos (0: never; always at the end when > 0)
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  c.progress_every_secs = 60.0
  c.cpu_fast_compile = False   # CPU only: XLA -O0 (compiles ~2x faster, steps ~15x slower: compile-bound runs)

  c.mesh = mesh_defaults()
  return c


# ---------------------------------------------------------------------------------------------------------------
# Model variants shared by the pipelines.
# ---------------------------------------------------------------------------------------------------------------

def model_variant(name: str) -> Dict[str, Any]:
  """Model + diffusion settings of a named backbone (presets of videoldm_jax.models.{unet,vae,clip}).

  * ``sd15``: SD 1.x U-Net, KL-f8 VAE, CLIP ViT-L/14 text (ctx 768), eps, scaled-linear.
  * ``sd21``: SD 2.x U-Net (64-dim heads, linear proj), OpenCLIP ViT-H text (ctx 1024, penultimate layer),
    v-prediction (768-v). ``sd21_base``: the same with eps-prediction (512-base).
  * ``rds``: the driving image LDM: day/night + crowdedness label tokens as cross-attention context, no text,
    linear schedule, v-prediction (as the paper's driving models).
  * ``tiny`` (text) / ``tiny_rds`` (labels): CPU-sized versions for runlocal and tests.
  """
  scaled_linear = dict(schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
  linear = dict(schedule="linear", beta_start=0.0001, beta_end=0.02)
  rds_unet = dict(block_out_channels=(128, 256, 512, 512), num_attention_heads=8, cross_attention_dim=512,
                  down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",))
  variants = {
      "sd15": dict(model=dict(unet="sd15", vae="sd", text_encoder="vit_l14", conditioning="text",
                              tokenizer_pad="<|endoftext|>"),
                   diffusion=dict(scaled_linear, prediction="eps")),
      "sd21": dict(model=dict(unet="sd21", vae="sd", text_encoder="openclip_vit_h14", conditioning="text",
                              tokenizer_pad="!"),
                   diffusion=dict(scaled_linear, prediction="v")),
      "sd21_base": dict(model=dict(unet="sd21", vae="sd", text_encoder="openclip_vit_h14", conditioning="text",
                                   tokenizer_pad="!"),
                        diffusion=dict(scaled_linear, prediction="eps")),
      "rds": dict(model=dict(unet="sd15", unet_overrides=rds_unet, vae="sd", text_encoder="", conditioning="labels"),
                  diffusion=dict(linear, prediction="v")),
      "tiny": dict(model=dict(unet="tiny", vae="tiny", text_encoder="tiny", conditioning="text",
                              tokenizer_pad="<|endoftext|>"),
                   diffusion=dict(scaled_linear, prediction="eps")),
      "tiny_rds": dict(model=dict(unet="tiny", unet_overrides=dict(cross_attention_dim=32), vae="tiny",
                                  text_encoder="", conditioning="labels"),
                       diffusion=dict(linear, prediction="v")),
  }
  if name not in variants:
    raise ValueError(f"model variant {name!r} unknown; known: {sorted(variants)}")
  return variants[name]


def apply_variant(config: ConfigDict, name: str) -> ConfigDict:
  v = model_variant(name)
  for section, values in v.items():
    for k, val in values.items():
      config[section][k] = val
  return config


def video_temporal(**overrides) -> Dict[str, Any]:
  """Video LDM temporal layers: learned α with image-only passthrough, temporal cross-attention to the context."""
  return dict(dict(merge_strategy="learned_with_images", merge_factor=0.5, cross_attention=True), **overrides)


def runlocal(config: ConfigDict) -> ConfigDict:
  """Shrinks a config to a CPU smoke run (a few dozen steps, tiny batch, frequent logs)."""
  config.runlocal = True
  config.batch_size = 8
  config.total_steps = 40
  config.optimizer.warmup_steps = 5
  config.optimizer.schedule = "constant"
  config.log_every_steps = 5
  config.eval_every_steps = 20
  config.eval_noise_draws = 2
  config.sample_every_steps = 40
  config.checkpoint_every_steps = 20
  config.progress_every_secs = 10.0
  config.ema_decay = 0.99
  config.sampling.num_steps = 10
  config.sampling.num_samples = 2
  config.async_checkpointing = False
  config.data.num_workers = 0
  config.data.read_threads = 2
  config.data.prefetch = 2
  config.data.height, config.data.width = 32, 64
  return config


# ---------------------------------------------------------------------------------------------------------------
# Chains: several stages trained one after the other, each initialised from the previous ones.
# ---------------------------------------------------------------------------------------------------------------

CHAIN = "chain"


def chain_config(get_config, stages: Sequence[str], args: ConfigDict, sample_videos: int = 4) -> ConfigDict:
  """A config that trains ``stages`` in order (``videoldm_jax.train.train_chain``).

  ``get_config`` is the pipeline's own config function; each stage's config is ``get_config("stage=S,<args>")``
  with the other ``args`` of the chain (``runlocal``, ...) and lives in ``config.stages.S`` (override on the
  command line as ``--config.stages.base.total_steps=10``). Stage S trains in ``WORKDIR/S``; its
  ``model_init``, when empty, becomes the previous stage's workdir (which in turn names its own sources), so the
  last stage sees every earlier result. ``sample_videos`` videos of the last stage are written under WORKDIR.
  """
  rest = ",".join(f"{k}={args[k]}" for k in args if k != "stage")
  c = ConfigDict()
  c.stage = CHAIN
  c.chain = tuple(stages)
  c.stages = ConfigDict({s: get_config(f"stage={s},{rest}") for s in stages})
  c.sample_videos = sample_videos
  return c


def is_chain(config) -> bool:
  return config.get("stage") == CHAIN


def validate_chain(config: ConfigDict) -> None:
  """Checks the chain's stage list and every stage config (before the first stage starts training)."""
  if not config.chain:
    raise ValueError("config.chain is empty: name the stages to train in order")
  for s in config.chain:
    if s not in config.stages:
      raise ValueError(f"config.chain names stage {s!r} but config.stages has no entry for it "
                       f"(has: {sorted(config.stages)})")
    sub = config.stages[s]
    try:
      validate(sub)
    except ValueError as e:
      raise ValueError(f"config.stages.{s}: {e}") from None
    if sub.stage != s:
      raise ValueError(f"config.stages.{s}.stage={sub.stage!r} differs from its name in the chain")
  if int(config.sample_videos) < 0:
    raise ValueError(f"config.sample_videos={config.sample_videos} must be >= 0")


# ---------------------------------------------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------------------------------------------

def _walk(d, prefix: str = "") -> Iterable[Tuple[str, Any]]:
  for k in d.keys():
    v = d[k]
    path = f"{prefix}{k}"
    yield path, v
    if isinstance(v, ConfigDict) and path not in FREE_FORM:
      yield from _walk(v, path + ".")


_CHOICES = {
    "dtype": ("float32", "bfloat16"),
    "frozen_dtype": ("float32", "bfloat16"),
    "diffusion.prediction": ("eps", "v"),
    "diffusion.schedule": ("linear", "scaled_linear"),
    "optimizer.schedule": ("constant", "cosine"),
    "model.conditioning": ("text", "labels", "none"),
    "mesh.rules": ("data_parallel", "fsdp", "fsdp_tensor"),
    "distributed": ("auto", "none", "force"),
    "autoencoder.disc_loss": ("hinge", "vanilla"),
}


def validate(config: ConfigDict) -> None:
  """Static checks (no devices needed). Raises ``ValueError`` naming the key."""
  schema = dict(_walk(base_config()))
  for path, value in _walk(config):
    if path not in schema:
      raise ValueError(f"config.{path}: unknown key (typo?). Known keys are declared in configs/common.py")
  for path, choices in _CHOICES.items():
    section, _, key = path.rpartition(".")
    value = (config[section] if section else config)[key]
    if value not in choices:
      raise ValueError(f"config.{path}={value!r}: expected one of {choices}")
  for key in ("total_steps", "batch_size"):
    if int(config[key]) <= 0:
      raise ValueError(f"config.{key}={config[key]} must be > 0")
  for key in ("log_every_steps", "eval_every_steps", "sample_every_steps", "checkpoint_every_steps"):
    if int(config[key]) < 0:
      raise ValueError(f"config.{key}={config[key]} must be >= 0")
  if not 0.0 <= float(config.ema_decay) < 1.0:
    raise ValueError(f"config.ema_decay={config.ema_decay} must be in [0, 1)")
  try:
    data_pipeline.with_defaults(config.data)
  except KeyError as e:
    raise ValueError(f"config.data: {e.args[0]}") from None
  if not 0.0 <= float(config.data.cond_drop_prob) <= 1.0:
    raise ValueError(f"config.data.cond_drop_prob={config.data.cond_drop_prob} must be in [0, 1]")
  try:
    re.compile(config.trainable)
  except re.error as e:
    raise ValueError(f"config.trainable={config.trainable!r} is not a valid regex: {e}") from e
  if int(config.data.num_frames) < 1:
    raise ValueError(f"config.data.num_frames={config.data.num_frames} must be >= 1")
  # The batch splits over (data, fsdp). When the ICI knobs of those axes are explicit, check before any device
  # exists (a DCN -1 counts as config.mesh.num_slices; more processes only multiply the size: validate_for_mesh).
  ici = [int(config.mesh[f"ici_{a}_parallelism"]) for a in ("data", "fsdp", "tensor")]
  dcn = [int(config.mesh[f"dcn_{a}_parallelism"]) for a in ("data", "fsdp", "tensor")]
  if dcn.count(-1) == 1:
    known = math.prod(d for d in dcn if d != -1)
    dcn[dcn.index(-1)] = max(1, int(config.mesh.num_slices) // max(known, 1))
  if -1 not in ici[:2] and -1 not in dcn[:2]:
    dp = ici[0] * ici[1] * dcn[0] * dcn[1]
    if int(config.batch_size) % dp:
      raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the data-parallel size {dp} "
                       "(config.mesh data x fsdp parallelism, ici x dcn)")
  if config.stage in ("predictor", "interpolator"):  # mask settings, checked before any chain stage trains
    from videoldm_jax.tasks import masked  # pylint: disable=g-import-not-at-top
    masked.validate_config(config)


def validate_for_mesh(config: ConfigDict, data_parallel_size: int, process_count: int = 1) -> None:
  """Checks that need the mesh: the global batch must split evenly over (data, fsdp) and over processes."""
  if int(config.batch_size) % data_parallel_size:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the data-parallel size "
                     f"{data_parallel_size} (mesh data x fsdp)")
  if int(config.batch_size) % process_count:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by {process_count} processes")
