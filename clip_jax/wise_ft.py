r"""WiSE-FT: evaluate weight-space ensembles of a zero-shot CLIP and its fine-tuned version.

    python -m clip_jax.wise_ft --zeroshot ViT-B-32.pt --finetuned workdirs/ft \
        --alphas 0,0.25,0.5,0.75,1 --tasks zeroshot:cifar10,zeroshot:digits --out runs/wise_ft

Wortsman et al. 2022 ("Robust fine-tuning of zero-shot models", eq. 1): every variable is
theta(alpha) = (1 - alpha) * theta_zeroshot + alpha * theta_finetuned, so alpha 0 is the zero-shot
model and alpha 1 the fine-tuned one, exactly. Each mix is evaluated with `clip_jax.evaluate`'s
tasks (KIND:DATASET[=DATA]; see `python -m clip_jax.evaluate --help`). When the two differ only in
image size (a model fine-tuned at a new resolution), the zero-shot model is first moved to the
fine-tuned size (`clip_jax.resize`); any other difference is refused.

Writes OUT/results.json, OUT/results.md (a row per alpha, a column per task's headline metric),
OUT/plots/wise_ft.png (that metric against alpha, one line per task) and OUT/alpha_<a>/, each mix's
full evaluation report. --export-alphas 0.5 also writes that mix as OUT/alpha_0.5/export, in
--export-format (hf, open_clip or openai, as `clip_jax.export`), to take it to transformers or
open_clip (or back here: `--checkpoint OUT/alpha_0.5/export`).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Sequence

import numpy as np
from flax import traverse_util


def parse_alphas(text: str) -> list[float]:
  """'0,0.5,1' -> [0.0, 0.5, 1.0]; ValueError for anything outside [0, 1] or not a number."""
  try:
    alphas = [float(a) for a in text.split(",") if a.strip()]
  except ValueError:
    raise ValueError(f"--alphas {text!r}: give comma-separated numbers in [0, 1], e.g. 0,0.5,1.") from None
  if not alphas:
    raise ValueError(f"--alphas {text!r} names no alpha; e.g. --alphas 0,0.25,0.5,0.75,1.")
  if any(not 0.0 <= a <= 1.0 for a in alphas):
    raise ValueError(f"--alphas {text!r}: every alpha must be in [0, 1] (0 = zero-shot, 1 = fine-tuned).")
  return alphas


def _config_differences(a, b, prefix: str = "") -> list[str]:
  """'field: A vs B' for every differing leaf field of two config dataclasses."""
  out = []
  for field in dataclasses.fields(a):
    x, y = getattr(a, field.name), getattr(b, field.name)
    if dataclasses.is_dataclass(x):
      out += _config_differences(x, y, f"{prefix}{field.name}.")
    elif x != y and field.name not in ("init_logit_scale",):  # an init value, not the architecture
      if field.name == "eot_token_id" and a.pooling_token == b.pooling_token:  # the same token
        continue
      out.append(f"{prefix}{field.name} {x} vs {y}")
  return out


def align_pair(zeroshot: tuple, finetuned: tuple) -> tuple[tuple, str | None]:
  """((zeroshot model, variables), note): the zero-shot model moved to the fine-tuned image size
  when that is the only difference. Raises ValueError naming the differences otherwise."""
  from clip_jax.resize import resize_model
  (zs_model, zs_vars), (ft_model, _) = zeroshot, finetuned
  differences = _config_differences(zs_model.config, ft_model.config)
  if not differences:
    return zeroshot, None
  if differences == [f"vision.image_size {zs_model.config.vision.image_size} vs {ft_model.config.vision.image_size}"]:
    size = ft_model.config.vision.image_size
    note = f"zero-shot model moved from {zs_model.config.vision.image_size} to {size} px (positional grid resampled)"
    return resize_model(zs_model, zs_vars, size), note
  hint = ""
  if all(d.startswith(("act ", "vision.head_width ", "text.heads ")) for d in differences):
    # Weights of one shape; a bare state dict's activation and heads are assumed when loading it.
    hint = (" If one of them is a bare state dict, its activation and heads were assumed: give --model-name "
            "(or --act) for it.")
  raise ValueError("--zeroshot and --finetuned are different architectures (" + "; ".join(differences) +
                   "); WiSE-FT mixes the weights of one architecture." + hint)


def interpolate(zeroshot: dict[str, Any], finetuned: dict[str, Any], alpha: float) -> dict[str, Any]:
  """(1 - alpha) * zeroshot + alpha * finetuned for every variable (params and BatchNorm
  statistics), in float32 on the host, each result in its input's dtype. alpha 0 and 1 return the
  inputs' values exactly. Raises ValueError naming the first variable the two do not share or
  whose shapes differ."""
  zs, ft = traverse_util.flatten_dict(zeroshot), traverse_util.flatten_dict(finetuned)
  for key in sorted(set(zs) ^ set(ft)):
    which = "--zeroshot" if key in zs else "--finetuned"
    raise ValueError(f"variable {'/'.join(key)} is only in {which}; the two models must have the same variables.")
  a = np.float32(alpha)
  mixed = {}
  for key, z in zs.items():
    z, f = np.asarray(z), np.asarray(ft[key])
    if z.shape != f.shape:
      raise ValueError(f"variable {'/'.join(key)} has shape {z.shape} in --zeroshot, {f.shape} in --finetuned.")
    mix = (np.float32(1) - a) * z.astype(np.float32) + a * f.astype(np.float32)
    mixed[key] = mix.astype(z.dtype)
  return traverse_util.unflatten_dict(mixed)


def headline_metric(result: dict[str, Any]) -> str:
  """The metric a task is plotted by: the paper's for its dataset, else the table's first."""
  from clip_jax.eval.report import TABLE_METRICS
  paper = result.get("paper_metric")
  if paper and paper in result["metrics"]:
    return paper
  return next(m for m in TABLE_METRICS[result["task"]] if m in result["metrics"])


def wise_ft_png(rows: list[dict[str, Any]], path: str) -> str:
  """Headline metric (%) against alpha, one line per task."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for column in rows[0]["metrics"]:
    ax.plot([r["alpha"] for r in rows], [r["metrics"][column] for r in rows], "o-", label=column)
  ax.set_xlabel("alpha (0 = zero-shot, 1 = fine-tuned)")
  ax.set_ylabel("accuracy / recall (%)")
  ax.set_title("WiSE-FT: weight-space ensembles")
  ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def markdown_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
  columns = list(rows[0]["metrics"])
  lines = [f"# WiSE-FT: {meta['zeroshot']} (alpha 0) to {meta['finetuned']} (alpha 1)", ""]
  if meta.get("note"):
    lines += [f"Note: {meta['note']}.", ""]
  lines += ["| alpha | " + " | ".join(columns) + " |", "|---:|" + "---:|" * len(columns)]
  for row in rows:
    lines.append(f"| {row['alpha']:g} | " + " | ".join(f"{row['metrics'][c]:.1f}" for c in columns) + " |")
  lines += ["", "Numbers in percent; each alpha's full report is in alpha_<alpha>/results.md.",
            "", "Plot: [wise_ft.png](plots/wise_ft.png)"]
  return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Loads, aligns and mixes the pair, evaluates every alpha; writes and returns the table."""
  import jax

  from clip_jax import evaluate

  alphas = parse_alphas(args.alphas)
  export_alphas = parse_alphas(args.export_alphas) if getattr(args, "export_alphas", "").strip() else []
  if set(export_alphas) - set(alphas):
    raise ValueError(f"--export-alphas {args.export_alphas}: each must be one of --alphas ({args.alphas}).")
  tasks = evaluate.parse_tasks(args.tasks)
  tasks = evaluate.with_prompts(tasks, evaluate._read_list_file(args.classnames, "classnames"),
                                evaluate._read_list_file(args.templates, "templates"))
  loaded = []
  if args.act is not None and all(os.path.isdir(path) for path in (args.zeroshot, args.finetuned)):
    raise ValueError(f"--act applies to bare state-dict files; {args.zeroshot} and {args.finetuned} are "
                     "directories whose configs name their activation.")
  for path in (args.zeroshot, args.finetuned):
    # Architecture flags describe bare state-dict files; directories carry their own config.
    model, variables = evaluate.load_model(path, args.model_name, None if os.path.isdir(path) else args.act)
    loaded.append((model, jax.device_get(variables)))
  (zs_model, zs_vars), note = align_pair(loaded[0], loaded[1])
  ft_vars = loaded[1][1]
  export_format = getattr(args, "export_format", "hf")
  if export_alphas and export_format == "hf" and zs_model.config.vision.is_resnet:
    # Said before any evaluation: raised after one, the finished ones were lost (and the other processes
    # of a multi-process run went on into the next alpha's collectives).
    raise ValueError("--export-format hf: the pair has a ResNet image tower, which transformers' CLIPModel "
                     "cannot hold; use --export-format open_clip or openai.")
  eval_args = evaluate.build_parser().parse_args([])  # the evaluation CLI's defaults ...
  for name in ("batch_size", "model_name", "data_dir", "tokenizer", "limit", "num_workers"):
    setattr(eval_args, name, getattr(args, name))     # ... and the options given here
  eval_args.checkpoint = args.zeroshot                # picks the tokenizer of a Hugging Face directory
  is_main = jax.process_index() == 0
  if is_main and note:
    print(f"WiSE-FT: {note}.", flush=True)
  # Every mix is evaluated with the zero-shot side's stated preprocessing (evaluate's rule for its
  # checkpoint); a fine-tune trained here preprocessed as OpenAI's CLIP, so the two can differ: said.
  from clip_jax.convert import read_stated_preprocessing
  zs_prep, ft_prep = (read_stated_preprocessing(path)[0] for path in (args.zeroshot, args.finetuned))
  if export_alphas and export_format == "hf":
    from clip_jax.convert import image_processor_config
    image_processor_config(224, zs_prep)  # a preprocessing transformers cannot state: refused before evaluating
  if is_main and zs_prep != ft_prep:
    print(f"WiSE-FT: every mix is evaluated with {args.zeroshot}'s image preprocessing ({zs_prep.describe()}); "
          f"{args.finetuned} states {ft_prep.describe()}, so alpha 1 is not evaluated as it would be alone.",
          flush=True)
  rows, reports = [], []
  for alpha in alphas:
    eval_args.out = os.path.join(args.out, f"alpha_{alpha:g}")
    mix = interpolate(zs_vars, ft_vars, alpha)
    report = evaluate.evaluate(eval_args, tasks, loaded=(zs_model, mix, f"WiSE-FT alpha={alpha:g}"))
    metrics = {}
    for result in report["results"]:
      metric = headline_metric(result)
      metrics[f"{result['task']}:{result['dataset']} {metric}"] = float(result["metrics"][metric])
    row = {"alpha": alpha, "metrics": metrics}
    if alpha in export_alphas:
      from clip_jax.export import export_model
      fmt = export_format
      tokenizer = evaluate._tokenizer(args.tokenizer, args.zeroshot, zs_model.config.text.context_length)
      row["export"] = export_path(args.out, alpha, fmt)
      if is_main:  # the mix is the same on every process; one writes it (replacing a rerun's)
        export_model(zs_model, mix, row["export"], fmt, tokenizer=tokenizer, overwrite=True,
                     name=f"WiSE-FT alpha={alpha:g}", preprocessing=zs_prep)
        print(f"WiSE-FT: alpha={alpha:g} exported ({fmt}) to {row['export']}", flush=True)
    rows.append(row)
    reports.append(report["results"])
  from clip_jax.eval.report import settings_older_reports_held
  from clip_jax.observe import package_versions, save_results
  meta = {"zeroshot": args.zeroshot, "finetuned": args.finetuned, "note": note, "tasks": args.tasks,
          "alphas": alphas, "limit": args.limit, "preprocessing": zs_prep.to_dict(), "versions": package_versions()}
  if is_main:
    # Written whole; an earlier table of other settings is moved aside (results.N.json), never mixed in.
    save_results(os.path.join(args.out, "results.json"), {"meta": meta, "rows": rows, "results": reports},
                 lambda data: markdown_table(data["rows"], data["meta"]), merge=lambda old, new: new,
                 settings_key="meta", added_settings=settings_older_reports_held())
    wise_ft_png(rows, os.path.join(args.out, "plots", "wise_ft.png"))
    table = markdown_table(rows, meta)
    print(table, flush=True)
  return {"meta": meta, "rows": rows}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m clip_jax.wise_ft", description=__doc__.split("\n\n")[0],
      epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--zeroshot", required=True, help="the model before fine-tuning (alpha 0): any "
                      "checkpoint load_checkpoint reads (file, Hugging Face directory, workdir)")
  parser.add_argument("--finetuned", required=True, help="the fine-tuned model (alpha 1), same architecture")
  parser.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="comma-separated mixing weights in [0, 1]")
  parser.add_argument("--tasks", required=True, help="comma-separated KIND:DATASET[=DATA], as clip_jax.evaluate")
  parser.add_argument("--out", required=True, help="output directory")
  from clip_jax.evaluate import add_architecture_flags
  add_architecture_flags(parser, what="picks the paper's row", applies_to="; of whichever of --zeroshot and "
                         "--finetuned is a bare state-dict file (folders carry their own)")
  parser.add_argument("--batch-size", type=int, default=256, help="global evaluation batch")
  parser.add_argument("--data-dir", help="TFDS data_dir")
  parser.add_argument("--tokenizer", help="tokenizer spec (default: the zero-shot directory's own, else 'clip')")
  parser.add_argument("--classnames", metavar="FILE", help="class names for zero-shot tasks (as clip_jax.evaluate)")
  parser.add_argument("--templates", metavar="FILE", help="prompt templates for zero-shot tasks")
  parser.add_argument("--limit", type=int, help="evaluate only the first N examples of each split")
  parser.add_argument("--num-workers", type=int, default=0, help="image-decoding worker processes")
  parser.add_argument("--export-alphas", default="", help="comma-separated alphas of --alphas whose mix is "
                      "also written as OUT/alpha_<a>/export (default: none)")
  from clip_jax.export import FORMATS
  parser.add_argument("--export-format", choices=FORMATS, default="hf", help="the format of those exports, as "
                      "clip_jax.export's --format (default: %(default)s)")
  return parser


def export_path(out: str, alpha: float, fmt: str) -> str:
  """Where --export-alphas writes the mix of `alpha` (an openai export is one .safetensors file)."""
  return os.path.join(out, f"alpha_{alpha:g}", "export.safetensors" if fmt == "openai" else "export")


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  from clip_jax.weights import CheckpointError
  try:
    run(args)
  except (ValueError, FileNotFoundError, CheckpointError) as e:  # the user's input: one clear line
    from clip_jax import cli
    return cli.print_user_error(str(e), e)
  return 0


if __name__ == "__main__":
  from clip_jax import cli
  cli.run(main)  # usage mistakes: one line, exit code 2
