"""LoRA adapters written by dreambooth_jax load in diffusers: base + `load_lora_weights(adapter)` equals
the exported full folder (UNet and text encoder), for a UNet-only adapter and for one with the text
encoder, directly from `lora.py` and through a DreamBooth LoRA run with the text encoder trained.

The reference is diffusers' `StableDiffusionPipeline.load_lora_weights` (PEFT underneath) on a tiny
random pipeline; outputs agree to float32 rounding of the merged vs. unmerged forms (tolerances below).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")  # diffusers' LoRA loader runs on PEFT

from clip_jax.weights import save_safetensors  # noqa: E402
from dreambooth_jax.sampling import pipeline as sd  # noqa: E402
from dreambooth_jax.training import lora as lora_lib  # noqa: E402
from test_dreambooth import instance_dir, tiny_config  # noqa: E402,F401 (a fixture and the config helper)

torch.set_num_threads(1)
ADAPTER = "pytorch_lora_weights.safetensors"
RTOL = 1e-5  # max |a - b| / max |b|: merged kernel vs. base + B A in float32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(our pipeline, its folder): a tiny random diffusers pipeline (torch init is fast; ours compiles)."""
  import transformers
  from clip_jax.tokenizer import ClipTokenizer
  from dreambooth_jax.embedded.tiny import SD_SCHEDULER, tiny_configs
  unet_config, vae_config, text_config = tiny_configs()
  tokenizer_dir = str(tmp_path_factory.mktemp("tokenizer"))
  ClipTokenizer.from_bpe_file().save_hf(tokenizer_dir)
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(**{k: v for k, v in unet_config.to_diffusers().items()
                                           if not k.startswith("_")})
  with torch.no_grad():  # random init leaves zeros (biases, output convs): perturb so all matter
    for p in unet.parameters():
      p.add_(0.05 * torch.randn_like(p))
  reference = diffusers.StableDiffusionPipeline(
      unet=unet, vae=diffusers.AutoencoderKL(**{k: v for k, v in vae_config.to_diffusers().items()
                                                 if not k.startswith("_")}),
      text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_config)),
      tokenizer=transformers.CLIPTokenizer.from_pretrained(tokenizer_dir),
      scheduler=diffusers.DDIMScheduler.from_config(SD_SCHEDULER),
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  directory = str(tmp_path_factory.mktemp("tiny_sd"))
  reference.save_pretrained(directory)
  return sd.load_pipeline(directory), directory


def _random_lora(params, targets, seed, rank=2):
  """A LoRA with both factors random (a fresh one has up = 0 and would change nothing)."""
  lora = lora_lib.init_lora(jax.random.key(seed), params, rank, targets)
  rng = np.random.default_rng(seed)
  return {k: {"down": np.asarray(v["down"]), "up": rng.normal(0, 0.2, v["up"].shape).astype(np.float32)}
          for k, v in lora.items()}


def _outputs(pipe):
  """(text features [1, T, D], UNet output [1, C, H, W]) of a diffusers pipeline on fixed inputs."""
  tokens = pipe.tokenizer(["a photo of a sks square"], padding="max_length",
                          max_length=pipe.text_encoder.config.max_position_embeddings, truncation=True, return_tensors="pt")
  rng = np.random.default_rng(0)
  latents = torch.from_numpy(rng.standard_normal((1, 4, 8, 8)).astype(np.float32))
  with torch.no_grad():
    text = pipe.text_encoder(tokens.input_ids)[0]
    unet = pipe.unet(latents, torch.tensor([500]), encoder_hidden_states=text).sample
  return text.numpy(), unet.numpy()


def _rel(a, b):
  return float(np.abs(a - b).max() / np.abs(b).max())


def _load(directory, adapter_dir=None):
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(directory, safety_checker=None)
  if adapter_dir is not None:
    pipe.load_lora_weights(adapter_dir, weight_name=ADAPTER)
  return pipe


# With the text encoder's adapters too is slow-only (8 s); the UNet's alone stays fast.
@pytest.mark.parametrize("with_text_encoder", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["unet_only", "unet_and_text_encoder"])
def test_base_plus_adapter_equals_merged_folder_in_diffusers(tiny, tmp_path, with_text_encoder):
  pipe, base_dir = tiny
  alpha = 3.0  # != rank: the scale alpha / rank must be folded into B
  adapters = {"unet": _random_lora(pipe.params["unet"], lora_lib.DEFAULT_TARGETS, 1)}
  if with_text_encoder:
    adapters["text_encoder"] = _random_lora(pipe.params["text_encoder"], lora_lib.TEXT_ENCODER_TARGETS, 2)
  merged = dict(pipe.params)
  for component, lora in adapters.items():
    merged[component] = jax.device_get(lora_lib.merge(pipe.params[component], lora, alpha))
  sd.save_pipeline(pipe, str(tmp_path / "full"), params=merged)
  state = lora_lib.adapter_state_dict(adapters, alpha)
  assert len(state) == 2 * sum(len(lora) for lora in adapters.values())
  if with_text_encoder:
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in state
  save_safetensors(state, str(tmp_path / "adapter" / ADAPTER))

  full_text, full_unet = _outputs(_load(str(tmp_path / "full")))
  base_text, base_unet = _outputs(_load(base_dir))
  text, unet = _outputs(_load(base_dir, str(tmp_path / "adapter")))
  # The adapter matters (so the comparison below can fail) ...
  assert _rel(base_unet, full_unet) > 1e-2
  assert (_rel(base_text, full_text) > 1e-2) == with_text_encoder
  # ... and base + adapter is the merged model.
  assert _rel(text, full_text) < RTOL
  assert _rel(unet, full_unet) < RTOL


@pytest.mark.slow  # ~12 s: diffusers with PEFT's layers, and our UNet traced op by op
def test_adapters_beside_their_kernels_equal_peft_unmerged_in_diffusers(tiny, tmp_path):
  """What the train step runs (`lora.attach`: x W + (x down) up in `layers.Dense`) against PEFT's
  unmerged LoRA layers in diffusers, on identical weights, both components."""
  pipe, base_dir = tiny
  alpha = 3.0
  adapters = {"unet": _random_lora(pipe.params["unet"], lora_lib.DEFAULT_TARGETS, 1),
              "text_encoder": _random_lora(pipe.params["text_encoder"], lora_lib.TEXT_ENCODER_TARGETS, 2)}
  save_safetensors(lora_lib.adapter_state_dict(adapters, alpha), str(tmp_path / ADAPTER))
  text_ref, unet_ref = _outputs(_load(base_dir, str(tmp_path)))
  base_text, base_unet = _outputs(_load(base_dir))
  params = {name: lora_lib.attach(pipe.params[name], lora, alpha) for name, lora in adapters.items()}
  text = np.asarray(sd.encode_prompt(pipe, params, ["a photo of a sks square"]))
  latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)  # as _outputs
  unet = jax.jit(pipe.unet.apply)({"params": params["unet"]}, jnp.asarray(latents.transpose(0, 2, 3, 1)),
                                  jnp.asarray([500]), jnp.asarray(text_ref))  # jitted: one compile, not one per op
  unet = np.asarray(unet).transpose(0, 3, 1, 2)
  assert _rel(base_text, text_ref) > 1e-2 and _rel(base_unet, unet_ref) > 1e-2  # the adapters matter
  assert _rel(text, text_ref) < RTOL
  assert _rel(unet, unet_ref) < RTOL


@pytest.mark.slow  # two compiled gradients of the tiny UNet
def test_adapter_gradients_beside_the_kernel_equal_the_merged_kernels_in_float32(tiny):
  """The step differentiates `attach` (thin products) where it used to differentiate `merge` (a full
  weight gradient projected on the factors): the same gradients up to float32 rounding."""
  pipe, _ = tiny
  lora = _random_lora(pipe.params["unet"], lora_lib.DEFAULT_TARGETS, 1)
  rng = np.random.default_rng(3)
  latents, context = rng.standard_normal((1, 8, 8, 4), np.float32), rng.standard_normal((1, 7, 32), np.float32)

  def loss(adapter, combine):
    out = pipe.unet.apply({"params": combine(pipe.params["unet"], adapter, 3.0)}, latents, jnp.asarray([500]), context)
    return jnp.mean(jnp.square(out))

  beside = jax.jit(jax.grad(loss), static_argnums=1)(lora, lora_lib.attach)
  merged = jax.jit(jax.grad(loss), static_argnums=1)(lora, lora_lib.merge)
  for key in lora:
    for factor in ("down", "up"):
      assert _rel(np.asarray(beside[key][factor]), np.asarray(merged[key][factor])) < 1e-5, (key, factor)
  with pytest.raises(ValueError, match="no such kernel"):
    lora_lib.attach(pipe.params["unet"], {"conv_in/bias": lora[next(iter(lora))]}, 3.0)


@pytest.mark.slow   # 9-16 s on an AVX2-only CPU: the fast subset stays under 5 minutes there
def test_every_2d_kernel_of_the_unet_and_text_encoder_is_a_dense_layer(tiny):
  """`lora.attach` places an adapter beside its kernel and only `layers.Dense` reads it there: an
  adapter on a kernel that another module uses would be silently ignored. Every 2-D kernel (the
  ones `init_lora` may target) must therefore belong to a Dense."""
  from flax import traverse_util

  from clip_jax import layers
  pipe, _ = tiny
  text_params = pipe.params["text_encoder"]
  tokens = jnp.asarray(sd.tokenize(pipe, ["a square"]))
  _, text_state = pipe.text_encoder.apply({"params": text_params}, tokens, capture_intermediates=_is_dense,
                                          mutable=["intermediates"])
  context = jnp.zeros((1, tokens.shape[1], pipe.unet.config.cross_attention_dim), jnp.float32)
  _, unet_state = pipe.unet.apply({"params": pipe.params["unet"]}, jnp.zeros((1, 8, 8, 4)), jnp.asarray([1]),
                                  context, capture_intermediates=_is_dense, mutable=["intermediates"])
  for params, state in ((text_params, text_state), (pipe.params["unet"], unet_state)):
    dense_modules = {"/".join(path[:-1]) for path in traverse_util.flatten_dict(state["intermediates"])}
    kernels = {key[: -len("/kernel")] for key, value in traverse_util.flatten_dict(params, sep="/").items()
               if key.endswith("/kernel") and value.ndim == 2}
    assert kernels and kernels <= dense_modules, sorted(kernels - dense_modules)[:5]
  assert isinstance(layers.Dense(4), layers.Dense)


def _is_dense(module, method_name):
  from clip_jax import layers
  return isinstance(module, layers.Dense) and method_name == "__call__"


def test_text_encoder_adapter_names_come_from_the_conversion_table(tiny):
  pipe, _ = tiny
  lora = lora_lib.init_lora(jax.random.key(0), pipe.params["text_encoder"], 2, lora_lib.TEXT_ENCODER_TARGETS)
  assert len(lora) == 4 * pipe.text_encoder.layers  # q, k, v, out per layer
  names = sorted(lora_lib.to_diffusers_state_dict(lora, 2.0, prefix="text_encoder"))
  assert names[0] == "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_A.weight"
  mlp = lora_lib.init_lora(jax.random.key(0), pipe.params["text_encoder"], 2, r"c_fc/kernel$")
  assert any(".mlp.fc1.lora_A" in k for k in lora_lib.to_diffusers_state_dict(mlp, 2.0, prefix="text_encoder"))
  with pytest.raises(ValueError, match="only 'unet' and 'text_encoder'"):
    lora_lib.to_diffusers_state_dict(lora, 2.0, prefix="vae")


@pytest.mark.slow
def test_dreambooth_lora_with_text_encoder_adapter_loads_in_diffusers(tiny, instance_dir, tmp_path):
  """Issue 12.7: LoRA mode + train_text_encoder; the adapter alone reproduces the exported folder."""
  from dreambooth_jax import train as db
  _, base_dir = tiny
  cfg = tiny_config(base_dir, instance_dir, "lora", with_prior_preservation=False, identifier="sks",
                    **{"optimizer.learning_rate": 5e-2, "train.train_text_encoder": True})
  out = db.train_and_export(cfg, str(tmp_path / "run"))
  assert set(out["state"]["trainable"]) == {"unet_lora", "text_encoder_lora"}
  export_dir = out["export_dir"]
  assert os.path.isfile(os.path.join(export_dir, ADAPTER))
  full_text, full_unet = _outputs(_load(export_dir))
  base_text, _ = _outputs(_load(base_dir))
  text, unet = _outputs(_load(base_dir, export_dir))
  assert _rel(base_text, full_text) > 1e-3  # the text encoder was trained
  assert _rel(text, full_text) < RTOL
  assert _rel(unet, full_unet) < RTOL
