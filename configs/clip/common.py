"""Defaults every CLIP training config starts from; experiment files change a few lines."""
import ml_collections

from clip_jax.sharding import DEFAULT_RULES


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(name="ViT-B-32", dtype="bfloat16", param_dtype="float32",
                                           remat=False, overrides={}))
  c.data = ml_collections.ConfigDict(dict(source="synthetic", split="train", data_dir=None, tokenizer="clip",
                                          num_workers=0, crop_scale=(0.9, 1.0)))
  c.loss = ml_collections.ConfigDict(dict(kind="softmax"))
  # One mesh over all devices of all processes; -1 fills. The batch is split over data x fsdp.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.logical_axis_rules = [list(rule) for rule in DEFAULT_RULES]
  c.global_batch = 256
  c.microbatches = 1          # > 1: exact contrastive gradient accumulation
  c.total_steps = 1000
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=5e-4, end_learning_rate=0.0, warmup_steps=100,
      b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2, grad_clip_norm=1.0, frozen_regex=""))
  # The schedule's length follows total_steps, also when --config.total_steps overrides it.
  c.optimizer.total_steps = c.get_ref("total_steps")
  c.max_nonfinite_steps = 10  # this many skipped (non-finite) steps in a row stop the run
  c.log_every = 10
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.async_checkpoints = True
  c.eval_every = 0
  c.peak_flops_per_device = 0.0  # 0: measured at start (a bf16 matmul)
  c.progress_bar = True
  return c


def runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks any config to something that runs on a laptop CPU in about a minute."""
  c.global_batch = 16
  c.total_steps = 4
  c.optimizer.warmup_steps = 1
  c.log_every = 1
  c.checkpoint_every = 2
  c.eval_every = 0
  return c
