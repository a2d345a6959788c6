"""clip_jax.guidance: CLIP as a differentiable loss (resize, normalise, augment, cosine)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import clip_jax
from clip_jax import guidance
from clip_jax.sharding import create_mesh


@pytest.fixture(scope="module")
def tiny():
  model = clip_jax.create_model("ViT-Tiny")
  return model, clip_jax.init_variables(model, jax.random.key(0))


def _target(dim, key=2):
  return clip_jax.l2_normalize(jax.random.normal(jax.random.key(key), (dim,)))


def test_identity_view_is_the_image_and_the_warp_maps_corners():
  images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
  identity = guidance.Augmentations(num=1, distortion=0.0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
  views = jax.jit(guidance.random_views, static_argnums=(2, 3))(images, jax.random.key(0), identity, 16)
  np.testing.assert_allclose(views, images, atol=1e-6)
  src = jnp.array([[0.1, 0.2], [0.9, 0.05], [0.8, 0.95], [0.0, 0.7]])
  dst = jnp.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
  np.testing.assert_allclose(guidance.apply_homography(guidance.homography(src, dst), src), dst, atol=1e-5)
  # A pure crop (no perspective) of the left-top quarter reads exactly those pixels (2x upsampled
  # bilinearly, so every other output pixel lies between two source pixels).
  view = jnp.array([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 1.0]])
  crop = jax.jit(guidance.warp, static_argnums=(2, 3))(images[0], view, 16, 1.0)
  reference = jax.image.resize(images[0, :8, :8], (16, 16, 3), "linear")
  np.testing.assert_allclose(crop[1:-1, 1:-1], reference[1:-1, 1:-1], atol=1e-5)


def test_views_fill_white_outside_and_stay_in_range():
  black = jnp.zeros((1, 32, 32, 3))
  views = jax.jit(guidance.random_views, static_argnums=(2, 3))(black, jax.random.key(3), guidance.Augmentations(num=4), 32)
  assert views.shape == (4, 32, 32, 3)
  assert float(views.min()) >= 0.0 and float(views.max()) <= 1.0 + 1e-6
  # distortion 0.5 moves corners inward, so every view shows some white fill around the black image.
  assert all(float(v.max()) > 0.99 for v in views)


def test_through_resolution_is_box_average_then_pils_bicubic():
  from PIL import Image
  images = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  got = np.asarray(jax.jit(guidance.through_resolution, static_argnums=1)(jnp.asarray(images), 8))
  small = images.reshape(2, 8, 4, 8, 4, 3).mean((2, 4))
  # PIL's BICUBIC on float ('F') images, channel by channel: the resize the digits' scans had.
  reference = np.stack([np.stack([np.asarray(Image.fromarray(small[i, ..., c], "F").resize((32, 32), Image.BICUBIC))
                                  for c in range(3)], -1) for i in range(2)])
  np.testing.assert_allclose(got, reference, atol=1e-5)
  with pytest.raises(ValueError, match="must divide"):
    guidance.through_resolution(jnp.zeros((1, 30, 30, 3)), 8)


# The augmented case is slow (7-8 s): the fast subset keeps the plain case and the views' own tests above.
@pytest.mark.parametrize("augment", [guidance.NO_AUGMENTATION,
                                     pytest.param(guidance.Augmentations(num=2), marks=pytest.mark.slow)],
                         ids=["plain", "augmented"])
def test_gradient_wrt_image_matches_finite_differences(tiny, augment):
  model, variables = tiny
  images = jax.random.uniform(jax.random.key(1), (1, 20, 24, 3))  # not the model's 32 px: resized inside
  target, negatives = _target(64), jnp.stack([_target(64, 7)])
  loss = jax.jit(lambda x: jnp.sum(guidance.guidance_loss(model, variables, x, target, jax.random.key(3),
                                                          augment=augment, negative_emb=negatives)))
  grad = jax.grad(loss)(images)
  # Central differences along two random directions; eps 3e-3 balances f32 rounding against
  # curvature (measured: agreement to ~0.1%); tolerance 1% + 2e-4.
  for seed in (5, 6):
    direction = jax.random.normal(jax.random.key(seed), images.shape)
    eps = 3e-3
    fd = (loss(images + eps * direction) - loss(images - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(float(jnp.vdot(grad, direction)), float(fd), rtol=1e-2, atol=2e-4)


@pytest.mark.slow  # ~12 s at low load: kept out of the fast subset (< 5 min)
def test_classifier_objective_is_zero_shot_cross_entropy(tiny):
  model, variables = tiny
  images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
  target, negatives = _target(64), jnp.stack([_target(64, k) for k in (7, 8, 9)])
  scale = 14.0
  got = guidance.guidance_loss(model, variables, images, target, augment=guidance.NO_AUGMENTATION,
                               negative_emb=negatives, classifier_scale=scale)
  # Naive reference in float64: softmax over [target, negatives] of scale * cosine, -log p(target).
  emb = np.asarray(guidance.image_embeddings(model, variables, images), np.float64)
  logits = scale * emb @ np.concatenate([np.asarray(target)[None], np.asarray(negatives)]).T.astype(np.float64)
  expected = np.log(np.exp(logits).sum(1)) - logits[:, 0]
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  with pytest.raises(ValueError, match="classifier objective needs negative embeddings"):
    guidance.guidance_loss(model, variables, images, target, augment=guidance.NO_AUGMENTATION, classifier_scale=scale)
  # Gradient w.r.t. the image vs central differences, with seeded views (as the cosine loss's test).
  loss = jax.jit(lambda x: jnp.sum(guidance.guidance_loss(model, variables, x, target, jax.random.key(3),
                                                          augment=guidance.Augmentations(num=2), negative_emb=negatives,
                                                          classifier_scale=scale)))
  grad = jax.grad(loss)(images[:1])
  for seed in (5, 6):
    direction = jax.random.normal(jax.random.key(seed), images[:1].shape)
    eps = 3e-3
    fd = (loss(images[:1] + eps * direction) - loss(images[:1] - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(float(jnp.vdot(grad, direction)), float(fd), rtol=1e-2, atol=2e-4)


def test_logit_scale_is_the_clipped_multiplier():
  assert guidance.logit_scale({"params": {"logit_scale": jnp.log(14.0)}}) == pytest.approx(14.0, rel=1e-6)
  assert guidance.logit_scale({"params": {"logit_scale": jnp.asarray(10.0)}}) == 100.0  # clipped as in training


def test_augmentations_are_seeded(tiny):
  model, variables = tiny
  images = jax.random.uniform(jax.random.key(1), (1, 32, 32, 3))
  fn = guidance.make_guidance_fn(model, augment=guidance.Augmentations(num=2))
  a, b, c = (fn(variables, images, _target(64), jax.random.key(k)) for k in (0, 0, 1))
  assert float(a[0]) == float(b[0]) and float(a[0]) != float(c[0])


def test_ensemble_is_the_mean_of_its_members_with_their_own_views(tiny):
  model, variables = tiny
  other = clip_jax.init_variables(model, jax.random.key(5))  # a second, independently initialised CLIP
  images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
  fn = guidance.make_guidance_fn(model, augment=guidance.Augmentations(num=2))
  first = lambda x, key: fn(variables, x, _target(64), key)  # noqa: E731
  second = lambda x, key: fn(other, x, _target(64, key=3), key)  # noqa: E731
  key = jax.random.key(7)
  # One member is that member exactly (same key, same views): a one-CLIP run is unchanged.
  np.testing.assert_array_equal(guidance.ensemble_loss([first])(images, key), first(images, key))
  want = (first(images, key) + second(images, jax.random.fold_in(key, 1))) / 2
  np.testing.assert_allclose(guidance.ensemble_loss([first, second])(images, key), want, rtol=1e-6)
  # Member 1 sees other views than member 0: the same CLIP twice is not the same loss as once.
  twice = guidance.ensemble_loss([first, first])(images, key)
  assert not np.allclose(twice, first(images, key))
  with pytest.raises(ValueError, match="at least one"):
    guidance.ensemble_loss([])


@pytest.mark.slow  # ~12 s at low load: kept out of the fast subset (< 5 min)
def test_sharded_over_8_devices_equals_one_device(tiny):
  model, variables = tiny
  assert jax.device_count() == 8
  mesh = create_mesh({"data": -1})
  images = jax.random.uniform(jax.random.key(1), (8, 32, 32, 3))
  targets = jnp.stack([_target(64, k) for k in range(8)])           # one target per image
  augment = guidance.Augmentations(num=1)
  expected = guidance.guidance_loss(model, variables, images, targets, jax.random.key(4), augment=augment)
  from clip_jax.eval.embed import place_on_mesh
  sharded_images = jax.device_put(images, NamedSharding(mesh, P(("data", "fsdp"))))
  fn = guidance.make_guidance_fn(model, mesh, augment=augment)
  got = fn(place_on_mesh(variables, mesh), sharded_images, targets, jax.random.key(4))
  np.testing.assert_allclose(got, expected, atol=1e-5)
  # The model's input really is split: the program constrains its [8, 32, 32, 3] batch to 'data'.
  lowered = fn.lower(place_on_mesh(variables, mesh), sharded_images, targets, jax.random.key(4)).as_text()
  assert any("sharding_constraint" in line and '[{"data"}, {}, {}, {}]' in line and "tensor<8x32x32x3xf32>" in line
             for line in lowered.splitlines())


def test_bad_input_gets_one_clear_line(tiny, tmp_path):
  model, variables = tiny
  with pytest.raises(ValueError, match=r"images must be \[n, height, width, 3\]"):
    guidance.guidance_loss(model, variables, jnp.zeros((32, 32, 3)), _target(64), augment=guidance.NO_AUGMENTATION)
  with pytest.raises(ValueError, match="target embeddings must be"):
    guidance.guidance_loss(model, variables, jnp.zeros((2, 32, 32, 3)), jnp.zeros((3, 64)),
                           augment=guidance.NO_AUGMENTATION)
  with pytest.raises(ValueError, match="prompt '' is empty"):
    guidance.encode_prompts(model, variables, clip_jax.get_tokenizer("clip", context_length=32), ["a cat", ""])
  with pytest.raises(FileNotFoundError, match="missing.pt: no such file or directory"):
    guidance.load_guide(str(tmp_path / "missing.pt"))
  with pytest.raises(FileNotFoundError, match="hub id, nothing is downloaded here"):
    guidance.load_guide("openai/clip-vit-base-patch32")
