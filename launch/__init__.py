"""How a run starts: `launch.run` (local, local processes, SLURM, TPU), `launch.worker` (one process of
a multi-process run), `launch.sweep` (ablation sweeps), `launch.results` (their tables and plots)."""

import sys as _sys

if _sys.argv[:1] == ["-m"]:  # `python -m PACKAGE.MODULE` is locating its module: a command is starting
  from clip_jax import cli as _cli
  _cli.quiet_interrupt_while_starting()  # Ctrl-C during the imports: one line, not a traceback
