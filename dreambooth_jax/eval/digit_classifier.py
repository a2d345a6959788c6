"""The independent digit judge of the embedded demos: an RBF SVM on pixels, never a network they trained.

Used by `dreambooth_jax.embedded.clip_demos` (is a CLIPDraw drawing / StyleCLIP edit the digit asked for?)
and by the embedded Table 3 (prompt accuracy: does "a seven" draw a seven?). It is trained on the
training split of the embedded digit scans (`clip_jax.data.digits`, the scans rendered at 32 px) and
fed 8x8 ink maps: the scans' own resolution, so a 32 px image is averaged down 4x4 the same way
whatever made it. scikit-learn's SVC (C=10, gamma='scale'); about one second on a CPU.
"""
from __future__ import annotations

import functools

import numpy as np

from clip_jax.data import digits as digits_lib

IMAGE_SIZE = 32


def ink_features(images: np.ndarray) -> np.ndarray:
  """RGB [n, h, w, 3] in [0, 1], h and w multiples of 8 -> [n, 64]: ink (1 - grey) averaged over
  (h/8 x w/8) blocks, i.e. the 8x8 grid of the scans. ValueError for other shapes."""
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] % 8 or images.shape[2] % 8:
    raise ValueError(f"ink_features takes RGB [n, h, w, 3] with h, w multiples of 8; got {images.shape}")
  n, h, w, _ = images.shape
  ink = 1.0 - images.mean(-1)
  return ink.reshape(n, 8, h // 8, 8, w // 8).mean((2, 4)).reshape(n, 64)


def digit_images(split: str, image_size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
  """The embedded digits of `split` ('train' | 'test') as float [n, size, size, 3] in [0, 1] and labels [n]."""
  source = digits_lib.DigitsSource(split, image_size=image_size)
  images = np.stack([source[i]["image"] for i in range(len(source))]).astype(np.float32) / 255.0
  return images, np.asarray(source.labels)


def train_judge(train_images, train_labels, test_images, test_labels):
  """An RBF SVM on ink features; returns (classifier, held-out accuracy in [0, 1])."""
  from sklearn.svm import SVC
  judge = SVC(C=10.0, gamma="scale").fit(ink_features(train_images), train_labels)
  return judge, float(np.mean(judge.predict(ink_features(test_images)) == test_labels))


@functools.lru_cache(maxsize=1)
def default_judge():
  """The judge trained on the embedded training split, scored on the held-out split (cached per process).
  Returns (classifier, held-out accuracy)."""
  return train_judge(*digit_images("train"), *digit_images("test"))


def classify(images: np.ndarray, judge=None) -> np.ndarray:
  """Digit labels int [n] of RGB images [n, h, w, 3] in [0, 1] (h, w multiples of 8); judge: default_judge()'s."""
  judge = judge if judge is not None else default_judge()[0]
  return np.asarray(judge.predict(ink_features(images)), np.int64)


def accuracy_by_digit(images: np.ndarray, digits: np.ndarray, judge=None) -> dict:
  """How often the judge reads the digit each image was asked for.

  images: RGB [n, h, w, 3], uint8 (0..255) or float in [0, 1]; digits: int [n], the digit each
  image's prompt named. Returns {'overall': fraction right over all n images, 'per_digit':
  {digit: fraction right} for the digits present, 'read_as': {digit: counts [10] of the judge's
  answers}}. ValueError when the lengths differ or n is 0.
  """
  images, digits = np.asarray(images), np.asarray(digits, np.int64)
  if len(images) != len(digits) or not len(images):
    raise ValueError(f"accuracy_by_digit needs one digit per image and at least one image; got {len(images)} images "
                     f"and {len(digits)} digits")
  pixels = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images
  predicted = classify(pixels, judge)
  hits = predicted == digits
  present = sorted(set(digits.tolist()))
  return {"overall": float(hits.mean()),
          "per_digit": {d: float(hits[digits == d].mean()) for d in present},
          "read_as": {d: np.bincount(predicted[digits == d], minlength=10).tolist() for d in present}}
