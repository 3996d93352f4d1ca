r"""Full-size runs on Cloud TPU: the paper's stages at full resolution, bf16 compute, pre-encoded latents, and the
per-device batch / mesh / remat that ``videoldm_jax.plan`` found to fit each chip generation.

Runs (``run=``), each a stage of ``configs/webvid.py`` or ``configs/rds.py`` at full size:

* ``t2v_sd15``: text-to-video key-frame model on SD 1.5: 8 key frames at 320x512 (40x64x4 latents), eps.
* ``t2v_sd21``: the same on SD 2.1 (OpenCLIP ViT-H, v-prediction).
* ``rds_image``: the driving image LDM at 128x256 (16x32x4 latents), label conditioning.
* ``rds_base``: its key-frame video stage (8 frames at 1.875 fps); global batch 640 as the paper's 16 x 40.
* ``rds_predictor`` / ``rds_interpolator``: its prediction (0-2 context frames) and interpolation (13-frame
  windows, 4 key frames) stages.

bf16 compute, frozen backbone stored in bf16. ``chip=`` (v5p | v6e | v5e | v4; default v5p) picks the
per-device batch, mesh preset and remat policy planned for that generation; ``batch_size`` stays the pipeline's
global batch, so the slice must give ``batch_size / per_device_batch`` data-parallel devices (``t2v_sd15`` on v5p:
32 / 8 = 4 chips, a v5p-8).

  # check the plan on your machine first (compile-only TPU devices, see README "Training on Cloud TPU"):
  python -m videoldm_jax.plan --config=configs/tpu.py:run=t2v_sd15,chip=v5p --topology=v5p-8 --per_device_batch=8
  # train on a TPU VM slice (every worker runs this; see launch/tpu_vm.sh and launch/xpk_example.sh):
  python -m videoldm_jax.train --config=configs/tpu.py:run=t2v_sd15,chip=v5p --workdir=gs://bucket/runs/t2v_sd15 \
      --config.model_init=gs://bucket/ckpt/sd15 --config.data.data_dir=gs://bucket/latents/webvid
"""

from configs import rds, webvid
from videoldm_jax import config_lib
from videoldm_jax import parallel

# run -> (pipeline module, its config argument)
RUNS = {
    "t2v_sd15": (webvid, "stage=base,variant=sd15"),
    "t2v_sd21": (webvid, "stage=base,variant=sd21"),
    "rds_image": (rds, "stage=image"),
    "rds_base": (rds, "stage=base"),
    "rds_predictor": (rds, "stage=predictor"),
    "rds_interpolator": (rds, "stage=interpolator"),
}

# (run, chip) -> per-device batch, mesh preset (parallel.PRESETS: "dp" replicates the parameters, "fsdp" shards
# parameters and optimizer state over the slice), U-Net remat policy ("none" | "dots" | "full") and attention
# implementation (absent: XLA's), as ``python -m videoldm_jax.plan`` reported them (benchmarks/plan_table.py;
# README "Training on Cloud TPU").
# measured=False: not compiled yet, carried over from the closest measured entry (same U-Net / same chip).
PLANS = {
    # splash: the self-attention of levels 0 and 1 (2560 and 640 tokens) through the Pallas kernel on TPU.
    ("t2v_sd15", "v5p"): dict(per_device_batch=8, mesh="dp", remat="none", attention="splash",
                              measured=True),                                                   # 79.3 / 95.7 GiB
    ("t2v_sd15", "v6e"): dict(per_device_batch=4, mesh="fsdp", remat="none", attention="splash",
                              measured=True),                                                   # 28.96 / 31.25 GiB
    ("t2v_sd21", "v5p"): dict(per_device_batch=8, mesh="dp", remat="none", attention="splash",
                              measured=True),                                                   # 78.1 / 95.7 GiB
    ("t2v_sd21", "v6e"): dict(per_device_batch=4, mesh="fsdp", remat="none", attention="splash",
                              measured=True),                                                   # 29.4 / 31.25 GiB
    ("rds_image", "v5p"): dict(per_device_batch=64, mesh="dp", remat="none", measured=True),   # 3.5 / 95.7 GiB
    ("rds_image", "v6e"): dict(per_device_batch=32, mesh="dp", remat="none", measured=True),   # 2.9 / 31.25 GiB
    ("rds_base", "v5p"): dict(per_device_batch=16, mesh="dp", remat="none", measured=True),    # 7.5 / 95.7 GiB
    ("rds_base", "v6e"): dict(per_device_batch=8, mesh="fsdp", remat="none", measured=True),   # 3.6 / 31.25 GiB
    ("rds_predictor", "v5p"): dict(per_device_batch=16, mesh="dp", remat="none", measured=True),  # 7.1 / 95.7 GiB
    ("rds_predictor", "v6e"): dict(per_device_batch=8, mesh="fsdp", remat="none", measured=True),  # 3.7 / 31.25 GiB
    ("rds_interpolator", "v5p"): dict(per_device_batch=8, mesh="dp", remat="none", measured=True),  # 6.4 / 95.7 GiB
    ("rds_interpolator", "v6e"): dict(per_device_batch=4, mesh="fsdp", remat="none", measured=True),  # 3.1 / 31.25 GiB
}
# Chips planned like another: v4 has the HBM of v6e; v5e has half of it (the same plan with full remat).
SIMILAR = {"v4": "v6e", "v5e": "v6e"}


def get_config(arg=None):
  a = config_lib.parse_arg(arg, run="t2v_sd15", chip="v5p")
  if a.run not in RUNS:
    raise ValueError(f"configs/tpu.py: run={a.run!r} unknown; runs: {sorted(RUNS)}")
  chip = SIMILAR.get(a.chip, a.chip)
  if (a.run, chip) not in PLANS:
    raise ValueError(f"configs/tpu.py: chip={a.chip!r} unknown; chips: v5p, v6e, v5e, v4")
  module, run_arg = RUNS[a.run]
  c = module.get_config(run_arg)
  p = dict(PLANS[(a.run, chip)])
  if a.chip == "v5e":
    p["remat"] = "full"  # 16 GB per chip
  c.dtype = "bfloat16"         # bf16 compute; trainable params, gradients and optimizer state stay fp32
  c.frozen_dtype = "bfloat16"  # the frozen backbone (SD U-Net, VAE, text encoder) stored in bf16
  c.data.source = "latents"    # data_pipelines/encode_latents.py output in --config.data.data_dir
  attention = {"attention_implementation": p["attention"]} if p.get("attention") else {}
  c.model.unet_overrides = dict(c.model.unet_overrides, remat=p["remat"], **attention)
  parallel.apply_preset(c, p["mesh"])
  return c
