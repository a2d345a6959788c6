"""Runs on this machine: one process, or N processes that form one JAX distributed run.

The N-process form is how multi-host code paths (per-process data shards, global arrays built from
process-local data, checkpoints written by several processes) are exercised on one machine: each
process is a `launch.worker` with its own simulated CPU devices, joined over localhost.

`supervise` watches the children: when one fails, the others get `grace_s` seconds to notice on
their own (their watchdog exits them), then are terminated; the launcher exits non-zero naming the
process that failed (the first to exit, unless that one only found another gone: then the other) and its
exit code. The children die with the launcher even when it is
SIGKILLed and can forward nothing: on Linux each asks the kernel for a SIGKILL when its parent dies
(prctl PR_SET_PDEATHSIG), as if the whole run had been killed; it resumes from its last checkpoint.
(SIGKILL, not SIGTERM: a worker inside jax.distributed takes SIGTERM as a preemption notice and
would wait for its peers at the next step, which a worker stuck in start-up never reaches.)
"""
from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from launch.worker import HEARTBEAT_TIMEOUT_S, PEER_LOST_EXIT_CODE, set_host_device_count

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Child:
  """One process to start: what to run and the environment changes it needs."""
  argv: list[str]
  env: dict[str, str]   # only the variables that differ from the launcher's own environment
  label: str            # 'process 0', ...


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def child_env(devices: int | None, platform: str | None) -> dict[str, str]:
  env: dict[str, str] = {}
  # The trainer module and this package resolve from the repository, wherever the launcher runs.
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p)
  if platform:
    env["JAX_PLATFORMS"] = platform
  if devices:
    env["XLA_FLAGS"] = set_host_device_count(dict(os.environ), devices)["XLA_FLAGS"]
  return env


def single_process(module: str, trainer_args: list[str], devices: int | None = None,
                   platform: str | None = None) -> list[Child]:
  return [Child([sys.executable, "-m", module, *trainer_args], child_env(devices, platform), "process 0")]


def multi_process(module: str, trainer_args: list[str], num_processes: int, devices_per_process: int | None,
                  port: int, platform: str | None = "cpu", heartbeat_timeout: int = HEARTBEAT_TIMEOUT_S,
                  gpus_per_process: int | None = None) -> list[Child]:
  """N workers joined through a coordinator on localhost:PORT.

  On CPU each process gets `devices_per_process` simulated devices; with `gpus_per_process` each
  takes its own slice of this machine's GPUs instead."""
  children = []
  for i in range(num_processes):
    argv = [sys.executable, "-m", "launch.worker", f"--module={module}", f"--coordinator=localhost:{port}",
            f"--num-processes={num_processes}", f"--process-id={i}", f"--heartbeat-timeout={heartbeat_timeout}"]
    if gpus_per_process:
      ids = range(i * gpus_per_process, (i + 1) * gpus_per_process)
      argv.append("--local-device-ids=" + ",".join(str(d) for d in ids))
    env = child_env(devices_per_process if platform == "cpu" else None, platform)
    children.append(Child([*argv, "--", *trainer_args], env, f"process {i}"))
  return children


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _load_prctl():
  """libc's prctl, looked up before any fork (a forked child should call, not load); None off Linux."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return libc.prctl
  except (OSError, AttributeError):
    return None


_PRCTL = _load_prctl()


def die_with_parent(signum: int = signal.SIGKILL):
  """A `preexec_fn` for Popen: the child gets `signum` when the process that started it dies.

  Linux only (elsewhere None: nothing is asked). The kernel sends it when the *thread* that forked the
  child exits, so start children from a thread that lives as long as they should (supervise is
  called from the main thread). A parent that died between fork and prctl is caught by the
  getppid check."""
  if _PRCTL is None:
    return None
  parent = os.getpid()

  def arm():  # runs in the child between fork and exec: no imports, no allocation-heavy work
    if _PRCTL(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0 and os.getppid() != parent:
      os.kill(os.getpid(), signum)
  return arm


PREEMPTED = 75  # clip_jax.loop.EXIT_PREEMPTED: the trainer saved a checkpoint and stopped early
INTERRUPTED = 130  # clip_jax.cli.INTERRUPTED_EXIT_CODE: Ctrl-C before the trainer's loop (or 128 + SIGINT)


def describe_exit(code: int) -> str:
  if code < 0:
    try:
      return f"exit code {code} (killed by {signal.Signals(-code).name})"
    except ValueError:
      return f"exit code {code} (killed by signal {-code})"
  if code == PREEMPTED:
    return f"exit code {code} (preempted: saved a checkpoint and stopped; the same command resumes)"
  if code == INTERRUPTED:
    return f"exit code {code} (interrupted by Ctrl-C before it could save; the same command starts again)"
  if code == PEER_LOST_EXIT_CODE:
    return (f"exit code {code} (found another process of the run gone, or itself cut off from the run, and "
            "stopped without saving; the same command resumes from the last checkpoint saved, or starts again if "
            "there is none)")
  return f"exit code {code}"


# gloo (the CPU collectives) prints one such line per communicator it sets up: 16 in a short 2-process
# run, all saying that every peer connected, some of them inside a progress bar's line. One whose counts
# differ is kept: that one says something.
_GLOO_CONNECTED = re.compile(r"\[Gloo\] Rank \d+ is connected to (\d+) peer ranks\. "
                             r"Expected number of connected peer ranks is : (\d+)")


def without_noise(line: str) -> str | None:
  """A child's output line as the launcher relays it: gloo's all-peers-connected messages taken out,
  None when nothing else was on the line."""
  kept = _GLOO_CONNECTED.sub(lambda m: "" if m.group(1) == m.group(2) else m.group(0), line)
  if kept == line:
    return line
  return kept if kept.strip() else None


def _pump(stream, prefix: str, out) -> None:
  for line in iter(stream.readline, ""):
    line = without_noise(line)
    if line is None:
      continue
    out.write(prefix + line)
    out.flush()
  stream.close()


def supervise(children: list[Child], grace_s: float = 45.0, term_s: float = 10.0, out=None) -> int:
  """Starts the children, relays their output (prefixed with [i] when several), forwards SIGINT/SIGTERM
  to them, and returns the run's exit code: 0 when all succeed, else that of the first failure;
  PREEMPTED (75) when all stopped early with a checkpoint, or when a forwarded SIGINT/SIGTERM found
  them finishing their last step (the caller was asked to stop, so nothing after this run starts)."""
  out = out or sys.stdout
  several = len(children) > 1
  procs: list[subprocess.Popen] = []
  pumps = []
  for i, child in enumerate(children):
    # Own sessions: a Ctrl-C at the terminal reaches the children once, forwarded by `forward` below,
    # not twice (directly and forwarded: a second SIGINT ends a trainer at once, without saving).
    proc = subprocess.Popen(child.argv, env={**os.environ, **child.env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
                            preexec_fn=die_with_parent())
    procs.append(proc)
    print(f"launch: started {child.label} (pid {proc.pid})", file=out, flush=True)
  for i, proc in enumerate(procs):  # threads only after the forks: preexec_fn runs in a forked copy
    pump = threading.Thread(target=_pump, args=(proc.stdout, f"[{i}] " if several else "", out), daemon=True)
    pump.start()
    pumps.append(pump)

  forwarded = []

  def forward(signum, _frame):  # preemption: let every process checkpoint and exit on its own
    forwarded.append(signum)
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)
  previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} \
      if threading.current_thread() is threading.main_thread() else {}

  first_failure: tuple[int, int] | None = None   # (index, code)
  failed_at = 0.0
  terminated_at = None
  terminated: set[int] = set()  # the processes this launcher ended (they had not stopped on their own)
  try:
    while any(p.poll() is None for p in procs):
      for i, p in enumerate(procs):
        code = p.poll()
        if code not in (None, 0) and first_failure is None:
          first_failure, failed_at = (i, code), time.monotonic()
          # A checkpointed stop (75) is not a failure: the others are saving the same step.
          how = "stopped" if code == PREEMPTED else "failed"
          print(f"launch: {children[i].label} (pid {p.pid}) {how} with {describe_exit(code)}; the others "
                f"get {grace_s:.0f} s to stop on their own before they are terminated.", file=out, flush=True)
      if first_failure is not None:
        waited = time.monotonic() - failed_at
        if terminated_at is None and waited > grace_s:
          terminated_at = time.monotonic()
          for i, p in enumerate(procs):
            if p.poll() is None:
              terminated.add(i)
              p.terminate()
        elif terminated_at is not None and time.monotonic() - terminated_at > term_s:
          for p in procs:
            if p.poll() is None:
              p.kill()
      time.sleep(0.1)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for pump in pumps:
      pump.join(timeout=5)

  codes = [p.returncode for p in procs]
  if first_failure is None and any(codes):  # several failed within one poll: take the lowest index
    first_failure = next((i, c) for i, c in enumerate(codes) if c)
  if first_failure is None and forwarded:
    # Asked to stop, but the trainers had finished (the stop came during their last step): the run is
    # complete, and a caller with more to start (a sweep) must still stop, so it says 'stopped'.
    print("launch: a stop was asked for; the run had finished its last step (the same command says so).",
          file=out, flush=True)
    return PREEMPTED
  if first_failure is None:
    return 0
  index, code = first_failure
  if all(c == PREEMPTED for c in codes):
    print(f"launch: the run stopped early with a checkpoint ({describe_exit(code)}).", file=out, flush=True)
    return PREEMPTED
  if PREEMPTED in codes and all(c in (PREEMPTED, PEER_LOST_EXIT_CODE) for c in codes):
    # Processes that saved and stopped leave at slightly different times; one still stopping can find the
    # others gone. A stop all the same: resumable, and what ran it (a sweep) must stop too.
    lost = ", ".join(children[i].label for i, c in enumerate(codes) if c == PEER_LOST_EXIT_CODE)
    print(f"launch: the run stopped early ({describe_exit(PREEMPTED)}); {lost} found the others gone while "
          "stopping: the same command resumes from the last checkpoint saved.", file=out, flush=True)
    return PREEMPTED

  def ended(i: int) -> str:
    return describe_exit(codes[i]) + (", terminated by the launcher" if i in terminated else "")
  cause = _cause(index, codes)
  if cause == index:
    said = f"{children[index].label} (pid {procs[index].pid}) exited first with {ended(index)}"
  else:  # the first to exit had only found this one gone (hung, or aborting): this one is what failed
    said = (f"{children[cause].label} (pid {procs[cause].pid}) failed with {ended(cause)}, after "
            f"{children[index].label} had found it gone and stopped")
    code = codes[cause]
  others = ", ".join(f"{children[i].label}: {ended(i)}" for i in range(len(codes)) if i != cause)
  then = "; then " if cause == index else "; "
  print(f"launch: the run failed: {said}" + (then + others if others else "") + ".", file=out, flush=True)
  return code if 0 < code < 256 else 128 + (-code if code < 0 else 1)


def _cause(first: int, codes: list[int]) -> int:
  """The index of the process whose failure ended the run: the first to exit, unless that one only
  found another gone (PEER_LOST_EXIT_CODE) and a later one failed otherwise. A process that stops
  sending heartbeats (hung, or aborting) is reported lost by the others before it exits itself."""
  if codes[first] != PEER_LOST_EXIT_CODE:
    return first
  return next((i for i, c in enumerate(codes) if c not in (0, PEER_LOST_EXIT_CODE, PREEMPTED)), first)
