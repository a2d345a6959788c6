"""The installed commands (pyproject.toml's console scripts): each runs one module exactly as
`python -m MODULE ARGS` would, so `clip-jax-train --config=... --workdir=...` and
`python -m clip_jax.train --config=... --workdir=...` are the same program.

A config path under `configs/` that does not exist where the command runs resolves to the configs
installed with the package (`clip_jax.cli.packaged_config`, which `python -m` runs apply too), so the
README's `--config=configs/clip/digits.py` works from any directory once the package is installed (a
local `configs/` folder still wins).
"""
from __future__ import annotations

import runpy
import sys

from clip_jax.cli import packaged_config


def run_module(module: str, argv: list[str] | None = None) -> None:
  """Runs `module` as __main__ with `argv` (default: this process's arguments), configs resolved."""
  args = sys.argv[1:] if argv is None else argv
  sys.argv = [module, *(packaged_config(a) for a in args)]
  runpy.run_module(module, run_name="__main__", alter_sys=True)


def _command(module: str):
  def main() -> None:
    run_module(module)
  main.__doc__ = f"`python -m {module}`, installed as a command."
  return main


clip_jax_train = _command("clip_jax.train")
clip_jax_evaluate = _command("clip_jax.evaluate")
clip_jax_prepare = _command("clip_jax.data.prepare")
dreambooth_jax_train = _command("dreambooth_jax.train")
dreambooth_jax_sample = _command("dreambooth_jax.sample")
dreambooth_jax_evaluate = _command("dreambooth_jax.evaluate")
launch_run = _command("launch.run")
launch_sweep = _command("launch.sweep")
launch_results = _command("launch.results")
