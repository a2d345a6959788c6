r"""A small-scale reproduction of DreamBooth's Table 3 (prior preservation on / off) with no download.

    python -m dreambooth_jax.embedded.table3 --workdir runs/table3 [--pretrain_dir runs/digits_sd] [--steps 200]

1. The base model: the tiny Stable Diffusion of `dreambooth_jax.embedded.pretrain`, trained on grey
   handwritten digits (trained into <workdir>/base first when --pretrain_dir holds none).
2. The subject: 4 images of one particular held-out seven drawn in red ink, shifted by a few pixels.
   The base model never saw coloured ink, so "a seven" never gives it.
3. DreamBooth (`train.train_and_export`, configs/dreambooth/digits.py:text: UNet and text encoder)
   with and without the prior-preservation loss, from the same identifier and seed.
4. For the base model and both fine-tuned ones, with each of 3 seeds (DreamBooth's seed, its
   identifier and the sampling noise), 16 images for "a [V] seven" and 16 for "a seven", and the
   paper's metrics (Ruiz et al. 2023, Sec. 4.1 and 4.3) with the embedders that exist here:
   - CLIP-I / CLIP-T with the digits CLIP (the README's first command, `workdirs/digits`; trained if
     absent): mean cosine of CLIP image embeddings over all ("a [V] seven" image, real subject image)
     pairs, and of each "a [V] seven" image with its prompt less the identifier ("a seven"),
   - VAE-I: the same as CLIP-I with the base VAE's encoder (posterior mean, 8x8x4 flattened, centred
     on the training digits' mean latent; the only encoder here that was trained on colour),
   - PRES: the same pairs for the "a seven" images (the paper uses DINO; here CLIP and VAE),
   - DIV: mean cosine distance between images of the same prompt, "a [V] seven" (the paper uses
     LPIPS; here 1 - cos of CLIP or VAE embeddings), and the same for "a seven",
   - prompt accuracy: the share of images the independent digit classifier
     (`dreambooth_jax.eval.digit_classifier`, an SVM on pixels) reads as a seven,
   - red ink: the fraction of ink pixels in a red-to-orange hue (the subject's one trait the base
     model lacks).
   Mean and sample standard deviation over the seeds; the paper's Table 3 (Imagen) beside.
Outputs: <workdir>/table3.md, table3.json, grids/*.png; the paths are printed at the end.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import loop
from clip_jax.data import digits as digits_lib
from clip_jax.observe import write_atomic
from dreambooth_jax.training import data as db_data
from dreambooth_jax.training import identifier as ident
from dreambooth_jax.eval import digit_classifier
from dreambooth_jax.eval import metrics as db_metrics
from dreambooth_jax.sampling import pipeline as sd
from dreambooth_jax.embedded import pretrain as pretrain_lib
from dreambooth_jax import train as db_train

SUBJECT_DIGIT = 7
SUBJECT_INK = np.array([205.0, 25.0, 25.0])  # red: no training image has coloured ink
SUBJECT_SHIFTS = ((0, 0), (2, 0), (0, 2), (-2, -1))  # (dx, dy) pixels at 32 px: the subject's "poses"
VARIANTS = (("base", None), ("no prior preservation", "noprior"), ("prior preservation", ""))
SEEDS = (0, 1, 2)
DIGITS_CLIP = pretrain_lib.DIGITS_CLIP
# (key, column header): the table's columns, in order.
COLUMNS = (("clip_i", "CLIP-I ↑"), ("vae_i", "VAE-I ↑"), ("clip_t", "CLIP-T ↑"),
           ("pres_clip", "PRES (CLIP) ↓"), ("pres_vae", "PRES (VAE) ↓"),
           ("div_clip", "DIV (CLIP) ↑"), ("div_vae", "DIV (VAE) ↑"), ("class_div_clip", "DIV \"a seven\" (CLIP) ↑"),
           ("seven_subject_prompt", "read as 7, \"a [V] seven\""), ("seven_class_prompt", "read as 7, \"a seven\""),
           ("red_ink_subject_prompt", "red ink, \"a [V] seven\""), ("red_ink_class_prompt", "red ink, \"a seven\""))
# The paper's Table 3 metrics, and the column of ours that stands for each (PRES: DINO there, CLIP
# here; DIV: LPIPS there, CLIP cosine distance here).
PAPER_COLUMNS = (("dino", None, "DINO ↑"), ("clip_i", "clip_i", "CLIP-I ↑"), ("clip_t", "clip_t", "CLIP-T ↑"),
                 ("pres", "pres_clip", "PRES ↓"), ("div", "div_clip", "DIV ↑"))


# ----------------------------------------------------------------------------- the subject
def subject_images(image_size: int = 32) -> np.ndarray:
  """uint8 [4, s, s, 3]: the first held-out seven, red ink on white, shifted a little per image."""
  source = digits_lib.DigitsSource("test", image_size=image_size)
  index = int(np.flatnonzero(source.labels == SUBJECT_DIGIT)[0])
  grey = source[index]["image"][..., 0].astype(np.float32)  # [s, s], 255 = paper
  images = []
  for dx, dy in SUBJECT_SHIFTS:
    shifted = np.full_like(grey, 255.0)
    src = grey[max(0, -dy):image_size - max(0, dy), max(0, -dx):image_size - max(0, dx)]
    shifted[max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
    ink = 1.0 - shifted[..., None] / 255.0
    images.append(np.round(255.0 * (1.0 - ink) + SUBJECT_INK * ink).astype(np.uint8))
  return np.stack(images)


def subject_paths(directory: str, count: int = len(SUBJECT_SHIFTS)) -> list[str]:
  """Where `write_subject` puts the subject's images: `directory`/subject_{i}.png."""
  return [os.path.join(directory, f"subject_{i}.png") for i in range(count)]


def write_subject(directory: str, images: np.ndarray) -> str:
  os.makedirs(directory, exist_ok=True)
  for image, path in zip(images, subject_paths(directory, len(images))):
    db_data.write_png_atomically(image, path)  # a killed write leaves no half image to train on
  return directory


# ----------------------------------------------------------------------------- the embedder and metrics
class VaeEmbedder:
  """Images -> the base VAE's posterior means, flattened and centred on the training digits'
  mean latent (without centring, every digit image shares most of its latent: the white paper)."""

  def __init__(self, pipe: sd.StableDiffusion, reference_images: np.ndarray):
    self._encode = jax.jit(lambda p, x: pipe.vae.apply({"params": p}, x, method="encode")[0])
    self._params = pipe.params["vae"]
    self._centre = 0.0
    self._centre = np.mean(self(reference_images), axis=0)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """uint8 [n, s, s, 3] -> float32 [n, (s/4)^2 * 4]."""
    pixels = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
    mean = np.asarray(self._encode(self._params, pixels))
    return mean.reshape(len(images), -1) - self._centre


def red_ink_fraction(images: np.ndarray) -> float:
  """Of the pixels that are ink (clearly darker than paper in some channel), the fraction drawn in a
  red-to-orange hue (red the largest channel and far above the smallest): 0 for grey digits, 1 for
  the subject. Orange counts because the tiny VAE decodes the subject's red somewhat orange."""
  pixels = images.astype(np.float32)
  ink = pixels.min(axis=-1) < 160
  red = (pixels[..., 0] >= pixels.max(axis=-1)) & (pixels[..., 0] - pixels.min(axis=-1) > 60)
  return float(np.sum(ink & red) / max(int(np.sum(ink)), 1))


def read_as_fraction(images: np.ndarray, digit: int) -> float:
  """Share of uint8 images [n, s, s, 3] the independent digit classifier reads as `digit`."""
  return digit_classifier.accuracy_by_digit(images, np.full(len(images), digit))["overall"]


def score(vae: VaeEmbedder, clip, real: np.ndarray, subject_gen: np.ndarray, class_gen: np.ndarray,
          subject_text: str) -> dict[str, float]:
  """The table's metrics (COLUMNS) for one model: subject_gen / class_gen uint8 [n, s, s, 3] from
  "a [V] seven" / "a seven", real uint8 [m, s, s, 3] the subject; subject_text: the subject prompt
  less the identifier (CLIP-T's text). clip: a `metrics.SubjectMetrics` with a CLIP, or None (the
  CLIP columns are then left out)."""
  real_vae, subject_vae, class_vae = vae(real), vae(subject_gen), vae(class_gen)
  out = {"vae_i": float(db_metrics.mean_pairwise_cosine(subject_vae, real_vae)),
         "pres_vae": float(db_metrics.prior_preservation(class_vae, real_vae)),
         "div_vae": db_metrics.embedding_diversity(subject_vae),
         "class_div_vae": db_metrics.embedding_diversity(class_vae),
         "seven_subject_prompt": read_as_fraction(subject_gen, SUBJECT_DIGIT),
         "seven_class_prompt": read_as_fraction(class_gen, SUBJECT_DIGIT),
         "red_ink_subject_prompt": red_ink_fraction(subject_gen),
         "red_ink_class_prompt": red_ink_fraction(class_gen)}
  if clip is not None:
    real_clip, subject_clip = clip.clip_image_embeddings(real), clip.clip_image_embeddings(subject_gen)
    class_clip = clip.clip_image_embeddings(class_gen)
    out.update(clip_i=float(db_metrics.clip_i(subject_clip, real_clip)),
               clip_t=float(db_metrics.clip_t(subject_clip, clip.clip_text_embeddings([subject_text]))),
               pres_clip=float(db_metrics.prior_preservation(class_clip, real_clip)),
               div_clip=db_metrics.embedding_diversity(subject_clip),
               class_div_clip=db_metrics.embedding_diversity(class_clip))
  return out


def summarise(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, Any]]]:
  """[{row: {metric: value}} for each seed] -> {row: {metric: {'mean', 'sd', 'values'}}}: sd is the
  sample standard deviation over seeds (ddof 1; 0.0 for a single seed). A metric missing from any
  seed's row is left out of that row."""
  if not per_seed:
    raise ValueError("summarise needs the rows of at least one seed.")
  out: dict[str, dict[str, dict[str, Any]]] = {}
  for row in per_seed[0]:
    common = set.intersection(*(set(seed_rows[row]) for seed_rows in per_seed))
    out[row] = {}
    for metric in (k for k in per_seed[0][row] if k in common):
      values = np.array([seed_rows[row][metric] for seed_rows in per_seed], np.float64)
      out[row][metric] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                          "values": values.tolist()}
  return out


def paper_table3() -> dict[str, dict[str, float]]:
  """The paper's Table 3 (Imagen, 15 subjects) as {setting: {metric: value}}, from the paper-numbers CSV."""
  from clip_jax.eval.paper_results import paper_rows
  rows: dict[str, dict[str, float]] = {}
  for row in paper_rows("DreamBooth"):
    if row.table == "3":
      rows.setdefault(row.model, {})[row.metric] = row.value
  return rows


# ----------------------------------------------------------------------------- the table
def markdown_table(summary: dict[str, dict[str, dict]], real: dict[str, float], meta: dict,
                   paper: dict[str, dict[str, float]]) -> str:
  """Ours (mean ± sd over seeds, the COLUMNS that were computed), the real subject's reference row,
  then ours in the paper's five columns beside the paper's Table 3."""
  columns = [(k, h) for k, h in COLUMNS if any(k in r for r in summary.values())]
  fmt = lambda s: f"{s['mean']:.3f} ± {s['sd']:.3f}"  # noqa: E731
  lines = ["| model | " + " | ".join(h for _, h in columns) + " |", "|---" * (len(columns) + 1) + "|"]
  for name, r in summary.items():
    lines.append(f"| {name} | " + " | ".join(fmt(r[k]) if k in r else "" for k, _ in columns) + " |")
  lines.append("| real subject images (reference) | " + " | ".join(
      f"{real[k]:.3f}" if k in real else "" for k, _ in columns) + " |")
  seeds = meta["seeds"]
  notes = [
      "",
      f"Mean ± sample standard deviation over {len(seeds)} seeds ({', '.join(map(str, seeds))}: DreamBooth's seed, "
      f"its identifier and the sampling noise); identifiers {', '.join(repr(i) for i in meta['identifiers'])}. "
      f"Subject: 4 images of one held-out handwritten seven in red ink; prompts \"a [V] seven\" / \"{meta['class_prompt']}\"; "
      f"{meta['images_per_prompt']} images per prompt per model and seed ({meta['sampler']}, {meta['sample_steps']} "
      f"steps, guidance {meta['guidance_scale']}).",
      f"DreamBooth: {meta['dreambooth_steps']} steps, full UNet, lr {meta['learning_rate']}, "
      f"{meta['num_class_images']} class images, prior weight 1.",
      "CLIP-I, CLIP-T, PRES (CLIP), DIV (CLIP): the digits CLIP "
      f"({meta['clip']}); VAE-I, PRES (VAE), DIV (VAE): the base VAE encoder's centred posterior means. "
      "DIV: mean cosine distance between images of one prompt (the paper: LPIPS). Read as 7: the independent "
      "digit classifier (an SVM on pixels). Red ink: share of ink pixels in a red-to-orange hue.",
  ]
  if meta.get("base_prompt_accuracy") is not None:
    notes.append(f"The base model draws the named digit for {100 * meta['base_prompt_accuracy']:.1f}% of "
                 "\"a zero\" ... \"a nine\" images (pretrain.json).")
  lines += notes + ["", "Beside the paper's Table 3 (Imagen, 15 subjects; its PRES is DINO, its DIV LPIPS; ours: "
                    "the digits CLIP for PRES, its cosine distance for DIV):", ""]
  lines += ["| model | " + " | ".join(h for _, _, h in PAPER_COLUMNS) + " | source |",
            "|---" * (len(PAPER_COLUMNS) + 2) + "|"]
  for name in ("no prior preservation", "prior preservation"):
    r = summary.get(name, {})
    lines.append(f"| ours: {name} | " + " | ".join(
        f"{r[ours]['mean']:.3f}" if ours in r else "" for _, ours, _ in PAPER_COLUMNS) + " | embedded digits |")
  for name, values in paper.items():
    lines.append(f"| paper: {name} | " + " | ".join(
        f"{values[m]:.3f}" if m in values else "" for m, _, _ in PAPER_COLUMNS) + " | Ruiz et al. 2023, Table 3 |")
  return "\n".join(lines) + "\n"


def run(workdir: str, pretrain_dir: str | None = None, pretrain_cfg=None, dreambooth_steps: int | None = None,
        images_per_prompt: int = 16, config_args: str = "text", progress: bool = True, seeds=SEEDS,
        clip: str | None = DIGITS_CLIP) -> dict[str, Any]:
  """The whole experiment; returns the per-seed rows, their summary and the paths written.
  clip: the CLIP for CLIP-I / CLIP-T / PRES / DIV (trained at DIGITS_CLIP if that is absent); None:
  those columns are left out."""
  from configs.dreambooth import digits as digits_config
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  pretrain_dir = pretrain_dir or os.path.join(workdir, "base")
  if not pretrain_lib.is_pretrained(pretrain_dir):
    pretrain_lib.pretrain(pretrain_cfg or pretrain_lib.get_config(), pretrain_dir, progress=progress)
  pretrain_seconds = time.time() - start
  base_dir = os.path.join(pretrain_dir, "export")
  base = sd.load_pipeline(base_dir)
  base_summary_path = os.path.join(pretrain_dir, "pretrain.json")
  base_accuracy = None
  if os.path.isfile(base_summary_path):
    with open(base_summary_path) as f:
      base_accuracy = json.load(f).get("prompt_accuracy", {}).get("overall")

  real = subject_images(base.default_size)
  instance_dir = write_subject(os.path.join(workdir, "subject"), real)
  grey_digits, _ = pretrain_lib.load_digits(base.default_size)
  vae = VaeEmbedder(base, np.round((grey_digits[:256] + 1.0) * 127.5).astype(np.uint8))
  if clip is not None and clip == DIGITS_CLIP:
    pretrain_lib.ensure_digits_clip(clip)
  elif clip is not None:
    from clip_jax.child_runs import warn_if_unfinished
    warn_if_unfinished(clip, "--clip")  # a CLIP given by the user is used as it is, never trained here
  clip_metrics = db_metrics.SubjectMetrics.from_files(clip=clip) if clip is not None else None

  per_seed, grids, meta = [], {}, {"seeds": list(seeds), "identifiers": [], "clip": clip,
                                   "base_prompt_accuracy": base_accuracy}
  for seed in seeds:
    params_by_variant = {"base": base.params}
    for name, arg in VARIANTS[1:]:
      cfg = digits_config.get_config(",".join(a for a in (arg, config_args) if a))
      cfg.pretrained_model = base_dir
      cfg.instance_dir = instance_dir
      cfg.progress_bar = progress
      cfg.seed = seed
      if dreambooth_steps:
        cfg.total_steps = dreambooth_steps
      out = db_train.train_and_export(cfg, os.path.join(workdir, "runs", f"seed{seed}", arg or "prior"))
      if out["stop_requested"]:  # SIGTERM / Ctrl-C: that run is saved (or finished); the same command resumes
        raise SystemExit(loop.EXIT_PREEMPTED)
      # The exported folder, read back: what a user of the fine-tuned model gets. Its params go
      # through the base pipeline object so that sampling compiles once for all models.
      params_by_variant[name] = sd.load_pipeline(out["export_dir"]).params
      meta.update(class_prompt=ident.class_prompt(cfg.class_noun), dreambooth_steps=cfg.total_steps,
                  learning_rate=cfg.optimizer.learning_rate, num_class_images=cfg.num_class_images,
                  sampler=cfg.validation.sampler, sample_steps=cfg.validation.steps,
                  guidance_scale=cfg.validation.guidance_scale, images_per_prompt=images_per_prompt)
    meta["identifiers"].append(out["identifier"])  # one per seed (both variants draw it from the seed)
    prompts = {"instance_prompt": ident.instance_prompt(out["identifier"], cfg.class_noun),
               "class_prompt": meta["class_prompt"]}
    rows = {}
    for index, (name, _) in enumerate(VARIANTS):
      generated = {}
      for k, (which, prompt) in enumerate(prompts.items()):
        # Same noise for every model of a seed: differences come from the weights, not the noise.
        rng_seed = 1234 + 10 * seed + k
        generated[which] = sd.generate(base, params_by_variant[name], [prompt] * images_per_prompt,
                                       num_steps=meta["sample_steps"], guidance_scale=meta["guidance_scale"],
                                       sampler=meta["sampler"], rng=jax.random.key(rng_seed))
        slug = f"seed{seed}_{('base', 'noprior', 'prior')[index]}_{which}"
        grids[slug] = db_train.save_grid(
            generated[which], os.path.join(workdir, "grids", f"{slug}.png"), columns=8,
            title=f"{name}, seed {seed}: '{prompt}' ({meta['sampler']} {meta['sample_steps']} steps, guidance "
                  f"{meta['guidance_scale']}, noise seed {rng_seed})")
      rows[name] = score(vae, clip_metrics, real, generated["instance_prompt"], generated["class_prompt"],
                         db_metrics.strip_identifier(prompts["instance_prompt"], out["identifier"]))
    per_seed.append(rows)
  grids["subject"] = db_train.save_grid(real, os.path.join(workdir, "grids", "subject.png"), columns=4,
                                       title=f"the subject: {len(real)} real images")
  real_vae = vae(real)
  real_stats = {"vae_i": float(db_metrics.mean_pairwise_cosine(real_vae, real_vae)),
                "seven_subject_prompt": read_as_fraction(real, SUBJECT_DIGIT),
                "red_ink_subject_prompt": red_ink_fraction(real)}
  if clip_metrics is not None:
    real_clip = clip_metrics.clip_image_embeddings(real)
    real_stats["clip_i"] = float(db_metrics.mean_pairwise_cosine(real_clip, real_clip))

  summary = summarise(per_seed)
  paper = paper_table3()
  table = markdown_table(summary, real_stats, meta, paper)
  seconds = time.time() - start
  result = {"summary": summary, "per_seed": per_seed, "real_subject": real_stats, "meta": meta, "paper": paper,
            "grids": grids, "base_model": base_dir, "seconds": round(seconds, 1),
            "pretrain_seconds": round(pretrain_seconds, 1)}
  paths = {"markdown": os.path.join(workdir, "table3.md"), "json": os.path.join(workdir, "table3.json")}
  write_atomic(paths["markdown"], table)
  write_atomic(paths["json"], json.dumps(result, indent=2) + "\n")
  result.update(table=table, paths=paths)
  return result


def main(argv=None):
  import argparse
  parser = argparse.ArgumentParser(
      prog="python -m dreambooth_jax.embedded.table3",
      description="DreamBooth's Table 3 at toy scale: pretrain a tiny SD on the embedded digits (if needed), "
                  "fine-tune it on a red seven with and without prior preservation, report subject fidelity, "
                  "PRES and DIV.")
  parser.add_argument("--workdir", required=True, help="output folder (table3.md, table3.json, grids/, runs/)")
  parser.add_argument("--pretrain_dir", default=None,
                      help="a `dreambooth_jax.embedded.pretrain` workdir to reuse (default: WORKDIR/base, trained if absent)")
  parser.add_argument("--steps", type=int, default=None, help="DreamBooth steps (default: the config's)")
  parser.add_argument("--images_per_prompt", type=int, default=16)
  parser.add_argument("--pretrain_vae_steps", type=int, default=None)
  parser.add_argument("--pretrain_unet_steps", type=int, default=None)
  # 'text': the text encoder trains with the UNet. With the base model's frozen digits-CLIP encoder,
  # "a [V] seven" and "a seven" start nearly equal, and without it prior preservation did not protect
  # the class (WORKSPACE.md, embedded DreamBooth).
  parser.add_argument("--config_args", default="text",
                      help="arguments for configs/dreambooth/digits.py (default 'text'), e.g. text,runlocal; '' for none")
  parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="DreamBooth seeds, comma-separated")
  parser.add_argument("--clip", default=DIGITS_CLIP,
                      help=f"the CLIP for CLIP-I/CLIP-T/PRES/DIV (default {DIGITS_CLIP}, trained there if absent); "
                           "'' to leave those columns out")
  args = parser.parse_args(argv)
  try:
    seeds = tuple(int(x) for x in args.seeds.split(",") if x.strip())
  except ValueError:
    parser.error(f"--seeds {args.seeds!r}: give integers separated by commas, e.g. 0,1,2.")
  if not seeds:
    parser.error("--seeds is empty.")
  if args.clip and args.clip != DIGITS_CLIP and not os.path.exists(args.clip):
    from clip_jax.cli import MissingPathError
    raise MissingPathError(f"--clip {args.clip}: no such file or directory.")
  if args.images_per_prompt < 2:
    parser.error("--images_per_prompt must be at least 2 (DIV compares images of one prompt).")
  cfg = pretrain_lib.get_config()
  if args.pretrain_vae_steps:
    cfg.vae.steps = args.pretrain_vae_steps
  if args.pretrain_unet_steps:
    cfg.unet.steps = args.pretrain_unet_steps
  result = run(args.workdir, args.pretrain_dir, cfg, args.steps, args.images_per_prompt, args.config_args,
               seeds=seeds, clip=args.clip or None)
  print(result["table"])
  print(f"Table: {result['paths']['markdown']}\nJSON: {result['paths']['json']}\n"
        f"Grids: {os.path.join(args.workdir, 'grids')} (subject, then per seed base/noprior/prior x instance/class "
        "prompt)\n"
        f"Took {result['seconds']:.0f} s (pretraining {result['pretrain_seconds']:.0f} s).", flush=True)


if __name__ == "__main__":
  from clip_jax import cli
  cli.run(main)  # user mistakes: one line, exit code 2
