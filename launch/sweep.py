r"""Ablation sweeps: a sweep file lists config overrides; each becomes one run with its own workdir.

    python -m launch.sweep configs/sweeps/digits_batch_size.py --root=workdirs/bs_sweep
    python -m launch.sweep SWEEP.py --base-config=configs/clip/digits.py --root=DIR --dry-run
    python -m launch.sweep SWEEP.py --root=DIR --emit=slurm --nodes=1 --gpus-per-node=8 --partition=gpu
    python -m launch.sweep SWEEP.py --root=DIR --num-processes=2 --devices-per-process=4 -- --config.log_every=5
    python -m launch.sweep SWEEP.py --base-config=configs/dreambooth/default.py --root=DIR \
        -- --config.pretrained_model=SD_DIR --config.instance_dir=PHOTOS --config.class_noun=dog

A sweep file is Python, like a config: `get_sweep()` returns a list of override dicts
({'global_batch': 64, 'seed': 1, 'optimizer.learning_rate': 1e-3}), built with `grid`, `zipped`,
`product`, `seeds` and `fixed` below. It may set `BASE_CONFIG` (used when --base-config is not given).
Both trainers share the config vocabulary (total_steps, global_batch, ...), so a sweep works the same
for CLIP and DreamBooth; the trainer module follows the base config's folder (configs/clip/ ->
clip_jax.train, configs/dreambooth/ -> dreambooth_jax.train) unless --module is given.

Runs go one after another into ROOT/NAME, NAME made of the overrides that vary across the sweep
('global_batch=64_seed=1'). A run counts as finished when its workdir holds DONE or a checkpoint
of the final step; finished runs are skipped, so re-running an interrupted sweep resumes the
interrupted run from its checkpoint and goes on. Unknown options (and everything after `--`) go to
launch.run / the trainer. `python -m launch.results ROOT` makes the table and plot.

The sweep stops at the first run that was interrupted (SIGTERM, Ctrl-C: the run saved and exited
with 75; the sweep then exits 75 too) or that crashed (exit 1; --keep-going goes on to the next runs
after a crash). ROOT/sweep.json records how the runs were made; re-running the sweep with overrides
that change the maths (per run, or the trainer arguments after `--`) is refused with the keys named
unless --allow-config-change, which records the change there and passes the flag to the trainers.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import os
import re
import sys
from typing import Any, Iterable

from clip_jax.cli import python_command
from launch import local as launcher_local
from launch.local import REPO_ROOT
from launch.worker import split_trainer_args

DONE_FILE = "DONE"
SWEEP_FILE = "sweep.json"
Overrides = dict[str, Any]


# ----------------------------------------------------------------------------- helpers for sweep files
def grid(**axes: Iterable[Any]) -> list[Overrides]:
  """Every combination: grid(a=[1, 2], b=[3, 4]) -> 4 runs."""
  keys = list(axes)
  return [dict(zip(keys, values)) for values in itertools.product(*(list(axes[k]) for k in keys))]


def zipped(**axes: Iterable[Any]) -> list[Overrides]:
  """Values taken together: zipped(a=[1, 2], b=[3, 4]) -> 2 runs {a: 1, b: 3}, {a: 2, b: 4}."""
  columns = {k: list(v) for k, v in axes.items()}
  lengths = {len(v) for v in columns.values()}
  if len(lengths) > 1:
    raise ValueError(f"zipped() needs lists of one length, got {({k: len(v) for k, v in columns.items()})}.")
  return [dict(zip(columns, values)) for values in zip(*columns.values())]


def product(*sweeps: list[Overrides]) -> list[Overrides]:
  """Every combination of runs from several sweeps, their overrides merged (later ones win)."""
  return [dict(itertools.chain.from_iterable(d.items() for d in combo)) for combo in itertools.product(*sweeps)]


def seeds(sweep: list[Overrides], n_or_seeds: int | Iterable[int], key: str = "seed") -> list[Overrides]:
  """Each run of `sweep` repeated with seeds 0..n-1 (or the given seeds)."""
  values = range(n_or_seeds) if isinstance(n_or_seeds, int) else list(n_or_seeds)
  return product(sweep, [{key: s} for s in values])


def fixed(**overrides: Any) -> list[Overrides]:
  """One set of overrides for every run: product(fixed(total_steps=100), grid(...))."""
  return [dict(overrides)]


# ----------------------------------------------------------------------------- expansion
@dataclasses.dataclass
class Run:
  name: str
  overrides: Overrides
  workdir: str


def _format_value(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:g}"
  if isinstance(value, (list, tuple)):
    return "x".join(_format_value(v) for v in value)
  return str(value)


def run_names(sweep: list[Overrides]) -> list[str]:
  """Readable, unique, file-system-safe names from the overrides that vary across the sweep."""
  keys = list(dict.fromkeys(k for overrides in sweep for k in overrides))
  varying = [k for k in keys if len({repr(o.get(k)) for o in sweep}) > 1]
  short = {k: k.rsplit(".", 1)[-1] for k in varying}
  if len(set(short.values())) < len(short):  # 'a.lr' and 'b.lr' both vary: keep the full keys
    short = {k: k for k in varying}
  names = []
  for overrides in sweep:
    parts = [f"{short[k]}={_format_value(overrides[k])}" for k in varying if k in overrides]
    names.append(re.sub(r"[^A-Za-z0-9._=+-]", "-", "_".join(parts)) or "run")
  seen: dict[str, int] = {}
  unique = []
  for name in names:  # equal overrides twice: number them rather than share a workdir
    seen[name] = seen.get(name, 0) + 1
    unique.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
  return unique


def _load_module(path: str, what: str):
  if not os.path.exists(path):
    raise SystemExit(f"sweep: {what} {path} does not exist.")
  if REPO_ROOT not in sys.path:  # config files import configs.clip.common
    sys.path.insert(0, REPO_ROOT)
  name = "_launch_" + re.sub(r"\W", "_", os.path.abspath(path))
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_sweep(path: str) -> tuple[list[Overrides], str | None]:
  """(the list of override dicts, the file's BASE_CONFIG or None)."""
  module = _load_module(path, "sweep file")
  if not hasattr(module, "get_sweep"):
    raise SystemExit(f"sweep: {path} defines no get_sweep(); it should return a list of override dicts.")
  sweep = module.get_sweep()
  if not isinstance(sweep, list) or not sweep or not all(isinstance(o, dict) for o in sweep):
    raise SystemExit(f"sweep: {path}: get_sweep() must return a non-empty list of dicts, got {type(sweep).__name__}.")
  return sweep, getattr(module, "BASE_CONFIG", None)


def load_config(base_config: str):
  """The ConfigDict of 'path.py[:arg]', as the trainer's --config flag would build it."""
  path, _, arg = base_config.partition(":")
  module = _load_module(path, "base config")
  return module.get_config(arg) if arg else module.get_config()


def apply_overrides(cfg, overrides: Overrides, origin: str):
  for key, value in overrides.items():
    target = cfg
    *path, leaf = key.split(".")
    for part in path:
      if part not in target:
        raise SystemExit(f"sweep: {origin}: '{key}' is not a field of the base config (no '{part}').")
      target = target[part]
    if leaf not in target:
      raise SystemExit(f"sweep: {origin}: '{key}' is not a field of the base config.")
    target[leaf] = value
  return cfg


def _config_flags(trainer_args: list[str]) -> Overrides:
  """--config.KEY=VALUE among extra trainer arguments, as strings."""
  flags = {}
  for arg in trainer_args:
    match = re.fullmatch(r"--config\.([\w.]+)=(.*)", arg)
    if match:
      flags[match.group(1)] = match.group(2)
  return flags


def cli_value(value: Any) -> str:
  """A value as ml_collections' --config.KEY=VALUE parser reads it."""
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))
  return str(value)


TRAINERS = {"clip": "clip_jax.train", "dreambooth": "dreambooth_jax.train"}


def trainer_module(base_config: str) -> str | None:
  """The trainer of a base config by its folder: configs/<system>/... -> TRAINERS[system]."""
  folder = os.path.basename(os.path.dirname(os.path.abspath(base_config.partition(":")[0])))
  return TRAINERS.get(folder)


def trainer_args(run: Run, base_config: str, extra: list[str]) -> list[str]:
  return [f"--config={base_config}", f"--workdir={run.workdir}",
          *[f"--config.{k}={cli_value(v)}" for k, v in run.overrides.items()], *extra]


def final_step(base_config: str, overrides: Overrides, extra: list[str]) -> int:
  cfg = apply_overrides(load_config(base_config), overrides, "override")
  steps = _config_flags(extra).get("total_steps", cfg.total_steps)
  return int(steps)


def checkpoint_steps(workdir: str) -> list[int]:
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def done_step(workdir: str) -> int | None:
  """The step WORKDIR/DONE names (the trainers' JSON record, or a bare step), or None."""
  path = os.path.join(workdir, DONE_FILE)
  if not os.path.exists(path):
    return None
  try:
    record = json.loads(open(path).read() or "0")
  except ValueError:
    return 0
  return int(record.get("step", 0) if isinstance(record, dict) else record)


def is_finished(workdir: str, total_steps: int) -> bool:
  if (done_step(workdir) or 0) >= total_steps:  # a DONE of fewer steps: the run was made longer since
    return True
  steps = checkpoint_steps(workdir)
  return bool(steps) and steps[-1] >= total_steps


def status(workdir: str, total_steps: int) -> str:
  if is_finished(workdir, total_steps):
    return "done"
  steps = checkpoint_steps(workdir)
  return f"resume from step {steps[-1]}" if steps else "new"


def stop_line(name: str, workdir: str, total_steps: int) -> str:
  """The sweep's last line after run `name` stopped early (exit 75 or 130): where the run stands."""
  if is_finished(workdir, total_steps):  # the stop came during its last step: the run finished first
    where, then = f"finished all {total_steps} steps before the stop", "go on with the next runs"
  elif checkpoint_steps(workdir):
    where = f"stopped at step {checkpoint_steps(workdir)[-1]} of {total_steps} (saved; the same command resumes)"
    then = "resume it"
  else:
    where, then = "stopped before its first checkpoint (nothing saved)", "start it again"
  return f"sweep: {name} {where}; the sweep stops here. Run the same command again to {then}."


def expand(sweep_path: str, root: str, base_config: str | None = None) -> tuple[list[Run], str]:
  sweep, file_base = load_sweep(sweep_path)
  base = base_config or file_base
  if not base:
    raise SystemExit(f"sweep: give --base-config (the sweep file {sweep_path} sets no BASE_CONFIG).")
  # The trainers' rule for a config path (`cli.packaged_config`): a BASE_CONFIG of 'configs/...' not under
  # this directory is the packaged one, as `launch.run --config=configs/...` reads it from anywhere.
  from clip_jax.cli import packaged_config
  base = packaged_config(base)
  cfg = load_config(base)
  for i, overrides in enumerate(sweep):  # unknown keys fail here, before any run starts
    apply_overrides(cfg.copy_and_resolve_references(), overrides, f"run {i} of {sweep_path}")
  runs = [Run(name, overrides, os.path.join(root, name)) for name, overrides in zip(run_names(sweep), sweep)]
  return runs, base


def write_sweep_record(root: str, sweep_path: str, base_config: str, runs: list[Run], extra: list[str],
                       changes: dict[str, list] | None = None) -> None:
  """ROOT/sweep.json, written whole; `changes` (allowed ones) are appended to its 'changes' list."""
  from clip_jax.observe import write_atomic
  os.makedirs(root, exist_ok=True)
  path = os.path.join(root, SWEEP_FILE)
  history = json.load(open(path)).get("changes", []) if os.path.exists(path) else []
  if changes:
    import time
    history.append({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "changes": changes})
  record = {"sweep": sweep_path, "base_config": base_config, "trainer_args": extra,
            "runs": [{"name": r.name, "overrides": r.overrides, "workdir": r.workdir} for r in runs],
            **({"changes": history} if history else {})}
  write_atomic(path, json.dumps(record, indent=2, default=str) + "\n")


def _config_file(spec: str | None) -> tuple[str, str] | None:
  """(the real path of a 'path.py[:arg]' config, its argument) as the trainers find it from here: a sweep
  first run from the repository records 'configs/...', one run from elsewhere the packaged absolute path."""
  if not spec:
    return None
  from clip_jax.cli import packaged_config
  path, _, arg = packaged_config(spec).partition(":")
  return os.path.realpath(path), arg


def sweep_changes(root: str, base_config: str, runs: list[Run], extra: list[str]) -> dict[str, list]:
  """How this invocation differs from ROOT/sweep.json in what changes the maths: {what: [before,
  after]} for the base config, each `--config.KEY` after `--`, and each run's overrides (runs of
  the same name). Keys that change only how runs are carried out (`clip_jax.loop.is_operational`)
  do not count. Empty without a sweep.json."""
  path = os.path.join(root, SWEEP_FILE)
  if not os.path.exists(path):
    return {}
  from clip_jax.loop import is_operational
  old = json.load(open(path))
  changes: dict[str, list] = {}
  if _config_file(old.get("base_config")) != _config_file(base_config):
    changes["base_config"] = [old.get("base_config"), base_config]

  def compare(prefix: str, before: dict, after: dict) -> None:
    for key in sorted(set(before) | set(after)):
      if not is_operational(key) and str(before.get(key, "(not given)")) != str(after.get(key, "(not given)")):
        changes[f"{prefix}{key}"] = [before.get(key, "(not given)"), after.get(key, "(not given)")]
  compare("--config.", _config_flags(old.get("trainer_args", [])), _config_flags(extra))
  previous = {r["name"]: r["overrides"] for r in old.get("runs", [])}
  for run in runs:
    if run.name in previous:
      compare(f"{run.name}: ", previous[run.name], run.overrides)
  return changes


# ----------------------------------------------------------------------------- CLI
def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                              epilog="Other options go to launch.run (e.g. --num-processes, --nodes); "
                                     "arguments after '--' go to every run's trainer.")
  p.add_argument("sweep", help="the sweep file (defines get_sweep())")
  p.add_argument("--root", required=True, help="directory that holds one workdir per run")
  p.add_argument("--base-config", default=None, help="config file[:arg] every run starts from")
  p.add_argument("--dry-run", action="store_true", help="list the runs and what would run; start nothing")
  p.add_argument("--emit", choices=("local", "slurm"), default="local",
                 help="local: run here one after another (default); slurm: one sbatch job per unfinished run")
  p.add_argument("--keep-going", action="store_true",
                 help="go on to the next runs after a run that crashed (an interrupted run always stops the sweep)")
  p.add_argument("--allow-config-change", action="store_true",
                 help="re-run even though overrides that change the result differ from ROOT/sweep.json (recorded "
                      "there; the trainers get the same flag)")
  return p


def main(argv: list[str] | None = None, out=None) -> int:
  from launch import run as launcher
  out = out or sys.stdout
  own, extra = split_trainer_args(list(sys.argv[1:] if argv is None else argv))
  args, launcher_args = parser().parse_known_args(own)
  args.root = os.path.abspath(args.root)  # cluster jobs start in the repository, not here
  runs, base = expand(args.sweep, args.root, args.base_config)
  changes = sweep_changes(args.root, base, runs, extra)
  if changes and not args.allow_config_change:
    from clip_jax.cli import UserError
    shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changes.items())[:8])
    raise UserError(f"{args.root} was swept with other settings ({shown}{' ...' if len(changes) > 8 else ''}); "
                    f"give the same overrides as {os.path.join(args.root, SWEEP_FILE)}, another --root, or "
                    "--allow-config-change to go on with these (recorded in sweep.json).")
  run_extra = [*extra, "--allow_config_change"] if changes else extra
  if not args.dry_run:
    write_sweep_record(args.root, args.sweep, base, runs, extra, changes)
  sweep_name = os.path.basename(os.path.normpath(args.root))
  module = trainer_module(base)
  if module and not any(a == "--module" or a.startswith("--module=") for a in launcher_args):
    launcher_args = [f"--module={module}", *launcher_args]
  failed, interrupted = [], False
  try:
    _run_all(args, runs, base, extra, run_extra, launcher, launcher_args, sweep_name, failed, out)
  except _Interrupted:
    interrupted = True
  except KeyboardInterrupt:  # Ctrl-C between runs (during a run the launcher forwards it to the trainer)
    interrupted = True
    print("sweep: interrupted; the sweep stops here. Run the same command again to resume.", file=out, flush=True)
  if failed:
    print(f"sweep: {len(failed)} run(s) failed: {', '.join(failed)}. Re-running the sweep retries them.",
          file=out, flush=True)
    return 1
  if interrupted:
    return launcher_local.PREEMPTED
  if not args.dry_run and args.emit == "local":
    print(f"sweep: all {len(runs)} runs finished. Table: {python_command('launch.results', args.root)}", file=out,
          flush=True)
  return 0


class _Interrupted(Exception):
  """A run stopped early with a checkpoint (exit 75): the sweep stops."""


def _run_all(args, runs, base, extra, run_extra, launcher, launcher_args, sweep_name, failed, out) -> None:
  for i, run in enumerate(runs):
    total = final_step(base, run.overrides, extra)
    state = status(run.workdir, total)
    print(f"sweep: [{i + 1}/{len(runs)}] {run.name}: {state}", file=out, flush=True)
    if state == "done":
      continue
    run_launcher_args = list(launcher_args)
    if args.emit == "slurm":
      run_launcher_args += ["--mode=slurm", f"--job-name={sweep_name}-{run.name}",
                            f"--script={os.path.join(args.root, 'slurm', run.name + '.sbatch')}"]
    run_trainer_args = trainer_args(run, base, run_extra)
    if args.dry_run and args.emit == "local":  # the command that would run, as it would run
      print("  " + python_command("launch.run", *run_launcher_args, "--", *run_trainer_args), file=out, flush=True)
      continue
    command = [*run_launcher_args, *(["--dry-run"] if args.dry_run else []), "--", *run_trainer_args]
    code = launcher.launch(command, out=out)
    if args.emit == "slurm" or args.dry_run:
      if code:
        failed.append(run.name)
      continue
    if code == 0 and is_finished(run.workdir, total):
      if (done_step(run.workdir) or 0) < total:  # the trainers write their own
        with open(os.path.join(run.workdir, DONE_FILE), "w") as f:
          f.write(f"{total}\n")
      continue
    if code in (0, launcher_local.PREEMPTED, launcher_local.INTERRUPTED):  # stopped early (SIGTERM, Ctrl-C)
      print(stop_line(run.name, run.workdir, total), file=out, flush=True)
      raise _Interrupted
    failed.append(run.name)
    print(f"sweep: {run.name} failed (exit code {code}); its log is above." +
          ("" if args.keep_going else " The sweep stops here (--keep-going goes on)."), file=out, flush=True)
    if not args.keep_going:
      break


if __name__ == "__main__":
  from clip_jax import cli
  cli.run(main)  # user mistakes: one line, exit code 2
