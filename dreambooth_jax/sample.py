"""Text-to-image sampling from a Stable Diffusion folder (diffusers format), e.g. a DreamBooth result.

  python -m dreambooth_jax.sample --model runs/dog_dreambooth/pipeline \\
      --prompt "a photo of sks dog on the beach" --num-images 4 --out samples/

Writes one PNG per image, named by prompt index and seed: prompt00_seed0.png, prompt00_seed1.png,
..., prompt01_seed0.png, ... (image k of each prompt has seed --seed + k), each with a JSON sidecar
(prompt00_seed0.json: the prompt and every setting; also in the PNG's text chunks), and grid.png:
one row per prompt with the prompt written above it, small images enlarged (nearest neighbour) to
at least 256 px. An image's seed draws its initial latents, so with a deterministic sampler (ddim,
dpm++2m) a (prompt, seed) gives the same image whatever else is sampled with it; stochastic
samplers' per-step noise is drawn per batch (the sidecar names the batch). The first batch
includes compilation; later batches of the same size reuse it.
"""
from __future__ import annotations

import argparse
import json
import os
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


def sample_name(prompt_index: int, seed: int) -> str:
  """The file stem of one image: 'prompt03_seed7'."""
  return f"prompt{prompt_index:02d}_seed{seed}"


def initial_latents(seeds, height: int, width: int, factor: int, channels: int) -> np.ndarray:
  """[len(seeds), height / factor, width / factor, channels] unit normals, row i drawn from
  jax.random.key(seeds[i]) alone, so an image's start does not depend on its batch."""
  shape = (height // factor, width // factor, channels)
  return np.stack([np.asarray(jax.random.normal(jax.random.key(seed), shape, jnp.float32)) for seed in seeds])


def _save_png(image: np.ndarray, path: str, info: dict[str, str] | None = None) -> None:
  import io

  from PIL import Image, PngImagePlugin

  from clip_jax.observe import write_atomic
  meta = PngImagePlugin.PngInfo()
  for key, value in (info or {}).items():
    meta.add_text(key, value)
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, "PNG", pnginfo=meta)
  write_atomic(path, buffer.getvalue())


def main(argv=None) -> int:
  args = parse_args(argv)
  from clip_jax import cli
  cli.make_out_dir(args.out)
  print(f"Loading {args.model} ...", flush=True)
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  try:
    pipe = pipeline_lib.load_pipeline(args.model, dtype=dtype,
                                      text_encoder_layers=args.text_encoder_layers)
  except (OSError, ValueError) as e:  # missing files, bad configs or weights: one line, no traceback
    from clip_jax import cli
    return cli.print_user_error(str(e), e)

  # (prompt index, prompt, seed): image k of every prompt has seed --seed + k.
  jobs = [(i, prompt, args.seed + k) for i, prompt in enumerate(args.prompt) for k in range(args.num_images)]
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
    from clip_jax import cli
    return cli.print_user_error(problem)
  from clip_jax.tokenizer import truncation_notes
  for note in truncation_notes(pipe.tokenizer, list(dict.fromkeys(args.prompt)) + (
      [args.negative_prompt] if args.negative_prompt else []), pipe.context_length):
    print(note, flush=True)
  print(f"Sampling {len(jobs)} images of {width}x{height} with {args.sampler}, {args.steps} steps, "
        f"guidance {args.guidance}, seed {args.seed}", flush=True)
  from clip_jax.observe import package_versions, save_image_grid, write_atomic
  settings = {"model": args.model, "negative_prompt": args.negative_prompt or "", "sampler": args.sampler,
              "steps": args.steps, "guidance": args.guidance, "height": height, "width": width,
              "dtype": args.dtype, "text_encoder_layers": args.text_encoder_layers,
              "batch_size": batch_size, "versions": package_versions()}
  root_key = jax.random.key(args.seed)
  images, start = [], time.perf_counter()
  for batch_index, first in enumerate(range(0, len(jobs), batch_size)):
    batch_jobs = jobs[first:first + batch_size]
    batch_start = time.perf_counter()
    latents = initial_latents([seed for _, _, seed in batch_jobs], height, width, factor, pipe.latent_channels)
    batch = pipeline_lib.generate(
        pipe, pipe.params, [prompt for _, prompt, _ in batch_jobs], args.negative_prompt, num_steps=args.steps,
        guidance_scale=args.guidance, rng=jax.random.fold_in(root_key, batch_index), latents=latents,
        sampler=args.sampler, height=height, width=width, mesh=mesh)
    for (prompt_index, prompt, seed), image in zip(batch_jobs, batch):
      record = {"prompt": prompt, "prompt_index": prompt_index, "seed": seed, **settings, "batch": batch_index}
      stem = os.path.join(args.out, sample_name(prompt_index, seed))
      _save_png(image, stem + ".png", {k: str(v) for k, v in record.items() if k != "versions"})
      write_atomic(stem + ".json", json.dumps(record, indent=2) + "\n")
    images.extend(batch)
    print(f"[{len(images)}/{len(jobs)} images] batch {batch_index + 1} took "
          f"{time.perf_counter() - batch_start:.1f} s", flush=True)
  rows = [np.stack(images[i * args.num_images:(i + 1) * args.num_images]) for i in range(len(args.prompt))]
  labels = [f"{i}: {prompt}" for i, prompt in enumerate(args.prompt)]
  save_image_grid(rows, os.path.join(args.out, "grid.png"), labels=labels,
                  title=f"{os.path.basename(os.path.normpath(args.model))}: {args.sampler} {args.steps} steps, "
                        f"guidance {args.guidance}, seeds {args.seed}..{args.seed + args.num_images - 1}")
  print(f"Wrote {len(images)} images (promptNN_seedS.png + .json, NN the prompt's number) and grid.png "
        f"(a row per prompt) to {args.out} "
        f"in {time.perf_counter() - start:.1f} s")
  return 0


if __name__ == "__main__":
  from clip_jax import cli
  cli.run(main)  # user mistakes: one line, exit code 2
