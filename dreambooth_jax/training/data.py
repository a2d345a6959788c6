"""DreamBooth's two image sets: the subject's few instance images, and the class-prior images the
frozen model generates for "a [class noun]" before training (cached on disk, topped up after an
interruption).

Augmentation (resize + random crop + horizontal flip) happens per step on the host from a seeded
RNG that depends only on (seed, step), so a resumed run sees exactly the batches it would have.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image

from clip_jax.cli import MissingPathError, UserError
from clip_jax.data.images import decode_image
from clip_jax.data.records import BadRecord

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def load_image_folder(directory: str, what: str = "instance") -> tuple[list[Image.Image], dict[str, int]]:
  """RGB images of a folder (sorted by name) and counts of the files skipped, per reason."""
  if not os.path.isdir(directory):
    raise MissingPathError(f"{what} image folder {directory!r} does not exist.")
  images, skipped = [], {}
  for name in sorted(os.listdir(directory)):
    if not name.lower().endswith(IMAGE_EXTENSIONS):
      continue
    with open(os.path.join(directory, name), "rb") as f:
      data = f.read()
    try:
      image, _ = decode_image(data)
    except BadRecord as e:
      skipped[e.reason] = skipped.get(e.reason, 0) + 1
      continue
    images.append(image)
  if not images:
    raise UserError(f"{what} image folder {directory!r} holds no readable image "
                     f"({', '.join(IMAGE_EXTENSIONS)}); skipped: {skipped or 'none'}.")
  return images, skipped


def augment(image: Image.Image, size: int, rng: np.random.Generator, random_crop: bool = True,
            flip: bool = True) -> np.ndarray:
  """Shortest side to `size` (bicubic), a (random or center) size x size crop, a random
  horizontal flip; float32 [size, size, 3] in [-1, 1], what the VAE encodes."""
  w, h = image.size
  scale = size / min(w, h)
  new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
  image = image.resize((new_w, new_h), Image.BICUBIC)
  if random_crop:
    left, top = int(rng.integers(0, new_w - size + 1)), int(rng.integers(0, new_h - size + 1))
  else:
    left, top = (new_w - size) // 2, (new_h - size) // 2
  pixels = np.asarray(image.crop((left, top, left + size, top + size)), np.float32)
  if flip and rng.random() < 0.5:
    pixels = pixels[:, ::-1]
  return pixels / 127.5 - 1.0


def sample_batch(images: Sequence[Image.Image], batch_size: int, size: int, seed: int, step: int,
                 stream: int, random_crop: bool = True, flip: bool = True) -> np.ndarray:
  """`batch_size` augmented images drawn from `images` for training step `step`; a pure function of
  its arguments (`stream` separates the instance and class draws)."""
  rng = np.random.default_rng([seed, stream, step])
  picks = rng.integers(0, len(images), batch_size)
  return np.stack([augment(images[i], size, rng, random_crop, flip) for i in picks])


def count_class_images(directory: str) -> int:
  if not os.path.isdir(directory):
    return 0
  return sum(1 for n in os.listdir(directory) if n.startswith("class_") and n.endswith(".png"))


def write_png_atomically(pixels: np.ndarray, path: str) -> None:
  """A killed run never leaves a half-written image that a later run would count."""
  tmp = path + ".tmp"
  Image.fromarray(pixels).save(tmp, format="PNG")
  os.replace(tmp, path)


def top_up_class_images(directory: str, num_images: int, generate_fn, batch_size: int) -> int:
  """Generates class-prior images `class_{i:05d}.png` until `num_images` exist; returns how many
  were made now.

  generate_fn(block) -> uint8 [batch_size, H, W, 3] makes images block*batch_size ... and must be
  deterministic in `block`; only blocks with missing images are generated, so a folder topped up
  after an interruption equals one made in a single go.
  """
  os.makedirs(directory, exist_ok=True)
  existing = {n for n in os.listdir(directory) if n.startswith("class_") and n.endswith(".png")}
  missing = [i for i in range(num_images) if f"class_{i:05d}.png" not in existing]
  made = 0
  for block in sorted({i // batch_size for i in missing}):
    pixels = generate_fn(block)
    for i in missing:
      if i // batch_size == block:
        write_png_atomically(pixels[i - block * batch_size], os.path.join(directory, f"class_{i:05d}.png"))
        made += 1
  return made
