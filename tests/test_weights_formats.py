"""Weight files as users bring them (issue 12.1, 12.11): PyTorch pickles and TorchScript archives read
without torch and without running anything from the file; model folders with sharded, variant and
.bin weights, found the way transformers and diffusers find them.

References: `torch.load(weights_only=True)` / `torch.jit.load` on the same files (equal bit for bit),
and transformers / diffusers models saved by their own `save_pretrained` (embeddings within 1e-4).
"""
import copy
import os
import pickle
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import clip_jax
from clip_jax import weights
from clip_jax.weights import CheckpointError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _torch_reference(state) -> dict[str, np.ndarray]:
  return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}


def _assert_states_equal(ours, reference):
  assert sorted(ours) == sorted(reference)
  for key, value in reference.items():
    assert ours[key].dtype == value.dtype, key
    np.testing.assert_array_equal(ours[key], value, err_msg=key)


def _mixed_state():
  """Every layout torch writes: dtypes (bf16 included), 0-d, transposed (strided) and views into one
  shared storage at offsets."""
  torch.manual_seed(0)
  base = torch.randn(4, 6)
  return {"w": base.t(), "view": base[1:3, 2:5], "row": base[3], "half": torch.randn(3, 2).half(),
          "bf16": torch.randn(5).bfloat16(), "ids": torch.arange(7), "mask": torch.tensor([True, False]),
          "scale": torch.tensor(2.5), "empty": torch.zeros(0, 3), "f64": torch.randn(2, 2).double()}


# ----------------------------------------------------------------------------- PyTorch pickles
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_state_dict_equals_torch_load(tmp_path, zip_format):
  path = str(tmp_path / "state.pt")
  torch.save(_mixed_state(), path, _use_new_zipfile_serialization=zip_format)
  _assert_states_equal(weights.load_state_dict(path), _torch_reference(torch.load(path, weights_only=True)))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_training_checkpoint_with_optimizer_state_and_ddp_prefix(tmp_path, zip_format):
  model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
  optimizer = torch.optim.AdamW(model.parameters())
  model(torch.randn(2, 3)).sum().backward()
  optimizer.step()  # optimizer state: more tensors in storages no weight uses
  path = str(tmp_path / "epoch_3.pt")
  torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
              "optimizer": optimizer.state_dict()}, path, _use_new_zipfile_serialization=zip_format)
  _assert_states_equal(weights.load_state_dict(path), _torch_reference(model.state_dict()))


class _Block(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.lin = torch.nn.Linear(4, 4)
    self.norm = torch.nn.LayerNorm(4)
    self.register_buffer("steps", torch.arange(3))
    self.gain = torch.nn.Parameter(torch.randn(4, 3).t())  # a strided parameter

  def forward(self, x):
    return self.norm(self.lin(x)) + self.gain.sum() + self.steps.sum()


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_archive_equals_torch_jit_load(tmp_path, how):
  torch.manual_seed(0)
  module = torch.nn.Sequential(_Block(), _Block())
  archive = torch.jit.script(module) if how == "script" else torch.jit.trace(module, torch.randn(2, 4))
  path = str(tmp_path / "model.pt")
  torch.jit.save(archive, path)
  _assert_states_equal(weights.load_state_dict(path), _torch_reference(torch.jit.load(path).state_dict()))


class _SideEffects(torch.nn.Module):
  """Scripted code that torch.jit.load runs: __setstate__ prints and rewrites the weight."""

  def __init__(self):
    super().__init__()
    self.register_buffer("weight", torch.arange(6.0).reshape(2, 3))  # TorchScript cannot make Parameters

  def forward(self, x):
    return x @ self.weight

  @torch.jit.export
  def __getstate__(self):
    return {"weight": self.weight}

  @torch.jit.export
  def __setstate__(self, state: dict[str, torch.Tensor]):
    print("CODE FROM THE ARCHIVE RAN")
    self.weight = state["weight"] * 0 - 1
    self.training = False


def test_archive_code_with_side_effects_is_not_run(tmp_path, capfd):
  path = str(tmp_path / "side_effects.pt")
  torch.jit.save(torch.jit.script(_SideEffects()), path)
  capfd.readouterr()
  state = weights.load_state_dict(path)
  assert "CODE FROM THE ARCHIVE RAN" not in capfd.readouterr().out
  np.testing.assert_array_equal(state["weight"], np.arange(6.0, dtype=np.float32).reshape(2, 3))
  # torch.jit.load runs the archive's code: the message and the rewritten weight show it did.
  rewritten = torch.jit.load(path).weight.detach().numpy()
  assert "CODE FROM THE ARCHIVE RAN" in capfd.readouterr().out
  np.testing.assert_array_equal(rewritten, -np.ones((2, 3), np.float32))


class _Payload:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def _zip_with_pickle(path, payload, torchscript):
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", pickle.dumps(payload, protocol=2))
    archive.writestr("archive/version", "3\n")
    if torchscript:
      archive.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
      archive.writestr("archive/code/__torch__.py", "def f(x: int) -> int:\n  return x\n")


@pytest.mark.parametrize("kind", ["zip", "torchscript", "legacy"])
def test_pickle_asking_for_os_system_is_refused_without_running_it(tmp_path, kind):
  marker = tmp_path / "pwned"
  payload = {"weight": _Payload(marker)}
  path = str(tmp_path / "evil.pt")
  if kind == "legacy":
    with open(path, "wb") as f:
      for part in (0x1950a86a20f9469cfc6c, 1001, {"little_endian": True}):
        pickle.dump(part, f, protocol=2)
      pickle.dump(payload, f, protocol=2)
  else:
    _zip_with_pickle(path, payload, torchscript=kind == "torchscript")
  with pytest.raises(CheckpointError) as error:
    weights.load_state_dict(path)
  message = str(error.value)
  assert "\n" not in message and "refused to load" in message and "system" in message
  assert not marker.exists()


def test_truncated_and_foreign_pickles_get_one_line(tmp_path):
  path = str(tmp_path / "state.pt")
  torch.save(_mixed_state(), path, _use_new_zipfile_serialization=False)
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:-20])
  with pytest.raises(CheckpointError, match="truncated"):
    weights.load_state_dict(path)
  torch.save({"w": torch.randn(4, 5)}, path)  # a zip whose storage file is cut short
  with zipfile.ZipFile(path) as archive:
    members = {name: archive.read(name) for name in archive.namelist()}
  with zipfile.ZipFile(path, "w") as archive:
    for name, data in members.items():
      archive.writestr(name, data[:40] if name.endswith("/data/0") else data)
  with pytest.raises(CheckpointError, match="tensor 'w' reaches past its storage .10 elements.; the file is truncated"):
    weights.load_state_dict(path)
  with open(path, "rb") as f:  # a zip cut short (an interrupted download): its directory at the end is gone
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(CheckpointError, match="a zip archive .torch.save's format. that is truncated or corrupt"):
    weights.load_state_dict(path)
  torch.save(torch.nn.Linear(2, 2), path)  # a whole module: its class is not a tensor
  with pytest.raises(CheckpointError, match="refused to load: the pickle asks for 'torch.nn.modules.linear.Linear'"):
    weights.load_state_dict(path)
  with open(path, "wb") as f:
    pickle.dump({"a": [1, 2]}, f)
  with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
    weights.load_state_dict(path)


def test_bfloat16_safetensors_widen_to_float32(tmp_path):
  from safetensors.torch import save_file
  state = {"a": torch.randn(3, 4).bfloat16(), "b": torch.randn(2)}
  path = str(tmp_path / "bf16.safetensors")
  save_file(state, path)
  _assert_states_equal(weights.load_state_dict(path), _torch_reference(state))


def test_readers_run_without_torch(tmp_path):
  """torch is a test-only dependency: reading every format works in a process where it cannot be
  imported, and importing the converters does not import it."""
  from safetensors.torch import save_file
  torch.save(_mixed_state(), str(tmp_path / "zip.pt"))
  torch.save(_mixed_state(), str(tmp_path / "legacy.pt"), _use_new_zipfile_serialization=False)
  torch.jit.save(torch.jit.script(torch.nn.Sequential(_Block())), str(tmp_path / "script.pt"))
  save_file({"a": torch.randn(3).bfloat16()}, str(tmp_path / "bf16.safetensors"))
  code = ("import sys; sys.modules['torch'] = None\n"
          "import clip_jax.convert, dreambooth_jax.models.convert, dreambooth_jax.sampling.pipeline\n"
          "from clip_jax.weights import load_state_dict\n"
          f"for name in ('zip.pt', 'legacy.pt', 'script.pt', 'bf16.safetensors'):\n"
          f"  print(name, len(load_state_dict({str(tmp_path)!r} + '/' + name)))\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ["zip.pt", "10", "legacy.pt", "10", "script.pt", "6", "bf16.safetensors", "1"]


# ----------------------------------------------------------------------------- model folders
def _tiny_hf_clip():
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_attention_heads=2,
                       num_hidden_layers=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407),
      vision_config=dict(hidden_size=64, intermediate_size=256, num_attention_heads=2, num_hidden_layers=2,
                         image_size=32, patch_size=8),
      projection_dim=48)
  torch.manual_seed(0)
  return transformers.CLIPModel(config).eval()


@pytest.fixture(scope="module")
def hf_clip():
  return _tiny_hf_clip()


def _embeddings(module, variables):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  tokens = np.zeros((2, 77), np.int32)
  tokens[:, :4] = [[49406, 320, 1929, 49407], [49406, 2368, 49407, 0]]
  apply = jax.jit(module.apply, static_argnames="method")  # one program each, not one per op
  return (np.asarray(apply(variables, jnp.asarray(images), method="encode_image")),
          np.asarray(apply(variables, jnp.asarray(tokens), method="encode_text")), images, tokens)


def _flat(variables):
  return traverse_util.flatten_dict(variables)


def _save_bin(state, directory, stem, variant=None, max_shard_size=None):
  """A .bin folder the way transformers < 5 and diffusers write them (torch.save pickles; shards
  named in an index `<stem>.bin.index[.variant].json`)."""
  from huggingface_hub import save_torch_state_dict
  os.makedirs(directory, exist_ok=True)
  infix = f".{variant}" if variant else ""
  save_torch_state_dict({k: v.contiguous() for k, v in state.items()}, directory, safe_serialization=False,
                        filename_pattern=f"{stem}{infix}{{suffix}}.bin", max_shard_size=max_shard_size or "5GB")
  index = os.path.join(directory, f"{stem}{infix}.bin.index.json")
  if variant and os.path.exists(index):
    os.rename(index, os.path.join(directory, f"{stem}.bin.index.{variant}.json"))


def test_sharded_hf_clip_loads_equal_to_transformers(tmp_path, hf_clip):
  """The issue's example: save_pretrained(max_shard_size='1MB') writes two shards and an index."""
  hf_clip.save_pretrained(tmp_path, max_shard_size="1MB")
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  module, variables = clip_jax.load_checkpoint(str(tmp_path))
  image_emb, text_emb, images, tokens = _embeddings(module, variables)
  with torch.no_grad():
    ref_image = hf_clip.get_image_features(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
    ref_text = hf_clip.get_text_features(input_ids=torch.from_numpy(tokens.astype(np.int64)))
  np.testing.assert_allclose(image_emb, getattr(ref_image, "pooler_output", ref_image).numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(text_emb, getattr(ref_text, "pooler_output", ref_text).numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", ["variant", "sharded_variant", "bin", "sharded_bin", "sharded_bin_variant"])
def test_hf_clip_folder_layouts(tmp_path, hf_clip, layout, caplog):
  """Every layout loads to the weights of the plain file (fp16 variants: those weights in fp16)."""
  hf_clip.save_pretrained(tmp_path / "plain")
  _, plain = clip_jax.load_checkpoint(str(tmp_path / "plain"))
  target, variant = tmp_path / layout, ("fp16" if "variant" in layout else None)
  half = copy.deepcopy(hf_clip).half() if variant else hf_clip  # .half() is in place
  if "bin" in layout:
    hf_clip.config.save_pretrained(target)
    _save_bin(half.state_dict(), str(target), "pytorch_model", variant, "1MB" if "sharded" in layout else None)
  else:
    half.save_pretrained(target, variant=variant, max_shard_size="1MB" if "sharded" in layout else "5GB")
  _, loaded = clip_jax.load_checkpoint(str(target), variant=variant)
  expected = _flat(plain)
  for key, value in _flat(loaded).items():
    want = expected[key].astype(np.float16).astype(np.float32) if variant else expected[key]
    np.testing.assert_array_equal(value, want, err_msg="/".join(key))
  if variant:  # only a variant's files: loaded without variant= too (no command line can pass one), said
    with caplog.at_level("WARNING"):
      _, alone = clip_jax.load_checkpoint(str(target))
    jax.tree.map(np.testing.assert_array_equal, alone, loaded)
    assert "no plain weight files, only the 'fp16' variant's: loading those" in caplog.text


def test_safetensors_preferred_and_nothing_found_lists_the_folder(tmp_path, hf_clip):
  hf_clip.save_pretrained(tmp_path)
  _, from_safetensors = clip_jax.load_checkpoint(str(tmp_path))
  _save_bin({k: torch.zeros_like(v) for k, v in hf_clip.state_dict().items()}, str(tmp_path), "pytorch_model")
  _, both = clip_jax.load_checkpoint(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, both, from_safetensors)
  os.remove(tmp_path / "model.safetensors")
  with pytest.raises(CheckpointError, match=r"no weights named model\.bf16\.safetensors or pytorch_model\.bf16\.bin"
                                            r" .*found pytorch_model\.bin; pass variant=None"):
    clip_jax.load_checkpoint(str(tmp_path), variant="bf16")
  os.remove(tmp_path / "pytorch_model.bin")
  (tmp_path / "weights.ckpt").write_bytes(b"")
  with pytest.raises(CheckpointError,
                     match="no weights named model.safetensors or pytorch_model.bin .*found weights.ckpt"):
    clip_jax.load_checkpoint(str(tmp_path))


def test_hf_config_fields_the_models_do_not_follow_are_refused(tmp_path, hf_clip):
  # layer_norm_eps=1e-6 was computed with 1e-5, silently (a new user: logits 3.3e-3 off transformers').
  import json
  hf_clip.save_pretrained(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  config["vision_config"]["layer_norm_eps"] = 1e-6
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=r"config.json: Hugging Face config's vision_config has layer_norm_eps=1e-06; "
                                            r"only 1e-5 \(CLIP's\)"):
    clip_jax.load_checkpoint(str(tmp_path))


def test_index_naming_a_missing_shard(tmp_path, hf_clip):
  hf_clip.save_pretrained(tmp_path, max_shard_size="1MB")
  os.remove(tmp_path / "model-00002-of-00002.safetensors")
  with pytest.raises(CheckpointError, match="names shard 'model-00002-of-00002.safetensors', which is not in"):
    clip_jax.load_checkpoint(str(tmp_path))


def test_sd_text_encoder_folder_layouts(tmp_path):
  from dreambooth_jax.models import text_encoder as text_encoder_lib
  config = transformers.CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                       num_hidden_layers=2, max_position_embeddings=16)
  torch.manual_seed(0)
  model = transformers.CLIPTextModel(config).eval()
  model.save_pretrained(tmp_path / "plain")
  _, plain, _ = text_encoder_lib.load_text_encoder(str(tmp_path / "plain"))
  copy.deepcopy(model).half().save_pretrained(tmp_path / "fp16", variant="fp16", max_shard_size="40KB")
  assert len([f for f in os.listdir(tmp_path / "fp16") if f.startswith("model.fp16-")]) > 1
  _, loaded, _ = text_encoder_lib.load_text_encoder(str(tmp_path / "fp16"), variant="fp16")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b).astype(np.float16).astype(np.float32)),
               loaded, plain)
  model.config.save_pretrained(tmp_path / "bin")
  _save_bin(model.state_dict(), str(tmp_path / "bin"), "pytorch_model")
  _, from_bin, _ = text_encoder_lib.load_text_encoder(str(tmp_path / "bin"))
  jax.tree.map(np.testing.assert_array_equal, from_bin, plain)


@pytest.fixture(scope="module")
def tiny_unet_and_vae():
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(
      sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      norm_num_groups=8)
  vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
  return {"unet": unet, "vae": vae}


@pytest.mark.parametrize("name", ["unet", "vae"])
@pytest.mark.parametrize("save_kwargs", [
    dict(max_shard_size="100KB"), dict(variant="fp16"), dict(variant="fp16", max_shard_size="100KB"),
    dict(safe_serialization=False), dict(safe_serialization=False, max_shard_size="100KB", variant="fp16")],
    ids=["sharded", "variant", "sharded_variant", "bin", "sharded_bin_variant"])
def test_diffusers_component_layouts(tmp_path, tiny_unet_and_vae, name, save_kwargs):
  """UNet and VAE folders written by diffusers' own save_pretrained in every layout load to the
  plain file's weights (the plain file is checked against diffusers' outputs in test_sd_models)."""
  from dreambooth_jax.models import convert
  model = tiny_unet_and_vae[name]
  model.save_pretrained(tmp_path / "plain" / name)
  _, plain = convert.load_component(str(tmp_path / "plain"), name)
  variant = save_kwargs.get("variant")
  (copy.deepcopy(model).half() if variant else model).save_pretrained(tmp_path / "other" / name, **save_kwargs)
  _, loaded = convert.load_component(str(tmp_path / "other"), name, variant=variant)
  cast = (lambda a: a.astype(np.float16).astype(np.float32)) if variant else (lambda a: a)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, cast(b)), loaded, plain)
  if variant:  # only the variant's files: read without variant= as well
    jax.tree.map(np.testing.assert_array_equal, convert.load_component(str(tmp_path / "other"), name)[1], loaded)


# ~11 s at the checkpoint's own size (a full-size load and cast): slow; the resampled 64 px case stays fast.
@pytest.mark.parametrize("image_size", [pytest.param(None, marks=pytest.mark.slow), 64])
def test_param_dtype_casts_the_loaded_parameters(tmp_path, hf_clip, image_size):
  # load_checkpoint(param_dtype=bf16) returned float32 weights (only the module's attribute changed).
  import jax.numpy as jnp
  from safetensors.numpy import save_file
  hf_clip.save_pretrained(tmp_path / "hf")
  model = clip_jax.create_model("RN-Tiny")
  from clip_jax.convert import export_openai_state_dict
  state = export_openai_state_dict(model, clip_jax.init_variables(model, jax.random.key(0)))
  save_file(state, str(tmp_path / "rn.safetensors"))
  for path, kwargs in ((tmp_path / "hf", {}), (tmp_path / "rn.safetensors", {"model_name": "RN-Tiny"})):
    _, wide = clip_jax.load_checkpoint(str(path), image_size=image_size, **kwargs)
    module, narrow = clip_jax.load_checkpoint(str(path), image_size=image_size, param_dtype=jnp.bfloat16, **kwargs)
    assert module.param_dtype == jnp.bfloat16
    assert {x.dtype for x in jax.tree.leaves(narrow["params"])} == {jnp.dtype(jnp.bfloat16)}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(jnp.bfloat16)),
                 narrow["params"], wide["params"])
    if "batch_stats" in wide:  # flax keeps BatchNorm statistics in float32
      jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), narrow["batch_stats"], wide["batch_stats"])
