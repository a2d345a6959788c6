"""Reading and writing PyTorch-style state dicts without unpickling arbitrary objects.

Shared by the CLIP converters (`clip_jax.convert`) and the Stable Diffusion converters
(`dreambooth_jax`). Everything here speaks numpy: a state dict is `{name: np.ndarray}`.
"""
from __future__ import annotations

import os
import zipfile
from typing import Mapping

import numpy as np


class CheckpointError(ValueError):
  """A file that is not a supported checkpoint, or whose contents do not fit the model."""


def _torch_to_numpy(tensor) -> np.ndarray:
  import torch  # Imported lazily: torch is only needed for `.pt`/`.bin` files.
  tensor = tensor.detach().cpu()
  if tensor.dtype == torch.bfloat16:
    tensor = tensor.float()
  return tensor.numpy()


def _load_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise CheckpointError(f"{path}: reading a PyTorch checkpoint needs torch installed "
                          "(or convert it to .safetensors first).") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except RuntimeError as e:
    # OpenAI's released checkpoints are TorchScript archives, which torch.load refuses when
    # weights_only=True. torch.jit.load reads their tensors without running pickled Python.
    if zipfile.is_zipfile(path) and "constants.pkl" in " ".join(zipfile.ZipFile(path).namelist()):
      obj = torch.jit.load(path, map_location="cpu").state_dict()
    else:
      raise CheckpointError(f"{path}: not a loadable PyTorch checkpoint ({str(e).splitlines()[0]}).") from e
  except Exception as e:  # pickle errors, truncated files, text files...
    raise CheckpointError(f"{path}: not a loadable PyTorch checkpoint ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}).") from e
  # Training checkpoints wrap the weights: {'state_dict': ...} (open_clip) or {'model': ...}.
  if isinstance(obj, Mapping):
    for key in ("state_dict", "model", "module"):
      if key in obj and isinstance(obj[key], Mapping):
        obj = obj[key]
        break
  if not isinstance(obj, Mapping) or not all(hasattr(v, "shape") for v in obj.values()):
    raise CheckpointError(f"{path}: holds no state dict of tensors.")
  state = {k: _torch_to_numpy(v) for k, v in obj.items()}
  # DistributedDataParallel prefixes every name with 'module.'.
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module."):]: v for k, v in state.items()}
  return state


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  try:
    return dict(load_file(path))
  except (SafetensorError, OSError, ValueError) as e:
    message = str(e)
    if "bfloat16" in message or "bf16" in message.lower():
      # numpy has no bfloat16: read through torch, which does.
      from safetensors.torch import load_file as load_torch_file
      return {k: _torch_to_numpy(v) for k, v in load_torch_file(path).items()}
    raise CheckpointError(f"{path}: not a valid safetensors file ({message.splitlines()[0]}).") from e


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads `.safetensors`, `.pt`, `.pth`, `.bin` or `.ckpt` into `{name: np.ndarray}`.

  `torch.load` runs with `weights_only=True`, so no arbitrary pickled object is executed.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file.")
  if os.path.isdir(path):
    raise CheckpointError(f"{path}: is a directory, expected a weights file.")
  with open(path, "rb") as f:
    head = f.read(16)
  if path.endswith(".safetensors"):
    return _load_safetensors(path)
  if head[:2] == b"PK" or head[:1] == b"\x80":  # zip archive (torch>=1.6) or legacy pickle
    return _load_torch(path)
  raise CheckpointError(f"{path}: not a supported checkpoint (expected .safetensors, or a PyTorch "
                        ".pt/.pth/.bin/.ckpt file).")


def save_safetensors(state: Mapping[str, np.ndarray], path: str, metadata: dict | None = None) -> None:
  from safetensors.numpy import save_file
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # np.ascontiguousarray would turn 0-d tensors (logit_scale) into shape [1].
  save_file({k: np.asarray(v, order="C") for k, v in state.items()}, path,
            metadata=metadata or {"format": "pt"})


# Layout conversions between PyTorch and Flax parameters.
def linear_to_flax(weight: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> Flax Dense kernel [in, out]."""
  return np.ascontiguousarray(weight.T)


def linear_to_torch(kernel) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(kernel).T)


def conv_to_flax(weight: np.ndarray) -> np.ndarray:
  """torch Conv2d weight [out, in, kh, kw] -> Flax Conv kernel [kh, kw, in, out]."""
  return np.ascontiguousarray(weight.transpose(2, 3, 1, 0))


def conv_to_torch(kernel) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(kernel).transpose(3, 2, 0, 1))
