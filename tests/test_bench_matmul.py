"""benchmarks/bench_matmul.py: its products are the project's dot forms with the right values, and its table
compares like with like (each row's ratio is ours over torch's GFLOP/s for the same dtype, shape and product)."""
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_matmul  # noqa: E402


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
def test_xla_products_match_the_f64_reference(dtype_name):
  import jax.numpy as jnp
  x, w, g = bench_matmul._operands(48, 24, 40, seed=3)
  # The operands are bf16-representable, so both dtypes multiply the same numbers.
  assert np.array_equal(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32), x)
  fns = bench_matmul._xla_products()
  to = lambda a: jnp.asarray(a, getattr(jnp, dtype_name))  # noqa: E731
  got = {"NN": fns["NN"](to(x), to(w)), "NT": fns["NT"](to(g), to(w)), "TN": fns["TN"](to(x), to(g))}
  for form, value in got.items():
    ref = bench_matmul._reference(form, x, w, g)
    assert value.dtype == jnp.float32 and value.shape == ref.shape
    # f32 accumulation of exact bf16 products: only the f32 sum's rounding differs from f64.
    np.testing.assert_allclose(np.asarray(value, np.float64), ref, rtol=1e-5, atol=1e-4)


def test_table_ratios_are_ours_over_torch_per_row_and_per_dtype():
  def run(gflops):
    return {"results": {k: {"gflops": v, "seconds": 1.0, "rel_err": 0.0} for k, v in gflops.items()}, "version": "t"}
  keys = ["bfloat16 16x8x4 NN", "bfloat16 16x8x4 TN", "float32 16x8x4 NN"]
  runs = {("xla", "one"): run(dict(zip(keys, (500, 300, 150)))), ("torch", "one"): run(dict(zip(keys, (1000, 600, 200)))),
          ("xla", "all"): run(dict(zip(keys, (900, 600, 300)))), ("torch", "all"): run(dict(zip(keys, (900, 1200, 400))))}
  header, rule, *rows = bench_matmul.table(runs)
  assert all(r.count("|") == header.count("|") == rule.count("|") for r in rows)
  assert rows[0] == "| bfloat16 | 16x8x4 | NN | 500 | 1000 | 0.50x | 900 | 900 | 1.00x |"
  assert rows[2].endswith("| 0.75x | 300 | 400 | 0.75x |")
  assert rows[3] == "| bfloat16 | geometric mean | | | | 0.50x | | | 0.71x |"   # sqrt(1.0 * 0.5)
  assert rows[4] == "| float32 | geometric mean | | | | 0.75x | | | 0.75x |"
