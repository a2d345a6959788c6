r"""A small-scale reproduction of DreamBooth's Table 3 (prior preservation on / off) with no download.

    python -m dreambooth_jax.embedded.table3 --workdir runs/table3 [--pretrain_dir runs/digits_sd] [--steps 200]

1. The base model: the tiny Stable Diffusion of `dreambooth_jax.embedded.pretrain`, trained on grey
   handwritten digits (trained into <workdir>/base first when --pretrain_dir holds none).
2. The subject: 4 images of one particular held-out seven drawn in red ink, shifted by a few pixels.
   The base model never saw coloured ink, so "a seven" never gives it.
3. DreamBooth (`train.train_and_export`, configs/dreambooth/digits.py) with and without the
   prior-preservation loss, from the same identifier and seed.
4. For the base model and both fine-tuned ones: images for "a [V] seven" and for "a seven", and
   - subject fidelity: mean cosine similarity over all (generated "a [V] seven", real subject) pairs,
   - PRES: the same for the "a seven" images (lower = less of the subject leaked into the class),
   - DIV: mean cosine distance between the "a seven" images (higher = more varied),
   - red ink: the fraction of ink pixels in a red-to-orange hue, per prompt (a direct read of the
     subject's one trait the base model lacks).
   The embedder is the base model's own VAE encoder (posterior mean, 8x8x4 flattened, centred on
   the mean latent of the training digits): the paper's DINO / CLIP networks do not exist at 32 px
   without a download, and this is the only pretrained image encoder here that sees colour. It is
   named "VAE-I" in the table so nobody mistakes it for DINO.
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
from PIL import Image

from clip_jax.data import digits as digits_lib
from dreambooth_jax.training import identifier as ident
from dreambooth_jax.eval import metrics as db_metrics
from dreambooth_jax.sampling import pipeline as sd
from dreambooth_jax.embedded import pretrain as pretrain_lib
from dreambooth_jax import train as db_train

SUBJECT_DIGIT = 7
SUBJECT_INK = np.array([205.0, 25.0, 25.0])  # red: no training image has coloured ink
SUBJECT_SHIFTS = ((0, 0), (2, 0), (0, 2), (-2, -1))  # (dx, dy) pixels at 32 px: the subject's "poses"
VARIANTS = (("base", None), ("no prior preservation", "noprior"), ("prior preservation", ""))


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


def write_subject(directory: str, images: np.ndarray) -> str:
  os.makedirs(directory, exist_ok=True)
  for i, image in enumerate(images):
    Image.fromarray(image).save(os.path.join(directory, f"subject_{i}.png"))
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


def cosine_diversity(embeddings: np.ndarray) -> float:
  """DIV-style: mean cosine distance over all pairs of images from one prompt."""
  unit = embeddings / (np.linalg.norm(embeddings, axis=1, keepdims=True) + 1e-12)
  distance = lambda i, j: 1.0 - np.sum(unit[i] * unit[j], axis=1)  # noqa: E731
  return db_metrics.diversity(distance, list(embeddings))


def score(embed: VaeEmbedder, real_emb: np.ndarray, subject_gen: np.ndarray, class_gen: np.ndarray) -> dict:
  subject_emb, class_emb = embed(subject_gen), embed(class_gen)
  return {"subject_fidelity": float(db_metrics.mean_pairwise_cosine(subject_emb, real_emb)),
          "pres": float(db_metrics.prior_preservation(class_emb, real_emb)),
          "div": cosine_diversity(class_emb),
          "red_ink_subject_prompt": red_ink_fraction(subject_gen),
          "red_ink_class_prompt": red_ink_fraction(class_gen)}


# ----------------------------------------------------------------------------- the table
def markdown_table(rows: dict[str, dict], real: dict, meta: dict) -> str:
  lines = [
      "| model | subject fidelity (VAE-I) ↑ | PRES (VAE-I) ↓ | DIV (VAE cosine dist.) ↑ "
      "| red ink, \"a [V] seven\" | red ink, \"a seven\" |",
      "|---|---|---|---|---|---|"]
  for name, r in rows.items():
    lines.append(f"| {name} | {r['subject_fidelity']:.3f} | {r['pres']:.3f} | {r['div']:.3f} | "
                 f"{r['red_ink_subject_prompt']:.2f} | {r['red_ink_class_prompt']:.2f} |")
  lines.append(f"| real subject images (reference) | {real['self_similarity']:.3f} | | | "
               f"{real['red_ink']:.2f} | |")
  notes = [
      "",
      f"Subject: 4 images of one held-out handwritten seven in red ink; identifier '{meta['identifier']}', "
      f"prompts \"{meta['instance_prompt']}\" / \"{meta['class_prompt']}\"; {meta['images_per_prompt']} images "
      f"per prompt per model ({meta['sampler']}, {meta['sample_steps']} steps, guidance {meta['guidance_scale']}).",
      f"DreamBooth: {meta['dreambooth_steps']} steps, full UNet, lr {meta['learning_rate']}, "
      f"{meta['num_class_images']} class images, prior weight 1.",
      "VAE-I: cosine similarity of the base VAE encoder's centred posterior means (not DINO or CLIP: "
      "no such network exists here at 32 px); PRES uses the same embedder on \"a seven\" images. "
      "Red ink: share of ink pixels in a red-to-orange hue (0 for grey digits).",
  ]
  return "\n".join(lines + notes) + "\n"


def run(workdir: str, pretrain_dir: str | None = None, pretrain_cfg=None, dreambooth_steps: int | None = None,
        images_per_prompt: int = 16, config_args: str = "", progress: bool = True) -> dict[str, Any]:
  """The whole experiment; returns the table rows and the paths written."""
  from configs.dreambooth import digits as digits_config
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  pretrain_dir = pretrain_dir or os.path.join(workdir, "base")
  if not pretrain_lib.is_pretrained(pretrain_dir):
    pretrain_lib.pretrain(pretrain_cfg or pretrain_lib.get_config(), pretrain_dir, progress=progress)
  pretrain_seconds = time.time() - start
  base_dir = os.path.join(pretrain_dir, "export")
  base = sd.load_pipeline(base_dir)

  real = subject_images(base.default_size)
  instance_dir = write_subject(os.path.join(workdir, "subject"), real)
  grey_digits, _ = pretrain_lib.load_digits(base.default_size)
  embed = VaeEmbedder(base, np.round((grey_digits[:256] + 1.0) * 127.5).astype(np.uint8))
  real_emb = embed(real)

  rows, grids, params_by_variant, meta = {}, {}, {}, {}
  for name, arg in VARIANTS:
    if arg is None:
      params_by_variant[name] = base.params
      continue
    cfg = digits_config.get_config(",".join(a for a in (arg, config_args) if a))
    cfg.pretrained_model = base_dir
    cfg.instance_dir = instance_dir
    cfg.progress_bar = progress
    if dreambooth_steps:
      cfg.total_steps = dreambooth_steps
    run_dir = os.path.join(workdir, "runs", arg or "prior")
    out = db_train.train_and_export(cfg, run_dir)
    # The exported folder, read back: what a user of the fine-tuned model gets. Its params go
    # through the base pipeline object so that sampling compiles once for all three models.
    params_by_variant[name] = sd.load_pipeline(out["export_dir"]).params
    meta.update(identifier=out["identifier"], instance_prompt=ident.instance_prompt(out["identifier"], cfg.class_noun),
                class_prompt=ident.class_prompt(cfg.class_noun), dreambooth_steps=cfg.total_steps,
                learning_rate=cfg.optimizer.learning_rate, num_class_images=cfg.num_class_images,
                sampler=cfg.validation.sampler, sample_steps=cfg.validation.steps,
                guidance_scale=cfg.validation.guidance_scale, images_per_prompt=images_per_prompt)

  for index, (name, _) in enumerate(VARIANTS):
    params = params_by_variant[name]
    generated = {}
    for which in ("instance_prompt", "class_prompt"):
      # Same seed for every model: differences come from the weights, not the noise.
      generated[which] = sd.generate(base, params, [meta[which]] * images_per_prompt, num_steps=meta["sample_steps"],
                                     guidance_scale=meta["guidance_scale"], sampler=meta["sampler"],
                                     rng=jax.random.key(1234 + (which == "class_prompt")))
    rows[name] = score(embed, real_emb, generated["instance_prompt"], generated["class_prompt"])
    slug = ("base", "noprior", "prior")[index]
    for which, images in generated.items():
      grids[f"{slug}_{which}"] = db_train.save_grid(
          images, os.path.join(workdir, "grids", f"{slug}_{which}.png"), columns=8,
          title=f"{name}: '{meta[which]}' ({meta['sampler']} {meta['sample_steps']} steps, guidance "
                f"{meta['guidance_scale']}, seed {1234 + (which == 'class_prompt')})")
  grids["subject"] = db_train.save_grid(real, os.path.join(workdir, "grids", "subject.png"), columns=4,
                                       title=f"the subject: {len(real)} real images")
  real_stats = {"self_similarity": float(db_metrics.mean_pairwise_cosine(real_emb, real_emb)),
                "red_ink": red_ink_fraction(real)}

  table = markdown_table(rows, real_stats, meta)
  seconds = time.time() - start
  result = {"rows": rows, "real_subject": real_stats, "meta": meta, "grids": grids, "base_model": base_dir,
            "seconds": round(seconds, 1), "pretrain_seconds": round(pretrain_seconds, 1)}
  paths = {"markdown": os.path.join(workdir, "table3.md"), "json": os.path.join(workdir, "table3.json")}
  with open(paths["markdown"], "w") as f:
    f.write(table)
  with open(paths["json"], "w") as f:
    json.dump(result, f, indent=2)
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
  parser.add_argument("--config_args", default="",
                      help="extra arguments for configs/dreambooth/digits.py, e.g. runlocal")
  args = parser.parse_args(argv)
  if args.images_per_prompt < 2:
    parser.error("--images_per_prompt must be at least 2 (DIV compares images of one prompt).")
  cfg = pretrain_lib.get_config()
  if args.pretrain_vae_steps:
    cfg.vae.steps = args.pretrain_vae_steps
  if args.pretrain_unet_steps:
    cfg.unet.steps = args.pretrain_unet_steps
  result = run(args.workdir, args.pretrain_dir, cfg, args.steps, args.images_per_prompt, args.config_args)
  print(result["table"])
  print(f"Table: {result['paths']['markdown']}\nJSON: {result['paths']['json']}\n"
        f"Grids: {os.path.join(args.workdir, 'grids')} (subject, then base/noprior/prior x instance/class prompt)\n"
        f"Took {result['seconds']:.0f} s (pretraining {result['pretrain_seconds']:.0f} s).", flush=True)


if __name__ == "__main__":
  from clip_jax import cli
  cli.run(main)  # user mistakes: one line, exit code 2
