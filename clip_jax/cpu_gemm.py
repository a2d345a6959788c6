"""Weight gradients on CPU through MKL's GEMM, as an XLA FFI call (`csrc/rows_contracted_mkl.cc`).

What it computes: `rows_contracted(x, g)`, x [R, K] and g [R, N] (both bf16 or both f32) -> x^T @ g [K, N]
in f32, accumulated in f32: the weight gradient of a dense layer or an im2col convolution
(`clip_jax.layers.rows_contracted` calls it where `usable` says so).

Why: XLA:CPU's dot library takes only row-major [M, K] x [K, N] operands, so each weight gradient first
copied x (or g) transposed: a pass over the layer's activations that ran DRAM-bound in the step (12% of
the ViT-B-32 bf16 step's op time). MKL's GEMM reads the transposed operand in its own packing. Measured
(2026-12-01, in-process A/B of the train step, the same losses): ViT-B-32 bf16 2.39 -> 2.24 s, fp32
5.62 -> 5.38 s, RN50 bf16 6.44 -> 5.71 s. The other products stay with XLA: MKL in their place was
slower than XLA's dots in the same A/B, with one thread per call or split over both cores.

Where it is used: weight gradients over at least MIN_ROWS rows (below, XLA's form was faster in the SD UNet
at batch 1), in bf16 or f32 (fp16 stays with XLA), on the CPU backend with one device
(`jax.device_count() == 1`: with several, XLA's SPMD partitioner knows how to split a dot over a mesh and
would gather the operands of an opaque call). It needs MKL (the `mkl` wheel, Linux x86-64) and a C++17
compiler (`$CXX` or g++): the handler is built on first use into `$XDG_CACHE_HOME/clip_jax/cpu_gemm` (or
~/.cache/...), keyed by the source, jaxlib's headers and version, libmkl_rt's path and the compiler's name
(upgrading MKL or g++ in place reuses the build). Where the build or the load fails, one warning line says
why and XLA's form is used (each new process tries again). Opt out: CLIP_JAX_CPU_GEMM=xla (also off, 0,
false).

How it runs: MKL's sequential layer on the calling XLA thread; a product of >= 2^24 multiply-adds with
K >= 64 is split in two halves of the output's rows, one offered to XLA's intra-op thread pool and taken
back by the caller if no pool thread has started it.

Calling `rows_contracted` directly: it has no VJP (it is the VJP), checks dtype (KeyError for others than
bf16/f32) but not ranks or row counts, which XLA reports when the call runs (JaxRuntimeError
INVALID_ARGUMENT).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

from clip_jax.cli import user_cache_dir

OPT_OUT_ENV = "CLIP_JAX_CPU_GEMM"
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "rows_contracted_mkl.cc")
_TARGETS = {jnp.dtype(jnp.bfloat16): "clip_jax_rows_contracted_bf16", jnp.dtype(jnp.float32): "clip_jax_rows_contracted_f32"}
_INT32_MAX = 2**31 - 1
_registered = False   # set once the handlers are registered: only then can a program contain their calls
# Fewer rows than this (the contracted axis: tokens or pixels times the batch) stay with XLA. Measured
# (2026-12-01): the SD 1.5 UNet at batch 1, 32x32 latents (16-1,024 rows per weight gradient) ran 2.75-3.01 s
# per step with MKL against 2.45-2.60 s without (separate processes, alternating), with or without each
# product split over both cores; ViT-B-32 at batch 32 (1,600 and 2,464 rows) and RN50 (1,568-100,352) ran
# faster with it. With few rows the transposing copy XLA needs is small.
MIN_ROWS = 1536


def mkl_runtime() -> str | None:
  """Path of MKL's single dynamic library (libmkl_rt) from the installed `mkl` wheel, or None."""
  try:
    files = importlib.metadata.files("mkl") or []
  except importlib.metadata.PackageNotFoundError:
    return None
  for f in files:
    if os.path.basename(str(f)).startswith("libmkl_rt.so"):
      path = str(f.locate())
      if os.path.exists(path):
        return os.path.realpath(path)
  return None


def build(mkl: str, directory: str | None = None) -> str:
  """Compiles the FFI handler against this jaxlib's FFI headers and `mkl` (a libmkl_rt path), once per
  source/jaxlib/MKL/compiler combination; returns the shared library's path. Raises RuntimeError with the
  compiler's message when compiling fails."""
  compiler = os.environ.get("CXX", "g++")
  with open(_SOURCE, "rb") as f:
    source = f.read()
  key = hashlib.sha256(b"\0".join([source, jax.ffi.include_dir().encode(), importlib.metadata.version("jaxlib").encode(),
                                   mkl.encode(), compiler.encode()])).hexdigest()[:16]
  directory = directory or user_cache_dir("cpu_gemm")
  path = os.path.join(directory, f"rows_contracted_mkl-{key}.so")
  if os.path.exists(path):
    return path
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
  os.close(fd)
  command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", "-I", jax.ffi.include_dir(), _SOURCE,
             "-o", tmp, mkl, f"-Wl,-rpath,{os.path.dirname(mkl)}"]
  try:
    done = subprocess.run(command, capture_output=True, text=True)
  except OSError as e:  # no compiler
    os.unlink(tmp)
    raise RuntimeError(f"{compiler}: {e}") from None
  if done.returncode != 0:
    os.unlink(tmp)
    raise RuntimeError(f"{compiler} failed (exit {done.returncode}): " + " ".join(done.stderr.split())[:300])
  os.replace(tmp, path)  # atomic: processes building at the same time each write their own file
  return path


@functools.cache
def available() -> bool:
  """Whether the MKL handlers are built, loaded and registered with XLA (tried once per process; a
  failure is reported in one warning line)."""
  if os.environ.get(OPT_OUT_ENV, "").lower() in ("xla", "off", "0", "false"):
    return False
  if sys.platform != "linux" or platform.machine() != "x86_64":
    return False
  mkl = mkl_runtime()
  if mkl is None:
    logging.warning("clip_jax.cpu_gemm: the mkl package is not installed; weight gradients use XLA's dots "
                    "(pip install -r requirements.txt).")
    return False
  try:
    library = ctypes.CDLL(build(mkl))
    if library.clip_jax_mkl_init() != 1:
      raise RuntimeError("MKL did not take its sequential threading layer")
    for target in _TARGETS.values():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, target)), platform="cpu")
    global _registered
    _registered = True
  except (RuntimeError, OSError, AttributeError) as e:
    logging.warning("clip_jax.cpu_gemm: MKL weight gradients are off (%s); XLA's dots are used. "
                    "Set %s=xla to skip this.", " ".join(str(e).split()), OPT_OUT_ENV)
    return False
  return True


def usable(x: jax.Array, g: jax.Array) -> bool:
  """Whether `layers.rows_contracted` should call `rows_contracted(x, g)`: x [R, K], g [R, N], same dtype
  (bf16 or f32), R >= MIN_ROWS, sizes within MKL's 32-bit integers, the CPU backend with one device, and
  `available()`."""
  if x.ndim != 2 or g.ndim != 2 or x.dtype != g.dtype or jnp.dtype(x.dtype) not in _TARGETS:
    return False
  if x.shape[0] < MIN_ROWS or max(*x.shape, g.shape[1]) > _INT32_MAX:
    return False
  return jax.default_backend() == "cpu" and jax.device_count() == 1 and available()


_CALL = re.compile(r"= f32\[(\d+),(\d+)\]\S* custom-call\([^)]*\), custom_call_target=\"clip_jax_rows_contracted_\w+\", "
                   r"operand_layout_constraints=\{(?:bf16|f32)\[(\d+),")


def call_flops(compiled) -> float:
  """FLOPs of this module's MKL calls (2 R K N each) in a compiled program (`jit(...).lower(...).compile()`):
  XLA's cost analysis counts nothing inside an FFI call, so MFU numbers add these. 0 without reading the
  program's text where this process registered no handler (other backends, opted out, unavailable)."""
  if not _registered:
    return 0.0
  return float(sum(2 * int(k) * int(n) * int(r) for k, n, r in _CALL.findall(compiled.as_text())))


def rows_contracted(x: jax.Array, g: jax.Array) -> jax.Array:
  """x [R, K] and g [R, N] (both bf16 or both f32) -> x^T @ g [K, N] in f32 through MKL (accumulated in
  f32; bf16 products are exact in f32). `layers.rows_contracted` calls it where `usable(x, g)`. Raises
  RuntimeError where the handlers are not available (opted out, no MKL, no compiler: see the warning)."""
  if not available():
    raise RuntimeError("clip_jax.cpu_gemm is not available here (see the warning above, or "
                       f"{OPT_OUT_ENV} is set); use clip_jax.layers.rows_contracted")
  target = _TARGETS[jnp.dtype(x.dtype)]
  out = jax.ShapeDtypeStruct((x.shape[1], g.shape[1]), jnp.float32)
  return jax.ffi.ffi_call(target, out, vmap_method="sequential")(x, g)
