"""Docs that match (issue 20.7): every command and config README.md and WORKSPACE.md show runs as
written from a checkout. The fast part reads the commands out of the two files and checks what can
be checked without starting them: the project's venv, modules that exist, config files that load
with their overrides, paths that exist, the fsdp mesh in multi-process commands. The slow part runs
every documented entry point's `--help` (its documented flags must be in it) and the dry runs."""
import glob
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "WORKSPACE.md")
COMMAND_START = re.compile(r"^(\.venv/bin/python|python\d?|bash|[A-Z_]+=\S+ )\b")
VENV_PYTHON = ".venv/bin/python"


def doc_commands() -> list[tuple[str, str]]:
  """[(file, command)]: the lines of fenced blocks and the inline code spans (also those that wrap
  a line) that start like a command, split at `&&` and at ' then '."""
  found = []
  for name in DOCS:
    text = open(os.path.join(ROOT, name)).read()
    lines, inline, fenced = [], [], False
    for line in text.splitlines():
      if line.startswith("```"):
        fenced = not fenced
        continue
      (lines if fenced else inline).append(line)
    candidates = [line.strip() for line in lines]
    # Inline spans outside fences; in the layout block (a fence) too, where they name commands.
    for chunk in ("\n".join(inline), "\n".join(lines)):
      candidates += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", chunk)]
    for candidate in candidates:
      for part in re.split(r"\s*&&\s*|\s+then\s+", candidate):
        if COMMAND_START.match(part) and not part.startswith("python starts"):
          found.append((name, part))
  return found


def doc_text() -> str:
  return "\n".join(open(os.path.join(ROOT, name)).read() for name in DOCS)


def _python_commands():
  return [(f, c) for f, c in doc_commands() if c.startswith(VENV_PYTHON)]


def _expand_optional(command: str) -> list[str]:
  """'a.py[:lora]' means 'a.py' and 'a.py:lora'."""
  match = re.search(r"\[(:[^\]]+)\]", command)
  if not match:
    return [command]
  return [command[:match.start()] + command[match.end():], command[:match.start()] + match.group(1) + command[match.end():]]


def _module(command: str) -> str | None:
  match = re.match(rf"{re.escape(VENV_PYTHON)} -m (\S+)", command)
  return match.group(1) if match else None


def _trainer_argv(command: str) -> list[str]:
  """The trainer's own arguments: after `--` for launch.run/sweep, else the whole command."""
  argv = shlex.split(command.replace("...", ""))[3:]  # drop '.venv/bin/python -m MODULE'
  return argv[argv.index("--") + 1:] if "--" in argv else argv


def test_the_docs_hold_commands():
  commands = [c for _, c in doc_commands()]
  assert len(commands) > 20
  assert any(c.startswith(".venv/bin/python -m clip_jax.train --config=configs/clip/digits.py") for c in commands)


def test_no_bare_python_where_the_venv_is_meant():
  bare = [(f, c) for f, c in doc_commands() if re.match(r"python\d?\b", c)]
  assert not bare, f"use {VENV_PYTHON} (the project's venv): {bare}"


def test_every_documented_module_exists():
  missing = [c for _, c in _python_commands() if _module(c) and importlib.util.find_spec(_module(c)) is None]
  assert not missing


def test_every_documented_config_loads_with_its_overrides(monkeypatch):
  from clip_jax import cli
  monkeypatch.chdir(ROOT)
  checked = 0
  for _, command in _python_commands():
    for variant in _expand_optional(command):
      argv = _trainer_argv(variant)
      if any(a.startswith("--config=") for a in argv):
        cli.check_config_overrides(argv)  # UserError: an unknown key or a wrong type
        checked += 1
  # Every config named anywhere in the docs, with its arguments (e.g. paper.py:ViT-B-32,runlocal).
  specs = set(re.findall(r"configs/[\w/]+\.py(?::[\w,-]+)?", doc_text()))
  for spec in sorted(specs):
    assert os.path.isfile(spec.split(":")[0]), spec
    if "def get_config" not in open(spec.split(":")[0]).read():  # sweeps, common.py's shared base
      continue
    for variant in _expand_optional(spec):
      assert cli._load_config(variant) is not None, variant
  assert checked >= 8 and len(specs) >= 6


def test_documented_files_exist():
  """Files the docs name as inputs (benchmarks/results/ holds outputs, some written only on a GPU)."""
  paths = set(re.findall(r"(?<![\w/.])((?:configs|launch|benchmarks|tests|clip_jax|dreambooth_jax)/[\w/*.-]+\.(?:py|sh|md|csv))",
                         doc_text())) - set(re.findall(r"benchmarks/results/[\w.-]+", doc_text()))
  missing = [p for p in sorted(paths) if not glob.glob(os.path.join(ROOT, p))]
  assert not missing and len(paths) > 10


def test_multi_process_commands_use_the_fast_fsdp_mesh():
  """On CPUs (gloo) a data=8 mesh is 3-4x slower than fsdp=8 (benchmarks/results/launch.md)."""
  multi = [c for _, c in _python_commands() if re.search(r"--mode (processes|slurm)\b", c) and "--dry-run" not in c]
  assert len(multi) >= 3
  slow = [c for c in multi if "--config.mesh.fsdp=8" not in c]
  assert not slow


def test_the_embedded_dreambooth_config_is_documented():
  commands = [c for _, c in _python_commands() if "configs/dreambooth/digits.py" in c]
  assert commands and all(_module(c) == "dreambooth_jax.train" for c in commands)


# ----------------------------------------------------------------------------- running them
def _run(argv, timeout=300):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # one device is enough for --help and dry runs
  return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _help_cases():
  by_module: dict[str, set[str]] = {}
  for _, command in _python_commands():
    module = _module(command)
    if module and module != "pytest":
      argv = shlex.split(command.replace("...", ""))[3:]
      own = argv[:argv.index("--")] if "--" in argv else argv
      by_module.setdefault(module, set()).update(a.split("=")[0] for a in own if a.startswith("--"))
  return sorted(by_module.items())


@pytest.mark.slow
@pytest.mark.parametrize("module, flags", _help_cases(), ids=[m for m, _ in _help_cases()])
def test_documented_entry_point_help(module, flags):
  """`--help` exits 0 and names every flag the docs give this module (before a lone `--`)."""
  result = _run(["-m", module, "--help"])
  assert result.returncode == 0, result.stderr[-2000:]
  text = result.stdout + result.stderr
  if "--config" in flags and "Try --helpfull" in text:  # absl: --config.KEY overrides are config keys
    flags = {f for f in flags if not f.startswith("--config.")}
  missing = [f for f in flags if f not in text]
  assert not missing, f"{module} --help does not know {missing}"


@pytest.mark.slow
def test_documented_dry_runs_start_nothing(tmp_path):
  """The sweep and the TPU command as documented, with --dry-run: they print what would run."""
  commands = [c for _, c in _python_commands() if _module(c) in ("launch.sweep", "launch.run") and "--mode tpu" in c
              or _module(c) == "launch.sweep"]
  assert commands
  for command in commands:
    argv = shlex.split(command)[1:]
    argv = [a.replace("runs/", f"{tmp_path}/runs/") for a in argv]
    if "--dry-run" not in argv:
      argv.insert(argv.index("--") if "--" in argv else len(argv), "--dry-run")
    result = _run(argv)
    assert result.returncode == 0, (command, result.stderr[-2000:])
    assert not os.path.exists(tmp_path / "runs" / "bs" / "sweep.json") or "sweep" not in command


# ----------------------------------------------------------------------------- the README's Python
# The README's placeholders and what stands in for each here (tiny models made in the test).
README_PLACEHOLDERS = ("path/to/clip", "dog.jpg", "exports/my_clip_hf", "path/to/stable-diffusion-v1-5")


def readme_python_block() -> str:
  text = open(os.path.join(ROOT, "README.md")).read()
  blocks = re.findall(r"^## Python\n.*?^```python\n(.*?)^```", text, flags=re.S | re.M)
  assert len(blocks) == 1, "README.md: one ```python block under '## Python'"
  return blocks[0]


def test_readme_python_names_exist():
  """Every `clip_jax.NAME` the README's Python block uses is a top-level name, and its placeholders are
  the ones the run below substitutes."""
  import clip_jax
  block = readme_python_block()
  names = set(re.findall(r"clip_jax\.(\w+)", block))
  assert {"load_checkpoint", "stated_preprocessing", "preprocess", "checkpoint_tokenizer", "export_hf"} <= names
  assert not [n for n in names if n not in clip_jax.__all__]
  assert all(f'"{p}"' in block for p in README_PLACEHOLDERS)
  assert "method=model.get_logits" in block and "load_pipeline" in block


def test_package_docstring_lists_every_public_name():
  """`help(clip_jax)` names each top-level name and points to the README's Python section; the three
  exports sit side by side at the top level."""
  import clip_jax
  from clip_jax import convert
  missing = [n for n in clip_jax.__all__ if n not in clip_jax.__doc__]
  assert not missing and '"Python"' in clip_jax.__doc__
  assert clip_jax.export_open_clip is convert.export_open_clip
  assert clip_jax.export_openai_state_dict is convert.export_openai_state_dict


@pytest.mark.slow  # a tiny CLIP and a tiny SD compiled: ~20-40 s
def test_readme_python_block_runs(tmp_path, monkeypatch, tiny_sd_dir):
  """The block as written, on a tiny CLIP exported as an HF folder, a small JPEG and the tiny SD."""
  import jax
  import numpy as np
  from PIL import Image
  import clip_jax
  model = clip_jax.create_model("ViT-Tiny")
  clip_dir = clip_jax.export_hf(model, clip_jax.init_variables(model, jax.random.key(0)), str(tmp_path / "clip"),
                                tokenizer=clip_jax.get_tokenizer())
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), np.uint8)).save(tmp_path / "dog.jpg")
  stand_ins = dict(zip(README_PLACEHOLDERS, (clip_dir, str(tmp_path / "dog.jpg"), str(tmp_path / "export"),
                                             tiny_sd_dir)))
  block = readme_python_block()
  for placeholder, path in stand_ins.items():
    block = block.replace(f'"{placeholder}"', repr(path))
  block = block.replace("num_steps=30", "num_steps=2")  # the same call, fewer steps
  monkeypatch.chdir(tmp_path)
  namespace: dict = {}
  exec(compile(block, "README.md (## Python)", "exec"), namespace)
  assert namespace["probs"].shape == (1, 2)
  np.testing.assert_allclose(np.sum(namespace["probs"], axis=-1), 1.0, rtol=1e-5)
  assert namespace["image_emb"].shape == (1, model.config.embed_dim)
  assert os.path.isfile(tmp_path / "export" / "model.safetensors")
  assert namespace["pictures"].dtype == np.uint8 and namespace["pictures"].shape[0] == 1
