"""Noise schedules, samplers and the text-to-image pipeline (load, save, generate)."""
