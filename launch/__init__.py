"""How a run starts: `launch.run` (local, local processes, SLURM, TPU), `launch.worker` (one process of
a multi-process run), `launch.sweep` (ablation sweeps), `launch.results` (their tables and plots)."""
