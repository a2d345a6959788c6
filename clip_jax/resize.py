"""Moving a CLIP image tower to a new resolution: its positional embeddings over the patch grid.

A ViT's positional embedding is one class-token row and a g x g grid of rows; a ModifiedResNet's
attention pool has one row for its mean token and a grid over the last feature map (image_size /
32). At a new image size the grid rows are resampled bicubically as images are and the first row
is kept, as open_clip's `resize_pos_embed` does (PyTorch's `F.interpolate(mode='bicubic',
antialias=True, align_corners=False)`, i.e. Keys' cubic with a = -0.5, the kernel widened when
shrinking). This is what the CLIP paper's ViT-L/14@336px starts from (appendix F: one extra epoch
at 336 px from the 224 px model) and what FixRes-style evaluation at a larger size needs.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from clip_jax.models.clip import CLIP

# Where each image tower keeps its grid embedding, and the pixels one grid cell covers.
_VIT_KEY = ("params", "visual", "positional_embedding")
_RESNET_KEY = ("params", "visual", "attnpool", "positional_embedding")
RESNET_STRIDE = 32  # ModifiedResNet: stem /4, then stages 2-4 /2 each


def resize_grid_embedding(embedding: Any, new_grid: int, extra_tokens: int = 1) -> np.ndarray:
  """[extra_tokens + g*g, width] -> [extra_tokens + new_grid**2, width], float32 on the host.

  The first `extra_tokens` rows (the class or mean token) are kept; the g x g grid (row-major, as
  the patches) is resampled bicubically with antialiasing, equal to open_clip's `resize_pos_embed`
  to float32 rounding. Raises ValueError when the rows after the extra tokens are not a square grid
  or `new_grid` < 1.
  """
  embedding = np.asarray(embedding, np.float32)
  if embedding.ndim != 2:
    raise ValueError(f"a positional embedding is [tokens, width]; got shape {embedding.shape}.")
  tokens, width = embedding.shape
  grid = math.isqrt(tokens - extra_tokens) if tokens >= extra_tokens else -1
  if grid < 1 or grid * grid != tokens - extra_tokens:
    raise ValueError(f"a positional embedding of {tokens} rows is not {extra_tokens} extra row(s) and a "
                     "square grid; cannot resize it.")
  if new_grid < 1:
    raise ValueError(f"the new grid must have at least one cell per side, not {new_grid}.")
  if new_grid == grid:
    return embedding
  cells = embedding[extra_tokens:].reshape(grid, grid, width)
  # jax.image.resize's bicubic is the same antialiased Keys kernel (a = -0.5) as PyTorch's
  # antialias=True path, weights renormalised at the borders; HIGHEST keeps its matmuls in f32.
  resized = jax.image.resize(jnp.asarray(cells), (new_grid, new_grid, width), method="bicubic", antialias=True,
                             precision=jax.lax.Precision.HIGHEST)
  return np.concatenate([embedding[:extra_tokens], np.asarray(resized, np.float32).reshape(-1, width)])


def grid_size(vision_config, image_size: int) -> int:
  """Grid cells per side for `image_size` px; ValueError when the size does not divide evenly."""
  cell = RESNET_STRIDE if vision_config.is_resnet else vision_config.patch_size
  if image_size < cell or image_size % cell:
    what = "a ResNet image tower needs a multiple of 32" if vision_config.is_resnet else \
        f"the ViT's patches are {cell} px"
    raise ValueError(f"image size {image_size} does not fit the model: {what}.")
  return image_size // cell


def resize_model(model: CLIP, variables: dict[str, Any], image_size: int) -> tuple[CLIP, dict[str, Any]]:
  """`(model, variables)` at `image_size` px: the config's image size replaced and the grid
  embedding (ViT: `visual/positional_embedding`; ResNet: `visual/attnpool/positional_embedding`)
  resampled by `resize_grid_embedding`. Other variables are passed through unchanged (the same
  objects). Raises ValueError when `image_size` does not divide into the tower's grid.
  """
  vision = model.config.vision
  new_grid = grid_size(vision, image_size)
  if image_size == vision.image_size:
    return model, variables
  key = _RESNET_KEY if vision.is_resnet else _VIT_KEY
  flat = traverse_util.flatten_dict(variables)
  if key not in flat:
    raise ValueError(f"the variables hold no {'/'.join(key)}; are they this model's?")
  flat[key] = resize_grid_embedding(flat[key], new_grid)
  config = model.config.replace(vision=dataclasses.replace(vision, image_size=image_size))
  return model.clone(config=config), traverse_util.unflatten_dict(flat)


def resize_note(vision_config, image_size: int) -> str:
  """What `resize_model` does to a tower of `vision_config` moved to `image_size` px, in words: the grid
  from and to, and the interpolation (the line a fine-tuning run at a new resolution prints)."""
  old, new = grid_size(vision_config, vision_config.image_size), grid_size(vision_config, image_size)
  where, row = (("the attention pool's", "mean-token") if vision_config.is_resnet else ("the", "class-token"))
  return (f"{where} positional grid resampled from {old} x {old} ({vision_config.image_size} px) to {new} x {new} "
          f"({image_size} px): bicubic with antialiasing, the {row} row kept (as open_clip's resize_pos_embed).")
