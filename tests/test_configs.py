"""Config files load, validate, and reject mistakes with the offending key named in the message."""

import pytest

from configs import rds, webvid
from videoldm_jax import config_lib, parallel, tasks, train


@pytest.mark.parametrize("module,arg", [
    (rds, "stage=image"), (rds, "stage=base"), (rds, "stage=image,runlocal"), (rds, "stage=base,runlocal"),
    (webvid, "stage=base,variant=sd15"), (webvid, "stage=base,variant=sd21"), (webvid, "stage=image"),
    (webvid, "stage=base,runlocal"),
])
def test_configs_validate(module, arg):
  config = module.get_config(arg)
  tasks.validate(config)
  assert config.stage in arg
  assert ("runlocal" in arg) == config.runlocal


def test_docstrings_show_their_commands():
  for module in (rds, webvid):
    assert "python -m videoldm_jax.train --config=configs/" in module.__doc__


def test_parse_arg():
  a = config_lib.parse_arg("stage=image,runlocal,n=3", stage="base", runlocal=False, n=1)
  assert (a.stage, a.runlocal, a.n) == ("image", True, 3)
  with pytest.raises(ValueError, match="'colour'"):
    config_lib.parse_arg("colour=red", stage="base")
  with pytest.raises(ValueError, match="'n' needs a value"):
    config_lib.parse_arg("n", n=1)


def _base():
  return rds.get_config("stage=base,runlocal")


def test_unknown_key_is_named():
  config = _base()
  config.unlock()
  config.optimizer.learning_rate = 1e-3
  with pytest.raises(ValueError, match=r"config\.optimizer\.learning_rate: unknown key"):
    tasks.validate(config)
  config = _base()
  config.unlock()
  config.data.framez = 3
  with pytest.raises(ValueError, match=r"config\.data\.framez: unknown key"):
    tasks.validate(config)


def test_bad_values_are_named():
  config = _base()
  config.dtype = "float16"
  with pytest.raises(ValueError, match=r"config\.dtype='float16'"):
    tasks.validate(config)
  config = _base()
  config.trainable = "(temporal"
  with pytest.raises(ValueError, match=r"config\.trainable"):
    tasks.validate(config)
  config = _base()
  config.mesh.rules = "zero3"
  with pytest.raises(ValueError, match=r"config\.mesh\.rules"):
    tasks.validate(config)


def test_batch_must_divide_data_parallel_size():
  config = _base()
  config.batch_size = 12
  mesh = parallel.make_mesh(config)  # data=8 on the 8 test devices
  with pytest.raises(ValueError, match=r"config\.batch_size=12 is not divisible by the data-parallel size 8"):
    config_lib.validate_for_mesh(config, parallel.data_parallel_size(mesh))


def test_stage_checks_name_the_key():
  config = _base()
  config.data.num_frames = 1
  with pytest.raises(ValueError, match=r"config\.data\.num_frames=1"):
    tasks.get("base")(config)
  config = rds.get_config("stage=image,runlocal")
  config.data.num_frames = 4
  with pytest.raises(ValueError, match=r"config\.data\.num_frames=4.*image stage"):
    tasks.get("image")(config)
  config = _base()
  config.data.height = 36
  with pytest.raises(ValueError, match=r"config\.data\.height=36 must be a multiple of 16"):
    tasks.get("base")(config)
  config = _base()
  config.model.unet_overrides.widht = 3
  with pytest.raises(ValueError, match=r"config\.model\.unet_overrides\.widht"):
    tasks.get("base")(config)
  config = _base()
  config.stage = "upscaler"
  with pytest.raises(ValueError, match=r"config\.stage='upscaler': unknown stage"):
    tasks.get(config.stage)


def test_clip_length_vs_pre_encoded_latents(tmp_path):
  (tmp_path / "latents_info.json").write_text('{"num_frames": 4, "scaling_factor": 0.18215}')
  config = _base()
  config.data.source = "latents"
  config.data.data_dir = str(tmp_path)
  with pytest.raises(ValueError, match=r"config\.data\.num_frames=8 exceeds the 4 frames"):
    tasks.get("base")(config)


def test_video_stage_without_model_init_is_refused():
  config = rds.get_config("stage=base")  # full size: no random backbone allowed
  task = tasks.get("base")(config)
  with pytest.raises(ValueError, match=r"config\.model_init is empty"):
    train.check_model_init(config, task)
  config.model_init = "/some/image/workdir"
  train.check_model_init(config, task)
