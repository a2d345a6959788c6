"""Every entry point answers a user's typical mistake with one line on stderr and exit code 2 (issue 14).

Each case runs the command as a subprocess, as a user would, and checks: exit code 2, exactly one
line on stderr that starts with "error:" and names the bad value (and the suggestion where there is
one), no "Traceback" anywhere. Cases whose error is found only after jax compiles something, or
that start several processes, are marked slow.
"""
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP = ["--config=configs/clip/digits.py", "--workdir={tmp}/w"]
DB = ["--config=configs/dreambooth/default.py", "--workdir={tmp}/w"]
slow = pytest.mark.slow

# (module, arguments, what the one stderr line must contain). {tmp} is the test's tmp_path.
CASES = [
    # clip_jax.train: config typos and types are checked before absl parses them
    ("clip_jax.train", CLIP + ["--config.modle.name=ViT-Tiny"], ["config.modle.name", "did you mean config.model.name"]),
    pytest.param("clip_jax.train", CLIP + ["--config.name=ViT-Tiny"], ["config.name", "did you mean config.model.name"],
                 marks=slow),
    ("clip_jax.train", CLIP + ["--config.total_steps=abc"], ["config.total_steps", "takes an int", "'abc'"]),
    pytest.param("clip_jax.train", CLIP + ["--config.progress_bar=maybe"], ["config.progress_bar", "takes a bool"],
                 marks=slow),
    ("clip_jax.train", ["--config=configs/clip/digits.py"], ["--workdir"]),
    ("clip_jax.train", ["--config=configs/clip/nope.py", "--workdir={tmp}/w"], ["configs/clip/nope.py"]),
    pytest.param("clip_jax.train", ["--config=configs/clip/paper.py:ViT-Nope", "--workdir={tmp}/w"],
                 ["'ViT-Nope'", "ViT-B-32"], marks=slow),
    ("clip_jax.train", ["--config=configs/clip/digits.py:runlocl", "--workdir={tmp}/w"], ["'runlocl'", "runlocal"]),
    pytest.param("clip_jax.train", CLIP + ["--config.total_steps=0"], ["total_steps", "at least 1"], marks=slow),
    pytest.param("dreambooth_jax.train", ["--config=configs/dreambooth/default.py:lorra", "--workdir={tmp}/w"],
                 ["'lorra'", "lora"], marks=slow),
    pytest.param("clip_jax.train", CLIP + ["--wrokdir=x"], ["wrokdir", "workdir"], marks=slow),
    pytest.param("clip_jax.train", CLIP + ["--config.loss.kind=softmx"], ["'softmx'", "softmax"], marks=slow),
    pytest.param("clip_jax.train", CLIP + ["--config.model.name=ViT-Nope"], ["'ViT-Nope'", "ViT-Tiny"], marks=slow),
    pytest.param("clip_jax.train", CLIP + ["--config.data.source={tmp}/no_shards"], ["no_shards"], marks=slow),
    # dreambooth_jax.train
    ("dreambooth_jax.train", DB + ["--config.clas_noun=dog"], ["config.clas_noun", "did you mean config.class_noun"]),
    pytest.param("dreambooth_jax.train", DB + ["--config.total_steps=1.5"], ["config.total_steps", "takes an int"],
                 marks=slow),
    pytest.param("dreambooth_jax.train", DB + ["--config.pretrained_model={tmp}/sd"], ["config.class_noun is empty"],
                 marks=slow),
    pytest.param("dreambooth_jax.train", DB + ["--config.pretrained_model={tmp}/no_sd", "--config.class_noun=dog",
                                               "--config.instance_dir={tmp}"], ["no_sd"], marks=slow),
    # clip_jax.evaluate
    ("clip_jax.evaluate", [], ["--checkpoint", "--workdir"]),
    pytest.param("clip_jax.evaluate", ["--workdir", "{tmp}/no_run", "--tasks", "zeroshot:digits"], ["no_run"],
                 marks=slow),
    ("clip_jax.evaluate", ["--checkpoint", "x", "--tasks", "zeroshot:cifar11"], ["'cifar11'", "cifar10"]),
    # dreambooth_jax.sample
    pytest.param("dreambooth_jax.sample", ["--prompt", "x"], ["--model", "--out"], marks=slow),
    ("dreambooth_jax.sample", ["--model", "{tmp}/no_sd", "--prompt", "x", "--out", "{tmp}/o"], ["no_sd"]),
    ("dreambooth_jax.sample", ["--model", "x", "--prompt", "x", "--out", "x", "--sampler", "ddimm"], ["'ddimm'", "'ddim'"]),
    # launch
    ("launch.run", ["--mode", "nope", "--", "--config=x"], ["'nope'", "processes"]),
    pytest.param("launch.run", ["--num-processes", "two"], ["--num-processes", "'two'"], marks=slow),
    ("launch.sweep", ["{tmp}/no_sweep.py", "--root", "{tmp}/r"], ["no_sweep.py"]),
    pytest.param("launch.sweep", ["configs/sweeps/digits_batch_size.py"], ["--root"], marks=slow),
    ("launch.results", ["{tmp}/no_runs"], ["no_runs"]),
    # data and DreamBooth tools
    pytest.param("clip_jax.data.prepare", ["--output", "{tmp}/o"], ["--input"], marks=slow),
    ("clip_jax.data.prepare", ["--input", "{tmp}/no_photos", "--output", "{tmp}/o"], ["no_photos"]),
    pytest.param("dreambooth_jax.evaluate", ["--model", "x"], ["--instance-dir"], marks=slow),
    ("dreambooth_jax.evaluate", ["--model", "{tmp}/no_sd", "--instance-dir", "{tmp}", "--class-noun", "dog",
                                 "--identifier", "sks", "--clip", "x", "--out", "{tmp}/o"], ["no_sd"]),
    # The embedded pretraining's and Table 3's parsers are slow-only (7-9 s each: their imports), as their
    # siblings' one-line rule stays fast for every other command.
    pytest.param("dreambooth_jax.embedded.pretrain", ["--workdir", "{tmp}/w", "--vae_steps", "abc"],
                 ["--vae_steps", "'abc'"], marks=slow),
    pytest.param("dreambooth_jax.embedded.table3", ["--steps", "1"], ["--workdir"], marks=slow),
    ("clip_jax.wise_ft", ["--zeroshot", "x"], ["--finetuned"]),
    pytest.param("clip_jax.wise_ft", ["--zeroshot", "{tmp}/no_a", "--finetuned", "{tmp}/no_b", "--tasks",
                                      "zeroshot:digits", "--out", "{tmp}/o"], ["no_a"], marks=slow),
    pytest.param("clip_jax.evaluate", ["--checkpoint", "{tmp}/no_ckpt", "--model-name", "ViT-B-32", "--tasks",
                                       "zeroshot:digits"], ["no_ckpt"], marks=slow),
    pytest.param("clip_jax.eval.prompt_ablation", ["configs/sweeps/digits_prompt_ensembling.py", "--workdir",
                                                   "{tmp}/no_run", "--out", "{tmp}/o"], ["no_run"], marks=slow),
    ("clip_jax.eval.prompt_ablation", ["configs/sweeps/digits_prompt_ensembling.py"], ["--workdir", "--out"]),
    ("clip_jax.draw", ["--prompt", "a cat"], ["--checkpoint"]),
    ("clip_jax.export", ["--checkpoint", "{tmp}/no_ckpt", "--out", "{tmp}/o"], ["no_ckpt"]),  # was a traceback
    ("clip_jax.export", ["--checkpoint", "{tmp}", "--act", "gelo", "--out", "{tmp}/o"], ["--act", "'gelo'"]),
]


def test_architecture_flags_are_one_definition_wherever_a_clip_is_loaded():
  """--model-name and --act of evaluate, draw, edit, export and wise_ft come from one helper
  (evaluate.add_architecture_flags): the same choices and help, a command's own note at the end."""
  from clip_jax import draw, evaluate, export, wise_ft
  from dreambooth_jax import edit
  base = evaluate.argparse.ArgumentParser()
  evaluate.add_architecture_flags(base)
  expected = {a.dest: a for a in base._actions if a.dest in ("model_name", "act")}
  for module in (evaluate, draw, edit, export, wise_ft):
    actions = {a.dest: a for a in module.build_parser()._actions if a.dest in ("model_name", "act")}
    for dest, reference in expected.items():
      got = actions[dest]
      assert (got.option_strings, got.choices, got.default) == (reference.option_strings, reference.choices,
                                                                 reference.default), (module.__name__, dest)
      first_sentence = reference.help.split(" (default")[0].split("; most")[0]
      assert got.help.startswith(first_sentence), (module.__name__, dest, got.help)


def run_cli(module: str, args: list[str], tmp_path, env=None) -> subprocess.CompletedProcess:
  environment = {k: v for k, v in os.environ.items() if k != "CLIP_JAX_DEBUG"}
  environment.update(env or {})
  argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
  return subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, env=environment, capture_output=True,
                        text=True, timeout=600)


def assert_one_line_error(proc: subprocess.CompletedProcess, expected: list[str], tmp_path):
  lines = proc.stderr.strip().splitlines()
  assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
  for part in expected:
    assert part.replace("{tmp}", str(tmp_path)) in lines[0], (part, lines[0])


@pytest.mark.parametrize("module, args, expected", CASES)
def test_user_mistake_is_one_line_with_exit_code_2(module, args, expected, tmp_path):
  assert_one_line_error(run_cli(module, args, tmp_path), expected, tmp_path)


@pytest.mark.parametrize("how", ["flag", pytest.param("env", marks=slow)])
def test_debug_shows_the_traceback(how, tmp_path):
  args = ["--root", str(tmp_path / "r"), str(tmp_path / "no_sweep.py")]
  proc = run_cli("launch.sweep", ["--debug", *args] if how == "flag" else args, tmp_path,
                 env={"CLIP_JAX_DEBUG": "1"} if how == "env" else None)
  assert proc.returncode == 2 and "Traceback" in proc.stderr and "SystemExit" in proc.stderr, proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "no_sweep.py" in proc.stderr.splitlines()[-1]


# Commands whose main() reports its input's errors itself (cli.print_user_error) rather than through cli.run.
DEBUG_CASES = [
    ("clip_jax.data.prepare", ["--input", "{tmp}/no_photos", "--output", "{tmp}/o"], "no_photos"),
    pytest.param("dreambooth_jax.sample", ["--model", "{tmp}/no_sd", "--prompt", "x", "--out", "{tmp}/o"], "no_sd",
                 marks=slow),
    pytest.param("dreambooth_jax.evaluate", ["--model", "{tmp}/no_sd", "--instance-dir", "{tmp}", "--class-noun", "dog",
                                             "--identifier", "sks", "--clip", "x", "--out", "{tmp}/o"], "no_sd",
                 marks=slow),
    pytest.param("clip_jax.wise_ft", ["--zeroshot", "{tmp}/no_a", "--finetuned", "{tmp}/no_b", "--tasks",
                                      "zeroshot:digits", "--out", "{tmp}/o"], "no_a", marks=slow),
    pytest.param("clip_jax.evaluate", ["--checkpoint", "{tmp}/no_ckpt", "--model-name", "ViT-B-32", "--tasks",
                                       "zeroshot:digits"], "no_ckpt", marks=slow),
    pytest.param("clip_jax.eval.prompt_ablation", ["configs/sweeps/digits_prompt_ensembling.py", "--workdir",
                                                   "{tmp}/no_run", "--out", "{tmp}/o"], "no_run", marks=slow),
]


@pytest.mark.parametrize("module, args, named", DEBUG_CASES)
def test_debug_shows_the_traceback_of_every_command(module, args, named, tmp_path):
  # The WORKSPACE promise: --debug shows the traceback behind any command's one-line error (exit 2 still).
  proc = run_cli(module, [*args, "--debug"], tmp_path)
  assert proc.returncode == 2 and "Traceback" in proc.stderr, (proc.returncode, proc.stderr[-2000:])
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and named in last, proc.stderr[-2000:]


def test_a_bug_keeps_its_traceback(tmp_path):
  (tmp_path / "buggy_cmd.py").write_text(textwrap.dedent("""
      from clip_jax import cli
      def main():
        return {}["missing"]
      if __name__ == "__main__":
        cli.run(main)
  """))
  proc = run_cli("buggy_cmd", [], tmp_path, env={"PYTHONPATH": os.pathsep.join([str(tmp_path), REPO])})
  assert proc.returncode == 1 and "Traceback" in proc.stderr and proc.stderr.strip().endswith("KeyError: 'missing'")


@pytest.mark.parametrize("runner", ["run", "run_absl"])
def test_ctrl_c_outside_a_training_loop_is_one_line_with_exit_code_130(runner, tmp_path):
  # Ctrl-C while a command sets up (before a trainer's loop takes SIGINT over): no traceback.
  (tmp_path / "slow_setup.py").write_text(textwrap.dedent(f"""
      import os, signal, time
      from clip_jax import cli
      def main(*_):
        # As at a terminal: a shell's background job (CI's runner, nohup) starts with SIGINT ignored.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
      if __name__ == "__main__":
        cli.{runner}(main{", config_flag=None" if runner == "run_absl" else ""})
  """))
  proc = run_cli("slow_setup", [], tmp_path, env={"PYTHONPATH": os.pathsep.join([str(tmp_path), REPO])})
  assert proc.returncode == 130, proc.stderr
  assert "Traceback" not in proc.stderr and proc.stderr.strip().startswith("interrupted (Ctrl-C)"), proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@slow
def test_error_in_a_multi_process_run_reaches_the_launcher_once(tmp_path):
  # Both processes raise the same error; the launcher's output holds it once (the first to report).
  proc = run_cli("launch.run", ["--mode", "processes", "--num-processes", "2", "--devices-per-process", "1", "--",
                                *CLIP, "--config.totl_steps=3"], tmp_path)
  output = proc.stdout + proc.stderr
  assert proc.returncode == 2, output[-3000:]
  assert output.count("error: unknown config key config.totl_steps") == 1, output
  assert "did you mean config.total_steps" in output and "Traceback" not in output


@slow
def test_a_bug_in_a_multi_process_run_prints_one_traceback(tmp_path):
  (tmp_path / "buggy_worker.py").write_text(textwrap.dedent("""
      from clip_jax import cli
      def main():
        raise RuntimeError("the same bug in every process")
      if __name__ == "__main__":
        cli.run(main)
  """))
  proc = run_cli("launch.run", ["--mode", "processes", "--num-processes", "2", "--devices-per-process", "1",
                                "--module", "buggy_worker", "--", "unused"], tmp_path,
                 env={"PYTHONPATH": os.pathsep.join([str(tmp_path), REPO])})
  output = proc.stdout + proc.stderr
  assert proc.returncode == 1, output[-3000:]
  assert output.count("Traceback") == 1 and output.count("RuntimeError: the same bug in every process") == 1, output


def test_printed_commands_name_the_running_interpreter_and_quote_for_the_shell(tmp_path, monkeypatch):
  """A command printed for the user to paste runs this interpreter (a bare `python` may lack the
  project's packages): relative inside the current directory, absolute outside it."""
  import shlex

  from clip_jax import cli
  venv_python = tmp_path / ".venv" / "bin" / "python"
  venv_python.parent.mkdir(parents=True)
  monkeypatch.setattr(sys, "executable", str(venv_python))
  monkeypatch.chdir(tmp_path)
  assert cli.shown_python() == ".venv/bin/python"
  line = cli.python_command("dreambooth_jax.sample", "--prompt", "a sks dog", "--out", "my runs/x")
  assert line == ".venv/bin/python -m dreambooth_jax.sample --prompt 'a sks dog' --out 'my runs/x'"
  assert shlex.split(line)[4] == "a sks dog"
  monkeypatch.chdir(venv_python.parent)
  assert cli.shown_python() == "./python"  # not the `python` on PATH
  monkeypatch.chdir(tmp_path.parent)
  assert cli.shown_python() == os.path.join(tmp_path.name, ".venv", "bin", "python")
  other = tmp_path / "elsewhere"
  other.mkdir()
  monkeypatch.chdir(other)
  assert cli.shown_python() == str(venv_python)
  assert cli.shown_command(["echo", sys.executable]) == f"echo {venv_python}"  # only the program is shortened


@pytest.mark.parametrize("module", ["clip_jax.train", "dreambooth_jax.train"])
def test_ctrl_c_while_a_command_imports_is_one_line(module, tmp_path):
  # Session 27's fresh user: a Ctrl-C in the seconds jax takes to import printed a KeyboardInterrupt
  # traceback. A stand-in `jax` that is interrupted while importing makes it happen every time.
  (tmp_path / "jax").mkdir()
  (tmp_path / "jax" / "__init__.py").write_text("raise KeyboardInterrupt\n")
  env = {**os.environ, "PYTHONPATH": str(tmp_path)}
  env.pop("CLIP_JAX_DEBUG", None)
  done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 130, done.stderr
  assert done.stderr == ("interrupted (Ctrl-C) while the command was starting: nothing was written; the same command "
                         "starts again.\n"), done.stderr
  debugging = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, env={**env, "CLIP_JAX_DEBUG": "1"},
                             capture_output=True, text=True, timeout=120)
  assert "Traceback" in debugging.stderr and "KeyboardInterrupt" in debugging.stderr
  flagged = subprocess.run([sys.executable, "-m", module, "--debug", "--help"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
  assert "Traceback" in flagged.stderr and "KeyboardInterrupt" in flagged.stderr, flagged.stderr


def test_another_programs_ctrl_c_keeps_pythons_own_traceback(tmp_path):
  # A user's package that imports clip_jax, run with -m: the hook is installed while Python locates the
  # module, but a Ctrl-C in the user's program (after it wrote things) is not ours to call harmless.
  (tmp_path / "userpkg").mkdir()
  (tmp_path / "userpkg" / "__init__.py").write_text("import clip_jax\n")
  (tmp_path / "userpkg" / "script.py").write_text("print('wrote results', flush=True)\nraise KeyboardInterrupt\n")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), REPO])}
  done = subprocess.run([sys.executable, "-m", "userpkg.script"], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=120)
  assert "wrote results" in done.stdout
  assert "Traceback" in done.stderr and "nothing was written" not in done.stderr, done.stderr


def test_an_interrupted_command_runs_its_exit_handlers_but_not_the_teardown():
  # A Ctrl-C during the trainer's first XLA compile ended with the one line, then a segfault in the
  # interpreter's teardown (exit 139; 6 of 6 tries at 7-9 s into `python -m clip_jax.train`). The exit
  # after an interrupt runs the atexit handlers (jax.distributed's shutdown among them) and skips the teardown.
  script = ("import atexit\nfrom clip_jax import cli\natexit.register(lambda: print('exit handler ran', flush=True))\n"
            "print('buffered', end='')\ncli._exit_after_interrupt(130)\n")
  done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert done.returncode == 130 and done.stdout == "bufferedexit handler ran\n", (done.stdout, done.stderr)
