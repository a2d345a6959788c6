r"""The embedded fine-tuning demonstration (no downloads): starting from the trained digits CLIP,

    python -m clip_jax.finetune_demo --pretrained workdirs/digits --root runs/finetune

(a) fine-tunes it at 48 px (its 4 x 4 positional grid resampled to 6 x 6), (b) trains a text tower
from scratch against its locked image tower (LiT), (c) mixes the original and (a) in weight space
(WiSE-FT), and evaluates everything on the held-out digits with the evaluation CLI's zero-shot task.
A missing or unfinished `--pretrained` workdir is trained (or resumed) first with the README's command
(`clip_jax.child_runs.ensure_trained`); an exported checkpoint is used as it is. Each run resumes if
interrupted. (b)'s image tower is the pretrained one, locked: its zero-shot predictions can equal the
pretrained row's exactly, when its new text tower ranks the ten class prompts the same way. Writes ROOT/results.md and ROOT/results.json (one row per model), ROOT/wise_ft/ (the
WiSE-FT table and plot) and each run's own workdir.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Sequence

TASKS = "zeroshot:digits"


def _evaluate(loaded: tuple, label: str, out_dir: str, path_for_tokenizer: str) -> dict[str, float]:
  from clip_jax import evaluate
  args = evaluate.build_parser().parse_args(["--checkpoint", path_for_tokenizer, "--out", out_dir])
  report = evaluate.evaluate(args, evaluate.parse_tasks(TASKS), loaded=(*loaded, label))
  return report["results"][0]["metrics"]


def run(pretrained: str, root: str, alphas: str) -> list[dict[str, Any]]:
  from clip_jax import wise_ft
  from clip_jax.convert import load_checkpoint
  from clip_jax.child_runs import ensure_trained, train_child
  rows = []
  ensure_trained(pretrained, "configs/clip/digits.py")
  runs = {"res48": os.path.join(root, "res48"), "lit": os.path.join(root, "lit")}
  seconds = {name: train_child(f"configs/clip/digits_finetune.py:{name}", workdir, f"--config.init.checkpoint={pretrained}")
             for name, workdir in runs.items()}
  steps = {name: json.load(open(os.path.join(workdir, "results.json")))["step"] for name, workdir in runs.items()}

  def row(name: str, px: int, trained: str, metrics: dict, **extra) -> dict[str, Any]:
    return {"model": name, "image_px": px, "trained": trained, "top1": metrics["top1"],
            "mean_per_class": metrics["mean_per_class"], **extra}
  original = load_checkpoint(pretrained)
  rows.append(row(f"pretrained ({pretrained})", 32, "-",
                  _evaluate(original, pretrained, os.path.join(root, "eval", "pretrained"), pretrained)))
  rows.append(row("pretrained, grid resampled to 48 px, no training", 48, "-",
                  _evaluate(load_checkpoint(pretrained, image_size=48), f"{pretrained} at 48 px",
                            os.path.join(root, "eval", "pretrained_48"), pretrained)))
  rows.append(row("(a) fine-tuned at 48 px", 48, f"all, {steps['res48']} steps",
                  _evaluate(load_checkpoint(runs["res48"]), runs["res48"], os.path.join(root, "eval", "res48"),
                            pretrained), seconds=round(seconds["res48"], 1)))
  rows.append(row("(b) LiT: image tower locked, text tower from scratch", 32, f"text + temperature, {steps['lit']} steps",
                  _evaluate(load_checkpoint(runs["lit"]), runs["lit"], os.path.join(root, "eval", "lit"), pretrained),
                  seconds=round(seconds["lit"], 1)))
  mixes = wise_ft.run(wise_ft.build_parser().parse_args(
      ["--zeroshot", pretrained, "--finetuned", runs["res48"], "--alphas", alphas, "--tasks", TASKS,
       "--out", os.path.join(root, "wise_ft")]))
  for mix in mixes["rows"]:
    top1 = next(v for k, v in mix["metrics"].items() if k.endswith(" top1"))
    rows.append({"model": f"(c) WiSE-FT alpha={mix['alpha']:g} between the pretrained (at 48 px) and (a)",
                 "image_px": 48, "trained": "-", "top1": top1, "mean_per_class": None})
  write_table(rows, root)
  return rows


def write_table(rows: list[dict[str, Any]], root: str) -> str:
  cell = lambda v: "" if v is None else f"{v:.1f}"  # noqa: E731
  lines = ["| model | px | trained | zero-shot top-1 (%) | mean per class (%) | seconds |",
           "|---|---:|---|---:|---:|---:|"]
  lines += [f"| {r['model']} | {r['image_px']} | {r['trained']} | {cell(r['top1'])} | {cell(r['mean_per_class'])} | "
            f"{r.get('seconds', '')} |" for r in rows]
  lines += ["", f"Zero-shot on the {TASKS.split(':')[1]} test split (359 scans), the evaluation CLI's prompt "
            "ensemble; WiSE-FT rows from wise_ft/results.md (plot: wise_ft/plots/wise_ft.png)."]
  table = "\n".join(lines) + "\n"
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "results.md"), "w") as f:
    f.write(table)
  with open(os.path.join(root, "results.json"), "w") as f:
    json.dump(rows, f, indent=2)
  print(table, flush=True)
  return table


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m clip_jax.finetune_demo", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--pretrained", default="workdirs/digits",
                      help="the digits CLIP to start from: its training workdir (trained or resumed first when absent "
                           "or unfinished) or an exported checkpoint (used as it is)")
  parser.add_argument("--root", default="runs/finetune", help="where the runs and the table go")
  parser.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="WiSE-FT mixing weights")
  args = parser.parse_args(argv)
  run(args.pretrained, args.root, args.alphas)
  return 0


if __name__ == "__main__":
  from clip_jax import cli
  cli.run(main)
