"""CLIP weights in and out: OpenAI / open_clip state dicts, Hugging Face CLIPModel directories.

One table per format maps each Flax variable to its PyTorch name and layout; import reads the
table one way, export the other, so the two directions cannot drift apart. Architectures are
inferred from the weights' shapes when no config comes with them.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import logging
import math
import os
import re
from typing import Any, Callable, Iterable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from clip_jax.models.clip import CLIP, create_model
from clip_jax.models.configs import MODEL_CONFIGS, CLIPConfig, TextConfig, VisionConfig
from clip_jax.models.text import TextTransformer
from clip_jax.weights import (OPEN_CLIP_WEIGHTS, TRANSFORMERS_WEIGHTS, CheckpointError, conv_to_flax, conv_to_torch, linear_to_flax,
                              linear_to_torch, load_state_dict, load_weights_dir, save_safetensors)

FlaxKey = tuple[str, ...]   # ('params', 'visual', 'ln_pre', 'scale')
# How a tensor's layout changes on the way in; the way out is the inverse.
_LAYOUTS: dict[str, tuple[Callable, Callable]] = {
    "copy": (lambda a: a, lambda a: np.asarray(a)),
    "linear": (linear_to_flax, linear_to_torch),
    "conv": (conv_to_flax, conv_to_torch),
}
# Buffers PyTorch models keep in their state dicts that carry no learned weights. OpenAI's TorchScript
# archives also hold their sizes as top-level tensors (OpenAI's build_model drops them the same way).
_IGNORED = re.compile(r"(attn_mask|position_ids|num_batches_tracked)$|^(input_resolution|context_length|vocab_size)$")
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Entry:
  flax_key: FlaxKey
  torch_key: str
  layout: str = "copy"


# ----------------------------------------------------------------------------- the tables
def _norm(f: FlaxKey, t: str, collection_keys=("scale", "bias")) -> Iterator[Entry]:
  yield Entry(("params", *f, collection_keys[0]), f"{t}.weight")
  yield Entry(("params", *f, collection_keys[1]), f"{t}.bias")


def _dense(f: FlaxKey, t: str, bias: bool = True) -> Iterator[Entry]:
  yield Entry(("params", *f, "kernel"), f"{t}.weight", "linear")
  if bias:
    yield Entry(("params", *f, "bias"), f"{t}.bias")


def _transformer_openai(f: FlaxKey, t: str, layers: int) -> Iterator[Entry]:
  for i in range(layers):
    fb, tb = (*f, "transformer", f"resblocks_{i}"), f"{t}.resblocks.{i}"
    yield from _norm((*fb, "ln_1"), f"{tb}.ln_1")
    for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("out", "out_proj")):
      yield from _dense((*fb, "attn", ours), f"{tb}.attn.{theirs}")
    yield from _norm((*fb, "ln_2"), f"{tb}.ln_2")
    yield from _dense((*fb, "c_fc"), f"{tb}.mlp.c_fc")
    yield from _dense((*fb, "c_proj"), f"{tb}.mlp.c_proj")


def _transformer_hf(f: FlaxKey, t: str, layers: int) -> Iterator[Entry]:
  for i in range(layers):
    fb, tb = (*f, "transformer", f"resblocks_{i}"), f"{t}.encoder.layers.{i}"
    yield from _norm((*fb, "ln_1"), f"{tb}.layer_norm1")
    for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("out", "out_proj")):
      yield from _dense((*fb, "attn", ours), f"{tb}.self_attn.{theirs}")
    yield from _norm((*fb, "ln_2"), f"{tb}.layer_norm2")
    yield from _dense((*fb, "c_fc"), f"{tb}.mlp.fc1")
    yield from _dense((*fb, "c_proj"), f"{tb}.mlp.fc2")


def _batch_norm(f: FlaxKey, t: str) -> Iterator[Entry]:
  yield from _norm(f, t)
  yield Entry(("batch_stats", *f, "mean"), f"{t}.running_mean")
  yield Entry(("batch_stats", *f, "var"), f"{t}.running_var")


def _resnet_openai(cfg: VisionConfig) -> Iterator[Entry]:
  v = ("visual",)
  for i in (1, 2, 3):
    yield Entry(("params", *v, f"stem_conv{i}", "kernel"), f"visual.conv{i}.weight", "conv")
    yield from _batch_norm((*v, f"stem_bn{i}"), f"visual.bn{i}")
  for stage, num_blocks in enumerate(cfg.layers):
    for j in range(num_blocks):
      fb, tb = (*v, f"layer{stage + 1}_{j}"), f"visual.layer{stage + 1}.{j}"
      for k in (1, 2, 3):
        yield Entry(("params", *fb, f"conv{k}", "conv", "kernel"), f"{tb}.conv{k}.weight", "conv")
        yield from _batch_norm((*fb, f"conv{k}", "bn"), f"{tb}.bn{k}")
      if j == 0:  # The first block of every stage changes width (or stride): it has a shortcut conv.
        yield Entry(("params", *fb, "downsample", "conv", "kernel"), f"{tb}.downsample.0.weight", "conv")
        yield from _batch_norm((*fb, "downsample", "bn"), f"{tb}.downsample.1")
  yield Entry(("params", *v, "attnpool", "positional_embedding"), "visual.attnpool.positional_embedding")
  for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("out", "c_proj")):
    yield from _dense((*v, "attnpool", "attn", ours), f"visual.attnpool.{theirs}")


def openai_entries(cfg: CLIPConfig) -> list[Entry]:
  """OpenAI's layout, which open_clip's built-in CLIP class shares (after splitting in_proj)."""
  entries: list[Entry] = []
  if cfg.vision.is_resnet:
    entries += _resnet_openai(cfg.vision)
  else:
    v = ("visual",)
    entries += [Entry(("params", *v, "conv1"), "visual.conv1.weight", "conv"),
                Entry(("params", *v, "class_embedding"), "visual.class_embedding"),
                Entry(("params", *v, "positional_embedding"), "visual.positional_embedding"),
                *_norm((*v, "ln_pre"), "visual.ln_pre"),
                *_transformer_openai(v, "visual.transformer", cfg.vision.layers),
                *_norm((*v, "ln_post"), "visual.ln_post"),
                Entry(("params", *v, "proj"), "visual.proj")]
  t = ("text",)
  entries += [Entry(("params", *t, "token_embedding"), "token_embedding.weight"),
              Entry(("params", *t, "positional_embedding"), "positional_embedding"),
              *_transformer_openai(t, "transformer", cfg.text.layers),
              *_norm((*t, "ln_final"), "ln_final"),
              Entry(("params", *t, "text_projection"), "text_projection"),
              Entry(("params", "logit_scale"), "logit_scale")]
  if cfg.init_logit_bias is not None:
    entries.append(Entry(("params", "logit_bias"), "logit_bias"))
  return entries


def hf_entries(cfg: CLIPConfig) -> list[Entry]:
  """transformers' CLIPModel layout (ViT image towers only: transformers has no ModifiedResNet)."""
  if cfg.vision.is_resnet:
    raise CheckpointError("Hugging Face CLIPModel has no ResNet image tower; export ResNet CLIPs as "
                          "OpenAI-layout state dicts instead.")
  v, tv = ("visual",), "vision_model"
  t, tt = ("text",), "text_model"
  return [Entry(("params", *v, "conv1"), f"{tv}.embeddings.patch_embedding.weight", "conv"),
          Entry(("params", *v, "class_embedding"), f"{tv}.embeddings.class_embedding"),
          Entry(("params", *v, "positional_embedding"), f"{tv}.embeddings.position_embedding.weight"),
          *_norm((*v, "ln_pre"), f"{tv}.pre_layrnorm"),  # sic: transformers' spelling
          *_transformer_hf(v, tv, cfg.vision.layers),
          *_norm((*v, "ln_post"), f"{tv}.post_layernorm"),
          Entry(("params", *v, "proj"), "visual_projection.weight", "linear"),
          Entry(("params", *t, "token_embedding"), f"{tt}.embeddings.token_embedding.weight"),
          Entry(("params", *t, "positional_embedding"), f"{tt}.embeddings.position_embedding.weight"),
          *_transformer_hf(t, tt, cfg.text.layers),
          *_norm((*t, "ln_final"), f"{tt}.final_layer_norm"),
          Entry(("params", *t, "text_projection"), "text_projection.weight", "linear"),
          Entry(("params", "logit_scale"), "logit_scale")]


# ----------------------------------------------------------------------------- import
def split_fused_attention(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """OpenAI's nn.MultiheadAttention keeps q, k, v in one in_proj tensor; split it."""
  out = {}
  for key, value in state.items():
    match = re.match(r"(.*)\.in_proj_(weight|bias)$", key)
    if match:
      for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
        out[f"{match.group(1)}.{name}.{match.group(2)}"] = part
    else:
      out[key] = value
  return out


def _expected_shapes(model: CLIP) -> dict[FlaxKey, tuple[int, ...]]:
  cfg = model.config
  images = jax.ShapeDtypeStruct((1, cfg.vision.image_size, cfg.vision.image_size, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, cfg.text.context_length), jnp.int32)
  shapes = jax.eval_shape(lambda i, t: nn.meta.unbox(model.init(jax.random.key(0), i, t)), images, tokens)
  return {k: v.shape for k, v in traverse_util.flatten_dict(shapes).items()}


def tree_from_table(state: Mapping[str, np.ndarray], entries: Iterable[Entry], expected: Mapping[FlaxKey, tuple],
                    source: str, what: str, ignored: re.Pattern | None = _IGNORED, hint: str = "") -> dict[str, Any]:
  """Maps a state dict onto a variable tree through a table, checking every name and shape.

  `expected` holds the Flax shapes (`{flax_key: shape}`); `what` names the model in messages
  ('the ViT-B/32 model'); `ignored` matches state-dict names that carry nothing the model uses.
  Shared by every converter here and in dreambooth_jax (CLIP, text encoders, DINO, LPIPS).
  """
  entries = list(entries)
  missing = [e.torch_key for e in entries if e.torch_key not in state]
  if missing:
    raise CheckpointError(f"{source}: {len(missing)} weights {what} needs are missing, e.g. {missing[:3]} "
                          f"({hint or 'is this a checkpoint of a different model?'}).")
  used = {e.torch_key for e in entries}
  unexpected = [k for k in state if k not in used and not (ignored and ignored.search(k))]
  if unexpected:
    raise CheckpointError(f"{source}: {len(unexpected)} weights do not belong to {what}, e.g. {unexpected[:3]}"
                          f"{' (' + hint + ')' if hint else ''}.")
  flat = {}
  for e in entries:
    want = expected.get(e.flax_key)
    assert want is not None, f"the conversion table names {'/'.join(e.flax_key)}, which the model lacks"
    want = tuple(want)
    value = _LAYOUTS[e.layout][0](np.asarray(state[e.torch_key], np.float32))
    if e.layout == "copy" and value.size == math.prod(want):
      value = value.reshape(want)  # scalars stored as [1] (or [] as [1, 1])
    if tuple(value.shape) != want:
      raise CheckpointError(f"{source}: shape mismatch for '{e.torch_key}': the checkpoint has "
                            f"{tuple(np.shape(state[e.torch_key]))}, {what} needs {want} (Flax layout).")
    flat[e.flax_key] = value
  return traverse_util.unflatten_dict(flat)


def state_dict_to_variables(state: dict[str, np.ndarray], model: CLIP, entries: list[Entry],
                            source: str = "checkpoint") -> dict[str, Any]:
  """Maps a state dict onto `model`'s variables, checking every name and shape."""
  return tree_from_table(state, entries, _expected_shapes(model), source, f"the {_describe(model.config)} model",
                         hint="is this checkpoint for a different architecture?")


def variables_to_state_dict(variables: Mapping[str, Any], entries: Iterable[Entry]) -> dict[str, np.ndarray]:
  flat = traverse_util.flatten_dict(nn.meta.unbox(variables))
  return {e.torch_key: _LAYOUTS[e.layout][1](np.asarray(flat[e.flax_key], np.float32)) for e in entries}


def _describe(cfg: CLIPConfig) -> str:
  v = cfg.vision
  tower = (f"ResNet{list(v.layers)}x{v.width}" if v.is_resnet else f"ViT-{v.layers}L/{v.patch_size}/w{v.width}")
  return f"{tower}@{v.image_size}px, text {cfg.text.layers}L/w{cfg.text.width}, embed {cfg.embed_dim}"


def _count_blocks(state: dict[str, np.ndarray], pattern: str) -> int:
  indices = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
  return max(indices) + 1 if indices else 0


def infer_openai_config(state: dict[str, np.ndarray], act: str = "quick_gelu") -> CLIPConfig:
  """Reads the architecture off an OpenAI-layout state dict's shapes (as OpenAI's build_model does).

  Head counts are not visible in weights: a named config with identical shapes supplies them
  (ViT-H-14 uses 80-wide heads); otherwise heads are 64 wide, OpenAI's rule (`matching_model_name`
  tells which). Text is pooled at argmax(token id), as OpenAI and open_clip do by default.
  """
  try:
    text = TextConfig(context_length=state["positional_embedding"].shape[0],
                      vocab_size=state["token_embedding.weight"].shape[0],
                      width=state["ln_final.weight"].shape[0],
                      heads=state["ln_final.weight"].shape[0] // 64,
                      layers=_count_blocks(state, r"transformer\.resblocks\.(\d+)\."))
    embed_dim = state["text_projection"].shape[1]
    if "visual.proj" in state:
      width, _, patch, _ = state["visual.conv1.weight"].shape
      grid = int(round(math.sqrt(state["visual.positional_embedding"].shape[0] - 1)))
      vision = VisionConfig(image_size=grid * patch, layers=_count_blocks(state, r"visual\.transformer\.resblocks\.(\d+)\."),
                            width=width, patch_size=patch)
    else:
      stages = tuple(_count_blocks(state, rf"visual\.layer{s}\.(\d+)\.") for s in (1, 2, 3, 4))
      width = state["visual.layer1.0.conv1.weight"].shape[0]
      grid = int(round(math.sqrt(state["visual.attnpool.positional_embedding"].shape[0] - 1)))
      vision = VisionConfig(image_size=grid * 32, layers=stages, width=width, patch_size=None)
  except KeyError as e:
    raise CheckpointError(f"not an OpenAI/open_clip CLIP state dict: no '{e.args[0]}' "
                          f"(keys start with {sorted(state)[:3]}).") from None
  cfg = CLIPConfig(embed_dim, vision, text, act=act,
                   init_logit_bias=0.0 if "logit_bias" in state else None)
  named = matching_model_name(cfg)
  if named is not None:  # Same shapes as a named config: take its head widths.
    cfg = dataclasses.replace(cfg, vision=MODEL_CONFIGS[named].vision)
  return cfg


def matching_model_name(cfg: CLIPConfig, *, whole: bool = False) -> str | None:
  """The first named config with `cfg`'s shapes (head widths aside), or None. `whole`: with all of its
  architecture instead (activation, heads, text pooling too; the init values aside, which no loader needs):
  the name that reads a file of `cfg`'s weights back as this model."""
  def architecture(config: CLIPConfig) -> CLIPConfig:
    return dataclasses.replace(config, init_logit_scale=0.0, init_logit_bias=None)
  for name, named in MODEL_CONFIGS.items():
    if whole:
      if architecture(named) == architecture(cfg):
        return name
    elif dataclasses.replace(named.vision, head_width=cfg.vision.head_width) == cfg.vision \
        and named.text == cfg.text and named.embed_dim == cfg.embed_dim:
      return name
  return None


# transformers' CLIPTextConfig default, used when a config.json does not name its eos_token_id.
_HF_DEFAULT_EOS_TOKEN_ID = 49407


def eot_token_id_from_hf(text_config: Mapping[str, Any]) -> int | None:
  """The token a Hugging Face CLIP text config pools at, as transformers reads it: its
  `eos_token_id`, except the legacy value 2 (configs written before transformers stated the real
  one), for which transformers pools at argmax(token id) (returned as None)."""
  eos = text_config.get("eos_token_id", _HF_DEFAULT_EOS_TOKEN_ID)
  if not isinstance(eos, int):
    raise CheckpointError(f"text config eos_token_id={eos!r}: expected one token id.")
  return None if eos == 2 else eos


def eot_token_id_to_hf(eot_token_id: int | None) -> int:
  """The `eos_token_id` that makes transformers pool where we do (2: its argmax rule)."""
  return 2 if eot_token_id is None else eot_token_id


def _check_layer_norm_eps(config: dict[str, Any], what: str) -> None:
  """The models' LayerNorms use CLIP's epsilon, 1e-5 (transformers' default): another one in a
  config would be computed with 1e-5, silently (a new user saw logits 3e-3 off transformers')."""
  eps = config.get("layer_norm_eps", 1e-5)
  if not math.isclose(eps, 1e-5):
    raise CheckpointError(f"{what} has layer_norm_eps={eps}; only 1e-5 (CLIP's) is supported.")


def config_from_hf(hf: dict[str, Any]) -> CLIPConfig:
  tc, vc = hf.get("text_config") or {}, hf.get("vision_config") or {}
  acts = {vc.get("hidden_act", "quick_gelu"), tc.get("hidden_act", "quick_gelu")}
  if len(acts) != 1 or not acts <= {"quick_gelu", "gelu"}:
    raise CheckpointError(f"Hugging Face config uses activations {sorted(acts)}; supported: one of "
                          "'quick_gelu' or 'gelu' for both towers.")
  for tower, config in (("text_config", tc), ("vision_config", vc)):
    _check_layer_norm_eps(config, f"Hugging Face config's {tower}")
  if vc.get("num_channels", 3) != 3:
    raise CheckpointError(f"Hugging Face config's vision_config has num_channels={vc['num_channels']}; only RGB "
                          "(3) is supported.")
  vision_width, text_width = vc.get("hidden_size", 768), tc.get("hidden_size", 512)
  vision = VisionConfig(image_size=vc.get("image_size", 224), layers=vc.get("num_hidden_layers", 12),
                        width=vision_width, patch_size=vc.get("patch_size", 32),
                        head_width=vision_width // vc.get("num_attention_heads", 12),
                        mlp_ratio=vc.get("intermediate_size", 3072) / vision_width)
  text = TextConfig(context_length=tc.get("max_position_embeddings", 77), vocab_size=tc.get("vocab_size", 49408),
                    width=text_width, heads=tc.get("num_attention_heads", 8),
                    layers=tc.get("num_hidden_layers", 12),
                    mlp_ratio=tc.get("intermediate_size", 2048) / text_width,
                    eot_token_id=eot_token_id_from_hf(tc))
  return CLIPConfig(embed_dim=hf.get("projection_dim", 512), vision=vision, text=text, act=acts.pop(),
                    init_logit_scale=hf.get("logit_scale_init_value", math.log(1 / 0.07)))


def config_to_hf(cfg: CLIPConfig) -> dict[str, Any]:
  v, t = cfg.vision, cfg.text
  return {
      "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.embed_dim,
      "logit_scale_init_value": cfg.init_logit_scale, "initializer_factor": 1.0,
      "text_config": {"model_type": "clip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.width,
                      "intermediate_size": int(t.width * t.mlp_ratio), "num_attention_heads": t.heads,
                      "num_hidden_layers": t.layers, "max_position_embeddings": t.context_length,
                      "hidden_act": cfg.act, "layer_norm_eps": 1e-5, "projection_dim": cfg.embed_dim,
                      "bos_token_id": t.vocab_size - 2, "eos_token_id": eot_token_id_to_hf(t.eot_token_id),
                      "pad_token_id": 0},
      "vision_config": {"model_type": "clip_vision_model", "hidden_size": v.width,
                        "intermediate_size": int(v.width * v.mlp_ratio), "num_attention_heads": v.heads,
                        "num_hidden_layers": v.layers, "image_size": v.image_size, "patch_size": v.patch_size,
                        "num_channels": 3, "hidden_act": cfg.act, "layer_norm_eps": 1e-5,
                        "projection_dim": cfg.embed_dim},
  }


def load_openai_state_dict(state: dict[str, np.ndarray], *, model_name: str | None = None,
                           act: str | None = None, source: str = "checkpoint", warn_assumed: bool = True,
                           **module_kwargs):
  """`(module, variables)` from an OpenAI-layout state dict.

  `model_name` (a `MODEL_CONFIGS` name) sets the architecture, activation and head widths
  included; `act` overrides the activation. Without them the architecture is read off the shapes,
  and what the weights cannot tell (activation: QuickGELU, OpenAI's release; head width: 64, or a
  same-shaped named config's) is assumed and said in one WARNING line (`warn_assumed=False`: not said, for
  a caller that puts the weights into a model of its own, which decides those facts). `module_kwargs` go to
  `create_model` (dtype, param_dtype, remat, or config overrides such as
  `text={'eot_token_id': 49407}` for open_clip models with `pool_type='eos'`).
  """
  state = split_fused_attention(state)
  if model_name is not None:
    cfg = MODEL_CONFIGS.get(model_name)
    if cfg is None:
      raise ValueError(f"Unknown model '{model_name}'; known: {', '.join(sorted(MODEL_CONFIGS))}.")
    if act is not None:
      cfg = cfg.replace(act=act)
  else:
    cfg = infer_openai_config(state, act or "quick_gelu")
    if warn_assumed:
      _warn_assumptions(cfg, act_given=act is not None, source=source)
  model = create_model(cfg, **module_kwargs)
  return model, state_dict_to_variables(state, model, openai_entries(cfg), source)


def _warn_assumptions(cfg: CLIPConfig, act_given: bool, source: str) -> None:
  """One WARNING line naming what a bare state dict's architecture took on trust."""
  assumed = []
  if not act_given:
    assumed.append("QuickGELU activation (OpenAI's release; exact-GELU weights, e.g. most open_clip runs, "
                   "need act='gelu')")
  named = matching_model_name(cfg)
  heads = f"{cfg.vision.heads} image and {cfg.text.heads} text attention heads"
  assumed.append(f"{heads} as in {named}" if named else f"{heads} (64 wide, OpenAI's rule)")
  _log.warning("%s: the weights do not state it, so assumed %s; pass --model-name (model_name= in Python: sets "
               "activation and heads) or --act (act=) to override.", source, "; ".join(assumed))


# open_clip model-config fields this project's CLIP does not implement, with the value that is
# the plain CLIP architecture; any other value is refused by name.
_OPEN_CLIP_PLAIN = {
    "vision_cfg": {"ls_init_value": None, "attentional_pool": False, "no_ln_pre": False, "pos_embed_type": "learnable",
                   "final_ln_after_pool": False, "pool_type": "tok", "act_kwargs": None, "norm_kwargs": None,
                   "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
                   "scale_attn": False, "scale_fc": False, "timm_model_name": None},
    "text_cfg": {"ls_init_value": None, "embed_cls": False, "no_causal_mask": False, "final_ln_after_pool": False,
                 "proj_bias": False, "proj_type": "linear", "act_kwargs": None, "norm_kwargs": None, "qk_norm": False,
                 "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
                 "scale_fc": False, "hf_model_name": None},
}


def config_from_open_clip(model_cfg: Mapping[str, Any]) -> CLIPConfig:
  """CLIPConfig from open_clip's model config (`open_clip_config.json`'s 'model_cfg', the same
  dict as open_clip's model_configs/*.json): activation, head widths and the text pooling rule
  come from the file. Raises CheckpointError naming a feature that is not plain CLIP."""
  if model_cfg.get("custom_text"):
    raise CheckpointError("open_clip config has custom_text=True (a CustomTextCLIP); only the plain CLIP "
                          "layout is supported.")
  vc, tc = dict(model_cfg.get("vision_cfg") or {}), dict(model_cfg.get("text_cfg") or {})
  for part, given in (("vision_cfg", vc), ("text_cfg", tc)):
    for key, plain in _OPEN_CLIP_PLAIN[part].items():
      if given.get(key, plain) != plain:
        raise CheckpointError(f"open_clip config sets {part}.{key}={given[key]!r}, which clip_jax's CLIP does not "
                              "implement.")
    if given.get("block_type") not in (None, "default"):
      raise CheckpointError(f"open_clip config sets {part}.block_type={given['block_type']!r}; not supported.")
  if tc.get("pool_type", "argmax") not in ("argmax", "eos"):
    raise CheckpointError(f"open_clip config pools text with pool_type={tc['pool_type']!r}; supported: "
                          "'argmax', 'eos'.")
  image_size = vc.get("image_size", 224)
  if isinstance(image_size, (list, tuple)):
    if len(set(image_size)) != 1:
      raise CheckpointError(f"open_clip config has a non-square image_size {image_size}; not supported.")
    image_size = image_size[0]
  layers = vc.get("layers", 12)
  resnet = isinstance(layers, (list, tuple))
  vision = VisionConfig(image_size=image_size, layers=tuple(layers) if resnet else layers, width=vc.get("width", 768),
                        patch_size=None if resnet else vc.get("patch_size", 16), head_width=vc.get("head_width", 64),
                        mlp_ratio=vc.get("mlp_ratio", 4.0))
  text = TextConfig(context_length=tc.get("context_length", 77), vocab_size=tc.get("vocab_size", 49408),
                    width=tc.get("width", 512), heads=tc.get("heads", 8), layers=tc.get("layers", 12),
                    mlp_ratio=tc.get("mlp_ratio", 4.0),
                    eot_token_id=tc.get("eos_id", 2) if tc.get("pool_type") == "eos" else None)
  return CLIPConfig(embed_dim=model_cfg.get("embed_dim", 512), vision=vision, text=text,
                    act="quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
                    init_logit_scale=model_cfg.get("init_logit_scale", math.log(1 / 0.07)),
                    init_logit_bias=model_cfg.get("init_logit_bias"))


def config_to_open_clip(cfg: CLIPConfig) -> dict[str, Any]:
  """open_clip's model config ('model_cfg' of `open_clip_config.json`) for `cfg`: the inverse of
  `config_from_open_clip` (a round trip gives `cfg` back). The text pooling rule is written out
  (pool_type 'eos' with its eos_id, else open_clip's default 'argmax')."""
  vision = cfg.vision
  vision_cfg = {"image_size": vision.image_size, "layers": list(vision.layers) if vision.is_resnet else vision.layers,
                "width": vision.width, "head_width": vision.head_width, "mlp_ratio": vision.mlp_ratio}
  if not vision.is_resnet:
    vision_cfg["patch_size"] = vision.patch_size
  text = cfg.text
  text_cfg = {"context_length": text.context_length, "vocab_size": text.vocab_size, "width": text.width,
              "heads": text.heads, "layers": text.layers, "mlp_ratio": text.mlp_ratio}
  if text.eot_token_id is not None:
    text_cfg.update(pool_type="eos", eos_id=text.eot_token_id)
  model_cfg = {"embed_dim": cfg.embed_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg,
               "quick_gelu": cfg.act == "quick_gelu", "init_logit_scale": cfg.init_logit_scale}
  if cfg.init_logit_bias is not None:
    model_cfg["init_logit_bias"] = cfg.init_logit_bias
  return model_cfg


def export_open_clip(module: CLIP, variables: dict[str, Any], out_dir: str, preprocessing=None, tokenizer=None,
                     tokenizer_name: str | None = None) -> str:
  """Writes an open_clip hub folder, which `open_clip.create_model_and_transforms('local-dir:OUT_DIR')`
  and `hf-hub:` repositories load and `load_checkpoint` reads back: open_clip_config.json (the model
  config and its image preprocessing: `preprocessing`, an `images.Preprocessing`, e.g. the source's
  `stated_preprocessing`; None: OpenAI's mean/std, which this project's training uses) and
  open_clip_model.safetensors (the OpenAI-layout state dict, the keys open_clip's CLIP uses).
  tokenizer: the model's `clip_jax.tokenizer` object. OpenAI's CLIP BPE (or None) is what open_clip uses
  for a config naming none; another BPE's files are written beside the config, which names them as
  text_cfg.hf_tokenizer_name = `tokenizer_name` (default: OUT_DIR's name), so that open_clip's
  `get_tokenizer('local-dir:OUT_DIR')` reads them (an `hf-hub:` repository is read by that name: set it to
  the repository's id there). A sentencepiece model cannot be named (`export_tokenizer_note`). Returns
  `out_dir`."""
  from clip_jax.data.images import OPENAI
  from clip_jax.weights import save_safetensors
  preprocessing = preprocessing or OPENAI
  stated = preprocessing.to_dict()
  if preprocessing == OPENAI:  # open_clip's defaults for the rest
    stated = {"mean": stated["mean"], "std": stated["std"]}
  os.makedirs(out_dir, exist_ok=True)
  model_cfg = config_to_open_clip(module.config)
  if tokenizer is not None and not is_openai_bpe(tokenizer) and hasattr(tokenizer, "save_hf"):
    tokenizer.save_hf(out_dir)
    model_cfg["text_cfg"]["hf_tokenizer_name"] = tokenizer_name or os.path.basename(os.path.abspath(out_dir))
  config = {"model_cfg": model_cfg, "preprocess_cfg": stated}
  with open(os.path.join(out_dir, "open_clip_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  save_safetensors(export_openai_state_dict(module, variables), os.path.join(out_dir, "open_clip_model.safetensors"))
  return out_dir


def is_openai_bpe(tokenizer) -> bool:
  """True for OpenAI's CLIP BPE at any context length (the packaged vocabulary and merges): what open_clip
  and transformers' CLIP folders mean when they name no other tokenizer."""
  from clip_jax.tokenizer import ClipTokenizer, default_tokenizer
  if not isinstance(tokenizer, ClipTokenizer):
    return False
  default = default_tokenizer()
  # The same ids under either spelling of the special tokens (OpenAI's '<start_of_text>', Hugging Face's
  # '<|startoftext|>': an HF CLIP folder's own files are OpenAI's BPE too).
  def ids(t):
    specials = {t.sot_token: "<sot>", t.eot_token: "<eot>"}
    return {specials.get(token, token): i for token, i in t.encoder.items()}
  return tokenizer.merges == default.merges and ids(tokenizer) == ids(default)


def export_tokenizer_note(tokenizer, fmt: str, out: str) -> str | None:
  """The line an export of format `fmt` ('hf', 'open_clip', 'openai') to `out` prints about the model's
  tokenizer, or None when there is nothing to say (OpenAI's CLIP BPE; an hf folder holding the files)."""
  if tokenizer is None or is_openai_bpe(tokenizer):
    return None
  source = getattr(tokenizer, "model_path", None)
  if fmt == "openai":
    return ("The model's tokenizer is not OpenAI's CLIP BPE, and an OpenAI-layout file names none: loaders "
            "will tokenize with OpenAI's; give them this model's tokenizer by hand.")
  if source is not None:  # sentencepiece: neither transformers' CLIPTokenizer nor an open_clip config holds it
    where = "transformers' CLIPTokenizer cannot hold it, so no tokenizer files are written" if fmt == "hf" else (
        "an open_clip folder cannot name it here, so open_clip would tokenize with OpenAI's CLIP BPE")
    return (f"warning: the model's tokenizer is a sentencepiece model ({source}): {where}; tokenize with that "
            "file by hand.")
  if fmt == "open_clip":
    name = os.path.basename(os.path.abspath(out))  # what export_model names it by (`export_open_clip`)
    return (f"The model's tokenizer is not OpenAI's CLIP BPE: its files are written into {out}, named by "
            f"open_clip_config.json (text_cfg.hf_tokenizer_name: '{name}'), which open_clip's "
            f"get_tokenizer('local-dir:{out}') reads; pushed as an hf-hub: repository, set hf_tokenizer_name to "
            "that repository's id.")
  return None


def load_open_clip_directory(path: str, **module_kwargs):
  """`(module, variables)` from an open_clip hub folder: open_clip_config.json beside
  open_clip_model.safetensors (or open_clip_pytorch_model.bin), as open_clip's save_for_hf writes."""
  with open(os.path.join(path, "open_clip_config.json")) as f:
    try:
      model_cfg = json.load(f).get("model_cfg") or {}
    except (json.JSONDecodeError, AttributeError) as e:
      raise CheckpointError(f"{path}/open_clip_config.json: not a JSON object with 'model_cfg' ({e}).") from None
  try:
    cfg = config_from_open_clip(model_cfg)
  except CheckpointError as e:
    raise CheckpointError(f"{path}: {e}") from None
  state = split_fused_attention(load_weights_dir(path, OPEN_CLIP_WEIGHTS))
  model = create_model(cfg, **module_kwargs)
  return model, state_dict_to_variables(state, model, openai_entries(cfg), path)


def load_hf_directory(path: str, variant: str | None = None, **module_kwargs):
  """`(module, variables)` from a transformers CLIPModel folder: config.json and its weights,
  single, sharded, `variant` (e.g. 'fp16') or `.bin` files as transformers names them."""
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise CheckpointError(f"{path}: a Hugging Face model directory needs a config.json.")
  with open(config_path) as f:
    hf_config = json.load(f)
  if hf_config.get("model_type") not in (None, "clip"):
    raise CheckpointError(f"{path}: config.json is for model_type '{hf_config.get('model_type')}', not 'clip'.")
  try:
    cfg = config_from_hf(hf_config)
  except CheckpointError as e:  # the config's own line does not know which folder it came from
    raise CheckpointError(f"{config_path}: {e}") from None
  state = load_weights_dir(path, TRANSFORMERS_WEIGHTS, variant)
  model = create_model(cfg, **module_kwargs)
  return model, state_dict_to_variables(state, model, hf_entries(cfg), path)


def image_processor_config(image_size: int, preprocessing=None) -> dict[str, Any]:
  """transformers' CLIPImageProcessor settings for `preprocessing` (an `images.Preprocessing`; None:
  OpenAI's: the shortest side resized to `image_size`, bicubic, a centre crop of it, OpenAI's mean/std;
  'squash': resized to image_size x image_size). With it `CLIPProcessor.from_pretrained` and the
  zero-shot pipeline load an exported folder. ValueError for 'longest' (padding to a square), which
  CLIPImageProcessor cannot do."""
  from clip_jax.data.images import OPENAI
  preprocessing = preprocessing or OPENAI
  if preprocessing.resize_mode == "longest":
    raise ValueError("the model's preprocessing resizes the longest side and pads to a square (resize_mode "
                     "'longest'), which transformers' CLIPImageProcessor cannot do: export it with --format "
                     "open_clip, whose config states it.")
  square = {"height": image_size, "width": image_size}
  return {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
          "size": square if preprocessing.resize_mode == "squash" else {"shortest_edge": image_size},
          "resample": {"bilinear": 2, "bicubic": 3}[preprocessing.interpolation], "do_center_crop": True,
          "crop_size": square, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
          "image_mean": [float(m) for m in preprocessing.mean], "image_std": [float(s) for s in preprocessing.std],
          "do_convert_rgb": True}


# PIL's resampling codes, as transformers stores them
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def stated_preprocessing(checkpoint: str):
  """The image preprocessing a checkpoint states (`clip_jax.data.images.Preprocessing`): an open_clip hub
  folder's open_clip_config.json 'preprocess_cfg' (mean, std, interpolation, resize_mode, fill_color), a
  transformers folder's preprocessor_config.json (or transformers >= 5's processor_config.json
  'image_processor'): image_mean, image_std, resample, size {shortest_edge} (+ centre crop) or {height,
  width} ('squash'). OpenAI's CLIP's (`images.OPENAI`) where nothing is stated: bare state dicts,
  workdirs, this project's exports of those. What transformers would do that these settings
  cannot say (no centre crop, a crop smaller than the resize, no resize or rescale) is one warning line;
  the nearest open_clip settings are used. Raises ValueError (one line) for what cannot be applied
  (another interpolation, an unknown resize mode, an unreadable file)."""
  preprocessing, _, unmapped = read_stated_preprocessing(checkpoint)
  if unmapped:
    _log.warning(unmapped)
  return preprocessing


def loads_as_hf_folder(path: str) -> bool:
  """Whether `load_checkpoint` reads the folder as a transformers CLIPModel: it has config.json and is not a
  workdir of this project (clip_config.json); a hub repository holding open_clip's files too loads as HF."""
  return os.path.isfile(os.path.join(path, "config.json")) and not os.path.exists(os.path.join(path, "clip_config.json"))


def read_stated_preprocessing(checkpoint: str):
  """(`Preprocessing`, the file stating it or None, a line on what transformers' settings would do that
  it cannot say or None): `stated_preprocessing`'s parts, the one parser of a folder's preprocessing."""
  from clip_jax.data.images import OPENAI, Preprocessing
  path = resolve_checkpoint_path(checkpoint)
  if not os.path.isdir(path):
    return OPENAI, None, None
  names = ["open_clip_config.json", "preprocessor_config.json", "processor_config.json"]
  if loads_as_hf_folder(path):  # a hub repository holding both layouts: the settings of the weights loaded
    names = names[1:] + names[:1]
  candidates = [os.path.join(path, n) for n in names]
  source = next((c for c in candidates if os.path.isfile(c)), None)
  if source is None:
    return OPENAI, None, None
  try:
    with open(source, encoding="utf-8") as f:
      cfg = json.load(f)
    if os.path.basename(source) == "open_clip_config.json":
      cfg = cfg.get("preprocess_cfg") or {}
      interpolation = cfg.get("interpolation") or "bicubic"
      # open_clip's eval transform resamples 'random' (a training option) bicubic
      stated = {"mean": cfg.get("mean"), "std": cfg.get("std"),
                "interpolation": "bicubic" if interpolation == "random" else interpolation,
                "resize_mode": cfg.get("resize_mode") or "shortest", "fill_color": cfg.get("fill_color") or 0}
      unmapped = []
    else:  # transformers' CLIPImageProcessor; processor_config.json nests it (transformers >= 5)
      cfg = cfg.get("image_processor", cfg) if source.endswith("processor_config.json") else cfg
      stated, unmapped = _from_image_processor(cfg)
    stated = {k: v for k, v in stated.items() if v is not None}
    preprocessing = Preprocessing(**stated)
  except json.JSONDecodeError as e:
    raise _UnreadableStatement(f"{source}: not readable JSON ({e}).") from None
  except (OSError, AttributeError, TypeError, ValueError) as e:
    raise ValueError(f"{source}: image {e}" if str(e).startswith("preprocessing") else f"{source}: {e}") from None
  note = None
  if unmapped:
    note = (f"{source}: transformers would {'; '.join(unmapped)}; evaluated here as open_clip's "
            f"{preprocessing.describe()}.")
  return preprocessing, source, note


class _UnreadableStatement(ValueError):
  """A preprocessing file that is not JSON (a loader that reads it says so itself)."""


def _from_image_processor(cfg: dict) -> tuple[dict, list[str]]:
  """transformers' CLIPImageProcessor settings -> (Preprocessing's fields, what they cannot say)."""
  resample = cfg.get("resample", 3)
  interpolation = _PIL_RESAMPLE.get(resample, resample)
  size, crop = cfg.get("size") or {"shortest_edge": 224}, cfg.get("crop_size")
  unmapped = []
  if isinstance(size, int):  # old processors: one number = the shortest edge
    size = {"shortest_edge": size}
  if isinstance(crop, int):  # old processors: one number = a square crop
    crop = {"height": crop, "width": crop}
  if not isinstance(size, dict):
    raise ValueError(f"size {size!r} is neither {{'shortest_edge': N}} nor {{'height': H, 'width': W}}")
  if "shortest_edge" in size:
    resize_mode = "shortest"
    if not cfg.get("do_center_crop", True):
      unmapped.append("not centre-crop (do_center_crop false: a non-square image)")
    elif isinstance(crop, dict) and crop.get("height", size["shortest_edge"]) != size["shortest_edge"]:
      unmapped.append(f"resize the shortest side to {size['shortest_edge']} and crop {crop.get('height')}")
  elif "height" in size and "width" in size:
    resize_mode = "squash"  # both sides resized, no aspect kept
    if size["height"] != size["width"]:
      unmapped.append(f"resize to {size['height']} x {size['width']} (not square)")
    if cfg.get("do_center_crop", True) and isinstance(crop, dict) and (
        crop.get("height"), crop.get("width")) != (size["height"], size["width"]):
      unmapped.append(f"crop {crop.get('height')} x {crop.get('width')} after resizing")
  else:
    raise ValueError(f"size {size!r} is neither {{'shortest_edge': N}} nor {{'height': H, 'width': W}}")
  if not cfg.get("do_resize", True):
    unmapped.append("not resize (do_resize false)")
  if not cfg.get("do_rescale", True) or abs(float(cfg.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-12:
    unmapped.append(f"rescale by {cfg.get('rescale_factor') if cfg.get('do_rescale', True) else 1}, not 1/255")
  mean, std = cfg.get("image_mean"), cfg.get("image_std")
  if not cfg.get("do_normalize", True):
    mean, std = 0.0, 1.0  # exactly x / 255
  return {"mean": mean, "std": std, "interpolation": interpolation, "resize_mode": resize_mode}, unmapped


_SAY_PREPROCESSING_NOTE = contextvars.ContextVar("say_preprocessing_note", default=True)


@contextlib.contextmanager
def applying_stated_preprocessing():
  """Loading inside it does not say `stated_preprocessing_note`: the caller (`clip_jax.evaluate`) applies
  the folder's preprocessing and says which it uses."""
  token = _SAY_PREPROCESSING_NOTE.set(False)
  try:
    yield
  finally:
    _SAY_PREPROCESSING_NOTE.reset(token)


def stated_preprocessing_note(path: str) -> str | None:
  """One line when a folder states image preprocessing other than OpenAI's, for the loaders of uses that
  do not apply it (training, guidance, exports; `clip_jax.evaluate` and `clip_jax.preprocess(...,
  preprocessing=stated_preprocessing(PATH))` do), else None. An unreadable or unsupported statement is
  said here too (the loader still loads; evaluation refuses it)."""
  from clip_jax.data.images import OPENAI
  try:
    preprocessing, source, _ = read_stated_preprocessing(path)
  except _UnreadableStatement:
    return None  # the loader says what it cannot read
  except ValueError as e:
    return (f"{str(e).rstrip('.')} (clip_jax.evaluate refuses it; training, guidance and exports preprocess as "
            "OpenAI's CLIP).")
  if preprocessing == OPENAI:
    return None
  return (f"{source} states image preprocessing {preprocessing.describe()}: `clip_jax.evaluate` and "
          "`clip_jax.preprocess(..., preprocessing=clip_jax.stated_preprocessing(PATH))` apply it; training, "
          "guidance (draw, edit) and DreamBooth's metrics preprocess as OpenAI's CLIP "
          f"({OPENAI.describe()}); `clip_jax.export` states it in the exported folder.")


def export_hf(module: CLIP, variables: dict[str, Any], out_dir: str, tokenizer=None, preprocessing=None) -> str:
  """Writes a transformers-loadable CLIPModel directory: config.json, model.safetensors,
  preprocessor_config.json (`image_processor_config` of `preprocessing`, None: OpenAI's; ValueError for
  one transformers cannot state) and, given a tokenizer that can, its files."""
  cfg = module.config
  processor = image_processor_config(cfg.vision.image_size, preprocessing)  # refused before anything is written
  state = variables_to_state_dict(variables, hf_entries(cfg))
  os.makedirs(out_dir, exist_ok=True)
  save_safetensors(state, os.path.join(out_dir, "model.safetensors"))
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config_to_hf(cfg), f, indent=2)
  with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
    json.dump(processor, f, indent=2)
  if tokenizer is not None and hasattr(tokenizer, "save_hf"):
    tokenizer.save_hf(out_dir)
  return out_dir


def openai_layout_note(cfg: CLIPConfig) -> str:
  """What an OpenAI-layout state dict of a model of `cfg` leaves out, and how to read it back whole."""
  named = matching_model_name(cfg, whole=True)
  facts = (f"activation ({cfg.act}), attention heads (image {cfg.vision.heads}, text {cfg.text.heads}) and text "
           "pooling")
  how = (f"read it back with --model-name {named} (model_name='{named}' in Python; open_clip: "
         f"create_model('{named}', pretrained=FILE) if it has that architecture, else export with --format "
         "open_clip)" if named else
         "no named architecture matches this model, so loaders would guess them: export with --format open_clip, "
         "which carries them")
  return f"An OpenAI-layout file does not carry the model's {facts}: {how}."


def export_openai_state_dict(module: CLIP, variables: dict[str, Any]) -> dict[str, np.ndarray]:
  """OpenAI-layout state dict (in_proj fused again), loadable by open_clip's CLIP class.

  The layout cannot say where text is pooled; OpenAI and open_clip pool at argmax(token id).
  A model that pools at an end token below the vocabulary's top id (added tokens) is exported
  with a WARNING: open_clip needs `pool_type='eos'` and that `eos_id` for it.
  """
  text = module.config.text
  if text.eot_token_id is not None and text.eot_token_id != text.vocab_size - 1:
    _log.warning("this model pools text at token %d, not at argmax(token id) as OpenAI-layout loaders do; "
                 "in open_clip set text_cfg pool_type='eos', eos_id=%d (or export with export_hf).",
                 text.eot_token_id, text.eot_token_id)
  state = variables_to_state_dict(variables, openai_entries(module.config))
  fused = {}
  for key in list(state):
    match = re.match(r"(.*)\.attn\.q_proj\.(weight|bias)$", key)
    if match and not key.startswith("visual.attnpool"):
      prefix, kind = match.groups()
      parts = [state.pop(f"{prefix}.attn.{n}_proj.{kind}") for n in "qkv"]
      fused[f"{prefix}.attn.in_proj_{kind}"] = np.concatenate(parts, axis=0)
  state.update(fused)
  return state


def resolve_checkpoint_path(path: str) -> str:
  """A checkpoint path as users pass it -> the path to read: open_clip's 'local-dir:DIR' prefix dropped,
  a Hugging Face cache folder at its refs/main snapshot (`hub_cache_snapshot`). Every command resolves
  --checkpoint with it before looking at the path (is it a folder, does it hold a tokenizer)."""
  return hub_cache_snapshot(path[len("local-dir:"):] if path.startswith("local-dir:") else path)


def check_recorded_tokenizer(workdir: str, recorded: str | None, override: str) -> None:
  """Raises clip_jax.cli.MissingPathError (one line) when WORKDIR's config record names a tokenizer path
  that no longer exists (its folder moved or deleted): get_tokenizer's own line would name neither the
  record nor how to go on. `override` is the caller's way to give another, e.g. '--tokenizer DIR'."""
  if not recorded or recorded == "clip" or os.path.exists(recorded):
    return
  from clip_jax.cli import MissingPathError
  from clip_jax.loop import CONFIG_FILE
  raise MissingPathError(
      f"the tokenizer path recorded in {os.path.join(workdir, CONFIG_FILE)} (data.tokenizer: {recorded}) no "
      f"longer exists (its folder was moved or deleted): pass {override}, or restore the folder or edit "
      f"data.tokenizer in that config.json.")


def checkpoint_tokenizer(checkpoint: str | None, spec: str | None = None, *,
                         option: str = "--tokenizer DIR") -> tuple[str, str | None]:
  """(the tokenizer spec for a model from `checkpoint`, the line to say or None): the one rule of
  evaluation, training from init.checkpoint, export, draw and the rest. `spec` given (the user's
  `option`, named in the lines) wins; else a folder's own tokenizer files (`tokenizer.tokenizer_files`:
  a Hugging Face folder's tokenizer.json or vocab.json + merges.txt, a hub folder's, an export's); else
  what a workdir of this project recorded (its config.json's data.tokenizer, or the rule on its own init.checkpoint);
  else OpenAI's CLIP BPE ('clip'), which an open_clip folder's config naming no tokenizer states (open_clip's
  default). Any other folder that states nothing about its tokenizer gets 'clip' with a line saying it was assumed; a bare state-dict file is OpenAI's convention, said by nothing. An open_clip
  folder whose open_clip_config.json names a Hugging Face tokenizer (text_cfg.hf_tokenizer_name) without
  its files is a ValueError: nothing is downloaded here."""
  from clip_jax.checkpoint import MODEL_CONFIG_FILE, step_folder
  from clip_jax.tokenizer import tokenizer_files
  if spec:
    return spec, None
  if not checkpoint:
    return "clip", None
  path = resolve_checkpoint_path(checkpoint)
  if not os.path.isdir(path):
    return "clip", None
  if tokenizer_files(path):
    return os.path.abspath(path), None  # absolute: a workdir's record is read from anywhere
  named, open_clip_folder = None, os.path.isfile(os.path.join(path, "open_clip_config.json"))
  try:
    with open(os.path.join(path, "open_clip_config.json")) as f:
      named = ((json.load(f).get("model_cfg") or {}).get("text_cfg") or {}).get("hf_tokenizer_name")
  except (OSError, ValueError, AttributeError):
    pass  # none, or unreadable: the loader says what it cannot read
  if open_clip_folder and not named:
    return "clip", None  # open_clip's convention: a config naming no tokenizer means OpenAI's BPE
  if named:
    raise ValueError(f"{path}/open_clip_config.json names the tokenizer {named!r} (text_cfg.hf_tokenizer_name), "
                     f"but the folder holds no tokenizer files and nothing is downloaded here: download it "
                     f"(huggingface-cli download {named} --local-dir DIR) and pass {option}, or copy its "
                     "tokenizer.json into the folder.")
  step = step_folder(path)
  workdir = step[0] if step else path
  if os.path.isfile(os.path.join(workdir, MODEL_CONFIG_FILE)):
    from clip_jax.loop import recorded_config
    record = recorded_config(workdir)  # the run's config record
    recorded = record.get("data.tokenizer")
    check_recorded_tokenizer(workdir, recorded, option)
    if recorded:
      return recorded, None
    if record.get("init.checkpoint"):  # recorded before the trainer resolved it: the same rule on its start
      return checkpoint_tokenizer(record["init.checkpoint"], option=option)
    return "clip", None  # trained from scratch with the trainer's default
  return "clip", (f"{path}: states no tokenizer and holds no tokenizer files (tokenizer.json, vocab.json + "
                  f"merges.txt): assuming OpenAI's CLIP BPE ('clip'); if the model was trained with another, pass "
                  f"{option}.")


def check_checkpoint_exists(path: str, flag: str = "--checkpoint") -> None:
  """Raises clip_jax.cli.MissingPathError (one line, a FileNotFoundError) unless the resolved `path`
  exists; a hub id is named as such (`missing_checkpoint_line`)."""
  from clip_jax.cli import MissingPathError
  if not os.path.exists(resolve_checkpoint_path(path)):
    raise MissingPathError(f"{flag} {missing_checkpoint_line(path)}")


def hub_cache_snapshot(path: str) -> str:
  """A Hugging Face cache folder of one repository (models--OWNER--NAME, with refs/ and snapshots/) ->
  the snapshot its refs/main names (the files transformers and open_clip would load); any other path
  as it is."""
  ref = os.path.join(path, "refs", "main")
  if os.path.isdir(os.path.join(path, "snapshots")) and os.path.isfile(ref):
    with open(ref) as f:
      snapshot = os.path.join(path, "snapshots", f.read().strip())
    if os.path.isdir(snapshot):
      return snapshot
  return path


def missing_checkpoint_line(path: str) -> str:
  """The one line for a checkpoint path that is not there; hub ids ('owner/name', 'hf-hub:owner/name')
  are named as such, since nothing is downloaded here."""
  repo = path[len("hf-hub:"):] if path.startswith("hf-hub:") else path
  parts = repo.split("/")
  if path.startswith("hf-hub:") or (len(parts) == 2 and all(parts) and not repo.startswith((".", "~"))):
    return (f"{path}: no such file or directory; if it is a Hugging Face hub id, nothing is downloaded here: "
            f"download it first (huggingface-cli download {repo} --local-dir DIR) and pass DIR (or a cache "
            "folder models--OWNER--NAME, read at its refs/main snapshot).")
  return f"{path}: no such file or directory."


def load_checkpoint(path: str, *, model_name: str | None = None, act: str | None = None,
                    image_size: int | None = None, variant: str | None = None, warn_assumed: bool = True,
                    **module_kwargs):
  """`(module, variables)` from an OpenAI/open_clip checkpoint file (.safetensors, .pt/.bin/.pth,
  TorchScript archive), a Hugging Face CLIPModel directory (single, sharded, `variant`='fp16' or
  .bin weights, found as transformers finds them), an open_clip hub folder (open_clip_config.json +
  open_clip_model.safetensors / open_clip_pytorch_model.bin), or a training workdir of this project
  (its newest checkpoint; WORKDIR/checkpoints/STEP for another).

  For bare state dicts `model_name` sets the architecture (activation and heads included) and
  `act` the activation; what neither gives is assumed with one WARNING line (`warn_assumed=False`: not
  said, where the caller puts the weights into a model of its own, which decides them). Raises
  FileNotFoundError or CheckpointError. `module_kwargs` (dtype, param_dtype, remat)
  go to the module. `image_size` (px) moves the image tower to a new resolution, its grid
  positional embedding resampled (`clip_jax.resize.resize_model`). With `param_dtype` the returned
  parameters are that dtype too (checkpoints are read as float32; BatchNorm statistics stay float32,
  as flax keeps them)."""
  module, variables = _load_any_checkpoint(path, model_name=model_name, act=act, variant=variant,
                                           warn_assumed=warn_assumed, **module_kwargs)
  if image_size is not None:
    from clip_jax.resize import resize_model
    module, variables = resize_model(module, variables, image_size)
  return module, params_as(variables, module_kwargs.get("param_dtype"))


def params_as(variables: dict, param_dtype) -> dict:
  """`variables` with the floating leaves of its 'params' collection cast to `param_dtype` (None: as they are)."""
  if param_dtype is None or "params" not in variables:
    return variables
  cast = lambda x: x.astype(param_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
  return {**variables, "params": jax.tree.map(cast, variables["params"])}


def _load_any_checkpoint(path: str, *, model_name, act, variant, warn_assumed, **module_kwargs):
  path = resolve_checkpoint_path(path)
  if not os.path.exists(path):
    raise FileNotFoundError(missing_checkpoint_line(path))
  if os.path.isdir(path):
    note = stated_preprocessing_note(path) if _SAY_PREPROCESSING_NOTE.get() else None
    if note:
      _log.warning(note)
    if loads_as_hf_folder(path):
      return load_hf_directory(path, variant=variant, **module_kwargs)
    if os.path.exists(os.path.join(path, "open_clip_config.json")):
      return load_open_clip_directory(path, **module_kwargs)
    from clip_jax.checkpoint import load_workdir, step_folder  # Training workdirs: orbax + the model config.
    step = step_folder(path)  # WORKDIR/checkpoints/STEP: that step's checkpoint
    if step is not None:
      return load_workdir(step[0], step=step[1], **module_kwargs)
    return load_workdir(path, **module_kwargs)
  state = load_state_dict(path)
  if any(k.startswith(("vision_model.", "text_model.")) for k in state):
    raise CheckpointError(f"{path}: looks like a Hugging Face CLIPModel state dict; pass its directory "
                          "(with config.json) instead.")
  return load_openai_state_dict(state, model_name=model_name, act=act, source=path, warn_assumed=warn_assumed,
                                **module_kwargs)


# ----------------------------------------------------------------------------- bare text encoder
# A transformers CLIPTextModel (Stable Diffusion's `text_encoder/`) is a text tower without the
# projection: it maps onto `TextTransformer(output_dim=None)`, whose `hidden_states` equal the
# model's `last_hidden_state`. transformers >= 5 saves its keys without the `text_model.` prefix;
# hub checkpoints (and older versions) have it. Both load; export writes the prefixed form, which
# every version reads.
_TEXT_MODEL = "text_model"


def text_encoder_entries(layers: int) -> list[Entry]:
  """CLIPTextModel's layout for a `TextTransformer` whose variables are its own (no 'text' scope)."""
  t = _TEXT_MODEL
  return [Entry(("params", "token_embedding"), f"{t}.embeddings.token_embedding.weight"),
          Entry(("params", "positional_embedding"), f"{t}.embeddings.position_embedding.weight"),
          *_transformer_hf((), t, layers),
          *_norm(("ln_final",), f"{t}.final_layer_norm")]


def text_encoder_kwargs_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
  """TextTransformer fields from a CLIPTextModel config.json (transformers' defaults fill gaps)."""
  if hf.get("model_type") == "clip" or "text_config" in hf:
    raise CheckpointError("config.json is for a full CLIPModel; a text encoder needs a CLIPTextModel "
                          "config (model_type 'clip_text_model').")
  act = hf.get("hidden_act", "quick_gelu")
  if act not in ("quick_gelu", "gelu"):
    raise CheckpointError(f"text encoder config uses hidden_act '{act}'; supported: 'quick_gelu', 'gelu'.")
  _check_layer_norm_eps(hf, "text encoder config")
  width = hf.get("hidden_size", 512)
  return dict(context_length=hf.get("max_position_embeddings", 77), vocab_size=hf.get("vocab_size", 49408),
              width=width, heads=hf.get("num_attention_heads", 8), layers=hf.get("num_hidden_layers", 12),
              output_dim=None, mlp_ratio=hf.get("intermediate_size", 2048) / width, act=act,
              eot_token_id=eot_token_id_from_hf(hf))


def text_encoder_config_to_hf(module: TextTransformer, base: dict[str, Any] | None = None) -> dict[str, Any]:
  """A CLIPTextModel config.json for `module`; keys of `base` that do not describe the
  architecture (token ids, projection_dim, ...) are kept."""
  # The weights are written in float32, whatever dtype the source config named.
  dropped = ("transformers_version", "_name_or_path", "torch_dtype", "dtype")
  hf = {k: v for k, v in (base or {}).items() if k not in dropped}
  hf.update({"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
             "vocab_size": module.vocab_size, "hidden_size": module.width,
             "intermediate_size": int(round(module.width * module.mlp_ratio)),
             "num_attention_heads": module.heads, "num_hidden_layers": module.layers,
             "max_position_embeddings": module.context_length, "hidden_act": module.act,
             "layer_norm_eps": 1e-5, "eos_token_id": eot_token_id_to_hf(module.eot_token_id)})
  hf.setdefault("bos_token_id", module.vocab_size - 2)  # CLIP's vocabulary ends <sot>, <eot>
  return hf


def text_encoder_state_dict_to_variables(state: dict[str, np.ndarray], module: TextTransformer,
                                         source: str = "checkpoint") -> dict[str, Any]:
  """CLIPTextModel state dict -> `module`'s variables, checking every name and shape."""
  state = {(k if k.startswith(f"{_TEXT_MODEL}.") else f"{_TEXT_MODEL}.{k}"): v for k, v in state.items()}
  entries = text_encoder_entries(module.layers)
  tokens = jax.ShapeDtypeStruct((1, module.context_length), jnp.int32)
  abstract = jax.eval_shape(lambda t: nn.meta.unbox(module.init(jax.random.key(0), t)), tokens)
  expected = {k: v.shape for k, v in traverse_util.flatten_dict(abstract).items()}
  return tree_from_table(state, entries, expected, source,
                         f"the {module.layers}-layer, {module.width}-wide text encoder",
                         hint="does config.json belong to these weights? A CLIPTextModelWithProjection is "
                              "not supported")


def load_hf_text_encoder(path: str, variant: str | None = None, **module_kwargs):
  """`(module, variables, hf_config)` from a CLIPTextModel directory (config.json + weights:
  single, sharded, `variant` (e.g. 'fp16') or `.bin` files, as transformers names them).

  `module_kwargs` (dtype, param_dtype, remat) go to the TextTransformer.
  """
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise CheckpointError(f"{path}: a text encoder directory needs a config.json (a transformers "
                          "CLIPTextModel folder).")
  with open(config_path) as f:
    hf_config = json.load(f)
  state = load_weights_dir(path, TRANSFORMERS_WEIGHTS, variant)
  module = TextTransformer(**text_encoder_kwargs_from_hf(hf_config), **module_kwargs)
  return module, text_encoder_state_dict_to_variables(state, module, path), hf_config


def export_hf_text_encoder(module: TextTransformer, variables: dict[str, Any], out_dir: str,
                           hf_config: dict[str, Any] | None = None) -> str:
  """Writes a CLIPTextModel directory (config.json + model.safetensors) that transformers loads."""
  state = variables_to_state_dict(variables, text_encoder_entries(module.layers))
  os.makedirs(out_dir, exist_ok=True)
  save_safetensors(state, os.path.join(out_dir, "model.safetensors"))
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(text_encoder_config_to_hf(module, hf_config), f, indent=2, sort_keys=True)
  return out_dir
