r"""The CLIP paper's training recipe (Radford et al. 2021, appendix F, Tables 19-20) for each of
its models, by name:

    python -m clip_jax.train --config=configs/clip/paper.py:ViT-B-32 --workdir=gs://.../vit_b32 \
        --config.data.source=/data/laion/{split}  # ArrayRecord shards, see clip_jax/data

32 epochs of 400M pairs at batch 32,768 (390,625 steps), 2,000 warmup steps then cosine decay,
weight decay 0.2, AdamW with beta2 0.98 / eps 1e-6 (ViTs) or 0.999 / 1e-8 (ResNets), mixed
precision, QuickGELU (the paper's activation). No gradient clipping: the paper does not mention
any (turn it on with --config.optimizer.grad_clip_norm=1.0). Weight decay follows `clip_jax.optim`'s
mask, which differs from the paper on the embeddings (see that module). Add `,runlocal` to shrink
it for a smoke test.

ViT-L-14-336 is not trained from scratch. Section 2.5: "For the ViT-L/14 we also pre-train at a
higher 336 pixel resolution for one additional epoch to boost performance similar to FixRes
(Touvron et al., 2019). We denote this model as ViT-L/14@336px." So `:ViT-L-14-336` starts from a
trained ViT-L/14 (`--config.init.checkpoint=` OpenAI's ViT-L-14.pt, a Hugging Face directory or a
`:ViT-L-14` workdir; the 16 x 16 positional grid is resampled to 24 x 24, `clip_jax/resize.py`) and
trains one epoch of the 400M pairs (12,207 steps at batch 32,768) at learning rate 2e-5, warmup and
the rest as above (the paper names no other warmup for this epoch). The quotation and the rates in
PAPER_LEARNING_RATES were written without the PDF at hand; check them against it.

    python -m clip_jax.train --config=configs/clip/paper.py:ViT-L-14-336 --workdir=gs://.../vit_l14_336 \
        --config.init.checkpoint=/ckpt/ViT-L-14.pt --config.data.source=/data/laion/{split}
"""
from ml_collections import config_dict

from clip_jax.optim import paper_adam_defaults
from configs.args import config_words
from configs.clip.common import base_config, runlocal

PAIRS_PER_EPOCH = 400_000_000  # the paper's WIT dataset
# Peak learning rates from the paper's hyperparameter tables.
PAPER_LEARNING_RATES = {
    "RN50": 5e-4, "RN101": 5e-4, "RN50x4": 5e-4, "RN50x16": 4e-4, "RN50x64": 3.6e-4,
    "ViT-B-32": 5e-4, "ViT-B-16": 5e-4, "ViT-L-14": 4e-4, "ViT-L-14-336": 2e-5,
}


def get_config(arg: str | None = None):
  args = (arg or "ViT-B-32").split(",")
  name = args[0]
  if name not in PAPER_LEARNING_RATES:
    raise ValueError(f"configs/clip/paper.py: unknown model '{name}'; one of {sorted(PAPER_LEARNING_RATES)}.")
  c = base_config()
  c.model.name = f"{name}-quickgelu"
  c.dtype = "bfloat16"
  c.data.source = "synthetic"        # set to your ArrayRecord shards or a TFDS name
  c.global_batch = 32768
  c.total_steps = 390_625
  c.optimizer.learning_rate = PAPER_LEARNING_RATES[name]
  c.optimizer.warmup_steps = 2000
  c.optimizer.weight_decay = 0.2
  c.optimizer.grad_clip_norm = 0.0   # off: the paper mentions no clipping (common.py's default is 1.0)
  c.optimizer.update(paper_adam_defaults(is_resnet=name.startswith("RN")))
  c.checkpoint_every = 2000
  c.log_every = 50
  if name == "ViT-L-14-336":  # one more epoch at 336 px from the trained ViT-L/14 (section 2.5)
    c.init.checkpoint = config_dict.placeholder(str)  # required: the trainer says so if missing
    c.init.model_name = "ViT-L-14-quickgelu"          # what a bare state dict (OpenAI's .pt) holds
    c.total_steps = PAIRS_PER_EPOCH // c.global_batch
  if "runlocal" in config_words(",".join(args[1:]), ("runlocal",), "configs/clip/paper.py"):
    runlocal(c)
  return c
