"""TFDS builders (video_folder, webvid): examples, labels, stored frames, splits, skipped inputs, read-back,
and data preparation surviving hostile inputs and crashing decoders."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

import fuzz_videos
from data_pipelines import common, prepare
from videoldm_jax.data import records, video

tfds.disable_progress_bar()
read_pattern = fuzz_videos.read_pattern


def pattern_frames(n, h=64, w=96):
  return fuzz_videos.pattern_frames(n, h, w)


def write_bad_files(d, names=("zero.mp4", "text.mp4", "truncated.mp4", "notes.txt")):
  """zero-byte, text-as-mp4, cut-in-half (header first) and a non-video file."""
  out = {}
  for name in names:
    path = os.path.join(d, name)
    if name.startswith("zero"):
      open(path, "wb").close()
    elif name.startswith("truncated"):
      video.write_video(path, pattern_frames(45), 15, faststart=True)
      data = open(path, "rb").read()
      open(path, "wb").write(data[:len(data) // 2])
    else:
      open(path, "w").write("this is text\n" * 40)
    out[name] = path
  return out


# Six good videos: (relative path, fps, frames, day_night, crowdedness).
GOOD = [("a/v0.mp4", 15, 30, "day", 0), ("a/v1.mp4", 30, 45, "night", 1), ("b/v2.mp4", 15, 24, "day", 2),
        ("b/c/v3.mp4", 24, 36, "night", 3), ("v4.mp4", 30, 60, "day", 4), ("v5.mp4", 15, 30, "night", 0)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("video_folder"))
  labels = {}
  for rel, fps, n, dn, crowd in GOOD:
    os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
    video.write_video(os.path.join(root, rel), pattern_frames(n), fps)
    labels[rel] = {"day_night": dn, "crowdedness": crowd, "caption": f"clip {rel}"}
  video.write_video(os.path.join(root, "short.mp4"), pattern_frames(5), 15)  # 0.33 s < min_seconds
  video.write_video(os.path.join(root, "one_frame.mp4"), pattern_frames(1), 15)  # also too short
  video.write_video(os.path.join(root, "tiny.mp4"), pattern_frames(30, 2, 2), 15)  # 2x2 < min_short_side
  video.write_video(os.path.join(root, "unlabelled.mp4"), pattern_frames(30), 15)  # no labels entry
  video.write_video(os.path.join(root, "badlabel.mp4"), pattern_frames(30), 15)
  labels["badlabel.mp4"] = {"day_night": "dusk", "crowdedness": 1}  # not a declared class
  bad = write_bad_files(root)
  for name in bad:
    labels[name] = {"day_night": 0, "crowdedness": 1}
  labels["gone.mp4"] = {"day_night": 0, "crowdedness": 1}  # listed, no file
  for name in ("short.mp4", "one_frame.mp4", "tiny.mp4"):
    labels[name] = {"day_night": 0, "crowdedness": 1}
  json.dump(labels, open(os.path.join(root, "labels.json"), "w"))
  return root


@pytest.fixture(scope="module")
def prepared(folder, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  b = prepare.build("video_folder", folder, data_dir, "rds", label_fields=("day_night=day|night", "crowdedness"),
                    max_fps=15.0, min_seconds=1.0, val_fraction=0.3)
  return b, data_dir


EXPECTED_SKIPS = {"bad_metadata": 2, "missing_file": 1, "not_video": 1, "too_short": 2, "too_small": 1,
                  "truncated": 1, "unreadable": 1, "zero_byte": 1}


def test_video_folder_examples_labels_and_skips(prepared):
  b, data_dir = prepared
  ds = tfds.data_source("video_folder/rds", data_dir=data_dir)
  seen = {}
  for split in ds:
    for i in range(len(ds[split])):
      ex = ds[split][i]
      seen[records.text(ex["file"])] = (split, ex)
  assert sorted(seen) == sorted(g[0] for g in GOOD)
  for rel, fps, n, dn, crowd in GOOD:
    split, ex = seen[rel]
    assert split == common.stable_split(rel, 0.3)
    assert ex["labels"] == {"day_night": ["day", "night"].index(dn), "crowdedness": crowd}
    assert records.text(ex["caption"]) == f"clip {rel}"
    stored_fps = min(fps, 15)
    assert ex["fps"] == pytest.approx(stored_fps, abs=1e-3) and ex["source_fps"] == pytest.approx(fps, abs=1e-3)
    # Frames at k / stored_fps up to the last source frame (plus half a source frame of display time).
    expected_frames = int(np.floor(((n - 1) / fps + 0.5 / fps) * stored_fps + 1e-6)) + 1
    assert ex["num_frames"] == len(ex["frames"]) == expected_frames
    assert (ex["height"], ex["width"]) == (64, 96)  # never upscaled to short_side=256
    # Stored frames are the source frames nearest to k / stored_fps.
    frames = records.decode_jpeg_frames(ex["frames"], range(len(ex["frames"])))
    np.testing.assert_array_equal(read_pattern(frames), np.round(np.arange(len(frames)) * fps / stored_fps))
  assert b.info.metadata["skipped"] == EXPECTED_SKIPS
  assert b.info.metadata["num_videos"] == len(GOOD)
  # The counts are saved with the dataset.
  assert tfds.builder("video_folder/rds", data_dir=data_dir).info.metadata["skipped"] == EXPECTED_SKIPS


def test_split_is_a_stable_hash_of_the_name():
  names = [f"dir/video_{i:03d}.mp4" for i in range(400)]
  splits = [common.stable_split(n, 0.25) for n in names]
  assert splits == [common.stable_split(n, 0.25) for n in names]  # deterministic
  assert 0.15 < splits.count("validation") / len(names) < 0.35
  # Independent of which other files exist; a larger fraction only moves train -> validation.
  bigger = [common.stable_split(n, 0.5) for n in names]
  assert all(b == "validation" for s, b in zip(splits, bigger) if s == "validation")


def test_labels_csv_clips_and_max_examples(folder, tmp_path):
  src = str(tmp_path / "src")
  os.makedirs(src)
  for rel, fps, n, *_ in GOOD[:4]:
    video.write_video(os.path.join(src, os.path.basename(rel)), pattern_frames(n), fps)
  with open(os.path.join(src, "labels.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["file", "crowdedness", "weather"])
    for i, (rel, *_) in enumerate(GOOD[:4]):
      w.writerow([os.path.basename(rel), i + 1, "rain"])
  data_dir = str(tmp_path / "tfds")
  b = prepare.build("video_folder", src, data_dir, "csv", label_fields=("crowdedness",), clip_seconds=1.0,
                    max_examples=3, val_fraction=0.0)
  ds = tfds.data_source("video_folder/csv", data_dir=data_dir, split="train")
  # The first 3 videos by name: v0 (2 s -> 2 clips), v1 (1.5 s -> 1 clip + 0.5 s remainder dropped), v2 (1.6 s).
  got = sorted((records.text(ds[i]["file"]), float(ds[i]["start_time"]), int(ds[i]["labels"]["crowdedness"]))
               for i in range(len(ds)))
  assert got == [("v0.mp4", 0.0, 1), ("v0.mp4", 1.0, 1), ("v1.mp4", 0.0, 2), ("v2.mp4", 0.0, 3)]
  assert b.info.metadata["num_videos"] == 3


def test_all_bad_inputs_fail_clearly(tmp_path, capsys):
  src = str(tmp_path / "bad")
  os.makedirs(src)
  write_bad_files(src)
  with pytest.raises(common.NoUsableVideosError, match=r"(?s)no usable videos.*zero_byte: 1.*"):
    prepare.build("video_folder", src, str(tmp_path / "tfds"), "bad")
  assert prepare.main(["--builder=video_folder", f"--source={src}", f"--data_dir={tmp_path / 'tfds2'}"]) == 2
  err = capsys.readouterr().err
  assert "no usable videos" in err and "unreadable" in err and "truncated" in err


def test_webvid_captions_and_skips(tmp_path):
  root = str(tmp_path / "webvid")
  os.makedirs(os.path.join(root, "videos", "000"))
  rows = [("11", "PT00H00M02S", "000", "A dog runs on the beach."), ("12", "1.5", "000", "Waves,  at sunset"),
          ("13", "PT00H00M02S", "000", "missing file"), ("14", "soon", "000", "bad duration"),
          ("15", "2", "000", ""), ("16", "2", "000", "BAD\xff")]
  for vid in ("11", "12", "14", "15", "16"):
    video.write_video(os.path.join(root, "videos", "000", f"{vid}.mp4"), pattern_frames(30), 15)
  csv_path = os.path.join(root, "results_val.csv")
  with open(csv_path, "wb") as f:
    f.write(b"videoid,contentUrl,duration,page_dir,name\n")
    for vid, dur, page, name in rows:
      caption = name.encode("latin-1") if "\xff" in name else name.encode()  # invalid UTF-8 byte for "16"
      f.write(b'%s,https://example.invalid/%s.mp4,%s,%s,"%s"\n' % (vid.encode(), vid.encode(), dur.encode(),
                                                                  page.encode(), caption))
  data_dir = str(tmp_path / "tfds")
  assert prepare.main(["--builder=webvid", f"--source={csv_path}", f"--data_dir={data_dir}", "--name=val",
                       f"--video_root={os.path.join(root, 'videos')}", "--val_fraction=0"]) == 0
  ds = tfds.data_source("webvid/val", data_dir=data_dir, split="train")
  got = sorted((records.text(ds[i]["videoid"]), records.text(ds[i]["caption"])) for i in range(len(ds)))
  assert got == [("11", "A dog runs on the beach."), ("12", "Waves, at sunset")]
  skipped = tfds.builder("webvid/val", data_dir=data_dir).info.metadata["skipped"]
  assert skipped == {"bad_caption": 2, "bad_metadata": 1, "missing_file": 1}


def test_data_source_reads_back_without_tensorflow_or_builder_code(prepared):
  _, data_dir = prepared
  code = ("import sys, tensorflow_datasets as tfds\n"
          f"ds = tfds.data_source('video_folder/rds', data_dir={data_dir!r})\n"
          "n = sum(len(ds[s]) for s in ds)\n"
          "ex = ds['train'][0]\n"
          "assert 'data_pipelines' not in sys.modules and 'tensorflow' not in sys.modules\n"
          "print(n, sorted(ex['labels']), len(ex['frames']))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd="/", env={**os.environ, "PYTHONPATH": ""})
  assert out.returncode == 0, out.stderr[-2000:]
  n, rest = out.stdout.split()[0], out.stdout.split()[1:]
  assert int(n) == len(GOOD) and "'crowdedness'," in rest[0]


def test_min_short_side_is_an_option(tmp_path):
  src = str(tmp_path / "src")
  os.makedirs(src)
  video.write_video(os.path.join(src, "a.mp4"), pattern_frames(20, 32, 48), 15)
  video.write_video(os.path.join(src, "b.mp4"), pattern_frames(20, 16, 24), 15)
  data_dir = str(tmp_path / "tfds")
  assert prepare.main(["--builder=video_folder", f"--source={src}", f"--data_dir={data_dir}", "--name=small",
                       "--min_short_side=32", "--val_fraction=0"]) == 0
  b = tfds.builder("video_folder/small", data_dir=data_dir)
  assert b.info.metadata["skipped"] == {"too_small": 1} and b.info.metadata["num_videos"] == 1
  assert b.info.metadata["options"]["min_short_side"] == 32


def test_decoder_crashes_skip_only_that_video(tmp_path, monkeypatch):
  # The builder's own probe / encode run in its workers, except that these file names make the worker die there.
  monkeypatch.setattr(common, "probe_task", fuzz_videos.probe_or_crash)
  monkeypatch.setattr(common, "encode_task", fuzz_videos.encode_or_crash)
  src = str(tmp_path / "src")
  os.makedirs(src)
  names = ["a_good.mp4", "b_segv_probe.mp4", "c_good.mp4", "d_abort_encode.mp4", "e_hang_encode.mp4", "f_good.mp4"]
  for name in names:
    video.write_video(os.path.join(src, name), pattern_frames(15), 15)
  data_dir = str(tmp_path / "tfds")
  b = prepare.build("video_folder", src, data_dir, "crash", num_workers=2, decode_timeout=5.0, val_fraction=0.0)
  assert b.info.metadata["skipped"] == {"decoder_crashed": 2, "decoder_timeout": 1}
  ds = tfds.data_source("video_folder/crash", data_dir=data_dir, split="train")
  assert sorted(records.text(ds[i]["file"]) for i in range(len(ds))) == ["a_good.mp4", "c_good.mp4", "f_good.mp4"]
  for i in range(len(ds)):
    frames = records.decode_jpeg_frames(ds[i]["frames"], range(len(ds[i]["frames"])))
    np.testing.assert_array_equal(read_pattern(frames), np.arange(15))


def test_fuzzed_inputs_are_kept_or_skipped_never_fatal(tmp_path):
  src = str(tmp_path / "src")
  paths = fuzz_videos.write_fuzz_videos(src)
  for name in ("good_a.mp4", "good_b.mp4"):
    video.write_video(os.path.join(src, name), pattern_frames(15), 15)
  data_dir = str(tmp_path / "tfds")
  b = prepare.build("video_folder", src, data_dir, "fuzz", min_seconds=0.0, num_workers=2, val_fraction=0.0)
  skipped, num_videos = b.info.metadata["skipped"], b.info.metadata["num_videos"]
  assert num_videos + sum(skipped.values()) == len(paths) + 2  # every input is accounted for
  assert common.DECODER_CRASHED not in skipped and skipped[common.TOO_SMALL] == 1  # tiny_2x2
  assert skipped[video.VideoDecodeError.NO_VIDEO_STREAM] >= 1  # audio_only (and some corrupted headers)
  ds = tfds.data_source("video_folder/fuzz", data_dir=data_dir, split="train")
  kept = {os.path.splitext(records.text(ds[i]["file"]))[0] for i in range(len(ds))}
  expected = {"good_a", "good_b", "one_frame", "same_pts", "zero_duration", "contradicted_size",
              *(f"pix_{name}" for name, *_ in fuzz_videos.PIXEL_FORMATS)}
  assert expected <= kept and not kept & {"tiny_2x2", "audio_only", "refused_size", "rawbig"}
