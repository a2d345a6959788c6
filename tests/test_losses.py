"""The sharded contrastive losses equal the naive full-matrix losses, and the rings stay small.

Runs on the 8 simulated CPU devices set up by conftest.py. Tolerances: 1e-5 relative in fp32
(gradients: relative to their largest entry, as single entries can be near zero).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from clip_jax import losses

AXES = ("data", "fsdp", "tensor")
# (mesh shape, batch axes): the batch split over 8, 8 (two axes) and 4 devices (with 2 replicas
# over 'tensor'), and split over 'data' only with 'fsdp' holding replicas.
MESHES = {
    "8x1x1": ((8, 1, 1), ("data", "fsdp")),
    "4x2x1": ((4, 2, 1), ("data", "fsdp")),
    "2x2x2": ((2, 2, 2), ("data", "fsdp")),
    "4x2x1-data": ((4, 2, 1), ("data",)),
}
RTOL = 1e-5


def _mesh(shape):
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def _embeddings(batch, dim, seed=0):
  image_key, text_key = jax.random.split(jax.random.key(seed))
  normalise = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  # Text embeddings near their images, so that the positives stand out as after some training.
  image_emb = normalise(jax.random.normal(image_key, (batch, dim)))
  text_emb = normalise(image_emb + 0.8 * jax.random.normal(text_key, (batch, dim)))
  return image_emb, text_emb


def _naive(kind):
  if kind == "sigmoid":
    return losses.naive_sigmoid_loss
  return lambda image_emb, text_emb, scale, bias: losses.naive_softmax_loss(image_emb, text_emb,
                                                                            scale)


def _scale_and_bias(kind):
  if kind == "sigmoid":
    params = losses.init_sigmoid_params()
    return losses.clamp_logit_scale(params["log_scale"]) * 1.3, params["bias"] + 2.5
  return losses.clamp_logit_scale(jnp.float32(losses.CLIP_INIT_LOG_SCALE)), jnp.float32(0.0)


def _assert_grad_close(actual, expected, name):
  actual, expected = np.asarray(actual), np.asarray(expected)
  atol = RTOL * max(np.max(np.abs(expected)), 1e-30)
  np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=atol, err_msg=name)


# Every batch size on the first mesh (b from 1 to 8 rows per device), two on the others: each case
# is a compilation, and these dominate the file's run time. The first mesh's middle sizes run in the
# whole suite only (the fast subset keeps 1 and 8 rows per device there).
CASES = [pytest.param(mesh_name, batch, marks=[pytest.mark.slow] if mesh_name == "8x1x1" and batch in (16, 32) else [])
         for mesh_name in MESHES for batch in ((8, 16, 32, 64) if mesh_name == "8x1x1" else (16, 64))]


@pytest.mark.parametrize("mesh_name, batch", CASES)
@pytest.mark.parametrize("kind", losses.LOSS_KINDS)
def test_sharded_loss_equals_naive_in_value_and_gradients(mesh_name, kind, batch):
  shape, batch_axes = MESHES[mesh_name]
  mesh = _mesh(shape)
  image_emb, text_emb = _embeddings(batch, 32, seed=batch)
  sharding = NamedSharding(mesh, P(batch_axes))
  image_emb, text_emb = jax.device_put(image_emb, sharding), jax.device_put(text_emb, sharding)
  scale, bias = _scale_and_bias(kind)

  sharded = jax.jit(jax.value_and_grad(
      lambda *args: losses.contrastive_loss(*args, kind=kind, mesh=mesh, batch_axes=batch_axes),
      argnums=(0, 1, 2, 3)))
  value, grads = sharded(image_emb, text_emb, scale, bias)
  expected_value, expected_grads = jax.jit(jax.value_and_grad(_naive(kind), argnums=(0, 1, 2, 3)))(
      np.asarray(image_emb), np.asarray(text_emb), scale, bias)

  assert value.shape == () and value.dtype == jnp.float32
  np.testing.assert_allclose(value, expected_value, rtol=RTOL)
  for name, grad, expected in zip(("image_emb", "text_emb", "scale", "bias"), grads,
                                  expected_grads):
    _assert_grad_close(grad, expected, name)
  # Gradients come back to the devices that own the rows.
  assert grads[0].sharding.is_equivalent_to(sharding, 2)


def test_softmax_ignores_bias_and_bf16_embeddings_give_fp32_loss():
  shape, batch_axes = MESHES["8x1x1"]
  mesh = _mesh(shape)
  image_emb, text_emb = _embeddings(32, 16)
  expected = losses.naive_softmax_loss(image_emb, text_emb, 20.0)
  for kind in ("softmax", "softmax_ring"):
    loss = lambda bias: losses.contrastive_loss(image_emb, text_emb, 20.0, bias, kind=kind,
                                                mesh=mesh, batch_axes=batch_axes)
    value, bias_grad = jax.jit(jax.value_and_grad(loss))(jnp.float32(3.0))
    np.testing.assert_allclose(value, expected, rtol=RTOL)
    assert bias_grad == 0.0
  for kind in losses.LOSS_KINDS:
    loss = jax.jit(lambda *args, kind=kind: losses.contrastive_loss(
        *args, kind=kind, mesh=mesh, batch_axes=batch_axes))
    value = loss(image_emb.astype(jnp.bfloat16), text_emb.astype(jnp.bfloat16), 10.0, -10.0)
    assert value.dtype == jnp.float32
    reference = _naive(kind)(image_emb, text_emb, 10.0, -10.0)
    np.testing.assert_allclose(value, reference, rtol=2e-2)  # bf16 inputs: rounding only.


def test_clamp_logit_scale_and_siglip_init():
  log_scales = jnp.array([losses.CLIP_INIT_LOG_SCALE, math.log(100.0) + 0.5])
  np.testing.assert_allclose(losses.clamp_logit_scale(log_scales), [1 / 0.07, 100.0], rtol=1e-6)
  grads = jax.vmap(jax.grad(losses.clamp_logit_scale))(log_scales)
  np.testing.assert_allclose(grads, [1 / 0.07, 0.0], rtol=1e-6)  # d exp = exp; none above 100.
  params = losses.init_sigmoid_params()
  np.testing.assert_allclose(losses.clamp_logit_scale(params["log_scale"]), 10.0, rtol=1e-6)
  assert float(params["bias"]) == -10.0


def test_explicit_axis_mesh_and_reversed_batch_axes():
  # jax.make_mesh's default (Explicit) axes, and the batch axes named minor-to-major.
  mesh = jax.make_mesh((4, 2, 1), AXES)
  image_emb, text_emb = _embeddings(32, 16)
  for kind in ("sigmoid", "softmax_ring"):  # the rings' shifts and softmax_ring's all-to-all
    loss = jax.jit(lambda *args, kind=kind: losses.contrastive_loss(*args, kind=kind, mesh=mesh,
                                                                    batch_axes=("fsdp", "data")))
    np.testing.assert_allclose(loss(image_emb, text_emb, 10.0, -10.0),
                               _naive(kind)(image_emb, text_emb, 10.0, -10.0), rtol=RTOL)


@pytest.mark.parametrize("change, message", [
    (dict(kind="cosine"), "Unknown contrastive loss kind"),
    (dict(batch_axes=("batch",)), "must be a non-empty tuple of mesh axes"),
    (dict(kind="sigmoid", logit_bias=None), "needs a logit_bias"),
    (dict(batch=12), "does not split evenly"),
    (dict(text_dim=8), "same shape"),
    (dict(logit_bias=jnp.zeros(2)), "must be scalars"),
])
def test_bad_input_raises_one_clear_error(change, message):
  args = dict(kind="softmax", batch_axes=("data",), logit_bias=-10.0, batch=16, text_dim=16)
  args.update(change)
  image_emb, text_emb = _embeddings(args["batch"], 16)
  with pytest.raises(ValueError, match=message):
    losses.contrastive_loss(image_emb, text_emb[:, :args["text_dim"]], 10.0, args["logit_bias"],
                            kind=args["kind"], mesh=_mesh((8, 1, 1)),
                            batch_axes=args["batch_axes"])


def _temp_bytes(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_ring_kinds_keep_per_device_logits_at_b_by_b_forward_and_backward():
  # Compiled only, never run: B = 4096 over 8 devices, b = 512. One fp32 [b, B] array is 8 MiB,
  # [B, B] 64 MiB, [b, b] 1 MiB.
  batch, dim, num_devices = 4096, 64, 8
  local = batch // num_devices
  row_block_bytes, full_matrix_bytes = local * batch * 4, batch * batch * 4
  mesh = _mesh((num_devices, 1, 1))
  batch_axes = ("data", "fsdp")
  emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32,
                             sharding=NamedSharding(mesh, P(batch_axes)))
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))

  temp = {}
  for kind in losses.LOSS_KINDS:
    loss = lambda *args, kind=kind: losses.contrastive_loss(*args, kind=kind, mesh=mesh,
                                                            batch_axes=batch_axes)
    temp[kind, "forward"] = _temp_bytes(loss, emb, emb, scalar, scalar)
    temp[kind, "grad"] = _temp_bytes(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)),
                                     emb, emb, scalar, scalar)
  naive_emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32)
  naive_grad = jax.value_and_grad(losses.naive_softmax_loss, argnums=(0, 1, 2))
  temp["naive", "grad"] = _temp_bytes(naive_grad, naive_emb, naive_emb, jnp.float32(10.0))

  # The measurement sees the logits: all-gather softmax holds [b, B] rows, naive [B, B].
  assert temp["softmax", "forward"] >= row_block_bytes
  assert temp["naive", "grad"] >= full_matrix_bytes
  for kind in ("sigmoid", "softmax_ring"):
    # A ring that kept every step's block for autodiff would be back at [b, B] (8 MiB).
    assert temp[kind, "forward"] < row_block_bytes / 4, (kind, temp)
    assert temp[kind, "grad"] < row_block_bytes / 2, (kind, temp)
    assert temp[kind, "grad"] < temp["softmax", "grad"] / 8, (kind, temp)
    assert temp[kind, "grad"] < full_matrix_bytes / 16, (kind, temp)


def _sub_jaxprs(params):
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jex_core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jex_core.Jaxpr):
        yield item


def _scan_bodies(jaxpr):
  """Every scan body inside `jaxpr`, however deeply nested (shard_map, custom_vjp, pjit)."""
  for eqn in jaxpr.eqns:
    for sub in _sub_jaxprs(eqn.params):
      if eqn.primitive.name == "scan":
        yield sub
      yield from _scan_bodies(sub)


def _depends(jaxpr, source_primitive):
  """The variables of `jaxpr` computed (transitively) from an output of a `source_primitive` eqn."""
  tainted = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == source_primitive or any(
        not isinstance(v, jex_core.Literal) and v in tainted for v in eqn.invars):
      tainted.update(eqn.outvars)
  return tainted


@pytest.mark.parametrize("kind", ["sigmoid", "softmax_ring"])
def test_ring_bodies_overlap_the_next_shift_with_the_block(kind):
  # Double-buffered rings: inside every ring step (forward and backward) no matmul reads what that
  # step's ppermute brings, and no ppermute sends what that step's matmuls compute. The two are
  # independent, which is what lets an accelerator issue collective-permute-start before the
  # block's dots and wait on -done after them (CPU collectives are synchronous, so the HLO here has
  # no start/done pair to look at: the TPU test at the end of this file reads that order).
  mesh = _mesh((4, 1, 1))
  image_emb, text_emb = _embeddings(16, 8)
  scale, bias = _scale_and_bias(kind)
  loss = lambda *args: losses.contrastive_loss(*args, kind=kind, mesh=mesh, batch_axes=("data", "fsdp"))
  jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(image_emb, text_emb, scale, bias).jaxpr
  bodies = [b for b in _scan_bodies(jaxpr) if any(e.primitive.name == "ppermute" for e in b.eqns)]
  assert len(bodies) == 2, len(bodies)  # the forward ring and the backward ring
  for body in bodies:
    dots = [e for e in body.eqns if e.primitive.name == "dot_general"]
    permutes = [e for e in body.eqns if e.primitive.name == "ppermute"]
    assert dots and permutes
    from_permute, from_dot = _depends(body, "ppermute"), _depends(body, "dot_general")
    assert not any(v in from_permute for e in dots for v in e.invars if not isinstance(v, jex_core.Literal))
    assert not any(v in from_dot for e in permutes for v in e.invars if not isinstance(v, jex_core.Literal))


def test_ring_visits_visits_each_shifted_chunk_once_in_order():
  shift = lambda x: x + 1  # a stand-in for the ring's ppermute: chunk_k = chunk + k
  seen = losses.ring_visits(lambda chunk, state: state * 10 + chunk, jnp.int32(0), jnp.int32(0), 3, shift)
  assert int(seen) == 123
  assert int(losses.ring_visits(lambda chunk, state: state + chunk, jnp.int32(5), jnp.int32(7), 0, shift)) == 7


def test_gpu_overlap_check_reads_start_done_order_around_the_matmul():
  # benchmarks/ring_overlap_check.py judges a GPU's compiled HLO; here on hand-written bodies.
  import importlib.util
  import os
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                      "ring_overlap_check.py")
  spec = importlib.util.spec_from_file_location("ring_overlap_check", path)
  check = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(check)
  def module(*body):
    return "\n".join(["%ring_body (p: (s32[], f32[4,4])) -> (s32[], f32[4,4]) {", *body, "}",
                      "ENTRY %main () -> f32[] {", "  %w = (s32[]) while(%t), condition=%c, body=%ring_body", "}"])
  start = "  %cp = (f32[4,4], f32[4,4]) collective-permute-start(%x), source_target_pairs={{0,1},{1,0}}"
  done = "  %cpd = f32[4,4] collective-permute-done(%cp)"
  gemm = '  %g = (f32[4,4], s8[0]) custom-call(%a, %b), custom_call_target="__cublas$gemm"'
  assert check.overlap_report(module(start, gemm, done)) == [("ring_body", "start matmul done", True)]
  assert check.overlap_report(module(start, done, gemm)) == [("ring_body", "start done matmul", False)]
  sync = "  %cp = f32[4,4] collective-permute(%x), source_target_pairs={{0,1},{1,0}}"
  assert check.overlap_report(module(sync, gemm)) == [("ring_body", "permute matmul", None)]
  # As XLA:TPU prints them (benchmarks/ring_overlap_check.py --tpu-topology): the -done names its
  # -start, the ROOT tuple names the -done, and the matmul is a kOutput fusion around a convolution.
  fused = ["%fused_computation.1 (p0: bf16[8,128], p1: bf16[8,128]) -> f32[8,8] {",
           "  ROOT %convolution.1 = f32[8,8]{1,0:T(8,128)} convolution(%p0, %p1), dim_labels=bf_oi->bf", "}"]
  start = ("  %collective-permute-start = (bf16[8,128]{1,0:T(8,128)(2,1)}, bf16[8,128]{1,0:T(8,128)(2,1)}, "
           "u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%x), channel_id=1, source_target_pairs={{0,1},{1,0}}")
  done = "  %collective-permute-done = bf16[8,128]{1,0:T(8,128)(2,1)} collective-permute-done(%collective-permute-start)"
  fusion = "  %fusion.1 = f32[8,8]{1,0:T(8,128)} fusion(%a, %b), kind=kOutput, calls=%fused_computation.1"
  root = "  ROOT %tuple.1 = (s32[], bf16[8,128]) tuple(%i, %collective-permute-done)"
  tpu = lambda *body: "\n".join([*fused, module(*body)])  # noqa: E731
  assert check.overlap_report(tpu(start, fusion, done, root)) == [("ring_body", "start matmul done", True)]
  assert check.overlap_report(tpu(start, done, fusion, root)) == [("ring_body", "start done matmul", False)]
  assert check.exposed_permutes(tpu(start, done, fusion, root)) == {"ring_body": ["collective-permute-start bf16[8,128]"]}
  # The entry computation's permutes around the loops (the first prefetch, the last hops home) count too.
  entry = "\n".join([*fused, "ENTRY %main () -> f32[] {", start, done, fusion, "}"])
  assert check.overlap_report(entry) == [("main", "start done matmul", False)]
  # XLA:GPU's is_sync start runs start and done as one: exposed even with a matmul between them.
  start = ('  %cp = (f32[4,4], f32[4,4]) collective-permute-start(%x), source_target_pairs={{0,1},{1,0}}, '
           'backend_config={"collective_backend_config":{"is_sync":true,"is_pipelined":false}}')
  done = "  %cpd = f32[4,4] collective-permute-done(%cp)"
  assert check.overlap_report(module(start, gemm, done)) == [("ring_body", "start matmul done", False)]
  assert check.exposed_permutes(module(start, gemm, done)) == {"ring_body": ["cp f32[4,4]"]}
  # Without a matmul, other kernels cover a permute when they read and write at least the bytes it
  # sends: a reduction over a 64 KiB block covers a 64-byte permute; a scalar add does not.
  start = "  %cp = (f32[4,4], f32[4,4]) collective-permute-start(%x), source_target_pairs={{0,1},{1,0}}"
  block = "  %blk = f32[128,128]{1,0} get-tuple-element(%p), index=1"
  reduction = "  %red = f32[128]{0} fusion(%blk), kind=kInput, calls=%fused_reduce"
  scalar = "  %s = s32[] fusion(%i), kind=kLoop, calls=%fused_add"
  assert check.permute_covers(module(block, start, reduction, done)) == {"ring_body": [("cp f32[4,4]", "kernels")]}
  assert check.overlap_report(module(block, start, reduction, done)) == [("ring_body", "start done", True)]
  assert check.permute_covers(module(start, scalar, done)) == {"ring_body": [("cp f32[4,4]", "nothing")]}
  assert check.type_bytes("(bf16[512,512]{1,0}, f32[512]{0})") == 512 * 512 * 2 + 512 * 4
  assert check.type_bytes("f32[]") == 4


def _ring_overlap_check(*args, xla_flags=None):
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  if xla_flags:
    env["XLA_FLAGS"] = xla_flags
  return subprocess.run([sys.executable, os.path.join(root, "benchmarks", "ring_overlap_check.py"), *args],
                        capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow   # 9-16 s on an AVX2-only CPU: the fast subset stays under 5 minutes there
def test_ring_permutes_overlap_the_block_matmuls_when_compiled_for_tpu_slices():
  # XLA:CPU's collectives are synchronous, so the overlap itself shows only in an accelerator's
  # scheduled HLO: here XLA:TPU's, compiled ahead of time for two 8-chip slices by libtpu (no TPU;
  # installed in .venv/libtpu by `bash launch/setup.sh --test`). Every collective-permute of both
  # rings, in the forward and backward loops and around them, must have a block matmul between its
  # start and its done. With the
  # forward's column log-sum-exps shifted inside the ring (before `_column_lse_home`), v6e's
  # scheduler left that shift exposed: 'NO (no matmul under: collective-permute-start.1 f32[512])'.
  run = _ring_overlap_check("--kind", "both", "--tpu-topology", "v5e:2x4,v6e:2x4")
  assert run.returncode != 2 or "no libtpu" not in run.stdout, run.stdout  # setup.sh --test installs it
  verdicts = [line for line in run.stdout.splitlines() if "-> overlap:" in line]
  # 2 slices x 2 kinds x (forward ring step, backward ring step, the permutes around the loops)
  assert len(verdicts) == 12, run.stdout + run.stderr[-2000:]
  assert all(line.endswith("-> overlap: yes") for line in verdicts), run.stdout
  assert run.returncode == 0, run.stdout


@pytest.mark.slow   # 9-16 s on an AVX2-only CPU: the fast subset stays under 5 minutes there
def test_ring_permutes_overlap_the_block_matmuls_when_compiled_for_gpu_hosts():
  # XLA:GPU's scheduled HLO, compiled ahead of time by jax's CUDA plugin with CUDA's ptxas (no GPU or driver;
  # installed in .venv/cuda-aot by `bash launch/setup.sh --test`) for 8 A100s, 8 H100s and two hosts of
  # 4 H200s, under the XLA flags the trainers set (clip_jax.cli.use_xla_defaults). Every collective-permute
  # of both rings, in the forward and backward loops and around them, must have compute under it.
  run = _ring_overlap_check("--kind", "both", "--gpu-topology", "a100:1x1x8,h100:1x1x8,h200:1x2x4")
  assert run.returncode != 2 or "no CUDA plugin" not in run.stdout, run.stdout  # setup.sh --test installs it
  verdicts = [line for line in run.stdout.splitlines() if "-> overlap:" in line]
  # 3 targets x 2 kinds x (forward ring step, backward ring step, the permutes around the loops)
  assert len(verdicts) == 18, run.stdout + run.stderr[-2000:]
  assert all("-> overlap: yes" in line for line in verdicts), run.stdout
  # The ring steps themselves overlap with a matmul, not merely beside other kernels.
  assert all(line.endswith("-> overlap: yes") for line in verdicts if "ring step" in line), run.stdout
  assert run.returncode == 0, run.stdout


@pytest.mark.slow
def test_ring_overlap_on_a100_needs_the_latency_hiding_scheduler_the_trainers_turn_on():
  # XLA:GPU runs its latency-hiding scheduler by default only from Hopper on: with it named off, the
  # A100 backward ring step waits for its permute before the block's matmuls; H100s still overlap.
  run = _ring_overlap_check("--kind", "sigmoid", "--gpu-topology", "a100:1x1x8,h100:1x1x8",
                            xla_flags="--xla_gpu_enable_latency_hiding_scheduler=false")
  a100, h100 = run.stdout.split("x NVIDIA H100")
  assert "backward ring step" in a100 and "start done matmul  -> overlap: NO" in a100, run.stdout
  assert "-> overlap: NO" not in h100, run.stdout
  assert run.returncode == 1, run.stdout


_TWO_PROCESS_CHECK = """
import os, sys
import jax, numpy as np
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from clip_jax import losses
mesh = jax.make_mesh((2, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
rng = np.random.default_rng(0)
image, text = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in rng.normal(size=(2, 16, 8)).astype(np.float32))
sharding = NamedSharding(mesh, P(("fsdp", "data")))  # named against mesh order: the all-to-all's numbering
put = lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
for kind in ("softmax_ring", "sigmoid"):
  loss = lambda a, b: losses.contrastive_loss(a, b, 10.0, -10.0, kind=kind, mesh=mesh, batch_axes=("fsdp", "data"))
  value, grad = jax.jit(jax.value_and_grad(loss))(put(image), put(text))
  naive = (lambda a, b: losses.naive_sigmoid_loss(a, b, 10.0, -10.0)) if kind == "sigmoid" else (
      lambda a, b: losses.naive_softmax_loss(a, b, 10.0))
  expected_value, expected_grad = jax.value_and_grad(naive)(image, text)
  np.testing.assert_allclose(float(value), float(expected_value), rtol=1e-5)
  for shard in grad.addressable_shards:  # this process's rows of the image gradient
    np.testing.assert_allclose(np.asarray(shard.data), np.asarray(expected_grad)[shard.index], rtol=1e-4, atol=1e-6)
  print(kind, "ok", flush=True)
"""


@pytest.mark.slow
def test_ring_losses_are_exact_across_processes():
  # The rings' ppermutes and softmax_ring's all-to-all between two jax.distributed processes (2 CPU
  # devices each, gloo), with the batch axes named against the mesh's order.
  import os
  import subprocess
  import sys
  from launch.local import free_port
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
  address = f"localhost:{free_port()}"
  runs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_CHECK, address, str(i)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [run.communicate(timeout=300)[0] for run in runs]
  for run, output in zip(runs, outputs):
    assert run.returncode == 0, output[-3000:]
    assert "softmax_ring ok" in output and "sigmoid ok" in output, output[-3000:]
