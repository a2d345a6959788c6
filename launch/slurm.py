"""SLURM: an sbatch script from a run's settings, submitted with sbatch, and the job's state.

One task per accelerator (`--ntasks-per-node` = GPUs per node by default; on CPU `--platform=cpu`
with `--devices-per-process` simulated devices per task). `jax.distributed.initialize()` in
launch.worker reads the SLURM variables (coordinator = first node, process id = task rank, one
local GPU per task). `srun --kill-on-bad-exit=1` ends every task when one fails, so a failing task
fails the job with its message in the log instead of leaving the others in a collective.

Preemption: SLURM sends SIGTERM to every task `signal_s` seconds before the time limit, as
`scancel --signal=TERM JOB` does at any time; the trainer then saves at a step all tasks agree on
and exits, and with `--requeue` (or a resubmission) the job resumes from that checkpoint. Do not
signal the batch step (`scancel --full` / `--batch`): srun answers SIGTERM by SIGKILLing its tasks
(srun(1)), so the job then resumes from its last periodic checkpoint instead.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
import time

from launch.worker import HEARTBEAT_TIMEOUT_S, PEER_LOST_EXIT_CODE

# Job states after which a job does not run again (squeue/sacct/scontrol spellings).
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE")


@dataclasses.dataclass
class SlurmSettings:
  job_name: str = "clip_jax"
  nodes: int = 1
  gpus_per_node: int = 8                 # 0: ask for no GPUs (CPU tasks)
  ntasks_per_node: int | None = None     # default: one task per GPU (one when there are none)
  cpus_per_task: int | None = None
  time: str = "24:00:00"
  partition: str | None = None
  account: str | None = None
  log_dir: str = "slurm_logs"            # relative to the directory the job starts in
  signal_s: int = 300          # SIGTERM this long before the time limit: time to checkpoint
  requeue: bool = True
  extra_sbatch: tuple[str, ...] = ()   # more '#SBATCH' options, e.g. '--qos=high'
  setup: str = ""              # shell lines run on the first node before srun (module load, ...)
  env: dict[str, str] = dataclasses.field(default_factory=dict)   # exported before srun
  python: str = sys.executable  # the interpreter the tasks run: the launcher's own (a shared filesystem)

  def tasks_per_node(self) -> int:
    return self.ntasks_per_node or self.gpus_per_node or 1


def worker_command(module: str, trainer_args: list[str], heartbeat_timeout: int = HEARTBEAT_TIMEOUT_S,
                   python: str = "python") -> list[str]:
  """What every task runs: jax detects the SLURM cluster, so no coordinator is given."""
  return [python, "-m", "launch.worker", f"--module={module}", f"--heartbeat-timeout={heartbeat_timeout}",
          "--", *trainer_args]


def sbatch_script(settings: SlurmSettings, module: str, trainer_args: list[str], run_dir: str,
                  heartbeat_timeout: int = HEARTBEAT_TIMEOUT_S) -> str:
  """The batch script: starts in `run_dir` (relative --workdir, --config and log paths resolve there)."""
  s = settings
  if s.nodes < 1 or s.gpus_per_node < 0 or s.tasks_per_node() < 1:
    raise ValueError(f"nodes and tasks per node must be at least 1 and gpus-per-node at least 0, got "
                     f"{s.nodes}, {s.tasks_per_node()} and {s.gpus_per_node}.")
  lines = ["#!/bin/bash",
           f"#SBATCH --job-name={s.job_name}",
           f"#SBATCH --nodes={s.nodes}",
           f"#SBATCH --ntasks-per-node={s.tasks_per_node()}"]
  if s.gpus_per_node:
    lines.append(f"#SBATCH --gpus-per-node={s.gpus_per_node}")
  lines += [f"#SBATCH --time={s.time}",
            f"#SBATCH --output={s.log_dir}/%x-%j.out",
            "#SBATCH --open-mode=append",   # a requeued job adds to its log instead of replacing it
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
            f"cd {shlex.quote(run_dir)}"]
  if s.setup:
    lines.append(s.setup)
  lines.append("export PYTHONUNBUFFERED=1")
  lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(s.env.items())]
  lines.append("srun --kill-on-bad-exit=1 " + shlex.join(worker_command(module, trainer_args, heartbeat_timeout,
                                                                         s.python)))
  return "\n".join(lines) + "\n"


def log_path(settings: SlurmSettings, job_id: str, run_dir: str) -> str:
  """Where the job's output goes (the script's `--output`, with %x and %j filled in)."""
  return os.path.join(run_dir, settings.log_dir, f"{settings.job_name}-{job_id}.out")


def kept_script_path(script_path: str, job_id: str) -> str:
  """Where a submitted job's script is kept: 'slurm_logs/run.sbatch' -> 'slurm_logs/run-JOBID.sbatch', beside
  its log 'run-JOBID.out', so a resubmission (which writes `script_path` again) leaves it as it ran."""
  extension = next((e for e in (".sbatch", ".sh") if script_path.endswith(e)), "")  # not the '.1' of 'lr=0.1'
  return f"{script_path[:len(script_path) - len(extension)]}-{job_id}{extension or '.sbatch'}"


def _run(command: list[str]) -> str | None:
  """stdout of a SLURM client command, or None when it fails or is not installed."""
  try:
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
  except (FileNotFoundError, subprocess.TimeoutExpired):
    return None
  return done.stdout.strip() if done.returncode == 0 else None


def job_state(job_id: str) -> tuple[str, str | None]:
  """(state, exit code 'N:SIGNAL' or None) of a job: squeue while it is queued or running, then
  `scontrol show job` (kept for MinJobAge after the end), then sacct (needs accounting); ('UNKNOWN',
  None) when none of them knows it."""
  queued = _run(["squeue", "-h", "-j", job_id, "-o", "%T"])
  if queued:
    return queued.split()[0], None
  shown = _run(["scontrol", "show", "job", job_id])
  if shown:
    state = re.search(r"\bJobState=(\S+)", shown)
    code = re.search(r"\bExitCode=(\S+)", shown)
    if state:
      return state.group(1), code.group(1) if code else None
  accounted = _run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,ExitCode"])
  if accounted:
    state, _, code = accounted.splitlines()[0].partition("|")
    return state.split()[0], code or None
  return "UNKNOWN", None


def wait_for_job(job_id: str, poll_s: float = 2.0, out=None) -> tuple[str, str | None]:
  """Polls until the job reaches a final state; prints each change of state."""
  last = None
  while True:
    state, code = job_state(job_id)
    if state != last and out is not None:
      print(f"launch: job {job_id} is {state}", file=out, flush=True)
    last = state
    if state in FINAL_STATES:
      return state, code
    time.sleep(poll_s)


def exit_status(state: str, code: str | None) -> int:
  """A process exit code for a finished job: 0 when COMPLETED, else its own code (or 1)."""
  if state == "COMPLETED":
    return 0
  number, _, sig = (code or "").partition(":")
  if number.isdigit() and int(number):
    return int(number)
  if sig.isdigit() and int(sig):
    return 128 + int(sig)
  return 1


def end_line(job_id: str, state: str, code: str | None, log: str) -> str:
  """The launcher's last line for a job that ended, with what exit codes 75 and 69 mean."""
  from launch.local import PREEMPTED
  meaning, status = "", exit_status(state, code)
  if status == PREEMPTED:
    meaning = (f": {PREEMPTED} = stopped early (preempted, or scancel --signal=TERM) with a checkpoint saved; "
               "submitting the same command again resumes it")
  elif status == PEER_LOST_EXIT_CODE:
    meaning = (f": {PEER_LOST_EXIT_CODE} = a task found another gone and stopped without saving (the log says "
               "which and why); submitting the same command again resumes from the last checkpoint saved, or starts "
               "again if there is none")
  return f"launch: job {job_id} ended {state}" + (f" (exit code {code}{meaning})" if code else "") + f"; log: {log}"


def submit(script: str, script_path: str, settings: SlurmSettings, run_dir: str, dry_run: bool = False,
           wait: bool = False, out=None) -> int:
  """Writes the script and runs `sbatch SCRIPT` from `run_dir` (relative paths, the log directory
  included, are relative to it), then moves the script to `kept_script_path` (named by the job id) and
  prints the job id, its state and its log; with `wait`, follows the job to its end and returns its exit
  status (75 for a job whose tasks saved and stopped early). With dry_run only prints the script and command."""
  out = out or sys.stdout
  command = ["sbatch", "--parsable", script_path]
  if dry_run:
    print(f"# {script_path}", file=out)
    print(script, end="", file=out)
    print(shlex.join(command), file=out, flush=True)
    return 0
  path = os.path.join(run_dir, script_path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  os.makedirs(os.path.join(run_dir, settings.log_dir), exist_ok=True)  # sbatch does not create it
  with open(path, "w") as f:
    f.write(script)
  print(f"launch: wrote {path}; {shlex.join(command)}", file=out, flush=True)
  try:
    done = subprocess.run(command, cwd=run_dir, capture_output=True, text=True, check=False)
  except FileNotFoundError:
    raise SystemExit("launch: sbatch is not on PATH: run this on the cluster's login node "
                     f"(the script is in {path}).") from None
  if done.returncode:
    print(f"launch: sbatch failed with exit code {done.returncode}: {done.stderr.strip()}", file=out, flush=True)
    return done.returncode
  job_id = done.stdout.strip().split(";")[0]   # --parsable prints 'ID' or 'ID;CLUSTER'
  kept = kept_script_path(path, job_id)
  os.replace(path, kept)  # sbatch has read the script (written here): this job's copy is kept under its own name
  state, _ = job_state(job_id)
  print(f"launch: submitted job {job_id} ({state}); log: {log_path(settings, job_id, run_dir)}\n"
        f"launch: its script: {kept}; follow it with `squeue -j {job_id}` or `sacct -j {job_id}`; "
        f"`scancel --signal=TERM {job_id}` makes every task save a checkpoint and stop (submit again to resume).",
        file=out, flush=True)
  if not wait:
    return 0
  state, code = wait_for_job(job_id, out=out)
  print(end_line(job_id, state, code, log_path(settings, job_id, run_dir)), file=out, flush=True)
  return exit_status(state, code)
