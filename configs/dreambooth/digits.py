r"""DreamBooth on the embedded tiny Stable Diffusion (`python -m dreambooth_jax.embedded.pretrain`): a subject
of 4 images of one red handwritten seven (`python -m dreambooth_jax.embedded.table3` builds it).

    python -m dreambooth_jax.train --config=configs/dreambooth/digits.py --workdir=runs/red_seven \
        --config.pretrained_model=runs/table3/base/export --config.instance_dir=runs/table3/subject

Arguments after the colon, comma-separated: `noprior` (no prior-preservation loss), `lora` (a rank-4 LoRA
on the UNet's attention projections instead of the whole UNet; with `text`, the text encoder's too),
`text` (the text encoder trains too, at the UNet's learning rate, as diffusers' --train_text_encoder: the
base model's encoder is the frozen digits CLIP tower, where "a [V] seven" and "a seven" start nearly
equal), `runlocal` (a few steps).
Differences from default.py, for a 32 px model trained from scratch in minutes: float32 on CPU, a
larger learning rate (the paper's 5e-6 is tuned for a converged 860M-parameter UNet), 4 subject
images per step, no flips or crops (a mirrored seven is not a seven; the images are already 32 px).
"""
import ml_collections

from configs.args import config_words
from configs.dreambooth import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_words(arg, ("noprior", "lora", "text", "runlocal"), "configs/dreambooth/digits.py")
  c = default.get_config()
  c.class_noun = "seven"        # prompts "a [V] seven" and "a seven", as the base model was captioned
  c.num_class_images = 32
  c.class_generation = ml_collections.ConfigDict(dict(sampler="dpm++2m", steps=20, guidance_scale=3.0,
                                                      batch_size=16))
  c.random_crop = False
  c.flip = False
  c.global_batch = 4
  c.dtype = "float32"
  c.optimizer.learning_rate = 1e-4
  c.total_steps = 200
  c.optimizer.weight_decay = 0.0
  c.eval_every = 0              # table3 samples the exported models itself
  c.validation.guidance_scale = 3.0
  c.checkpoint_every = 1000     # only the last step (the run is short)
  c.async_checkpoints = False
  c.log_every = 10
  if "noprior" in args:
    c.with_prior_preservation = False
  if "lora" in args:  # the learning rate stays 1e-4, diffusers' LoRA DreamBooth default
    c.train.mode = "lora"
  if "text" in args:
    c.train.train_text_encoder = True
    c.train.text_encoder_learning_rate = c.optimizer.learning_rate
  if "runlocal" in args:
    c.total_steps = 4
    c.num_class_images = 4
    c.class_generation.steps = 3
    c.class_generation.batch_size = 4
    c.log_every = 1
  return c
