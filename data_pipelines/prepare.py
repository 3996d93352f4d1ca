r"""Prepares a video dataset as TFDS array_record files (no TensorFlow needed), read back with tfds.data_source.

Usage::

  python -m data_pipelines.prepare --builder=video_folder --source=/data/rds_videos --data_dir=/data/tfds \
      --name=rds --label_fields=day_night=day|night,crowdedness --short_side=128
  python -m data_pipelines.prepare --builder=webvid --source=/data/webvid/results_2M_val.csv \
      --data_dir=/data/tfds --name=val2m --short_side=320 --max_fps=30 --num_workers=8

The dataset lands in ``DATA_DIR/<builder>/<name>/1.0.0`` with ``train`` and ``validation`` splits; training reads
it with ``config.data.source = "<builder>/<name>"``. Skipped inputs are counted by reason, printed at the end and
kept in ``dataset_info`` metadata; the command fails (exit 2) when no input is usable.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional, Sequence

import tensorflow_datasets as tfds
from absl import app, flags

from data_pipelines import common
from data_pipelines.video_folder import VideoFolder, VideoFolderConfig
from data_pipelines.webvid import Webvid, WebvidConfig
from videoldm_jax import cli

BUILDERS = {"video_folder": (VideoFolder, VideoFolderConfig), "webvid": (Webvid, WebvidConfig)}


def build(builder: str, source: str, data_dir: str, name: str = "default", overwrite: bool = False, **options):
  """Runs one builder; returns the prepared ``tfds`` builder (its ``info.metadata`` holds the skip counts)."""
  if builder not in BUILDERS:
    raise ValueError(f"unknown builder {builder!r}; one of {sorted(BUILDERS)}")
  builder_cls, config_cls = BUILDERS[builder]
  config = config_cls(name=name, source=source, **options)
  b = builder_cls(config=config, data_dir=data_dir, file_format="array_record")
  mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  if overwrite:
    mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode, try_download_gcs=False),
                         download_dir=os.path.join(data_dir, "downloads"))
  return b


def _optional_float(text: str) -> Optional[float]:
  return None if text.lower() in ("", "none", "0") else float(text)


def define_flags(fv: flags.FlagValues) -> None:
  """The command's flags, defined in ``fv`` (the global FLAGS when run as a program)."""
  flags.DEFINE_enum("builder", None, sorted(BUILDERS), "dataset builder", flag_values=fv)
  flags.DEFINE_string("source", None, "video folder (video_folder) or CSV file / folder (webvid)", flag_values=fv)
  flags.DEFINE_string("data_dir", None, "TFDS data directory to write to", flag_values=fv)
  flags.DEFINE_string("name", "default", "config name: the dataset is <builder>/<name>", flag_values=fv)
  flags.DEFINE_integer("short_side", 256, "stored frames: short side in pixels", flag_values=fv)
  flags.DEFINE_integer("min_short_side", 64, "videos with a smaller short side (pixels) are skipped", flag_values=fv)
  flags.DEFINE_float("max_fps", 30.0, "stored frame rate cap (source fps if lower)", flag_values=fv)
  flags.DEFINE_float("min_seconds", 1.0, "shorter videos are skipped", flag_values=fv)
  # Strings, so that "", "none" or "0" can mean no limit (parsed in ``run``).
  flags.DEFINE_string("max_seconds", "60", "keep at most this much per video", flag_values=fv)
  flags.DEFINE_string("clip_seconds", None,
                      "split videos into examples of this length (default: one example per video)", flag_values=fv)
  flags.DEFINE_float("val_fraction", 0.05, "stable-hash fraction for 'validation'", flag_values=fv)
  flags.DEFINE_integer("max_examples", None, "use at most this many source videos", flag_values=fv)
  flags.DEFINE_integer("jpeg_quality", 90, "JPEG quality of the stored frames", flag_values=fv)
  flags.DEFINE_integer("num_workers", 0, "decode in this many worker processes (0: one)", flag_values=fv)
  flags.DEFINE_float("decode_timeout", None, "seconds per video before its decoder is killed and the video "
                     "skipped (default: no limit)", flag_values=fv)
  flags.DEFINE_string("label_fields", "", "video_folder: e.g. 'day_night=day|night,crowdedness'", flag_values=fv)
  flags.DEFINE_string("labels_file", None, "video_folder: labels.json / .csv (default: in SOURCE)", flag_values=fv)
  flags.DEFINE_string("file_column", "file", "video_folder: file column of a labels CSV", flag_values=fv)
  flags.DEFINE_string("video_root", None, "webvid: folder holding <page_dir>/<videoid>.mp4", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "rebuild even if the dataset exists", flag_values=fv)


def run(fv: flags.FlagValues) -> int:
  """Runs the command with parsed flags; 2 (with the reasons on stderr) when no input is usable."""
  cli.require(fv, "builder", "source", "data_dir")
  seconds = {}
  for name in ("max_seconds", "clip_seconds"):
    try:
      seconds[name] = _optional_float(fv[name].value or "")
    except ValueError:
      raise app.UsageError(f"--{name}={fv[name].value!r}: expected seconds, or none") from None

  logging.basicConfig(level=logging.WARNING, format="%(message)s")
  tfds.disable_progress_bar()  # our own tqdm bars count videos
  options = dict(short_side=fv.short_side, min_short_side=fv.min_short_side, max_fps=fv.max_fps,
                 min_seconds=fv.min_seconds, val_fraction=fv.val_fraction, max_examples=fv.max_examples,
                 jpeg_quality=fv.jpeg_quality, num_workers=fv.num_workers, decode_timeout=fv.decode_timeout,
                 progress=True, **seconds)
  if fv.builder == "video_folder":
    options.update(label_fields=tuple(s for s in fv.label_fields.split(",") if s.strip()),
                   labels_file=fv.labels_file, file_column=fv.file_column)
  else:
    options.update(video_root=fv.video_root)
  try:
    b = build(fv.builder, fv.source, fv.data_dir, fv.name, overwrite=fv.overwrite, **options)
  except (common.NoUsableVideosError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  splits = {k: v.num_examples for k, v in b.info.splits.items()}
  skipped = (b.info.metadata or {}).get("skipped", {})
  print(f"wrote {b.data_dir}: {splits} examples from {(b.info.metadata or {}).get('num_videos', '?')} videos")
  print(f"skipped: {skipped if skipped else 'none'}")
  print(f"read with: tfds.data_source('{fv.builder}/{fv.name}', data_dir='{fv.data_dir}')")
  return 0


def main(argv: Sequence[str]) -> int:
  """The command with ``argv`` (its flags, as on the command line)."""
  return cli.main("data_pipelines.prepare", define_flags, run, argv)


if __name__ == "__main__":
  cli.run_program(define_flags, run)
