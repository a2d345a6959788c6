"""Is the attention form that 'auto' picks on this backend right, and is it faster? (issue 15.4)

  python benchmarks/attention_check.py [--sizes gpu|toy] [--out FILE.md]

For the attention shapes of the two GPU benchmarks (ViT-B-16 at batch 256: image and causal text
towers; the SD 1.5 UNet at 64x64 latents, batch 8: self- and cross-attention at the two widest
levels), `clip_jax.layers.dot_product_attention` with impl='auto' (on GPU in bf16: cuDNN's fused
attention when the head size allows it; on CPU in bf16: the f32-accumulating form) is compared
with impl='xla' (`jax.nn.dot_product_attention`, XLA's own) on the same random bf16 inputs:

  error   ||x - ref|| / ||ref|| of the output and of dq, dk, dv (a random cotangent), against an
          f32 reference (XLA's form on the inputs upcast, matmul precision 'highest'); bf16
          operands land between 1e-3 and 1e-2; a form fails above 2e-2 or on any NaN.
  time    median wall time of the jitted forward + backward over --repeats calls after one
          untimed call (block_until_ready each call), fresh inputs per shape.
  kernel  whether the compiled program holds cuDNN's fused-attention call (`__cudnn$fmha`).

Exit code 0 when every 'auto' row passes, 1 otherwise (`benchmarks/gpu_check.sh` then runs the
benchmarks with --attention xla and says so).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from clip_jax import layers  # noqa: E402

# (name, batch, query length, key length, heads, head size, causal)
GPU_SHAPES = (
    ("ViT-B-16 image", 256, 197, 197, 12, 64, False),
    ("ViT-B-16 text (causal)", 256, 77, 77, 8, 64, True),
    ("SD1.5 64x64 self, level 1", 8, 4096, 4096, 8, 40, False),
    ("SD1.5 64x64 cross, level 1", 8, 4096, 77, 8, 40, False),
    ("SD1.5 64x64 self, level 2", 8, 1024, 1024, 8, 80, False),
)
TOY_SHAPES = (("toy self", 2, 17, 17, 2, 8, False), ("toy causal", 2, 9, 9, 2, 8, True),
              ("toy cross", 2, 16, 7, 2, 8, False))
TOLERANCE = 2e-2


def relative_error(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def fwd_bwd(impl: str, causal: bool):
  """(q, k, v, cotangent) -> (out, dq, dk, dv), jitted."""
  def run(q, k, v, g):
    out, vjp = jax.vjp(lambda q, k, v: layers.dot_product_attention(q, k, v, is_causal=causal, impl=impl), q, k, v)
    return (out,) + vjp(g)
  return jax.jit(run)


def median_time(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def check_shape(shape, repeats: int, seed: int) -> list[dict]:
  name, batch, t_len, s_len, heads, head, causal = shape
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, t_len, heads, head), jnp.float32)
  k = jax.random.normal(keys[1], (batch, s_len, heads, head), jnp.float32)
  v = jax.random.normal(keys[2], (batch, s_len, heads, head), jnp.float32)
  g = jax.random.normal(keys[3], (batch, t_len, heads, head), jnp.float32)
  with jax.default_matmul_precision("highest"):
    ref = jax.device_get(fwd_bwd("xla", causal)(q, k, v, g))
  low = tuple(x.astype(jnp.bfloat16) for x in (q, k, v, g))
  chosen = layers.choose_attention_impl(jnp.bfloat16, head, jax.default_backend())
  rows = []
  for impl in ("auto", "xla"):
    row = {"shape": name, "impl": impl if impl == "xla" else f"auto={chosen}"}
    try:
      fn = fwd_bwd(impl, causal).lower(*low).compile()
      hlo = fn.as_text()
      out = jax.device_get(fn(*low))
      errors = [relative_error(x, r) for x, r in zip(out, ref)]
      row.update(errors=errors, ok=all(np.isfinite(e) and e <= TOLERANCE for e in errors),
                 time_s=median_time(fn, low, repeats), cudnn="__cudnn$fmha" in hlo)
    except Exception as e:  # noqa: BLE001 - a backend that cannot run a form is a result here
      row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    rows.append(row)
  return rows


def report(rows: list[dict], args) -> str:
  lines = [
      f"jax {jax.__version__}, backend {jax.default_backend()} ({jax.devices()[0].device_kind}); bf16 inputs, "
      f"errors against an f32 reference (tolerance {TOLERANCE:g}), time: median of {args.repeats} jitted fwd+bwd calls.",
      "",
      "| shape | impl | cuDNN kernel | out err | dq err | dk err | dv err | fwd+bwd (ms) | vs xla | ok |",
      "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
  ]
  for row in rows:
    if "error" in row:
      lines.append(f"| {row['shape']} | {row['impl']} | - | failed: {row['error']} | | | | | | no |")
      continue
    xla = next((r for r in rows if r["shape"] == row["shape"] and r["impl"] == "xla" and "time_s" in r), None)
    speed = f"{xla['time_s'] / row['time_s']:.2f}x" if xla else "-"
    errs = " | ".join(f"{e:.1e}" for e in row["errors"])
    lines.append(f"| {row['shape']} | {row['impl']} | {'yes' if row['cudnn'] else 'no'} | {errs} "
                 f"| {row['time_s'] * 1e3:.2f} | {speed} | {'yes' if row['ok'] else 'NO'} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", choices=("gpu", "gpu-odd", "toy"), default="gpu",
                      help="gpu: the benchmarks' shapes; gpu-odd: those of odd length (the padded cuDNN "
                           "form); toy: tiny shapes (a CPU dry run)")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--out", default="", help="markdown table to write ('' to only print)")
  args = parser.parse_args(argv)
  shapes = {"gpu": GPU_SHAPES, "toy": TOY_SHAPES,
            "gpu-odd": [s for s in GPU_SHAPES if s[2] % 2 or s[3] % 2]}[args.sizes]
  rows = []
  for seed, shape in enumerate(shapes):
    rows += check_shape(shape, args.repeats, seed)
    print("  " + "; ".join(f"{r['shape']} {r['impl']}: " + (r["error"] if "error" in r else
                           f"{r['time_s'] * 1e3:.2f} ms, max err {max(r['errors']):.1e}") for r in rows[-2:]), flush=True)
  text = report(rows, args)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)
  return 0 if all(r["ok"] for r in rows if r["impl"].startswith("auto")) else 1


if __name__ == "__main__":
  sys.exit(main())
