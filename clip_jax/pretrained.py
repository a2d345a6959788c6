"""Starting a training run from a pretrained CLIP (`--config.init.checkpoint=PATH`).

Anything `clip_jax.load_checkpoint` reads is accepted: an OpenAI TorchScript archive or state dict,
an open_clip `.pt` / `.safetensors`, a Hugging Face CLIPModel directory, or a workdir of this
project. The weights go straight into the train state's shardings: files are read on the host
(numpy) and each device receives only its own slices (`jax.make_array_from_callback`); a workdir's
parameters are restored by orbax directly into the target shardings (its optimizer state is not
read). Nothing is gathered onto one device. The optimizer starts fresh.

Checks, all before anything is compiled, each one line: the path exists; the activation stated by
`init.act` / `init.model_name` is the configured model's (GELU and QuickGELU weights look alike); a
directory that states its architecture (config.json, open_clip_config.json, clip_config.json) states
the configured model's, heads and text pooling included, which no shape shows (`check_architecture`:
each differing field and the `--config.model.overrides=...` that matches; a new image size and the
init temperature are free, so is a tower that `init.dont_load` starts fresh); every parameter has
the configured shape (a bare state dict's shape error names the size overrides), the ViT grid
embedding aside (a new image size resamples it, `clip_jax.resize`, said in one line). `init.dont_load`
(a regex over '/'-joined parameter paths, big_vision's `dont_load`) keeps the fresh initialisation for
what it matches, e.g. '^text/' for LiT's text tower from scratch. The run tokenizes with the init
checkpoint's own tokenizer unless data.tokenizer names one (`training_tokenizer`).
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util

from clip_jax import sharding
from clip_jax.cli import UserError
from clip_jax.models.configs import MODEL_CONFIGS, CLIPConfig
from clip_jax.weights import CheckpointError

FlatKey = tuple[str, ...]  # ('params', 'visual', 'conv1')
ACTS = ("gelu", "quick_gelu")


def _name(key: FlatKey) -> str:
  return "/".join(key[1:]) if key[0] == "params" else "/".join(key)


def stated_act(model_name: str | None, act: str | None) -> str | None:
  """The activation the user states for the checkpoint (init.act wins over init.model_name's)."""
  if act and act not in ACTS:
    raise UserError(f"init.act={act!r}; use 'gelu' (exact, most open_clip/LAION runs) or 'quick_gelu' (OpenAI's).")
  if model_name and model_name not in MODEL_CONFIGS:
    raise UserError(f"init.model_name={model_name!r} is not a named architecture; one of "
                    f"{', '.join(sorted(MODEL_CONFIGS))}.")
  return act or (MODEL_CONFIGS[model_name].act if model_name else None)


def check_act(checkpoint_act: str, model_act: str, how: str) -> None:
  """One line when the checkpoint's activation (known `how`) is not the configured model's."""
  if checkpoint_act != model_act:
    fix = ("use the model's '-quickgelu' variant (model.name=...-quickgelu)" if checkpoint_act == "quick_gelu"
           else "use the model name without '-quickgelu'")
    raise UserError(f"the checkpoint's activation is {checkpoint_act} ({how}), but the configured model uses "
                    f"{model_act}: the weights would run with the wrong activation; {fix}.")


# Fields in which the configured model may differ from the architecture a checkpoint states: the image
# size (a new resolution: the grid embedding is resampled, `clip_jax.resize`) and the initial
# temperature / bias (starting values, not architecture: logit_scale is loaded, a logit_bias the
# checkpoint lacks is a missing parameter, which the shape check names).
FREE_FIELDS = ("vision.image_size", "init_logit_scale", "init_logit_bias")


# The sizes a bare state dict's shapes show (convert.infer_openai_config).
SHAPE_FIELDS = ("embed_dim", "vision.layers", "vision.width", "vision.patch_size", "text.context_length",
                "text.vocab_size", "text.width", "text.layers")


def stated_config(path: str) -> tuple[CLIPConfig, str] | None:
  """(the architecture a checkpoint directory states, the file that states it): a Hugging Face
  CLIPModel folder's config.json, an open_clip hub folder's open_clip_config.json, a workdir's (or
  its WORKDIR/checkpoints/STEP's) clip_config.json; None for a file (a bare state dict states none) or a config that does not read
  (the load that follows says what is wrong with it). Reads the config alone, not the weights."""
  from clip_jax import convert
  from clip_jax.checkpoint import MODEL_CONFIG_FILE, step_folder
  if not os.path.isdir(path):
    return None
  hf, oc, own = (os.path.join(path, name) for name in ("config.json", "open_clip_config.json", MODEL_CONFIG_FILE))
  try:  # the order load_checkpoint reads a directory in
    if convert.loads_as_hf_folder(path):
      with open(hf) as f:
        hf_config = json.load(f)
      return (convert.config_from_hf(hf_config), hf) if hf_config.get("model_type") in (None, "clip") else None
    if os.path.isfile(oc):
      with open(oc) as f:
        return convert.config_from_open_clip(json.load(f).get("model_cfg") or {}), oc
    step = step_folder(path)
    if not os.path.isfile(own) and step is not None:
      own = os.path.join(step[0], MODEL_CONFIG_FILE)  # WORKDIR/checkpoints/STEP: that workdir's
    if os.path.isfile(own):
      with open(own) as f:
        return CLIPConfig.from_dict(json.load(f)), own
  except (OSError, ValueError, TypeError, AttributeError):  # CheckpointError and JSON errors are ValueErrors
    return None
  return None


def _fields(config: CLIPConfig) -> dict[str, Any]:
  """'vision.head_width' -> value, for every field of the config; the end token as `TextConfig.pooling_token`
  (a Hugging Face config's 49407 is argmax pooling: the same token)."""
  flat = {}
  for key, value in config.to_dict().items():
    if isinstance(value, dict):
      flat.update({f"{key}.{name}": v for name, v in value.items()})
    else:
      flat[key] = value
  flat["text.eot_token_id"] = config.text.pooling_token
  return {k: tuple(v) if isinstance(v, list) else v for k, v in flat.items()}


def _same(a: Any, b: Any) -> bool:
  if isinstance(a, float) or isinstance(b, float):
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6)
  return a == b


def architecture_differences(stated: CLIPConfig, configured: CLIPConfig, *, vision: bool = True,
                             text: bool = True) -> list[tuple[str, Any, Any]]:
  """(field, the checkpoint's value, the configured value) for each architecture field that differs,
  FREE_FIELDS aside; `vision` / `text` False: that tower starts fresh (init.dont_load), its fields
  (and embed_dim, whose projections the shape check covers) are free."""
  free = set(FREE_FIELDS)
  if not (vision and text):
    free.add("embed_dim")
  if not (vision or text):
    free.add("act")
  ours = _fields(configured)
  return [(field, value, ours[field]) for field, value in _fields(stated).items()
          if field not in free and not (field.startswith("vision.") and not vision)
          and not (field.startswith("text.") and not text) and not _same(value, ours.get(field))]


def matching_overrides(overrides: Mapping[str, Any] | None, differences) -> dict[str, Any]:
  """The model.overrides that build the checkpoint's architecture: the user's own, plus each differing
  field at the checkpoint's value."""
  fixed = {k: dict(v) if isinstance(v, Mapping) else v for k, v in dict(overrides or {}).items()}
  for field, value, _ in differences:
    section, _, name = field.rpartition(".")
    (fixed.setdefault(section, {}) if section else fixed)[name] = value
  return fixed


def _listed(differences) -> str:
  return "; ".join(f"{field} {value!r} in the checkpoint, {ours!r} configured" for field, value, ours in differences)


def _loaded_towers(flat_target: Mapping[FlatKey, Any], dont_load: re.Pattern | None) -> dict[str, bool]:
  """{'vision': whether any image-tower variable is loaded (not all matched by init.dont_load), 'text': ...}."""
  names = [_name(k) for k in flat_target if not (dont_load and dont_load.search(_name(k)))]
  return {"vision": any(n.startswith("visual/") for n in names), "text": any(n.startswith("text/") for n in names)}


def check_architecture(path: str, stated: tuple[CLIPConfig, str], model_config: CLIPConfig,
                       model_overrides: Mapping[str, Any] | None = None, *, vision: bool = True,
                       text: bool = True) -> None:
  """One line (UserError) when the checkpoint's stated architecture is not the configured model's:
  each differing field with both values, and the --config.model.overrides argument that matches it.
  Heads, the activation and the text pooling are no parameter shape: without this check such weights
  load silently into a model that computes something else."""
  config, source = stated
  differences = architecture_differences(config, model_config, vision=vision, text=text)
  if not differences:
    return
  listed = _listed(differences)
  argument = f"--config.model.overrides={matching_overrides(model_overrides, differences)!r}"
  raise UserError(f"init.checkpoint {path}: {source} states another architecture than the configured model "
                  f"(model.name and model.overrides): {listed}. The weights would load into a model that computes "
                  f"something else (heads, activation and text pooling are no parameter shape). To build the "
                  f"checkpoint's architecture, add \"{argument}\" (it replaces model.overrides whole).")


def _is_workdir(path: str) -> bool:
  from clip_jax.checkpoint import MODEL_CONFIG_FILE
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, MODEL_CONFIG_FILE))


def _host_variables(path: str, model_config: CLIPConfig, model_name: str | None,
                    act: str | None) -> tuple[CLIPConfig, dict[FlatKey, np.ndarray]]:
  """(the checkpoint's config, its flat variables as host arrays) at the configured image size."""
  from clip_jax.convert import load_checkpoint
  from clip_jax.resize import resize_model, resize_note
  if os.path.isdir(path):
    ckpt_model, variables = load_checkpoint(path)
    check_act(ckpt_model.config.act, model_config.act, f"from {path}/config.json")
  elif model_name:
    ckpt_model, variables = load_checkpoint(path, model_name=model_name, act=act or None)
  else:
    # A bare state dict does not state its activation or heads, and they change no weight's shape: its
    # weights go into the configured model, which decides both. convert's warning of what it assumed
    # for a model of its own would mislead here; say what happens instead.
    ckpt_model, variables = load_checkpoint(path, act=act or model_config.act, warn_assumed=False)
    if jax.process_index() == 0:
      what = (f"read with init.act's activation ({act}); it does not state its attention heads" if act else
              "which does not state its activation or attention heads")
      print(f"init.checkpoint {path}: a bare state dict, {what}; its weights go into the configured model "
            f"({model_config.act}, {model_config.vision.heads} image and {model_config.text.heads} text heads).",
            flush=True)
  ckpt_vision, vision = ckpt_model.config.vision, model_config.vision
  if (ckpt_vision.image_size != vision.image_size and ckpt_vision.patch_size == vision.patch_size
      and ckpt_vision.is_resnet == vision.is_resnet):
    if jax.process_index() == 0:
      print(f"init.checkpoint {path}: {resize_note(ckpt_vision, vision.image_size)}", flush=True)
    ckpt_model, variables = resize_model(ckpt_model, variables, vision.image_size)
  flat = traverse_util.flatten_dict(jax.device_get(variables))
  return ckpt_model.config, {k: np.asarray(v) for k, v in flat.items()}


def _check_shapes(source: str, found: Mapping[FlatKey, tuple], target: Mapping[FlatKey, Any],
                  dont_load: re.Pattern | None) -> list[FlatKey]:
  """The target keys to load; raises CheckpointError naming the first parameter that is missing,
  extra or of another shape (and how many more there are)."""
  wanted = [k for k in target if not (dont_load and dont_load.search(_name(k)))]
  problems = []
  for key in wanted:
    if key not in found:
      problems.append(f"the checkpoint has no {_name(key)} (shape {tuple(target[key].shape)}); set init.dont_load "
                      "to a regex of parameters that start fresh")
    elif tuple(found[key]) != tuple(target[key].shape):
      problems.append(f"parameter {_name(key)} has shape {tuple(found[key])} in the checkpoint, the configured "
                      f"model needs {tuple(target[key].shape)}")
  extra = [k for k in found if k not in target and not (dont_load and dont_load.search(_name(k)))]
  problems += [f"the checkpoint's {_name(k)} has no place in the configured model" for k in extra]
  if problems:
    more = f" ({len(problems) - 1} more problems)" if len(problems) > 1 else ""
    raise CheckpointError(f"init.checkpoint {source}: {problems[0]}{more}. Is it a checkpoint of another "
                          "architecture than model.name and model.overrides?")
  return wanted


def _restore_workdir_params(path: str, keys: list[FlatKey], target: Mapping[FlatKey, Any]) -> dict[FlatKey, jax.Array]:
  """A workdir's newest checkpoint: only `keys` of its state, restored into their target shardings."""
  import orbax.checkpoint as ocp
  # The variables live under the same names in the saved state ('params', 'batch_stats').
  item = traverse_util.unflatten_dict({k: target[k] for k in keys})
  restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape,
                                                             dtype=t.dtype), item)
  # The handler alone: every process reads its own slices; nothing is written, so no barrier.
  restored = ocp.PyTreeCheckpointHandler().restore(_newest_state_dir(path), args=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=True))
  return traverse_util.flatten_dict(restored)


def _newest_state_dir(path: str):
  """WORKDIR/checkpoints/<newest step>/state (an epath.Path); CheckpointError when there is no step."""
  directory = os.path.join(os.path.abspath(path), "checkpoints")
  steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []
  if not steps:
    raise CheckpointError(f"init.checkpoint {path}: a workdir of this project without a checkpoint yet.")
  from etils import epath
  return epath.Path(directory) / str(steps[-1]) / "state"


def _workdir_shapes(path: str) -> tuple[CLIPConfig, dict[FlatKey, tuple]]:
  """(config, saved variable shapes) of a workdir's newest checkpoint (CheckpointError: none)."""
  from clip_jax.checkpoint import MODEL_CONFIG_FILE
  with open(os.path.join(path, MODEL_CONFIG_FILE)) as f:
    config = CLIPConfig.from_dict(json.load(f))
  import orbax.checkpoint as ocp
  # The state item alone (the iterator's is not ours), read by its handler.
  metadata = ocp.PyTreeCheckpointHandler().metadata(_newest_state_dir(path)).tree
  variables = {k: metadata[k] for k in ("params", "batch_stats") if k in metadata and metadata[k]}
  return config, {k: tuple(m.shape) for k, m in traverse_util.flatten_dict(variables).items()}


def load_init(path: str, target: Mapping[str, Any], model_config: CLIPConfig, *, model_name: str | None = None,
              act: str | None = None, dont_load: str | None = None,
              model_overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The checkpoint's variables placed in the train state's shardings, for every target variable
  that `dont_load` does not match.

  target: {'params': ..., 'batch_stats': ...} of jax.ShapeDtypeStruct with shardings (the train
  state's). Returns a nested dict of the loaded variables only (the rest keep their fresh init).
  Raises MissingPathError for a path that does not exist; UserError for an unknown init.act /
  init.model_name or an activation other than the configured model's; CheckpointError for a file
  that is not a CLIP checkpoint or a parameter of another shape. All before any compilation.
  """
  from clip_jax.convert import check_checkpoint_exists, resolve_checkpoint_path
  check_checkpoint_exists(path, "init.checkpoint")  # a hub id is named as one
  path = resolve_checkpoint_path(path)  # local-dir:DIR, a hub cache folder's snapshot
  act = stated_act(model_name, act)
  if act:
    check_act(act, model_config.act, "as init.act / init.model_name state")
  pattern = re.compile(dont_load) if dont_load else None
  flat_target = traverse_util.flatten_dict(dict(target))
  stated = stated_config(path)
  towers = _loaded_towers(flat_target, pattern)
  if stated:
    check_architecture(path, stated, model_config, model_overrides, **towers)
  if _is_workdir(path):
    ckpt_config, shapes = _workdir_shapes(path)
    check_act(ckpt_config.act, model_config.act, f"from {path}/clip_config.json")
    if ckpt_config.vision.image_size == model_config.vision.image_size:
      keys = _check_shapes(path, shapes, flat_target, pattern)
      return traverse_util.unflatten_dict(_restore_workdir_params(path, keys, flat_target))
  ckpt_config, host = _host_variables(path, model_config, model_name, act)
  try:
    keys = _check_shapes(path, {k: v.shape for k, v in host.items()}, flat_target, pattern)
  except CheckpointError as e:
    if stated or model_name:
      raise
    # A bare state dict: its shapes tell its sizes (not its heads); say which argument builds them.
    differences = [d for d in architecture_differences(ckpt_config, model_config, **towers) if d[0] in SHAPE_FIELDS]
    if not differences:
      raise
    raise CheckpointError(f"{e} Its shapes say: {_listed(differences)}; to build them, add "
                          f"\"--config.model.overrides={matching_overrides(model_overrides, differences)!r}\" (a "
                          "state dict does not state its attention heads: give them too where they are not the "
                          "configured model's).") from None
  # Each device receives only its slices of the host arrays (every process holds them all).
  placed = sharding.put_global({k: np.asarray(host[k], flat_target[k].dtype) for k in keys},
                               {k: flat_target[k].sharding for k in keys})
  return traverse_util.unflatten_dict(placed)


def workdir_has_checkpoint(workdir: str) -> bool:
  """Whether the run's own workdir holds a checkpoint step (the loop will resume from it)."""
  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def init_from_config(init: Any, workdir: str, model_config: CLIPConfig,
                     model_overrides: Mapping[str, Any] | None = None):
  """The trainer's `init` section -> a function (target variables) -> loaded variables, or None
  (no init.checkpoint, or the workdir resumes: its own checkpoint wins). Every mistake is a
  UserError (one line). A config that marks init.checkpoint required (None) must be given one."""
  from clip_jax import cli
  if init is None or init.get("checkpoint", "") == "":
    return None
  if workdir_has_checkpoint(workdir):
    if jax.process_index() == 0:
      print(f"{workdir} holds a checkpoint: resuming from it; init.checkpoint is not read.", flush=True)
    return None
  if init.checkpoint is None:
    raise UserError("this config starts from a pretrained model: give --config.init.checkpoint=PATH.")

  def load(target):
    loaded = cli.as_user_errors(load_init, init.checkpoint, target, model_config, model_name=init.get("model_name"),
                                act=init.get("act"), dont_load=init.get("dont_load"), model_overrides=model_overrides)
    if jax.process_index() == 0:
      print(loaded_summary(init.checkpoint, loaded, target), flush=True)
    return loaded
  return load


def training_tokenizer(cfg) -> tuple[str, str | None]:
  """(the tokenizer spec a CLIP run tokenizes with, a line for its start or None): data.tokenizer when
  given, else init.checkpoint's own by evaluation's rule (`convert.checkpoint_tokenizer`: a folder's
  tokenizer files, a workdir's recorded tokenizer), else 'clip'; the line says when 'clip' is assumed
  for a folder that states no tokenizer. The trainer's input and its zero-shot hook both tokenize
  with it, and `clip_jax.train` records it as data.tokenizer. ValueError: an open_clip folder names a
  tokenizer whose files it lacks."""
  from clip_jax.convert import checkpoint_tokenizer
  init = cfg.get("init") or {}
  spec, note = checkpoint_tokenizer(init.get("checkpoint") or "", cfg.data.get("tokenizer") or "",
                                    option="--config.data.tokenizer=DIR")
  return spec, note and f"init.checkpoint {note}"


def loaded_summary(path: str, loaded: Mapping[str, Any], target: Mapping[str, Any]) -> str:
  """One line: how many of the model's variables came from `path`, and which top-level groups
  (image tower, text tower, ...) start fresh instead (init.dont_load)."""
  got, want = (traverse_util.flatten_dict(dict(tree)) for tree in (loaded, target))
  fresh = sorted({"/".join(key[:2]) for key in want if key not in got})
  return (f"init.checkpoint {path}: {len(got)} of {len(want)} variables loaded"
          + (f"; fresh: {', '.join(fresh)}." if fresh else "."))


def merge(fresh: Mapping[str, Any], loaded: Mapping[str, Any]) -> dict[str, Any]:
  """`fresh` with every leaf that `loaded` holds replaced by the loaded one."""
  flat = traverse_util.flatten_dict(dict(fresh))
  flat.update(traverse_util.flatten_dict(dict(loaded)))
  return traverse_util.unflatten_dict(flat)
