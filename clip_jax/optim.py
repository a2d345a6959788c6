"""The optimizer: AdamW with the CLIP paper's settings, warmup + cosine, clipping, freezing.

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
import optax

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


def learning_rate_schedule(cfg) -> optax.Schedule:
  """Linear warmup to `cfg.learning_rate`, then cosine decay to `cfg.end_learning_rate`
  (`cfg.schedule='cosine'`, the default) or constant (`'constant'`)."""
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


def make_optimizer(cfg, params: Any) -> optax.GradientTransformation:
  """cfg: learning_rate, warmup_steps, total_steps, b1, b2, eps, weight_decay, grad_clip_norm,
  and optionally schedule and frozen_regex (parameters left untouched, clipping over the trained
  ones only)."""
  chain = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm) if cfg.grad_clip_norm else optax.identity(),
                      adamw(cfg))
  frozen_regex = cfg.get("frozen_regex", None)
  if not frozen_regex:
    return chain
  labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable_mask(params, frozen_regex))
  if not any(label == "train" for label in jax.tree.leaves(labels)):
    raise ValueError(f"frozen_regex '{frozen_regex}' freezes every parameter; nothing would train.")
  return optax.multi_transform({"train": chain, "freeze": optax.set_to_zero()}, labels)


def paper_adam_defaults(is_resnet: bool) -> dict[str, float]:
  """CLIP paper: beta2 0.98 / eps 1e-6 for ViTs (stability at large batch), 0.999 / 1e-8 for ResNets."""
  return {"b1": 0.9, "b2": 0.999 if is_resnet else 0.98, "eps": 1e-8 if is_resnet else 1e-6}
