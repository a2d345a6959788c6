"""diffusers <-> Flax weights for the UNet and the VAE, and pipeline-folder component IO.

Our module trees mirror diffusers' names, so conversion is structural:
  name: 'down_blocks.0.attentions.1.proj_in.weight' <-> ('down_blocks_0', 'attentions_1', 'proj_in', 'kernel')
  4-D weight -> conv kernel (transposed to HWIO), 2-D weight -> dense kernel (transposed),
  1-D weight -> norm 'scale', bias -> 'bias'.
Every converted tree is checked against the shapes the config implies (`jax.eval_shape` of
`init`), so a checkpoint that does not fit its config fails with the offending name.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from clip_jax.cli import MissingPathError
from clip_jax.weights import (DIFFUSERS_WEIGHTS, CheckpointError, conv_to_flax, conv_to_torch,
                              linear_to_flax, linear_to_torch, load_weights_dir, save_safetensors)
from dreambooth_jax.models import unet as unet_lib
from dreambooth_jax.models import vae as vae_lib

WEIGHTS_NAME = "diffusion_pytorch_model"
CONFIG_NAME = "config.json"

# diffusers ModuleList attributes: `<name>.<i>` in torch is the Flax module `<name>_<i>`. Only
# these are split back, since other names end in digits too ('linear_1').
_LIST_NAMES = ("down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks",
               "downsamplers", "upsamplers", "to_out", "net")
_LIST_RE = re.compile(rf"^({'|'.join(_LIST_NAMES)})_(\d+)$")

# Names of the VAE attention before diffusers 0.14; still found in many hub checkpoints.
_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def flax_path_to_torch_name(path: tuple[str, ...]) -> str:
  parts = []
  for part in path[:-1]:
    match = _LIST_RE.match(part)
    parts.extend(match.groups() if match else (part,))
  leaf = path[-1]
  parts.append("weight" if leaf in ("kernel", "scale") else leaf)
  return ".".join(parts)


def _to_flax_layout(value: np.ndarray, expected_ndim: int) -> np.ndarray:
  if value.ndim == 4 and expected_ndim == 2 and value.shape[2:] == (1, 1):
    value = value[:, :, 0, 0]  # 1x1-conv attention weights of original-format VAEs
  if value.ndim == 4:
    return conv_to_flax(value)
  if value.ndim == 2:
    return linear_to_flax(value)
  return np.ascontiguousarray(value)


def _to_torch_layout(value) -> np.ndarray:
  value = np.asarray(jax.device_get(value))
  if value.ndim == 4:
    return conv_to_torch(value)
  if value.ndim == 2:
    return linear_to_torch(value)
  return np.ascontiguousarray(value)


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  if len(flax_shape) == 4:
    return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
  return tuple(reversed(flax_shape)) if len(flax_shape) == 2 else tuple(flax_shape)


def _expected_shapes(model: nn.Module, inputs) -> dict[tuple[str, ...], tuple[int, ...]]:
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *inputs))
  params = nn.meta.unbox(abstract["params"])
  return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(params).items()}


def _rename_legacy_attention(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  renamed = {}
  for name, value in state_dict.items():
    parts = name.split(".")
    if len(parts) >= 2 and ".attentions." in name and parts[-2] in _LEGACY_ATTENTION_NAMES:
      name = ".".join(parts[:-2] + [_LEGACY_ATTENTION_NAMES[parts[-2]], parts[-1]])
    renamed[name] = value
  return renamed


def _state_dict_to_params(state_dict: Mapping[str, np.ndarray], expected, what: str,
                          dtype) -> dict[str, Any]:
  expected_by_name = {flax_path_to_torch_name(p): (p, s) for p, s in expected.items()}
  missing = sorted(set(expected_by_name) - set(state_dict))
  unexpected = sorted(set(state_dict) - set(expected_by_name))
  if missing:
    raise CheckpointError(f"{what}: the checkpoint lacks {len(missing)} weight(s) the config "
                          f"needs, first {missing[0]!r}; check that config.json belongs to "
                          "these weights.")
  if unexpected:
    raise CheckpointError(f"{what}: the checkpoint has {len(unexpected)} weight(s) the config "
                          f"does not use, first {unexpected[0]!r}; check that config.json "
                          "belongs to these weights.")
  flat = {}
  for name, (path, flax_shape) in expected_by_name.items():
    value = _to_flax_layout(np.asarray(state_dict[name]), len(flax_shape))
    if value.shape != flax_shape:
      raise CheckpointError(f"{what}: weight {name!r} has shape {tuple(state_dict[name].shape)} "
                            f"but the config implies {_torch_shape(flax_shape)}.")
    flat[path] = value.astype(dtype) if dtype is not None else value
  return traverse_util.unflatten_dict(flat)


def _params_to_state_dict(params, expected, what: str, dtype) -> dict[str, np.ndarray]:
  flat = traverse_util.flatten_dict(nn.meta.unbox(params))
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  if missing or unexpected:
    path = (missing or unexpected)[0]
    raise CheckpointError(f"{what}: the parameters {'lack' if missing else 'have an extra'} "
                          f"{'/'.join(path)}; they do not belong to this config.")
  state = {}
  for path, value in flat.items():
    if tuple(value.shape) != expected[path]:
      raise CheckpointError(f"{what}: parameter {'/'.join(path)} has shape {tuple(value.shape)} "
                            f"but the config implies {expected[path]}.")
    tensor = _to_torch_layout(value)
    state[flax_path_to_torch_name(path)] = tensor.astype(dtype) if dtype is not None else tensor
  return state


def _as_unet_config(config) -> unet_lib.UNetConfig:
  return config if isinstance(config, unet_lib.UNetConfig) else unet_lib.UNetConfig.from_diffusers(config)


def _as_vae_config(config) -> vae_lib.VAEConfig:
  return config if isinstance(config, vae_lib.VAEConfig) else vae_lib.VAEConfig.from_diffusers(config)


def _unet_shapes(config: unet_lib.UNetConfig):
  return _expected_shapes(unet_lib.UNet2DConditionModel(config), unet_lib.init_inputs(config))


def _vae_shapes(config: vae_lib.VAEConfig):
  return _expected_shapes(vae_lib.AutoencoderKL(config), vae_lib.init_inputs(config))


def unet_from_diffusers(state_dict: Mapping[str, np.ndarray], config, dtype=np.float32):
  """diffusers UNet2DConditionModel state dict (numpy) -> Flax params (nested dict of numpy).

  `config` is a `UNetConfig` or the diffusers config dict. `dtype=None` keeps the file's dtype.
  """
  config = _as_unet_config(config)
  return _state_dict_to_params(state_dict, _unet_shapes(config), "unet", dtype)


def unet_to_diffusers(params, config, dtype=None) -> dict[str, np.ndarray]:
  """Flax UNet params -> a state dict that diffusers' UNet2DConditionModel loads."""
  config = _as_unet_config(config)
  return _params_to_state_dict(params, _unet_shapes(config), "unet", dtype)


def vae_from_diffusers(state_dict: Mapping[str, np.ndarray], config, dtype=np.float32):
  """diffusers AutoencoderKL state dict -> Flax params; accepts pre-0.14 attention names."""
  config = _as_vae_config(config)
  return _state_dict_to_params(_rename_legacy_attention(state_dict), _vae_shapes(config), "vae",
                               dtype)


def vae_to_diffusers(params, config, dtype=None) -> dict[str, np.ndarray]:
  config = _as_vae_config(config)
  return _params_to_state_dict(params, _vae_shapes(config), "vae", dtype)


# ---------------------------------------------------------------------------------------
# Pipeline folders: <root>/<name>/config.json + diffusion_pytorch_model.safetensors
# ---------------------------------------------------------------------------------------

_CLASSES = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae"}


def read_config(component_dir: str) -> dict[str, Any]:
  path = os.path.join(component_dir, CONFIG_NAME)
  if not os.path.isfile(path):
    raise CheckpointError(f"{component_dir}: no {CONFIG_NAME}; expected a diffusers component "
                          "folder.")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e}).") from e


def load_component(directory: str, name: str, dtype=np.float32, variant: str | None = None):
  """Reads `<directory>/<name>/` of a diffusers pipeline -> (UNetConfig | VAEConfig, params).

  The model class comes from config.json's `_class_name` (UNet2DConditionModel or
  AutoencoderKL). Weights are found as diffusers finds them: single, sharded (an index naming
  the shards), `variant='fp16'` (`diffusion_pytorch_model.fp16.safetensors`, sharded variants
  too) or `.bin` files, safetensors first; CheckpointError lists what the folder holds otherwise.
  """
  if not os.path.isdir(directory):
    raise MissingPathError(f"{directory}: no such model directory (expected a diffusers "
                            "pipeline folder).")
  component_dir = os.path.join(directory, name)
  if not os.path.isdir(component_dir):
    raise CheckpointError(f"{directory}: has no '{name}' component folder; expected "
                          f"{name}/{CONFIG_NAME} and {name}/{WEIGHTS_NAME}.safetensors there.")
  raw_config = read_config(component_dir)
  class_name = raw_config.get("_class_name", {"unet": "UNet2DConditionModel",
                                               "vae": "AutoencoderKL"}.get(name))
  kind = _CLASSES.get(class_name)
  if kind is None:
    raise CheckpointError(f"{component_dir}: component class {class_name!r} is not supported "
                          f"(supported: {', '.join(_CLASSES)}).")
  try:
    config = (unet_lib.UNetConfig if kind == "unet" else vae_lib.VAEConfig).from_diffusers(raw_config)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{component_dir}/{CONFIG_NAME}: {e}") from e
  state = load_weights_dir(component_dir, DIFFUSERS_WEIGHTS, variant)
  convert = unet_from_diffusers if kind == "unet" else vae_from_diffusers
  try:
    params = convert(state, config, dtype=dtype)
  except CheckpointError as e:
    raise CheckpointError(f"{component_dir}: {e}") from e
  return config, params


def save_component(directory: str, name: str, config, params, dtype=None) -> str:
  """Writes `<directory>/<name>/config.json` and `diffusion_pytorch_model.safetensors`.

  `diffusers.<Class>.from_pretrained(directory, subfolder=name)` loads the result.
  Returns the component folder.
  """
  if isinstance(config, unet_lib.UNetConfig):
    state = unet_to_diffusers(params, config, dtype)
  elif isinstance(config, vae_lib.VAEConfig):
    state = vae_to_diffusers(params, config, dtype)
  else:
    raise TypeError(f"save_component: config must be a UNetConfig or VAEConfig, got "
                    f"{type(config).__name__}.")
  component_dir = os.path.join(directory, name)
  os.makedirs(component_dir, exist_ok=True)
  save_safetensors(state, os.path.join(component_dir, f"{WEIGHTS_NAME}.safetensors"))
  with open(os.path.join(component_dir, CONFIG_NAME), "w") as f:
    json.dump(config.to_diffusers(), f, indent=2, sort_keys=True)
  return component_dir
