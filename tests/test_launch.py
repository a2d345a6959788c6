"""Launchers, multi-process runs on one machine, sweeps and result tables."""
import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from launch import local, results, slurm, sweep, tpu
from launch import run as launcher
from launch.worker import PEER_LOST_EXIT_CODE, set_host_device_count, split_trainer_args
from run_output import excerpt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(argv):
  out = io.StringIO()
  code = launcher.launch(argv, out=out)
  return code, out.getvalue()


# ----------------------------------------------------------------------------- dry runs
def test_processes_dry_run_prints_one_worker_per_process(monkeypatch):
  # The session's own XLA_FLAGS (conftest adds a compile flag) are kept in front of the device count;
  # set_host_device_count's test below covers that. Here: the device count alone, as a user's shell has it.
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  code, text = _launch(["--num-processes=2", "--devices-per-process=4", "--port=1234", "--dry-run", "--",
                        "--config=configs/clip/digits.py", "--workdir=/tmp/w"])
  assert code == 0
  lines = text.strip().splitlines()
  assert len(lines) == 2
  for i, line in enumerate(lines):
    assert "JAX_PLATFORMS=cpu" in line and "XLA_FLAGS=--xla_force_host_platform_device_count=4" in line
    assert (f"-m launch.worker --module=clip_jax.train --coordinator=localhost:1234 --num-processes=2 "
            f"--process-id={i} --heartbeat-timeout=60 -- --config=configs/clip/digits.py --workdir=/tmp/w") in line


def test_local_dry_run_runs_the_module_directly():
  code, text = _launch(["--module=dreambooth_jax.train", "--dry-run", "--", "--workdir=/tmp/w"])
  assert code == 0
  assert text.strip().endswith("-m dreambooth_jax.train --workdir=/tmp/w")


def test_slurm_dry_run_prints_the_script_and_sbatch():
  code, text = _launch(["--mode=slurm", "--nodes=4", "--gpus-per-node=8", "--time=12:00:00", "--partition=gpu",
                        "--account=proj", "--sbatch=--qos=high", "--dry-run", "--",
                        "--config=configs/clip/paper.py:ViT-B-32", "--workdir=/ckpt/vit_b32"])
  assert code == 0
  lines = text.splitlines()
  assert lines[0] == "# slurm_logs/vit_b32.sbatch"
  assert lines[1] == "#!/bin/bash"
  for expected in ["#SBATCH --job-name=vit_b32", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8",
                   "#SBATCH --gpus-per-node=8", "#SBATCH --time=12:00:00", "#SBATCH --partition=gpu",
                   "#SBATCH --account=proj", "#SBATCH --qos=high", "#SBATCH --signal=TERM@300",
                   "#SBATCH --requeue", "#SBATCH --output=slurm_logs/%x-%j.out", "#SBATCH --open-mode=append",
                   f"cd {os.getcwd()}"]:
    assert expected in lines, expected
  assert (f"srun --kill-on-bad-exit=1 {sys.executable} -m launch.worker --module=clip_jax.train --heartbeat-timeout=60 "
          "-- --config=configs/clip/paper.py:ViT-B-32 --workdir=/ckpt/vit_b32") in lines
  assert not any(line.startswith(("export JAX_PLATFORMS", "export XLA_FLAGS")) for line in lines)
  assert lines[-1] == "sbatch --parsable slurm_logs/vit_b32.sbatch"
  assert not os.path.exists(os.path.join(REPO, "slurm_logs", "vit_b32.sbatch"))  # a dry run writes nothing


def test_slurm_dry_run_on_cpu_asks_for_tasks_not_gpus():
  code, text = _launch(["--mode=slurm", "--ntasks-per-node=2", "--devices-per-process=4", "--heartbeat-timeout=10",
                        "--dry-run", "--", "--workdir=w"])
  assert code == 0
  lines = text.splitlines()
  assert "#SBATCH --ntasks-per-node=2" in lines and "#SBATCH --nodes=1" in lines
  assert not any("--gpus-per-node" in line for line in lines)
  assert "export JAX_PLATFORMS=cpu" in lines
  assert any(line.startswith("export XLA_FLAGS=") and "--xla_force_host_platform_device_count=4" in line
             for line in lines)
  assert f"export PYTHONPATH={REPO}" in [line.split(os.pathsep)[0] for line in lines]
  assert lines[-2].endswith("-m launch.worker --module=clip_jax.train --heartbeat-timeout=10 -- --workdir=w")


def test_slurm_exit_status_of_a_finished_job():
  assert slurm.exit_status("COMPLETED", "0:0") == 0
  assert slurm.exit_status("FAILED", "1:0") == 1          # a task's own exit code
  assert slurm.exit_status("CANCELLED", "0:15") == 128 + 15  # ended by SIGTERM
  assert slurm.exit_status("TIMEOUT", None) == 1
  assert set(slurm.FINAL_STATES) >= {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}


def test_tpu_dry_run_prints_setup_and_run_on_all_workers():
  code, text = _launch(["--mode=tpu", "--tpu-name=pod", "--zone=us-central2-b", "--project=p", "--dry-run", "--",
                        "--config=configs/clip/paper.py:ViT-B-32", "--workdir=gs://bucket/run"])
  assert code == 0
  version = tpu.pinned_jax_version()
  assert text.splitlines() == [
      f"bash -c 'git -C {REPO} ls-files -z --cached --others --exclude-standard | tar -czf "
      f"/tmp/clip_jax_src.tar.gz -C {REPO} --null -T -'",
      "gcloud compute tpus tpu-vm scp /tmp/clip_jax_src.tar.gz pod:/tmp/clip_jax_src.tar.gz --zone us-central2-b "
      "--worker=all --project p",
      "gcloud compute tpus tpu-vm ssh pod --zone us-central2-b --worker=all --project p --command 'mkdir -p clip_jax "
      "&& tar -xzf /tmp/clip_jax_src.tar.gz -C clip_jax && cd clip_jax && bash launch/setup.sh && "
      f".venv/bin/pip install --quiet \"jax[tpu]=={version}\"'",
      "gcloud compute tpus tpu-vm ssh pod --zone us-central2-b --worker=all --project p --command 'cd clip_jax && "
      ".venv/bin/python -m launch.worker --module=clip_jax.train --heartbeat-timeout=60 -- "
      "--config=configs/clip/paper.py:ViT-B-32 --workdir=gs://bucket/run'",
  ]
  code, text = _launch(["--mode=tpu", "--tpu-name=pod", "--zone=z", "--skip-setup", "--dry-run", "--", "--workdir=w"])
  assert len(text.splitlines()) == 1 and "launch.worker" in text


def test_bad_launch_input_gets_one_clear_line():
  with pytest.raises(SystemExit, match="no trainer arguments"):
    _launch(["--dry-run"])
  with pytest.raises(SystemExit, match="needs --tpu-name and --zone"):
    _launch(["--mode=tpu", "--dry-run", "--", "--workdir=w"])
  with pytest.raises(SystemExit, match="--mode=local runs one process"):
    _launch(["--mode=local", "--num-processes=2", "--dry-run", "--", "--workdir=w"])


def test_worker_helpers():
  assert split_trainer_args(["--a", "--", "--b", "--"]) == (["--a"], ["--b", "--"])
  env = set_host_device_count({"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8"}, 4)
  assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=4"


def test_supervisor_stops_the_others_and_names_the_failed_process():
  sleeper = local.Child([sys.executable, "-c", "import time; time.sleep(60)"], {}, "process 0")
  failing = local.Child([sys.executable, "-c", "import sys; sys.exit(3)"], {}, "process 1")
  out = io.StringIO()
  start = time.monotonic()
  code = local.supervise([sleeper, failing], grace_s=1.0, term_s=2.0, out=out)
  assert time.monotonic() - start < 20
  assert code == 3
  text = out.getvalue()
  assert re.search(r"process 1 \(pid \d+\) exited first with exit code 3; then process 0: exit code -15 "
                   r"\(killed by SIGTERM\)", text), text
  assert re.search(r"process 1 \(pid \d+\) failed with exit code 3;", text), text
  # A checkpointed stop (75) is said as one, not as a failure (a new user's 2-process Ctrl-C read "failed").
  saving = local.Child([sys.executable, "-c", "import sys; sys.exit(75)"], {}, "process 0")
  slower = local.Child([sys.executable, "-c", "import sys, time; time.sleep(3); sys.exit(75)"], {}, "process 1")
  out = io.StringIO()
  assert local.supervise([saving, slower], grace_s=30.0, term_s=2.0, out=out) == local.PREEMPTED
  assert re.search(r"process 0 \(pid \d+\) stopped with exit code 75 \(preempted: saved a checkpoint", out.getvalue())
  assert "failed" not in out.getvalue()


def test_supervisor_leaves_out_gloos_all_connected_lines():
  # Session 26's fresh users: a short 2-process run printed 16 of these among 39 lines.
  talker = local.Child([sys.executable, "-c", "print('[Gloo] Rank 0 is connected to 1 peer ranks. Expected number "
                        "of connected peer ranks is : 1'); print('[Gloo] Rank 1 is connected to 0 peer ranks. "
                        "Expected number of connected peer ranks is : 1'); print('step 1')"], {}, "process 0")
  out = io.StringIO()
  assert local.supervise([talker], out=out) == 0
  text = out.getvalue()
  assert "connected to 1 peer ranks" not in text and "step 1" in text, text
  assert "Rank 1 is connected to 0 peer ranks. Expected number of connected peer ranks is : 1" in text, text  # kept
  # inside a progress bar's line (tqdm ends its updates with '\r', not a new line): the bar stays
  bar = "train:  17%|#7   | 1/6 [00:17<01:25, 17.20s/step]"
  assert local.without_noise(bar + "[Gloo] Rank 3 is connected to 7 peer ranks. Expected number of connected peer "
                             "ranks is : 7\n") == bar + "\n"
  assert local.without_noise("step 2\n") == "step 2\n"


def test_supervisor_names_the_lost_process_not_the_one_that_noticed(tmp_path):
  # CI, session 28: process 1 stopped answering, process 0's watchdog found it gone and exited first,
  # then process 1 aborted. The launcher named process 0 as the failure and its exit code (then 75,
  # the trainer's "saved a checkpoint and stopped") as "preempted": neither was true.
  noticed_file = tmp_path / "noticed"  # process 1 aborts well after process 0 has exited, however slow it starts
  noticed = local.Child([sys.executable, "-c", f"import pathlib, sys; pathlib.Path({str(noticed_file)!r}).touch(); "
                         f"sys.exit({PEER_LOST_EXIT_CODE})"], {}, "process 0")
  aborting = local.Child([sys.executable, "-c", f"import os, pathlib, time\nwhile not pathlib.Path({str(noticed_file)!r})"
                          ".exists(): time.sleep(0.05)\ntime.sleep(1.5); os.abort()"], {}, "process 1")
  out = io.StringIO()
  code = local.supervise([noticed, aborting], grace_s=30.0, term_s=2.0, out=out)
  text = out.getvalue()
  assert code == 128 + signal.SIGABRT, text
  assert PEER_LOST_EXIT_CODE not in (0, local.PREEMPTED, local.INTERRUPTED)
  assert re.search(r"the run failed: process 1 \(pid \d+\) failed with exit code -6 \(killed by SIGABRT\), after "
                   r"process 0 had found it gone and stopped; process 0: exit code 69 \(found another process of the "
                   r"run gone, or itself cut off from the run, and stopped without saving", text), text
  assert "preempted" not in text and "saved a checkpoint" not in text, text
  # Every process lost another (one hung without exiting, then was terminated by the launcher, say):
  # the first one's exit is the run's.
  both = [local.Child([sys.executable, "-c", f"import sys; sys.exit({PEER_LOST_EXIT_CODE})"], {}, f"process {i}")
          for i in range(2)]
  out = io.StringIO()
  assert local.supervise(both, grace_s=30.0, term_s=2.0, out=out) == PEER_LOST_EXIT_CODE
  assert re.search(r"the run failed: process \d \(pid \d+\) exited first with exit code 69", out.getvalue())
  # One saved and stopped (75), the other found it gone while stopping (69): a stop, not a failure
  saved = local.Child([sys.executable, "-c", "import sys; sys.exit(75)"], {}, "process 0")
  late = local.Child([sys.executable, "-c", f"import sys, time; time.sleep(1); sys.exit({PEER_LOST_EXIT_CODE})"], {},
                     "process 1")
  out = io.StringIO()
  assert local.supervise([saved, late], grace_s=30.0, term_s=2.0, out=out) == local.PREEMPTED
  assert "process 1 found the others gone while stopping" in out.getvalue() and "failed:" not in out.getvalue()
  # A hung process the launcher had to end is said to be so
  hung = local.Child([sys.executable, "-c", "import time; time.sleep(60)"], {}, "process 1")
  out = io.StringIO()
  code = local.supervise([local.Child([sys.executable, "-c", f"import sys; sys.exit({PEER_LOST_EXIT_CODE})"], {},
                                      "process 0"), hung], grace_s=0.5, term_s=2.0, out=out)
  assert code == 128 + signal.SIGTERM, out.getvalue()
  assert re.search(r"process 1 \(pid \d+\) failed with exit code -15 \(killed by SIGTERM\), terminated by the "
                   r"launcher, after process 0 had found it gone", out.getvalue()), out.getvalue()


def test_supervisor_asked_to_stop_says_stopped_even_when_the_run_finished(tmp_path):
  # A SIGTERM during a trainer's last step lets it finish (exit 0, clip_jax.loop); the launcher was
  # still asked to stop, so a sweep calling it must not start its next run: 75, not 0.
  import threading
  ready, got = tmp_path / "ready", tmp_path / "got_sigterm"
  finishing = local.Child([sys.executable, "-c", "import signal, time, pathlib; signal.signal(signal.SIGTERM, "
                           f"lambda *a: pathlib.Path({str(got)!r}).touch()); pathlib.Path({str(ready)!r}).touch(); "
                           "time.sleep(3)"], {}, "process 0")

  def stop_when_ready():  # the child's handler is in place: the stop reaches a trainer in its last step
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)
  out = io.StringIO()
  stopper = threading.Thread(target=stop_when_ready)
  stopper.start()
  code = local.supervise([finishing], out=out)
  stopper.join()
  assert got.exists()  # forwarded to the child, which went on and exited 0
  assert code == local.PREEMPTED, out.getvalue()
  assert "the run had finished its last step" in out.getvalue()
  quiet = local.Child([sys.executable, "-c", "pass"], {}, "process 0")
  assert local.supervise([quiet], out=io.StringIO()) == 0  # not asked to stop: finished is 0


def _alive(pid: int) -> bool:
  """Running (a zombie counts as dead: its parent is gone and nothing may reap it in a container)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux-only (prctl)")
def test_workers_die_with_a_sigkilled_launcher(tmp_path):
  # Each worker joins jax.distributed, then runs a module that records its pid and sleeps.
  (tmp_path / "sleeper.py").write_text("import os, time\n"
                                       "open(os.path.join(os.environ['PID_DIR'], str(os.getpid())), 'w').close()\n"
                                       "time.sleep(600)\n")
  pid_dir = tmp_path / "pids"
  pid_dir.mkdir()
  env = {**os.environ, "PYTHONPATH": str(tmp_path), "PID_DIR": str(pid_dir)}
  launcher_proc = subprocess.Popen([sys.executable, "-m", "launch.run", "--mode=processes", "--num-processes=2",
                                    "--devices-per-process=1", "--module=sleeper", "--", "--workdir=unused"],
                                   cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 300
    while len(os.listdir(pid_dir)) < 2 and time.monotonic() < deadline:
      assert launcher_proc.poll() is None, "the launcher ended before its workers started"
      time.sleep(0.1)
    workers = [int(name) for name in os.listdir(pid_dir)]
    assert len(workers) == 2, "the workers did not start within 300 s"
    assert all(_alive(pid) for pid in workers)
  finally:
    launcher_proc.kill()  # SIGKILL: the launcher can forward nothing
    launcher_proc.wait()
  deadline = time.monotonic() + 30
  while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
    time.sleep(0.1)
  left = [pid for pid in workers if _alive(pid)]
  for pid in left:  # do not leave them behind when the test fails
    os.kill(pid, signal.SIGKILL)
  assert not left, f"workers {left} outlived their SIGKILLed launcher by 30 s"


# ----------------------------------------------------------------------------- sweeps and results
def test_sweep_helpers_and_names():
  runs = sweep.seeds(sweep.product(sweep.fixed(total_steps=10), sweep.grid(global_batch=[16, 32])), 2)
  assert runs == [{"total_steps": 10, "global_batch": b, "seed": s} for b in (16, 32) for s in (0, 1)]
  assert sweep.run_names(runs) == ["global_batch=16_seed=0", "global_batch=16_seed=1",
                                   "global_batch=32_seed=0", "global_batch=32_seed=1"]
  zipped = sweep.zipped(**{"optimizer.learning_rate": [1e-3, 3e-4], "optimizer.warmup_steps": [10, 20]})
  assert sweep.run_names(zipped) == ["learning_rate=0.001_warmup_steps=10", "learning_rate=0.0003_warmup_steps=20"]
  assert sweep.run_names([{"a": 1}, {"a": 1}]) == ["run", "run_2"]
  with pytest.raises(ValueError, match="one length"):
    sweep.zipped(a=[1, 2], b=[3])
  assert results.overrides_from_name("global_batch=16_seed=1") == {"global_batch": 16, "seed": 1}


def _write_sweep_file(path, body):
  path.write_text(textwrap.dedent(body))
  return str(path)


def test_sweep_rejects_unknown_keys(tmp_path):
  sweep_file = _write_sweep_file(tmp_path / "bad.py", """
      from launch.sweep import grid
      def get_sweep():
        return grid(**{"optimizer.learning_rat": [1e-3, 1e-4]})
      """)
  with pytest.raises(SystemExit, match="'optimizer.learning_rat' is not a field of the base config"):
    sweep.main([sweep_file, "--base-config=configs/clip/digits.py", f"--root={tmp_path / 'root'}"], out=io.StringIO())


def test_a_sweep_files_packaged_base_config_is_found_from_any_directory(tmp_path, monkeypatch):
  # A fresh user ran the shipped sweep's BASE_CONFIG = "configs/clip/digits.py" from another directory:
  # "base config ... does not exist", where launch.run --config=configs/... finds the packaged file.
  sweep_file = _write_sweep_file(tmp_path / "tiny.py", """
      from launch.sweep import grid
      BASE_CONFIG = "configs/clip/digits.py:runlocal"
      def get_sweep():
        return grid(global_batch=[8, 16])
      """)
  monkeypatch.chdir(tmp_path)
  runs, base = sweep.expand(sweep_file, str(tmp_path / "root"))
  assert base == os.path.join(REPO, "configs", "clip", "digits.py") + ":runlocal" and len(runs) == 2
  (tmp_path / "configs" / "clip").mkdir(parents=True)  # a configs/ folder of one's own still wins
  (tmp_path / "configs" / "clip" / "digits.py").write_text(open(os.path.join(REPO, "configs/clip/digits.py")).read())
  assert sweep.expand(sweep_file, str(tmp_path / "root"))[1] == "configs/clip/digits.py:runlocal"
  # A sweep recorded from the repository ('configs/...'), re-run from elsewhere (the packaged absolute path):
  # the same base config, not a change
  (tmp_path / "root").mkdir()
  (tmp_path / "root" / "sweep.json").write_text(json.dumps({"base_config": "configs/clip/digits.py:runlocal"}))
  monkeypatch.chdir(REPO)
  assert sweep.sweep_changes(str(tmp_path / "root"), os.path.join(REPO, "configs/clip/digits.py:runlocal"), [], []) == {}
  assert "base_config" in sweep.sweep_changes(str(tmp_path / "root"), "configs/clip/digits.py:other", [], [])


# A stand-in for clip_jax.train with the same workdir contract: resumes from its last checkpoint
# directory, appends metrics.jsonl lines, writes a zero-shot metric at the end. It kills itself at
# step FAKE_CRASH_AT of the run whose workdir contains FAKE_CRASH_RUN.
FAKE_TRAINER = """
import json, os, signal, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
workdir, total = args["workdir"], int(args.get("config.total_steps", 4))
batch, seed = int(args.get("config.global_batch", 8)), int(args.get("config.seed", 0))
os.makedirs(os.path.join(workdir, "checkpoints"), exist_ok=True)
start = max([int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()], default=0)
if start:
  print(f"Resuming from the checkpoint of step {start}", flush=True)
crash = os.environ.get("FAKE_CRASH_RUN")
for step in range(start + 1, total + 1):
  if crash and crash in workdir and step == int(os.environ["FAKE_CRASH_AT"]):
    os.kill(os.getpid(), signal.SIGKILL)
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": step, "loss": 10.0 / (batch * step) + seed}) + "\\n")
  os.makedirs(os.path.join(workdir, "checkpoints", str(step)))
with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
  f.write(json.dumps({"step": total, "zeroshot/digits/top1": batch / 100 + seed / 10}) + "\\n")
"""


def test_interrupted_sweep_resumes_and_tabulates(tmp_path, monkeypatch):
  (tmp_path / "fake_trainer.py").write_text(FAKE_TRAINER)
  monkeypatch.setenv("PYTHONPATH", str(tmp_path))
  sweep_file = _write_sweep_file(tmp_path / "sweep_bs.py", """
      from launch.sweep import fixed, grid, product, seeds
      BASE_CONFIG = "configs/clip/digits.py"
      def get_sweep():
        return seeds(product(fixed(total_steps=4), grid(global_batch=[16, 32])), 2)
      """)
  root = tmp_path / "root"
  argv = [sweep_file, f"--root={root}", "--module=fake_trainer"]
  monkeypatch.setenv("FAKE_CRASH_RUN", "global_batch=16_seed=1")
  monkeypatch.setenv("FAKE_CRASH_AT", "3")
  out = io.StringIO()
  assert sweep.main(argv, out=out) == 1
  text = out.getvalue()
  assert "global_batch=16_seed=1 failed (exit code 137)" in text and "The sweep stops here" in text
  assert "exit code -9 (killed by SIGKILL)" in text
  names = ["global_batch=16_seed=0", "global_batch=16_seed=1", "global_batch=32_seed=0", "global_batch=32_seed=1"]
  assert [os.path.exists(root / n / "DONE") for n in names] == [True, False, False, False]  # stopped there
  out = io.StringIO()
  assert sweep.main([*argv, "--keep-going"], out=out) == 1  # told to go on: the runs after the crash run
  assert [os.path.exists(root / n / "DONE") for n in names] == [True, False, True, True]

  monkeypatch.delenv("FAKE_CRASH_RUN")
  out = io.StringIO()
  assert sweep.main(argv, out=out) == 0
  text = out.getvalue()
  assert "[1/4] global_batch=16_seed=0: done" in text
  assert "[2/4] global_batch=16_seed=1: resume from step 2" in text
  assert "Resuming from the checkpoint of step 2" in text
  assert all(os.path.exists(root / n / "DONE") for n in names)
  # A third pass has nothing left to do.
  out = io.StringIO()
  assert sweep.main(argv, out=out) == 0
  assert out.getvalue().count(": done") == 4 and "Resuming" not in out.getvalue()

  written = results.write_tables([str(root)], str(tmp_path / "table"))
  with open(written["csv"]) as f:
    rows = list(csv.DictReader(f))
  assert [r["name"] for r in rows] == names
  assert rows[1]["global_batch"] == "16" and rows[1]["seed"] == "1"
  assert float(rows[1]["loss"]) == pytest.approx(10.0 / (16 * 4) + 1)
  assert float(rows[3]["zeroshot/digits/top1"]) == pytest.approx(0.42)
  markdown = written["markdown"]
  assert "| global_batch | seed | step | loss | zeroshot/digits/top1 |" in markdown.replace("name | ", "")
  assert "## Mean ± standard deviation over seeds" in markdown
  assert "| 32 | 2 | 4 | 0.58 ± 0.71 | 0.370 ± 0.071 |" in markdown  # the std to 2 digits, the mean alike
  assert os.path.getsize(written["png"]) > 1000


def test_swept_settings_spread_over_a_factor_of_2_5_get_a_log_axis():
  # A new user's learning-rate sweep (3e-4, 1e-3) was drawn on a linear axis with overlapping tick labels.
  assert results.x_log_base([3e-4, 1e-3]) == 10
  assert results.x_log_base([16, 32, 64, 128]) == 2
  assert results.x_log_base([16, 48]) == 10
  assert results.x_log_base([0.1, 0.2]) is None and results.x_log_base([0, 1, 2]) is None


def test_sweep_emits_slurm_jobs_for_unfinished_runs(tmp_path):
  sweep_file = _write_sweep_file(tmp_path / "s.py", """
      from launch.sweep import grid
      def get_sweep():
        return grid(global_batch=[16, 32])
      """)
  root = tmp_path / "root"
  os.makedirs(root / "global_batch=16")
  (root / "global_batch=16" / "DONE").write_text("600\n")
  out = io.StringIO()
  code = sweep.main([sweep_file, "--base-config=configs/clip/digits.py", f"--root={root}", "--emit=slurm",
                     "--partition=gpu", "--dry-run", "--", "--config.log_every=5"], out=out)
  assert code == 0
  text = out.getvalue()
  assert "global_batch=16: done" in text
  assert f"# {root}/slurm/global_batch=32.sbatch" in text
  assert "#SBATCH --job-name=root-global_batch=32" in text and "#SBATCH --partition=gpu" in text
  assert (f"--workdir={root}/global_batch=32 --config.global_batch=32 --config.log_every=5" in text)
  assert text.count("sbatch ") == 1


# ----------------------------------------------------------------------------- real multi-process runs
def _trainer_args(workdir, steps):
  return ["--config=configs/clip/digits.py", f"--workdir={workdir}", f"--config.total_steps={steps}",
          "--config.global_batch=16", "--config.log_every=1", "--config.checkpoint_every=3", "--config.eval_every=0",
          "--config.zeroshot_eval.enabled=False", "--config.progress_bar=False",
          "--config.peak_flops_per_device=1e12",
          # Parameters sharded over all 8 devices: every process holds and checkpoints only its part.
          # (On CPU, gloo makes a large all-reduce after a reduce-scatter very slow; FSDP avoids it.)
          "--config.mesh.data=1", "--config.mesh.fsdp=8",
          # A constant learning rate after warmup: stopping at step 4 and resuming to 9 follows the
          # same schedule as running to 9 in one go.
          "--config.optimizer.warmup_steps=2", "--config.optimizer.end_learning_rate=0.001"]


def _run_launcher(launch_args, trainer_args, timeout=400):
  return subprocess.run([sys.executable, "-m", "launch.run", *launch_args, "--", *trainer_args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


def _losses(workdir):
  from clip_jax.observe import read_metrics
  return {r["step"]: r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "loss" in r}


@pytest.mark.slow
def test_two_processes_follow_one_process_and_resume_after_ctrl_c(tmp_path):
  """2 processes x 4 devices equal 1 x 8 step by step; Ctrl-C at the launcher (SIGINT, forwarded to
  each process, which turns it into jax's preemption notice) after the first checkpoint makes both
  save the same step and exit 75; the same command resumes to the same losses (issue 20.2)."""
  from killresume import kill_then_resume
  # 9 steps, stopped after 3 or 4 are logged and step 3's checkpoint is finalized: the two processes
  # agree on a stop step a step or two later, well before the last (a stop during the last step
  # lets the run finish).
  steps = 9
  one = _run_launcher(["--devices-per-process=8"], _trainer_args(tmp_path / "1x8", steps))
  assert one.returncode == 0, excerpt(one.stdout)
  command = [sys.executable, "-m", "launch.run", "--num-processes=2", "--devices-per-process=4", "--",
             *_trainer_args(tmp_path / "2x4", steps)]
  resumed = kill_then_resume(command, str(tmp_path / "2x4"), cwd=REPO, env=os.environ, kill_between=(3, 5),
                             timeout=400, sig=signal.SIGINT)
  assert "[0] " in resumed.stdout, excerpt(resumed.stdout)  # prefixed: several processes (both: data files below)
  reference, multi = _losses(tmp_path / "1x8"), _losses(tmp_path / "2x4")
  assert sorted(reference) == sorted(multi) == list(range(1, steps + 1))  # each step once: the lost attempt's dropped
  for step in reference:
    assert multi[step] == pytest.approx(reference[step], abs=1e-5), step
  assert sweep.checkpoint_steps(str(tmp_path / "2x4"))[-1] == steps
  # Both processes wrote their input iterator's state (grain: one file per process).
  data_files = os.listdir(tmp_path / "2x4" / "checkpoints" / str(steps) / "data")
  assert len([f for f in data_files if "process" in f]) == 2, data_files


@pytest.mark.slow
def test_killing_one_process_stops_the_other(tmp_path):
  workdir = tmp_path / "killed"
  log_path = tmp_path / "launcher.log"
  with open(log_path, "w") as log:
    proc = subprocess.Popen([sys.executable, "-u", "-m", "launch.run", "--num-processes=2", "--devices-per-process=4",
                             "--heartbeat-timeout=10", "--", *_trainer_args(workdir, 1000)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 400
    metrics = workdir / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
      assert proc.poll() is None, excerpt(log_path.read_text())
      time.sleep(0.2)
    pids = dict(re.findall(r"started process (\d) \(pid (\d+)\)", log_path.read_text()))
    os.kill(int(pids["1"]), signal.SIGKILL)
    killed_at = time.monotonic()
    survivor = int(pids["0"])
    while time.monotonic() - killed_at < 90:
      try:
        os.kill(survivor, 0)
      except ProcessLookupError:
        break
      time.sleep(0.2)
    stopped_after = time.monotonic() - killed_at
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  text = log_path.read_text()
  assert stopped_after <= 60, f"process 0 still ran {stopped_after:.0f} s after process 1 died"
  assert proc.returncode != 0
  assert f"process 1 (pid {pids['1']}) exited first with exit code -9 (killed by SIGKILL)" in text, excerpt(text)
  # Process 0 stopped on its own (not by the launcher's SIGTERM) and said why.
  own_exit = (f"process 0: exit code {PEER_LOST_EXIT_CODE}" in text and "launch.worker[0]: process(es) [1]" in text)
  runtime_exit = "process 0: exit code -6" in text and "Terminating process because the JAX distributed" in text
  assert own_exit or runtime_exit, excerpt(text)


@pytest.mark.slow
def test_real_sweep_interrupted_and_rerun(tmp_path):
  sweep_file = _write_sweep_file(tmp_path / "tiny.py", """
      from launch.sweep import grid, seeds
      def get_sweep():
        return seeds(grid(global_batch=[8, 16]), 2)
      """)
  root = tmp_path / "root"
  command = [sys.executable, "-m", "launch.sweep", sweep_file, "--base-config=configs/clip/digits.py",
             f"--root={root}", "--", "--config.total_steps=20", "--config.checkpoint_every=10", "--config.log_every=1",
             "--config.eval_every=0", "--config.zeroshot_eval.enabled=False", "--config.progress_bar=False",
             "--config.peak_flops_per_device=1e12", "--config.async_checkpoints=False"]
  proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  second = root / "global_batch=8_seed=1" / "metrics.jsonl"
  deadline = time.time() + 400
  while time.time() < deadline and proc.poll() is None and not (second.exists() and second.read_text().strip()):
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)  # preemption: the run checkpoints and the sweep stops
  output, _ = proc.communicate(timeout=300)
  assert proc.returncode == 75, excerpt(output)
  assert "the sweep stops here" in output
  rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, excerpt(rerun.stdout)
  assert "global_batch=8_seed=0: done" in rerun.stdout
  assert "[2/4] global_batch=8_seed=1: resume from step" in rerun.stdout
  written = results.write_tables([str(root)], str(root / "results"))
  rows = list(csv.DictReader(open(written["csv"])))
  assert len(rows) == 4 and all(r["step"] == "20" and float(r["loss"]) > 0 for r in rows)
  with open(root / "sweep.json") as f:
    assert len(json.load(f)["runs"]) == 4
