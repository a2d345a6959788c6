"""CLIP: an image tower and a text tower mapped to one embedding space, and a learned temperature."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from clip_jax.models.configs import CLIPConfig, get_config
from clip_jax.models.resnet import ModifiedResNet
from clip_jax.models.text import TextTransformer
from clip_jax.models.vit import VisionTransformer

Dtype = Any


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class CLIP(nn.Module):
  config: CLIPConfig
  dtype: Dtype = jnp.float32        # compute dtype
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  def setup(self):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat)
    if cfg.vision.is_resnet:
      self.visual = ModifiedResNet(cfg.vision.image_size, cfg.vision.layers, cfg.vision.width,
                                   cfg.vision.heads, cfg.embed_dim, **kw)
    else:
      self.visual = VisionTransformer(cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.width,
                                      cfg.vision.layers, cfg.vision.heads, cfg.embed_dim,
                                      cfg.vision.mlp_ratio, cfg.act, **kw)
    t = cfg.text
    self.text = TextTransformer(t.context_length, t.vocab_size, t.width, t.heads, t.layers, cfg.embed_dim,
                                t.mlp_ratio, cfg.act, eot_token_id=t.eot_token_id, **kw)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(cfg.init_logit_scale), (),
                                  jnp.float32)
    if cfg.init_logit_bias is not None:
      self.logit_bias = self.param("logit_bias", nn.initializers.constant(cfg.init_logit_bias), (),
                                   jnp.float32)

  def encode_image(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Projected, unnormalised image embeddings [B, embed_dim] from NHWC preprocessed images."""
    return self.visual(images, train=train)

  def encode_text(self, tokens: jax.Array) -> jax.Array:
    """Projected, unnormalised text embeddings [B, embed_dim] from token ids [B, T]."""
    return self.text(tokens)

  def __call__(self, images: jax.Array, tokens: jax.Array, train: bool = False):
    """(image_emb [N_img, embed_dim], text_emb [N_txt, embed_dim], logit_scale, logit_bias).

    NOTE: `logit_scale` is the LOG of the multiplier, as the parameter is stored (open_clip's
    `forward` returns `exp(logit_scale)` instead): use `exp(logit_scale)`, or call `get_logits`
    for the logits themselves. The embeddings are L2-normalised, float32; `logit_bias` is None for
    a model without one (CLIP), a scalar for a SigLIP-style model. The loss clamps and
    exponentiates the scale (`losses.clamp_logit_scale`).
    """
    image_emb = l2_normalize(self.encode_image(images, train=train))
    text_emb = l2_normalize(self.encode_text(tokens))
    logit_bias = self.logit_bias if self.config.init_logit_bias is not None else None
    return image_emb, text_emb, self.logit_scale, logit_bias

  def get_logits(self, images: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(logits_per_image [N_img, N_txt], logits_per_text [N_txt, N_img]), float32, as open_clip's
    `CLIP.get_logits`: exp(logit_scale) * cosine(image, text), plus logit_bias for a model that
    has one (SigLIP-style: read them with a sigmoid; CLIP: softmax over the texts,
    `jax.nn.softmax(logits_per_image, axis=-1)`, for zero-shot probabilities).

    `model.apply(variables, images, tokens, method=model.get_logits)` with NHWC preprocessed
    images [N_img, H, W, 3] (`clip_jax.preprocess`) and token ids [N_txt, T] (`clip_jax.tokenize`).
    """
    image_emb, text_emb, logit_scale, logit_bias = self(images, tokens)
    logits_per_image = jnp.exp(logit_scale) * jnp.matmul(image_emb, _replicated(text_emb).T)
    if logit_bias is not None:
      logits_per_image = logits_per_image + logit_bias
    return logits_per_image, logits_per_image.T


def _replicated(x: jax.Array) -> jax.Array:
  """x whole on every device where it is split over Explicit mesh axes (there a product of two
  batch-split operands needs its output sharding stated); as it is otherwise."""
  sharding = jax.typeof(x).sharding
  if AxisType.Explicit not in sharding.mesh.axis_types:
    return x
  return jax.reshard(x, NamedSharding(sharding.mesh, P()))


def create_model(name: str | CLIPConfig, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 remat: bool = False, **config_overrides: Any) -> CLIP:
  """The Flax module of a named config (see `clip_jax.models.configs.MODEL_CONFIGS`).

  `config_overrides` replace config fields, e.g. `act='quick_gelu'`, `embed_dim=256`,
  `vision={'image_size': 64}`.
  """
  config = name if isinstance(name, CLIPConfig) else get_config(name)
  if config_overrides:
    config = config.replace(**config_overrides)
  return CLIP(config, dtype=dtype, param_dtype=param_dtype, remat=remat)


def init_variables(model: CLIP, rng: jax.Array, batch_size: int = 1) -> dict:
  """Plain (unboxed) variables of `model`, for single-device use and tests.

  Sharded initialisation for training goes through `jax.eval_shape` and the mesh rules instead.
  """
  cfg = model.config
  images = jnp.zeros((batch_size, cfg.vision.image_size, cfg.vision.image_size, 3), jnp.float32)
  tokens = jnp.zeros((batch_size, cfg.text.context_length), jnp.int32)
  variables = jax.jit(model.init)(rng, images, tokens)
  return nn.meta.unbox(variables)
