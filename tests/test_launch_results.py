"""launch.results on runs a new user compares (standalone workdirs beside sweep roots), the sweep's
stop line, and SLURM submissions that keep their scripts and explain exit code 75."""
import io
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from launch import results, slurm, sweep
from launch import run as launcher
from test_slurm import slurm_env  # noqa: F401 (the one-node SLURM cluster fixture, skipped without SLURM)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _standalone(path, loss, top1, config=None):
  """A finished workdir as the trainers leave it: results.json, and config.json when `config` is given."""
  os.makedirs(path)
  with open(os.path.join(path, "results.json"), "w") as f:
    json.dump({"step": 60, "train/loss": loss, "zeroshot/shapes/top1": top1}, f)
  if config is not None:
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(config, f)
  return str(path)


def _config(total_steps=60, learning_rate=1e-3, log_every=10, seed=0, global_batch=32):
  return {"seed": seed, "total_steps": total_steps, "log_every": log_every, "global_batch": global_batch,
          "optimizer": {"learning_rate": learning_rate, "total_steps": total_steps, "warmup_steps": 10}}


def _sweep_root(root, runs):
  """A sweep root: sweep.json naming `runs` [(name, overrides, loss)] and their workdirs."""
  os.makedirs(root)
  record = {"runs": [{"name": name, "overrides": overrides} for name, overrides, _ in runs]}
  (root / "sweep.json").write_text(json.dumps(record))
  for name, overrides, loss in runs:
    config = _config(**{k.rsplit(".", 1)[-1]: v for k, v in overrides.items()})
    _standalone(root / name, loss, 50.0, config)
  return str(root)


def _lr_sweep(root):
  common = {"total_steps": 80, "log_every": 10}
  return _sweep_root(root, [(f"learning_rate={lr:g}", {**common, "optimizer.learning_rate": lr}, loss)
                            for lr, loss in ((3e-4, 1.9), (1e-3, 1.8), (3e-3, 1.85))])


# ----------------------------------------------------------------------------- averaging over seeds only
def test_unrelated_standalone_runs_are_one_bar_each_by_directory_name(tmp_path):
  # A new user's three unrelated runs (no seed differs; one without config.json) became ONE bar "run"
  # with a mean ± std error bar.
  paths = [_standalone(tmp_path / "p1x8", 1.98, 63.3, _config()), _standalone(tmp_path / "p2x4", 1.97, 62.0, _config()),
           _standalone(tmp_path / "plain", 1.70, 61.0)]
  rows, settings, metrics = results.collect(paths)
  entries, keys = results.group_over_seeds(rows, settings, metrics)
  assert [e["name"] for e in entries] == ["p1x8", "p2x4", "plain"]
  assert all(e["seeds"] == 1 and "loss std" not in e for e in entries)
  fig = results.figure(entries, keys, ["loss"])
  ax = fig.axes[0]
  assert len(ax.patches) == 3 and [t.get_text() for t in ax.get_xticklabels()] == ["p1x8", "p2x4", "plain"]
  assert not ax.containers[1:], "no error bars: nothing was averaged"
  written = results.write_tables(paths, str(tmp_path / "compare"))
  assert "over seeds" not in written["markdown"]


def test_runs_are_averaged_only_when_they_differ_only_by_distinct_seeds(tmp_path):
  root = _sweep_root(tmp_path / "seeds", [
      ("global_batch=8_seed=0", {"global_batch": 8, "seed": 0}, 1.0),
      ("global_batch=8_seed=1", {"global_batch": 8, "seed": 1}, 2.0),
      ("global_batch=16_seed=0", {"global_batch": 16, "seed": 0}, 3.0),
      ("global_batch=16_seed=0_2", {"global_batch": 16, "seed": 0}, 5.0)])  # a repeat of one seed
  lone = _standalone(tmp_path / "lone", 4.0, 40.0, _config(seed=1))
  rows, settings, metrics = results.collect([root, lone])
  entries, _ = results.group_over_seeds(rows, settings, metrics)
  by_name = {e["name"]: e for e in entries}
  assert sorted(by_name) == ["global_batch=16_seed=0", "global_batch=16_seed=0_2", "global_batch=8", "lone"]
  assert by_name["global_batch=8"]["seeds"] == 2 and by_name["global_batch=8"]["loss"] == pytest.approx(1.5)
  assert by_name["global_batch=16_seed=0"]["seeds"] == 1 and by_name["lone"]["seeds"] == 1
  written = results.write_tables([root, lone], str(tmp_path / "table"))
  assert "## Mean ± standard deviation over seeds" in written["markdown"]
  assert "Runs that differ only by seed are averaged" in written["markdown"]
  fig = results.figure(entries, ["global_batch"], ["loss"], "t")
  assert "mean ± std over seeds" in fig.texts[0].get_text()  # the plot says so too


def test_mixed_comparison_plot_has_whole_labels_and_no_layout_warning(tmp_path):
  # Three standalone runs and a sweep root: 6 runs became 4 bars, labels clipped ("=0.0003", "…rate="),
  # and matplotlib warned "Tight layout not applied".
  paths = [_standalone(tmp_path / name, 1.9, 60.0, _config()) for name in ("p1x8", "p2x4", "slurm")]
  paths.append(_lr_sweep(tmp_path / "sweep"))
  rows, settings, metrics = results.collect(paths)
  entries, keys = results.group_over_seeds(rows, settings, metrics)
  assert len(entries) == 6
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # matplotlib's layout warnings fail the test
    written = results.write_tables(paths, str(tmp_path / "compare"))
    fig = results.figure(entries, keys, [m for m in metrics if m != "step"])
    fig.canvas.draw()
  figure_box = fig.bbox
  for ax in fig.axes:
    labels = ax.get_xticklabels()
    assert {"learning_rate=0.0003", "learning_rate=0.003", "p1x8"} <= {t.get_text() for t in labels}
    for label in labels:
      box = label.get_window_extent()
      assert box.x0 >= figure_box.x0 and box.y0 >= figure_box.y0 and box.x1 <= figure_box.x1, label.get_text()
  assert os.path.getsize(written["png"]) > 1000


def test_long_names_are_shortened_one_setting_per_line():
  assert results.tick_label("global_batch=64_optimizer.learning_rate=0.001") == "global_batch=64\nlearning_rate=0.001"
  assert results.tick_label("a_very_long_standalone_run_name_of_a_user", width=12) == "a_ver…a_user"
  assert results.name_parts("my_run") == ["my_run"]
  assert results.overrides_from_name("lr003_plain") == {}


# ----------------------------------------------------------------------------- settings from config.json
def test_standalone_runs_show_their_config_settings_that_differ(tmp_path):
  # Standalone workdirs had blank total_steps / learning_rate columns though config.json holds them.
  a = _standalone(tmp_path / "short", 2.0, 50.0, _config(total_steps=60, log_every=10))
  b = _standalone(tmp_path / "long", 1.5, 60.0, _config(total_steps=100, log_every=50, learning_rate=3e-3))
  sweep_root = _lr_sweep(tmp_path / "sweep")
  rows, settings, _ = results.collect([a, b, sweep_root])
  # What differs and changes the numbers; not log_every (how a run is carried out), not the optimizer's
  # copy of total_steps, not the keys that are equal everywhere (global_batch, warmup_steps).
  assert settings == ["total_steps", "optimizer.learning_rate"]
  assert [(r["total_steps"], r["optimizer.learning_rate"]) for r in rows[:2]] == [(60, 1e-3), (100, 3e-3)]
  written = results.write_tables([a, b], str(tmp_path / "two"))
  assert "| short | 60 | 0.001 |" in written["markdown"]


def test_settings_fall_back_to_results_json_and_a_sweep_varying_log_every_shows_it(tmp_path):
  path = tmp_path / "no_config"
  _standalone(path, 1.0, 10.0)
  record = json.loads((path / "results.json").read_text())
  record["settings"] = {"total_steps": 7, "versions": {"jax": "0"}, "devices": 8, "processes": 1, "platform": "cpu"}
  (path / "results.json").write_text(json.dumps(record))
  assert results.run_config(str(path)) == {"total_steps": 7}  # where it ran is not what was run
  # DreamBooth's photo records ({file: hash}) are not settings: they made a column per photo.
  photos = _standalone(tmp_path / "dog", 1.0, 10.0, {"total_steps": 5, "instance_images": {"dog1.jpg": "ab12"},
                                                       "class_images": {"c0.png": "cd34"}})
  assert results.run_config(photos) == {"total_steps": 5}
  root = _sweep_root(tmp_path / "cadence", [(f"log_every={n}", {"log_every": n}, 1.0) for n in (1, 5)])
  _, settings, _ = results.collect([root])
  assert settings == ["log_every"]  # operational, but what this sweep varies


# ----------------------------------------------------------------------------- the sweep's stop line
def test_stop_line_says_where_the_run_stopped(tmp_path):
  workdir = tmp_path / "run"
  os.makedirs(workdir)
  assert sweep.stop_line("lr=0.003", str(workdir), 80) == (
      "sweep: lr=0.003 stopped before its first checkpoint (nothing saved); the sweep stops here. "
      "Run the same command again to start it again.")
  os.makedirs(workdir / "checkpoints" / "40")
  assert sweep.stop_line("lr=0.003", str(workdir), 80) == (
      "sweep: lr=0.003 stopped at step 40 of 80 (saved; the same command resumes); the sweep stops here. "
      "Run the same command again to resume it.")
  os.makedirs(workdir / "checkpoints" / "80")  # the stop came during the last step: the run finished
  assert "lr=0.003 finished all 80 steps before the stop" in sweep.stop_line("lr=0.003", str(workdir), 80)


# Stands in for a trainer stopped by SIGTERM at step 2 of a fresh run: saves, exits 75.
STOPPING_TRAINER = """
import os, sys
workdir = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)["workdir"]
os.makedirs(os.path.join(workdir, "checkpoints", "2"))
sys.exit(75)
"""


def test_a_sweep_interrupted_in_a_fresh_run_says_the_step(tmp_path, monkeypatch):
  # It printed "stopped at resume from step 40" (a status string pasted into the sentence).
  (tmp_path / "stopping_trainer.py").write_text(STOPPING_TRAINER)
  monkeypatch.setenv("PYTHONPATH", str(tmp_path))
  sweep_file = tmp_path / "s.py"
  sweep_file.write_text(textwrap.dedent("""
      from launch.sweep import grid
      BASE_CONFIG = "configs/clip/digits.py"
      def get_sweep():
        return grid(total_steps=[4], global_batch=[8, 16])
      """))
  out = io.StringIO()
  assert sweep.main([str(sweep_file), f"--root={tmp_path / 'root'}", "--module=stopping_trainer"], out=out) == 75
  assert "sweep: global_batch=8 stopped at step 2 of 4 (saved; the same command resumes)" in out.getvalue()


# ----------------------------------------------------------------------------- SLURM submissions
FAKE_SBATCH = """#!/bin/bash
# sbatch --parsable SCRIPT: records the script it was given, prints the next job id
n=$(( $(cat "$FAKE_SLURM/next" 2>/dev/null || echo 100) + 1 )); echo $n > "$FAKE_SLURM/next"
cp "$2" "$FAKE_SLURM/submitted-$n"; echo "$n"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "JobId=$4 JobState=FAILED Reason=NonZeroExitCode ExitCode=75:0"
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
  """sbatch / squeue / scontrol stand-ins on PATH: every job ends FAILED with exit code 75 (preempted)."""
  bin_dir = tmp_path / "bin"
  os.makedirs(bin_dir)
  for name, body in (("sbatch", FAKE_SBATCH), ("scontrol", FAKE_SCONTROL), ("squeue", "#!/bin/bash\n")):
    (bin_dir / name).write_text(body)
    os.chmod(bin_dir / name, 0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_SLURM", str(tmp_path))
  monkeypatch.chdir(tmp_path)
  return tmp_path


def test_each_slurm_submission_keeps_its_script_and_wait_exits_75_when_preempted(fake_slurm):
  argv = ["--mode=slurm", "--devices-per-process=4", "--ntasks-per-node=2", "--wait", "--",
          "--config=configs/clip/digits.py", "--workdir=runs/slurm"]
  texts = []
  for learning_rate in ("1e-3", "3e-3"):  # the same job submitted twice, the second with another setting
    out = io.StringIO()
    assert launcher.launch([*argv, f"--config.optimizer.learning_rate={learning_rate}"], out=out) == 75
    texts.append(out.getvalue())
  logs = fake_slurm / "slurm_logs"
  assert sorted(os.listdir(logs)) == ["slurm-101.sbatch", "slurm-102.sbatch"]
  assert "learning_rate=1e-3" in (logs / "slurm-101.sbatch").read_text()
  assert "learning_rate=3e-3" in (logs / "slurm-102.sbatch").read_text()
  assert f"its script: {logs / 'slurm-102.sbatch'}" in texts[1]
  assert ("launch: job 101 ended FAILED (exit code 75:0: 75 = stopped early (preempted, or scancel --signal=TERM) "
          "with a checkpoint saved; submitting the same command again resumes it)") in texts[0]


def test_kept_script_path_and_end_line():
  assert slurm.kept_script_path("slurm_logs/run.sbatch", "7") == "slurm_logs/run-7.sbatch"
  assert slurm.kept_script_path("root/slurm/lr=0.1", "7") == "root/slurm/lr=0.1-7.sbatch"
  assert slurm.end_line("7", "COMPLETED", "0:0", "L") == "launch: job 7 ended COMPLETED (exit code 0:0); log: L"
  assert slurm.end_line("7", "FAILED", "1:0", "L") == "launch: job 7 ended FAILED (exit code 1:0); log: L"
  assert slurm.end_line("7", "FAILED", "69:0", "L") == (
      "launch: job 7 ended FAILED (exit code 69:0: 69 = a task found another gone and stopped without saving (the "
      "log says which and why); submitting the same command again resumes from the last checkpoint saved, or starts "
      "again if there is none); log: L")


@pytest.mark.slow
def test_real_slurm_job_that_stops_early_makes_launch_run_exit_75(slurm_env, tmp_path):
  """On the one-node cluster: a task that exits 75 as a preempted trainer does; the job ends FAILED 75:0."""
  (tmp_path / "stops_early.py").write_text("import sys\nsys.exit(75)\n")
  env = {**slurm_env, "PYTHONPATH": str(tmp_path)}
  done = subprocess.run([sys.executable, "-m", "launch.run", "--mode=slurm", "--ntasks-per-node=1",
                         "--devices-per-process=1", f"--log-dir={tmp_path / 'logs'}", "--module=stops_early",
                         "--wait", "--", "--workdir=unused"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 75, done.stdout[-3000:] + done.stderr[-3000:]
  assert "ended FAILED (exit code 75:0: 75 = stopped early" in done.stdout
  assert len([f for f in os.listdir(tmp_path / "logs") if f.endswith(".sbatch")]) == 1


def test_a_metric_column_shows_one_number_of_decimals():
  # A fresh user's table mixed 10.12 | 9.471 | 54.04 with 10.6 | 11.7 in one column (4 significant digits each).
  rows = [{"name": "a", "lr": 0.0003, "top1": 10.12, "loss": 2.0}, {"name": "b", "lr": 0.003, "top1": 10.6, "loss": 3.0},
          {"name": "c", "lr": 0.01, "top1": 54.04, "loss": 1.0}]
  table = results.markdown(rows, ["name", "lr", "top1", "loss"], metrics=["top1", "loss"])
  assert "| a | 0.0003 | 10.12 | 2 |" in table and "| b | 0.003 | 10.60 | 3 |" in table, table  # settings as given
  assert results._mean_std({"top1": 0.37, "top1 std": 0.07071}, "top1") == "0.370 ± 0.071"
  assert results._mean_std({"top1": 96.66, "top1 std": 0.0}, "top1") == "96.66 ± 0"
