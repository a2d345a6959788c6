"""Trainers run as child processes by the demos (`clip_jax.finetune_demo`, the embedded DreamBooth
pretraining and Table 3, `dreambooth_jax.embedded.clip_demos`), and the one rule for whether the CLIP
a demo needs is trained yet (`ensure_trained`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Callable, Sequence

from clip_jax.cli import UserError, python_command, shown_command

RESULTS_FILE = "results.json"  # what clip_jax.train writes when its run ends (before DONE existed, the only record)


class ChildFailed(UserError):
  """A child command exited with an error; its own message is already on stderr."""


class ChildSaved(KeyboardInterrupt):
  """A child trainer stopped early and saved its checkpoint: it exited with `loop.EXIT_PREEMPTED` (75),
  on a Ctrl-C of both or a SIGTERM of its own. The command that ran it exits with that code too
  (`clip_jax.cli`), so a script that resubmits on 75 treats a demo like a trainer."""
  exit_code = 75  # loop.EXIT_PREEMPTED (not imported here: loop imports jax; a test checks they agree)


def run_child(command: Sequence[str]) -> None:
  """Runs `command` and waits for it; raises ChildFailed (a one-line UserError naming the command and
  its exit status: the child has printed its own message above) when it fails.

  On Ctrl-C the child (same process group) gets the SIGINT too and a trainer then saves a checkpoint
  before it exits: wait for that, then stop with KeyboardInterrupt. (`subprocess.run` would kill the
  child 0.25 s after the Ctrl-C, losing the steps since its last checkpoint.) A second Ctrl-C
  while waiting stops the wait. A child that exits with 75 (a trainer that saved: resumable), after a
  Ctrl-C or a SIGTERM of its own, raises ChildSaved (a KeyboardInterrupt), which commands exit with
  as 75."""
  from clip_jax import loop
  process = subprocess.Popen(list(command))
  try:
    code = process.wait()
  except KeyboardInterrupt:
    try:
      code = process.wait()
    except KeyboardInterrupt:
      process.kill()
      raise
    if code == loop.EXIT_PREEMPTED:
      raise ChildSaved() from None
    raise
  if code == loop.EXIT_PREEMPTED:
    raise ChildSaved()
  if code:
    raise ChildFailed(f"`{shown_command(command)}` exited with status {code} (its own message is above)")


def train_child(config: str, workdir: str, *overrides: str) -> float:
  """`python -m clip_jax.train` in a child process (it resumes a workdir); returns seconds."""
  start = time.time()
  run_child([sys.executable, "-m", "clip_jax.train", f"--config={config}", f"--workdir={workdir}", *overrides])
  return time.time() - start


def is_trainer_workdir(path: str) -> bool:
  """Whether `path` is a folder a trainer of this project started: it holds `checkpoints/`,
  `metrics.jsonl`, or the trainer's config record (a config.json with `total_steps`; Hugging Face
  folders also hold a config.json, without that key)."""
  from clip_jax import loop
  if not os.path.isdir(path):
    return False
  if os.path.isdir(os.path.join(path, "checkpoints")) or os.path.exists(os.path.join(path, "metrics.jsonl")):
    return True
  try:
    with open(os.path.join(path, loop.CONFIG_FILE)) as f:
      record = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(record, dict) and "total_steps" in record


def is_finished(path: str) -> bool:
  """A run whose trainer wrote its results: its DONE record, or (from before DONE records) the
  results.json a trainer workdir gets at the end."""
  from clip_jax import loop
  if loop.finished(path) is not None:
    return True
  return is_trainer_workdir(path) and os.path.isfile(os.path.join(path, RESULTS_FILE))


def unfinished_warning(path: str, flag: str) -> str | None:
  """For a CLIP a demo takes as given (`flag` PATH, not trained by the demo): one warning line when
  PATH is a trainer workdir whose run has not finished (it loads at its last checkpoint, partly
  trained), else None."""
  from clip_jax import loop
  if not is_trainer_workdir(path) or is_finished(path):
    return None
  steps = loop.saved_steps(path)
  at = f"its last checkpoint, step {steps[-1]}" if steps else "no checkpoint yet"
  return (f"warning: {flag} {path} is an unfinished training run (no DONE record; {at}): used as it is, partly "
          "trained; rerun its training command with the same --workdir to finish it first")


def warn_if_unfinished(path: str, flag: str) -> str | None:
  """Prints `unfinished_warning(path, flag)` to stderr when there is one; returns it (or None)."""
  warning = unfinished_warning(path, flag)
  if warning:
    print(warning, file=sys.stderr, flush=True)
  return warning


def _print_now(line: str) -> None:
  print(line, flush=True)  # before the child's own output, which goes straight to the terminal


def ensure_trained(path: str, config: str, *overrides: str, log: Callable[[str], None] = _print_now) -> bool:
  """Makes `path` a usable CLIP for a demo; returns True when it ran the trainer (a child process).
  Raises ChildFailed (one line) when the trainer fails, e.g. on an unfinished workdir started with
  other settings (the trainer names them).

  - a finished run (its DONE record, or, from before DONE records, the trainer's results.json):
    used as it is;
  - nothing at `path`: trained with `config` (and `overrides`, e.g. '--config.seed=1');
  - a trainer workdir without DONE or results (interrupted): the same command resumes it from its
    last checkpoint to the end, so a Ctrl-C'd run is never used half-trained;
  - anything else (an exported or converted checkpoint: a file, an open_clip or Hugging Face
    folder): used as it is, never trained into.
  """
  if is_finished(path):
    log(f"{path}: a finished run, used as it is")
    return False
  command = python_command("clip_jax.train", f"--config={config}", f"--workdir={path}", *overrides)
  if not os.path.exists(path):
    log(f"{path}: nothing there yet, training it ({command})")
  elif is_trainer_workdir(path):
    log(f"{path}: an unfinished run (no DONE record), resuming it to the end ({command})")
  else:
    log(f"{path}: a checkpoint, not a trainer workdir: used as it is")
    return False
  train_child(config, path, *overrides)
  return True
