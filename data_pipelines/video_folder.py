"""TFDS builder for a folder of videos with optional per-video labels (RDS-like driving data, Mountain Biking, ...).

Layout::

  SOURCE/                      # searched recursively; any video container PyAV reads
    a/clip_0001.mp4
    b/clip_0002.mov
    labels.json                # optional: {"a/clip_0001.mp4": {"day_night": "night", "crowdedness": 3,
                               #                                "caption": "..."}, ...}
    labels.csv                 # ...or a CSV with a ``file`` column and one column per field

Keys of the labels file are paths relative to SOURCE (or bare file names when those are unique). Declared
``label_fields`` must be present and valid for every video (``day_night=day|night`` declares a class label
given by name or index, ``crowdedness`` any integer); videos failing that are skipped as ``bad_metadata``.
An optional ``caption`` field becomes the text caption. The train / validation split is a stable hash of the
relative path, so adding videos never moves existing ones between splits.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Dict, List, Optional, Tuple

from data_pipelines import common
from videoldm_jax.data.video import VIDEO_EXTENSIONS, VideoDecodeError

LABEL_FILES = ("labels.json", "labels.csv")


@dataclasses.dataclass
class VideoFolderConfig(common.VideoBuilderConfig):
  label_fields: Tuple[str, ...] = ()
  labels_file: Optional[str] = None  # default: SOURCE/labels.json or SOURCE/labels.csv when present
  file_column: str = "file"
  caption_field: str = "caption"


def _read_text(path: str) -> str:
  with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
    return f.read()


def read_labels_file(path: str, file_column: str = "file") -> Dict[str, Dict[str, object]]:
  """``{file: {field: value}}`` from a JSON object or a CSV with a ``file_column`` column."""
  text = _read_text(path)
  if path.endswith(".json"):
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
      raise ValueError(f"{path}: expected an object {{file: {{field: value}}}}")
    return data
  rows = list(csv.DictReader(text.splitlines()))
  if rows and file_column not in rows[0]:
    raise ValueError(f"{path}: no {file_column!r} column (columns: {list(rows[0])})")
  return {row[file_column]: {k: v for k, v in row.items() if k != file_column} for row in rows}


class VideoFolder(common.VideoBuilder):
  """Videos found recursively under a folder, with optional labels and captions."""

  # No predefined configs: each prepared dataset passes its own VideoFolderConfig (its name is the directory).

  def _label_specs(self):
    return common.parse_label_specs(self.builder_config.label_fields)

  def _labels_path(self) -> Optional[str]:
    cfg: VideoFolderConfig = self.builder_config
    if cfg.labels_file:
      if not os.path.exists(cfg.labels_file):
        raise FileNotFoundError(f"labels file {cfg.labels_file} does not exist")
      return cfg.labels_file
    for name in LABEL_FILES:
      path = os.path.join(cfg.source, name)
      if os.path.exists(path):
        return path
    return None

  def _list_tasks(self, skips: common.SkipCounter) -> List[common.VideoTask]:
    cfg: VideoFolderConfig = self.builder_config
    specs = self._label_specs()
    labels_path = self._labels_path()
    if specs and labels_path is None:
      raise FileNotFoundError(f"label_fields {cfg.label_fields} declared but no labels.json / labels.csv in "
                              f"{cfg.source} (and no labels_file given)")
    entries = read_labels_file(labels_path, cfg.file_column) if labels_path else {}
    basename_count: Dict[str, int] = {}
    files = []
    for root, dirs, names in os.walk(cfg.source, followlinks=True):
      dirs[:] = sorted(d for d in dirs if not d.startswith("."))
      for name in sorted(names):
        path = os.path.join(root, name)
        if name.startswith(".") or (labels_path and os.path.samefile(path, labels_path)):
          continue
        rel = os.path.relpath(path, cfg.source).replace(os.sep, "/")
        files.append((rel, path))
        basename_count[name] = basename_count.get(name, 0) + 1

    tasks, used_entries = [], set()
    for rel, path in files:
      base = os.path.basename(rel)
      entry_key = rel if rel in entries else (base if base in entries and basename_count[base] == 1 else None)
      entry = entries.get(entry_key, {}) if entry_key else {}
      if entry_key:
        used_entries.add(entry_key)
      if not rel.lower().endswith(VIDEO_EXTENSIONS):
        skips.add(common.NOT_VIDEO, rel)
        continue
      if not common.check_utf8(rel):
        skips.add(common.BAD_METADATA, rel.encode("utf-8", "replace").decode(), "file name is not UTF-8")
        continue
      if specs and entry_key is None:
        skips.add(common.BAD_METADATA, rel, "no labels entry")
        continue
      try:
        labels = tuple((s.name, s.value(entry[s.name])) for s in specs)
      except (KeyError, ValueError, TypeError) as e:
        skips.add(common.BAD_METADATA, rel, f"label {e}")
        continue
      caption = entry.get(cfg.caption_field, "") if isinstance(entry, dict) else ""
      if not isinstance(caption, str):
        skips.add(common.BAD_METADATA, rel, f"caption is {type(caption).__name__}")
        continue
      if not common.check_utf8(caption):
        skips.add(common.BAD_CAPTION, rel, "caption is not valid UTF-8")
        continue
      tasks.append(common.VideoTask(key=rel, path=path, caption=caption.strip(), labels=labels))
    for key in sorted(set(entries) - used_entries):
      skips.add(VideoDecodeError.MISSING_FILE, key, "listed in the labels file")
    return tasks
