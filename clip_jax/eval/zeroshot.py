"""Zero-shot classification as in the CLIP paper (Sec. 3.1.4): each class's prompts through the text
tower, the normalised embeddings averaged over templates and renormalised (prompt ensembling), and
every image assigned the class whose ensemble embedding is most similar.

    evaluator = ZeroShotEvaluator("digits", tokenizer, DIGIT_CLASS_NAMES, DIGIT_ZEROSHOT_TEMPLATES,
                                  batch_size=256, image_size=32)
    evaluator(model, variables, mesh)   # {'zeroshot/digits/top1': 93.1, ...}, in percent

Metrics are in percent, like the paper's tables.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Sequence

import jax
import numpy as np
from absl import logging

from clip_jax.data.labelled import read_text, same_names_reordered
from clip_jax.data.sources import open_source
from clip_jax.eval import embed
from clip_jax.eval.classnames import GENERIC_TEMPLATES, DatasetInfo, find_dataset

Tokenizer = Callable[[list[str]], np.ndarray]


def prompt_texts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
  """Class-major: all templates of class 0, then of class 1, ..."""
  for template in templates:
    if template.count("{}") != 1:
      raise ValueError(f"prompt template {template!r} must hold exactly one '{{}}' for the class name.")
  return [template.format(name) for name in class_names for template in templates]


def read_templates_file(path: str) -> tuple[str, ...]:
  """Prompt templates, one per line, each with one '{}' for the class name (clip_benchmark's '{c}'
  is read as '{}'); blank lines and lines starting with '#' are ignored. A JSON list of strings
  works too. Raises ValueError for a file without templates or a line without its placeholder."""
  import json
  text = read_text(path)
  if text.lstrip().startswith("["):
    try:
      lines = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e}).") from e
    if not all(isinstance(t, str) for t in lines):
      raise ValueError(f"{path}: a JSON template file is a list of strings.")
  else:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
  templates = tuple(t.replace("{c}", "{}") for t in lines)
  if not templates:
    raise ValueError(f"{path}: holds no prompt templates; write one per line, e.g. 'a photo of a {{}}.'")
  for number, template in enumerate(templates, 1):
    if template.count("{}") != 1:
      raise ValueError(f"{path}: template {number} {template!r} needs exactly one '{{}}' (or '{{c}}') for the "
                       "class name.")
  return templates


def ensemble_classifier(prompt_emb: np.ndarray, num_classes: int) -> np.ndarray:
  """float32 [C*T, d] normalised prompt embeddings (class-major) -> [C, d]: the mean over each
  class's templates, renormalised."""
  per_class = prompt_emb.reshape(num_classes, -1, prompt_emb.shape[-1]).mean(axis=1)
  return (per_class / np.linalg.norm(per_class, axis=-1, keepdims=True)).astype(np.float32)


def zeroshot_classifier(model, variables, prompt_tokens: np.ndarray, num_classes: int, *, batch_size: int,
                        mesh) -> np.ndarray:
  """int32 [C*T, L] class-major prompt tokens -> float32 [C, d] ensemble classifier."""
  prompt_emb = embed.embed_texts(model, variables, prompt_tokens, batch_size=batch_size, mesh=mesh)
  return ensemble_classifier(prompt_emb, num_classes)


def _rows(n: int, chunk: int = 4096):
  for start in range(0, n, chunk):
    yield slice(start, min(start + chunk, n))


def classify(image_emb: np.ndarray, classifier: np.ndarray, labels: np.ndarray,
             top_k: Sequence[int] = (1, 5)) -> tuple[dict[str, float], np.ndarray]:
  """-> ({'top1': %, 'top5': %, 'mean_per_class': %}, predictions int [n]).

  top-k counts an image as right when fewer than k classes score strictly above its true class.
  """
  num_classes = classifier.shape[0]
  predictions = np.zeros(len(labels), np.int64)
  ranks = np.zeros(len(labels), np.int64)
  for rows in _rows(len(labels)):
    scores = image_emb[rows] @ classifier.T  # [chunk, C]
    predictions[rows] = scores.argmax(axis=1)
    true_score = np.take_along_axis(scores, labels[rows, None].astype(np.int64), axis=1)
    ranks[rows] = (scores > true_score).sum(axis=1)
  metrics = {}
  for k in top_k:
    if k == 1:
      metrics["top1"] = percent(predictions == labels)
    elif k <= num_classes:
      metrics[f"top{k}"] = percent(ranks < k)
  metrics["mean_per_class"] = mean_per_class_accuracy(labels, predictions)
  return metrics, predictions


def percent(hits: np.ndarray) -> float:
  """100 x the mean of `hits` [n] (booleans, or fractions in [0, 1]), as 100 * sum / n: whole counts
  then give the correctly rounded percentage (7 of 50 is 14.0, where 100 * mean is 14.000000000000002).
  NaN for n = 0, as a mean of nothing."""
  hits = np.asarray(hits)
  return 100.0 * float(np.sum(hits, dtype=np.float64)) / hits.size if hits.size else float("nan")


def mean_per_class_accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
  """The mean over the classes present in `labels` of each class's recall, in percent."""
  per_class = [percent(predictions[labels == c] == c) for c in np.unique(labels)]
  return float(np.sum(per_class)) / len(per_class) if per_class else float("nan")


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """int64 [C, C]: row = true class, column = predicted class."""
  matrix = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(matrix, (labels.astype(np.int64), predictions.astype(np.int64)), 1)
  return matrix


def confusion_matrix_png(matrix: np.ndarray, class_names: Sequence[str], path: str, title: str = "") -> str:
  """Writes the confusion matrix, each row normalised to the fraction of its true class, as a PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  num_classes = matrix.shape[0]
  fractions = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
  side = min(4 + 0.3 * num_classes, 24)
  fig, ax = plt.subplots(figsize=(side, side * 0.9))
  image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
  if num_classes <= 50:  # beyond that the names are unreadable anyway
    ax.set_xticks(range(num_classes), [str(n) for n in class_names], rotation=90, fontsize=8)
    ax.set_yticks(range(num_classes), [str(n) for n in class_names], fontsize=8)
  if num_classes <= 20:
    for (i, j), count in np.ndenumerate(matrix):
      if count:
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                color="white" if fractions[i, j] > 0.5 else "black")
  ax.set_xlabel("predicted class")
  ax.set_ylabel("true class")
  ax.set_title(title or "zero-shot confusion matrix")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


class ZeroShotEvaluator:
  """Zero-shot accuracy on one labelled dataset, for the trainer's periodic evaluation and the CLI.

  The source, its pipeline and the tokenized prompts are built once; the compiled image and text
  functions are cached per model, so repeated calls during training only run them. Each call
  embeds the prompts with the current weights, then every image, sharded over the mesh.
  """

  def __init__(self, source_spec: str, tokenizer: Tokenizer, class_names: Sequence[str] | None = None,
               templates: Sequence[str] | None = None, batch_size: int = 256, image_size: int = 224, *,
               split: str | None = None, data_dir: str | None = None, name: str | None = None,
               limit: int | None = None, num_workers: int = 0, source=None, confusion_png: str | None = None,
               preprocessing=None):
    info = find_dataset(source_spec)
    split = split or (info.test_split if info else "test")
    opened_here = source is None
    if opened_here:  # the user's own data takes the names into its source ({folder: name} maps)
      source = open_source(source_spec, split, data_dir=data_dir, image_size=image_size,
                           class_names=None if info else class_names, labelled=True)
    self.source = source
    if limit is not None:
      self.source = embed.Subset(self.source, limit)
    source_names = getattr(self.source, "class_names", None) if opened_here and info is None else None
    if source_names and isinstance(class_names, (list, tuple)) and same_names_reordered(class_names, source_names):
      # The given list held the source's own names in another order, which the source matched by name
      # (labelled._reordered, with the same rule): its label order is the one the prompts must follow.
      class_names = source_names
    elif class_names is None or isinstance(class_names, dict):
      class_names = info.class_names if info else getattr(self.source, "class_names", None)
    if not class_names:
      raise ValueError(f"{source_spec!r} carries no class names; pass them (the CLI's --classnames FILE).")
    templates = templates or (info.templates if info else GENERIC_TEMPLATES)
    self.class_names, self.templates = tuple(class_names), tuple(templates)
    self.name = name or (info.name if info else source_spec)
    self.split = split
    self.batch_size, self.image_size, self.num_workers = batch_size, image_size, num_workers
    self.preprocessing = preprocessing  # the model's own (`convert.stated_preprocessing`); None: OpenAI's
    self.prompt_tokens = np.asarray(tokenizer(prompt_texts(self.class_names, self.templates)), np.int32)
    self._batches = {}  # per-process batch size -> pipeline (built once per mesh shape)
    self.last_confusion: np.ndarray | None = None
    self.last_predictions: np.ndarray | None = None
    self.last_features: embed.ImageFeatures | None = None
    self.last_classifier: np.ndarray | None = None
    self.confusion_png = confusion_png  # rewritten after every call, when set

  def batches(self, mesh):
    size = embed.global_batch_size(self.batch_size, mesh)
    if size not in self._batches:
      self._batches[size] = embed.image_batches(self.source, batch_size=size, image_size=self.image_size,
                                                mesh=mesh, num_workers=self.num_workers,
                                                preprocessing=self.preprocessing)
    return self._batches[size]

  def data_report(self) -> dict:
    """What was wrong with the data of the last call: {'skipped': {reason: n}} from the pipeline
    (unreadable images, missing files, ...), {'converted': {'mode_RGBA': n, ...}} (images of other
    modes made RGB by open_clip's rule) and {'problems': {reason: n}, 'problem_examples'} found
    when the source was scanned (non-image files, empty class folders, name collisions, ...)."""
    features = self.last_features
    return {"skipped": dict(features.skipped) if features else {},
            "converted": dict(features.converted) if features else {},
            "problems": dict(getattr(self.source, "problems", {}) or {}),
            "problem_examples": dict(getattr(self.source, "problem_examples", {}) or {})}

  def evaluate(self, model, variables, mesh) -> dict[str, float]:
    """Unprefixed metrics {'top1', 'top5', 'mean_per_class', 'num_examples', 'num_skipped'}; after
    it, `last_predictions` [n] (class index per image), `last_features.indices` [n] (their source
    indices) and `data_report()`. Raises ValueError when labels fall outside the class names."""
    classifier = zeroshot_classifier(model, variables, self.prompt_tokens, len(self.class_names),
                                     batch_size=self.batch_size, mesh=mesh)
    images = embed.embed_images(model, variables, self.batches(mesh), len(self.source), mesh)
    bad = (images.labels < 0) | (images.labels >= len(self.class_names))
    if bad.any():
      raise ValueError(f"{self.name}: {int(bad.sum())} examples have labels outside the "
                       f"{len(self.class_names)} classes (first: {int(images.labels[bad][0])}); the class "
                       "names do not match this data.")
    metrics, predictions = classify(images.features, classifier, images.labels)
    self.last_features, self.last_predictions, self.last_classifier = images, predictions, classifier
    self.last_confusion = confusion_matrix(images.labels, predictions, len(self.class_names))
    if images.num_skipped:
      logging.warning("zero-shot %s: %d unreadable records left out.", self.name, images.num_skipped)
    return {**metrics, "num_examples": float(len(images.labels)), "num_skipped": float(images.num_skipped)}

  def __call__(self, model, variables, mesh) -> dict[str, float]:
    metrics = self.evaluate(model, variables, mesh)
    if self.confusion_png and jax.process_index() == 0:
      self.save_confusion_png(self.confusion_png)
    return {f"zeroshot/{self.name}/{k}": v for k, v in metrics.items() if not k.startswith("num_")}

  def save_confusion_png(self, path: str) -> str:
    assert self.last_confusion is not None, "call the evaluator first"
    accuracy = 100.0 * np.trace(self.last_confusion) / max(self.last_confusion.sum(), 1)
    return confusion_matrix_png(self.last_confusion, self.class_names, path,
                                f"zero-shot {self.name} ({self.split}): top-1 {accuracy:.1f}%")


def split_name(spec: str) -> tuple[str, str | None]:
  """'NAME=DATA' -> (NAME, DATA); any other spec -> (spec, None). A NAME holds no '/', so a path with
  '=' in it stays a path; so does a relative one whose '=' comes before its first '/', like
  'year=2024/x.tar', when that whole path exists and the part after '=' does not. The one rule of the
  trainer's zero-shot hook (`named_source`) and of `clip_jax.evaluate --tasks KIND:NAME=DATA`."""
  spec = spec.strip()
  name, sep, data = spec.partition("=")
  if sep and name.strip() and "/" not in name and os.sep not in name:
    if not data.strip():
      return name.strip(), None  # 'cifar10=': the name alone
    if not (_names_files(spec) and not _names_files(data.strip())):
      return name.strip(), data.strip()
  return spec, None


def named_source(spec: str) -> tuple[str, str]:
  """A zero-shot source as `clip_jax.evaluate --tasks zeroshot:NAME=DATA` takes it -> (name, data spec).
  NAME=DATA keeps the user's name (`split_name`'s rule); a known dataset is named as the paper tables
  name it ('digits', 'cifar10'); any other spec by `data_name`. The name goes into metric keys
  (zeroshot/NAME/top1) and file names (plots/confusion_NAME.png)."""
  name, data = split_name(spec)
  if data is not None:
    return name, data
  info = find_dataset(name)
  return (info.name if info else data_name(name)), name


def _names_files(spec: str) -> bool:
  """Whether a data spec names something on disk: a path, or a glob / {a..b} range / {split} pattern
  that matches at least one."""
  import glob
  from clip_jax.data.prepare import expand_braces
  pattern = expand_braces(spec.replace("{split}", "*"))[0]
  return os.path.exists(pattern) or bool(glob.glob(pattern))


def data_name(spec: str) -> str:
  """A short name for a data spec that a metric key and a file name can hold: the last path component
  with something left once its patterns ('{split}', '{00000..00003}', '*', '?', '[...]') and (last
  component only) its extension are removed; characters other than letters, digits, '.', '_' and '-'
  made '_'; 'tfds:NAME/CONFIG' -> 'NAME_CONFIG'. E.g. '/data/shapes/{split}' -> 'shapes',
  'wds/{0..3}.tar' -> 'wds', 'eval/pets_{split}.csv' -> 'pets' (not 'eval': two such tables in one
  folder keep their own names), 'pets.csv' -> 'pets'."""
  def clean(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
  if spec.startswith("tfds:"):
    return clean(spec[len("tfds:"):]) or "data"
  parts = [p for p in os.path.normpath(spec).replace(os.sep, "/").split("/") if p and p not in (".", "..")]
  for i in range(len(parts) - 1, -1, -1):
    part = os.path.splitext(parts[i])[0] if i == len(parts) - 1 else parts[i]
    name = clean(re.sub(r"\{[^}]*\}|[*?]|\[[^\]]*\]", "", part))
    if name:
      return name
  return "data"


def check_not_two_datasets(name: str, data: str, name_info: DatasetInfo | None, data_info: DatasetInfo | None) -> None:
  """Raises ValueError for NAME=DATA naming two different known datasets (cifar10=cifar100: the first's
  class names on the second's labels, found only at the first evaluation otherwise)."""
  if name_info is not None and data_info is not None and name_info.name != data_info.name:
    raise ValueError(f"{name}={data} names two known datasets ({name_info.name} and {data_info.name}); give one, "
                     f"or another NAME for {data_info.name} (e.g. my{data_info.name}={data}).")


@dataclasses.dataclass(frozen=True)
class ZeroShotSource:
  """One entry of `zeroshot_eval.source`, parsed (`zeroshot_sources`)."""
  name: str                    # in metric keys and file names: zeroshot/NAME/top1, plots/confusion_NAME.png
  data: str                    # the data spec the source opens ('cifar10', '/data/mine/{split}', ...)
  dataset: DatasetInfo | None  # the known dataset whose class names, prompts and split it takes, if any
  own_data: bool               # the user's own data: anything but a known dataset under its own name
  split: str                   # the split it reads (into DATA's '{split}', or a TFDS split)


def zeroshot_sources(zeroshot_eval) -> list[ZeroShotSource]:
  """`cfg.zeroshot_eval`'s sources (its 'source': comma-separated specs or a list, default 'digits';
  its 'split'), parsed once for the trainer's hook, its start line and its closing `clip_jax.evaluate`
  hint. Each spec is a data spec or NAME=DATA, named by `named_source`. Empty specs are left out.

  dataset: for NAME=DATA the NAME's dataset (cifar10=/my/cifar10 takes cifar10's names, prompts and
  split), else the data's own ('cifar10', 'tfds:cifar10', mycifar=cifar10); None for other data.
  own_data: False only for a known dataset under its own name ('cifar10', 'cifar10=', tfds:cifar10),
  which `clip_jax.evaluate --tasks zeroshot:NAME` reads as it is.
  split: 'split' when the config sets one (it then applies to every source); else a known dataset's
  zero-shot split (`clip_jax.evaluate --list-datasets`' test=, 'validation' for ImageNet), 'test' for
  other data: what `clip_jax.evaluate` reads for the same source. Reads no data (`split_name` may ask
  whether a path exists)."""
  zeroshot_eval = zeroshot_eval or {}
  sources = zeroshot_eval.get("source", "digits")
  configured_split = zeroshot_eval.get("split", None)
  parsed = []
  for spec in (sources.split(",") if isinstance(sources, str) else list(sources)):
    if not spec.strip():
      continue
    name, data = named_source(spec)
    data_info = find_dataset(data)
    name_info = find_dataset(name) if data != spec.strip() else None  # NAME=DATA: named_source split it
    check_not_two_datasets(name, data, name_info, data_info)
    dataset = name_info or data_info
    parsed.append(ZeroShotSource(
        name=name, data=data, dataset=dataset, own_data=not (data_info is not None and data_info.name == name),
        split=configured_split or (dataset.test_split if dataset else "test")))
  return parsed


def evaluate_tasks(cfg) -> list[str]:
  """`clip_jax.evaluate --tasks` entries for the config's zero-shot sources (`cfg.zeroshot_eval`, when
  enabled): zeroshot:NAME for a known dataset (and linear_probe:NAME where it has a training split),
  zeroshot:NAME=DATA for the user's own (and linear_probe:NAME=DATA where DATA holds '{split}' or is a
  known dataset with a training split);
  [] when none is configured."""
  ev = cfg.get("zeroshot_eval", None)
  if not ev or not ev.get("enabled", False):
    return []
  zeroshot, probes = [], []
  for source in zeroshot_sources(ev):
    if not source.own_data:
      zeroshot.append(f"zeroshot:{source.name}")
      if source.dataset.train_split is not None:
        probes.append(f"linear_probe:{source.name}")
    else:
      zeroshot.append(f"zeroshot:{source.name}={source.data}")
      known_data = find_dataset(source.data)  # mycifar=cifar10: a known dataset under one's own name
      if "{split}" in source.data or (known_data is not None and known_data.train_split is not None):
        probes.append(f"linear_probe:{source.name}={source.data}")
  return zeroshot + probes


def build_training_evaluators(cfg, workdir: str | None = None) -> list[ZeroShotEvaluator]:
  """The trainer's hook: evaluators from `cfg.zeroshot_eval` (source, comma-separated specs
  allowed, each a data spec or NAME=DATA as `clip_jax.evaluate --tasks zeroshot:NAME=DATA` takes;
  split, batch_size, and optionally class_names, templates, limit), sized for the config's model and
  tokenizer. Each source reads the split `zeroshot_sources` gives it: the config's 'split' when set,
  else what `clip_jax.evaluate` reads (a known dataset's zero-shot split, 'test' for other data).
  Metrics are zeroshot/NAME/...; with a workdir, each keeps WORKDIR/plots/confusion_NAME.png up to
  date (NAME: `named_source`). Raises ValueError for a path that is not there (cli.MissingPathError),
  data without class names, or class folders that do not fit the class names given."""
  from clip_jax.models.configs import get_config
  from clip_jax.tokenizer import get_tokenizer
  ev = cfg.zeroshot_eval
  overrides = cfg.model.get("overrides", None) or {}
  overrides = overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides)
  model_config = get_config(cfg.model.name)
  vision_overrides, text_overrides = overrides.get("vision", {}), overrides.get("text", {})
  image_size = vision_overrides.get("image_size", model_config.vision.image_size)
  context_length = text_overrides.get("context_length", model_config.text.context_length)
  from clip_jax.pretrained import training_tokenizer
  tokenizer = get_tokenizer(training_tokenizer(cfg)[0], context_length=context_length)  # training's
  evaluators = []
  for source in zeroshot_sources(ev):
    # A known dataset's class names and prompts, also for NAME=DATA with a known NAME (cifar10=/data/cifar10/
    # {split}), as `clip_jax.evaluate --tasks zeroshot:cifar10=...` reads it, unless the config gives its own.
    known = source.dataset
    class_names = ev.get("class_names", None) or (known.class_names if known else None)
    try:
      evaluator = ZeroShotEvaluator(
          source.data, tokenizer, class_names, ev.get("templates", None) or (known.templates if known else None),
          batch_size=ev.get("batch_size", 256), image_size=image_size, split=source.split,
          data_dir=cfg.data.get("data_dir", None), limit=ev.get("limit", None), name=source.name)
    except ValueError as e:
      if known and source.own_data and not ev.get("class_names", None) and "class names" in str(e):
        # a names mismatch of one's own data under a known NAME, not a path mistake
        raise ValueError(f"{e} ({source.name!r} names a known dataset, so its {len(known.class_names)} class "
                         "names were used: give your own data another NAME.)") from e
      raise
    if workdir:
      evaluator.confusion_png = os.path.join(workdir, "plots", f"confusion_{evaluator.name}.png")
    evaluators.append(evaluator)
  return evaluators
