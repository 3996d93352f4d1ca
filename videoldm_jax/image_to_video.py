r"""Image-to-video sampling with Stable Video Diffusion: an ``svd`` training workdir or a converted SVD pipeline.

  python -m videoldm_jax.sample --svd=/ckpt/svd_xt --image=first_frame.png --num_frames=25 --output=/tmp/clip

The image is resized (Lanczos, as the diffusers pipeline's default) to the model's frame size: the workdir's
trained ``config.data`` size, 576x1024 for a converted checkpoint, or ``height`` / ``width``; an image whose aspect
ratio differs by more than 1% is refused rather than distorted. Sampling is the stage's own
(``tasks/svd.py``: Euler EDM, guidance rising over the frames, temporal decoder in chunks).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from videoldm_jax import checkpoint, config_lib, parallel, tasks, video_io, workdirs

DEFAULT_SIZE = (576, 1024)  # SVD's training and default sampling size
DEFAULT_FRAMES = 14
MAX_FRAMES_FACTOR = 4  # clips longer than this many trained lengths are refused (far outside the trained range)


def _plain(value):
  """Dataclass fields -> ConfigDict-friendly values (nested dataclasses as dicts, tuples kept)."""
  if dataclasses.is_dataclass(value):
    return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
  return value


def converted_run_config(path: str) -> Tuple[ml_collections.ConfigDict, int]:
  """The ``svd`` stage config of a converted SVD pipeline (``python -m videoldm_jax.convert``): the model exactly
  as converted (every field of its U-Net, VAE and image-encoder configs), its scheduler's σ range. Returns the config
  and the clip length to sample by default."""
  from videoldm_jax import convert  # pylint: disable=g-import-not-at-top  (the converter's readers)
  configs, meta = convert.load_converted_configs(path)
  missing = [c for c in ("unet", "vae", "image_encoder") if c not in configs]
  if missing:
    raise ValueError(f"--svd={path}: the converted checkpoint lacks {missing} (it holds {sorted(configs)}); convert "
                     "a whole stable-video-diffusion pipeline folder")
  unet = _plain(configs["unet"])
  if unet.get("temporal") is None:
    raise ValueError(f"--svd={path}: its unet is an image U-Net, not SVD's video U-Net")
  c = tasks.default_config("svd")
  c.model.update(unet="svd", vae="svd", text_encoder="", conditioning="image")
  temporal = unet.pop("temporal")
  c.model.unet_overrides = unet
  c.model.temporal = temporal
  c.model.vae_overrides = _plain(configs["vae"])
  c.svd.image_encoder = "openclip_vit_h14"
  c.svd.image_encoder_overrides = _plain(configs["image_encoder"])
  sched = meta.get("scheduler_config")
  if sched:
    from videoldm_jax.diffusion import edm  # pylint: disable=g-import-not-at-top
    sampler = edm.EulerEDMConfig.from_diffusers_scheduler_config(sched)
    c.edm.sigma_min, c.edm.sigma_max = sampler.sigma_min, sampler.sigma_max
  c.data.height, c.data.width = DEFAULT_SIZE
  c.data.num_frames = DEFAULT_FRAMES
  c.trainable = r"unet/.*temporal.*"
  c.model_init = os.path.abspath(path)
  return c, DEFAULT_FRAMES


def load(source: str, config: ml_collections.ConfigDict, mesh) -> Tuple[Any, Any, Any]:
  """``(task, trainable, frozen)`` of ``config`` with its params from ``source`` (a workdir or a converted
  checkpoint: every param must be there, nothing is initialised at random)."""
  if checkpoint.is_training_config(os.path.join(source, "config.json")):
    return workdirs.load_trained(source, config, mesh)
  return workdirs.load_params(source, config, mesh)


def run_config(source: str) -> Tuple[ml_collections.ConfigDict, int]:
  """``(config, default clip length)`` of an ``svd`` workdir or a converted SVD checkpoint."""
  config_path = os.path.join(source, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"--svd={source}: no config.json; neither an svd workdir nor a converted checkpoint")
  if checkpoint.is_training_config(config_path):
    config = workdirs.load_run_config(source)
    if config_lib.is_chain(config) or config.get("stage") != "svd":
      raise ValueError(f"--svd={source}: a {config.get('stage') or 'chain'!r} workdir, not an svd stage's")
    workdirs.check_trained(source)
    return config, int(config.data.num_frames)
  return converted_run_config(source)


def read_image(path: str, height: int, width: int) -> np.ndarray:
  """The conditioning image at ``path`` as ``[height, width, 3]`` float32 in [-1, 1] (Lanczos resize); refuses an
  unreadable file and an aspect ratio more than 1% away from ``width / height``."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as im:
      im = im.convert("RGB")
  except FileNotFoundError:
    raise FileNotFoundError(f"--image={path}: no such file") from None
  except (UnidentifiedImageError, OSError) as e:
    raise ValueError(f"--image={path}: not a readable image ({e})") from None
  w, h = im.size
  if abs((w / h) / (width / height) - 1.0) > 0.01:
    raise ValueError(f"--image={path}: {w}x{h} (aspect {w / h:.3f}) does not match the model's frame size "
                     f"{width}x{height} (aspect {width / height:.3f}); crop it first or pass --height/--width")
  if (w, h) != (width, height):
    im = im.resize((width, height), Image.LANCZOS)
  return np.asarray(im, np.float32) / 127.5 - 1.0


def sample_svd(source: str, image: str, *, num_frames: int = 0, height: Optional[int] = None,
               width: Optional[int] = None, steps: Optional[int] = None, min_guidance: Optional[float] = None,
               max_guidance: Optional[float] = None, fps: Optional[float] = None,
               motion_bucket_id: Optional[int] = None, cond_aug: Optional[float] = None,
               decode_chunk_size: Optional[int] = None, num_samples: int = 1, seed: int = 0,
               output: Optional[str] = None, upscale: int = 0) -> Dict[str, Any]:
  """``num_samples`` clips of ``num_frames`` frames (0: as trained, 14 for a converted checkpoint) from ``image``;
  writes OUTPUT.{mp4,gif,png} (default: next to the image). Settings left None keep the config's
  (``config.sampling``). Returns the paths and ``videos`` uint8 ``[n, t, h, w, 3]``."""
  config, default_frames = run_config(source)
  trained = int(config.data.num_frames)
  t = int(num_frames) or default_frames
  if t < 2:
    raise ValueError(f"--num_frames={num_frames}: a clip has at least 2 frames")
  if t > MAX_FRAMES_FACTOR * trained:
    raise ValueError(f"--num_frames={t}: more than {MAX_FRAMES_FACTOR}x the {trained} frames the model was trained "
                     "on")
  config.mesh = config_lib.mesh_defaults()
  config.data.height = int(height or config.data.height)
  config.data.width = int(width or config.data.width)
  sc = config.sampling
  for key, value in (("num_steps", steps), ("min_guidance_scale", min_guidance),
                     ("max_guidance_scale", max_guidance), ("fps", fps), ("motion_bucket_id", motion_bucket_id),
                     ("cond_aug", cond_aug), ("decode_chunk_size", decode_chunk_size)):
    if value is not None:
      sc[key] = type(sc[key])(value)
  tasks.get("svd").validate_config(config)  # frame size against the model's factor, named
  pixels = read_image(image, int(config.data.height), int(config.data.width))
  mesh = parallel.make_mesh(config)
  task, trainable, frozen = load(source, config, mesh)
  fn = task.image_to_video_fn(trainable, frozen)
  key = jax.random.PRNGKey(seed)
  videos = np.concatenate([np.asarray(fn(jnp.asarray(pixels)[None], jax.random.fold_in(key, i), t))
                           for i in range(int(num_samples))])
  paths = {}
  if jax.process_index() == 0:
    out = output or os.path.splitext(os.path.abspath(image))[0] + "_svd"
    paths = video_io.write_outputs(videos, out, float(sc.fps), upscale)
  return dict(paths, videos=videos, fps=float(sc.fps))
