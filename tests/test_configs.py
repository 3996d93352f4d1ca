"""Config files load, validate, and reject mistakes with the offending key named in the message; a stage's schema,
checks and batch come from its task (the stage contract of videoldm_jax/tasks)."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from configs import rds, webvid
from videoldm_jax import config_lib, parallel, plan, tasks, train
from videoldm_jax.tasks import common as task_common


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
  config.data.num_frames = 4  # clips: every frame its own image (the equal-data image arm of the ablations)
  tasks.get("image")(config)
  config.data.num_frames = 0
  with pytest.raises(ValueError, match=r"config\.data\.num_frames=0.*image stage"):
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


def test_stage_sections_come_from_the_task():
  base, pred, ae = (tasks.default_config(s) for s in ("base", "predictor", "autoencoder"))
  assert "masked" not in base and "autoencoder" not in base and "context_guidance" not in base.sampling
  assert pred.masked.stride == 4 and pred.sampling.context_guidance == 1.0 and pred.diffusion.prediction == "eps"
  assert "diffusion" not in ae and ae.autoencoder.disc_start == 50001
  config = rds.get_config("stage=image,runlocal")
  config.unlock()
  config.masked = ml_collections.ConfigDict({"stride": 4})  # a predictor key in an image config
  with pytest.raises(ValueError, match=r"config\.masked: unknown key for stage 'image'"):
    tasks.validate(config)


class _Toy(task_common.Task):
  """A stage declared in one class: its section, its check, its batch."""

  @classmethod
  def config_defaults(cls, stage):
    return {"toy": {"width": 3}, "sampling": {"wiggle": 0.5}}

  @classmethod
  def validate_config(cls, config):
    if config.toy.width < 1:
      raise ValueError(f"config.toy.width={config.toy.width} must be >= 1")


def test_a_stage_registers_itself_and_owns_its_schema():
  tasks.register("toy_contract")(_Toy)
  config = tasks.default_config("toy_contract")
  assert config.stage == "toy_contract" and config.toy.width == 3 and config.sampling.wiggle == 0.5
  assert config.sampling.num_samples == config_lib.base_config().sampling.num_samples  # generic keys kept
  tasks.validate(config)
  config.toy.width = 0
  with pytest.raises(ValueError, match=r"config\.toy\.width=0"):
    tasks.validate(config)
  config.toy.width = 2
  config.toy.height = 2
  with pytest.raises(ValueError, match=r"config\.toy\.height: unknown key"):
    tasks.validate(config)
  assert "toy_contract" in tasks.stages() and tasks.stages()["base"].__name__ == "LatentDiffusionTask"


@pytest.mark.parametrize("module,arg", [(rds, "stage=autoencoder,runlocal"), (rds, "stage=image,runlocal"),
                                        (rds, "stage=base,runlocal"), (rds, "stage=predictor,runlocal"),
                                        (rds, "stage=interpolator,runlocal"), (webvid, "stage=base,runlocal")])
def test_abstract_batch_is_the_pipeline_batch(module, arg):
  """What the planner compiles with (``plan.abstract_batch`` asks the task) is exactly what the loop trains on."""
  config = module.get_config(arg)
  config.batch_size = 2
  mesh = parallel.make_mesh(config, devices=jax.devices()[:1])
  task = tasks.get(config.stage)(config)
  batch = next(task.input_pipeline(mesh))
  train.check_batch(batch, plan.abstract_batch(config, task, 2, "pixels"))
  shapes = lambda tree: jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), tree)  # noqa: E731
  assert shapes(batch) == shapes(plan.abstract_batch(config, task, 2, "pixels"))


def test_loop_refuses_a_batch_the_task_does_not_declare():
  config = rds.get_config("stage=predictor,runlocal")
  task = tasks.get("predictor")(config)
  declared = task.abstract_batch(4)
  batch = dict(declared)
  del batch["fps"]
  with pytest.raises(ValueError, match=r"batch field 'fps'.*gives nothing"):
    train.check_batch(batch, declared)
  batch = dict(declared, cond_mask=jax.ShapeDtypeStruct((4,), jnp.int32))
  with pytest.raises(ValueError, match=r"batch field 'cond_mask'"):
    train.check_batch(batch, declared)


def _fake_workdir(path, config: dict, info: dict = None):
  """A training workdir as far as config checks look: config.json, a checkpoints/ folder, info.json."""
  (path / "checkpoints").mkdir(parents=True)
  (path / "config.json").write_text(json.dumps(config))
  if info is not None:
    (path / "info.json").write_text(json.dumps(info))
  return str(path)


def test_prediction_type_of_a_workdir_source_is_checked(tmp_path):
  eps_workdir = _fake_workdir(tmp_path / "image_eps", {"stage": "image", "diffusion": {"prediction": "eps"}})
  config = rds.get_config("stage=base,runlocal")  # v-prediction
  config.model_init = eps_workdir
  with pytest.raises(ValueError, match=r"config\.diffusion\.prediction='v' but config\.model_init .* 'eps'"):
    tasks.validate(config)
  config.diffusion.prediction = "eps"
  tasks.validate(config)
  # An autoencoder workdir has no prediction type: nothing to check.
  config = rds.get_config("stage=image,runlocal")
  config.model_init = _fake_workdir(tmp_path / "ae", {"stage": "autoencoder", "model": {"vae": "tiny"}})
  tasks.validate(config)


def test_vae_scale_comes_from_the_autoencoder_workdir(tmp_path):
  ae = _fake_workdir(tmp_path / "ae", {"stage": "autoencoder", "model": {"vae": "tiny"}}, {"vae_scaling_factor": 0.77})
  config = rds.get_config("stage=image,runlocal")
  config.model_init = ae
  resolved = tasks.get("image").resolve_config(config)
  assert resolved.model.vae_overrides["scaling_factor"] == pytest.approx(0.77)
  assert "scaling_factor" not in config.model.vae_overrides  # the caller's config is not changed
  # A stage built on that stage's workdir inherits the scale it trained with.
  image = _fake_workdir(tmp_path / "image", json.loads(resolved.to_json()))
  base = rds.get_config("stage=base,runlocal")
  base.model_init = image
  assert tasks.get("base").resolve_config(base).model.vae_overrides["scaling_factor"] == pytest.approx(0.77)
  # An explicit scale that disagrees is refused, naming both.
  base.model.vae_overrides = {"scaling_factor": 0.5}
  with pytest.raises(ValueError, match=r"scaling_factor=0\.5 but the VAE of config\.model_init .* 0\.77"):
    tasks.get("base").resolve_config(base)


def test_latents_must_carry_the_models_scale(tmp_path):
  (tmp_path / "latents_info.json").write_text('{"num_frames": 8, "scaling_factor": 0.5}')
  config = _base()
  config.data.source = "latents"
  config.data.data_dir = str(tmp_path)
  with pytest.raises(ValueError, match=r"scaled by 0\.5 .* scaling_factor 0\.18215"):
    tasks.validate(config)
  config.model.vae_overrides = {"scaling_factor": 0.5}
  tasks.validate(config)
