"""The embedded default dataset: captioned handwritten digits, with no download.

scikit-learn ships 1,797 real 8x8 scans of handwritten digits (UCI "optdigits", 16 gray levels)
inside its wheel. Each becomes dark ink on white paper, upscaled bicubically to `image_size` and
repeated over three channels, with captions drawn from varied templates. A fixed, seeded 20% of
the scans (by index) is held out for zero-shot evaluation and never trained on.
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Training captions: {name} is the word ("seven"), {digit} the numeral ("7"). Varied so the text
# tower must learn that "7", "seven" and the phrasing around them mean the same image.
CAPTION_TEMPLATES = (
    "a photo of the digit {name}.",
    "a handwritten {digit}.",
    "the number {name}.",
    "a scan of a handwritten {name}.",
    "an image of the number {digit}.",
    "a blurry handwritten {name}.",
    "the digit {digit}, written by hand.",
    "a small black and white picture of a {name}.",
)

# Prompts for zero-shot classification (prompt ensembling over these), `{}` is the class name.
ZEROSHOT_TEMPLATES = (
    "a photo of the digit {}.",
    "a handwritten {}.",
    "the number {}.",
)

NUM_SCANS = 1797
DEFAULT_HOLDOUT_FRACTION = 0.2
DEFAULT_SPLIT_SEED = 0
SPLITS = ("train", "test")


@functools.lru_cache(maxsize=1)
def _load_scans() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits  # Imported lazily: only this dataset needs sklearn.
  digits = load_digits()
  return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int32)  # [1797, 8, 8] ink in [0, 1]


def split_indices(split: str, holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
                  seed: int = DEFAULT_SPLIT_SEED) -> np.ndarray:
  """Sorted scan indices of 'train' or 'test' (the held-out part); the two are disjoint."""
  if split not in SPLITS:
    raise ValueError(f"digits has splits {SPLITS}, not {split!r}.")
  order = np.random.default_rng(seed).permutation(NUM_SCANS)
  num_test = int(round(holdout_fraction * NUM_SCANS))
  chosen = order[:num_test] if split == "test" else order[num_test:]
  return np.sort(chosen)


def render(ink: np.ndarray, image_size: int) -> np.ndarray:
  """One 8x8 ink map in [0, 1] -> uint8 RGB [image_size, image_size, 3], dark ink on white."""
  paper = np.round(255.0 * (1.0 - ink)).astype(np.uint8)
  image = Image.fromarray(paper, "L")
  if image_size != ink.shape[0]:
    image = image.resize((image_size, image_size), Image.BICUBIC)
  return np.repeat(np.asarray(image)[:, :, None], 3, axis=2)


def captions_for(label: int) -> list[str]:
  return [t.format(name=CLASS_NAMES[label], digit=label) for t in CAPTION_TEMPLATES]


def heldout_labels(holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
                   seed: int = DEFAULT_SPLIT_SEED) -> np.ndarray:
  """Labels of the held-out scans, in the order the 'test' split yields them. int32 [n_test]."""
  return _load_scans()[1][split_indices("test", holdout_fraction, seed)]


class DigitsSource:
  """Random-access source of raw records {'image': uint8 [s, s, 3], 'captions': [...], 'label'}.

  Rendering happens on access, so the object stays a few KB when grain pickles it to workers.
  """

  def __init__(self, split: str = "train", image_size: int = 32,
               holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION, seed: int = DEFAULT_SPLIT_SEED):
    if image_size < 8:
      raise ValueError(f"digits image_size must be at least 8 (the scans are 8x8), got {image_size}.")
    ink, labels = _load_scans()
    self.indices = split_indices(split, holdout_fraction, seed)
    self._ink = ink[self.indices]  # [n, 8, 8]
    self.labels = labels[self.indices]  # [n]
    self.image_size = image_size
    self.split = split
    self.class_names = CLASS_NAMES
    self.zeroshot_templates = ZEROSHOT_TEMPLATES

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict:
    label = int(self.labels[index])
    return {"image": render(self._ink[index], self.image_size), "captions": captions_for(label),
            "label": label}

  def __repr__(self) -> str:
    return f"DigitsSource(split={self.split!r}, n={len(self)}, image_size={self.image_size})"
