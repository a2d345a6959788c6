r"""CLIP as an objective on the embedded digits, judged by something that is not CLIP.

    python -m dreambooth_jax.embedded.clip_demos --clip workdirs/digits --sd runs/tiny_sd/export --out runs/clip_demos

(a) CLIPDraw (`clip_jax.draw`): "a handwritten {digit}." (a caption the digits CLIP was trained on)
    for all ten digits and 3 seeds, grey ink strokes on a 32 px canvas, guided by an ensemble of
    three CLIPs: --clip and two more seeds of the README's recipe (`--clip-seeds`, trained if absent).
    One CLIP alone (`--clip-seeds 1`) is fooled: its optimum is a superstimulus of that one model,
    which the judge reads as the prompt's digit only ~60% of the time; the drawings must satisfy
    three independently trained models at once, which share little besides the digit.
(b) StyleCLIP (`clip_jax.styleclip` through `dreambooth_jax.edit`): held-out scans of a three,
    encoded by the tiny SD's VAE, edited toward "a handwritten 8." by latent optimisation, by a
    mapper trained on the training split's threes, and by a global direction from "a handwritten 3."
    to "a handwritten 8." computed over those same training threes (so mapper and direction are
    applied to images they never saw).

The CLIP is shown images the way its training images looked. It was trained on 8x8 scans upscaled
bicubically to 32 px, grey, with crops of 90-100% of the area: (1) every image it judges goes
through 8 px first (`guidance.through_resolution`: box average to 8x8, bicubic back), so sharp
stroke edges or VAE texture it never saw cannot be what it answers to; (2) the views are milder
than CLIPDraw's (perspective 0.1 instead of 0.5; its accuracy on held-out scans through CLIPDraw's
views is ~36%, through these ~80%: the table's first rows); (3) the edits' VAE output is made grey
(a colour tint was a direction the grey-trained CLIP answered to blindly); (4) the edits' CLIP loss
has the source digit's prompt as a negative prompt (CLIPDraw's weight 0.3).

The judge is a scikit-learn SVM trained on the training split's pixels (8x8 ink maps, the scans'
own resolution; a drawing is averaged down to 8x8 the same way), never the CLIP that optimised. An
edit succeeds when the judge reads the target digit AND the edit is closer (pixel L2, 32 px) to its
source than a random held-out image of the target class is. Writes OUT/table.md, OUT/results.json,
OUT/drawings.png (rows: digits 0-9, each captioned with its prompt and what the judge read; columns:
the seeds' drawings, then the 8x8 ink maps the judge reads) and OUT/edits.png (rows: the sources, then each method, captioned with its scores).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import draw as draw_lib
from clip_jax import guidance, styleclip
from clip_jax.observe import save_image_grid
from dreambooth_jax import edit as edit_lib
# The judge (an SVM on 8x8 ink maps) is shared with the embedded Table 3's prompt accuracy.
from dreambooth_jax.eval.digit_classifier import IMAGE_SIZE, digit_images, ink_features, train_judge


# ----------------------------------------------------------------------------- (a) drawings
def prompt(digit: int) -> str:
  return f"a handwritten {digit}."  # CAPTION_TEMPLATES' wording with the numeral, as trained


def scan_view(scan_size: int):
  """images -> what the CLIP is shown: through `scan_size` px (`guidance.through_resolution`), or as they are (0)."""
  return (lambda x: guidance.through_resolution(x, scan_size)) if scan_size else (lambda x: x)


def view_accuracy(model, variables, prompt_emb, images, labels, augment: guidance.Augmentations, scan_size: int,
                  rng) -> float:
  """The CLIP's zero-shot accuracy on real scans [n, 32, 32, 3] (labels [n]) seen as an optimised image
  is: through `scan_size` and through `augment`'s random views (each view classified on its own)
  against prompt_emb [10, d]. Augmentations this CLIP cannot read give a guidance loss that cannot
  tell a digit from a non-digit."""
  x = scan_view(scan_size)(jnp.asarray(images))
  if augment.num:
    x = guidance.random_views(x, rng, augment, x.shape[1])
    labels = np.repeat(labels, augment.num)
  emb = guidance.image_embeddings(model, variables, x)
  return float(np.mean(np.asarray(jnp.argmax(emb @ prompt_emb.T, axis=1)) == labels))


def ensemble_prompts(model, variables, tokenizer, mesh) -> jax.Array:
  """The ten digits' text embeddings [10, d] as the CLIP paper's prompt ensemble (3.1.4: the mean of
  each class's normalised embeddings, renormalised; `zeroshot.ensemble_classifier`) over the 8
  caption templates the digits CLIP was trained with (`data.digits.captions_for`)."""
  from clip_jax.data.digits import captions_for
  from clip_jax.eval.zeroshot import ensemble_classifier
  texts = [caption for d in range(10) for caption in captions_for(d)]  # class-major
  embeddings = np.asarray(guidance.encode_prompts(model, variables, tokenizer, texts, mesh))
  return jnp.asarray(ensemble_classifier(embeddings, 10))


def digit_loss(model, variables, tokenizer, settings: draw_lib.DrawSettings, seeds: int, mesh,
               negatives: bool = True, *, ensemble: bool = False, classifier: bool = False) -> draw_lib.LossFn:
  """One CLIP's loss for all ten digits x `seeds` drawings (row s * 10 + d: seed s, digit d), with
  this CLIP's own embeddings of the prompts; see `run_drawings` for the options."""
  prompts = (ensemble_prompts(model, variables, tokenizer, mesh) if ensemble else
             guidance.encode_prompts(model, variables, tokenizer, [prompt(d) for d in range(10)], mesh))
  targets = jnp.tile(prompts, (seeds, 1))  # row s * 10 + d: seed s, digit d
  others = jnp.stack([jnp.delete(prompts, d, axis=0) for d in range(10)])  # [10, 9, dim]
  negative_emb = jnp.tile(others, (seeds, 1, 1)) if negatives else None
  fn = guidance.make_guidance_fn(model, mesh, augment=settings.augment, negative_weight=settings.negative_weight,
                                 classifier_scale=guidance.logit_scale(variables) if classifier else None)
  return draw_lib.bound_loss(fn, variables, targets, negative_emb)


def run_drawings(guides, settings: draw_lib.DrawSettings, seeds: int, mesh,
                 negatives: bool = True, seed: int = 0, *, ensemble: bool = False, classifier: bool = False):
  """All ten digits x `seeds` as one batch of drawings; returns images [seeds, 10, 32, 32, 3] and the
  draw history (`draw_lib.draw`; with settings.restarts > 1 each drawing is the lowest-loss restart).
  guides: [(model, variables, tokenizer)], one CLIP or several; several guide as an ensemble, the mean
  of their losses (`guidance.ensemble_loss`), each with its own prompt embeddings and views.
  negatives: the other nine digits' prompts are each drawing's negative prompts (CLIPDraw's option).
  ensemble: each digit's prompt is the ensemble of its training captions (`ensemble_prompts`), not
  "a handwritten {d}." alone. classifier: the loss is the CLIP's zero-shot classifier's
  cross-entropy over the ten digits at its own logit scale (`guidance.guidance_loss`'s
  classifier_scale; needs negatives) instead of -cos + 0.3 x the negatives' cosines.
  The CLIP sees the drawings through settings.view_resolution px (`draw_lib.as_seen`)."""
  if classifier and not negatives:
    raise ValueError("the classifier objective needs the other digits as negatives.")
  loss_fn = guidance.ensemble_loss([digit_loss(model, variables, tokenizer, settings, seeds, mesh, negatives,
                                               ensemble=ensemble, classifier=classifier)
                                    for model, variables, tokenizer in guides])
  _, images, history = draw_lib.draw(loss_fn, 10 * seeds, settings, jax.random.key(seed))
  return images.reshape(seeds, 10, *images.shape[1:]), history


# ----------------------------------------------------------------------------- (b) edits
def run_edits(model, variables, tokenizer, pipe, settings: edit_lib.EditSettings, source_digit: int,
              target_digit: int, train_images, train_labels, test_sources, mesh, *, scan_size: int = 0,
              gray: bool = False, source_negative: bool = False):
  """Every method on the held-out sources; returns {method: edited images [n, 32, 32, 3]} and info.
  scan_size: the CLIP sees the images through that resolution (`scan_view`); gray: the VAE's output
  made grey (the digits' domain); source_negative: the source digit's prompt is a negative prompt
  (weight 0.3, as CLIPDraw's) of the optimisation and the mapper."""
  generator, encoder = edit_lib.vae_generator(pipe.vae, pipe.params["vae"], pipe.vae_scaling_factor, gray=gray)
  encode = jax.jit(encoder)
  neutral_emb, target_emb = guidance.encode_prompts(model, variables, tokenizer,
                                                    [prompt(source_digit), prompt(target_digit)], mesh)
  clip_loss = edit_lib.make_clip_loss(model, variables, target_emb, settings.augment, mesh, scan_size=scan_size,
                                      negative_emb=neutral_emb[None] if source_negative else None)
  view = scan_view(scan_size)
  image_embed = lambda images: guidance.image_embeddings(model, variables, view(images))  # noqa: E731
  w_source = encode(jnp.asarray(test_sources))
  train_latents = encode(jnp.asarray(train_images[train_labels == source_digit]))
  decode = jax.jit(generator)
  out, info = {"reconstruction": np.asarray(decode(w_source))}, {}
  for index, method in enumerate(edit_lib.METHODS):
    start = time.time()
    w, details = edit_lib.run_edit(method, generator, clip_loss, image_embed, w_source, neutral_emb, target_emb,
                                   settings, jax.random.key(index), train_latents)
    out[method] = np.asarray(decode(w))
    info[method] = {**details, "seconds": round(time.time() - start, 1),
                    "latent_l2_mean": float(jnp.mean(jnp.sqrt(jnp.sum(jnp.square(w - w_source), axis=(1, 2, 3)))))}
    print(f"{method}: {info[method]['seconds']} s", flush=True)
  return out, info


def edit_scores(judge, edited, sources, target_pool, target_digit, rng):
  """(fraction read as the target, fraction closer to the source than a random target-class image,
  fraction both). Distances: pixel L2 at 32 px."""
  hit = judge.predict(ink_features(edited)) == target_digit
  random_targets = target_pool[rng.integers(0, len(target_pool), len(sources))]
  d_edit = np.sqrt(np.sum(np.square(edited - sources), axis=(1, 2, 3)))
  d_random = np.sqrt(np.sum(np.square(random_targets - sources), axis=(1, 2, 3)))
  closer = d_edit < d_random
  return {"read_as_target": float(hit.mean()), "closer_than_random_target": float(closer.mean()),
          "both": float((hit & closer).mean()), "mean_distance_edit": float(d_edit.mean()),
          "mean_distance_random_target": float(d_random.mean())}


# ----------------------------------------------------------------------------- the whole demo
def drawing_labels(predicted: np.ndarray) -> list[str]:
  """One caption per digit's row of drawings: the prompted digit and what the judge read in each seed's
  drawing, e.g. '3: judge read 3, 5 (1/2)'. predicted: [seeds, 10] the judge's digit per drawing."""
  return [f"{d}: judge read {', '.join(str(int(p)) for p in predicted[:, d])} "
          f"({int((predicted[:, d] == d).sum())}/{len(predicted)})" for d in range(predicted.shape[1])]


GRID_CELL_PX = 96  # the 32-px digits enlarged 3x, pixels kept sharp


def judge_view(images: np.ndarray) -> np.ndarray:
  """What the judge reads of each image: its 8x8 ink map (`ink_features`) shown as an image of the
  same size, each block one grey level. images: [n, h, w, 3] in [0, 1] -> [n, h, w, 3] in [0, 1]."""
  n, h, w, _ = images.shape
  ink = ink_features(images).reshape(n, 8, 8)
  blocks = np.repeat(np.repeat(1.0 - ink, h // 8, axis=1), w // 8, axis=2)
  return np.repeat(blocks[..., None], 3, axis=-1)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
  """The module docstring as written, and every option's default in --help."""


def seed_workdirs(clip: str, seeds: int) -> list[str]:
  """[clip, {clip}_seed1, ..., {clip}_seed{seeds-1}] (a file's suffix dropped: digits.safetensors ->
  digits_seed1): the drawings' CLIPs, the seeds beside --clip so that every demo run shares them.
  Each seed workdir whose run has not finished (no DONE record) is trained (or resumed) first with
  the README's digits recipe at --config.seed=i (`clip_jax.child_runs.ensure_trained`: a child process)."""
  from clip_jax.child_runs import ensure_trained
  stem = clip.rstrip("/")
  if os.path.isfile(stem):  # an exported file, e.g. digits.safetensors: its seeds are digits_seed1, ... beside it
    stem = os.path.splitext(stem)[0]
  paths = [clip] + [f"{stem}_seed{i}" for i in range(1, seeds)]
  for i, path in enumerate(paths[1:], start=1):
    ensure_trained(path, "configs/clip/digits.py", f"--config.seed={i}",
                   log=lambda line: print(f"{line} [seed CLIP {i} of the drawings' ensemble]", flush=True))
  return paths


def main(argv=None) -> int:
  from clip_jax.child_runs import warn_if_unfinished
  from clip_jax.cli import MissingPathError, UserError
  from clip_jax.eval.embed import place_on_mesh
  from clip_jax.sharding import create_mesh
  from dreambooth_jax.sampling import pipeline as sd

  p = argparse.ArgumentParser(prog="python -m dreambooth_jax.embedded.clip_demos", description=__doc__.split("\n\n")[0],
                              epilog=__doc__.split("\n\n", 1)[1], formatter_class=HelpFormatter)
  p.add_argument("--clip", default="workdirs/digits", help="the digits CLIP (README: python -m clip_jax.train "
                 "--config=configs/clip/digits.py --workdir=workdirs/digits)")
  p.add_argument("--clip-seeds", type=int, default=3, metavar="N",
                 help="the drawings are guided by N CLIPs, the mean of their losses (an ensemble): --clip and, "
                 "for i = 1 .. N-1, the README's digits recipe with --config.seed=i in {--clip}_seed{i}, trained "
                 "first if not finished (~80 s each here); 1: --clip alone. The view checks and the edits use "
                 "--clip alone")
  p.add_argument("--sd", default="runs/tiny_sd/export", help="the tiny SD (python -m dreambooth_jax.embedded.pretrain)")
  p.add_argument("--out", default="runs/clip_demos", help="directory for table.md, results.json and the pictures")
  p.add_argument("--draw-steps", type=int, default=300, help="optimisation steps per drawing")
  p.add_argument("--strokes", type=int, default=6, help="grey strokes per drawing (2 cubic segments each)")
  p.add_argument("--seeds", type=int, default=3, help="drawings per digit")
  p.add_argument("--restarts", type=int, default=1, help="drawings started per result; the one with the lowest "
                 "CLIP loss (mean of its last 10%% of steps) is kept, never chosen by the judge")
  p.add_argument("--draw-seed", type=int, default=0, help="the key the drawings' starts and views come from")
  p.add_argument("--views", type=int, default=4, help="CLIP views per drawing and step (CLIPDraw's 4)")
  p.add_argument("--scan-size", type=int, default=8, help="the CLIP sees every image box-averaged to N x N px "
                 "and bicubically upscaled back, as its 8x8 training scans were (0: as it is)")
  p.add_argument("--distortion", type=float, default=0.1, help="the views' perspective distortion (CLIPDraw: 0.5)")
  p.add_argument("--crop-scale", type=float, nargs=2, default=(0.7, 0.9), metavar=("LOW", "HIGH"),
                 help="the views' crop area fraction (CLIPDraw: 0.7 0.9)")
  p.add_argument("--color-lr", type=float, default=0.01, help="Adam rate of the strokes' grey level and opacity "
                 "(CLIPDraw: 0.01)")
  p.add_argument("--init-spread", type=float, default=1.0, help="the strokes start in the central fraction of "
                 "the canvas (CLIPDraw: 1, anywhere)")
  p.add_argument("--objective", choices=("cosine", "classifier"), default="cosine", help="the drawings' loss: "
                 "-cos to the prompt + 0.3 x cos to the other digits (CLIPDraw), or the CLIP's zero-shot "
                 "classifier's cross-entropy over the ten digits at its logit scale")
  p.add_argument("--prompt-ensemble", action="store_true", help="each digit's drawing prompt (and negative) is "
                 "the ensemble of its 8 training captions (CLIP paper 3.1.4), not 'a handwritten {d}.'")
  p.add_argument("--view-jitter", action="store_true", help="the drawings' --scan-size grid at a random "
                 "whole-pixel offset per drawing and step (the ink cannot suit one fixed grid)")
  p.add_argument("--edit-steps", type=int, default=300, help="latent optimisation steps")
  p.add_argument("--mapper-steps", type=int, default=500, help="training steps of the latent mapper")
  p.add_argument("--l2-weight", type=float, default=0.004, help="lambda_L2 of the latent optimisation")
  p.add_argument("--mapper-l2-weight", type=float, default=0.8, help="lambda_L2 of the mapper (paper: 0.8)")
  p.add_argument("--color-edits", action="store_true", help="keep the VAE's colours (off: grey, the digits')")
  p.add_argument("--source-negative", action=argparse.BooleanOptionalAction, default=True,
                 help="the source digit's prompt as a negative prompt of optimize / mapper")
  p.add_argument("--alpha", type=float, default=3.0, help="global direction strength")
  p.add_argument("--edit-augmentations", type=int, default=4, help="CLIP views per step for optimize / mapper")
  p.add_argument("--beta", type=float, default=0.1, help="global direction: the disentanglement threshold "
                 "(StyleCLIP's beta)")
  p.add_argument("--source-digit", type=int, default=3, help="the edits' held-out source class")
  p.add_argument("--target-digit", type=int, default=8, help="the edits' target class")
  p.add_argument("--max-sources", type=int, default=0, help="edit only the first N held-out sources (0: all)")
  p.add_argument("--skip", choices=("draw", "edit"), action="append", default=[],
                 help="leave out a part (e.g. --skip edit: the drawings alone)")
  args = p.parse_args(argv)
  if args.clip_seeds < 1:
    raise UserError(f"--clip-seeds must be at least 1 (--clip alone), got {args.clip_seeds}.")
  for path, flag in ((args.clip, "--clip"), (args.sd, "--sd")):
    if not os.path.exists(path):
      raise MissingPathError(f"{flag} {path}: no such file or directory; see --help for the command that makes it.")
  clip_warning = warn_if_unfinished(args.clip, "--clip")  # --clip is used as given, never trained here

  start = time.time()
  os.makedirs(args.out, exist_ok=True)
  mesh = create_mesh({"data": -1})
  clip_paths = seed_workdirs(args.clip, args.clip_seeds if "draw" not in args.skip else 1)
  # (model, variables, tokenizer) per CLIP; guides[0] is --clip
  guides = [(m, place_on_mesh(v, mesh), t) for m, v, t in map(guidance.load_guide, clip_paths)]
  model, variables, tokenizer = guides[0]
  train_images, train_labels = digit_images("train")
  test_images, test_labels = digit_images("test")
  judge, judge_accuracy = train_judge(train_images, train_labels, test_images, test_labels)
  print(f"judge (SVM on 8x8 ink): held-out accuracy {100 * judge_accuracy:.1f}%", flush=True)
  results = {"judge_heldout_accuracy": judge_accuracy, "clip": args.clip, "clip_warning": clip_warning,
             "drawing_clips": clip_paths, "sd": args.sd, "args": vars(args)}
  lines = ([f"**{clip_warning}**", ""] if clip_warning else []) + [
      f"Judge: RBF SVM on 8x8 ink maps of the training split, held-out accuracy {100 * judge_accuracy:.1f}%.", ""]
  # What the guidance loss can see: the CLIP's own accuracy on held-out scans through the views.
  prompt_emb = guidance.encode_prompts(model, variables, tokenizer, [prompt(d) for d in range(10)], mesh)
  views = guidance.Augmentations(num=args.views, distortion=args.distortion, crop_scale=tuple(args.crop_scale))
  checks = {"as they are": (guidance.NO_AUGMENTATION, 0), f"through {args.scan_size} px": (guidance.NO_AUGMENTATION, args.scan_size),
            "CLIPDraw's views (perspective 0.5, crop 0.7-0.9)": (guidance.Augmentations(num=8), 0),
            f"the demo's views (perspective {args.distortion}, crop {args.crop_scale[0]}-{args.crop_scale[1]}, through {args.scan_size} px)":
            (dataclasses.replace(views, num=8), args.scan_size)}
  results["clip_view_accuracy"] = {name: view_accuracy(model, variables, prompt_emb, test_images, test_labels, aug, size,
                                                       jax.random.key(0)) for name, (aug, size) in checks.items()}
  lines += [f"The CLIP {args.clip}'s own zero-shot accuracy on the held-out scans, seen as the optimised images are:", "",
            "| scans seen | CLIP top-1 |", "|---|---|"]
  lines += [f"| {name} | {100 * acc:.1f}% |" for name, acc in results["clip_view_accuracy"].items()] + [""]

  if "draw" not in args.skip:
    # Ours for 32 px digits (see the module docstring): grey ink, strokes 1-4 px wide, started longer
    # (random walk 0.3 canvas) and moved faster (3x the scaled point rate) than CLIPDraw's 224 px defaults.
    settings = draw_lib.DrawSettings(num_strokes=args.strokes, segments=2, steps=args.draw_steps, canvas=IMAGE_SIZE,
                                     gray=True, max_width=28.0, init_width=3.0, init_radius=0.3, points_lr=3.0,
                                     curve_samples=12, frame_every=max(1, args.draw_steps // 20), augment=views,
                                     view_resolution=args.scan_size, restarts=args.restarts,
                                     init_spread=args.init_spread, color_lr=args.color_lr,
                                     view_jitter=args.view_jitter)
    t0 = time.time()
    drawings, history = run_drawings(guides, settings, args.seeds, mesh, seed=args.draw_seed,
                                     ensemble=args.prompt_ensemble, classifier=args.objective == "classifier")
    predicted = judge.predict(ink_features(drawings.reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 3))).reshape(args.seeds, 10)
    correct = predicted == np.arange(10)[None]
    results["drawings"] = {"accuracy": float(correct.mean()), "per_digit": correct.mean(0).tolist(),
                           "predicted": predicted.tolist(), "seconds": round(time.time() - t0, 1),
                           "clip_loss_first_last": [float(history["loss"][0].mean()), float(history["loss"][-1].mean())],
                           "restart_loss": history["restart_loss"].reshape(-1, args.seeds, 10).tolist(),
                           "restart_kept": history["kept"].reshape(args.seeds, 10).tolist(),
                           "settings": json.loads(json.dumps(dataclasses.asdict(settings), default=str))}
    save_image_grid([np.concatenate([drawings[:, d], judge_view(drawings[:, d])]) for d in range(10)],
                    os.path.join(args.out, "drawings.png"), labels=drawing_labels(predicted), min_cell=GRID_CELL_PX,
                    title=f"CLIPDraw of 'a handwritten N.' (rows: N), --draw-seed {args.draw_seed}, "
                          f"{len(guides)} CLIP(s): {100 * correct.mean():.0f}% read right (columns: the seeds' "
                          "drawings, then the 8x8 ink maps the judge reads)")
    section = len(lines)  # this part's lines, printed whole below
    lines += [f"(a) CLIPDraw, {args.strokes} grey strokes x 2 segments, {args.draw_steps} steps, {args.views} views "
              f"(perspective {args.distortion}, crop {args.crop_scale[0]}-{args.crop_scale[1]}) through {args.scan_size} px, the other nine digits as "
              f"negative prompts" + (", the zero-shot classifier's cross-entropy" if args.objective == "classifier" else "")
              + (", prompt ensembles of the 8 training captions" if args.prompt_ensemble else "")
              + (", grid offset jittered" if args.view_jitter else "")
              + (f", guided by {len(guides)} CLIPs (the mean loss of {', '.join(clip_paths)})" if len(guides) > 1
                 else f", guided by {clip_paths[0]} alone") + (f", the lowest CLIP loss of {args.restarts} restarts" if args.restarts > 1 else "") +
              f", --draw-seed {args.draw_seed}: "
              f"**{100 * correct.mean():.0f}%** of {correct.size} drawings read as the prompt's digit (chance 10%)", "",
              "| digit | " + " | ".join(str(d) for d in range(10)) + " |", "|---" * 11 + "|",
              f"| judged correct (of {args.seeds} seeds) | " + " | ".join(str(int(c)) for c in correct.sum(0)) + " |", ""]
    print("\n".join(lines[section:]), flush=True)

  if "edit" not in args.skip:
    pipe = sd.load_pipeline(args.sd)
    sources = test_images[test_labels == args.source_digit]
    if args.max_sources:
      sources = sources[:args.max_sources]
    target_pool = test_images[test_labels == args.target_digit]
    opt = dataclasses.replace(styleclip.OptimizeSettings(), steps=args.edit_steps, l2_weight=args.l2_weight)
    mapper = dataclasses.replace(styleclip.MapperSettings(), steps=args.mapper_steps, l2_weight=args.mapper_l2_weight)
    augment = (dataclasses.replace(views, num=args.edit_augmentations) if args.edit_augmentations
               else guidance.NO_AUGMENTATION)
    settings = edit_lib.EditSettings(opt, mapper, args.alpha, args.beta, augment)
    edited, info = run_edits(model, variables, tokenizer, pipe, settings, args.source_digit, args.target_digit,
                             train_images, train_labels, sources, mesh, scan_size=args.scan_size,
                             gray=not args.color_edits, source_negative=args.source_negative)
    results["edits"] = {"num_sources": len(sources), "methods": {}}
    section = len(lines)
    lines += [f"(b) StyleCLIP edits of {len(sources)} held-out {args.source_digit}s toward {prompt(args.target_digit)!r} "
              f"(tiny SD VAE latents; {'colour' if args.color_edits else 'grey'} output, {args.edit_augmentations} "
              f"views through {args.scan_size} px):", "",
              "| method | read as target | closer to source than a random target | both | mean L2 edit / random |",
              "|---|---|---|---|---|"]
    for method in ("reconstruction",) + edit_lib.METHODS:
      scores = edit_scores(judge, edited[method], sources, target_pool, args.target_digit, np.random.default_rng(0))
      results["edits"]["methods"][method] = {**scores, **info.get(method, {})}
      lines.append(f"| {method} | {100 * scores['read_as_target']:.0f}% | {100 * scores['closer_than_random_target']:.0f}% "
                   f"| **{100 * scores['both']:.0f}%** | {scores['mean_distance_edit']:.2f} / "
                   f"{scores['mean_distance_random_target']:.2f} |")
    shown = slice(0, min(12, len(sources)))
    scored = results["edits"]["methods"]
    save_image_grid([sources[shown]] + [edited[m][shown] for m in edit_lib.METHODS], os.path.join(args.out, "edits.png"),
                    labels=[f"held-out {args.source_digit}s (the sources)"] + [
                        f"{m}: {100 * scored[m]['read_as_target']:.0f}% read as {args.target_digit}, "
                        f"{100 * scored[m]['both']:.0f}% also closer to their source than a random {args.target_digit}"
                        for m in edit_lib.METHODS], min_cell=GRID_CELL_PX,
                    title=f"StyleCLIP edits toward {prompt(args.target_digit)!r} (columns: the first {shown.stop} sources)")
    print("\n".join(lines[section:]), flush=True)

  results["seconds"] = round(time.time() - start, 1)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  written = ["table.md", "results.json"] + (["drawings.png"] if "draw" not in args.skip else []) + (
      ["edits.png"] if "edit" not in args.skip else [])
  print(f"Wrote {args.out}/{', '.join(written)} ({results['seconds']} s)", flush=True)
  return 0


if __name__ == "__main__":
  from clip_jax import cli
  cli.run(main)
