r"""Personalized text-to-video (paper Sec. 4.2): the temporal layers of a trained text-to-video stage inserted into a
DreamBooth-fine-tuned Stable Diffusion.

  python -m videoldm_jax.personalize --workdir=/tmp/t2v_sd15 --personalized=/models/dreambooth_sks_dog \
      --output=/tmp/t2v_sks_dog [--text_encoder=personalized|original]
  python -m videoldm_jax.sample --workdir=/tmp/t2v_sks_dog --prompt="a sks dog running on the beach"

``--workdir``: a trained text-conditioned video stage that trained only temporal layers on a frozen SD backbone
(``base``, or a chain's ``base/`` folder). ``--personalized``: the fine-tuned SD, a diffusers pipeline folder or a
CompVis single file (U-Net and text encoder read strictly through ``videoldm_jax.convert``; its VAE is not used).

``--output`` becomes a workdir that samples and trains like the original one:

  OUT/checkpoints/<step>/   the workdir's latest checkpoint, copied (its temporal layers, EMA and optimizer state)
  OUT/backbone/             a converted checkpoint (``videoldm_jax.convert`` format): ``unet`` = the personalized
                            spatial layers + the workdir's temporal layers (EMA), ``vae`` = the workdir's,
                            ``text_encoder`` = the personalized one, ``temporal_text_encoder`` = the workdir's
  OUT/config.json           the workdir's config with ``model_init`` = OUT/backbone and
                            ``model.temporal_text_encoder=True``
  OUT/model_init.json

As in the paper, the spatial layers read the personalized text encoder and the temporal layers the original one they
were trained with (``config.model.temporal_text_encoder``: the task encodes every caption with both, and the U-Net's
temporal cross-attention takes the second one's tokens; classifier-free guidance drops the caption in both).
``--text_encoder=original`` keeps one encoder, the original, for both (the personalized U-Net then reads a text
encoder it was not fine-tuned with).

Strict: the personalized U-Net must hold exactly the spatial tensors of the workdir's U-Net, with the same shapes
(and the same non-shape settings, e.g. attention heads), and its text encoder those of the workdir's; otherwise the
command names the first offending key and writes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import typing
from typing import Any, Callable, Dict, Mapping, Optional

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags
from flax import traverse_util

from videoldm_jax import checkpoint, cli, config_lib, diffusion, optim, parallel, tasks, workdirs

SEP = optim.SEP
TEXT_ENCODERS = ("personalized", "original")
BACKBONE = "backbone"
# Fields of the spatial U-Net / text encoder configs that do not change what the network computes.
_RUNTIME_FIELDS = ("temporal", "attention_implementation", "remat", "upcast_attention", "dropout")
_TEXT_RUNTIME_FIELDS = ("attention_implementation",)


class PersonalizeError(ValueError):
  """The workdir or the personalized model cannot be combined; the message names the offending key or setting."""


def is_temporal(key: str) -> bool:
  """The param naming contract: every temporal param has ``temporal`` in its path; the rest is the image U-Net."""
  return "temporal" in key


# ---------------------------------------------------------------------------------------------------------------
# Checks.
# ---------------------------------------------------------------------------------------------------------------

def check_workdir_config(config, workdir: str) -> None:
  """Raises ``PersonalizeError`` unless ``config`` is a text-conditioned video stage that trained only temporal
  layers (the spatial layers are swapped, so they must be the frozen image backbone)."""
  from videoldm_jax.tasks.latent_diffusion import LatentDiffusionTask  # pylint: disable=g-import-not-at-top
  if config_lib.is_chain(config):
    raise PersonalizeError(f"{workdir} is a chain workdir: pass the folder of its text-to-video stage, e.g. "
                           f"{os.path.join(workdir, 'base')}")
  stage = config.stage
  if stage in LatentDiffusionTask.image_stages or config.model.get("temporal") is None:
    raise PersonalizeError(f"{workdir} is an image-stage ({stage!r}) workdir: personalisation inserts the temporal "
                           "layers of a video stage (e.g. base) into a personalized image backbone")
  if config.model.conditioning != "text" or not issubclass(tasks.get(stage), LatentDiffusionTask):
    raise PersonalizeError(f"{workdir}: stage {stage!r} is conditioned on {config.model.conditioning!r}, not text "
                           "(config.model.conditioning): a personalized Stable Diffusion has a text encoder to "
                           "condition on")


def check_spatial_frozen(config, workdir: str, unet_shapes: Mapping[str, Any]) -> None:
  """Raises ``PersonalizeError`` when ``config.trainable`` matches a spatial U-Net param (``unet_shapes``: flat
  paths inside ``unet/``): only temporal layers trained on a frozen image backbone carry over to a personalized
  one."""
  rx = re.compile(config.trainable)
  trained = sorted(f"unet{SEP}{k}" for k in unet_shapes if not is_temporal(k) and rx.fullmatch(f"unet{SEP}{k}"))
  if trained:
    raise PersonalizeError(f"{workdir}: its spatial layers were trained (config.trainable={config.trainable!r} "
                           f"matches {trained[0]}): only temporal layers trained on a frozen image backbone carry "
                           "over to a personalized one")


def _config_diff(name: str, ours, theirs, ignore) -> Optional[str]:
  a = {f.name: getattr(ours, f.name) for f in dataclasses.fields(ours) if f.name not in ignore}
  b = {f.name: getattr(theirs, f.name) for f in dataclasses.fields(theirs) if f.name not in ignore}
  for field in sorted(set(a) | set(b)):
    if a.get(field) != b.get(field):
      return f"{name} config field {field}: personalized {b.get(field)!r}, workdir {a.get(field)!r}"
  return None


def check_same_tensors(name: str, want: Mapping[str, Any], got: Mapping[str, Any], src: str) -> None:
  """Every tensor of ``want`` (flat path -> array or shape struct) must be in ``got`` with its shape, and ``got``
  must hold nothing else; raises ``PersonalizeError`` naming the first offending key (``name/path``) and counts."""
  missing = sorted(k for k in want if k not in got)
  shaped = sorted(k for k in want if k in got and tuple(got[k].shape) != tuple(want[k].shape))
  extra = sorted(k for k in got if k not in want)
  if not (missing or shaped or extra):
    return
  if missing:
    first = f"{name}{SEP}{missing[0]} is missing from it"
  elif shaped:
    k = shaped[0]
    first = f"{name}{SEP}{k} has shape {tuple(got[k].shape)}, the workdir's {tuple(want[k].shape)}"
  else:
    first = f"{name}{SEP}{extra[0]} is not in the workdir's model"
  raise PersonalizeError(f"{src}: another {name} architecture than the workdir's: {first} ({len(missing)} missing, "
                         f"{len(shaped)} mis-shaped, {len(extra)} extra of {len(want)} tensors)")


# ---------------------------------------------------------------------------------------------------------------
# The command.
# ---------------------------------------------------------------------------------------------------------------

def _latest_step_dir(workdir: str) -> str:
  ckdir = os.path.join(workdir, "checkpoints")
  steps = sorted(int(p) for p in os.listdir(ckdir)
                 if p.isdigit() and os.path.isdir(os.path.join(ckdir, p, "state")))
  return os.path.join(ckdir, str(steps[-1]))


def _by_component(flat: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
  """``{"unet/a/b": x}`` -> ``{"unet": {"a/b": x}}``."""
  out: Dict[str, Dict[str, Any]] = {}
  for k, v in flat.items():
    component, _, rest = k.partition(SEP)
    out.setdefault(component, {})[rest] = v
  return out


def load_workdir_params(workdir: str, config, task=None, boxed=None):
  """``(task, {component: flat numpy params})`` of a trained stage, as the sampler loads it (EMA trainable params,
  frozen ones from ``frozen/`` or the ``model_init`` chain), over the local devices (the training mesh may not fit
  here). ``task`` / ``boxed`` (its ``jax.eval_shape(task.init, ...)``): reused when given."""
  workdirs.check_trained(workdir)
  config = config_lib.ConfigDict(config.to_dict())
  config.mesh = config_lib.mesh_defaults()
  mesh = parallel.make_mesh(config)
  task = tasks.get(config.stage)(config) if task is None else task
  boxed = jax.eval_shape(task.init, jax.random.key(0, impl="rbg")) if boxed is None else boxed
  shardings = parallel.param_shardings(boxed, mesh, parallel.logical_rules(config))
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed),
                          shardings)
  loaded = checkpoint.load_model_init(workdir, optim.flat_paths(abstract), missing_ok="", use_ema=True)
  return task, _by_component({k: np.asarray(v) for k, v in parallel.to_host(loaded).items()})


def personalize(workdir: str, personalized: str, output: str, *, text_encoder: str = "personalized",
                overwrite: bool = False, log: Callable[[str], None] = print) -> Dict[str, Any]:
  """Writes the workdir OUT (see the module docstring); returns ``{"output", "step", "counts"}``.

  Raises ``PersonalizeError`` (a ``ValueError``) naming the offending key, field or workdir setting; ``convert``'s
  ``ConversionError`` for a source that does not convert; ``FileNotFoundError`` for an untrained workdir. Nothing
  is left at ``output`` on failure.
  """
  from videoldm_jax import convert  # pylint: disable=g-import-not-at-top  (pulls in the torch-format readers)
  if text_encoder not in TEXT_ENCODERS:
    raise PersonalizeError(f"--text_encoder={text_encoder!r}: expected one of {TEXT_ENCODERS}")
  workdir, personalized, output = (os.path.abspath(p) for p in (workdir, personalized, output))
  if output == workdir:
    raise PersonalizeError(f"--output={output} is the workdir itself: write the personalized model elsewhere")
  if os.path.exists(output) and not overwrite:
    raise PersonalizeError(f"{output}: already exists (pass --overwrite to replace it)")
  config = workdirs.load_run_config(workdir)
  check_workdir_config(config, workdir)
  workdirs.check_trained(workdir)
  two_encoders = text_encoder == "personalized"

  # ----- every check before anything is loaded: the workdir's param shapes, the personalized model (strict) -----
  task = tasks.get(config.stage)(config)
  boxed = jax.eval_shape(task.init, jax.random.key(0, impl="rbg"))
  shapes = _by_component(optim.flat_paths(nn.meta.unbox(boxed)))
  check_spatial_frozen(config, workdir, shapes["unet"])
  wanted = ("unet", "text_encoder") if two_encoders else ("unet",)
  configs, src_params, schedule = convert.convert_source(personalized, components=wanted)
  kind = schedule.get("prediction_type")
  if kind and diffusion.canonical_prediction_type(kind) != config.diffusion.prediction:
    raise PersonalizeError(f"{personalized}: predicts {kind!r} but {workdir} was trained with "
                           f"config.diffusion.prediction={config.diffusion.prediction!r}")
  src_unet = {k: np.asarray(v) for k, v in optim.flat_paths(src_params["unet"]).items()}
  check_same_tensors("unet", {k: v for k, v in shapes["unet"].items() if not is_temporal(k)}, src_unet,
                     personalized)
  problem = _config_diff("unet", task.unet_config, configs["unet"], _RUNTIME_FIELDS)
  src_text = None
  if two_encoders:
    src_text = {k: np.asarray(v) for k, v in optim.flat_paths(src_params["text_encoder"]).items()}
    check_same_tensors("text_encoder", shapes["text_encoder"], src_text, personalized)
    problem = problem or _config_diff("text_encoder", task.text_config, configs["text_encoder"],
                                      _TEXT_RUNTIME_FIELDS)
  if problem:
    raise PersonalizeError(f"{personalized}: another architecture than the workdir's: {problem}")

  # ----- the workdir's model ------------------------------------------------------------------------------------
  _, params = load_workdir_params(workdir, config, task, boxed)
  spatial = {k: v for k, v in params["unet"].items() if not is_temporal(k)}
  temporal = {k: v for k, v in params["unet"].items() if is_temporal(k)}
  # A workdir made by this command: its temporal layers' encoder is the second one.
  original_text = params.get("temporal_text_encoder", params["text_encoder"])

  # ----- the backbone: personalized spatial layers + the workdir's temporal layers ------------------------------
  unflat = lambda flat: traverse_util.unflatten_dict(flat, sep=SEP)  # noqa: E731
  backbone = {"unet": unflat({**src_unet, **temporal}),
              "text_encoder": unflat(src_text if two_encoders else original_text)}
  backbone_configs = {"unet": task.unet_config, "text_encoder": task.text_config}
  if "vae" in params:  # the workdir's (a pixel-space stage has none)
    backbone["vae"], backbone_configs["vae"] = unflat(params["vae"]), task.vae_config
  if two_encoders:
    backbone["temporal_text_encoder"] = unflat(original_text)
    backbone_configs["temporal_text_encoder"] = task.text_config
  schedule = dict(schedule)
  schedule.setdefault("prediction_type", {"eps": "epsilon", "v": "v_prediction"}[config.diffusion.prediction])
  step_dir = _latest_step_dir(workdir)
  step = int(os.path.basename(step_dir))
  provenance = {"personalized": {"workdir": workdir, "step": step, "source": personalized,
                                 "text_encoder": text_encoder}}

  # ----- OUT, written to a temporary sibling and renamed ---------------------------------------------------------
  with open(os.path.join(workdir, "config.json")) as f:
    run = json.load(f)
  run["model"]["temporal_text_encoder"] = two_encoders
  if two_encoders and re.fullmatch(run["trainable"], "temporal_text_encoder/final_layer_norm/scale"):
    run["trainable"] = f"(?!temporal_text_encoder/)(?:{run['trainable']})"  # the same params as the workdir's
  run["model_init"] = os.path.join(output, BACKBONE)
  run["model_init_skip"] = ""  # the backbone holds every param at its shape
  run["resume"] = ""
  with convert.atomic_directory(output) as tmp:
    convert.save_converted(os.path.join(tmp, BACKBONE), backbone_configs, backbone, schedule,
                           source=personalized, metadata=provenance)
    shutil.copytree(step_dir, os.path.join(tmp, "checkpoints", str(step)))
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(run, f, indent=2, sort_keys=True)
    with open(os.path.join(tmp, "model_init.json"), "w") as f:
      json.dump({"model_init": run["model_init"]}, f)

  counts = {"spatial": len(spatial), "temporal": len(temporal)}
  log(f"unet: {len(spatial)} spatial tensors from {personalized}, {len(temporal)} temporal from {workdir} "
      f"(step {step})")
  if two_encoders:
    log(f"text_encoder (spatial layers) from {personalized}; temporal_text_encoder (temporal layers) from {workdir}")
  else:
    log(f"text_encoder (spatial and temporal layers) from {workdir}")
  if "vae" in backbone:
    log(f"vae from {workdir}")
  log(f"wrote {output} (sample it: python -m videoldm_jax.sample --workdir={output})")
  return {"output": output, "step": step, "counts": counts}


# ---------------------------------------------------------------------------------------------------------------
# CLI (absl flags: videoldm_jax.cli).
# ---------------------------------------------------------------------------------------------------------------

def define_flags(fv: flags.FlagValues) -> None:
  """The command's flags, defined in ``fv`` (the global FLAGS when run as a program)."""
  flags.DEFINE_string("workdir", None, "A trained text-to-video stage workdir (e.g. base) whose temporal layers "
                      "are inserted.", flag_values=fv)
  flags.DEFINE_string("personalized", None, "The personalized (e.g. DreamBooth) Stable Diffusion: a diffusers "
                      "pipeline folder or a CompVis .ckpt / .safetensors file.", flag_values=fv)
  flags.DEFINE_string("output", None, "The new workdir (must not exist unless --overwrite).", flag_values=fv)
  flags.DEFINE_enum("text_encoder", "personalized", list(TEXT_ENCODERS), "Text encoder of the spatial layers: the "
                    "personalized one (the temporal layers keep the original: two encoders) or the original one "
                    "for both.", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "Replace --output if it exists.", flag_values=fv)


def run(fv: flags.FlagValues) -> int:
  """Runs the command with parsed flags; bad input raises ``app.UsageError`` (one line, status 2)."""
  cli.require(fv, "workdir", "personalized", "output")
  try:
    personalize(fv.workdir, fv.personalized, fv.output, text_encoder=fv.text_encoder, overwrite=fv.overwrite)
  except (ValueError, FileNotFoundError) as e:  # PersonalizeError, convert's ConversionError, config errors
    raise app.UsageError(str(e)) from None
  return 0


def main(argv: typing.Sequence[str]) -> int:
  """The command with ``argv`` (its flags, as on the command line)."""
  return cli.main("videoldm_jax.personalize", define_flags, run, argv)


if __name__ == "__main__":
  cli.run_program(define_flags, run)
