"""Stable Diffusion text-to-image in JAX: a diffusers pipeline folder in, images out.

  pipe = load_pipeline("path/to/stable-diffusion-v1-5")        # model_index.json + components
  images = generate(pipe, pipe.params, ["a photo of a dog"], num_steps=30, rng=jax.random.key(0))
  save_pipeline(pipe, "out/", params=finetuned_params)         # diffusers.from_pretrained reads it

`generate` computes what diffusers' `StableDiffusionPipeline.__call__` computes, step for step:
prompt and negative-prompt embeddings, classifier-free guidance on a doubled batch (only when
guidance_scale > 1, as diffusers), the sampler loop (`schedulers.run_sampler`, a `lax.scan`), VAE
decode of latents / scaling_factor, and (x / 2 + 0.5) clipped to [0, 1]. Given the same initial
latents, a deterministic sampler gives diffusers' images to float32 rounding (tested).

Latents are NHWC here ([B, H/8, W/8, 4]); diffusers' are NCHW. Params are passed separately from
the pipeline object so that a trainer can sample with the params it is training.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clip_jax.models.text import TextTransformer
from clip_jax import sharding
from clip_jax.cli import MissingPathError
from clip_jax.tokenizer import ClipTokenizer, TokenizerError, get_tokenizer
from clip_jax.weights import DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS, CheckpointError, has_weights, weight_variants
from dreambooth_jax.models import convert
from dreambooth_jax.sampling import schedulers
from dreambooth_jax.models import text_encoder as text_encoder_lib
from dreambooth_jax.models.unet import UNet2DConditionModel
from dreambooth_jax.models.vae import AutoencoderKL

Dtype = Any

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# What model_index.json names for each component, for diffusers' loader.
_LIBRARY_CLASSES = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
                    "text_encoder": ("transformers", "CLIPTextModel"),
                    "tokenizer": ("transformers", "CLIPTokenizer")}
_DIFFUSERS_VERSION = "0.42.1"  # the version whose loader the saved folders are tested with


@dataclasses.dataclass
class StableDiffusion:
  """A loaded pipeline: the three Flax modules, their params and what sampling needs besides."""
  unet: UNet2DConditionModel
  vae: AutoencoderKL
  text_encoder: TextTransformer
  params: dict[str, Any]  # {'unet': ..., 'vae': ..., 'text_encoder': ...}
  tokenizer: ClipTokenizer
  scheduler_config: dict[str, Any]  # diffusers' scheduler_config.json, any scheduler class
  vae_scaling_factor: float
  text_encoder_config: dict[str, Any] = dataclasses.field(default_factory=dict)  # CLIPTextModel's
  text_encoder_layers: int | None = None  # condition on the first N layers (None: all)

  @property
  def vae_scale_factor(self) -> int:
    """Pixels per latent along each side (8 for Stable Diffusion)."""
    return self.vae.config.downscale_factor

  @property
  def latent_channels(self) -> int:
    return self.unet.config.in_channels

  @property
  def default_size(self) -> int:
    """Image side the UNet was trained at: 512 for SD 1.x, 768 for SD 2.x (diffusers' default)."""
    return self.unet.config.sample_size * self.vae_scale_factor

  @property
  def context_length(self) -> int:
    return self.tokenizer.context_length


# ------------------------------------------------------------------------------------ load
def _read_json(path: str, what: str) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: {what} is not valid JSON ({e}).") from e


def _token_content(token) -> str | None:
  """Special tokens are saved as strings or as {'content': ...} objects."""
  return token.get("content") if isinstance(token, dict) else token


def load_tokenizer(tokenizer_dir: str, max_length: int) -> ClipTokenizer:
  """A Hugging Face CLIPTokenizer folder as a ClipTokenizer padding with the same token.

  SD 1.x's tokenizer pads with <|endoftext|>, SD 2.x's with '!' (id 0); the UNet sees every
  position, so the pad token changes the images and must be the folder's.
  """
  tokenizer_config, special = {}, {}
  for name, target in (("tokenizer_config.json", tokenizer_config), ("special_tokens_map.json", special)):
    path = os.path.join(tokenizer_dir, name)
    if os.path.isfile(path):
      target.update(_read_json(path, name))
  length = min(int(tokenizer_config.get("model_max_length", max_length)), max_length)
  try:
    tokenizer = get_tokenizer(tokenizer_dir, context_length=length)
  except TokenizerError as e:
    raise CheckpointError(f"{tokenizer_dir}: cannot read the tokenizer: {e}") from e
  if not isinstance(tokenizer, ClipTokenizer):
    raise CheckpointError(f"{tokenizer_dir}: expected a CLIP BPE tokenizer (vocab.json + merges.txt "
                          "or tokenizer.json).")
  pad = _token_content(tokenizer_config.get("pad_token") or special.get("pad_token"))
  if pad is None:
    tokenizer.pad_token_id = tokenizer.eot_token_id
  elif pad in tokenizer.encoder:
    tokenizer.pad_token_id = tokenizer.encoder[pad]
  else:
    raise CheckpointError(f"{tokenizer_dir}: the pad token {pad!r} is not in the vocabulary.")
  return tokenizer


def _component_dir(directory: str, index: dict[str, Any], name: str) -> str:
  path = os.path.join(directory, name)
  entry = index.get(name)
  if entry is None or (isinstance(entry, list) and entry[-1] is None) or not os.path.isdir(path):
    raise CheckpointError(f"{directory}: the '{name}' component is missing (model_index.json entry "
                          f"and {name}/ folder); a Stable Diffusion pipeline needs {', '.join(COMPONENTS)}.")
  return path


_WEIGHT_NAMES = {"unet": DIFFUSERS_WEIGHTS, "vae": DIFFUSERS_WEIGHTS, "text_encoder": TRANSFORMERS_WEIGHTS}


def _component_variants(dirs: dict[str, str], variant: str | None) -> dict[str, str | None]:
  """The variant each weighted component is read with: `variant` where its files exist, else the
  plain files (diffusers' rule); CheckpointError when no component has `variant`."""
  if variant is None:
    return {name: None for name in _WEIGHT_NAMES}
  chosen = {name: variant if has_weights(dirs[name], names, variant) else None
            for name, names in _WEIGHT_NAMES.items()}
  if not any(chosen.values()):
    found = sorted({v for name, names in _WEIGHT_NAMES.items() for v in weight_variants(dirs[name], names)})
    raise CheckpointError(f"{os.path.dirname(dirs['unet'])}: no component has variant={variant!r} weights "
                          f"(variants here: {', '.join(found) or 'none'}); pass variant=None for the plain files.")
  plain = [name for name, v in chosen.items() if v is None]
  if plain:
    logging.warning("variant=%r: %s %s no such files; reading the plain weights there (as diffusers does).",
                    variant, ", ".join(plain), "has" if len(plain) == 1 else "have")
  return chosen


SINGLE_FILE_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def check_pipeline_path(directory: str) -> None:
  """Raises clip_jax.cli.UserError unless `directory` is a folder, saying what to do with the two
  things users pass instead: a single-file checkpoint (civitai's .safetensors / .ckpt), which is
  not read here, and a Hugging Face hub id ('owner/name'), which is not downloaded here
  (MissingPathError, a UserError, for any other missing path)."""
  from clip_jax.cli import UserError
  if os.path.isdir(directory):
    return
  if os.path.isfile(directory):
    kind = ("a single-file checkpoint" if directory.lower().endswith(SINGLE_FILE_EXTENSIONS) else "a file")
    raise UserError(f"{directory} is {kind}; only diffusers pipeline folders are read here. Make one once with "
                    f"diffusers: StableDiffusionPipeline.from_single_file({directory!r}).save_pretrained(DIR), then "
                    "pass DIR.")
  parts = directory.split("/")
  if len(parts) == 2 and all(parts) and not directory.startswith((".", "~")):
    raise MissingPathError(f"{directory}: no such directory; if it is a Hugging Face hub id, nothing is downloaded "
                           f"here: download the folder first (huggingface-cli download {directory} --local-dir DIR, "
                           "or diffusers' StableDiffusionPipeline.from_pretrained(...).save_pretrained(DIR)) and "
                           "pass DIR.")
  raise MissingPathError(f"{directory}: no such directory (expected a diffusers Stable Diffusion pipeline folder).")


def vae_scale_factor_of(directory: str) -> int | None:
  """Pixels per latent along each side (8 for Stable Diffusion) from the folder's vae/config.json,
  without loading weights; None when it cannot be read (`load_pipeline` then says why)."""
  try:
    with open(os.path.join(directory, "vae", "config.json")) as f:
      return 2 ** (len(json.load(f)["block_out_channels"]) - 1)
  except (OSError, ValueError, KeyError, TypeError):
    return None


def load_pipeline(directory: str, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                  text_encoder_layers: int | None = None, variant: str | None = None) -> StableDiffusion:
  """Reads a diffusers Stable Diffusion folder (model_index.json, unet/, vae/, text_encoder/,
  tokenizer/, scheduler/).

  dtype: compute dtype of the UNet and text encoder (the VAE stays float32 when its config says
  force_upcast, as diffusers does); param_dtype: storage dtype of all params. text_encoder_layers:
  condition on that many text layers (e.g. 23 for a full 24-layer OpenCLIP tower). variant:
  'fp16' reads the UNet, VAE and text encoder's fp16 files (single or sharded, safetensors or
  .bin); as in diffusers, a component without that variant reads its plain files (with a
  warning), and a folder where no component has it is refused.
  """
  check_pipeline_path(directory)
  index_path = os.path.join(directory, "model_index.json")
  if not os.path.isfile(index_path):
    raise CheckpointError(f"{directory}: no model_index.json; expected a diffusers pipeline folder "
                          "(as StableDiffusionPipeline.save_pretrained writes).")
  index = _read_json(index_path, "model_index.json")
  if index.get("text_encoder_2") not in (None, [None, None]):
    raise CheckpointError(f"{directory}: has a second text encoder (Stable Diffusion XL); only "
                          "SD 1.x / 2.x pipelines are supported.")
  dirs = {name: _component_dir(directory, index, name) for name in COMPONENTS}
  variants = _component_variants(dirs, variant)

  unet_config, unet_params = convert.load_component(directory, "unet", variant=variants["unet"])
  vae_config, vae_params = convert.load_component(directory, "vae", variant=variants["vae"])
  text_encoder, text_params, text_config = text_encoder_lib.load_text_encoder(
      dirs["text_encoder"], dtype=dtype, param_dtype=param_dtype, variant=variants["text_encoder"])
  text_encoder_lib.check_num_layers(text_encoder, text_encoder_layers)
  if text_encoder.width != unet_config.cross_attention_dim:
    raise CheckpointError(f"{directory}: the text encoder is {text_encoder.width} wide but the UNet "
                          f"attends to {unet_config.cross_attention_dim}-wide text; the components "
                          "do not belong together.")
  tokenizer = load_tokenizer(dirs["tokenizer"], text_encoder.context_length)

  scheduler_path = os.path.join(dirs["scheduler"], "scheduler_config.json")
  if not os.path.isfile(scheduler_path):
    raise CheckpointError(f"{dirs['scheduler']}: no scheduler_config.json.")
  scheduler_config = _read_json(scheduler_path, "scheduler_config.json")
  try:
    schedulers.NoiseSchedule.from_config(scheduler_config)  # refuse what sampling cannot honour now
  except ValueError as e:
    raise CheckpointError(f"{scheduler_path}: {e}") from e

  cast = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, param_dtype), tree)  # noqa: E731
  vae_dtype = jnp.float32 if vae_config.force_upcast else dtype
  return StableDiffusion(
      unet=UNet2DConditionModel(unet_config, dtype=dtype, param_dtype=param_dtype),
      vae=AutoencoderKL(vae_config, dtype=vae_dtype, param_dtype=param_dtype),
      text_encoder=text_encoder,
      params={"unet": cast(unet_params), "vae": cast(vae_params), "text_encoder": text_params},
      tokenizer=tokenizer, scheduler_config=scheduler_config,
      vae_scaling_factor=float(vae_config.scaling_factor), text_encoder_config=text_config,
      text_encoder_layers=text_encoder_layers)


# ------------------------------------------------------------------------------------ save
# Components of a diffusers SD folder that sampling here never reads, carried from the base folder
# into a fine-tuned copy as they are (`save_pipeline(base_dir=...)`), as diffusers' DreamBooth export keeps them.
CARRIED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


def save_pipeline(pipeline: StableDiffusion, directory: str, params: dict[str, Any] | None = None,
                  dtype=np.float32, base_dir: str | None = None) -> str:
  """Writes `pipeline` (with `params`, default its own) as a diffusers folder that
  `diffusers.StableDiffusionPipeline.from_pretrained(directory)` loads. dtype: storage dtype of
  the UNet/VAE weights, e.g. np.float16 for half-size files (the text encoder stays float32).

  base_dir: the folder `pipeline` was loaded from; its CARRIED_COMPONENTS (the safety checker and
  its feature extractor) are copied over unchanged with their model_index.json entries and
  requires_safety_checker, so that diffusers loads (or warns about) them as it does for the base.
  A component the base's index names but whose folder is missing is left out with a warning.
  Without base_dir they are written as absent ([null, null]).

  With text_encoder_layers set, only those text layers are written: diffusers then computes the
  same embeddings (that is how SD 2.x's 23-layer text encoder was made).
  """
  params = pipeline.params if params is None else params
  os.makedirs(directory, exist_ok=True)
  convert.save_component(directory, "unet", pipeline.unet.config, params["unet"], dtype)
  convert.save_component(directory, "vae", pipeline.vae.config, params["vae"], dtype)

  text_encoder = pipeline.text_encoder
  if pipeline.text_encoder_layers is not None:
    text_encoder = text_encoder.clone(layers=pipeline.text_encoder_layers)
  text_params = jax.tree.map(lambda a: np.asarray(jax.device_get(a), np.float32), params["text_encoder"])
  text_encoder_lib.save_text_encoder(os.path.join(directory, "text_encoder"), text_encoder, text_params,
                                     pipeline.text_encoder_config)

  tokenizer_dir = os.path.join(directory, "tokenizer")
  tokenizer = pipeline.tokenizer
  tokenizer.save_hf(tokenizer_dir)
  if tokenizer.pad_token_id != tokenizer.eot_token_id:  # save_hf names <|endoftext|> the pad token
    pad = tokenizer.decoder[tokenizer.pad_token_id]
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
      path = os.path.join(tokenizer_dir, name)
      content = _read_json(path, name)
      content["pad_token"] = pad
      with open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2, ensure_ascii=False)

  scheduler_config = dict(pipeline.scheduler_config)
  scheduler_config.setdefault("_class_name", "DDIMScheduler")
  os.makedirs(os.path.join(directory, "scheduler"), exist_ok=True)
  with open(os.path.join(directory, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump(scheduler_config, f, indent=2, sort_keys=True)

  index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": _DIFFUSERS_VERSION,
           **{name: list(cls) for name, cls in _LIBRARY_CLASSES.items()},
           "scheduler": ["diffusers", scheduler_config["_class_name"]],
           "safety_checker": [None, None], "feature_extractor": [None, None],
           "image_encoder": [None, None], "requires_safety_checker": False}
  if base_dir is not None:
    index.update(_carry_components(base_dir, directory))
  with open(os.path.join(directory, "model_index.json"), "w") as f:
    json.dump(index, f, indent=2, sort_keys=True)
  return directory


def _carry_components(base_dir: str, directory: str) -> dict[str, Any]:
  """Copies base_dir's CARRIED_COMPONENTS folders into `directory`; returns their model_index.json
  entries (and requires_safety_checker) for the copy's index."""
  import shutil
  base_index = _read_json(os.path.join(base_dir, "model_index.json"), "model_index.json")
  entries: dict[str, Any] = {}
  for name in CARRIED_COMPONENTS:
    entry = base_index.get(name)
    if not (isinstance(entry, list) and entry and entry[-1] is not None):
      continue
    source = os.path.join(base_dir, name)
    if not os.path.isdir(source):
      logging.warning("%s: model_index.json names a %s (%s) but there is no %s/ folder; the copy in %s has none.",
                      base_dir, name, entry[-1], name, directory)
      continue
    shutil.copytree(source, os.path.join(directory, name), dirs_exist_ok=True)  # links followed: the files
    entries[name] = entry
  # diffusers' default when the index does not say: a pipeline that has a safety checker requires it
  entries["requires_safety_checker"] = base_index.get("requires_safety_checker", "safety_checker" in entries)
  return entries


# ------------------------------------------------------------------------------------ placement
def _batch_sharding(mesh: Mesh, batch: int) -> NamedSharding:
  sharding.check_batch_size(batch, mesh, "a batch")
  return sharding.batch_sharding(mesh)


def _place(params, arrays: Sequence[jax.Array], mesh: Mesh | None):
  """Without a mesh, as they are; with one, params replicated (unless already on that mesh) and
  the arrays split along their batch axis."""
  if mesh is None:
    return params, arrays
  mesh = sharding.auto_mesh(mesh)  # the UNet and VAE are written for Auto axes (jax.make_mesh's are Explicit)
  replicated = NamedSharding(mesh, P())

  def place_param(leaf):
    on_mesh = isinstance(leaf, jax.Array) and isinstance(leaf.sharding, NamedSharding) \
        and leaf.sharding.mesh == mesh
    return leaf if on_mesh else jax.device_put(leaf, replicated)

  params = jax.tree.map(place_param, params)
  return params, [jax.device_put(a, _batch_sharding(mesh, a.shape[0])) for a in arrays]


# ------------------------------------------------------------------------------------ prompts
def _as_prompts(prompts, what: str) -> list[str]:
  if isinstance(prompts, str):
    return [prompts]
  prompts = list(prompts)
  if not prompts or not all(isinstance(p, str) for p in prompts):
    raise ValueError(f"{what} must be a string or a non-empty list of strings.")
  return prompts


def tokenize(pipeline: StableDiffusion, prompts: str | Sequence[str]) -> np.ndarray:
  """int32 [B, context_length], padded and truncated as diffusers' pipeline does."""
  return pipeline.tokenizer(_as_prompts(prompts, "prompts"), context_length=pipeline.context_length)


def encode_prompt(pipeline: StableDiffusion, params: dict[str, Any], prompts: str | Sequence[str], *,
                  num_layers: int | None = None, mesh: Mesh | None = None) -> jax.Array:
  """Text embeddings [B, 77, D] float32, what diffusers' `encode_prompt` gives the UNet.

  num_layers: text layers to use (default: the pipeline's text_encoder_layers, else all).
  """
  num_layers = pipeline.text_encoder_layers if num_layers is None else num_layers
  text_params, (tokens,) = _place(params["text_encoder"], [tokenize(pipeline, prompts)], mesh)
  return text_encoder_lib.encode_tokens(pipeline.text_encoder, text_params, tokens, num_layers)


# ------------------------------------------------------------------------------------ sampling
@functools.partial(jax.jit, static_argnames=("unet", "vae", "text_encoder", "num_layers", "use_cfg",
                                             "scaling_factor", "output_type"))
def _generate(params, cond_tokens, uncond_tokens, latents_init, rng, guidance_scale, plan, *,
              unet, vae, text_encoder, num_layers, use_cfg, scaling_factor, output_type):
  def embed(tokens):
    states = text_encoder.apply({"params": params["text_encoder"]}, tokens, num_layers,
                                method="hidden_states")
    return states.astype(unet.dtype)

  def model_fn(x, t, context):
    return unet.apply({"params": params["unet"]}, x, t, context)

  cond = embed(cond_tokens)  # [B, T, D]
  if use_cfg:
    denoise = schedulers.guided_denoise_fn(model_fn, cond, embed(uncond_tokens), guidance_scale)
  else:
    denoise = schedulers.guided_denoise_fn(model_fn, cond, cond, 1)
  latents = schedulers.run_sampler(plan, denoise, latents_init, rng)
  images = vae.apply({"params": params["vae"]}, latents / scaling_factor, method="decode")
  images = jnp.clip(images / 2 + 0.5, 0.0, 1.0)  # [B, H, W, 3]
  if output_type == "uint8":
    return jnp.round(images * 255).astype(jnp.uint8)
  return images


def generate(pipeline: StableDiffusion, params: dict[str, Any], prompts: str | Sequence[str],
             negative_prompts: str | Sequence[str] | None = None, *, num_steps: int = 50,
             guidance_scale: float = 7.5, rng: jax.Array | int | None = None, sampler: str = "dpm++2m",
             height: int | None = None, width: int | None = None, num_images_per_prompt: int = 1,
             latents: jax.Array | np.ndarray | None = None, eta: float = 0.0,
             mesh: Mesh | None = None, output_type: str = "uint8") -> np.ndarray:
  """Images for `prompts`: uint8 [B, H, W, 3] (output_type='float': float32 in [0, 1]).

  negative_prompts: None (empty text, as diffusers), one string for all, or one per prompt.
  guidance_scale > 1 turns on classifier-free guidance. sampler: a name in `schedulers.SAMPLERS`
  ('dpm++2m', 'ddim', 'euler_a', 'ddpm'; the scheduler config's betas, prediction type and spacing
  apply to all); eta: DDIM's noise scale. rng: a jax PRNG key or an int seed (None: seed 0); it draws the
  initial latents and, for stochastic samplers, the per-step noise. latents: the initial
  unit-variance latents [B, H/f, W/f, C] instead (NHWC; f the VAE's downscale `pipeline.vae_scale_factor`,
  8 in SD; C `pipeline.latent_channels`). height/width default to the UNet's
  training size. mesh: splits the batch over the mesh's data axes (params replicated). One
  compile per (batch, size, sampler, steps, guidance on/off); the loop runs on the device.
  """
  base_prompts = _as_prompts(prompts, "prompts")
  negatives = [""] if negative_prompts is None else _as_prompts(negative_prompts, "negative_prompts")
  if len(negatives) == 1:
    negatives = negatives * len(base_prompts)
  if len(negatives) != len(base_prompts):
    raise ValueError(f"got {len(negatives)} negative prompts for {len(base_prompts)} prompts; give "
                     "one for all, or one per prompt.")
  repeat = lambda texts: [t for t in texts for _ in range(num_images_per_prompt)]  # noqa: E731
  prompts, negatives = repeat(base_prompts), repeat(negatives)
  batch = len(prompts)
  if output_type not in ("uint8", "float"):
    raise ValueError(f"output_type={output_type!r}: choose 'uint8' or 'float'.")
  if num_steps < 1:
    raise ValueError(f"num_steps={num_steps}: need at least one sampling step.")

  kind = schedulers.get_sampler(sampler).name
  schedule = schedulers.NoiseSchedule.from_config(pipeline.scheduler_config)
  plan = schedulers.make_sampler_plan(kind, schedule, num_steps, eta)
  factor = pipeline.vae_scale_factor
  height, width = height or pipeline.default_size, width or pipeline.default_size
  if height % factor or width % factor:
    raise ValueError(f"height and width must be multiples of {factor} (the VAE's downscale), got "
                     f"{height}x{width}.")
  shape = (batch, height // factor, width // factor, pipeline.latent_channels)

  rng = jax.random.key(0 if rng is None else rng) if rng is None or isinstance(rng, (int, np.integer)) else rng
  latent_rng, noise_rng = jax.random.split(rng)
  if latents is None:
    latents = jax.random.normal(latent_rng, shape, jnp.float32)
  elif tuple(latents.shape) != shape:
    raise ValueError(f"latents have shape {tuple(latents.shape)}; expected {shape} "
                     f"([batch, height/{factor}, width/{factor}, channels], NHWC).")
  latents = jnp.asarray(latents, jnp.float32)

  params, (cond_tokens, uncond_tokens, latents) = _place(
      params, [tokenize(pipeline, prompts), tokenize(pipeline, negatives), latents], mesh)
  num_layers = pipeline.text_encoder_layers
  text_encoder_lib.check_num_layers(pipeline.text_encoder, num_layers)
  images = _generate(params, cond_tokens, uncond_tokens, latents, noise_rng,
                     jnp.float32(guidance_scale), plan, unet=pipeline.unet, vae=pipeline.vae,
                     text_encoder=pipeline.text_encoder, num_layers=num_layers,
                     use_cfg=guidance_scale > 1, scaling_factor=pipeline.vae_scaling_factor,
                     output_type=output_type)
  return sharding.to_host(images)  # with several processes: gathered (every process calls generate)
