"""clip_jax.child_runs.ensure_trained: which paths a demo trains (or resumes) and which it uses as they are."""
import json
import os
import re
import sys

import pytest

from clip_jax import child_runs, cli, loop


@pytest.fixture
def calls(monkeypatch):
  made = []
  monkeypatch.setattr(child_runs, "train_child", lambda config, workdir, *overrides: made.append(
      (config, workdir, overrides)) or 0.0)
  return made


def _ensure(path, lines):
  return child_runs.ensure_trained(str(path), "configs/clip/digits.py", "--config.seed=1", log=lines.append)


def test_absent_is_trained_and_finished_is_used_as_it_is(tmp_path, calls):
  lines = []
  assert _ensure(tmp_path / "new", lines) is True
  assert calls == [("configs/clip/digits.py", str(tmp_path / "new"), ("--config.seed=1",))]
  assert "nothing there yet" in lines[-1] and "--config.seed=1" in lines[-1]
  os.makedirs(tmp_path / "done" / "checkpoints" / "600")
  loop.mark_finished(str(tmp_path / "done"), 600)
  assert _ensure(tmp_path / "done", lines) is False and len(calls) == 1
  assert "finished run" in lines[-1]


def test_a_run_from_before_done_records_is_finished_by_its_results(tmp_path, calls):
  # The README's workdirs/digits of an earlier version: checkpoints and results.json, no DONE. Resuming
  # it is refused by today's trainer (its config record lacks keys added since), so it must count as done.
  workdir = tmp_path / "digits"
  os.makedirs(workdir / "checkpoints" / "600")
  (workdir / "results.json").write_text(json.dumps({"step": 600}))
  lines = []
  assert _ensure(workdir, lines) is False and calls == [] and "finished run" in lines[-1]


def test_a_failing_child_is_one_user_error_line(tmp_path):
  # The interpreter as the user can paste it (not a bare `python`), the command quoted for the shell.
  shown = re.escape(f"`{cli.shown_python()} -c 'import sys; sys.exit(3)'` exited with status 3 ")
  with pytest.raises(child_runs.ChildFailed, match=f"^{shown}" + r"\(its own message is above\)$") as caught:
    child_runs.run_child([sys.executable, "-c", "import sys; sys.exit(3)"])
  assert isinstance(caught.value, cli.UserError)


@pytest.mark.parametrize("made_by_the_trainer", ["checkpoints/300/", "metrics.jsonl", "config.json"])
def test_an_unfinished_trainer_workdir_is_resumed_not_used_half_trained(tmp_path, calls, made_by_the_trainer):
  # An interrupted run (Ctrl-C, preemption) has no DONE record: before, the fine-tuning demo used any
  # workdir with a checkpoint, and the DreamBooth pretraining any existing path, half-trained as it was.
  workdir = tmp_path / "digits"
  target = workdir / made_by_the_trainer
  os.makedirs(target if made_by_the_trainer.endswith("/") else workdir, exist_ok=True)
  if made_by_the_trainer == "config.json":  # stopped before its first checkpoint: the trainer's config record
    target.write_text(json.dumps({"seed": 0, "total_steps": 600, "model": {"name": "ViT-Tiny"}}))
  elif not made_by_the_trainer.endswith("/"):
    target.write_text("")
  lines = []
  assert _ensure(workdir, lines) is True
  assert calls == [("configs/clip/digits.py", str(workdir), ("--config.seed=1",))]
  assert "unfinished run" in lines[-1] and "resuming" in lines[-1]


@pytest.mark.parametrize("layout", ["hf_folder", "open_clip_folder", "file", "empty_folder"])
def test_an_exported_checkpoint_is_used_as_it_is_never_trained_into(tmp_path, calls, layout):
  path = tmp_path / "exported"
  if layout == "file":
    path.write_bytes(b"not read here")
  else:
    os.makedirs(path)
  if layout == "hf_folder":  # a Hugging Face folder has a config.json too, without the trainer's keys
    (path / "config.json").write_text(json.dumps({"model_type": "clip", "architectures": ["CLIPModel"]}))
    (path / "model.safetensors").write_bytes(b"")
  elif layout == "open_clip_folder":
    (path / "open_clip_config.json").write_text("{}")
  before = sorted(os.listdir(path)) if path.is_dir() else path.read_bytes()
  lines = []
  assert _ensure(path, lines) is False and calls == []
  assert "not a trainer workdir" in lines[-1]
  assert (sorted(os.listdir(path)) if path.is_dir() else path.read_bytes()) == before  # nothing written there


def test_a_clip_taken_as_given_warns_only_when_it_is_an_unfinished_run(tmp_path, capsys):
  workdir = tmp_path / "run"
  os.makedirs(workdir / "checkpoints" / "150")
  os.makedirs(workdir / "checkpoints" / "300")
  warning = child_runs.warn_if_unfinished(str(workdir), "--clip")  # what the demos call: printed, returned
  assert capsys.readouterr().err == warning + "\n"
  assert warning.startswith(f"warning: --clip {workdir} is an unfinished training run") and "step 300" in warning
  assert "\n" not in warning
  loop.mark_finished(str(workdir), 600)
  assert child_runs.unfinished_warning(str(workdir), "--clip") is None
  exported = tmp_path / "hf"
  os.makedirs(exported)
  (exported / "config.json").write_text(json.dumps({"model_type": "clip"}))
  assert child_runs.unfinished_warning(str(exported), "--clip") is None
  assert child_runs.unfinished_warning(str(tmp_path / "missing"), "--clip") is None


def test_a_child_trainer_that_saved_and_stopped_makes_the_command_resumable(tmp_path):
  """A child trainer exiting with 75 (saved, stopped early: here a SIGTERM of its own) raises ChildSaved,
  which clip_jax.cli turns into exit 75, the trainer's own code; any other failure stays ChildFailed."""
  assert child_runs.ChildSaved.exit_code == loop.EXIT_PREEMPTED
  with pytest.raises(child_runs.ChildSaved):
    child_runs.run_child([sys.executable, "-c", "import sys; sys.exit(75)"])
  with pytest.raises(child_runs.ChildFailed):
    child_runs.run_child([sys.executable, "-c", "import sys; sys.exit(3)"])
