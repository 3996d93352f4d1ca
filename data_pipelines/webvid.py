"""TFDS builder for WebVid-style captioned videos: CSV metadata + locally downloaded mp4 files.

``source`` is a CSV file or a folder of them with the WebVid columns ``videoid,contentUrl,duration,page_dir,name``;
the video of a row is ``<video_root>/<page_dir>/<videoid>.mp4`` (``video_root`` defaults to the CSV's folder).
``name`` is the caption. Rows whose file is missing are skipped (``missing_file``), as are rows with a caption
that is not valid UTF-8 or empty (``bad_caption``), an unparsable duration or missing ids (``bad_metadata``) and
the usual unreadable / truncated / too short videos. Durations may be seconds or ISO-8601 (``PT00H00M29S``).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import os
import re
from typing import List, Optional

from data_pipelines import common
from videoldm_jax.data.video import VideoDecodeError

REQUIRED_COLUMNS = ("videoid", "page_dir", "name")
_ISO_DURATION = re.compile(r"^P(?:(\d+(?:\.\d+)?)D)?T?(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?$")


@dataclasses.dataclass
class WebvidConfig(common.VideoBuilderConfig):
  video_root: Optional[str] = None
  video_extension: str = ".mp4"


def parse_duration(text: str) -> float:
  """Seconds from ``"12.5"`` or ISO-8601 ``"PT00H00M29S"``; raises ValueError."""
  text = (text or "").strip()
  if not text:
    raise ValueError("empty duration")
  try:
    value = float(text)
  except ValueError:
    m = _ISO_DURATION.match(text)
    if not m or not any(m.groups()):
      raise ValueError(f"duration {text!r}") from None
    d, h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    value = ((d * 24 + h) * 60 + mi) * 60 + s
  if not value >= 0 or value == float("inf"):
    raise ValueError(f"duration {text!r}")
  return value


def csv_files(source: str) -> List[str]:
  if os.path.isdir(source):
    files = sorted(glob.glob(os.path.join(source, "*.csv")))
    if not files:
      raise FileNotFoundError(f"no *.csv files in {source}")
    return files
  return [source]


class Webvid(common.VideoBuilder):
  """WebVid-style text-video pairs."""

  EXTRA_TEXT = ("videoid", "page_dir")

  def _list_tasks(self, skips: common.SkipCounter) -> List[common.VideoTask]:
    cfg: WebvidConfig = self.builder_config
    tasks, seen = [], set()
    for path in csv_files(cfg.source):
      root = cfg.video_root or os.path.dirname(os.path.abspath(path))
      with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
          raise ValueError(f"{path}: missing column(s) {missing}; a WebVid CSV has "
                           "videoid,contentUrl,duration,page_dir,name")
        for line, row in enumerate(reader, start=2):
          where = f"{os.path.basename(path)}:{line}"
          videoid, page_dir, caption = (row.get(c) for c in REQUIRED_COLUMNS)
          if not videoid or page_dir is None or None in row or not common.check_utf8(videoid + page_dir):
            skips.add(common.BAD_METADATA, where, "missing / malformed ids")
            continue
          key = f"{page_dir}/{videoid}"
          if key in seen:
            skips.add(common.BAD_METADATA, key, "duplicate row")
            continue
          seen.add(key)
          if caption is None or not common.check_utf8(caption) or not caption.strip():
            skips.add(common.BAD_CAPTION, key, "caption not valid UTF-8" if caption else "empty caption")
            continue
          if row.get("duration") not in (None, ""):
            try:
              duration = parse_duration(row["duration"])
            except ValueError as e:
              skips.add(common.BAD_METADATA, key, str(e))
              continue
            if duration < cfg.min_seconds:
              skips.add(VideoDecodeError.TOO_SHORT, key, f"CSV duration {duration}s")
              continue
          video = os.path.join(root, page_dir, videoid + cfg.video_extension)
          if not os.path.exists(video):
            skips.add(VideoDecodeError.MISSING_FILE, key)
            continue
          tasks.append(common.VideoTask(key=key, path=video, caption=" ".join(caption.split()),
                                        extra=(("videoid", videoid), ("page_dir", page_dir))))
    return tasks
