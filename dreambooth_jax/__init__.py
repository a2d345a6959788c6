"""DreamBooth on Stable Diffusion in JAX/Flax: UNet, VAE, text encoder, samplers, pipeline.

The pipeline entry points are importable from the package (loaded on first use, so that
`import dreambooth_jax.models.unet` stays light):
  load_pipeline, save_pipeline, encode_prompt, generate, StableDiffusion
"""
from __future__ import annotations

import importlib

import sys as _sys

if _sys.argv[:1] == ["-m"]:  # `python -m PACKAGE.MODULE` is locating its module: a command is starting
  from clip_jax import cli as _cli
  _cli.quiet_interrupt_while_starting()  # Ctrl-C during the imports: one line, not a traceback

_PIPELINE_NAMES = ("StableDiffusion", "load_pipeline", "save_pipeline", "encode_prompt", "generate")
__all__ = list(_PIPELINE_NAMES)


def __getattr__(name: str):
  if name in _PIPELINE_NAMES:
    return getattr(importlib.import_module("dreambooth_jax.sampling.pipeline"), name)
  raise AttributeError(f"module 'dreambooth_jax' has no attribute {name!r}")
