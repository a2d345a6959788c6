"""Does the compiled ring loss overlap its ppermutes with the block matmuls? (issue 15.4)

  .venv/bin/python benchmarks/ring_overlap_check.py [--kind softmax_ring|sigmoid|both] [--batch 4096]
      [--dim 512] [--tpu-topology v5e:2x4[,v6e:2x4,...]] [--gpu-topology h100:1x1x8[,a100:1x2x4,...]]
      [--hlo-out PREFIX]

Compiles value_and_grad of `clip_jax.losses.contrastive_loss` (a ring kind) over every device of
the default backend, or ahead of time for TPU slices (--tpu-topology) or GPU hosts (--gpu-topology)
that need not be there, and reads the scheduled HLO of each ring step (a while-loop body with
collective-permutes, one for the forward ring and one for the backward) and of the entry computation
around the loops. Where collectives are asynchronous (GPUs, TPUs) a step overlaps when every
collective-permute-start has compute between it and its -done: a matmul, or other kernels that read
and write at least the bytes the permute sends (the scheduler sometimes hides a prefetch under the
reductions of the block before it); a start XLA:GPU marks `is_sync` counts as exposed. It compiles
under the XLA flags the trainers add (`clip_jax.cli.use_xla_defaults`: XLA:GPU's latency-hiding
scheduler, off by default before Hopper, without which A100s do not overlap). The script
prints each body's order and 'overlap: yes/no' (naming the permutes left exposed, and those under
other kernels only). XLA:CPU's collectives are synchronous (no start/done pairs): it says so and
exits 0; tests/test_losses.py checks the independence that allows the overlap.

TPU compilation needs libtpu (Google's TPU compiler and runtime, ~700 MB) but no TPU: `bash
launch/setup.sh --test` installs the version this jax pins into .venv/libtpu, outside the venv's
packages (installed there, jax would try to start a TPU at every import). TPU_LIBRARY_PATH overrides.
GPU compilation needs jax's CUDA plugin (jax-cuda13-plugin and -pjrt of this jax's version) and CUDA's
ptxas and libdevice (the nvidia-cuda-nvcc and nvidia-nvvm wheels), ~650 MB, no driver, GPU or CUDA
runtime: `setup.sh --test` installs them into .venv/cuda-aot, also outside the packages;
JAX_CUDA_AOT_PATH overrides. A --gpu-topology entry is TARGET:SLICESxHOSTSxGPUS (XLA's partitions x
hosts per partition x GPUs per host; 1x2x4 is two hosts of 4 GPUs), TARGET a file in
benchmarks/gpu_targets (h100, h200, a100: XLA's GpuTargetConfigProto, the facts XLA would read from the
GPU) or the path of one (on a GPU machine,
`jaxlib.xla_client.get_topology_for_devices(jax.devices()).target_config` is the text of one). On 2
GPUs at the default batch the check answers NO (exit 1): with one visit per ring XLA merges the own
block's and the visit's matmuls, which share the image operand, so the merged matmul waits for the
permuted chunk (at --batch 32768 --dim 768 it keeps them apart, and they overlap).
Exit code 0: every permute overlaps, or the collectives are synchronous; 1: a permute is exposed (in any
target); else 2: something not checked (fewer than 2 devices, no libtpu or CUDA plugin, a topology the
plugin refuses, a failed compile): one line says why, and the other targets are still checked.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from clip_jax import cli, losses  # noqa: E402

# What a matmul looks like in scheduled HLO: a dot or convolution, a fusion whose computation holds one
# (TPU: kind=kOutput fusions around a `convolution`; GPU: Triton gemm fusions), or a library call
# (cuBLAS, oneDNN). Lines are classified by their opcode, never by the names of their operands: a
# -done names its -start, and the body's ROOT tuple names every -done.
MATMUL_CALL = re.compile(r"custom_call_target=\"(__cublas|__onednn\$matmul)")
MATMUL_OPS = ("dot", "convolution")


def opcode(line: str) -> str | None:
  """The opcode of one HLO instruction line ('name = shape opcode(operands), ...')."""
  match = re.search(r" = .*?\s([a-z][\w\-]*)\(", line)
  return match.group(1) if match else None


def computations(hlo: str) -> dict[str, list[str]]:
  """name -> instruction lines of every computation (fused ones included)."""
  comps, current = {}, None
  for line in hlo.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header:
      current = header.group(1)
      comps[current] = []
    elif current and line.strip() == "}":
      current = None
    elif current:
      comps[current].append(line.strip())
  return comps


def is_matmul(line: str, comps: dict[str, list[str]]) -> bool:
  """Whether an instruction is a matmul, looking into the computation a fusion calls."""
  op = opcode(line)
  if op in MATMUL_OPS:
    return True
  if op == "custom-call":
    return bool(MATMUL_CALL.search(line))
  if op == "fusion":
    callee = re.search(r"calls=%?([\w.\-]+)", line)
    return bool(callee) and any(is_matmul(inner, comps) for inner in comps.get(callee.group(1), ()))
  return False


def while_bodies(hlo: str) -> dict[str, list[str]]:
  """name -> instruction lines of every computation used as a while body."""
  names = set(re.findall(r"body=%?([\w.\-]+)", hlo))
  return {name: lines for name, lines in computations(hlo).items() if name in names}


def entry_name(hlo: str) -> str | None:
  """The name of the module's ENTRY computation."""
  entry = re.search(r"^ENTRY %?([\w.\-]+) ", hlo, re.MULTILINE)
  return entry.group(1) if entry else None


def ring_computations(hlo: str) -> dict[str, list[str]]:
  """The while bodies (one per ring: its visits) and the entry computation, which holds the permutes
  around the loops (the first prefetch, the last hops home)."""
  names = set(re.findall(r"body=%?([\w.\-]+)", hlo)) | {entry_name(hlo)}
  return {name: lines for name, lines in computations(hlo).items() if name in names}


def pass_of(lines: list[str]) -> str:
  """'backward' when the computation's ops come from a transposed (VJP) trace, else 'forward'."""
  return "backward" if any('op_name="transpose(' in line or "/transpose(" in line for line in lines) else "forward"


DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2,
               "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8}
COMPUTE_OPS = ("fusion", "custom-call", "reduce", "dot", "convolution", "sort", "scatter", "gather")


def _instruction(line: str) -> tuple[str, str] | None:
  """(name, result type) of an instruction line, e.g. ('fusion.3', '(f32[512]{0}, bf16[8,8]{1,0})')."""
  match = re.match(r"(?:ROOT )?%?([\w.\-]+) = (.*?) [a-z][\w\-]*\(", line)
  return (match.group(1), match.group(2)) if match else None


def type_bytes(hlo_type: str) -> int:
  """Bytes of every array in an HLO type ('bf16[512,512]{1,0}', a tuple of them, 'f32[]': 4)."""
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]", hlo_type):
    if dtype in DTYPE_BYTES:
      total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _traffic(line: str, sizes: dict[str, int]) -> int:
  """What a kernel reads and writes, in bytes: its result plus the operands named in the same
  computation (`sizes`: bytes by instruction name; a parameter or a tuple read by index counts at its
  own size)."""
  name = re.match(r"(?:ROOT )?%?([\w.\-]+) =", line).group(1)
  operands = re.search(r" [a-z][\w\-]*\((.*?)\)(?:, [a-z_]+=|$)", line)
  read = sum(sizes.get(operand, 0) for operand in re.findall(r"%([\w.\-]+)", operands.group(1))) if operands else 0
  return sizes.get(name, 0) + read


def _body_events(lines: list[str], comps: dict[str, list[str]]):
  """A body's kinds in order ('start', 'done', 'permute', 'matmul', 'kernel': other compute) with the
  bytes each kernel moves, and its start/done pairs as (start name, shape sent, start index, done
  index, bytes sent); start index -1 for a start outside the body or one XLA runs synchronously
  (XLA:GPU's backend_config `"is_sync":true`: start and done in one, nothing beside it)."""
  kinds, traffic, starts, pairs = [], [], {}, []
  sizes = {named[0]: type_bytes(named[1]) for named in map(_instruction, lines) if named}
  for line in lines:
    op = opcode(line)
    if op == "collective-permute-start":
      kinds.append("start")
      is_sync = re.search(r'"is_sync":\s*true', line) is not None
      starts[re.match(r"(?:ROOT )?%?([\w.\-]+) =", line).group(1)] = -1 if is_sync else len(kinds) - 1
    elif op == "collective-permute-done":
      kinds.append("done")
      operand = re.search(r"collective-permute-done\(%?([\w.\-]+)\)", line).group(1)
      result = line.split(" = ", 1)[1].split(" collective-permute-done(")[0]
      pairs.append((operand, re.sub(r"\{[^}]*\}", "", result), starts.get(operand, -1), len(kinds) - 1,
                    type_bytes(result)))
    elif op == "collective-permute":
      kinds.append("permute")
    elif is_matmul(line, comps):
      kinds.append("matmul")
    elif op in COMPUTE_OPS:
      kinds.append("kernel")
    else:
      continue
    traffic.append(_traffic(line, sizes) if kinds[-1] == "kernel" else 0)
  return kinds, traffic, pairs


def _cover(kinds: list[str], traffic: list[int], start: int, done: int, sent: int) -> str:
  """What runs under one start/done pair: 'matmul'; 'kernels' when other kernels between them read
  and write at least the bytes the permute sends (device memory is ~7x faster than NVLink or ICI,
  so they take longer than the transfer); 'nothing' otherwise, or for a synchronous permute."""
  if start < 0:
    return "nothing"
  if "matmul" in kinds[start:done]:
    return "matmul"
  return "kernels" if sum(traffic[start:done]) >= sent else "nothing"


def permute_covers(hlo: str) -> dict[str, list[tuple[str, str]]]:
  """For each ring body (and the entry computation) with start/done pairs: ('start-name shape',
  cover) per pair, cover as in `_cover`."""
  comps = computations(hlo)
  covers = {}
  for name, lines in ring_computations(hlo).items():
    kinds, traffic, pairs = _body_events(lines, comps)
    if pairs:
      covers[name] = [(f"{start} {shape}", _cover(kinds, traffic, i, j, sent)) for start, shape, i, j, sent in pairs]
  return covers


def exposed_permutes(hlo: str) -> dict[str, list[str]]:
  """For each ring body (and the entry computation) with start/done pairs, 'start-name shape' of every
  pair with nothing under it (no matmul, too little other compute, or run synchronously)."""
  return {name: [pair for pair, cover in pairs if cover == "nothing"] for name, pairs in permute_covers(hlo).items()}


def overlap_report(hlo: str) -> list[tuple[str, str, bool | None]]:
  """For each ring body, and the entry computation around the loops, when it has permutes: (name,
  order summary, overlaps), overlaps None when synchronous.

  A computation overlaps when every collective-permute-start ... -done pair has compute under it: a
  matmul, or other kernels that move at least as many bytes as the permute (`_cover`).
  """
  comps = computations(hlo)
  report = []
  for name, lines in ring_computations(hlo).items():
    kinds, traffic, pairs = _body_events(lines, comps)
    named = [k for k in kinds if k != "kernel"]  # the summary names the collectives and matmuls
    if not any(k in ("start", "permute") for k in named):
      continue
    order = " ".join(k for i, k in enumerate(named) if i == 0 or k != named[i - 1])
    if "start" not in named:
      report.append((name, order, None))
      continue
    overlaps = bool(pairs) and all(_cover(kinds, traffic, i, j, sent) != "nothing" for _, _, i, j, sent in pairs)
    report.append((name, order, overlaps))
  return report


CUDA_AOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv", "cuda-aot")
GPU_TARGETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_targets")


def use_cuda_plugin() -> str | None:
  """Puts jax's CUDA plugin (JAX_CUDA_AOT_PATH, else .venv/cuda-aot) on sys.path, where jax finds
  plugins the first time it looks (so: before any backend starts), points XLA at the CUDA tools
  installed beside it (ptxas, libdevice: --xla_gpu_cuda_data_dir, unless XLA_FLAGS names one) and
  keeps jax itself on the CPU (no CUDA driver here); returns the folder, or None when it holds no
  jax_plugins/xla_cuda* plugin."""
  path = os.path.abspath(os.environ.get("JAX_CUDA_AOT_PATH") or CUDA_AOT)
  plugins = os.path.join(path, "jax_plugins")
  if not os.path.isdir(plugins) or not any(name.startswith("xla_cuda") for name in os.listdir(plugins)):
    return None
  sys.path.insert(0, path)
  tools = os.path.join(path, "nvidia", "cu13")
  flags = os.environ.get("XLA_FLAGS", "")
  if os.path.isfile(os.path.join(tools, "bin", "ptxas")) and "xla_gpu_cuda_data_dir" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_cuda_data_dir={tools}".strip()
  jax.config.update("jax_platforms", "cpu")
  return path


GPU_TOPOLOGY = re.compile(r"^(?P<target>[^:]+):(?P<shape>[1-9]\d*x[1-9]\d*x[1-9]\d*)$")
TARGET_FIELDS = ("gpu_device_info", "cuda_compute_capability", "core_count", 'platform_name: "CUDA"')


def gpu_target_config(name: str) -> str:
  """The text of a GPU target config: a file in benchmarks/gpu_targets by its stem, or a path."""
  path = name if os.path.isfile(name) else os.path.join(GPU_TARGETS, f"{name}.txtpb")
  if not os.path.isfile(path):
    known = sorted(f[:-len(".txtpb")] for f in os.listdir(GPU_TARGETS) if f.endswith(".txtpb"))
    raise FileNotFoundError(f"no GPU target config {name!r} (known: {', '.join(known)}; or a .txtpb path)")
  with open(path) as f:
    text = f.read()
  # XLA takes a config with these missing (or no SMs) and then divides by zero in its cost model.
  missing = [field for field in TARGET_FIELDS if field not in text]
  if missing or re.search(r"\bcore_count:\s*0\b", text):
    raise ValueError(f"GPU target config {path} lacks {', '.join(missing) or 'a nonzero core_count'}")
  return text


LIBTPU = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv", "libtpu",
                      "libtpu", "libtpu.so")


def use_libtpu() -> str | None:
  """Points jax at libtpu (TPU_LIBRARY_PATH, else .venv/libtpu) before its TPU plugin loads; returns
  the path, or None when that file does not exist. Also tells libtpu not to look for a TPU VM's
  metadata. (libtpu still prints one 'Failed to find host bounds for accelerator type' line: it
  has no TPU to describe, and compiling does not need one.)"""
  path = os.environ.get("TPU_LIBRARY_PATH") or LIBTPU
  if not os.path.isfile(path):
    return None
  os.environ["TPU_LIBRARY_PATH"] = path
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  return path


def check(kind: str, devices, backend: str, batch: int, dim: int, hlo_out: str | None) -> int:
  """Compiles one ring kind over `devices` and prints its report; 0 overlap or synchronous, 1 not."""
  # A Mesh over the devices as listed: jax.make_mesh refuses TPU v4's two devices per chip.
  mesh = Mesh(np.array(devices), ("data",), axis_types=(AxisType.Auto,))
  emb = jax.ShapeDtypeStruct((batch, dim), jnp.bfloat16, sharding=NamedSharding(mesh, P("data")))
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
  loss = lambda *a: losses.contrastive_loss(*a, kind=kind, mesh=mesh, batch_axes=("data",))  # noqa: E731
  hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).lower(emb, emb, scalar, scalar).compile().as_text()
  if hlo_out:
    os.makedirs(os.path.dirname(os.path.abspath(hlo_out)), exist_ok=True)
    with open(hlo_out, "w") as f:
      f.write(hlo)
  report = overlap_report(hlo)
  print(f"ring overlap ({kind}, {len(devices)} x {backend}, B={batch}, d={dim}):")
  covers, comps, entry = permute_covers(hlo), ring_computations(hlo), entry_name(hlo)
  for name, order, overlaps in report:
    verdict = {None: "synchronous collectives (no start/done on this backend)", True: "yes", False: "NO"}[overlaps]
    exposed = [pair for pair, cover in covers.get(name, ()) if cover == "nothing"]
    beside_kernels = [pair for pair, cover in covers.get(name, ()) if cover == "kernels"]
    if exposed:
      verdict += f" (nothing under: {', '.join(exposed)})"
    if beside_kernels:
      verdict += f" (under other kernels, no matmul: {', '.join(beside_kernels)})"
    where = "around the loops" if name == entry else f"{pass_of(comps[name])} ring step"
    print(f"  {where} ({name}): {order}  -> overlap: {verdict}")
  if not report:
    print("  no ring body found")
    return 1
  return 1 if any(o is False for _, _, o in report) else 0


def _positive(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
  return value


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--kind", choices=("sigmoid", "softmax_ring", "both"), default="softmax_ring")
  parser.add_argument("--batch", type=_positive, default=4096, help="global batch (default 4096)")
  parser.add_argument("--dim", type=_positive, default=512, help="embedding width (default 512)")
  parser.add_argument("--tpu-topology", metavar="NAMES",
                      help="compile ahead of time for these TPU topologies (comma-separated, e.g. "
                           "v5e:2x4,v6e:2x4,v5p:2x2x2,v4:2x2x1) instead of the local devices; needs libtpu, no TPU")
  parser.add_argument("--gpu-topology", metavar="NAMES",
                      help="compile ahead of time for these GPU hosts, TARGET:SLICESxHOSTSxGPUS comma-separated "
                           "(e.g. h100:1x1x8,a100:1x2x4; TARGET a benchmarks/gpu_targets file or a path); needs "
                           "jax's CUDA plugin in .venv/cuda-aot, no GPU")
  parser.add_argument("--hlo-out", metavar="PREFIX",
                      help="write each compiled HLO to PREFIX<kind>_<topology or backend>.txt, e.g. "
                           "PREFIX=hlo/ gives hlo/sigmoid_v5e_2x4.txt")
  args = parser.parse_args(argv)
  cli.use_xla_defaults()  # compiled under the XLA flags the trainers run with
  kinds = ("sigmoid", "softmax_ring") if args.kind == "both" else (args.kind,)
  targets = []  # (devices, backend name, file tag)
  if args.tpu_topology:
    if not use_libtpu():
      print(f"ring overlap: no libtpu at {os.environ.get('TPU_LIBRARY_PATH') or LIBTPU} for --tpu-topology: "
            "`bash launch/setup.sh --test` installs it in .venv/libtpu, or set TPU_LIBRARY_PATH to a libtpu.so")
      return 2
    from jax.experimental import topologies
    for name in args.tpu_topology.split(","):
      try:
        devices = topologies.get_topology_desc(name, platform="tpu").devices
      except Exception as error:  # noqa: BLE001  (a topology name libtpu does not know)
        print(f"ring overlap: cannot compile for TPU {name}: {str(error).splitlines()[0]}")
        return 2
      targets.append((devices, f"{devices[0].device_kind} ({name}, compiled ahead of time)", name.replace(":", "_")))
  if args.gpu_topology:
    if not use_cuda_plugin():
      print(f"ring overlap: no CUDA plugin at {os.environ.get('JAX_CUDA_AOT_PATH') or CUDA_AOT} for --gpu-topology: "
            "`bash launch/setup.sh --test` installs it in .venv/cuda-aot, or set JAX_CUDA_AOT_PATH to a folder "
            "holding jax_plugins/xla_cuda*")
      return 2
    from jax.experimental import topologies
    for entry in args.gpu_topology.split(","):
      parsed = GPU_TOPOLOGY.match(entry.strip())
      if not parsed:
        print(f"ring overlap: --gpu-topology entries are TARGET:SLICESxHOSTSxGPUS with positive sizes, e.g. "
              f"h100:1x1x8; got {entry!r}")
        return 2
      target, shape = parsed.group("target"), parsed.group("shape")
      try:
        devices = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(target),
                                               topology=shape).devices
      except Exception as error:  # noqa: BLE001  (an unknown target, a shape the plugin refuses)
        print(f"ring overlap: cannot compile for GPU {entry}: {str(error).splitlines()[0]}")
        return 2
      hosts = len({d.process_index for d in devices})
      targets.append((devices, f"{devices[0].device_kind} ({shape}: {hosts} host(s), compiled ahead of time)",
                      f"{os.path.basename(target).removesuffix('.txtpb')}_{shape}"))
  if not targets:
    targets.append((jax.devices(), jax.default_backend(), jax.default_backend()))
  print(f"XLA_FLAGS={os.environ['XLA_FLAGS']}")
  exposed = unchecked = False  # exit 1 (a permute exposed) wins over 2 (something not checked)
  for devices, backend, tag in targets:
    if len(devices) < 2:
      print(f"ring overlap: needs 2 or more devices, {backend} has {len(devices)}: skipped")
      unchecked = True
      continue
    for kind in kinds:
      hlo_out = f"{args.hlo_out}{kind}_{tag}.txt" if args.hlo_out else None
      try:
        exposed |= check(kind, devices, backend, args.batch, args.dim, hlo_out) == 1
      except Exception as error:  # noqa: BLE001  (one line: not checked, unlike 1: not overlapped)
        print(f"ring overlap: {kind} on {backend} could not be checked: {type(error).__name__}: "
              f"{str(error).splitlines()[0] if str(error) else ''}")
        unchecked = True
  return 1 if exposed else 2 if unchecked else 0


if __name__ == "__main__":
  sys.exit(main())
