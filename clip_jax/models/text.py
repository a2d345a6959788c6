"""CLIP's causal text Transformer, pooled at the end-of-text token.

Where the end-of-text token is: OpenAI's CLIP takes argmax(token id), which finds it because it has
the largest id in the CLIP vocabulary (`eot_token_id=None`). A vocabulary with tokens added after it
(Hugging Face CLIPs with extra tokens) breaks that rule; there, as in transformers' CLIPTextTransformer
and open_clip's `pool_type='eos'`, the first position holding `eot_token_id` is taken (position 0 when
a row has none, as they do).

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
from clip_jax.sharding import on_auto_axes

Dtype = Any


def pool_index(tokens: jax.Array, eot_token_id: int | None) -> jax.Array:
  """Position [B] of the end-of-text token in each row of `tokens` [B, T]: the first
  `eot_token_id` (0 if the row has none, as transformers), or argmax(id) when it is None."""
  if eot_token_id is None:
    return jnp.argmax(tokens, axis=-1)
  return jnp.argmax(tokens == eot_token_id, axis=-1)


class TextTransformer(nn.Module):
  context_length: int
  vocab_size: int
  width: int
  heads: int
  layers: int
  output_dim: int | None  # None: no projection (a bare text encoder, as Stable Diffusion's).
  mlp_ratio: float = 4.0
  act: str = "gelu"
  eot_token_id: int | None = None  # pool at the first eot_token_id; None: at argmax(id) (OpenAI's rule)
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
    """Per-token features [B, T, width] after `num_layers` blocks (all by default) and ln_final.
    Tokens sharded over Explicit mesh axes are computed under Auto axes (`sharding.on_auto_axes`)."""
    if tokens.shape[-1] > self.context_length:
      raise ValueError(f"Token sequences of length {tokens.shape[-1]} exceed the context length "
                       f"{self.context_length}.")
    return on_auto_axes(self, TextTransformer._hidden_states, tokens, num_layers)

  def _hidden_states(self, tokens: jax.Array, num_layers: int | None) -> jax.Array:
    x = jnp.take(self.token_embedding, tokens, axis=0).astype(self.dtype)
    x = x + self.positional_embedding[:tokens.shape[-1]].astype(self.dtype)
    x = self.transformer(x, num_layers=num_layers)
    return self.ln_final(x)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Features at the end-of-text token (see the module docstring): [B, output_dim] projected,
    or [B, width] float32 without a projection."""
    return on_auto_axes(self, TextTransformer._pooled, tokens)

  def _pooled(self, tokens: jax.Array) -> jax.Array:
    x = self.hidden_states(tokens)
    eot_index = pool_index(tokens, self.eot_token_id)
    pooled = jnp.take_along_axis(x, eot_index[:, None, None], axis=1)[:, 0]  # [B, width]
    if self.output_dim is None:
      return pooled.astype(jnp.float32)
    return matmul(pooled, self.text_projection, self.dtype)
