"""Building blocks shared by the CLIP towers and the Stable Diffusion models.

What is not stock Flax is the matmul: with bf16 compute, every projection runs as bf16 x bf16
with f32 accumulation (`preferred_element_type=float32`), in the forward *and* the backward pass.
That is the form XLA:CPU runs with the CPU's bf16 dot instructions (AVX512-BF16 or AMX; ~4x a
plain f32 matmul on these hosts) and the form TPUs and GPUs prefer anyway; on a CPU without them the
operands are converted to f32 first (`upcast_bf16_dots`: the same products and sums, at f32 speed); flax's
`Dense(dtype=bfloat16)` gives bf16 -> bf16 instead, and autodiff's transposed matmuls lose the fast
path, hence the custom VJP. Attention gets the same treatment on CPU (`dot_product_attention`),
and so do convolutions (`conv2d`: one matmul over the patches). On GPUs bf16 attention goes to
cuDNN's fused kernel; convolutions keep XLA's own form off the CPU.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import cpu_gemm, host

Dtype = Any
Initializer = Callable[..., jax.Array]


# ----------------------------------------------------------------------------- bf16 dots on CPUs without them
BF16_DOTS_ENV = "CLIP_JAX_CPU_BF16_DOTS"   # 'native' or 'f32': overrides `host.cpu_has_bf16_dots`


def upcast_bf16_dots(dtype: Dtype) -> bool:
  """Whether a dot of bf16 operands should convert them to f32 first: on the CPU backend of a CPU
  without bf16 dot instructions. The result is the same either way up to the order of the f32 sums
  (a product of two bf16 values is exact in f32, and both forms accumulate in f32).

  Why: without those instructions XLA:CPU's bf16 x bf16 -> f32 dot (YNNPACK) runs at ~0.6x its f32 dot
  (AMD EPYC with AVX2 only, 2026-12-02: 110 vs 185-188 GFLOP/s on both cores at [1600, 768] x [768,
  3072]; converted to f32 first, 185): the ViT-B-32 bf16 train step took 13.7 s there against ~2.3 s on
  the AMX hosts. fp16 dots are not affected (XLA:CPU converts them itself: 177 GFLOP/s at that shape).
  Override with CLIP_JAX_CPU_BF16_DOTS=native (keep bf16 dots) or f32 (always convert on CPU). Raises
  ValueError for another value of it.
  """
  if jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16) or jax.default_backend() != "cpu":
    return False
  choice = os.environ.get(BF16_DOTS_ENV, "auto").lower()
  if choice not in ("auto", "native", "f32"):
    raise ValueError(f"{BF16_DOTS_ENV} must be 'native', 'f32' or 'auto', not '{choice}'.")
  return choice == "f32" or (choice == "auto" and not host.cpu_has_bf16_dots())


def dot_f32(a: jax.Array, b: jax.Array, dimension_numbers) -> jax.Array:
  """`lax.dot_general(a, b, dimension_numbers)` accumulated in f32 with an f32 result; bf16 operands
  are converted to f32 first where `upcast_bf16_dots` says so."""
  if upcast_bf16_dots(a.dtype):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return jax.lax.dot_general(a, b, dimension_numbers, preferred_element_type=jnp.float32)


def _dot_last_first(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., k] @ w [k, n] -> [..., n], accumulated in f32."""
  return dot_f32(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def rows_transposed(x: jax.Array, tile: int = 64) -> jax.Array:
  """x [..., k] -> [k, N] (N: the product of the leading axes), materialised row-major.

  Why not `x.reshape(N, k).T`: XLA folds a plain transpose into the dot that reads it (the dot then
  contracts the lhs's first axis), a form XLA:CPU runs in f32 outside YNNPACK after converting both
  bf16 operands: about 2-3x slower (jax 0.10.2: 84 vs 40 ms CPU for [1600, 3072]^T x [1600, 768]).
  The reshape between the transpose and the dot stops the folding. It is written as two passes
  (`tile`-wide column blocks, then each block), but XLA's simplifier merges them into one transposing
  copy (seen in the compiled ViT-B-32 step, jax 0.10.2), which takes the same time as a plain one
  (~7 ms for [1600, 3072] bf16): the copy, not its form, is the cost left.
  """
  k = x.shape[-1]
  n = x.size // k
  if k % tile == 0:
    blocks = jnp.transpose(x.reshape(n, k // tile, tile), (1, 0, 2))   # [k/tile, N, tile]
    return jnp.transpose(blocks, (0, 2, 1)).reshape(k, n)
  split = next((d for d in range(2, int(n ** 0.5) + 1) if n % d == 0), None)
  if split is None:  # N prime or 1: no reshape to hide behind; correct, just the slow form.
    return x.reshape(n, k).T
  return jnp.transpose(x.reshape(split, n // split, k), (2, 0, 1)).reshape(k, n)


@jax.custom_vjp
def matmul_f32_accum(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., k] (bf16/fp16, or f32) @ w [k, n] -> [..., n] in f32, accumulated in f32, with
  gradients in the same form.

  f32 takes this path too: autodiff's transposed products (g @ w^T with w read column-wise, x^T @ g
  folded into the dot) each cost XLA:CPU a transposing copy around its row-major-only dot library,
  and in f32 those copies were 39% of the ViT-B-32 step's op time (`benchmarks/profile_step.py`);
  the backward below needs one copy per weight gradient (x^T) and a weight-sized one for g @ w^T.

  w may be in any float dtype (typically the f32 parameter): it is cast to x's dtype inside, and
  its gradient comes back in w's own dtype straight from the f32 accumulator. Casting outside
  would round the weight gradient to bf16 and convert it back to f32, two extra passes over every
  weight per step (and a loss of precision that torch's autocast also has).
  """
  return _dot_last_first(x, w.astype(x.dtype))


def _matmul_fwd(x, w):
  # w itself is the residual (a parameter, alive anyway): the backward pass casts it again, fused
  # with the transposed copy the g @ w^T product needs.
  return _dot_last_first(x, w.astype(x.dtype)), (x, w)


def _matmul_bwd(residuals, grad_out):
  x, w = residuals
  g = grad_out.astype(x.dtype)                                  # [..., n]
  # dx = g @ w^T: the contracted axis (n) is last in both operands.
  grad_x = dot_f32(g, w.astype(x.dtype), (((g.ndim - 1,), (1,)), ((), ())))
  return grad_x.astype(x.dtype), rows_contracted(x, g).astype(w.dtype)


def rows_contracted(x: jax.Array, g: jax.Array) -> jax.Array:
  """x [..., k] and g [..., n] with the same leading axes -> x^T @ g [k, n] summed over all leading
  axes in f32 (a weight gradient), in the form XLA:CPU runs fastest for x's dtype.

  On CPU with one device and MKL at hand, MKL's GEMM reads x transposed in place (`clip_jax.cpu_gemm`:
  no copy; ViT-B-32 bf16 step 2.39 -> 2.24 s, RN50 bf16 6.44 -> 5.71 s). Otherwise, in XLA's dots:

  16-bit: x^T is materialised row-major (`rows_transposed`) so that the dot stays a bf16 x bf16 -> f32
  YNNPACK dot; where g has far fewer features than x over many rows (a 3x3 conv's patches [N, 9 C]
  against its output gradient [N, C']), g^T is copied instead and the [n, k] result transposed
  (`_transposing_g_moves_less`): RN50 bf16 step 7.98 -> 7.53 s, same loss.
  f32: the dot contracts the leading axis of both operands as they are; XLA:CPU then runs it outside
  YNNPACK (Eigen reads the transposed operand in its packing), with no transposing copy of x: in the
  ViT-B-32 fp32 train step those copies ran several times slower than standalone, and the step went
  7.23 -> 5.71 s (jax 0.10.2, in-process A/Bs, `WORKSPACE.md`).
  """
  rows_x, rows_g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  if upcast_bf16_dots(x.dtype):  # no bf16 dots on this CPU: the f32 forms below (MKL's, or no copy)
    rows_x, rows_g = rows_x.astype(jnp.float32), rows_g.astype(jnp.float32)
  if cpu_gemm.usable(rows_x, rows_g):  # CPU, one device, MKL built: no transposing copy at all
    return cpu_gemm.rows_contracted(rows_x, rows_g)
  if rows_x.dtype == jnp.float32:
    return jax.lax.dot_general(rows_x, rows_g, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  if _transposing_g_moves_less(*rows_x.shape, rows_g.shape[1], rows_x.dtype.itemsize):
    grad_t = jax.lax.dot_general(rows_transposed(g), rows_x, (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)       # [n, k]
    # The barrier keeps XLA from folding the transpose back into the dot (a bf16 dot outside YNNPACK
    # that XLA:CPU 0.10.2 compiles but cannot run: "Unsupported element type for DotThunk").
    return jax.lax.optimization_barrier(grad_t).T
  return jax.lax.dot_general(rows_transposed(x), rows_g, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _transposing_g_moves_less(rows: int, k: int, n: int, itemsize: int) -> bool:
  """Whether (g^T @ x)^T is the cheaper weight gradient: the row-major copy of g^T [n, rows] plus the
  transpose of the f32 result [n, k], against the copy of x^T [k, rows]. The f32 transpose counts four
  times its bytes (in XLA:CPU steps f32 transposing copies ran ~4x slower per byte than bf16 ones; with
  it counted once, the SD UNet step was 3-5% slower)."""
  return rows * n * itemsize + 4 * (k * n * 4) < rows * k * itemsize


matmul_f32_accum.defvjp(_matmul_fwd, _matmul_bwd)


@jax.custom_vjp
def dense_f32_accum(x: jax.Array, w: jax.Array, b: jax.Array | None) -> jax.Array:
  """x [..., k] (bf16/fp16, or f32) @ w [k, n] + b [n] (or None) -> [..., n] in x's dtype: the
  product accumulated in f32, the bias added in f32, the sum rounded once (what `matmul` followed
  by a bias add and a cast computes). w and b may be the f32 parameters (cast inside; their
  gradients come back in their own dtypes from f32 sums, as in `matmul_f32_accum`).

  Why a VJP of its own: with the cast outside, the cotangent arriving in x's dtype would be
  converted to f32 for the bias gradient and back to x's dtype for the two matmuls, two extra
  passes over every layer's output gradient; here it is used as it arrives.
  """
  return _dense_fwd(x, w, b)[0]


def _add_bias_rounded(y: jax.Array, b: jax.Array | None, dtype: Dtype) -> jax.Array:
  """f32 y [..., n] + b [n] (None: no bias) in f32, rounded once to `dtype`."""
  return (y if b is None else y + b.astype(jnp.float32)).astype(dtype)


def _bias_grad(grad_out: jax.Array, b: jax.Array | None) -> jax.Array | None:
  """The bias gradient: grad_out [..., n] summed over its leading axes in f32, in b's dtype.

  A 16-bit grad_out on CPU is summed by a dot, ones [2, N] @ grad_out [N, n] accumulated in f32
  (row 0 kept): XLA:CPU runs an f32 sum through YNNPACK, which cannot take the bf16 -> f32 convert, so
  XLA wrote an f32 copy of every layer's output gradient first (in attention with the heads
  transpose done a second time for it). The dot reads the bf16 gradient the matmuls read; same f32
  sum of the same values (ones are exact). Two rows, not one: XLA:CPU runs a one-row dot outside
  YNNPACK, in f32 after converting the operand, which is the copy again (jax 0.10.2).
  """
  if b is None:
    return None
  if jnp.dtype(grad_out.dtype).itemsize == 2 and jax.default_backend() == "cpu":
    rows = grad_out.reshape(-1, grad_out.shape[-1])                         # [N, n]
    return _dot_last_first(jnp.ones((2, rows.shape[0]), rows.dtype), rows)[0].astype(b.dtype)
  return jnp.sum(grad_out.astype(jnp.float32), axis=tuple(range(grad_out.ndim - 1))).astype(b.dtype)


def _dense_fwd(x, w, b):
  return _add_bias_rounded(_dot_last_first(x, w.astype(x.dtype)), b, x.dtype), (x, w, b)


def _dense_bwd(residuals, grad_out):
  x, w, b = residuals
  return (*_matmul_bwd((x, w), grad_out), _bias_grad(grad_out, b))


dense_f32_accum.defvjp(_dense_fwd, _dense_bwd)


def matmul(x: jax.Array, w: jax.Array, dtype: Dtype) -> jax.Array:
  """x [..., k] @ w [k, n] computed in `dtype` -> [..., n] in f32 (f32 accumulation), w's gradient in
  w's own dtype (see `matmul_f32_accum`)."""
  return matmul_f32_accum(x.astype(dtype), w)


class Dense(nn.Module):
  """A linear layer with logical axis names on its parameters and the matmul above.

  `init` makes the parameters in `param_dtype`; the kernel given to `apply` may be in any float dtype
  (e.g. DreamBooth's frozen bf16 copy), it is cast to `dtype` at use. The output comes back in `dtype`.

  A low-rank adapter (LoRA, Hu et al. 2021) runs beside the kernel when the parameters hold one
  next to it: `lora_down` [k, r] and `lora_up` [r, n] (alpha / r already folded into `lora_up`, see
  `dreambooth_jax.training.lora.attach`) make the output x W + b + (x down) up, the adapter's two
  thin products in the same f32-accumulating form, rounded to `dtype` and added, as PEFT's
  `lora.Linear` does under autocast. `init` never creates them.
  """
  features: int
  use_bias: bool = True
  kernel_axes: tuple[str | None, str | None] = ("embed", "mlp")
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                        (x.shape[-1], self.features), self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, self.kernel_axes[-1:]),
                        (self.features,), self.param_dtype)
    y = dense_f32_accum(x.astype(self.dtype), kernel, bias)
    if self.has_variable("params", "lora_down"):
      down, up = self.get_variable("params", "lora_down"), self.get_variable("params", "lora_up")
      # Why beside the kernel, not merged into it: the backward then needs no [k, n] weight gradient
      # (only [k, r] and [r, n] ones), and the frozen kernel can stay in 16 bits.
      low = matmul(x, down, self.dtype).astype(self.dtype)                  # [..., r]
      y = y + matmul(low, up, self.dtype).astype(self.dtype)
    return y


# ----------------------------------------------------------------------------- convolution
CONV_IMPLS = ("auto", "xla", "im2col")


def conv_patches(x: jax.Array, kernel_size: tuple[int, int], strides: tuple[int, int],
                 padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """x [B, H, W, C] -> patches [B, H', W', kh * kw * C], ordered (kh, kw, C) like an HWIO kernel's
  `reshape(kh * kw * C, out)`, so that `patches @ kernel2d` is the convolution (cross-correlation,
  as torch and XLA define it). `padding` is ((top, bottom), (left, right)) in pixels."""
  kh, kw = kernel_size
  sh, sw = strides
  if (kh, kw) != (1, 1) and x.dtype in (jnp.bfloat16, jnp.float16):
    # Moved as 16-bit integers (the same bits): XLA:CPU builds a 16-bit float concatenate in f32, converting
    # every tap up and the patches back down (two extra passes over patches kh*kw times x's size; SD's
    # 3x3 convs fwd+bwd 1.05-1.6x faster standalone without them, bitwise the same).
    moved = conv_patches(jax.lax.bitcast_convert_type(x, jnp.uint16), kernel_size, strides, padding)
    return jax.lax.bitcast_convert_type(moved, x.dtype)
  xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  b, h, w, c = xp.shape
  h_out, w_out = (h - kh) // sh + 1, (w - kw) // sw + 1
  if (kh, kw) == (1, 1):
    return xp[:, :(h_out - 1) * sh + 1:sh, :(w_out - 1) * sw + 1:sw, :]
  taps = [jax.lax.slice(xp, (0, i, j, 0), (b, i + (h_out - 1) * sh + 1, j + (w_out - 1) * sw + 1, c),
                        (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]
  return jnp.concatenate(taps, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_im2col(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """2-D convolution as one matmul over the patches: x [B, H, W, C] (NHWC), kernel [kh, kw, C, N]
  (HWIO) -> [B, H', W', N] in f32, computed in x's dtype. The kernel may be in any float dtype (the
  f32 parameter): it is cast inside and its gradient comes back in its own dtype from the f32
  accumulator, as in `matmul_f32_accum`.

  Why: on XLA:CPU this runs as the bf16 x bf16 -> f32 dot (AMX / AVX512-BF16), where XLA's own bf16
  convolution and its transposes for the backward pass run a slower generic kernel (measured in
  `benchmarks/results/unet_step.md`, `benchmarks/bench_conv.py`: fwd+bwd of SD's 3x3 convs in
  1.1-3.1x less CPU time in bf16, 1.0-2.9x in f32; the cost is a longer compile). The residual is
  x, not the kh*kw times larger patches: the backward pass rebuilds them.
  """
  return _conv_im2col_fwd(x, kernel, strides, padding)[0]


def _conv_im2col_fwd(x, kernel, strides, padding):
  patches = conv_patches(x, kernel.shape[:2], strides, padding)
  kernel2d = kernel.reshape(-1, kernel.shape[-1]).astype(x.dtype)
  return _dot_last_first(patches, kernel2d), (x, kernel)


def _conv_im2col_bwd(strides, padding, residuals, grad_out):
  x, kernel = residuals
  kernel2d = kernel.reshape(-1, kernel.shape[-1]).astype(x.dtype)     # [kh*kw*C, N]
  g = grad_out.astype(x.dtype)                                        # [B, H', W', N]
  grad_patches = dot_f32(g, kernel2d, (((g.ndim - 1,), (1,)), ((), ())))   # [B, H', W', kh*kw*C]
  # The overlapping taps are summed in f32 and rounded once. Folding 16-bit taps instead made XLA:CPU add
  # in bf16, rounding after every add: 4-10x slower at RN50's and SD's 3x3 shapes and ~9e-3 (of the largest
  # entry) off the f32 sum; RN50 bf16 step 7.25 -> 6.55 s.
  unpatch = jax.linear_transpose(lambda t: conv_patches(t, kernel.shape[:2], strides, padding),
                                 jax.ShapeDtypeStruct(x.shape, jnp.float32))
  grad_x, = unpatch(grad_patches)
  grad_kernel = rows_contracted(conv_patches(x, kernel.shape[:2], strides, padding), g)   # [kh*kw*C, N] f32
  return grad_x.astype(x.dtype), grad_kernel.reshape(kernel.shape).astype(kernel.dtype)


conv_im2col.defvjp(_conv_im2col_fwd, _conv_im2col_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def conv_im2col_bias(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, strides: tuple[int, int],
                     padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """`conv_im2col` + bias [N] (or None), the f32 sum rounded once to x's dtype: [B, H', W', N] in
  x's dtype. Its VJP takes the cotangent in x's dtype as it arrives (no f32 round trip for the
  bias gradient; see `dense_f32_accum`); kernel and bias gradients in their own dtypes."""
  return _conv_bias_fwd(x, kernel, bias, strides, padding)[0]


def _conv_bias_fwd(x, kernel, bias, strides, padding):
  y, _ = _conv_im2col_fwd(x, kernel, strides, padding)
  return _add_bias_rounded(y, bias, x.dtype), (x, kernel, bias)


def _conv_bias_bwd(strides, padding, residuals, grad_out):
  x, kernel, bias = residuals
  return (*_conv_im2col_bwd(strides, padding, (x, kernel), grad_out), _bias_grad(grad_out, bias))


conv_im2col_bias.defvjp(_conv_bias_fwd, _conv_bias_bwd)


def resolve_conv_impl(impl: str) -> str:
  """'auto' -> 'im2col' on the CPU backend, 'xla' elsewhere; other names as they are. Raises
  ValueError for an unknown impl."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"Unknown convolution impl '{impl}'; choose one of {CONV_IMPLS}.")
  if impl == "auto":
    return "im2col" if jax.default_backend() == "cpu" else "xla"
  return impl


def conv2d(x: jax.Array, kernel: jax.Array, *, strides: tuple[int, int] = (1, 1),
           padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0)), dtype: Dtype = jnp.float32,
           impl: str = "auto") -> jax.Array:
  """NHWC x [B, H, W, C] * HWIO kernel [kh, kw, C, N] -> [B, H', W', N] computed in `dtype` with
  f32 accumulation, returned in f32 (torch.nn.Conv2d's cross-correlation; explicit padding).

  impl: 'im2col' is `conv_im2col` (the fast form on CPU, for every dtype); 'xla' is
  `lax.conv_general_dilated` (GPUs and TPUs have fused convolution kernels); 'auto' picks 'im2col'
  on the CPU backend and 'xla' elsewhere. Raises ValueError for an unknown impl.

  On GPU a 16-bit 'xla' conv returns its own dtype before the cast to f32: cuDNN accumulates in f32
  inside, but asked for an f32 result from bf16 operands XLA:GPU converts the operands and runs the
  whole conv (forward and both gradients) as f32/TF32, which made the SD 1.5 UNet's convs 39 of
  its ~100 ms bf16 step on an H200 (benchmarks/results/gpu.md). The output is then rounded once to
  `dtype`, as torch's autocast convs are.
  """
  impl = resolve_conv_impl(impl)
  x = x.astype(dtype)
  if impl == "im2col":  # the kernel is cast inside (its gradient then stays in its own dtype)
    return conv_im2col(x, kernel, tuple(strides), tuple(tuple(p) for p in padding))
  kernel = kernel.astype(dtype)
  out_dtype = conv_output_dtype(dtype, jax.default_backend())
  y = jax.lax.conv_general_dilated(x, kernel, tuple(strides), tuple(tuple(p) for p in padding),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=out_dtype)
  return y.astype(jnp.float32)


def conv_output_dtype(dtype: Dtype, backend: str) -> jnp.dtype:
  """The result dtype `conv2d` asks `lax.conv_general_dilated` for: f32 (f32 accumulation kept in the
  output) except for a 16-bit conv on GPU, which returns its own dtype (see `conv2d`)."""
  if backend in ("gpu", "cuda", "rocm") and jnp.dtype(dtype).itemsize == 2:
    return jnp.dtype(dtype)
  return jnp.dtype(jnp.float32)


class Conv(nn.Module):
  """A 2-D convolution layer (NHWC) with `conv2d`'s fast forms; parameters named and shaped as
  `flax.linen.Conv`'s ('kernel' [kh, kw, in, out], 'bias' [out]), so checkpoints load either way.

  `padding` is ((top, bottom), (left, right)); the output comes back in `dtype`.
  """
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))
  use_bias: bool = True
  kernel_axes: tuple[str | None, ...] = (None, None, "conv_in", "conv_out")
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  impl: str = "auto"
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                        (*self.kernel_size, x.shape[-1], self.features), self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, self.kernel_axes[-1:]),
                        (self.features,), self.param_dtype)
    impl = resolve_conv_impl(self.impl)
    if impl == "im2col" and jnp.dtype(self.dtype) != jnp.float32:
      return conv_im2col_bias(x.astype(self.dtype), kernel, bias, tuple(self.strides),
                              tuple(tuple(p) for p in self.padding))
    y = conv2d(x, kernel, strides=self.strides, padding=self.padding, dtype=self.dtype, impl=impl)
    if bias is not None:
      y = y + bias.astype(y.dtype)
    return y.astype(self.dtype)


# ----------------------------------------------------------------------------- normalization, activations
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, dtype: Dtype) -> jax.Array:
  """LayerNorm over the last axis of x [..., n], in f32 whatever x's and the parameters' dtypes, rounded
  once to `dtype`: (x - mean) / sqrt(var + epsilon) * scale + bias, the variance biased (torch's
  `nn.LayerNorm`; Ba et al. 2016). scale, bias: [n]; their gradients come back in their own dtypes
  from f32 sums.

  Why a VJP of its own: autodiff kept x - mean and the normalized x as f32 residuals, two f32 copies of
  every LayerNorm's input written in the forward and read back in the backward. This backward keeps x
  (the residual stream, stored anyway) and the per-row mean and 1/std, and recomputes the rest: ViT-B-32
  train step temporaries 2.45 -> 2.22 GiB in bf16 and 2.97 -> 2.75 GiB in fp32, steps 1-2% faster
  (in-process A/Bs, jax 0.10.2, `WORKSPACE.md`). Same values; gradients equal autodiff's to f32 rounding.
  It also ends a duplication: XLA:CPU fuses cheap element-wise producers into every consumer, and with
  autodiff's LayerNorm backward the fp32 residual stream's gradient chain (each block adding its branch's
  gradient to the one from above) was recomputed inside every fusion of the backward from the top of the
  tower (ViT-B-32 fp32: 100 fusions of up to 230 operands, ~11% of op time); with this one no fusion
  reads more than a block's worth (`tests/test_fast_attention.py`).
  """
  return _layer_norm_fwd(x, scale, bias, epsilon, dtype)[0]


def _layer_norm_stats(x32: jax.Array, epsilon: float) -> tuple[jax.Array, jax.Array]:
  """Per-row mean and 1 / sqrt(var + epsilon) of f32 x [..., n], both [..., 1] (two passes, as torch)."""
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return mean, jax.lax.rsqrt(var + epsilon)


def _layer_norm_fwd(x, scale, bias, epsilon, dtype):
  x32 = x.astype(jnp.float32)
  mean, inv_std = _layer_norm_stats(x32, epsilon)
  y = (x32 - mean) * inv_std * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y.astype(dtype), (x, mean, inv_std, scale, bias)


def _normalization_bwd(residuals, grad_out, axes: tuple[int, ...]):
  """The backward of (x - mean) * inv_std * scale + bias with mean and inv_std taken over `axes` of x
  [..., C] (LayerNorm: the last axis; BatchNorm: all but the last), scale and bias [C]: the gradients of
  x (in x's dtype), scale and bias (summed over all but the last axis, in their own dtypes), in f32."""
  x, mean, inv_std, scale, bias = residuals
  x_hat = (x.astype(jnp.float32) - mean) * inv_std
  g = grad_out.astype(jnp.float32)
  g_hat = g * scale.astype(jnp.float32)
  # d/dx of (x - mean) * inv_std, applied to g_hat: the two means over `axes` (the mean's and the
  # variance's own gradients) remove g_hat's components along the ones vector and along x_hat.
  grad_x = inv_std * (g_hat - g_hat.mean(axes, keepdims=True) - x_hat * (g_hat * x_hat).mean(axes, keepdims=True))
  leading = tuple(range(x.ndim - 1))
  return (grad_x.astype(x.dtype), jnp.sum(g * x_hat, leading).astype(scale.dtype),
          jnp.sum(g, leading).astype(bias.dtype))


layer_norm.defvjp(_layer_norm_fwd, lambda epsilon, dtype, residuals, grad_out: _normalization_bwd(
    residuals, grad_out, axes=(-1,)))


class LayerNorm(nn.Module):
  """LayerNorm computed in f32 whatever the compute dtype (as OpenAI's CLIP does); `layer_norm`."""
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (features,), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axis_name,)),
                      (features,), self.param_dtype)
    return layer_norm(x, scale, bias, self.epsilon, jnp.dtype(self.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, dtype: Dtype) -> jax.Array:
  """Training-mode BatchNorm of x [..., C] over all axes but the last, with the batch's statistics, in f32,
  rounded once to `dtype` (Ioffe & Szegedy 2015; flax's `nn.BatchNorm` with its defaults: variance
  E[x^2] - E[x]^2 clipped at 0, f32 reductions). scale, bias: [C]; gradients in their own dtypes.

  Why a VJP of its own (as `layer_norm`): autodiff kept x - mean in f32 for the backward, an f32 copy of
  every BatchNorm's input (RN50's are the largest activations of the CLIP models); this one keeps x and
  the per-channel mean and 1/std and recomputes the rest: RN50 bf16 train step 6.71 -> 6.13 s (in-process
  A/B, jax 0.10.2, `WORKSPACE.md`).
  """
  return _batch_norm_fwd(x, scale, bias, epsilon, dtype)[0]


def batch_norm_stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-channel mean and biased variance of x [..., C] over all axes but the last, in f32 (one pass,
  E[x^2] - E[x]^2 clipped at 0, as flax's BatchNorm): two [C] arrays."""
  x32 = x.astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  mean = x32.mean(axes)
  return mean, jnp.maximum(0.0, jnp.square(x32).mean(axes) - jnp.square(mean))


def _batch_norm_fwd(x, scale, bias, epsilon, dtype):
  mean, var = batch_norm_stats(x)
  inv_std = jax.lax.rsqrt(var + epsilon)
  y = (x.astype(jnp.float32) - mean) * (inv_std * scale.astype(jnp.float32)) + bias.astype(jnp.float32)
  return y.astype(dtype), (x, mean, inv_std, scale, bias)


batch_norm_train.defvjp(_batch_norm_fwd, lambda epsilon, dtype, residuals, grad_out: _normalization_bwd(
    residuals, grad_out, axes=tuple(range(residuals[0].ndim - 1))))


class BatchNorm(nn.Module):
  """flax's `nn.BatchNorm` over the last axis (same parameters 'scale', 'bias' and batch_stats 'mean',
  'var'; running averages as `momentum * old + (1 - momentum) * batch`, not updated while initializing),
  trained through `batch_norm_train`. No cross-device axis_name: under jit the batch axes' means are
  global already."""
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scale_init: Initializer = nn.initializers.ones
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = (x.shape[-1],)
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
    scale = self.param("scale", self.scale_init, features, self.param_dtype)
    bias = self.param("bias", self.bias_init, features, self.param_dtype)
    if self.use_running_average:
      inv_std = jax.lax.rsqrt(ra_var.value + self.epsilon)
      y = (x.astype(jnp.float32) - ra_mean.value) * (inv_std * scale.astype(jnp.float32)) + bias.astype(jnp.float32)
      return y.astype(self.dtype)
    if not self.is_initializing():
      mean, var = batch_norm_stats(jax.lax.stop_gradient(x))   # the same reductions as inside (XLA shares them)
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return batch_norm_train(x, scale, bias, self.epsilon, jnp.dtype(self.dtype))


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x: jax.Array) -> jax.Array:
  """torch.nn.GELU() default, 0.5 x (1 + erf(x / sqrt(2))) (the erf form, not the tanh
  approximation), computed in f32 and returned in x's dtype. Why not `jax.nn.gelu(x,
  approximate=False)`: for bf16 input it scales by 1/sqrt(2) rounded to bf16 and goes through erfc,
  whose XLA:CPU expansion made forward + backward 2.8x slower than erf's (measured on
  [32, 77, 2048] bf16; ~6% of a ViT-B-32 step), and it is further from torch's values. Left to autodiff:
  a custom VJP that keeps only x and recomputes erf in the backward was no faster (ViT-B-32 step, bf16
  and fp32, session 13)."""
  x32 = x.astype(jnp.float32)
  return (0.5 * x32 * (1.0 + jax.lax.erf(x32 * np.float32(0.7071067811865476)))).astype(x.dtype)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": exact_gelu}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"Unknown activation '{name}'; choose one of {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


def normal(stddev: float) -> Initializer:
  return nn.initializers.normal(stddev=stddev)


def logical(init: Initializer, axes: Sequence[str | None]) -> Initializer:
  return nn.with_logical_partitioning(init, tuple(axes))


# ----------------------------------------------------------------------------- attention
ATTENTION_IMPLS = ("auto", "xla", "f32_accum", "cudnn")


def _heads_first(t: jax.Array) -> jax.Array:
  """[B, T, H, D] -> [B*H, T, D], materialised: a plain transpose would be folded into the next
  dot as batch axes that are not leading, a form XLA:CPU runs in f32; the reshape stops that."""
  b, t_len, h, d = t.shape
  return jnp.transpose(t, (0, 2, 1, 3)).reshape(b * h, t_len, d)


def _heads_last(t: jax.Array, num_heads: int) -> jax.Array:
  """[B*H, T, D] -> [B, T, H, D]."""
  bh, t_len, d = t.shape
  return jnp.transpose(t.reshape(bh // num_heads, num_heads, t_len, d), (0, 2, 1, 3))


def _swap_last_two(t: jax.Array) -> jax.Array:
  """[N, T, S] -> [N, S, T] materialised row-major (as `rows_transposed`: an unfolded transpose)."""
  n, t_len, s_len = t.shape
  split = 2 if n % 2 == 0 else 1
  swapped = jnp.transpose(t.reshape(split, n // split, t_len, s_len), (0, 1, 3, 2))
  return swapped.reshape(n, s_len, t_len)


def _batched_dot(a: jax.Array, b: jax.Array, a_axis: int, b_axis: int) -> jax.Array:
  """Batched over the leading axis, contracting a's `a_axis` with b's `b_axis`; f32 result."""
  return dot_f32(a, b, (((a_axis,), (b_axis,)), ((0,), (0,))))


def _first_axes_contracted(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [N, T, S], b [N, T, D] -> a^T @ b [N, S, D] per batch entry, f32. As `rows_contracted`: a
  16-bit a is swapped into a row-major copy (the dot stays bf16 in YNNPACK), an f32 one is contracted
  along T as it is (no copy)."""
  if a.dtype == jnp.float32 or upcast_bf16_dots(a.dtype):   # f32 (or converted to it): no copy
    return _batched_dot(a.astype(jnp.float32), b.astype(jnp.float32), 1, 1)
  return _batched_dot(_swap_last_two(a), b, 2, 1)


def _attention_probs(qh, kh, is_causal, first_row: int = 0):
  """Softmax probabilities [BH, T, S] f32 of queries qh [BH, T, D] (rows first_row.. of the whole
  query sequence, for the causal mask) against keys kh [BH, S, D]."""
  scores = _batched_dot(qh, kh, 2, 2) * (qh.shape[-1] ** -0.5)      # [BH, T, S] f32
  if is_causal:
    t_len, s_len = scores.shape[-2:]
    allowed = jnp.tril(jnp.ones((t_len, s_len), jnp.bool_), k=first_row)   # as jax.nn's is_causal
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(scores, axis=-1)


# Attention over long sequences runs block by block of query rows, so that each block's f32 scores,
# softmax and softmax gradient stay in cache between the ops that pass them on: SD 1.5's 32x32-latent
# self-attention ([8, 1024, 1024], 32 MiB of scores) ran forward + backward 1.27x faster standalone in
# 8 blocks of ~4 MiB than whole (2026-12-02). Sequences under ATTENTION_BLOCK_MIN_ROWS queries (every
# CLIP tower: 50-257 tokens) stay whole, where it was not measured; at most ATTENTION_MAX_BLOCKS
# blocks, since each is its own ops to compile (SD at 64x64 latents: 4,096 queries).
ATTENTION_BLOCK_BYTES = 4 * 2 ** 20
ATTENTION_BLOCK_MIN_ROWS = 512
ATTENTION_MAX_BLOCKS = 16


def _query_blocks(batch_heads: int, t_len: int, s_len: int) -> list[tuple[int, int]]:
  """[(first, stop)] query-row ranges whose f32 scores are about ATTENTION_BLOCK_BYTES each (one
  range for fewer than ATTENTION_BLOCK_MIN_ROWS queries, at most ATTENTION_MAX_BLOCKS)."""
  if t_len < ATTENTION_BLOCK_MIN_ROWS:
    return [(0, t_len)]
  count = min(ATTENTION_MAX_BLOCKS, t_len, -(-batch_heads * t_len * s_len * 4 // ATTENTION_BLOCK_BYTES))
  size = -(-t_len // count)
  return [(first, min(first + size, t_len)) for first in range(0, t_len, size)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def attention_f32_accum(q: jax.Array, k: jax.Array, v: jax.Array, is_causal: bool = False) -> jax.Array:
  """Softmax attention, q [B, T, H, D], k and v [B, S, H, D] -> [B, T, H, D] in q's dtype.

  Every matmul, forward and backward, is a batched dot in q's dtype with f32 accumulation and an
  operand layout XLA:CPU keeps in that dtype; scores, softmax and its gradient are f32. On CPU in
  bf16 this is several times faster than `jax.nn.dot_product_attention`, whose probs @ v is
  bf16 -> bf16 and whose backward dots fall back to f32. Long sequences run in blocks of query rows
  (`ATTENTION_BLOCK_BYTES`); each row's values are the same, and the key and value gradients are
  summed over the blocks in f32 and rounded once.
  """
  return _attention_fwd(q, k, v, is_causal)[0]


def _attention_fwd(q, k, v, is_causal):
  qh, kh, vh = _heads_first(q), _heads_first(k), _heads_first(v)   # [BH, T or S, D]
  outs, probs = [], []
  for first, stop in _query_blocks(qh.shape[0], qh.shape[1], kh.shape[1]):
    block_probs = _attention_probs(qh[:, first:stop], kh, is_causal, first)   # [BH, rows, S] f32
    outs.append(_batched_dot(block_probs.astype(q.dtype), vh, 2, 1).astype(q.dtype))  # [BH, rows, D]
    probs.append(block_probs)
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
  return _heads_last(out, q.shape[2]), (qh, kh, vh, tuple(probs))


def _attention_bwd(is_causal, residuals, grad_out):
  del is_causal  # Masked entries have zero probability, so their gradients vanish anyway.
  qh, kh, vh, probs = residuals
  dtype, num_heads = qh.dtype, grad_out.shape[2]
  g = _heads_first(grad_out.astype(dtype))                           # [BH, T, D]
  add = lambda total, part: part if total is None else total + part  # noqa: E731 (f32 sums over blocks)
  grad_q, grad_k, grad_v, first = [], None, None, 0
  for block_probs in probs:  # the forward's blocks, [BH, rows, S] each
    stop = first + block_probs.shape[1]
    block_g = g[:, first:stop]                                       # [BH, rows, D]
    grad_v = add(grad_v, _first_axes_contracted(block_probs.astype(dtype), block_g))   # [BH, S, D] f32
    grad_probs = _batched_dot(block_g, vh, 2, 2)                     # [BH, rows, S] f32
    # Softmax backward: d scores = p * (dp - sum_s p dp), times the 1/sqrt(D) of the forward.
    grad_scores = block_probs * (grad_probs - jnp.sum(block_probs * grad_probs, axis=-1, keepdims=True))
    grad_scores = (grad_scores * (qh.shape[-1] ** -0.5)).astype(dtype)
    grad_q.append(_batched_dot(grad_scores, kh, 2, 1).astype(dtype))              # [BH, rows, D]
    grad_k = add(grad_k, _first_axes_contracted(grad_scores, qh[:, first:stop]))  # [BH, S, D] f32
    first = stop
  grad_q = grad_q[0] if len(grad_q) == 1 else jnp.concatenate(grad_q, axis=1)
  return tuple(_heads_last(t.astype(dtype), num_heads) for t in (grad_q, grad_k, grad_v))


attention_f32_accum.defvjp(_attention_fwd, _attention_bwd)


def choose_attention_impl(dtype: Dtype, head_dim: int, backend: str) -> str:
  """What 'auto' means: 'f32_accum' on CPU for every dtype (bf16: 2.2x less CPU time than XLA's
  form, forward + backward, at ViT-B-32's and its text tower's shapes; fp32: 1.4x less, its batched
  dots need fewer transposes); 'cudnn' (jax's cuDNN fused attention) for bf16/fp16 on GPU when the
  head size is one cuDNN's kernel takes (a multiple of 8, at most 128); 'xla' otherwise (fp32 on
  GPU, TPUs, and SD 1.x's 160-wide heads on GPU)."""
  low_precision = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if backend == "cpu":
    return "f32_accum"
  if low_precision and backend in ("gpu", "cuda") and head_dim % 8 == 0 and head_dim <= 128:
    return "cudnn"
  return "xla"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, is_causal: bool = False,
                          impl: str = "auto") -> jax.Array:
  """q [B, T, H, D], k and v [B, S, H, D] -> [B, T, H, D], scale 1/sqrt(D).

  impl: 'xla' is `jax.nn.dot_product_attention` (XLA's own; TPUs); 'cudnn' the same with
  `implementation='cudnn'` (NVIDIA GPUs, bf16/fp16 only); 'f32_accum' is `attention_f32_accum`;
  'auto' asks `choose_attention_impl` (dtype, head size, backend). Raises ValueError for an unknown
  impl.
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"Unknown attention impl '{impl}'; choose one of {ATTENTION_IMPLS}.")
  if impl == "auto":
    impl = choose_attention_impl(q.dtype, q.shape[-1], jax.default_backend())
  if impl == "f32_accum":
    return attention_f32_accum(q, k, v, is_causal)
  if impl == "cudnn":
    return attention_even_lengths(q, k, v, is_causal, implementation="cudnn")
  return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal)


def attention_even_lengths(q: jax.Array, k: jax.Array, v: jax.Array, is_causal: bool = False,
                           implementation: str | None = "cudnn") -> jax.Array:
  """`jax.nn.dot_product_attention` with odd query/key lengths padded by one row: q [B, T, H, D],
  k and v [B, S, H, D] -> [B, T, H, D]. The padded key is masked out through
  `key_value_seq_lengths`, the padded query row is dropped, so values and gradients equal the
  unpadded attention's. Why: jax (0.10.2 to 0.11.2 at least) refuses to differentiate cuDNN's fused
  attention when T or S is odd ("Unsupported sequence length Q 197, KV 197": its training check
  takes the empty placeholder bias for a real one), which is every CLIP ViT (197, 50 tokens) and text
  tower (77), and SD's cross-attention (77); seen on an H200, cuDNN 9.19.
  """
  t_len, s_len = q.shape[1], k.shape[1]
  if t_len % 2 == 0 and s_len % 2 == 0:
    return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation=implementation)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))  # noqa: E731
  batch = q.shape[0]
  out = jax.nn.dot_product_attention(
      pad(q, t_len % 2), pad(k, s_len % 2), pad(v, s_len % 2), is_causal=is_causal,
      query_seq_lengths=jnp.full((batch,), t_len, jnp.int32),
      key_value_seq_lengths=jnp.full((batch,), s_len, jnp.int32), implementation=implementation)
  return out[:, :t_len]
