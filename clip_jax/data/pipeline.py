"""The grain input pipeline: records -> per-process batches -> global sharded jax.Arrays.

    ds = make_pipeline(open_source("digits"), tokenizer, batch_size=64, image_size=32, train=True)
    it = iter(ds)                 # a grain DatasetIterator
    batch = next(it)              # {'image': f32 [b, s, s, 3], 'tokens': i32 [b, L], 'label': i32 [b],
                                  #  'index': i32 [b], 'mask': bool [b]}
    state = it.get_state()        # JSON-able; it.set_state(state) on a fresh iterator resumes at
                                  # the exact next example (grain.checkpoint.CheckpointHandler saves it)
    quality_counts(it)            # {'skipped': {reason: n}, 'repaired': {reason: n}}

Training: one global shuffle per epoch (same seed on every process), repeated forever or for
`num_epochs`, each process taking every `process_count`-th example of that global order, random
resized crop, batches of exactly `batch_size` with bad records filtered out. Evaluation: source
order, resize + center crop (or the model's own `preprocessing`), the last batch padded with
`mask=False` rows, and every process yielding the same number of batches so that collective ops in the eval step never wait forever.

Decoding, augmentation and tokenization run per example in `num_workers` processes (0: in this
process, on `read_threads` threads). Counting and filtering of bad records happen after the
workers, in this process, and their counts live in the iterator state, so they survive a resume
and agree with the position in the data.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import grain
import numpy as np
from absl import flags, logging

from clip_jax.data import images as image_ops
from clip_jax.data.records import DEFAULT_MAX_CAPTION_CHARS, BadRecord, clean_caption

Tokenizer = Callable[[list[str]], np.ndarray]  # texts -> int32 [n, context_length]
_QUALITY_KEY = "clip_jax_data_quality"
MAX_SKIPPED_IN_A_ROW = 1000


class ExampleMaker:
  """Source index -> one model-ready example, or a placeholder that says why it was skipped.

  Runs inside grain's workers, so it holds only picklable state (the source, the tokenizer).
  """

  def __init__(self, source, tokenizer: Tokenizer, image_size: int, train: bool,
               crop_scale=(0.9, 1.0), max_pixels: int = image_ops.DEFAULT_MAX_PIXELS,
               max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS,
               preprocessing: image_ops.Preprocessing | None = None):
    self.source, self.tokenizer = source, tokenizer
    # Evaluation's resize / mean / std (a model's own, `convert.stated_preprocessing`); training is OpenAI's.
    self.preprocessing = preprocessing or image_ops.OPENAI
    assert not (train and self.preprocessing != image_ops.OPENAI), "training preprocesses as OpenAI's CLIP"
    self.image_size, self.train = image_size, train
    self.crop_scale, self.max_pixels, self.max_caption_chars = tuple(crop_scale), max_pixels, max_caption_chars
    self.num_records = len(source)
    tokens = np.asarray(tokenizer(["a"]))
    assert tokens.ndim == 2 and tokens.shape[0] == 1, "a tokenizer maps n texts to [n, context_length]"
    self.context_length = tokens.shape[1]
    # Training JPEGs may decode at 1/2, 1/4, 1/8 scale; a training crop keeps >= sqrt(0.9 * 3/4) ~ 0.82
    # of a side, so asking for 1.25x the output size keeps every crop at full resolution. Evaluation
    # decodes at full scale: a reduced one changes the resized pixels, and the numbers must be
    # open_clip's and clip_benchmark's, image by image.
    self.draft_size = int(math.ceil(image_size * 1.25)) if train else None

  def placeholder(self, index: int, quality: list, detail: str = "") -> dict:
    return {"image": np.zeros((self.image_size, self.image_size, 3), np.float32),
            "tokens": np.zeros((self.context_length,), np.int32),
            "label": np.int32(-1), "index": np.int32(index), "mask": np.bool_(False),
            "_quality": quality, "_detail": detail}

  def __call__(self, index, rng: np.random.Generator | None = None) -> dict:
    index = int(index)
    if index >= self.num_records:  # eval padding: not a bad record, so not counted
      return self.placeholder(-1, [])
    key = str(index)
    try:
      raw = self.source[index]
      key = raw.get("key", key)
      if "skip" in raw:
        return self.placeholder(index, [("skipped", raw["skip"])], f"{key}: {raw.get('detail', '')}")
      captions = raw["captions"] or [""]
      pick = int(rng.integers(len(captions))) if (self.train and rng is not None) else 0
      caption, caption_repairs = clean_caption(captions[pick], self.max_caption_chars)
      if self.train:  # convert first (alpha on white), then crop: see clip_jax.data.images
        image, image_repairs = image_ops.decode_image(raw["image"], self.max_pixels, self.draft_size)
        pixels = image_ops.train_transform(image, self.image_size, rng, self.crop_scale)
      else:  # open_clip's order: resize and crop in the image's own mode, RGB last
        image = image_ops.load_image(raw["image"], self.max_pixels, self.draft_size)
        # A palette with a transparency entry loses it as alpha does: counted as palette + alpha ('PA').
        transparent_palette = image.mode == "P" and "transparency" in image.info
        image_repairs = image_ops.mode_repairs("PA" if transparent_palette else image.mode)
        pixels = image_ops.eval_transform(image, self.image_size, self.preprocessing)
      tokens = np.asarray(self.tokenizer([caption]), np.int32)[0]
    except BadRecord as e:
      return self.placeholder(index, [("skipped", e.reason)], f"{key}: {e.detail}")
    except Exception as e:  # noqa: BLE001 - one odd record must not end a week-long run
      return self.placeholder(index, [("skipped", "processing_error")], f"{key}: {type(e).__name__}: {e}")
    return {"image": image_ops.normalize(pixels, self.preprocessing.mean, self.preprocessing.std), "tokens": tokens,
            "label": np.int32(raw.get("label", -1)), "index": np.int32(index), "mask": np.bool_(True),
            "_quality": [("repaired", r) for r in caption_repairs + image_repairs], "_detail": ""}


class _QualityIterator(grain.DatasetIterator):
  """Counts skip/repair notes, drops skipped examples (training) or keeps them masked (eval)."""

  def __init__(self, parent: grain.DatasetIterator, drop_skipped: bool):
    super().__init__(parent)
    self._drop_skipped = drop_skipped
    self._skipped: dict[str, int] = {}
    self._repaired: dict[str, int] = {}

  def __next__(self) -> dict:
    skipped_in_a_row = 0
    while True:
      element = dict(next(self._parent))
      quality, detail = element.pop("_quality"), element.pop("_detail")
      skipped = False
      for kind, reason in quality:
        counter = self._skipped if kind == "skipped" else self._repaired
        counter[reason] = counter.get(reason, 0) + 1
        if kind == "skipped":
          skipped = True
          if math.log2(counter[reason]).is_integer():  # the 1st, 2nd, 4th, 8th, ... of each reason
            logging.warning("input pipeline: skipped a record (%s, %d so far): %s", reason,
                            counter[reason], detail)
      if not (skipped and self._drop_skipped):
        return element
      skipped_in_a_row += 1
      if skipped_in_a_row == MAX_SKIPPED_IN_A_ROW:
        # Otherwise a repeating dataset of nothing but bad records would spin here forever.
        raise ValueError(f"input pipeline: {MAX_SKIPPED_IN_A_ROW} records in a row were unusable "
                         f"(skipped so far: {self._skipped}); the data is not what the source "
                         "expects. Check it with `python -m clip_jax.data.prepare`.")

  def get_state(self) -> dict:
    return {"parent": self._parent.get_state(),
            _QUALITY_KEY: {"skipped": dict(self._skipped), "repaired": dict(self._repaired)}}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self._skipped = dict(state[_QUALITY_KEY]["skipped"])
    self._repaired = dict(state[_QUALITY_KEY]["repaired"])

  def __str__(self) -> str:
    return f"QualityIterator(drop_skipped={self._drop_skipped})"


class _QualityIterDataset(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, drop_skipped: bool):
    super().__init__(parent)
    self._drop_skipped = drop_skipped

  def __iter__(self) -> grain.DatasetIterator:
    return _QualityIterator(self._parent.__iter__(), self._drop_skipped)

  def __str__(self) -> str:
    return f"QualityIterDataset(drop_skipped={self._drop_skipped})"


def quality_counts(iterator: grain.DatasetIterator) -> dict:
  """{'skipped': {reason: n}, 'repaired': {reason: n}} for the examples this iterator has given."""
  def find(state):
    if isinstance(state, dict):
      if _QUALITY_KEY in state:
        return state[_QUALITY_KEY]
      for value in state.values():
        found = find(value)
        if found is not None:
          return found
    return None
  counts = find(iterator.get_state())
  assert counts is not None, "not an iterator of make_pipeline"
  return {"skipped": dict(sorted(counts["skipped"].items())),
          "repaired": dict(sorted(counts["repaired"].items()))}


def eval_num_batches(num_records: int, batch_size: int, process_count: int) -> int:
  """Batches each process yields in evaluation (the same on every process)."""
  return math.ceil(num_records / (batch_size * process_count))


def _process_index_and_count(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # Imported lazily: worker processes never need it.
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is outside [0, {process_count}).")
  return process_index, process_count


def make_pipeline(source, tokenizer: Tokenizer, *, batch_size: int, image_size: int, train: bool,
                  seed: int = 0, num_epochs: int | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  num_workers: int = 0, read_threads: int = 2, prefetch_batches: int = 2,
                  crop_scale=(0.9, 1.0), max_pixels: int = image_ops.DEFAULT_MAX_PIXELS,
                  max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS,
                  preprocessing: image_ops.Preprocessing | None = None) -> grain.IterDataset:
  """-> a grain IterDataset of per-process batches (see the module docstring).

  `batch_size` is per process (global batch / process_count). `num_epochs=None` repeats training
  forever; evaluation always makes one pass. `process_index`/`process_count` default to jax's.
  `preprocessing`: evaluation's (a model's own mean/std, interpolation, resize mode; default OpenAI's).
  """
  if train and preprocessing not in (None, image_ops.OPENAI):
    raise ValueError("training preprocesses as OpenAI's CLIP; a model's own preprocessing applies to evaluation.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
  num_records = len(source)
  if num_records == 0:
    raise ValueError(f"{source!r} holds no records.")
  process_index, process_count = _process_index_and_count(process_index, process_count)
  maker = ExampleMaker(source, tokenizer, image_size, train, crop_scale, max_pixels, max_caption_chars, preprocessing)

  if train:
    # Shuffle and augmentation seeds come from `seed` and the global position, identical on every
    # process; each process then takes its slice, so the shards are disjoint and cover each epoch.
    ds = grain.MapDataset.range(num_records).seed(seed).shuffle().repeat(num_epochs)
    ds = ds.random_map(maker)
    if num_epochs is not None:  # equal lengths per process, so all stop after the same step
      ds = ds[:len(ds) - len(ds) % process_count]
  else:
    padded = eval_num_batches(num_records, batch_size, process_count) * batch_size * process_count
    ds = grain.MapDataset.range(padded).map(maker)
  ds = ds[process_index::process_count]

  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                            prefetch_buffer_size=max(2 * batch_size, 16)))
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():
      # grain's worker start reads absl flags; outside an absl app (tests, notebooks, scripts)
      # nobody has parsed them, so take their defaults rather than fail.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=min(max(batch_size // num_workers, 1), 64)))
  ds = _QualityIterDataset(ds, drop_skipped=train)
  ds = ds.batch(batch_size, drop_remainder=train)
  if prefetch_batches > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch_batches)
  return ds


def default_batch_axes(mesh) -> tuple[str, ...]:
  """The mesh axes a batch is split over (`clip_jax.sharding.batch_axes` decides)."""
  from clip_jax import sharding  # Imported lazily: it pulls in jax and flax.
  return sharding.batch_axes(mesh)


def to_global_batch(local_batch: Any, mesh, batch_axes: tuple[str, ...] | None = None) -> Any:
  """Per-process numpy batch -> global jax.Arrays split over the mesh's batch axes
  (`clip_jax.sharding.place_local_batch`; `batch_axes` overrides them): each process passes its own
  rows (leading dim = global batch / process_count); the result's leading dim is the global batch."""
  from clip_jax import sharding  # Imported lazily: worker processes never need it.
  return sharding.place_local_batch(local_batch, mesh, batch_axes)
