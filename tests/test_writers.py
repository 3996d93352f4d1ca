"""TensorBoard writer: what it writes reads back with TensorBoard's own event reader (EventAccumulator)."""

import io
import logging

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from videoldm_jax import writers


def _read(logdir):
  acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={event_accumulator.IMAGES: 0,
                                                                       event_accumulator.SCALARS: 0})
  return acc.Reload()


def _frames(encoded: bytes):
  """Every frame of an encoded image (PNG: one; GIF: all), as ``[h, w, 3]`` uint8."""
  img = Image.open(io.BytesIO(encoded))
  frames = []
  for i in range(getattr(img, "n_frames", 1)):
    img.seek(i)
    frames.append(np.asarray(img.convert("RGB")))
  return frames


def test_scalars_images_videos_and_hparams_read_back(tmp_path, caplog):
  writer = writers.create_writer(str(tmp_path))
  with caplog.at_level(logging.INFO):
    for step in (1, 5, 10):
      writer.write_scalars(step, {"loss": 1.0 / step, "lr": np.float32(3e-4)})
  assert "[10] loss=0.1" in caplog.text  # scalars are logged too
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
  writer.write_images(5, {"image": image, "pair": np.stack([image, 255 - image])})
  # 2 clips of 5 frames, 8x6 px, each frame a flat colour (GIF palettes keep flat colours exact).
  colours = rng.integers(0, 256, (2, 5, 1, 1, 3), dtype=np.uint8)
  videos = np.broadcast_to(colours, (2, 5, 8, 6, 3)).copy()
  writer.write_videos(10, {"samples": videos}, fps=5.0)
  writer.write_hparams({"lr": 3e-4, "stage": "base", "batch_size": 8, "ema": True})
  writer.flush()

  acc = _read(tmp_path)
  tags = acc.Tags()
  assert set(tags["scalars"]) == {"loss", "lr"}
  assert set(tags["images"]) == {"image", "pair/0", "pair/1", "samples"}
  loss = acc.Scalars("loss")
  assert [e.step for e in loss] == [1, 5, 10]
  np.testing.assert_allclose([e.value for e in loss], [1.0, 0.2, 0.1], rtol=1e-6)
  assert acc.Scalars("lr")[0].value == pytest.approx(3e-4, rel=1e-6)

  (png,) = acc.Images("image")
  assert (png.step, png.height, png.width) == (5, 12, 20)
  (decoded,) = _frames(png.encoded_image_string)
  np.testing.assert_array_equal(decoded, image)
  np.testing.assert_array_equal(_frames(acc.Images("pair/1")[0].encoded_image_string)[0], 255 - image)

  (gif,) = acc.Images("samples")
  assert (gif.step, gif.height, gif.width) == (10, 8, 12)  # the two clips side by side
  frames = _frames(gif.encoded_image_string)
  assert len(frames) == 5
  for t, frame in enumerate(frames):
    np.testing.assert_array_equal(frame, writers.video_grid(videos)[t])
  assert Image.open(io.BytesIO(gif.encoded_image_string)).info["duration"] == 200  # 5 fps

  content = acc.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
  start = hparams_metadata.parse_session_start_info_plugin_data(content[hparams_metadata.SESSION_START_INFO_TAG])
  assert dict(start.hparams)["stage"].string_value == "base"
  assert dict(start.hparams)["lr"].number_value == pytest.approx(3e-4)
  assert dict(start.hparams)["ema"].bool_value is True
  writer.close()


def test_logging_only_writer_writes_no_files(tmp_path, caplog):
  writer = writers.create_writer(str(tmp_path), just_logging=True)
  with caplog.at_level(logging.INFO):
    writer.write_scalars(3, {"loss": 0.5})
  writer.write_videos(3, {"samples": np.zeros((1, 2, 4, 4, 3), np.uint8)})
  writer.write_hparams({"lr": 1.0})
  writer.flush()
  writer.close()
  assert "[3] loss=0.5" in caplog.text
  assert not list(tmp_path.iterdir())


def test_report_progress_writes_steps_per_second(tmp_path, monkeypatch):
  clock = {"now": 100.0}
  monkeypatch.setattr(writers.time, "time", lambda: clock["now"])
  writer = writers.create_writer(str(tmp_path))
  progress = writers.ReportProgress(100, writer, every_secs=1.0)
  progress(0)
  clock["now"] = 102.0
  progress(10)  # 10 steps in 2 s
  clock["now"] = 102.5
  progress(15)  # not due: 0.5 s since the last report
  clock["now"] = 104.0
  progress(30)  # 20 steps in 2 s
  writer.flush()
  assert progress.steps_per_sec == 10.0
  assert [(e.step, e.value) for e in _read(tmp_path).Scalars("steps_per_sec")] == [(10, 5.0), (30, 10.0)]
  writer.close()


# ----------------------------------------------------------------------------------------------------------
# Sampled videos: streamed chunk by chunk into mp4 / gif / contact sheet.

def _pil_frames(encoded: bytes):
  from PIL import ImageSequence  # pylint: disable=g-import-not-at-top
  return [f.copy() for f in ImageSequence.Iterator(Image.open(io.BytesIO(encoded)))]


def _decode(path):
  import av  # pylint: disable=g-import-not-at-top
  with av.open(path) as c:
    return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_streamed_video_files_equal_the_whole_video_written_at_once(tmp_path):
  """Chunks of any size give the same mp4 / gif frames and png as writing the whole array; the gif has every frame
  at the right delay and loops; the contact sheet shows the evenly spaced frames asked for."""
  from videoldm_jax import video_io  # pylint: disable=g-import-not-at-top
  from videoldm_jax.evaluation import fvd  # pylint: disable=g-import-not-at-top
  t, h, w = 23, 32, 48
  videos = fvd.synthetic_videos(2, t, h, w, fps=8.0)  # driving scenes, as the samplers make
  whole = video_io.write_outputs(videos, str(tmp_path / "whole"), fps=8.0, sheet_frames=5)
  writer = video_io.VideoWriter(str(tmp_path / "streamed.mp4"), 8.0, t, sheet_frames=5)
  for i in range(0, t, 6):
    writer.add(videos[:, i:i + 6])
  streamed = writer.close()
  assert streamed == {k: str(tmp_path / f"streamed.{k}") for k in ("mp4", "gif", "png")}
  np.testing.assert_array_equal(_decode(whole["gif"]), _decode(streamed["gif"]))
  # x264 runs frame-threaded: two encodes of the same frames may differ by a few rounding steps.
  mp4_whole, mp4 = _decode(whole["mp4"]).astype(int), _decode(streamed["mp4"]).astype(int)
  assert mp4_whole.shape == mp4.shape and np.abs(mp4_whole - mp4).mean() < 0.1
  with open(whole["png"], "rb") as a, open(streamed["png"], "rb") as b:
    assert a.read() == b.read()
  gif = Image.open(streamed["gif"])
  assert gif.n_frames == t and gif.info["loop"] == 0 and gif.info["duration"] in (120, 130)
  frames = _decode(streamed["gif"])
  grid = video_io.tile_videos(np.repeat(np.repeat(videos, 4, axis=2), 4, axis=3))  # upscaled to 128 px high
  assert frames.shape == grid.shape
  # A 256-colour palette per frame, no worse than PIL's whole-video GIF writer.
  pil = np.stack([np.asarray(f.convert("RGB")) for f in _pil_frames(writers.encode_gif(grid, 8.0))])
  err, pil_err = np.abs(frames.astype(int) - grid).mean(), np.abs(pil.astype(int) - grid).mean()
  print(f"gif mean abs error: streamed {err:.2f}, PIL {pil_err:.2f}")
  assert err <= pil_err
  sheet = np.asarray(Image.open(streamed["png"]).convert("RGB"))
  idx = np.linspace(0, t - 1, 5).round().astype(int)
  want = video_io.contact_sheet(np.repeat(np.repeat(videos[:, idx], 4, axis=2), 4, axis=3))
  np.testing.assert_array_equal(sheet, want)
  assert len(mp4) == t and np.abs(mp4 - grid).mean() < 2  # crf 12: close to the frames
  with pytest.raises(ValueError, match="no frames"):
    video_io.VideoWriter(str(tmp_path / "empty"), 8.0, 4).close()
