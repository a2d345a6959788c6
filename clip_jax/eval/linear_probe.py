"""Linear probes on frozen image features, the paper's protocol (Appendix A.3): scikit-learn's
L-BFGS logistic regression; the regularisation strength chosen on a validation split (stratified by
class, so every class is scored) by a parametric binary search (start at C = 1e-6, 1e-4, ..., 1e6,
then halve the step around the best value until it reaches 8 steps per decade); the final model
fit on train + validation and scored on the test split.

Features: for ViTs the pooled output before the projection to the embedding space (the paper's
I_f), for ResNets the attention pool's output.
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from absl import logging

from clip_jax.eval import embed
from clip_jax.eval.zeroshot import mean_per_class_accuracy, percent

START_LOG10_C = (-6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0)
FINEST_STEP = 1.0 / 8   # 8 steps per decade: the paper's 96 log-spaced values over [1e-6, 1e6]


@dataclasses.dataclass
class ProbeResult:
  top1: float                      # test accuracy, percent
  mean_per_class: float            # test mean per-class accuracy, percent
  best_c: float
  sweep: dict[float, float]        # C -> validation score (percent), every C tried
  too_small_to_split: tuple[int, ...] = ()  # classes with one training row: fitted on, not validated
  num_skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # split -> unreadable records
  skipped: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # split -> {reason: n}
  converted: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # split -> {'mode_RGBA': n}

  def metrics(self) -> dict[str, float]:
    return {"top1": self.top1, "mean_per_class": self.mean_per_class, "C": self.best_c}

  def skipped_count(self, split: str) -> int:
    return self.num_skipped.get(split, 0)


def _score(labels: np.ndarray, predictions: np.ndarray, metric: str) -> float:
  if metric == "mean_per_class":
    return mean_per_class_accuracy(labels, predictions)
  return percent(predictions == labels)


# Below this many multiply-adds per L-BFGS step, BLAS runs on one thread: for small fits its
# threads cost more than they give, and on a busy host they spin against JAX's (~100x slower).
SINGLE_THREAD_MACS = 2e9


def _fit(features, labels, c: float, max_iter: int):
  from sklearn.linear_model import LogisticRegression  # Imported lazily: only probes need sklearn.
  from threadpoolctl import threadpool_limits
  macs = features.shape[0] * features.shape[1] * max(len(np.unique(labels)), 2)
  with warnings.catch_warnings(), threadpool_limits(1 if macs < SINGLE_THREAD_MACS else None, "blas"):
    # Very weak regularisation may stop at max_iter; the sweep then simply scores it lower.
    warnings.simplefilter("ignore")
    return LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter).fit(features, labels)


def split_train_val(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
  """Seeded split of the rows of int `labels` [n] into (train rows, validation rows, classes too small
  to split), stratified by class.

  Each class keeps its share: round(val_fraction * n_c) of its rows go to validation, at least one
  and never all of them, so the C search is scored on every class it is fitted on (a plain
  permutation can leave a rare class out of either side; scikit-learn then fails with "needs
  samples of at least 2 classes", or C is chosen on a split missing a class). A class with a
  single row cannot be split: its row stays in the training part and the class is returned in the
  third list, to be reported. Raises ValueError for val_fraction outside (0, 1) or when no class
  has two rows (then nothing can be validated).
  """
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  train_rows, val_rows, too_small = [], [], []
  for c in np.unique(labels):  # sorted, so the split depends only on (labels, seed)
    rows = rng.permutation(np.flatnonzero(labels == c))
    if len(rows) < 2:
      too_small.append(int(c))
      train_rows.append(rows)
      continue
    num_val = min(max(1, int(round(val_fraction * len(rows)))), len(rows) - 1)
    val_rows.append(rows[:num_val])
    train_rows.append(rows[num_val:])
  if not val_rows:
    raise ValueError(f"{len(labels)} training examples with no class of two or more rows: too few to carve out "
                     "a validation split for the linear probe's C search.")
  return np.sort(np.concatenate(train_rows)), np.sort(np.concatenate(val_rows)), too_small


def search_c(train_x, train_y, val_x, val_y, *, metric: str = "top1", max_iter: int = 1000) -> dict[float, float]:
  """The parametric binary search over log10 C; returns every C tried with its validation score."""
  scores: dict[float, float] = {}

  def score(log_c: float) -> float:
    log_c = round(log_c, 6)
    if log_c not in scores:
      model = _fit(train_x, train_y, 10.0 ** log_c, max_iter)
      scores[log_c] = _score(val_y, model.predict(val_x), metric)
    return scores[log_c]

  for log_c in START_LOG10_C:
    score(log_c)
  step = START_LOG10_C[1] - START_LOG10_C[0]
  while step > FINEST_STEP:
    step /= 2
    best = best_log_c(scores)
    for log_c in (best - step, best + step):
      if START_LOG10_C[0] <= log_c <= START_LOG10_C[-1]:
        score(log_c)
  return {10.0 ** log_c: s for log_c, s in sorted(scores.items())}


def best_log_c(scores: dict[float, float]) -> float:
  """The best-scoring log10 C; among equal scores the middle one. A plateau of equal validation
  scores is common on easy data, and its edges are where the fit is least stable: at the small-C
  end the weights are nearly zero, at the large-C end the fit is barely regularised."""
  top = max(scores.values())
  tied = sorted(c for c, s in scores.items() if s == top)
  return tied[(len(tied) - 1) // 2]


def fit_linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                     val_fraction: float = 0.2, seed: int = 0, metric: str = "top1",
                     max_iter: int = 1000) -> ProbeResult:
  """Sweep C on a stratified validation split carved from train, refit on all of train, score on
  test. Raises ValueError when the training labels hold fewer than two classes (nothing to tell
  apart) or no class with two rows (nothing to validate on); classes with a single row are kept
  for fitting and listed in the result's `too_small_to_split`."""
  if len(np.unique(train_y)) < 2:
    raise ValueError(f"the linear probe's training split holds {len(np.unique(train_y))} class(es); it needs "
                     "at least 2.")
  fit_rows, val_rows, too_small = split_train_val(train_y, val_fraction, seed)
  if too_small:
    logging.warning("linear probe: %d class(es) have a single training example, too few to split; they are "
                    "fitted on but not validated: %s", len(too_small), too_small[:20])
  sweep = search_c(train_x[fit_rows], train_y[fit_rows], train_x[val_rows], train_y[val_rows],
                   metric=metric, max_iter=max_iter)
  c_of_log = {float(np.log10(c)): c for c in sweep}
  best_c = c_of_log[best_log_c({log_c: sweep[c] for log_c, c in c_of_log.items()})]
  model = _fit(train_x, train_y, best_c, max_iter)
  predictions = model.predict(test_x)
  return ProbeResult(_score(test_y, predictions, "top1"), mean_per_class_accuracy(test_y, predictions),
                     best_c, sweep, tuple(too_small))


def labels_in_train_classes(test_labels: np.ndarray, test_names, train_names) -> np.ndarray:
  """The test split's labels [n] as indices of the training split's classes, matched by class name.

  Each split of a folder tree (or table, or tar shards) numbers its own classes, so a class folder
  missing from one split, or an extra empty one, shifts every label after it. Splits without class
  names, or with the same names in the same order, are returned as they are. Raises ValueError
  naming the test classes that hold images but have no training class (the probe cannot predict them).
  """
  if test_names is None or train_names is None or list(test_names) == list(train_names):
    return test_labels
  train_index = {name: i for i, name in enumerate(train_names)}
  present = np.unique(test_labels[test_labels >= 0])
  unknown = [f"{test_names[i]!r} ({int(np.sum(test_labels == i))} images)" for i in present
             if test_names[i] not in train_index]
  if unknown:
    raise ValueError(f"linear probe: test classes with no training class: {', '.join(unknown[:5])}; the training "
                     f"split's classes are {list(train_names)[:10]}{' ...' if len(train_names) > 10 else ''}.")
  logging.warning("linear probe: the test split's %d classes differ from the training split's %d; its labels are "
                  "matched to the training classes by name.", len(test_names), len(train_names))
  mapping = np.array([train_index.get(name, -1) for name in test_names], np.int64)
  return np.where(test_labels >= 0, mapping[np.maximum(test_labels, 0)], test_labels)


def evaluate_linear_probe(model, variables, train_source, test_source, *, batch_size: int, image_size: int,
                          mesh, features: str = "pre_projection", val_fraction: float = 0.2, seed: int = 0,
                          metric: str = "top1", num_workers: int = 0, preprocessing=None) -> ProbeResult:
  """Frozen features of both splits (sharded image passes; `preprocessing`: the model's own, OpenAI's
  by default), then the probe on the host."""
  splits = {}
  for name, source in (("train", train_source), ("test", test_source)):
    batches = embed.image_batches(source, batch_size=batch_size, image_size=image_size, mesh=mesh,
                                  num_workers=num_workers, preprocessing=preprocessing)
    splits[name] = embed.embed_images(model, variables, batches, len(source), mesh, features=features)
    if splits[name].num_skipped:
      logging.warning("linear probe: %d unreadable %s records left out.", splits[name].num_skipped, name)
    if (splits[name].labels < 0).any():
      raise ValueError(f"the {name} data of the linear probe has unlabelled examples; it needs a class label.")
  train, test = splits["train"], splits["test"]
  test_labels = labels_in_train_classes(test.labels, getattr(test_source, "class_names", None),
                                        getattr(train_source, "class_names", None))
  result = fit_linear_probe(train.features, train.labels, test.features, test_labels, val_fraction=val_fraction,
                            seed=seed, metric=metric)
  return dataclasses.replace(result, num_skipped={k: v.num_skipped for k, v in splits.items()},
                             skipped={k: dict(v.skipped) for k, v in splits.items()},
                             converted={k: dict(v.converted) for k, v in splits.items()})
