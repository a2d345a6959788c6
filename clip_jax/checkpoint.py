"""Training checkpoints (orbax): asynchronous, atomic, keep-N, with the input iterator's state.

A workdir holds `clip_config.json` (the model), `config.json` (the run) and `checkpoints/<step>/`
with `state` (params, optimizer state, step, RNG) and `data` (one JSON per process, grain's format).

Restoring reads into target shardings, so a workdir written on N devices opens on any other device
count or mesh shape. A newest checkpoint that does not restore (truncated iterator JSON, missing
array data) is moved to `checkpoints_corrupt/` with one WARNING line, and the newest one that
restores is used; orbax's leftover temporary folders of interrupted saves are removed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

MODEL_CONFIG_FILE = "clip_config.json"


def _data_handler():
  import grain  # The input pipeline's iterator state: per-process JSON files.
  return grain.checkpoint.CheckpointHandler()


def make_manager(workdir: str, *, max_to_keep: int = 3, async_save: bool = True,
                 with_data: bool = True) -> ocp.CheckpointManager:
  handlers = {"state": ocp.StandardCheckpointHandler()}
  if with_data:
    handlers["data"] = _data_handler()
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                         create=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options,
                               item_handlers=handlers)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any | None = None,
         force: bool = False) -> bool:
  args = {"state": ocp.args.StandardSave(state)}
  if data_iterator is not None:
    import grain
    args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  return manager.save(step, args=ocp.args.Composite(**args), force=force)


def restore(manager: ocp.CheckpointManager, abstract_state: Any, data_iterator: Any | None = None,
            step: int | None = None) -> tuple[Any, int]:
  """Restores into `abstract_state`'s shapes and shardings (and the iterator, in place)."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {manager.directory}.")
  args = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    import grain
    args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**args))
  return restored["state"], step


def _checkpoint_error(message: str) -> Exception:
  from clip_jax.weights import CheckpointError
  return CheckpointError(message)


def data_process_count(step_dir: str) -> int | None:
  """How many processes' input iterators a checkpoint step holds (grain: process_I-of-N.json)."""
  directory = os.path.join(step_dir, "data")
  if not os.path.isdir(directory):
    return None
  counts = {int(m.group(1)) for n in os.listdir(directory) if (m := re.search(r"-of-(\d+)", n))}
  return counts.pop() if len(counts) == 1 else None


def _all_processes_agree(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def restore_newest(manager: ocp.CheckpointManager, abstract_state: Any | Callable[[int], Any],
                   data_iterator: Any | None = None) -> tuple[Any, int] | None:
  """The newest checkpoint that restores, as (state, step); None when there is none.

  abstract_state: ShapeDtypeStructs with the target shardings (or a function of the step that
  returns them). A step that fails to restore is moved to WORKDIR/checkpoints_corrupt/ (so a later
  save of that step does not collide, and nothing is deleted), named in one WARNING line, and the
  next older one is tried. Raises CheckpointError when checkpoints exist but none restores, and
  when the iterator state was written by another number of processes (the input order would change).
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  directory = str(manager.directory)
  failures = []
  for step in steps:
    step_dir = os.path.join(directory, str(step))
    if data_iterator is not None:
      saved = data_process_count(step_dir)
      if saved is not None and saved != jax.process_count():
        raise _checkpoint_error(
            f"checkpoint step {step} in {directory} holds the input pipeline state of {saved} processes; this "
            f"run has {jax.process_count()}. Resume with {saved} processes (the data order depends on it), or "
            "start a new workdir.")
    abstract = abstract_state(step) if callable(abstract_state) else abstract_state
    try:
      result, error = (restore(manager, abstract, data_iterator, step), None)
    except Exception as e:  # noqa: BLE001 - any failure to read a step means: try an older one
      result, error = None, e
    if _all_processes_agree(error is None):
      break
    reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}" if error else "another process failed"
    failures.append((step, reason))
  else:
    raise _checkpoint_error(
        f"no checkpoint in {directory} restores (steps {', '.join(str(s) for s, _ in failures)}); the newest "
        f"failed with {failures[0][1]}. Move the checkpoints away to start afresh.")
  if failures:
    _set_aside(manager, [s for s, _ in failures])
    for bad, reason in failures:
      logging.warning("Checkpoint step %d in %s does not restore (%s); moved to %s_corrupt/; resuming from step %d.",
                      bad, directory, reason, directory, step)
  return result[0], step


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
  directory = str(manager.directory)
  if jax.process_index() == 0:
    target = directory + "_corrupt"
    os.makedirs(target, exist_ok=True)
    for step in steps:
      destination = os.path.join(target, str(step))
      if os.path.exists(destination):
        shutil.rmtree(destination)
      os.rename(os.path.join(directory, str(step)), destination)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("clip_jax.checkpoint: corrupt steps set aside")
  manager.reload()


def write_model_config(workdir: str, model_config) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, MODEL_CONFIG_FILE), "w") as f:
      json.dump(model_config.to_dict(), f, indent=2)


def step_folder(path: str) -> tuple[str, int] | None:
  """(workdir, step) for WORKDIR/checkpoints/STEP of a training workdir (one with its model config),
  else None: such a folder stands for that step's checkpoint wherever a checkpoint is taken."""
  parent, name = os.path.split(os.path.normpath(path))
  workdir = os.path.dirname(parent)
  if name.isdigit() and os.path.basename(parent) == "checkpoints" and os.path.isfile(
      os.path.join(workdir, MODEL_CONFIG_FILE)):
    return workdir, int(name)
  return None


def load_workdir(workdir: str, step: int | None = None, **module_kwargs):
  """(module, variables) from a training workdir's newest restorable (or the given) checkpoint, on
  this process's first device, whatever device count or mesh wrote it."""
  from clip_jax.models.clip import create_model
  from clip_jax.models.configs import CLIPConfig
  from clip_jax.weights import CheckpointError
  config_path = os.path.join(workdir, MODEL_CONFIG_FILE)
  if not os.path.exists(config_path):
    raise CheckpointError(f"{workdir}: not a training workdir of this project (no {MODEL_CONFIG_FILE}) "
                          "and not a Hugging Face model directory (no config.json).")
  with open(config_path) as f:
    model = create_model(CLIPConfig.from_dict(json.load(f)), **module_kwargs)
  # The data handler is registered (not restored) so that orbax does not warn about the item.
  manager = make_manager(workdir, with_data=True, async_save=False)
  try:
    if step is None:
      restored = restore_newest(manager, lambda s: single_device_abstract(manager, s))
      if restored is None:
        raise CheckpointError(f"{workdir}: holds no checkpoint yet.")
      state = restored[0]
    else:
      state, _ = restore(manager, single_device_abstract(manager, step), step=step)
  finally:
    manager.close()
  variables = {"params": state["params"]}
  if state.get("batch_stats"):
    variables["batch_stats"] = state["batch_stats"]
  return model, variables


def single_device_abstract(manager: ocp.CheckpointManager, step: int) -> Any:
  """The saved state's shapes and dtypes, placed on this process's first device (not the saved
  shardings: those name devices this process may not have)."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  metadata = manager.item_metadata(step)["state"]
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
