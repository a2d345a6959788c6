"""One UNet training step of Stable Diffusion 1.5 at 32x32 latents: ours (JAX) against diffusers (PyTorch).

  python benchmarks/bench_unet_step.py [--steps 5] [--warmup 2] [--size 32] [--batch 1]
      [--threads 2] [--variants jax_fp32,jax_bf16,torch_fp32,torch_bf16]
      [--out benchmarks/results/unet_step.md] [--append]

A step is forward + backward of the MSE between the UNet's output and a target (random noise),
with respect to every UNet parameter; no optimizer update, so only the model is compared.
Weights are random (diffusers' and flax's default inits: speed and memory do not depend on them).

  jax_fp32    our Flax UNet, jitted value_and_grad, fp32 params and compute
  jax_bf16    the same with bf16 compute (fp32 params; matmuls accumulate in fp32)
  torch_fp32  diffusers UNet2DConditionModel, fp32, eager
  torch_bf16  the same under torch.autocast('cpu', dtype=torch.bfloat16)

Each variant runs in its own subprocess, one after another, so that one's memory does not count
in another's. Time: median over --steps timed steps after --warmup steps (ours: the first call
compiles; compile time is reported apart). Memory: the process's peak resident set size while the
timed steps run (sampled every 5 ms from /proc/self/statm, after malloc_trim; it holds weights,
gradients, activations and the runtime), and for ours also XLA's buffer assignment of the compiled
step (arguments + outputs + temporaries). --append adds a run's table to the file, e.g. to rerun
one variant that a busy machine killed, beside its own torch_fp32 reference.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("jax_fp32", "jax_bf16", "torch_fp32", "torch_bf16")
GIB = 2 ** 30
# The SD 1.5 UNet (runwayml/stable-diffusion-v1-5, unet/config.json), written out: no download.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
    block_out_channels=[320, 640, 1280, 1280], attention_head_dim=8, norm_num_groups=32,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, act_fn="silu", flip_sin_to_cos=True,
    freq_shift=0)


def _parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
  parser.add_argument("--size", type=int, default=32, help="latent side (32 = 256 px images)")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--threads", type=int, default=os.cpu_count(),
                      help="torch.set_num_threads; XLA:CPU uses one thread per core, so keep the "
                           "core count for a fair comparison")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--out", default="benchmarks/results/unet_step.md")
  parser.add_argument("--append", action="store_true",
                      help="add this run's table to --out instead of replacing the file")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  return parser.parse_args(argv)


# ------------------------------------------------------------------------------ measuring
class PeakRSS:
  """Samples this process's resident set size in a thread; `peak` is the largest seen."""

  def __init__(self, interval_s: float = 0.005):
    self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()
    self._page = os.sysconf("SC_PAGE_SIZE")

  def current(self) -> int:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * self._page

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, self.current())
      time.sleep(self.interval_s)

  def __enter__(self):
    self.peak = self.current()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, self.current())


def _trim_heap() -> None:
  """Returns freed heap pages to the OS (glibc), so that memory the compiler or the warm-up freed
  does not count as resident in the timed window, for either framework."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except OSError:
    pass


def _timed(step, steps: int, warmup: int) -> dict:
  first = time.perf_counter()
  step()
  first_s = time.perf_counter() - first
  for _ in range(warmup - 1):
    step()
  _trim_heap()
  times = []
  with PeakRSS() as rss:
    rss_before = rss.current()
    for _ in range(steps):
      start = time.perf_counter()
      step()
      times.append(time.perf_counter() - start)
  return {"first_step_s": first_s, "step_s": statistics.median(times), "times_s": times,
          "peak_rss_bytes": rss.peak, "rss_before_bytes": rss_before}


# ------------------------------------------------------------------------------ workers
def run_jax(dtype_name: str, args) -> dict:
  sys.path.insert(0, ROOT)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from dreambooth_jax.models import unet as unet_lib

  config = unet_lib.UNetConfig.from_diffusers(SD15_UNET)
  dtype = jnp.bfloat16 if dtype_name == "bf16" else jnp.float32
  model = unet_lib.UNet2DConditionModel(config, dtype=dtype)
  params = jax.jit(lambda key: model.init(key, *unet_lib.init_inputs(config))["params"])(jax.random.key(0))
  params = jax.block_until_ready(params)
  rng = np.random.RandomState(0)
  latents = jnp.asarray(rng.randn(args.batch, args.size, args.size, 4), jnp.float32)
  target = jnp.asarray(rng.randn(args.batch, args.size, args.size, 4), jnp.float32)
  context = jnp.asarray(rng.randn(args.batch, 77, 768), jnp.float32)
  timesteps = jnp.asarray(rng.randint(0, 1000, args.batch), jnp.int32)

  def loss_fn(p):
    out = model.apply({"params": p}, latents, timesteps, context)
    return jnp.mean(jnp.square(out - target))

  step_fn = jax.jit(jax.value_and_grad(loss_fn))
  start = time.perf_counter()
  compiled = step_fn.lower(params).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  xla_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
               - mem.alias_size_in_bytes)
  result = _timed(lambda: jax.block_until_ready(compiled(params)), args.steps, args.warmup)
  result.update(compile_s=compile_s, xla_bytes=xla_bytes, xla_temp_bytes=mem.temp_size_in_bytes,
                version=f"jax {jax.__version__}")
  return result


def run_torch(dtype_name: str, args) -> dict:
  import numpy as np
  import torch
  import diffusers

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  model = diffusers.UNet2DConditionModel(**SD15_UNET).train()
  rng = np.random.RandomState(0)
  latents = torch.from_numpy(rng.randn(args.batch, 4, args.size, args.size).astype(np.float32))
  target = torch.from_numpy(rng.randn(args.batch, 4, args.size, args.size).astype(np.float32))
  context = torch.from_numpy(rng.randn(args.batch, 77, 768).astype(np.float32))
  timesteps = torch.from_numpy(rng.randint(0, 1000, args.batch))

  def step():
    model.zero_grad(set_to_none=True)  # as an optimizer loop does: last step's grads are freed
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype_name == "bf16"):
      out = model(latents, timesteps, context).sample
    loss = torch.mean(torch.square(out.float() - target))
    loss.backward()
    return loss.item()

  result = _timed(step, args.steps, args.warmup)
  result.update(compile_s=0.0, version=f"torch {torch.__version__}, diffusers {diffusers.__version__}")
  return result


# ------------------------------------------------------------------------------ driver
def _run_variant(name: str, args) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--steps", str(args.steps),
         "--warmup", str(args.warmup), "--size", str(args.size), "--batch", str(args.batch),
         "--threads", str(args.threads)]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  start = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if proc.returncode < 0:  # SIGKILL is what the kernel's out-of-memory killer sends
    return {"error": f"killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")}
  if proc.returncode != 0:
    return {"error": (proc.stderr.strip().splitlines() or ["(no output)"])[-1]}
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  result["wall_s"] = time.perf_counter() - start
  return result


def _load() -> str:
  one, five, fifteen = os.getloadavg()
  return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def _write_markdown(args, results: dict, loads: tuple[str, str], path: str) -> None:
  ref = results.get("torch_fp32", {})
  lines = [] if args.append else ["# UNet training step: SD 1.5 UNet, ours (JAX/Flax) vs diffusers "
                                   "(PyTorch), CPU", ""]
  lines += [
      f"## Run of {time.strftime('%Y-%m-%d %H:%M')}",
      "",
      f"Command: `python benchmarks/bench_unet_step.py --steps {args.steps} --warmup {args.warmup} "
      f"--size {args.size} --batch {args.batch} --threads {args.threads} --variants {args.variants}"
      f"{' --append' if args.append else ''}`",
      "",
      f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
      f"(shared with other jobs), {args.threads} threads per framework. Load average (1/5/15 min) "
      f"before: {loads[0]}; after: {loads[1]}.",
      f"Step: forward + backward of an MSE loss w.r.t. all 859.5M UNet parameters, latents "
      f"{args.batch}x{args.size}x{args.size}x4 ({args.size * 8} px images), text context "
      f"{args.batch}x77x768, random weights, no optimizer update. Median of {args.steps} steps after "
      f"{args.warmup} warm-up steps; each variant in its own process, one after another.",
      "Peak RSS: the process's largest resident set while the timed steps ran (weights, gradients, "
      "activations, runtime), after returning freed heap pages to the OS (malloc_trim); 'RSS before "
      "steps' is where it started. XLA: the compiled step's buffer assignment (arguments + outputs + "
      "temporaries).",
      "",
      "| variant | step (s) | vs torch fp32 | peak RSS (GiB) | vs torch fp32 | RSS before steps (GiB) "
      "| XLA buffers (GiB) | first step / compile (s) |",
      "|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for name, r in results.items():
    if "error" in r:
      lines.append(f"| {name} | failed: {r['error']} | | | | | | |")
      continue
    speed = f"{ref['step_s'] / r['step_s']:.2f}x faster" if "step_s" in ref else ""
    memory = f"{r['peak_rss_bytes'] / ref['peak_rss_bytes']:.2f}x" if "peak_rss_bytes" in ref else ""
    xla = f"{r['xla_bytes'] / GIB:.2f}" if "xla_bytes" in r else "-"
    first = f"{r['first_step_s']:.1f}" + (f" / {r['compile_s']:.1f}" if r.get("compile_s") else "")
    lines.append(f"| {name} | {r['step_s']:.2f} | {speed} | {r['peak_rss_bytes'] / GIB:.2f} | {memory} "
                 f"| {r['rss_before_bytes'] / GIB:.2f} | {xla} | {first} |")
  versions = sorted({r["version"] for r in results.values() if "version" in r})
  lines += ["", "Versions: " + "; ".join(versions) + ".",
            "", "Per-step times (s): " + "; ".join(
                f"{n}: {', '.join(f'{t:.2f}' for t in r['times_s'])}" for n, r in results.items()
                if "times_s" in r) + "."]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a" if args.append else "w") as f:
    f.write(("\n" if args.append else "") + "\n".join(lines) + "\n")


def main(argv=None) -> int:
  args = _parse_args(argv)
  if args.worker:
    framework, dtype_name = args.worker.split("_")
    result = (run_jax if framework == "jax" else run_torch)(dtype_name, args)
    print(json.dumps(result))
    return 0
  names = [n.strip() for n in args.variants.split(",") if n.strip()]
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}.")
  load_before = _load()
  results = {}
  for name in names:
    print(f"running {name} ... (load {_load()})", flush=True)
    results[name] = _run_variant(name, args)
    r = results[name]
    print(f"  {name}: " + (f"failed: {r['error']}" if "error" in r else
                           f"{r['step_s']:.2f} s/step, peak RSS {r['peak_rss_bytes'] / GIB:.2f} GiB"),
          flush=True)
  _write_markdown(args, results, (load_before, _load()), args.out)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
