"""OpenAI CLIP's inference preprocessing: bicubic resize of the shortest side, center crop,
[0, 1] scaling and mean/std normalisation, giving NHWC float32."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(image: Image.Image) -> Image.Image:
  """Any PIL mode as RGB; transparent pixels over white (what a viewer shows)."""
  if image.mode == "RGB":
    return image
  if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  if image.mode in ("I;16", "I;16B", "I;16L", "I"):
    # 16/32-bit greyscale: scale to 8 bits instead of clipping at 255.
    array = np.asarray(image, dtype=np.float64)
    peak = array.max() if array.max() > 0 else 1.0
    return Image.fromarray((array / peak * 255).round().astype(np.uint8), "L").convert("RGB")
  return image.convert("RGB")


def resize_shortest_side(image: Image.Image, size: int) -> Image.Image:
  w, h = image.size
  if min(w, h) == size:
    return image
  # The same rounding as torchvision's Resize(int): the short side becomes `size` exactly,
  # the long side int(size * long / short).
  if w <= h:
    new_w, new_h = size, int(size * h / w)
  else:
    new_w, new_h = int(size * w / h), size
  return image.resize((new_w, new_h), Image.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
  w, h = image.size
  if w < size or h < size:  # Pad with black as torchvision does for crops larger than the image.
    padded = Image.new("RGB", (max(w, size), max(h, size)))
    padded.paste(image, ((max(w, size) - w) // 2, (max(h, size) - h) // 2))
    image, (w, h) = padded, padded.size
  left = int(round((w - size) / 2.0))
  top = int(round((h - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


def normalize(pixels: np.ndarray, mean=OPENAI_MEAN, std=OPENAI_STD) -> np.ndarray:
  """uint8 HWC (or NHWC) -> normalised float32."""
  x = pixels.astype(np.float32) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def preprocess(images: Image.Image | np.ndarray | Sequence[Image.Image | np.ndarray],
               image_size: int = 224) -> np.ndarray:
  """One image or a list of them (PIL, or uint8 HWC arrays) -> [N, image_size, image_size, 3] float32."""
  if isinstance(images, (Image.Image, np.ndarray)) and not (isinstance(images, np.ndarray) and images.ndim == 4):
    images = [images]
  out = []
  for image in images:
    if isinstance(image, np.ndarray):
      if image.dtype != np.uint8:
        raise ValueError(f"preprocess takes uint8 arrays (0..255), got {image.dtype}; convert first.")
      image = Image.fromarray(image)
    image = center_crop(resize_shortest_side(to_rgb(image), image_size), image_size)
    out.append(normalize(np.asarray(image)))
  return np.stack(out)
