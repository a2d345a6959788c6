r"""The DreamBooth paper's evaluation of one fine-tuned subject, beside the paper's numbers.

    python -m dreambooth_jax.evaluate --model runs/dog/export --instance-dir photos/ \
        --live --clip CLIP_CKPT --dino DINO_WEIGHTS --lpips-backbone ALEXNET_WEIGHTS --out runs/dog/eval

The identifier and the class noun default to the run's own (identifier.json in the export, or in the run
folder above it, as `dreambooth_jax.train` writes them); an --identifier that disagrees with it is
refused, another --class-noun is used and said.

Generates `--images-per-prompt` images for each of the paper's 25 prompts (recontextualisation,
accessorisation for live subjects / more contexts for objects, property change), and images of
"a [class noun]" for PRES; computes DINO, CLIP-I, CLIP-T (the paper's Table 1), PRES and DIV
(Table 3) with `dreambooth_jax.eval.metrics`, and writes results.json and results.md (with the settings
that made them: model, subject, networks, prompts, sampler, steps, guidance, seed, versions; written
whole, and a rerun with other settings first moves the old files aside to results.N.*) and
samples.png (a row per prompt, the prompt above it).
Metrics whose network is not given are left out (no weights are downloaded).
"""
from __future__ import annotations

import argparse
import os
from typing import Sequence

import jax
import numpy as np

from dreambooth_jax.training.identifier import IDENTIFIER_FILE  # the trainer's name for the run's identifier file

# The evaluation prompts published with the paper's dataset; {0} is "[V] [class noun]".
RECONTEXTUALIZATION = [
    "a {0} in the jungle", "a {0} in the snow", "a {0} on the beach", "a {0} on a cobblestone street",
    "a {0} on top of pink fabric", "a {0} on top of a wooden floor", "a {0} with a city in the background",
    "a {0} with a mountain in the background", "a {0} with a blue house in the background",
    "a {0} on top of a purple rug in a forest"]
OBJECT_CONTEXTS = [
    "a {0} with a wheat field in the background", "a {0} with a tree and autumn leaves in the background",
    "a {0} with the Eiffel Tower in the background", "a {0} floating on top of water",
    "a {0} floating in an ocean of milk", "a {0} on top of green grass with sunflowers around it",
    "a {0} on top of a mirror", "a {0} on top of the sidewalk in a crowded street", "a {0} on top of a dirt road",
    "a {0} on top of a white rug"]
ACCESSORIZATION = [
    "a {0} wearing a red hat", "a {0} wearing a santa hat", "a {0} wearing a rainbow scarf",
    "a {0} wearing a black top hat and a monocle", "a {0} in a chef outfit", "a {0} in a firefighter outfit",
    "a {0} in a police outfit", "a {0} wearing pink glasses", "a {0} wearing a yellow shirt",
    "a {0} in a purple wizard outfit"]
PROPERTY_CHANGE = ["a red {0}", "a purple {0}", "a shiny {0}", "a wet {0}", "a cube shaped {0}"]

# Ruiz et al., CVPR 2023 (arXiv:2208.12242): Table 1 (subject fidelity DINO, CLIP-I and prompt
# fidelity CLIP-T over the dataset's 30 subjects), Table 3 (the prior-preservation ablation, Imagen)
# and Table 4 (the class-noun ablation), as data in clip_jax/assets/paper_numbers.csv.
def paper_table_rows() -> list[tuple[str, str, dict[str, float]]]:
  """[(setting, 'Table N (note)', {metric: value})], one per (table, setting), in file order."""
  from clip_jax.eval.paper_results import paper_rows
  grouped: dict[tuple[str, str], dict[str, float]] = {}
  notes: dict[tuple[str, str], str] = {}
  for row in paper_rows("DreamBooth"):
    key = (row.model, row.source)
    grouped.setdefault(key, {})[row.metric] = row.value
    notes.setdefault(key, row.note)
  return [(model, f"{source} ({notes[(model, source)]})" if notes[(model, source)] else source, values)
          for (model, source), values in grouped.items()]


METRICS = ("dino", "clip_i", "clip_t", "pres", "div")
# The flag that gives each metric its network; a metric whose network was not given is left out.
METRIC_FLAGS = {"dino": "--dino", "clip_i": "--clip", "clip_t": "--clip", "pres": "--dino and --class-images > 0",
                "div": "--lpips-backbone"}
METRIC_NAMES = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "pres": "PRES", "div": "DIV"}


def left_out_note(ours: dict[str, float]) -> str:
  """'Our row leaves out (no network given): DIV (needs --lpips-backbone).' for the metrics missing
  from `ours` (a results dict), grouped by the flag that provides them; '' when none are missing."""
  missing = [m for m in METRICS if m not in ours]
  if not missing:
    return ""
  by_flag: dict[str, list[str]] = {}
  for metric in missing:
    by_flag.setdefault(METRIC_FLAGS[metric], []).append(METRIC_NAMES[metric])
  return "Our row leaves out (no network given): " + "; ".join(
      f"{', '.join(names)} (needs {flag})" for flag, names in by_flag.items()) + "."


def evaluation_prompts(identifier: str, class_noun: str, live: bool) -> list[str]:
  """The paper's 25 prompts for a live subject (pets) or an object."""
  subject = f"{identifier} {class_noun}"
  middle = ACCESSORIZATION if live else OBJECT_CONTEXTS
  return [p.format(subject) for p in RECONTEXTUALIZATION + middle + PROPERTY_CHANGE]


def markdown_table(ours: dict[str, float], label: str) -> str:
  rows = [(label, "", ours)] + paper_table_rows()
  lines = ["| model | DINO ↑ | CLIP-I ↑ | CLIP-T ↑ | PRES ↓ | DIV ↑ | source |", "|---|---|---|---|---|---|---|"]
  for name, source, values in rows:
    cells = [f"{values[m]:.3f}" if m in values else "" for m in METRICS]
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {source} |")
  note = left_out_note(ours)
  return "\n".join(lines) + (f"\n\n{note}" if note else "") + (
      "\n\nPaper rows: Ruiz et al. 2023, Table 1 (DINO, CLIP-I, CLIP-T; DreamBooth and Textual "
      "Inversion), Table 3 (prior preservation, Imagen: PRES, DIV, DINO, CLIP-I, CLIP-T) and "
      "Table 4 (class noun: DINO, CLIP-I).\n")


def evaluate_subject(pipe, params, metrics, real_images: Sequence[np.ndarray], *, identifier: str, class_noun: str,
                     live: bool, images_per_prompt: int, class_images: int, steps: int, guidance: float,
                     sampler: str, seed: int, num_prompts: int | None = None, batch_size: int = 8):
  """(results, generated uint8 [n, H, W, 3], their prompts) for one subject."""
  from dreambooth_jax.sampling import pipeline as sd
  prompts = evaluation_prompts(identifier, class_noun, live)[:num_prompts]
  per_image = [p for p in prompts for _ in range(images_per_prompt)]

  def generate(texts, rng_offset):
    out = []
    for start in range(0, len(texts), batch_size):
      out.append(sd.generate(pipe, params, texts[start:start + batch_size], num_steps=steps,
                             guidance_scale=guidance, sampler=sampler,
                             rng=jax.random.fold_in(jax.random.key(seed), rng_offset + start)))
    return np.concatenate(out)

  generated = generate(per_image, 0)
  class_generated = generate([f"a {class_noun}"] * class_images, 1_000_000) if class_images else None
  results = metrics.evaluate(list(generated), real=list(real_images), prompts=per_image,
                             class_images=None if class_generated is None else list(class_generated),
                             identifier=identifier)
  return results, generated, per_image


def run_record(model_dir: str) -> tuple[dict, str | None]:
  """(record, the file it came from) of the run that made `model_dir`: its own identifier.json (the
  trainer's export holds one) or the run folder's above it (exports made before it did); ({}, None)
  when neither holds a usable one. The record has 'identifier' and, from runs since session 26,
  'class_noun' (older runs: read back from their 'class_prompt', "a {class noun}")."""
  import json
  for folder in (model_dir, os.path.dirname(os.path.normpath(model_dir))):
    path = os.path.join(folder, IDENTIFIER_FILE)
    if os.path.isfile(path):
      try:
        with open(path) as f:
          record = json.load(f)
        identifier = record.get("identifier")
      except (OSError, ValueError, AttributeError):
        continue
      if isinstance(identifier, str) and identifier:
        class_prompt = record.get("class_prompt")
        if not record.get("class_noun") and isinstance(class_prompt, str) and class_prompt.startswith("a "):
          record["class_noun"] = class_prompt[len("a "):]
        return record, path
  return {}, None


def run_identifier(model_dir: str) -> tuple[str | None, str | None]:
  """(identifier, the file it came from) of the run that made `model_dir` (`run_record`); (None, None)
  when it has none."""
  record, path = run_record(model_dir)
  return record.get("identifier"), path


def resolve_identifier(given: str | None, model_dir: str) -> str:
  """The identifier to evaluate with: the run's (`run_identifier`) when --identifier is not given or
  agrees with it. Raises clip_jax.cli.UserError when they disagree (every prompt would name a token
  the model never learned, and the numbers would look like a poor subject fit), or when neither is
  known. Prints where a default came from."""
  from clip_jax.cli import UserError
  found, path = run_identifier(model_dir)
  if found is None:
    if given is None:
      raise UserError(f"{model_dir} has no {IDENTIFIER_FILE} (nor has its parent folder): pass --identifier, "
                      "the rare token the model was trained with.")
    return given
  if given is not None and given != found:
    raise UserError(f"--identifier {given!r} is not the one this model was trained with: {path} says {found!r}. "
                    f"Drop --identifier (the run's is the default) or pass --identifier {found}.")
  if given is None:
    print(f"Identifier {found!r} (from {path})", flush=True)
  return found


def resolve_class_noun(given: str | None, model_dir: str) -> str:
  """The class noun of the evaluation prompts ("a [V] dog", and "a dog" for PRES): --class-noun, or the
  run's (`run_record`) when not given. Another noun than the run's is allowed (a prompt ablation, as
  the paper's Table 4 varies it in training) and said in one line. Raises clip_jax.cli.UserError
  when neither is known."""
  from clip_jax.cli import UserError
  record, path = run_record(model_dir)
  found = record.get("class_noun")
  if given is None:
    if not found:
      raise UserError(f"{model_dir} records no class noun (no {IDENTIFIER_FILE} with one here or in its parent "
                      "folder): pass --class-noun, the noun the model was trained with (e.g. dog).")
    print(f"Class noun {found!r} (from {path})", flush=True)
    return found
  if found and given != found:
    print(f"Note: --class-noun {given!r} differs from the run's {found!r} ({path}): the prompts say "
          f"'{record['identifier']} {given}'.", flush=True)
  return given


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m dreambooth_jax.evaluate", description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True, help="the fine-tuned diffusers folder (the trainer's export/)")
  parser.add_argument("--instance-dir", required=True, help="the subject's real photos")
  parser.add_argument("--class-noun", default=None,
                      help="the subject's class, e.g. dog (default: the run's, from identifier.json like --identifier)")
  parser.add_argument("--identifier", default=None,
                      help="the rare token the model was trained with (default: the run's, from identifier.json "
                           "in --model or its parent folder; needed for a model without one)")
  parser.add_argument("--live", action="store_true", help="a live subject (pets): accessorisation prompts")
  parser.add_argument("--clip", help="CLIP checkpoint for CLIP-I / CLIP-T (file, HF dir or workdir)")
  parser.add_argument("--dino", help="ViT-S/16 DINO weights (timm or DINO layout) for DINO and PRES")
  parser.add_argument("--lpips-backbone", help="torchvision AlexNet weights for LPIPS (DIV)")
  parser.add_argument("--images-per-prompt", type=int, default=4)
  parser.add_argument("--class-images", type=int, default=25, help="images of 'a [class noun]' for PRES")
  parser.add_argument("--num-prompts", type=int, default=None, help="use only the first N of the 25 prompts")
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--guidance", type=float, default=7.5)
  parser.add_argument("--sampler", default="ddim")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  try:
    args.identifier = resolve_identifier(args.identifier, args.model)
    args.class_noun = resolve_class_noun(args.class_noun, args.model)
  except ValueError as e:
    from clip_jax import cli
    return cli.print_user_error(str(e), e)
  if not (args.clip or args.dino or args.lpips_backbone):
    parser.error("give at least one of --clip, --dino, --lpips-backbone: each metric needs its network.")
  from clip_jax.data.images import to_rgb
  from dreambooth_jax.training import data as db_data
  from dreambooth_jax.sampling import pipeline as sd
  from dreambooth_jax.eval.metrics import SubjectMetrics
  from clip_jax.observe import save_image_grid, save_results
  try:
    pipe = sd.load_pipeline(args.model)
    real, _ = db_data.load_image_folder(args.instance_dir, "instance")
    metrics = SubjectMetrics.from_files(clip=args.clip, dino=args.dino, lpips_backbone=args.lpips_backbone)
  except (OSError, ValueError) as e:
    from clip_jax import cli
    return cli.print_user_error(str(e), e)
  real = [np.asarray(to_rgb(image)[0]) for image in real]
  prompts = evaluation_prompts(args.identifier, args.class_noun, args.live)[:args.num_prompts]
  results, generated, _ = evaluate_subject(
      pipe, pipe.params, metrics, real, identifier=args.identifier, class_noun=args.class_noun, live=args.live,
      images_per_prompt=args.images_per_prompt, class_images=args.class_images if args.dino else 0,
      steps=args.steps, guidance=args.guidance, sampler=args.sampler, seed=args.seed, num_prompts=args.num_prompts)
  settings = evaluation_settings(args, prompts)
  label = f"ours: {os.path.basename(os.path.normpath(args.model))}"
  written = save_results(os.path.join(args.out, "results.json"), {"model": args.model, **results, "settings": settings},
                         lambda data: markdown_table(data, label) + settings_markdown(data["settings"]))
  shown = min(4, len(prompts))
  grid = save_image_grid(generated[: shown * args.images_per_prompt], os.path.join(args.out, "samples.png"),
                         columns=args.images_per_prompt, labels=prompts[:shown],
                         title=f"{label}: the first {shown} of {len(prompts)} prompts, seed {args.seed}")
  print(markdown_table(written, label) + settings_markdown(settings))
  print(f"Wrote {os.path.join(args.out, 'results.json')}, results.md and {grid}")
  return 0


def evaluation_settings(args: argparse.Namespace, prompts: Sequence[str]) -> dict:
  """What made the numbers: the model, subject, metric networks, prompts, sampler, steps, guidance,
  seed and package versions (results.json's 'settings'; a rerun with other settings moves the old
  results aside instead of mixing them)."""
  from clip_jax.observe import package_versions
  keys = ("model", "instance_dir", "class_noun", "identifier", "live", "clip", "dino", "lpips_backbone",
          "images_per_prompt", "class_images", "num_prompts", "steps", "guidance", "sampler", "seed")
  return {**{k: getattr(args, k) for k in keys}, "class_images": args.class_images if args.dino else 0,
          "prompts": list(prompts), "class_prompt": f"a {args.class_noun}", "versions": package_versions()}


def settings_markdown(settings: dict) -> str:
  networks = ", ".join(f"{k} `{settings[k]}`" for k in ("clip", "dino", "lpips_backbone") if settings.get(k))
  return (f"\nSettings: model `{settings['model']}`, subject `{settings['instance_dir']}` "
          f"('{settings['identifier']} {settings['class_noun']}'), {len(settings['prompts'])} prompts x "
          f"{settings['images_per_prompt']} images, {settings['class_images']} class images for PRES; "
          f"{settings['sampler']} {settings['steps']} steps, guidance {settings['guidance']}, seed {settings['seed']}; "
          f"networks: {networks}.\n"
          + "Versions: " + ", ".join(f"{k} {v}" for k, v in settings.get("versions", {}).items()) + "\n")


if __name__ == "__main__":
  from clip_jax import cli
  cli.run(main)  # user mistakes: one line, exit code 2
