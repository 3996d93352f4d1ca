"""configs/tpu.py: every full-size run x chip validates, computes in bf16 (frozen backbone stored in bf16) on
latents with the planned mesh and remat policy, and its task builds (shapes only); the docstring shows the train and
plan commands."""

import pytest

from configs import tpu
from videoldm_jax import parallel, tasks

@pytest.mark.parametrize("run", sorted(tpu.RUNS))
@pytest.mark.parametrize("chip", ["v5p", "v6e", "v5e", "v4"])
def test_runs_validate(run, chip):
  c = tpu.get_config(f"run={run},chip={chip}")
  tasks.validate(c)
  assert c.dtype == "bfloat16" and c.frozen_dtype == "bfloat16" and c.data.source == "latents"
  plan = tpu.PLANS[(run, tpu.SIMILAR.get(chip, chip))]
  assert c.model.unet_overrides["remat"] == ("full" if chip == "v5e" else plan["remat"])
  preset = parallel.PRESETS[plan["mesh"]]
  assert {k: c.mesh[k] for k in preset} == preset
  # The planned per-device batch divides the run's global batch (the slice size follows from it).
  assert c.batch_size % plan["per_device_batch"] == 0
  # The run is its pipeline's full-size stage: same stage, model and global batch.
  module, arg = tpu.RUNS[run]
  base = module.get_config(arg)
  assert (c.stage, c.batch_size, c.data.num_frames, c.data.height, c.data.width) == \
      (base.stage, base.batch_size, base.data.num_frames, base.data.height, base.data.width)


def test_full_size_shapes():
  c = tpu.get_config("run=t2v_sd15")
  task = tasks.get(c.stage)(c)
  assert task.unet_config.remat in ("none", "dots", "full") and task.unet_config.temporal is not None
  assert (c.data.height // 8, c.data.width // 8) == (40, 64)  # 320x512 px -> 40x64 latents
  assert tpu.get_config("run=rds_base").batch_size == 640       # 16 GPUs x 40 in the paper


def test_unknown_names_are_refused():
  with pytest.raises(ValueError, match="run='t2v'"):
    tpu.get_config("run=t2v")
  with pytest.raises(ValueError, match="chip='h100'"):
    tpu.get_config("run=t2v_sd15,chip=h100")


def test_docstring_commands():
  assert "python -m videoldm_jax.train --config=configs/tpu.py:run=" in tpu.__doc__
  assert "python -m videoldm_jax.plan --config=configs/tpu.py:run=" in tpu.__doc__
