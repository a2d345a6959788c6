"""MKL weight gradients on CPU (`clip_jax.cpu_gemm`): the product against an f64 reference (bf16 and f32,
empty and odd shapes), the layers' weight gradients taking it on one CPU device with no transposing copy
and the same values as XLA's form, XLA's form kept with several devices, and the fallbacks (opt-out, no
compiler) each with its one line. The suite runs on 8 simulated devices (conftest), so the one-device
cases run in a child process."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax import cpu_gemm, layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_mkl = pytest.mark.skipif(cpu_gemm.mkl_runtime() is None, reason="the mkl wheel is not installed here")


@needs_mkl
@pytest.mark.parametrize("dtype,rows,k,n", [
    # The layer-sized cases are slow-only (8-9 s each); the small shapes of both dtypes stay fast.
    pytest.param(jnp.bfloat16, 1600, 768, 3072, marks=pytest.mark.slow),
    *[(jnp.bfloat16, *shape) for shape in [(33, 17, 65), (7, 3, 5), (1, 1, 1), (0, 4, 6)]],
    pytest.param(jnp.float32, 1600, 768, 3072, marks=pytest.mark.slow),
    *[(jnp.float32, *shape) for shape in [(33, 17, 65), (7, 3, 5), (1, 1, 1), (0, 4, 6)]]])
def test_rows_contracted_is_x_transposed_times_g(dtype, rows, k, n):
  assert cpu_gemm.available()
  x = jax.random.normal(jax.random.key(0), (rows, k), dtype)
  g = jax.random.normal(jax.random.key(1), (rows, n), dtype)
  got = np.asarray(jax.jit(cpu_gemm.rows_contracted)(x, g))
  want = np.asarray(x, np.float64).T @ np.asarray(g, np.float64)
  assert got.dtype == np.float32 and got.shape == (k, n)
  # bf16 products are exact in f32, so both dtypes differ from f64 only by f32 summation (~1e-7 here).
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(np.abs(want).max(initial=0.0), 1.0))


_ONE_DEVICE_CHILD = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from clip_jax import cpu_gemm, layers, loop
assert jax.device_count() == 1
out = {}
for name in ("bfloat16", "float32"):
  dtype = jnp.dtype(name)
  x = jax.random.normal(jax.random.key(0), (32, 50, 96), dtype)     # 1,600 rows: over cpu_gemm.MIN_ROWS
  w = jax.random.normal(jax.random.key(1), (96, 192), jnp.float32) * 0.1
  b = jnp.zeros((192,), jnp.float32)
  loss = lambda x, w, b: jnp.sum(layers.dense_f32_accum(x, w, b).astype(jnp.float32) ** 2)
  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  compiled = grad.lower(x, w, b).compile()
  hlo = compiled.as_text()
  dx, dw = grad(x, w, b)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out[name] = {"custom_calls": hlo.count('custom_call_target="clip_jax_rows_contracted'),
               "copies": hlo.count("copy_bitcast_fusion") + hlo.count("transpose_copy_fusion"),
               "dw": np.asarray(dw).tolist(), "dx": np.asarray(dx, np.float32).tolist(),
               "available": cpu_gemm.available(), "call_flops": cpu_gemm.call_flops(compiled),
               "step_flops": loop._step_flops(compiled), "xla_flops": float(cost["flops"])}
json.dump(out, sys.stdout)
"""


def _one_device_child(extra_env=None):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": ROOT, **(extra_env or {})}
  done = subprocess.run([sys.executable, "-c", _ONE_DEVICE_CHILD], env=env, capture_output=True, text=True,
                        cwd=ROOT, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout), done.stderr


@pytest.mark.slow   # two child processes, ~7 s; the fast subset keeps the direct product and the fallbacks
@needs_mkl
def test_one_cpu_device_takes_mkl_for_weight_gradients_with_xla_s_values():
  # bf16 dots kept bf16 whatever this CPU has (on one without bf16 dots the layers convert to f32 first,
  # and XLA's form then needs no copy either: `layers.upcast_bf16_dots`).
  native = {layers.BF16_DOTS_ENV: "native"}
  mkl, _ = _one_device_child(native)
  xla, _ = _one_device_child({**native, cpu_gemm.OPT_OUT_ENV: "xla"})
  for name in ("bfloat16", "float32"):
    assert mkl[name]["available"] and not xla[name]["available"]
    # the weight gradient through MKL (one call), with no transposing copy of x left in the program
    assert mkl[name]["custom_calls"] == 1 and mkl[name]["copies"] == 0, mkl[name]
    assert xla[name]["custom_calls"] == 0
    if name == "bfloat16":
      assert xla[name]["copies"] >= 1   # what MKL saves: XLA's dot needed x^T written out first
    # Both sum the same products in f32 (bf16 products are exact), in different orders: ~1e-6 of the largest.
    scale = np.abs(xla[name]["dw"]).max()
    np.testing.assert_allclose(mkl[name]["dw"], xla[name]["dw"], rtol=0, atol=1e-5 * scale)
    np.testing.assert_array_equal(mkl[name]["dx"], xla[name]["dx"])   # the input gradient is XLA's either way
    # MFU counts the call's FLOPs, which XLA's cost analysis does not see: 2 x rows x k x n.
    assert mkl[name]["call_flops"] == 2 * 1600 * 96 * 192 and xla[name]["call_flops"] == 0
    assert mkl[name]["step_flops"] == mkl[name]["xla_flops"] + mkl[name]["call_flops"]
    assert mkl[name]["step_flops"] == pytest.approx(xla[name]["step_flops"], rel=0.05)


_FEW_ROWS_CHILD = r"""
import jax, jax.numpy as jnp
from clip_jax import cpu_gemm
few, many = (jnp.ones((n, 8), jnp.bfloat16) for n in (cpu_gemm.MIN_ROWS - 1, cpu_gemm.MIN_ROWS))
assert not cpu_gemm.usable(few, few) and cpu_gemm.usable(many, many)
assert not cpu_gemm.usable(many.astype(jnp.float16), many.astype(jnp.float16))   # no fp16 handler
assert not cpu_gemm.usable(many, many.astype(jnp.float32))                        # mixed dtypes
print("ok")
"""


@needs_mkl
def test_few_rows_and_other_dtypes_stay_with_xla():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONPATH": ROOT}
  done = subprocess.run([sys.executable, "-c", _FEW_ROWS_CHILD], env=env, capture_output=True, text=True, cwd=ROOT,
                        timeout=300)
  assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@needs_mkl
@pytest.mark.slow  # a child process that builds nothing (10 s): the fallback's warning line
def test_no_compiler_falls_back_to_xla_with_one_warning(tmp_path):
  out, err = _one_device_child({"CXX": "/bin/false", "XDG_CACHE_HOME": str(tmp_path)})
  assert not out["float32"]["available"] and out["float32"]["custom_calls"] == 0
  lines = [l for l in err.splitlines() if "clip_jax.cpu_gemm" in l]
  assert len(lines) == 1 and "/bin/false failed" in lines[0] and cpu_gemm.OPT_OUT_ENV in lines[0], err[-2000:]


@needs_mkl
def test_build_is_cached_per_source_and_toolchain(tmp_path, monkeypatch):
  path = cpu_gemm.build(cpu_gemm.mkl_runtime(), str(tmp_path))
  monkeypatch.setenv("CXX", "/bin/false")     # another compiler: another key, so it must build (and fails)
  with pytest.raises(RuntimeError, match="/bin/false failed"):
    cpu_gemm.build(cpu_gemm.mkl_runtime(), str(tmp_path))
  monkeypatch.delenv("CXX")
  assert cpu_gemm.build(cpu_gemm.mkl_runtime(), str(tmp_path)) == path   # found, not rebuilt
  assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)]       # no temporary left behind


def test_several_devices_keep_xla_s_partitionable_dots():
  assert jax.device_count() > 1   # conftest's 8 simulated devices
  x = jnp.ones((2 * cpu_gemm.MIN_ROWS, 16), jnp.bfloat16)
  assert not cpu_gemm.usable(x, x)
  hlo = jax.jit(layers.rows_contracted).lower(x, x).compile().as_text()
  assert "clip_jax_rows_contracted" not in hlo
