"""Where a CLIP training step spends its time on XLA:CPU: one traced step, its ops grouped by kind.

  python benchmarks/profile_step.py [--model ViT-B-32] [--batch 32] [--dtype bfloat16|float32]
      [--out benchmarks/results/profile_step.md]

Builds the same step as `bench_train_step.py`'s jax runs (its child code), runs two untraced steps,
then traces one with `--xla_cpu_enable_xprof_traceme` and reads the trace with
`jax.profiler.ProfileData`. Every XLA op (a thunk: one library dot fusion, one loop fusion, one copy)
is one event on an XLA worker thread; their durations are summed per kind, the name without its
numeric suffix (`ynn_fusion.451` -> `ynn_fusion`). The kinds, in XLA:CPU's naming with jax 0.10.2:

  ynn_fusion            a dot (matmul) run by YNNPACK
  copy_bitcast_fusion   a transposing copy (mostly the activations' transposes the weight gradients
  / copy                need: YNNPACK takes row-major [M, K] x [K, N] only)
  *convert*             dtype conversions, usually fused with an element-wise op
  add_select_fusion     the optimizer update (AdamW, masked by the non-finite-step select)

Op time is summed over the worker threads, so it reads as CPU time; on a loaded machine every op
is longer, but the shares stay roughly right. Not a timed test; one run, the load is printed.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="ViT-B-32", help="a named CLIP config")
  parser.add_argument("--batch", type=int, default=32, help="images (and captions) per step")
  parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="compute dtype")
  parser.add_argument("--top", type=int, default=15, help="op kinds listed")
  parser.add_argument("--out", default="benchmarks/results/profile_step.md",
                      help="markdown file the table is appended to ('' to only print)")
  return parser.parse_args(argv)


def op_kind(name: str) -> str:
  """'ynn_fusion.451' -> 'ynn_fusion' (XLA numbers every op of a kind)."""
  return re.sub(r"\.\d+$", "", name)


def op_times_by_kind(planes) -> collections.Counter:
  """Seconds per op kind over XLA's worker threads (the executor's own bookkeeping events left out)."""
  totals = collections.Counter()
  for plane in planes:
    for line in plane.lines:
      if not line.name.startswith(("tf_XLAEigen", "tf_XLAPjRt")):
        continue
      for event in line.events:
        if event.name.startswith(("ThunkExecutor", "SlinkyThreadPool")) or event.name.startswith("end:"):
          continue
        totals[op_kind(event.name)] += event.duration_ns / 1e9
  return totals


def table(totals: collections.Counter, top: int) -> list[str]:
  whole = sum(totals.values())
  rows = ["| op kind | seconds | share |", "|---|---:|---:|"]
  for kind, seconds in totals.most_common(top):
    rows.append(f"| {kind} | {seconds:.2f} | {100 * seconds / whole:.1f}% |")
  rest = whole - sum(s for _, s in totals.most_common(top))
  rows.append(f"| (other kinds) | {rest:.2f} | {100 * rest / whole:.1f}% |")
  rows.append(f"| **all ops** | **{whole:.2f}** | 100% |")
  return rows


def append_markdown(path: str, title: str, lines: list[str]) -> None:
  """Appends `lines` to the markdown file at `path`, starting a new file (and its folder) with '# title'."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  new_file = not os.path.exists(path)
  with open(path, "a") as f:
    if new_file:
      f.write(f"# {title}\n\n")
    f.write("\n".join(lines) + "\n")


def main(argv=None) -> None:
  args = _parse_args(argv)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  sys.path.insert(0, ROOT)
  import jax
  import bench_train_step as bench

  steps = {}

  def keep_step(step, warmup, count):  # the child's timing loop, replaced: keep the step, warm it up
    del warmup, count
    steps["step"] = step
    step()
    step()
    return {"times": [0.0], "cpu_times": [0.0], "first_step_s": 0.0, "faults": [0]}

  bench._time_steps = keep_step
  bench._best_peak = lambda *a, **k: 0.0
  child_args = argparse.Namespace(model=args.model, batch=args.batch, steps=1, warmup=1, device="cpu",
                                  attention="auto")
  bench._jax_child(child_args, args.dtype)
  trace_dir = bench.scratch_dir("profile_step_")
  load = os.getloadavg()[0]
  jax.profiler.start_trace(trace_dir)
  start, cpu_start = time.perf_counter(), time.process_time()
  steps["step"]()
  wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
  jax.profiler.stop_trace()
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
  totals = op_times_by_kind(jax.profiler.ProfileData.from_file(path).planes)
  lines = [f"## {args.model} {args.dtype} train step, batch {args.batch} ({time.strftime('%Y-%m-%d %H:%M')})", "",
           f"Command: `python benchmarks/profile_step.py --model {args.model} --batch {args.batch} "
           f"--dtype {args.dtype}`; traced step {wall:.2f} s wall, {cpu:.2f} s CPU; 1-minute load {load:.2f} "
           f"before it; jax {jax.__version__}.", "", *table(totals, args.top), ""]
  print("\n".join(lines))
  if args.out:
    append_markdown(args.out, "Where the CLIP training step's time goes on XLA:CPU (`benchmarks/profile_step.py`)",
                    lines)


if __name__ == "__main__":
  main()
