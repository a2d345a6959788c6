"""A loaded CLIP as a differentiable objective: images in, "how far from this text" out.

The core that CLIP's optimisation-based derivatives share (CLIPDraw, Frans et al. 2021; StyleCLIP,
Patashnik et al. 2021; DietNeRF): images [n, h, w, 3] in [0, 1] of any size are resized to the
model's input size and normalised with its mean/std, differentiably; each is seen through K random
augmentations (CLIPDraw's: a random perspective warp, then a random resized crop, both with white
fill, as torchvision's RandomPerspective(distortion_scale=0.5, fill=1) and RandomResizedCrop(scale=
(0.7, 0.9)) in the authors' code); the loss of an image is the mean over its views of

    -cos(view, target) + negative_weight * sum_j cos(view, negative_j)

(CLIPDraw's objective; its code weights each negative prompt by 0.3), or, with `classifier_scale`
set, CLIP's zero-shot classifier's cross-entropy over the target and the negatives (Radford et al.
2021, 3.1.2: logits = logit scale * cosine, softmax over the classes' prompts),

    -log softmax(scale * [cos(view, target), cos(view, negative_1), ...])[0],

which maximises the target's margin over every negative instead of a fixed mix. Every step of it is a pure
function of (variables, images, embeddings, rng), so gradients w.r.t. the images are exact for a
given rng, and `make_guidance_fn` compiles it with the augmented batch split over the mesh's batch
axes (`clip_jax.sharding.batch_sharding`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from clip_jax.data.images import OPENAI_MEAN, OPENAI_STD
from clip_jax.models.clip import CLIP, l2_normalize


@dataclasses.dataclass(frozen=True)
class Augmentations:
  """K random views per image (CLIPDraw's augmentations; `num=0` means the image as it is)."""
  num: int = 4                                      # K views per image and step (CLIPDraw's code: 4)
  distortion: float = 0.5                           # RandomPerspective(distortion_scale)
  crop_scale: tuple[float, float] = (0.7, 0.9)      # RandomResizedCrop(scale): area fraction
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop(ratio): width / height
  fill: float = 1.0                                 # value outside the warped image (white paper)

  def __post_init__(self):
    if self.num < 0:
      raise ValueError(f"the number of augmentations must be >= 0, got {self.num}.")
    if not 0.0 <= self.distortion < 1.0:
      raise ValueError(f"perspective distortion must be in [0, 1), got {self.distortion}.")
    low, high = self.crop_scale
    if not 0.0 < low <= high <= 1.0:
      raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}.")


NO_AUGMENTATION = Augmentations(num=0)


def check_images(images: jax.Array) -> None:
  """Raises ValueError unless images are [n, h, w, 3] floats (values are taken to be in [0, 1])."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be [n, height, width, 3] RGB in [0, 1], got shape {tuple(images.shape)}.")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"images must be floats in [0, 1], got {images.dtype}; divide uint8 pixels by 255.")


def resize(images: jax.Array, size: int) -> jax.Array:
  """[n, h, w, 3] -> [n, size, size, 3], bilinear (antialiased when shrinking), differentiable."""
  if images.shape[1:3] == (size, size):
    return images
  return jax.image.resize(images, (images.shape[0], size, size, images.shape[3]), "linear", antialias=True)


def normalize(images: jax.Array, mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD) -> jax.Array:
  """[0, 1] pixels -> the model's input: (x - mean) / std per channel."""
  return (images - jnp.asarray(mean, images.dtype)) / jnp.asarray(std, images.dtype)


def through_resolution(images: jax.Array, size: int) -> jax.Array:
  """[n, h, w, c] -> [n, h, w, c]: box-averaged to size x size, then bicubic back up (Keys a = -0.5,
  PIL's BICUBIC for float images to 1e-6), differentiable. How a CLIP trained on low-resolution
  scans upscaled bicubically (the embedded digits: 8x8 -> 32 px) saw its images: guiding through it
  keeps an optimised image within the detail that CLIP was trained on, instead of letting it answer
  to sharp edges it never saw. Raises ValueError unless size divides h and w."""
  n, h, w, c = images.shape
  if size < 1 or h % size or w % size:
    raise ValueError(f"through_resolution: {size} px must divide the image's {h}x{w} px.")
  small = images.reshape(n, size, h // size, size, w // size, c).mean((2, 4))
  return jax.image.resize(small, images.shape, "cubic")


# ----------------------------------------------------------------------------- augmentations
def homography(src: jax.Array, dst: jax.Array) -> jax.Array:
  """The 3x3 projective map taking 4 points src [4, 2] to dst [4, 2] (h33 = 1)."""
  x, y = src[:, 0], src[:, 1]
  u, v = dst[:, 0], dst[:, 1]
  zero, one = jnp.zeros_like(x), jnp.ones_like(x)
  rows_u = jnp.stack([x, y, one, zero, zero, zero, -u * x, -u * y], -1)
  rows_v = jnp.stack([zero, zero, zero, x, y, one, -v * x, -v * y], -1)
  h = jnp.linalg.solve(jnp.concatenate([rows_u, rows_v]), jnp.concatenate([u, v]))
  return jnp.append(h, 1.0).reshape(3, 3)


def apply_homography(h: jax.Array, points: jax.Array) -> jax.Array:
  """points [..., 2] -> h(points) [..., 2]."""
  ones = jnp.ones(points.shape[:-1] + (1,), points.dtype)
  mapped = jnp.concatenate([points, ones], -1) @ h.T
  return mapped[..., :2] / mapped[..., 2:]


_CORNERS = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], np.float32)
_INWARD = np.array([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]], np.float32)


def sample_view(rng: jax.Array, aug: Augmentations) -> jax.Array:
  """One random view as the 3x3 map from output coordinates to source coordinates (both in the
  unit square): a crop box of the perspective-warped image, then the warp's inverse."""
  corner_rng, scale_rng, ratio_rng, pos_rng = jax.random.split(rng, 4)
  # RandomPerspective: each corner moves inward by up to distortion / 2 of the side, per axis;
  # the output holds the whole image squeezed into that quadrilateral.
  moved = _CORNERS + _INWARD * jax.random.uniform(corner_rng, (4, 2), maxval=aug.distortion / 2)
  output_to_source = homography(moved, _CORNERS)
  # RandomResizedCrop: an area fraction and a log-uniform aspect ratio, clipped to the image.
  area = jax.random.uniform(scale_rng, minval=aug.crop_scale[0], maxval=aug.crop_scale[1])
  log_ratio = jax.random.uniform(ratio_rng, minval=np.log(aug.crop_ratio[0]), maxval=np.log(aug.crop_ratio[1]))
  size = jnp.minimum(jnp.sqrt(area * jnp.exp(jnp.array([log_ratio, -log_ratio]))), 1.0)  # (w, h)
  origin = jax.random.uniform(pos_rng, (2,)) * (1.0 - size)
  crop = jnp.array([[size[0], 0.0, origin[0]], [0.0, size[1], origin[1]], [0.0, 0.0, 1.0]])
  return output_to_source @ crop


def warp(image: jax.Array, view: jax.Array, size: int, fill: float) -> jax.Array:
  """Bilinear resampling: output [size, size, 3] pixel (i, j) reads the source at view(j, i)."""
  h, w = image.shape[:2]
  centres = (jnp.stack(jnp.meshgrid(jnp.arange(size), jnp.arange(size), indexing="xy"), -1) + 0.5) / size
  source = apply_homography(view, centres.astype(image.dtype))  # [size, size, (x, y)] in the unit square
  rows, cols = source[..., 1] * h - 0.5, source[..., 0] * w - 0.5
  channel = lambda c: jax.scipy.ndimage.map_coordinates(image[..., c], [rows, cols], order=1,  # noqa: E731
                                                        mode="constant", cval=fill)
  return jnp.stack([channel(c) for c in range(image.shape[-1])], -1)


def random_views(images: jax.Array, rng: jax.Array, aug: Augmentations, size: int) -> jax.Array:
  """[n, h, w, 3] -> [n * K, size, size, 3], image-major (row i * K + k is view k of image i)."""
  n = images.shape[0]
  views = jax.vmap(lambda key: sample_view(key, aug))(jax.random.split(rng, n * aug.num))
  views = views.reshape(n, aug.num, 3, 3)
  per_image = jax.vmap(lambda image, vs: jax.vmap(lambda v: warp(image, v, size, aug.fill))(vs))
  return per_image(images, views).reshape(n * aug.num, size, size, images.shape[-1])


# ----------------------------------------------------------------------------- the loss
def image_embeddings(model: CLIP, variables, images: jax.Array, *, mean=OPENAI_MEAN, std=OPENAI_STD,
                     constrain: Callable[[jax.Array], jax.Array] = lambda x: x) -> jax.Array:
  """[n, h, w, 3] in [0, 1] (any size) -> L2-normalised embeddings [n, d]; no augmentation."""
  check_images(images)
  x = constrain(normalize(resize(images, model.config.vision.image_size), mean, std))
  return l2_normalize(model.apply(variables, x, method="encode_image"))


def guidance_loss(model: CLIP, variables, images: jax.Array, target_emb: jax.Array, rng: jax.Array | None = None,
                  *, augment: Augmentations = Augmentations(), negative_emb: jax.Array | None = None,
                  negative_weight: float = 0.3, classifier_scale: float | None = None, mean=OPENAI_MEAN,
                  std=OPENAI_STD, constrain: Callable[[jax.Array], jax.Array] = lambda x: x) -> jax.Array:
  """Per-image CLIP guidance loss [n] (lower = closer to the target).

  images: [n, h, w, 3] in [0, 1], any h, w (resized to the model's size, antialiased).
  target_emb: L2-normalised [d] (one target for all) or [n, d] (one per image): text embeddings
    (`encode_prompts`) or image embeddings (`image_embeddings`).
  rng: the augmentations' key; required when augment.num > 0.
  negative_emb: optional normalised [m, d] (for all images) or [n, m, d] (per image); each adds
    negative_weight * cos (CLIPDraw's negative prompts).
  classifier_scale: when given (e.g. the model's `logit_scale`), the loss is instead the zero-shot
    classifier's cross-entropy of the target against the negatives (in nats, >= 0; negative_weight
    unused); needs negative_emb.
  constrain: applied to the model's input batch ([n * K, s, s, 3]), e.g. a sharding constraint.
  Raises ValueError for images that are not [n, h, w, 3] floats or embeddings of the wrong shape.
  """
  check_images(images)
  n, dim = images.shape[0], model.config.embed_dim
  if target_emb.shape not in ((dim,), (n, dim)):
    raise ValueError(f"target embeddings must be [{dim}] or [{n}, {dim}] for {n} images, got {target_emb.shape}.")
  if negative_emb is not None and not (
      (negative_emb.ndim == 2 and negative_emb.shape[1] == dim) or
      (negative_emb.ndim == 3 and negative_emb.shape[0] == n and negative_emb.shape[2] == dim)):
    raise ValueError(f"negative embeddings must be [m, {dim}] or [{n}, m, {dim}], got {negative_emb.shape}.")
  if classifier_scale is not None and negative_emb is None:
    raise ValueError("the classifier objective needs negative embeddings (the other classes' prompts).")
  size = model.config.vision.image_size
  views = 1
  x = resize(images, size)
  if augment.num:
    if rng is None:
      raise ValueError("augmentations need an rng key (or pass augment=NO_AUGMENTATION).")
    x, views = random_views(x, rng, augment, size), augment.num
  x = constrain(normalize(x, mean, std))
  emb = l2_normalize(model.apply(variables, x, method="encode_image")).reshape(n, views, dim)
  target = jnp.broadcast_to(target_emb, (n, dim))
  cos_target = jnp.einsum("nkd,nd->nk", emb, target)
  negatives = None if negative_emb is None else jnp.broadcast_to(negative_emb, (n,) + negative_emb.shape[-2:])
  if classifier_scale is not None:
    logits = classifier_scale * jnp.concatenate([cos_target[..., None], jnp.einsum("nkd,nmd->nkm", emb, negatives)], -1)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0], axis=1)
  loss = -cos_target
  if negatives is not None:
    loss = loss + negative_weight * jnp.einsum("nkd,nmd->nk", emb, negatives)
  return jnp.mean(loss, axis=1)


def logit_scale(variables) -> float:
  """The model's learned logit scale (the multiplier, exp of the stored log, clipped at 100 as in
  training: `losses.clamp_logit_scale`), for `classifier_scale`."""
  from clip_jax.losses import clamp_logit_scale
  return float(clamp_logit_scale(jnp.asarray(variables["params"]["logit_scale"])))


def batch_constraint(mesh: Mesh | None) -> Callable[[jax.Array], jax.Array]:
  """x -> x constrained to the mesh's batch sharding when its leading dim divides evenly
  (replicated otherwise: one drawing's 4 views cannot split over 8 devices)."""
  if mesh is None:
    return lambda x: x
  from clip_jax.sharding import batch_sharding
  sharding = batch_sharding(mesh)
  axes = sharding.spec[0]
  shards = int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))

  def constrain(x):
    return jax.lax.with_sharding_constraint(x, sharding) if x.shape[0] % shards == 0 else x
  return constrain


def make_guidance_fn(model: CLIP, mesh: Mesh | None = None, *, augment: Augmentations = Augmentations(),
                     negative_weight: float = 0.3, classifier_scale: float | None = None, mean=OPENAI_MEAN,
                     std=OPENAI_STD):
  """`fn(variables, images, target_emb, rng, negative_emb=None) -> losses [n]`, jit-compiled, with the
  augmented batch split over `mesh`'s batch axes (variables replicated: `eval.embed.place_on_mesh`).
  Differentiate it w.r.t. images (argnums=1) for guidance."""
  constrain = batch_constraint(mesh)

  def fn(variables, images, target_emb, rng, negative_emb=None):
    return guidance_loss(model, variables, images, target_emb, rng, augment=augment, negative_emb=negative_emb,
                         negative_weight=negative_weight, classifier_scale=classifier_scale, mean=mean, std=std,
                         constrain=constrain)
  return jax.jit(fn)


def ensemble_loss(loss_fns: Sequence[Callable[[jax.Array, jax.Array], jax.Array]]
                  ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Several CLIPs as one objective: `(images [n, h, w, 3], rng) -> losses [n]`, the mean of each
  `loss_fn(images, rng_i)` (each a bound guidance loss of one model, e.g. `make_guidance_fn`'s fn with
  that model's variables and its own text embeddings of the prompts).

  Member 0 gets `rng` itself and member i > 0 `jax.random.fold_in(rng, i)`: independent views per
  model, and a one-member ensemble is exactly its member. Why: an image optimised against one CLIP
  finds features only that CLIP answers to; each independently trained model answers to different
  ones, so the mean rewards what they share (the reason CLIP-guided generators often guide with
  several CLIPs; measured on the digits, WORKSPACE issue 18). Raises ValueError for no members.
  """
  loss_fns = list(loss_fns)
  if not loss_fns:
    raise ValueError("an ensemble needs at least one loss function (one CLIP).")

  def fn(images, rng):
    total = loss_fns[0](images, rng)
    for i, member in enumerate(loss_fns[1:], start=1):
      total = total + member(images, jax.random.fold_in(rng, i))
    return total / len(loss_fns)
  return fn


# ----------------------------------------------------------------------------- loading and text
def encode_prompts(model: CLIP, variables, tokenizer, prompts: str | Sequence[str], mesh: Mesh | None = None) -> jax.Array:
  """Prompts -> L2-normalised text embeddings [m, d]. Raises ValueError for an empty prompt."""
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  if not prompts:
    raise ValueError("no prompt given; pass the text to guide toward, e.g. --prompt 'a drawing of a cat'.")
  for prompt in prompts:
    if not isinstance(prompt, str) or not prompt.strip():
      raise ValueError(f"prompt {prompt!r} is empty; give the text to guide toward, e.g. 'a drawing of a cat'.")
  from clip_jax.eval.embed import embed_texts
  from clip_jax.sharding import create_mesh
  mesh = mesh or create_mesh({"data": -1})
  from clip_jax.tokenizer import truncation_notes
  for note in truncation_notes(tokenizer, prompts, model.config.text.context_length):
    print(note, flush=True)
  tokens = np.asarray(tokenizer(prompts), np.int32)
  return jnp.asarray(embed_texts(model, variables, tokens, batch_size=len(prompts), mesh=mesh))


def load_guide(checkpoint: str, tokenizer: str | None = None, model_name: str | None = None,
               act: str | None = None):
  """(model, variables, tokenizer) for any checkpoint `clip_jax.load_checkpoint` reads (OpenAI /
  open_clip files, Hugging Face directories, training workdirs). `model_name` / `act`: a bare state
  dict's architecture and activation, as `clip_jax.evaluate --model-name / --act` take them
  (`evaluate.load_model`: a directory with --act, or an unknown name, is a ValueError). Raises
  FileNotFoundError for a missing path and CheckpointError (a ValueError) for one that is not a CLIP
  checkpoint."""
  from clip_jax.convert import check_checkpoint_exists
  check_checkpoint_exists(checkpoint)  # a MissingPathError, a FileNotFoundError
  from clip_jax.evaluate import _tokenizer  # the same rule as evaluation: a directory's own tokenizer first
  from clip_jax.evaluate import load_model
  model, variables = load_model(checkpoint, model_name, act)
  return model, variables, _tokenizer(tokenizer, checkpoint, model.config.text.context_length)
