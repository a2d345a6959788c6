"""CLIP's causal text Transformer, pooled at the end-of-text token.

Also the text encoder of Stable Diffusion (`hidden_states`): SD 1.x uses OpenAI's ViT-L/14 text
tower's last layer, SD 2.x OpenCLIP ViT-H/14's penultimate layer, both after the final LayerNorm.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.layers import LayerNorm, logical, matmul, normal
from clip_jax.models.transformer import Transformer

Dtype = Any


class TextTransformer(nn.Module):
  context_length: int
  vocab_size: int
  width: int
  heads: int
  layers: int
  output_dim: int | None  # None: no projection (a bare text encoder, as Stable Diffusion's).
  mlp_ratio: float = 4.0
  act: str = "gelu"
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.token_embedding = self.param("token_embedding", logical(normal(0.02), ("vocab", "embed")),
                                      (self.vocab_size, self.width), self.param_dtype)
    self.positional_embedding = self.param("positional_embedding", logical(normal(0.01), (None, "embed")),
                                           (self.context_length, self.width), self.param_dtype)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.transformer = Transformer(self.layers, self.heads, self.mlp_ratio, self.act, is_causal=True,
                                   remat=self.remat, **kw)
    self.ln_final = LayerNorm(**kw)
    if self.output_dim is not None:
      self.text_projection = self.param("text_projection", logical(normal(self.width ** -0.5),
                                                                   ("embed", None)),
                                        (self.width, self.output_dim), self.param_dtype)

  def hidden_states(self, tokens: jax.Array, num_layers: int | None = None) -> jax.Array:
    """Per-token features [B, T, width] after `num_layers` blocks (all by default) and ln_final."""
    if tokens.shape[-1] > self.context_length:
      raise ValueError(f"Token sequences of length {tokens.shape[-1]} exceed the context length "
                       f"{self.context_length}.")
    x = jnp.take(self.token_embedding, tokens, axis=0).astype(self.dtype)
    x = x + self.positional_embedding[:tokens.shape[-1]].astype(self.dtype)
    x = self.transformer(x, num_layers=num_layers)
    return self.ln_final(x)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Projected features [B, output_dim] at the end-of-text token, which has the largest id."""
    x = self.hidden_states(tokens)
    eot_index = jnp.argmax(tokens, axis=-1)
    pooled = jnp.take_along_axis(x, eot_index[:, None, None], axis=1)[:, 0]  # [B, width]
    if self.output_dim is None:
      return pooled.astype(jnp.float32)
    return matmul(pooled, self.text_projection, self.dtype)
