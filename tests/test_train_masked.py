"""The runlocal ``predictor`` and ``interpolator`` stages train (one device): the loss on a fixed batch with fixed
noise goes down, only temporal params train, the zero-initialised conditioning projections move."""

import functools

import jax
import jax.numpy as jnp
import pytest

from configs import rds
from videoldm_jax import optim, parallel, train


@pytest.mark.parametrize("stage", ["predictor", "interpolator"])
def test_runlocal_stage_trains(stage, tmp_path, monkeypatch):
  monkeypatch.setattr(parallel, "make_mesh", functools.partial(parallel.make_mesh, devices=jax.devices()[:1]))
  config = rds.get_config(f"stage={stage},runlocal")
  config.total_steps = 10
  config.eval_every_steps = 10
  config.eval_noise_draws = 1
  config.sample_every_steps = 0
  config.checkpoint_every_steps = 0
  config.cpu_fast_compile = True
  config.data.num_frames = 5 if stage == "interpolator" else 4
  res = train.train_and_evaluate(config, str(tmp_path))
  first, last = res.eval_history[0], res.eval_history[-1]
  assert last["eval_loss"] < first["eval_loss"], res.eval_history
  flat = optim.flat_paths(res.state.params)
  assert all("temporal" in k for k in flat)
  assert any("temporal_cond/" in k for k in flat) and any("temporal_cond_proj" in k for k in flat)
  # The zero-init projections left zero: the conditioning is being learnt.
  proj = [v for k, v in flat.items() if "temporal_cond_proj/kernel" in k]
  assert max(float(jnp.abs(v).max()) for v in proj) > 0
  assert 0 < res.history[-1]["known_frames"] < config.data.num_frames
