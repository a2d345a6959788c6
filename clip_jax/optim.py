"""The optimizer: AdamW with the CLIP paper's settings, warmup + cosine, clipping, freezing (a
regex, or whole towers locked as open_clip's --lock-image / --lock-text), layer-wise
learning-rate decay for fine-tuning.

Weight decay. The CLIP paper (section 2.5) applies it "to all weights that are not gains or biases",
which includes the embeddings; it says nothing about the temperature and does not mention gradient
clipping. This module's mask (`decay_mask`) exempts gains and biases (the paper's rule); the learned
temperature and the sigmoid loss's logit bias (open_clip's choice, on which the paper is silent); and
the class, positional and token embeddings (this project's choice, not the paper's; open_clip decays
the token and positional embeddings). Gradient clipping (`grad_clip_norm`) is available but is not
part of the paper's recipe (`configs/clip/paper.py` turns it off).
"""
from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from clip_jax.cli import UserError

# No weight decay on gains and biases (the CLIP paper, 2.5), the temperature and logit bias (open_clip's
# choice; the paper is silent), or the embeddings (this project's choice; the paper decays them).
_NO_DECAY = re.compile(r"(^|/)(bias|scale|logit_scale|logit_bias|class_embedding|positional_embedding|"
                       r"token_embedding)$")


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: matrices and conv kernels that are not embeddings (the paper
  would decay the embeddings too; see the module docstring)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.ndim >= 2 and not _NO_DECAY.search(_path_str(path)), params)


def trainable_mask(params: Any, frozen_regex: str | None) -> Any:
  """True for parameters that train; `frozen_regex` matches '/'-joined parameter paths."""
  if not frozen_regex:
    return jax.tree.map(lambda _: True, params)
  pattern = re.compile(frozen_regex)
  return jax.tree_util.tree_map_with_path(lambda path, _: not pattern.search(_path_str(path)), params)


# ----------------------------------------------------------------------------- towers and depth
# Both towers are laid out as OpenAI's: embeddings, residual blocks, a final norm, a projection.
_TOWER_PARTS = {
    "visual": {"embeddings": ("conv1", "class_embedding", "positional_embedding", "ln_pre"),
               "final_norm": "ln_post", "projection": "proj"},
    "text": {"embeddings": ("token_embedding", "positional_embedding"),
             "final_norm": "ln_final", "projection": "text_projection"},
}
_BLOCK = re.compile(r"^transformer/resblocks_(\d+)/")


def _is_transformer_tower(params: Any, tower: str) -> bool:
  return isinstance(params.get(tower), dict) and "transformer" in params[tower]


def tower_layers(params: Any, tower: str) -> int:
  """Residual blocks in `params[tower]` ('visual' of a ViT, or 'text')."""
  return sum(1 for k in params[tower]["transformer"] if k.startswith("resblocks_"))


def _layer_id(tower: str, rest: str, layers: int) -> int:
  """BEiT's layer id inside a tower: 0 the embeddings, i + 1 block i, layers + 1 what follows."""
  block = _BLOCK.match(rest)
  if block:
    return int(block.group(1)) + 1
  part, head = rest.split("/")[0], _TOWER_PARTS[tower]
  if part in head["embeddings"]:
    return 0
  assert part in (head["final_norm"], head["projection"]), f"unknown {tower} parameter {rest}"
  return layers + 1


def _lock_group(tower: str, rest: str, layers: int) -> int:
  """open_clip's lock groups (`VisionTransformer.lock`, `lock_text_tower`): [embeddings], each
  block but the last, [last block + final norm], [projection]; layers + 2 groups in all."""
  if rest.split("/")[0] == _TOWER_PARTS[tower]["final_norm"]:
    return layers
  return _layer_id(tower, rest, layers)


def _split_tower(path) -> tuple[str, str]:
  tower, _, rest = _path_str(path).partition("/")
  return tower, rest


LOCK_KEYS = ("lock_image", "lock_image_unlocked_groups", "lock_text", "lock_text_unlocked_layers")


def lock_mask(params: Any, *, lock_image: bool = False, lock_image_unlocked_groups: int = 0, lock_text: bool = False,
              lock_text_unlocked_layers: int = 0) -> Any:
  """True where a parameter is locked (no optimizer state, no update), as open_clip's
  `--lock-image --lock-image-unlocked-groups N` and `--lock-text --lock-text-unlocked-layers N`
  (the config keys are the same names): the last N groups of a locked tower stay trainable
  (groups: [embeddings], each block but the last, [last block + final norm], [projection]). The
  temperature (and bias) is never locked. LiT (Zhai et al. 2022) is `lock_image=True`. Raises
  UserError (a ValueError) for N on an unlocked tower, N above the tower's group count, or N > 0
  on a ResNet image tower (open_clip does not split it either).
  """
  settings = {"visual": (lock_image, lock_image_unlocked_groups, "lock_image", "lock_image_unlocked_groups"),
              "text": (lock_text, lock_text_unlocked_layers, "lock_text", "lock_text_unlocked_layers")}
  limits = {}  # tower -> the first group that trains
  for tower, (locked, unlocked, name, option) in settings.items():
    if unlocked < 0 or (unlocked and not locked):
      raise UserError(f"{option}={unlocked} needs {name}=True and a count >= 0.")
    if not unlocked:
      continue
    if not _is_transformer_tower(params, tower):
      raise UserError(f"{option}={unlocked}: a ResNet image tower is locked whole (as in open_clip); use {option}=0.")
    groups = tower_layers(params, tower) + 2
    if unlocked > groups:
      raise UserError(f"{option}={unlocked}, but the {'image' if tower == 'visual' else 'text'} tower has only "
                      f"{groups} groups.")
    limits[tower] = groups - unlocked

  def is_locked(path, _) -> bool:
    tower, rest = _split_tower(path)
    if tower not in settings or not settings[tower][0]:
      return False
    return tower not in limits or _lock_group(tower, rest, tower_layers(params, tower)) < limits[tower]
  return jax.tree_util.tree_map_with_path(is_locked, params)


def layer_decay_scales(params: Any, decay: float) -> Any:
  """Per-parameter learning-rate factors for layer-wise decay (BEiT, Bao et al. 2022; used for
  CLIP fine-tuning by FT-CLIP, Dong et al. 2022): in each tower with L blocks, layer id 0 (the
  embeddings), i + 1 (block i) or L + 1 (final norm, projection) trains at decay ** (L + 1 - id).
  The temperature (and bias) keeps factor 1. Raises UserError unless 0 < decay <= 1, or for a
  ResNet image tower (its stages are not layers of equal standing).
  """
  if not 0.0 < decay <= 1.0:
    raise UserError(f"optimizer.layer_decay must be in (0, 1], not {decay} (0 turns it off).")
  if "visual" in params and not _is_transformer_tower(params, "visual"):
    raise UserError("optimizer.layer_decay is for ViT image towers; this model's is a ResNet.")
  layers = {tower: tower_layers(params, tower) for tower in _TOWER_PARTS if tower in params}

  def scale(path, _) -> float:
    tower, rest = _split_tower(path)
    if tower not in layers:
      return 1.0
    return decay ** (layers[tower] + 1 - _layer_id(tower, rest, layers[tower]))
  return jax.tree_util.tree_map_with_path(scale, params)


def scale_leaves(scales: Any) -> optax.GradientTransformation:
  """Multiplies each update by its factor in `scales` (a tree of floats shaped like the params)."""
  return optax.stateless(lambda updates, params=None: jax.tree.map(lambda u, s: u * s, updates, scales))


# ----------------------------------------------------------------------------- schedule and AdamW
def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """`optax.clip_by_global_norm`'s rule (updates scaled by max_norm / norm where their global L2 norm exceeds
  max_norm, unchanged otherwise) written as one scalar factor min(1, max_norm / norm) that multiplies every
  update. Same result within 4 ulp (each form rounds twice: optax t / norm, then the product with max_norm;
  this the factor, then the product; 3 ulp seen); bitwise when nothing is clipped; a NaN norm gives NaN
  updates, as optax's.

  Extra argument `global_norm` (a scalar): the L2 norm of exactly the updates this receives, when the
  caller has it already. The trainers compute it for their metrics outside the `lax.cond` that runs the
  optimizer on CPU (`loop.update_if_finite`), where XLA cannot share it with a norm computed inside:
  passed in, each step reads every gradient once less (`apply_optimizer`). Without it, the norm is
  computed here.

  Why not optax's: it divides every update by the norm inside a select, and XLA:CPU neither duplicates a
  divide (an "expensive" op) into the Adam moment updates that both read the clipped gradient nor fuses
  across them, so the clipped gradients were written out and read back: 2.3% of the ViT-B-32 bf16 step's
  op time (`benchmarks/profile_step.py`). A multiply by a scalar fuses into each reader.
  """
  def update(updates, state, params=None, *, global_norm=None, **extra_args):
    del params, extra_args
    norm = optax.tree.norm(updates) if global_norm is None else global_norm
    factor = jnp.minimum(1.0, max_norm / norm)   # norm 0: max_norm / 0 = inf -> 1
    return jax.tree.map(lambda t: t * factor.astype(t.dtype), updates), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def apply_optimizer(tx: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any,
                    grad_norm: jax.Array) -> tuple[Any, Any]:
  """(new params, new opt_state): one `tx` update, handing it `grad_norm` (= `optax.tree.norm(grads)`,
  which the trainers' metrics hold) for `clip_by_global_norm`, so the norm is computed once per step.
  Any optax transformation works; one that takes no extra arguments ignores it."""
  updates, opt_state = optax.with_extra_args_support(tx).update(grads, opt_state, params, global_norm=grad_norm)
  return optax.apply_updates(params, updates), opt_state


def _norm_from_its_own_updates(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` without extra arguments: under `multi_transform` a group sees only its own leaves, so a global
  norm of all the gradients is not theirs; its `clip_by_global_norm` computes its own."""
  return optax.GradientTransformation(tx.init, lambda updates, state, params=None: tx.update(updates, state, params))


def learning_rate_schedule(cfg) -> optax.Schedule:
  """Linear warmup to `cfg.learning_rate`, then cosine decay to `cfg.end_learning_rate`
  (`cfg.schedule='cosine'`, the default) or constant (`'constant'`). The warmup starts at 0: the
  first step runs at learning rate 0 (optax's and big_vision's convention; open_clip's first step
  takes learning_rate / warmup_steps: one step ahead of this warmup)."""
  warmup = min(cfg.warmup_steps, max(cfg.total_steps - 1, 0))
  kind = cfg.get("schedule", "cosine")
  if kind == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, max(warmup, 1)),
                                 optax.constant_schedule(cfg.learning_rate)], [max(warmup, 1)])
  if kind != "cosine":
    raise ValueError(f"optimizer.schedule must be 'cosine' or 'constant', not '{kind}'.")
  return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, max(cfg.total_steps, warmup + 1),
                                            cfg.get("end_learning_rate", 0.0))


def adamw(cfg) -> optax.GradientTransformation:
  """AdamW on `cfg`'s schedule, decaying only matrices and kernels that are not embeddings."""
  return optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                     weight_decay=cfg.weight_decay, mask=decay_mask)


def make_optimizer(cfg, params: Any, frozen: Any | None = None) -> optax.GradientTransformation:
  """cfg: learning_rate, warmup_steps, total_steps, b1, b2, eps, weight_decay, grad_clip_norm,
  and optionally schedule, frozen_regex and layer_decay (0: off). Frozen parameters (the regex's
  matches, and True leaves of `frozen`, e.g. `lock_mask`'s) get a zero update and no optimizer
  state; clipping runs over the trained ones only. Raises UserError when nothing would train."""
  chain = optax.chain(clip_by_global_norm(cfg.grad_clip_norm) if cfg.grad_clip_norm else optax.identity(),
                      adamw(cfg))
  frozen_regex = cfg.get("frozen_regex", None)
  if frozen_regex or frozen is not None:
    trainable = trainable_mask(params, frozen_regex)
    if frozen is not None:
      trainable = jax.tree.map(lambda t, f: t and not f, trainable, frozen)
    labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable)
    if not any(label == "train" for label in jax.tree.leaves(labels)):
      raise UserError(f"frozen_regex '{frozen_regex}' and the locked towers freeze every parameter; nothing "
                       "would train.")
    chain = optax.multi_transform({"train": _norm_from_its_own_updates(chain), "freeze": optax.set_to_zero()},
                                  labels)
  layer_decay = cfg.get("layer_decay", 0.0)
  if layer_decay:  # After multi_transform: inside it, frozen leaves are absent from the updates.
    chain = optax.chain(chain, scale_leaves(layer_decay_scales(params, layer_decay)))
  return chain


def paper_adam_defaults(is_resnet: bool) -> dict[str, float]:
  """CLIP paper: beta2 0.98 / eps 1e-6 for ViTs (stability at large batch), 0.999 / 1e-8 for ResNets."""
  return {"b1": 0.9, "b2": 0.999 if is_resnet else 0.98, "eps": 1e-8 if is_resnet else 1e-6}
