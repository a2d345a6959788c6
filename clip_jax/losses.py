"""Contrastive losses over a batch sharded across devices, exactly equal to the full-batch loss.

Three kinds, all taking global, L2-normalised `[B, d]` embeddings sharded over `batch_axes`:

- `softmax` (CLIP): each device all-gathers the *embeddings* of the other side (`[B, d]`, cheap)
  and computes only its own rows of the similarity matrix, image->text and text->image. A softmax
  row needs the whole row, which the device has, so the loss is exact with `[b, B]` logits per
  device (b = B / N for N batch shards) instead of `[B, B]`.
- `sigmoid` (SigLIP): every pair is an independent binary term, so the text chunks travel round
  a ring of `ppermute`s and no device ever holds more than a `[b, b]` block of logits.
- `softmax_ring`: the CLIP loss over the same ring. Rows keep a running log-sum-exp that each
  `[b, b]` block updates; each block's column log-sum-exps stay where they were computed and go
  home in one all-to-all after the ring. Still exact, `[b, b]` logits per device.

The rings are double-buffered (`ring_visits`): the next chunk is in flight while the current
block computes, so on accelerators the ppermute hides under the matmuls (`tests/test_losses.py`
checks the independence; `benchmarks/ring_overlap_check.py` the compiled start/done order, for a
GPU at hand or ahead of time for a TPU slice).

The bound holds for the backward pass too: the rings' gradient is a second ring (custom_vjp) that
recomputes each block from the saved inputs and final log-sum-exps, instead of autodiff keeping
all N blocks (b x B again). `benchmarks/bench_loss_memory.py` shows the bound with the compiled
executables' memory analysis; `tests/test_losses.py` checks it.

Correctness is defined by `naive_softmax_loss` and `naive_sigmoid_loss`, which build the full
`[B, B]` matrix on one device; tests/test_losses.py compares values and gradients with them.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from clip_jax.cli import UserError, did_you_mean

# CLIP (Radford et al. 2021): temperature initialised at 0.07, logit scale clipped at 100.
CLIP_INIT_LOG_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = 100.0
# SigLIP (Zhai et al. 2023): log scale log(10) and bias -10, so that at the start the many
# negatives get a small loss and do not swamp the one positive per row.
SIGLIP_INIT_LOG_SCALE = math.log(10.0)
SIGLIP_INIT_BIAS = -10.0

LOSS_KINDS = ("softmax", "sigmoid", "softmax_ring")


def clamp_logit_scale(log_scale: jax.Array) -> jax.Array:
  """The multiplier exp(log_scale), clipped at 100 as in the CLIP paper (zero gradient above)."""
  return jnp.minimum(jnp.exp(log_scale), MAX_LOGIT_SCALE)


def init_sigmoid_params() -> dict[str, jax.Array]:
  """SigLIP's initial learned temperature (as a log) and bias."""
  return {"log_scale": jnp.asarray(SIGLIP_INIT_LOG_SCALE, jnp.float32),
          "bias": jnp.asarray(SIGLIP_INIT_BIAS, jnp.float32)}


# ----------------------------------------------------------------------------------------------
# Naive references: the whole [B, B] matrix on one device. These define correctness.
# ----------------------------------------------------------------------------------------------

def _similarity(a: jax.Array, b: jax.Array) -> jax.Array:
  # Logits in fp32 whatever the embedding dtype: a log-sum-exp over 32k bf16 terms is too coarse.
  return jnp.matmul(a, b.T, preferred_element_type=jnp.float32)


def naive_softmax_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale) -> jax.Array:
  """CLIP loss: mean of the image->text and text->image cross-entropies over the B x B logits."""
  logits = logit_scale * _similarity(image_emb, text_emb)  # [B, B], rows are images
  diagonal = jnp.diagonal(logits)
  image_to_text = jnp.mean(jax.nn.logsumexp(logits, axis=1) - diagonal)
  text_to_image = jnp.mean(jax.nn.logsumexp(logits, axis=0) - diagonal)
  return (image_to_text + text_to_image) / 2


def _pair_labels(logits: jax.Array) -> jax.Array:
  """+1 on the diagonal of a square block of logits (the matching pairs), -1 elsewhere."""
  return 2 * jnp.eye(logits.shape[0], dtype=logits.dtype) - 1


def naive_sigmoid_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale,
                       logit_bias) -> jax.Array:
  """SigLIP loss: -sum over all B*B pairs of log sigmoid(label * logit), divided by B."""
  batch = image_emb.shape[0]
  logits = logit_scale * _similarity(image_emb, text_emb) + logit_bias  # [B, B]
  return -jnp.sum(jax.nn.log_sigmoid(_pair_labels(logits) * logits)) / batch


# ----------------------------------------------------------------------------------------------
# Per-device bodies, run under shard_map. `image`/`text` are the local [b, d] chunks; the return
# value is this device's share of the loss *numerator*, summed over the batch axes by the caller.
# ----------------------------------------------------------------------------------------------

def _positive_logits(image, text, scale):
  # The diagonal of the global matrix lives on the owning device: row r of the local chunk is
  # paired with row r of the local text chunk, i.e. label = device_position * b + r. A row-wise
  # dot product gives those logits without indexing into (and scattering gradients over) [b, B].
  return scale * jnp.sum(image.astype(jnp.float32) * text.astype(jnp.float32), axis=-1)  # [b]


def _softmax_gathered(image, text, scale, bias, *, batch_axes, num_shards):
  del bias, num_shards  # A softmax is shift-invariant: a constant bias has no effect.
  all_images = jax.lax.all_gather(image, batch_axes, tiled=True)  # [B, d]
  all_texts = jax.lax.all_gather(text, batch_axes, tiled=True)  # [B, d]
  image_to_text = scale * _similarity(image, all_texts)  # [b, B]: this device's rows
  text_to_image = scale * _similarity(text, all_images)  # [b, B]: this device's columns
  positives = _positive_logits(image, text, scale)
  return (jnp.sum(jax.nn.logsumexp(image_to_text, axis=1) - positives)
          + jnp.sum(jax.nn.logsumexp(text_to_image, axis=1) - positives))


def _ring_shift(x, batch_axes, num_shards):
  """Sends x (any pytree) to the next device along the batch axes (device i -> i + 1, mod N)."""
  perm = [(i, (i + 1) % num_shards) for i in range(num_shards)]
  return jax.lax.ppermute(x, batch_axes, perm)


def _column_lse_home(column_parts, batch_axes, num_shards):
  """[N, b] -> [b]: the column log-sum-exps of this device's own texts over every device's images.

  Row k of `column_parts` on device i is over device i's images for the texts of device i - k
  (mod N, the chunk k ring hops from home). Reordered by home device, one all-to-all hands each
  device the N partial statistics of its own texts, combined by one log-sum-exp.
  """
  # Numbered as the ring's ppermute numbers them: over several axes jax numbers a ppermute's devices
  # in mesh order whatever order the axes are named in, axis_index and all_to_all in the order named;
  # without the sort, batch axes named against mesh order would send rows to the wrong devices.
  # One small collective ([N, b] f32) after the ring, not overlapped with anything.
  mesh_order = jax.sharding.get_abstract_mesh().axis_names
  ring_axes = tuple(sorted(batch_axes, key=mesh_order.index))
  here = jax.lax.axis_index(ring_axes)
  by_home = column_parts[(here - jnp.arange(num_shards)) % num_shards]  # row j: the texts of device j
  from_every_device = jax.lax.all_to_all(by_home, ring_axes, 0, 0, tiled=False)  # [N, b]
  return jax.nn.logsumexp(from_every_device, axis=0)


def ring_visits(visit, chunk, state, num_visits: int, shift):
  """Runs `state = visit(chunk_k, state)` for chunk_k = shift^k(chunk), k = 1 .. num_visits, with
  the chunk double-buffered: the shift that brings chunk_{k+1} is issued at the start of visit k,
  before (and independent of) that visit's compute, so an accelerator's async collective
  (collective-permute-start ... -done) runs under the block's matmuls instead of before them.
  The last visit issues no prefetch, so no chunk travels further than N - 1 hops.
  (What a block writes, e.g. a travelling gradient, is `visit`'s business: see `_ring_pair_sum`.)
  """
  if num_visits == 0:
    return state
  def body(carry, _):
    current, state = carry
    upcoming = shift(current)  # in flight while the block below computes
    return (upcoming, visit(current, state)), None
  (last, state), _ = jax.lax.scan(body, (shift(chunk), state), length=num_visits - 1)
  return visit(last, state)


def _ring_pair_sum(image, text, params, *, kind, batch_axes, num_shards):
  """This device's part of a ring loss's numerator, a scalar; image, text: this device's [b, d] rows.

  `sigmoid`: over every (local image, any text) pair, the SigLIP sum of -log sigmoid(label *
  logit), label +1 for the matching pairs (all in the first block, the device's own texts) and -1
  elsewhere. `softmax_ring`: the sum of the row log-sum-exps of the local images (over every text)
  plus the column log-sum-exps of the local texts (over every image).
  `params` is (scale,) or (scale, bias).

  The text chunks go round the ring, so one [b, b] block of logits exists at a time. The
  gradient is a second ring (custom_vjp): autodiff of the first would keep every step's block,
  or, rematerialised with jax.checkpoint, still every step's text chunk ([B, d] in all). The
  backward ring recomputes each block and carries the text chunk's gradient along with it.

  Overlap (`ring_visits`): the text chunk a block reads arrives one visit ahead. What travels
  *after* a block updated it (in the backward, the text chunk's gradient) is shifted at the start of
  the next visit and only consumed after that visit's block: also off the critical path. The
  forward's column log-sum-exps do not travel in the ring at all (`_column_lse_home`): XLA:TPU's
  scheduler left their per-visit shift exposed on v6e and v5p (`benchmarks/ring_overlap_check.py`).
  """
  shift = functools.partial(_ring_shift, batch_axes=batch_axes, num_shards=num_shards)
  with_columns = kind == "softmax_ring"  # the backward ships each chunk's final column statistics with it

  def block_logits(image, text_chunk, params):
    similarity = _similarity(image, text_chunk)  # [b, b]
    logits = params[0] * similarity + (params[1] if len(params) > 1 else 0.0)
    return similarity, logits

  def forward(image, text, params):
    """Returns the sum and the final row and column log-sum-exps ([b] each, or None)."""
    logits = block_logits(image, text, params)[1]
    if not with_columns:
      def visit(text_chunk, total):
        return total + jnp.sum(jax.nn.softplus(block_logits(image, text_chunk, params)[1]))

      # -log sigmoid(label * logit) = softplus(-label * logit), labels only in the own block.
      own_total = jnp.sum(jax.nn.softplus(-_pair_labels(logits) * logits))
      return ring_visits(visit, text, own_total, num_shards - 1, shift), None

    # A chunk's column log-sum-exp over this device's images stays here, one row per visit
    # ([N, b]: row k for the chunk k hops from home), and all go home in one all-to-all after the
    # ring: nothing a block computes is sent inside the ring, so each visit's only collective is
    # the prefetch of the next chunk.
    def visit(text_chunk, state):
      row_lse, column_parts, k = state
      logits = block_logits(image, text_chunk, params)[1]
      column_parts = jax.lax.dynamic_update_index_in_dim(
          column_parts, jax.nn.logsumexp(logits, axis=0), k, axis=0)
      return jnp.logaddexp(row_lse, jax.nn.logsumexp(logits, axis=1)), column_parts, k + 1

    column_parts = jnp.zeros((num_shards, logits.shape[1]), jnp.float32)
    state = (jax.nn.logsumexp(logits, axis=1), column_parts.at[0].set(jax.nn.logsumexp(logits, axis=0)), 1)
    row_lse, column_parts, _ = ring_visits(visit, text, state, num_shards - 1, shift)
    column_lse = _column_lse_home(column_parts, batch_axes, num_shards)
    return jnp.sum(row_lse) + jnp.sum(column_lse), (row_lse, column_lse)

  def backward(image, text, params, stats, cotangent):
    row_lse, column_lse = stats if with_columns else (None, None)  # None: nothing to ship

    def block_grads(text_chunk, column_chunk, own_block=False):
      similarity, logits = block_logits(image, text_chunk, params)
      if with_columns:  # d lse / d logit is the softmax, along the row and along the column.
        logits_grad = jnp.exp(logits - row_lse[:, None]) + jnp.exp(logits - column_chunk[None, :])
      elif own_block:
        labels = _pair_labels(logits)
        logits_grad = -labels * jax.nn.sigmoid(-labels * logits)
      else:
        logits_grad = jax.nn.sigmoid(logits)
      logits_grad = cotangent * logits_grad  # [b, b]
      image_grad = params[0] * jnp.matmul(logits_grad, text_chunk.astype(jnp.float32))  # [b, d]
      text_grad = params[0] * jnp.matmul(logits_grad.T, image.astype(jnp.float32))  # [b, d]
      params_grad = (jnp.sum(logits_grad * similarity), jnp.sum(logits_grad))[:len(params)]
      return image_grad, text_grad, params_grad

    def visit(chunk, state):
      text_chunk, column_chunk = chunk  # read-only: prefetched a visit ahead
      text_grad, image_grad, params_grad = state
      text_grad = shift(text_grad)  # this chunk's gradient so far; needed only after the block
      block_image_grad, block_text_grad, block_params_grad = block_grads(text_chunk, column_chunk)
      params_grad = tuple(a + b for a, b in zip(params_grad, block_params_grad))
      return text_grad + block_text_grad, image_grad + block_image_grad, params_grad

    image_grad, text_grad, params_grad = block_grads(text, column_lse, own_block=True)
    text_grad, image_grad, params_grad = ring_visits(
        visit, (text, column_lse), (text_grad, image_grad, params_grad), num_shards - 1, shift)
    text_grad = shift(text_grad)  # After N - 1 hops it sits one device short of home: one more.
    return image_grad.astype(image.dtype), text_grad.astype(text.dtype), params_grad

  @jax.custom_vjp
  def pair_sum(image, text, params):
    return forward(image, text, params)[0]

  def pair_sum_forward(image, text, params):
    value, stats = forward(image, text, params)
    return value, (image, text, params, stats)

  def pair_sum_backward(residuals, cotangent):
    return backward(*residuals, cotangent)

  pair_sum.defvjp(pair_sum_forward, pair_sum_backward)
  # The scale and bias are the same on every device, but each device's sum depends on them through
  # its own pairs: marked varying, their gradients are summed over the batch axes by autodiff.
  return pair_sum(image, text, jax.lax.pcast(tuple(params), batch_axes, to="varying"))


def _sigmoid_ring(image, text, scale, bias, *, batch_axes, num_shards):
  return _ring_pair_sum(image, text, (scale, bias), kind="sigmoid",
                        batch_axes=batch_axes, num_shards=num_shards)


def _softmax_ring(image, text, scale, bias, *, batch_axes, num_shards):
  del bias  # A softmax is shift-invariant: a constant bias has no effect.
  lse_sum = _ring_pair_sum(image, text, (scale,), kind="softmax_ring",
                           batch_axes=batch_axes, num_shards=num_shards)
  return lse_sum - 2 * jnp.sum(_positive_logits(image, text, scale))


_BODIES = {"softmax": _softmax_gathered, "sigmoid": _sigmoid_ring, "softmax_ring": _softmax_ring}


# ----------------------------------------------------------------------------------------------
# Public entry point.
# ----------------------------------------------------------------------------------------------

def _check_inputs(image_emb, text_emb, logit_scale, logit_bias, kind, mesh, batch_axes) -> int:
  """Raises on inputs a caller can get wrong; returns N, the number of batch shards."""
  if kind not in LOSS_KINDS:
    raise UserError(f"Unknown contrastive loss kind {kind!r};{did_you_mean(kind, LOSS_KINDS)} use one of {LOSS_KINDS}.")
  if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
    raise ValueError(f"Image and text embeddings must both be [batch, dim] of the same shape; got "
                     f"{image_emb.shape} and {text_emb.shape}.")
  if jnp.ndim(logit_scale) or (logit_bias is not None and jnp.ndim(logit_bias)):
    raise ValueError("logit_scale and logit_bias must be scalars (one learned temperature and "
                     "bias for the whole batch).")
  if kind == "sigmoid" and logit_bias is None:
    raise ValueError("kind='sigmoid' needs a logit_bias (SigLIP starts it at -10, see "
                     "init_sigmoid_params()).")
  unknown = [axis for axis in batch_axes if axis not in mesh.axis_names]
  if unknown or not batch_axes:
    raise ValueError(f"batch_axes {batch_axes} must be a non-empty tuple of mesh axes; the mesh "
                     f"has {mesh.axis_names}.")
  num_shards = math.prod(mesh.shape[axis] for axis in batch_axes)
  if image_emb.shape[0] % num_shards:
    raise ValueError(f"Global batch {image_emb.shape[0]} does not split evenly over the "
                     f"{num_shards} devices of batch axes {batch_axes}; use a multiple of "
                     f"{num_shards}.")
  return num_shards


def contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale,
                     logit_bias=None, *, kind: str = "softmax", mesh: Mesh,
                     batch_axes: str | Sequence[str]) -> jax.Array:
  """The global-batch contrastive loss of `kind`, computed shard by shard, exactly.

  Args:
    image_emb, text_emb: `[B, d]` L2-normalised embeddings, row i of each forming a pair, split
      over `batch_axes` of `mesh` (any other mesh axes hold replicas; the loss is replicated).
    logit_scale: the multiplier (already `clamp_logit_scale`d), a scalar.
    logit_bias: the SigLIP bias, a scalar; required for `sigmoid`, ignored by the softmax kinds
      (a constant shift does not change a softmax, so its gradient is zero).
    kind: 'softmax' (all-gather, `[b, B]` logits per device), 'sigmoid' or 'softmax_ring'
      (ring, `[b, b]` logits per device, forward and backward).
    mesh: the device mesh the embeddings live on.
    batch_axes: the mesh axis name(s) the batch dimension is split over, major to minor as in
      the embeddings' PartitionSpec, e.g. ('data', 'fsdp'). (Every pair's positive sits on one
      device, so another order is still exact; it only makes shard_map reshuffle the rows.)

  Returns:
    The scalar loss, differentiable in both embeddings, the scale and the bias.
  """
  batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
  num_shards = _check_inputs(image_emb, text_emb, logit_scale, logit_bias, kind, mesh,
                             batch_axes)
  batch = image_emb.shape[0]
  logit_scale = jnp.asarray(logit_scale, jnp.float32)
  logit_bias = jnp.asarray(0.0 if logit_bias is None else logit_bias, jnp.float32)
  body = _BODIES[kind]
  # softmax kinds average two cross-entropies; sigmoid divides its sum by B (SigLIP's definition).
  denominator = batch if kind == "sigmoid" else 2 * batch

  def per_device(image, text, scale, bias):  # image, text: [b, d]
    numerator = body(image, text, scale, bias, batch_axes=batch_axes, num_shards=num_shards)
    return jax.lax.psum(numerator, batch_axes) / denominator

  batch_spec = P(batch_axes)
  if any(axis_type == AxisType.Explicit for axis_type in mesh.axis_types):
    # Explicit-sharding meshes make shard_map insist that inputs already carry its in_specs.
    image_emb, text_emb = (jax.reshard(x, NamedSharding(mesh, batch_spec))
                           for x in (image_emb, text_emb))
    logit_scale, logit_bias = (jax.reshard(x, NamedSharding(mesh, P()))
                               for x in (logit_scale, logit_bias))
  return jax.shard_map(per_device, mesh=mesh, in_specs=(batch_spec, batch_spec, P(), P()),
                       out_specs=P())(image_emb, text_emb, logit_scale, logit_bias)
