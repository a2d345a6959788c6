r"""Gather the results of many runs into one ablation table (Markdown, CSV) and a plot (PNG).

    python -m launch.results workdirs/bs_sweep                    # a sweep root (or several)
    python -m launch.results workdirs/run_a workdirs/run_b --out=/tmp/compare

Each run's numbers come from its `results.json` (written by the trainer at the end) when it has
one, else from its `metrics.jsonl`: the final training loss and step, and the last value of every
evaluation metric ('zeroshot/...' and other 'group/name' keys that are not 'train/...').
A run's settings are its overrides from the sweep's `sweep.json` (or, without one, read
from its directory name 'key=value_key=value'). When runs differ only by seed, a second table
gives the mean and standard deviation over seeds; that is also what the plot shows.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from typing import Any

SEED_KEYS = ("seed",)
RUN_FILES = ("results.json", "metrics.jsonl")


def _read_jsonl(path: str) -> list[dict]:
  records = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill: the ones before it still count
          continue
  return records


def _is_reported(key: str) -> bool:
  """Final loss and evaluation results make the table; the other training scalars do not."""
  return key in ("step", "loss") or ("/" in key and not key.startswith("train/"))


def run_metrics(workdir: str) -> dict[str, float]:
  """{'step', 'loss', 'zeroshot/...': ...} of one run (empty if it has written nothing yet)."""
  results_path = os.path.join(workdir, "results.json")
  out: dict[str, float] = {}
  if os.path.exists(results_path):
    with open(results_path) as f:
      flat = json.load(f)
    if "train/loss" in flat:
      flat["loss"] = flat["train/loss"]
    return {k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and _is_reported(k)}
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(metrics_path):
    return out
  for record in _read_jsonl(metrics_path):  # in file order: after a resume, later lines win
    if "loss" in record:
      out["step"], out["loss"] = float(record["step"]), float(record["loss"])
    for key, value in record.items():
      if key not in ("step", "loss") and _is_reported(key):
        out[key] = float(value)
  return out


def _parse_value(text: str) -> Any:
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return text


def overrides_from_name(name: str) -> dict[str, Any]:
  """'global_batch=64_seed=1' -> {'global_batch': 64, 'seed': 1} (keys may hold underscores)."""
  out: dict[str, Any] = {}
  pending = ""
  for part in name.split("_"):
    if "=" in part:
      key, value = (pending + part).split("=", 1)
      out[key] = _parse_value(value)
      pending = ""
    else:
      pending += part + "_"
  return out


def find_runs(paths: list[str]) -> list[dict[str, Any]]:
  """[{'name', 'workdir', 'overrides'}] for every run under `paths` (runs or sweep roots)."""
  runs = []
  for path in paths:
    if not os.path.isdir(path):
      raise SystemExit(f"results: {path} is not a directory.")
    sweep_file = os.path.join(path, "sweep.json")
    if os.path.exists(sweep_file):
      with open(sweep_file) as f:
        record = json.load(f)
      for run in record["runs"]:
        workdir = os.path.join(path, run["name"])
        runs.append({"name": run["name"], "workdir": workdir, "overrides": run["overrides"]})
      continue
    if any(os.path.exists(os.path.join(path, f)) for f in RUN_FILES):
      name = os.path.basename(os.path.normpath(path))
      runs.append({"name": name, "workdir": path, "overrides": overrides_from_name(name)})
      continue
    for entry in sorted(os.listdir(path)):
      workdir = os.path.join(path, entry)
      if os.path.isdir(workdir) and any(os.path.exists(os.path.join(workdir, f)) for f in RUN_FILES):
        runs.append({"name": entry, "workdir": workdir, "overrides": overrides_from_name(entry)})
  if not runs:
    raise SystemExit(f"results: no runs (directories with {' or '.join(RUN_FILES)}) under {', '.join(paths)}.")
  return runs


def collect(paths: list[str]) -> tuple[list[dict[str, Any]], list[str], list[str]]:
  """(rows, setting columns, metric columns); a row = name + overrides + metrics."""
  runs = find_runs(paths)
  rows, settings, metrics = [], [], []
  for run in runs:
    values = run_metrics(run["workdir"])
    for key in run["overrides"]:
      if key not in settings:
        settings.append(key)
    for key in values:
      if key not in metrics:
        metrics.append(key)
    rows.append({"name": run["name"], **run["overrides"], **values})
  # Only the settings that differ between runs say anything in a table.
  settings = [k for k in settings if len({repr(r.get(k)) for r in rows}) > 1] or settings
  metrics = sorted(metrics, key=lambda k: (k != "step", k != "loss", k))
  return rows, settings, metrics


def group_over_seeds(rows, settings, metrics) -> tuple[list[dict[str, Any]], list[str]]:
  """Rows averaged over seeds: each metric as mean and std, plus the number of seeds."""
  keys = [k for k in settings if k not in SEED_KEYS]
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    groups.setdefault(tuple(repr(row.get(k)) for k in keys), []).append(row)
  grouped = []
  for members in groups.values():
    out = {k: members[0].get(k) for k in keys}
    out["seeds"] = len(members)
    for m in metrics:
      values = [r[m] for r in members if m in r]
      if values:
        mean = sum(values) / len(values)
        out[m] = mean
        out[m + " std"] = math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))
    grouped.append(out)
  grouped.sort(key=lambda r: tuple(_sort_key(r.get(k)) for k in keys))
  return grouped, keys


def _sort_key(value):
  return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def _cell(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    if value.is_integer() and abs(value) < 1e9:
      return str(int(value))
    return f"{value:.4g}"
  return str(value)


def _mean_std(row: dict, metric: str) -> str:
  if metric not in row:
    return ""
  return f"{_cell(row[metric])} ± {_cell(row[metric + ' std'])}"


def markdown(rows: list[dict], columns: list[str]) -> str:
  lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
  lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def _csv_value(value: Any) -> Any:
  if value is None:
    return ""
  if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
    return int(value)
  return value


def to_csv(rows: list[dict], columns: list[str]) -> str:
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({c: _csv_value(row.get(c)) for c in columns})
  return buffer.getvalue()


def x_log_base(xs: list[float]) -> int | None:
  """The log base for a swept setting's axis, or None for a linear one: settings spread over a factor of 2.5
  or more (learning rates, batch sizes) are read on a log axis; base 2 where every value is a power of two."""
  if min(xs) <= 0 or max(xs) / min(xs) < 2.5:
    return None
  powers_of_two = all(float(x).is_integer() and int(x) & (int(x) - 1) == 0 for x in xs)
  return 2 if powers_of_two else 10


def plot(grouped: list[dict], keys: list[str], metrics: list[str], path: str, title: str = "") -> str | None:
  """One panel per metric: against the one numeric setting that varies (mean +- std over seeds),
  or as bars per setting combination otherwise."""
  shown = [m for m in metrics if m != "step"]
  if not shown or not grouped:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.4), squeeze=False)
  numeric = len(keys) == 1 and all(isinstance(r.get(keys[0]), (int, float)) for r in grouped)
  for ax, metric in zip(axes[0], shown):
    means = [r.get(metric, float("nan")) for r in grouped]
    stds = [r.get(metric + " std", 0.0) for r in grouped]
    if numeric:
      xs = [r[keys[0]] for r in grouped]
      ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3)
      base = x_log_base(xs)
      if base:
        ax.set_xscale("log", base=base)
        ax.minorticks_off()
      labels = [_cell(x) for x in xs]
      long_labels = len(xs) > 4 or max(len(label) for label in labels) > 6
      ax.set_xticks(xs, labels, rotation=30 if long_labels else 0, ha="right" if long_labels else "center")
      ax.set_xlabel(keys[0])
    else:
      labels = [", ".join(f"{k}={_cell(r.get(k))}" for k in keys) or "run" for r in grouped]
      ax.bar(range(len(grouped)), means, yerr=stds, capsize=3)
      ax.set_xticks(range(len(grouped)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_title(metric, fontsize=9)
    ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def write_tables(paths: list[str], out_prefix: str, title: str | None = None) -> dict[str, str]:
  """Writes OUT.md, OUT.csv and OUT.png; returns their paths (and the Markdown text under 'markdown')."""
  rows, settings, metrics = collect(paths)
  per_run_columns = ["name", *settings, *metrics]
  grouped, keys = group_over_seeds(rows, settings, metrics)
  title = title or os.path.basename(os.path.normpath(paths[0]))
  text = f"# {title}\n\n## Every run\n\n" + markdown(rows, per_run_columns)
  seeded = any(k in SEED_KEYS for k in settings) and len(grouped) < len(rows)
  if seeded:
    shown = [{**r, **{m: _mean_std(r, m) for m in metrics if m != "step"}} for r in grouped]
    text += "\n## Mean ± standard deviation over seeds\n\n" + markdown(shown, [*keys, "seeds", *metrics])
  os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
  paths_out = {"md": out_prefix + ".md", "csv": out_prefix + ".csv"}
  with open(paths_out["md"], "w") as f:
    f.write(text)
  with open(paths_out["csv"], "w") as f:
    f.write(to_csv(rows, per_run_columns))
  png = plot(grouped, keys, metrics, out_prefix + ".png", title)
  if png:
    paths_out["png"] = png
  paths_out["markdown"] = text
  return paths_out


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m launch.results", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("paths", nargs="+", help="sweep roots or run workdirs")
  p.add_argument("--out", default=None, help="output prefix (default: FIRST_PATH/results)")
  p.add_argument("--title", default=None)
  args = p.parse_args(argv)
  out = write_tables(args.paths, args.out or os.path.join(args.paths[0], "results"), args.title)
  print(out.pop("markdown"))
  print("wrote " + ", ".join(out.values()))
  return 0


if __name__ == "__main__":
  from clip_jax import cli
  cli.run(main)  # user mistakes: one line, exit code 2
