r"""Gather the results of many runs into one ablation table (Markdown, CSV) and a plot (PNG).

    python -m launch.results workdirs/bs_sweep                    # a sweep root (or several)
    python -m launch.results workdirs/run_a workdirs/run_b --out=/tmp/compare

Each run's numbers come from its `results.json` (written by the trainer at the end) when it has
one, else from its `metrics.jsonl`: the final training loss and step, and the last value of every
evaluation metric ('zeroshot/...' and other 'group/name' keys that are not 'train/...').
A run's settings are its overrides from the sweep's `sweep.json` (or, without one, read
from its directory name 'key=value_key=value'), then the rest of its own `config.json` (flattened:
'optimizer.learning_rate'). The table shows the settings that differ between the runs (settings
that only change how a run is carried out, like log_every or the mesh, only where a sweep varies
them). Runs that differ only by seed (distinct seeds, every other setting equal) are averaged: a
second table gives the mean and standard deviation over seeds, and the plot shows those means
with std error bars; every other run is its own point or bar, labelled by its directory name.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from typing import Any, Sequence

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


def name_parts(name: str) -> list[str]:
  """'global_batch=64_seed=1' -> ['global_batch=64', 'seed=1'] (keys may hold underscores); words
  after the last 'key=value' (or a name without any) are one last part: 'my_run' -> ['my_run']."""
  parts, pending = [], ""
  for word in name.split("_"):
    if "=" in word:
      parts.append(pending + word)
      pending = ""
    else:
      pending += word + "_"
  return parts + ([pending[:-1]] if pending else [])


def overrides_from_name(name: str) -> dict[str, Any]:
  """'global_batch=64_seed=1' -> {'global_batch': 64, 'seed': 1}."""
  pairs = [part.split("=", 1) for part in name_parts(name) if "=" in part]
  return {key: _parse_value(value) for key, value in pairs}


def run_config(workdir: str) -> dict[str, Any]:
  """The run's own settings as flattened config keys ('optimizer.learning_rate'): its config.json
  (what the trainer started with), else results.json's 'settings'; {} when it has neither."""
  from clip_jax.loop import CONFIG_FILE, INPUT_RECORD_KEYS, flatten_config  # imports jax: only here
  from clip_jax.observe import VOLATILE_SETTINGS
  config_path = os.path.join(workdir, CONFIG_FILE)
  results_path = os.path.join(workdir, "results.json")
  try:
    if os.path.exists(config_path):
      with open(config_path) as f:  # DreamBooth's photo records are not settings (a column per photo)
        return flatten_config({k: v for k, v in json.load(f).items() if k not in INPUT_RECORD_KEYS})
    if os.path.exists(results_path):
      with open(results_path) as f:
        settings = json.load(f).get("settings") or {}
      # Versions, devices, processes, platform: where and with what it ran, not what was run.
      return {k: v for k, v in settings.items() if k not in VOLATILE_SETTINGS and k not in INPUT_RECORD_KEYS}
  except (OSError, ValueError):  # a file cut short: the run shows its name and numbers without settings
    pass
  return {}


def find_runs(paths: list[str]) -> list[dict[str, Any]]:
  """[{'name', 'workdir', 'overrides', 'source'}] for every run under `paths` (runs or sweep roots);
  'source' is the sweep root (or listed folder) a run came from, its own workdir for a lone run."""
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
        runs.append({"name": run["name"], "workdir": workdir, "overrides": run["overrides"], "source": path})
      continue
    if any(os.path.exists(os.path.join(path, f)) for f in RUN_FILES):
      name = os.path.basename(os.path.normpath(path))
      runs.append({"name": name, "workdir": path, "overrides": overrides_from_name(name), "source": path})
      continue
    for entry in sorted(os.listdir(path)):
      workdir = os.path.join(path, entry)
      if os.path.isdir(workdir) and any(os.path.exists(os.path.join(workdir, f)) for f in RUN_FILES):
        runs.append({"name": entry, "workdir": workdir, "overrides": overrides_from_name(entry), "source": path})
  if not runs:
    raise SystemExit(f"results: no runs (directories with {' or '.join(RUN_FILES)}) under {', '.join(paths)}.")
  return runs


def _differing(rows: list[dict], keys: list[str]) -> list[str]:
  return [k for k in keys if len({repr(r.get(k)) for r in rows}) > 1]


def unique_names(runs: list[dict[str, Any]]) -> list[str]:
  """Each run's directory name, with its sweep root's name in front where two runs share one
  ('sweep_a/lr=0.1', 'sweep_b/lr=0.1'): the names label table rows and plot bars."""
  counts: dict[str, int] = {}
  for run in runs:
    counts[run["name"]] = counts.get(run["name"], 0) + 1
  return [run["name"] if counts[run["name"]] == 1 else
          f"{os.path.basename(os.path.normpath(run['source']))}/{run['name']}" for run in runs]


def shown_settings(rows: list[dict], explicit: list[str], swept: set[str], candidates: list[str]) -> list[str]:
  """The settings columns: the `candidates` that differ between the rows, less the ones that only
  change how a run is carried out (`clip_jax.loop.is_operational`: log_every, mesh, ...) unless a
  sweep varies them (`swept`), less a group's copy of a top-level key ('optimizer.total_steps'
  beside 'total_steps'). With none differing (one run, or equal runs), the `explicit` overrides."""
  from clip_jax.loop import is_operational
  shown: list[str] = []
  for key in _differing(rows, candidates):
    if is_operational(key) and key not in swept:
      continue
    leaf = key.rsplit(".", 1)[-1]
    if any(s.rsplit(".", 1)[-1] == leaf and all(repr(r.get(s)) == repr(r.get(key)) for r in rows) for s in shown):
      continue
    shown.append(key)
  return shown or explicit


def collect(paths: list[str]) -> tuple[list[dict[str, Any]], list[str], list[str]]:
  """(rows, setting columns, metric columns); a row = name + settings + metrics, where a run's
  settings are its overrides (sweep.json or directory name) over its own config (`run_config`)."""
  runs = find_runs(paths)
  rows, metrics = [], []
  explicit: list[str] = []     # keys the sweeps / directory names set, in their order
  from_config: list[str] = []  # the other keys of the runs' configs
  for run, name in zip(runs, unique_names(runs)):
    values = run_metrics(run["workdir"])
    config = run_config(run["workdir"])
    explicit += [k for k in run["overrides"] if k not in explicit]
    from_config += [k for k in config if k not in from_config]
    metrics += [k for k in values if k not in metrics]
    rows.append({**config, **run["overrides"], "name": name, **values})
  by_source: dict[str, list[dict]] = {}
  for run in runs:
    by_source.setdefault(run["source"], []).append(run["overrides"])
  swept = {k for overrides in by_source.values() for k in _differing(overrides, explicit)}
  candidates = explicit + [k for k in from_config if k not in explicit]
  settings = shown_settings(rows, explicit, swept, candidates)
  metrics = sorted(metrics, key=lambda k: (k != "step", k != "loss", k))
  return rows, settings, metrics


def _seedless_name(name: str) -> str:
  """'global_batch=64_seed=1' -> 'global_batch=64': the name of what several seeds of a run share."""
  return "_".join(p for p in name_parts(name) if p.partition("=")[0].rsplit(".", 1)[-1] not in SEED_KEYS)


def averaged(members: list[dict], metrics: list[str]) -> dict[str, Any]:
  """One entry for runs of several seeds: each metric's mean and std ('METRIC std'), 'seeds'."""
  out: dict[str, Any] = {"seeds": len(members)}
  for m in metrics:
    values = [r[m] for r in members if m in r]
    if values:
      mean = sum(values) / len(values)
      out[m] = mean
      out[m + " std"] = math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))
  return out


def group_over_seeds(rows, settings, metrics) -> tuple[list[dict[str, Any]], list[str]]:
  """(entries, the settings columns less the seed): runs that differ only by seed, i.e. equal in every
  other shown setting (a missing one equals only a missing one) with distinct known seeds, become one
  entry with each metric's mean and std and 'seeds' = their number; every other run stays an entry of
  its own ('seeds' = 1). Each entry has a 'name': the run's, or the seeds' shared name without the seed."""
  keys = [k for k in settings if k not in SEED_KEYS]
  seed_keys = [k for k in settings if k in SEED_KEYS]
  groups: dict[tuple, list[dict]] = {}
  for i, row in enumerate(rows):  # without a seed that differs no two runs are seeds of one setting
    identity = tuple(repr(row.get(k)) for k in keys) if seed_keys else (i,)
    groups.setdefault(identity, []).append(row)
  entries = []
  for members in groups.values():
    seeds = [tuple(m.get(k) for k in seed_keys) for m in members]
    if len(members) > 1 and len(set(seeds)) == len(members) and all(None not in s for s in seeds):
      names = {_seedless_name(m["name"]) for m in members}
      name = names.pop() if len(names) == 1 and "" not in names else \
          ", ".join(f"{k}={_cell(members[0].get(k))}" for k in keys) or "all runs"
      entries.append({"name": name, **{k: members[0].get(k) for k in keys}, **averaged(members, metrics)})
    else:  # repeats of one seed, or runs with unknown seeds: nothing to average over
      entries += [{"name": m["name"], **{k: m.get(k) for k in keys}, "seeds": 1,
                   **{k: m[k] for k in metrics if k in m}} for m in members]
  entries.sort(key=lambda r: tuple(_sort_key(r.get(k)) for k in keys))  # stable: run order within equal settings
  return entries, keys


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


def _mean_std(row: dict, metric: str) -> str | float:
  """'mean ± std' of an averaged entry, the std to two significant digits and the mean to as many
  decimals ('0.370 ± 0.071'); a single run's value as it is."""
  if metric not in row:
    return ""
  std = row.get(metric + " std")
  if std is None:
    return row[metric]
  if not std or not math.isfinite(std):
    return f"{_cell(row[metric])} ± {_cell(std)}"
  decimals = max(0, 1 - math.floor(math.log10(abs(std))))
  return f"{row[metric]:.{decimals}f} ± {std:.{decimals}f}"


def _column_decimals(values: list[Any]) -> int | None:
  """Decimals that show a metric column's largest value to 4 significant digits, for all its values alike
  (a column of 10.12 and 10.6 reads 10.12 and 10.60); None for a column of whole numbers or no floats."""
  floats = [v for v in values if isinstance(v, float) and math.isfinite(v)]
  if not floats or all(v.is_integer() for v in floats):
    return None
  largest = max(abs(v) for v in floats) or 1.0
  return min(8, max(0, 3 - math.floor(math.log10(largest))))


def markdown(rows: list[dict], columns: list[str], metrics: Sequence[str] = ()) -> str:
  """A Markdown table; the float cells of `metrics` columns with one number of decimals per column."""
  decimals = {c: _column_decimals([r.get(c) for r in rows]) for c in metrics}

  def cell(row: dict, column: str) -> str:
    value, places = row.get(column), decimals.get(column)
    if places is not None and isinstance(value, float) and math.isfinite(value):
      return f"{value:.{places}f}"
    return _cell(value)
  lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
  lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
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


def _shorten(text: str, width: int) -> str:
  """`text` cut in the middle to at most `width` characters (both ends tell runs apart)."""
  if len(text) <= width:
    return text
  head = (width - 1) // 2
  return text[:head] + "…" + text[len(text) - (width - 1 - head):]


def tick_label(name: str, width: int = 24) -> str:
  """A run's name as a tick label: one 'key=value' per line, a dotted key by its last part
  ('optimizer.learning_rate=0.001' -> 'learning_rate=0.001'), lines over `width` cut in the middle."""
  lines = []
  for part in name_parts(name):
    key, eq, value = part.partition("=")
    lines.append(_shorten(key.rsplit(".", 1)[-1] + eq + value if eq else part, width))
  return "\n".join(lines)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _draw_error_bars(ax, xs: list, entries: list[dict], metric: str) -> None:
  """Std error bars on the entries that average several seeds (a single run has none to show)."""
  seeded = [(x, e) for x, e in zip(xs, entries) if e.get("seeds", 1) > 1 and metric + " std" in e]
  if seeded:
    ax.errorbar([x for x, _ in seeded], [e[metric] for _, e in seeded], yerr=[e[metric + " std"] for _, e in seeded],
                fmt="none", ecolor="black", capsize=3)


def figure(entries: list[dict], keys: list[str], shown: list[str], title: str = ""):
  """One panel per metric in `shown`: a line against the one numeric setting that varies (distinct
  values), else one bar per entry labelled by its name; error bars where seeds were averaged."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  numeric = (len(keys) == 1 and all(_is_number(e.get(keys[0])) for e in entries)
             and len({e[keys[0]] for e in entries}) == len(entries))
  labels = [tick_label(e["name"]) for e in entries]
  longest = max(len(line) for label in labels for line in label.split("\n"))
  lines = max(label.count("\n") + 1 for label in labels)
  panel_width = max(4.2, 0.45 * len(entries) + 1.0)
  # Labels side by side when they fit under their bars (~0.06 in per character at 7 pt), else slanted;
  # the figure grows by the labels' height so the layout engine keeps the axes a readable size.
  slanted = not numeric and longest * 0.06 > 0.8 * panel_width / len(entries)
  label_height = (0.5 * longest * 0.06 + 0.12 * lines) if slanted else 0.12 * lines
  fig, axes = plt.subplots(1, len(shown), figsize=(panel_width * len(shown), 3.0 + label_height), squeeze=False,
                           layout="constrained")
  for ax, metric in zip(axes[0], shown):
    means = [e.get(metric, float("nan")) for e in entries]
    if numeric:
      xs = [e[keys[0]] for e in entries]
      ax.plot(xs, means, marker="o")
      base = x_log_base(xs)
      if base:
        ax.set_xscale("log", base=base)
        ax.minorticks_off()
      ticks = [_cell(x) for x in xs]
      long_ticks = len(xs) > 4 or max(len(t) for t in ticks) > 6
      ax.set_xticks(xs, ticks, rotation=30 if long_ticks else 0, ha="right" if long_ticks else "center",
                    rotation_mode="anchor")
      ax.set_xlabel(keys[0])
    else:
      xs = list(range(len(entries)))
      ax.bar(xs, means)
      ax.set_xticks(xs, labels, fontsize=7, rotation=30 if slanted else 0, ha="right" if slanted else "center",
                    rotation_mode="anchor")
    _draw_error_bars(ax, xs, entries, metric)
    ax.set_title(metric, fontsize=9)
    ax.grid(alpha=0.3)
  if any(e.get("seeds", 1) > 1 for e in entries):
    title = (title + "\n" if title else "") + "runs that differ only by seed: mean ± std over seeds"
  if title:
    fig.suptitle(title, fontsize=10)
  return fig


def plot(entries: list[dict], keys: list[str], metrics: list[str], path: str, title: str = "") -> str | None:
  """`figure` of every metric but the step, written to `path` (PNG); None when there is nothing to draw."""
  shown = [m for m in metrics if m != "step"]
  if not shown or not entries:
    return None
  import matplotlib.pyplot as plt
  fig = figure(entries, keys, shown, title)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100, bbox_inches="tight")  # whatever the layout left over, nothing is cut off
  plt.close(fig)
  return path


def default_title(paths: list[str]) -> str:
  """The folder names of what was compared (the first alone named a comparison of several)."""
  return _shorten(", ".join(os.path.basename(os.path.normpath(p)) for p in paths), 80)


def write_tables(paths: list[str], out_prefix: str, title: str | None = None) -> dict[str, str]:
  """Writes OUT.md, OUT.csv and OUT.png; returns their paths (and the Markdown text under 'markdown')."""
  rows, settings, metrics = collect(paths)
  per_run_columns = ["name", *settings, *metrics]
  entries, keys = group_over_seeds(rows, settings, metrics)
  title = title or default_title(paths)
  text = f"# {title}\n\n## Every run\n\n" + markdown(rows, per_run_columns, metrics)
  if any(e["seeds"] > 1 for e in entries):
    shown = [{**e, **{m: _mean_std(e, m) for m in metrics if m != "step"}} for e in entries]
    text += ("\n## Mean ± standard deviation over seeds\n\nRuns that differ only by seed are averaged; the plot "
             "shows these rows (error bars: std).\n\n" + markdown(shown, ["name", *keys, "seeds", *metrics], metrics))
  os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
  paths_out = {"md": out_prefix + ".md", "csv": out_prefix + ".csv"}
  with open(paths_out["md"], "w") as f:
    f.write(text)
  with open(paths_out["csv"], "w") as f:
    f.write(to_csv(rows, per_run_columns))
  png = plot(entries, keys, metrics, out_prefix + ".png", title)
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
