"""CLIP's VisionTransformer in OpenAI's layout."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.layers import LayerNorm, logical, matmul, normal
from clip_jax.models.transformer import Transformer
from clip_jax.sharding import on_auto_axes

Dtype = Any


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], patches in row-major order, pixels as (ph, pw, c)."""
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


class VisionTransformer(nn.Module):
  image_size: int
  patch_size: int
  width: int
  layers: int
  heads: int
  output_dim: int
  mlp_ratio: float = 4.0
  act: str = "gelu"
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """[B, output_dim] float32 from NHWC images; sharded over Explicit mesh axes too (computed
    under Auto axes: `sharding.on_auto_axes`)."""
    del train  # No dropout or batch norm in this tower.
    return on_auto_axes(self, VisionTransformer._encode, images)

  def _encode(self, images: jax.Array) -> jax.Array:  # Runs inside __call__'s compact scope.
    b, h, w, c = images.shape
    if h != self.image_size or w != self.image_size:
      raise ValueError(f"VisionTransformer expects {self.image_size}x{self.image_size} images, got {h}x{w}.")
    p, width = self.patch_size, self.width
    scale = width ** -0.5
    # The bias-free patch convolution, as a matmul over flattened patches. The kernel keeps
    # Flax's conv layout [p, p, C, width] so checkpoints read as a conv.
    conv_kernel = self.param("conv1", logical(nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
                                              (None, None, None, "embed")),
                             (p, p, c, width), self.param_dtype)
    x = matmul(patchify(images, p), conv_kernel.reshape(p * p * c, width), self.dtype)  # [B, N, width]
    x = x.astype(self.dtype)
    class_embedding = self.param("class_embedding", logical(normal(scale), ("embed",)), (width,),
                                 self.param_dtype)
    num_positions = (self.image_size // p) ** 2 + 1
    positional_embedding = self.param("positional_embedding", logical(normal(scale), (None, "embed")),
                                      (num_positions, width), self.param_dtype)
    cls = jnp.broadcast_to(class_embedding.astype(self.dtype), (b, 1, width))
    x = jnp.concatenate([cls, x], axis=1) + positional_embedding.astype(self.dtype)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = LayerNorm(name="ln_pre", **kw)(x)
    x = Transformer(self.layers, self.heads, self.mlp_ratio, self.act, is_causal=False, remat=self.remat,
                    name="transformer", **kw)(x)
    pooled = LayerNorm(name="ln_post", **kw)(x[:, 0])
    proj = self.param("proj", logical(normal(scale), ("embed", None)), (width, self.output_dim),
                      self.param_dtype)
    return matmul(pooled, proj, self.dtype)  # [B, output_dim], f32
