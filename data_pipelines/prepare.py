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

import argparse
import logging
import os
import sys
from typing import List, Optional

import tensorflow_datasets as tfds

from data_pipelines import common
from data_pipelines.video_folder import VideoFolder, VideoFolderConfig
from data_pipelines.webvid import Webvid, WebvidConfig

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


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m data_pipelines.prepare", description=__doc__.split("\n")[0])
  parser.add_argument("--builder", required=True, choices=sorted(BUILDERS))
  parser.add_argument("--source", required=True, help="video folder (video_folder) or CSV file / folder (webvid)")
  parser.add_argument("--data_dir", required=True, help="TFDS data directory to write to")
  parser.add_argument("--name", default="default", help="config name: the dataset is <builder>/<name>")
  parser.add_argument("--short_side", type=int, default=256, help="stored frames: short side in pixels")
  parser.add_argument("--max_fps", type=float, default=30.0, help="stored frame rate cap (source fps if lower)")
  parser.add_argument("--min_seconds", type=float, default=1.0, help="shorter videos are skipped")
  parser.add_argument("--max_seconds", type=_optional_float, default=60.0, help="keep at most this much per video")
  parser.add_argument("--clip_seconds", type=_optional_float, default=None,
                      help="split videos into examples of this length (default: one example per video)")
  parser.add_argument("--val_fraction", type=float, default=0.05, help="stable-hash fraction for 'validation'")
  parser.add_argument("--max_examples", type=int, default=None, help="use at most this many source videos")
  parser.add_argument("--jpeg_quality", type=int, default=90)
  parser.add_argument("--num_workers", type=int, default=0, help="decode in this many processes")
  parser.add_argument("--label_fields", default="", help="video_folder: e.g. 'day_night=day|night,crowdedness'")
  parser.add_argument("--labels_file", default=None, help="video_folder: labels.json / .csv (default: in SOURCE)")
  parser.add_argument("--file_column", default="file", help="video_folder: file column of a labels CSV")
  parser.add_argument("--video_root", default=None, help="webvid: folder holding <page_dir>/<videoid>.mp4")
  parser.add_argument("--overwrite", action="store_true", help="rebuild even if the dataset exists")
  args = parser.parse_args(argv)

  logging.basicConfig(level=logging.WARNING, format="%(message)s")
  tfds.disable_progress_bar()  # our own tqdm bars count videos
  options = dict(short_side=args.short_side, max_fps=args.max_fps, min_seconds=args.min_seconds,
                 max_seconds=args.max_seconds, clip_seconds=args.clip_seconds, val_fraction=args.val_fraction,
                 max_examples=args.max_examples, jpeg_quality=args.jpeg_quality, num_workers=args.num_workers,
                 progress=True)
  if args.builder == "video_folder":
    options.update(label_fields=tuple(s for s in args.label_fields.split(",") if s.strip()),
                   labels_file=args.labels_file, file_column=args.file_column)
  else:
    options.update(video_root=args.video_root)
  try:
    b = build(args.builder, args.source, args.data_dir, args.name, overwrite=args.overwrite, **options)
  except (common.NoUsableVideosError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  splits = {k: v.num_examples for k, v in b.info.splits.items()}
  skipped = (b.info.metadata or {}).get("skipped", {})
  print(f"wrote {b.data_dir}: {splits} examples from {(b.info.metadata or {}).get('num_videos', '?')} videos")
  print(f"skipped: {skipped if skipped else 'none'}")
  print(f"read with: tfds.data_source('{args.builder}/{args.name}', data_dir='{args.data_dir}')")
  return 0


if __name__ == "__main__":
  sys.exit(main())
