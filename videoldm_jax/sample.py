r"""Sampling from trained workdirs and converted checkpoints.

Videos from a training workdir (a chain such as ``configs/rds.py:runlocal``, or a single stage's workdir): loads
the stage's params (EMA when saved, frozen parts from where the run took them), runs the stage's own ``sample_fn``
(DDIM + classifier-free guidance on its conditioning: labels for RDS, captions for text) and decodes with the VAE::

  python -m videoldm_jax.sample --workdir=/tmp/videoldm_rds --num_samples=8 --guidance=2 --steps=25 --seed=1
  python -m videoldm_jax.sample --workdir=/tmp/videoldm_rds --stage=image --labels=day_night=1,crowdedness=4

writes ``OUTPUT.mp4`` and ``OUTPUT.gif`` (the videos tiled in a grid) and ``OUTPUT.png`` (contact sheet: one row per
video, one column per frame); ``--output`` defaults to ``WORKDIR/sample``.

Key-frame clips longer than the base stage trained on, "convolutionally in time" (paper App. B): temporal
attention over sliding windows of ``--temporal_window`` frames, positions relative to each window::

  python -m videoldm_jax.sample --workdir=/tmp/videoldm_rds --stage=base --num_frames=16 --temporal_window=8

Long videos with the whole pipeline (``--pipeline``: a chain's workdir, or a comma list of stage workdirs whose
stages are read from their config.json): key frames from ``base``, rolled out by ``predictor`` windows conditioned
on the last two generated frames (``--num_windows`` windows, or enough for ``--seconds`` of final video),
interpolated x4 twice by ``interpolator`` (regime 0: 1.875 -> 7.5 fps, regime 1: 7.5 -> 30 fps; ``--interpolations``
0-2), decoded and written at the final fps; each stage is optional (a missing predictor: one base window; a
missing interpolator: key frames only). ``--context_guidance`` sets the predictor's context-guidance scale. A
chain workdir with these stages samples this way by default (``--workdir``; ``--stage`` picks one stage)::

  python -m videoldm_jax.sample --pipeline=/tmp/videoldm_rds --seconds=30 --num_samples=2
  python -m videoldm_jax.sample --pipeline=/tmp/rds_base,/tmp/rds_pred,/tmp/rds_interp --num_windows=6

Image-to-video with Stable Video Diffusion (``--svd``: an ``svd`` training workdir or a converted SVD pipeline;
``videoldm_jax/image_to_video.py``): the image is resized to the model's frame size (same aspect ratio), ``--guidance``
is the last frame's guidance scale (rising from ``--min_guidance`` on the first)::

  python -m videoldm_jax.sample --svd=/ckpt/svd_xt --image=frame.png --num_frames=25 --steps=30 \
      --fps=7 --motion_bucket_id=127 --cond_aug=0.02 --output=/tmp/clip

Text-to-image with a converted Stable Diffusion (DDIM + classifier-free guidance)::

  python -m videoldm_jax.sample --checkpoint=/ckpt/sd15 --prompt="a red car on a mountain road" \
      --steps=50 --guidance=7.5 --height=512 --width=512 --seed=0 --output=/tmp/car.png
"""

from __future__ import annotations

from typing import Dict, Sequence

import jax
from absl import app, flags

from videoldm_jax import cli, sampling


def define_flags(fv: flags.FlagValues) -> None:
  """The command's flags, defined in ``fv`` (the global FLAGS when run as a program)."""
  flags.DEFINE_string("workdir", None, "Training workdir (a chain's or one stage's): write videos.", flag_values=fv)
  flags.DEFINE_string("checkpoint", None, "Output directory of videoldm_jax.convert: text-to-image.", flag_values=fv)
  flags.DEFINE_string("pipeline", None, "Long video: a chain workdir, or a comma list of pipeline stage workdirs "
                      "(key frames -> rollout -> interpolate x4 -> x4 -> decode).", flag_values=fv)
  flags.DEFINE_string("svd", None, "Image-to-video: an svd workdir or a converted SVD pipeline (with --image).",
                      flag_values=fv)
  flags.DEFINE_string("image", None, "SVD mode: the conditioning image (PNG/JPEG).", flag_values=fv)
  flags.DEFINE_float("min_guidance", None, "SVD mode: guidance scale of the first frame (default: the config's).",
                     flag_values=fv)
  flags.DEFINE_float("fps", None, "SVD mode: frame rate, conditioned on (fps - 1) and written.", flag_values=fv)
  flags.DEFINE_integer("motion_bucket_id", None, "SVD mode: motion condition, 0..255 (default 127).",
                       flag_values=fv)
  flags.DEFINE_float("cond_aug", None, "SVD mode: noise added to the image before encoding (default 0.02).",
                     flag_values=fv)
  flags.DEFINE_integer("decode_chunk_size", None, "SVD mode: frames decoded per temporal-decoder call (0: all).",
                       flag_values=fv)
  flags.DEFINE_string("decoder", None, "Pipeline / chain workdir mode: a decoder-stage workdir whose video decoder "
                      "decodes the final latents (replacing the chain's own or the image decoder).", flag_values=fv)
  flags.DEFINE_string("upsampler", None, "Pipeline / chain workdir mode: an upsampler-stage workdir, the last step "
                      "(4x the decoded video).", flag_values=fv)
  flags.DEFINE_string("stage", None, "Workdir mode: which stage of a chain (default: the last).", flag_values=fv)
  flags.DEFINE_integer("num_samples", 4, "Workdir / pipeline mode: number of videos (SVD mode: default 1).",
                       flag_values=fv)
  flags.DEFINE_integer("batch_size", 1, "Workdir mode: videos per sampler call.", flag_values=fv)
  flags.DEFINE_integer("num_frames", 0, "Workdir / SVD mode: clip length (0: as trained; SVD checkpoint: 14).",
                       flag_values=fv)
  flags.DEFINE_integer("temporal_window", None, "Workdir mode, stage base: clips longer than trained, convolutional "
                       "in time: temporal attention over windows of this many frames (2..trained length) with "
                       "window-relative positions (0: off; default: the config's sampling.temporal_window).",
                       flag_values=fv)
  flags.DEFINE_string("labels", "", "Workdir / pipeline mode: e.g. day_night=1,crowdedness=3 (RDS labels).",
                      flag_values=fv)
  flags.DEFINE_integer("upscale", 0, "Pixel repeat factor of the written videos (0: to >= 128 px).", flag_values=fv)
  flags.DEFINE_float("seconds", None, "Pipeline mode: length of the final video.", flag_values=fv)
  flags.DEFINE_integer("num_windows", None, "Pipeline mode: key-frame windows (the first + rollout windows; "
                       "default 4 unless --seconds).", flag_values=fv)
  flags.DEFINE_integer("interpolations", None, "Pipeline mode: x4 interpolation passes (0-2; default: one per "
                       "regime of the interpolator).", flag_values=fv)
  flags.DEFINE_float("context_guidance", None, "Predictor / interpolator context guidance scale s: f(no context) "
                     "+ s (f(context) - f(no context)) (default: the stage's config).", flag_values=fv)
  flags.DEFINE_multi_string("prompt", None, "Text (repeat for a batch in checkpoint mode).", flag_values=fv)
  flags.DEFINE_string("negative_prompt", "", "Checkpoint mode: negative prompt.", flag_values=fv)
  flags.DEFINE_integer("steps", None, "DDIM steps (checkpoint mode: 50; workdir: the config's).", flag_values=fv)
  flags.DEFINE_float("guidance", None, "CFG scale (checkpoint mode: 7.5; workdir: the config's).", flag_values=fv)
  flags.DEFINE_float("eta", 0.0, "Checkpoint mode: DDIM eta.", flag_values=fv)
  flags.DEFINE_integer("height", 512, "Checkpoint mode: image height.", flag_values=fv)
  flags.DEFINE_integer("width", 512, "Checkpoint mode: image width.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Random seed.", flag_values=fv)
  flags.DEFINE_string("output", None, "Checkpoint mode: PNG path (required); workdir / pipeline mode: path without "
                      "extension for .mp4/.gif/.png (default WORKDIR/sample).", flag_values=fv)


def parse_labels(text: str) -> Dict[str, int]:
  """``"day_night=1,crowdedness=3"`` -> ``{"day_night": 1, "crowdedness": 3}``."""
  out = {}
  for item in filter(None, (t.strip() for t in (text or "").split(","))):
    key, eq, value = item.partition("=")
    if not eq:
      raise ValueError(f"--labels item {item!r}: expected name=int")
    out[key] = int(value)
  return out


def _print_paths(out) -> None:
  for kind in ("mp4", "gif", "png"):
    if kind in out:
      print(f"wrote {out[kind]}")


def run(fv: flags.FlagValues) -> int:
  """Runs the command with parsed flags; bad input raises ``app.UsageError`` naming the flag."""
  modes = [m for m in ("workdir", "checkpoint", "pipeline", "svd") if fv[m].value]
  if len(modes) != 1:
    raise app.UsageError(f"give exactly one of --workdir, --checkpoint, --pipeline, --svd (got {modes or 'none'})")
  if bool(fv.image) != bool(fv.svd):
    raise app.UsageError("--image goes with --svd (image-to-video), and --svd needs --image")
  if fv.temporal_window is not None and not fv.workdir:
    raise app.UsageError("--temporal_window goes with --workdir (the key-frame stage's clips)")
  prompts = list(fv.prompt or [])
  try:
    if fv.svd:
      from videoldm_jax import image_to_video  # pylint: disable=g-import-not-at-top
      out = image_to_video.sample_svd(
          fv.svd, fv.image, num_frames=fv.num_frames, height=fv.height if fv["height"].present else None,
          width=fv.width if fv["width"].present else None, steps=fv.steps, min_guidance=fv.min_guidance,
          max_guidance=fv.guidance, fps=fv.fps, motion_bucket_id=fv.motion_bucket_id, cond_aug=fv.cond_aug,
          decode_chunk_size=fv.decode_chunk_size, num_samples=fv.num_samples if fv["num_samples"].present else 1,
          seed=fv.seed, output=fv.output,
          upscale=fv.upscale)
      print(f"{out['videos'].shape[0]} clips of {out['videos'].shape[1]} frames at {out['fps']:g} fps")
      _print_paths(out)
      return 0
    if fv.pipeline:
      out = sampling.sample_pipeline(
          fv.pipeline, num_samples=fv.num_samples, seconds=fv.seconds, num_windows=fv.num_windows,
          interpolations=fv.interpolations, guidance=fv.guidance, context_guidance=fv.context_guidance,
          steps=fv.steps, seed=fv.seed, labels=parse_labels(fv.labels), prompt=prompts[0] if prompts else None,
          output=fv.output, upscale=fv.upscale, decoder=fv.decoder, upsampler=fv.upsampler, keep_videos=False)
      print(f"{out['num_frames']} frames at {out['fps']:g} fps from {out['num_key_frames']} key frames")
      _print_paths(out)
      return 0
    if fv.workdir:
      if len(prompts) > 1:
        raise ValueError("--prompt: one prompt in workdir mode (it conditions every video)")
      out = sampling.sample_workdir(
          fv.workdir, stage=fv.stage, num_samples=fv.num_samples, batch_size=fv.batch_size, guidance=fv.guidance,
          steps=fv.steps, seed=fv.seed, labels=parse_labels(fv.labels), prompt=prompts[0] if prompts else None,
          num_frames=fv.num_frames, output=fv.output, upscale=fv.upscale, decoder=fv.decoder,
          upsampler=fv.upsampler, temporal_window=fv.temporal_window, keep_videos=False)
      _print_paths(out)
      return 0
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None

  if not prompts:
    raise app.UsageError("--prompt is required with --checkpoint")
  if not fv.output:
    raise app.UsageError("--output is required with --checkpoint")
  from videoldm_jax import text_to_image  # pylint: disable=g-import-not-at-top  (pulls in the converter's readers)
  from videoldm_jax.convert import load_converted  # pylint: disable=g-import-not-at-top
  converted = load_converted(fv.checkpoint)
  missing = {"unet", "vae", "text_encoder"} - set(converted.configs)
  if missing:
    raise app.UsageError(f"--checkpoint {fv.checkpoint} lacks {sorted(missing)}; text-to-image needs a full "
                         "pipeline")
  latents = text_to_image.text_to_image_latents(
      converted, prompts, negative_prompts=[fv.negative_prompt] * len(prompts),
      steps=50 if fv.steps is None else fv.steps, guidance_scale=7.5 if fv.guidance is None else fv.guidance,
      eta=fv.eta, height=fv.height, width=fv.width, rng=jax.random.PRNGKey(fv.seed))
  text_to_image.save_image_grid(text_to_image.decode_latents(converted, latents), fv.output)
  print(f"wrote {fv.output}")
  return 0


def main(argv: Sequence[str]) -> int:
  """The command with ``argv`` (its flags, as on the command line)."""
  return cli.main("videoldm_jax.sample", define_flags, run, argv)


if __name__ == "__main__":
  cli.run_program(define_flags, run)
