r"""Evaluate a CLIP checkpoint the way the CLIP paper does, with the paper's number beside each result.

    python -m clip_jax.evaluate --checkpoint /ckpt/ViT-B-32.pt \
        --tasks zeroshot:cifar10,retrieval:coco_captions,linear_probe:cifar10 --out /tmp/eval
    python -m clip_jax.evaluate --workdir /tmp/digits --tasks zeroshot:digits,linear_probe:digits

Your own labelled images, zero-shot with your class names and prompts (what clip_benchmark computes,
image by image):

    python -m clip_jax.evaluate --checkpoint open_clip_model.pt --model-name ViT-B-32 \
        --tasks zeroshot:mine=/data/mine --classnames classes.txt --templates prompts.txt
    python -m clip_jax.evaluate --checkpoint model.pt --act gelu --tasks linear_probe:mine=/data/mine/{split}

Tasks are KIND:DATASET[=DATA], comma-separated:
  KIND     zeroshot | retrieval | linear_probe
  DATASET  a dataset this project knows (`--list-datasets`): its class names, prompts, splits and
           the paper's numbers come with it; 'tfds:NAME' for any other labelled TFDS dataset; a name
           of your choosing with =DATA for your own data; for retrieval also a caption file (.jsonl /
           .csv, see clip_jax/eval/retrieval.py) or ArrayRecord shards with several captions per image
  DATA     where the data really are ('{split}' in the path becomes the split: train for the probe's
           fit, test for evaluation): a folder of class sub-folders (ImageFolder layout), a .csv /
           .jsonl of path,label rows (label = class index or name), webdataset .tar shards with a
           'cls' entry, ArrayRecord shards from `python -m clip_jax.data.prepare`, a caption file, or
           'tfds:NAME' (clip_jax/data/labelled.py describes each layout)
           e.g. zeroshot:pets=/data/pets/test, linear_probe:fgvc_aircraft=/data/aircraft/{split}

Class names: a known dataset's own, else --classnames FILE (one per line in label order = sorted
folder order, or JSON: a list, or an object {folder: name}; a list of the folders' own names in
another order is matched by name, with a warning), else the folder names (or a tar set's
classnames.txt). Prompts: a known dataset's own, else --templates FILE (one per line, '{}' or
clip_benchmark's '{c}' for the class name), else "a photo of a {}.". The two files override a
known dataset's lists too; the paper's numbers are then left out (its prompts were different).

Architecture: a bare state dict (.pt / .bin / .safetensors) does not say which activation or head
width it was trained with. --model-name NAME (e.g. ViT-B-32: exact GELU, open_clip's; or
ViT-B-32-quickgelu: OpenAI's) sets both; --act overrides the activation. Without either, OpenAI's
QuickGELU is assumed, with a warning. Hugging Face directories and training workdirs carry their own.

Image preprocessing: the checkpoint's own where its folder states one (an open_clip folder's
preprocess_cfg: mean/std, bicubic or bilinear, resize 'shortest' | 'longest' | 'squash'; a transformers
folder's preprocessor_config.json), said in one line and recorded in results.json's meta; else OpenAI's
(mean/std, bicubic shortest-side resize, centre crop), as open_clip's eval transform
(`clip_jax.convert.stated_preprocessing`).

Writes OUT/results.json, OUT/results.md (a Markdown table; what was wrong with the data is counted
in both; the settings behind the numbers: checkpoint and step, architecture, tokenizer, preprocessing, each task's
data and prompts, package versions), OUT/predictions/zeroshot_DATASET.csv (index, key, label,
prediction per image) and OUT/plots/. Files are written whole; evaluating the same model with the same
settings into the same OUT adds or replaces task rows and keeps the others, other settings move the
old files aside to results.N.json / .md first. Evaluation runs sharded
over every device of every process; start it on each host of a pod like training.
"""
from __future__ import annotations

if __name__ == "__main__":  # before jax is imported: XLA flags, allocator (clip_jax.cli)
  from clip_jax import cli as _cli
  _cli.use_process_defaults()

import argparse
import dataclasses
import functools
import os
import sys
import time
from typing import Any, Sequence

TASK_KINDS = ("zeroshot", "retrieval", "linear_probe")


@dataclasses.dataclass(frozen=True)
class Task:
  kind: str
  dataset: str                  # the name results are reported under
  source: str                   # data spec for the sources
  test_split: str
  train_split: str | None = None
  class_names: Any = None       # tuple of names, or {folder: name} for a folder of class sub-folders
  templates: tuple[str, ...] | None = None
  paper_metric: str | None = None  # the metric the paper reports for this dataset (None: not in the paper)
  paper_comparable: bool = True    # False once the user's class names or prompts replace the paper's


def _known_names() -> str:
  from clip_jax.eval.classnames import DATASETS
  from clip_jax.eval.retrieval import RETRIEVAL_DATASETS
  return (f"classification: {', '.join(DATASETS)}; retrieval: {', '.join(RETRIEVAL_DATASETS)}")


def parse_task(text: str) -> Task:
  """One 'KIND:DATASET[=DATA]' -> a Task; a ValueError that says what to write instead."""
  from clip_jax.eval.classnames import find_dataset
  from clip_jax.eval.retrieval import find_retrieval_dataset, is_caption_file
  kind, sep, rest = text.strip().partition(":")
  if not sep or not rest:
    raise ValueError(f"task {text!r} is not KIND:DATASET; e.g. zeroshot:cifar10 (kinds: {', '.join(TASK_KINDS)}).")
  if kind not in TASK_KINDS:
    raise ValueError(f"unknown task kind {kind!r} in {text!r}; use one of {', '.join(TASK_KINDS)}.")
  from clip_jax.eval.zeroshot import split_name  # NAME=DATA as the trainer's zero-shot hook reads it
  name, data = split_name(rest)
  if kind == "retrieval":
    info = find_retrieval_dataset(name)
    if info is not None:
      source = data or info.source
      if source is None:
        raise ValueError(f"{name} is not in TFDS; give its caption file: retrieval:{name}=/path/to/test.jsonl.")
      return Task(kind, info.name, source, info.split)
    if is_caption_file(name):
      return Task(kind, os.path.splitext(os.path.basename(name))[0], name, "test")
    if name.startswith("tfds:"):
      return Task(kind, name[len("tfds:"):], data or name, "test")
    if data:  # a name of the user's choosing for their own shards or caption file
      return Task(kind, name, data, "test")
    if os.path.exists(name) or "{split}" in name:  # ArrayRecord shards with several captions each
      return Task(kind, os.path.basename(os.path.normpath(name.replace("{split}", "test"))), name, "test")
    raise ValueError(f"unknown retrieval dataset {name!r} in {text!r}; use one of "
                     f"{', '.join(['coco_captions', 'flickr30k'])}, a caption file (.jsonl/.csv), "
                     "ArrayRecord shards, or tfds:NAME.")
  info = find_dataset(name)
  data_info = find_dataset(data) if data else None
  from clip_jax.eval.zeroshot import check_not_two_datasets
  check_not_two_datasets(name, data, info, data_info)
  task_name = info.name if info else name
  if info is None and data_info is not None:
    # NAME=DATASET (myin=imagenet): the known dataset (its data, class names, prompts and splits) under
    # the user's NAME, as the trainer's zero-shot hook reads it (zeroshot.zeroshot_sources).
    info, data = data_info, None
  if info is None:
    if name.startswith("tfds:"):
      return Task(kind, name[len("tfds:"):], data or name, "test", "train")
    if data is None and _is_data_path(name):  # a path alone: the dataset is named after it
      from clip_jax.eval.zeroshot import data_name  # the trainer's zero-shot hook names paths the same way
      name, data = data_name(name), name
    if data is None:
      raise ValueError(f"unknown dataset {name!r} in {text!r}; known datasets ({_known_names()}), "
                       "tfds:NAME for another labelled TFDS dataset, or NAME=PATH for your own data.")
    if kind == "linear_probe" and "{split}" not in data:
      raise ValueError(f"linear_probe:{name} needs a training and a test split: put '{{split}}' in the path "
                       f"(e.g. linear_probe:{name}=/data/{name}/{{split}} with train/ and test/ beside each other).")
    return Task(kind, name, data, "test", "train")
  source = data or info.source
  if source is None:
    raise ValueError(f"{info.name} is not in TFDS; give its data: {kind}:{info.name}=/path/to/shards/{{split}}.")
  if kind == "linear_probe" and info.train_split is None:
    raise ValueError(f"{info.name} has no training split, so no linear probe; use zeroshot:{info.name}.")
  return Task(kind, task_name, source, info.test_split, info.train_split, info.class_names, info.templates,
              info.metric if info.paper_name else None)


def _is_data_path(name: str) -> bool:
  return "{split}" in name or os.path.exists(name) or name.lower().endswith((".csv", ".tsv", ".jsonl", ".tar"))


def parse_tasks(text: str) -> list[Task]:
  tasks = [parse_task(t) for t in text.split(",") if t.strip()]
  if not tasks:
    raise ValueError("--tasks is empty; e.g. --tasks zeroshot:cifar10.")
  seen = {}
  for task in tasks:  # results, plots and predictions are filed under KIND:NAME: one would replace the other
    other = seen.setdefault((task.kind, task.dataset), task)
    if other is not task:
      raise ValueError(f"two tasks are named {task.kind}:{task.dataset} ({other.source} and {task.source}); "
                       f"name them apart: {task.kind}:NAME=DATA.")
  return tasks


def with_prompts(tasks: Sequence[Task], class_names=None, templates: Sequence[str] | None = None) -> list[Task]:
  """The --classnames / --templates lists applied to every zero-shot task. A known dataset
  evaluated with other prompts or names is no longer the paper's setting: its paper metric goes."""
  if class_names is None and templates is None:
    return list(tasks)
  out = []
  for task in tasks:
    if task.kind != "zeroshot":  # a probe reads labels only; retrieval its captions
      out.append(task)
      continue
    out.append(dataclasses.replace(
        task, class_names=task.class_names if class_names is None else
        (dict(class_names) if isinstance(class_names, dict) else tuple(class_names)),
        templates=task.templates if templates is None else tuple(templates), paper_comparable=False))
  return out


def infer_model_name(config) -> str | None:
  """The named architecture a loaded config is (temperature init aside), or None."""
  from clip_jax.models.configs import MODEL_CONFIGS
  strip = lambda c: dataclasses.replace(c, init_logit_scale=0.0, init_logit_bias=None)  # noqa: E731
  for name, candidate in MODEL_CONFIGS.items():
    if strip(candidate) == strip(config):
      return name
  return None


def tokenizer_for(spec: str | None, checkpoint: str, context_length: int):
  """(tokenizer, its spec) for a model read from `checkpoint`: --tokenizer, else the checkpoint's own
  (`convert.checkpoint_tokenizer`, the rule training from init.checkpoint follows too: a folder's
  tokenizer files, a workdir's recorded data.tokenizer, else 'clip'). When 'clip' is assumed for a
  folder that states no tokenizer, says so in one line (once per process and folder)."""
  from clip_jax.convert import checkpoint_tokenizer
  from clip_jax.tokenizer import get_tokenizer
  spec, note = checkpoint_tokenizer(checkpoint, spec)
  if note:
    _say_once(note)
  return get_tokenizer(spec, context_length=context_length), spec


def evaluation_preprocessing(checkpoint: str | None):
  """The image preprocessing an evaluation of `checkpoint` uses: the one it states
  (`convert.stated_preprocessing`), OpenAI's where it states none. Says which in one line when it is not
  OpenAI's, and what transformers' settings would do that it cannot (once per process and folder).
  Raises ValueError for a statement it cannot apply."""
  from clip_jax.convert import read_stated_preprocessing
  from clip_jax.data.images import OPENAI
  if not checkpoint:
    return OPENAI
  preprocessing, source, unmapped = read_stated_preprocessing(checkpoint)
  if unmapped:
    _say_once(f"warning: {unmapped}")
  if preprocessing != OPENAI:
    _say_once(f"Image preprocessing: {preprocessing.describe()}, as {source} states (not OpenAI's CLIP's).")
  return preprocessing


@functools.lru_cache(maxsize=None)
def _say_once(line: str) -> None:
  """Prints `line` on process 0, once per process: WiSE-FT evaluates one folder's mixes many times."""
  import jax
  if jax.process_index() == 0:
    print(line, flush=True)


def _tokenizer(spec: str | None, checkpoint: str, context_length: int):
  """`tokenizer_for`'s tokenizer alone (export, draw, WiSE-FT, the prompt ablation)."""
  return tokenizer_for(spec, checkpoint, context_length)[0]


# ----------------------------------------------------------------------------- the three tasks
def _limited(source, limit):
  from clip_jax.eval.embed import Subset
  return Subset(source, limit) if limit else source


def _data_report(skipped: dict, source, converted: dict | None = None) -> dict[str, Any]:
  """What was wrong with one split's data: pipeline skips, images converted from other modes and
  scan-time problems, per reason."""
  return {"skipped": dict(skipped), "converted": dict(converted or {}),
          "problems": dict(getattr(source, "problems", {}) or {}),
          "problem_examples": dict(getattr(source, "problem_examples", {}) or {})}


def write_predictions(path: str, indices, labels, predictions, source, class_names) -> str:
  """CSV of one row per evaluated image: source index, key (where the source names its records
  cheaply), true label, predicted label and their class names."""
  import csv
  import io

  from clip_jax.observe import write_atomic
  key_of = getattr(source, "record_key", None)
  text = io.StringIO(newline="")
  writer = csv.writer(text)
  writer.writerow(["index", "key", "label", "prediction", "label_name", "prediction_name"])
  for index, label, prediction in zip(indices, labels, predictions):
    writer.writerow([int(index), key_of(int(index)) if key_of else "", int(label), int(prediction),
                     class_names[int(label)], class_names[int(prediction)]])
  return write_atomic(path, text.getvalue())


def run_zeroshot(task: Task, ctx: dict[str, Any]) -> dict[str, Any]:
  from clip_jax.eval.zeroshot import ZeroShotEvaluator
  evaluator = ZeroShotEvaluator(task.source, ctx["tokenizer"], task.class_names, task.templates,
                                ctx["batch_size"], ctx["image_size"], split=task.test_split,
                                data_dir=ctx["data_dir"], name=task.dataset, limit=ctx["limit"],
                                num_workers=ctx["num_workers"], preprocessing=ctx["preprocessing"])
  metrics = evaluator.evaluate(ctx["model"], ctx["variables"], ctx["mesh"])
  plots, predictions = [], None
  if ctx["is_main"]:
    path = os.path.join(ctx["out_dir"], "plots", f"confusion_{task.dataset}.png")
    plots.append(evaluator.save_confusion_png(path))
    features = evaluator.last_features
    predictions = write_predictions(os.path.join(ctx["out_dir"], "predictions", f"zeroshot_{task.dataset}.csv"),
                                    features.indices, features.labels, evaluator.last_predictions,
                                    evaluator.source, evaluator.class_names)
  return {"metrics": {k: v for k, v in metrics.items() if not k.startswith("num_")},
          "num_examples": int(metrics["num_examples"]), "num_skipped": int(metrics["num_skipped"]),
          "num_classes": len(evaluator.class_names), "num_templates": len(evaluator.templates),
          "templates": list(evaluator.templates), "class_names": list(evaluator.class_names),
          "data": {"test": evaluator.data_report()}, "predictions": predictions, "plots": plots}


def run_retrieval(task: Task, ctx: dict[str, Any]) -> dict[str, Any]:
  from clip_jax.eval.retrieval import evaluate_retrieval, open_retrieval_source
  source = _limited(open_retrieval_source(task.source, task.test_split, data_dir=ctx["data_dir"],
                                          image_size=ctx["image_size"]), ctx["limit"])
  metrics = evaluate_retrieval(ctx["model"], ctx["variables"], source, ctx["tokenizer"],
                               batch_size=ctx["batch_size"], image_size=ctx["image_size"], mesh=ctx["mesh"],
                               num_workers=ctx["num_workers"], preprocessing=ctx["preprocessing"])
  counts = ("skipped", "converted")
  return {"metrics": {k: v for k, v in metrics.items() if not k.startswith("num_") and k not in counts},
          "num_examples": int(metrics["num_images"]), "num_texts": int(metrics["num_texts"]),
          "num_skipped": int(metrics["num_skipped"]),
          "data": {"test": _data_report(metrics["skipped"], source, metrics["converted"])}, "plots": []}


def run_linear_probe(task: Task, ctx: dict[str, Any]) -> dict[str, Any]:
  from clip_jax.data.sources import open_source
  from clip_jax.eval.linear_probe import evaluate_linear_probe
  from clip_jax.eval.report import sweep_png
  train, test = (_limited(open_source(task.source, split, data_dir=ctx["data_dir"], image_size=ctx["image_size"],
                                      labelled=True), ctx["limit"]) for split in (task.train_split, task.test_split))
  probe = evaluate_linear_probe(ctx["model"], ctx["variables"], train, test, batch_size=ctx["batch_size"],
                                image_size=ctx["image_size"], mesh=ctx["mesh"], features=ctx["probe_features"],
                                val_fraction=ctx["val_fraction"], metric=task.paper_metric or "top1",
                                num_workers=ctx["num_workers"], preprocessing=ctx["preprocessing"])
  plots = []
  if ctx["is_main"]:
    path = os.path.join(ctx["out_dir"], "plots", f"probe_{task.dataset}.png")
    plots.append(sweep_png(probe.sweep, probe.best_c, path,
                           f"linear probe {task.dataset}: validation {task.paper_metric or 'top1'}"))
  return {"metrics": probe.metrics(), "num_train": len(train) - probe.skipped_count("train"),
          "num_examples": len(test) - probe.skipped_count("test"), "num_skipped": probe.skipped_count("test"),
          "sweep": {f"{c:.6g}": s for c, s in probe.sweep.items()}, "features": ctx["probe_features"],
          "too_small_to_split": list(probe.too_small_to_split),
          "data": {split: _data_report(probe.skipped.get(split, {}), source, probe.converted.get(split, {}))
                   for split, source in (("train", train), ("test", test))},
          "plots": plots}


RUNNERS = {"zeroshot": run_zeroshot, "retrieval": run_retrieval, "linear_probe": run_linear_probe}


# ----------------------------------------------------------------------------- CLI
def _read_list_file(path: str | None, what: str):
  if path is None:
    return None
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--{what} {path}: no such file.")
  if what == "classnames":
    from clip_jax.data.labelled import read_class_names_file
    return read_class_names_file(path)
  from clip_jax.eval.zeroshot import read_templates_file
  return read_templates_file(path)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m clip_jax.evaluate", description=__doc__.split("\n\n")[0],
      epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
  which = parser.add_mutually_exclusive_group()
  which.add_argument("--checkpoint", help="an OpenAI/open_clip checkpoint file or a Hugging Face CLIP directory")
  which.add_argument("--workdir", help="a training workdir of this project (its latest checkpoint)")
  parser.add_argument("--tasks", help="comma-separated KIND:DATASET[=DATA] (see below)")
  parser.add_argument("--batch-size", type=int, default=256, help="global batch (rounded up to the device count)")
  parser.add_argument("--out", help="output directory (default: WORKDIR/eval, or ./eval_results)")
  add_architecture_flags(parser, what="picks the paper's row")
  parser.add_argument("--classnames", metavar="FILE", help="class names for zero-shot: one per line in label "
                      "order (sorted folder order; the folders' own names in any order are matched by name), or "
                      "JSON (a list, or {folder: name})")
  parser.add_argument("--templates", metavar="FILE", help="prompt templates for zero-shot, one per line with "
                      "'{}' (or '{c}') for the class name; several are ensembled")
  parser.add_argument("--data-dir", help="TFDS data_dir (default: TFDS's own)")
  parser.add_argument("--tokenizer", help="tokenizer spec (default: the checkpoint folder's own tokenizer files, a "
                      "workdir's training tokenizer, else 'clip', OpenAI's BPE, said when a folder states none)")
  parser.add_argument("--limit", type=int, help="evaluate only the first N examples of each split (a quick check)")
  parser.add_argument("--num-workers", type=int, default=0, help="image-decoding worker processes")
  parser.add_argument("--probe-features", default="pre_projection", choices=("pre_projection", "embedding"),
                      help="linear-probe features: before the projection (the paper) or the embedding")
  parser.add_argument("--val-fraction", type=float, default=0.2,
                      help="part of the training split held out to choose the probe's C")
  parser.add_argument("--list-datasets", action="store_true", help="print the known datasets and exit")
  return parser


def list_datasets() -> str:
  from clip_jax.eval.classnames import DATASETS
  from clip_jax.eval.retrieval import RETRIEVAL_DATASETS
  lines = ["classification (zeroshot:, linear_probe:):"]
  for info in DATASETS.values():
    lines.append(f"  {info.name:18s} {info.source or '(give =DATA)':24s} test={info.test_split} "
                 f"train={info.train_split} classes={len(info.class_names)} templates={len(info.templates)}")
  lines.append("retrieval (retrieval:):")
  for info in RETRIEVAL_DATASETS.values():
    lines.append(f"  {info.name:18s} {info.source or '(give =DATA)':24s} split={info.split}")
  return "\n".join(lines)


def evaluate(args: argparse.Namespace, tasks: Sequence[Task], loaded: tuple | None = None) -> dict[str, Any]:
  """Runs `tasks` on the model of --checkpoint / --workdir, or on `loaded` = (model, variables,
  description) already in memory (WiSE-FT's weight mixes); the path still picks the tokenizer."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  from clip_jax.convert import applying_stated_preprocessing
  from clip_jax.eval.report import markdown_table, write_report
  from clip_jax.sharding import create_mesh

  path = args.checkpoint or args.workdir
  preprocessing = evaluation_preprocessing(path)  # before loading: a setting it cannot apply is one line, early
  with applying_stated_preprocessing():  # the loader's "not applied" line does not hold here
    model, variables = loaded[:2] if loaded else load_model(path, args.model_name, args.act)
  model_name = args.model_name or infer_model_name(model.config)
  mesh = create_mesh({"data": -1})
  # Replicated weights: the image and text passes split only the batch.
  variables = jax.device_put(variables, NamedSharding(mesh, P()))
  out_dir = args.out or (os.path.join(args.workdir, "eval") if args.workdir else "eval_results")
  tokenizer, tokenizer_spec = tokenizer_for(args.tokenizer, path, model.config.text.context_length)
  ctx = dict(model=model, variables=variables, mesh=mesh, out_dir=out_dir, is_main=jax.process_index() == 0,
             tokenizer=tokenizer, preprocessing=preprocessing,
             image_size=model.config.vision.image_size, batch_size=args.batch_size, data_dir=args.data_dir,
             limit=args.limit, num_workers=args.num_workers, probe_features=args.probe_features,
             val_fraction=args.val_fraction)
  meta = evaluation_settings(args, model, model_name, loaded[2] if loaded else path,
                             tokenizer_spec, None if loaded else _checkpoint_step(path), preprocessing)
  results = []
  try:
    _run_tasks(tasks, ctx, model_name, results)
  except BaseException as e:  # an error in one task (or Ctrl-C) keeps those that finished, and says which did not
    if results and ctx["is_main"]:
      json_path, _ = write_report(out_dir, results, meta, unfinished_tasks(tasks[len(results):], e))
      print(f"{len(results)} of {len(tasks)} tasks finished; their results are in {json_path} (which lists the "
            "others as unfinished).", file=sys.stderr, flush=True)
    raise
  if ctx["is_main"]:
    json_path, md_path = write_report(out_dir, results, meta)
    print(markdown_table(results, {**meta, "out_dir": out_dir}))
    plots = any(result.get("plots") for result in results)
    print(f"Wrote {json_path}, {md_path}" + (f" and plots in {os.path.join(out_dir, 'plots')}." if plots else "."))
  return {"meta": meta, "results": results, "out_dir": out_dir}


def unfinished_tasks(left: Sequence[Task], error: BaseException) -> list[dict[str, str]]:
  """The results files' record of the tasks a run did not finish: the first of `left` failed with
  `error` (Ctrl-C: 'interrupted'), the others did not run."""
  reason = "interrupted" if isinstance(error, KeyboardInterrupt) else f"{type(error).__name__}: {error}"
  return [{"task": f"{task.kind}:{task.dataset}", "split": task.test_split,
           "error": reason if i == 0 else "not run"} for i, task in enumerate(left)]


def _run_tasks(tasks: Sequence[Task], ctx: dict[str, Any], model_name: str | None, results: list) -> None:
  """Runs each task in turn, appending its result to `results` as it finishes (and printing it)."""
  from clip_jax.eval.report import attach_paper_numbers, data_problem_lines
  for task in tasks:
    start = time.time()
    result = {"task": task.kind, "dataset": task.dataset, "split": task.test_split, "source": task.source,
              "paper_metric": task.paper_metric, "paper_comparable": task.paper_comparable,
              **RUNNERS[task.kind](task, ctx)}
    result["seconds"] = round(time.time() - start, 2)
    results.append(attach_paper_numbers(result, model_name if task.paper_comparable else None))
    if ctx["is_main"]:
      shown = ", ".join(f"{k} {v:.4g}" for k, v in result["metrics"].items())
      size = [f"{result['num_examples']} images"] if "num_examples" in result else []
      size += [f"{result['num_classes']} classes"] if "num_classes" in result else []  # a label typo shows here
      size.append(f"{result['seconds']:.1f} s")
      print(f"{task.kind}:{task.dataset}: {shown} ({', '.join(size)})", flush=True)
      for line in data_problem_lines(result):
        print(f"  {line}", file=sys.stderr, flush=True)


def evaluation_settings(args: argparse.Namespace, model, model_name: str | None, checkpoint: str,
                        tokenizer: str, checkpoint_step: int | None, preprocessing=None) -> dict[str, Any]:
  """results.json's 'meta': what made the numbers (the checkpoint and its training step, architecture,
  tokenizer, image preprocessing, data options, the probe's split seed, package versions) and where they ran. Two
  evaluations into one folder merge only if these agree (`observe.VOLATILE_SETTINGS` aside)."""
  import jax

  from clip_jax.data.images import OPENAI
  from clip_jax.eval.paper_results import paper_model
  from clip_jax.observe import package_versions
  return {"checkpoint": checkpoint, "checkpoint_step": checkpoint_step, "model_name": model_name,
          "paper_model": paper_model(model_name), "act": model.config.act,
          "vision_heads": model.config.vision.heads, "text_heads": model.config.text.heads,
          "image_size": model.config.vision.image_size,
          "tokenizer": tokenizer, "context_length": model.config.text.context_length,
          "preprocessing": (preprocessing or OPENAI).to_dict(),
          "limit": args.limit, "data_dir": args.data_dir, "probe_features": args.probe_features,
          "val_fraction": args.val_fraction, "probe_seed": 0,
          "devices": jax.device_count(), "processes": jax.process_count(), "batch_size": args.batch_size,
          "versions": package_versions()}


def _checkpoint_step(path: str) -> int | None:
  """The training step of a workdir's checkpoint that loading used: the newest step folder left
  (a newest one that does not restore is moved aside while loading). None for files."""
  folder = os.path.join(path, "checkpoints")
  steps = [int(name) for name in os.listdir(folder) if name.isdigit()] if os.path.isdir(folder) else []
  return max(steps) if steps else None


def add_architecture_flags(parser: argparse.ArgumentParser, what: str = "", applies_to: str = "") -> None:
  """--model-name and --act, for every command that loads a CLIP (`load_model` takes them): a bare
  state dict does not say its activation or head widths. `what`: what else --model-name does there;
  `applies_to`: which checkpoints they apply to, where a command takes several."""
  parser.add_argument("--model-name", help="the named architecture of a bare state dict, e.g. ViT-B-32 (exact "
                      "GELU) or ViT-B-32-quickgelu: sets its activation and head widths" + (f", and {what}" if what
                      else "") + " (default: read off the weights' shapes, QuickGELU assumed)" + applies_to)
  parser.add_argument("--act", choices=("gelu", "quick_gelu"),
                      help="the activation of a bare state dict (overrides --model-name's); most open_clip/LAION "
                      "checkpoints use gelu, OpenAI's quick_gelu" + applies_to)


def load_model(path: str, model_name: str | None, act: str | None):
  """load_checkpoint with the CLI's architecture flags; a bare state dict takes them, Hugging Face
  directories and workdirs carry their own (--act there is an error, --model-name only a paper row)."""
  from clip_jax.convert import load_checkpoint, resolve_checkpoint_path
  from clip_jax.models.configs import MODEL_CONFIGS
  path = resolve_checkpoint_path(path)  # local-dir:DIR and hub cache folders are folders too
  if os.path.isdir(path):
    if act is not None:
      raise ValueError(f"--act applies to bare state-dict files; {path} is a directory whose config names "
                       "its activation.")
    return load_checkpoint(path)
  if model_name is not None and model_name not in MODEL_CONFIGS:
    raise ValueError(f"--model-name {model_name!r} is not a named architecture; one of "
                     f"{', '.join(sorted(MODEL_CONFIGS))}.")
  return load_checkpoint(path, model_name=model_name, act=act)


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.list_datasets:
    print(list_datasets())
    return 0
  if not (args.checkpoint or args.workdir):
    parser.error("give the model: --checkpoint PATH or --workdir DIR.")
  if not args.tasks:
    parser.error("give --tasks, e.g. --tasks zeroshot:cifar10,linear_probe:cifar10.")
  try:
    tasks = parse_tasks(args.tasks)
    tasks = with_prompts(tasks, _read_list_file(args.classnames, "classnames"),
                         _read_list_file(args.templates, "templates"))
  except (ValueError, FileNotFoundError) as e:
    parser.error(str(e))
  from clip_jax.weights import CheckpointError
  try:
    evaluate(args, tasks)
  except (ValueError, FileNotFoundError, CheckpointError) as e:  # the user's input: one clear line
    from clip_jax import cli
    return cli.print_user_error(str(e), e)
  except ImportError as e:  # e.g. TFDS's coco_captions builder imports TensorFlow to load at all
    from clip_jax import cli
    return cli.print_user_error(f"{e}. Install the missing package, or pass the data as a caption file or "
                                "ArrayRecord shards (KIND:DATASET=PATH; `python -m clip_jax.data.prepare` writes "
                                "shards).", e)
  return 0


if __name__ == "__main__":
  from clip_jax import cli
  cli.run(main)  # user mistakes: one line, exit code 2
