"""Sweep files for `python -m launch.sweep`: each defines get_sweep() -> a list of config overrides."""
