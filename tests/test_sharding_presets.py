"""The mesh presets of ``parallel.RULES`` on the real (tiny) video U-Net: the partition spec of representative
parameters -- spatial and temporal conv kernels, attention projections, feed-forwards, norms, alpha mixers -- is
what the documented mapping says (``embed``/``conv_out``/``vocab`` -> fsdp; ``mlp``/``heads`` -> tensor with
``fsdp_tensor``; conv kernels never over tensor; everything else replicated)."""

import dataclasses

import flax.linen as nn
import pytest
from jax.sharding import PartitionSpec as P

from videoldm_jax import config_lib, optim, parallel
from videoldm_jax.models import temporal, unet

BLOCK = "down_blocks_0/attentions_0"
SPATIAL = f"{BLOCK}/transformer_blocks_0"
TEMPORAL = f"{BLOCK}/temporal_transformer_blocks_0"
RES = "down_blocks_0/resnets_0"

# path -> spec per preset (None = that dimension replicated)
EXPECTED = {
    "conv_in/kernel": {                                   # (3, 3, 4, 32): conv_h, conv_w, conv_in, conv_out
        "data_parallel": P(None, None, None, None),
        "fsdp": P(None, None, None, "fsdp"),
        "fsdp_tensor": P(None, None, None, "fsdp")},
    f"{RES}/conv1/kernel": {
        "data_parallel": P(None, None, None, None),
        "fsdp": P(None, None, None, "fsdp"),
        "fsdp_tensor": P(None, None, None, "fsdp")},
    f"{RES}/temporal_res/conv1/kernel": {                 # (3, 1, 1, 32, 32): conv_t, conv_h, conv_w, in, out
        "data_parallel": P(None, None, None, None, None),
        "fsdp": P(None, None, None, None, "fsdp"),
        "fsdp_tensor": P(None, None, None, None, "fsdp")},
    f"{RES}/temporal_res/conv1/bias": {"data_parallel": P(None), "fsdp": P("fsdp"), "fsdp_tensor": P("fsdp")},
    f"{SPATIAL}/attn1/to_q/kernel": {                     # embed -> heads
        "data_parallel": P(None, None), "fsdp": P("fsdp", None), "fsdp_tensor": P("fsdp", "tensor")},
    f"{SPATIAL}/attn2/to_k/kernel": {                     # context width -> heads
        "data_parallel": P(None, None), "fsdp": P("fsdp", None), "fsdp_tensor": P("fsdp", "tensor")},
    f"{SPATIAL}/attn1/to_out_0/kernel": {                 # heads -> embed
        "data_parallel": P(None, None), "fsdp": P(None, "fsdp"), "fsdp_tensor": P("tensor", "fsdp")},
    f"{TEMPORAL}/attn1/to_v/kernel": {
        "data_parallel": P(None, None), "fsdp": P("fsdp", None), "fsdp_tensor": P("fsdp", "tensor")},
    f"{TEMPORAL}/attn1/to_out_0/kernel": {
        "data_parallel": P(None, None), "fsdp": P(None, "fsdp"), "fsdp_tensor": P("tensor", "fsdp")},
    f"{TEMPORAL}/ff/net_0/proj/kernel": {                 # embed -> mlp
        "data_parallel": P(None, None), "fsdp": P("fsdp", None), "fsdp_tensor": P("fsdp", "tensor")},
    f"{TEMPORAL}/ff/net_2/kernel": {                      # mlp -> embed
        "data_parallel": P(None, None), "fsdp": P(None, "fsdp"), "fsdp_tensor": P("tensor", "fsdp")},
    f"{TEMPORAL}/norm1/scale": {"data_parallel": P(None), "fsdp": P(None), "fsdp_tensor": P(None)},
    f"{BLOCK}/temporal_pos_embed/linear_1/kernel": {
        "data_parallel": P(None, None), "fsdp": P("fsdp", None), "fsdp_tensor": P("fsdp", "tensor")},
    f"{BLOCK}/temporal_mixer/mix_factor": {"data_parallel": P(None), "fsdp": P(None), "fsdp_tensor": P(None)},
}


@pytest.fixture(scope="module")
def boxed_params():
  cfg = dataclasses.replace(unet.tiny(), temporal=temporal.TemporalConfig())
  return unet.abstract_params(cfg)


def _normalise(spec, ndim):
  entries = tuple(spec) + (None,) * (ndim - len(spec))
  return tuple(e[0] if isinstance(e, tuple) and len(e) == 1 else e for e in entries)


@pytest.mark.parametrize("preset", ["data_parallel", "fsdp", "fsdp_tensor"])
def test_preset_partition_specs(boxed_params, preset):
  config = config_lib.base_config()
  config.mesh.ici_data_parallelism, config.mesh.ici_fsdp_parallelism = 2, 2
  config.mesh.ici_tensor_parallelism, config.mesh.rules = 2, preset
  mesh = parallel.make_mesh(config)
  shardings = optim.flat_paths(parallel.param_shardings(boxed_params, mesh, parallel.logical_rules(config)))
  shapes = optim.flat_paths(nn.meta.unbox(boxed_params))
  for path, specs in EXPECTED.items():
    ndim = len(shapes[path].shape)
    assert _normalise(shardings[path].spec, ndim) == _normalise(specs[preset], ndim), (path, shardings[path].spec)
  # No parameter is ever split over the data axis, and with data_parallel nothing is split at all.
  for path, sh in shardings.items():
    axes = [a for e in sh.spec if e for a in ((e,) if isinstance(e, str) else e)]
    assert "data" not in axes, path
    if preset == "data_parallel":
      assert not axes, path
    if len(shapes[path].shape) >= 4:  # conv kernels: never over tensor (XLA's CPU SPMD convs go wrong with it)
      assert "tensor" not in axes, path
  # A temporal layer is sharded exactly like its spatial twin (same logical axes, same rules).
  for leaf in ("attn1/to_q/kernel", "attn1/to_out_0/kernel", "ff/net_0/proj/kernel", "norm3/scale"):
    assert shardings[f"{TEMPORAL}/{leaf}"].spec == shardings[f"{SPATIAL}/{leaf}"].spec, leaf
