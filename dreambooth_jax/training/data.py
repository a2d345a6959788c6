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
# Files a folder of photos holds that are nobody's photo (the OS's bookkeeping): passed over unsaid,
# as are hidden files (a leading dot, e.g. .DS_Store and macOS's ._IMG_0001.jpg twins).
SYSTEM_FILES = ("thumbs.db", "desktop.ini")


def read_image_folder(directory: str, what: str = "instance",
                      limit: int | None = None) -> tuple[list[tuple[str, bytes, Image.Image]], dict[str, list[str]]]:
  """The one listing of a folder of photos: [(file name, its bytes, RGB image)] for the files training
  reads (sorted by name), and the files left out, per reason: {reason: [file name, ...]}.
  `load_image_folder` (the images) and `image_fingerprints` (the resume's record) both use it, so
  the record names exactly the files training reads.

  Reasons: 'not a readable image type (.heic)' (any extension not in IMAGE_EXTENSIONS, e.g. iPhone
  photos or notes), 'corrupt_image' (and the decoder's other reasons), 'unused' (beyond `limit`: at
  most that many readable images, the first by name; diffusers' DreamBooth also uses only
  `num_class_images`). Hidden files, SYSTEM_FILES and subfolders are passed over and not listed.
  Raises MissingPathError for a missing folder, UserError when no image is readable (naming what was
  left out). `describe_left_out` words the dict for a message.
  """
  if not os.path.isdir(directory):
    raise MissingPathError(f"{what} image folder {directory!r} does not exist.")
  read, skipped = [], {}
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if name.startswith(".") or name.lower() in SYSTEM_FILES or not os.path.isfile(path):
      continue
    if not name.lower().endswith(IMAGE_EXTENSIONS):
      extension = os.path.splitext(name)[1].lower() or "no extension"
      skipped.setdefault(f"not a readable image type ({extension})", []).append(name)
      continue
    if limit is not None and len(read) >= limit:
      skipped.setdefault("unused", []).append(name)
      continue
    with open(path, "rb") as f:
      data = f.read()
    try:
      image, _ = decode_image(data)
    except BadRecord as e:
      skipped.setdefault(e.reason, []).append(name)
      continue
    read.append((name, data, image))
  if not read:
    raise UserError(f"{what} image folder {directory!r} holds no readable image "
                    f"({', '.join(IMAGE_EXTENSIONS)}); left out: {describe_left_out(skipped) or 'nothing, it is empty'}.")
  return read, skipped


def load_image_folder(directory: str, what: str = "instance",
                      limit: int | None = None) -> tuple[list[Image.Image], dict[str, list[str]]]:
  """RGB images of a folder (sorted by name) and the files left out, per reason: {reason: [file name, ...]},
  as `read_image_folder` lists them (its reasons, skips, `limit` and errors)."""
  read, skipped = read_image_folder(directory, what, limit)
  return [image for _, _, image in read], skipped


def describe_left_out(skipped: dict[str, list[str]], names_shown: int = 3) -> str:
  """'1 not a readable image type (.heic): IMG_0002.heic; 2 corrupt_image: a.jpg, b.jpg' (at most
  `names_shown` names per reason, then 'and N more'); '' when nothing was left out. HEIC photos get
  a hint: they are read once converted."""
  parts = []
  for reason, names in skipped.items():
    shown = ", ".join(names[:names_shown]) + (f" and {len(names) - names_shown} more" if len(names) > names_shown
                                               else "")
    parts.append(f"{len(names)} {reason}: {shown}")
  if any(".heic" in reason or ".heif" in reason for reason in skipped):
    parts.append("convert HEIC photos to .jpg or .png to use them")
  return "; ".join(parts)


def image_fingerprints(directory: str, what: str = "instance", limit: int | None = None) -> dict[str, str]:
  """{file name: the first 16 hex digits of its content's SHA-256} for exactly the files training reads
  (`read_image_folder`: the same skips, order and `limit` of readable images), so that a resumed run
  can tell that photos it trains on were removed, added or replaced; files it leaves out (hidden ones,
  other types, unreadable ones, those beyond `limit`) are not recorded. Raises as `read_image_folder`."""
  import hashlib
  read, _ = read_image_folder(directory, what, limit)
  return {name: hashlib.sha256(data).hexdigest()[:16] for name, data, _ in read}


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


def training_batch(instance_images: Sequence[Image.Image], class_images: Sequence[Image.Image] | None,
                   instance_tokens: np.ndarray, class_tokens: np.ndarray | None, *, global_batch: int,
                   microbatches: int, size: int, seed: int, step: int, random_crop: bool = True,
                   flip: bool = True) -> dict[str, np.ndarray]:
  """The whole batch of step `step`, a pure function of the arguments (every process makes the
  same one and places its own rows).

  global_batch instance images (and as many class images when `class_images` is given) in
  `microbatches` micro-batches, each [its instance rows; its class rows], laid out row-interleaved
  so that `clip_jax.sharding.split_microbatches` recovers them on the devices. Returns {'pixels':
  float32 [R, size, size, 3] in [-1, 1], 'tokens': int32 [R, L]} with R = global_batch (x2 with
  class images); instance_tokens / class_tokens are one prompt's ids [L].
  """
  from clip_jax.sharding import merge_microbatches
  per_micro = global_batch // microbatches
  pixels = [sample_batch(instance_images, global_batch, size, seed, step, stream=0, random_crop=random_crop,
                         flip=flip)]
  tokens = [np.repeat(instance_tokens[None], global_batch, axis=0)]
  if class_images is not None:
    pixels.append(sample_batch(class_images, global_batch, size, seed, step, stream=1, random_crop=random_crop,
                               flip=flip))
    tokens.append(np.repeat(class_tokens[None], global_batch, axis=0))

  def micro(parts):  # [k, rows per micro-batch, ...]
    return np.stack([np.concatenate([p[j * per_micro:(j + 1) * per_micro] for p in parts])
                     for j in range(microbatches)])
  return {"pixels": merge_microbatches(micro(pixels)), "tokens": merge_microbatches(micro(tokens))}


def count_class_images(directory: str) -> int:
  if not os.path.isdir(directory):
    return 0
  return sum(1 for n in os.listdir(directory) if n.startswith("class_") and n.endswith(".png"))


def write_png_atomically(pixels: np.ndarray, path: str) -> None:
  """A killed run never leaves a half-written image that a later run would count."""
  tmp = path + ".tmp"
  Image.fromarray(pixels).save(tmp, format="PNG")
  os.replace(tmp, path)


def top_up_class_images(directory: str, num_images: int, generate_fn, batch_size: int,
                        share: tuple[int, int] = (0, 1)) -> int:
  """Generates class-prior images `class_{i:05d}.png` until `num_images` exist; returns how many
  were made now.

  generate_fn(block) -> uint8 [batch_size, H, W, 3] makes images block*batch_size ... and must be
  deterministic in `block`; only blocks with missing images are generated, so a folder topped up
  after an interruption equals one made in a single go. share=(i, n): this caller makes only the
  blocks b with b % n == i (n processes share the work; they wait for each other before reading).
  """
  os.makedirs(directory, exist_ok=True)
  existing = {n for n in os.listdir(directory) if n.startswith("class_") and n.endswith(".png")}
  missing = [i for i in range(num_images) if f"class_{i:05d}.png" not in existing]
  made = 0
  for block in sorted({i // batch_size for i in missing}):
    if block % share[1] != share[0]:
      continue
    pixels = generate_fn(block)
    for i in missing:
      if i // batch_size == block:
        write_png_atomically(pixels[i - block * batch_size], os.path.join(directory, f"class_{i:05d}.png"))
        made += 1
  return made
