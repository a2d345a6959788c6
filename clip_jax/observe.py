"""What a person watches during and after a run: metrics (JSONL + TensorBoard), a progress bar
with steps/s and ETA, and loss-curve plots. Shared by the CLIP and DreamBooth trainers."""
from __future__ import annotations

import json
import os
import time
from typing import Mapping


class MetricWriter:
  """Appends `{"step": s, **metrics}` lines to `metrics.jsonl` and scalars to TensorBoard event
  files under `tb/` (written with tensorboard's own protos: no TensorFlow needed)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self._events = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboard.summary.writer.event_file_writer import EventFileWriter
      self._events = EventFileWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled or not metrics:
      return
    with open(self.jsonl_path, "a") as f:
      f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}}) + "\n")
    from tensorboard.compat.proto import event_pb2, summary_pb2
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                                         for k, v in metrics.items()])
    self._events.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
    self._events.flush()

  def close(self) -> None:
    if self._events is not None:
      self._events.close()
      self._events = None


def read_metrics(jsonl_path: str) -> list[dict]:
  """The metric lines of a run; after a resume a step may appear twice: the later line wins."""
  if not os.path.exists(jsonl_path):
    return []
  by_step: dict[tuple[int, tuple[str, ...]], dict] = {}
  with open(jsonl_path) as f:
    for line in f:
      line = line.strip()
      if line:
        record = json.loads(line)
        by_step[(record["step"], tuple(sorted(record)))] = record
  return sorted(by_step.values(), key=lambda r: r["step"])


class Progress:
  """A tqdm bar (steps/s and ETA) on the main process; silent elsewhere."""

  def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train"):
    self._bar = None
    if enabled:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                       mininterval=1.0)
    self._last = initial

  def update(self, step: int) -> None:
    if self._bar is not None:
      self._bar.update(step - self._last)
    self._last = step

  def set_postfix(self, **values: float) -> None:
    if self._bar is not None:
      self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def loss_curve_png(jsonl_path: str, out_path: str, keys: tuple[str, ...] = ("loss",),
                   eval_prefix: str = "zeroshot/") -> str | None:
  """Training loss (and any evaluation accuracy found) against step, as a PNG."""
  records = read_metrics(jsonl_path)
  train = [r for r in records if any(k in r for k in keys)]
  evals = sorted({k for r in records for k in r if k.startswith(eval_prefix)})
  if not train:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 4), squeeze=False)
  for key in keys:
    points = [(r["step"], r[key]) for r in train if key in r]
    ax[0, 0].plot(*zip(*points), label=key)
  ax[0, 0].set_xlabel("step")
  ax[0, 0].set_ylabel("loss")
  ax[0, 0].set_title("training loss")
  ax[0, 0].grid(alpha=0.3)
  ax[0, 0].legend()
  if evals:
    for key in evals:
      points = [(r["step"], r[key]) for r in records if key in r]
      ax[0, 1].plot(*zip(*points), marker="o", label=key[len(eval_prefix):])
    ax[0, 1].set_xlabel("step")
    ax[0, 1].set_ylabel("accuracy")
    ax[0, 1].set_title("zero-shot evaluation")
    ax[0, 1].grid(alpha=0.3)
    ax[0, 1].legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(out_path), exist_ok=True)
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
  return out_path


def write_results(workdir: str, step: int, metrics: Mapping[str, float],
                  evaluation: Mapping[str, float]) -> tuple[str, str]:
  """results.json (what sweeps and `launch.results` gather: 'step', 'train/<metric>' and the
  evaluation keys) and results.md, a table of the same; returns their paths."""
  summary = {"step": step, **{f"train/{k}": v for k, v in metrics.items()}, **evaluation}
  json_path, md_path = os.path.join(workdir, "results.json"), os.path.join(workdir, "results.md")
  with open(json_path, "w") as f:
    json.dump(summary, f, indent=2)
  rows = [("final training loss", metrics.get("loss")), ("steps", step)] + list(evaluation.items())
  with open(md_path, "w") as f:
    f.write("| metric | value |\n| --- | --- |\n")
    f.writelines(f"| {k} | {v:.4f} |\n" if isinstance(v, float) else f"| {k} | {v} |\n" for k, v in rows)
  return json_path, md_path
