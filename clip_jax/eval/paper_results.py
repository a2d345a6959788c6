"""The CLIP paper's numbers, as data, each with the table it comes from.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision"
(arXiv:2103.00020). Only numbers checked against the paper are here; a dataset or model the paper
does not report, or whose number was not verified, is simply absent and its cell stays blank.
All numbers are percentages, in the metric the paper uses for that dataset.
"""
from __future__ import annotations

import dataclasses
import re

PAPER = "Radford et al. 2021 (arXiv:2103.00020)"

# The paper's model names, in the order of its tables.
PAPER_MODELS = ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32", "ViT-B/16", "ViT-L/14",
                "ViT-L/14@336px")


@dataclasses.dataclass(frozen=True)
class PaperNumber:
  value: float
  source: str       # e.g. 'Table 11'
  model: str        # the paper's model name


# Table 11: zero-shot top-1 of every CLIP model, with the dataset's prompt ensemble.
_ZEROSHOT_TABLE11_DATASETS = ("food101", "cifar10", "cifar100", "stl10", "imagenet")
_ZEROSHOT_TABLE11 = {
    "RN50": (81.1, 75.6, 41.6, 94.3, 59.6),
    "RN101": (83.9, 81.0, 49.0, 96.7, 62.2),
    "RN50x4": (86.8, 79.2, 48.9, 96.4, 65.8),
    "RN50x16": (90.5, 82.2, 54.2, 97.8, 70.5),
    "RN50x64": (91.8, 86.8, 61.3, 98.3, 73.6),
    "ViT-B/32": (84.4, 91.3, 65.1, 97.2, 63.2),
    "ViT-B/16": (89.2, 91.6, 68.7, 98.2, 68.6),
    "ViT-L/14": (92.9, 96.2, 77.9, 99.3, 75.3),
    "ViT-L/14@336px": (93.8, 95.7, 77.5, 99.4, 76.2),
}

# Table 10: linear-probe accuracy, ViT-L/14@336px.
_LINEAR_PROBE_TABLE10 = {
    "ViT-L/14@336px": {"food101": 95.9, "cifar10": 97.9, "cifar100": 87.4, "sun397": 82.2,
                       "cars196": 91.5, "imagenet": 85.4},
}

# Table 13: zero-shot retrieval of the paper's best model ("text retrieval" = image->text).
_RETRIEVAL_TABLE13 = {
    "ViT-L/14@336px": {
        "flickr30k": {"image_to_text/R@1": 88.0, "image_to_text/R@5": 98.7, "image_to_text/R@10": 99.4,
                      "text_to_image/R@1": 68.7, "text_to_image/R@5": 90.6, "text_to_image/R@10": 95.2},
        "coco_captions": {"image_to_text/R@1": 58.4, "image_to_text/R@5": 81.5, "image_to_text/R@10": 88.1,
                          "text_to_image/R@1": 37.8, "text_to_image/R@5": 62.4, "text_to_image/R@10": 72.2},
    },
}


def _build() -> dict[tuple[str, str, str, str], PaperNumber]:
  table: dict[tuple[str, str, str, str], PaperNumber] = {}
  for model, values in _ZEROSHOT_TABLE11.items():
    for dataset, value in zip(_ZEROSHOT_TABLE11_DATASETS, values):
      table[("zeroshot", model, dataset, "top1")] = PaperNumber(value, "Table 11", model)
  # Sec. 3.1.3: the best model's ImageNet top-5 "is 95%, matching Inception-V4".
  table[("zeroshot", "ViT-L/14@336px", "imagenet", "top5")] = PaperNumber(95.0, "Sec. 3.1.3", "ViT-L/14@336px")
  for model, per_dataset in _LINEAR_PROBE_TABLE10.items():
    for dataset, value in per_dataset.items():
      table[("linear_probe", model, dataset, "top1")] = PaperNumber(value, "Table 10", model)
  for model, per_dataset in _RETRIEVAL_TABLE13.items():
    for dataset, metrics in per_dataset.items():
      for metric, value in metrics.items():
        table[("retrieval", model, dataset, metric)] = PaperNumber(value, "Table 13", model)
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
