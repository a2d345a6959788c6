"""clip_jax.preprocess against open_clip's eval transform (torchvision on PIL)."""
import numpy as np
import pytest
from PIL import Image

import clip_jax

open_clip = pytest.importorskip("open_clip")


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (224, 224), (640, 479), (100, 50)])
def test_matches_open_clip_eval_transform(size):
  rng = np.random.default_rng(sum(size))
  image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
  reference = open_clip.image_transform(224, is_train=False)(image).numpy().transpose(1, 2, 0)
  ours = clip_jax.preprocess(image, 224)
  assert ours.shape == (1, 224, 224, 3) and ours.dtype == np.float32
  np.testing.assert_allclose(ours[0], reference, atol=1e-5)


def test_modes_and_batches():
  # Alpha as open_clip treats it (resampled premultiplied, then dropped): every mode is in
  # tests/test_image_modes.py; here only that a mixed batch stacks.
  rgba = Image.new("RGBA", (50, 40), (255, 0, 0, 0))
  grey16 = Image.fromarray(np.full((40, 50), 65535, np.uint16)).convert("I;16")  # 16-bit white
  batch = clip_jax.preprocess([rgba, grey16, np.zeros((40, 50, 3), np.uint8)], 32)
  assert batch.shape == (3, 32, 32, 3)
  white = clip_jax.preprocess(Image.new("RGB", (32, 32), (255, 255, 255)), 32)[0]
  reference = open_clip.image_transform(32, is_train=False)(rgba).numpy().transpose(1, 2, 0)
  np.testing.assert_allclose(batch[0], reference, atol=1e-6)
  np.testing.assert_allclose(batch[1], white, atol=1e-6)
  with pytest.raises(ValueError, match="uint8"):
    clip_jax.preprocess(np.zeros((8, 8, 3), np.float32), 8)
