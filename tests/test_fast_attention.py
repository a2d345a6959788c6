"""The CPU fast paths in clip_jax.layers against their plain references.

`attention_f32_accum` against `jax.nn.dot_product_attention` (values and gradients):
  fp32: max abs diff <= 1e-5 (the same math; only summation order differs).
  bf16: the forward is compared with the fp32 reference on the same bf16-rounded inputs, within
        3e-2 abs (inputs ~N(0, 1); a bf16 ulp near 1 is 7.8e-3); gradients within 6e-2 abs, the
        same bound the stock bf16 path meets against that reference.
`rows_transposed` is an exact transpose; `matmul_f32_accum`'s gradients match f32 autodiff within
bf16 rounding, and an f32 weight's gradient is the f32 product (1e-5); `dense_f32_accum` equals matmul + bias + cast
(forward bitwise, gradients 1e-6); weight gradients from f32 activations (no copy of x^T) and from bf16 ones
equal x^T g (1e-5); the fp32 `Dense` (the same custom VJP) equals flax's nn.Dense (values 1e-5
absolute, gradients 1e-5 of the largest). `exact_gelu` equals torch's
GELU (values within 2e-6, gradients 1e-6 absolute on [-8, 8] in f32, as jax.nn.gelu; bf16 within
one bf16 ulp, or 1e-6 absolute in the far negative tail, where torch keeps values ~1e-7 and the
erf form gives 0). `layer_norm` (its own VJP) equals torch's nn.LayerNorm in f32 (values and gradients within
1e-5 of the largest entry) and autodiff's form in bf16 (values bitwise, gradients to f32 rounding), and a
tower's train step keeps fewer temporaries with it. A tiny bf16 causal tower with the fast attention is as close to fp32 (relative L2 of
outputs and of all parameter gradients) as with the stock attention, within 1.5x or 1e-2.
`conv2d`'s im2col form against `lax.conv_general_dilated` (strides, torch's and the VAE's
asymmetric padding, 1x1): fp32 values and gradients within 1e-5 relative to the largest entry;
bf16 within 2e-2 of the fp32 reference on the same rounded inputs, as XLA's own bf16 conv is.
"""
import functools
import platform
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clip_jax
from clip_jax import host, layers
from clip_jax.models.transformer import Transformer

SHAPES = [  # (B, T, S, heads, head_dim, causal)
    (2, 7, 7, 3, 8, False),
    (2, 7, 7, 3, 8, True),
    (3, 1, 9, 4, 16, False),   # a ResNet attention pool: one query over the feature map
]


def _qkv(b, t, s, h, d, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, t, h, d)).astype(dtype)
  k = jax.random.normal(keys[1], (b, s, h, d)).astype(dtype)
  v = jax.random.normal(keys[2], (b, s, h, d)).astype(dtype)
  grad_out = jax.random.normal(keys[3], (b, t, h, d)).astype(dtype)
  return q, k, v, grad_out


def _value_and_grads(impl, q, k, v, grad_out, causal):
  # Jitted as one program (eager, every op of the forward and the backward compiled on its own: ~2x the
  # time). A new function each call, so no cached trace outlives a monkeypatched layers constant.
  def value_and_grads(q, k, v, grad_out):
    out, vjp = jax.vjp(lambda a, b, c: layers.dot_product_attention(a, b, c, is_causal=causal, impl=impl), q, k, v)
    return [out, *vjp(grad_out)]
  return jax.jit(value_and_grads)(q, k, v, grad_out)


def _max_diff(a, b):
  return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


# The non-causal case is slow-only here (6-7 s): the causal one and the attention pool stay in the fast subset.
@pytest.mark.parametrize("shape", [pytest.param(SHAPES[0], marks=pytest.mark.slow), *SHAPES[1:]])
def test_fp32_equals_reference_attention(shape):
  *dims, causal = shape
  q, k, v, grad_out = _qkv(*dims, jnp.float32)
  fast = _value_and_grads("f32_accum", q, k, v, grad_out, causal)
  reference = _value_and_grads("xla", q, k, v, grad_out, causal)
  for name, a, b in zip(("out", "dq", "dk", "dv"), fast, reference):
    assert _max_diff(a, b) <= 1e-5, name


@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_is_within_tolerance_of_fp32_reference(shape):
  *dims, causal = shape
  q, k, v, grad_out = _qkv(*dims, jnp.bfloat16)
  fast = _value_and_grads("f32_accum", q, k, v, grad_out, causal)
  as_f32 = [t.astype(jnp.float32) for t in (q, k, v, grad_out)]
  reference = _value_and_grads("xla", *as_f32, causal)
  stock_bf16 = _value_and_grads("xla", q, k, v, grad_out, causal)
  for name, a, b, stock in zip(("out", "dq", "dk", "dv"), fast, reference, stock_bf16):
    assert a.dtype == jnp.bfloat16, name
    bound = 3e-2 if name == "out" else 6e-2
    assert _max_diff(a, b) <= bound, name
    assert _max_diff(stock, b) <= bound, name  # the bound is one the stock bf16 path also meets


@pytest.mark.parametrize("causal", [pytest.param(False, marks=pytest.mark.slow), True])  # one case fast
def test_attention_in_query_blocks_equals_the_reference_and_the_whole(monkeypatch, causal):
  # Long sequences run in blocks of query rows (layers.ATTENTION_BLOCK_BYTES): a budget this small
  # splits 13 queries into blocks of 2 (the last one shorter), each with its own causal offset.
  dims = (2, 13, 11, 2, 8)  # b, t, s, h, d
  q, k, v, grad_out = _qkv(*dims, jnp.float32)
  reference = _value_and_grads("xla", q, k, v, grad_out, causal)
  whole = _value_and_grads("f32_accum", q, k, v, grad_out, causal)
  assert layers._query_blocks(4, 13, 11) == [(0, 13)]  # short: whole
  monkeypatch.setattr(layers, "ATTENTION_BLOCK_MIN_ROWS", 1)
  monkeypatch.setattr(layers, "ATTENTION_BLOCK_BYTES", 2 * 4 * 11 * 4)  # two rows of [BH=4, rows, 11] f32
  assert layers._query_blocks(4, 13, 11) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12), (12, 13)]
  assert len(layers._query_blocks(8, 4096, 4096)) == layers.ATTENTION_MAX_BLOCKS
  blocked = _value_and_grads("f32_accum", q, k, v, grad_out, causal)
  for name, a, b, ref in zip(("out", "dq", "dk", "dv"), blocked, whole, reference):
    assert _max_diff(a, b) <= 1e-6, name   # the same sums (dk, dv: over blocks), in another order
    assert _max_diff(a, ref) <= 1e-5, name


def test_auto_picks_the_fast_path_on_cpu():
  assert jax.default_backend() == "cpu"
  q, k, v, _ = _qkv(2, 5, 5, 2, 8, jnp.bfloat16)
  auto = layers.dot_product_attention(q, k, v, is_causal=True)
  np.testing.assert_array_equal(np.asarray(auto, np.float32),
                                np.asarray(layers.attention_f32_accum(q, k, v, True), np.float32))
  q32, k32, v32 = (t.astype(jnp.float32) for t in (q, k, v))
  np.testing.assert_array_equal(layers.dot_product_attention(q32, k32, v32),
                                layers.attention_f32_accum(q32, k32, v32))
  np.testing.assert_array_equal(layers.dot_product_attention(q32, k32, v32, impl="xla"),
                                jax.nn.dot_product_attention(q32, k32, v32))
  with pytest.raises(ValueError, match="Unknown attention impl"):
    layers.dot_product_attention(q, k, v, impl="flash")


def test_rows_transposed_is_a_transpose():
  for shape in [(6, 4), (7, 3), (2, 5, 4), (2, 3, 5, 4), (1, 8)]:  # 7 rows: prime, the plain transpose
    x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape).astype(jnp.bfloat16)
    expected = np.asarray(x, np.float32).reshape(-1, shape[-1]).T
    np.testing.assert_array_equal(np.asarray(jax.jit(layers.rows_transposed)(x), np.float32), expected)


def test_matmul_gradients_match_f32_autodiff():
  keys = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(keys[0], (2, 6, 16)).astype(jnp.bfloat16)
  w = (jax.random.normal(keys[1], (16, 8)) * 0.25).astype(jnp.bfloat16)
  g = jax.random.normal(keys[2], (2, 6, 8))
  loss = lambda fn: lambda x, w: jnp.sum(fn(x, w).astype(jnp.float32) * g)  # noqa: E731
  fast = jax.jit(jax.grad(loss(layers.matmul_f32_accum), argnums=(0, 1)))(x, w)
  reference = jax.grad(loss(lambda a, b: a.astype(jnp.float32) @ b.astype(jnp.float32)), argnums=(0, 1))(
      x.astype(jnp.float32), w.astype(jnp.float32))
  for a, b in zip(fast, reference):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=2e-2, atol=3e-2)


def test_f32_weight_gets_its_gradient_in_f32_from_the_accumulator():
  # An f32 parameter is cast inside: its gradient is the f32 product x^T g (g rounded to bf16, as
  # the bf16 backward pass sees it), not that product rounded to bf16.
  keys = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(keys[0], (4, 6, 32)).astype(jnp.bfloat16)
  w = jax.random.normal(keys[1], (32, 8)) * 0.25
  g = jax.random.normal(keys[2], (4, 6, 8))
  grad_x, grad_w = jax.vjp(layers.matmul_f32_accum, x, w)[1](g)
  assert grad_x.dtype == jnp.bfloat16 and grad_w.dtype == jnp.float32
  g16 = np.asarray(g.astype(jnp.bfloat16), np.float32).reshape(-1, 8)
  expected = np.asarray(x, np.float32).reshape(-1, 32).T @ g16
  np.testing.assert_allclose(np.asarray(grad_w), expected, rtol=1e-5, atol=1e-5)
  assert not np.array_equal(np.asarray(grad_w), np.asarray(grad_w.astype(jnp.bfloat16), np.float32))
  # The forward is the bf16 product of the rounded weight, as before.
  np.testing.assert_array_equal(np.asarray(layers.matmul_f32_accum(x, w)),
                                np.asarray(layers.matmul_f32_accum(x, w.astype(jnp.bfloat16))))


@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_f32_accum_is_matmul_plus_bias_rounded_once(use_bias):
  # The fused form computes what matmul + bias add + cast did, forward and backward (values and
  # gradients equal up to summation order), with the bias gradient in the parameter's dtype.
  keys = jax.random.split(jax.random.key(4), 4)
  x = jax.random.normal(keys[0], (3, 5, 16)).astype(jnp.bfloat16)
  w = jax.random.normal(keys[1], (16, 8)) * 0.25
  b = jax.random.normal(keys[2], (8,)) if use_bias else None
  g = jax.random.normal(keys[3], (3, 5, 8)).astype(jnp.bfloat16)

  def unfused(x, w, b):
    y = layers.matmul(x, w, jnp.bfloat16)
    return (y if b is None else y + b).astype(jnp.bfloat16)

  fused_out, fused_vjp = jax.vjp(layers.dense_f32_accum, x, w, b)
  plain_out, plain_vjp = jax.vjp(unfused, x, w, b)
  assert fused_out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(fused_out, np.float32), np.asarray(plain_out, np.float32))
  for fused, plain in zip(jax.tree.leaves(fused_vjp(g)), jax.tree.leaves(plain_vjp(g))):
    assert fused.dtype == plain.dtype
    np.testing.assert_allclose(np.asarray(fused, np.float32), np.asarray(plain, np.float32), rtol=1e-6, atol=1e-6)
  assert len(jax.tree.leaves(fused_vjp(g))) == (3 if use_bias else 2)


@pytest.fixture
def native_bf16_dots(monkeypatch):
  """bf16 dots kept as bf16 (CLIP_JAX_CPU_BF16_DOTS=native) for the tests that pin their compiled form,
  whatever the CPU running them has (`layers.upcast_bf16_dots`)."""
  monkeypatch.setenv(layers.BF16_DOTS_ENV, "native")


def test_bf16_dense_backward_keeps_no_f32_copy_of_the_output_gradient(native_bf16_dots):
  # The bias gradient is summed by a dot from the bf16 cotangent (`layers._bias_grad`): before, XLA:CPU
  # wrote the whole cotangent out in f32 ([3, 16, 8] here) for YNNPACK's sum, in every Dense layer.
  # Pins the compiled form on jax 0.10.2's XLA:CPU; after an upgrade, re-check before relaxing it.
  x, g = jnp.ones((3, 16, 24), jnp.bfloat16), jnp.ones((3, 16, 8), jnp.bfloat16)
  _, vjp = jax.vjp(layers.dense_f32_accum, x, jnp.ones((24, 8)), jnp.zeros((8,)))
  hlo = jax.jit(vjp).lower(g).compile().as_text()
  f32_shapes = set(re.findall(r"f32\[[0-9,]+\]", hlo))
  assert not f32_shapes & {"f32[3,16,8]", "f32[48,8]"}, sorted(f32_shapes)
  grads = vjp(g)
  np.testing.assert_array_equal(np.asarray(grads[2]), np.full((8,), 48.0, np.float32))


@pytest.mark.slow  # 6-10 s: the fast subset stays under 5 min
def test_weight_gradients_contract_f32_rows_in_place_and_copy_16_bit_ones(native_bf16_dots):
  # `rows_contracted`: an f32 weight gradient contracts x's rows as they are (XLA:CPU's transposing
  # copies of x made the fp32 ViT-B-32 step 1.25x slower); a bf16 one reads a row-major copy of x^T,
  # which keeps the dot bf16. Pins the compiled forms on jax 0.10.2's XLA:CPU; after an upgrade,
  # re-check the train step's speed (`benchmarks/bench_train_step.py`) before relaxing this.
  keys = jax.random.split(jax.random.key(6), 2)
  for dtype, short, copies_x in ((jnp.float32, "f32", False), (jnp.bfloat16, "bf16", True)):
    x = jax.random.normal(keys[0], (3, 16, 24)).astype(dtype)
    g = jax.random.normal(keys[1], (3, 16, 8)).astype(dtype)
    _, vjp = jax.vjp(lambda x, w: layers.dense_f32_accum(x, w, None), x, jnp.ones((24, 8)))
    compiled = jax.jit(vjp).lower(g).compile()   # the executable whose form and values are checked
    hlo = compiled.as_text()
    shapes = sorted(set(re.findall(r"\w+\[[0-9,]+\]", hlo)))
    assert (f"{short}[24,48]" in hlo) == copies_x, (short, shapes)
    expected = np.asarray(x, np.float32).reshape(48, 24).T @ np.asarray(g, np.float32).reshape(48, 8)
    np.testing.assert_allclose(np.asarray(compiled(g)[1]), expected, rtol=1e-5, atol=1e-5)
  # The f32 attention backward contracts probs and score gradients [B*H, T, S] along T in place too.
  q, k, v, grad_out = _qkv(2, 5, 9, 3, 8, jnp.float32)
  _, vjp = jax.vjp(layers.attention_f32_accum, q, k, v)
  shapes = set(re.findall(r"f32\[[0-9,]+\]", jax.jit(vjp).lower(grad_out).compile().as_text()))
  assert not shapes & {"f32[6,9,5]", "f32[2,3,9,5]"}, sorted(shapes)


def test_bf16_weight_gradient_copies_the_narrower_operand_over_many_rows(native_bf16_dots):
  # A 3x3 conv's patches [N, 9 C] against its output gradient [N, C']: over many rows the copy of
  # g^T (plus a transpose of the small f32 result) is cheaper than the copy of x^T (`rows_contracted`).
  keys = jax.random.split(jax.random.key(8), 2)
  x = jax.random.normal(keys[0], (4096, 72)).astype(jnp.bfloat16)
  g = jax.random.normal(keys[1], (4096, 8)).astype(jnp.bfloat16)
  assert layers._transposing_g_moves_less(4096, 72, 8, 2) and not layers._transposing_g_moves_less(48, 24, 8, 2)
  compiled = jax.jit(layers.rows_contracted).lower(x, g).compile()
  hlo = compiled.as_text()
  assert "bf16[8,4096]" in hlo and "bf16[72,4096]" not in hlo
  expected = np.asarray(x, np.float32).T @ np.asarray(g, np.float32)
  np.testing.assert_allclose(np.asarray(compiled(x, g)), expected, rtol=1e-5, atol=1e-4)


def _fusion_operand_counts(hlo: str) -> list[int]:
  return [line.count("%") for line in hlo.splitlines() if re.match(r"\s*(ROOT )?%\S+ = \S+ fusion\(", line)]


@pytest.mark.slow   # 9-16 s on an AVX2-only CPU: the fast subset stays under 5 minutes there
def test_f32_residual_gradient_is_not_recomputed_in_every_fusion(monkeypatch):
  # With autodiff's LayerNorm backward, XLA:CPU fused the fp32 residual stream's gradient chain into every
  # fusion of the backward (this 6-block tower, jax 0.10.2: one fusion with 124 operands, 21 with more
  # than 12; the ViT-B-32 fp32 step was ~10% slower). With `layer_norm`'s own VJP no fusion reads more
  # than a block's worth. The gradients are the same (to f32 rounding: 1e-5 of the largest entry).
  model = Transformer(layers=6, num_heads=2)
  x = jax.random.normal(jax.random.key(0), (2, 7, 32))
  params = model.init(jax.random.key(1), x)

  def loss(p, x):
    return jnp.sum(jnp.tanh(model.apply(p, x)) ** 2)

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
  counts = _fusion_operand_counts(compiled.as_text())
  assert max(counts) <= 20 and sum(c > 12 for c in counts) <= 8, sorted(counts)[-8:]
  grads = compiled(params, x)
  monkeypatch.setattr(layers, "layer_norm", _layer_norm_by_autodiff)
  ref_compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
  assert max(_fusion_operand_counts(ref_compiled.as_text())) > 60   # the form this test guards against
  ref_grads = jax.tree.leaves(ref_compiled(params, x))
  largest = max(float(np.max(np.abs(b))) for b in ref_grads)   # (the key biases' gradients are ~0: noise)
  for a, b in zip(jax.tree.leaves(grads), ref_grads):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * largest)


def test_fp32_dense_equals_flax_dense_values_and_gradients():
  # fp32 takes the same custom VJP (only the dots' layout differs from autodiff's): the layer's
  # output and its gradients w.r.t. input, kernel and bias equal flax's nn.Dense on the same
  # parameters, up to f32 summation order (atol 1e-5 of values of size ~1).
  keys = jax.random.split(jax.random.key(6), 3)
  x = jax.random.normal(keys[0], (3, 5, 24))
  g = jax.random.normal(keys[1], (3, 5, 16))
  ours, theirs = layers.Dense(16), nn.Dense(16)
  params = ours.init(keys[2], x)
  plain = nn.meta.unbox(params)

  def vjp(module, variables):
    out, back = jax.vjp(lambda v, a: module.apply(v, a), variables, x)
    return out, back(g)

  (out, grads), (ref_out, ref_grads) = jax.jit(lambda p: vjp(ours, p))(params), vjp(theirs, plain)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=0, atol=1e-5)
  for a, b in zip(jax.tree.leaves(nn.meta.unbox(grads)), jax.tree.leaves(ref_grads)):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * float(np.max(np.abs(b))))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_with_an_adapter_beside_its_kernel_is_x_w_plus_b_plus_x_down_up(dtype):
  # What `dreambooth_jax.training.lora.attach` relies on: lora_down / lora_up next to the kernel make
  # the layer x W + b + (x down) up, with the adapter's gradients those of that formula in float32
  # (f32: to summation order; bf16: within the bf16 roundings of x, W and the two thin products).
  keys = jax.random.split(jax.random.key(7), 6)
  x = jax.random.normal(keys[0], (2, 5, 24))
  g = jax.random.normal(keys[1], (2, 5, 16))
  params = nn.meta.unbox(layers.Dense(16).init(keys[2], x))["params"]
  params["bias"] = jax.random.normal(keys[3], (16,))
  adapter = {"lora_down": jax.random.normal(keys[4], (24, 3)) / 5, "lora_up": jax.random.normal(keys[5], (3, 16)) / 5}

  def ours(p, a):
    return layers.Dense(16, dtype=dtype).apply({"params": {**p, **a}}, x).astype(jnp.float32)

  def formula(p, a):
    return x @ p["kernel"] + p["bias"] + (x @ a["lora_down"]) @ a["lora_up"]

  out, back = jax.vjp(lambda a: ours(params, a), adapter)
  ref_out, ref_back = jax.vjp(lambda a: formula(params, a), adapter)
  atol = 1e-5 if dtype == jnp.float32 else 4e-2  # bf16: ~2^-8 of values of size ~4
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=0, atol=atol * float(np.max(np.abs(ref_out))))
  assert float(np.max(np.abs(np.asarray(out - formula(params, jax.tree.map(jnp.zeros_like, adapter)))))) > 10 * atol
  for name in adapter:
    grad, ref_grad = back(g)[0][name], ref_back(g)[0][name]
    assert grad.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=0,
                               atol=atol * float(np.max(np.abs(ref_grad))))


def _layer_norm_by_autodiff(x, scale, bias, epsilon, dtype):
  """`layers.layer_norm`'s forward, differentiated by jax (the reference for its custom VJP)."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(jnp.square(x32 - mean).mean(-1, keepdims=True) + epsilon)
  return (y * scale + bias).astype(dtype)


@pytest.mark.slow  # 6-10 s: the fast subset stays under 5 min
def test_layer_norm_equals_torch_and_autodiff_and_keeps_less_for_the_backward(monkeypatch):
  torch = pytest.importorskip("torch")
  keys = jax.random.split(jax.random.key(8), 4)
  x = jax.random.normal(keys[0], (3, 5, 24)) * 3 + 1.5          # off-centre rows, as a residual stream
  scale, bias = 1 + jax.random.normal(keys[1], (24,)), jax.random.normal(keys[2], (24,))
  g = jax.random.normal(keys[3], (3, 5, 24))
  # f32 against torch.nn.LayerNorm: values and the three gradients within 1e-5 of the largest entry.
  out, back = jax.vjp(lambda *a: layers.layer_norm(*a, 1e-5, jnp.dtype(jnp.float32)), x, scale, bias)
  ref = torch.nn.LayerNorm(24, eps=1e-5)
  with torch.no_grad():
    ref.weight.copy_(torch.from_numpy(np.array(scale)))
    ref.bias.copy_(torch.from_numpy(np.array(bias)))
  tx = torch.from_numpy(np.array(x)).requires_grad_()
  ty = ref(tx)
  ty.backward(torch.from_numpy(np.array(g)))
  expected = [ty.detach().numpy(), tx.grad.numpy(), ref.weight.grad.numpy(), ref.bias.grad.numpy()]
  for a, b in zip([out, *back(g)], expected):
    np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=1e-5 * float(np.max(np.abs(b))))
  # bf16 in and out (f32 parameters): the same values as autodiff's form, gradients within f32 rounding.
  x16, g16 = x.astype(jnp.bfloat16), g.astype(jnp.bfloat16)
  ours = jax.vjp(lambda *a: layers.layer_norm(*a, 1e-5, jnp.dtype(jnp.bfloat16)), x16, scale, bias)
  theirs = jax.vjp(lambda *a: _layer_norm_by_autodiff(*a, 1e-5, jnp.bfloat16), x16, scale, bias)
  assert ours[0].dtype == jnp.bfloat16 and _max_diff(ours[0], theirs[0]) == 0
  for a, b in zip(ours[1](g16), theirs[1](g16)):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=0,
                               atol=1e-6 * float(np.max(np.abs(np.asarray(b, np.float32)))) + 2 ** -8 * (a.dtype == jnp.bfloat16))
  # What the custom VJP is for: a 4-block fp32 tower's train-step temporaries shrink (autodiff stored
  # x - mean and the normalized x in f32 for every LayerNorm, 16 [2, 64, 64] f32 arrays here; at the
  # peak of liveness 7 fewer are held, jax 0.10.2).
  model = Transformer(layers=4, num_heads=2)
  xs = jax.random.normal(jax.random.key(0), (2, 64, 64))
  params = model.init(jax.random.key(1), xs)

  def temp_bytes():
    step = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, xs) ** 2)))
    return step.lower(params).compile().memory_analysis().temp_size_in_bytes

  ours_bytes = temp_bytes()
  monkeypatch.setattr(layers, "layer_norm", _layer_norm_by_autodiff)
  assert ours_bytes < temp_bytes() - 4 * 2 * 64 * 64 * 4, (ours_bytes, temp_bytes())


@pytest.mark.parametrize("dtype", [pytest.param(jnp.float32, marks=pytest.mark.slow), jnp.bfloat16])  # bf16 fast
def test_batch_norm_equals_flax_batch_norm_in_training_and_eval(dtype):
  # `layers.BatchNorm` against flax's nn.BatchNorm in f32 on the same (rounded) inputs and parameters:
  # training mode (batch statistics; values, the three gradients, the updated running averages) and eval
  # mode. f32: 1e-5 of the largest entry. bf16 output and input gradient: one rounding of the f32 value
  # (2^-8 of the largest; flax's own bf16 backward rounds each of dx's three terms, ~2x further off);
  # the f32 parameter gradients and statistics: 1e-5.
  keys = jax.random.split(jax.random.key(10), 4)
  x = (jax.random.normal(keys[0], (4, 5, 5, 6)) * 2 + 0.7).astype(dtype)
  g = jax.random.normal(keys[1], x.shape).astype(dtype)
  ours, theirs = (layers.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=dtype),
                  nn.BatchNorm(momentum=0.9, epsilon=1e-5, use_running_average=False))
  variables = theirs.init(keys[2], x.astype(jnp.float32))
  variables = {"params": jax.tree.map(lambda p: p + jax.random.normal(keys[3], p.shape), variables["params"]),
               "batch_stats": variables["batch_stats"]}
  assert jax.tree.structure(ours.init(keys[2], x)) == jax.tree.structure(variables)

  def train(module, x, g):
    def f(params, x):
      return module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"])
    (y, stats), vjp = jax.vjp(f, variables["params"], x)
    return y, stats, vjp((g, jax.tree.map(jnp.zeros_like, stats)))

  (y, stats, (dparams, dx)), (ref_y, ref_stats, (ref_dparams, ref_dx)) = (  # jitted: one compile each, not one per op
      jax.jit(functools.partial(train, ours))(x, g),
      jax.jit(functools.partial(train, theirs))(x.astype(jnp.float32), g.astype(jnp.float32)))
  tol = 1e-5 if dtype == jnp.float32 else 2 ** -8
  assert y.dtype == dx.dtype == dtype
  for a, b, bound in ((y, ref_y, tol), (dx, ref_dx, tol), *((a, b, 1e-5) for a, b in zip(
      jax.tree.leaves((stats, dparams)), jax.tree.leaves((ref_stats, ref_dparams))))):
    assert _max_diff(a, b) <= bound * float(jnp.max(jnp.abs(b))), (a.shape, bound)
  eval_vars = {"params": variables["params"], "batch_stats": ref_stats["batch_stats"]}
  y_eval = layers.BatchNorm(use_running_average=True, epsilon=1e-5, dtype=dtype).apply(eval_vars, x)
  ref_eval = nn.BatchNorm(use_running_average=True, epsilon=1e-5).apply(eval_vars, x.astype(jnp.float32))
  assert y_eval.dtype == dtype and _max_diff(y_eval, ref_eval) <= tol * float(jnp.max(jnp.abs(ref_eval)))


def test_exact_gelu_is_torchs_erf_form():
  torch = pytest.importorskip("torch")
  x = np.linspace(-8, 8, 4001, dtype=np.float32)
  expected = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(np.asarray(layers.exact_gelu(jnp.asarray(x))), expected, rtol=0, atol=2e-6)
  grad = jax.vmap(jax.grad(layers.exact_gelu))(jnp.asarray(x))
  tx = torch.from_numpy(x).requires_grad_()
  torch.nn.functional.gelu(tx).sum().backward()
  np.testing.assert_allclose(np.asarray(grad), tx.grad.numpy(), rtol=0, atol=1e-6)
  # bf16 in, bf16 out: the f32 value rounded once (so within one bf16 ulp of torch's, rounded).
  x16 = jnp.asarray(x).astype(jnp.bfloat16)
  out16 = layers.exact_gelu(x16)
  assert out16.dtype == jnp.bfloat16
  reference = torch.nn.functional.gelu(torch.from_numpy(np.asarray(x16, np.float32))).numpy()
  np.testing.assert_allclose(np.asarray(out16, np.float32),
                             np.asarray(jnp.asarray(reference).astype(jnp.bfloat16), np.float32), rtol=2 ** -7, atol=1e-6)


@pytest.mark.slow  # ~18 s at low load: kept out of the fast subset (< 5 min)
def test_bf16_tower_with_either_attention_matches_fp32_and_keeps_its_parameters():
  x = jax.random.normal(jax.random.key(2), (2, 9, 64))
  towers = {name: Transformer(2, 4, is_causal=True, attention_impl=impl, dtype=dtype)
            for name, impl, dtype in (("xla", "xla", jnp.bfloat16), ("f32_accum", "f32_accum", jnp.bfloat16),
                                      ("fp32", "xla", jnp.float32))}
  params = towers["xla"].init(jax.random.key(0), x)
  assert jax.tree.structure(params) == jax.tree.structure(towers["f32_accum"].init(jax.random.key(0), x))
  flat = {}
  for name, tower in towers.items():
    loss = lambda p: jnp.sum(tower.apply(p, x).astype(jnp.float32) ** 2)  # noqa: E731
    grads = jax.grad(loss)(params)
    flat[name] = (tower.apply(params, x).astype(jnp.float32),
                  jnp.concatenate([g.astype(jnp.float32).ravel() for g in jax.tree.leaves(grads)]))
  # Relative L2 error against fp32: the fast path stays as close as the stock bf16 path.
  rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))  # noqa: E731
  for i in range(2):
    fast, stock = rel(flat["f32_accum"][i], flat["fp32"][i]), rel(flat["xla"][i], flat["fp32"][i])
    assert fast <= max(1.5 * stock, 1e-2), (i, fast, stock)


@pytest.mark.slow  # ~9 s at low load: kept out of the fast subset (< 5 min)
def test_bf16_clip_trains_with_the_fast_paths():
  model = clip_jax.create_model("ViT-Tiny", dtype=jnp.bfloat16)
  variables = clip_jax.init_variables(model, jax.random.key(0), batch_size=2)
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  tokens = jnp.array([[49406, 5, 6, 49407] + [0] * 28, [49406, 7, 49407] + [0] * 29], jnp.int32)

  def loss(params):
    image_emb, text_emb, _, _ = model.apply({"params": params}, images, tokens)
    return jnp.sum((image_emb - text_emb) ** 2)
  grads = jax.jit(jax.grad(loss))(variables["params"])
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert jax.tree.structure(grads) == jax.tree.structure(variables["params"])


def test_auto_attention_choice_per_backend_dtype_and_head_size():
  choose = layers.choose_attention_impl
  assert choose(jnp.bfloat16, 64, "cpu") == "f32_accum"
  assert choose(jnp.float32, 64, "cpu") == "f32_accum"
  assert choose(jnp.bfloat16, 64, "gpu") == "cudnn"
  assert choose(jnp.float16, 128, "gpu") == "cudnn"
  assert choose(jnp.bfloat16, 160, "gpu") == "xla"   # SD 1.x's widest heads: beyond cuDNN's kernel
  assert choose(jnp.bfloat16, 40, "gpu") == "cudnn"
  assert choose(jnp.bfloat16, 36, "gpu") == "xla"    # not a multiple of 8
  assert choose(jnp.float32, 64, "gpu") == "xla"
  assert choose(jnp.bfloat16, 64, "tpu") == "xla"


@pytest.mark.parametrize("t_len,s_len,causal", [(7, 7, True), pytest.param(4, 5, False, marks=pytest.mark.slow),
                                                pytest.param(5, 4, False, marks=pytest.mark.slow)])  # causal fast
def test_attention_even_lengths_equals_unpadded(t_len, s_len, causal):
  # The padding form cuDNN gets for odd lengths, run through XLA here: values and gradients equal
  # the plain attention's (fp32, only summation order differs), so padded rows leak nowhere.
  keys = jax.random.split(jax.random.key(t_len * 10 + s_len), 4)
  q = jax.random.normal(keys[0], (2, t_len, 3, 8))
  k, v = (jax.random.normal(key, (2, s_len, 3, 8)) for key in keys[1:3])
  g = jax.random.normal(keys[3], (2, t_len, 3, 8))

  @jax.jit
  def both(q, k, v, g):
    def run(fn):
      out, vjp = jax.vjp(fn, q, k, v)
      return (out,) + vjp(g)
    return (run(lambda q, k, v: layers.attention_even_lengths(q, k, v, causal, implementation=None)),
            run(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal)))
  got, want = both(q, k, v, g)
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


CONV_CASES = [  # (x shape, kernel (kh, kw, in, out), strides, padding)
    # 3x3 stride 1, 1x1 and the symmetric stride 2 (6-8 s each) are slow: the UNet and VAE parity tests of the
    # fast subset run those forms; the VAE's asymmetric stride 2 stays.
    pytest.param(((2, 7, 6, 5), (3, 3, 5, 4), (1, 1), ((1, 1), (1, 1))), marks=pytest.mark.slow),
    pytest.param(((1, 8, 8, 3), (3, 3, 3, 6), (2, 2), ((1, 1), (1, 1))), marks=pytest.mark.slow),  # UNet downsampler
    ((1, 9, 8, 4), (3, 3, 4, 4), (2, 2), ((0, 1), (0, 1))),   # the VAE's (pads bottom/right only)
    pytest.param(((2, 5, 5, 6), (1, 1, 6, 3), (1, 1), ((0, 0), (0, 0))), marks=pytest.mark.slow),
]


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 6))  # one compile per form, not one per op (~2x faster)
def _conv_value_and_grads(impl, x, kernel, strides, padding, grad_out, dtype):
  out, vjp = jax.vjp(lambda a, b: layers.conv2d(a, b, strides=strides, padding=padding, dtype=dtype, impl=impl),
                     x, kernel)
  return [out, *vjp(grad_out)]


@pytest.mark.parametrize("case", CONV_CASES)
def test_im2col_conv_matches_xla_conv(case):
  x_shape, k_shape, strides, padding = case
  keys = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(keys[0], x_shape)
  kernel = jax.random.normal(keys[1], k_shape) * 0.3
  out_shape = jax.eval_shape(lambda: layers.conv2d(x, kernel, strides=strides, padding=padding, impl="xla")).shape
  grad_out = jax.random.normal(keys[2], out_shape)
  reference = _conv_value_and_grads("xla", x, kernel, strides, padding, grad_out, jnp.float32)
  fast = _conv_value_and_grads("im2col", x, kernel, strides, padding, grad_out, jnp.float32)
  for name, a, b in zip(("out", "dx", "dkernel"), fast, reference):
    assert a.shape == b.shape and a.dtype == b.dtype == jnp.float32, name
    assert _max_diff(a, b) <= 1e-5 * float(jnp.max(jnp.abs(b))), name
  # bf16: both forms against the fp32 reference on the same bf16-rounded inputs.
  rounded = [t.astype(jnp.bfloat16).astype(jnp.float32) for t in (x, kernel, grad_out)]
  reference = _conv_value_and_grads("xla", rounded[0], rounded[1], strides, padding, rounded[2], jnp.float32)
  for impl in ("im2col", "xla"):
    low = _conv_value_and_grads(impl, *rounded[:2], strides, padding, rounded[2], jnp.bfloat16)
    for name, a, b in zip(("out", "dx", "dkernel"), low, reference):
      assert _max_diff(a, b) <= 2e-2 * float(jnp.max(jnp.abs(b))), (impl, name)


@pytest.mark.slow   # 9-16 s on an AVX2-only CPU: the fast subset stays under 5 minutes there
def test_bf16_conv_input_gradient_sums_its_taps_in_f32_and_rounds_once():
  # The input gradient of a 16-bit 3x3 conv: the patch gradient stays f32 from the dot, its overlapping
  # taps are summed in f32 and the sum is rounded once, so dx is within one bf16 rounding of the f32 result
  # on the same inputs (<= 2^-9 relative per entry; bound 2^-8 of the largest). Folding bf16 taps instead
  # (XLA:CPU then adds in bf16, one rounding per add) was ~9e-3 of the largest off, and 4-10x slower.
  keys = jax.random.split(jax.random.key(9), 3)
  for strides in ((1, 1), (2, 2)):
    x = jax.random.normal(keys[0], (2, 12, 12, 32)).astype(jnp.bfloat16)
    kernel = jax.random.normal(keys[1], (3, 3, 32, 16)) * 0.1
    grad_out = jax.random.normal(keys[2], (2, 12 // strides[0], 12 // strides[1], 16)).astype(jnp.bfloat16)
    _, vjp = jax.vjp(lambda a: layers.conv_im2col(a, kernel.astype(jnp.bfloat16), strides, ((1, 1), (1, 1))), x)
    dx, = vjp(grad_out.astype(jnp.float32))
    _, ref_vjp = jax.vjp(lambda a: layers.conv2d(a, kernel.astype(jnp.bfloat16).astype(jnp.float32), strides=strides,
                                                 padding=((1, 1), (1, 1)), impl="xla"), x.astype(jnp.float32))
    ref, = ref_vjp(grad_out.astype(jnp.float32))
    assert dx.dtype == jnp.bfloat16
    assert _max_diff(dx, ref) <= 2 ** -8 * float(jnp.max(jnp.abs(ref))), strides


@pytest.mark.slow  # 6-10 s: the fast subset stays under 5 min
def test_bf16_conv_patches_are_the_same_bits_moved_without_an_f32_round_trip():
  # XLA:CPU builds a bf16 concatenate in f32 (every tap converted up, the patches back down); conv_patches
  # moves 16-bit taps as uint16 instead. Same bits as the patches of the f32 values rounded afterwards,
  # and no f32 concatenate left in the compiled conv's forward and backward.
  x = jax.random.normal(jax.random.key(4), (1, 9, 8, 6)).astype(jnp.bfloat16).at[0, 0, 0, 0].set(-0.0)
  for kernel_size, strides, padding in (((3, 3), (1, 1), ((1, 1), (1, 1))), ((3, 3), (2, 2), ((0, 1), (0, 1)))):
    moved = layers.conv_patches(x, kernel_size, strides, padding)
    widened = layers.conv_patches(x.astype(jnp.float32), kernel_size, strides, padding).astype(jnp.bfloat16)
    assert moved.dtype == jnp.bfloat16
    assert np.array_equal(np.asarray(moved).view(np.uint16), np.asarray(widened).view(np.uint16))
  kernel = jax.random.normal(jax.random.key(5), (3, 3, 6, 4))
  step = jax.jit(jax.grad(lambda x, k: jnp.sum(layers.conv_im2col(x.astype(jnp.bfloat16), k, (1, 1),
                                                                  ((1, 1), (1, 1))) ** 2), argnums=(0, 1)))
  hlo = step.lower(x.astype(jnp.float32), kernel).compile().as_text()
  concatenates = [line for line in hlo.splitlines() if " concatenate(" in line]
  assert concatenates and not any("= f32[" in line for line in concatenates), concatenates


@pytest.mark.parametrize("use_bias", [True, False])
def test_conv_im2col_bias_is_conv_plus_bias_rounded_once(use_bias):
  # What the bf16 Conv layer runs on CPU: equal to conv2d + bias add + cast, forward and backward.
  x_shape, k_shape, strides, padding = CONV_CASES[2]
  keys = jax.random.split(jax.random.key(5), 4)
  x = jax.random.normal(keys[0], x_shape).astype(jnp.bfloat16)
  kernel = jax.random.normal(keys[1], k_shape) * 0.3
  bias = jax.random.normal(keys[2], k_shape[-1:]) if use_bias else None

  def unfused(x, kernel, bias):
    y = layers.conv2d(x, kernel, strides=strides, padding=padding, dtype=jnp.bfloat16, impl="im2col")
    return (y if bias is None else y + bias).astype(jnp.bfloat16)

  fused_out, fused_vjp = jax.vjp(lambda a, b, c: layers.conv_im2col_bias(a, b, c, strides, padding), x, kernel, bias)
  plain_out, plain_vjp = jax.vjp(unfused, x, kernel, bias)
  np.testing.assert_array_equal(np.asarray(fused_out, np.float32), np.asarray(plain_out, np.float32))
  g = jax.random.normal(keys[3], fused_out.shape).astype(jnp.bfloat16)
  for fused, plain in zip(jax.tree.leaves(fused_vjp(g)), jax.tree.leaves(plain_vjp(g))):
    assert fused.dtype == plain.dtype
    np.testing.assert_allclose(np.asarray(fused, np.float32), np.asarray(plain, np.float32), rtol=1e-6, atol=1e-6)
  # The layer takes that path for bf16 on CPU and gives the same values.
  layer = layers.Conv(k_shape[-1], k_shape[:2], strides=strides, padding=padding, use_bias=use_bias,
                      dtype=jnp.bfloat16, impl="im2col")
  params = {"kernel": kernel, **({"bias": bias} if use_bias else {})}
  np.testing.assert_array_equal(np.asarray(layer.apply({"params": params}, x), np.float32),
                                np.asarray(fused_out, np.float32))


def test_conv_layer_has_flax_conv_parameters():
  import flax.linen as nn
  x = jnp.ones((1, 4, 4, 3))
  ours = nn.unbox(layers.Conv(5, (3, 3)).init(jax.random.key(0), x)["params"])
  theirs = nn.Conv(5, (3, 3)).init(jax.random.key(0), x)["params"]
  assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, theirs)
  with pytest.raises(ValueError, match="Unknown convolution impl"):
    layers.conv2d(x, ours["kernel"], impl="winograd")


def test_bf16_xla_conv_on_gpu_returns_bf16_not_an_f32_conv(monkeypatch):
  """On GPU a bf16 conv asked for an f32 result ran as an f32/TF32 conv (39 of the SD UNet's ~100 ms
  step on an H200): conv2d must ask for bf16 there, keep f32 elsewhere, and stay within one bf16
  rounding of the f32 conv. The backend is patched: the lowering is what is checked, on the CPU."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 16, 32)) * 0.1
  conv = lambda a, b: layers.conv2d(a, b, padding=((1, 1), (1, 1)), dtype=jnp.bfloat16, impl="xla")  # noqa: E731

  def conv_result_dtypes():
    jaxpr = jax.make_jaxpr(jax.value_and_grad(lambda a, b: conv(a, b).sum(), argnums=(0, 1)))(x, kernel)
    return {str(e.outvars[0].aval.dtype) for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"}

  assert conv_result_dtypes() == {"float32"}  # CPU: f32 accumulation kept in the output
  assert layers.conv_output_dtype(jnp.float32, "gpu") == jnp.float32
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert conv_result_dtypes() == {"bfloat16"}  # forward and both gradients
  out = conv(x, kernel)
  reference = layers.conv2d(x, kernel, padding=((1, 1), (1, 1)), dtype=jnp.float32, impl="xla")
  assert out.dtype == jnp.float32
  assert jnp.array_equal(out, out.astype(jnp.bfloat16).astype(jnp.float32))  # rounded once to bf16
  # bf16 operands (2^-8 relative each) and the bf16 output rounding.
  assert float(jnp.max(jnp.abs(out - reference))) <= 2e-2 * float(jnp.max(jnp.abs(reference)))


# ----------------------------------------------------------------------------- bf16 dots on CPUs without them
X86_AVX2_CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma f16c\n\nprocessor\t: 1\n"
X86_AMX_CPUINFO = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
ARM_CPUINFO = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 bf16 i8mm\n"


def test_cpu_flags_and_bf16_dot_detection_read_x86_and_arm_cpuinfo(monkeypatch):
  assert host.cpu_flags(X86_AVX2_CPUINFO) == {"fpu", "sse2", "avx", "avx2", "fma", "f16c"}
  assert "bf16" in host.cpu_flags(ARM_CPUINFO) and host.cpu_flags("processor\t: 0\n") == frozenset()
  assert host.cpu_model(X86_AVX2_CPUINFO) == "AMD EPYC 7B13" and host.cpu_model(ARM_CPUINFO) == platform.machine()
  for text, native in ((X86_AVX2_CPUINFO, False), (X86_AMX_CPUINFO, True), (ARM_CPUINFO, True)):
    assert bool(host.cpu_flags(text) & host.BF16_DOT_FLAGS) == native
  # What a benchmark report says and what the layers decide come from the same reader.
  for text, has, described in ((X86_AVX2_CPUINFO, False, "AMD EPYC 7B13 (no bf16 dot instructions)"),
                               (X86_AMX_CPUINFO, True, f"{platform.machine()} (amx_bf16, avx512_bf16)"),
                               (None, True, platform.processor() or platform.machine())):
    monkeypatch.setattr(host, "read_cpuinfo", lambda text=text: text)
    assert host.cpu_has_bf16_dots() == has and host.describe_cpu() == described
    monkeypatch.setenv(layers.BF16_DOTS_ENV, "auto")
    assert layers.upcast_bf16_dots(jnp.bfloat16) == (not has)
  monkeypatch.undo()
  # The override, the dtype and the backend decide before the CPU's flags do.
  monkeypatch.setenv(layers.BF16_DOTS_ENV, "f32")
  assert layers.upcast_bf16_dots(jnp.bfloat16) and not layers.upcast_bf16_dots(jnp.float16)
  assert not layers.upcast_bf16_dots(jnp.float32)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert not layers.upcast_bf16_dots(jnp.bfloat16)
  monkeypatch.undo()
  monkeypatch.setenv(layers.BF16_DOTS_ENV, "native")
  assert not layers.upcast_bf16_dots(jnp.bfloat16)
  monkeypatch.setenv(layers.BF16_DOTS_ENV, "auto")
  assert layers.upcast_bf16_dots(jnp.bfloat16) == (not host.cpu_has_bf16_dots())
  monkeypatch.setenv(layers.BF16_DOTS_ENV, "amx")
  with pytest.raises(ValueError, match="CLIP_JAX_CPU_BF16_DOTS must be"):
    layers.upcast_bf16_dots(jnp.bfloat16)


def _dot_operand_dtypes(hlo: str) -> set[str]:
  """The operand element types of every dot_general in a StableHLO text."""
  return {t for line in hlo.splitlines() if "stablehlo.dot_general" in line
          for t in re.findall(r"tensor<[0-9x]*(\w+)>", line.split(":")[-1].split("->")[0])}


@pytest.mark.slow   # 9-16 s on an AVX2-only CPU: the fast subset stays under 5 minutes there
def test_bf16_layers_converted_to_f32_dots_give_the_native_values(monkeypatch):
  # CLIP_JAX_CPU_BF16_DOTS=f32 (what a CPU without bf16 dot instructions gets): every dot of a bf16 dense
  # layer, conv and attention, forward and backward, has f32 operands, and the values are the bf16 dots'
  # (the same exact products, f32 sums in another order: 1e-5 of the largest entry for f32 results,
  # one bf16 ulp for bf16 ones).
  keys = jax.random.split(jax.random.key(11), 8)
  x = jax.random.normal(keys[0], (2, 6, 6, 8)).astype(jnp.bfloat16)
  w, b = jax.random.normal(keys[1], (8, 16)) * 0.3, jax.random.normal(keys[2], (16,))
  kernel, bias = jax.random.normal(keys[3], (3, 3, 8, 16)) * 0.2, jax.random.normal(keys[4], (16,))
  q, k, v, _ = _qkv(2, 9, 9, 2, 8, jnp.bfloat16, seed=3)

  def loss(x, w, b, kernel, bias, q, k, v):
    dense = layers.dense_f32_accum(x, w, b).astype(jnp.float32)
    conv = layers.conv_im2col_bias(x, kernel, bias, (1, 1), ((1, 1), (1, 1))).astype(jnp.float32)
    attn = layers.attention_f32_accum(q, k, v, True).astype(jnp.float32)
    return jnp.sum(dense ** 2) + jnp.sum(jnp.sin(conv)) + jnp.sum(attn * jnp.cos(attn))

  args = (x, w, b, kernel, bias, q, k, v)
  results = {}
  for choice in ("native", "f32"):
    monkeypatch.setenv(layers.BF16_DOTS_ENV, choice)
    fn = jax.value_and_grad(lambda *a: loss(*a), argnums=tuple(range(8)))  # a new function: traced again
    dtypes = _dot_operand_dtypes(jax.jit(fn).lower(*args).as_text())
    assert dtypes == ({"f32"} if choice == "f32" else {"bf16"}), (choice, dtypes)
    results[choice] = jax.jit(fn)(*args)
  (native_loss, native_grads), (f32_loss, f32_grads) = results["native"], results["f32"]
  np.testing.assert_allclose(float(f32_loss), float(native_loss), rtol=1e-5)
  for name, a, c in zip("x w b kernel bias q k v".split(), native_grads, f32_grads):
    a, c = np.asarray(a, np.float32), np.asarray(c, np.float32)
    ulp = 2.0 ** -7 if name in ("x", "q", "k", "v") else 1e-5   # bf16 gradients: one ulp of the largest
    np.testing.assert_allclose(c, a, atol=ulp * np.abs(a).max(), err_msg=name)
