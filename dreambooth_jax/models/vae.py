"""Stable Diffusion's KL autoencoder (diffusers `AutoencoderKL`) in Flax Linen, NHWC.

Images in [-1, 1] [B, H, W, 3] encode to a diagonal Gaussian over latents
[B, H/f, W/f, latent_channels] with f = 2**(len(block_out_channels) - 1); the diffusion
model works on `sample * scaling_factor`. Module names mirror diffusers' state dict.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from dreambooth_jax.models.unet import (Downsample2D, ResnetBlock2D, Upsample2D, attention_core, conv,
                                 dense, group_norm)

Dtype = Any

_UNSUPPORTED_VAE_OPTIONS = {"norm_type": "group"}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The fields of diffusers' `vae/config.json` for `AutoencoderKL`."""
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
  up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 512
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  force_upcast: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self):
    n = len(self.block_out_channels)
    if self.down_block_types != ("DownEncoderBlock2D",) * n:
      raise ValueError(f"vae config: down_block_types {self.down_block_types} are not supported; "
                       f"expected {n} x 'DownEncoderBlock2D'.")
    if self.up_block_types != ("UpDecoderBlock2D",) * n:
      raise ValueError(f"vae config: up_block_types {self.up_block_types} are not supported; "
                       f"expected {n} x 'UpDecoderBlock2D'.")
    if self.act_fn not in ("silu", "swish"):
      raise ValueError(f"vae config: act_fn {self.act_fn!r} is not supported (use 'silu').")
    for channels in self.block_out_channels:
      if channels % self.norm_num_groups:
        raise ValueError(f"vae config: {channels} channels do not split into "
                         f"norm_num_groups={self.norm_num_groups} groups.")

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> "VAEConfig":
    for key, default in _UNSUPPORTED_VAE_OPTIONS.items():
      if config.get(key, default) != default:
        raise ValueError(f"vae config: {key}={config[key]!r} is not supported.")
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in config.items() if k in names}
    for key in ("down_block_types", "up_block_types", "block_out_channels"):
      if key in values:
        values[key] = tuple(values[key])
    if isinstance(values.get("sample_size"), (list, tuple)):
      values["sample_size"] = values["sample_size"][0]
    if not isinstance(values.get("layers_per_block", 2), int):
      raise ValueError("vae config: layers_per_block must be one integer.")
    return cls(**values)

  def to_diffusers(self) -> dict[str, Any]:
    config = {"_class_name": "AutoencoderKL"}
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      config[field.name] = list(value) if isinstance(value, tuple) else value
    return config

  @property
  def downscale_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


class SpatialSelfAttention(nn.Module):
  """The VAE's mid-block attention: GroupNorm, one head as wide as the channels, residual."""
  groups: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, H, W, C]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, height, width, c = x.shape
    h = group_norm(self.groups, 1e-6, name="group_norm", **kw)(x).reshape(b, height * width, 1, c)
    q, k, v = (dense(c, ("embed", "heads"), name=n, **kw)(h) for n in ("to_q", "to_k", "to_v"))
    # diffusers upcasts this softmax; every form of attention_core keeps softmax in fp32.
    out = attention_core(q, k, v, upcast=False, implementation=None).reshape(b, height * width, c)
    out = dense(c, ("heads", "embed"), name="to_out_0", **kw)(out)
    return out.reshape(b, height, width, c) + x


class MidBlock(nn.Module):
  """UNetMidBlock2D without time embedding: resnet, (attention), resnet."""
  config: VAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    channels = cfg.block_out_channels[-1]
    x = ResnetBlock2D(channels, cfg.norm_num_groups, 1e-6, name="resnets_0", **kw)(x)
    if cfg.mid_block_add_attention:
      x = SpatialSelfAttention(cfg.norm_num_groups, name="attentions_0", **kw)(x)
    return ResnetBlock2D(channels, cfg.norm_num_groups, 1e-6, name="resnets_1", **kw)(x)


class DownEncoderBlock(nn.Module):
  config: VAEConfig
  index: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg, i = self.config, self.index
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    channels = cfg.block_out_channels[i]
    for j in range(cfg.layers_per_block):
      x = ResnetBlock2D(channels, cfg.norm_num_groups, 1e-6, name=f"resnets_{j}", **kw)(x)
    if i < len(cfg.block_out_channels) - 1:
      x = Downsample2D(channels, padding=0, name="downsamplers_0", **kw)(x)
    return x


class UpDecoderBlock(nn.Module):
  config: VAEConfig
  index: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg, i = self.config, self.index
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    channels = cfg.block_out_channels[::-1][i]
    for j in range(cfg.layers_per_block + 1):
      x = ResnetBlock2D(channels, cfg.norm_num_groups, 1e-6, name=f"resnets_{j}", **kw)(x)
    if i < len(cfg.block_out_channels) - 1:
      x = Upsample2D(channels, name="upsamplers_0", **kw)(x)
    return x


class Encoder(nn.Module):
  config: VAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, images):  # [B, H, W, 3] -> [B, H/f, W/f, 2 * latent_channels]
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    wrap = nn.remat if self.remat else (lambda cls: cls)
    x = conv(cfg.block_out_channels[0], 3, name="conv_in", **kw)(images)
    for i in range(len(cfg.block_out_channels)):
      x = wrap(DownEncoderBlock)(cfg, i, name=f"down_blocks_{i}", **kw)(x)
    x = wrap(MidBlock)(cfg, name="mid_block", **kw)(x)
    x = nn.silu(group_norm(cfg.norm_num_groups, 1e-6, name="conv_norm_out", **kw)(x))
    return conv(2 * cfg.latent_channels, 3, name="conv_out", **kw)(x)


class Decoder(nn.Module):
  config: VAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, latents):  # [B, h, w, latent_channels] -> [B, h*f, w*f, 3]
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    wrap = nn.remat if self.remat else (lambda cls: cls)
    x = conv(cfg.block_out_channels[-1], 3, name="conv_in", **kw)(latents)
    x = wrap(MidBlock)(cfg, name="mid_block", **kw)(x)
    for i in range(len(cfg.block_out_channels)):
      x = wrap(UpDecoderBlock)(cfg, i, name=f"up_blocks_{i}", **kw)(x)
    x = nn.silu(group_norm(cfg.norm_num_groups, 1e-6, name="conv_norm_out", **kw)(x))
    return conv(cfg.out_channels, 3, name="conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
  """`encode(images) -> (mean, logvar)`, `decode(latents) -> images`; call both via `method=`.

  Latents here are unscaled: multiply a posterior sample by `config.scaling_factor` before
  the UNet, and divide by it before `decode`. Outputs are fp32 whatever `dtype` computes in.
  """
  config: VAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  def setup(self):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(cfg, remat=self.remat, **kw)
    self.decoder = Decoder(cfg, remat=self.remat, **kw)
    if cfg.use_quant_conv:
      self.quant_conv = conv(2 * cfg.latent_channels, 1, **kw)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = conv(cfg.latent_channels, 1, **kw)

  def encode(self, images):
    """images [B, H, W, C] in [-1, 1] -> (mean, logvar), each [B, H/f, W/f, latent_channels]."""
    moments = self.encoder(images.astype(self.dtype))
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)  # the clamp diffusers applies before exp

  def decode(self, latents):
    """latents [B, h, w, latent_channels] (unscaled) -> images [B, h*f, w*f, C], about [-1, 1]."""
    x = latents.astype(self.dtype)
    if self.config.use_post_quant_conv:
      x = self.post_quant_conv(x)
    return self.decoder(x).astype(jnp.float32)

  def __call__(self, images):
    """Reconstruction through the posterior mean; used by `init` to create every parameter."""
    mean, _ = self.encode(images)
    return self.decode(mean)


def sample_posterior(rng, mean, logvar):
  """One draw from N(mean, exp(logvar)), the diagonal Gaussian `encode` returns."""
  noise = jax.random.normal(rng, mean.shape, jnp.float32)
  return mean + jnp.exp(0.5 * logvar) * noise


def init_inputs(config: VAEConfig, batch: int = 1):
  side = config.downscale_factor
  return (jnp.zeros((batch, side, side, config.in_channels), jnp.float32),)
