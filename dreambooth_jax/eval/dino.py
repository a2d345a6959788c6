"""DINO's self-supervised ViT (Caron et al. 2021) in Flax, as DreamBooth's subject-fidelity metric uses it.

DreamBooth's DINO score compares the [CLS] embeddings of ViT-S/16 DINO: patch size 16, width 384,
12 blocks of 6 heads, pre-LN blocks with LayerNorm eps 1e-6 and exact GELU, a learned class token
and learned positional embeddings, a final LayerNorm. Weights load from timm's
`vit_small_patch16_224.dino` state dict and from the original DINO release
(`dino_deitsmall16_pretrain.pth`), which share one naming scheme; ViT-B DINO checkpoints load too,
their size read off the weights.

Images of other sizes get positional embeddings resized by bicubic interpolation exactly as the
DINO repository does it (torch's bicubic kernel with a = -0.75 and DINO's `+ 0.1` scale factor),
so features at any resolution equal DINO's own.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from PIL import Image

from clip_jax.convert import Entry, tree_from_table
from clip_jax.convert import variables_to_state_dict as table_to_state_dict
from clip_jax.data.images import eval_transform, to_rgb
from clip_jax.layers import Dense, LayerNorm, exact_gelu, matmul, normal
from clip_jax.models.transformer import MultiHeadAttention
from clip_jax.models.vit import patchify
from clip_jax.weights import CheckpointError, load_state_dict

Dtype = Any
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_SIZE, CROP_SIZE = 256, 224   # DINO's evaluation transform


@dataclasses.dataclass(frozen=True)
class DinoConfig:
  patch_size: int = 16
  width: int = 384
  layers: int = 12
  heads: int = 6
  mlp_ratio: float = 4.0
  pretrain_grid: int = 14   # positional embeddings are learned for a 14 x 14 grid (224 / 16)


VIT_S16 = DinoConfig()
VIT_B16 = DinoConfig(width=768, heads=12)


# ----------------------------------------------------------------------------- bicubic resize
def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """torch's bicubic kernel: weights of the taps at offsets -1, 0, 1, 2 for fractions t [n] -> [n, 4]."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):   # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int, scale_factor: float) -> np.ndarray:
  """[out_size, in_size] matrix of torch's `interpolate(mode='bicubic', scale_factor=...,
  align_corners=False)` along one axis.

  With an explicit scale factor torch maps output pixel d to source 1/scale * (d + 0.5) - 0.5
  (not from the ratio of sizes) and clamps taps at the border; DINO relies on that.
  """
  source = (np.arange(out_size, dtype=np.float64) + 0.5) / scale_factor - 0.5
  first = np.floor(source)
  weights = _cubic_weights(source - first)                                   # [out, 4]
  taps = np.clip(first[:, None].astype(np.int64) + np.arange(-1, 3), 0, in_size - 1)
  matrix = np.zeros((out_size, in_size), np.float64)
  np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.ravel()), weights.ravel())
  return matrix


def resize_positional_embedding(pos_embed: jax.Array, grid: int, rows: int, cols: int) -> jax.Array:
  """[1 + grid^2, width] learned embeddings -> [1 + rows * cols, width], as DINO's
  `interpolate_pos_encoding` (the class position is kept as it is)."""
  # DINO adds 0.1 to the target grid so floor(grid * scale) cannot round below it; the same
  # factor then sets the sampling positions.
  row_matrix = bicubic_matrix(grid, rows, (rows + 0.1) / grid)
  col_matrix = bicubic_matrix(grid, cols, (cols + 0.1) / grid)
  patch_pos = pos_embed[1:].reshape(grid, grid, -1).astype(jnp.float32)
  resized = jnp.einsum("ah,bw,hwc->abc", jnp.asarray(row_matrix, jnp.float32),
                       jnp.asarray(col_matrix, jnp.float32), patch_pos,
                       precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([pos_embed[:1].astype(jnp.float32), resized.reshape(rows * cols, -1)], axis=0)


# ----------------------------------------------------------------------------- model
class DinoBlock(nn.Module):
  """timm/DINO's pre-LN block: LayerNorm eps 1e-6, exact GELU, biases everywhere."""
  heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = LayerNorm(epsilon=1e-6, name="norm1", **kw)(x)
    x = x + MultiHeadAttention(self.heads, name="attn", **kw)(h, h)
    h = LayerNorm(epsilon=1e-6, name="norm2", **kw)(x)
    h = exact_gelu(Dense(int(width * self.mlp_ratio), kernel_axes=("embed", "mlp"), name="fc1", **kw)(h))
    return x + Dense(width, kernel_axes=("mlp", "embed"), name="fc2", **kw)(h)


class DinoViT(nn.Module):
  """NHWC images normalised with ImageNet mean/std -> [B, width] [CLS] embeddings after the final
  LayerNorm (what DINO's and timm's `forward` return with no classifier head).

  Any image size works: pixels beyond a multiple of the patch size are dropped (as DINO's strided
  conv does) and positional embeddings are resized bicubically.
  """
  config: DinoConfig = VIT_S16
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    cfg = self.config
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"DinoViT takes NHWC RGB images [B, H, W, 3], got shape {images.shape}.")
    b, h, w, c = images.shape
    p, width = cfg.patch_size, cfg.width
    rows, cols = h // p, w // p
    if rows == 0 or cols == 0:
      raise ValueError(f"DinoViT needs images of at least {p}x{p} pixels, got {h}x{w}.")
    kernel = self.param("patch_embed", nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
                        (p, p, c, width), self.param_dtype)
    patch_bias = self.param("patch_bias", nn.initializers.zeros, (width,), self.param_dtype)
    patches = patchify(images[:, :rows * p, :cols * p], p)                    # [B, N, p*p*3]
    x = matmul(patches, kernel.reshape(p * p * c, width), self.dtype) + patch_bias.astype(jnp.float32)
    cls_token = self.param("cls_token", normal(0.02), (width,), self.param_dtype)
    pos_embed = self.param("pos_embed", normal(0.02), (cfg.pretrain_grid ** 2 + 1, width), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(jnp.float32), (b, 1, width)), x], axis=1)
    # DINO keeps the learned table only for square images with as many patches as it has rows;
    # a 224 x 232 image is resampled too (to the same grid, slightly shifted), and so is it here.
    if rows * cols != cfg.pretrain_grid ** 2 or h != w:
      pos_embed = resize_positional_embedding(pos_embed, cfg.pretrain_grid, rows, cols)
    x = (x + pos_embed.astype(jnp.float32)).astype(self.dtype)
    for i in range(cfg.layers):
      x = DinoBlock(cfg.heads, cfg.mlp_ratio, dtype=self.dtype, param_dtype=self.param_dtype,
                    name=f"blocks_{i}")(x)
    return LayerNorm(epsilon=1e-6, dtype=jnp.float32, param_dtype=self.param_dtype, name="norm")(x[:, 0])


# ----------------------------------------------------------------------------- preprocessing
def preprocess(images: Image.Image | np.ndarray | Sequence[Image.Image | np.ndarray],
               resize_size: int = RESIZE_SIZE, crop_size: int = CROP_SIZE) -> np.ndarray:
  """PIL images or uint8 HWC arrays -> [N, crop, crop, 3] float32: bicubic resize of the shortest
  side to 256, center crop 224, ImageNet mean/std (torchvision's Resize + CenterCrop + Normalize)."""
  if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim == 3):
    images = [images]
  if crop_size > resize_size or (resize_size - crop_size) % 4:
    raise ValueError(f"crop_size {crop_size} must be at most resize_size {resize_size} and differ from it by a "
                     "multiple of 4 (256 / 224 as in DINO).")
  # Cropping the centered resize_size square keeps torchvision's crop offsets exactly: they
  # differ by (resize - crop) / 2, and an even shift leaves Python's round-half-to-even alone.
  offset = (resize_size - crop_size) // 2
  mean = np.float32(255) * np.asarray(IMAGENET_MEAN, np.float32)
  std = np.float32(255) * np.asarray(IMAGENET_STD, np.float32)
  out = []
  for image in images:
    if isinstance(image, np.ndarray):
      if image.dtype != np.uint8:
        raise ValueError(f"DINO preprocessing takes uint8 arrays (0..255), got {image.dtype}; convert first.")
      image = Image.fromarray(image)
    rgb, _ = to_rgb(image)
    square = eval_transform(rgb, resize_size)
    crop = square[offset:offset + crop_size, offset:offset + crop_size]
    out.append((crop.astype(np.float32) - mean) / std)
  if not out:
    raise ValueError("DINO preprocessing got no images.")
  return np.stack(out)


# ----------------------------------------------------------------------------- weights
def dino_entries(cfg: DinoConfig) -> list[Entry]:
  """timm / DINO layout (after `split_qkv`); the flat tensors are reshaped to ours on the way."""
  def norm(f, t):
    return [Entry(("params", *f, "scale"), f"{t}.weight"), Entry(("params", *f, "bias"), f"{t}.bias")]

  def dense(f, t):
    return [Entry(("params", *f, "kernel"), f"{t}.weight", "linear"), Entry(("params", *f, "bias"), f"{t}.bias")]

  entries = [Entry(("params", "patch_embed"), "patch_embed.proj.weight", "conv"),
             Entry(("params", "patch_bias"), "patch_embed.proj.bias"),
             Entry(("params", "cls_token"), "cls_token"),       # [1, 1, width] -> [width]
             Entry(("params", "pos_embed"), "pos_embed")]       # [1, 1 + N, width] -> [1 + N, width]
  for i in range(cfg.layers):
    f, t = (f"blocks_{i}",), f"blocks.{i}"
    entries += norm((*f, "norm1"), f"{t}.norm1")
    for ours, theirs in (("q", "q"), ("k", "k"), ("v", "v"), ("out", "proj")):
      entries += dense((*f, "attn", ours), f"{t}.attn.{theirs}")
    entries += norm((*f, "norm2"), f"{t}.norm2")
    entries += dense((*f, "fc1"), f"{t}.mlp.fc1")
    entries += dense((*f, "fc2"), f"{t}.mlp.fc2")
  return entries + norm(("norm",), "norm")


def split_qkv(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """timm and DINO keep q, k, v in one `attn.qkv` Linear [3 * width, width]; split it in three."""
  out = {}
  for key, value in state.items():
    match = re.match(r"(.*\.attn)\.qkv\.(weight|bias)$", key)
    if match:
      for name, part in zip("qkv", np.split(np.asarray(value), 3, axis=0)):
        out[f"{match.group(1)}.{name}.{match.group(2)}"] = part
    else:
      out[key] = value
  return out


def fuse_qkv(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = dict(state)
  for key in [k for k in state if re.search(r"\.attn\.q\.(weight|bias)$", k)]:
    prefix, kind = re.match(r"(.*\.attn)\.q\.(weight|bias)$", key).groups()
    out[f"{prefix}.qkv.{kind}"] = np.concatenate([out.pop(f"{prefix}.{n}.{kind}") for n in "qkv"], axis=0)
  return out


# Not part of the backbone: timm's classifier head, DINO's projection head in training checkpoints.
_IGNORED = re.compile(r"^(head|fc_norm|head_drop)\.|^(dist_token|mask_token)$")


def _strip_prefixes(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Training checkpoints name the backbone 'module.backbone.*' (DDP) or 'backbone.*' beside the
  DINO projection head; keep the backbone, without the prefix."""
  for prefix in ("module.backbone.", "backbone.", "module."):
    if f"{prefix}patch_embed.proj.weight" in state and "patch_embed.proj.weight" not in state:
      return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
  return dict(state)


def infer_config(state: Mapping[str, np.ndarray]) -> DinoConfig:
  """Architecture from the weights' shapes; heads are 64 wide in every DINO ViT."""
  try:
    width, _, patch, _ = state["patch_embed.proj.weight"].shape
    num_positions = int(np.prod(state["pos_embed"].shape)) // width
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
  except (KeyError, ValueError) as e:
    raise CheckpointError(f"not a timm/DINO ViT state dict (no {e}; keys start with {sorted(state)[:3]}).") from None
  grid = int(round(math.sqrt(num_positions - 1)))
  if grid * grid + 1 != num_positions:
    raise CheckpointError(f"pos_embed holds {num_positions} positions, not a class token plus a square grid.")
  return DinoConfig(patch_size=patch, width=width, layers=layers, heads=max(1, width // 64),
                    mlp_ratio=hidden / width, pretrain_grid=grid)


def _expected_shapes(model: DinoViT) -> dict[tuple, tuple]:
  size = model.config.pretrain_grid * model.config.patch_size
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  return {k: v.shape for k, v in traverse_util.flatten_dict(nn.meta.unbox(shapes)).items()}


def dino_from_state_dict(state: Mapping[str, np.ndarray], *, config: DinoConfig | None = None,
                         source: str = "checkpoint", **module_kwargs) -> tuple[DinoViT, dict[str, Any]]:
  """`(module, variables)` from a timm `vit_*_patch*.dino` or original DINO state dict."""
  state = _strip_prefixes({k: np.asarray(v) for k, v in state.items()})
  head = [k for k in state if _IGNORED.search(k)]
  if head:
    logging.info("%s: ignoring %d weights outside the DINO backbone (e.g. %s).", source, len(head), head[0])
  cfg = config or infer_config(state)
  model = DinoViT(cfg, **module_kwargs)
  return model, tree_from_table(split_qkv(state), dino_entries(cfg), _expected_shapes(model), source,
                                f"a DINO ViT (width {cfg.width}, {cfg.layers} blocks, patch {cfg.patch_size})",
                                _IGNORED)


def dino_to_state_dict(model: DinoViT, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """timm / DINO layout (fused qkv, [1, 1, width] class token, [1, 1 + N, width] positions)."""
  state = fuse_qkv(table_to_state_dict(variables, dino_entries(model.config)))
  state["cls_token"] = state["cls_token"].reshape(1, 1, -1)
  state["pos_embed"] = state["pos_embed"][None]
  return state


def load_dino(path: str, **module_kwargs) -> tuple[DinoViT, dict[str, Any]]:
  """`(module, variables)` from a `.safetensors` / `.pth` file of timm's or DINO's layout.

  DINO's full training checkpoints nest the networks ({'teacher': ..., 'student': ...}); pass
  `torch.load(path)['teacher']` to `dino_from_state_dict` for those.
  """
  return dino_from_state_dict(load_state_dict(path), source=path, **module_kwargs)
