"""Where a traced step's GPU time went: the kernels of a jax.profiler trace, summed per step.

  python benchmarks/profile_summary.py TRACE.xplane.pb[.gz] [--steps 2] [--top 25] [--torch-ops OPS.txt]

Reads the xplane file that `bench_unet_step.py --profile DIR` (or any `jax.profiler.trace`) wrote
and sums the duration of every kernel on the GPU's planes, twice: by category (convolutions by
their kernels' input dtype, cuDNN attention, everything else) and by kernel name (template
arguments dropped), each divided by --steps, the number of steps the trace holds. 'busy' is the
sum of all kernels; 'span' is first kernel start to last kernel end. On a trace without a device
plane (XLA:CPU) it says so: `benchmarks/profile_step.py` reads those. --torch-ops reads the op table
`bench_unet_step.py --profile` wrote for a torch variant and prints its device time per step (its
profiler's 'Self CUDA time total' over the same --steps).

How the categories are told apart (cuDNN's and cuBLAS's kernel names on Hopper, 2026):
  conv f32/tf32   'implicit_gemm' kernels (cuDNN's convolutions) named f32f32_tf32...: a conv run in
                  f32 with TF32 math, what XLA:GPU does with bf16 operands and an f32 result
  conv bf16       the same kernels named bf16bf16_bf16f32... (bf16 in, f32 accumulation)
  conv other      other 'implicit_gemm' kernels (other dtypes, or names without them)
  attention       cuDNN's fused attention ('sdpa' kernels, forward and backward) and its helpers
  other           matmuls (nvjet / cutlass / gemm fusions), XLA's fusions, transposes, copies
"""
from __future__ import annotations

import argparse
import collections
import gzip
import os
import re
import sys
import tempfile


def kernel_category(name: str) -> str:
  """One of 'conv f32/tf32', 'conv bf16', 'conv other', 'attention', 'other' for a GPU kernel name."""
  if "implicit_gemm" in name or "nhwckrsc" in name:
    if "f32f32_tf32" in name:
      return "conv f32/tf32"
    if "bf16bf16" in name:
      return "conv bf16"
    return "conv other"
  if "sdpa" in name or "cudnn::fusion" in name:
    return "attention"
  return "other"


def kernel_name(name: str) -> str:
  """'void foo<bar, 3>(...)' -> 'void foo' (one row per kernel, not per instantiation; the tile
  sizes in cuDNN's and cuBLAS's names, which come before any '<', stay)."""
  return re.sub(r"<.*", "", name).strip()


def summarise(events, steps: int) -> tuple[dict, collections.Counter, float, float]:
  """events: objects with name, start_ns, duration_ns. Returns (ms per step by category, ms per step
  by kernel name, busy ms per step, span ms per step)."""
  events = list(events)
  if not events:
    raise ValueError("no kernels in the trace")
  by_category, by_kernel = collections.Counter(), collections.Counter()
  for e in events:
    by_category[kernel_category(e.name)] += e.duration_ns / 1e6 / steps
    by_kernel[kernel_name(e.name)] += e.duration_ns / 1e6 / steps
  busy = sum(by_category.values())
  span = (max(e.start_ns + e.duration_ns for e in events) - min(e.start_ns for e in events)) / 1e6 / steps
  return dict(by_category), by_kernel, busy, span


def device_events(path: str):
  """The kernels of every GPU plane of an xplane file (gzipped or not). Raises SystemExit when the
  trace has no GPU plane."""
  from jax.profiler import ProfileData
  original = path
  if path.endswith(".gz"):
    with gzip.open(path, "rb") as f, tempfile.NamedTemporaryFile(suffix=".xplane.pb", delete=False) as out:
      out.write(f.read())
    path = out.name
  try:
    data = ProfileData.from_file(path)
  finally:
    if path != original:
      os.remove(path)
  planes = [p for p in data.planes if p.name.startswith("/device:GPU")]
  if not planes:
    raise SystemExit(f"error: {path} has no GPU plane (an XLA:CPU trace? see benchmarks/profile_step.py)")
  return [e for plane in planes for line in plane.lines for e in line.events]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("trace", help="an .xplane.pb file, or .xplane.pb.gz")
  parser.add_argument("--steps", type=int, default=2, help="steps the trace holds (bench_unet_step traces 2)")
  parser.add_argument("--top", type=int, default=25, help="kernels listed")
  parser.add_argument("--torch-ops", default="", help="a torch variant's op table (VARIANT_ops.txt) to compare")
  args = parser.parse_args(argv)
  if not os.path.exists(args.trace):
    raise SystemExit(f"error: no such file: {args.trace}")
  by_category, by_kernel, busy, span = summarise(device_events(args.trace), args.steps)
  print(f"{os.path.basename(args.trace)}: per step, device busy {busy:.2f} ms, span {span:.2f} ms\n")
  print("| category | ms / step | share |\n|---|---:|---:|")
  for name, ms in sorted(by_category.items(), key=lambda kv: -kv[1]):
    print(f"| {name} | {ms:.2f} | {ms / busy:.1%} |")
  print("\n| kernel | ms / step |\n|---|---:|")
  for name, ms in by_kernel.most_common(args.top):
    print(f"| `{name}` | {ms:.2f} |")
  if args.torch_ops and not os.path.exists(args.torch_ops):
    print(f"\n{args.torch_ops}: no such file (did the torch variant fail?)")
  elif args.torch_ops:
    with open(args.torch_ops) as f:
      total_ms = torch_device_ms(f.read())
    print(f"\n{os.path.basename(args.torch_ops)}: device time per step "
          + (f"{total_ms / args.steps:.2f} ms" if total_ms is not None else "not in the table (no CUDA activity?)"))
  return 0


def torch_device_ms(table: str) -> float | None:
  """torch.profiler's 'Self CUDA time total: 199.484ms' (or 'Self Device ...', in us, ms or s) in ms."""
  match = re.search(r"Self (?:CUDA|Device|XPU) time total:\s*([\d.]+)\s*(us|ms|s)\b", table)
  if not match:
    return None
  return float(match.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[match.group(2)]


if __name__ == "__main__":
  sys.exit(main())
