r"""Start a training run: here, as N local processes, on a SLURM cluster, or on a TPU pod slice.

    python -m launch.run -- --config=configs/clip/digits.py --workdir=/tmp/digits
    python -m launch.run --mode=processes --num-processes=2 --devices-per-process=4 \
        -- --config=configs/clip/digits.py --workdir=/tmp/digits_2x4
    python -m launch.run --mode=slurm --nodes=4 --gpus-per-node=8 --time=12:00:00 --partition=gpu \
        --dry-run -- --config=configs/clip/paper.py:ViT-B-32 --workdir=/checkpoints/vit_b32
    python -m launch.run --mode=slurm --nodes=1 --ntasks-per-node=2 --platform=cpu --devices-per-process=4 \
        --wait -- --config=configs/clip/digits.py:runlocal --workdir=/shared/digits_slurm
    python -m launch.run --mode=tpu --tpu-name=my-v4-32 --zone=us-central2-b --dry-run \
        -- --config=configs/clip/paper.py:ViT-B-32 --workdir=gs://bucket/vit_b32

Everything after `--` goes to the trainer (`--module`, default clip_jax.train; also
dreambooth_jax.train). `--dry-run` prints exactly what would run and starts nothing. A run whose
workdir holds a checkpoint resumes from it, whichever way it is launched. A SLURM job starts in the
directory this command runs in; `scancel --signal=TERM JOB` makes every task save and stop (with
`--wait` this command then exits 75, as the local modes do; submitting it again resumes).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

from launch import local, slurm, tpu
from launch.worker import DEFAULT_MODULE, HEARTBEAT_TIMEOUT_S, split_trainer_args

MODES = ("local", "processes", "slurm", "tpu")


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m launch.run", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="Arguments after '--' are passed to the trainer unchanged.")
  p.add_argument("--mode", choices=MODES, default=None,
                 help="where to run (default: local, or processes when --num-processes > 1)")
  p.add_argument("--module", default=DEFAULT_MODULE, help="trainer module to run (default %(default)s)")
  p.add_argument("--dry-run", action="store_true", help="print the commands (and scripts) instead of running them")
  g = p.add_argument_group("local and processes (--devices-per-process, --platform, --heartbeat-timeout: slurm too)")
  g.add_argument("--num-processes", type=int, default=1, help="local processes joined into one run")
  g.add_argument("--devices-per-process", type=int, default=None,
                 help="simulated CPU devices per process (XLA_FLAGS=--xla_force_host_platform_device_count)")
  g.add_argument("--platform", default=None,
                 help="JAX_PLATFORMS for the processes (processes mode defaults to cpu; 'cuda' with "
                      "--gpus-per-process splits this machine's GPUs)")
  g.add_argument("--gpus-per-process", type=int, default=None)
  g.add_argument("--port", type=int, default=None, help="coordinator port on localhost (default: a free one)")
  g.add_argument("--heartbeat-timeout", type=int, default=HEARTBEAT_TIMEOUT_S,
                 help="seconds without a heartbeat before a process counts as dead (default %(default)s)")
  g.add_argument("--grace-seconds", type=float, default=45.0,
                 help="after one process fails, how long the others may take to stop on their own "
                      "before they are terminated (default %(default)s)")
  g = p.add_argument_group("slurm")
  g.add_argument("--nodes", type=int, default=1)
  g.add_argument("--gpus-per-node", type=int, default=None,
                 help="GPUs per node (default 8; 0 with --platform=cpu)")
  g.add_argument("--ntasks-per-node", type=int, default=None,
                 help="tasks (processes) per node (default: one per GPU)")
  g.add_argument("--cpus-per-task", type=int, default=None)
  g.add_argument("--time", default="24:00:00", help="time limit, HH:MM:SS or D-HH:MM:SS (default %(default)s; "
                 f"SIGTERM comes {slurm.SlurmSettings.signal_s} s before it: every task saves and stops, resubmit to resume)")
  g.add_argument("--partition", default=None)
  g.add_argument("--account", default=None)
  g.add_argument("--job-name", default=None, help="default: the workdir's last component")
  g.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                 help="extra sbatch option, repeatable (e.g. --sbatch=--qos=high)")
  g.add_argument("--setup", default="",
                 help="shell line run before srun, e.g. 'module load cuda' (the tasks run this command's python)")
  g.add_argument("--log-dir", default="slurm_logs",
                 help="job logs and scripts (relative to the current directory, like a relative --workdir)")
  g.add_argument("--wait", action="store_true",
                 help="follow the job to its end and exit with its status (0 when COMPLETED; 75 when its tasks "
                      "saved a checkpoint and stopped early, as the other modes: submit again to resume)")
  g.add_argument("--script", default=None,
                 help="where to write the sbatch script (default LOG_DIR/JOB.sbatch); once submitted it is renamed "
                      "SCRIPT-JOBID.sbatch beside it (by default LOG_DIR/JOB-JOBID.sbatch, beside the job's log), so "
                      "a resubmission does not replace it")
  g.add_argument("--no-requeue", action="store_true", help="do not requeue the job after preemption")
  g = p.add_argument_group("tpu")
  g.add_argument("--tpu-name", default=None)
  g.add_argument("--zone", default=None)
  g.add_argument("--project", default=None)
  g.add_argument("--remote-dir", default="clip_jax", help="code directory on each TPU worker (under ~)")
  g.add_argument("--skip-setup", action="store_true", help="code and venv are already on the workers")
  return p


def trainer_flag(trainer_args: list[str], name: str) -> str | None:
  """The value of `--name=V` / `--name V` among the trainer's arguments (last one wins)."""
  value = None
  for i, arg in enumerate(trainer_args):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(trainer_args):
      value = trainer_args[i + 1]
  return value


def format_child(child: local.Child) -> str:
  """A shell line that runs `child` as the launcher would."""
  env = [f"{k}={shlex.quote(v)}" for k, v in sorted(child.env.items())]
  return " ".join(env + [shlex.join(child.argv)])


def build_children(args, trainer_args: list[str]) -> list[local.Child]:
  if args.mode == "local":
    if args.num_processes != 1:
      raise SystemExit("launch: --mode=local runs one process; use --mode=processes for --num-processes > 1.")
    return local.single_process(args.module, trainer_args, args.devices_per_process, args.platform)
  if args.num_processes < 1:
    raise SystemExit(f"launch: --num-processes must be at least 1, got {args.num_processes}.")
  platform = args.platform or ("cuda" if args.gpus_per_process else "cpu")
  port = args.port or (8476 if args.dry_run else local.free_port())  # a fixed port keeps dry runs stable
  return local.multi_process(args.module, trainer_args, args.num_processes, args.devices_per_process, port,
                             platform=platform, heartbeat_timeout=args.heartbeat_timeout,
                             gpus_per_process=args.gpus_per_process)


def launch(argv: list[str], out=None) -> int:
  """The whole CLI as a function: returns the exit code."""
  out = out or sys.stdout
  own_args, trainer_args = split_trainer_args(list(argv))
  args = parser().parse_args(own_args)
  if args.mode is None:
    args.mode = "processes" if args.num_processes > 1 else "local"
  if not trainer_args:
    raise SystemExit("launch: no trainer arguments: put them after '--', e.g. "
                     "-- --config=configs/clip/digits.py --workdir=/tmp/run")
  workdir = trainer_flag(trainer_args, "workdir")

  if args.mode in ("local", "processes"):
    children = build_children(args, trainer_args)
    if args.dry_run:
      for child in children:
        print(format_child(child), file=out, flush=True)
      return 0
    return local.supervise(children, grace_s=args.grace_seconds, out=out)

  if args.mode == "slurm":
    job_name = args.job_name or os.path.basename(os.path.normpath(workdir or "clip_jax")) or "clip_jax"
    platform = args.platform or ("cpu" if args.devices_per_process else None)  # simulated devices are CPU ones
    gpus = args.gpus_per_node if args.gpus_per_node is not None else (0 if platform == "cpu" else 8)
    settings = slurm.SlurmSettings(
        job_name=job_name, nodes=args.nodes, gpus_per_node=gpus, ntasks_per_node=args.ntasks_per_node,
        cpus_per_task=args.cpus_per_task, time=args.time, partition=args.partition, account=args.account,
        log_dir=args.log_dir, requeue=not args.no_requeue, extra_sbatch=tuple(args.sbatch), setup=args.setup,
        env=local.child_env(args.devices_per_process if platform == "cpu" else None, platform))
    run_dir = os.getcwd()
    script = slurm.sbatch_script(settings, args.module, trainer_args, run_dir, args.heartbeat_timeout)
    script_path = args.script or os.path.join(args.log_dir, f"{job_name}.sbatch")
    return slurm.submit(script, script_path, settings, run_dir, dry_run=args.dry_run, wait=args.wait, out=out)

  if not (args.tpu_name and args.zone):
    raise SystemExit("launch: --mode=tpu needs --tpu-name and --zone (the slice from "
                     "`gcloud compute tpus tpu-vm list --zone=ZONE`).")
  settings = tpu.TpuSettings(name=args.tpu_name, zone=args.zone, project=args.project,
                             remote_dir=args.remote_dir, skip_setup=args.skip_setup)
  return tpu.run(settings, args.module, trainer_args, args.dry_run, out)


def main() -> None:
  sys.exit(launch(sys.argv[1:]))


if __name__ == "__main__":
  from clip_jax import cli
  cli.run(main)  # user mistakes: one line, exit code 2
