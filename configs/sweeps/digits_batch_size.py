r"""The CLIP paper's bet on large batches, at embedded scale: zero-shot accuracy against batch size.

The contrastive loss classifies each image among the B captions of its batch, so a larger batch is
a harder task with more negatives per step (the paper trains with 32,768). Here the digits CLIP is
trained for the same number of steps at global batch 16, 32, 64 and 128, two seeds each, and
evaluated zero-shot (3-prompt ensemble) on the held-out scans.

    python -m launch.sweep configs/sweeps/digits_batch_size.py --root=workdirs/digits_batch_size
    python -m launch.results workdirs/digits_batch_size

Steps are fixed, so a larger batch also sees more examples (128 x 150 = 19,200, ~13 epochs of
the 1,438 training scans, against ~1.7 epochs at batch 16): the paper's setting too, where
batch size and data seen grow together.
"""
from launch.sweep import fixed, grid, product, seeds

BASE_CONFIG = "configs/clip/digits.py"


def get_sweep():
  common = fixed(total_steps=150, checkpoint_every=150, eval_every=150, log_every=10, progress_bar=False,
                 **{"optimizer.warmup_steps": 15})
  return seeds(product(common, grid(global_batch=[16, 32, 64, 128])), 2)
