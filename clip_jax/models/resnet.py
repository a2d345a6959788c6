"""CLIP's ModifiedResNet: a 3-conv stem, anti-aliased strided bottlenecks (average pooling before
the strided 1x1 instead of a strided conv), and attention pooling in place of global average pooling."""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.layers import BatchNorm, Conv, logical, normal
from clip_jax.models.transformer import MultiHeadAttention
from clip_jax.sharding import on_auto_axes

Dtype = Any
_CONV_AXES = (None, None, "conv_in", "conv_out")


def avg_pool(x: jax.Array, stride: int) -> jax.Array:
  return nn.avg_pool(x, (stride, stride), strides=(stride, stride)) if stride > 1 else x


class ConvBN(nn.Module):
  """Bias-free conv followed by batch norm (torch's eps 1e-5 and momentum 0.1)."""
  features: int
  kernel: int
  zero_init_scale: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    pad = self.kernel // 2
    x = Conv(self.features, (self.kernel, self.kernel), padding=((pad, pad), (pad, pad)), use_bias=False,
             kernel_axes=_CONV_AXES, kernel_init=nn.initializers.kaiming_normal(),
             dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
    scale_init = nn.initializers.zeros if self.zero_init_scale else nn.initializers.ones
    return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                     scale_init=logical(scale_init, ("conv_out",)),
                     bias_init=logical(nn.initializers.zeros, ("conv_out",)),
                     dtype=self.dtype, param_dtype=self.param_dtype, name="bn")(x)


class Bottleneck(nn.Module):
  planes: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    out = nn.relu(ConvBN(self.planes, 1, name="conv1", **kw)(x, train))
    out = nn.relu(ConvBN(self.planes, 3, name="conv2", **kw)(out, train))
    out = avg_pool(out, self.stride)
    # The last BN of each block starts at zero, so every block starts as the identity.
    out = ConvBN(self.planes * self.expansion, 1, zero_init_scale=True, name="conv3", **kw)(out, train)
    identity = x
    if self.stride > 1 or x.shape[-1] != self.planes * self.expansion:
      identity = ConvBN(self.planes * self.expansion, 1, name="downsample", **kw)(
          avg_pool(x, self.stride), train)
    return nn.relu(out + identity)


class AttentionPool2d(nn.Module):
  """One query (the mean of the feature map) attends over the map plus itself."""
  num_heads: int
  output_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    tokens = x.reshape(b, h * w, c)
    tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)  # [B, HW+1, C]
    positional_embedding = self.param("positional_embedding", logical(normal(c ** -0.5), (None, "embed")),
                                      (h * w + 1, c), self.param_dtype)
    tokens = tokens + positional_embedding.astype(tokens.dtype)
    std = c ** -0.5
    pooled = MultiHeadAttention(self.num_heads, qkv_std=std, out_std=std, out_features=self.output_dim,
                                dtype=self.dtype, param_dtype=self.param_dtype, name="attn")(
                                    tokens[:, :1], tokens)
    return pooled[:, 0]


class ModifiedResNet(nn.Module):
  image_size: int
  layers: Sequence[int]
  width: int
  heads: int
  output_dim: int
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """[B, output_dim] float32 from NHWC images; sharded over Explicit mesh axes too (computed
    under Auto axes: `sharding.on_auto_axes`)."""
    return on_auto_axes(self, ModifiedResNet._encode, images, train)

  def _encode(self, images: jax.Array, train: bool) -> jax.Array:  # Runs inside __call__'s compact scope.
    if images.shape[1] != self.image_size or images.shape[2] != self.image_size:
      raise ValueError(f"ModifiedResNet expects {self.image_size}x{self.image_size} images, "
                       f"got {images.shape[1]}x{images.shape[2]}.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = images.astype(self.dtype)
    # Stem: three 3x3 convs (the first strided) instead of one 7x7, then a 2x2 average pool.
    x = Conv(self.width // 2, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False,
             kernel_axes=_CONV_AXES, kernel_init=nn.initializers.kaiming_normal(), name="stem_conv1", **kw)(x)
    x = nn.relu(self._stem_bn("stem_bn1", x, train))
    for i, features in ((2, self.width // 2), (3, self.width)):
      x = Conv(features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, kernel_axes=_CONV_AXES,
               kernel_init=nn.initializers.kaiming_normal(), name=f"stem_conv{i}", **kw)(x)
      x = nn.relu(self._stem_bn(f"stem_bn{i}", x, train))
    x = avg_pool(x, 2)
    block_cls = nn.remat(Bottleneck, static_argnums=(2,)) if self.remat else Bottleneck
    for stage, num_blocks in enumerate(self.layers):
      planes = self.width * 2 ** stage
      for j in range(num_blocks):
        stride = 2 if (stage > 0 and j == 0) else 1
        x = block_cls(planes, stride, name=f"layer{stage + 1}_{j}", **kw)(x, train)
    return AttentionPool2d(self.heads, self.output_dim, name="attnpool", **kw)(x).astype(jnp.float32)

  def _stem_bn(self, name: str, x: jax.Array, train: bool) -> jax.Array:
    return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                     scale_init=logical(nn.initializers.ones, ("conv_out",)),
                     bias_init=logical(nn.initializers.zeros, ("conv_out",)),
                     dtype=self.dtype, param_dtype=self.param_dtype, name=name)(x)
