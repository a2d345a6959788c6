"""Tokenizer throughput: clip_jax's ClipTokenizer beside open_clip.tokenize (and Hugging Face's
Rust-backed CLIPTokenizer, and sentencepiece) on the same synthetic captions, in one process.

  python benchmarks/bench_tokenizer.py [--captions 20000] [--repeats 3]

Captions are generated (no dataset download): COCO-like sentences of 8-25 words from a few
hundred common words, with a long tail of rare made-up words (so the BPE cache also misses, as it
does on web-scale alt-text), some non-ASCII captions, HTML entities and long captions that need
truncation. "cold" runs a fresh tokenizer (empty BPE cache); "warm" re-runs the same one.
Rows are all [n, 77]; tokens/s counts the non-padding tokens of the rows (start and end included).
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time

import numpy as np

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SUBJECTS = ("man woman child dog cat bird horse cow sheep elephant giraffe zebra bear boy girl "
             "person people player surfer skier skateboarder chef couple family crowd train bus "
             "car "
             "truck motorcycle bicycle airplane boat kite pizza sandwich cake plate bowl laptop "
             "phone clock vase teddy umbrella bench").split()
_ADJECTIVES = ("small large old young red blue green white black yellow brown wooden metal empty "
               "crowded sunny snowy rainy busy quiet colorful vintage modern tall short happy "
               "little big bright dark").split()
_VERBS = ("sitting standing walking running riding holding eating playing looking lying flying "
          "parked waiting jumping carrying watching throwing catching cutting driving").split()
_PLACES = ("on a beach|in a kitchen|on a city street|next to a building|in a field|on a table|"
           "in the snow|near the water|at night|under a tree|in front of a store|on the grass|"
           "at the airport|in a living room|on a wooden bench|by the river|in the park").split("|")
_EXTRAS = ["with a {adj} {subject}", "while a {subject} watches", "during the {adj} afternoon",
           "in {year}", "and {n} {subject}s", "- photo by {name}", "&amp; friends", "(close-up)",
           "#travel #photography", "{name}'s {subject}", "it's a {adj} day!"]
_NAMES = ["Anna", "José", "Zoë", "Björn", "Ola", "Renée", "Łukasz", "Hiro", "Søren", "Amélie"]
_NON_ASCII = ["東京の夜景", "Café au lait ☕", "Привет из Москвы", "Straße in München",
              "🐶🐱 so cute!!", "naïve façade", "서울 거리", "مرحبا"]


def synthetic_captions(count: int, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  rare_words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 11)))
                for _ in range(max(count // 4, 100))]

  def fill(template: str) -> str:
    return template.format(adj=rng.choice(_ADJECTIVES), subject=rng.choice(_SUBJECTS),
                           year=rng.randint(1950, 2024), n=rng.randint(2, 9),
                           name=rng.choice(_NAMES))

  captions = []
  for _ in range(count):
    words = [rng.choice(["A", "a", "The", "Two", "An old photo of a"]), rng.choice(_ADJECTIVES),
             rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_PLACES)]
    for _ in range(rng.choice([0, 1, 1, 2, 3])):
      words.append(fill(rng.choice(_EXTRAS)))
    for _ in range(rng.choice([0, 0, 1, 2])):
      words.insert(rng.randrange(len(words) + 1), rng.choice(rare_words))
    if rng.random() < 0.08:
      words.append(rng.choice(_NON_ASCII))
    if rng.random() < 0.03:  # alt-text that runs past 77 tokens
      words += [fill("{adj} {subject}") for _ in range(40)]
    captions.append(" ".join(words) + rng.choice([".", "", "!", " ."]))
  return captions


def best_times(fn, repeats: int, setup=lambda: None) -> tuple[float, float]:
  """(wall, cpu) seconds, each the best of `repeats` runs of fn(setup()).

  The machine this ran on is shared, so wall time swings with other jobs; the process's CPU time
  swings much less and is the figure the table ranks by (for the Rust tokenizer, which may use
  several threads, CPU time is the total over its threads)."""
  walls, cpus = [], []
  for _ in range(repeats):
    arg = setup()
    wall, cpu = time.perf_counter(), time.process_time()
    fn(arg)
    walls.append(time.perf_counter() - wall)
    cpus.append(time.process_time() - cpu)
  return min(walls), min(cpus)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--captions", type=int, default=20000)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  import open_clip
  import open_clip.tokenizer
  from clip_jax import tokenizer as tk

  texts = synthetic_captions(args.captions)
  ours = tk.ClipTokenizer.from_bpe_file()
  rows = ours(texts)
  np.testing.assert_array_equal(rows, open_clip.tokenize(texts).numpy())  # same ids, or no timing
  tokens = int((rows != 0).sum())
  print(f"{len(texts)} captions, {tokens} tokens ({tokens / len(texts):.1f}/caption), "
        f"{np.mean(rows[:, -1] != 0) * 100:.1f}% truncated; python {platform.python_version()}, "
        f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f}")

  results = {  # name -> (wall, cpu) seconds
      "clip_jax ClipTokenizer, warm": best_times(lambda _: ours(texts), args.repeats),
      "open_clip.tokenize, warm": best_times(lambda _: open_clip.tokenize(texts), args.repeats),
      "clip_jax ClipTokenizer, cold": best_times(
          lambda fresh: fresh(texts), args.repeats, tk.ClipTokenizer.from_bpe_file),
      "open_clip SimpleTokenizer, cold": best_times(
          lambda fresh: fresh(texts), args.repeats, open_clip.tokenizer.SimpleTokenizer),
  }
  load_ours = best_times(lambda _: tk.ClipTokenizer.from_bpe_file(), args.repeats)[1]
  load_open_clip = best_times(lambda _: open_clip.tokenizer.SimpleTokenizer(), args.repeats)[1]
  try:
    import transformers
    with tempfile.TemporaryDirectory() as directory:
      ours.save_hf(directory)
      hf = transformers.CLIPTokenizer.from_pretrained(directory)
    results["transformers CLIPTokenizer (Rust), warm"] = best_times(
        lambda _: hf(texts, padding="max_length", max_length=77, truncation=True,
                     return_tensors="np"), args.repeats)
  except ImportError:
    pass
  with tempfile.TemporaryDirectory() as directory:
    start = time.perf_counter()
    spm_vocab = 1000 if len(texts) >= 10000 else 256  # small corpora support fewer pieces
    spm = tk.SentencePieceTokenizer.train(texts, vocab_size=spm_vocab,
                                          out_prefix=f"{directory}/bench")
    train_s = time.perf_counter() - start
    spm_rows = spm(texts)
    results[f"clip_jax SentencePieceTokenizer (vocab {spm_vocab})"] = best_times(
        lambda _: spm(texts), args.repeats)
  spm_tokens = int((spm_rows != spm.pad_token_id).sum())

  print(f"\nbuild (CPU): clip_jax {load_ours * 1e3:.0f} ms, "
        f"open_clip {load_open_clip * 1e3:.0f} ms; "
        f"sentencepiece training on the captions: {train_s:.1f} s wall")
  print("\n| tokenizer | texts/s | tokens/s | us/text (CPU) | us/text (wall) "
        "| vs open_clip (CPU) |")
  print("|---|---:|---:|---:|---:|---:|")
  for name, (wall, cpu) in results.items():
    reference = results["open_clip SimpleTokenizer, cold" if "cold" in name
                        else "open_clip.tokenize, warm"][1]
    count = spm_tokens if "Sentence" in name else tokens
    print(f"| {name} | {len(texts) / cpu:,.0f} | {count / cpu:,.0f} | "
          f"{cpu / len(texts) * 1e6:.1f} | {wall / len(texts) * 1e6:.1f} | "
          f"{reference / cpu:.2f}x |")


if __name__ == "__main__":
  main()
