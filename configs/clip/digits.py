r"""The embedded default: a small CLIP trained from scratch on captioned handwritten digits
(scikit-learn's 1,797 scans, upscaled to 32 px), with zero-shot evaluation on the held-out 20%.

    python -m clip_jax.train --config=configs/clip/digits.py --workdir=/tmp/digits
    python -m clip_jax.train --config=configs/clip/digits.py:runlocal --workdir=/tmp/digits_smoke
"""
from configs.args import config_words
from configs.clip.common import base_config, runlocal


def get_config(arg: str | None = None):
  c = base_config()
  c.model.name = "ViT-Tiny"          # 32 px, patch 8, 2 layers of width 64; context 32 tokens
  c.dtype = "float32"
  c.data.source = "digits"
  c.global_batch = 128
  c.total_steps = 600
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 50
  c.optimizer.weight_decay = 0.1
  c.optimizer.b2 = 0.98
  c.log_every = 10
  c.checkpoint_every = 200
  c.eval_every = 100
  # The zero-shot hook (clip_jax.eval.zeroshot.build_training_evaluators). source: comma-separated datasets
  # (`clip_jax.evaluate --list-datasets`), data specs or NAME=DATA. split: '' reads each source's own, as
  # clip_jax.evaluate does: a known dataset's zero-shot split (digits 'test', imagenet 'validation', also for
  # imagenet=/d/{split}), 'test' for other data; set, it is read from every source.
  c.zeroshot_eval = dict(enabled=True, source="digits", split="", batch_size=128)
  if "runlocal" in config_words(arg, ("runlocal",), "configs/clip/digits.py"):
    runlocal(c)
  return c
