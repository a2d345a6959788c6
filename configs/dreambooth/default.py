r"""DreamBooth on a Stable Diffusion 1.x/2.x folder with the paper's defaults.

    python -m dreambooth_jax.train --config=configs/dreambooth/default.py --workdir=runs/dog \
        --config.pretrained_model=/models/stable-diffusion-v1-5 --config.instance_dir=photos/ \
        --config.class_noun=dog [--config.train.mode=lora]

Arguments after the colon: `lora` (rank-4 LoRA instead of the full UNet), `runlocal` (a few steps).
Paper defaults: prior-preservation weight 1, ~1000 steps at lr 5e-6 for the full UNet (LoRA: 1e-4,
not from the paper). The paper generates about 1,000 class images from the frozen model ("but less
can be used"); the default here is 200 (`num_class_images`), this project's cheaper choice.

The fields shared with the CLIP trainer (seed, total_steps, global_batch, gradient_accumulation,
dtype, remat, eval_every, log_every, checkpoint_every, keep_checkpoints, async_checkpoints,
max_nonfinite_steps, progress_bar, compilation_cache, mesh, logical_axis_rules) mean the same in
both; WORKSPACE.md lists them once.
"""
import ml_collections

from clip_jax.sharding import DEFAULT_RULES
from configs.args import config_words


def get_config(arg: str | None = None):
  args = config_words(arg, ("lora", "runlocal"), "configs/dreambooth/default.py")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.pretrained_model = ""       # a diffusers-format folder (model_index.json, unet/, vae/, ...)
  c.instance_dir = ""           # the subject's images (3-5 is typical; any number works)
  c.class_noun = ""             # e.g. 'dog'; prompts are 'a [V] dog' and 'a dog'
  c.identifier = ""             # empty: a rare token sampled from the CLIP vocabulary (seeded)
  c.identifier_tokens = 1
  c.identifier_prior_check = False  # draw 8 candidates, keep the one the frozen text encoder knows least
  c.with_prior_preservation = True
  c.prior_loss_weight = 1.0     # lambda
  c.num_class_images = 200
  c.class_dir = ""              # empty: generated into <workdir>/class_images
  c.class_generation = ml_collections.ConfigDict(dict(sampler="ddpm", steps=50, guidance_scale=7.5, batch_size=4))
  c.resolution = 0              # 0: the model's own (512 for SD 1.x)
  c.random_crop = True
  c.flip = True
  c.total_steps = 1000          # optimizer updates
  c.global_batch = 1            # instance images per update, all processes (as many class images join them)
  c.gradient_accumulation = 1   # > 1: each update's batch in this many micro-batches (same loss and gradient)
  c.offset_noise = 0.0
  c.min_snr_gamma = 0.0         # > 0: min-SNR weighting of both terms (e.g. 5)
  c.dtype = "bfloat16"          # compute dtype; trained parameters stay float32, frozen kernels are stored in it
  c.remat = False
  c.train = ml_collections.ConfigDict(dict(mode="full", lora_rank=4, lora_alpha=4.0,
                                           lora_targets=r"attn[12]/(to_q|to_k|to_v|to_out_0)/kernel$",
                                           train_text_encoder=False, text_encoder_learning_rate=5e-6))
  c.optimizer = ml_collections.ConfigDict(dict(learning_rate=5e-6, schedule="constant", warmup_steps=0,
                                               b1=0.9, b2=0.999, eps=1e-8,
                                               weight_decay=1e-2, grad_clip_norm=1.0))
  # The schedule's length follows total_steps, also when --config.total_steps overrides it.
  c.optimizer.total_steps = c.get_ref("total_steps")
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.logical_axis_rules = [list(rule) for rule in DEFAULT_RULES]
  c.eval_every = 250            # validation sample grids (and the last step); 0: off
  c.validation = ml_collections.ConfigDict(dict(
      steps=25, sampler="dpm++2m", guidance_scale=7.5, images_per_prompt=4,
      prompts=["{subject}", "{subject} in the snow", "{subject} on the beach", "a {class_noun}"]))
  c.log_every = 10
  c.checkpoint_every = 250
  c.keep_checkpoints = 2
  c.async_checkpoints = True
  c.max_nonfinite_steps = 10    # this many skipped (non-finite) steps in a row stop the run
  c.progress_bar = True
  c.compilation_cache = "auto"  # JAX's persistent cache: 'auto' (~/.cache/clip_jax/jax), 'workdir', a path, '' off
  if "lora" in args:
    c.train.mode = "lora"
    c.optimizer.learning_rate = 1e-4
  if "runlocal" in args:
    c.total_steps = 4
    c.num_class_images = 4
    c.class_generation.steps = 4
    c.eval_every = 2
    c.validation.steps = 3
    c.validation.images_per_prompt = 1
    c.checkpoint_every = 2
    c.log_every = 1
  return c
