"""Defaults every CLIP training config starts from; experiment files change a few lines.

The fields shared with the DreamBooth trainer (seed, total_steps, global_batch,
gradient_accumulation, dtype, param_dtype, remat, eval_every, log_every, checkpoint_every,
keep_checkpoints, async_checkpoints, max_nonfinite_steps, progress_bar, compilation_cache, mesh,
logical_axis_rules) mean the same in both; WORKSPACE.md lists them once."""
import ml_collections

from clip_jax.sharding import DEFAULT_RULES


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(name="ViT-B-32", overrides={}))
  c.dtype = "bfloat16"        # compute dtype
  c.param_dtype = "float32"
  c.remat = False
  # tokenizer '': init.checkpoint's own (a folder's tokenizer files, a workdir's), else 'clip' (OpenAI's BPE);
  # the run records the one it used (clip_jax.pretrained.training_tokenizer).
  c.data = ml_collections.ConfigDict(dict(source="synthetic", split="train", data_dir=None, tokenizer="",
                                          num_workers=0, crop_scale=(0.9, 1.0)))
  c.loss = ml_collections.ConfigDict(dict(kind="softmax"))
  # One mesh over all devices of all processes; -1 fills. The batch is split over data x fsdp.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.logical_axis_rules = [list(rule) for rule in DEFAULT_RULES]
  c.global_batch = 256        # image-text pairs per optimizer update, over all processes
  c.gradient_accumulation = 1  # > 1: the batch in this many micro-batches (the contrastive gradient stays exact)
  c.total_steps = 1000
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=5e-4, end_learning_rate=0.0, warmup_steps=100,
      b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2, grad_clip_norm=1.0, frozen_regex="",
      layer_decay=0.0))          # layer_decay d in (0, 1]: block i of L trains at d ** (L - i) x the rate (BEiT)
  # Start from a pretrained CLIP (clip_jax/pretrained.py): any file, Hugging Face directory or workdir
  # that clip_jax.load_checkpoint reads. A checkpoint of the run's own workdir wins (it resumes).
  # model_name / act: facts a bare state dict does not hold; dont_load: a regex of parameters that
  # keep their fresh initialisation (e.g. '^text/').
  c.init = ml_collections.ConfigDict(dict(checkpoint="", model_name="", act="", dont_load=""))
  # Locked towers get no update and no optimizer state, as open_clip's flags of the same names; the
  # last N groups / layers of a locked tower stay trainable. LiT: lock_image=True.
  c.lock_image = False
  c.lock_image_unlocked_groups = 0
  c.lock_text = False
  c.lock_text_unlocked_layers = 0
  # The schedule's length follows total_steps, also when --config.total_steps overrides it.
  c.optimizer.total_steps = c.get_ref("total_steps")
  c.max_nonfinite_steps = 10  # this many skipped (non-finite) steps in a row stop the run
  c.log_every = 10
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.async_checkpoints = True
  c.eval_every = 0            # the zero-shot evaluation hook (and the last step); 0: off
  c.peak_flops_per_device = 0.0  # 0: measured at start (a bf16 matmul)
  c.progress_bar = True
  c.compilation_cache = "auto"  # JAX's persistent cache: 'auto' (~/.cache/clip_jax/jax), 'workdir', a path, '' off
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
