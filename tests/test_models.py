"""CLIP models against the reference PyTorch implementations on identical random weights.

Tolerances (fp32): embeddings max abs diff <= 1e-4, logits <= 1e-3 (the issue's bar).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import clip_jax
from clip_jax import convert
from clip_jax.models.configs import MODEL_CONFIGS
from clip_jax.weights import CheckpointError

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
torch.set_num_threads(2)

NAMED = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14",
         "ViT-L-14-336", "ViT-H-14"]


def _param_count(model) -> int:
  cfg = model.config
  images = jax.ShapeDtypeStruct((1, cfg.vision.image_size, cfg.vision.image_size, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, cfg.text.context_length), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), images, tokens)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


# The largest five are slow-only (shape inference alone takes seconds each); one of each family stays fast.
_LARGE = ("RN50x16", "RN50x64", "ViT-L-14", "ViT-L-14-336", "ViT-H-14")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _LARGE else n for n in NAMED])
def test_param_counts_equal_open_clip(name):
  with torch.device("meta"):  # Shapes only: no memory, no init time.
    reference = open_clip.model.CLIP(**open_clip.get_model_config(name))
  expected = sum(p.numel() for p in reference.parameters())
  assert _param_count(clip_jax.create_model(name)) == expected


def _jit_apply(module):
  """`module.apply` compiled as one program: eager apply compiles and dispatches every op on its own
  (the tiny ResNet's encode_image: ~14 s of CPU eager, ~5-9 s jitted). The same values to float
  rounding of fusion; the tolerances below are unchanged."""
  return jax.jit(module.apply, static_argnames="method")


def _randomize_open_clip(model, seed=0):
  """Random weights everywhere (incl. zero-initialised ones and BN statistics), so every tensor
  is exercised by the comparison."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in list(model.state_dict().items()):
      if tensor.dtype.is_floating_point:
        if name.endswith("running_var"):
          tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
        elif name.endswith("logit_scale"):
          tensor.fill_(np.log(1 / 0.07))
        else:
          std = 0.02 if tensor.ndim > 1 else 0.1
          tensor.copy_(torch.randn(tensor.shape, generator=gen) * std + (1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")) else 0.0))
  return model.eval()


def _inputs(image_size, batch=2, seed=0, context_length=77):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, 3, image_size, image_size)).astype(np.float32)
  tokens = np.zeros((batch, context_length), np.int64)
  for i in range(batch):
    n = 5 + 7 * i
    tokens[i, 0] = 49406
    tokens[i, 1:n] = rng.integers(1, 49000, n - 1)
    tokens[i, n] = 49407
  return images, tokens


def _compare_with_open_clip(name, **create_kwargs):
  reference = _randomize_open_clip(open_clip.create_model(name, **create_kwargs))
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  model, variables = convert.load_openai_state_dict(state, model_name=name)
  images, tokens = _inputs(model.config.vision.image_size)
  with torch.no_grad():
    ref_image = reference.encode_image(torch.from_numpy(images)).numpy()
    ref_text = reference.encode_text(torch.from_numpy(tokens)).numpy()
    ref_logits = (reference.logit_scale.exp() * torch.nn.functional.normalize(torch.from_numpy(ref_image)) @
                  torch.nn.functional.normalize(torch.from_numpy(ref_text)).T).numpy()
  nhwc = jnp.asarray(images.transpose(0, 2, 3, 1))
  image_emb = _jit_apply(model)(variables, nhwc, method="encode_image")
  text_emb = _jit_apply(model)(variables, jnp.asarray(tokens, jnp.int32), method="encode_text")
  np.testing.assert_allclose(image_emb, ref_image, atol=1e-4, rtol=0)
  np.testing.assert_allclose(text_emb, ref_text, atol=1e-4, rtol=0)
  img_n, txt_n, log_scale, _ = _jit_apply(model)(variables, nhwc, jnp.asarray(tokens, jnp.int32))
  logits = jnp.exp(log_scale) * img_n @ txt_n.T
  np.testing.assert_allclose(logits, ref_logits, atol=1e-3, rtol=0)
  return model, variables


def _tiny_open_clip_cfg(resnet: bool):
  # Head counts are not stored in weights; inference assumes OpenAI's 64-wide heads, so the tiny
  # towers use 2 heads of 64 (and the ResNet's attention pool 16*32/64 = 8).
  vision = ({"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None} if resnet else
            {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8})
  return {"embed_dim": 64, "vision_cfg": vision,
          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2}}


@pytest.mark.parametrize("resnet", [False, True], ids=["vit", "resnet"])
# Exact GELU's towers are slow (4-11 s each); QuickGELU's stay in the fast subset, and the exact GELU
# itself is compared with torch in test_fast_attention.
@pytest.mark.parametrize("act", [pytest.param("gelu", marks=pytest.mark.slow), "quick_gelu"])
def test_tiny_matches_open_clip(resnet, act):
  """Tiny towers, both activations: fast stand-ins for the full-size comparisons below."""
  cfg = _tiny_open_clip_cfg(resnet)
  if act == "quick_gelu":
    cfg["quick_gelu"] = True
  reference = _randomize_open_clip(open_clip.model.CLIP(**cfg))
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  model, variables = convert.load_openai_state_dict(state, act=act)
  assert model.config.vision.is_resnet == resnet
  images, tokens = _inputs(model.config.vision.image_size)
  with torch.no_grad():
    ref_image = reference.encode_image(torch.from_numpy(images)).numpy()
    ref_text = reference.encode_text(torch.from_numpy(tokens)).numpy()
  image_emb = _jit_apply(model)(variables, jnp.asarray(images.transpose(0, 2, 3, 1)), method="encode_image")
  text_emb = _jit_apply(model)(variables, jnp.asarray(tokens, jnp.int32), method="encode_text")
  np.testing.assert_allclose(image_emb, ref_image, atol=1e-4, rtol=0)
  np.testing.assert_allclose(text_emb, ref_text, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["RN50", "ViT-B-32"])
def test_full_size_matches_open_clip(name):
  _compare_with_open_clip(name)


@pytest.mark.parametrize("bias", [False, True], ids=["clip", "siglip_bias"])
def test_get_logits_equal_open_clip_get_logits(bias):
  """`CLIP.get_logits` is open_clip's `get_logits` (exp(logit_scale) * cosine, + logit_bias), not the
  log scale `__call__` returns: code ported from open_clip gets the same probabilities."""
  cfg = {**_tiny_open_clip_cfg(False), "quick_gelu": True}
  if bias:
    cfg["init_logit_bias"] = -10.0
  reference = _randomize_open_clip(open_clip.model.CLIP(**cfg))
  with torch.no_grad():
    reference.logit_scale.fill_(np.log(30.0))  # not log(1/0.07): a scale taken as its log shows up
    if bias:
      reference.logit_bias.fill_(-2.5)
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  model, variables = convert.load_openai_state_dict(state, act="quick_gelu")
  assert (model.config.init_logit_bias is not None) == bias
  images, tokens = _inputs(model.config.vision.image_size, batch=3)
  with torch.no_grad():
    ref_per_image, ref_per_text = (t.numpy() for t in reference.get_logits(
        torch.from_numpy(images), torch.from_numpy(tokens[:2])))
  per_image, per_text = _jit_apply(model)(variables, jnp.asarray(images.transpose(0, 2, 3, 1)),
                                          jnp.asarray(tokens[:2], jnp.int32), method="get_logits")
  assert per_image.shape == (3, 2) and per_text.shape == (2, 3) and per_image.dtype == jnp.float32
  np.testing.assert_allclose(per_image, ref_per_image, atol=2e-3, rtol=0)
  np.testing.assert_allclose(per_text, ref_per_text, atol=2e-3, rtol=0)
  np.testing.assert_allclose(jax.nn.softmax(per_image, axis=-1), torch.from_numpy(ref_per_image).softmax(-1),
                             atol=1e-4)


def _explicit_and_auto_runs(name, method, train, grad=True):
  """A tiny model's loss, gradients and outputs in jit(value_and_grad) (jit(loss) without `grad`), with
  images and tokens split over 8 devices by P('data') and the variables replicated there, on an Auto
  and an Explicit mesh."""
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  model = clip_jax.create_model(name)
  variables = clip_jax.init_variables(model, jax.random.key(0))
  rng = np.random.default_rng(0)
  size, context = model.config.vision.image_size, model.config.text.context_length
  images = rng.normal(size=(16, size, size, 3)).astype(np.float32)
  tokens = rng.integers(1, 49407, size=(16, context)).astype(np.int32)
  tokens[:, 0], tokens[:, 9] = 49406, 49407

  def loss(v, x, t):
    if method == "encode_image":
      out, state = model.apply(v, x, train=train, mutable=["batch_stats"], method=method)
      return jnp.sum(jnp.sin(3 * out)), (out, state)
    first, second = jax.tree.leaves(model.apply(v, x, t, method=method))[:2]
    return jnp.sum(jnp.sin(3 * first)) + jnp.sum(second ** 3), (first, second)

  runs = {}
  for axis_type in (AxisType.Auto, AxisType.Explicit):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    x, t = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (images, tokens))
    v = jax.device_put(variables, NamedSharding(mesh, P()))
    if grad:
      (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(v, x, t)
    else:
      (value, out), grads = jax.jit(loss)(v, x, t), None
    runs[axis_type] = jax.tree.map(np.asarray, (value, out, grads))
    if axis_type == AxisType.Explicit and method != "encode_image":  # the batch stays split
      assert jax.typeof(jax.tree.leaves(out)[0]).sharding.spec[0] == "data"
  return runs[AxisType.Auto], runs[AxisType.Explicit]


# 12-17 s each (compiles): slow. Fast siblings on Explicit meshes: test_sd_pipeline's generate(mesh=) and
# test_losses' default make_mesh.
@pytest.mark.parametrize("method,grad", [pytest.param("get_logits", False, marks=pytest.mark.slow),
                                         pytest.param("get_logits", True, marks=pytest.mark.slow),
                                         pytest.param("__call__", True, marks=pytest.mark.slow)])
def test_explicit_sharding_mesh_gives_the_auto_mesh_values(method, grad):
  """`jax.make_mesh` makes Explicit axes by default (jax 0.10): inputs split over them went to a
  30-line ShardingTypeError in patchify's reshape; the towers now run under Auto axes there."""
  auto, explicit = _explicit_and_auto_runs("ViT-Tiny", method, train=False, grad=grad)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6), auto, explicit)


@pytest.mark.slow  # the ResNet's compile: ~10 s for the two meshes
def test_explicit_sharding_mesh_resnet_training_batch_norm():
  auto, explicit = _explicit_and_auto_runs("RN-Tiny", "encode_image", train=True)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6), auto, explicit)


def test_openai_export_round_trip():
  reference = _randomize_open_clip(open_clip.model.CLIP(**_tiny_open_clip_cfg(False)))
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  model, variables = convert.load_openai_state_dict(state, act="gelu")
  exported = convert.export_openai_state_dict(model, variables)
  for key, value in exported.items():
    np.testing.assert_array_equal(value, state[key], err_msg=key)


def _tiny_hf_model(act="quick_gelu"):
  transformers = pytest.importorskip("transformers")
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_attention_heads=2,
                       num_hidden_layers=2, max_position_embeddings=77, hidden_act=act,
                       bos_token_id=49406, eos_token_id=49407),
      vision_config=dict(hidden_size=64, intermediate_size=256, num_attention_heads=2, num_hidden_layers=2,
                         image_size=32, patch_size=8, hidden_act=act),
      projection_dim=48)
  torch.manual_seed(0)
  return transformers.CLIPModel(config).eval()


def _hf_embeddings(hf_model, images, tokens):
  with torch.no_grad():
    image = hf_model.get_image_features(pixel_values=torch.from_numpy(images))
    text = hf_model.get_text_features(input_ids=torch.from_numpy(tokens))
  # transformers 5 returns model outputs from the feature getters; older ones return tensors.
  image = getattr(image, "pooler_output", image)
  text = getattr(text, "pooler_output", text)
  return image.numpy(), text.numpy()


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hf_clip_import_and_export(tmp_path, act):
  transformers = pytest.importorskip("transformers")
  hf_model = _tiny_hf_model(act)
  hf_model.save_pretrained(tmp_path / "hf")
  module, variables = clip_jax.load_checkpoint(str(tmp_path / "hf"))
  assert module.config.act == act
  images, tokens = _inputs(32)
  ref_image, ref_text = _hf_embeddings(hf_model, images, tokens)
  image_emb = _jit_apply(module)(variables, jnp.asarray(images.transpose(0, 2, 3, 1)), method="encode_image")
  text_emb = _jit_apply(module)(variables, jnp.asarray(tokens, jnp.int32), method="encode_text")
  np.testing.assert_allclose(image_emb, ref_image, atol=1e-4, rtol=0)
  np.testing.assert_allclose(text_emb, ref_text, atol=1e-4, rtol=0)

  # Export and reload in transformers: the same embeddings.
  out = clip_jax.export_hf(module, variables, str(tmp_path / "exported"))
  reloaded = transformers.CLIPModel.from_pretrained(out).eval()
  re_image, re_text = _hf_embeddings(reloaded, images, tokens)
  np.testing.assert_allclose(re_image, image_emb, atol=1e-4, rtol=0)
  np.testing.assert_allclose(re_text, text_emb, atol=1e-4, rtol=0)


@pytest.mark.slow  # 6-10 s: the fast subset stays under 5 min
def test_export_of_model_trained_here_loads_in_transformers(tmp_path):
  transformers = pytest.importorskip("transformers")
  module = clip_jax.create_model("ViT-Tiny")
  variables = clip_jax.init_variables(module, jax.random.key(1))
  out = clip_jax.export_hf(module, variables, str(tmp_path / "hf"))
  reloaded = transformers.CLIPModel.from_pretrained(out).eval()
  images, tokens = _inputs(32, context_length=32)
  re_image, re_text = _hf_embeddings(reloaded, images, tokens)
  np.testing.assert_allclose(re_image, _jit_apply(module)(variables, jnp.asarray(images.transpose(0, 2, 3, 1)),
                                                    method="encode_image"), atol=1e-4, rtol=0)
  np.testing.assert_allclose(re_text, _jit_apply(module)(variables, jnp.asarray(tokens, jnp.int32),
                                                   method="encode_text"), atol=1e-4, rtol=0)


@pytest.mark.slow  # ~13 s at low load: kept out of the fast subset (< 5 min)
def test_named_config_shapes_are_recovered_from_weights():
  """Head widths are invisible in weights; ViT-H-14's 80-wide heads come from the named config."""
  for name in ("ViT-H-14", "RN50x4", "ViT-L-14-336"):
    model = clip_jax.create_model(name)
    cfg = model.config
    fake = traverse_util.unflatten_dict(
        {k: np.zeros(shape, np.float32) for k, shape in convert._expected_shapes(model).items()})
    state = convert.export_openai_state_dict(model, fake)
    inferred = convert.infer_openai_config(convert.split_fused_attention(state), act="gelu")
    assert inferred == cfg, name


# ----------------------------------------------------------------------------- bad checkpoints
def test_missing_path():
  with pytest.raises(FileNotFoundError, match="no such file"):
    clip_jax.load_checkpoint("/nonexistent/model.pt")


def test_not_a_checkpoint(tmp_path):
  path = tmp_path / "notes.pt"
  path.write_text("these are not weights")
  with pytest.raises(CheckpointError, match=r"notes.pt: not a PyTorch checkpoint \(neither torch.save's zip"):
    clip_jax.load_checkpoint(str(path))
  path.write_bytes(b"")
  with pytest.raises(CheckpointError, match=r"notes.pt: is empty \(0 bytes\)"):
    clip_jax.load_checkpoint(str(path))
  (tmp_path / "notes.md").write_text("these are not weights")
  with pytest.raises(CheckpointError, match="not a supported checkpoint"):
    clip_jax.load_checkpoint(str(tmp_path / "notes.md"))


def test_corrupt_safetensors(tmp_path):
  path = tmp_path / "broken.safetensors"
  path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1")
  with pytest.raises(CheckpointError, match="not a valid safetensors"):
    clip_jax.load_checkpoint(str(path))


def test_pickled_objects_are_refused(tmp_path):
  path = tmp_path / "evil.pt"
  torch.save({"state_dict": {"w": torch.zeros(2)}, "hook": os.system}, path)
  with pytest.raises(CheckpointError, match="refused to load: the pickle asks for '(posix|os).system'"):
    clip_jax.load_checkpoint(str(path))


def test_unrelated_state_dict(tmp_path):
  path = tmp_path / "resnet.safetensors"
  from safetensors.torch import save_file
  save_file({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}, str(path))
  with pytest.raises(CheckpointError, match="not an OpenAI/open_clip CLIP state dict"):
    clip_jax.load_checkpoint(str(path))


def test_shape_mismatch_against_named_model(tmp_path):
  reference = open_clip.model.CLIP(**_tiny_open_clip_cfg(False))
  path = tmp_path / "tiny.pt"
  torch.save(reference.state_dict(), path)
  with pytest.raises(CheckpointError, match="missing|shape mismatch"):
    clip_jax.load_checkpoint(str(path), model_name="ViT-B-32")


def test_hf_directory_without_weights(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
  with pytest.raises(CheckpointError, match="no weights named model.safetensors or pytorch_model.bin"):
    clip_jax.load_checkpoint(str(tmp_path))


def test_unknown_model_and_override():
  with pytest.raises(ValueError, match="Unknown model"):
    clip_jax.create_model("ViT-Q-99")
  with pytest.raises(ValueError, match="Unknown CLIP config keys"):
    clip_jax.create_model("ViT-B-32", not_a_field=3)
  assert clip_jax.create_model("ViT-B-32-quickgelu").config.act == "quick_gelu"
  assert set(MODEL_CONFIGS) >= set(NAMED)


@pytest.mark.parametrize("kind", ["torchscript", "open_clip_training_checkpoint", "safetensors"])
def test_checkpoint_file_formats(tmp_path, kind):
  """OpenAI's TorchScript archives, open_clip's training checkpoints ({'state_dict': {'module.…'}})
  and safetensors files all load to the same model."""
  reference = _randomize_open_clip(open_clip.model.CLIP(**_tiny_open_clip_cfg(False)))
  images, tokens = _inputs(32)
  path = tmp_path / "model.bin"
  if kind == "torchscript":
    # OpenAI's archives also hold their sizes as tensors, which its build_model drops.
    for name, value in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 49408)):
      if hasattr(reference, name):
        delattr(reference, name)  # open_clip keeps them as ints
      reference.register_buffer(name, torch.tensor(value))
    traced = torch.jit.trace(reference, (torch.from_numpy(images), torch.from_numpy(tokens)), strict=False,
                             check_trace=False)
    torch.jit.save(traced, str(path))
  elif kind == "open_clip_training_checkpoint":
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()},
                "optimizer": {"state": {}, "param_groups": []}}, path)
  else:
    from safetensors.torch import save_file
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
  module, variables = clip_jax.load_checkpoint(str(path), act="gelu")
  with torch.no_grad():
    ref_image = reference.encode_image(torch.from_numpy(images)).numpy()
  image_emb = _jit_apply(module)(variables, jnp.asarray(images.transpose(0, 2, 3, 1)), method="encode_image")
  np.testing.assert_allclose(image_emb, ref_image, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- text pooling (issue 12.6)
ADDED_TOKEN_PROMPTS = np.zeros((2, 77), np.int64)
ADDED_TOKEN_PROMPTS[0, :5] = [49406, 320, 49409, 1929, 49407]  # 49409: a token added after <|endoftext|>
ADDED_TOKEN_PROMPTS[1, :4] = [49406, 2368, 49407, 49407]        # padded with the end token


def _hf_clip_with_added_tokens(eos_token_id):
  transformers = pytest.importorskip("transformers")
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=49410, hidden_size=64, intermediate_size=256, num_attention_heads=2,
                       num_hidden_layers=2, max_position_embeddings=77, bos_token_id=49406,
                       eos_token_id=eos_token_id),
      vision_config=dict(hidden_size=64, intermediate_size=256, num_attention_heads=2, num_hidden_layers=2,
                         image_size=32, patch_size=8),
      projection_dim=48)
  torch.manual_seed(0)
  return transformers.CLIPModel(config).eval()


def _text_features(module, variables, tokens=ADDED_TOKEN_PROMPTS):
  return np.asarray(_jit_apply(module)(variables, jnp.asarray(tokens, jnp.int32), method="encode_text"))


@pytest.mark.parametrize("eos_token_id", [49407, 2], ids=["eos", "legacy_eos_2"])
def test_hf_text_pooling_follows_eos_token_id(tmp_path, eos_token_id):
  """The issue's example: vocabulary 49,410 with token 49409 in the prompt. transformers pools at
  the first eos_token_id, or at argmax(id) for the legacy eos_token_id == 2; so do we, and the
  rule survives export to transformers."""
  transformers = pytest.importorskip("transformers")
  hf_model = _hf_clip_with_added_tokens(eos_token_id)
  hf_model.save_pretrained(tmp_path / "hf")
  module, variables = clip_jax.load_checkpoint(str(tmp_path / "hf"))
  assert module.config.text.eot_token_id == (None if eos_token_id == 2 else eos_token_id)
  _, ref_text = _hf_embeddings(hf_model, np.zeros((2, 3, 32, 32), np.float32), ADDED_TOKEN_PROMPTS)
  ours = _text_features(module, variables)
  np.testing.assert_allclose(ours, ref_text, atol=1e-4, rtol=0)
  # The other rule differs on the first prompt (the test can fail), not on the second.
  other = module.clone(config=module.config.replace(
      text={"eot_token_id": 49407 if eos_token_id == 2 else None}))
  moved = _text_features(other, variables)
  assert np.linalg.norm(moved[0] - ours[0]) > 0.1 * np.linalg.norm(ours[0])
  np.testing.assert_allclose(moved[1], ours[1], atol=1e-6, rtol=0)

  out = clip_jax.export_hf(module, variables, str(tmp_path / "exported"))
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["text_config"]["eos_token_id"] == eos_token_id
  _, re_text = _hf_embeddings(transformers.CLIPModel.from_pretrained(out).eval(),
                              np.zeros((2, 3, 32, 32), np.float32), ADDED_TOKEN_PROMPTS)
  np.testing.assert_allclose(re_text, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("pool_type", ["argmax", "eos"])
def test_open_clip_text_pooling_rules(pool_type):
  """open_clip pools at argmax(id) by default (OpenAI's rule, what a bare state dict gets) or, with
  pool_type='eos', at the first eos_id: given as a config override here."""
  cfg = _tiny_open_clip_cfg(False)
  cfg["text_cfg"].update(vocab_size=49410, pool_type=pool_type, eos_id=49407)
  reference = _randomize_open_clip(open_clip.model.CLIP(**cfg))
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  overrides = {"text": {"eot_token_id": 49407}} if pool_type == "eos" else {}
  model, variables = convert.load_openai_state_dict(state, act="gelu", **overrides)
  with torch.no_grad():
    ref_text = reference.encode_text(torch.from_numpy(ADDED_TOKEN_PROMPTS)).numpy()
  np.testing.assert_allclose(_text_features(model, variables), ref_text, atol=1e-4, rtol=0)


def test_pooling_rule_is_saved_with_the_config():
  cfg = MODEL_CONFIGS["ViT-Tiny"].replace(text={"eot_token_id": 49407})
  assert clip_jax.models.configs.CLIPConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  assert MODEL_CONFIGS["ViT-B-32"].text.eot_token_id is None  # OpenAI-style: argmax


def test_bare_text_encoder_pools_like_clip_text_model(tmp_path):
  """Stable Diffusion's text encoder (a CLIPTextModel): pooler_output at the eos token too."""
  transformers = pytest.importorskip("transformers")
  config = transformers.CLIPTextConfig(vocab_size=49410, hidden_size=32, intermediate_size=64,
                                       num_attention_heads=4, num_hidden_layers=2, eos_token_id=49407)
  torch.manual_seed(0)
  reference = transformers.CLIPTextModel(config).eval()
  reference.save_pretrained(tmp_path)
  module, variables, _ = convert.load_hf_text_encoder(str(tmp_path))
  with torch.no_grad():
    pooled = reference(input_ids=torch.from_numpy(ADDED_TOKEN_PROMPTS)).pooler_output.numpy()
  ours = _jit_apply(module)(variables, jnp.asarray(ADDED_TOKEN_PROMPTS, jnp.int32))
  np.testing.assert_allclose(ours, pooled, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- assumptions said (issue 19.2)
@pytest.fixture(scope="module")
def vit_tiny_file(tmp_path_factory):
  """A ViT-Tiny (32-wide heads, exact GELU) saved as a bare OpenAI-layout state dict."""
  module = clip_jax.create_model("ViT-Tiny")
  variables = clip_jax.init_variables(module, jax.random.key(3))
  path = str(tmp_path_factory.mktemp("bare") / "vit_tiny.safetensors")
  from clip_jax.weights import save_safetensors
  save_safetensors(convert.export_openai_state_dict(module, variables), path)
  tokens = np.zeros((2, 32), np.int32)
  tokens[:, :4] = [[49406, 320, 1929, 49407], [49406, 2368, 49407, 0]]
  return path, tokens, _text_features(module, variables, tokens)


def _load_warnings(caplog, path, **kwargs):
  caplog.clear()
  with caplog.at_level("WARNING", logger="clip_jax.convert"):
    loaded = clip_jax.load_checkpoint(path, **kwargs)
  return loaded, [r.getMessage() for r in caplog.records if r.name == "clip_jax.convert"]


def test_bare_state_dict_assumptions_are_one_warning_line(vit_tiny_file, caplog):
  path, tokens, expected = vit_tiny_file
  (module, variables), messages = _load_warnings(caplog, path)
  assert len(messages) == 1 and "\n" not in messages[0]
  assert "assumed QuickGELU activation" in messages[0]
  assert "1 image and 1 text attention heads (64 wide, OpenAI's rule)" in messages[0]
  assert "pass --model-name (model_name= in Python: sets activation and heads) or --act (act=)" in messages[0]
  assert module.config.act == "quick_gelu" and module.config.text.heads == 1
  assert not np.allclose(_text_features(module, variables, tokens), expected, atol=1e-3)  # the guess is wrong here

  (module, _), messages = _load_warnings(caplog, path, act="gelu")
  assert len(messages) == 1 and "QuickGELU" not in messages[0] and "attention heads" in messages[0]

  (module, variables), messages = _load_warnings(caplog, path, model_name="ViT-Tiny")
  assert messages == [] and module.config.act == "gelu" and module.config.text.heads == 2
  np.testing.assert_allclose(_text_features(module, variables, tokens), expected, atol=1e-5, rtol=0)
  (module, _), messages = _load_warnings(caplog, path, model_name="ViT-Tiny-quickgelu")
  assert messages == [] and module.config.act == "quick_gelu"


def test_hf_directories_state_their_architecture(tmp_path, caplog):
  _tiny_hf_model("gelu").save_pretrained(tmp_path)
  (module, _), messages = _load_warnings(caplog, str(tmp_path))
  assert messages == [] and module.config.act == "gelu"


def _write_open_clip_folder(directory, reference, model_cfg, safetensors):
  """What open_clip's save_for_hf writes (the tokenizer aside): open_clip_config.json + weights."""
  os.makedirs(directory, exist_ok=True)
  if safetensors:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()},
              os.path.join(directory, "open_clip_model.safetensors"))
  else:
    torch.save(reference.state_dict(), os.path.join(directory, "open_clip_pytorch_model.bin"))
  with open(os.path.join(directory, "open_clip_config.json"), "w") as f:
    json.dump({"model_cfg": model_cfg, "preprocess_cfg": {}}, f)


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])
def test_open_clip_hub_folder_states_activation_heads_and_pooling(tmp_path, caplog, safetensors):
  """An open_clip folder names its activation, head widths (32-wide here, not OpenAI's 64) and text
  pooling ('eos' at 49407 with an added token): read from the file, equal to open_clip, no warning."""
  model_cfg = {"embed_dim": 64, "quick_gelu": True,
               "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8, "head_width": 32},
               "text_cfg": {"context_length": 77, "vocab_size": 49410, "width": 64, "heads": 4, "layers": 2,
                            "pool_type": "eos", "eos_id": 49407}}
  reference = _randomize_open_clip(open_clip.model.CLIP(**model_cfg))
  _write_open_clip_folder(str(tmp_path), reference, model_cfg, safetensors)
  (module, variables), messages = _load_warnings(caplog, str(tmp_path))
  assert messages == [] and module.config.act == "quick_gelu" and module.config.text.eot_token_id == 49407
  images, _ = _inputs(32)
  with torch.no_grad():
    ref_image = reference.encode_image(torch.from_numpy(images)).numpy()
    ref_text = reference.encode_text(torch.from_numpy(ADDED_TOKEN_PROMPTS)).numpy()
  np.testing.assert_allclose(_jit_apply(module)(variables, jnp.asarray(images.transpose(0, 2, 3, 1)), method="encode_image"),
                             ref_image, atol=1e-4, rtol=0)
  np.testing.assert_allclose(_text_features(module, variables), ref_text, atol=1e-4, rtol=0)


def test_open_clip_folder_with_unsupported_features_is_refused(tmp_path):
  model_cfg = {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8},
               "text_cfg": {"width": 128, "heads": 2, "layers": 2, "no_causal_mask": True}}
  reference = open_clip.model.CLIP(**model_cfg)
  _write_open_clip_folder(str(tmp_path), reference, model_cfg, True)
  with pytest.raises(CheckpointError, match="sets text_cfg.no_causal_mask=True, which clip_jax's CLIP does not"):
    clip_jax.load_checkpoint(str(tmp_path))


@pytest.mark.parametrize("resnet,act", [(False, "quick_gelu"), pytest.param(True, "gelu", marks=pytest.mark.slow)])
def test_open_clip_folder_export_loads_in_open_clip_as_the_same_model(resnet, act, tmp_path):
  """convert.export_open_clip (`clip_jax.export --format open_clip`): open_clip's own 'local-dir:' loader
  builds the same architecture (activation included) with the same weights, and this project reads the
  folder back to the same config."""
  cfg = _tiny_open_clip_cfg(resnet)
  cfg["quick_gelu"] = act == "quick_gelu"
  reference = _randomize_open_clip(open_clip.model.CLIP(**cfg))
  model, variables = convert.load_openai_state_dict({k: v.numpy() for k, v in reference.state_dict().items()},
                                                    act=act)
  out = convert.export_open_clip(model, variables, str(tmp_path / "open_clip"))
  loaded = open_clip.create_model(f"local-dir:{out}").eval()
  images, tokens = _inputs(model.config.vision.image_size)
  with torch.no_grad():
    for method, inputs in (("encode_image", images), ("encode_text", tokens)):
      np.testing.assert_allclose(getattr(loaded, method)(torch.from_numpy(inputs)).numpy(),
                                 getattr(reference, method)(torch.from_numpy(inputs)).numpy(), atol=1e-5, rtol=0)
  assert convert.config_from_open_clip(convert.config_to_open_clip(model.config)) == model.config
  assert convert.load_checkpoint(out)[0].config == model.config
  assert convert.stated_preprocessing_note(out) is None  # an export states this project's preprocessing


def test_hub_ids_cache_folders_and_open_clip_prefixes_as_users_pass_them(tmp_path):
  """A new user passed `openai/clip-vit-base-patch32`, `hf-hub:...`, `local-dir:DIR` and a hub cache folder
  (models--OWNER--NAME): each got only 'no such file or directory'."""
  for hub_id in ("openai/clip-vit-base-patch32", "hf-hub:timm/ViT-B-16-SigLIP"):
    with pytest.raises(FileNotFoundError, match="Hugging Face hub id, nothing is downloaded here: download it first"):
      convert.load_checkpoint(hub_id)
  with pytest.raises(FileNotFoundError) as plain:
    convert.load_checkpoint(str(tmp_path / "gone" / "model.pt"))
  assert "hub id" not in str(plain.value)
  cache = tmp_path / "models--me--tiny-clip"
  (cache / "refs").mkdir(parents=True)
  (cache / "snapshots" / "abc123").mkdir(parents=True)
  (cache / "refs" / "main").write_text("abc123\n")
  assert convert.hub_cache_snapshot(str(cache)) == str(cache / "snapshots" / "abc123")
  assert convert.hub_cache_snapshot(str(tmp_path)) == str(tmp_path)
  with pytest.raises(FileNotFoundError, match="local-dir-gone: no such file"):  # open_clip's prefix is read
    convert.load_checkpoint(f"local-dir:{tmp_path}/local-dir-gone")
  # Resolved before anything looks at the path: a folder's own tokenizer, --act refused on a folder.
  from clip_jax import evaluate
  (cache / "snapshots" / "abc123" / "tokenizer.json").write_text("{}")
  for given in (str(cache), f"local-dir:{cache / 'snapshots' / 'abc123'}"):
    assert convert.checkpoint_tokenizer(given) == (str(cache / "snapshots" / "abc123"), None)
    with pytest.raises(ValueError, match="--act applies to bare state-dict files"):
      evaluate.load_model(given, None, "gelu")


@pytest.mark.slow
def test_a_workdirs_step_folder_loads_that_step(tmp_path):
  """A new user's `clip_jax.evaluate --checkpoint W/checkpoints/400` was 'not a training workdir'."""
  from clip_jax import checkpoint as ckpt
  model = clip_jax.create_model("ViT-Tiny")
  ckpt.write_model_config(str(tmp_path), model.config)
  manager = ckpt.make_manager(str(tmp_path), async_save=False, with_data=False)
  saved = {}
  init = jax.jit(lambda key: clip_jax.init_variables(model, key)["params"])  # eager init compiles every op
  for step in (2, 4):
    saved[step] = init(jax.random.key(step))
    ckpt.save(manager, step, {"params": saved[step], "step": jnp.int32(step)}, force=True)
  manager.close()
  for path, step in ((tmp_path / "checkpoints" / "2", 2), (tmp_path / "checkpoints" / "4", 4), (tmp_path, 4)):
    loaded = convert.load_checkpoint(str(path))[1]["params"]
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(saved[step])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
