"""plan.py counts equal a direct count of materialised params (tiny) and the known SD sizes (shapes only)."""

import flax.linen as nn
import jax
import pytest

from configs import rds, webvid
from videoldm_jax import optim, plan, tasks
from videoldm_jax.models import unet as unet_lib
from videoldm_jax.models import vae as vae_lib


def test_plan_matches_direct_count_tiny():
  config = rds.get_config("stage=image,runlocal")
  p = plan.plan(config)
  task = tasks.get(config.stage)(config)
  # Independent counts: the model modules' own abstract-param helpers, and the label tables by hand.
  n_unet = unet_lib.count_params(unet_lib.abstract_params(task.unet_config))
  n_vae = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(vae_lib.abstract_params(task.vae_config))))
  dim = task.unet_config.cross_attention_dim
  n_labels = sum((n + 1) * dim for n in config.model.label_classes)
  assert p["params"] == {"total": n_unet + n_vae + n_labels, "trainable": n_unet + n_labels, "frozen": n_vae}
  assert p["components"]["vae"]["trainable"] == 0
  trainable, _ = optim.split(nn.meta.unbox(jax.eval_shape(task.init, jax.random.PRNGKey(0))), config.trainable)
  opt = jax.eval_shape(task.tx.init, trainable)
  # Adam's two moments per trainable param (+ scalar counters), nothing for frozen params.
  assert abs(p["bytes"]["optimizer_state"] - 2 * 4 * (n_unet + n_labels)) < 64
  assert p["bytes"]["optimizer_state"] == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt))
  assert p["bytes"]["ema"] == p["bytes"]["trainable_params"] == 4 * (n_unet + n_labels)
  assert "params:" in plan.format_table(p)


@pytest.mark.slow
def test_plan_sd15_image_sizes():
  p = plan.plan(webvid.get_config("stage=image,variant=sd15"))
  comps = p["components"]
  assert comps["unet"]["total"] == 859_520_964   # SD 1.x U-Net
  assert comps["text_encoder"]["total"] == 123_060_480  # CLIP ViT-L/14 text
  assert 83e6 < comps["vae"]["total"] < 84e6
  # Adam: two fp32 moments per trainable param (+ scalar counters).
  assert abs(p["bytes"]["optimizer_state"] - 2 * p["bytes"]["trainable_params"]) < 1024


@pytest.mark.slow
def test_plan_sd15_video_freeze_mask():
  p = plan.plan(webvid.get_config("stage=base,variant=sd15"))
  unet = p["components"]["unet"]
  # Only the temporal layers train: 649M in the paper (Appendix H.2.1, SD 1.4 backbone).
  assert p["params"]["trainable"] == unet["trainable"] == unet["temporal"]
  assert abs(unet["temporal"] - 649e6) < 1e6
  assert unet["total"] - unet["temporal"] == 859_520_964  # the frozen spatial U-Net is exactly SD's
  assert p["params"]["frozen"] == 859_520_964 + p["components"]["vae"]["total"] + \
      p["components"]["text_encoder"]["total"]


def test_set_attention_overrides_only_the_unet_attention():
  config = rds.get_config("stage=base,runlocal")
  config.model.unet_overrides = dict(config.model.unet_overrides, remat="dots")
  plan.set_attention(config, "splash")
  assert config.model.unet_overrides["attention_implementation"] == "splash"
  assert config.model.unet_overrides["remat"] == "dots"
  assert plan.attention_of(tasks.get("base")(config)) == "splash"
  plan.set_attention(config, "auto")  # back to the default: the key is gone
  assert "attention_implementation" not in config.model.unet_overrides
  assert plan.attention_of(tasks.get("base")(config)) == "auto"
  with pytest.raises(ValueError, match="attention='flash'"):
    plan.set_attention(config, "flash")
