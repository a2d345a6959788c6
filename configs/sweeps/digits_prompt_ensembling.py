r"""The CLIP paper's prompt finding (section 3.1.4), at embedded scale: zero-shot accuracy of one
trained model with a single prompt template against an ensemble of several.

The paper reports that the bare class name is a weak prompt (polysemy, and captions are rarely one
word), that "A photo of a {label}." already helps (+1.3% on ImageNet), and that averaging the text
embeddings of many templates helps more (+3.5% on ImageNet with 80 templates; +5% with prompt
engineering combined). Here the digits CLIP is evaluated on its 359 held-out scans with each prompt
set below; the images are embedded once, only the classifier changes:

    python -m clip_jax.train --config=configs/clip/digits.py --workdir=workdirs/digits
    python -m clip_jax.eval.prompt_ablation configs/sweeps/digits_prompt_ensembling.py \
        --workdir workdirs/digits --out workdirs/digits/prompt_ablation

An evaluation sweep (one trained model, many classifiers), so it runs through
`clip_jax.eval.prompt_ablation`, not `launch.sweep`; several --workdir (e.g. the seeds of a
training sweep) give a mean and spread over models. The digits model was trained on captions built
from `clip_jax.data.digits.CAPTION_TEMPLATES`; the single templates below include phrasings it has
seen with the class word ('the number {}.'), seen only with the numeral ('a handwritten {}.') and
never seen ('a photo of a {}.').
"""
from clip_jax.data.digits import CAPTION_TEMPLATES, ZEROSHOT_TEMPLATES

DATASET = "digits"     # the data spec of the evaluation (its held-out split, class names from its table)
REFERENCE = "ensemble of the 3 zero-shot templates (default)"  # differences are against this set

# The training-caption phrasings that name the class in words ({name}); those with the numeral
# ({digit}) cannot take a class name.
_CAPTION_PHRASINGS = tuple(t.replace("{name}", "{}") for t in CAPTION_TEMPLATES if "{digit}" not in t)


def get_prompt_sets() -> dict[str, tuple[str, ...]]:
  """Name -> templates ('{}' = the class name), in table order."""
  everything = tuple(dict.fromkeys(("{}", "a photo of a {}.", *ZEROSHOT_TEMPLATES, *_CAPTION_PHRASINGS)))
  return {
      "class name alone": ("{}",),
      "'a photo of a {}.' (the paper's default)": ("a photo of a {}.",),
      **{f"'{t}' alone": (t,) for t in ZEROSHOT_TEMPLATES},
      REFERENCE: tuple(ZEROSHOT_TEMPLATES),
      f"ensemble of {len(_CAPTION_PHRASINGS)} training-caption phrasings": _CAPTION_PHRASINGS,
      f"ensemble of all {len(everything)} above": everything,
  }
