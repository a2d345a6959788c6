"""Building blocks shared by the CLIP towers and the Stable Diffusion models.

What is not stock Flax is the matmul: with bf16 compute, every projection runs as bf16 x bf16
with f32 accumulation (`preferred_element_type=float32`), in the forward *and* the backward pass.
That is the form XLA:CPU runs with the CPU's bf16 dot instructions (AVX512-BF16 or AMX; ~4x a
plain f32 matmul on these hosts) and the form TPUs and GPUs prefer anyway; flax's
`Dense(dtype=bfloat16)` gives bf16 -> bf16 instead, and autodiff's transposed matmuls lose the fast
path, hence the custom VJP. Attention gets the same treatment on CPU (`dot_product_attention`).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]


def _dot_last_first(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., k] @ w [k, n] -> [..., n], accumulated in f32."""
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


def rows_transposed(x: jax.Array, tile: int = 64) -> jax.Array:
  """x [..., k] -> [k, N] (N: the product of the leading axes), materialised row-major.

  Two things make this more than `x.reshape(N, k).T`. XLA folds a plain transpose into the dot
  that reads it (the dot then contracts the lhs's first axis), a form XLA:CPU runs in f32 after
  converting both bf16 operands: about 3x slower. A reshape between the transpose and the dot stops
  the folding. And XLA:CPU's element-wise transpose of a large bf16 matrix is slow (strided reads),
  so it goes in two cache-friendly passes: whole `tile`-wide column blocks first, then each block.
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
  """Low-precision matmul with f32 accumulation whose gradients keep the same form."""
  return _dot_last_first(x, w)


def _matmul_fwd(x, w):
  return _dot_last_first(x, w), (x, w)


def _matmul_bwd(residuals, grad_out):
  x, w = residuals
  g = grad_out.astype(x.dtype)                                  # [..., n]
  # dx = g @ w^T: the contracted axis (n) is last in both operands.
  grad_x = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)
  # dw = x^T @ g over all leading axes, with x^T materialised row-major (see `rows_transposed`).
  grad_w = jax.lax.dot_general(rows_transposed(x), g.reshape(-1, g.shape[-1]), (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)
  return grad_x.astype(x.dtype), grad_w.astype(w.dtype)


matmul_f32_accum.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(x: jax.Array, w: jax.Array, dtype: Dtype) -> jax.Array:
  """x [..., k] @ w [k, n] computed in `dtype`; f32 accumulation for low-precision dtypes."""
  if jnp.dtype(dtype) == jnp.float32:
    return _dot_last_first(x.astype(jnp.float32), w.astype(jnp.float32))
  return matmul_f32_accum(x.astype(dtype), w.astype(dtype))


class Dense(nn.Module):
  """A linear layer with logical axis names on its parameters and the matmul above.

  Parameters are stored in `param_dtype`; the output comes back in `dtype`.
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
    y = matmul(x, kernel, self.dtype)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, self.kernel_axes[-1:]),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(y.dtype)
    return y.astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm computed in f32 whatever the compute dtype (as OpenAI's CLIP does)."""
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
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x: jax.Array) -> jax.Array:
  """torch.nn.GELU() default: the erf form, not the tanh approximation."""
  return jax.nn.gelu(x, approximate=False)


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
ATTENTION_IMPLS = ("auto", "xla", "f32_accum")


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
  return jax.lax.dot_general(a, b, (((a_axis,), (b_axis,)), ((0,), (0,))),
                             preferred_element_type=jnp.float32)


def _attention_probs(qh, kh, is_causal):
  scores = _batched_dot(qh, kh, 2, 2) * (qh.shape[-1] ** -0.5)      # [BH, T, S] f32
  if is_causal:
    t_len, s_len = scores.shape[-2:]
    allowed = jnp.tril(jnp.ones((t_len, s_len), jnp.bool_))         # as jax.nn's is_causal
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(scores, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def attention_f32_accum(q: jax.Array, k: jax.Array, v: jax.Array, is_causal: bool = False) -> jax.Array:
  """Softmax attention, q [B, T, H, D], k and v [B, S, H, D] -> [B, T, H, D] in q's dtype.

  Every matmul, forward and backward, is a batched dot in q's dtype with f32 accumulation and an
  operand layout XLA:CPU keeps in that dtype; scores, softmax and its gradient are f32. On CPU in
  bf16 this is several times faster than `jax.nn.dot_product_attention`, whose probs @ v is
  bf16 -> bf16 and whose backward dots fall back to f32.
  """
  return _attention_fwd(q, k, v, is_causal)[0]


def _attention_fwd(q, k, v, is_causal):
  qh, kh, vh = _heads_first(q), _heads_first(k), _heads_first(v)   # [BH, T or S, D]
  probs = _attention_probs(qh, kh, is_causal)                        # [BH, T, S] f32
  out = _batched_dot(probs.astype(q.dtype), vh, 2, 1)                # [BH, T, D] f32
  return _heads_last(out.astype(q.dtype), q.shape[2]), (qh, kh, vh, probs)


def _attention_bwd(is_causal, residuals, grad_out):
  del is_causal  # Masked entries have zero probability, so their gradients vanish anyway.
  qh, kh, vh, probs = residuals
  dtype, num_heads = qh.dtype, grad_out.shape[2]
  g = _heads_first(grad_out.astype(dtype))                           # [BH, T, D]
  grad_v = _batched_dot(_swap_last_two(probs.astype(dtype)), g, 2, 1)   # [BH, S, D]
  grad_probs = _batched_dot(g, vh, 2, 2)                             # [BH, T, S] f32
  # Softmax backward: d scores = p * (dp - sum_s p dp), times the 1/sqrt(D) of the forward.
  grad_scores = probs * (grad_probs - jnp.sum(probs * grad_probs, axis=-1, keepdims=True))
  grad_scores = (grad_scores * (qh.shape[-1] ** -0.5)).astype(dtype)
  grad_q = _batched_dot(grad_scores, kh, 2, 1)                       # [BH, T, D]
  grad_k = _batched_dot(_swap_last_two(grad_scores), qh, 2, 1)       # [BH, S, D]
  return tuple(_heads_last(t.astype(dtype), num_heads) for t in (grad_q, grad_k, grad_v))


attention_f32_accum.defvjp(_attention_fwd, _attention_bwd)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, is_causal: bool = False,
                          impl: str = "auto") -> jax.Array:
  """q [B, T, H, D], k and v [B, S, H, D] -> [B, T, H, D].

  impl: 'xla' is `jax.nn.dot_product_attention` (the path for GPU and TPU, where it can reach
  fused kernels); 'f32_accum' is `attention_f32_accum`; 'auto' picks 'f32_accum' on CPU for
  bf16/fp16 inputs and 'xla' otherwise.
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"Unknown attention impl '{impl}'; choose one of {ATTENTION_IMPLS}.")
  if impl == "auto":
    low_precision = jnp.dtype(q.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    impl = "f32_accum" if low_precision and jax.default_backend() == "cpu" else "xla"
  if impl == "f32_accum":
    return attention_f32_accum(q, k, v, is_causal)
  return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal)
