"""2 JAX processes x 4 CPU devices (gloo collectives, localhost coordinator) train the runlocal ``base`` stage and end
where 1 process x 8 devices ends; the checkpoint is written once and restores in both layouts."""

import json
import os
import sys
import threading

import jax
import numpy as np
from PIL import Image

import multiprocess_worker
from videoldm_jax import checkpoint, local_cluster, train
from videoldm_jax.tasks import latent_diffusion

STEPS = 2


def test_two_processes_train_like_one(tmp_path, monkeypatch):
  mp_dir, sp_dir = tmp_path / "two_processes", tmp_path / "one_process"
  result_path = str(tmp_path / "result_{process}.json")
  worker = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [multiprocess_worker.ROOT,
                                                                   os.environ.get("PYTHONPATH")])))
  cluster = {}
  # The two-process run compiles in its own processes while this one trains the reference (CI has two cores).
  thread = threading.Thread(target=lambda: cluster.update(results=local_cluster.run(
      [sys.executable, worker, str(mp_dir), result_path, str(STEPS)], num_processes=2, devices_per_process=4,
      env=env, timeout=600)))
  thread.start()
  try:
    # The same data path as the workers, for this test only (later tests use the real pipeline).
    monkeypatch.setattr(latent_diffusion.LatentDiffusionTask, "_dataset",
                        multiprocess_worker._process_independent_dataset)  # pylint: disable=protected-access
    ref = train.train_and_evaluate(multiprocess_worker.make_config(STEPS), str(sp_dir))
  finally:
    thread.join()
  for r in cluster["results"]:
    assert r.returncode == 0, f"process {r.process_id} failed:\n{r.output[-4000:]}"

  results = [json.load(open(result_path.format(process=i))) for i in range(2)]
  for i, res in enumerate(results):
    assert (res["process_index"], res["process_count"], res["device_count"], res["local_device_count"]) == \
        (i, 2, 8, 4)
    assert res["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert res["step"] == STEPS and res["restored_equal"], res
  # Same losses, step by step (the reference runs the same global batches on the same mesh shape).
  np.testing.assert_allclose(results[0]["losses"], [h["loss"] for h in ref.history], rtol=1e-5)
  assert results[0]["losses"] == results[1]["losses"]

  # One checkpoint (one step directory, one state item; frozen params saved once) for the whole cluster.
  steps = sorted(p.name for p in (mp_dir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [str(STEPS)]
  assert (mp_dir / "checkpoints" / str(STEPS) / "state").is_dir()
  assert (mp_dir / "frozen").is_dir() and (mp_dir / "config.json").is_file()
  # Preview samples sharded over both processes were gathered and written once, like the one-process run's.
  preview = f"samples/step_{STEPS:07d}.png"
  assert np.asarray(Image.open(mp_dir / preview)).shape == np.asarray(Image.open(sp_dir / preview)).shape

  # ... which restores in this single-process 8-device layout and equals the single-process result.
  ckpt = checkpoint.Checkpointer(str(mp_dir / "checkpoints"), async_save=False)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), ref.state)
  restored = ckpt.restore(abstract)
  ckpt.close()
  assert int(restored.step) == int(ref.state.step) == STEPS
  flat_mp = jax.tree_util.tree_flatten_with_path(restored.params)[0]
  flat_ref = dict(jax.tree_util.tree_flatten_with_path(ref.state.params)[0])
  assert len(flat_mp) == len(flat_ref)
  for path, value in flat_mp:
    np.testing.assert_allclose(np.asarray(value), np.asarray(flat_ref[path]), rtol=1e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
  frozen_mp = checkpoint.restore_subset(str(mp_dir / "frozen"), {
      k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
      for k, v in checkpoint.optim.flat_paths(ref.frozen).items()})
  for k, v in checkpoint.optim.flat_paths(ref.frozen).items():
    np.testing.assert_array_equal(np.asarray(frozen_mp[k]), np.asarray(v), err_msg=k)
