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


def test_a_models_own_preprocessing_and_its_cached_table():
  from clip_jax.data.images import OPENAI, Preprocessing, _normalize_table, normalize
  image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 80, 3), dtype=np.uint8))
  for mode in ("shortest", "longest", "squash"):
    preprocessing = Preprocessing(0.5, 0.5, "bilinear", mode, 255)
    reference = open_clip.image_transform(64, is_train=False, mean=0.5, std=0.5, interpolation="bilinear",
                                          resize_mode=mode, fill_color=255)(image).numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(clip_jax.preprocess(image, 64, preprocessing)[0], reference, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(clip_jax.preprocess(image, 64, OPENAI), clip_jax.preprocess(image, 64))
  pixels = np.arange(256, dtype=np.uint8).repeat(3).reshape(-1, 3)
  np.testing.assert_allclose(normalize(pixels, (0.5, 0.4, 0.3), (0.2, 0.3, 0.4)),
                             (pixels / np.float32(255) - np.float32([0.5, 0.4, 0.3])) / np.float32([0.2, 0.3, 0.4]),
                             rtol=0, atol=1e-6)
  assert _normalize_table((0.5, 0.4, 0.3), (0.2, 0.3, 0.4)) is _normalize_table((0.5, 0.4, 0.3), (0.2, 0.3, 0.4))
  with pytest.raises(ValueError, match="interpolation 'nearest' is not supported"):
    Preprocessing(interpolation="nearest")


def test_inputs_passed_by_mistake_are_one_clear_line_or_read():
  import jax.numpy as jnp
  array = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
  expected = clip_jax.preprocess(array, 32)
  # a jax array (was "cannot unpack non-iterable int object"), one image or a batch
  np.testing.assert_array_equal(clip_jax.preprocess(jnp.asarray(array), 32), expected)
  np.testing.assert_array_equal(clip_jax.preprocess(jnp.stack([array, array]), 32)[1], expected[0])
  np.testing.assert_array_equal(clip_jax.preprocess([jnp.asarray(array)], 32), expected)
  # channels first (was PIL's "Cannot handle this data type: (1, 1, 50), |u1")
  with pytest.raises(ValueError, match=r"looks channels-first \[c, h, w\]: pass np.transpose\(x, \(1, 2, 0\)\)"):
    clip_jax.preprocess(array.transpose(2, 0, 1), 32)
  with pytest.raises(ValueError, match="uint8"):
    clip_jax.preprocess(jnp.asarray(array, jnp.float32), 32)
  with pytest.raises(ValueError, match=r"got an array of shape \(5,\)"):
    clip_jax.preprocess(np.zeros(5, np.uint8), 32)
  with pytest.raises(ValueError, match="load_image"):
    clip_jax.preprocess(["photo.jpg"], 32)
  assert clip_jax.preprocess(array[..., :1], 32).shape == (1, 32, 32, 3)  # [h, w, 1] gray
  with pytest.raises(ValueError, match=r"channels-first \[n, c, h, w\]: pass np.transpose\(x, \(0, 2, 3, 1\)\)"):
    clip_jax.preprocess(array.transpose(2, 0, 1)[None], 32)  # a batch, channels first
  with pytest.raises(ValueError, match="got no images"):
    clip_jax.preprocess([], 32)  # was numpy's "need at least one array to stack"
  with pytest.raises(ValueError, match=r"np.round\(np.clip\(x, 0, 1\) \* 255\).astype\(np.uint8\)"):
    clip_jax.preprocess(array / 255.0, 32)


def test_a_float_arrays_line_fits_its_values_and_an_empty_batch_is_no_images():
  """A fresh user's float 0..255 image was told to multiply by 255 (which wraps), and an empty batch
  array got numpy's "need at least one array to stack"."""
  pixels = np.random.default_rng(0).integers(0, 256, (2, 40, 50, 3)).astype(np.float32)
  pixels[0, 0, 0] = 255  # the range the line reports
  with pytest.raises(ValueError, match=r"values 0\.\.255, which look like 0\.\.255 pixels: cast them with "
                     r"np.clip\(np.round\(x\), 0, 255\).astype\(np.uint8\) \(not x \* 255\)"):
    clip_jax.preprocess(pixels, 32)
  with pytest.raises(ValueError, match="look like 0..255 pixels"):
    clip_jax.preprocess([pixels[1]], 32)  # one image of a list: the same line
  normalized = (pixels / 255 - 0.5) / 0.25
  with pytest.raises(ValueError, match=r"look already normalized \(mean/std\); preprocess takes raw pixels"):
    clip_jax.preprocess(normalized, 32)
  with pytest.raises(ValueError, match=r"floats in \[0, 1\].*np.round\(np.clip\(x, 0, 1\) \* 255\)"):
    clip_jax.preprocess(pixels / 255, 32)
  with pytest.raises(ValueError, match=r"floats in \[0, 1\]"):  # a resampling's overshoot is still [0, 1]
    clip_jax.preprocess(np.clip(pixels / 255 * 1.04 - 0.01, -0.01, 1.04), 32)
  with pytest.raises(ValueError, match=r"values 0\.\.6\.55e\+04, beyond 0\.\.255: scale them to 0\.\.255"):
    clip_jax.preprocess(pixels * 257, 32)  # 16-bit values as floats
  with pytest.raises(ValueError, match=r"got int64 with values 0\.\.255, which are 0\.\.255 pixels: cast them with "
                     r"x\.astype\(np\.uint8\)"):
    clip_jax.preprocess(pixels.astype(np.int64), 32)
  with pytest.raises(ValueError, match=r"got uint16 with values 0\.\.6\.55e\+04, beyond 0\.\.255: .*x / 257"):
    clip_jax.preprocess((pixels * 257).astype(np.uint16), 32)
  with pytest.raises(ValueError, match=r"got bool; convert to uint8 pixels first \(booleans"):
    clip_jax.preprocess(pixels > 127, 32)
  with_inf = pixels.copy()
  with_inf[0, 1, 1, 0] = np.inf
  with pytest.raises(ValueError, match=r"values 0\.\.255 and NaN or inf, which look like 0\.\.255 pixels"):
    clip_jax.preprocess(with_inf, 32)
  for empty in (np.zeros((0, 40, 50, 3), np.uint8), np.zeros((0, 40, 50, 3), np.float32)):
    with pytest.raises(ValueError, match=r"^preprocess got no images \(an empty batch of shape \(0, 40, 50, 3\)\)\.$"):
      clip_jax.preprocess(empty, 32)
