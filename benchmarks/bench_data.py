"""Input pipeline throughput: decode + augment + tokenize per CPU core, and through grain.

    python benchmarks/bench_data.py [--num-images 512] [--image-size 224] [--workers 2]

Writes synthetic 224 px JPEGs (smooth random fields with grain noise, so they compress like
photos, ~15-25 KB) into ArrayRecord shards with realistic captions, then times:
  1. each stage of one example on one core (no threads): decode, random resized crop, normalize,
     tokenize, and the whole ExampleMaker (what a grain worker runs per example), plus one
     example of the embedded digits demo at 32 px;
  2. the grain pipeline end to end (train mode, batches of 64) with 0 workers and with --workers.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from clip_jax.data import images, pipeline, prepare, sources  # noqa: E402
from clip_jax.tokenizer import tokenize  # noqa: E402

WORDS = ("a photo of a small brown dog running on green grass near the old stone wall in the "
         "afternoon sun with trees and a red ball beside a wooden fence").split()


def synthetic_caption(rng: np.random.Generator) -> str:
  # Real captions keep meeting words the BPE has not cached yet; a third of the words here are
  # fresh random strings so the tokenizer is not timed on a warm cache only.
  words = [str(rng.choice(WORDS)) if rng.uniform() < 0.67 else
           "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=int(rng.integers(3, 10))))
           for _ in range(int(rng.integers(8, 20)))]
  return " ".join(words)


def synthetic_jpeg(rng: np.random.Generator, size: int) -> bytes:
  coarse = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
  field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32)
  field += rng.normal(0, 12, field.shape)
  buffer = io.BytesIO()
  Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def write_dataset(folder: str, num_images: int, size: int) -> str:
  rng = np.random.default_rng(0)
  photos = os.path.join(folder, "photos")
  os.makedirs(photos)
  for i in range(num_images):
    with open(os.path.join(photos, f"{i:06d}.jpg"), "wb") as f:
      f.write(synthetic_jpeg(rng, size))
    with open(os.path.join(photos, f"{i:06d}.txt"), "w") as f:
      f.write(synthetic_caption(rng))
  output = os.path.join(folder, "shards")
  prepare.convert([photos], output, verbose=False)
  return output


def per_example_rate(fn, items, repeats: int = 1) -> float:
  start = time.perf_counter()
  for _ in range(repeats):
    for item in items:
      fn(item)
  return repeats * len(items) / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num-images", type=int, default=512)
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--batches", type=int, default=16)
  args = parser.parse_args()
  size = args.image_size

  with tempfile.TemporaryDirectory() as folder:
    source = sources.open_source(write_dataset(folder, args.num_images, size))
    raws = [source[i] for i in range(len(source))]
    print(f"{len(raws)} JPEGs of {size}x{size}, mean {np.mean([len(r['image']) for r in raws]) / 1e3:.1f} KB, "
          f"captions {np.mean([len(r['captions'][0]) for r in raws]):.0f} chars")
    rng = np.random.default_rng(0)
    decoded = [images.decode_image(r["image"])[0] for r in raws]
    crops = [images.train_transform(im, size, rng) for im in decoded]
    tokenize(["warm up"])
    stage_rates = {
        "decode (PIL, JPEG -> RGB)": per_example_rate(lambda r: images.decode_image(r["image"]), raws),
        "random resized crop + bicubic resize": per_example_rate(
            lambda im: images.train_transform(im, size, rng), decoded),
        "normalize to float32": per_example_rate(images.normalize, crops),
        "tokenize (CLIP BPE, 77 tokens)": per_example_rate(lambda r: tokenize([r["captions"][0]]), raws),
    }
    maker = pipeline.ExampleMaker(source, tokenize, size, train=True)
    stage_rates["whole example (ExampleMaker, train)"] = per_example_rate(lambda i: maker(i, rng), range(len(raws)))
    digits_maker = pipeline.ExampleMaker(sources.open_source("digits"), tokenize, 32, train=True)
    stage_rates["digits demo example (32 px, train)"] = per_example_rate(lambda i: digits_maker(i, rng),
                                                                         range(512))
    for name, rate in stage_rates.items():
      print(f"| {name} | {rate:,.0f} examples/s | {1e3 / rate:.2f} ms |")

    for workers in (0, args.workers):
      ds = pipeline.make_pipeline(source, tokenize, batch_size=64, image_size=size, train=True,
                                  process_index=0, process_count=1, num_workers=workers,
                                  read_threads=0 if workers else 2)
      it = iter(ds)
      next(it)  # worker start-up is not throughput
      start = time.perf_counter()
      for _ in range(args.batches):
        next(it)
      rate = args.batches * 64 / (time.perf_counter() - start)
      it.close()
      label = f"{workers} worker processes" if workers else "in-process, 2 threads"
      print(f"| grain pipeline, {label} | {rate:,.0f} examples/s |")


if __name__ == "__main__":
  main()
