"""The host CPU as Linux's /proc/cpuinfo describes it: its model name and whether it has bf16 dot
instructions.

Standard library only: the benchmarks' parent processes, which never import jax, name the machine
in their reports with `describe_cpu`, and `clip_jax.layers.upcast_bf16_dots` decides its dot form
with `cpu_has_bf16_dots`; one reader serves both, so a report and the code it measures agree.
"""
from __future__ import annotations

import functools
import platform

# /proc/cpuinfo flags of bf16 dot-product instructions: x86's AVX512-BF16 and AMX-BF16, ARM's BF16
# (BFDOT, BFMMLA; listed under 'Features').
BF16_DOT_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpuinfo: str) -> frozenset[str]:
  """The instruction-set flags of the first processor in a /proc/cpuinfo text (x86 'flags', ARM
  'Features'); empty when it lists none."""
  for line in cpuinfo.splitlines():
    key, _, value = line.partition(":")
    if key.strip() in ("flags", "Features"):
      return frozenset(value.split())
  return frozenset()


def cpu_model(cpuinfo: str) -> str:
  """The first processor's name in a /proc/cpuinfo text (x86 'model name'; ARM kernels often list
  none, then `platform.machine()`, e.g. 'aarch64')."""
  for line in cpuinfo.splitlines():
    key, _, value = line.partition(":")
    if key.strip() == "model name" and value.strip():
      return value.strip()
  return platform.machine()


@functools.cache
def read_cpuinfo() -> str | None:
  """/proc/cpuinfo's text, read once per process; None where it cannot be read (not Linux)."""
  try:
    with open("/proc/cpuinfo") as f:
      return f.read()
  except OSError:
    return None


def cpu_has_bf16_dots() -> bool:
  """Whether this host's CPU has bf16 dot-product instructions (`BF16_DOT_FLAGS`); True where
  /proc/cpuinfo cannot be read or lists no flags, which keeps the bf16 dots."""
  flags = cpu_flags(read_cpuinfo() or "")
  return not flags or bool(flags & BF16_DOT_FLAGS)


def describe_cpu() -> str:
  """The CPU for a benchmark report: its name and its bf16 dot instructions, e.g.
  'AMD EPYC (no bf16 dot instructions)' or 'Intel(R) Xeon(R) ... (amx_bf16, avx512_bf16)'."""
  cpuinfo = read_cpuinfo()
  if cpuinfo is None:
    return platform.processor() or platform.machine()
  bf16 = sorted(cpu_flags(cpuinfo) & BF16_DOT_FLAGS)
  return f"{cpu_model(cpuinfo)} ({', '.join(bf16) or 'no bf16 dot instructions'})"
