"""What an evaluation run leaves behind: results.json, a Markdown table with the paper's number
beside each of ours and the settings that made them, and plots (zero-shot confusion matrices, the
linear probe's C sweep)."""
from __future__ import annotations

import os
from typing import Any, Sequence

from clip_jax.eval.paper_results import PAPER, paper_number

# The metrics a table shows, per task, in this order (the rest stay in results.json).
TABLE_METRICS = {
    "zeroshot": ("top1", "top5", "mean_per_class"),
    "linear_probe": ("top1", "mean_per_class"),
    "retrieval": ("image_to_text/R@1", "image_to_text/R@5", "image_to_text/R@10",
                  "text_to_image/R@1", "text_to_image/R@5", "text_to_image/R@10"),
}


def attach_paper_numbers(result: dict[str, Any], model_name: str | None) -> dict[str, Any]:
  """Adds result['paper'] = {metric: {'value', 'source', 'model'}} for the metrics the paper reports."""
  paper = {}
  for metric in result["metrics"]:
    number = paper_number(result["task"], model_name, result["dataset"], metric)
    if number is not None:
      paper[metric] = {"value": number.value, "source": number.source, "model": number.model}
  return {**result, "paper": paper}


def data_problem_lines(result: dict[str, Any]) -> list[str]:
  """One line per split whose data had problems: what was counted, by reason."""
  from clip_jax.data.images import ALPHA_MODES
  lines = []
  for split, report in (result.get("data") or {}).items():
    skipped, problems = report.get("skipped", {}), report.get("problems", {})
    # A record the scan found wrong (a missing file, an unknown label) is also skipped later: name it once,
    # with the larger count (the scan's covers the whole source; the pipeline's, process 0's share).
    counts = {**{k: v for k, v in problems.items() if k not in skipped},
              **{f"skipped {k}": max(v, problems.get(k, 0)) for k, v in skipped.items()}}
    parts = [f"{reason} {count}" for reason, count in sorted(counts.items())]
    # Transparency is dropped as open_clip's evaluation drops it (clip_jax.data.images), so a transparent
    # background shows whatever colour its pixels store (often black): said, with the count.
    alpha = sorted((mode[len("mode_"):], n) for mode, n in (report.get("converted") or {}).items()
                   if mode[len("mode_"):] in ALPHA_MODES)
    if alpha:
      parts.append("kept with their alpha dropped (open_clip's rule): " + ", ".join(f"{m} {n}" for m, n in alpha))
    if parts:
      lines.append(f"{result['task']}:{result['dataset']} {split} data: " + ", ".join(parts))
  if result.get("too_small_to_split"):
    lines.append(f"{result['task']}:{result['dataset']}: classes with a single training example (fitted, not "
                 f"validated): {result['too_small_to_split'][:20]}")
  return lines


def _cell(value: float | None) -> str:
  return "" if value is None else f"{value:.1f}"


def markdown_table(results: list[dict[str, Any]], meta: dict[str, Any],
                   unfinished: Sequence[dict[str, str]] = ()) -> str:
  """results.md: the table of our numbers beside the paper's, data problems, plots, settings, and the
  tasks that did not finish (`unfinished`: [{'task': 'KIND:NAME', 'split', 'error'}])."""
  lines = [f"# Evaluation of {meta.get('checkpoint', '?')}", ""]
  model = meta.get("model_name") or "unknown"
  paper_model = meta.get("paper_model")
  lines.append(f"Model: `{model}`; paper numbers: "
               + (f"{PAPER}, row {paper_model}." if paper_model else "none (not a model of the paper)."))
  lines += ["", "| Task | Dataset | Split | Metric | Ours | Paper | Source |",
            "|---|---|---|---|---:|---:|---|"]
  for result in results:
    for metric in TABLE_METRICS.get(result["task"], ()):
      if metric not in result["metrics"]:
        continue
      paper = result.get("paper", {}).get(metric)
      marker = " *" if metric == result.get("paper_metric") else ""
      lines.append(f"| {result['task']} | {result['dataset']} | {result.get('split', '')} | {metric}{marker} | "
                   f"{_cell(result['metrics'][metric])} | {_cell(paper and paper['value'])} | "
                   f"{paper['source'] if paper else ''} |")
  lines += ["", "All numbers in percent. * marks the metric the paper reports for that dataset. "
            "A blank paper cell: the paper has no number for this model and dataset."]
  replaced = [f"{r['task']}:{r['dataset']}" for r in results if r.get("paper_comparable") is False]
  if replaced:
    lines += ["", f"No paper numbers for {', '.join(replaced)}: evaluated with your class names or prompts, "
              "not the paper's."]
  problems = [line for result in results for line in data_problem_lines(result)]
  if problems:
    lines += ["", "Data problems (counted, left out or kept as noted in clip_jax/data/labelled.py):"]
    lines += [f"- {line}" for line in problems]
  if unfinished:
    lines += ["", "Not finished (no numbers above; run these tasks again):"]
    lines += [f"- {u['task']} ({u.get('split')}): {u['error']}" for u in unfinished]
  plots = [p for r in results for p in r.get("plots", [])]
  if plots:
    lines += ["", "Plots:"] + [f"- [{os.path.basename(p)}]({os.path.relpath(p, meta['out_dir'])})" for p in plots]
  lines += ["", *settings_lines(results, meta)]
  return "\n".join(lines) + "\n"


def settings_lines(results: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
  """The settings behind the numbers, as Markdown: the model's, then each task's data and prompts."""
  step = f" (step {meta['checkpoint_step']})" if meta.get("checkpoint_step") is not None else ""
  lines = ["Settings:", f"- checkpoint: `{meta.get('checkpoint')}`{step}; activation {meta.get('act')}, "
           f"tokenizer {meta.get('tokenizer')}, image size {meta.get('image_size')}"]
  if meta.get("preprocessing"):
    from clip_jax.data.images import Preprocessing
    lines.append(f"- image preprocessing: {Preprocessing(**meta['preprocessing']).describe()}")
  if meta.get("limit"):
    lines.append(f"- only the first {meta['limit']} examples of each split (--limit)")
  for r in results:
    what = f"- {r['task']}:{r['dataset']}: data `{r.get('source')}` split {r.get('split')}"
    if r.get("templates") is not None:
      count = len(r["templates"])
      what += f", {count} prompt template{'s' if count != 1 else ''} (first: {r['templates'][0]!r})"
    if r["task"] == "linear_probe":
      what += (f", {r.get('features')} features, C chosen on {meta.get('val_fraction')} of train "
               f"(seed {meta.get('probe_seed')})")
    lines.append(what)
  versions = meta.get("versions") or {}
  if versions:
    lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
  return lines


def merge_reports(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
  """An earlier report of the same model and settings with this run's results: a task evaluated
  again replaces its row (task, dataset, split), tasks only the earlier run had are kept; a task left
  unfinished stays listed as such until a run finishes it."""
  def key(result):
    return f"{result['task']}:{result['dataset']}", result.get("split")
  rows = {key(r): r for r in old.get("results", [])}
  rows.update({key(r): r for r in new["results"]})
  unfinished = {(u["task"], u.get("split")): u for u in old.get("unfinished", []) + new.get("unfinished", [])}
  merged = {**old, **new, "results": list(rows.values()),
            "unfinished": [u for k, u in unfinished.items() if k not in rows]}
  if not merged["unfinished"]:
    del merged["unfinished"]
  return merged


def settings_older_reports_held() -> dict[str, Any]:
  """Evaluation settings recorded only since some version, with the value older reports held implicitly
  (`observe.save_results(added_settings=)`, so that those still merge): 'preprocessing' since session 28,
  before which every evaluation preprocessed as OpenAI's CLIP."""
  from clip_jax.data.images import OPENAI
  return {"preprocessing": OPENAI.to_dict()}


def write_report(out_dir: str, results: list[dict[str, Any]], meta: dict[str, Any],
                 unfinished: Sequence[dict[str, str]] = ()) -> tuple[str, str]:
  """OUT/results.json ({'meta': settings, 'results': [...], 'unfinished': [...] if any}) and OUT/results.md,
  written whole by `observe.save_results`: results of the same model and settings already there are kept
  (see `merge_reports`), a file made with other settings is moved aside to results.N.json first.
  `unfinished`: [{'task': 'KIND:NAME', 'split', 'error'}] of a run that stopped early (the task that failed
  with its error, those after it 'not run'). -> (results.json path, results.md path)."""
  from clip_jax.observe import save_results
  json_path, md_path = os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")
  report = {"meta": meta, "results": results, **({"unfinished": list(unfinished)} if unfinished else {})}
  save_results(json_path, report,
               lambda merged: markdown_table(merged["results"], {**merged["meta"], "out_dir": out_dir},
                                             merged.get("unfinished", ())),
               merge=merge_reports, settings_key="meta", added_settings=settings_older_reports_held())
  return json_path, md_path


def sweep_png(sweep: dict[float, float], best_c: float, path: str, title: str = "") -> str:
  """Validation score against the regularisation strength C of a linear-probe sweep."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cs = sorted(sweep)
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(cs, [sweep[c] for c in cs], "o-")
  ax.axvline(best_c, color="gray", linestyle="--", label=f"chosen C = {best_c:.3g}")
  ax.set_xscale("log")
  ax.set_xlabel("C (inverse L2 regularisation)")
  ax.set_ylabel("validation score (%)")
  ax.set_title(title or "linear probe: C sweep")
  ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
