"""Real SLURM jobs: a one-node cluster on this machine (launch/testing/local_slurm.sh), started once for
the session, runs `python -m launch.run --mode slurm` jobs of two CPU tasks that find each other through
jax.distributed's SLURM detection, as on a real cluster.

The cluster needs Debian's slurmctld, slurmd, slurm-client and munge packages (`.ci/run` installs them);
without them these tests are skipped with that reason. (No persistent compilation cache here: jax
writes it from process 0 only, so process 0 would skip compiles that process 1 still does, and the
first collective's 30 s rendezvous times out on a loaded machine.)
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from run_output import excerpt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_SCRIPT = os.path.join(REPO, "launch", "testing", "local_slurm.sh")
BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scancel", "scontrol")
STEPS, CHECKPOINT_EVERY = 10, 3

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def slurm_env():
  """The environment (SLURM_CONF) for commands that use the session's cluster."""
  missing = [b for b in BINARIES if shutil.which(b) is None]
  if missing:
    pytest.skip(f"SLURM is not installed here ({', '.join(missing)} missing): "
                "`apt-get install slurmctld slurmd slurm-client munge`, as .ci/run does")
  # Not under pytest's base folder: another session of pytest may prune that while the daemons run.
  directory = tempfile.mkdtemp(prefix="local_slurm_")
  started = subprocess.run(["bash", CLUSTER_SCRIPT, "start", directory], capture_output=True, text=True, timeout=120)
  try:
    assert started.returncode == 0, f"the local SLURM cluster did not start:\n{started.stderr}"
    yield {**os.environ, "SLURM_CONF": os.path.join(directory, "slurm.conf")}
  finally:
    subprocess.run(["bash", CLUSTER_SCRIPT, "stop", directory], capture_output=True, timeout=120)
    shutil.rmtree(directory, ignore_errors=True)


def _trainer_args(workdir):
  return ["--config=configs/clip/digits.py:runlocal", f"--workdir={workdir}", f"--config.total_steps={STEPS}",
          f"--config.checkpoint_every={CHECKPOINT_EVERY}", "--config.progress_bar=False",
          "--config.peak_flops_per_device=1e12",
          # Parameters sharded over all 8 devices of the two tasks (gloo makes data-parallel all-reduces
          # slow on CPU; see WORKSPACE.md).
          "--config.mesh.data=1", "--config.mesh.fsdp=8"]


def _launch(env, launch_args, trainer_args, timeout=900):
  return subprocess.run([sys.executable, "-m", "launch.run", *launch_args, "--", *trainer_args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _slurm_args(log_dir, *more):
  # The default heartbeat timeout: a shorter one ended a 2-process run that stalled ~20 s on a loaded CI
  # machine (launch.worker.HEARTBEAT_TIMEOUT_S). Only the failing-task test below asks for 10 s.
  return ["--mode=slurm", "--nodes=1", "--ntasks-per-node=2", "--devices-per-process=4",
          f"--log-dir={log_dir}", *more]


def _submitted(stdout):
  """(job id, log path) from the launcher's submission line."""
  match = re.search(r"launch: submitted job (\d+) \((\w+)\); log: (\S+)", stdout)
  assert match, excerpt(stdout)
  return match.group(1), match.group(3)


def _losses(workdir):
  from clip_jax.observe import read_metrics
  return {r["step"]: r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "loss" in r}


def _checkpoint_steps(workdir):
  directory = os.path.join(workdir, "checkpoints")  # numbered directories only: orbax renames when done
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


def _final_params(workdir):
  import clip_jax
  import jax
  from flax import traverse_util
  _, variables = clip_jax.load_checkpoint(str(workdir))
  return traverse_util.flatten_dict(jax.device_get(variables["params"]))


@pytest.fixture(scope="module")
def uninterrupted(slurm_env, tmp_path_factory):
  """A 2-task SLURM job trained to the end: (workdir, launcher stdout)."""
  root = tmp_path_factory.mktemp("uninterrupted")
  done = _launch(slurm_env, _slurm_args(root / "logs", "--wait"), _trainer_args(root / "run"))
  assert done.returncode == 0, excerpt(done.stdout + done.stderr)
  return root / "run", done.stdout


def test_slurm_job_trains_to_the_end_like_local_processes(slurm_env, uninterrupted, tmp_path):
  workdir, stdout = uninterrupted
  job_id, log = _submitted(stdout)
  assert f"launch: job {job_id} ended COMPLETED" in stdout
  with open(log) as f:
    text = f.read()
  assert "Results:" in text, excerpt(text)
  assert _checkpoint_steps(workdir)[-1] == STEPS
  # Both tasks wrote their input iterator's state: two processes, found through SLURM's variables.
  data_files = os.listdir(os.path.join(workdir, "checkpoints", str(STEPS), "data"))
  assert len([f for f in data_files if "process" in f]) == 2, data_files

  local = _launch(slurm_env, ["--mode=processes", "--num-processes=2", "--devices-per-process=4"],
                  _trainer_args(tmp_path / "processes"))
  assert local.returncode == 0, excerpt(local.stdout)
  on_slurm, on_processes = _losses(workdir), _losses(tmp_path / "processes")
  assert sorted(on_slurm) == sorted(on_processes) == list(range(1, STEPS + 1))
  for step in on_slurm:  # the same two processes of four devices, the same program: equal
    assert on_slurm[step] == on_processes[step], step


def _wait_for_job(env, job_id, timeout=900):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    queued = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=env, capture_output=True, text=True)
    if not queued.stdout.strip():
      shown = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
      return re.search(r"JobState=(\S+)", shown).group(1)
    time.sleep(1)
  raise AssertionError(f"job {job_id} still queued or running after {timeout} s")


def test_preempted_job_resumes_to_the_uninterrupted_parameters(slurm_env, uninterrupted, tmp_path):
  workdir = tmp_path / "run"
  submitted = _launch(slurm_env, _slurm_args(tmp_path / "logs"), _trainer_args(workdir))
  assert submitted.returncode == 0, excerpt(submitted.stdout + submitted.stderr)
  job_id, log = _submitted(submitted.stdout)
  assert f"scancel --signal=TERM {job_id}" in submitted.stdout
  deadline = time.monotonic() + 900
  while not _checkpoint_steps(workdir):  # preempt after the first periodic checkpoint
    assert time.monotonic() < deadline, "no checkpoint within 900 s"
    time.sleep(0.2)
  subprocess.run(["scancel", "--signal=TERM", job_id], env=slurm_env, check=True)
  state = _wait_for_job(slurm_env, job_id)
  with open(log) as f:
    text = f.read()
  shown = subprocess.run(["scontrol", "show", "job", job_id], env=slurm_env, capture_output=True, text=True).stdout
  # Every task saved and exited 75 (preempted: clip_jax.loop.EXIT_PREEMPTED), so SLURM reports the job
  # as failed with that code, which tells it apart from a finished job.
  assert state == "FAILED" and "ExitCode=75:0" in shown, shown + excerpt(text)
  saved = _checkpoint_steps(workdir)[-1]
  assert CHECKPOINT_EVERY <= saved < STEPS, f"the job was not stopped early (last checkpoint {saved})"
  # Both tasks stopped at the same step (jax's preemption sync point) and saved their part there.
  synced = set(re.findall(r"\[process=(\d)\]\[thread=MainThread\] Reached preemption sync point, step=(\d+)", text))
  assert synced == {("0", str(saved)), ("1", str(saved))}, excerpt(text)
  data_files = os.listdir(os.path.join(workdir, "checkpoints", str(saved), "data"))
  assert len([f for f in data_files if "process" in f]) == 2, data_files

  resumed = _launch(slurm_env, _slurm_args(tmp_path / "logs", "--wait"), _trainer_args(workdir))
  assert resumed.returncode == 0, excerpt(resumed.stdout)
  _, resumed_log = _submitted(resumed.stdout)
  with open(resumed_log) as f:
    assert f"Resuming from the checkpoint of step {saved}" in f.read()
  reference, preempted = _final_params(uninterrupted[0]), _final_params(workdir)
  assert sorted(reference) == sorted(preempted)
  for key in reference:
    np.testing.assert_array_equal(preempted[key], reference[key], err_msg=str(key))


FAILING_TASK = """
import os, time
import jax
from jax.experimental import multihost_utils
if jax.process_index() == 1:
  with open(os.environ["FAILED_AT_FILE"], "w") as f:
    f.write(str(time.time()))
  raise RuntimeError("task 1 failed on purpose")
multihost_utils.sync_global_devices("task 1 never gets here")  # task 0 would wait here for ever
"""


def test_a_failing_task_fails_the_job_with_its_message(slurm_env, tmp_path):
  (tmp_path / "failing_task.py").write_text(FAILING_TASK)
  failed_at_file = tmp_path / "failed_at"
  env = {**slurm_env, "PYTHONPATH": str(tmp_path), "FAILED_AT_FILE": str(failed_at_file)}
  done = _launch(env, [*_slurm_args(tmp_path / "logs", "--wait", "--heartbeat-timeout=10"), "--module=failing_task"],
                 ["--workdir=unused"], timeout=600)
  ended = time.time()
  job_id, log = _submitted(done.stdout)
  assert done.returncode != 0
  assert f"launch: job {job_id} ended FAILED" in done.stdout, excerpt(done.stdout)
  with open(log) as f:
    text = f.read()
  assert "RuntimeError: task 1 failed on purpose" in text, excerpt(text)
  # Task 0 did not wait for its peer for ever: the job ended within the heartbeat timeout (10 s) plus
  # the launcher's polling and SLURM's clean-up, far from a hang.
  waited = ended - float(failed_at_file.read_text())
  assert waited < 60, f"the job ended {waited:.0f} s after its task failed"
