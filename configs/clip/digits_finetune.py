r"""Starting from the trained digits CLIP (the README's `workdirs/digits`) instead of from scratch:

    python -m clip_jax.train --config=configs/clip/digits_finetune.py:res48 --workdir=runs/finetune/res48
    python -m clip_jax.train --config=configs/clip/digits_finetune.py:lit --workdir=runs/finetune/lit

`res48`: fine-tuning at 48 px, the 4 x 4 patch grid's positional embedding resampled to 6 x 6
(`clip_jax.resize`), at a tenth of the pretraining learning rate. `lit`: locked-image tuning (Zhai
et al. 2022), the pretrained image tower locked and a text tower trained from scratch
(`init.dont_load='^text/'`). `--config.init.checkpoint=DIR` starts from another workdir or file;
`,runlocal` shrinks either for a smoke test. `python -m clip_jax.finetune_demo` runs both and
WiSE-FT and writes one table.
"""
from configs.clip import digits
from configs.args import config_words
from configs.clip.common import runlocal

VARIANTS = ("res48", "lit")


def get_config(arg: str | None = None):
  args = (arg or "res48").split(",")
  if args[0] not in VARIANTS:
    raise ValueError(f"configs/clip/digits_finetune.py: unknown variant {args[0]!r}; one of {VARIANTS}.")
  c = digits.get_config()
  c.init.checkpoint = "workdirs/digits"
  if args[0] == "res48":
    c.model.overrides = {"vision": {"image_size": 48}}
    c.total_steps = 150
    c.optimizer.learning_rate = 1e-4   # a tenth of the pretraining rate: move, do not relearn
    c.optimizer.warmup_steps = 15
  else:
    c.lock_image = True
    c.init.dont_load = "^text/"        # LiT's setting: the text tower starts from scratch
    c.total_steps = 300
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 30
  c.checkpoint_every = c.total_steps
  c.eval_every = 50
  if "runlocal" in config_words(",".join(args[1:]), ("runlocal",), "configs/clip/digits_finetune.py"):
    runlocal(c)
  return c
