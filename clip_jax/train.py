r"""CLIP training: one mesh, sharded exact contrastive loss, exact gradient accumulation, resume.

    python -m clip_jax.train --config=configs/clip/digits.py --workdir=/tmp/digits \
        [--config.total_steps=500 --config.model.name=ViT-Tiny ...]

The trainer contributes its setup (model, sharded state, input), its update step and its
evaluation hook; `clip_jax.loop` runs them (restore, non-finite steps, preemption, checkpoints,
metrics). A workdir that already holds a checkpoint resumes from it: parameters, optimizer state,
step, RNG and the input iterator continue where they stopped, so a killed run ends where an
uninterrupted one would (bitwise on CPU).
"""
from __future__ import annotations

if __name__ == "__main__":  # before jax is imported: XLA flags, allocator (clip_jax.cli)
  from clip_jax import cli as _cli
  _cli.use_process_defaults()

import functools
import json
import math
import os
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from clip_jax import checkpoint as ckpt
from clip_jax import layers, loop, losses, optim, pretrained, sharding
from clip_jax.models.clip import CLIP, create_model
from clip_jax.observe import write_atomic, write_results

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# The stored temperature is clamped after each update (open_clip does): exp(logit_scale) <= 100.
MAX_LOG_SCALE = math.log(losses.MAX_LOGIT_SCALE)


# ----------------------------------------------------------------------------- model
def model_overrides(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """model.overrides as a plain dict (what --config.model.overrides={...} sets)."""
  overrides = cfg.model.get("overrides", None)
  return overrides.to_dict() if isinstance(overrides, ml_collections.ConfigDict) else dict(overrides or {})


def build_model(cfg: ml_collections.ConfigDict) -> CLIP:
  m = cfg.model
  overrides = model_overrides(cfg)
  if cfg.loss.kind == "sigmoid" and "init_logit_bias" not in overrides:
    # SigLIP's init: scale 10, bias -10 (the bias offsets the many negatives at the start).
    overrides["init_logit_bias"] = losses.SIGLIP_INIT_BIAS
    overrides.setdefault("init_logit_scale", losses.SIGLIP_INIT_LOG_SCALE)
  return create_model(m.name, dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype], remat=cfg.remat,
                      **overrides)


def dummy_inputs(model: CLIP, batch: int = 1):
  cfg = model.config
  return (jnp.zeros((batch, cfg.vision.image_size, cfg.vision.image_size, 3), jnp.float32),
          jnp.zeros((batch, cfg.text.context_length), jnp.int32))


# ----------------------------------------------------------------------------- state
def create_train_state(model: CLIP, opt_cfg, mesh, rules, rng: jax.Array, *, lock: dict | None = None,
                       init_from: Callable[[Any], Any] | None = None):
  """Parameters and optimizer state created directly in their shardings.

  lock: `optim.lock_mask`'s options (locked parameters get no optimizer state). init_from: a
  function of the variables' ShapeDtypeStructs (with their shardings) returning pretrained
  variables already placed so (`pretrained.init_from_config`); called before anything compiles,
  its leaves replace the fresh ones, the optimizer state starts fresh.
  Returns (state, state_shardings, optimizer). The state is a dict: step, params, batch_stats
  (ResNets), opt_state, rng, and the loop's non-finite step counters.
  """
  init_rng, train_rng = jax.random.split(rng)
  abstract_vars = jax.eval_shape(lambda r: model.init(r, *dummy_inputs(model)), init_rng)
  var_shardings = sharding.logical_shardings(abstract_vars, mesh, rules)
  abstract_params = nn.meta.unbox(abstract_vars["params"])
  tx = optim.make_optimizer(opt_cfg, abstract_params, frozen=optim.lock_mask(abstract_params, **lock) if lock else None)
  loaded = {}
  if init_from is not None:
    loaded = init_from(jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    nn.meta.unbox(abstract_vars), var_shardings))
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = NamedSharding(mesh, P())
  state_shardings = {
      **{name: replicated for name in loop.init_counters()},
      "params": var_shardings["params"],
      "opt_state": sharding.shard_like_params(abstract_opt, abstract_params, var_shardings["params"], mesh),
      "rng": replicated,
  }
  if "batch_stats" in abstract_vars:
    state_shardings["batch_stats"] = var_shardings["batch_stats"]

  def init(init_rng, train_rng, loaded):
    # Loaded leaves pass through unchanged (bitwise); XLA drops their random initialisation.
    variables = pretrained.merge(nn.meta.unbox(model.init(init_rng, *dummy_inputs(model))), loaded)
    state = {**loop.init_counters(), "params": variables["params"], "opt_state": tx.init(variables["params"]),
             "rng": train_rng}
    if "batch_stats" in variables:
      state["batch_stats"] = variables["batch_stats"]
    return state

  state = jax.jit(init, out_shardings=state_shardings, donate_argnums=(2,))(init_rng, train_rng, loaded)
  return state, state_shardings, tx


# ----------------------------------------------------------------------------- the step
def make_loss_and_grad(model: CLIP, *, loss_kind: str, mesh, microbatches: int = 1):
  """A function (params, batch_stats, images, tokens) -> (loss, grads, new_batch_stats). The
  batch is split over `sharding.batch_axes(mesh)`.

  With k > 1 micro-batches the gradient is still the one of the full batch (contrastive losses do
  not decompose over micro-batches): embeddings of all micro-batches first, without keeping
  activations; then the loss and its gradient w.r.t. the embeddings over the full batch; then each
  micro-batch's towers again, pulled back with its slice of that cotangent (`jax.vjp`).
  """
  has_bias = model.config.init_logit_bias is not None
  batch_axes = sharding.batch_axes(mesh)
  emb_sharding = sharding.batch_sharding(mesh)

  def towers(params, batch_stats, images, tokens):
    variables = {"params": params}
    if batch_stats is not None:
      variables["batch_stats"] = batch_stats
      (image_emb, text_emb, _, _), updates = model.apply(variables, images, tokens, train=True,
                                                         mutable=["batch_stats"])
      return (image_emb, text_emb), updates["batch_stats"]
    image_emb, text_emb, _, _ = model.apply(variables, images, tokens, train=True)
    return (image_emb, text_emb), None

  def loss_on_embeddings(image_emb, text_emb, log_scale, bias):
    image_emb = jax.lax.with_sharding_constraint(image_emb, emb_sharding)
    text_emb = jax.lax.with_sharding_constraint(text_emb, emb_sharding)
    return losses.contrastive_loss(image_emb, text_emb, losses.clamp_logit_scale(log_scale),
                                   bias if has_bias else None, kind=loss_kind, mesh=mesh,
                                   batch_axes=batch_axes)

  def one_pass(params, batch_stats, images, tokens):
    def loss_fn(params):
      (image_emb, text_emb), new_stats = towers(params, batch_stats, images, tokens)
      return loss_on_embeddings(image_emb, text_emb, params["logit_scale"],
                                params.get("logit_bias")), new_stats
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, grads, new_stats

  def accumulated(params, batch_stats, images, tokens):
    k = microbatches
    micro_images, micro_tokens = sharding.split_microbatches(images, k), sharding.split_microbatches(tokens, k)

    def embed(_, xs):  # Pass 1: embeddings only; nothing is kept for a backward pass.
      (image_emb, text_emb), _ = towers(params, batch_stats, *xs)
      return None, (image_emb, text_emb)
    _, (image_k, text_k) = jax.lax.scan(embed, None, (micro_images, micro_tokens))
    bias = params.get("logit_bias", jnp.zeros((), jnp.float32))
    loss, (g_image, g_text, g_scale, g_bias) = jax.value_and_grad(loss_on_embeddings, argnums=(0, 1, 2, 3))(
        sharding.merge_microbatches(image_k), sharding.merge_microbatches(text_k), params["logit_scale"], bias)

    def pull_back(carry, xs):  # Pass 2: each micro-batch's towers with its cotangent.
      grads, stats = carry
      mb_images, mb_tokens, mb_g_image, mb_g_text = xs
      outputs, vjp_fn, new_stats = jax.vjp(lambda p: towers(p, stats, mb_images, mb_tokens), params,
                                           has_aux=True)
      (mb_grads,) = vjp_fn((mb_g_image, mb_g_text))
      return (jax.tree.map(jnp.add, grads, mb_grads), new_stats), None
    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, new_stats), _ = jax.lax.scan(
        pull_back, (zeros, batch_stats),
        (micro_images, micro_tokens, sharding.split_microbatches(g_image, k), sharding.split_microbatches(g_text, k)))
    grads = dict(grads)
    grads["logit_scale"] = grads["logit_scale"] + g_scale
    if has_bias:
      grads["logit_bias"] = grads["logit_bias"] + g_bias
    return loss, grads, new_stats

  return one_pass if microbatches == 1 else accumulated


def make_train_step(model: CLIP, tx, *, loss_kind: str, mesh, microbatches: int,
                    schedule: Callable[[jax.Array], jax.Array], frozen: Any | None = None):
  """update(state, batch) -> (state, metrics): one optimizer update on {'image', 'tokens'}. The
  stored logit_scale is clamped at ln 100 after the update. A non-finite step (loss or gradient norm)
  leaves the state as it was (`loop.update_if_finite`; metrics['skipped']); the loop counts them.
  `frozen` (True leaves: locked parameters) stops their gradients, so a locked tower's backward pass
  is not computed; a locked ResNet keeps its BatchNorm statistics."""
  loss_and_grad = make_loss_and_grad(model, loss_kind=loss_kind, mesh=mesh, microbatches=microbatches)
  image_locked = frozen is not None and all(jax.tree.leaves(frozen.get("visual", {})))

  def train_step(state, batch):
    params = state["params"]
    live = params if frozen is None else jax.tree.map(
        lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
    loss, grads, new_stats = loss_and_grad(live, state.get("batch_stats"), batch["image"], batch["tokens"])
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "logit_scale": losses.clamp_logit_scale(params["logit_scale"]),
               "learning_rate": schedule(state["step"])}
    if "logit_bias" in params:
      metrics["logit_bias"] = params["logit_bias"]

    def apply(state):  # the optimizer step, run for finite steps only
      new_params, new_opt_state = optim.apply_optimizer(tx, grads, state["opt_state"], state["params"],
                                                        metrics["grad_norm"])
      new_params = dict(new_params)
      new_params["logit_scale"] = jnp.minimum(new_params["logit_scale"], MAX_LOG_SCALE)
      new_state = dict(state, params=new_params, opt_state=new_opt_state)
      if new_stats is not None and not image_locked:
        new_state["batch_stats"] = new_stats
      return new_state
    return loop.update_if_finite(state, metrics, apply)

  return train_step


# ----------------------------------------------------------------------------- input
class SyntheticData:
  """Random image/token batches, a function of (seed, position): for benchmarks and tests.
  Its state checkpoints like a grain iterator's."""

  def __init__(self, batch_size: int, image_size: int, context_length: int, seed: int):
    self.batch_size, self.image_size, self.context_length, self.seed = batch_size, image_size, context_length, seed
    self.position = 0

  def __iter__(self):
    return self

  def __next__(self):
    rng = np.random.default_rng([self.seed, jax.process_index(), self.position])
    self.position += 1
    tokens = np.zeros((self.batch_size, self.context_length), np.int32)
    lengths = rng.integers(2, self.context_length - 1, self.batch_size)
    for i, n in enumerate(lengths):
      tokens[i, 0], tokens[i, 1:n] = 49406, rng.integers(1, 49000, n - 1)
      tokens[i, n] = 49407
    images = rng.normal(size=(self.batch_size, self.image_size, self.image_size, 3)).astype(np.float32)
    return {"image": images, "tokens": tokens}

  # grain's checkpoint handler stores non-grain iterators' state as bytes.
  def get_state(self) -> bytes:
    return json.dumps({"position": self.position}).encode()

  def set_state(self, state: bytes) -> None:
    self.position = int(json.loads(state)["position"])

  def start_prefetch(self) -> None:
    pass


def build_input(cfg, model: CLIP):
  """The per-process training iterator (grain, or synthetic): global_batch / process_count rows.
  The data is opened here, at start: what is wrong with the spec or the files is a cli.UserError (one
  line); process 0 prints the dataset's size (`describe_training_data`)."""
  per_process = cfg.global_batch // jax.process_count()
  image_size, context_length = model.config.vision.image_size, model.config.text.context_length
  if cfg.data.source == "synthetic":
    return SyntheticData(per_process, image_size, context_length, cfg.seed)
  from clip_jax import cli
  from clip_jax import data as clip_data
  from clip_jax.tokenizer import get_tokenizer
  tokenizer = get_tokenizer(pretrained.training_tokenizer(cfg)[0], context_length=context_length)
  # Every error a source raises while opening is about the user's data or spec.
  source = cli.as_user_errors(clip_data.open_source, cfg.data.source, cfg.data.get("split", "train"),
                              data_dir=cfg.data.get("data_dir", None), image_size=image_size)
  if len(source) == 0:
    raise cli.UserError(f"--config.data.source={cfg.data.source}: holds no records ({source!r}).")
  if jax.process_index() == 0:
    line, warning = describe_training_data(len(source), cfg.global_batch, cfg.total_steps, repr(source))
    print(line, flush=True)
    if getattr(source, "templated_captions", lambda: False)():  # class folders, label tables, tars with cls
      print(f"Captions: the class name in {len(source.templates)} templates, one drawn per example "
            f"({', '.join(repr(t) for t in source.templates[:2])}, ...).", flush=True)
    if warning:
      logging.warning(warning)
  dataset = clip_data.make_pipeline(source, tokenizer, batch_size=per_process, image_size=image_size, train=True,
                                    seed=cfg.seed, num_workers=cfg.data.get("num_workers", 0),
                                    crop_scale=tuple(cfg.data.get("crop_scale", (0.9, 1.0))))
  return iter(dataset)


def describe_training_data(num_records: int, global_batch: int, total_steps: int,
                           source: str = "") -> tuple[str, str | None]:
  """-> (the line the trainer prints at start: records and the epochs `total_steps` updates of
  `global_batch` pairs cover, a warning or None). The warning says when the records are fewer than
  the global batch: every batch then holds copies of a record, which the contrastive loss scores as
  negatives of themselves (one record: 16 copies, a loss of ln 16 whatever the model learns)."""
  examples = total_steps * global_batch
  records = f"{num_records:,} record{'s' * (num_records != 1)}"
  line = (f"Training data: {records}{f' ({source})' if source else ''}; {total_steps:,} steps x "
          f"{global_batch:,} = {examples:,} examples, {examples / num_records:.3g} epochs.")
  warning = None
  if num_records < global_batch:
    warning = (f"the training data holds {records}, fewer than the global batch of {global_batch:,}: "
               "every batch repeats records, and the loss counts each copy as a negative of its own "
               "caption. Add data or lower --config.global_batch.")
  return line, warning


# ----------------------------------------------------------------------------- main
def resolve_tokenizer(cfg, workdir: str | None = None) -> None:
  """Sets cfg.data.tokenizer to the tokenizer the run uses, so the config record names it and
  `clip_jax.evaluate --workdir` tokenizes as training did: the user's (a path made absolute), else what
  WORKDIR's config record names (a run resumes with the tokenizer it started with, also one recorded
  before init folders' own tokenizers were used), else `pretrained.training_tokenizer` (init.checkpoint's
  own, else 'clip'); process 0 prints the line when 'clip' is assumed for a folder."""
  given = cfg.data.get("tokenizer") or ""
  if given:  # a path made absolute: the record is read from any directory
    cfg.data.tokenizer = os.path.abspath(given) if os.path.exists(given) else given
    return
  recorded = loop.recorded_config(workdir).get("data.tokenizer") if workdir else None
  if recorded:  # whether it still exists: `check_resumed_tokenizer`, once a finished run has been told apart
    cfg.data.tokenizer = recorded
    return
  spec, note = pretrained.training_tokenizer(cfg)
  if note and jax.process_index() == 0:
    print(note, flush=True)
  cfg.data.tokenizer = spec


def check_resumed_tokenizer(cfg, workdir: str) -> None:
  """Raises clip_jax.cli.MissingPathError (one line) when the run resumes with the tokenizer its config record
  names (`resolve_tokenizer`) and that folder is gone. Called after `loop.check_workdir`: a finished run is
  said to be finished whatever became of its tokenizer."""
  from clip_jax.convert import check_recorded_tokenizer
  recorded = loop.recorded_config(workdir).get("data.tokenizer")
  if recorded and cfg.data.get("tokenizer") == recorded:
    # A resumed run tokenizes as it started: another tokenizer changes the maths, so it needs leave.
    check_recorded_tokenizer(workdir, recorded, "--config.data.tokenizer=DIR --allow-config-change")


def record_init_preprocessing(cfg) -> None:
  """Training preprocesses as OpenAI's CLIP whatever init.checkpoint states (the loader says so in one
  line when it states another, `convert.stated_preprocessing_note`). A run from such a folder records
  what the folder states as init.stated_preprocessing in its config record (a run from OpenAI-preprocessed
  weights records nothing new); `clip_jax.evaluate --workdir` then evaluates it as it was trained, OpenAI's."""
  from clip_jax.convert import read_stated_preprocessing
  from clip_jax.data.images import OPENAI
  checkpoint = (cfg.get("init") or {}).get("checkpoint")
  if not checkpoint:
    return
  try:
    preprocessing = read_stated_preprocessing(checkpoint)[0]
  except ValueError as e:  # training does not apply it: recorded as stated, unreadable or not
    preprocessing = str(e)
  if preprocessing != OPENAI:
    with cfg.unlocked():
      cfg.init.stated_preprocessing = preprocessing if isinstance(preprocessing, str) else (
          f"{preprocessing.describe()} (training preprocessed as OpenAI's CLIP)")


def validate_config(cfg) -> None:
  if cfg.total_steps < 1:
    raise ValueError(f"total_steps must be at least 1, not {cfg.total_steps}.")
  if cfg.global_batch % jax.process_count():
    raise ValueError(f"global_batch {cfg.global_batch} does not divide over {jax.process_count()} processes.")
  if cfg.global_batch % cfg.gradient_accumulation:
    raise ValueError(f"global_batch {cfg.global_batch} does not split into {cfg.gradient_accumulation} "
                     "micro-batches (gradient_accumulation).")
  if cfg.loss.kind not in ("softmax", "sigmoid", "softmax_ring"):
    raise ValueError(f"loss.kind must be softmax, sigmoid or softmax_ring, not '{cfg.loss.kind}'.")
  if cfg.dtype not in DTYPES or cfg.param_dtype not in DTYPES:
    raise ValueError(f"dtype / param_dtype must be one of {sorted(DTYPES)}.")


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str,
                       evaluators: list[Callable] | None = None, rerun_eval: bool = False) -> dict[str, Any]:
  """Trains (or resumes) to `cfg.total_steps`. Returns {'step', 'metrics' (the last logged training
  metrics), 'eval' (the evaluators' last results), 'preempted', 'state', 'model', 'mesh' (the mesh it ran
  on, for the results' settings)}.
  rerun_eval: a workdir already at total_steps is evaluated again (nothing else runs or is written).
  The CLI first calls `loop.check_workdir` (finished runs, the config record)."""
  validate_config(cfg)
  resolve_tokenizer(cfg, workdir)  # the CLI did, before its config record; a direct caller's is resolved here
  record_init_preprocessing(cfg)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  # --- mesh
  mesh = sharding.create_mesh(dict(cfg.mesh))
  rules = [tuple(r) for r in cfg.logical_axis_rules]
  sharding.check_batch_size(cfg.global_batch // cfg.gradient_accumulation, mesh, "a micro-batch (global_batch / "
                            "gradient_accumulation)")
  # --- model and state
  model = build_model(cfg)
  ckpt.write_model_config(workdir, model.config)
  if is_main:
    if not os.path.exists(os.path.join(workdir, loop.CONFIG_FILE)):  # the CLI's check_workdir wrote it already
      write_atomic(os.path.join(workdir, loop.CONFIG_FILE), cfg.to_json_best_effort(indent=2))
  lock = {k: cfg[k] for k in optim.LOCK_KEYS if k in cfg}
  lock = lock if lock.get("lock_image") or lock.get("lock_text") else None
  # A pretrained start (init.checkpoint) is checked and placed before anything compiles.
  init_from = pretrained.init_from_config(cfg.get("init"), workdir, model.config, model_overrides(cfg))
  # --- input: each process reads its own rows; they become one global batch over the batch axes. Opened
  # before anything compiles, so that a mistake in the data is said at once.
  data_iter = build_input(cfg, model)
  state, state_shardings, tx = create_train_state(model, cfg.optimizer, mesh, rules, jax.random.key(cfg.seed),
                                                  lock=lock, init_from=init_from)

  def next_batch(step):
    del step  # the iterator's position is checkpointed with the state
    local = next(data_iter)
    return sharding.place_local_batch({k: local[k] for k in ("image", "tokens")}, mesh)
  # --- the update step
  update = make_train_step(model, tx, loss_kind=cfg.loss.kind, mesh=mesh, microbatches=cfg.gradient_accumulation,
                           schedule=optim.learning_rate_schedule(cfg.optimizer),
                           frozen=optim.lock_mask(state["params"], **lock) if lock else None)
  # --- evaluators: every process runs them (sharded embedding passes) at the same steps
  hooks = []
  if evaluators and cfg.eval_every:
    hooks.append(loop.Hook("eval", cfg.eval_every, lambda step, state: _run_evaluators(evaluators, model, state, mesh)))
  peak_flops = cfg.get("peak_flops_per_device", 0.0) or None
  if peak_flops is None and cfg.get("measure_peak_flops", True):
    peak_flops = measure_peak_flops(DTYPES[cfg.dtype])
  # --- the loop
  result = loop.run(workdir=workdir, mesh=mesh, state=state, state_shardings=state_shardings, update=update,
                    next_batch=next_batch, options=loop.Options.from_config(cfg), data_iterator=data_iter,
                    hooks=hooks, examples_per_step=cfg.global_batch, peak_flops_per_device=peak_flops,
                    log_extras=lambda: data_quality_metrics(data_iter), rerun_hooks=rerun_eval)
  return {"step": result.step, "metrics": result.metrics, "eval": result.hook_metrics, "preempted": result.preempted,
          "state": result.state, "model": model, "mesh": mesh}


def data_quality_metrics(data_iter) -> dict[str, float]:
  """Skipped and repaired input records so far, per reason ('data/skipped/corrupt_image': 3)."""
  if isinstance(data_iter, SyntheticData):
    return {}
  from clip_jax.data.pipeline import quality_counts
  counts = quality_counts(data_iter)
  return {f"data/{kind}/{reason}": float(n) for kind in ("skipped", "repaired")
          for reason, n in counts[kind].items()}


def _run_evaluators(evaluators, model, state, mesh) -> dict[str, float]:
  variables = {"params": state["params"]}
  if "batch_stats" in state:
    variables["batch_stats"] = state["batch_stats"]
  results: dict[str, float] = {}
  for evaluator in evaluators:
    results.update(evaluator(model, variables, mesh))
  return results


@functools.lru_cache(maxsize=None)
def measure_peak_flops(dtype=jnp.bfloat16, size: int = 2048, repeats: int = 5) -> float:
  """The measured matmul throughput of one device in `dtype` (f32 accumulation), in the form the
  layers run it (`layers.dot_f32`: bf16 converted to f32 on a CPU without bf16 dots): MFU's denominator."""
  a = jnp.ones((size, size), dtype)
  f = jax.jit(lambda x, y: layers.dot_f32(x, y, (((1,), (0,)), ((), ()))))
  f(a, a).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    f(a, a).block_until_ready()
  return 2 * size ** 3 * repeats / (time.perf_counter() - start)


# ----------------------------------------------------------------------------- CLI
def main(argv):
  del argv
  from absl import flags
  if not flags.FLAGS["verbosity"].present:  # orbax logs every file it renames at INFO
    logging.set_verbosity(logging.WARNING)
  cfg, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  from clip_jax import cli
  cli.as_user_errors(validate_config, cfg)  # config mistakes: one line, before any compilation
  cli.as_user_errors(resolve_tokenizer, cfg, workdir)  # before the config record, which then names it
  record_init_preprocessing(cfg)
  rerun_eval = flags.FLAGS.rerun_eval
  if loop.check_workdir(workdir, cfg, total_steps=cfg.total_steps, allow_config_change=flags.FLAGS.allow_config_change,
                        rerun_eval=rerun_eval):
    return 0  # finished: said so, nothing touched
  cli.as_user_errors(check_resumed_tokenizer, cfg, workdir)
  evaluators = []
  if cfg.get("zeroshot_eval", None) and cfg.zeroshot_eval.get("enabled", False):
    from clip_jax.eval.zeroshot import build_training_evaluators
    # Its errors are about the configured zero-shot data (a path, class names, templates): one line each.
    evaluators = cli.as_user_errors(build_training_evaluators, cfg, workdir if jax.process_index() == 0 else None)
  line = zeroshot_line(evaluators, cfg.eval_every, own_data_hint=not zeroshot_sources_are_users(cfg))
  if jax.process_index() == 0 and line:
    print(line, flush=True)
  out = train_and_evaluate(cfg, workdir, evaluators, rerun_eval=rerun_eval)
  if out["preempted"]:
    return loop.EXIT_PREEMPTED  # saved; the same command resumes
  settings = {k: v for k, v in loop.flatten_config(cfg).items() if not loop.is_operational(k)}
  settings["mesh"] = dict(out["mesh"].shape)  # the mesh the run used: operational, but where it ran
  json_path, md_path = os.path.join(workdir, "results.json"), os.path.join(workdir, "results.md")
  if jax.process_index() == 0:
    write_results(workdir, out["step"], out["metrics"], out["eval"], settings)
    with open(md_path) as f:
      print(f.read())
    plots = sorted(os.listdir(os.path.join(workdir, "plots"))) if os.path.isdir(os.path.join(workdir, "plots")) else []
    print(f"Results: {json_path}, {md_path}\nPlots: {', '.join(os.path.join(workdir, 'plots', p) for p in plots)}\n"
          f"Checkpoints: {os.path.join(workdir, 'checkpoints')} ("
          + evaluate_hint(cfg, workdir) + ")")
  loop.mark_finished(workdir, out["step"], [json_path, md_path])
  return 0


def zeroshot_line(evaluators, eval_every: int, own_data_hint: bool = True) -> str | None:
  """The start's line on the zero-shot hook: what it evaluates and when, or that eval_every=0 turns it off
  (`:runlocal` does); None without one. Says it because a config's zero-shot data (the embedded digits in
  configs/clip/digits.py) stays when --config.data.source points the training at other data.
  `own_data_hint`: add how to evaluate on one's own images (not when the sources are the user's already)."""
  if not evaluators:
    return None
  names = ", ".join(evaluator.name for evaluator in evaluators)
  if not eval_every:
    return (f"Zero-shot evaluation is off (eval_every=0): {names} will not be evaluated; "
            "--config.eval_every=N turns it on.")
  hint = " (--config.zeroshot_eval.source=NAME=DATA for your own labelled test images)" if own_data_hint else ""
  return f"Zero-shot evaluation of {names} every {eval_every:,} steps and at the last{hint}."


def zeroshot_sources_are_users(cfg) -> bool:
  """Whether the configured zero-shot sources include data of the user's own (a path, or NAME=DATA),
  not only known datasets under their own names ('digits', 'cifar10', 'cifar10='): `zeroshot_sources`'
  own_data, the rule of the hook and of its closing `clip_jax.evaluate` hint."""
  from clip_jax.eval.zeroshot import zeroshot_sources
  return any(source.own_data for source in zeroshot_sources(cfg.get("zeroshot_eval", {})))


def evaluate_hint(cfg, workdir: str) -> str:
  """The closing line's `clip_jax.evaluate` command: the tasks of the configured zero-shot sources
  (`zeroshot.evaluate_tasks`), or NAME=DATA for the user to fill in when there are none."""
  from clip_jax import cli
  from clip_jax.eval.zeroshot import evaluate_tasks
  tasks = evaluate_tasks(cfg)
  command = cli.python_command("clip_jax.evaluate", "--workdir", workdir, "--tasks",
                               ",".join(tasks) or "zeroshot:NAME=DATA")
  return command + (" for the full evaluation" if tasks else
                    " for the full evaluation, DATA being your labelled test images (e.g. a folder of class sub-folders)")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/clip/*.py[:arg]).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go; resumes if it holds a checkpoint.")
  flags.mark_flags_as_required(["config", "workdir"])
  loop.define_flags()  # --allow-config-change, --rerun-eval
  from clip_jax import cli
  cli.run_absl(main)  # user mistakes: one line, exit code 2
