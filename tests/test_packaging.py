"""The package as users install it: pyproject's dependencies and commands, and a wheel installed into a
fresh virtual environment outside the checkout."""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib

import pytest
from packaging.requirements import Requirement

from launch import commands

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["project"]


def _pins(filename):
  """{normalised name: pinned version} of a requirements file (following -r includes)."""
  pins = {}
  with open(os.path.join(REPO, filename)) as f:
    for line in f:
      line = line.split("#", 1)[0].strip()
      if line.startswith("-r "):
        pins.update(_pins(line[3:].strip()))
      elif line:
        requirement = Requirement(line)
        pins[_normalise(requirement.name)] = str(requirement.specifier).removeprefix("==")
  return pins


def _normalise(name):
  return re.sub(r"[-_.]+", "-", name).lower()


def _ranges(requirements):
  return {_normalise(r.name): r.specifier for r in map(Requirement, requirements)}


def test_declared_ranges_admit_the_pinned_versions():
  project = _pyproject()
  runtime, runtime_pins = _ranges(project["dependencies"]), _pins("requirements.txt")
  assert sorted(runtime) == sorted(runtime_pins), "pyproject's dependencies and requirements.txt name different packages"
  for name, version in runtime_pins.items():
    assert runtime[name].contains(version), f"{name}: pinned {version} is outside pyproject's {runtime[name]}"
  test, test_pins = _ranges(project["optional-dependencies"]["test"]), _pins("requirements-test.txt")
  test_only = {n: v for n, v in test_pins.items() if n not in runtime_pins}
  assert sorted(test) == sorted(test_only), "the 'test' extra and requirements-test.txt name different packages"
  for name, version in test_only.items():
    assert test[name].contains(version), f"{name}: pinned {version} is outside the test extra's {test[name]}"
  for extra, jax_extra in (("gpu", "cuda13"), ("tpu", "tpu")):
    (requirement,) = map(Requirement, project["optional-dependencies"][extra])
    assert requirement.name == "jax" and requirement.extras == {jax_extra}
    assert requirement.specifier.contains(runtime_pins["jax"])


def test_every_command_runs_its_module():
  for name, target in _pyproject()["scripts"].items():
    module, function = target.split(":")
    assert module == "launch.commands" and function == name.replace("-", "_"), (name, target)
    assert callable(getattr(commands, function)), name
    expected = getattr(commands, function).__doc__.split("`")[1].removeprefix("python -m ")
    assert os.path.exists(os.path.join(REPO, *expected.split("."))+ ".py"), (name, expected)


def test_config_paths_fall_back_to_the_packaged_configs(tmp_path):
  packaged = os.path.join(REPO, "configs", "clip", "digits.py")
  elsewhere = str(tmp_path)
  assert commands.packaged_config("--config=configs/clip/digits.py:runlocal", elsewhere) == \
      f"--config={packaged}:runlocal"
  assert commands.packaged_config("configs/clip/digits.py", elsewhere) == packaged       # `--config PATH`
  assert commands.packaged_config("--base-config=configs/clip/digits.py", elsewhere) == f"--base-config={packaged}"
  # Unchanged: a configs/ folder where the command runs, a file the package does not have, other flags.
  (tmp_path / "configs" / "clip").mkdir(parents=True)
  (tmp_path / "configs" / "clip" / "digits.py").write_text("")
  assert commands.packaged_config("--config=configs/clip/digits.py", elsewhere) == "--config=configs/clip/digits.py"
  assert commands.packaged_config("--config=configs/clip/nope.py", elsewhere) == "--config=configs/clip/nope.py"
  assert commands.packaged_config("--config.total_steps=2", elsewhere) == "--config.total_steps=2"
  assert commands.packaged_config("--dry-run", elsewhere) == "--dry-run"


@pytest.mark.slow  # child processes from another directory (9 s); packaged_config's rule is tested fast above
def test_python_m_commands_find_the_packaged_configs_from_any_directory(tmp_path):
  """A new user ran `python -m dreambooth_jax.embedded.table3` outside the checkout: its child
  `python -m clip_jax.train --config=configs/clip/digits.py` said 'no such config file'. Every
  command now resolves `configs/...` as the installed scripts do: the config below loads (the
  override is then checked against it), from a directory without configs/."""
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  for module, config in (("clip_jax.train", "configs/clip/digits.py"),
                         ("dreambooth_jax.train", "configs/dreambooth/digits.py")):
    proc = subprocess.run([sys.executable, "-m", module, f"--config={config}", "--config.no_such_key=1",
                           f"--workdir={tmp_path / 'run'}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no_such_key" in proc.stderr and "no such config file" not in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_wheel_installs_into_a_fresh_venv_and_its_commands_work(tmp_path):
  # Build from a copy of the packages, so the checkout gets no build/ or *.egg-info folders.
  source = tmp_path / "source"
  for package in ("clip_jax", "dreambooth_jax", "launch", "configs"):
    shutil.copytree(os.path.join(REPO, package), source / package, ignore=shutil.ignore_patterns("__pycache__"))
  shutil.copy(os.path.join(REPO, "pyproject.toml"), source)
  dist = tmp_path / "dist"
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                  "--wheel-dir", str(dist), str(source)], check=True, capture_output=True, timeout=600)
  (wheel,) = dist.glob("clip_jax-*.whl")

  # A fresh venv that sees this environment's packages (as --system-site-packages would see the system's),
  # so pip checks the declared ranges against them and downloads nothing (--no-index).
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
  python = venv / "bin" / "python"
  site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        capture_output=True, text=True, check=True).stdout.strip()
  shared = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
  with open(os.path.join(site, "test_environment.pth"), "w") as f:
    f.write("\n".join(sorted(shared)) + "\n")
  installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index",
                              str(wheel)], capture_output=True, text=True, timeout=600)
  assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]

  elsewhere = tmp_path / "elsewhere"   # no checkout here: imports and configs come from the venv
  elsewhere.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  where = subprocess.run([python, "-c", "import clip_jax, configs, launch; print(clip_jax.__file__, configs.__file__)"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.split()
  assert all(path.startswith(site) for path in where), where
  assert os.path.exists(os.path.join(site, "clip_jax", "csrc", "rows_contracted_mkl.cc"))  # cpu_gemm builds it
  for name in _pyproject()["scripts"]:
    assert (venv / "bin" / name).exists(), name

  helped = subprocess.run([venv / "bin" / "launch-run", "--help"], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=300)
  assert helped.returncode == 0 and "--mode" in helped.stdout, helped.stderr[-2000:]
  printed = subprocess.run([venv / "bin" / "launch-run", "--dry-run", "--", "--config=configs/clip/digits.py",
                            "--workdir=w"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
  assert f"--config={site}/configs/clip/digits.py" in printed.stdout, printed.stdout + printed.stderr[-2000:]

  workdir = elsewhere / "digits"
  trained = subprocess.run([venv / "bin" / "clip-jax-train", "--config=configs/clip/digits.py:runlocal",
                            f"--workdir={workdir}", "--config.total_steps=2", "--config.progress_bar=False",
                            "--config.peak_flops_per_device=1e12"], cwd=elsewhere, env=env, capture_output=True,
                           text=True, timeout=900)
  assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
  assert os.path.isdir(workdir / "checkpoints" / "2") and os.path.exists(workdir / "results.json")


def test_the_setup_installs_this_checkout_so_it_imports_from_any_directory(tmp_path):
  """`bash launch/setup.sh` ends with an editable install of the checkout (what `.ci/run` runs first): the venv's
  Python imports these packages, and its commands run, outside the checkout (here, an empty directory)."""
  code = ("import clip_jax, dreambooth_jax, configs, launch, os; "
          "print(*(os.path.dirname(os.path.dirname(m.__file__)) for m in (clip_jax, dreambooth_jax, configs, launch)))")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
  assert proc.returncode == 0, f"run `bash launch/setup.sh` (it installs the checkout): {proc.stderr[-500:]}"
  assert set(proc.stdout.split()) == {REPO}, proc.stdout
  command = os.path.join(os.path.dirname(sys.executable), "clip-jax-train")
  proc = subprocess.run([command, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True)
  assert proc.returncode == 0 and "CLIP training" in proc.stdout, proc.stderr[-500:]
