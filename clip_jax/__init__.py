"""clip_jax: CLIP models, tokenizers, losses, data, training and evaluation in JAX/Flax.

Names are imported on first use, so a data-loading worker process that unpickles a pipeline
stage from `clip_jax.data` does not pay for importing jax and flax.
"""
import importlib

_EXPORTS = {
    "CLIP": "clip_jax.models", "CLIPConfig": "clip_jax.models", "MODEL_CONFIGS": "clip_jax.models",
    "create_model": "clip_jax.models", "init_variables": "clip_jax.models", "l2_normalize": "clip_jax.models",
    "load_checkpoint": "clip_jax.convert", "export_hf": "clip_jax.convert",
    "tokenize": "clip_jax.tokenizer", "get_tokenizer": "clip_jax.tokenizer",
    "ClipTokenizer": "clip_jax.tokenizer", "SentencePieceTokenizer": "clip_jax.tokenizer",
}
__all__ = sorted(_EXPORTS) + ["preprocess"]

# Imported now (numpy + PIL only): the function shares its name with its module, and a lazy
# lookup would lose to the submodule attribute once anything imports `clip_jax.preprocess`.
from clip_jax.preprocess import preprocess  # noqa: E402


def __getattr__(name):
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'clip_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + __all__)
