"""clip_jax: CLIP models, tokenizers, losses, data, training and evaluation in JAX/Flax.

As a library (README.md, section "Python", shows the pattern end to end):
  load_checkpoint(path, model_name=None, ...)  -> (model, variables) from OpenAI/open_clip files, HF or open_clip folders, workdirs
  create_model(name, **overrides)               -> a CLIP module of a named config (MODEL_CONFIGS), e.g. 'ViT-B-32'
  init_variables(model, rng)                    -> fresh (unsharded) variables for it
  preprocess(images, image_size=224, preprocessing=None)
                                                -> float32 [N, H, W, 3] model inputs from PIL images / uint8 arrays
  stated_preprocessing(path)                    -> the checkpoint's own image preprocessing (mean/std, resize), else OpenAI's
  checkpoint_tokenizer(path)                    -> (the checkpoint's tokenizer spec for get_tokenizer, a line to say or None)
  tokenize(texts, context_length=77)            -> int32 [N, T] token ids (OpenAI's BPE, as open_clip.tokenize)
  get_tokenizer(spec='clip')                    -> a tokenizer object (CLIP BPE, HF files, sentencepiece)
  CLIP.encode_image / encode_text / get_logits  -> embeddings; open_clip's (logits_per_image, logits_per_text)
  l2_normalize(x)                               -> rows scaled to unit length, float32
  export_hf(model, variables, out_dir)          -> a transformers CLIPModel folder
  export_open_clip(model, variables, out_dir, tokenizer=None)
                                                -> an open_clip hub folder ('local-dir:' loads it; a tokenizer
                                                   other than OpenAI's BPE is written and named in it)
  export_openai_state_dict(model, variables)    -> OpenAI-layout numpy state dict (open_clip's pretrained=)
  CLIPConfig, ClipTokenizer, SentencePieceTokenizer: the config and tokenizer classes.

Names are imported on first use, so a data-loading worker process that unpickles a pipeline
stage from `clip_jax.data` does not pay for importing jax and flax.
"""
import importlib

import sys as _sys

if _sys.argv[:1] == ["-m"]:  # `python -m PACKAGE.MODULE` is locating its module: a command is starting
  from clip_jax import cli as _cli
  _cli.quiet_interrupt_while_starting()  # Ctrl-C during the imports: one line, not a traceback

_EXPORTS = {
    "CLIP": "clip_jax.models", "CLIPConfig": "clip_jax.models", "MODEL_CONFIGS": "clip_jax.models",
    "create_model": "clip_jax.models", "init_variables": "clip_jax.models", "l2_normalize": "clip_jax.models",
    "load_checkpoint": "clip_jax.convert", "export_hf": "clip_jax.convert",
    "stated_preprocessing": "clip_jax.convert", "checkpoint_tokenizer": "clip_jax.convert",
    "export_open_clip": "clip_jax.convert", "export_openai_state_dict": "clip_jax.convert",
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
