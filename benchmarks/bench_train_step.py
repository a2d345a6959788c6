"""CLIP training-step throughput and MFU: this project (JAX) against open_clip (PyTorch), same CPU.

  python benchmarks/bench_train_step.py [--model ViT-B-32] [--batch 32] [--steps 6] [--warmup 2]
      [--runs jax_bf16,jax_fp32,torch_fp32,torch_bf16] [--malloc default|system|both]
      [--device cpu|gpu] [--attention auto|xla|cudnn] [--out benchmarks/results/train_step.md]

One full training step each: forward through both towers, the contrastive loss, backward, gradient
clipping and AdamW (CLIP paper settings), at the same batch and image size. Every (run, allocator)
pair is a child process of this script, so the runs do not share thread pools or heaps; the pairs
run one after the other, never at the same time. `--malloc default` starts each child in the
environment the project's entry points give themselves (`clip_jax.cli.malloc_environment`:
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 on glibc), `system` with malloc as the shell has it (the
opt-out, CLIP_JAX_MALLOC=system), `both` runs the two. Minor page faults per step are reported
beside the times: they, and CPU seconds, do not depend on the machine's load.

Compile: ours is traced and lowered, then compiled with the project's persistent compilation cache
on (`clip_jax.loop.enable_compilation_cache`, a fresh directory); after `jax.clear_caches()` it is
lowered and compiled again as a resumed run would ('cached compile': the executable read from the
cache); `first step` is the first call's wall time.

  jax_bf16    the project's train step (`clip_jax.train.make_train_step`), jitted on a 1-device mesh
              with donated state: bf16 compute, fp32 parameters and optimizer state
  jax_fp32    the same step in fp32
  torch_fp32  open_clip's model, its ClipLoss, torch.optim.AdamW (decay on >= 2-D weights only),
              clip_grad_norm_, fp32
  torch_bf16  the same under torch.autocast('cpu', dtype=torch.bfloat16), as open_clip's
              `--precision amp_bf16`

images/s is the median over `--steps` timed steps after `--warmup` untimed ones. Model FLOPs per
step, on CPU, are XLA's cost analysis of the compiled fp32 step (`compile().cost_analysis()['flops']`,
all matmuls and elementwise ops, forward + backward + update; plus 2 R K N for each MKL weight-gradient
call, `clip_jax.cpu_gemm.call_flops`, which the cost analysis does not see into); the analytic 6 x matmul-params x tokens
count (+ attention scores) is printed beside it as a check. On GPU the analytic count is the
numerator: XLA:GPU's cost analysis does not see inside library calls (cuDNN's fused attention;
on an H200 it counted 20.2 of the analytic 31.6 TFLOP of a ViT-B-16 step at batch 256).
MFU = FLOPs per step x steps/s over the measured bf16 x bf16 -> f32 matmul peak (CPU:
`clip_jax.train.measure_peak_flops`, 2048^3, in the layers' form: on a CPU without bf16 dot instructions
the operands converted to f32 first, as the step runs them; GPU: an 8192^3 product of random bf16 matrices, large
enough that launch and sync overheads vanish), the same numerator for every run, so the MFU ratio is
the throughput ratio. `--attention` forces the attention form of our runs (default: what 'auto'
picks, `clip_jax.layers.choose_attention_impl`); the compiled step's count of cuDNN fused-attention
calls is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = ("jax_bf16", "jax_fp32", "torch_fp32", "torch_bf16")


def _parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="ViT-B-32", help="a model name both projects know (ViT-B-32, RN50, ...)")
  parser.add_argument("--batch", type=int, default=32, help="images (and captions) per step")
  parser.add_argument("--steps", type=int, default=6, help="timed steps per run (the median is reported)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
  parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {RUNS}")
  parser.add_argument("--malloc", choices=("both", "default", "system"), default="default",
                      help="the entry points' allocator setting (default), malloc as the shell has it "
                           "(system), or both")
  parser.add_argument("--system_runs", default="jax_bf16,torch_bf16",
                      help="with --malloc both: the runs repeated with system malloc ('' = all of --runs)")
  parser.add_argument("--repeats", type=int, default=1,
                      help="rounds of all runs, alternating (ours, the peer, ours, ...); medians over all")
  parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                      help="where both frameworks run (gpu: jax's CUDA backend and torch.cuda)")
  parser.add_argument("--attention", choices=("auto", "xla", "cudnn", "f32_accum"), default="auto",
                      help="our runs' attention form (auto: clip_jax.layers.choose_attention_impl)")
  parser.add_argument("--out", default="benchmarks/results/train_step.md",
                      help="markdown table to write ('' to only print)")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  unknown = (set(args.runs.split(",")) | set(filter(None, args.system_runs.split(",")))) - set(RUNS)
  if unknown:
    parser.error(f"unknown runs {sorted(unknown)}; choose from {RUNS}")
  if args.batch < 2 or args.steps < 1 or args.warmup < 1:
    parser.error("--batch must be at least 2, --steps and --warmup at least 1")
  return args


# ----------------------------------------------------------------------------- children
def _synthetic_batch(model_name: str, batch: int):
  """One fixed batch (random pixels, captions of random length ending in EOT) from the project's
  own synthetic source; both frameworks get the same arrays."""
  sys.path.insert(0, ROOT)
  from clip_jax.models.configs import get_config
  from clip_jax.train import SyntheticData
  cfg = get_config(model_name)
  return next(SyntheticData(batch, cfg.vision.image_size, cfg.text.context_length, seed=0))


def _minor_faults() -> int:
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _time_steps(step, warmup: int, steps: int) -> dict:
  """Wall-clock and process CPU seconds of each timed step, the first (untimed) step's wall time
  and the minor page faults per timed step. CPU time and page faults are the steadier numbers on a
  shared machine (waiting for a core counts in neither), though spinning thread pools inflate CPU time."""
  start = time.perf_counter()
  step()
  first_s = time.perf_counter() - start
  for _ in range(warmup - 1):
    step()
  times, cpu_times, faults = [], [], []
  for _ in range(steps):
    start, cpu_start, faults_start = time.perf_counter(), time.process_time(), _minor_faults()
    step()
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - cpu_start)
    faults.append(_minor_faults() - faults_start)
  return {"times": times, "cpu_times": cpu_times, "first_step_s": first_s, "faults": faults}


def _jax_child(args, dtype_name: str) -> dict:
  sys.path.insert(0, ROOT)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from clip_jax import layers, loop, optim, sharding
  from clip_jax.train import (build_model, create_train_state, make_train_step, measure_peak_flops)
  from configs.clip.common import base_config

  force_attention(layers, args.attention)

  cfg = base_config()
  cfg.model.name, cfg.dtype = args.model, dtype_name
  cfg.global_batch, cfg.total_steps = args.batch, 1000
  if "RN" in args.model:
    cfg.optimizer.update(optim.paper_adam_defaults(is_resnet=True))
  mesh = sharding.create_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  rules = [tuple(r) for r in cfg.logical_axis_rules]
  model = build_model(cfg)
  state, state_shardings, tx = create_train_state(model, cfg.optimizer, mesh, rules, jax.random.key(0))
  train_step = loop.skip_nonfinite(make_train_step(model, tx, loss_kind="softmax", mesh=mesh, microbatches=1,
                                                   schedule=optim.learning_rate_schedule(cfg.optimizer)))
  data_sharding = sharding.batch_sharding(mesh)
  batch_shardings = {"image": data_sharding, "tokens": data_sharding}
  step_fn = jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                    out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=(0,))
  local = _synthetic_batch(args.model, args.batch)
  batch = {k: jax.device_put(np.asarray(v), data_sharding) for k, v in local.items()}
  cache_dir = scratch_dir("bench_jax_cache_")
  loop.enable_compilation_cache(cache_dir, workdir="")  # what every trainer does ('auto': a user dir)
  start = time.perf_counter()
  lowered = step_fn.lower(state, batch)
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start - lower_s
  # A resumed run: a new process traces and lowers again, then finds the executable on disk.
  jax.clear_caches()
  lowered = jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                    out_shardings=(state_shardings, NamedSharding(mesh, P())),
                    donate_argnums=(0,)).lower(state, batch)
  start = time.perf_counter()
  compiled = lowered.compile()
  cached_compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  cudnn_calls = compiled.as_text().count('custom_call_target="__cudnn$fmha')
  holder = {"state": state}

  def step():
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready(metrics)
    holder["loss"] = float(metrics["loss"])

  timing = _time_steps(step, args.warmup, args.steps)
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(holder["state"]["params"]))
  peak = _best_peak if args.device == "cpu" else _gpu_peak
  from clip_jax import cpu_gemm   # XLA's cost analysis counts nothing inside the MKL weight-gradient calls
  return {**timing, "xla_flops": float(cost.get("flops", 0.0)) + cpu_gemm.call_flops(compiled),
          "compile_s": compile_s,
          "cached_compile_s": cached_compile_s, "lower_s": lower_s, "cache_entries": len(os.listdir(cache_dir)),
          "loss": holder["loss"], "params": params, "cudnn_attention_calls": cudnn_calls,
          "attention": args.attention,
          "peak_bf16": peak(measure_peak_flops, jnp.bfloat16),
          "peak_fp32": peak(measure_peak_flops, jnp.float32),
          "device_kind": jax.devices()[0].device_kind,
          "bf16_dots_converted": layers.upcast_bf16_dots(jnp.bfloat16),
          "versions": {"jax": jax.__version__}}


def scratch_dir(prefix: str) -> str:
  """A new temporary folder, removed when this process exits (a benchmark's compilation cache or
  trace: many runs would otherwise leave one each in /tmp)."""
  import atexit
  import shutil
  import tempfile
  path = tempfile.mkdtemp(prefix=prefix)
  atexit.register(shutil.rmtree, path, True)
  return path


def force_attention(layers, impl: str) -> None:
  """Makes every 'auto' attention of the models `impl` (no-op for 'auto'): the models ask
  `layers.choose_attention_impl` at trace time, so replacing it reaches every layer."""
  if impl != "auto":
    layers.choose_attention_impl = lambda dtype, head_dim, backend: impl


def _best_peak(measure_peak_flops, dtype, trials: int = 5) -> float:
  """The project's peak measurement, best of `trials` uncached calls: on a shared machine a single
  call reads the other tenants' load, not the hardware."""
  return max(measure_peak_flops.__wrapped__(dtype) for _ in range(trials))


def _gpu_peak(measure_peak_flops, dtype, size: int = 8192, repeats: int = 10, trials: int = 3) -> float:
  """FLOP/s of a size^3 product of random matrices in `dtype` with f32 results, best of `trials`
  timings of `repeats` back-to-back products. The project's 2048^3 product of ones is too small for
  a GPU (launch and sync overheads dominate) and constant data can run faster than real data."""
  del measure_peak_flops
  import jax
  import jax.numpy as jnp
  keys = jax.random.split(jax.random.key(1), 2)
  a, b = (jax.random.normal(k, (size, size), jnp.float32).astype(dtype) for k in keys)
  f = jax.jit(lambda x, y: jax.lax.dot(x, y, preferred_element_type=jnp.float32))
  f(a, b).block_until_ready()
  best = 0.0
  for _ in range(trials):
    start = time.perf_counter()
    outs = [f(a, b) for _ in range(repeats)]
    jax.block_until_ready(outs)
    best = max(best, 2 * size ** 3 * repeats / (time.perf_counter() - start))
  return best


def _torch_child(args, dtype_name: str) -> dict:
  import contextlib

  import open_clip
  import torch
  from open_clip.loss import ClipLoss

  torch.manual_seed(0)
  device = "cuda" if args.device == "gpu" else "cpu"
  model = open_clip.create_model(args.model, output_dict=True).to(device)  # random init; GELU as open_clip's default
  model.train()
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.2}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
  loss_fn = ClipLoss()
  local = _synthetic_batch(args.model, args.batch)
  images = torch.from_numpy(local["image"]).permute(0, 3, 1, 2).contiguous().to(device)  # NHWC -> NCHW
  tokens = torch.from_numpy(local["tokens"]).long().to(device)
  autocast = (torch.autocast(device, dtype=torch.bfloat16) if dtype_name == "bfloat16"
              else contextlib.nullcontext())
  holder = {}

  def step():
    opt.zero_grad(set_to_none=True)
    with autocast:
      out = model(images, tokens)
      loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
      model.logit_scale.clamp_(0, 4.6052)
    holder["loss"] = float(loss)  # also waits for the device

  timing = _time_steps(step, args.warmup, args.steps)
  return {**timing, "loss": holder["loss"],
          "params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads(),
          "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__}}


def _child_main(args) -> None:
  run = args.child
  dtype_name = "bfloat16" if run.endswith("bf16") else "float32"
  result = _jax_child(args, dtype_name) if run.startswith("jax") else _torch_child(args, dtype_name)
  print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- parent
def analytic_flops(model_name: str, batch: int) -> float:
  """6 x (matmul parameters x tokens) + attention scores (12 x T^2 x width per layer), both towers;
  the ResNet stem and convs are not counted (ViTs only)."""
  sys.path.insert(0, ROOT)
  from clip_jax.models.configs import get_config
  cfg = get_config(model_name)
  if cfg.vision.is_resnet:
    return float("nan")

  def tower(tokens, width, layers, mlp_ratio):
    per_layer = (4 + 2 * mlp_ratio) * width * width  # q, k, v, out, fc, proj
    return 6 * batch * tokens * layers * per_layer + 12 * batch * layers * tokens * tokens * width

  v, t = cfg.vision, cfg.text
  patches = (v.image_size // v.patch_size) ** 2
  flops = tower(patches + 1, v.width, v.layers, v.mlp_ratio) + tower(t.context_length, t.width, t.layers, t.mlp_ratio)
  flops += 6 * batch * patches * v.patch_size ** 2 * 3 * v.width                  # patch embedding
  flops += 6 * batch * (v.width + t.width) * cfg.embed_dim                       # projections
  return float(flops)


def child_env(malloc: str, device: str, environ=None) -> dict:
  """The child's environment: the entry points' allocator setting ('default') or the shell's malloc
  ('system', with any hugetlb tunable of the shell's removed so the two rows differ)."""
  sys.path.insert(0, ROOT)
  from clip_jax import cli
  env = dict(os.environ if environ is None else environ)
  env.pop("GLIBC_TUNABLES", None)
  env["CLIP_JAX_MALLOC"] = "system"
  if malloc == "default":
    env.pop("CLIP_JAX_MALLOC")
    env = cli.malloc_environment(env, platform.libc_ver(), cli._read("/sys/kernel/mm/transparent_hugepage/enabled")) or env
  env.setdefault("JAX_PLATFORMS", "cuda" if device == "gpu" else "cpu")
  return env


def run_child(args, run: str, malloc: str) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--child", run, "--model", args.model,
         "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
         "--device", args.device, "--attention", args.attention]
  proc = subprocess.run(cmd, env=child_env(malloc, args.device), capture_output=True, text=True, cwd=ROOT)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
  if proc.returncode or not lines:
    raise RuntimeError(f"{run} (malloc {malloc}) failed with exit code {proc.returncode}:\n{proc.stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def _load() -> str:
  return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> None:
  args = _parse_args(argv)
  if args.child:
    _child_main(args)
    return
  runs = args.runs.split(",")
  system_runs = [r for r in runs if r in args.system_runs.split(",")] if args.system_runs else runs
  plan = {"default": [(r, "default") for r in runs], "system": [(r, "system") for r in runs],
          "both": [(r, "default") for r in runs] + [(r, "system") for r in system_runs]}[args.malloc]
  results = []
  for repeat in range(args.repeats):  # ABAB...: a load change hits every run alike
    for run, malloc in plan:
      load = _load()
      result = run_child(args, run, malloc)
      result.update(run=run, malloc=malloc, repeat=repeat, load_before=load, load_after=_load())
      median = statistics.median(result["times"])
      print(f"{run:11s} malloc={malloc:7s} {args.batch / median:6.2f} img/s  (median step {median:.2f} s, "
            f"CPU {statistics.median(result['cpu_times']):.2f} s, faults {statistics.median(result['faults']):.0f}, "
            f"steps {', '.join(f'{t:.2f}' for t in result['times'])}; load {load})", flush=True)
      results.append(result)
  report = build_report(args, results)
  print(report)
  if args.out:
    with open(args.out, "w") as f:
      f.write(report)


def _rows(results) -> list[list[dict]]:
  """Results grouped by (run, malloc) in plan order, repeats together."""
  groups: dict[tuple[str, str], list[dict]] = {}
  for r in results:
    groups.setdefault((r["run"], r["malloc"]), []).append(r)
  return list(groups.values())


def _step_s(group: list[dict]) -> float:
  """The median step over every timed step of every repeat."""
  return statistics.median([t for r in group for t in r["times"]])


def build_report(args, results) -> str:
  sys.path.insert(0, ROOT)
  from clip_jax import host   # standard library only: this parent process never imports jax
  jax_results = [r for r in results if r["run"].startswith("jax")]
  fp32 = next((r for r in jax_results if r["run"] == "jax_fp32"), None)
  xla_flops = (fp32 or jax_results[0])["xla_flops"] if jax_results else float("nan")
  flops_source = "XLA cost analysis of the fp32 step" if fp32 else "XLA cost analysis of the bf16 step"
  peak = statistics.median([r["peak_bf16"] for r in jax_results]) if jax_results else float("nan")
  peak32 = statistics.median([r["peak_fp32"] for r in jax_results]) if jax_results else float("nan")
  analytic = analytic_flops(args.model, args.batch)
  flops = xla_flops if args.device == "cpu" else analytic
  groups = _rows(results)
  refs = {dtype: next((g for g in groups if g[0]["run"] == f"torch_{dtype}" and g[0]["malloc"] == "default"), None)
          or next((g for g in groups if g[0]["run"] == f"torch_{dtype}"), None) for dtype in ("bf16", "fp32")}
  command = "python benchmarks/bench_train_step.py " + argv_string(args)
  loads = [float(r["load_before"].split(",")[0]) for r in results]
  lines = [
      f"# CLIP training step on {args.device.upper()}: {args.model}, batch {args.batch}, this project vs open_clip",
      "",
      f"Command: `{command.strip()}`",
      "",
      f"Machine: {host.describe_cpu()}, {os.cpu_count()} cores; "
      + ", ".join(f"{k} {v}" for k, v in {k: v for r in results for k, v in r["versions"].items()}.items())
      + (f". 1-minute load before the run: {loads[0]:.2f}" if len(loads) == 1 else
         f". 1-minute load before the runs: {min(loads):.2f} to {max(loads):.2f}")
      + (" (busy machine: wall times and their ratios are not reliable; page faults and CPU s are)"
         if max(loads) > 3 else "") + ".",
      (f"Model FLOPs per step: {flops / 1e9:,.0f} GFLOP ({flops_source}); analytic 6 x params x tokens "
       f"+ attention: {analytic / 1e9:,.0f} GFLOP." if args.device == "cpu" else
       f"Model FLOPs per step (the MFU numerator): {flops / 1e9:,.0f} GFLOP, analytic: 6 x matmul params x "
       f"tokens + 12 x layers x tokens^2 x width (attention scores and values, forward + backward), both "
       f"towers, + patch embedding and projections; XLA's cost analysis of the compiled step says "
       f"{xla_flops / 1e9:,.0f} GFLOP (it does not see inside library calls: cuDNN's attention, some cuBLAS "
       f"matmuls)."),
      (f"Peak (measured, 2048^3 matmul in the layers' form, best of 5): bf16 x bf16 -> f32 {peak / 1e9:,.0f} GFLOP/s"
       + (" (converted to f32 first, as our bf16 steps' dots: no bf16 dot instructions on this CPU)"
          if any(r.get("bf16_dots_converted") for r in jax_results) else "") + "; "
       f"f32 {peak32 / 1e9:,.0f} GFLOP/s. MFU is against the bf16 peak for every row." if args.device == "cpu" else
       f"Device: {jax_results[0]['device_kind'] if jax_results else '?'}. Peak (measured, 8192^3 product of random "
       f"matrices, best of 3 x 10): bf16 x bf16 -> f32 {peak / 1e12:,.0f} TFLOP/s; f32 (XLA's default precision) "
       f"{peak32 / 1e12:,.0f} TFLOP/s. MFU is against the measured bf16 peak for every row."),
      "Our runs' attention: " + ", ".join(sorted({f"{r['attention']} ({r['cudnn_attention_calls']} cuDNN fused-"
                                                  "attention calls in the compiled step)" for r in jax_results}))
      + ".",
      f"Timed: median of {args.steps} steps after {args.warmup} warmup steps (the first is 'first step'), "
      f"each run a separate process; {args.repeats} round(s) of all runs, alternating.",
      "",
      "| run | malloc | images/s | per round | median step (s) | MFU | vs open_clip, same dtype | CPU s / step "
      "| page faults / step | trace+lower / compile / cached compile (s) | first step (s) | loss | load 1-min |",
      "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
  ]
  for group in groups:
    r0 = group[0]
    median = _step_s(group)
    rate = args.batch / median
    ref = refs["bf16" if r0["run"].endswith("bf16") else "fp32"]
    ratio = f"{_step_s(ref) / median:.2f}x" if ref else "-"
    per_round = ", ".join(f"{args.batch / statistics.median(r['times']):.2f}" for r in group)
    compile_s = " / ".join(f"{statistics.median([r[k] for r in group]):.1f}"
                           for k in ("lower_s", "compile_s", "cached_compile_s")) if "compile_s" in r0 else "-"
    lines.append(
        f"| {r0['run']} | {r0['malloc']} | {rate:.2f} | {per_round} | {median:.2f} | {flops / median / peak:.1%} "
        f"| {ratio} | {statistics.median([c for r in group for c in r['cpu_times']]):.2f} "
        f"| {statistics.median([f for r in group for f in r['faults']]):,.0f} | {compile_s} "
        f"| {statistics.median([r['first_step_s'] for r in group]):.1f} | {r0['loss']:.4f} "
        f"| {', '.join(r['load_before'].split(',')[0] for r in group)} |")
  lines.append("")
  return "\n".join(lines) + "\n"


def argv_string(args) -> str:
  parts = []
  defaults = _parse_args([])
  for key in ("model", "batch", "steps", "warmup", "runs", "malloc", "system_runs", "device", "attention",
              "repeats"):
    if getattr(args, key) != getattr(defaults, key):
      parts.append(f"--{key} {getattr(args, key)}")
  return " ".join(parts)


if __name__ == "__main__":
  main()
