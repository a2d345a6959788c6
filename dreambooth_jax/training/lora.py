"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") kept as parameters.

A LoRA pair (down [in, r], up [r, out]) sits beside each chosen kernel. The train step runs the
model on `attach(base, lora, alpha)`: the pair placed next to its kernel as `lora_down` and
`lora_up` (= (alpha / r) * up), which `clip_jax.layers.Dense` computes beside the kernel,
y = x W + b + (x down) up, as PEFT's `lora.Linear` does. So the backward needs no full [in, out]
weight gradient, and the frozen kernel keeps its 16-bit copy. `merge(base, lora)` = base +
(alpha / r) * down @ up gives the merged weights that are exported. `up` starts at zero, so
training starts exactly at the base model.

Adapters are kept per pipeline component ({'unet': lora, 'text_encoder': lora}); with the text
encoder trained, it is LoRA'd too (its attention projections, as diffusers'
`train_dreambooth_lora.py --train_text_encoder` does), so the adapter file alone reproduces the
trained model. `adapter_state_dict` writes them under the names diffusers'
`StableDiffusionPipeline.load_lora_weights` reads: `unet.<module>.lora_A.weight` = down^T and
`lora_B.weight` = up^T for the UNet, `text_encoder.text_model.<module>...` for the text encoder.
"""
from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# The attention projections of every self- and cross-attention block (the paper-era default).
DEFAULT_TARGETS = r"attn[12]/(to_q|to_k|to_v|to_out_0)/kernel$"
# The text encoder's q/k/v/out projections (q_proj ... out_proj in transformers' CLIPTextModel), the
# modules diffusers' DreamBooth LoRA script adapts in the text encoder.
TEXT_ENCODER_TARGETS = r"attn/(q|k|v|out)/kernel$"


def init_lora(rng: jax.Array, params: Any, rank: int, targets: str = DEFAULT_TARGETS) -> dict:
  """{'/'-joined kernel path: {'down': [in, r], 'up': [r, out]}} for every 2-D kernel matching `targets`."""
  flat = traverse_util.flatten_dict(params, sep="/")
  pattern = re.compile(targets)
  chosen = sorted(k for k, v in flat.items() if pattern.search(k) and v.ndim == 2)
  if not chosen:
    raise ValueError(f"LoRA targets /{targets}/ match no 2-D kernel of the model.")
  lora = {}
  for key, r in zip(chosen, jax.random.split(rng, len(chosen))):
    fan_in, fan_out = flat[key].shape
    # Down: Kaiming-uniform-like (as PEFT); up: zeros, so the merged model starts as the base.
    bound = 1.0 / np.sqrt(fan_in)
    lora[key] = {"down": jax.random.uniform(r, (fan_in, rank), jnp.float32, -bound, bound),
                 "up": jnp.zeros((rank, fan_out), jnp.float32)}
  return lora


def attach(params: Any, lora: dict, alpha: float) -> Any:
  """params with each adapter beside its kernel: '<module>/lora_down' = down [in, r] and
  '<module>/lora_up' = (alpha / r) * up [r, out], which `clip_jax.layers.Dense` adds to its output.
  Differentiable in `lora`. Every adapted kernel must belong to a `layers.Dense` (the models' 2-D
  kernels all do: tests/test_lora_export.py checks the UNet's and the text encoder's); a ValueError
  names an adapter whose kernel is not in `params`."""
  flat = dict(traverse_util.flatten_dict(params, sep="/"))
  for key, pair in lora.items():
    if key not in flat or not key.endswith("/kernel"):
      raise ValueError(f"LoRA adapter for {key!r}: the model has no such kernel.")
    module = key[: -len("kernel")]
    rank = pair["down"].shape[1]
    flat[module + "lora_down"] = pair["down"]
    flat[module + "lora_up"] = pair["up"] * (alpha / rank)
  return traverse_util.unflatten_dict(flat, sep="/")


def merge(params: Any, lora: dict, alpha: float) -> Any:
  """base + (alpha / rank) * down @ up on each LoRA'd kernel, in the kernel's dtype (the product is
  cast to it, so merge into float32 kernels to keep the adapter's small changes); other leaves are
  passed through."""
  flat = dict(traverse_util.flatten_dict(params, sep="/"))
  for key, pair in lora.items():
    rank = pair["down"].shape[1]
    delta = (pair["down"] @ pair["up"]) * (alpha / rank)
    flat[key] = flat[key] + delta.astype(flat[key].dtype)
  return traverse_util.unflatten_dict(flat, sep="/")


def _unet_module_name(key: str) -> str:
  from dreambooth_jax.models.convert import flax_path_to_torch_name
  return flax_path_to_torch_name(tuple(key.split("/")))


def _text_encoder_module_names(keys) -> dict[str, str]:
  """Flax kernel path -> CLIPTextModel weight name, read from the text encoder's conversion table."""
  from clip_jax.convert import text_encoder_entries
  layers = 1 + max((int(m.group(1)) for k in keys if (m := re.search(r"resblocks_(\d+)/", k))), default=-1)
  table = {"/".join(e.flax_key[1:]): e.torch_key for e in text_encoder_entries(layers)}
  missing = [k for k in keys if k not in table]
  if missing:
    raise ValueError(f"text-encoder LoRA on {missing[0]!r}: CLIPTextModel has no such linear layer.")
  return {k: table[k] for k in keys}


def to_diffusers_state_dict(lora: dict, alpha: float, prefix: str = "unet") -> dict[str, np.ndarray]:
  """One component's adapter in PEFT / diffusers naming: `<prefix>.<module>.lora_A.weight` [r, in]
  and `lora_B.weight` [out, r]. prefix: 'unet' or 'text_encoder' (its modules keep transformers'
  `text_model.` prefix, as hub adapters have it; diffusers strips it where the model lacks it).

  A file without alphas loads with alpha = rank (scale 1), so alpha / rank is folded into B.
  """
  if prefix == "unet":
    names = {key: _unet_module_name(key) for key in lora}
  elif prefix == "text_encoder":
    names = _text_encoder_module_names(list(lora))
  else:
    raise ValueError(f"LoRA export for component {prefix!r}: only 'unet' and 'text_encoder' are known.")
  out = {}
  for key, pair in lora.items():
    module = names[key]
    assert module.endswith(".weight"), module
    module = module[: -len(".weight")]
    out[f"{prefix}.{module}.lora_A.weight"] = np.ascontiguousarray(np.asarray(pair["down"], np.float32).T)
    scale = alpha / pair["down"].shape[1]
    out[f"{prefix}.{module}.lora_B.weight"] = np.ascontiguousarray(np.asarray(pair["up"], np.float32).T * scale)
  return out


def adapter_state_dict(adapters: dict[str, dict], alpha: float) -> dict[str, np.ndarray]:
  """Every component's adapter ({'unet': lora, 'text_encoder': lora}) in one PEFT state dict: the
  `pytorch_lora_weights.safetensors` that `StableDiffusionPipeline.load_lora_weights` reads."""
  out = {}
  for component, lora in adapters.items():
    out.update(to_diffusers_state_dict(lora, alpha, prefix=component))
  return out
