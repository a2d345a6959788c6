"""Stable Diffusion's conditional UNet (SD 1.x / 2.x) in Flax Linen, NHWC throughout.

The module tree mirrors diffusers' `UNet2DConditionModel` names one to one (a list entry
`down_blocks.0` becomes the Flax module `down_blocks_0`), so `dreambooth_jax.models.convert` maps
checkpoints by renaming and transposing only. The layers shared with the VAE (ResNet
blocks, resamplers, the attention core, norm/conv/dense factories) live here too.

Logical axis names on parameters (mapped to mesh axes by the shared rules table):
  conv kernels [kh, kw, in, out]  (None, None, 'conv_in', 'conv_out'); conv bias ('conv_out',)
  attention q/k/v [in, inner]     ('embed', 'heads');  attention out [inner, out]  ('heads', 'embed')
  feed-forward in / out           ('embed', 'mlp') / ('mlp', 'embed')
  time MLP and ResNet time proj   ('embed', 'mlp'), ('mlp', 'embed'), ('mlp', 'conv_out')
  norm scale / bias               ('norm',)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax import layers

Dtype = Any

# ---------------------------------------------------------------------------------------
# Layer factories: every parameter gets logical axis names here, nowhere else.
# ---------------------------------------------------------------------------------------


def _partitioned(init, names):
  return nn.with_logical_partitioning(init, names)


def conv(features: int, kernel: int = 3, *, stride: int = 1, padding=None, dtype: Dtype,
         param_dtype: Dtype, name: str | None = None) -> layers.Conv:
  """Conv2d on NHWC; `padding` defaults to torch's `(kernel - 1) // 2` on every side.

  `clip_jax.layers.Conv`: flax.linen.Conv's parameters, computed as one bf16 x bf16 -> f32 (or f32)
  matmul over the patches on CPU, XLA's convolution elsewhere."""
  if padding is None:
    padding = ((kernel - 1) // 2,) * 2
    padding = (padding, padding)
  return layers.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                     dtype=dtype, param_dtype=param_dtype, name=name)


def dense(features: int, names: tuple[str, str], *, use_bias: bool = True, dtype: Dtype,
          param_dtype: Dtype, name: str | None = None) -> layers.Dense:
  """`clip_jax.layers.Dense`: flax.linen.Dense's parameters, bf16 x bf16 -> f32 matmuls forward and
  backward when `dtype` is bf16."""
  return layers.Dense(features, use_bias=use_bias, kernel_axes=names, dtype=dtype,
                      param_dtype=param_dtype, name=name)


def group_norm(groups: int, eps: float, *, dtype: Dtype, param_dtype: Dtype,
               name: str | None = None) -> nn.GroupNorm:
  # use_fast_variance=False: E[x^2] - E[x]^2 loses digits on the large activations of
  # the deep blocks; the two-pass variance matches torch to 1e-6.
  return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                      use_fast_variance=False,
                      scale_init=_partitioned(nn.initializers.ones_init(), ("norm",)),
                      bias_init=_partitioned(nn.initializers.zeros_init(), ("norm",)),
                      name=name)


def layer_norm(eps: float, *, dtype: Dtype, param_dtype: Dtype, name: str | None = None):
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
                      scale_init=_partitioned(nn.initializers.ones_init(), ("norm",)),
                      bias_init=_partitioned(nn.initializers.zeros_init(), ("norm",)),
                      name=name)


def attention_core(q, k, v, *, upcast: bool, implementation: str | None):
  """q [B, T, N, H], k/v [B, S, N, H] -> [B, T, N, H] in q's dtype, scale 1/sqrt(H).

  `clip_jax.layers.dot_product_attention`: implementation None or 'auto' picks the fast form for
  the backend and dtype (bf16: the f32-accumulating custom VJP on CPU, cuDNN on GPU); 'xla',
  'cudnn' or 'f32_accum' force one. Logits and softmax are fp32 in every form. `upcast` runs the
  whole product in fp32 (diffusers' `upcast_attention`: SD 2.x overflows fp16 logits otherwise).
  """
  out_dtype = q.dtype
  impl = implementation or "auto"
  if upcast:
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    impl = "xla" if impl in ("cudnn", "f32_accum") else impl  # both are low-precision forms
  return layers.dot_product_attention(q, k, v, impl=impl).astype(out_dtype)


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------

_ACTIVATIONS = ("silu", "swish")
_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers options outside SD 1.x / 2.x: loading a config that sets any of them to something
# other than this value would silently compute a different function, so it is refused.
_UNSUPPORTED_UNET_OPTIONS = {
    "num_attention_heads": None, "dual_cross_attention": False, "only_cross_attention": False,
    "class_embed_type": None, "addition_embed_type": None, "num_class_embeds": None,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "time_embedding_type": "positional",
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "attention_type": "default", "cross_attention_norm": None,
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
    "reverse_transformer_layers_per_block": None, "dropout": 0.0,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None,
}


def _is_default(value, default) -> bool:
  if isinstance(value, (list, tuple)):  # per-block forms, e.g. only_cross_attention=[False]*4
    return all(_is_default(v, default) for v in value)
  return value == default or (default is None and value is False)


_PER_BLOCK_INTS = ("layers_per_block", "transformer_layers_per_block", "attention_head_dim")


def per_block(value, n: int, field: str) -> tuple:
  """An int (or scalar) for every block, or one entry per block, as a tuple."""
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"unet config: '{field}' has {len(value)} entries but there are {n} "
                       "down blocks; give one per block or a single value.")
    return tuple(value)
  return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The subset of diffusers' `unet/config.json` that defines SD 1.x / 2.x UNets.

  `attention_head_dim` follows diffusers' historical reading: it is the number of heads per
  block (SD 1.x: 8 -> 8 heads of 40/80/160), and the head size is channels // heads
  (SD 2.x: (5, 10, 20, 20) -> heads of size 64).
  """
  sample_size: int = 64
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
  transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
  attention_head_dim: tuple[int, ...] = (8, 8, 8, 8)  # heads per block, see above
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  act_fn: str = "silu"
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int = 768
  use_linear_projection: bool = False
  upcast_attention: bool = False
  time_embedding_dim: int | None = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3

  def __post_init__(self):
    n = len(self.block_out_channels)
    for field in ("down_block_types", "up_block_types", "layers_per_block",
                  "transformer_layers_per_block", "attention_head_dim"):
      if len(getattr(self, field)) != n:
        raise ValueError(f"unet config: '{field}' needs one entry per block ({n}), got "
                         f"{getattr(self, field)}.")
    bad = [t for t in self.down_block_types if t not in _DOWN_TYPES]
    bad += [t for t in self.up_block_types if t not in _UP_TYPES]
    if bad:
      raise ValueError(f"unet config: block type {bad[0]!r} is not supported; this UNet "
                       f"implements {_DOWN_TYPES + _UP_TYPES}.")
    if self.act_fn not in _ACTIVATIONS:
      raise ValueError(f"unet config: act_fn {self.act_fn!r} is not supported (use 'silu').")
    for channels, heads in zip(self.block_out_channels, self.attention_head_dim):
      if channels % heads:
        raise ValueError(f"unet config: {channels} channels do not split into "
                         f"attention_head_dim={heads} heads.")
    for channels in self.block_out_channels:
      if channels % self.norm_num_groups:
        raise ValueError(f"unet config: {channels} channels do not split into "
                         f"norm_num_groups={self.norm_num_groups} groups.")

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> "UNetConfig":
    """Reads a diffusers `unet/config.json` dict; refuses options this UNet does not build."""
    for key, default in _UNSUPPORTED_UNET_OPTIONS.items():
      value = config.get(key, default)
      if not _is_default(value, default):
        raise ValueError(f"unet config: {key}={value!r} is not supported (only SD 1.x/2.x "
                         f"UNets: expected {default!r}).")
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in config.items() if k in names}
    n = len(config.get("block_out_channels", cls.block_out_channels))
    for key in ("down_block_types", "up_block_types", "block_out_channels"):
      if key in values:
        values[key] = tuple(values[key])
    # diffusers' scalar defaults, broadcast to however many blocks this config has.
    for key, default in zip(_PER_BLOCK_INTS, (2, 1, 8)):
      values[key] = per_block(values.get(key, default), n, key)
      if any(not isinstance(v, int) for v in values[key]):
        raise ValueError(f"unet config: '{key}' must hold integers, got {values[key]}.")
    cross = values.get("cross_attention_dim")
    if isinstance(cross, (list, tuple)):
      if len(set(cross)) != 1:
        raise ValueError(f"unet config: per-block cross_attention_dim {cross} is not supported.")
      values["cross_attention_dim"] = cross[0]
    if values.get("norm_num_groups", 32) is None:
      raise ValueError("unet config: norm_num_groups=None (no output norm) is not supported.")
    return cls(**values)

  def to_diffusers(self) -> dict[str, Any]:
    """The config.json dict with which diffusers rebuilds the same model."""
    config = {"_class_name": "UNet2DConditionModel"}
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name in _PER_BLOCK_INTS and len(set(value)) == 1:
        value = value[0]  # the scalar form SD's own configs use
      config[field.name] = list(value) if isinstance(value, tuple) else value
    config["mid_block_type"] = "UNetMidBlock2DCrossAttn"
    return config

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or 4 * self.block_out_channels[0]


# ---------------------------------------------------------------------------------------
# Shared blocks (also used by the VAE)
# ---------------------------------------------------------------------------------------


class ResnetBlock2D(nn.Module):
  """GroupNorm-SiLU-conv twice, time embedding added between, 1x1 shortcut on width change."""
  out_channels: int
  groups: int
  eps: float
  output_scale_factor: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None):  # x [B, H, W, Cin], temb [B, T] or None (VAE)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.silu(group_norm(self.groups, self.eps, name="norm1", **kw)(x))
    h = conv(self.out_channels, 3, name="conv1", **kw)(h)
    if temb is not None:
      t = dense(self.out_channels, ("mlp", "conv_out"), name="time_emb_proj", **kw)(nn.silu(temb))
      h = h + t[:, None, None, :]
    h = nn.silu(group_norm(self.groups, self.eps, name="norm2", **kw)(h))
    h = conv(self.out_channels, 3, name="conv2", **kw)(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, name="conv_shortcut", **kw)(x)
    return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
  """Stride-2 3x3 conv. `padding` 1 pads every side (UNet); 0 pads only bottom/right (VAE)."""
  channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    pad = ((1, 1), (1, 1)) if self.padding == 1 else ((0, 1), (0, 1))
    return conv(self.channels, 3, stride=2, padding=pad, name="conv", dtype=self.dtype,
                param_dtype=self.param_dtype)(x)


class Upsample2D(nn.Module):
  """Nearest 2x upsampling then a 3x3 conv; `output_size` crops odd-sized skips.

  Repeat-then-crop equals torch's nearest resize to any size in (2s-2, 2s], which is
  what the UNet asks for when a latent side is not divisible by 2**num_upsamplers.
  """
  channels: int
  output_size: tuple[int, int] | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    if self.output_size is not None:
      x = x[:, :self.output_size[0], :self.output_size[1]]
    return conv(self.channels, 3, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)


# ---------------------------------------------------------------------------------------
# Transformer blocks
# ---------------------------------------------------------------------------------------


class Attention(nn.Module):
  """Multi-head attention of x over `context` (x itself when None), diffusers' layout."""
  heads: int
  head_dim: int
  out_dim: int
  upcast: bool = False
  attention_implementation: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None):  # x [B, T, C], context [B, S, D]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    context = x if context is None else context
    inner = self.heads * self.head_dim
    q = dense(inner, ("embed", "heads"), use_bias=False, name="to_q", **kw)(x)
    k = dense(inner, ("embed", "heads"), use_bias=False, name="to_k", **kw)(context)
    v = dense(inner, ("embed", "heads"), use_bias=False, name="to_v", **kw)(context)
    split = lambda t: t.reshape(t.shape[:2] + (self.heads, self.head_dim))
    out = attention_core(split(q), split(k), split(v), upcast=self.upcast,
                         implementation=self.attention_implementation)
    out = out.reshape(out.shape[:2] + (inner,))
    return dense(self.out_dim, ("heads", "embed"), name="to_out_0", **kw)(out)


class GEGLU(nn.Module):
  """One projection to twice the width; half of it gates the other half through GELU."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = dense(2 * self.features, ("embed", "mlp"), name="proj", dtype=self.dtype,
              param_dtype=self.param_dtype)(x)
    value, gate = jnp.split(h, 2, axis=-1)
    return value * layers.exact_gelu(gate)  # torch's F.gelu is the exact erf form


class FeedForward(nn.Module):
  dim: int
  mult: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = GEGLU(self.dim * self.mult, name="net_0", **kw)(x)
    return dense(self.dim, ("mlp", "embed"), name="net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
  """Pre-LayerNorm self-attention, cross-attention over the text, GEGLU feed-forward."""
  dim: int
  heads: int
  head_dim: int
  upcast: bool = False
  attention_implementation: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context):  # x [B, T, C], context [B, S, D]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = dict(heads=self.heads, head_dim=self.head_dim, out_dim=self.dim, upcast=self.upcast,
                attention_implementation=self.attention_implementation, **kw)
    x = x + Attention(name="attn1", **attn)(layer_norm(1e-5, name="norm1", **kw)(x))
    x = x + Attention(name="attn2", **attn)(layer_norm(1e-5, name="norm2", **kw)(x), context)
    return x + FeedForward(self.dim, name="ff", **kw)(layer_norm(1e-5, name="norm3", **kw)(x))


class Transformer2DModel(nn.Module):
  """GroupNorm, project in (1x1 conv or linear), transformer blocks, project out, residual."""
  channels: int
  heads: int
  num_layers: int
  groups: int
  use_linear_projection: bool
  upcast: bool = False
  attention_implementation: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context):  # x [B, H, W, C]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, height, width, c = x.shape
    h = group_norm(self.groups, 1e-6, name="norm", **kw)(x)
    if self.use_linear_projection:
      h = dense(self.channels, ("embed", "heads"), name="proj_in", **kw)(h.reshape(b, -1, c))
    else:
      h = conv(self.channels, 1, name="proj_in", **kw)(h).reshape(b, -1, self.channels)
    for i in range(self.num_layers):
      h = BasicTransformerBlock(self.channels, self.heads, self.channels // self.heads,
                                upcast=self.upcast,
                                attention_implementation=self.attention_implementation,
                                name=f"transformer_blocks_{i}", **kw)(h, context)
    if self.use_linear_projection:
      h = dense(self.channels, ("heads", "embed"), name="proj_out", **kw)(h)
      h = h.reshape(b, height, width, self.channels)
    else:
      h = conv(self.channels, 1, name="proj_out", **kw)(h.reshape(b, height, width, self.channels))
    return h + x


# ---------------------------------------------------------------------------------------
# UNet blocks
# ---------------------------------------------------------------------------------------


class _BlockBase(nn.Module):
  config: UNetConfig
  index: int  # position among down blocks (up blocks: position among up blocks)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_implementation: str | None = None

  def resnet(self, out_channels, name, scale=1.0):
    return ResnetBlock2D(out_channels, self.config.norm_num_groups, self.config.norm_eps,
                         output_scale_factor=scale, dtype=self.dtype,
                         param_dtype=self.param_dtype, name=name)

  def transformer(self, channels, heads, layers, name):
    return Transformer2DModel(channels, heads, layers, self.config.norm_num_groups,
                              self.config.use_linear_projection, upcast=self.config.upcast_attention,
                              attention_implementation=self.attention_implementation,
                              dtype=self.dtype, param_dtype=self.param_dtype, name=name)


class DownBlock(_BlockBase):
  """CrossAttnDownBlock2D or DownBlock2D: returns the output and every skip it produced."""

  @nn.compact
  def __call__(self, x, temb, context):
    cfg, i = self.config, self.index
    channels = cfg.block_out_channels[i]
    has_attention = cfg.down_block_types[i] == "CrossAttnDownBlock2D"
    skips = []
    for j in range(cfg.layers_per_block[i]):
      x = self.resnet(channels, f"resnets_{j}")(x, temb)
      if has_attention:
        x = self.transformer(channels, cfg.attention_head_dim[i],
                             cfg.transformer_layers_per_block[i], f"attentions_{j}")(x, context)
      skips.append(x)
    if i < len(cfg.block_out_channels) - 1:
      x = Downsample2D(channels, cfg.downsample_padding, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="downsamplers_0")(x)
      skips.append(x)
    return x, tuple(skips)


class MidBlock(_BlockBase):
  """UNetMidBlock2DCrossAttn: resnet, transformer, resnet at the lowest resolution."""

  @nn.compact
  def __call__(self, x, temb, context):
    cfg = self.config
    channels, scale = cfg.block_out_channels[-1], cfg.mid_block_scale_factor
    x = self.resnet(channels, "resnets_0", scale)(x, temb)
    x = self.transformer(channels, cfg.attention_head_dim[-1],
                         cfg.transformer_layers_per_block[-1], "attentions_0")(x, context)
    return self.resnet(channels, "resnets_1", scale)(x, temb)


class UpBlock(_BlockBase):
  """CrossAttnUpBlock2D or UpBlock2D: each resnet first concatenates one skip (last first)."""
  upsample_size: tuple[int, int] | None = None  # spatial size of the next block's skips

  @nn.compact
  def __call__(self, x, skips, temb, context):
    cfg, i = self.config, self.index
    down = len(cfg.block_out_channels) - 1 - i  # the down block at this resolution
    channels = cfg.block_out_channels[down]
    has_attention = cfg.up_block_types[i] == "CrossAttnUpBlock2D"
    skips = list(skips)
    for j in range(cfg.layers_per_block[down] + 1):
      x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = self.resnet(channels, f"resnets_{j}")(x, temb)
      if has_attention:
        x = self.transformer(channels, cfg.attention_head_dim[down],
                             cfg.transformer_layers_per_block[down], f"attentions_{j}")(x, context)
    if i < len(cfg.block_out_channels) - 1:
      x = Upsample2D(channels, self.upsample_size, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="upsamplers_0")(x)
    return x


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0):
  """Sinusoidal embedding of (possibly fractional) timesteps [B] -> [B, dim], in fp32."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  parts = (jnp.cos(angles), jnp.sin(angles)) if flip_sin_to_cos else (jnp.sin(angles), jnp.cos(angles))
  emb = jnp.concatenate(parts, axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nn.Module):
  """Two-layer SiLU MLP on the sinusoidal embedding."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = dense(self.features, ("embed", "mlp"), name="linear_1", **kw)(x)
    return dense(self.features, ("mlp", "embed"), name="linear_2", **kw)(nn.silu(x))


class UNet2DConditionModel(nn.Module):
  """eps/v prediction: (latents [B, h, w, C], timesteps [B] or scalar, text [B, S, D]) -> [B, h, w, C].

  `dtype` is the compute dtype, `param_dtype` the storage dtype; the output is fp32 (the
  losses and schedulers work in fp32). `remat` rematerializes each down/mid/up block in the
  backward pass, trading compute for activation memory.
  """
  config: UNetConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  attention_implementation: str | None = None  # None = 'auto'; see attention_core

  @nn.compact
  def __call__(self, sample, timesteps, encoder_hidden_states):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block_kw = dict(config=cfg, attention_implementation=self.attention_implementation, **kw)
    wrap = nn.remat if self.remat else (lambda cls: cls)
    batch = sample.shape[0]
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
    x = sample.astype(self.dtype)
    context = encoder_hidden_states.astype(self.dtype)
    if cfg.center_input_sample:
      x = 2 * x - 1.0

    temb = timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                              cfg.freq_shift).astype(self.dtype)
    temb = TimestepEmbedding(cfg.time_embed_dim, name="time_embedding", **kw)(temb)

    x = conv(cfg.block_out_channels[0], cfg.conv_in_kernel, name="conv_in", **kw)(x)
    skips = [x]
    for i in range(len(cfg.down_block_types)):
      x, block_skips = wrap(DownBlock)(index=i, name=f"down_blocks_{i}", **block_kw)(x, temb, context)
      skips.extend(block_skips)
    x = wrap(MidBlock)(index=0, name="mid_block", **block_kw)(x, temb, context)
    for i in range(len(cfg.up_block_types)):
      n = cfg.layers_per_block[len(cfg.block_out_channels) - 1 - i] + 1
      block_skips, skips = skips[-n:], skips[:-n]
      upsample_size = tuple(skips[-1].shape[1:3]) if skips else None
      x = wrap(UpBlock)(index=i, upsample_size=upsample_size, name=f"up_blocks_{i}",
                        **block_kw)(x, tuple(block_skips), temb, context)

    x = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(x))
    x = conv(cfg.out_channels, cfg.conv_out_kernel, name="conv_out", **kw)(x)
    return x.astype(jnp.float32)


def init_inputs(config: UNetConfig, batch: int = 1):
  """Smallest inputs that create every parameter (for init / eval_shape)."""
  side = 2 ** (len(config.block_out_channels) - 1)
  return (jnp.zeros((batch, side, side, config.in_channels), jnp.float32),
          jnp.zeros((batch,), jnp.int32),
          jnp.zeros((batch, 1, config.cross_attention_dim), jnp.float32))
