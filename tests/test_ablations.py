"""``benchmarks/ablations.py --tiny`` end to end (every row, one seed, a few steps and clips: the plumbing, not the
results): the table's JSON has every field, its self-checks (shared initialisation and data order) hold, the FVD
of a set against itself is ~0, and the digests behind the checks do tell different inputs apart."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import ablations  # noqa: E402
import stage_runs  # noqa: E402

VARIANTS = {1: {"image", "video"}, 2: {"attention", "conv_attention"}, 3: {"end_to_end", "image_pretrained"},
            4: {"s=1", "s=2"}, 5: {"image", "image_ft", "video"}, 6: {"bilinear", "image", "video"}}
# Variants whose init / data are digested in each row (the untrained ones have no data order).
COMPARED = {1: (2, 2), 2: (2, 2), 3: (2, 2), 4: (2, 2), 5: (3, 2), 6: (2, 2)}


@pytest.fixture(scope="module")
def tiny_table(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ablations")
  env = dict(os.environ)  # one CPU device: the mesh is not what is tested here
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
  out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "ablations.py"), "--tiny", "--seeds=0",
                        f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
  assert out.returncode == 0, out.stderr[-4000:]
  with open(workdir / "ablations.json") as f:
    return workdir, json.load(f), out.stdout


def test_tiny_table_has_every_field(tiny_table):
  workdir, table, stdout = tiny_table
  assert table["seeds"] == [0] and table["clips"] == ablations.TINY.clips
  assert table["fid"].startswith("null: no --fid_weights")
  assert [r["row"] for r in table["rows"]] == [1, 2, 3, 4, 5, 6]
  for r in table["rows"]:
    row = r["row"]
    assert r["name"] == ablations.ROWS[row][0] and r["paper"] == ablations.ROWS[row][1]
    assert set(r["variants"]) == VARIANTS[row]
    assert np.isfinite(r["noise_floor_fvd"]) and r["noise_floor_fvd"] > 0
    assert r["noise_floor_fid"] is None
    # The reference scored against a second extraction of itself (matrix square root error only).
    assert abs(r["reference_self_fvd"]) <= 1e-3 * r["noise_floor_fvd"], r["reference_self_fvd"]
    assert r["direction_holds_in_seeds"] in (0, 1) and " < " in r["paper_direction"]
    for name, v in r["variants"].items():
      s = v["seeds"]["0"]
      assert np.isfinite(s["fvd"]) and s["fvd"] >= 0, (row, name)
      assert v["fvd"] == {"mean": s["fvd"], "std": 0.0} and v["fid"] is None
      for key in ("workdir", "steps", "trainable", "init_digest", "data_digest"):
        assert key in s, (row, name, key)
      if s["workdir"]:
        assert os.path.isdir(s["workdir"]) and s["workdir"].startswith(str(workdir))
    for key in ("psnr", "flicker") if row in (5, 6) else ():
      assert all(np.isfinite(v["seeds"]["0"][key]) for v in r["variants"].values())
    # Shared initialisation and data order, checked from digests of what each run loads and reads.
    check = r["checks"]["0"]
    assert check["same_init"] and check["same_data"], (row, check)
    assert (check["init_compared"], check["data_compared"]) == COMPARED[row], (row, check)
  rows = {r["row"]: r for r in table["rows"]}
  # The same run is the video arm of rows 1-3: one sample, one score (its init digest is over each row's shared
  # params: row 3 shares only the VAE).
  same = [{k: rows[r]["variants"][v]["seeds"]["0"][k] for k in ("fvd", "workdir", "steps", "data_digest")}
          for r, v in ((1, "video"), (2, "conv_attention"), (3, "image_pretrained"))]
  assert same[0] == same[1] == same[2]
  assert rows[3]["variants"]["end_to_end"]["seeds"]["0"]["steps"] == (ablations.TINY.image_pretrain
                                                                      + ablations.TINY.temporal)
  assert rows[5]["variants"]["video"]["seeds"]["0"]["fvd_posterior_mode"] >= 0
  md = ablations.markdown(table)
  assert md.count("\n") == 1 + sum(len(v) for v in VARIANTS.values())
  assert "ablations.json" in stdout


def test_digests_tell_inputs_apart(tiny_table):
  """What the row checks rest on: the data digest of the image and video arms' configs agree, and changes with
  the data seed; the init digest changes with the source."""
  workdir, table, _ = tiny_table
  runs = ablations.Runs(str(workdir), ablations.TINY)
  pre = str(workdir / "s0" / "image_pretrain")
  image = runs._key("image", 2, 0, model_init=pre)  # pylint: disable=protected-access
  video = runs._key("base", 2, 0, model_init=pre)  # pylint: disable=protected-access
  assert stage_runs.first_batches_digest(image) == stage_runs.first_batches_digest(video)
  video.data.seed = 1
  assert stage_runs.first_batches_digest(image) != stage_runs.first_batches_digest(video)
  recorded = {r["row"]: r for r in table["rows"]}[1]["variants"]["video"]["seeds"]["0"]["init_digest"]
  pattern = r"(unet|label_encoder|vae)/.*"
  assert ablations.init_digest(video, pre, pattern) == recorded
  trained = str(workdir / "s0" / "key_image")  # two steps past the pre-trained weights
  assert ablations.init_digest(video, trained, pattern) != recorded


def test_budget_overrides_and_a_root_keeps_its_budget(tmp_path):
  b = ablations.parse_budget(ablations.FULL, ["temporal=600", "fast_compile=true"])
  assert b.temporal == 600 and b.fast_compile and b.clips == ablations.FULL.clips
  with pytest.raises(ValueError, match="tempral=6"):
    ablations.parse_budget(ablations.FULL, ["tempral=6"])
  ablations.check_budget(str(tmp_path), b)
  ablations.check_budget(str(tmp_path), b)  # the same budget: its runs are reused
  used = r"fast_compile=True, temporal=600; asked fast_compile=False, temporal=150\): use another --workdir"
  with pytest.raises(ValueError, match=used):
    ablations.check_budget(str(tmp_path), ablations.FULL)
