"""One JAX process of ``test_multiprocess.py``: trains the runlocal ``base`` stage, then checks its checkpoint.

Started through ``videoldm_jax.local_cluster`` (which sets the coordinator / process-id environment), as
``python tests/multiprocess_worker.py WORKDIR RESULT_JSON STEPS``. The same config and input stream are used by the
single-process reference in the test, so both runs see identical global batches.
"""

from __future__ import annotations

import functools
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from configs import rds  # noqa: E402
from videoldm_jax import parallel  # noqa: E402
from videoldm_jax.data import pipeline as data_pipeline  # noqa: E402
from videoldm_jax.tasks import latent_diffusion  # noqa: E402


def make_config(steps: int):
  """runlocal ``base`` with one mesh description for both layouts: 1 process x 8 devices gives
  (data=2 over ICI, fsdp=4); 2 processes x 4 devices give (data=2 over DCN = across processes, fsdp=4 inside)."""
  c = rds.get_config("stage=base,runlocal")
  c.total_steps = steps
  c.eval_every_steps = 0
  c.sample_every_steps = steps  # previews gather the process-sharded samples before writing them
  c.sampling.num_samples = 2
  c.sampling.num_steps = 1
  c.checkpoint_every_steps = steps
  c.log_every_steps = 1
  c.cpu_fast_compile = True  # compile-bound: a few steps only
  # The smallest clips the tiny models take (2 frames, 16x32 px -> 2x4 latents): XLA -O0 steps stay cheap.
  c.data.num_frames = 2
  c.data.height, c.data.width = 16, 32
  c.mesh.ici_data_parallelism = -1
  c.mesh.ici_fsdp_parallelism = 4
  c.mesh.dcn_data_parallelism = -1
  return c


def _process_independent_dataset(self, mesh, data_config):
  """Every process reads the same global batches and keeps its own rows, so the global batch does not depend on
  the number of processes (the real pipeline shards records by process, which is right for training but makes
  runs with different process counts see different data)."""
  n, pid = jax.process_count(), jax.process_index()
  local = self.config.batch_size // n
  ds = data_pipeline.make_dataset(data_config, self.config.batch_size, process_index=0, process_count=1,
                                  tokenize_fn=self.tokenize)
  keep = set(self.abstract_batch(1))  # the fields the task declares

  def rows(batch):
    return {k: jax.tree.map(lambda v: np.asarray(v)[pid * local:(pid + 1) * local], batch[k])
            for k in keep if k in batch}

  return ds.map(rows).map(functools.partial(data_pipeline.make_global_batch, mesh=mesh,
                                            partition_spec=P(parallel.BATCH_AXES)))


def use_process_independent_data() -> None:
  latent_diffusion.LatentDiffusionTask._dataset = _process_independent_dataset  # pylint: disable=protected-access


def main(workdir: str, result_path: str, steps: int) -> None:
  jax.config.update("jax_default_matmul_precision", "highest")
  from videoldm_jax import checkpoint, train  # pylint: disable=g-import-not-at-top

  config = make_config(steps)
  parallel.initialize_distributed(config)
  use_process_independent_data()
  res = train.train_and_evaluate(config, workdir)

  # The checkpoint this cluster wrote restores here, shard by shard equal to the in-memory state.
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), res.state)
  restored = ckpt.restore(abstract)
  ckpt.close()
  same = all(np.array_equal(np.asarray(a.data), np.asarray(b.data))
             for x, y in zip(jax.tree.leaves(res.state), jax.tree.leaves(restored))
             for a, b in zip(x.addressable_shards, y.addressable_shards))
  result = {
      "process_index": jax.process_index(), "process_count": jax.process_count(),
      "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
      "step": res.step, "losses": [h["loss"] for h in res.history], "restored_equal": bool(same),
      "mesh": {k: int(v) for k, v in parallel.make_mesh(config).shape.items()},
  }
  with open(result_path.format(process=jax.process_index()), "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
