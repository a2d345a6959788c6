"""One UNet training step of Stable Diffusion 1.5 at 32x32 latents: ours (JAX) against diffusers (PyTorch).

  python benchmarks/bench_unet_step.py [--steps 5] [--warmup 2] [--size 32] [--batch 1]
      [--threads 2] [--variants jax_fp32,jax_bf16,jax_bf16_remat,torch_fp32,torch_bf16]
      [--repeats 1] [--device cpu|gpu] [--unet sd15|tiny] [--attention auto|xla|cudnn]
      [--skip-cached-compile] [--profile DIR] [--out benchmarks/results/unet_step.md] [--append]

A step is forward + backward of the MSE between the UNet's output and a target (random noise),
with respect to every UNet parameter; no optimizer update, so only the model is compared.
Weights are random (diffusers' and flax's default inits; ours on GPU N(0, 0.02) of the init's shapes
drawn on the host, since compiling flax's init costs minutes there): speed and memory do not depend
on them.

  jax_fp32        our Flax UNet, jitted value_and_grad, fp32 params and compute
  jax_bf16        the same with bf16 compute (fp32 params; matmuls, attention and convolutions in
                  the bf16 x bf16 -> f32 forms of clip_jax.layers, forward and backward; on GPU a
                  conv returns bf16, cuDNN accumulating in f32: clip_jax.layers.conv_output_dtype)
  jax_bf16_remat  the same with each down/mid/up block rematerialised in the backward pass
  torch_fp32      diffusers UNet2DConditionModel, fp32, eager
  torch_bf16      the same under torch.autocast(device, dtype=torch.bfloat16)
  jax_bf16_lora   DreamBooth-LoRA's step: gradients w.r.t. a rank --lora-rank adapter on every attention
                  projection (to_q/k/v/out, alpha = rank), the frozen kernels in bf16
                  (`dreambooth_jax.train.frozen_params`), the adapter beside them (`lora.attach`)
  torch_bf16_lora diffusers' train_dreambooth_lora.py setup: the UNet frozen and cast to bf16, a PEFT
                  LoraConfig(r, lora_alpha=r, init_lora_weights='gaussian', the same four targets)
                  added (its adapter weights then bf16 too: the script upcasts them only for fp16),
                  bf16 inputs, the forward under autocast
A LoRA row is compared with diffusers' LoRA row, a full row with diffusers' best full row.

Each variant runs in its own subprocess, one after another, so that one's memory does not count
in another's; --repeats N runs all variants N times in turn (ours, diffusers, ours, ...), so a
change of the machine's load hits both alike. Every process runs under the allocator setting the
project's entry points use (`clip_jax.cli.malloc_environment`). Time: median over --steps timed
steps after --warmup steps (ours: compile time is reported apart, cold and as a resumed run finds
it in the persistent compilation cache, after `jax.clear_caches()`). Memory: the process's peak resident set size while the
timed steps run (sampled every 5 ms from /proc/self/statm, after malloc_trim; it holds weights,
gradients, activations and the runtime), and for ours also XLA's buffer assignment of the compiled
step (arguments + outputs + temporaries). --append adds a run's table to the file, e.g. to rerun
one variant that a busy machine killed, beside its own torch_fp32 reference. On GPU the memory
ratio is the device's: ours XLA's buffer assignment (the allocator's peak is shown too, but it also
holds what autotuning borrowed while compiling, and jax cannot reset it), diffusers'
`torch.cuda.max_memory_allocated` over the steps; the one-step RSS ratio is then the host's.
`--attention` forces our attention form (default 'auto'); the compiled step's count of cuDNN
fused-attention calls is reported. `--profile DIR` traces two more steps of each variant
(`benchmarks/profile_summary.py` sums a GPU trace's kernels).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time

# Standard library only at its top level (it imports jax in its workers), like this script; both live in
# benchmarks/, which is sys.path[0] when this runs as a script.
from bench_train_step import child_env, force_attention, scratch_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("jax_fp32", "jax_bf16", "jax_bf16_remat", "torch_fp32", "torch_bf16", "jax_bf16_lora",
            "torch_bf16_lora")
GIB = 2 ** 30
# The SD 1.5 UNet (runwayml/stable-diffusion-v1-5, unet/config.json), written out: no download.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
    block_out_channels=[320, 640, 1280, 1280], attention_head_dim=8, norm_num_groups=32,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, act_fn="silu", flip_sin_to_cos=True,
    freq_shift=0)
# The same architecture at toy width (a dry run of the script in seconds, e.g. benchmarks/gpu_check.sh).
TINY_UNET = dict(SD15_UNET, block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=32, norm_num_groups=8,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
UNETS = {"sd15": SD15_UNET, "tiny": TINY_UNET}


def _parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
  parser.add_argument("--size", type=int, default=32, help="latent side (32 = 256 px images)")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--threads", type=int, default=os.cpu_count(),
                      help="torch.set_num_threads; XLA:CPU uses one thread per core, so keep the "
                           "core count for a fair comparison")
  parser.add_argument("--variants", default="jax_fp32,jax_bf16,torch_fp32,torch_bf16")
  parser.add_argument("--repeats", type=int, default=1, help="rounds of all variants, in turn")
  parser.add_argument("--lora-rank", type=int, default=4, help="the *_lora variants' adapter rank")
  parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  parser.add_argument("--unet", choices=sorted(UNETS), default="sd15",
                      help="sd15: SD 1.5's UNet; tiny: the same blocks at width 32-64 (dry runs)")
  parser.add_argument("--attention", choices=("auto", "xla", "cudnn", "f32_accum"), default="auto",
                      help="our attention form (auto: clip_jax.layers.choose_attention_impl)")
  parser.add_argument("--skip-cached-compile", action="store_true",
                      help="do not trace, lower and compile a second time for the cached-compile column")
  parser.add_argument("--out", default="benchmarks/results/unet_step.md", help="markdown file to write ('' to only print)")
  parser.add_argument("--append", action="store_true",
                      help="add this run's table to --out instead of replacing the file")
  parser.add_argument("--profile", default="",
                      help="after the timed steps, trace two more steps of each variant into this folder "
                           "(ours: jax.profiler's xplane trace as VARIANT.xplane.pb; diffusers: torch.profiler's "
                           "op table as VARIANT_ops.txt and its trace as VARIANT.trace.json.gz); summarise ours "
                           "with benchmarks/profile_summary.py. With --repeats N the last round's trace is kept")
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
  times, first_timed_peak = [], None
  with PeakRSS() as rss:
    rss_before = rss.current()
    for _ in range(steps):
      start = time.perf_counter()
      step()
      times.append(time.perf_counter() - start)
      # After one step the peak is what the step holds at once; later steps add what the heap kept
      # of the earlier ones' freed buffers (glibc does not hand it back between steps).
      first_timed_peak = first_timed_peak or max(rss.peak, rss.current())
  return {"first_step_s": first_s, "step_s": statistics.median(times), "times_s": times,
          "peak_rss_bytes": rss.peak, "first_timed_step_peak_rss_bytes": first_timed_peak,
          "rss_before_bytes": rss_before}


# ------------------------------------------------------------------------------ workers
def run_jax(dtype_name: str, args, remat: bool = False, lora: bool = False) -> dict:
  sys.path.insert(0, ROOT)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from clip_jax import layers, loop
  from dreambooth_jax.models import unet as unet_lib

  force_attention(layers, args.attention)

  unet = UNETS[args.unet]
  config = unet_lib.UNetConfig.from_diffusers(unet)
  dtype = jnp.bfloat16 if dtype_name == "bf16" else jnp.float32
  model = unet_lib.UNet2DConditionModel(config, dtype=dtype, remat=remat)
  if args.device == "gpu":
    # Random N(0, 0.02) weights of the init's shapes, drawn on the host: compiling the init (a whole
    # forward pass, every conv autotuned) cost about two minutes of a GPU lease; speed and memory
    # do not depend on the values.
    shapes = jax.eval_shape(lambda key: model.init(key, *unet_lib.init_inputs(config))["params"], jax.random.key(0))
    host_rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.02 * host_rng.standard_normal(s.shape, np.float32), s.dtype), shapes)
  else:
    params = jax.jit(lambda key: model.init(key, *unet_lib.init_inputs(config))["params"])(jax.random.key(0))
  params = jax.block_until_ready(params)
  rng = np.random.RandomState(0)
  latents = jnp.asarray(rng.randn(args.batch, args.size, args.size, 4), jnp.float32)
  target = jnp.asarray(rng.randn(args.batch, args.size, args.size, 4), jnp.float32)
  context = jnp.asarray(rng.randn(args.batch, 77, unet["cross_attention_dim"]), jnp.float32)
  timesteps = jnp.asarray(rng.randint(0, 1000, args.batch), jnp.int32)

  if lora:  # gradients w.r.t. the adapter only; the frozen UNet is an argument, not a constant
    from dreambooth_jax.train import kernels_in_dtype
    from dreambooth_jax.training import lora as lora_lib
    import flax
    params = flax.core.meta.unbox(params)  # init's logical-axis boxes off: attach places plain leaves
    adapter = lora_lib.init_lora(jax.random.key(1), params, args.lora_rank)
    step_args = (adapter, kernels_in_dtype(params, dtype))
    del params

    def loss_fn(a, frozen):
      out = model.apply({"params": lora_lib.attach(frozen, a, float(args.lora_rank))}, latents, timesteps, context)
      return jnp.mean(jnp.square(out - target))
  else:
    step_args = (params,)

    def loss_fn(p):
      out = model.apply({"params": p}, latents, timesteps, context)
      return jnp.mean(jnp.square(out - target))

  loop.enable_compilation_cache(scratch_dir("bench_jax_cache_"), workdir="")
  start = time.perf_counter()
  lowered = jax.jit(jax.value_and_grad(loss_fn)).lower(*step_args)
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start - lower_s
  cached_compile_s = float("nan")
  if not args.skip_cached_compile:
    jax.clear_caches()  # a resumed run: traced and lowered again, the executable read from the cache
    lowered = jax.jit(jax.value_and_grad(loss_fn)).lower(*step_args)
    start = time.perf_counter()
    compiled = lowered.compile()
    cached_compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  xla_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
               - mem.alias_size_in_bytes)
  result = _timed(lambda: jax.block_until_ready(compiled(*step_args)), args.steps, args.warmup)
  result.update(trained_parameters=sum(x.size for x in jax.tree.leaves(step_args[0])))
  result.update(compile_s=compile_s, cached_compile_s=cached_compile_s, lower_s=lower_s, xla_bytes=xla_bytes,
                xla_temp_bytes=mem.temp_size_in_bytes, version=f"jax {jax.__version__}",
                cudnn_attention_calls=compiled.as_text().count('custom_call_target="__cudnn$fmha'),
                bf16_dots_converted=dtype == jnp.bfloat16 and layers.upcast_bf16_dots(dtype))
  if args.device == "gpu":
    stats = jax.devices()[0].memory_stats() or {}
    result["device_peak_bytes"] = stats.get("peak_bytes_in_use")
  if args.profile:
    _profile_jax(lambda: jax.block_until_ready(compiled(*step_args)), args.profile, args.worker)
  return result


def _profile_jax(step, folder: str, name: str) -> None:
  """Two steps under jax.profiler; the trace's xplane file is copied to FOLDER/NAME.xplane.pb (one
  file, not jax's nested plugins/profile/<run>/ folders)."""
  import glob
  import shutil

  import jax
  trace_dir = scratch_dir("unet_trace_")   # the trace file is copied to FOLDER
  with jax.profiler.trace(trace_dir):
    for _ in range(2):
      step()
  os.makedirs(folder, exist_ok=True)
  shutil.copy(sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1],
              os.path.join(folder, f"{name}.xplane.pb"))


def run_torch(dtype_name: str, args, lora: bool = False) -> dict:
  import numpy as np
  import torch
  import diffusers

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  unet = UNETS[args.unet]
  device = "cuda" if args.device == "gpu" else "cpu"
  model = diffusers.UNet2DConditionModel(**unet).to(device).train()
  input_dtype = torch.float32
  if lora:  # as train_dreambooth_lora.py: frozen UNet in weight_dtype, PEFT adapter added after
    from peft import LoraConfig
    model.requires_grad_(False)
    model.to(dtype=torch.bfloat16)
    model.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian",
                                 target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    input_dtype = torch.bfloat16  # the script's latents and text states come in weight_dtype
  rng = np.random.RandomState(0)
  as_tensor = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
  latents = as_tensor(rng.randn(args.batch, 4, args.size, args.size).astype(np.float32)).to(input_dtype)
  target = as_tensor(rng.randn(args.batch, 4, args.size, args.size).astype(np.float32))
  context = as_tensor(rng.randn(args.batch, 77, unet["cross_attention_dim"]).astype(np.float32)).to(input_dtype)
  timesteps = as_tensor(rng.randint(0, 1000, args.batch))

  def step():
    model.zero_grad(set_to_none=True)  # as an optimizer loop does: last step's grads are freed
    with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype_name == "bf16"):
      out = model(latents, timesteps, context).sample
    loss = torch.mean(torch.square(out.float() - target))
    loss.backward()
    return loss.item()

  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  result = _timed(step, args.steps, args.warmup)
  result.update(compile_s=0.0, version=f"torch {torch.__version__}, diffusers {diffusers.__version__}",
                trained_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad))
  if device == "cuda":
    result["device_peak_bytes"] = torch.cuda.max_memory_allocated()
  if args.profile:
    _profile_torch(step, device, args.profile, args.worker)
  return result


def _profile_torch(step, device: str, folder: str, name: str) -> None:
  """Two steps under torch.profiler: FOLDER/NAME_ops.txt (ops by self device time, else self CPU time)
  and FOLDER/NAME.trace.json.gz (the chrome trace)."""
  import gzip
  import shutil

  import torch
  from torch.profiler import ProfilerActivity, profile
  activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
  with profile(activities=activities) as prof:
    for _ in range(2):
      step()
    if device == "cuda":
      torch.cuda.synchronize()
  os.makedirs(folder, exist_ok=True)
  averages = prof.key_averages()
  table = None
  device_keys = ("self_device_time_total", "self_cuda_time_total") if device == "cuda" else ()  # newer, older torch
  for key in device_keys + ("self_cpu_time_total",):
    try:
      table = averages.table(sort_by=key, row_limit=80, max_name_column_width=90)
      break
    except (AttributeError, KeyError, ValueError):
      continue
  with open(os.path.join(folder, f"{name}_ops.txt"), "w") as f:
    f.write(table or str(averages))
  raw = os.path.join(scratch_dir("unet_torch_trace_"), "trace.json")
  prof.export_chrome_trace(raw)
  with open(raw, "rb") as src, gzip.open(os.path.join(folder, f"{name}.trace.json.gz"), "wb") as dst:
    shutil.copyfileobj(src, dst)


# ------------------------------------------------------------------------------ driver
def _run_variant(name: str, args) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--steps", str(args.steps),
         "--warmup", str(args.warmup), "--size", str(args.size), "--batch", str(args.batch),
         "--threads", str(args.threads), "--device", args.device, "--unet", args.unet, "--attention", args.attention,
         "--lora-rank", str(args.lora_rank)]
  if args.skip_cached_compile:
    cmd.append("--skip-cached-compile")
  if args.profile:
    cmd += ["--profile", os.path.abspath(args.profile)]
  env = child_env("default", args.device)  # the entry points' allocator setting, the device's platform
  start = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if proc.returncode < 0:  # SIGKILL is what the kernel's out-of-memory killer sends
    return {"error": f"killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")}
  if proc.returncode != 0:
    lines = proc.stderr.strip().splitlines() or ["(no output)"]
    # The exception's own line, not jax's closing note about filtered traceback frames.
    raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
    return {"error": (raised or lines)[-1]}
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  result["wall_s"] = time.perf_counter() - start
  return result


def _load() -> str:
  one, five, fifteen = os.getloadavg()
  return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def _median(rounds: list[dict], key: str) -> float:
  return statistics.median([r[key] for r in rounds])


def _write_markdown(args, results: dict[str, list[dict]], loads: tuple[str, str], path: str) -> None:
  sys.path.insert(0, ROOT)
  from clip_jax import host   # standard library only: this parent process never imports jax
  ok = {n: [r for r in rounds if "error" not in r] for n, rounds in results.items()}
  torch_names = [n for n in ("torch_fp32", "torch_bf16") if ok.get(n)]
  best_full = min(torch_names, key=lambda n: _median(ok[n], "step_s")) if torch_names else None
  best_lora = "torch_bf16_lora" if ok.get("torch_bf16_lora") else None
  reference = lambda name: best_lora if name.endswith("_lora") else best_full  # noqa: E731
  references = " / ".join(n for n in (best_full, best_lora) if n) or "-"
  lora_rows = any(n.endswith("_lora") for n in results)
  where = "GPU" if args.device == "gpu" else "CPU"
  command = (f"python benchmarks/bench_unet_step.py --steps {args.steps} --warmup {args.warmup} --size {args.size} "
             f"--batch {args.batch} --threads {args.threads} --variants {args.variants} --repeats {args.repeats}"
             f"{' --device gpu' if args.device == 'gpu' else ''}{' --unet tiny' if args.unet == 'tiny' else ''}"
             f"{f' --attention {args.attention}' if args.attention != 'auto' else ''}"
             f"{f' --lora-rank {args.lora_rank}' if lora_rows else ''}{' --append' if args.append else ''}")
  one_minute = [float(x.split(" / ")[0]) for x in loads]
  lines = [] if args.append else [f"# UNet training step: SD 1.5 UNet, ours (JAX/Flax) vs diffusers (PyTorch), {where}", ""]
  lines += [
      f"## Run of {time.strftime('%Y-%m-%d %H:%M')}",
      "",
      f"Command: `{command}`",
      "",
      f"Machine: {host.describe_cpu()}, {os.cpu_count()} cores "
      f"(shared with other jobs), {args.threads} threads per framework"
      + ("; our bf16 dots are converted to f32 first (no bf16 dot instructions on this CPU: "
         "clip_jax.layers.upcast_bf16_dots)" if any(r.get("bf16_dots_converted") for rounds in ok.values()
                                                    for r in rounds) else "")
      + ". Load average (1/5/15 min) "
      f"before: {loads[0]}; after: {loads[1]}."
      + (" **Busy machine: the step times and their ratios must be re-measured at low load.**"
         if max(one_minute) > 3 and args.device == "cpu" else ""),
      f"Step: forward + backward of an MSE loss w.r.t. all UNet parameters ({args.unet}; a *_lora row: "
      "w.r.t. its adapter only, below), latents "
      f"{args.batch}x{args.size}x{args.size}x4 ({args.size * 8} px images), text context "
      f"{args.batch}x77, random weights, no optimizer update. Median of {args.steps} steps after "
      f"{args.warmup} warm-up steps; each variant in its own process; {args.repeats} round(s) of all "
      "variants in turn (a row's step is the median of its rounds' medians; 'rounds' lists them)."
      + (f" A *_lora row's gradients are w.r.t. a rank-{args.lora_rank} LoRA adapter on every attention "
         "projection only (DreamBooth-LoRA; frozen UNet in bf16, diffusers' side set up as its "
         "train_dreambooth_lora.py with PEFT), compared with torch_bf16_lora; full rows with diffusers' "
         "best full row." if lora_rows else ""),
      "Peak RSS: the process's largest resident set while the timed steps ran (weights, gradients, "
      "activations, runtime), after returning freed heap pages to the OS (malloc_trim); 'one step' is "
      "that peak over the first timed step only (what one step holds at once: later steps add freed "
      "memory the C heap kept); 'RSS before steps' is where it started. XLA: the compiled step's buffer assignment (arguments + outputs + "
      "temporaries). Compile: trace+lower, then compile cold, then compile again as a resumed run "
      "(after jax.clear_caches(): the executable from the persistent cache).",
      "",
      f"| variant | step (s) | rounds (s) | vs diffusers ({references}) | peak RSS (GiB) | vs {references} "
      f"| peak RSS, one step (GiB) | one step vs {references} | RSS before steps (GiB) | XLA buffers (GiB) | device peak (GiB) "
      "| trace+lower / compile / cached compile (s) | first step (s) |",
      "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  digits = 4 if args.device == "gpu" else 2  # GPU steps of a tenth of a second: milliseconds matter
  for name, rounds in results.items():
    if not ok[name]:
      lines.append(f"| {name} | failed: {rounds[-1]['error']} | | | | | | | | | | | |")
      continue
    good, best = ok[name], reference(name)
    step = _median(good, "step_s")
    peak = _median(good, "peak_rss_bytes")
    speed = f"{_median(ok[best], 'step_s') / step:.2f}x" if best else "-"
    memory = f"{peak / _median(ok[best], 'peak_rss_bytes'):.2f}x" if best else "-"
    if args.device == "gpu" and best and ok[best][0].get("device_peak_bytes"):
      # The device's memory is what counts. Ours: XLA's buffer assignment of the step, since the allocator's
      # peak also holds what autotuning borrowed while compiling; a torch row: its max_memory_allocated.
      def device_bytes(rows):
        return _median(rows, "xla_bytes" if "xla_bytes" in rows[0] else "device_peak_bytes")
      memory = f"{device_bytes(good) / device_bytes(ok[best]):.2f}x (device)"
    xla = f"{_median(good, 'xla_bytes') / GIB:.2f}" if "xla_bytes" in good[0] else "-"
    device_peak = (f"{_median(good, 'device_peak_bytes') / GIB:.2f}" if good[0].get("device_peak_bytes") else "-")
    compile_s = (" / ".join(f"{_median(good, k):.1f}" for k in ("lower_s", "compile_s", "cached_compile_s"))
                 if good[0].get("lower_s") is not None else "-")
    one_step_bytes = lambda rows: _median(rows, "first_timed_step_peak_rss_bytes")  # noqa: E731
    has_one_step = lambda rows: bool(rows and rows[0].get("first_timed_step_peak_rss_bytes"))  # noqa: E731
    one_step = f"{one_step_bytes(good) / GIB:.2f}" if has_one_step(good) else "-"
    one_step_ratio = (f"{one_step_bytes(good) / one_step_bytes(ok[best]):.2f}x"
                      if best and has_one_step(good) and has_one_step(ok[best]) else "-")
    if args.device == "gpu" and one_step_ratio != "-":
      one_step_ratio += " (host)"  # the host's resident set, not the device's memory
    rounds_s = ", ".join(f"{r['step_s']:.2f}" for r in good)
    if args.device == "gpu":  # steps of a tenth of a second: milliseconds matter
      rounds_s = ", ".join(f"{r['step_s']:.4f}" for r in good)
    lines.append(f"| {name} | {step:.{digits}f} | {rounds_s} | {speed} "
                 f"| {peak / GIB:.2f} | {memory} | {one_step} | {one_step_ratio} | {_median(good, 'rss_before_bytes') / GIB:.2f} | {xla} "
                 f"| {device_peak} | {compile_s} | {_median(good, 'first_step_s'):.1f} |")
  versions = sorted({r["version"] for rounds in ok.values() for r in rounds})
  cudnn = sorted({r["cudnn_attention_calls"] for rounds in ok.values() for r in rounds if "cudnn_attention_calls" in r})
  lines += ["", "Versions: " + "; ".join(versions) + f". Our attention: {args.attention}"
            + (f" ({', '.join(map(str, cudnn))} cuDNN fused-attention calls in the compiled step)." if cudnn else "."),
            "", "Per-step times (s): " + "; ".join(
                f"{n}: {', '.join(f'{t:.{digits}f}' for r in rounds for t in r['times_s'])}"
                for n, rounds in ok.items()
                if rounds) + "."]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a" if args.append else "w") as f:
    f.write(("\n" if args.append else "") + "\n".join(lines) + "\n")


def main(argv=None) -> int:
  args = _parse_args(argv)
  if args.worker:
    framework, dtype_name = args.worker.split("_")[:2]
    lora = args.worker.endswith("_lora")
    if framework == "jax":
      result = run_jax(dtype_name, args, remat=args.worker.endswith("_remat"), lora=lora)
    else:
      result = run_torch(dtype_name, args, lora=lora)
    print(json.dumps(result))
    return 0
  names = [n.strip() for n in args.variants.split(",") if n.strip()]
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}.")
  load_before = _load()
  results: dict[str, list[dict]] = {name: [] for name in names}
  for repeat in range(args.repeats):
    for name in names:
      print(f"running {name} (round {repeat + 1}/{args.repeats}) ... (load {_load()})", flush=True)
      r = _run_variant(name, args)
      results[name].append(r)
      print(f"  {name}: " + (f"failed: {r['error']}" if "error" in r else
                             f"{r['step_s']:.2f} s/step, peak RSS {r['peak_rss_bytes'] / GIB:.2f} GiB"),
            flush=True)
  if args.out:  # '' only prints (e.g. a --profile run)
    _write_markdown(args, results, (load_before, _load()), args.out)
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
