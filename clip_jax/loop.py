"""The one training loop every trainer runs on (CLIP, DreamBooth, the embedded SD pretraining).

A trainer contributes its setup (state, shardings), its update function and its hooks; the loop
owns what must hold for all of them:
- restore from the workdir into the target shardings (any device count or mesh shape), falling
  back past a corrupt newest checkpoint to the newest one that restores (`checkpoint.restore_newest`);
- the step loop, with one cadence rule (`every`: every N steps, and the last step);
- non-finite steps: a step whose loss or gradient norm is not finite is skipped inside the compiled
  step (parameters and optimizer state kept) and counted; `max_nonfinite_steps` in a row stop the
  run, and no checkpoint is written while a streak lasts, so the newest checkpoint is a good one;
- preemption: SIGTERM, and Ctrl-C (SIGINT; a second one ends the process at once), with one process;
  with several, jax.distributed's preemption sync point, so that every process saves the same step
  (a checkpoint is collective); trainers then exit with EXIT_PREEMPTED (75), a finished run with 0;
- runs that stay what they were (`check_workdir`, called by every trainer first): a finished workdir
  (DONE) is left as it is; the config a run started with is kept (config.json), and a resume that
  changes keys that change the maths is refused by name unless allowed (then recorded);
- metrics (metrics.jsonl + TensorBoard) and the progress bar on process 0, the loss plot at the end;
  on resume, metrics of steps after the restored checkpoint are dropped, so every curve is one line;
- hooks (evaluation, validation samples) that every process enters at the same steps, since they
  run jitted code on the mesh-wide state;
- closing the checkpoint manager, writer and progress bar in `finally`;
- JAX's persistent compilation cache, so a resumed run does not compile again.

The state is a dict holding at least 'step' (int32 scalar); `init_counters()` adds the non-finite
counters the loop keeps. An update function is `update(state, batch, *args) -> (state, metrics)`
where metrics hold scalar 'loss' and 'grad_norm'; the CLIP and DreamBooth updates end in
`update_if_finite`, which runs their optimizer step for finite steps only (on CPU cheaper than
undoing it afterwards).
"""
from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from clip_jax import checkpoint as ckpt
from clip_jax import cpu_gemm
from clip_jax.cli import user_cache_dir
from clip_jax.observe import MetricWriter, Progress, loss_curve_png


# ----------------------------------------------------------------------------- cadence
def every(step: int, period: int, total_steps: int) -> bool:
  """True at multiples of `period` (0: never) and at the last step."""
  return step == total_steps or (period > 0 and step % period == 0)


# ----------------------------------------------------------------------------- non-finite steps
def init_counters() -> dict[str, jax.Array]:
  """The entries the loop adds to a trainer's initial state."""
  return {"step": jnp.zeros((), jnp.int32), "nonfinite_streak": jnp.zeros((), jnp.int32),
          "nonfinite_total": jnp.zeros((), jnp.int32)}


def step_is_finite(metrics: dict[str, jax.Array]) -> jax.Array:
  """True (a bool scalar) where metrics' 'loss' and 'grad_norm' are both finite: a step to keep."""
  return jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])


def _kept_where(finite: jax.Array, new: Any, old: Any) -> Any:
  """`new` where `finite`, else `old`, leaf by leaf (same tree structure)."""
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def update_if_finite(state: dict[str, Any], metrics: dict[str, jax.Array],
                     apply: Callable[[dict[str, Any]], dict[str, Any]],
                     use_cond: bool | None = None) -> tuple[dict[str, Any], dict[str, jax.Array]]:
  """(apply(state), metrics) for a finite step (`step_is_finite(metrics)`), else (state, metrics) with
  every entry as it was; metrics gain 'skipped' (0 or 1, int32). `apply` is the optimizer step: it
  returns the whole new state (same tree structure) and is traced inside this function.
  use_cond: run `apply` under `lax.cond` (True) or select its result (False); None: cond on CPU.

  On CPU the step is a `lax.cond`: only the taken branch runs, and the optimizer writes parameters
  and moments in place. Why not update first and select the old values back afterwards (what
  `skip_nonfinite` does for an update that does not call this): then each parameter's update reads
  its moment's new value, which only exists inside the select, so XLA recomputes it there from the
  old moment, which the moment's own in-place update overwrites; XLA:CPU copied every moment
  first, 794 f32 copies (2 x 151M values) per ViT-B-32 step and 0.25 GiB more temporaries (jax
  0.10.2, `tests/test_loop.py` pins it). Elsewhere the select stays: XLA:GPU's conditional reads its
  predicate on the host, a device-to-host wait in the middle of the step.
  """
  finite = step_is_finite(metrics)
  if use_cond is None:
    use_cond = jax.default_backend() == "cpu"
  if use_cond:
    new_state = jax.lax.cond(finite, apply, lambda unchanged: unchanged, state)
  else:
    new_state = _kept_where(finite, apply(state), state)
  return new_state, dict(metrics, skipped=(~finite).astype(jnp.int32))


def skip_nonfinite(update: Callable) -> Callable:
  """`update(state, batch, *args) -> (new_state, metrics)` made safe: where metrics' 'loss' or
  'grad_norm' is not finite, every entry of the state but the step and the counters stays as it
  was (so NaNs never reach parameters or optimizer moments). Adds metrics['skipped'] (0 or 1).

  An update that already reports metrics['skipped'] has guarded its own state (`update_if_finite`);
  its state is taken as it is and only the step and the counters change.
  """
  counters = ("step", "nonfinite_streak", "nonfinite_total")

  def step(state, batch, *args):
    new_state, metrics = update(state, batch, *args)
    finite = step_is_finite(metrics)
    kept = {k: new_state[k] if "skipped" in metrics else _kept_where(finite, new_state[k], state[k])
            for k in new_state if k not in counters}
    kept.update(step=state["step"] + 1,
                nonfinite_streak=jnp.where(finite, 0, state["nonfinite_streak"] + 1),
                nonfinite_total=state["nonfinite_total"] + (~finite).astype(jnp.int32))
    return kept, dict(metrics, skipped=(~finite).astype(jnp.int32))
  return step


# ----------------------------------------------------------------------------- processes
def wait_for_all(name: str, timeout_s: float = 4 * 3600) -> None:
  """Returns when every process has called it with the same `name` (no-op with one process).
  Uses the coordination service's barrier, which may wait hours (class-image generation), not a
  device collective (whose transport may time out sooner)."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # the barrier is not public API; a collective is the fallback
  client = distributed.global_state.client
  if client is not None and hasattr(client, "wait_at_barrier"):
    wait_for_all.calls = getattr(wait_for_all, "calls", 0) + 1  # barrier ids must be unique per call
    client.wait_at_barrier(f"clip_jax.loop:{name}:{wait_for_all.calls}", int(timeout_s * 1000))
  else:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def sum_over_processes(value: int, name: str) -> int:
  """The sum of an integer over all processes; every process must call it (a barrier too)."""
  if jax.process_count() == 1:
    return value
  wait_for_all(name)
  from jax.experimental import multihost_utils
  return int(np.sum(multihost_utils.process_allgather(np.asarray(value, np.int64))))


# ----------------------------------------------------------------------------- compilation cache
def enable_compilation_cache(setting: str, workdir: str) -> str | None:
  """JAX's persistent compilation cache. setting: 'auto' (the user cache directory,
  $XDG_CACHE_HOME or ~/.cache, under clip_jax/jax), 'workdir' (WORKDIR/jax_cache), a path, or ''
  (off). Returns the directory used, or None."""
  if not setting:
    return None
  if setting == "auto" and jax.process_count() > 1:
    # Seen on CPU: one process loaded the step from the cache and entered its first collective while
    # another, missing the cache, still compiled for minutes; the collective timed out (SIGABRT).
    return None
  if setting == "auto":
    directory = user_cache_dir("jax")
  elif setting == "workdir":
    directory = os.path.join(workdir, "jax_cache")
  else:
    directory = setting
  if jax.config.jax_compilation_cache_dir != directory:
    jax.config.update("jax_compilation_cache_dir", directory)
    # Cache every compile that takes a noticeable time (the default skips those under 1 s).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return directory


# ----------------------------------------------------------------------------- hooks
@dataclasses.dataclass(frozen=True)
class Hook:
  """fn(step, state) -> metrics to log (or None), run on every process at the steps `every` picks
  (period 0: the last step only). fn may run jitted code on the sharded state: all processes call it."""
  name: str
  period: int
  fn: Callable[[int, Any], dict[str, float] | None]


@dataclasses.dataclass(frozen=True)
class Options:
  """The loop's settings, named as in every trainer's config (see WORKSPACE.md, 'One config vocabulary')."""
  total_steps: int
  log_every: int = 10
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  async_checkpoints: bool = True
  max_nonfinite_steps: int = 10
  progress_bar: bool = True
  compilation_cache: str = "auto"

  @classmethod
  def from_config(cls, cfg) -> "Options":
    """The shared fields of a trainer's ConfigDict (absent ones keep their defaults)."""
    names = [f.name for f in dataclasses.fields(cls)]
    return cls(**{n: cfg[n] for n in names if n in cfg})


@dataclasses.dataclass
class Result:
  step: int
  state: Any
  metrics: dict[str, float]            # the last logged training metrics
  hook_metrics: dict[str, float]       # the last values the hooks returned
  preempted: bool                      # stopped before total_steps by SIGTERM / Ctrl-C, saved
  stop_requested: bool = False         # a stop was asked for (also during the last step, which finishes the run):
                                       # a caller with more stages to run after this one stops there


# ----------------------------------------------------------------------------- runs: finished, interrupted, remembered
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: saved and stopped early (SIGTERM, Ctrl-C); the same command resumes
DONE_FILE = "DONE"                        # JSON {"step", "finished", "outputs"}: the trainer wrote its results
CONFIG_FILE = "config.json"               # the config the run was started with (changes: CONFIG_CHANGES_FILE)
# Records of a run's input files kept beside its config in CONFIG_FILE ({file name: content hash}; DreamBooth's
# photos, `dreambooth_jax.train.config_with_images`): compared on resume, but not settings to tabulate.
INPUT_RECORD_KEYS = ("instance_images", "class_images")
CONFIG_CHANGES_FILE = "config_changes.jsonl"
# Config keys (and groups) that change how a run is carried out, not what it computes: a resume may
# change them freely. Every other key (batch, model, loss, data, seed, optimizer and steps schedule,
# dtype, ...) changes the maths, and a resume that changes one is refused unless allowed.
OPERATIONAL_KEYS = ("log_every", "checkpoint_every", "keep_checkpoints", "async_checkpoints", "max_nonfinite_steps",
                    "eval_every", "progress_bar", "compilation_cache", "peak_flops_per_device", "measure_peak_flops",
                    "mesh", "logical_axis_rules", "gradient_accumulation", "remat", "zeroshot_eval", "validation",
                    "data.num_workers",
                    # What an init folder states but training does not apply (clip_jax.train.record_init_preprocessing).
                    "init.stated_preprocessing")


def define_flags() -> None:
  """The absl flags every trainer's command has: --allow-config-change and --rerun-eval (also with '_')."""
  from absl import flags
  flags.DEFINE_bool("allow_config_change", False, "resume even though config keys that change the result differ "
                    f"from the workdir's {CONFIG_FILE}; the change is recorded in {CONFIG_CHANGES_FILE}")
  flags.DEFINE_bool("rerun_eval", False, "on a finished workdir: evaluate its final checkpoint again (results are "
                    "merged into results.json); without it a finished run is left as it is")
  flags.DEFINE_alias("allow-config-change", "allow_config_change")
  flags.DEFINE_alias("rerun-eval", "rerun_eval")


def flatten_config(config: Any) -> dict[str, Any]:
  """A ConfigDict (or nested dict) as {dotted key: value}, values as JSON writes them."""
  import json
  tree = json.loads(config.to_json_best_effort() if hasattr(config, "to_json_best_effort")
                    else json.dumps(config, default=str))
  flat: dict[str, Any] = {}

  def walk(prefix: str, node: Any) -> None:
    if isinstance(node, dict) and node:
      for key, value in node.items():
        walk(f"{prefix}.{key}" if prefix else key, value)
    else:
      flat[prefix] = node
  walk("", tree)
  return flat


def is_operational(key: str) -> bool:
  return any(key == k or key.startswith(k + ".") for k in OPERATIONAL_KEYS)


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (old value, new value)} for every key whose value differs (absent: None)."""
  return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def saved_steps(workdir: str) -> list[int]:
  """The steps of WORKDIR/checkpoints' step folders, ascending (finalized or not)."""
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


def stage_steps(workdir: str) -> list[int]:
  """saved_steps of WORKDIR, or with none there, of its stage subfolders (a trainer whose stages each
  run the loop in WORKDIR/<stage>, like the embedded SD pretraining's vae/ and unet/), all together."""
  steps = saved_steps(workdir)
  if steps or not os.path.isdir(workdir):
    return steps
  return sorted(s for d in os.listdir(workdir) if os.path.isdir(os.path.join(workdir, d))
                for s in saved_steps(os.path.join(workdir, d)))


def finished(workdir: str) -> dict[str, Any] | None:
  """The DONE record of a run whose trainer wrote its results ({'step': N, ...}), or None."""
  import json
  path = os.path.join(workdir, DONE_FILE)
  if not os.path.exists(path):
    return None
  try:
    record = json.loads(open(path).read() or "{}")
  except ValueError:
    record = {}
  return record if isinstance(record, dict) else {"step": record}  # a sweep's DONE holds the step alone


def mark_finished(workdir: str, step: int, outputs: Sequence[str] = ()) -> None:
  """Writes WORKDIR/DONE on process 0 once a trainer has written its results: starting the same
  command again then says the run is finished and changes nothing (`check_workdir`)."""
  import json

  from clip_jax.observe import write_atomic
  if jax.process_index() == 0:
    write_atomic(os.path.join(workdir, DONE_FILE), json.dumps(
        {"step": int(step), "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "outputs": list(outputs)}) + "\n")


def recorded_config(workdir: str) -> dict[str, Any]:
  """The flattened config record (CONFIG_FILE) of a run in `workdir` that has saved a checkpoint (the
  settings a resume must keep); {} when there is none, or no checkpoint yet, or it cannot be read."""
  import json
  path = os.path.join(workdir, CONFIG_FILE)
  if not stage_steps(workdir) or not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      return flatten_config(json.load(f))
  except (OSError, ValueError):
    return {}


def check_workdir(workdir: str, config: Any, *, total_steps: int, allow_config_change: bool = False,
                  rerun_eval: bool = False, offers_rerun_eval: bool = True, log: Callable[[str], None] = print) -> bool:
  """What every trainer calls before it builds anything. Returns True when the run in `workdir` is
  finished (DONE at `total_steps` or later) and there is nothing to do: it says so in one line and
  leaves every file as it is (`rerun_eval` returns False instead: the trainer restores the final
  checkpoint, runs its evaluation and merges the results; a trainer without that option passes
  `offers_rerun_eval=False`, and the line does not offer it).

  The workdir keeps the config it was started with (CONFIG_FILE, written here on the first start).
  A workdir that holds a checkpoint (its own, or a stage's: `stage_steps`) and was made with other
  values of keys that change the maths (all but OPERATIONAL_KEYS) raises clip_jax.cli.UserError naming them, unless
  `allow_config_change`, which appends the change to CONFIG_CHANGES_FILE and updates CONFIG_FILE.
  Changes of operational keys are recorded the same way without asking. Every process calls it
  (the same answer everywhere); process 0 writes."""
  import json

  from clip_jax.cli import UserError
  from clip_jax.observe import write_atomic
  config_path = os.path.join(workdir, CONFIG_FILE)
  new = flatten_config(config)
  old = None
  if os.path.exists(config_path):
    try:
      old = flatten_config(json.load(open(config_path)))
    except ValueError:
      old = None  # a config.json cut short before this rule existed: written again below
  saved = stage_steps(workdir)
  changes = config_changes(old, new) if old is not None and saved else {}
  maths = {k: v for k, v in changes.items() if not is_operational(k)}
  if maths and not allow_config_change:
    shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(maths.items())[:8])
    more = f" and {len(maths) - 8} more" if len(maths) > 8 else ""
    raise UserError(f"{workdir} was trained with other settings ({shown}{more}); these change the result. Resume with "
                    f"the settings in {config_path}, use another --workdir, or pass --allow-config-change to "
                    f"continue with the new ones (recorded in {CONFIG_CHANGES_FILE}).")
  done = finished(workdir)
  complete = done is not None and int(done.get("step", 0)) >= total_steps
  if complete and maths:
    # Allowed, but nothing would train under the new settings: results would claim them falsely.
    raise UserError(f"{workdir} is finished (step {done.get('step')}); no step would run with the changed settings "
                    f"({', '.join(maths)}). Use another --workdir, or raise total_steps to train on with them.")
  if complete:
    if not rerun_eval:
      if jax.process_index() == 0:
        outputs = ", ".join(done.get("outputs") or []) or workdir
        log(f"{workdir} is finished (step {done.get('step')}); nothing was changed. Results: {outputs}."
            + (" --rerun-eval evaluates its final checkpoint again." if offers_rerun_eval else ""))
      return True
    return False  # re-evaluating: the record of how the run was made stays as it is
  if done is not None and jax.process_index() == 0:
    os.remove(os.path.join(workdir, DONE_FILE))  # more to train: the trainer marks it finished again
  # Written on a fresh start (also over the record of an attempt that saved nothing: it starts over
  # with these settings) and after a recorded change.
  if jax.process_index() == 0 and (old is None or changes or (not saved and old != new)):
    if changes:
      record = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "resumed_from_step": saved[-1],
                "allowed": bool(maths), "changes": {k: list(v) for k, v in changes.items()}}
      with open(os.path.join(workdir, CONFIG_CHANGES_FILE), "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
      if maths:
        log(f"Config changed on resume ({', '.join(maths)}), allowed by --allow-config-change; recorded in "
            f"{os.path.join(workdir, CONFIG_CHANGES_FILE)}.")
    os.makedirs(workdir, exist_ok=True)
    write_atomic(config_path, config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort")
                 else json.dumps(config, indent=2, default=str))
  return False


def _interrupt_handler(preempted: dict, multi_process: bool) -> Callable:
  """SIGINT (Ctrl-C) as a preemption: the first saves at the end of the step and stops (with several
  processes through jax's preemption notice, SIGTERM to this process, so all save the same step);
  the handler then gives SIGINT back to the system, so a second Ctrl-C ends the process at once."""
  def handler(signum, frame):
    del signum, frame
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if jax.process_index() == 0:
      # Several processes save at a step all of them can still reach: the one after the fastest one's
      # current step (jax's preemption sync point), so one or two more steps run.
      when = "at a step every process reaches (one or two steps on)" if multi_process else "after this step"
      print(f"\nInterrupted: saving a checkpoint {when}, then stopping (Ctrl-C again stops at once).", flush=True)
    if multi_process:
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      preempted["flag"] = True
  return handler


# ----------------------------------------------------------------------------- the loop
def run(*, workdir: str, mesh, state: Any, state_shardings: Any, update: Callable, next_batch: Callable[[int], Any],
        options: Options, args: Sequence[Any] = (), data_iterator: Any = None, hooks: Sequence[Hook] = (),
        examples_per_step: int | None = None, log_extras: Callable[[], dict[str, float]] | None = None,
        peak_flops_per_device: float | None = None, desc: str = "train",
        plot_keys: Sequence[str] = ("loss",), rerun_hooks: bool = False) -> Result:
  """Trains `state` (freshly initialised, in `state_shardings`) to `options.total_steps`, resuming
  from WORKDIR/checkpoints when it holds a checkpoint.

  update(state, batch, *args) -> (state, metrics): one step, not yet compiled; the loop wraps it
    in `skip_nonfinite` and compiles it with the state's shardings, donating the state. `args`
    (e.g. frozen parameters) are passed unchanged every step.
  next_batch(step) -> the batch for step `step` (0-based), already placed on the mesh
    (`sharding.place_local_batch` / `place_global_batch`).
  data_iterator: a grain iterator (or one with get_state/set_state) checkpointed with the state.
  examples_per_step: adds 'examples_per_sec' to the logged metrics; with peak_flops_per_device
    also 'mfu' (model FLOPs utilisation from XLA's cost analysis of the step).
  log_extras() -> more scalars for each log line (e.g. data-quality counts).
  A workdir already at `total_steps` is left as it is (no metrics, event files or plots written);
  rerun_hooks: then the hooks run once more on the final state (their values only returned).
  SIGTERM and SIGINT (Ctrl-C) stop the run after the current step with a checkpoint
  (Result.preempted; trainers exit with EXIT_PREEMPTED); a second Ctrl-C ends the process at once.
  One that arrives during the last step leaves the run finished (Result.preempted False,
  Result.stop_requested True: a caller with more stages after this run stops before them).
  Metrics of steps after the restored checkpoint (a killed attempt's) are dropped from
  metrics.jsonl and TensorBoard (`observe.MetricWriter(resume_step=)`).
  Raises FloatingPointError after `max_nonfinite_steps` non-finite steps in a row.
  """
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  enable_compilation_cache(options.compilation_cache, workdir)
  total = options.total_steps
  manager = ckpt.make_manager(workdir, max_to_keep=options.keep_checkpoints, async_save=options.async_checkpoints,
                              with_data=data_iterator is not None)
  writer = progress = previous_handler = previous_interrupt = None
  try:
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings)
    restored = ckpt.restore_newest(manager, abstract, data_iterator)
    if restored is not None:
      state, restored_step = restored
      if is_main:
        print(f"Resuming from the checkpoint of step {restored_step} in {workdir}", flush=True)
    step = int(jax.device_get(state["step"]))
    replicated = NamedSharding(mesh, P())
    step_fn = jax.jit(skip_nonfinite(update), in_shardings=(state_shardings,) + (None,) * (1 + len(args)),
                      out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    already_done = step >= total
    writer = MetricWriter(workdir, enabled=is_main and not already_done, resume_step=step)
    progress = Progress(total, step, enabled=is_main and options.progress_bar and not already_done, desc=desc)
    preempted = {"flag": False}
    # One process: our own SIGTERM flag. Several: jax.distributed's preemption sync manager catches
    # SIGTERM and picks one step at which every process saves; a Python handler would replace jax's.
    multi_process = jax.process_count() > 1
    if threading.current_thread() is threading.main_thread():
      previous_interrupt = signal.signal(signal.SIGINT, _interrupt_handler(preempted, multi_process))
      if not multi_process:
        previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.update(flag=True))
    last_metrics: dict[str, float] = {}
    hook_metrics: dict[str, float] = {}
    flops_per_step = None
    compiled = previous_metrics = None
    window_start, window_steps = time.perf_counter(), 0
    while step < total:
      batch = next_batch(step)
      if compiled is None:
        # Compiled ahead of the first step, then every process waits for the others: no process
        # enters the step's collectives while another is still compiling (their times can differ a lot).
        compiled = step_fn.lower(state, batch, *args).compile()
        flops_per_step = _step_flops(compiled) if peak_flops_per_device else None
        wait_for_all("first step compiled")
      state, metrics = compiled(state, batch, *args)
      # The host stays at most one step ahead of the device. JAX dispatches asynchronously, so between
      # two logged steps the host would otherwise queue up to log_every steps, and a stop (Ctrl-C,
      # SIGTERM) would wait for all of them before it saves. The next batch is still made while the
      # device runs this step.
      if previous_metrics is not None:
        jax.block_until_ready(previous_metrics)
      previous_metrics = metrics
      step += 1
      window_steps += 1
      progress.update(step)
      checkpoint_now = every(step, options.checkpoint_every, total)
      if every(step, options.log_every, total) or checkpoint_now:
        streak = int(jax.device_get(state["nonfinite_streak"]))
        if every(step, options.log_every, total):
          window_seconds = time.perf_counter() - window_start
          last_metrics = _log_line(metrics, state, window_steps, window_seconds,
                                   examples_per_step, flops_per_step, peak_flops_per_device, log_extras)
          writer.write(step, last_metrics)
          progress.set_postfix(loss=last_metrics["loss"])
          if is_main and not options.progress_bar:  # no bar (sweeps, logs): a line per logged step instead
            print(progress_line(desc, step, total, last_metrics.get("loss"), window_seconds / window_steps),
                  flush=True)
          window_start, window_steps = time.perf_counter(), 0
        if streak >= options.max_nonfinite_steps:
          # No checkpoint is written during a streak: the newest one holds the last good state.
          manager.wait_until_finished()
          raise FloatingPointError(
              f"{streak} training steps in a row had a non-finite loss or gradient (step {step}); stopping. "
              f"The last good checkpoint is step {manager.latest_step()} in {workdir}. Lower the learning "
              "rate or check the data.")
      for hook in hooks:
        if every(step, hook.period, total):
          values = hook.fn(step, state)
          if values:
            hook_metrics.update(values)
            writer.write(step, values)
      if multi_process:
        from jax.experimental import multihost_utils
        preempted["flag"] = multihost_utils.reached_preemption_sync_point(step)
      if checkpoint_now or preempted["flag"]:
        if int(jax.device_get(state["nonfinite_streak"])) == 0:
          ckpt.save(manager, step, state, data_iterator, force=True)
      if preempted["flag"] and step < total:
        manager.wait_until_finished()  # saved before it is said to be
        if is_main:
          progress.close()  # the line below starts on its own line, not inside the bar
          print(f"Stopped at step {step} of {total} (SIGTERM or Ctrl-C); the checkpoint is saved in {workdir}. "
                f"The same command resumes it (exit code {EXIT_PREEMPTED}).", flush=True)
        break
    # A stop asked for during the last step comes too late to stop anything: every step is done and
    # saved, so the run ends as finished (the trainer writes its results, exit 0), not as resumable.
    stopped_early = preempted["flag"] and step < total
    if preempted["flag"] and not stopped_early and is_main and not already_done:
      progress.close()
      print(f"A stop was asked for during the last step ({step} of {total}); the run is complete, so its "
            "results are written as usual.", flush=True)
    if already_done and rerun_hooks:
      for hook in hooks:  # the final state evaluated again; the run's own records stay as they are
        hook_metrics.update(hook.fn(step, state) or {})
  finally:
    manager.wait_until_finished()
    manager.close()
    if progress is not None:
      progress.close()
    if writer is not None:
      writer.close()
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)
    if previous_interrupt is not None:
      signal.signal(signal.SIGINT, previous_interrupt)
  if is_main and step >= total and not already_done:
    loss_curve_png(writer.jsonl_path, os.path.join(workdir, "plots", "loss.png"), keys=tuple(plot_keys))
  return Result(step=step, state=state, metrics=last_metrics, hook_metrics=hook_metrics, preempted=stopped_early,
                stop_requested=preempted["flag"])


def progress_line(desc: str, step: int, total: int, loss: float | None, seconds_per_step: float) -> str:
  """The line a run without a progress bar prints at each logged step, so that a slow run can be told
  from a hung one in a sweep's or a batch job's log: 'train: step 40 of 80, loss 2.312, 1.13 s/step'."""
  loss_part = f", loss {loss:.4g}" if loss is not None else ""
  return f"{desc}: step {step:,} of {total:,}{loss_part}, {seconds_per_step:.3g} s/step"


def _log_line(metrics, state, window_steps, elapsed, examples_per_step, flops_per_step, peak_flops,
              log_extras) -> dict[str, float]:
  out = {k: float(v) for k, v in jax.device_get(metrics).items()}
  out["nonfinite_total"] = float(jax.device_get(state["nonfinite_total"]))
  if examples_per_step:
    out["examples_per_sec"] = window_steps * examples_per_step / elapsed
  if flops_per_step and peak_flops:
    out["mfu"] = flops_per_step * window_steps / elapsed / (peak_flops * jax.device_count())
  if log_extras is not None:
    out.update(log_extras())
  return out


def _step_flops(compiled) -> float | None:
  """FLOPs of one compiled step over all devices, from XLA's cost analysis plus the MKL weight-gradient
  calls' (`cpu_gemm.call_flops`: the cost analysis counts nothing inside an FFI call)."""
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) + cpu_gemm.call_flops(compiled)
    return flops * jax.device_count() or None
  except Exception:  # Cost analysis is best-effort; some backends do not provide it.
    return None
