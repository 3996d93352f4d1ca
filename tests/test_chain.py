"""The default run: ``configs/rds.py:runlocal`` trains the whole chain (autoencoder -> image -> base -> predictor ->
interpolator -> decoder -> upsampler_image -> upsampler), each stage in its own subfolder and initialised from the previous ones, writes sample videos;
rerunning skips finished stages; the sample CLI writes a readable mp4, a gif and a contact sheet from the workdir,
one stage's clips or the long-video pipeline. Tiny budgets (a few steps per
stage, XLA -O0): this checks the plumbing, not the quality."""

import functools
import json
import os
import subprocess
import sys

import av
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from configs import rds
from videoldm_jax import config_lib, parallel, sample, sampling, tasks, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = {"autoencoder": 2, "image": 3, "base": 2, "predictor": 2, "interpolator": 2, "decoder": 2,
         "upsampler_image": 2, "upsampler": 2}
BASE_FRAMES = 3
INTERP_FRAMES = 5  # 2 key frames per interpolator window


def _overrides():
  """The tiny budget, as command-line flags (the rerun goes through the real command)."""
  flags = ["--config.sample_videos=2", "--config.sample_fvd_clips=0"]  # closing FVD: test_evaluation_training
  for name, steps in STEPS.items():
    p = f"--config.stages.{name}."
    flags += [f"{p}total_steps={steps}", f"{p}eval_every_steps=0", f"{p}sample_every_steps=0",
              f"{p}checkpoint_every_steps=0", f"{p}cpu_fast_compile=True"]
    if name not in ("autoencoder", "decoder"):  # DDIM steps: a setting of the diffusion stages only
      flags.append(f"{p}sampling.num_steps=2")
  flags += ["--config.stages.autoencoder.autoencoder.disc_weight=0.0",
            "--config.stages.decoder.data.num_frames=3", "--config.stages.decoder.decoder.decode_window=8",
            "--config.stages.upsampler.data.num_frames=3",
            f"--config.stages.base.data.num_frames={BASE_FRAMES}",
            f"--config.stages.predictor.data.num_frames={BASE_FRAMES}",
            f"--config.stages.interpolator.data.num_frames={INTERP_FRAMES}"]
  return flags


def _tiny_chain_config():
  config = rds.get_config("runlocal")
  for flag in _overrides():
    key, value = flag[len("--config."):].split("=")
    *path, leaf = key.split(".")
    node = config
    for p in path:
      node = node[p]
    node[leaf] = type(node[leaf])(value == "True" if isinstance(node[leaf], bool) else value)
  return config


@pytest.fixture(scope="module", autouse=True)
def one_device():
  """Runs on one of the 8 test devices: the mesh is not what is tested here (test_train_ldm is), and on 8 fake
  devices every compile and checkpoint of these tiny models costs several times more."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(parallel, "make_mesh", functools.partial(parallel.make_mesh, devices=jax.devices()[:1]))
    yield


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  """The tiny chain. Its closing call of the sampler is recorded instead of run: the sample CLI test below runs it
  (writing the same WORKDIR/sample.* files), and each sampler compile costs ~20 s here."""
  workdir = tmp_path_factory.mktemp("chain") / "rds"
  calls, frozen = [], {}
  train_stage = train.train_and_evaluate

  def train_and_keep_frozen(config, stage_dir, *args):  # the chain drops a finished stage's params from memory
    res = train_stage(config, stage_dir, *args)
    frozen[config.stage] = res.frozen
    return res

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(sampling, "sample_workdir", lambda *a, **kw: calls.append((a, kw)) or {})
    mp.setattr(train, "train_and_evaluate", train_and_keep_frozen)
    results = train.train_chain(_tiny_chain_config(), str(workdir))
  assert calls == [((str(workdir),), dict(num_samples=2, batch_size=2, keep_videos=False, fvd_clips=0))]
  for name, params in frozen.items():
    results[name].frozen = params
  return workdir, results


def _state(stage_dir):
  """The saved train state of a stage's last checkpoint, read with orbax directly (not via our loaders)."""
  steps = sorted(int(p) for p in os.listdir(stage_dir / "checkpoints") if p.isdigit())
  return steps[-1], ocp.PyTreeCheckpointer().restore(str(stage_dir / "checkpoints" / str(steps[-1]) / "state"))


def test_default_config_is_the_chain():
  config = rds.get_config("runlocal")
  assert config_lib.is_chain(config) and tuple(config.chain) == rds.CHAIN == ("autoencoder", "image", "base",
                                                                          "predictor", "interpolator", "decoder",
                                                                          "upsampler_image", "upsampler")
  tasks.validate(config)
  assert all(config.stages[s].stage == s and config.stages[s].runlocal for s in config.chain)
  config.chain = ("image", "superres")
  with pytest.raises(ValueError, match="'superres'"):
    tasks.validate(config)
  assert tuple(config.sample_skip) == ("upsampler",)  # hours of CPU at the closing videos' length
  config.chain, config.sample_skip = rds.CHAIN, ("superres",)
  with pytest.raises(ValueError, match="config.sample_skip: no stage 'superres'"):
    tasks.validate(config)
  config.sample_skip = ()
  config.chain = ("decoder", "autoencoder")  # init_from names a stage that comes later
  with pytest.raises(ValueError, match="config.init_from.decoder='autoencoder'"):
    tasks.validate(config)


def test_chain_trains_every_stage_from_the_previous(chain):
  workdir, results = chain
  assert list(results) == list(rds.CHAIN)
  for name, steps in STEPS.items():
    assert results[name] is not None and results[name].step == steps
    assert _state(workdir / name)[0] == steps
  # Each stage names the previous stage's workdir as its source; nothing was initialised at random and saved.
  assert not (workdir / "autoencoder" / "model_init.json").exists()
  assert not (workdir / "upsampler_image" / "model_init.json").exists()  # init_from "": from scratch
  for name, prev in (("image", "autoencoder"), ("base", "image"), ("predictor", "base"),
                     ("interpolator", "predictor"), ("decoder", "autoencoder"), ("upsampler", "upsampler_image")):
    assert (workdir / name / "model_init.json").read_text().count(str(workdir / prev)) == 1
    assert not (workdir / name / "frozen").exists()
  # The latent scale every diffusion stage used is the one the autoencoder run measured (1 / z_std).
  scale = json.loads((workdir / "autoencoder" / "info.json").read_text())["vae_scaling_factor"]
  assert 0.1 < scale < 100
  for name in ("image", "base", "predictor", "interpolator", "decoder"):
    stage_config = json.loads((workdir / name / "config.json").read_text())
    assert stage_config["model"]["vae_overrides"]["scaling_factor"] == pytest.approx(scale, rel=1e-6), name

  # The frozen params the last stage trained with (the chain keeps only its state in memory) are bit for bit the
  # EMA weights the earlier stages saved: the spatial U-Net and label tokens from the image stage, the VAE from the
  # autoencoder stage.
  frozen = results["interpolator"].frozen
  image_ema = _state(workdir / "image")[1]["ema_params"]
  ae_ema = _state(workdir / "autoencoder")[1]["ema_params"]
  pairs = [(frozen["unet"]["conv_in"]["kernel"], image_ema["unet"]["conv_in"]["kernel"]),
           (frozen["label_encoder"]["day_night"]["embedding"], image_ema["label_encoder"]["day_night"]["embedding"]),
           (frozen["vae"]["decoder"]["conv_out"]["kernel"], ae_ema["vae"]["decoder"]["conv_out"]["kernel"])]
  for ours, saved in pairs:
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(saved))
  # ... the EMA weights specifically (the image stage trained, so they differ from its raw params).
  raw = _state(workdir / "image")[1]["params"]["unet"]["conv_in"]["kernel"]
  assert not np.array_equal(np.asarray(raw), np.asarray(image_ema["unet"]["conv_in"]["kernel"]))
  assert set(_state(workdir / "base")[1]["params"]) == {"unet"}  # only temporal layers train in base
  # The predictor started from the base stage's temporal layers (EMA) plus fresh temporal_cond params.
  pred = _state(workdir / "predictor")[1]
  base_ema = _state(workdir / "base")[1]["ema_params"]
  assert "temporal_cond" in pred["params"]["unet"] and "temporal_cond" not in base_ema["unet"]


def _decode(path):
  with av.open(str(path)) as f:
    return np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)])


def test_sample_cli_writes_mp4_gif_and_contact_sheet(chain, capsys):
  workdir, _ = chain
  # Default output: WORKDIR/sample.{mp4,gif,png}, where the chain itself writes its videos.
  assert sample.main([f"--workdir={workdir}", "--stage=base", "--num_samples=3", "--batch_size=2", "--num_frames=5", "--seed=3",
                      "--steps=2", "--guidance=2.5", "--labels=day_night=1,crowdedness=2", "--upscale=2"]) == 0
  out = str(workdir / "sample")
  assert out + ".mp4" in capsys.readouterr().out
  # 3 videos of 5 frames, 32x64 px upscaled x2, tiled 2 per row with 2 px gaps.
  h, w, gap = 64, 128, 2
  frames = _decode(out + ".mp4")
  assert frames.shape == (5, 2 * h + gap, 2 * w + gap, 3)
  assert frames.std() > 1.0  # a picture, not a blank frame
  gif = Image.open(out + ".gif")
  assert gif.n_frames == 5 and gif.size == (2 * w + gap, 2 * h + gap)
  sheet = np.asarray(Image.open(out + ".png"))
  assert sheet.shape == (3 * h + 2 * gap, 5 * w + 4 * gap, 3)  # a row per video, a column per frame

  # The long-video pipeline: 2 key-frame windows (3 + 1 frames), interpolated x4 twice: 16 * 3 + 1 frames, decoded
  # by the video decoder and upsampled 4x.
  assert sample.main([f"--pipeline={workdir}", "--num_samples=1", "--num_windows=2", "--steps=1",
                      f"--output={workdir}/long", "--upscale=1"]) == 0
  assert "49 frames at 30 fps from 4 key frames" in capsys.readouterr().out
  long = _decode(str(workdir / "long.mp4"))
  assert long.shape == (49, 128, 256, 3)
  with av.open(str(workdir / "long.mp4")) as f:
    assert float(f.streams.video[0].average_rate) == 30.0

  with pytest.raises(SystemExit):  # a stage the chain does not have is named
    sample.main([f"--workdir={workdir}", "--stage=superres"])
  assert "'superres'" in capsys.readouterr().err


def test_rerun_skips_finished_stages(chain):
  """The README command again: every stage is finished and the videos exist, so nothing is trained or written."""
  workdir, _ = chain
  stamps = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "videoldm_jax.train", "--config=configs/rds.py:runlocal", f"--workdir={workdir}"]
  proc = subprocess.run(cmd + _overrides(), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in STEPS:
    assert f"Chain: stage '{name}' already finished" in proc.stderr, proc.stderr[-3000:]
  assert "Compiled train step" not in proc.stderr
  changed = [str(p) for p, t in stamps.items() if p.exists() and p.stat().st_mtime_ns != t and p.name != "config.json"]
  assert not changed, changed
