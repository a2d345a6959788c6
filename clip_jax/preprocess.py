"""OpenAI CLIP's inference preprocessing for user images: bicubic resize of the shortest side,
center crop, mean/std normalisation, giving NHWC float32. The transforms themselves live with the
input pipeline (`clip_jax.data.images`), so training-time evaluation and this agree exactly."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from clip_jax.data.images import OPENAI_MEAN, OPENAI_STD, eval_transform, normalize, to_rgb  # noqa: F401


def preprocess(images: Image.Image | np.ndarray | Sequence[Image.Image | np.ndarray],
               image_size: int = 224) -> np.ndarray:
  """One image or a list of them (PIL, or uint8 HWC arrays) -> [N, image_size, image_size, 3] float32."""
  if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim == 3):
    images = [images]
  out = []
  for image in images:
    if isinstance(image, np.ndarray):
      if image.dtype != np.uint8:
        raise ValueError(f"preprocess takes uint8 arrays (0..255), got {image.dtype}; convert first.")
      image = Image.fromarray(image)
    rgb, _ = to_rgb(image)
    out.append(normalize(eval_transform(rgb, image_size)))
  return np.stack(out)
