"""The two sharded passes every evaluation is made of: images through the eval pipeline, and texts
in fixed-size batches. Both run one jit-compiled function over a batch split across all devices of
all processes, and bring the results back to every host in dataset order.

Every example counts exactly once: the pipeline pads the last batch with `mask=False` rows, and
the rows that come back are placed by their source index, which is checked never to repeat.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clip_jax.data.pipeline import default_batch_axes, make_pipeline, to_global_batch
from clip_jax.models.clip import CLIP, l2_normalize

# What an image pass returns per image: the L2-normalised CLIP embedding (zero-shot, retrieval),
# or the features the paper's linear probes read (its I_f: before the ViT's projection, Appendix A.3).
FEATURE_KINDS = ("embedding", "pre_projection")


def batch_shards(mesh: Mesh, batch_axes: tuple[str, ...] | None = None) -> int:
  axes = batch_axes or default_batch_axes(mesh)
  return int(np.prod([mesh.shape[a] for a in axes]))


def global_batch_size(batch_size: int, mesh: Mesh, batch_axes: tuple[str, ...] | None = None) -> int:
  """`batch_size` rounded up to a multiple of the batch shards, so every device gets equal rows."""
  if batch_size < 1:
    raise ValueError(f"batch size must be at least 1, got {batch_size}.")
  shards = batch_shards(mesh, batch_axes)
  size = math.ceil(batch_size / shards) * shards
  assert size % jax.process_count() == 0, "every process must hold the same number of rows"
  return size


class ImagesOnly:
  """A tokenizer stand-in for image passes: the eval pipeline tokenizes one caption per example,
  which no image pass reads, so this skips the BPE work. Picklable, for grain's workers."""

  def __call__(self, texts) -> np.ndarray:
    return np.zeros((len(texts), 1), np.int32)


class Subset:
  """The first `limit` records of a source (quick runs); keeps the source's attributes."""

  def __init__(self, source, limit: int):
    if limit < 1:
      raise ValueError(f"limit must be at least 1, got {limit}.")
    self._source, self._len = source, min(limit, len(source))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self._len:
      raise IndexError(index)
    return self._source[index]

  def __getattr__(self, name):
    if name.startswith("_"):  # not yet set while unpickling
      raise AttributeError(name)
    return getattr(self._source, name)


def image_batches(source, *, batch_size: int, image_size: int, mesh: Mesh, num_workers: int = 0,
                  preprocessing=None):
  """The eval pipeline over `source` with a global batch of (rounded) `batch_size`; `preprocessing`: the
  model's own (`convert.stated_preprocessing`), OpenAI's by default."""
  per_process = global_batch_size(batch_size, mesh) // jax.process_count()
  return make_pipeline(source, ImagesOnly(), batch_size=per_process, image_size=image_size, train=False,
                       num_workers=num_workers, preprocessing=preprocessing)


def _is_ln_post(module: nn.Module, method_name: str) -> bool:
  return module.name == "ln_post" and method_name == "__call__"


@functools.lru_cache(maxsize=None)
def _image_fn(model: CLIP, features: str, out_sharding: NamedSharding):
  """One compiled function per (model, feature kind, sharding); jit's own cache handles shapes."""
  def fn(variables, images):
    if features == "embedding":
      return l2_normalize(model.apply(variables, images, method="encode_image"))
    if model.config.vision.is_resnet:  # the attention pool's output is the ResNet's feature
      return model.apply(variables, images, method="encode_image").astype(jnp.float32)
    _, state = model.apply(variables, images, method="encode_image", capture_intermediates=_is_ln_post,
                           mutable=["intermediates"])
    return state["intermediates"]["visual"]["ln_post"]["__call__"][0].astype(jnp.float32)
  return jax.jit(fn, out_shardings=out_sharding)


@functools.lru_cache(maxsize=None)
def _text_fn(model: CLIP, out_sharding: NamedSharding):
  return jax.jit(lambda variables, tokens: l2_normalize(model.apply(variables, tokens, method="encode_text")),
                 out_shardings=out_sharding)


def place_on_mesh(variables, mesh: Mesh):
  """Leaves already spread over the mesh stay as they are (a trainer's sharded state); others
  (numpy, or arrays on one device, as checkpoint loaders return them) are replicated onto it."""
  devices = set(mesh.devices.flat)
  replicated = NamedSharding(mesh, P())

  def place(x):
    if isinstance(x, jax.Array) and x.sharding.device_set == devices:
      return x
    return jax.device_put(x, replicated)
  return jax.tree.map(place, variables)


def to_host(x: jax.Array) -> np.ndarray:
  """A (possibly multi-process) sharded array -> the whole array as numpy, on every process."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@dataclasses.dataclass
class ImageFeatures:
  features: np.ndarray     # float32 [n, d], in source order
  labels: np.ndarray       # int32 [n]
  indices: np.ndarray      # int32 [n], the source index of each row (sorted)
  num_skipped: int         # records the pipeline could not read (counted, left out)
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> count, this process's share
  # Images read in another mode and converted to RGB by open_clip's evaluation rule ('mode_RGBA': alpha
  # dropped, ...) -> count, this process's share; the pipeline's 'repaired' counts.
  converted: dict[str, int] = dataclasses.field(default_factory=dict)


def embed_images(model: CLIP, variables, batches: Iterable[dict], num_examples: int, mesh: Mesh, *,
                 features: str = "embedding", batch_axes: tuple[str, ...] | None = None) -> ImageFeatures:
  """Runs every batch of the eval pipeline through the image tower, sharded over the mesh."""
  if features not in FEATURE_KINDS:
    raise ValueError(f"features must be one of {FEATURE_KINDS}, got {features!r}.")
  axes = tuple(batch_axes or default_batch_axes(mesh))
  fn = _image_fn(model, features, NamedSharding(mesh, P(axes)))
  variables = place_on_mesh(variables, mesh)
  out: np.ndarray | None = None
  labels = np.full((num_examples,), -1, np.int32)
  seen = np.zeros((num_examples,), bool)

  def collect(pending):
    nonlocal out
    values, index, mask, label = (to_host(x) for x in pending)
    rows = index[mask]
    assert not seen[rows].any() and len(np.unique(rows)) == len(rows), "an example came back twice"
    if out is None:
      out = np.zeros((num_examples, values.shape[-1]), np.float32)
    out[rows], labels[rows], seen[rows] = values[mask], label[mask], True

  pending = None
  iterator = iter(batches)
  for local in iterator:
    batch = to_global_batch({k: local[k] for k in ("image", "index", "mask", "label")}, mesh, axes)
    values = fn(variables, batch["image"])
    if pending is not None:  # read back the previous batch while this one computes
      collect(pending)
    pending = (values, batch["index"], batch["mask"], batch["label"])
  if pending is not None:
    collect(pending)
  if out is None:
    raise ValueError("the evaluation data yielded no batches.")
  indices = np.flatnonzero(seen).astype(np.int32)
  quality = _quality(iterator)
  return ImageFeatures(out[indices], labels[indices], indices, num_examples - len(indices),
                       quality["skipped"], quality["repaired"])


def _quality(iterator) -> dict[str, dict[str, int]]:
  """The pipeline's per-reason counts {'skipped': ..., 'repaired': ...} (empty for a plain iterable)."""
  from clip_jax.data.pipeline import quality_counts
  try:
    return quality_counts(iterator)
  except (AttributeError, AssertionError, TypeError):
    return {"skipped": {}, "repaired": {}}


def embed_texts(model: CLIP, variables, tokens: np.ndarray, *, batch_size: int, mesh: Mesh,
                batch_axes: tuple[str, ...] | None = None) -> np.ndarray:
  """int32 [m, L] token ids (the same on every process) -> float32 [m, d] normalised embeddings."""
  axes = tuple(batch_axes or default_batch_axes(mesh))
  sharding = NamedSharding(mesh, P(axes))
  fn = _text_fn(model, sharding)
  variables = place_on_mesh(variables, mesh)
  size = global_batch_size(batch_size, mesh, axes)
  num = tokens.shape[0]
  padded = np.zeros((math.ceil(num / size) * size, tokens.shape[1]), np.int32)
  padded[:num] = tokens
  # The rows of the global batch this process feeds: its devices' slices, contiguous.
  slices = sorted(idx[0].indices(size)[:2] for idx in sharding.addressable_devices_indices_map((size,)).values())
  start, stop = slices[0][0], slices[-1][1]
  assert stop - start == size // jax.process_count(), "this process's rows are not contiguous"
  outs, pending = [], None
  for offset in range(0, padded.shape[0], size):
    local = padded[offset + start:offset + stop]
    values = fn(variables, jax.make_array_from_process_local_data(sharding, local, (size, local.shape[1])))
    if pending is not None:
      outs.append(to_host(pending))
    pending = values
  outs.append(to_host(pending))
  return np.concatenate(outs)[:num]
