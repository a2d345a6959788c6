"""LoRA as a transformation of parameters, not of modules.

A LoRA pair (down [in, r], up [r, out]) sits beside each chosen kernel; the model runs on
`merge(base, lora)` = base + (alpha / r) * down @ up, computed inside the train step, so the UNet
code is untouched and exporting merged weights is the same function. `up` starts at zero, so
training starts exactly at the base model. Saved LoRA weights use the PEFT names that diffusers'
`load_lora_weights` reads (`unet.<module>.lora_A.weight` = down^T, `lora_B.weight` = up^T).
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


def merge(params: Any, lora: dict, alpha: float) -> Any:
  """base + (alpha / rank) * down @ up on each LoRA'd kernel; other leaves are passed through."""
  flat = dict(traverse_util.flatten_dict(params, sep="/"))
  for key, pair in lora.items():
    rank = pair["down"].shape[1]
    delta = (pair["down"] @ pair["up"]) * (alpha / rank)
    flat[key] = flat[key] + delta.astype(flat[key].dtype)
  return traverse_util.unflatten_dict(flat, sep="/")


def to_diffusers_state_dict(lora: dict, alpha: float, prefix: str = "unet") -> dict[str, np.ndarray]:
  """PEFT / diffusers naming: `<prefix>.<module path>.lora_A.weight` [r, in] and `lora_B.weight` [out, r].

  A file without alphas loads with alpha = rank (scale 1), so alpha / rank is folded into B.
  """
  from dreambooth_jax.models.convert import flax_path_to_torch_name
  out = {}
  for key, pair in lora.items():
    module = flax_path_to_torch_name(tuple(key.split("/")))
    assert module.endswith(".weight"), module
    module = module[: -len(".weight")]
    out[f"{prefix}.{module}.lora_A.weight"] = np.ascontiguousarray(np.asarray(pair["down"], np.float32).T)
    scale = alpha / pair["down"].shape[1]
    out[f"{prefix}.{module}.lora_B.weight"] = np.ascontiguousarray(np.asarray(pair["up"], np.float32).T * scale)
  return out
