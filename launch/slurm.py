"""SLURM: an sbatch script from a run's settings, submitted with sbatch.

One task per GPU (`--ntasks-per-node` = GPUs per node): `jax.distributed.initialize()` in
launch.worker reads the SLURM variables (coordinator = first node, process id = task rank, one
local GPU per task). `srun --kill-on-bad-exit=1` ends every task when one fails, and SLURM sends
SIGTERM `--signal` seconds before the time limit, on which the trainer checkpoints and exits; with
`--requeue` the job then restarts and resumes from that checkpoint.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess


@dataclasses.dataclass
class SlurmSettings:
  job_name: str = "clip_jax"
  nodes: int = 1
  gpus_per_node: int = 8
  cpus_per_task: int | None = None
  time: str = "24:00:00"
  partition: str | None = None
  account: str | None = None
  log_dir: str = "slurm_logs"
  signal_s: int = 300          # SIGTERM this long before the time limit: time to checkpoint
  requeue: bool = True
  extra_sbatch: tuple[str, ...] = ()   # more '#SBATCH' options, e.g. '--qos=high'
  setup: str = "source .venv/bin/activate"  # runs on the first node before srun (modules, venv)


def worker_command(module: str, trainer_args: list[str], heartbeat_timeout: int = 20) -> list[str]:
  """What every task runs: jax detects the SLURM cluster, so no coordinator is given."""
  return ["python", "-m", "launch.worker", f"--module={module}", f"--heartbeat-timeout={heartbeat_timeout}",
          "--", *trainer_args]


def sbatch_script(settings: SlurmSettings, module: str, trainer_args: list[str], repo_dir: str) -> str:
  s = settings
  if s.nodes < 1 or s.gpus_per_node < 1:
    raise ValueError(f"nodes and gpus-per-node must be at least 1, got {s.nodes} and {s.gpus_per_node}.")
  lines = ["#!/bin/bash",
           f"#SBATCH --job-name={s.job_name}",
           f"#SBATCH --nodes={s.nodes}",
           f"#SBATCH --ntasks-per-node={s.gpus_per_node}",
           f"#SBATCH --gpus-per-node={s.gpus_per_node}",
           f"#SBATCH --time={s.time}",
           f"#SBATCH --output={s.log_dir}/%x-%j.out",
           f"#SBATCH --signal=TERM@{s.signal_s}"]
  if s.cpus_per_task:
    lines.append(f"#SBATCH --cpus-per-task={s.cpus_per_task}")
  if s.partition:
    lines.append(f"#SBATCH --partition={s.partition}")
  if s.account:
    lines.append(f"#SBATCH --account={s.account}")
  if s.requeue:
    lines.append("#SBATCH --requeue")
  lines += [f"#SBATCH {opt}" for opt in s.extra_sbatch]
  lines += ["set -euo pipefail",
            f"cd {shlex.quote(repo_dir)}"]
  if s.setup:
    lines.append(s.setup)
  lines += ["export PYTHONUNBUFFERED=1",
            "srun --kill-on-bad-exit=1 " + shlex.join(worker_command(module, trainer_args))]
  return "\n".join(lines) + "\n"


def submit(script: str, script_path: str, dry_run: bool, out, repo_dir: str) -> int:
  """Writes the script and runs `sbatch SCRIPT` from `repo_dir` (relative paths, the log directory
  included, are relative to it); with dry_run only prints both."""
  command = ["sbatch", script_path]
  if dry_run:
    print(f"# {script_path}", file=out)
    print(script, end="", file=out)
    print(shlex.join(command), file=out, flush=True)
    return 0
  path = os.path.join(repo_dir, script_path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(script)
  print(f"launch: wrote {path}; {shlex.join(command)}", file=out, flush=True)
  try:
    return subprocess.run(command, cwd=repo_dir, check=False).returncode
  except FileNotFoundError:
    raise SystemExit("launch: sbatch is not on PATH: run this on the cluster's login node "
                     f"(the script is in {script_path}).") from None
