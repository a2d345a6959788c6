"""Zero-shot image-text retrieval with several captions per image (the paper's Table 13 protocol on
the Flickr30k and MSCOCO test sets): image->text Recall@K counts an image as found when any of its
captions ranks in the top K; text->image Recall@K when a caption's own image does.

Data: a TFDS image-caption dataset ('tfds:coco_captions', split 'test' = the 5k Karpathy test
images), ArrayRecord shards with several captions per record, or a local caption file:
  JSONL   one object per line: {"image": "path/to/img.jpg", "captions": ["...", "..."]}
          ("caption": "..." also works; one image on several lines gathers their captions)
  CSV/TSV a header row with an image column (path / filepath / file_path / image / image_path / file /
          filename, as for label tables) and a caption column (caption / captions / text / title / txt /
          description, as clip_jax.data.prepare reads); rows that share an image are one image
A row without an image (or a JSONL line that is not an object) is skipped and counted ('malformed_row').
Relative image paths are resolved against the caption file's directory.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from absl import logging

# The one reader of caption tables, training's too; re-exported here, where evaluation code imports it from.
from clip_jax.data.captioned import CaptionFileSource  # noqa: F401
from clip_jax.data.sources import open_source
from clip_jax.eval import embed
from clip_jax.eval.zeroshot import percent

DEFAULT_KS = (1, 5, 10)


@dataclasses.dataclass(frozen=True)
class RetrievalInfo:
  name: str
  source: str | None      # data spec; None: the user passes a file or shards
  split: str
  paper_name: str


RETRIEVAL_DATASETS = {info.name: info for info in (
    RetrievalInfo("coco_captions", "tfds:coco_captions", "test", "MSCOCO 5k test"),
    RetrievalInfo("flickr30k", None, "test", "Flickr30k 1k test"),
)}
RETRIEVAL_ALIASES = {"coco": "coco_captions", "mscoco": "coco_captions", "flickr": "flickr30k"}


def find_retrieval_dataset(name: str) -> RetrievalInfo | None:
  key = name[len("tfds:"):] if name.startswith("tfds:") else name
  return RETRIEVAL_DATASETS.get(RETRIEVAL_ALIASES.get(key, key))


def is_caption_file(spec: str) -> bool:
  return spec.lower().endswith((".jsonl", ".json", ".csv", ".tsv"))


def open_retrieval_source(spec: str, split: str, *, data_dir: str | None = None, image_size: int = 224):
  if is_caption_file(spec):
    return CaptionFileSource(spec)
  return open_source(spec, split, data_dir=data_dir, image_size=image_size)


def source_captions(source) -> list[list[str]]:
  """Every record's captions, in source order (a source may list them without reading images)."""
  if hasattr(source, "all_captions"):
    return [list(c) for c in source.all_captions()[:len(source)]]
  captions = []
  for index in range(len(source)):
    record = source[index]
    captions.append([] if "skip" in record else [_text(c) for c in record["captions"]])
  return captions


def _text(caption) -> str:
  return caption.decode("utf-8", "replace") if isinstance(caption, bytes) else str(caption)


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray,
                      ks: Sequence[int] = DEFAULT_KS, chunk: int = 1024) -> dict[str, float]:
  """Recall@K in percent, both ways, with several captions per image.

  image_emb: [n, d]; text_emb: [m, d] (both normalised); text_image: int [m], the row of image_emb each
  caption describes. A query (an image, or a caption) is found at K when its best-scoring correct
  candidate ranks in the top K. Candidates that score exactly the same (repeated captions such as "a photo
  of a dog", duplicate images: identical rows score identically, compared on the unique rows) are taken
  in a uniformly random order, in expectation: a query's recall@K is the probability that one of its
  correct candidates among the tied comes within the top K. Without ties this is clip_benchmark's
  torch.topk recall exactly; with ties torch.topk's order among equals is arbitrary (it differs with the
  tensor's size), and counting every tie as found (as this did before) gave a caption set where every
  image reads "a shape" an image->text R@1 of 82% instead of chance (1%).
  """
  n, m = image_emb.shape[0], text_emb.shape[0]
  text_image = np.asarray(text_image, np.int64)
  # Identical embeddings must give identical scores: score the unique rows once, then gather.
  unique_images, image_of_row = np.unique(image_emb, axis=0, return_inverse=True)
  unique_texts, text_of_row = np.unique(text_emb, axis=0, return_inverse=True)
  image_of_row, text_of_row = image_of_row.reshape(-1), text_of_row.reshape(-1)
  text_found = np.zeros((len(ks), m))
  for start in range(0, m, chunk):
    rows = np.arange(start, min(start + chunk, m))
    scores = (unique_texts[text_of_row[rows]] @ unique_images.T)[:, image_of_row]  # [c, n]
    correct = np.arange(n)[None, :] == text_image[rows, None]
    text_found[:, rows] = _found_at(scores, correct, ks)
  has_caption = np.bincount(text_image, minlength=n) > 0
  image_found = np.zeros((len(ks), n))
  for start in range(0, n, chunk):
    rows = np.arange(start, min(start + chunk, n))
    scores = (unique_images[image_of_row[rows]] @ unique_texts.T)[:, text_of_row]  # [c, m]
    correct = text_image[None, :] == rows[:, None]
    image_found[:, rows] = _found_at(scores, correct, ks)
  image_found = image_found[:, has_caption]
  metrics = {}
  for i, k in enumerate(ks):
    metrics[f"image_to_text/R@{k}"] = percent(image_found[i])
  for i, k in enumerate(ks):
    metrics[f"text_to_image/R@{k}"] = percent(text_found[i])
  return metrics


def _found_at(scores: np.ndarray, correct: np.ndarray, ks: Sequence[int]) -> np.ndarray:
  """[len(ks), c]: per query row of `scores` [c, candidates], the probability that a `correct` candidate
  is among the top K when tied scores are ordered at random. With `above` wrong candidates scoring above the
  best correct score, and `p` correct and `q` wrong ones equal to it, the first correct one of the tie comes
  after j wrong ones of it with P(j' >= j) = C(q, j) / C(p + q, j): found at K iff above + j' < K."""
  best = np.where(correct, scores, -np.inf).max(axis=1, keepdims=True)
  above = ((scores > best) & ~correct).sum(axis=1)
  tied_wrong = ((scores == best) & ~correct).sum(axis=1)
  tied_right = ((scores == best) & correct).sum(axis=1)  # >= 1: the best correct candidate itself
  found = np.zeros((len(ks), scores.shape[0]))
  for i, k in enumerate(ks):
    need = np.maximum(k - above, 0)  # wrong tied candidates that must not all come first
    all_wrong_first = np.ones(scores.shape[0])  # C(q, need) / C(p + q, need), as a running product
    for j in range(int(need.max(initial=0))):
      step = np.where(j < need, (tied_wrong - j) / np.maximum(tied_wrong + tied_right - j, 1), 1.0)
      all_wrong_first *= np.clip(step, 0.0, 1.0)
    found[i] = np.where(above >= k, 0.0, 1.0 - all_wrong_first)
  return found


def evaluate_retrieval(model, variables, source, tokenizer, *, batch_size: int, image_size: int, mesh,
                       ks: Sequence[int] = DEFAULT_KS, num_workers: int = 0, preprocessing=None) -> dict[str, Any]:
  """Embeds every image (`preprocessing`: the model's own, OpenAI's by default) and every caption of
  `source`, sharded over the mesh, and scores recall:
  {metric: percent, 'num_images', 'num_texts', 'num_skipped': counts, 'skipped': {reason: count},
  'converted': {'mode_RGBA': count, ...}}."""
  captions = source_captions(source)
  batches = embed.image_batches(source, batch_size=batch_size, image_size=image_size, mesh=mesh,
                                num_workers=num_workers, preprocessing=preprocessing)
  images = embed.embed_images(model, variables, batches, len(source), mesh)
  # Captions of images that could not be read leave with them: they have nothing to retrieve.
  row_of_index = {int(index): row for row, index in enumerate(images.indices)}
  texts, text_image = [], []
  for index, image_captions in enumerate(captions):
    if index in row_of_index:
      texts.extend(image_captions)
      text_image.extend([row_of_index[index]] * len(image_captions))
  if not texts:
    raise ValueError(f"{source!r} has no captions to retrieve.")
  # Each distinct caption is embedded once: repeated captions then tie exactly, whatever batch position
  # (and, on an accelerator, whatever kernel) they would have had (retrieval_metrics' tie rule).
  distinct, text_of = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
  tokens = np.asarray(tokenizer(list(distinct)), np.int32)
  text_emb = embed.embed_texts(model, variables, tokens, batch_size=batch_size, mesh=mesh)[text_of.reshape(-1)]
  metrics = retrieval_metrics(images.features, text_emb, np.asarray(text_image), ks)
  if images.num_skipped:
    logging.warning("retrieval: %d unreadable images left out with their captions.", images.num_skipped)
  return {**metrics, "num_images": float(len(images.indices)), "num_texts": float(len(texts)),
          "num_skipped": float(images.num_skipped), "skipped": dict(images.skipped),
          "converted": dict(images.converted)}
