"""Image-text data: sources (embedded digits, TFDS, ArrayRecord shards), the grain pipeline,
and the converter `python -m clip_jax.data.prepare`."""
import importlib

# Names are imported on first use: `clip_jax.data.images` (numpy + PIL, what clip_jax.preprocess
# needs) must not pull in grain, array_record and scikit-learn through this package.
_EXPORTS = {
    "DIGIT_CLASS_NAMES": ("clip_jax.data.digits", "CLASS_NAMES"),
    "DIGIT_ZEROSHOT_TEMPLATES": ("clip_jax.data.digits", "ZEROSHOT_TEMPLATES"),
    "DigitsSource": ("clip_jax.data.digits", "DigitsSource"),
    "heldout_labels": ("clip_jax.data.digits", "heldout_labels"),
    **{name: ("clip_jax.data.pipeline", name) for name in
       ("ExampleMaker", "eval_num_batches", "make_pipeline", "quality_counts", "to_global_batch")},
    **{name: ("clip_jax.data.records", name) for name in
       ("BadRecord", "clean_caption", "decode_record", "encode_record")},
    **{name: ("clip_jax.data.sources", name) for name in ("ArrayRecordSource", "TfdsSource", "open_source")},
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'clip_jax.data' has no attribute {name!r}")
