"""Sampling from training workdirs: one stage's clips (its ``sample_fn``) or long videos through the pipeline
stages (``videoldm_jax/pipeline.py``). The command line is ``python -m videoldm_jax.sample``; the default run's
closing videos come from here too."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Iterable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from tqdm import tqdm

from videoldm_jax import aot, config_lib, parallel, pipeline, tasks, video_io, workdirs


def generate(task, trainable, frozen, batch, *, num_samples: int, batch_size: int = 1, seed: int = 0,
             progress: bool = True, mesh=None) -> np.ndarray:
  """``num_samples`` videos uint8 ``[n, t, h, w, 3]`` from ``task.sample_fn``, ``batch_size`` per call (one
  compile), conditioned on the first ``num_samples`` rows of the host ``batch``; video i uses noise from
  ``fold_in(PRNGKey(seed), i // batch_size)``. With ``mesh``, calls run under it and the config's logical-axis
  rules."""
  n, bs = int(num_samples), max(1, min(int(batch_size), int(num_samples)))
  task.config.sampling.num_samples = bs  # read by sample_fn when it is traced
  fn = jax.jit(task.sample_fn, compiler_options=aot.compiler_options(task.config))
  key = jax.random.PRNGKey(seed)
  out = []
  with _model_context(task.config, mesh), tqdm(total=n, unit="video", desc="sampling",
                                               disable=not progress or jax.process_index() != 0) as bar:
    for i in range(0, n, bs):
      idx = np.arange(i, i + bs) % n  # the last call is padded with earlier conditions and trimmed
      chunk = jax.tree.map(lambda x: x[idx], batch)
      videos = parallel.to_host(fn(trainable, frozen, chunk, jax.random.fold_in(key, i // bs)))
      out.append(videos[:min(bs, n - i)])
      bar.update(len(out[-1]))
  return np.concatenate(out)


@contextlib.contextmanager
def _model_context(config, mesh):
  """``jax.set_mesh(mesh)`` + the config's logical-axis rules, as the train step runs (nothing without a mesh)."""
  if mesh is None:
    yield
    return
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.logical_rules(config)):
    yield


def sampling_config(stage_dir: str, num_samples: int, *, guidance=None, steps=None, context_guidance=None):
  """A stage's run config set up to sample ``num_samples`` videos on this machine: a data-parallel mesh over the
  local devices (the training mesh may not fit here) and the requested sampler settings (those the stage has)."""
  config = workdirs.load_run_config(stage_dir)
  config.mesh = config_lib.mesh_defaults()
  for key, value in (("guidance_scale", guidance), ("num_steps", steps), ("context_guidance", context_guidance)):
    if value is not None and key in config.sampling:
      config.sampling[key] = type(config.sampling[key])(value)
  mesh = parallel.make_mesh(config)
  dp = parallel.data_parallel_size(mesh)
  config.batch_size = int(np.ceil(num_samples / dp)) * dp
  return config, mesh


def condition(task, batch, *, labels: Optional[Dict[str, int]] = None, prompt: Optional[str] = None):
  """``batch`` (host numpy) with its labels set to ``labels`` and / or its captions to ``prompt``."""
  for name, value in (labels or {}).items():
    if name not in batch.get("labels", {}):
      raise ValueError(f"--labels {name}={value}: stage {task.config.stage!r} has labels "
                       f"{sorted(batch.get('labels', {}))}")
    batch["labels"][name] = np.full_like(batch["labels"][name], value)
  if prompt is not None:
    if getattr(task, "tokenize", None) is None or "caption_ids" not in batch:
      raise ValueError(f"--prompt: stage {task.config.stage!r} is not text-conditioned")
    batch["caption_ids"] = np.broadcast_to(task.tokenize(prompt), batch["caption_ids"].shape).copy()
  return batch


def sample_workdir(workdir: str, *, stage: Optional[str] = None, num_samples: int = 4, batch_size: int = 1,
                   guidance: Optional[float] = None, steps: Optional[int] = None, seed: int = 0,
                   labels: Optional[Dict[str, int]] = None, prompt: Optional[str] = None,
                   num_frames: Optional[int] = None, output: Optional[str] = None, upscale: int = 0,
                   progress: bool = True, decoder: Optional[str] = None, upsampler: Optional[str] = None,
                   temporal_window: Optional[int] = None, keep_videos: bool = True,
                   fvd_clips: int = 0) -> Dict[str, Any]:
  """Samples ``num_samples`` videos of a trained stage and writes OUTPUT.{mp4,gif,png} (default WORKDIR/sample).

  A chain workdir with more than one pipeline stage samples long videos (``sample_pipeline``, at the chain's
  ``sample_seconds``) unless ``stage`` picks one stage. The conditioning comes from the stage's fixed evaluation
  batch (its data config, no dropout): for RDS the day/night and crowdedness labels of held-out synthetic scenes,
  overridden by ``labels``; for text stages their captions, overridden by ``prompt``. ``num_frames`` (video
  stages) samples clips of another length than the stage trained on (the temporal layers take any length).
  ``temporal_window`` (stage ``base``; None: its ``config.sampling.temporal_window``, 0 = off) samples such clips
  "convolutionally in time" (paper App. B): temporal attention over windows of this many frames (2 up to the trained
  clip length) with window-relative positions, so a clip 2x or 4x the trained length stays in the trained range.
  Returns the written paths, ``num_frames`` and (``keep_videos``) ``videos`` ``[n, t, h, w, 3]`` uint8;
  ``fvd_clips`` > 0: also ``fvd_clips``, that many 16-frame clips cut evenly from the videos
  (:func:`fvd_clip_starts`). ``decoder`` / ``upsampler``: see :func:`sample_pipeline` (pipeline mode only).
  """
  run = workdirs.load_run_config(workdir)
  if stage is None and config_lib.is_chain(run):
    in_pipeline = [s for s in run.chain if tasks.get(s).pipeline_order(s) is not None]
    if len(in_pipeline) > 1:
      if temporal_window is not None:
        raise ValueError(f"--temporal_window={temporal_window}: a setting of the key-frame stage's clips; add "
                         "--stage=base")
      return sample_pipeline(workdir, num_samples=num_samples, guidance=guidance, steps=steps, seed=seed,
                             labels=labels, prompt=prompt, output=output, upscale=upscale, progress=progress,
                             seconds=run.get("sample_seconds") or None, decoder=decoder, upsampler=upsampler,
                             skip=tuple(run.get("sample_skip") or ()), keep_videos=keep_videos,
                             fvd_clips=fvd_clips)
  for flag, value in (("decoder", decoder), ("upsampler", upsampler)):
    if value:
      raise ValueError(f"--{flag}={value}: pipeline stages are swapped in pipeline mode (a chain workdir or "
                       "--pipeline)")
  stage_dir = workdirs.resolve_stage(workdir, stage)
  config, mesh = sampling_config(stage_dir, num_samples, guidance=guidance, steps=steps)
  trained_frames = int(config.data.num_frames)
  if num_frames:
    if config.model.get("temporal") is None and int(num_frames) != int(config.data.num_frames):
      raise ValueError(f"--num_frames={num_frames}: stage {config.stage!r} is an image model (1 frame)")
    config.data.num_frames = int(num_frames)
  if temporal_window is not None or config.sampling.get("temporal_window"):
    window = config.sampling.temporal_window if temporal_window is None else temporal_window
    _set_temporal_window(config, int(window), trained_frames)
  task, trainable, frozen = workdirs.load_trained(stage_dir, config, mesh)
  batch = condition(task, parallel.to_host(task.fixed_batch(mesh)), labels=labels, prompt=prompt)
  videos = generate(task, trainable, frozen, batch, num_samples=num_samples, batch_size=batch_size, seed=seed,
                    progress=progress, mesh=mesh)
  out = write_stream([videos], videos.shape[1], float(config.sampling.fps), output or os.path.join(workdir, "sample"),
                     upscale=upscale, keep_videos=keep_videos, fvd_clips=fvd_clips)
  return dict(out, fps=float(config.sampling.fps), stage_dir=stage_dir)


FVD_CLIP_FRAMES = 16  # the FVD protocol's clip length (evaluation/fvd.py)


def fvd_clip_starts(num_frames: int, num_videos: int, num_clips: int, clip_frames: int = FVD_CLIP_FRAMES
                    ) -> np.ndarray:
  """First frames of the non-overlapping ``clip_frames``-frame clips cut evenly from each of ``num_videos`` videos
  of ``num_frames`` frames: ``num_clips // num_videos`` per video (at least 1, at most what fits)."""
  if num_frames < clip_frames:
    raise ValueError(f"videos of {num_frames} frames are shorter than the {clip_frames}-frame FVD clips")
  per_video = max(1, min(int(num_clips) // int(num_videos), num_frames // clip_frames))
  return np.linspace(0, num_frames - clip_frames, per_video).round().astype(int)


def write_stream(chunks: Iterable[np.ndarray], num_frames: int, fps: float, output: str, *, upscale: int = 0,
                 sheet_frames: int = 0, keep_videos: bool = True, fvd_clips: int = 0) -> Dict[str, Any]:
  """Consumes uint8 chunks ``[n, k, h, w, 3]`` of ``num_frames``-frame videos: streams them into OUTPUT.{mp4,gif}
  (process 0) and keeps only what is asked for: the whole ``videos`` and / or the frames of ``fvd_clips`` clips."""
  writer = video_io.VideoWriter(output, fps, num_frames, upscale, sheet_frames) if jax.process_index() == 0 else None
  kept, starts, clip_frames = [], None, None
  for chunk in chunks:
    chunk = parallel.to_host(chunk)
    if fvd_clips and starts is None:
      starts = fvd_clip_starts(num_frames, chunk.shape[0], fvd_clips)
      clip_frames = video_io.FrameSelector(np.concatenate([np.arange(s, s + FVD_CLIP_FRAMES) for s in starts]))
    if writer is not None:
      writer.add(chunk)
    if keep_videos:
      kept.append(chunk)
    if clip_frames is not None:
      clip_frames.add(chunk)
  out: Dict[str, Any] = dict(writer.close() if writer is not None else {}, num_frames=int(num_frames))
  if keep_videos:
    out["videos"] = np.concatenate(kept, axis=1)
  if clip_frames is not None:
    frames = clip_frames.result()  # [n, len(starts) * FVD_CLIP_FRAMES, h, w, 3], clip after clip
    out["fvd_clips"] = frames.reshape((-1, FVD_CLIP_FRAMES) + frames.shape[2:])
  return out


def _set_temporal_window(config, window: int, trained_frames: int) -> None:
  """Sets ``config.sampling.temporal_window`` (checked against the stage's trained clip length, not the sampled
  one; a window covering the sampled clip is no window)."""
  if "temporal_window" not in tasks.default_config(config.stage).sampling:
    raise ValueError(f"--temporal_window={window}: stage {config.stage!r} has no sampling-time temporal window (the "
                     "key-frame stage 'base' has)")
  if window and not 2 <= window <= trained_frames:
    raise ValueError(f"--temporal_window={window}: 0 (off) or 2..{trained_frames}, the clip length stage "
                     f"{config.stage!r} trained on (longer windows put positions outside the trained range)")
  config.sampling.temporal_window = window if window < int(config.data.num_frames) else 0


def sample_pipeline(spec: str, *, num_samples: int = 4, seconds: Optional[float] = None,
                    num_windows: Optional[int] = None, interpolations: Optional[int] = None,
                    guidance: Optional[float] = None, context_guidance: Optional[float] = None,
                    steps: Optional[int] = None, seed: int = 0, labels: Optional[Dict[str, int]] = None,
                    prompt: Optional[str] = None, output: Optional[str] = None, upscale: int = 0,
                    progress: bool = True, decoder: Optional[str] = None,
                    upsampler: Optional[str] = None, skip: Sequence[str] = (), keep_videos: bool = True,
                    fvd_clips: int = 0, overlap: bool = True) -> Dict[str, Any]:
  """Long videos through the pipeline stages of ``spec`` but those named in ``skip`` (a chain's workdir or a comma list of stage workdirs;
  ``workdirs.pipeline_stage_dirs``), in the order their tasks declare; writes OUTPUT.{mp4,gif,png} (default: the
  first workdir's ``sample``) at the final fps. ``decoder``: a ``decoder``-stage workdir whose video decoder decodes
  the final latents instead of the one ``spec`` has (or the key-frame stage's image decoder); ``upsampler``: an
  ``upsampler`` workdir, the last step. The frames are streamed into the files as they come, so host memory stays
  flat in the video length unless ``keep_videos``. Returns the paths, ``num_frames``, ``fps``, ``num_key_frames``,
  with ``keep_videos`` ``videos`` uint8 ``[n, t, h, w, 3]`` and with ``fvd_clips`` > 0 that many 16-frame clips
  (``fvd_clips``; see :func:`sample_workdir`). ``overlap``: the steps run concurrently, each in its own thread a
  chunk ahead of the next (``pipeline.Context``; the same frames either way)."""
  dirs = {s: d for s, d in workdirs.pipeline_stage_dirs(spec).items() if s not in skip}
  for name, path in (("decoder", decoder), ("upsampler", upsampler)):
    if path:
      stage = workdirs.load_run_config(path).get("stage")
      if stage != name:
        raise ValueError(f"--{name}={path}: a {stage!r} workdir, not a {name}-stage one")
      dirs[name] = path
  loaded = []
  for name, d in sorted(dirs.items(), key=lambda kv: tasks.get(kv[0]).pipeline_order(kv[0])):
    config, mesh = sampling_config(d, num_samples, guidance=guidance, steps=steps,
                                    context_guidance=context_guidance)
    config.sampling.num_samples = num_samples
    loaded.append((*workdirs.load_trained(d, config, mesh), mesh))
  first_task, _, _, mesh = loaded[0]
  batch = jax.tree.map(lambda x: x[:num_samples], parallel.to_host(first_task.fixed_batch(mesh)))
  batch = condition(first_task, batch, labels=labels, prompt=prompt)
  options = {"num_windows": num_windows, "interpolations": interpolations}
  ctx = pipeline.Context(batch=batch, rng=jax.random.PRNGKey(seed), options=options, progress=progress,
                         overlap=overlap, thread_context=lambda: _model_context(first_task.config, mesh))
  root = spec.split(",")[0].strip()
  with _model_context(first_task.config, mesh):
    steps_ = [task.pipeline_step(trainable, frozen) for task, trainable, frozen, _ in loaded]
    stream = pipeline.run(steps_, ctx, seconds=seconds)
    out = write_stream(stream.chunks, stream.num_frames, stream.fps, output or os.path.join(root, "sample"),
                       upscale=upscale, sheet_frames=16, keep_videos=keep_videos, fvd_clips=fvd_clips)
  for bar in ctx.bars:
    bar.close()
  return dict(out, fps=stream.fps, num_key_frames=ctx.key_frames_made)
