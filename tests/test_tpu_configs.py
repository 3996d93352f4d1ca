"""configs/tpu.py: every full-size run builds a valid bf16 config of its pipeline stage; its planned per-device batch
runs the pipeline's global batch on whole TPU slices of the chosen chip; the commands its docstring shows work."""

import re

import jax.numpy as jnp
import pytest

from configs import tpu
from videoldm_jax import aot, config_lib, parallel, tasks

CHIPS = ("v5p", "v6e", "v5e", "v4")


def _data_parallel(config, num_devices: int, num_slices: int = 1) -> int:
  """Devices the batch is split over (data x fsdp, ICI x DCN) when ``config.mesh`` is laid out on the devices."""
  ici, dcn = parallel.mesh_shapes(config.mesh, num_devices, num_slices)
  assert ici[2] == dcn[2] == 1, "tensor parallelism in a full-size plan"
  return ici[0] * ici[1] * dcn[0] * dcn[1]


def _model_without_remat(config) -> dict:
  """The model config without the plan's settings (remat policy, attention implementation)."""
  model = config.model.to_dict()
  model["unet_overrides"] = {k: v for k, v in dict(model["unet_overrides"]).items()
                             if k not in ("remat", "attention_implementation")}
  return model


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("run", sorted(tpu.RUNS))
def test_runs_are_valid_bf16_stages_of_their_pipeline(run, chip):
  c = tpu.get_config(f"run={run},chip={chip}")
  tasks.validate(c)
  assert (c.dtype, c.frozen_dtype, c.data.source) == ("bfloat16", "bfloat16", "latents")
  # The run is its pipeline's stage at full size: same stage, model, clip shape and global batch.
  module, arg = tpu.RUNS[run]
  base = module.get_config(arg)
  for key in ("stage", "batch_size", "trainable"):
    assert c[key] == base[key], key
  for key in ("num_frames", "height", "width"):
    assert c.data[key] == base.data[key], key
  assert _model_without_remat(c) == _model_without_remat(base)
  plan = tpu.PLANS[(run, tpu.SIMILAR.get(chip, chip))]
  assert c.model.unet_overrides.get("attention_implementation") == plan.get("attention")
  assert c.model.unet_overrides["remat"] == ("full" if chip == "v5e" else plan["remat"])


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("run", sorted(tpu.RUNS))
def test_global_batch_fills_whole_slices_at_the_planned_per_device_batch(run, chip):
  """``batch_size / per_device_batch`` devices make up one slice of the chip, or several equal ones (a multislice
  job): laid out there, the run's mesh gives each data-parallel device exactly the planned per-device batch."""
  c = tpu.get_config(f"run={run},chip={chip}")
  per_device = tpu.PLANS[(run, tpu.SIMILAR.get(chip, chip))]["per_device_batch"]
  devices, rem = divmod(c.batch_size, per_device)
  assert rem == 0, f"per-device batch {per_device} does not divide the global batch {c.batch_size}"
  # The largest slice of this chip whose devices divide the total: one slice if it has them all.
  slices = [name for name in aot.known_topologies(chip) if devices % aot.topology(name).num_devices == 0]
  assert slices, f"{devices} devices are no whole number of {chip} slices"
  num_slices = devices // aot.topology(slices[-1]).num_devices
  c.mesh.num_slices = num_slices
  tasks.validate(c)
  dp = _data_parallel(c, devices, num_slices)
  assert dp == devices and per_device * dp == c.batch_size
  config_lib.validate_for_mesh(c, dp)


def _args(arg: str) -> dict:
  return dict(kv.split("=") for kv in arg.split(","))


def test_documented_commands_plan_and_train_the_global_batch():
  """Each ``python -m videoldm_jax.plan`` command of the module docstring: the per-device batch on the named slice
  gives the run's global batch and is the one planned for that chip; each train command's config is valid."""
  commands = re.findall(r"--config=configs/tpu\.py:(\S+) --topology=(\S+) --per_device_batch=(\d+)", tpu.__doc__)
  assert commands
  for arg, topology, per_device in commands:
    c, a = tpu.get_config(arg), _args(arg)
    assert aot.topology(topology).chip.generation == a["chip"]
    assert int(per_device) * _data_parallel(c, aot.topology(topology).num_devices) == c.batch_size
    assert int(per_device) == tpu.PLANS[(a["run"], tpu.SIMILAR.get(a["chip"], a["chip"]))]["per_device_batch"]
  trains = re.findall(r"python -m videoldm_jax\.train --config=configs/tpu\.py:(\S+)", tpu.__doc__)
  assert trains
  for arg in trains:
    tasks.validate(tpu.get_config(arg))


def test_chip_settings_reach_the_model():
  """bf16 compute and the chip's remat policy arrive in the task's U-Net; v5e (16 GB of HBM) recomputes whole
  blocks."""
  for chip in ("v5p", "v5e"):
    c = tpu.get_config(f"run=t2v_sd15,chip={chip}")
    task = tasks.get(c.stage)(c)
    assert task.dtype == jnp.bfloat16 and task.unet_config.temporal is not None
    assert task.unet_config.remat == c.model.unet_overrides["remat"]
  assert task.unet_config.remat == "full"
  assert (c.data.height // 8, c.data.width // 8) == (40, 64)  # 320x512 px -> 40x64 latents


def test_unknown_names_are_refused():
  with pytest.raises(ValueError, match="run='t2v'"):
    tpu.get_config("run=t2v")
  with pytest.raises(ValueError, match="chip='h100'"):
    tpu.get_config("run=t2v_sd15,chip=h100")
