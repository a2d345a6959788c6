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
"""
from clip_jax.optim import paper_adam_defaults
from configs.clip.common import base_config, runlocal

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
  if "runlocal" in args[1:]:
    runlocal(c)
  return c
