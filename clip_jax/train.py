r"""CLIP training: one mesh, sharded exact contrastive loss, exact gradient accumulation, resume.

    python -m clip_jax.train --config=configs/clip/digits.py --workdir=/tmp/digits \
        [--config.total_steps=500 --config.model.name=ViT-Tiny ...]

A workdir that already holds a checkpoint resumes from it: parameters, optimizer state, step,
RNG and the input iterator continue where they stopped, so a killed run ends where an
uninterrupted one would (bitwise on CPU).
"""
from __future__ import annotations

import functools
import json
import os
import signal
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
from clip_jax import losses, optim, sharding
from clip_jax.models.clip import CLIP, create_model
from clip_jax.observe import MetricWriter, Progress, loss_curve_png

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# ----------------------------------------------------------------------------- model
def build_model(cfg: ml_collections.ConfigDict) -> CLIP:
  m = cfg.model
  overrides = m.get("overrides", None)
  overrides = overrides.to_dict() if isinstance(overrides, ml_collections.ConfigDict) else dict(overrides or {})
  if cfg.loss.kind == "sigmoid" and "init_logit_bias" not in overrides:
    # SigLIP's init: scale 10, bias -10 (the bias offsets the many negatives at the start).
    overrides["init_logit_bias"] = losses.SIGLIP_INIT_BIAS
    overrides.setdefault("init_logit_scale", losses.SIGLIP_INIT_LOG_SCALE)
  return create_model(m.name, dtype=DTYPES[m.dtype], param_dtype=DTYPES[m.param_dtype], remat=m.remat,
                      **overrides)


def dummy_inputs(model: CLIP, batch: int = 1):
  cfg = model.config
  return (jnp.zeros((batch, cfg.vision.image_size, cfg.vision.image_size, 3), jnp.float32),
          jnp.zeros((batch, cfg.text.context_length), jnp.int32))


# ----------------------------------------------------------------------------- state
def create_train_state(model: CLIP, opt_cfg, mesh, rules, rng: jax.Array):
  """Parameters and optimizer state created directly in their shardings.

  Returns (state, state_shardings, optimizer). The state is a dict: step, params, batch_stats
  (ResNets), opt_state, rng, and the non-finite step counters.
  """
  init_rng, train_rng = jax.random.split(rng)
  abstract_vars = jax.eval_shape(lambda r: model.init(r, *dummy_inputs(model)), init_rng)
  var_shardings = sharding.logical_shardings(abstract_vars, mesh, rules)
  abstract_params = nn.meta.unbox(abstract_vars["params"])
  tx = optim.make_optimizer(opt_cfg, abstract_params)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = NamedSharding(mesh, P())
  state_shardings = {
      "step": replicated,
      "params": var_shardings["params"],
      "opt_state": sharding.shard_like_params(abstract_opt, abstract_params, var_shardings["params"], mesh),
      "rng": replicated,
      "nonfinite_streak": replicated,
      "nonfinite_total": replicated,
  }
  if "batch_stats" in abstract_vars:
    state_shardings["batch_stats"] = var_shardings["batch_stats"]

  def init(init_rng, train_rng):
    variables = nn.meta.unbox(model.init(init_rng, *dummy_inputs(model)))
    state = {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
             "opt_state": tx.init(variables["params"]), "rng": train_rng,
             "nonfinite_streak": jnp.zeros((), jnp.int32), "nonfinite_total": jnp.zeros((), jnp.int32)}
    if "batch_stats" in variables:
      state["batch_stats"] = variables["batch_stats"]
    return state

  state = jax.jit(init, out_shardings=state_shardings)(init_rng, train_rng)
  return state, state_shardings, tx


# ----------------------------------------------------------------------------- the step
def _split_microbatches(x: jax.Array, k: int) -> jax.Array:
  """[B, ...] -> [k, B/k, ...] where micro-batch i takes rows i, i+k, i+2k, ...: every device
  keeps its own rows (each holds a contiguous block of the batch), so no data moves."""
  return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)


def _merge_microbatches(x: jax.Array) -> jax.Array:
  """Inverse of `_split_microbatches`: [k, B/k, ...] -> [B, ...] in the original row order."""
  return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def make_loss_and_grad(model: CLIP, *, loss_kind: str, mesh, batch_axes, microbatches: int = 1):
  """A function (params, batch_stats, images, tokens) -> (loss, grads, new_batch_stats, aux).

  With k > 1 micro-batches the gradient is still the one of the full batch (contrastive losses do
  not decompose over micro-batches): embeddings of all micro-batches first, without keeping
  activations; then the loss and its gradient w.r.t. the embeddings over the full batch; then each
  micro-batch's towers again, pulled back with its slice of that cotangent (`jax.vjp`).
  """
  has_bias = model.config.init_logit_bias is not None
  emb_sharding = NamedSharding(mesh, P(tuple(batch_axes)))

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
    micro_images, micro_tokens = _split_microbatches(images, k), _split_microbatches(tokens, k)

    def embed(_, xs):  # Pass 1: embeddings only; nothing is kept for a backward pass.
      (image_emb, text_emb), _ = towers(params, batch_stats, *xs)
      return None, (image_emb, text_emb)
    _, (image_k, text_k) = jax.lax.scan(embed, None, (micro_images, micro_tokens))
    bias = params.get("logit_bias", jnp.zeros((), jnp.float32))
    loss, (g_image, g_text, g_scale, g_bias) = jax.value_and_grad(loss_on_embeddings, argnums=(0, 1, 2, 3))(
        _merge_microbatches(image_k), _merge_microbatches(text_k), params["logit_scale"], bias)

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
        (micro_images, micro_tokens, _split_microbatches(g_image, k), _split_microbatches(g_text, k)))
    grads = dict(grads)
    grads["logit_scale"] = grads["logit_scale"] + g_scale
    if has_bias:
      grads["logit_bias"] = grads["logit_bias"] + g_bias
    return loss, grads, new_stats

  return one_pass if microbatches == 1 else accumulated


def make_train_step(model: CLIP, tx, *, loss_kind: str, mesh, batch_axes, microbatches: int,
                    schedule: Callable[[jax.Array], jax.Array]):
  loss_and_grad = make_loss_and_grad(model, loss_kind=loss_kind, mesh=mesh, batch_axes=batch_axes,
                                     microbatches=microbatches)

  def train_step(state, batch):
    params = state["params"]
    loss, grads, new_stats = loss_and_grad(params, state.get("batch_stats"), batch["image"], batch["tokens"])
    grad_norm = optax.tree.norm(grads)
    # A non-finite loss or gradient skips the update (and is counted); the caller stops the run
    # when too many come in a row.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = dict(state)
    new_state.update(step=state["step"] + 1, params=keep(new_params, params),
                     opt_state=keep(new_opt_state, state["opt_state"]),
                     nonfinite_streak=jnp.where(finite, 0, state["nonfinite_streak"] + 1),
                     nonfinite_total=state["nonfinite_total"] + (~finite).astype(jnp.int32))
    if new_stats is not None:
      new_state["batch_stats"] = keep(new_stats, state["batch_stats"])
    metrics = {"loss": loss, "grad_norm": grad_norm, "logit_scale": losses.clamp_logit_scale(params["logit_scale"]),
               "learning_rate": schedule(state["step"]), "skipped": (~finite).astype(jnp.int32)}
    if "logit_bias" in params:
      metrics["logit_bias"] = params["logit_bias"]
    return new_state, metrics

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
  """The per-process training iterator (grain, or synthetic)."""
  per_process = cfg.global_batch // jax.process_count()
  image_size, context_length = model.config.vision.image_size, model.config.text.context_length
  if cfg.data.source == "synthetic":
    return SyntheticData(per_process, image_size, context_length, cfg.seed)
  from clip_jax import data as clip_data
  from clip_jax.tokenizer import get_tokenizer
  tokenizer = get_tokenizer(cfg.data.get("tokenizer", "clip"), context_length=context_length)
  source = clip_data.open_source(cfg.data.source, cfg.data.get("split", "train"),
                                 data_dir=cfg.data.get("data_dir", None), image_size=image_size)
  dataset = clip_data.make_pipeline(source, tokenizer, batch_size=per_process, image_size=image_size, train=True,
                                    seed=cfg.seed, num_workers=cfg.data.get("num_workers", 0),
                                    crop_scale=tuple(cfg.data.get("crop_scale", (0.9, 1.0))))
  return iter(dataset)


# ----------------------------------------------------------------------------- main loop
def validate_config(cfg) -> None:
  if cfg.global_batch % jax.process_count():
    raise ValueError(f"global_batch {cfg.global_batch} does not divide over {jax.process_count()} processes.")
  if cfg.global_batch % cfg.microbatches:
    raise ValueError(f"global_batch {cfg.global_batch} does not split into {cfg.microbatches} micro-batches.")
  if cfg.loss.kind not in ("softmax", "sigmoid", "softmax_ring"):
    raise ValueError(f"loss.kind must be softmax, sigmoid or softmax_ring, not '{cfg.loss.kind}'.")
  if cfg.model.dtype not in DTYPES or cfg.model.param_dtype not in DTYPES:
    raise ValueError(f"model.dtype / param_dtype must be one of {sorted(DTYPES)}.")


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str,
                       evaluators: list[Callable] | None = None) -> dict[str, Any]:
  """Trains (or resumes) to `cfg.total_steps`; returns the final metrics and evaluation results."""
  validate_config(cfg)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  # --- mesh
  mesh = sharding.create_mesh(dict(cfg.mesh))
  rules = [tuple(r) for r in cfg.logical_axis_rules]
  batch_axes = tuple(a for a in sharding.BATCH_AXES if mesh.shape[a] > 1) or (sharding.BATCH_AXES[0],)
  data_sharding = NamedSharding(mesh, P(sharding.BATCH_AXES))
  # --- model and state
  model = build_model(cfg)
  ckpt.write_model_config(workdir, model.config)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json_best_effort(indent=2))
  state, state_shardings, tx = create_train_state(model, cfg.optimizer, mesh, rules, jax.random.key(cfg.seed))
  schedule = optim.learning_rate_schedule(cfg.optimizer)
  # --- input and checkpoint
  data_iter = build_input(cfg, model)
  manager = ckpt.make_manager(workdir, max_to_keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoints)
  if manager.latest_step() is not None:
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings)
    state, restored_step = ckpt.restore(manager, abstract, data_iter)
    if is_main:
      print(f"Resuming from the checkpoint of step {restored_step} in {workdir}", flush=True)
  start_step = int(jax.device_get(state["step"]))
  # --- the compiled step
  train_step = make_train_step(model, tx, loss_kind=cfg.loss.kind, mesh=mesh, batch_axes=batch_axes,
                               microbatches=cfg.microbatches, schedule=schedule)
  batch_shardings = {"image": data_sharding, "tokens": data_sharding}
  step_fn = jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                    out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=(0,))
  # --- observability
  writer = MetricWriter(workdir, enabled=is_main)
  flops_per_step = None
  peak_flops = cfg.get("peak_flops_per_device", 0.0) or None
  progress = Progress(cfg.total_steps, start_step, enabled=is_main and cfg.get("progress_bar", True))
  preempted = {"flag": False}
  # One process: our own SIGTERM flag. Several: jax.distributed's preemption sync manager catches
  # SIGTERM and picks one step at which every process saves (a checkpoint is collective); a Python
  # handler would replace jax's.
  multi_process = jax.process_count() > 1
  previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.update(flag=True)) \
      if _in_main_thread() and not multi_process else None
  evaluators = list(evaluators or [])
  results: dict[str, Any] = {}
  last_metrics: dict[str, float] = {}
  step = start_step
  window_start, window_steps = time.perf_counter(), 0
  try:
    while step < cfg.total_steps:
      local = next(data_iter)
      batch = to_global_batch({k: local[k] for k in ("image", "tokens")}, mesh, sharding.BATCH_AXES)
      if flops_per_step is None:
        flops_per_step = _step_flops(step_fn, state, batch)
        if peak_flops is None and cfg.get("measure_peak_flops", True):
          peak_flops = measure_peak_flops(DTYPES[cfg.model.dtype])
      state, metrics = step_fn(state, batch)
      step += 1
      window_steps += 1
      progress.update(step)
      if step % cfg.log_every == 0 or step == cfg.total_steps:
        metrics = jax.device_get(metrics)
        elapsed = time.perf_counter() - window_start
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["images_per_sec"] = window_steps * cfg.global_batch / elapsed
        if flops_per_step and peak_flops:
          metrics["mfu"] = flops_per_step * window_steps / elapsed / (peak_flops * jax.device_count())
        streak = int(jax.device_get(state["nonfinite_streak"]))
        metrics["nonfinite_total"] = float(jax.device_get(state["nonfinite_total"]))
        metrics.update(data_quality_metrics(data_iter))
        writer.write(step, metrics)
        progress.set_postfix(loss=metrics["loss"], img_s=metrics["images_per_sec"])
        last_metrics = metrics
        window_start, window_steps = time.perf_counter(), 0
        if streak >= cfg.max_nonfinite_steps:
          # Stop before any checkpoint of the broken state: the last good one stays the latest.
          raise FloatingPointError(
              f"{streak} training steps in a row had a non-finite loss or gradient (step {step}); stopping. "
              f"The last good checkpoint is step {manager.latest_step()} in {workdir}. Lower the learning "
              "rate or check the data.")
      if cfg.eval_every and evaluators and (step % cfg.eval_every == 0 or step == cfg.total_steps):
        results = _run_evaluators(evaluators, model, state, mesh, step, writer)
      if multi_process:
        from jax.experimental import multihost_utils
        preempted["flag"] = multihost_utils.reached_preemption_sync_point(step)
      if step % cfg.checkpoint_every == 0 or step == cfg.total_steps or preempted["flag"]:
        if int(jax.device_get(state["nonfinite_streak"])) == 0:
          ckpt.save(manager, step, state, data_iter if hasattr(data_iter, "get_state") else None, force=True)
      if preempted["flag"]:
        logging.warning("SIGTERM: saved step %d; exiting so the job can be resumed.", step)
        break
  finally:
    manager.wait_until_finished()
    manager.close()
    progress.close()
    writer.close()
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)
  if is_main and step >= cfg.total_steps:
    loss_curve_png(writer.jsonl_path, os.path.join(workdir, "plots", "loss.png"))
  return {"step": step, "metrics": last_metrics, "eval": results, "preempted": preempted["flag"],
          "state": state, "model": model, "mesh": mesh}


def to_global_batch(local: dict, mesh, batch_axes) -> dict:
  """Per-process rows -> global arrays split over the batch axes (the pipeline's helper)."""
  from clip_jax.data.pipeline import to_global_batch as pipeline_to_global
  return pipeline_to_global(local, mesh, tuple(batch_axes))


def data_quality_metrics(data_iter) -> dict[str, float]:
  """Skipped and repaired input records so far, per reason ('data/skipped/corrupt_image': 3)."""
  if isinstance(data_iter, SyntheticData):
    return {}
  from clip_jax.data.pipeline import quality_counts
  counts = quality_counts(data_iter)
  return {f"data/{kind}/{reason}": float(n) for kind in ("skipped", "repaired")
          for reason, n in counts[kind].items()}


def _run_evaluators(evaluators, model, state, mesh, step, writer) -> dict[str, float]:
  variables = {"params": state["params"]}
  if "batch_stats" in state:
    variables["batch_stats"] = state["batch_stats"]
  results: dict[str, float] = {}
  for evaluator in evaluators:
    results.update(evaluator(model, variables, mesh))
  writer.write(step, results)
  return results


def _in_main_thread() -> bool:
  import threading
  return threading.current_thread() is threading.main_thread()


def _step_flops(step_fn, state, batch) -> float | None:
  """FLOPs of one compiled step over all devices, from XLA's cost analysis."""
  try:
    cost = step_fn.lower(state, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) * jax.device_count() or None
  except Exception:  # Cost analysis is best-effort; some backends do not provide it.
    return None


@functools.lru_cache(maxsize=None)
def measure_peak_flops(dtype=jnp.bfloat16, size: int = 2048, repeats: int = 5) -> float:
  """The measured matmul throughput of one device in `dtype` (f32 accumulation): MFU's denominator."""
  a = jnp.ones((size, size), dtype)
  f = jax.jit(lambda x, y: jax.lax.dot(x, y, preferred_element_type=jnp.float32))
  f(a, a).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    f(a, a).block_until_ready()
  return 2 * size ** 3 * repeats / (time.perf_counter() - start)


# ----------------------------------------------------------------------------- CLI
def write_results(workdir: str, out: dict[str, Any]) -> tuple[str, str]:
  """results.json (what sweeps and `launch.results` gather) and a Markdown table of the run."""
  summary = {"step": out["step"], **{f"train/{k}": v for k, v in out["metrics"].items()}, **out["eval"]}
  json_path, md_path = os.path.join(workdir, "results.json"), os.path.join(workdir, "results.md")
  with open(json_path, "w") as f:
    json.dump(summary, f, indent=2)
  rows = [("final training loss", out["metrics"].get("loss")), ("steps", out["step"])]
  rows += [(k, v) for k, v in out["eval"].items()]
  with open(md_path, "w") as f:
    f.write("| metric | value |\n| --- | --- |\n")
    f.writelines(f"| {k} | {v:.4f} |\n" if isinstance(v, float) else f"| {k} | {v} |\n" for k, v in rows)
  return json_path, md_path


def main(argv):
  del argv
  from absl import flags
  if not flags.FLAGS["verbosity"].present:  # orbax logs every file it renames at INFO
    logging.set_verbosity(logging.WARNING)
  cfg, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  from clip_jax import cli
  cli.as_user_errors(validate_config, cfg)  # config mistakes: one line, before any compilation
  evaluators = []
  if cfg.get("zeroshot_eval", None) and cfg.zeroshot_eval.get("enabled", False):
    from clip_jax.eval.zeroshot import build_training_evaluators
    evaluators = build_training_evaluators(cfg, workdir if jax.process_index() == 0 else None)
  out = train_and_evaluate(cfg, workdir, evaluators)
  if jax.process_index() == 0 and not out["preempted"]:
    json_path, md_path = write_results(workdir, out)
    with open(md_path) as f:
      print(f.read())
    plots = sorted(os.listdir(os.path.join(workdir, "plots"))) if os.path.isdir(os.path.join(workdir, "plots")) else []
    print(f"Results: {json_path}, {md_path}\nPlots: {', '.join(os.path.join(workdir, 'plots', p) for p in plots)}\n"
          f"Checkpoints: {os.path.join(workdir, 'checkpoints')} (python -m clip_jax.evaluate --workdir {workdir} "
          "--tasks zeroshot:digits,linear_probe:digits for the full evaluation)")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/clip/*.py[:arg]).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go; resumes if it holds a checkpoint.")
  flags.mark_flags_as_required(["config", "workdir"])
  from clip_jax import cli
  cli.run_absl(main)  # user mistakes: one line, exit code 2
