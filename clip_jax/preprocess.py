"""CLIP's inference preprocessing for user images: resize and crop (or pad) as the model's own
preprocessing says (OpenAI's by default: bicubic resize of the shortest side, centre crop), conversion
to RGB, mean/std normalisation, giving NHWC float32; the same transform as open_clip's
`image_transform(size, is_train=False, mean=, std=, interpolation=, resize_mode=, fill_color=)`, in the
same order. The transforms themselves live with the input pipeline (`clip_jax.data.images`), so
evaluation and this agree exactly."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from clip_jax.data.images import OPENAI, OPENAI_MEAN, OPENAI_STD, Preprocessing, eval_transform, normalize  # noqa: F401


def preprocess(images: Image.Image | np.ndarray | Sequence[Image.Image | np.ndarray],
               image_size: int = 224, preprocessing: Preprocessing | None = None) -> np.ndarray:
  """One image or a list of them -> [N, image_size, image_size, 3] float32 (the model's mean/std units).

  Images: PIL images of any mode, or uint8 arrays [h, w] / [h, w, 1|3|4] (gray, RGB, RGBA), one or a
  batch [n, h, w, c]; jax arrays and other array-likes are read with np.asarray.
  `preprocessing`: the model's own (`clip_jax.stated_preprocessing(CHECKPOINT)`: mean/std,
  bicubic or bilinear, resize 'shortest' | 'longest' | 'squash'); None: OpenAI's CLIP's.
  Equal to open_clip's eval transform (`open_clip.image_transform(image_size, is_train=False, ...)` with
  the same settings, tested to 1e-6 for P, PA, CMYK, LA, RGBA, 1, L, RGB, YCbCr): resize and crop happen
  in the image's own mode and the RGB conversion comes last, so a palette image is resampled with
  NEAREST and alpha is dropped, as there. 16/32-bit and float gray (I;16, I, F) are the one chosen
  difference: they keep their top 8 bits where open_clip saturates them at 255 (see `clip_jax.data.images`).
  EXIF orientation is not applied to PIL images passed in (open_clip does not either); files read
  by `clip_jax.data.images.load_image` are upright already.
  Raises ValueError for arrays that are not uint8 [h, w(, c)] images (float: the line says which
  conversion its values call for; channels-first [c, h, w]) and for no images (an empty list or batch).
  """
  preprocessing = preprocessing or OPENAI
  if not isinstance(preprocessing, Preprocessing):
    raise ValueError(f"preprocessing must be a clip_jax.data.images.Preprocessing (or None: OpenAI's), got "
                     f"{type(preprocessing).__name__}.")
  if not isinstance(images, (Image.Image, np.ndarray, list, tuple)) and hasattr(images, "__array__"):
    images = np.asarray(images)  # a jax array, a CPU torch tensor
  if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim in (2, 3)):
    images = [images]
  elif isinstance(images, np.ndarray) and images.ndim != 4:
    raise ValueError(f"preprocess takes an image [h, w(, c)] or a batch [n, h, w, c]; got an array of shape "
                     f"{images.shape}.")
  elif isinstance(images, np.ndarray) and images.shape[-1] not in (1, 3, 4) and images.shape[1] in (1, 3, 4):
    raise ValueError(f"preprocess takes a batch [n, h, w, c] (channels last), got shape {images.shape}; it looks "
                     "channels-first [n, c, h, w]: pass np.transpose(x, (0, 2, 3, 1)).")
  if len(images) == 0:
    # An empty batch array is refused as an empty list is: both are "no images", and an empty result
    # would only move the failure to the model call (or hide a filter that dropped every image).
    what = "an empty list" if not isinstance(images, np.ndarray) else f"an empty batch of shape {images.shape}"
    raise ValueError(f"preprocess got no images ({what}).")
  if isinstance(images, np.ndarray):
    _check_uint8(images)  # the whole batch's value range, not its first image's
  out = []
  for image in images:
    if not isinstance(image, (Image.Image, np.ndarray)) and hasattr(image, "__array__"):
      image = np.asarray(image)
    if isinstance(image, np.ndarray):
      image = _array_image(image)
    elif not isinstance(image, Image.Image):
      raise ValueError(f"preprocess takes PIL images or uint8 arrays, got {type(image).__name__}; open files "
                       "with clip_jax.data.images.load_image.")
    pixels = eval_transform(image, image_size, preprocessing)
    out.append(normalize(pixels, preprocessing.mean, preprocessing.std))
  return np.stack(out)


def _array_image(array: np.ndarray) -> Image.Image:
  """uint8 [h, w] / [h, w, 1|3|4] -> a PIL image; one-line ValueErrors for what PIL would misread."""
  _check_uint8(array)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim == 3 and array.shape[-1] not in (3, 4):
    hint = ("; it looks channels-first [c, h, w]: pass np.transpose(x, (1, 2, 0))" if array.shape[0] in (1, 3, 4)
            else "")
    raise ValueError(f"preprocess takes images [h, w] or [h, w, 1|3|4] (channels last), got shape "
                     f"{array.shape}{hint}.")
  if array.ndim not in (2, 3) or 0 in array.shape:
    raise ValueError(f"preprocess takes images [h, w] or [h, w, 1|3|4], got shape {array.shape}.")
  return Image.fromarray(np.ascontiguousarray(array))


def _check_uint8(array: np.ndarray) -> None:
  """One-line ValueError unless `array` is uint8, with the conversion its values call for."""
  if array.dtype != np.uint8:
    raise ValueError(f"preprocess takes uint8 arrays (0..255), got {array.dtype}{_conversion_hint(array)}")


def _conversion_hint(array: np.ndarray) -> str:
  """How to make uint8 pixels of `array`, judged by its values: one conversion for all would be wrong
  for most (x * 255 wraps 0..255 floats; normalized ones are no longer pixels; 16-bit ones need scaling)."""
  kind = array.dtype.kind
  if kind == "b":
    return "; convert to uint8 pixels first (booleans: x.astype(np.uint8) * 255, channels last)."
  if kind not in "fiu":
    return "; convert to uint8 pixels (0..255, channels last) first."
  values = array[np.isfinite(array)] if kind == "f" else array.ravel()
  if values.size == 0:
    return "; it holds no finite value."
  low, high = float(values.min()), float(values.max())
  said = f" with values {low:.3g}..{high:.3g}" + (" and NaN or inf" if values.size < array.size else "")
  if kind == "f" and low >= -0.05 and high <= 1.05:  # [0, 1] floats; resampling overshoots them a little
    return (f"{said}; convert first (floats in [0, 1], as ToTensor gives: np.round(np.clip(x, 0, 1) * 255)"
            ".astype(np.uint8), channels last).")
  if low < 0:
    return (f"{said}, which look already normalized (mean/std); preprocess takes raw pixels and normalizes "
            "them itself: pass the image before normalization, as uint8 0..255.")
  if high > 255:
    return (f"{said}, beyond 0..255: scale them to 0..255 (16-bit: x / 257), then "
            "np.clip(np.round(x), 0, 255).astype(np.uint8), channels last.")
  if kind == "f":
    return (f"{said}, which look like 0..255 pixels: cast them with np.clip(np.round(x), 0, 255)"
            ".astype(np.uint8) (not x * 255), channels last.")
  return f"{said}, which are 0..255 pixels: cast them with x.astype(np.uint8), channels last."
