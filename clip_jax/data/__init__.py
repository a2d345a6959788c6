"""Image-text data: sources (embedded digits, TFDS, ArrayRecord shards), the grain pipeline,
and the converter `python -m clip_jax.data.prepare`."""
from clip_jax.data.digits import CLASS_NAMES as DIGIT_CLASS_NAMES
from clip_jax.data.digits import ZEROSHOT_TEMPLATES as DIGIT_ZEROSHOT_TEMPLATES
from clip_jax.data.digits import DigitsSource, heldout_labels
from clip_jax.data.pipeline import (ExampleMaker, eval_num_batches, make_pipeline, quality_counts,
                                    to_global_batch)
from clip_jax.data.records import BadRecord, clean_caption, decode_record, encode_record
from clip_jax.data.sources import ArrayRecordSource, TfdsSource, open_source
