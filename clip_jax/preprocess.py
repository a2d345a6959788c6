"""OpenAI CLIP's inference preprocessing for user images: bicubic resize of the shortest side,
center crop, conversion to RGB, mean/std normalisation, giving NHWC float32; the same transform as
open_clip's `image_transform(size, is_train=False)`, in the same order. The transforms themselves
live with the input pipeline (`clip_jax.data.images`), so training-time evaluation and this agree
exactly."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from clip_jax.data.images import OPENAI_MEAN, OPENAI_STD, eval_transform, normalize  # noqa: F401


def preprocess(images: Image.Image | np.ndarray | Sequence[Image.Image | np.ndarray],
               image_size: int = 224) -> np.ndarray:
  """One image or a list of them -> [N, image_size, image_size, 3] float32 (OpenAI mean/std units).

  Images: PIL images of any mode, or uint8 arrays [h, w] / [h, w, 3|4] (gray, RGB, RGBA).
  Equal to open_clip's eval transform (`open_clip.image_transform(image_size, is_train=False)`,
  tested to 1e-6 for P, PA, CMYK, LA, RGBA, 1, L, RGB, YCbCr): resize and crop happen in the image's
  own mode and the RGB conversion comes last, so a palette image is resampled with NEAREST and alpha
  is dropped, as there. 16/32-bit and float gray (I;16, I, F) are the one chosen difference: they
  keep their top 8 bits where open_clip saturates them at 255 (see `clip_jax.data.images`).
  EXIF orientation is not applied to PIL images passed in (open_clip does not either); files read
  by `clip_jax.data.images.load_image` are upright already.
  Raises ValueError for arrays that are not uint8.
  """
  if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim in (2, 3)):
    images = [images]
  out = []
  for image in images:
    if isinstance(image, np.ndarray):
      if image.dtype != np.uint8:
        raise ValueError(f"preprocess takes uint8 arrays (0..255), got {image.dtype}; convert first.")
      image = Image.fromarray(image)
    out.append(normalize(eval_transform(image, image_size)))
  return np.stack(out)
