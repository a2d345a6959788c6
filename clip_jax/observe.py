"""What a person watches during and after a run: metrics (JSONL + TensorBoard), a progress bar
with steps/s and ETA, loss-curve plots, results files written whole with the settings that made
them, and labelled image grids. Shared by the CLIP and DreamBooth trainers and evaluations."""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np


class MetricWriter:
  """Appends `{"step": s, **metrics}` lines to `metrics.jsonl` and scalars to TensorBoard event
  files under `tb/` (written with tensorboard's own protos: no TensorFlow needed).

  resume_step: the step the run (re)starts from. Records of later steps, left by an attempt whose
  checkpoint never came, are dropped first (`drop_metrics_after`), and the new event file starts
  with TensorBoard's restart marker (SessionLog START at resume_step + 1: a TensorBoard already
  showing the old events purges them), so every curve is one line."""

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None):
    self.enabled = enabled
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self._events = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      dropped = drop_metrics_after(workdir, resume_step) if resume_step is not None else 0
      from tensorboard.compat.proto import event_pb2
      from tensorboard.summary.writer.event_file_writer import EventFileWriter
      self._events = EventFileWriter(os.path.join(workdir, "tb"))
      if resume_step is not None and (resume_step > 0 or dropped):
        self._events.add_event(event_pb2.Event(wall_time=time.time(), step=int(resume_step) + 1,
                                               session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
        self._events.flush()

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


def drop_metrics_after(workdir: str, step: int) -> int:
  """Removes the metric records of steps after `step` from WORKDIR/metrics.jsonl and from every
  TensorBoard event file in WORKDIR/tb (a line or record cut short by a kill goes too); a file
  that changes is rewritten whole (`write_atomic`), the others are left as they are. Returns the
  number of records dropped. For a resume from the checkpoint of `step`: what came after it was
  computed by an attempt that is being redone."""
  dropped = 0
  jsonl_path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(jsonl_path):
    with open(jsonl_path) as f:
      lines = f.read().splitlines(keepends=True)
    kept = [line for line in lines if _metric_step(line) is not None and _metric_step(line) <= step]
    if len(kept) != len(lines) or (kept and not kept[-1].endswith("\n")):
      dropped += len(lines) - len(kept)
      write_atomic(jsonl_path, "".join(line if line.endswith("\n") else line + "\n" for line in kept))
  tb_dir = os.path.join(workdir, "tb")
  for name in sorted(os.listdir(tb_dir)) if os.path.isdir(tb_dir) else []:
    if ".tfevents." in name:
      dropped += _drop_events_after(os.path.join(tb_dir, name), step)
  return dropped


def _metric_step(line: str) -> int | None:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None  # blank, or cut short by a kill


def _drop_events_after(path: str, step: int) -> int:
  import io

  from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
  from tensorboard.compat.proto import event_pb2
  from tensorboard.summary.writer.record_writer import RecordWriter
  records = list(RawEventFileLoader(path).Load())  # stops at a record cut short
  kept = [r for r in records if event_pb2.Event.FromString(r).step <= step]
  buffer = io.BytesIO()
  writer = RecordWriter(buffer)
  for record in kept:
    writer.write(record)
  if buffer.getvalue() == open(path, "rb").read():
    return 0
  write_atomic(path, buffer.getvalue())
  return len(records) - len(kept)


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


# ----------------------------------------------------------------------------- results files
def write_atomic(path: str, content: str | bytes) -> str:
  """Writes `content` to `path` whole: a temporary file in the same folder, flushed to disk, then
  renamed over `path` (os.replace is atomic on POSIX), so a reader or a kill never sees half a file
  and an old file is replaced only by a complete new one. Returns `path`."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(content.encode("utf-8") if isinstance(content, str) else content)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are for everyone who reads the folder
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


# Distributions whose versions can change a number in a results file.
VERSIONED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml_dtypes", "grain",
                      "pillow", "scikit-learn")


def package_versions() -> dict[str, str]:
  """{'python': '3.11.9', 'jax': '0.10.2', ..., 'git': COMMIT[+dirty]}: what made a results file.
  Packages that are not installed are left out; 'git' only inside a checkout with git."""
  from importlib import metadata
  versions = {"python": sys.version.split()[0]}
  for name in VERSIONED_PACKAGES:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  commit = _git_commit(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if commit:
    versions["git"] = commit
  return versions


def _git_commit(folder: str) -> str | None:
  import subprocess
  if not os.path.exists(os.path.join(folder, ".git")):
    return None
  try:
    commit = subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True, text=True,
                            timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "-C", folder, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return (commit + ("+dirty" if dirty else "")) or None


# Settings that do not change a result: two results files that differ only here may be merged.
VOLATILE_SETTINGS = ("versions", "devices", "processes", "platform", "mesh", "batch_size", "seconds", "written")


def merge_kept(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
  """`new` over `old`, recursively for nested dicts: every key only `old` has is kept, so a
  results file rewritten with fewer numbers (a re-run that evaluated less) never loses the rest."""
  merged = dict(old)
  for key, value in new.items():
    merged[key] = (merge_kept(old[key], value) if isinstance(value, Mapping) and isinstance(old.get(key), Mapping)
                   else value)
  return merged


def settings_changes(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None,
                     ignore: Sequence[str] = VOLATILE_SETTINGS, added: Mapping[str, Any] | None = None) -> list[str]:
  """The keys (sorted) whose values differ between two settings records, volatile ones aside.
  added: settings recorded only since some version, with the value every older record had implicitly:
  an old record without one counts as holding that value."""
  old, new = {**(added or {}), **(old or {})}, {**(added or {}), **(new or {})}
  return sorted(k for k in set(old) | set(new) if k not in ignore and old.get(k) != new.get(k))


def _set_aside(paths: Sequence[str]) -> list[str]:
  """Renames existing `results.json` / `results.md` to the first free `results.N.*` (same N for all)."""
  n = 1
  while any(os.path.exists(_numbered(p, n)) for p in paths):
    n += 1
  moved = []
  for path in paths:
    if os.path.exists(path):
      os.replace(path, _numbered(path, n))
      moved.append(_numbered(path, n))
  return moved


def _numbered(path: str, n: int) -> str:
  stem, ext = os.path.splitext(path)
  return f"{stem}.{n}{ext}"


def save_results(json_path: str, data: Mapping[str, Any], render_markdown: Callable[[dict], str] | None = None,
                 merge: Callable[[dict, dict], dict] = merge_kept, settings_key: str = "settings",
                 log: Callable[[str], None] = print, added_settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The one writer of results files: `json_path` (and its `.md` beside it, rendered from what is
  written) are only ever written whole (`write_atomic`) and never with less than they held:
  - an existing file made with the same `data[settings_key]` (volatile keys such as versions aside)
    is merged with the new results (`merge(old, new)`, by default `merge_kept`: new values win, keys
    only the old file has stay);
  - one made with other settings, or unreadable, is first moved aside to `results.N.json` / `.md`,
    with one line naming the settings that changed;
  - `added_settings`: settings recorded only since some version, with the value older files held
    implicitly (`settings_changes(added=)`), so that those files still merge.
  Returns what was written. Floats that JSON cannot hold go through `float` (numpy scalars)."""
  data = dict(data)
  md_path = os.path.splitext(json_path)[0] + ".md"
  old = None
  if os.path.exists(json_path):
    try:
      with open(json_path) as f:
        old = json.load(f)
    except (OSError, ValueError):
      old = "unreadable"
  if old is not None:
    changed = (["(unreadable)"] if not isinstance(old, dict) else
               settings_changes(old.get(settings_key), data.get(settings_key), added=added_settings))
    if changed:
      moved = _set_aside([json_path, md_path])
      log(f"{json_path} held results made with other settings ({', '.join(changed[:8])} differ): kept as "
          f"{', '.join(os.path.basename(m) for m in moved)}.")
    else:
      data = merge(old, data)
  write_atomic(json_path, json.dumps(data, indent=2, default=float) + "\n")
  if render_markdown is not None:
    write_atomic(md_path, render_markdown(data))
  return data


def run_layout() -> dict[str, Any]:
  """Where a run ran: {'devices': all processes' devices, 'processes', 'platform' ('cpu', 'gpu', 'tpu')},
  for results files (a 1 x 8 run and a 2 x 4 one are otherwise told apart only by their config.json).
  Volatile settings: a resume on another layout does not set earlier results aside."""
  import jax
  return {"devices": jax.device_count(), "processes": jax.process_count(), "platform": jax.devices()[0].platform}


def write_results(workdir: str, step: int, metrics: Mapping[str, float],
                  evaluation: Mapping[str, float], settings: Mapping[str, Any] | None = None) -> tuple[str, str]:
  """results.json (what sweeps and `launch.results` gather: 'step', 'train/<metric>' and the
  evaluation keys; 'settings' with the package versions and `run_layout`) and results.md, a table of the same;
  written whole through `save_results`, so numbers an earlier write held are kept. Returns the paths."""
  summary = {"step": step, **{f"train/{k}": v for k, v in metrics.items()}, **evaluation,
             "settings": {**dict(settings or {}), "versions": package_versions(), **run_layout()}}
  json_path = os.path.join(workdir, "results.json")
  save_results(json_path, summary, _training_markdown)
  return json_path, os.path.join(workdir, "results.md")


def _training_markdown(summary: Mapping[str, Any]) -> str:
  rows = [("final training loss", summary.get("train/loss")), ("steps", summary.get("step"))]
  rows += [(k, v) for k, v in summary.items() if k not in ("step", "settings") and not k.startswith("train/")]
  lines = ["| metric | value |", "| --- | --- |"]
  lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in rows if v is not None]
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- image grids
def _as_uint8(images: np.ndarray) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8:  # floats in [0, 1]
    images = np.round(np.clip(images.astype(np.float32), 0.0, 1.0) * 255).astype(np.uint8)
  if images.ndim == 3:  # one grey image -> RGB
    images = images[None]
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  return images


def _font(size: int):
  from PIL import ImageFont
  try:
    return ImageFont.load_default(size=size)  # DejaVu Sans with FreeType (Pillow >= 10.1)
  except (TypeError, ValueError, OSError, ImportError):
    return ImageFont.load_default()           # the fixed bitmap font


def _wrap(text: str, font, width: int) -> list[str]:
  """Greedy word wrap of `text` into lines no wider than `width` pixels (a long word stays whole)."""
  lines: list[str] = []
  for paragraph in text.split("\n"):
    line = ""
    for word in paragraph.split(" "):
      trial = f"{line} {word}" if line else word
      if line and font.getlength(trial) > width:
        lines.append(line)
        line = word
      else:
        line = trial
    lines.append(line)
  return lines


def image_grid(rows: Sequence[np.ndarray] | np.ndarray, labels: Sequence[str] | None = None, *,
               columns: int | None = None, title: str | None = None, min_cell: int = 256,
               gap: int = 4, font_size: int = 16) -> np.ndarray:
  """The project's one picture grid (samples, validation strips, sample sheets, evaluation grids).

  rows: one array per row, [k, h, w, 3] (uint8, or float in [0, 1]), e.g. one row per prompt; or
  one [N, h, w, 3] array cut into rows of `columns` (default: all in one row). labels: one text
  per row, written above it (wrapped to the grid's width); title: a line above everything. Images
  smaller than `min_cell` pixels are enlarged by the integer factor ceil(min_cell / max(h, w)) with
  nearest-neighbour sampling, so a 32-px model's pixels are seen as pixels. A row shorter than the
  longest ends early (white), no blank cells inside rows.
  Returns uint8 [H, W, 3] on white. ValueError: images of different sizes, a label count that is
  not the row count, or no images.
  """
  from PIL import Image, ImageDraw
  if isinstance(rows, np.ndarray) or (len(rows) and np.ndim(rows[0]) == 3):  # one flat set of images
    images = _as_uint8(np.stack(list(rows)))
    columns = columns or len(images)
    rows = [images[i:i + columns] for i in range(0, len(images), columns)]
  rows = [_as_uint8(row) for row in rows]
  if not rows or not any(len(r) for r in rows):
    raise ValueError("image_grid got no images.")
  sizes = {row.shape[1:3] for row in rows if len(row)}
  if len(sizes) != 1:
    raise ValueError(f"image_grid needs images of one size; got {sorted(sizes)}.")
  if labels is not None and len(labels) != len(rows):
    raise ValueError(f"image_grid got {len(labels)} labels for {len(rows)} rows; give one per row.")
  h, w = sizes.pop()
  scale = max(1, -(-min_cell // max(h, w)))
  cell_h, cell_w = h * scale, w * scale
  width = max(len(r) for r in rows) * (cell_w + gap) + gap
  font = _font(font_size)
  line_height = font_size + 4
  text_of = lambda text: _wrap(text, font, width - 2 * gap) if text else []  # noqa: E731
  title_lines = text_of(title)
  label_lines = [text_of(label) for label in labels] if labels is not None else [[] for _ in rows]
  height = gap + len(title_lines) * line_height + sum(
      len(lines) * line_height + cell_h + gap for lines in label_lines)
  canvas = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(canvas)
  y = gap
  for line in title_lines:
    draw.text((gap, y), line, fill="black", font=font)
    y += line_height
  for row, lines in zip(rows, label_lines):
    for line in lines:
      draw.text((gap, y), line, fill=(40, 40, 40), font=font)
      y += line_height
    for i, image in enumerate(row):
      big = np.repeat(np.repeat(image, scale, 0), scale, 1) if scale > 1 else image
      canvas.paste(Image.fromarray(big), (gap + i * (cell_w + gap), y))
    y += cell_h + gap
  return np.asarray(canvas)


def save_image_grid(images: Sequence[np.ndarray] | np.ndarray, path: str, columns: int | None = None,
                    labels: Sequence[str] | None = None, title: str | None = None, min_cell: int = 256) -> str:
  """`image_grid(images, labels, columns=, title=, min_cell=)` written whole to the PNG `path`; returns it."""
  import io

  from PIL import Image
  buffer = io.BytesIO()
  Image.fromarray(image_grid(images, labels, columns=columns, title=title, min_cell=min_cell)).save(buffer, "PNG")
  return write_atomic(path, buffer.getvalue())
