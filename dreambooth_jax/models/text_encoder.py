"""Stable Diffusion's text encoder: a transformers CLIPTextModel folder, run by clip_jax's
`TextTransformer(output_dim=None)`.

SD 1.x conditions on the last layer of OpenAI ViT-L/14's text tower (12 layers, 768 wide,
QuickGELU). SD 2.x conditions on the penultimate layer of OpenCLIP ViT-H/14's (1024 wide, GELU):
diffusers ships that tower cut to 23 of its 24 layers, so there the last layer *is* the
penultimate one. A full 24-layer tower (e.g. converted from open_clip weights) gives the same
features with `num_layers=23`. Either way the features pass the final LayerNorm, as
transformers' `last_hidden_state` does.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from clip_jax import convert as clip_convert
from clip_jax.models.text import TextTransformer

Dtype = Any


def load_text_encoder(component_dir: str, *, dtype: Dtype = jnp.float32,
                      param_dtype: Dtype = jnp.float32, variant: str | None = None):
  """`(module, params, hf_config)` from a CLIPTextModel folder (e.g. `<pipeline>/text_encoder`),
  its weights single, sharded, `variant` ('fp16': `model.fp16.safetensors`) or `.bin`.

  `dtype` is the compute dtype; params are stored in `param_dtype`.
  """
  module, variables, hf_config = clip_convert.load_hf_text_encoder(
      component_dir, variant=variant, dtype=dtype, param_dtype=param_dtype)
  params = jax.tree.map(lambda a: jnp.asarray(a, param_dtype), variables["params"])
  return module, params, hf_config


def save_text_encoder(component_dir: str, module: TextTransformer, params,
                      hf_config: dict[str, Any] | None = None) -> str:
  """Writes a CLIPTextModel folder (`transformers.CLIPTextModel.from_pretrained` loads it);
  `hf_config` (the one read at load time) keeps the token ids and other non-architecture keys."""
  return clip_convert.export_hf_text_encoder(module, {"params": params}, component_dir, hf_config)


def create_text_encoder(hf_config: dict[str, Any] | None = None, **module_kwargs):
  """A fresh `(module, hf_config)` from a CLIPTextModel config dict (defaults: transformers')."""
  hf_config = dict(hf_config or {})
  module = TextTransformer(**clip_convert.text_encoder_kwargs_from_hf(hf_config), **module_kwargs)
  return module, clip_convert.text_encoder_config_to_hf(module, hf_config)


def init_params(module: TextTransformer, rng: jax.Array):
  """Fresh params, boxed with their logical axis names (`nn.meta.unbox` gives plain arrays)."""
  tokens = jnp.zeros((1, module.context_length), jnp.int32)
  return module.init(rng, tokens)["params"]


def check_num_layers(module: TextTransformer, num_layers: int | None) -> None:
  if num_layers is not None and not 1 <= num_layers <= module.layers:
    raise ValueError(f"text encoder num_layers={num_layers}: the encoder has {module.layers} layers; "
                     f"pick 1..{module.layers} (or None for all).")


@functools.partial(jax.jit, static_argnames=("module", "num_layers"))
def _hidden_states(module: TextTransformer, params, tokens, num_layers):
  states = module.apply({"params": params}, tokens, num_layers, method="hidden_states")
  return states.astype(jnp.float32)


def encode_tokens(module: TextTransformer, params, tokens: jax.Array,
                  num_layers: int | None = None) -> jax.Array:
  """Token ids [B, T] -> float32 features [B, T, width] after `num_layers` blocks (all by
  default) and the final LayerNorm; jitted."""
  check_num_layers(module, num_layers)
  return _hidden_states(module, params, tokens, num_layers)
