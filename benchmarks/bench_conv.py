"""Forward + backward of one 3x3 convolution at SD UNet / VAE shapes, in each form this CPU could use.

  python benchmarks/bench_conv.py [N]    # the first N shapes (default: all four)

Forms: XLA's convolution in f32, in bf16 (bf16 out), in bf16 with f32 accumulation; im2col (one
matmul over the patches, `clip_jax.layers.conv2d(impl='im2col')`) in bf16 and f32. All jitted as
value_and_grad of sum(out^2) w.r.t. input and kernel; 5 interleaved rounds (every form once per
round), best CPU seconds and best wall seconds reported (CPU time is the steadier number on a shared
machine), with each form's largest error relative to the f32 XLA result. Results:
`benchmarks/results/unet_step.md` (the measurement behind `conv2d`'s 'auto' choice).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from clip_jax import layers  # noqa: E402


def xla_conv(x, w, dtype, pref):
  return jax.lax.conv_general_dilated(x.astype(dtype), w.astype(dtype), (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=pref)


def im2col(x, w, dtype):
  return layers.conv2d(x, w, padding=((1, 1), (1, 1)), dtype=dtype, impl="im2col")


FORMS = {
  "xla_f32": lambda x, w: xla_conv(x, w, jnp.float32, None),
  "xla_bf16": lambda x, w: xla_conv(x, w, jnp.bfloat16, None),
  "xla_bf16_f32acc": lambda x, w: xla_conv(x, w, jnp.bfloat16, jnp.float32),
  "im2col_bf16": lambda x, w: im2col(x, w, jnp.bfloat16),
  "im2col_f32": lambda x, w: im2col(x, w, jnp.float32),
}
SHAPES = [(1, 32, 32, 320, 320), (1, 16, 16, 640, 640), (1, 8, 8, 1280, 1280), (2, 64, 64, 128, 128)]


def main() -> None:
  shapes = SHAPES[:int(sys.argv[1])] if len(sys.argv) > 1 else SHAPES
  for (b, h, w_, cin, cout) in shapes:
    x = jax.random.normal(jax.random.key(0), (b, h, w_, cin))
    w = jax.random.normal(jax.random.key(1), (3, 3, cin, cout)) * 0.02
    fns = {}
    ref = None
    for name, f in FORMS.items():
      def loss(x, w, f=f):
        return jnp.sum(f(x, w).astype(jnp.float32) ** 2)
      fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
      out = jax.block_until_ready(fn(x, w))
      if ref is None: ref = out
      err = max(float(jnp.max(jnp.abs(a - r)) / jnp.max(jnp.abs(r))) for a, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))
      fns[name] = (fn, err)
    res = {n: [] for n in fns}
    for _ in range(5):
      for n, (fn, _) in fns.items():
        c0, t0 = time.process_time(), time.perf_counter()
        jax.block_until_ready(fn(x, w))
        res[n].append((time.process_time() - c0, time.perf_counter() - t0))
    print(f"shape b{b} {h}x{w_} {cin}->{cout}")
    for n, r in res.items():
      print(f"  {n:16s} cpu min {min(c for c, _ in r)*1e3:7.1f} ms  wall min {min(t for _, t in r)*1e3:7.1f} ms  rel err {fns[n][1]:.1e}")


if __name__ == "__main__":
  main()
