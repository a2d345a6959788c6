"""Text-to-image sampling from a Stable Diffusion folder (diffusers format), e.g. a DreamBooth result.

  python -m dreambooth_jax.sample --model runs/dog_dreambooth/pipeline \\
      --prompt "a photo of sks dog on the beach" --num-images 4 --out samples/

Writes sample_000.png, sample_001.png, ... (the prompt, seed and sampler are stored in each PNG's
text chunks) and grid.png with all of them. The first batch includes compilation; later batches
of the same size reuse it.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dreambooth_jax.sampling import pipeline as pipeline_lib
from dreambooth_jax.sampling import schedulers


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m dreambooth_jax.sample",
      description="Generate images from text with a Stable Diffusion 1.x / 2.x model folder in "
                  "diffusers format (model_index.json, unet/, vae/, text_encoder/, tokenizer/, "
                  "scheduler/), such as one DreamBooth training writes or "
                  "StableDiffusionPipeline.save_pretrained produces.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--model", required=True, metavar="DIR", help="the diffusers pipeline folder")
  parser.add_argument("--prompt", required=True, action="append", metavar="TEXT",
                      help="what to draw; repeat the flag for several prompts")
  parser.add_argument("--negative-prompt", default=None, metavar="TEXT",
                      help="what to steer away from (classifier-free guidance's unconditional text; "
                           "empty by default)")
  parser.add_argument("--num-images", type=int, default=4, metavar="K", help="images per prompt")
  parser.add_argument("--steps", type=int, default=30, metavar="N", help="sampling steps (model calls)")
  parser.add_argument("--guidance", type=float, default=7.5, metavar="G",
                      help="classifier-free guidance scale; 1 turns guidance off")
  samplers = schedulers.SAMPLERS.values()
  parser.add_argument("--sampler", default="dpm++2m", choices=[s.short_name for s in samplers],
                      help="; ".join(f"{s.short_name}: {s.summary}" for s in samplers))
  parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same images")
  parser.add_argument("--height", type=int, default=None,
                      help="image height in pixels, a multiple of 8 (default: the model's training size)")
  parser.add_argument("--width", type=int, default=None, help="image width in pixels (as --height)")
  parser.add_argument("--batch-size", type=int, default=None, metavar="B",
                      help="images generated per device call (default: all at once); lower it if "
                           "memory runs out")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                      help="compute dtype of the UNet and text encoder")
  parser.add_argument("--text-encoder-layers", type=int, default=None, metavar="N",
                      help="condition on the first N text-encoder layers (e.g. 23 for a full "
                           "24-layer OpenCLIP tower); default: all")
  parser.add_argument("--shard", action="store_true",
                      help="split each batch over all devices (the batch size must be a multiple "
                           "of the device count)")
  parser.add_argument("--out", required=True, metavar="DIR", help="folder for the PNG files")
  args = parser.parse_args(argv)
  for name in ("num_images", "steps"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be at least 1.")
  if args.batch_size is not None and args.batch_size < 1:
    parser.error("--batch-size must be at least 1.")
  return args


def image_grid(images: np.ndarray) -> np.ndarray:
  """[N, H, W, 3] -> one [rows * H, cols * W, 3] image, about square, blank cells black."""
  n, h, w, c = images.shape
  cols = math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  grid = np.zeros((rows * h, cols * w, c), images.dtype)
  for i, image in enumerate(images):
    r, col = divmod(i, cols)
    grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
  return grid


def _save_png(image: np.ndarray, path: str, info: dict[str, str] | None = None) -> None:
  from PIL import Image, PngImagePlugin
  meta = PngImagePlugin.PngInfo()
  for key, value in (info or {}).items():
    meta.add_text(key, value)
  Image.fromarray(image).save(path, pnginfo=meta)


def main(argv=None) -> int:
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  print(f"Loading {args.model} ...", flush=True)
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  try:
    pipe = pipeline_lib.load_pipeline(args.model, dtype=dtype,
                                      text_encoder_layers=args.text_encoder_layers)
  except (OSError, ValueError) as e:  # missing files, bad configs or weights: one line, no traceback
    print(f"error: {e}", file=sys.stderr)
    return 2

  jobs = [(prompt, k) for prompt in args.prompt for k in range(args.num_images)]
  batch_size = args.batch_size or len(jobs)
  height, width = args.height or pipe.default_size, args.width or pipe.default_size
  factor = pipe.vae_scale_factor
  problem = None
  if height % factor or width % factor:
    problem = f"--height and --width must be multiples of {factor}, got {height}x{width}."
  mesh = None
  if args.shard:
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    sizes = {len(jobs[i:i + batch_size]) for i in range(0, len(jobs), batch_size)}
    if any(size % jax.device_count() for size in sizes):
      problem = (f"--shard splits each batch over {jax.device_count()} devices, but the batches "
                 f"hold {sorted(sizes)} images; make --batch-size and the image count multiples.")
  if problem:
    print(f"error: {problem}", file=sys.stderr)
    return 2
  print(f"Sampling {len(jobs)} images of {width}x{height} with {args.sampler}, {args.steps} steps, "
        f"guidance {args.guidance}, seed {args.seed}", flush=True)
  root_key = jax.random.key(args.seed)
  images, start = [], time.perf_counter()
  for batch_index, first in enumerate(range(0, len(jobs), batch_size)):
    prompts = [prompt for prompt, _ in jobs[first:first + batch_size]]
    batch_start = time.perf_counter()
    batch = pipeline_lib.generate(
        pipe, pipe.params, prompts, args.negative_prompt, num_steps=args.steps,
        guidance_scale=args.guidance, rng=jax.random.fold_in(root_key, batch_index),
        sampler=args.sampler, height=height, width=width, mesh=mesh)
    for i, image in enumerate(batch):
      index = first + i
      _save_png(image, os.path.join(args.out, f"sample_{index:03d}.png"),
                {"prompt": prompts[i], "negative_prompt": args.negative_prompt or "",
                 "seed": str(args.seed), "batch": str(batch_index), "sampler": args.sampler,
                 "steps": str(args.steps), "guidance": str(args.guidance), "model": args.model})
    images.extend(batch)
    print(f"[{len(images)}/{len(jobs)} images] batch {batch_index + 1} took "
          f"{time.perf_counter() - batch_start:.1f} s", flush=True)
  _save_png(image_grid(np.stack(images)), os.path.join(args.out, "grid.png"))
  print(f"Wrote {len(images)} images and grid.png to {args.out} in {time.perf_counter() - start:.1f} s")
  return 0


if __name__ == "__main__":
  from clip_jax import cli
  cli.run(main)  # user mistakes: one line, exit code 2
