"""One matmul at a time, at the ViT-B-32 train step's shapes: XLA:CPU in the project's dot forms against
torch (oneDNN), on one core and on all cores. Where a CPU train step's ceiling comes from.

  python benchmarks/bench_matmul.py [--dtypes bfloat16,float32] [--repeats 15]
      [--out benchmarks/results/matmul.md]

Each (framework, cores) pair runs in a child process of its own; 'one core' pins the child to CPU 0
(`os.sched_setaffinity`) before jax or torch start, so both libraries' thread pools see one core.
The three products of a linear layer, with x [M, K], W [K, N] and g [M, N] stored row-major as the
project stores them (M = batch x tokens: 1600 for the vision tower at batch 32, 2464 for the text):

  NN  x @ W      the forward         ours: `layers._dot_last_first`
  NT  g @ W^T    the input gradient  ours: the dot of `layers._matmul_bwd`
  TN  x^T @ g    the weight gradient ours: `layers.rows_contracted` (in 16 bit it includes the copy of
                                     x^T that XLA:CPU's YNNPACK dots need; f32 contracts x as it is)

bf16: ours is bf16 x bf16 -> f32 (f32 accumulation, f32 result, what the train step runs); torch's
is bf16 x bf16 -> bf16 (what autocast runs; oneDNN accumulates in f32 and writes half the bytes).
float32: both f32. Time: median wall seconds of --repeats calls after 3 warm-ups, GFLOP/s = 2MKN / t.
Every form's result is checked against an f64 NumPy product of the same inputs (relative max error
printed). Not a timed test; run it alone (the other core's load shows in every number).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (M, K, N): the ViT-B-32 vision tower's (1600 rows) and the text tower's (2464 rows) linear layers.
SHAPES = [(1600, 768, 3072), (1600, 768, 768), (1600, 3072, 768),
          (2464, 512, 2048), (2464, 512, 512), (2464, 2048, 512)]
FORMS = ("NN", "NT", "TN")


def _parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated: bfloat16, float32")
  parser.add_argument("--repeats", type=int, default=15, help="timed calls per form (the median is kept)")
  parser.add_argument("--out", default="benchmarks/results/matmul.md",
                      help="markdown file the table is appended to ('' to only print)")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--one_core", action="store_true", help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def _operands(m: int, k: int, n: int, seed: int = 0):
  """x [m, k], W [k, n], g [m, n] as f32 NumPy arrays (bf16-representable: the same values in both dtypes)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  round_bf16 = lambda a: (a.astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)  # noqa: E731
  return tuple(round_bf16(rng.standard_normal(shape)) for shape in ((m, k), (k, n), (m, n)))


def _reference(form: str, x, w, g):
  import numpy as np
  x, w, g = (a.astype(np.float64) for a in (x, w, g))
  return {"NN": lambda: x @ w, "NT": lambda: g @ w.T, "TN": lambda: x.T @ g}[form]()


def _time(fn, repeats: int) -> float:
  for _ in range(3):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _xla_products():
  """The project's three dot forms, jitted (any dtype: each compiles per input dtype)."""
  sys.path.insert(0, ROOT)
  import jax
  import jax.numpy as jnp
  from clip_jax import layers
  nt = lambda g, w: jax.lax.dot_general(g, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)  # noqa: E731
  return {"NN": jax.jit(layers._dot_last_first), "NT": jax.jit(nt), "TN": jax.jit(layers.rows_contracted)}


def _child(framework: str, dtype_names: list[str], repeats: int) -> dict:
  import numpy as np
  results = {}
  if framework == "xla":
    import jax
    import jax.numpy as jnp
    version = f"jax {jax.__version__}"
  else:
    import torch
    version = f"torch {torch.__version__}"
  fns = _xla_products() if framework == "xla" else None
  for dtype_name in dtype_names:
    if framework == "xla":
      to = lambda a: jnp.asarray(a, getattr(jnp, dtype_name))  # noqa: E731
      call = {"NN": lambda x, w, g: fns["NN"](x, w), "NT": lambda x, w, g: fns["NT"](g, w),
              "TN": lambda x, w, g: fns["TN"](x, g)}
      run = lambda form, x, w, g: call[form](x, w, g).block_until_ready()  # noqa: E731
      back = lambda r: np.asarray(r, np.float64)  # noqa: E731
    else:
      to = lambda a: torch.from_numpy(a).to(getattr(torch, dtype_name))  # noqa: E731
      call = {"NN": lambda x, w, g: x @ w, "NT": lambda x, w, g: g @ w.T, "TN": lambda x, w, g: x.T @ g}
      run = lambda form, x, w, g: call[form](x, w, g)  # noqa: E731  (CPU torch is synchronous)
      back = lambda r: r.to(torch.float64).numpy()  # noqa: E731
    for m, k, n in SHAPES:
      arrays = _operands(m, k, n)
      x, w, g = (to(a) for a in arrays)
      for form in FORMS:
        ref = _reference(form, *arrays)
        err = float(np.max(np.abs(back(run(form, x, w, g)) - ref)) / np.max(np.abs(ref)))
        seconds = _time(lambda: run(form, x, w, g), repeats)
        out_m, out_n = ref.shape
        contracted = n if form == "NT" else (m if form == "TN" else k)
        results[f"{dtype_name} {m}x{k}x{n} {form}"] = {
            "gflops": 2 * out_m * out_n * contracted / seconds / 1e9, "seconds": seconds, "rel_err": err}
  return {"results": results, "version": version}


def _run_child(framework: str, one_core: bool, args) -> dict:
  command = [sys.executable, os.path.abspath(__file__), "--child", framework, "--dtypes", args.dtypes,
             "--repeats", str(args.repeats)] + (["--one_core"] if one_core else [])
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
  if line is None:
    raise RuntimeError(f"{framework} child failed:\n{done.stderr[-3000:]}")
  return json.loads(line[len("RESULT "):])


def table(runs: dict) -> list[str]:
  """runs[(framework, 'one'|'all')] -> rows: one per (dtype, shape, form), GFLOP/s and ours/torch."""
  keys = list(runs[("xla", "one")]["results"])
  rows = ["| dtype | M x K x N | product | ours 1 core | torch 1 core | ratio | ours all cores | torch all cores | ratio |",
          "|---|---|---|---:|---:|---:|---:|---:|---:|"]
  ratios = {"one": [], "all": []}
  for key in keys:
    dtype, shape, form = key.split()
    cells = []
    for cores in ("one", "all"):
      ours, theirs = runs[("xla", cores)]["results"][key], runs[("torch", cores)]["results"][key]
      ratio = ours["gflops"] / theirs["gflops"]
      ratios[cores].append((dtype, ratio))
      cells += [f"{ours['gflops']:.0f}", f"{theirs['gflops']:.0f}", f"{ratio:.2f}x"]
    rows.append(f"| {dtype} | {shape} | {form} | " + " | ".join(cells) + " |")
  for dtype in sorted({k.split()[0] for k in keys}):
    geo = {c: statistics.geometric_mean([r for d, r in ratios[c] if d == dtype]) for c in ratios}
    rows.append(f"| {dtype} | geometric mean | | | | {geo['one']:.2f}x | | | {geo['all']:.2f}x |")
  return rows


def main(argv=None) -> None:
  args = _parse_args(argv)
  dtype_names = args.dtypes.split(",")
  if args.child:
    if args.one_core:
      os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    if args.child == "torch":
      import torch
      torch.set_num_threads(len(os.sched_getaffinity(0)))
    print("RESULT " + json.dumps(_child(args.child, dtype_names, args.repeats)), flush=True)
    return
  load = os.getloadavg()[0]
  runs = {}
  for cores in ("one", "all"):
    for framework in ("xla", "torch"):
      print(f"{framework}, {cores} core(s) ...", flush=True)
      runs[(framework, cores)] = _run_child(framework, cores == "one", args)
  worst = max(r["rel_err"] for run in runs.values() for r in run["results"].values())
  sys.path.insert(0, ROOT)
  from clip_jax import host   # standard library only
  lines = [f"## Matmuls at the ViT-B-32 step's shapes, GFLOP/s ({time.strftime('%Y-%m-%d %H:%M')})", "",
           f"Command: `python benchmarks/bench_matmul.py --dtypes {args.dtypes} --repeats {args.repeats}`; "
           f"{runs[('xla', 'one')]['version']}, {runs[('torch', 'one')]['version']}; {os.cpu_count()} cores "
           f"({host.describe_cpu()}); 1-minute load {load:.2f} before it; largest error "
           f"relative to an f64 product {worst:.1e}.", "", *table(runs), ""]
  print("\n".join(lines))
  if args.out:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from profile_step import append_markdown
    append_markdown(args.out, "One matmul at a time, ours (XLA:CPU) against torch (`benchmarks/bench_matmul.py`)", lines)


if __name__ == "__main__":
  main()
