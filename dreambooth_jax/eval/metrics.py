"""DreamBooth's evaluation metrics (Ruiz et al., CVPR 2023, Sections 4.1 and 4.3).

Subject fidelity, prompt fidelity, prior preservation and diversity:
  CLIP-I  mean cosine similarity of CLIP image embeddings over all (generated, real) pairs
  DINO    the same with ViT-S/16 DINO [CLS] embeddings (the paper's preferred subject metric:
          unlike CLIP, DINO's self-supervised features tell apart subjects of one class)
  CLIP-T  mean cosine similarity between each generated image and its prompt, in CLIP space
  PRES    mean DINO similarity over all (image of "a [class noun]" from the fine-tuned model,
          real subject image) pairs; lower = less of the subject leaks into the class
  DIV     mean LPIPS distance between images generated from the same prompt; higher = more diverse

The functions here work on embeddings (any array type, normalised or not) and return float32
scalars; `SubjectMetrics` loads the three networks once and evaluates lists of images.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from clip_jax.models.clip import l2_normalize
from clip_jax.preprocess import preprocess as clip_preprocess
from dreambooth_jax.eval import dino as dino_lib
from dreambooth_jax.eval import lpips as lpips_lib

ImageLike = Image.Image | np.ndarray
Images = np.ndarray | Sequence[ImageLike]


# ----------------------------------------------------------------------------- on embeddings
def _embeddings(x, name: str) -> jax.Array:
  x = jnp.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"{name} must be a [num_images, dim] array of embeddings, got shape {x.shape}.")
  if x.shape[0] == 0:
    raise ValueError(f"{name} is empty: the metric needs at least one embedding.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must hold floating-point embeddings, got {x.dtype}.")
  return x.astype(jnp.float32)


def _same_dim(a: jax.Array, b: jax.Array, names: str) -> None:
  if a.shape[-1] != b.shape[-1]:
    raise ValueError(f"{names} have different widths ({a.shape[-1]} vs {b.shape[-1]}): they must come "
                     "from the same model.")


def mean_pairwise_cosine(a, b, names: tuple[str, str] = ("a", "b")) -> jax.Array:
  """Mean cosine similarity over all n * m pairs of rows of a [n, d] and b [m, d]."""
  a, b = _embeddings(a, names[0]), _embeddings(b, names[1])
  _same_dim(a, b, f"{names[0]} and {names[1]}")
  # mean_ij <a_i, b_j> = <mean_i a_i, mean_j b_j> for unit rows: no n x m matrix is needed.
  a_mean = jnp.mean(l2_normalize(a), axis=0)
  b_mean = jnp.mean(l2_normalize(b), axis=0)
  return jnp.dot(a_mean, b_mean, precision=jax.lax.Precision.HIGHEST)


def clip_i(generated_emb, real_emb) -> jax.Array:
  """CLIP-I: generated [n, d] and real [m, d] CLIP image embeddings."""
  return mean_pairwise_cosine(generated_emb, real_emb, ("generated_emb", "real_emb"))


def dino_score(generated_emb, real_emb) -> jax.Array:
  """DINO: generated [n, d] and real [m, d] DINO [CLS] embeddings."""
  return mean_pairwise_cosine(generated_emb, real_emb, ("generated_emb", "real_emb"))


def prior_preservation(class_emb, real_emb) -> jax.Array:
  """PRES: DINO embeddings of the fine-tuned model's "a [class noun]" images [n, d] against the
  real subject images [m, d]."""
  return mean_pairwise_cosine(class_emb, real_emb, ("class_emb", "real_emb"))


def clip_t(image_emb, text_emb) -> jax.Array:
  """CLIP-T: image embeddings [n, d] against their prompts' text embeddings, row by row ([n, d]),
  or one prompt's [d] / [1, d] for every image."""
  image_emb = _embeddings(image_emb, "image_emb")
  text_emb = jnp.asarray(text_emb)
  text_emb = _embeddings(text_emb[None] if text_emb.ndim == 1 else text_emb, "text_emb")
  _same_dim(image_emb, text_emb, "image_emb and text_emb")
  if text_emb.shape[0] not in (1, image_emb.shape[0]):
    raise ValueError(f"text_emb has {text_emb.shape[0]} rows for {image_emb.shape[0]} images: give one "
                     "prompt embedding per image, or a single one for all.")
  return jnp.mean(jnp.sum(l2_normalize(image_emb) * l2_normalize(text_emb), axis=-1))


def same_group_pairs(groups: Sequence[Hashable]) -> dict[Hashable, list[tuple[int, int]]]:
  """Unordered index pairs (i < j) of items that share a group label, per group. Groups with a
  single item have no pairs and are left out."""
  members: dict[Hashable, list[int]] = defaultdict(list)
  for index, group in enumerate(groups):
    members[group].append(index)
  return {g: [(a, b) for k, a in enumerate(m) for b in m[k + 1:]] for g, m in members.items() if len(m) > 1}


def diversity(distance_fn: Callable[[np.ndarray, np.ndarray], np.ndarray], images: Images,
              groups: Sequence[Hashable] | None = None) -> float:
  """DIV: the mean over prompts of the mean LPIPS distance between that prompt's images.

  distance_fn maps two index arrays (i [P], j [P]) to distances [P] (see
  `SubjectMetrics.lpips_distances`); groups holds each image's prompt (default: one group).
  Every prompt counts once, whatever its number of images.
  """
  count = len(images)
  groups = [0] * count if groups is None else list(groups)
  if len(groups) != count:
    raise ValueError(f"groups has {len(groups)} labels for {count} images: give one label (prompt) per image.")
  pairs = same_group_pairs(groups)
  if not pairs:
    raise ValueError("DIV needs at least two images generated from the same prompt; every prompt here "
                     "has one image.")
  means = []
  for group_pairs in pairs.values():
    first, second = (np.asarray(p) for p in zip(*group_pairs))
    means.append(float(np.mean(np.asarray(distance_fn(first, second), np.float64))))
  return float(np.mean(means))


def embedding_diversity(embeddings) -> float:
  """DIV with a cosine distance on embeddings [n, d] (n >= 2) in place of LPIPS: the mean of
  1 - cos over all n(n-1)/2 pairs of images from one prompt. For networks that LPIPS has no
  weights for (the embedded 32 px models); same pairing as `diversity`."""
  unit = np.asarray(l2_normalize(_embeddings(embeddings, "embeddings")), np.float64)
  distance = lambda i, j: 1.0 - np.sum(unit[i] * unit[j], axis=1)  # noqa: E731
  return diversity(distance, list(unit))


# ----------------------------------------------------------------------------- on images
def _as_image_list(images: Images, name: str) -> list[ImageLike]:
  if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim == 3):
    images = [images]
  images = list(images)
  if not images:
    raise ValueError(f"{name} is empty.")
  for image in images:
    if isinstance(image, Image.Image):
      continue
    if not isinstance(image, np.ndarray):
      raise ValueError(f"{name}: expected PIL images or uint8 arrays, got {type(image).__name__}.")
    if image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"{name}: expected RGB images [H, W, 3] (or a batch [N, H, W, 3]), got an image of "
                       f"shape {image.shape}.")
    if image.dtype != np.uint8:
      raise ValueError(f"{name}: images must be uint8 (0..255) arrays or PIL images, got {image.dtype}; "
                       "e.g. generate(..., output_type='uint8').")
  return images


def _to_lpips_range(image: ImageLike) -> np.ndarray:
  """uint8 RGB -> float32 in [-1, 1], as `lpips.im2tensor` scales images."""
  pixels = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else image
  return pixels.astype(np.float32) / np.float32(127.5) - np.float32(1)


def strip_identifier(prompt: str, identifier: str) -> str:
  """'a photo of sks dog' -> 'a photo of dog': the rare token means nothing to a stock CLIP."""
  return re.sub(r"\s+", " ", re.sub(rf"(?<!\w){re.escape(identifier)}(?!\w)", "", prompt)).strip()


class SubjectMetrics:
  """The networks of DreamBooth's evaluation, loaded once.

  clip: `(module, variables)` of a clip_jax CLIP (e.g. from `clip_jax.load_checkpoint`) with a
  tokenizer (any callable `texts, context_length=... -> int [n, T]`, e.g. `clip_jax.get_tokenizer()`);
  dino: `(module, variables)` from `dreambooth_jax.eval.dino`; lpips: `(module, variables)` from
  `dreambooth_jax.eval.lpips`. Any may be None; the metrics needing it are then skipped.

  Every network runs with 'highest' matmul precision, so the numbers do not depend on an
  accelerator's default for float32 matmuls (TF32 on recent NVIDIA GPUs, bf16 passes on TPUs).
  """

  def __init__(self, *, clip: tuple[Any, Any] | None = None, tokenizer: Callable | None = None,
               dino: tuple[Any, Any] | None = None, lpips: tuple[Any, Any] | None = None,
               batch_size: int = 16, precision: str = "highest"):
    if clip is not None and tokenizer is None:
      raise ValueError("SubjectMetrics needs the CLIP model's tokenizer for CLIP-T: pass tokenizer=, e.g. "
                       "clip_jax.get_tokenizer().")
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}.")
    self.clip, self.tokenizer, self.dino, self.lpips = clip, tokenizer, dino, lpips
    self.batch_size, self.precision = batch_size, precision
    self._compiled: dict[str, Callable] = {}

  @classmethod
  def from_files(cls, *, clip: str | None = None, tokenizer: str | None = "clip", dino: str | None = None,
                 lpips_backbone: str | None = None, lpips_linear: str | None = None, lpips_net: str = "alex",
                 **kwargs) -> "SubjectMetrics":
    """From checkpoint paths: a CLIP checkpoint or directory `clip_jax.load_checkpoint` reads, a
    timm/DINO ViT state dict, and torchvision's backbone weights for LPIPS (its linear layers
    default to the ones in the installed `lpips` package)."""
    clip_pair = token_fn = None
    if clip is not None:
      from clip_jax.convert import load_checkpoint
      from clip_jax.tokenizer import get_tokenizer
      clip_pair, token_fn = load_checkpoint(clip), get_tokenizer(tokenizer)
    dino_pair = dino_lib.load_dino(dino) if dino is not None else None
    lpips_pair = (lpips_lib.load_lpips(lpips_backbone, lpips_linear, lpips_net)
                  if lpips_backbone is not None else None)
    return cls(clip=clip_pair, tokenizer=token_fn, dino=dino_pair, lpips=lpips_pair, **kwargs)

  # --- the networks, batched
  def _apply(self, name: str, pair: tuple[Any, Any], method: str | None) -> Callable:
    module, variables = pair
    if name not in self._compiled:
      def run(variables, *inputs):  # weights as an argument: closed-over arrays become HLO constants
        with jax.default_matmul_precision(self.precision):
          return module.apply(variables, *inputs, method=method)
      self._compiled[name] = jax.jit(run)
    compiled = self._compiled[name]
    return lambda *inputs: compiled(variables, *inputs)

  def _batched(self, fn: Callable, inputs: np.ndarray) -> np.ndarray:
    """Fixed-size batches (the last one padded) so that one compilation serves every call."""
    outputs = []
    for start in range(0, len(inputs), self.batch_size):
      chunk = inputs[start:start + self.batch_size]
      pad = self.batch_size - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
      outputs.append(np.asarray(fn(chunk))[:self.batch_size - pad])
    return np.concatenate(outputs)

  def _need(self, pair, what: str):
    if pair is None:
      raise ValueError(f"SubjectMetrics was built without a {what} model; pass {what}=(module, variables).")

  def clip_image_embeddings(self, images: Images) -> np.ndarray:
    """[n, d] unit CLIP image embeddings (CLIP's own resize + center crop + normalisation)."""
    self._need(self.clip, "clip")
    size = self.clip[0].config.vision.image_size
    pixels = clip_preprocess(_as_image_list(images, "images"), size)
    return np.asarray(l2_normalize(self._batched(self._apply("clip_image", self.clip, "encode_image"), pixels)))

  def clip_text_embeddings(self, prompts: Sequence[str]) -> np.ndarray:
    """[n, d] unit CLIP text embeddings."""
    self._need(self.clip, "clip")
    if isinstance(prompts, str) or not prompts:
      raise ValueError("prompts must be a non-empty list of strings.")
    tokens = np.asarray(self.tokenizer(list(prompts), context_length=self.clip[0].config.text.context_length))
    return np.asarray(l2_normalize(self._batched(self._apply("clip_text", self.clip, "encode_text"), tokens)))

  def dino_embeddings(self, images: Images) -> np.ndarray:
    """[n, d] DINO [CLS] embeddings (resize 256, center crop 224, ImageNet normalisation)."""
    self._need(self.dino, "dino")
    pixels = dino_lib.preprocess(_as_image_list(images, "images"))
    return self._batched(self._apply("dino", self.dino, None), pixels)

  def lpips_distances(self, images: Images) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A distance function over pairs of `images` (index arrays i, j -> [P]); each image's
    features are computed once, when first needed."""
    self._need(self.lpips, "lpips")
    pixels = [_to_lpips_range(image) for image in _as_image_list(images, "images")]
    features_fn = self._apply("lpips_features", self.lpips, "features")
    distance_fn = self._apply("lpips_distance", self.lpips, "distance")
    cache: dict[int, list[jax.Array]] = {}

    def features(index: int) -> list[jax.Array]:
      if index not in cache:
        cache[index] = features_fn(pixels[index][None])
      return cache[index]

    def distances(first: np.ndarray, second: np.ndarray) -> np.ndarray:
      wanted = {int(i) for i in first} | {int(j) for j in second}
      for stale in set(cache) - wanted:  # hold one prompt's features at a time
        del cache[stale]
      out = []
      for i, j in zip(first, second):
        if pixels[i].shape != pixels[j].shape:
          raise ValueError(f"LPIPS compares images of one size; images {i} and {j} are "
                           f"{pixels[i].shape[:2]} and {pixels[j].shape[:2]}.")
        out.append(float(distance_fn(features(i), features(j))[0]))
      return np.asarray(out)
    return distances

  # --- all of it
  def evaluate(self, generated: Images, real: Images | None = None, prompts: Sequence[str] | None = None,
               class_images: Images | None = None, identifier: str | None = None) -> dict[str, float]:
    """The paper's metrics for one subject, as far as the inputs and models allow.

    generated: images from the fine-tuned model; real: the subject's photos (CLIP-I, DINO, PRES);
    prompts: each generated image's prompt (CLIP-T; DIV groups images by it); class_images: the
    fine-tuned model's images for "a [class noun]" (PRES); identifier: the rare token, removed from
    prompts before CLIP-T (stock CLIP has no meaning for it).
    """
    generated = _as_image_list(generated, "generated")
    if prompts is not None:
      if isinstance(prompts, str):
        prompts = [prompts] * len(generated)
      if len(prompts) != len(generated):
        raise ValueError(f"prompts has {len(prompts)} entries for {len(generated)} generated images: give "
                         "one prompt per image.")
    results: dict[str, float] = {"num_generated": len(generated)}
    if self.clip is not None:
      generated_clip = self.clip_image_embeddings(generated)
      if real is not None:
        results["clip_i"] = float(clip_i(generated_clip, self.clip_image_embeddings(real)))
      if prompts is not None:
        texts = [strip_identifier(p, identifier) if identifier else p for p in prompts]
        results["clip_t"] = float(clip_t(generated_clip, self.clip_text_embeddings(texts)))
    if self.dino is not None and real is not None:
      real_dino = self.dino_embeddings(real)
      results["dino"] = float(dino_score(self.dino_embeddings(generated), real_dino))
      if class_images is not None:
        results["pres"] = float(prior_preservation(self.dino_embeddings(class_images), real_dino))
    if self.lpips is not None and prompts is not None and same_group_pairs(prompts):
      results["div"] = diversity(self.lpips_distances(generated), generated, prompts)
    return results
