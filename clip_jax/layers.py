"""Building blocks shared by the CLIP towers and the Stable Diffusion models.

The one thing here that is not stock Flax is the matmul: with bf16 compute, every projection runs
as bf16 x bf16 with f32 accumulation (`preferred_element_type=float32`), in the forward *and* the
backward pass. That is the form XLA:CPU sends to AMX (~4x a plain f32 matmul on these hosts) and
the form TPUs and GPUs prefer anyway; flax's `Dense(dtype=bfloat16)` gives bf16 -> bf16 instead,
and autodiff's transposed matmuls lose the fast path, hence the custom VJP.
"""
from __future__ import annotations

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
  # dw = x^T @ g over all leading axes. The first operand must be row-major with the
  # contracted (token) axis last, so x^T is materialised instead of folded into the dot.
  x_rows = x.reshape(-1, x.shape[-1])                           # [N, k]
  x_t = jax.lax.optimization_barrier(x_rows.T)                  # [k, N]
  grad_w = jax.lax.dot_general(x_t, g.reshape(-1, g.shape[-1]), (((1,), (0,)), ((), ())),
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
