r"""An evaluation sweep over prompt sets: zero-shot accuracy of trained models with a single template
against prompt ensembles (the CLIP paper, section 3.1.4), with a table and a plot.

    python -m clip_jax.eval.prompt_ablation configs/sweeps/digits_prompt_ensembling.py \
        --workdir workdirs/digits --out workdirs/digits/prompt_ablation

The sweep file defines `get_prompt_sets()` -> {name: templates} ('{}' = the class name), `DATASET`
(a data spec with known class names, e.g. 'digits' or 'cifar10') and optionally `REFERENCE`, the
set the others are compared with. Each model's images are embedded once; every prompt set only
builds another classifier (`zeroshot.zeroshot_classifier`, the same prompt ensembling as the
evaluation CLI). Uncertainty: a paired bootstrap over the test images (the same resampled images
for both prompt sets) gives a 95% interval for each set's top-1 difference from the reference;
with several --workdir, the table also gives the mean and standard deviation over models.

Writes OUT/prompt_ablation.md, .csv, .json and OUT/prompt_ablation.png.
"""
from __future__ import annotations

import argparse
import csv
import os
from typing import Sequence

import numpy as np

BOOTSTRAP_SAMPLES = 2000


def load_prompt_sweep(path: str) -> tuple[str, dict[str, tuple[str, ...]], str]:
  """(dataset spec, {name: templates}, reference name) from a sweep file; ValueError if malformed."""
  import importlib.util
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such prompt sweep file.")
  spec = importlib.util.spec_from_file_location("_prompt_sweep", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_prompt_sets") or not hasattr(module, "DATASET"):
    raise ValueError(f"{path}: a prompt sweep defines DATASET and get_prompt_sets() -> {{name: templates}}.")
  sets = {str(k): tuple(v) for k, v in module.get_prompt_sets().items()}
  if not sets:
    raise ValueError(f"{path}: get_prompt_sets() returned no prompt sets.")
  for name, templates in sets.items():
    if not templates or any(t.count("{}") != 1 for t in templates):
      raise ValueError(f"{path}: prompt set {name!r} needs templates with exactly one '{{}}' each.")
  reference = getattr(module, "REFERENCE", next(iter(sets)))
  if reference not in sets:
    raise ValueError(f"{path}: REFERENCE {reference!r} is not one of the prompt sets.")
  return module.DATASET, sets, reference


def paired_bootstrap(correct: np.ndarray, reference: np.ndarray, samples: int = BOOTSTRAP_SAMPLES,
                     seed: int = 0) -> tuple[float, float]:
  """bool [n] per-image correctness of two classifiers on the same images -> the 2.5 and 97.5
  percentiles of the top-1 difference (percentage points) over resamples of the images."""
  rng = np.random.default_rng(seed)
  rows = rng.integers(0, len(correct), (samples, len(correct)))
  differences = 100.0 * (correct[rows].mean(axis=1) - reference[rows].mean(axis=1))
  low, high = np.percentile(differences, [2.5, 97.5])
  return float(low), float(high)


def evaluate_prompt_sets(model, variables, image_features, labels: np.ndarray, class_names: Sequence[str],
                         prompt_sets: dict[str, tuple[str, ...]], tokenizer, *, batch_size: int, mesh):
  """-> {name: (metrics, per-image correctness bool [n], predictions int [n])} for one model's
  image embeddings float32 [n, d] and int labels [n]."""
  from clip_jax.eval import zeroshot
  out = {}
  for name, templates in prompt_sets.items():
    tokens = np.asarray(tokenizer(zeroshot.prompt_texts(class_names, templates)), np.int32)
    classifier = zeroshot.zeroshot_classifier(model, variables, tokens, len(class_names), batch_size=batch_size,
                                              mesh=mesh)
    metrics, predictions = zeroshot.classify(image_features, classifier, labels)
    out[name] = (metrics, predictions == labels, predictions)
  return out


def summarize(per_model: list[dict], prompt_sets: dict[str, tuple[str, ...]], reference: str) -> list[dict]:
  """One row per prompt set: mean/sd over models of top-1 and mean per class; the first model's
  paired-bootstrap interval of the difference from the reference."""
  rows = []
  for name, templates in prompt_sets.items():
    top1 = np.array([m[name][0]["top1"] for m in per_model])
    per_class = np.array([m[name][0]["mean_per_class"] for m in per_model])
    delta = np.array([m[name][0]["top1"] - m[reference][0]["top1"] for m in per_model])
    low, high = paired_bootstrap(per_model[0][name][1], per_model[0][reference][1])
    changed = np.mean([100.0 * np.mean(m[name][2] != m[reference][2]) for m in per_model])
    rows.append({"prompt_set": name, "num_templates": len(templates), "top1": float(top1.mean()),
                 "changed_predictions": float(changed),
                 "top1_sd": float(top1.std(ddof=1)) if len(top1) > 1 else None,
                 "mean_per_class": float(per_class.mean()), "delta_top1": float(delta.mean()),
                 "delta_ci95": [low, high], "templates": list(templates)})
  return rows


def markdown(rows: list[dict], meta: dict) -> str:
  models = meta["num_models"]
  lines = [f"# Prompt ensembling vs single templates: zero-shot {meta['dataset']} ({meta['num_images']} images"
           f"{f', {models} models' if models > 1 else ''})", "",
           "The CLIP paper, section 3.1.4: ensembling many prompt templates beats one. Differences are in "
           f"top-1 percentage points against **{meta['reference']}**; the 95% interval is a paired bootstrap "
           f"over the test images ({BOOTSTRAP_SAMPLES} resamples{', first model' if models > 1 else ''}); "
           "'predictions changed': images whose predicted class differs from the reference's.", "",
           "| prompt set | templates | top-1 % | mean per class % | Δ top-1 vs reference | 95% interval | "
           "predictions changed % |",
           "|---|---:|---:|---:|---:|---|---:|"]
  for row in rows:
    sd = f" ± {row['top1_sd']:.1f}" if row["top1_sd"] is not None else ""
    low, high = row["delta_ci95"]
    lines.append(f"| {row['prompt_set']} | {row['num_templates']} | {row['top1']:.1f}{sd} | "
                 f"{row['mean_per_class']:.1f} | {row['delta_top1']:+.1f} | [{low:+.1f}, {high:+.1f}] | "
                 f"{row['changed_predictions']:.1f} |")
  lines += ["", f"Models: {', '.join(meta['workdirs'])}. Sweep: `{meta['sweep']}`."]
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], reference: str, path: str, title: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(10, 0.5 * len(rows) + 1.5))
  positions = np.arange(len(rows))[::-1]
  top1 = [r["top1"] for r in rows]
  reference_top1 = next(r["top1"] for r in rows if r["prompt_set"] == reference)
  # Error bars: the bootstrap interval of the difference, placed around each set's own top-1.
  errors = np.array([[max(0.0, -(r["delta_ci95"][0] - r["delta_top1"])), max(0.0, r["delta_ci95"][1] - r["delta_top1"])]
                     for r in rows]).T
  colors = ["tab:blue" if r["num_templates"] > 1 else "tab:gray" for r in rows]
  ax.barh(positions, top1, xerr=errors, color=colors, capsize=3)
  ax.axvline(reference_top1, color="black", linestyle="--", linewidth=1)  # the reference set's top-1
  ax.set_yticks(positions, [f"{r['prompt_set']} ({r['num_templates']})" for r in rows], fontsize=8)
  low = min(top1) - 10
  ax.set_xlim(max(0.0, low), 100.0)
  ax.set_xlabel("zero-shot top-1 (%)")
  ax.set_title(f"{title}\nblue: ensembles; whiskers: 95% paired bootstrap of the difference from the dashed "
               "reference", fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def run(sweep: str, workdirs: Sequence[str], out_dir: str, *, batch_size: int = 256, limit: int | None = None,
        tokenizer: str | None = None) -> dict:
  import jax

  from clip_jax.convert import load_checkpoint
  from clip_jax.data.sources import open_source
  from clip_jax.eval import embed
  from clip_jax.eval.classnames import find_dataset
  from clip_jax.evaluate import _tokenizer
  from clip_jax.sharding import create_mesh
  dataset, prompt_sets, reference = load_prompt_sweep(sweep)
  info = find_dataset(dataset)
  if info is None:
    raise ValueError(f"{sweep}: DATASET {dataset!r} is not a dataset with known class names.")
  mesh = create_mesh({"data": -1})
  per_model, num_images = [], None
  for workdir in workdirs:
    model, variables = load_checkpoint(workdir)
    tokenize = _tokenizer(tokenizer, workdir, model.config.text.context_length)
    image_size = model.config.vision.image_size
    source = open_source(info.source, info.test_split, image_size=image_size, labelled=True)
    if limit:
      source = embed.Subset(source, limit)
    batches = embed.image_batches(source, batch_size=batch_size, image_size=image_size, mesh=mesh)
    images = embed.embed_images(model, variables, batches, len(source), mesh)
    num_images = len(images.labels)
    per_model.append(evaluate_prompt_sets(model, variables, images.features, images.labels, info.class_names,
                                          prompt_sets, tokenize, batch_size=batch_size, mesh=mesh))
  rows = summarize(per_model, prompt_sets, reference)
  from clip_jax.observe import package_versions, save_results
  meta = {"sweep": sweep, "dataset": info.name, "split": info.test_split, "reference": reference,
          "workdirs": list(workdirs), "num_models": len(workdirs), "num_images": num_images,
          "bootstrap_samples": BOOTSTRAP_SAMPLES, "limit": limit, "versions": package_versions()}
  if tokenizer:  # only when given: the meta of an ablation with each checkpoint's own stays as it was
    meta["tokenizer"] = tokenizer
  if jax.process_index() == 0:
    # Written whole; an earlier ablation of other settings is moved aside (prompt_ablation.N.*), never mixed in.
    save_results(os.path.join(out_dir, "prompt_ablation.json"), {"meta": meta, "rows": rows},
                 lambda data: markdown(data["rows"], data["meta"]), merge=lambda old, new: new, settings_key="meta")
    with open(os.path.join(out_dir, "prompt_ablation.csv"), "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["prompt_set", "num_templates", "top1", "top1_sd", "mean_per_class", "delta_top1",
                       "delta_ci95_low", "delta_ci95_high", "changed_predictions"])
      for r in rows:
        writer.writerow([r["prompt_set"], r["num_templates"], f"{r['top1']:.4f}",
                         "" if r["top1_sd"] is None else f"{r['top1_sd']:.4f}", f"{r['mean_per_class']:.4f}",
                         f"{r['delta_top1']:.4f}", f"{r['delta_ci95'][0]:.4f}", f"{r['delta_ci95'][1]:.4f}",
                         f"{r['changed_predictions']:.4f}"])
    table = markdown(rows, meta)
    plot(rows, reference, os.path.join(out_dir, "prompt_ablation.png"),
         f"zero-shot {info.name}: prompt ensembling vs single templates")
    print(table)
    print(f"Wrote {out_dir}/prompt_ablation.md|csv|json|png.")
  return {"meta": meta, "rows": rows}


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m clip_jax.eval.prompt_ablation", description=__doc__.split("\n\n")[0],
                                   epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("sweep", help="the prompt sweep file (DATASET, get_prompt_sets())")
  parser.add_argument("--workdir", nargs="+", required=True, help="trained workdirs (or checkpoints) to evaluate")
  parser.add_argument("--out", required=True, help="directory for the table and plot")
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--limit", type=int, help="only the first N test images (a quick check)")
  parser.add_argument("--tokenizer", help="tokenizer spec for every workdir (default: each checkpoint's own, as "
                                          "clip_jax.evaluate finds it, else 'clip')")
  args = parser.parse_args(argv)
  from clip_jax.weights import CheckpointError
  try:
    run(args.sweep, args.workdir, args.out, batch_size=args.batch_size, limit=args.limit, tokenizer=args.tokenizer)
  except (ValueError, FileNotFoundError, CheckpointError) as e:
    from clip_jax import cli
    return cli.print_user_error(str(e), e)
  return 0


if __name__ == "__main__":
  from clip_jax import cli
  cli.run(main)  # user mistakes: one line, exit code 2
