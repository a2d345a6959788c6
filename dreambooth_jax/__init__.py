"""DreamBooth on Stable Diffusion in JAX/Flax: UNet, VAE, text encoder, samplers, pipeline.

The pipeline entry points are importable from the package (loaded on first use, so that
`import dreambooth_jax.models.unet` stays light):
  load_pipeline, save_pipeline, encode_prompt, generate, StableDiffusion
"""
from __future__ import annotations

import importlib

_PIPELINE_NAMES = ("StableDiffusion", "load_pipeline", "save_pipeline", "encode_prompt", "generate")
__all__ = list(_PIPELINE_NAMES)


def __getattr__(name: str):
  if name in _PIPELINE_NAMES:
    return getattr(importlib.import_module("dreambooth_jax.sampling.pipeline"), name)
  raise AttributeError(f"module 'dreambooth_jax' has no attribute {name!r}")
