"""Run configurations: argument parsing, the generic schema, model presets, ``runlocal`` shrinking, chains.

A run's config is ``base_config()`` (the keys every stage understands: seed, model, data, optimizer, mesh,
logging, ...) plus the sections its task declares (``videoldm_jax.tasks``: each task's ``config_defaults``), so
the schema lives in the package and the files in ``configs/`` only choose values (``get_config(arg)``).
``tasks.default_config(stage)`` builds a stage's schema with defaults and ``tasks.validate(config)`` checks a
config against it: unknown keys and bad values fail before any compile, naming the key.
"""

from __future__ import annotations

import math
import re
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import ml_collections

from videoldm_jax.data import pipeline as data_pipeline

ConfigDict = ml_collections.ConfigDict

# Sub-dicts whose keys are checked elsewhere (model dataclass fields); tasks add their own (``Task.free_form``).
FREE_FORM = ("model.unet_overrides", "model.vae_overrides", "model.text_overrides", "model.temporal",
             "mesh.extra_rules")


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
  """The keys every stage understands, with defaults (a stage's own sections come from its task:
  ``videoldm_jax.tasks.default_config(stage)``)."""
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
      conditioning="text",     # text | labels | none | image (svd: the first frame)
      tokenizer_pad="<|endoftext|>",  # CLIP tokenizer padding: "<|endoftext|>" (SD 1.x) or "!" (OpenCLIP, SD 2.x)
      label_fields=("day_night", "crowdedness"),  # labels conditioning: fields of batch["labels"] ...
      label_classes=(2, 5),    # ... and their class counts (a null class for CFG is added to each)
      label_dim=0,             # width of the label tokens (0: the U-Net's cross_attention_dim)
      temporal_text_encoder=False,  # text video stages: the temporal layers read a second text encoder's tokens
  ))
  c.dtype = "float32"          # compute dtype: float32 | bfloat16 (trainable params stay float32)
  c.frozen_dtype = "float32"   # storage dtype of the frozen params (config.trainable's complement): float32 | bfloat16
  c.trainable = ".*"           # regex over '/'-joined param paths; the rest is frozen
  c.model_init = ""            # converted checkpoint dir or a trained workdir to initialise from
  c.model_init_missing_ok = ""  # regex of params that model_init may lack (new layers)
  c.model_init_skip = ""  # regex of params initialised fresh even where model_init has them (e.g. another shape)
  c.model_init_use_ema = True
  c.resume = ""                # another workdir whose latest checkpoint continues here

  # Previews and sampling (tasks add their own keys, e.g. the DDIM settings of the diffusion stages).
  c.sampling = ConfigDict(dict(num_samples=4, fps=4.0))

  # Input pipeline: exactly the fields of videoldm_jax.data.pipeline.default_config() (checked there).
  c.data = data_pipeline.default_config()

  c.batch_size = 32            # global batch (clips)
  c.total_steps = 100_000
  c.optimizer = ConfigDict(dict(lr=1e-4, warmup_steps=1000, schedule="constant", end_lr_factor=0.0,
                                b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=1.0))
  c.ema_decay = 0.9999         # 0 disables EMA

  # Video metrics of EMA samples during training (videoldm_jax/evaluation; README "Evaluation").
  c.evaluation = ConfigDict(dict(
      every_steps=0,           # 0: never; else every K steps and at the end (stages whose samples are videos)
      metrics=("fvd",),
      num_videos=16,           # generated clips per evaluation, and reference clips
      num_frames=16,           # FVD protocol frames (I3D needs >= 9; clips are sampled at least this long)
      reference="synthetic",   # videoldm_jax.evaluate sources: synthetic, a folder, NAME/SPLIT (data.data_dir), .npz
      batch_size=0,            # I3D clips per call (0: 4 per data-parallel device)
  ))

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
  """Sets the variant's values in the sections ``config`` has (a stage without diffusion has no ``diffusion``)."""
  for section, values in model_variant(name).items():
    if section in config:
      for k, val in values.items():
        config[section][k] = val
  return config


def video_temporal(**overrides) -> Dict[str, Any]:
  """Video LDM temporal layers: learned α with image-only passthrough, temporal cross-attention to the context.

  The LoRA keys (off by default) and ``conv_blocks`` are listed so that the command line can override them
  (``--config.model.temporal.lora_rank=8``, ``--config.model.temporal.conv_blocks=False`` for attention only).
  """
  return dict(dict(merge_strategy="learned_with_images", merge_factor=0.5, cross_attention=True, lora_rank=0,
                   lora_alpha=0.0, lora_convs=False, conv_blocks=True), **overrides)


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
  if "num_steps" in config.sampling:
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
  c = chain_schema()
  c.chain = tuple(stages)
  c.stages = ConfigDict({s: get_config(f"stage={s},{rest}") for s in stages})
  c.sample_videos = sample_videos
  return c


def chain_schema() -> ConfigDict:
  """The keys of a chain config (each stage's own config lives in ``stages``)."""
  return ConfigDict(dict(
      stage=CHAIN, chain=(), stages=ConfigDict(),
      sample_videos=4,     # long videos written to WORKDIR/sample.* after the last stage (0: none)
      sample_seconds=0.0,  # their length at the final fps (0: the pipeline's default number of windows)
      sample_fvd_clips=0,  # > 0: FVD of that many 16-frame clips cut from those videos vs held-out synthetic clips
      sample_skip=(),      # pipeline stages left out of those videos (trained all the same; sample --pipeline runs them)
      init_from=ConfigDict(),  # {stage: earlier stage or ""}: its empty model_init is that stage's workdir ("": none)
  ))


def chain_init_stage(config, name: str, previous: Optional[str]) -> Optional[str]:
  """The earlier stage of ``config.chain`` whose workdir becomes stage ``name``'s empty ``model_init``."""
  source = config.init_from.get(name, previous) or None  # "": from scratch (or its own model_init)
  chain = tuple(config.chain)
  if source is not None and (source not in chain or chain.index(source) >= chain.index(name)):
    raise ValueError(f"config.init_from.{name}={source!r} is not a stage before {name!r} in config.chain {chain}")
  return source


def is_chain(config) -> bool:
  return config.get("stage") == CHAIN


# ---------------------------------------------------------------------------------------------------------------
# Validation of the generic keys (a stage's own keys: its task's ``validate_config``).
# ---------------------------------------------------------------------------------------------------------------

def _walk(d, free_form: Sequence[str], prefix: str = "") -> Iterable[Tuple[str, Any]]:
  for k in d.keys():
    v = d[k]
    path = f"{prefix}{k}"
    yield path, v
    if isinstance(v, ConfigDict) and path not in free_form:
      yield from _walk(v, free_form, path + ".")


_CHOICES = {
    "dtype": ("float32", "bfloat16"),
    "frozen_dtype": ("float32", "bfloat16"),
    "optimizer.schedule": ("constant", "cosine"),
    "model.conditioning": ("text", "labels", "none", "image"),
    "mesh.rules": ("data_parallel", "fsdp", "fsdp_tensor"),
    "distributed": ("auto", "none", "force"),
}


def check_choices(config: ConfigDict, choices: Dict[str, Sequence[Any]]) -> None:
  """``{dotted key: allowed values}``: raises ``ValueError`` naming the first key whose value is not allowed."""
  for path, allowed in choices.items():
    section, _, key = path.rpartition(".")
    value = (config[section] if section else config)[key]
    if value not in allowed:
      raise ValueError(f"config.{path}={value!r}: expected one of {tuple(allowed)}")


def check_keys(config: ConfigDict, schema: ConfigDict, free_form: Sequence[str] = ()) -> None:
  """Every key of ``config`` must be in ``schema`` (sub-dicts named in ``free_form`` are not descended)."""
  free_form = tuple(FREE_FORM) + tuple(free_form)
  known = dict(_walk(schema, free_form))
  for path, _ in _walk(config, free_form):
    if path not in known:
      raise ValueError(f"config.{path}: unknown key for stage {config.get('stage')!r} (typo?); the stage's "
                       "schema is videoldm_jax.config_lib.base_config() plus its task's config_defaults()")


def validate_generic(config: ConfigDict) -> None:
  """Checks of the keys every stage has (no devices needed). Raises ``ValueError`` naming the key."""
  check_choices(config, _CHOICES)
  for key in ("total_steps", "batch_size"):
    if int(config[key]) <= 0:
      raise ValueError(f"config.{key}={config[key]} must be > 0")
  for key in ("log_every_steps", "eval_every_steps", "sample_every_steps", "checkpoint_every_steps"):
    if int(config[key]) < 0:
      raise ValueError(f"config.{key}={config[key]} must be >= 0")
  ec = config.evaluation
  if int(ec.every_steps) < 0 or int(ec.num_videos) < 2 or int(ec.num_frames) < 9 or int(ec.batch_size) < 0:
    raise ValueError(f"config.evaluation: every_steps={ec.every_steps} (>= 0), num_videos={ec.num_videos} (>= 2), "
                     f"num_frames={ec.num_frames} (>= 9, I3D), batch_size={ec.batch_size} (>= 0) out of range")
  if tuple(ec.metrics) != ("fvd",):
    raise ValueError(f"config.evaluation.metrics={tuple(ec.metrics)}: training evaluates ('fvd',); the other "
                     "metrics run offline with python -m videoldm_jax.evaluate")
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


def validate_for_mesh(config: ConfigDict, data_parallel_size: int, process_count: int = 1) -> None:
  """Checks that need the mesh: the global batch must split evenly over (data, fsdp) and over processes."""
  if int(config.batch_size) % data_parallel_size:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the data-parallel size "
                     f"{data_parallel_size} (mesh data x fsdp)")
  if int(config.batch_size) % process_count:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by {process_count} processes")
