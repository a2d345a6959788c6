"""The one kill-and-resume harness every trainer's test uses: start a training command, SIGKILL it
at a random logged step after its first finalized checkpoint, start it again, and hand back the
restarted run's output (the caller compares the result with an uninterrupted run)."""
import os
import signal
import subprocess
import time

import numpy as np
from run_output import excerpt


def has_checkpoint(workdir) -> bool:
  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def kill_then_resume(command, workdir, *, cwd, env, kill_between=(3, 7), timeout=600,
                     sig=signal.SIGKILL) -> subprocess.CompletedProcess:
  """Runs `command` (which trains into `workdir`, logging one metrics line per step), sends it `sig`
  (SIGKILL; or SIGINT / SIGTERM, a preemption: the run saves and exits with 75) once metrics.jsonl
  holds k lines (k uniform in kill_between) and a checkpoint is finalized, then runs it again to
  the end. Asserts that the kill happened and the restart resumed and finished."""
  metrics = os.path.join(workdir, "metrics.jsonl")
  kill_after = int(np.random.default_rng().integers(*kill_between))
  proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + timeout
  try:
    while time.time() < deadline and proc.poll() is None:
      # Only after a finalized checkpoint: an async save may still be in flight at the logged step.
      if os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= kill_after and has_checkpoint(workdir):
        proc.send_signal(sig)
        break
      time.sleep(0.05)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  expected = -signal.SIGKILL if sig == signal.SIGKILL else 75  # loop.EXIT_PREEMPTED: saved, stopped early
  assert proc.returncode == expected, f"the run ended (code {proc.returncode}) before it could be killed"
  resumed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  assert resumed.returncode == 0, excerpt(resumed.stdout + resumed.stderr)
  # A stop (not SIGKILL) that reaches the run during its last step lets it finish (loop.run): the
  # caller's kill_between must end early enough, with room for the processes' agreed stop step.
  assert "is finished" not in resumed.stdout, ("the stop came during the run's last step, so it finished; "
                                               f"kill earlier than {kill_between}:\n" + excerpt(resumed.stdout, 2000))
  assert "Resuming from the checkpoint of step" in resumed.stdout, excerpt(resumed.stdout, 2000)
  return resumed
