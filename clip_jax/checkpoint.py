"""Training checkpoints (orbax): asynchronous, atomic, keep-N, with the input iterator's state.

A workdir holds `clip_config.json` (the model), `config.json` (the run) and `checkpoints/<step>/`
with `state` (params, optimizer state, step, RNG) and `data` (one JSON per process, grain's format).
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

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
                                         create=True)
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


def write_model_config(workdir: str, model_config) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, MODEL_CONFIG_FILE), "w") as f:
      json.dump(model_config.to_dict(), f, indent=2)


def load_workdir(workdir: str, step: int | None = None, **module_kwargs):
  """(module, variables) from a training workdir's latest (or given) checkpoint, on one device."""
  from clip_jax.models.clip import create_model
  from clip_jax.models.configs import CLIPConfig
  from clip_jax.weights import CheckpointError
  config_path = os.path.join(workdir, MODEL_CONFIG_FILE)
  if not os.path.exists(config_path):
    raise CheckpointError(f"{workdir}: not a training workdir of this project (no {MODEL_CONFIG_FILE}) "
                          "and not a Hugging Face model directory (no config.json).")
  with open(config_path) as f:
    model = create_model(CLIPConfig.from_dict(json.load(f)), **module_kwargs)
  manager = make_manager(workdir, with_data=False, async_save=False)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"{workdir}: holds no checkpoint yet.")
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  state = restored["state"]
  variables = {"params": state["params"]}
  if state.get("batch_stats"):
    variables["batch_stats"] = state["batch_stats"]
  manager.close()
  return model, jax.tree.map(jax.numpy.asarray, variables)
