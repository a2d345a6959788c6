r"""One process of a multi-process run: join the JAX distributed system, then run the trainer.

    python -m launch.worker --coordinator=localhost:8476 --num-processes=2 --process-id=0 \
        -- --config=configs/clip/digits.py --workdir=/tmp/run       # explicit (local processes)
    python -m launch.worker -- --config=... --workdir=...           # SLURM / TPU: jax detects the cluster

The trainer module (`--module`, default clip_jax.train) runs exactly as `python -m MODULE ARGS` would,
after `jax.distributed.initialize` and before anything touches a device.

A process whose peer dies must not wait forever in a collective. Two guards:
- jax's coordination service: a process that stops sending heartbeats for `--heartbeat-timeout`
  seconds is declared dead and every other process is terminated by the runtime;
- a watchdog thread here that asks the service which processes are alive every
  `--watchdog-interval` seconds and, when one is missing, prints which and exits with
  `PEER_LOST_EXIT_CODE`: the message comes from us, not from a C++ abort. That code is not the
  trainer's 75 (saved a checkpoint and stopped): this process saves nothing, and the launcher names
  the process that was lost as the run's failure.
"""
from __future__ import annotations

if __name__ == "__main__":  # before jax is imported: XLA flags, allocator (clip_jax.cli)
  from clip_jax import cli as _cli
  _cli.use_process_defaults()

import argparse
import atexit
import os
import runpy
import sys
import threading
import time

# EX_UNAVAILABLE: a process the run needs is gone. Nothing was saved at this point; the same command
# resumes from the last periodic checkpoint.
PEER_LOST_EXIT_CODE = 69
# Seconds without a heartbeat before the coordination service counts a process as dead. Not jax's 100:
# a hung process should not hold the others for minutes. Not the 20 it was: a process of a 2-process
# CI run stalled ~20 s on a loaded machine and the run was ended (reproduced by SIGSTOP for 30 s).
# A process that exits is caught sooner anyway: by `launch.local.supervise`, or srun --kill-on-bad-exit.
HEARTBEAT_TIMEOUT_S = 60
DEFAULT_MODULE = "clip_jax.train"


def split_trainer_args(argv: list[str]) -> tuple[list[str], list[str]]:
  """[launcher args..., '--', trainer args...] -> (launcher args, trainer args)."""
  if "--" in argv:
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]
  return argv, []


def set_host_device_count(env: dict[str, str], count: int) -> dict[str, str]:
  """`env` with XLA_FLAGS asking for `count` simulated CPU devices (any earlier count replaced)."""
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env = dict(env)
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={count}"])
  return env


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m launch.worker",
      description="One process of a multi-process JAX run (started by launch.run, srun or gcloud). "
                  "Arguments after '--' go to the trainer.")
  p.add_argument("--module", default=DEFAULT_MODULE, help="trainer module run as __main__ (default %(default)s)")
  p.add_argument("--coordinator", default=None,
                 help="HOST:PORT of process 0's coordination service; leave out on SLURM / TPU (auto-detected)")
  p.add_argument("--num-processes", type=int, default=None)
  p.add_argument("--process-id", type=int, default=None)
  p.add_argument("--local-device-ids", default=None,
                 help="comma-separated accelerator ids this process uses (GPUs of one host split over processes)")
  p.add_argument("--heartbeat-timeout", type=int, default=HEARTBEAT_TIMEOUT_S,
                 help="seconds without a heartbeat after which a process counts as dead (default %(default)s)")
  p.add_argument("--init-timeout", type=int, default=300,
                 help="seconds to wait for all processes to join (default %(default)s)")
  p.add_argument("--shutdown-timeout", type=int, default=60,
                 help="seconds a finished process waits for the others at exit (default %(default)s)")
  p.add_argument("--watchdog-interval", type=float, default=2.0,
                 help="seconds between liveness checks of the other processes; 0 disables (default %(default)s)")
  return p


def initialize_distributed(args) -> None:
  import jax
  explicit = (args.coordinator, args.num_processes, args.process_id)
  if any(v is not None for v in explicit) and None in explicit:
    raise SystemExit("launch.worker: give --coordinator, --num-processes and --process-id together, "
                     "or none of them (cluster auto-detection).")
  kwargs = dict(initialization_timeout=args.init_timeout, heartbeat_timeout_seconds=args.heartbeat_timeout,
                shutdown_timeout_seconds=args.shutdown_timeout)
  if args.coordinator is not None:
    kwargs.update(coordinator_address=args.coordinator, num_processes=args.num_processes,
                  process_id=args.process_id)
    if args.local_device_ids is None:
      # All four distributed settings known: no cluster probing (it would find e.g. SLURM variables
      # of the shell this local run was started from).
      kwargs["cluster_detection_method"] = "deactivate"
  if args.local_device_ids is not None:
    kwargs["local_device_ids"] = [int(i) for i in args.local_device_ids.split(",")]
  jax.distributed.initialize(**kwargs)


def _live_processes(client, num_processes: int) -> set[int]:
  live = client.get_live_nodes(list(range(num_processes)))
  return set(live.keys() if isinstance(live, dict) else live)


_EXITING = threading.Event()  # set when this process exits: then the others leaving is expected


def start_watchdog(interval: float) -> threading.Thread | None:
  """A daemon thread that ends this process when another process of the run has gone. It stands down
  once this process is exiting (an atexit hook, registered after jax.distributed's own, runs before
  jax's shutdown): processes that save and stop leave at slightly different times."""
  import jax
  from jax._src import distributed  # the client is not public API; guarded below
  client, num_processes = distributed.global_state.client, jax.process_count()
  if interval <= 0 or client is None or num_processes < 2 or not hasattr(client, "get_live_nodes"):
    return None
  me = jax.process_index()
  atexit.register(_EXITING.set)

  def watch():
    while not _EXITING.is_set():
      time.sleep(interval)
      try:
        missing = sorted(set(range(num_processes)) - _live_processes(client, num_processes))
      except Exception as e:  # noqa: BLE001 - the service itself is gone (process 0 died)
        if not _EXITING.is_set():
          _peer_lost(me, f"the coordination service stopped answering ({type(e).__name__}: {e}); "
                         "process 0 has probably died")
        return
      if _EXITING.is_set():
        return
      others = [i for i in missing if i != me]
      if others:
        _peer_lost(me, f"process(es) {others} of {num_processes} stopped sending heartbeats (died or hung)")
        return
      if missing:  # only this one: the service has marked this process failed (e.g. a collective broke)
        _peer_lost(me, "the coordination service marked this process as failed")
        return

  thread = threading.Thread(target=watch, name="launch.worker watchdog", daemon=True)
  thread.start()
  return thread


def _peer_lost(me: int, why: str) -> None:
  print(f"launch.worker[{me}]: {why}; this process exits with code {PEER_LOST_EXIT_CODE} rather than wait "
        "for it forever. The same command resumes the run from its last checkpoint saved (or starts it again if there "
        "is none).", file=sys.stderr, flush=True)
  os._exit(PEER_LOST_EXIT_CODE)  # sys.exit from a thread would only end the thread


def main(argv: list[str] | None = None) -> None:
  own_args, trainer_args = split_trainer_args(list(sys.argv[1:] if argv is None else argv))
  args = parser().parse_args(own_args)
  initialize_distributed(args)
  start_watchdog(args.watchdog_interval)
  sys.argv = [args.module, *trainer_args]
  runpy.run_module(args.module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  from clip_jax import cli
  cli.run(main)  # user mistakes: one line, exit code 2
