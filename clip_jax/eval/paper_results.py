"""The CLIP paper's numbers, as data, each with the table it comes from.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision"
(arXiv:2103.00020). The numbers live in `clip_jax/assets/paper_numbers.csv` (with the DreamBooth
paper's, which dreambooth_jax reads through `paper_rows`), not in code: only numbers checked
against the papers are there; a dataset or model the paper does not report is absent and its cell
stays blank. CLIP numbers are percentages, in the metric the paper uses for that dataset (top-1,
mean per class, 11-point mAP, ROC AUC, ...); only those this project computes are matched.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import os
import re

PAPER = "Radford et al. 2021 (arXiv:2103.00020)"

# The paper's model names, in the order of its tables.
PAPER_MODELS = ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32", "ViT-B/16", "ViT-L/14",
                "ViT-L/14@336px")


PAPER_NUMBERS_CSV = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                                 "paper_numbers.csv")
# The metric prefixes of the CSV's CLIP rows -> this project's task names.
_TASK_PREFIXES = ("zeroshot", "linear_probe", "retrieval")


@dataclasses.dataclass(frozen=True)
class PaperNumber:
  value: float
  source: str       # e.g. 'Table 11'
  model: str        # the paper's model name


@dataclasses.dataclass(frozen=True)
class PaperRow:
  """One row of clip_jax/assets/paper_numbers.csv."""
  paper: str        # 'CLIP' or 'DreamBooth'
  table: str        # '11', or a section such as '3.1.3'
  dataset: str      # TFDS-style name ('dreambench' for DreamBooth's dataset)
  model: str        # the paper's name of the model or setting
  metric: str       # e.g. 'zeroshot_top1', 'linear_probe_mean_per_class', 'retrieval_image_to_text/R@1', 'clip_i'
  value: float
  note: str

  @property
  def source(self) -> str:
    return f"Sec. {self.table}" if "." in self.table else f"Table {self.table}"


@functools.lru_cache(maxsize=None)
def paper_rows(paper: str | None = None) -> tuple[PaperRow, ...]:
  """Every published number of the packaged CSV (of one paper when `paper` is given), in file order.

  The file (columns paper, table, dataset, model, metric, value, note) holds the numbers of the CLIP
  paper's Tables 1, 10, 11, 13, 14, 16 and section 3.1.3, and the DreamBooth paper's Tables 1, 3
  and 4, as checked against the papers (the project's shared reference, `paper_numbers.csv`).
  Raises ValueError when a row does not parse.
  """
  rows = []
  with open(PAPER_NUMBERS_CSV, newline="", encoding="utf-8") as f:
    for line, record in enumerate(csv.DictReader(f), start=2):
      try:
        row = PaperRow(record["paper"], record["table"], record["dataset"], record["model"], record["metric"],
                       float(record["value"]), record.get("note") or "")
      except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{PAPER_NUMBERS_CSV}:{line}: malformed row ({e}).") from e
      if paper is None or row.paper == paper:
        rows.append(row)
  return tuple(rows)


def _split_metric(metric: str) -> tuple[str, str] | None:
  """'zeroshot_top1' -> ('zeroshot', 'top1'); None for a metric of no task here."""
  for task in _TASK_PREFIXES:
    if metric.startswith(task + "_"):
      return task, metric[len(task) + 1:]
  return None


def _build() -> dict[tuple[str, str, str, str], PaperNumber]:
  """(task, paper model, dataset, metric) -> the number; where two tables print the same cell
  (e.g. ImageNet zero-shot in Tables 11 and 16), the first row of the file is cited."""
  table: dict[tuple[str, str, str, str], PaperNumber] = {}
  for row in paper_rows("CLIP"):
    split = _split_metric(row.metric)
    if split is not None:
      table.setdefault((split[0], row.model, row.dataset, split[1]), PaperNumber(row.value, row.source, row.model))
  return table


PAPER_RESULTS = _build()


def _canonical(name: str) -> str:
  name = re.sub(r"-quickgelu$", "", name.strip(), flags=re.IGNORECASE)
  return re.sub(r"[^a-z0-9]", "", name.lower().replace("px", ""))


_BY_CANONICAL = {_canonical(m): m for m in PAPER_MODELS}
# This project's (open_clip's) names: ViT-L-14-336 is the paper's ViT-L/14@336px.
_BY_CANONICAL[_canonical("ViT-L-14-336")] = "ViT-L/14@336px"


def paper_model(name: str | None) -> str | None:
  """A model name in this project's spelling ('ViT-B-32', 'RN50-quickgelu') or the paper's
  ('ViT-B/32', 'ViT-L/14@336px') -> the paper's row name, or None if the paper has no such model."""
  return _BY_CANONICAL.get(_canonical(name)) if name else None


def paper_number(task: str, model_name: str | None, dataset: str, metric: str) -> PaperNumber | None:
  model = paper_model(model_name)
  return PAPER_RESULTS.get((task, model, dataset, metric)) if model else None
