"""Mesh construction from the parallelism knobs, logical rules, batch sharding (time axis never sharded)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from videoldm_jax import config_lib, optim, parallel
from videoldm_jax.models import layers


def _config(**mesh):
  c = config_lib.base_config()
  for k, v in mesh.items():
    c.mesh[k] = v
  return c


def test_mesh_fills_the_minus_one():
  mesh = parallel.make_mesh(_config())
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  mesh = parallel.make_mesh(_config(ici_data_parallelism=2, ici_fsdp_parallelism=-1, ici_tensor_parallelism=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert parallel.data_parallel_size(mesh) == 4


def test_mesh_errors_name_the_problem():
  with pytest.raises(ValueError, match="at most one ici_"):
    parallel.make_mesh(_config(ici_data_parallelism=-1, ici_fsdp_parallelism=-1))
  with pytest.raises(ValueError, match="uses 6 devices but 8"):
    parallel.make_mesh(_config(ici_data_parallelism=3, ici_fsdp_parallelism=2))
  with pytest.raises(ValueError, match="num_slices=3"):
    parallel.make_mesh(_config(num_slices=3))


def test_shapes_with_slices():
  ici, dcn = parallel.mesh_shapes(_config(ici_fsdp_parallelism=-1, ici_data_parallelism=1).mesh, 8, num_slices=2)
  assert ici == (1, 4, 1) and dcn == (2, 1, 1)


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = layers.conv(16, (3, 3), name="conv")(x)
    x = layers.dense(24, axes=("embed", "mlp"), name="up")(x)
    return layers.dense(16, axes=("mlp", "embed"), name="down")(x) + layers.group_norm(num_groups=4, name="norm")(
        x[..., :16])


@pytest.mark.parametrize("preset,expected", [
    ("data_parallel", {"conv/kernel": P(None, None, None, None), "up/kernel": P(None, None)}),
    ("fsdp", {"conv/kernel": P(None, None, None, "fsdp"), "up/kernel": P("fsdp", None),
              "down/kernel": P(None, "fsdp"), "norm/scale": P(None)}),
    ("fsdp_tensor", {"conv/kernel": P(None, None, None, "fsdp"), "up/kernel": P("fsdp", "tensor"),
                     "down/kernel": P("tensor", "fsdp")}),
])
def test_param_shardings_from_rules(preset, expected):
  config = _config(ici_data_parallelism=2, ici_fsdp_parallelism=2, ici_tensor_parallelism=2, rules=preset)
  mesh = parallel.make_mesh(config)
  boxed = jax.eval_shape(_Net().init, jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 8)))["params"]
  shardings = optim.flat_paths(parallel.param_shardings(boxed, mesh, parallel.logical_rules(config)))
  for path, spec in expected.items():
    got = shardings[path].spec
    assert tuple(got) + (None,) * (len(spec) - len(got)) == tuple(spec), (path, got)


def test_indivisible_dims_stay_replicated():
  config = _config(ici_data_parallelism=1, ici_fsdp_parallelism=8)
  mesh = parallel.make_mesh(config)
  assert parallel.fit_spec((12, 16), P("fsdp", None), mesh) == P(None, None)
  assert parallel.fit_spec((16, 12), P("fsdp", None), mesh) == P("fsdp", None)


def test_batch_sharding_keeps_time_whole():
  config = _config(ici_data_parallelism=2, ici_fsdp_parallelism=2, ici_tensor_parallelism=2)
  mesh = parallel.make_mesh(config)
  video = np.arange(4 * 8 * 2 * 2 * 3, dtype=np.float32).reshape(4, 8, 2, 2, 3)
  batch = parallel.global_batch({"video": video}, mesh)
  x = batch["video"]
  assert x.sharding.spec == P(("data", "fsdp"), None, None, None, None)
  for shard in x.addressable_shards:
    assert shard.data.shape == (1, 8, 2, 2, 3)  # batch split 4 ways (data x fsdp), all 8 frames on each device
  np.testing.assert_array_equal(np.asarray(x), video)


def test_initialize_distributed_is_a_noop_single_process(monkeypatch):
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS",
            "OMPI_COMM_WORLD_SIZE", "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(k, raising=False)
  parallel.initialize_distributed(_config())
  assert jax.process_count() == 1


def test_validation_rejects_batch_not_divisible_by_data_x_fsdp():
  config = _config(ici_data_parallelism=2, ici_fsdp_parallelism=4)
  config.batch_size = 12
  with pytest.raises(ValueError, match=r"config\.batch_size=12 is not divisible by the data-parallel size 8"):
    config_lib.validate_generic(config)
  config.batch_size = 16
  config_lib.validate_generic(config)
  # With a -1 knob the size is known only with the devices: the mesh-time check names the key the same way.
  config = _config(ici_data_parallelism=-1, ici_fsdp_parallelism=2)
  config.batch_size = 12
  config_lib.validate_generic(config)
  mesh = parallel.make_mesh(config)
  with pytest.raises(ValueError, match=r"config\.batch_size=12 is not divisible by the data-parallel size 8"):
    config_lib.validate_for_mesh(config, parallel.data_parallel_size(mesh))


def test_mesh_presets():
  for name, expected in [("dp", {"data": 8, "fsdp": 1, "tensor": 1}), ("fsdp", {"data": 1, "fsdp": 8, "tensor": 1}),
                         ("fsdp_tensor", {"data": 1, "fsdp": 4, "tensor": 2})]:
    config = parallel.apply_preset(_config(), name)
    assert dict(parallel.make_mesh(config).shape) == expected
    assert config.mesh.rules == parallel.PRESETS[name]["rules"]
  with pytest.raises(ValueError, match="mesh preset 'zero'"):
    parallel.apply_preset(_config(), "zero")
