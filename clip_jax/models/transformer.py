"""The pre-LN residual attention Transformer both CLIP towers use (OpenAI's layout)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.layers import Dense, LayerNorm, dot_product_attention, get_activation, normal

Dtype = Any


class MultiHeadAttention(nn.Module):
  """Self- or pooled attention with separate q/k/v projections.

  Separate projections (not OpenAI's fused in_proj) keep each kernel [embed, heads*head_dim], so a
  'heads' mesh axis splits it on whole heads; the converters split/fuse OpenAI's in_proj.
  """
  num_heads: int
  qkv_std: float | None = None
  out_std: float | None = None
  out_features: int | None = None
  attention_impl: str = "auto"  # see clip_jax.layers.dot_product_attention
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_q: jax.Array, x_kv: jax.Array, is_causal: bool = False) -> jax.Array:
    width = x_kv.shape[-1]
    head_dim = width // self.num_heads

    def proj(name, features, axes, std):
      init = normal(std) if std is not None else nn.initializers.lecun_normal()
      return Dense(features, kernel_axes=axes, kernel_init=init, dtype=self.dtype,
                   param_dtype=self.param_dtype, name=name)

    def split_heads(t):  # [B, T, width] -> [B, T, heads, head_dim]
      return t.reshape(*t.shape[:-1], self.num_heads, head_dim)

    q = split_heads(proj("q", width, ("embed", "heads"), self.qkv_std)(x_q))
    k = split_heads(proj("k", width, ("embed", "heads"), self.qkv_std)(x_kv))
    v = split_heads(proj("v", width, ("embed", "heads"), self.qkv_std)(x_kv))
    # [B, Tq, heads, head_dim]
    out = dot_product_attention(q, k, v, is_causal=is_causal, impl=self.attention_impl)
    out = out.reshape(*out.shape[:-2], width)
    return proj("out", self.out_features or width, ("heads", "embed"), self.out_std)(out)


class ResidualAttentionBlock(nn.Module):
  num_heads: int
  mlp_ratio: float = 4.0
  act: str = "gelu"
  is_causal: bool = False
  init_stds: tuple[float, float, float, float] | None = None  # qkv, out, fc, proj
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    qkv_std, out_std, fc_std, proj_std = self.init_stds or (None,) * 4
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = LayerNorm(name="ln_1", **kw)(x)
    x = x + MultiHeadAttention(self.num_heads, qkv_std, out_std, attention_impl=self.attention_impl,
                               name="attn", **kw)(
        h, h, is_causal=self.is_causal)
    h = LayerNorm(name="ln_2", **kw)(x)
    fc_init = normal(fc_std) if fc_std else nn.initializers.lecun_normal()
    proj_init = normal(proj_std) if proj_std else nn.initializers.lecun_normal()
    h = Dense(int(width * self.mlp_ratio), kernel_axes=("embed", "mlp"), kernel_init=fc_init,
              name="c_fc", **kw)(h)
    h = get_activation(self.act)(h)
    h = Dense(width, kernel_axes=("mlp", "embed"), kernel_init=proj_init, name="c_proj", **kw)(h)
    return x + h


class Transformer(nn.Module):
  """`layers` residual blocks. `num_layers` at call time runs only the first blocks: Stable
  Diffusion 2.x conditions on the penultimate layer of its text tower."""
  layers: int
  num_heads: int
  mlp_ratio: float = 4.0
  act: str = "gelu"
  is_causal: bool = False
  remat: bool = False
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, num_layers: int | None = None) -> jax.Array:
    width = x.shape[-1]
    # OpenAI's scheme: residual-branch outputs shrink with depth so the stream's variance stays put.
    init_stds = (width ** -0.5, width ** -0.5 * (2 * self.layers) ** -0.5,
                 (2 * width) ** -0.5, width ** -0.5 * (2 * self.layers) ** -0.5)
    block_cls = nn.remat(ResidualAttentionBlock) if self.remat else ResidualAttentionBlock
    for i in range(self.layers if num_layers is None else num_layers):
      x = block_cls(self.num_heads, self.mlp_ratio, self.act, self.is_causal, init_stds, self.attention_impl,
                    dtype=self.dtype, param_dtype=self.param_dtype, name=f"resblocks_{i}")(x)
    return x
