"""CLIP text encoders (SD 1.x: OpenAI ViT-L/14, SD 2.x: OpenCLIP ViT-H/14) in linen.

Param paths mirror the state-dict keys of ``transformers.CLIPTextModel`` without the ``text_model.`` prefix
(``encoder.layers.3.self_attn.q_proj.weight`` <-> ``encoder/layers_3/self_attn/q_proj/kernel``), so weights
convert mechanically (see ``videoldm_jax/conversion/clip.py``).

Which hidden state conditions the U-Net is a config field, ``output_layer``:

* SD 1.x (``FrozenCLIPEmbedder``) uses ``final_layer_norm(last layer)``: ``output_layer=-1``.
* SD 2.x (``FrozenOpenCLIPEmbedder(layer="penultimate")``) runs the 24-block OpenCLIP text tower up to and
  including block 22 (0-based), skipping the last block, then applies ``ln_final``: ``output_layer=-2``.
  diffusers' converted SD 2.x ``text_encoder`` expresses the same computation as a 23-layer ``CLIPTextModel``
  (``convert_open_clip_checkpoint`` drops ``resblocks.23`` and ``text_projection``) whose ``last_hidden_state`` is
  ``final_layer_norm(output of layer 22)``. Both load here: the single file as ``openclip_vit_h14()`` (24 layers,
  ``output_layer=-2``, all params kept), the diffusers folder as a 23-layer config with ``output_layer=-1``;
  their conditioning is identical. We keep the 24th block and ``text_projection`` because they define the
  OpenCLIP pooled text embedding (``text_embeds``); under ``jit`` they cost nothing when only the
  conditioning is used (XLA removes the dead computation).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from videoldm_jax.models.layers import dense, dot_product_attention, layer_norm

Dtype = Any

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Hyper-parameters of a CLIP text transformer (field names follow ``transformers.CLIPTextConfig``).

  ``output_layer``: which block's output (``-1`` last, ``-2`` penultimate, ...) goes through
  ``final_layer_norm`` to form the conditioning ``last_hidden_state``.
  ``projection_dim``: size of the bias-free ``text_projection`` applied to the pooled EOS state
  (OpenCLIP / ``CLIPTextModelWithProjection``); ``None`` = no projection (SD 1.x).
  """
  vocab_size: int = 49408
  max_position_embeddings: int = 77
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  output_layer: int = -1
  projection_dim: Optional[int] = None

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
    if not -self.num_hidden_layers <= self.output_layer <= -1:
      raise ValueError(f"output_layer must be in [-{self.num_hidden_layers}, -1], got {self.output_layer}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads")

  def to_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "CLIPTextConfig":
    return cls(**dict(d))

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True)

  @classmethod
  def from_json(cls, s: str) -> "CLIPTextConfig":
    return cls.from_dict(json.loads(s))

  @property
  def output_depth(self) -> int:
    """Number of blocks feeding the conditioning (e.g. 23 for ``openclip_vit_h14``)."""
    return self.num_hidden_layers + 1 + self.output_layer


def vit_l14() -> CLIPTextConfig:
  """OpenAI CLIP ViT-L/14 text encoder (SD 1.x), 123,060,480 params; conditioning = last layer."""
  return CLIPTextConfig()


def openclip_vit_h14() -> CLIPTextConfig:
  """OpenCLIP ViT-H/14 text tower (SD 2.x), 354,032,640 params incl. the last block and ``text_projection``;
  conditioning = penultimate block + ``final_layer_norm``."""
  return CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                        hidden_act="gelu", output_layer=-2, projection_dim=1024)


def tiny(**overrides) -> CLIPTextConfig:
  """A CPU-test-sized config with the real vocabulary and context length."""
  kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
  kw.update(overrides)
  return CLIPTextConfig(**kw)


def clip_config_from_transformers(config: Any, *, with_projection: Optional[bool] = None,
                                  output_layer: int = -1) -> CLIPTextConfig:
  """``CLIPTextConfig`` from a transformers config (dict, ``config.json`` contents or config object).

  Accepts a text config or a full ``CLIPConfig`` (its ``text_config`` is used). ``with_projection``: keep
  ``projection_dim`` (default: only for ``CLIPTextModelWithProjection`` architectures).
  """
  d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  if "text_config" in d and d["text_config"] is not None:
    architectures = d.get("architectures") or []
    d = dict(d["text_config"], architectures=architectures)
  if with_projection is None:
    with_projection = any("WithProjection" in a for a in (d.get("architectures") or []))
  defaults = CLIPTextConfig()
  return CLIPTextConfig(
      vocab_size=int(d.get("vocab_size", defaults.vocab_size)),
      max_position_embeddings=int(d.get("max_position_embeddings", defaults.max_position_embeddings)),
      hidden_size=int(d.get("hidden_size", defaults.hidden_size)),
      intermediate_size=int(d.get("intermediate_size", defaults.intermediate_size)),
      num_hidden_layers=int(d.get("num_hidden_layers", defaults.num_hidden_layers)),
      num_attention_heads=int(d.get("num_attention_heads", defaults.num_attention_heads)),
      hidden_act=str(d.get("hidden_act", defaults.hidden_act)),
      layer_norm_eps=float(d.get("layer_norm_eps", defaults.layer_norm_eps)),
      output_layer=output_layer,
      projection_dim=int(d.get("projection_dim", 512)) if with_projection else None,
  )


# ----------------------------------------------------------------------------------------------------------
# Modules.

def _activation(name: str, x: jax.Array) -> jax.Array:
  if name == "quick_gelu":
    return x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":
    return nn.gelu(x, approximate=False)  # torch nn.GELU() / transformers "gelu" are the exact erf form
  return nn.gelu(x, approximate=True)


def embed_table(num: int, features: int, *, name: str, axes, dtype: Dtype, param_dtype: Dtype, std: float) -> nn.Embed:
  """A learned ``[num, features]`` table (tokens, positions) with normal(std) init and logical ``axes``."""
  return nn.Embed(num, features, dtype=dtype, param_dtype=param_dtype, name=name,
                  embedding_init=nn.with_logical_partitioning(nn.initializers.normal(std), axes))


class CLIPTextEmbeddings(nn.Module):
  """Token + learned absolute position embeddings. ``[b, n] int -> [b, n, d]``."""
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    tokens = embed_table(cfg.vocab_size, cfg.hidden_size, name="token_embedding", axes=("vocab", "embed"), std=0.02,
                    **kw)(input_ids)
    # 77 rows rarely divide a mesh axis, so the position table is only sharded along "embed".
    positions = embed_table(cfg.max_position_embeddings, cfg.hidden_size, name="position_embedding",
                       axes=(None, "embed"), std=0.01, **kw)(jnp.arange(input_ids.shape[-1]))
    return tokens + positions[None]


class CLIPAttention(nn.Module):
  """Causal multi-head self-attention with separate q/k/v/out projections. ``[b, n, d] -> [b, n, d]``."""
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    d = self.config.hidden_size
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = dense(d, axes=("embed", "heads"), name="q_proj", **kw)(x)
    k = dense(d, axes=("embed", "heads"), name="k_proj", **kw)(x)
    v = dense(d, axes=("embed", "heads"), name="v_proj", **kw)(x)
    out = dot_product_attention(q, k, v, num_heads=self.config.num_attention_heads, mask=mask,
                                implementation=self.attention_implementation)
    return dense(d, axes=("heads", "embed"), name="out_proj", **kw)(out)


class CLIPMLP(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = dense(self.config.intermediate_size, axes=("embed", "mlp"), name="fc1", **kw)(x)
    x = _activation(self.config.hidden_act, x)
    return dense(self.config.hidden_size, axes=("mlp", "embed"), name="fc2", **kw)(x)


class CLIPEncoderLayer(nn.Module):
  """Pre-LN transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    eps = self.config.layer_norm_eps
    h = layer_norm(name="layer_norm1", epsilon=eps, **kw)(x)
    x = x + CLIPAttention(self.config, attention_implementation=self.attention_implementation, name="self_attn",
                          **kw)(h, mask)
    h = layer_norm(name="layer_norm2", epsilon=eps, **kw)(x)
    x = x + CLIPMLP(self.config, name="mlp", **kw)(h)
    return nn.with_logical_constraint(x, ("batch", None, "embed"))


class CLIPEncoder(nn.Module):
  """The stack of blocks; returns the output of every block (``num_hidden_layers`` arrays ``[b, n, d]``)."""
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array):
    outputs = []
    for i in range(self.config.num_hidden_layers):
      x = CLIPEncoderLayer(self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                           attention_implementation=self.attention_implementation, name=f"layers_{i}")(x, mask)
      outputs.append(x)
    return outputs


class CLIPTextEncoder(nn.Module):
  """CLIP text transformer.

  ``__call__(input_ids [b, n] int32)`` returns a dict:
    ``last_hidden_state`` ``[b, n, d]``: the U-Net conditioning, ``final_layer_norm`` of block
      ``config.output_layer`` (``hidden_states`` is the same array under a second name);
    ``pooled`` ``[b, d]``: ``final_layer_norm`` of the LAST block at the EOS position, found as the argmax id
      (EOS 49407 is the largest id), like transformers' ``pooler_output`` and OpenCLIP's pooling;
    ``text_embeds`` ``[b, projection_dim]``: ``pooled @ text_projection`` (only if ``projection_dim``), equal to
      OpenCLIP ``encode_text`` before normalisation.
  """
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_implementation: Optional[str] = None

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> Dict[str, jax.Array]:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n = input_ids.shape[-1]
    if n > cfg.max_position_embeddings:
      raise ValueError(f"sequence length {n} exceeds max_position_embeddings {cfg.max_position_embeddings}")
    x = CLIPTextEmbeddings(cfg, name="embeddings", **kw)(input_ids)
    causal = jnp.tril(jnp.ones((n, n), dtype=jnp.bool_))[None, None]  # [1, 1, n_q, n_k], True = attend
    outputs = CLIPEncoder(cfg, attention_implementation=self.attention_implementation, name="encoder", **kw)(
        x, causal)
    final_norm = layer_norm(name="final_layer_norm", epsilon=cfg.layer_norm_eps, **kw)
    last = final_norm(outputs[-1])
    conditioning = last if cfg.output_layer == -1 else final_norm(outputs[cfg.output_layer])
    eos = jnp.argmax(input_ids, axis=-1)
    pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]
    result = {"last_hidden_state": conditioning, "hidden_states": conditioning, "pooled": pooled}
    if cfg.projection_dim:
      result["text_embeds"] = dense(cfg.projection_dim, use_bias=False, axes=("embed", "mlp"), name="text_projection",
                                    **kw)(pooled)
    return result
