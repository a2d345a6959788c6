r"""Text-driven image editing with StyleCLIP's three methods, the Stable Diffusion VAE as the generator.

    python -m dreambooth_jax.edit --model SD_DIR --clip CLIP_CKPT --image IN.png \
        --neutral "a handwritten 3." --target "a handwritten 8." --method optimize|mapper|global --out DIR

The image is encoded by SD's VAE (posterior mean, times the latent scaling factor so coordinates
have unit variance) and edited in that latent; the generator is the VAE decoder, the objective the
CLIP model given by --clip (anything `clip_jax.load_checkpoint` reads). The methods are
`clip_jax.styleclip`'s (Patashnik et al. 2021): `optimize` edits this one image; `mapper` trains a
mapper for the target text on latents of images SD samples from the neutral text (or --train-images)
and applies it; `global` computes a direction from the neutral and target texts over those latents
and moves the image along it. Writes DIR/edited.png, DIR/strip.png (source | VAE reconstruction |
edit) and DIR/result.json (CLIP's 1 - cos to the target and to the neutral text before and after,
the latent's L2 move, the pixel RMSE to the source). mapper and global also write the images they
learn from, before the work: DIR/train_images.png (a grid) and DIR/train_images/000.png ... (a
folder --train-images reads again, to reuse SD's samples), named in result.json's train_images
(where they came from, how many, their size). --train-images photos of another size than --image
are resized to cover it and centre-cropped (one line names them): the latents must have its shape.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import guidance, styleclip
from clip_jax.cli import MissingPathError, UserError, as_user_errors, make_out_dir

METHODS = ("optimize", "mapper", "global")


# ----------------------------------------------------------------------------- the generator
def vae_generator(vae, params, scale: float, gray: bool = False
                  ) -> tuple[Callable[[jax.Array], jax.Array], Callable[[jax.Array], jax.Array]]:
  """From SD's AutoencoderKL, its params and its latent scaling factor: (generator: scaled latents [n, h/f, w/f, c] -> images [n, h, w, 3] in [0, 1];
  encoder: images in [0, 1] -> scaled latents, the posterior mean). Scaled latents have about unit
  variance (SD's scaling_factor), so one L2 weight means the same thing for any VAE.
  gray: the generator's RGB replaced by its mean (grey-level domains such as the digits: a CLIP
  trained on grey images never saw colour, so a tint is a direction it answers to blindly)."""

  def generator(latents):
    images = vae.apply({"params": params}, latents / scale, method="decode")
    images = jnp.clip(images / 2 + 0.5, 0.0, 1.0)
    return jnp.broadcast_to(jnp.mean(images, -1, keepdims=True), images.shape) if gray else images

  def encoder(images):
    mean, _ = vae.apply({"params": params}, images * 2.0 - 1.0, method="encode")
    return mean * scale
  return generator, encoder


DEFAULT_MAX_SIDE = 512  # SD's training size: a larger photo only costs memory (a 3000x2000 one took 8.6 GB and more)


def conversions_made(mode: str, palette_transparency: bool, exif_orientation: int) -> list[str]:
  """What reading a photo of this PIL `mode` changed, in words, as `clip_jax.data.images.to_rgb`
  converts it: transparency on white (as clip_jax.draw paints on white), 16/32-bit to the top 8 bits,
  other modes by PIL; and the EXIF turn `clip_jax.data.images.load_image` applied."""
  from clip_jax.data.images import ALPHA_MODES, mode_repairs
  said = [f"turned upright (EXIF orientation {exif_orientation})"] if exif_orientation not in (0, 1) else []
  if mode in ALPHA_MODES or (mode == "P" and palette_transparency):
    said.append(f"{mode} transparency on white")
  elif mode.startswith("I") or mode == "F":
    said.append(f"{mode} pixels kept to their top 8 bits")
  elif mode_repairs(mode):
    said.append(f"{mode} converted to RGB")
  return said


def fit_size(width: int, height: int, max_side: int, multiple: int) -> tuple[int, int]:
  """(width, height) scaled so the longer side is at most `max_side`, each side rounded to a multiple
  of `multiple` (at least one multiple), what the VAE encodes."""
  scale = max_side / max(width, height)
  largest = max(multiple, max_side // multiple * multiple)
  return tuple(min(largest, max(multiple, round(side * scale / multiple) * multiple)) for side in (width, height))


def read_photo(path: str, flag: str = "--image") -> tuple[Any, list[str]]:
  """An image file -> (an 8-bit RGB PIL image, what was changed in words: `conversions_made`), read
  as the project reads every image (`clip_jax.data.images.load_image`: EXIF orientation, header size
  checks, then `to_rgb`: transparency on white, 16-bit to its top 8 bits). MissingPathError for a
  missing file, UserError for one that is not a readable image (both name `flag` and the path)."""
  from clip_jax.data.images import load_image as open_upright
  from clip_jax.data.images import open_image, to_rgb
  from clip_jax.data.records import BadRecord
  if not os.path.isfile(path):
    raise MissingPathError(f"{flag} {path}: no such file.")
  with open(path, "rb") as f:
    data = f.read()
  try:
    upright = open_upright(data)  # decodes first: a truncated PNG is a BadRecord here, not getexif's OSError
    orientation = open_image(data).getexif().get(0x0112, 1)  # load_image has applied it; said below
  except (BadRecord, OSError) as e:
    raise UserError(f"{flag} {path}: not an image this project can read ({e}).") from e
  changes = conversions_made(upright.mode, "transparency" in upright.info, orientation)
  image, _ = to_rgb(upright)
  return image, changes


def load_image(path: str, multiple: int, max_side: int = DEFAULT_MAX_SIDE, flag: str = "--image"
               ) -> tuple[np.ndarray, list[str]]:
  """An image file -> (float32 [1, h, w, 3] in [0, 1], what was changed in words: `conversions_made`
  and a resize), read by `read_photo`. A photo with a side over `max_side` (> 0) is resized
  bicubically to fit, its sides multiples of the VAE's downscale; one within it keeps its size, whose
  sides must be such multiples (UserError otherwise)."""
  from PIL import Image
  image, changes = read_photo(path, flag)
  width, height = image.size
  if max_side and max(width, height) > max_side:
    new_size = fit_size(width, height, max_side, multiple)
    image = image.resize(new_size, Image.BICUBIC)
    changes.append(f"resized {width}x{height} -> {new_size[0]}x{new_size[1]} to fit --max-side {max_side} "
                   f"(sides multiples of {multiple}; --max-side 0 keeps the size)")
  elif width % multiple or height % multiple:
    raise UserError(f"{flag} {path} is {width}x{height}; this model's VAE needs sides that are multiples of "
                    f"{multiple}: resize or crop it first.")
  return (np.asarray(image, np.float32) / 255.0)[None], changes


def read_train_images(folder: str, width: int, height: int
                      ) -> tuple[np.ndarray, list[str], dict[str, list[str]], dict[str, tuple[int, int]]]:
  """The .png/.jpg photos of `folder` (sorted by name), each read by `read_photo` and brought to
  width x height px, the size of the edited image: the mapper and the global direction work on latents
  of its shape, so every training latent must have it. A photo of another size is resized
  bicubically to cover that size and centre-cropped to it (PIL's ImageOps.fit; up or down, any aspect).
  Returns (images float32 [n, height, width, 3] in [0, 1], file names [n], {name: what reading changed}
  for those it changed, {name: (width, height) as read} for those brought to the size).
  MissingPathError: no such folder; UserError: no photo in it, or one that cannot be read."""
  from PIL import Image, ImageOps
  if not os.path.isdir(folder):
    raise MissingPathError(f"--train-images {folder}: no such directory.")
  names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".png", ".jpg", ".jpeg")))
  if not names:
    raise UserError(f"--train-images {folder}: holds no .png/.jpg images.")
  images, changed, refit = [], {}, {}
  for name in names:
    image, changes = read_photo(os.path.join(folder, name), "--train-images")
    if image.size != (width, height):
      refit[name] = image.size
      image = ImageOps.fit(image, (width, height), Image.BICUBIC)
    if changes:
      changed[name] = changes
    images.append(np.asarray(image, np.float32) / 255.0)
  return np.stack(images), names, changed, refit


def refit_line(refit: dict[str, tuple[int, int]], total: int, width: int, height: int, shown: int = 8) -> str:
  """The one line that says which --train-images photos `read_train_images` brought to the size, and how."""
  listed = ", ".join(f"{name} {w}x{h}" for name, (w, h) in list(refit.items())[:shown])
  more = f" and {len(refit) - shown} more" if len(refit) > shown else ""
  return (f"--train-images: {len(refit)} of {total} photos are not {width}x{height}, the size of --image (the edit "
          f"works on latents of its shape): each resized to cover it (bicubic) and centre-cropped: {listed}{more}.")


def strip(*rows: np.ndarray) -> np.ndarray:
  """Images [h, w, 3] in [0, 1] side by side, uint8, 2 px white gaps."""
  h = rows[0].shape[0]
  gap = np.ones((h, 2, 3), np.float32)
  parts = [p for image in rows for p in (np.asarray(image, np.float32), gap)][:-1]
  return np.round(np.clip(np.concatenate(parts, axis=1), 0, 1) * 255).astype(np.uint8)


# ----------------------------------------------------------------------------- one edit
@dataclasses.dataclass(frozen=True)
class EditSettings:
  optimize: styleclip.OptimizeSettings = styleclip.OptimizeSettings()
  mapper: styleclip.MapperSettings = styleclip.MapperSettings()
  alpha: float = 3.0          # global direction strength (in units of the latent's spread)
  beta: float = 0.1           # global direction threshold on |relevance|
  augment: guidance.Augmentations = guidance.NO_AUGMENTATION  # the paper's CLIP loss sees the image as is


def make_clip_loss(model, variables, target_emb, augment: guidance.Augmentations, mesh=None, *,
                   negative_emb=None, negative_weight: float = 0.3, scan_size: int = 0) -> styleclip.ClipLoss:
  """(images [n, h, w, 3], rng) -> -cos to target_emb [d] over `augment`'s views (+ negative_weight x cos
  to each of negative_emb [m, d]); scan_size > 0: the CLIP sees the images through that resolution
  (`guidance.through_resolution`, for a CLIP trained on upscaled low-resolution scans)."""
  fn = guidance.make_guidance_fn(model, mesh, augment=augment, negative_weight=negative_weight)
  view = (lambda x: guidance.through_resolution(x, scan_size)) if scan_size else (lambda x: x)  # noqa: E731
  return lambda images, key: fn(variables, view(images), target_emb, key, negative_emb)


def clip_distances(model, variables, images, *texts) -> list[np.ndarray]:
  """1 - cos(image, text) per image [n], for each text embedding [d]."""
  emb = guidance.image_embeddings(model, variables, images)
  return [np.asarray(1.0 - emb @ t) for t in texts]


def run_edit(method: str, generator, clip_loss: styleclip.ClipLoss, image_embed, w_source: jax.Array,
             neutral_emb: jax.Array, target_emb: jax.Array, settings: EditSettings, rng: jax.Array,
             train_latents: jax.Array | None = None, embedder=None):
  """The edited latents [n, ...] of `w_source` by `method`, and what the method reports."""
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}.")
  if method == "optimize":
    w, history = styleclip.optimize_latents(generator, clip_loss, w_source, rng, settings.optimize, embedder)
    return w, {"history_first_last": styleclip.summary(history)}
  if train_latents is None:
    raise ValueError(f"method {method!r} needs training / sample latents.")
  if method == "mapper":
    mapper, params, history = styleclip.train_mapper(generator, clip_loss, train_latents, rng, settings.mapper, embedder)
    return styleclip.apply_mapper(mapper, params, w_source), {"history_first_last": styleclip.summary(history)}
  delta_i, sigma = styleclip.coordinate_directions(generator, image_embed, train_latents)
  direction = styleclip.global_direction(delta_i, sigma, styleclip.text_direction(neutral_emb, target_emb),
                                         settings.beta)
  return styleclip.apply_direction(w_source, direction, settings.alpha), {
      "coordinates_kept": int(jnp.sum(direction != 0)), "coordinates": int(direction.size)}


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
  d = EditSettings()
  p = argparse.ArgumentParser(prog="python -m dreambooth_jax.edit", description=__doc__.split("\n\n")[0],
                              epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, help="a diffusers Stable Diffusion folder (its VAE is the generator)")
  p.add_argument("--clip", required=True, help="the CLIP objective: OpenAI/open_clip file, HF directory or workdir")
  p.add_argument("--image", required=True, help="the image to edit (read upright by its EXIF orientation, "
                 "transparency on white, 16-bit to its top 8 bits; what was converted is said in one line)")
  p.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE, metavar="PX",
                 help="an --image with a longer side is resized to fit (bicubic, sides multiples of the VAE's "
                 "downscale; default %(default)s, SD's training size); 0 keeps the size. One within it keeps its "
                 "size, whose sides must be multiples of the VAE's downscale. --train-images take the size --image "
                 "gets here")
  p.add_argument("--neutral", required=True, help="text describing the image as it is")
  p.add_argument("--target", required=True, help="text describing the edit's goal")
  p.add_argument("--method", required=True, choices=METHODS)
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--train-images", help="folder of .png/.jpg photos for mapper/global (default: SD samples of "
                 "--neutral); each is brought to --image's size (resized to cover it, bicubic, and centre-cropped), "
                 "the shape of the latents the edit works on")
  p.add_argument("--num-train", type=int, default=32, help="how many SD samples when --train-images is not given")
  p.add_argument("--steps", type=int, help=f"optimisation / mapper steps (default {d.optimize.steps} / {d.mapper.steps})")
  p.add_argument("--l2-weight", type=float, help=f"lambda_L2 (default {d.optimize.l2_weight} / {d.mapper.l2_weight})")
  p.add_argument("--lr", type=float, help="learning rate (default 0.1 / 1e-3)")
  p.add_argument("--alpha", type=float, default=d.alpha, help="global direction strength")
  p.add_argument("--beta", type=float, default=d.beta, help="global direction threshold")
  p.add_argument("--augmentations", type=int, default=0, help="random CLIP views per step (0: the paper's plain loss)")
  p.add_argument("--seed", type=int, default=0)
  from clip_jax.evaluate import add_architecture_flags
  add_architecture_flags(p, applies_to=" (of --clip)")
  return p


def settings_from_args(args) -> EditSettings:
  d = EditSettings()
  opt = dataclasses.replace(d.optimize, **{k: v for k, v in dict(
      steps=args.steps, l2_weight=args.l2_weight, learning_rate=args.lr).items() if v is not None})
  mapper = dataclasses.replace(d.mapper, **{k: v for k, v in dict(
      steps=args.steps, l2_weight=args.l2_weight, learning_rate=args.lr).items() if v is not None})
  return EditSettings(opt, mapper, args.alpha, args.beta, guidance.Augmentations(num=args.augmentations)
                      if args.augmentations else guidance.NO_AUGMENTATION)


TRAIN_IMAGES = "train_images"  # in --out: the images the mapper / direction used, as PNGs and as a grid


def save_train_images(out: str, images: np.ndarray, title: str) -> dict[str, str]:
  """Writes what a mapper or a global direction is computed from: `images` [n, h, w, 3] in [0, 1] as
  OUT/train_images/000.png ... (a folder that --train-images reads again: the same images to 8 bits,
  no sampling) and OUT/train_images.png (a grid, 8 a row, `title` above). PNGs of an earlier run in
  the folder are removed first. Returns the two paths relative to `out`, for result.json."""
  import re

  from PIL import Image

  from clip_jax.observe import image_grid
  folder = os.path.join(out, TRAIN_IMAGES)
  os.makedirs(folder, exist_ok=True)
  for name in os.listdir(folder):
    if re.fullmatch(r"\d{3,}\.png", name):
      os.remove(os.path.join(folder, name))
  pixels = np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)
  for i, image in enumerate(pixels):
    Image.fromarray(image).save(os.path.join(folder, f"{i:03d}.png"))
  Image.fromarray(image_grid(pixels, columns=min(8, len(pixels)), title=title)).save(folder + ".png")
  return {"grid": TRAIN_IMAGES + ".png", "folder": TRAIN_IMAGES + "/"}


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  for name in ("neutral", "target"):
    if not getattr(args, name).strip():
      raise UserError(f"--{name} is empty; give a text, e.g. --{name} 'a handwritten 3.'.")
  if args.steps is not None and args.steps < 1:
    raise UserError(f"--steps must be at least 1, got {args.steps}.")
  if args.max_side < 0:
    raise UserError(f"--max-side must be 0 (keep the size) or a number of pixels, got {args.max_side}.")
  if not os.path.exists(args.model):
    raise MissingPathError(f"--model {args.model}: no such file or directory.")
  from clip_jax.convert import check_checkpoint_exists
  check_checkpoint_exists(args.clip, "--clip")
  make_out_dir(args.out)  # before the work: a file there was found only when writing the results
  from dreambooth_jax.sampling import pipeline as sd
  pipe = as_user_errors(sd.load_pipeline, args.model)
  image, changes = load_image(args.image, pipe.vae_scale_factor, args.max_side)
  if changes:
    print(f"--image {args.image}: {'; '.join(changes)}.", flush=True)
  if args.train_images and args.method != "optimize":  # read before the CLIP loads: a mistake there shows at once
    train_images, train_names, changed, refit = read_train_images(args.train_images, image.shape[2], image.shape[1])
    for name, said in changed.items():
      print(f"--train-images {name}: {'; '.join(said)}.", flush=True)
    if refit:
      print(refit_line(refit, len(train_names), image.shape[2], image.shape[1]), flush=True)
  model, variables, tokenizer = as_user_errors(guidance.load_guide, args.clip, None, args.model_name, args.act)
  neutral_emb, target_emb = as_user_errors(guidance.encode_prompts, model, variables, tokenizer,
                                           [args.neutral, args.target])
  settings = settings_from_args(args)
  generator, encoder = vae_generator(pipe.vae, pipe.params["vae"], pipe.vae_scaling_factor)
  encode = jax.jit(encoder)
  rng = jax.random.key(args.seed)

  train_latents, train_record = None, {}
  if args.method != "optimize":
    if args.train_images:
      train_record = {"source": args.train_images, "files": train_names}
      title = f"the {len(train_images)} --train-images photos of the {args.method} ({args.train_images})"
    else:
      print(f"Sampling {args.num_train} images of {args.neutral!r} from the SD model for the {args.method} ...", flush=True)
      sample_settings = {"prompt": args.neutral, "num_steps": 20, "guidance_scale": 3.0, "rng": "fold_in(seed, 1)"}
      train_images = np.asarray(sd.generate(pipe, pipe.params, [args.neutral] * args.num_train,
                                            rng=jax.random.fold_in(rng, 1), num_steps=sample_settings["num_steps"],
                                            guidance_scale=sample_settings["guidance_scale"], output_type="float",
                                            height=image.shape[1], width=image.shape[2]))
      train_record = {"source": "sampled", "sampled": sample_settings}
      title = f"the {args.num_train} SD samples of {args.neutral!r} the {args.method} used"
    # Saved before the work: what the edit is computed from can be looked at even if it stops.
    train_record = {**train_record, "count": len(train_images), "size": [image.shape[2], image.shape[1]],
                    **save_train_images(args.out, train_images, title)}
    train_latents = encode(jnp.asarray(train_images))

  start = time.time()
  w_source = encode(jnp.asarray(image))
  clip_loss = make_clip_loss(model, variables, target_emb, settings.augment)
  image_embed = lambda images: guidance.image_embeddings(model, variables, images)  # noqa: E731
  w_edit, info = as_user_errors(run_edit, args.method, generator, clip_loss, image_embed, w_source, neutral_emb,
                                target_emb, settings, jax.random.fold_in(rng, 2), train_latents)
  decode = jax.jit(generator)
  recon, edited = np.asarray(decode(w_source)), np.asarray(decode(w_edit))
  before = clip_distances(model, variables, jnp.asarray(recon), target_emb, neutral_emb)
  after = clip_distances(model, variables, jnp.asarray(edited), target_emb, neutral_emb)
  result = {"method": args.method, "image": args.image, "neutral": args.neutral, "target": args.target,
            "clip_to_target": {"before": float(before[0][0]), "after": float(after[0][0])},
            "clip_to_neutral": {"before": float(before[1][0]), "after": float(after[1][0])},
            "latent_l2": float(jnp.sqrt(jnp.sum(jnp.square(w_edit - w_source)))),
            "pixel_rmse_to_source": float(np.sqrt(np.mean(np.square(edited - image)))),
            "seconds": round(time.time() - start, 1), **info,
            **({"train_images": train_record} if train_record else {}),
            "settings": json.loads(json.dumps(dataclasses.asdict(settings), default=str))}
  from PIL import Image
  os.makedirs(args.out, exist_ok=True)
  Image.fromarray(strip(edited[0])).save(os.path.join(args.out, "edited.png"))
  Image.fromarray(strip(image[0], recon[0], edited[0])).save(os.path.join(args.out, "strip.png"))
  with open(os.path.join(args.out, "result.json"), "w") as f:
    json.dump(result, f, indent=2)
  print(f"{args.method}: CLIP 1-cos to {args.target!r} {result['clip_to_target']['before']:.3f} -> "
        f"{result['clip_to_target']['after']:.3f}; latent moved {result['latent_l2']:.2f}; wrote "
        f"{args.out}/edited.png, strip.png, result.json"
        + (f", {TRAIN_IMAGES}.png and {TRAIN_IMAGES}/ (the images the {args.method} used)" if train_record else ""),
        flush=True)
  return 0


if __name__ == "__main__":
  from clip_jax import cli
  cli.run(main)
