"""DreamBooth's metrics: DINO and LPIPS against their reference PyTorch implementations on identical
random weights, and every metric against a direct numpy computation on the same embeddings.

Tolerances (fp32): DINO embeddings <= 1e-4 (max abs) against timm, positional-embedding resizing
<= 2e-5 against torch's bicubic interpolate, LPIPS distances <= 1e-5 against the `lpips` package;
metrics <= 1e-5 against float64 numpy.
"""
import math
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image

import clip_jax
from clip_jax.preprocess import preprocess as clip_preprocess
from clip_jax.weights import CheckpointError, save_safetensors
from dreambooth_jax.eval import dino, metrics
from dreambooth_jax.eval import lpips as lpips_lib

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
torch.set_num_threads(2)


def _random_variables(model, *inputs, seed=0):
  """Random weights from the init's shapes alone (no init compile): norms near 1, the rest small."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), *inputs)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    base = 1.0 if "scale" in name else 0.0
    return (base + rng.normal(size=leaf.shape) * 0.05).astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(shapes))


def _randomize(module, seed=0):
  """Random weights everywhere (biases and LayerNorm affines too, not their zero/one inits)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in module.state_dict().items():
      noise = torch.randn(tensor.shape, generator=gen)
      if "norm" in name and name.endswith("weight"):
        tensor.copy_(1 + 0.1 * noise)
      elif name.endswith("bias") or name in ("cls_token", "pos_embed"):
        tensor.copy_(0.1 * noise)
  return module.eval()


def _numpy_state(module):
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


# ----------------------------------------------------------------------------- DINO
@pytest.fixture(scope="module")
def timm_vit_s16():
  return _randomize(timm.create_model("vit_small_patch16_224.dino", pretrained=False, num_classes=0))


@pytest.fixture(scope="module")
def small_dino():
  """A one-block ViT-S/16 in timm and ours: the same code paths at a fraction of the compile time."""
  reference = _randomize(timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, depth=1), 1)
  return reference, *dino.dino_from_state_dict(_numpy_state(reference))


def test_dino_vit_s16_equals_timm(timm_vit_s16):
  model, variables = dino.dino_from_state_dict(_numpy_state(timm_vit_s16))
  assert model.config == dino.VIT_S16
  images = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
  ours = np.asarray(jax.jit(model.apply)(variables, images))
  with torch.no_grad():
    expected = timm_vit_s16(_nchw(images)).numpy()
  assert ours.shape == (2, 384)
  np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


def test_dino_round_trips_timm_layout(timm_vit_s16):
  state = _numpy_state(timm_vit_s16)
  model, variables = dino.dino_from_state_dict(state)
  back = dino.dino_to_state_dict(model, variables)
  assert set(back) == set(state)
  for key in state:
    np.testing.assert_array_equal(back[key], state[key], err_msg=key)


def _dino_reference_forward(reference, images):
  """DINO's own forward at any size: strided patch conv, `interpolate_pos_encoding` as in the DINO
  repository (bicubic with scale factor (grid + 0.1) / sqrt(N)), the blocks, the final norm."""
  x = _nchw(images)
  rows, cols = x.shape[2] // 16, x.shape[3] // 16
  tokens = torch.nn.functional.conv2d(x, reference.patch_embed.proj.weight, reference.patch_embed.proj.bias,
                                      stride=16).flatten(2).transpose(1, 2)
  pos = reference.pos_embed
  n = pos.shape[1] - 1
  if rows * cols != n or x.shape[2] != x.shape[3]:
    grid = int(math.sqrt(n))
    patch_pos = torch.nn.functional.interpolate(
        pos[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2),
        scale_factor=((rows + 0.1) / math.sqrt(n), (cols + 0.1) / math.sqrt(n)), mode="bicubic")
    assert patch_pos.shape[-2:] == (rows, cols)
    pos = torch.cat([pos[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)
  x = torch.cat([reference.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + pos
  return reference.norm(reference.blocks(x))[:, 0]


# (232, 224): 14 x 14 patches like 224 x 224, yet DINO resamples its table for non-square inputs.
@pytest.mark.parametrize("height,width", [(160, 192), (232, 224)])
def test_dino_other_resolutions_equal_dino_interpolation(small_dino, height, width):
  reference, model, variables = small_dino
  images = np.random.default_rng(1).normal(size=(2, height, width, 3)).astype(np.float32)
  ours = np.asarray(jax.jit(model.apply)(variables, images))
  with torch.no_grad():
    # DINO's conv drops the pixels beyond a multiple of 16, as ours does.
    expected = _dino_reference_forward(reference, images).numpy()
  np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("grid,rows,cols", [(14, 10, 12), (14, 20, 7), (4, 9, 3)])
def test_positional_resize_equals_torch_bicubic(grid, rows, cols):
  pos = np.random.default_rng(0).normal(size=(1 + grid * grid, 8)).astype(np.float32)
  ours = np.asarray(dino.resize_positional_embedding(jnp.asarray(pos), grid, rows, cols))
  patch = torch.from_numpy(pos[1:]).reshape(1, grid, grid, 8).permute(0, 3, 1, 2)
  resized = torch.nn.functional.interpolate(patch, scale_factor=((rows + 0.1) / grid, (cols + 0.1) / grid),
                                            mode="bicubic")
  expected = np.concatenate([pos[:1], resized.permute(0, 2, 3, 1).reshape(-1, 8).numpy()])
  np.testing.assert_allclose(ours, expected, atol=2e-5, rtol=0)


def test_dino_reads_training_checkpoints_and_vit_b(tmp_path):
  # DINO's training checkpoints prefix the backbone and carry the projection head.
  reference = _randomize(timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, depth=1))
  state = _numpy_state(reference)
  wrapped = {f"module.backbone.{k}": v for k, v in state.items()}
  wrapped["module.head.mlp.0.weight"] = np.zeros((4, 768), np.float32)
  model, variables = dino.dino_from_state_dict(wrapped)
  assert (model.config.width, model.config.heads, model.config.layers) == (768, 12, 1)
  # Files: safetensors and torch pickles alike.
  save_safetensors(state, str(tmp_path / "dino.safetensors"))
  torch.save(reference.state_dict(), tmp_path / "dino.pth")
  images = np.random.default_rng(2).normal(size=(1, 224, 224, 3)).astype(np.float32)
  with torch.no_grad():
    expected = reference(_nchw(images)).numpy()
  np.testing.assert_allclose(np.asarray(jax.jit(model.apply)(variables, images)), expected, atol=1e-4, rtol=0)
  for path in ("dino.safetensors", "dino.pth"):
    file_model, file_variables = dino.load_dino(str(tmp_path / path))
    assert file_model == model
    for a, b in zip(jax.tree.leaves(file_variables), jax.tree.leaves(variables)):
      np.testing.assert_array_equal(a, b)


def test_dino_checkpoint_errors(timm_vit_s16):
  state = _numpy_state(timm_vit_s16)
  with pytest.raises(CheckpointError, match="missing"):
    dino.dino_from_state_dict({k: v for k, v in state.items() if "blocks.3.mlp" not in k})
  with pytest.raises(CheckpointError, match="do not belong"):
    dino.dino_from_state_dict({**state, "blocks.0.extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(CheckpointError, match="shape mismatch"):
    dino.dino_from_state_dict({**state, "blocks.2.mlp.fc1.bias": np.zeros(7, np.float32)})
  with pytest.raises(CheckpointError, match="not a timm/DINO ViT"):
    dino.dino_from_state_dict({"weight": np.zeros(3, np.float32)})
  model, variables = dino.dino_from_state_dict(state)
  with pytest.raises(ValueError, match="NHWC"):
    model.apply(variables, np.zeros((1, 3, 224, 224), np.float32))


def test_dino_preprocess_equals_torchvision():
  transforms = pytest.importorskip("torchvision.transforms")
  reference = transforms.Compose([transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
                                  transforms.CenterCrop(224), transforms.ToTensor(),
                                  transforms.Normalize(dino.IMAGENET_MEAN, dino.IMAGENET_STD)])
  rng = np.random.default_rng(0)
  images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
            ((300, 400), (513, 257), (224, 224), (99, 140))]
  ours = dino.preprocess(images)
  expected = np.stack([reference(image).numpy().transpose(1, 2, 0) for image in images])
  assert ours.shape == (4, 224, 224, 3) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="uint8"):
    dino.preprocess(np.zeros((32, 32, 3), np.float32))


# ----------------------------------------------------------------------------- LPIPS
@pytest.fixture(scope="module")
def reference_lpips():
  lpips = pytest.importorskip("lpips")
  torch.manual_seed(0)
  warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
  # Random backbones (no torchvision download); the learned linear layers are the package's own.
  return {net: lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval() for net in ("alex", "vgg")}


@pytest.mark.parametrize("net,size", [("alex", 64), pytest.param("vgg", 32, marks=pytest.mark.slow)])  # vgg ~7 s
def test_lpips_equals_package(reference_lpips, net, size):
  reference = reference_lpips[net]
  model, variables = lpips_lib.lpips_from_state_dict(_numpy_state(reference), net)
  rng = np.random.default_rng(0)
  a, b = (rng.uniform(-1, 1, (3, size, size + 8, 3)).astype(np.float32) for _ in range(2))
  ours = np.asarray(jax.jit(model.apply)(variables, a, b))
  with torch.no_grad():
    expected = reference(_nchw(a), _nchw(b)).numpy().reshape(-1)
  assert ours.shape == (3,)
  np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(model.apply(variables, a, a)), 0.0, atol=1e-7)


def test_lpips_loads_torchvision_and_package_files(reference_lpips, tmp_path):
  reference = reference_lpips["alex"]
  state = _numpy_state(reference)
  # torchvision's own names for the backbone, plus a classifier LPIPS does not use.
  backbone = {re.sub(r"^net\.slice\d+\.", "features.", k): v for k, v in state.items() if k.startswith("net.")}
  backbone["classifier.1.weight"] = np.zeros((2, 2), np.float32)
  save_safetensors(backbone, str(tmp_path / "alexnet.safetensors"))
  model, variables = lpips_lib.load_lpips(str(tmp_path / "alexnet.safetensors"))  # lins from the package
  _, expected = lpips_lib.lpips_from_state_dict(state, "alex")
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)
  exported = lpips_lib.lpips_to_state_dict(model, variables)
  assert set(exported) == set(backbone) - {"classifier.1.weight"} | {f"lin{i}.model.1.weight" for i in range(5)}


def test_lpips_errors(reference_lpips):
  state = _numpy_state(reference_lpips["alex"])
  with pytest.raises(ValueError, match="Unknown LPIPS backbone"):
    lpips_lib.lpips_from_state_dict(state, "resnet")
  with pytest.raises(CheckpointError, match="missing"):
    lpips_lib.lpips_from_state_dict(state, "vgg")
  with pytest.raises(CheckpointError, match="scaling_layer.shift"):
    lpips_lib.lpips_from_state_dict({**state, "scaling_layer.shift": np.zeros((1, 3, 1, 1), np.float32)})
  model, variables = lpips_lib.lpips_from_state_dict(state)
  with pytest.raises(ValueError, match="one shape"):
    model.apply(variables, np.zeros((1, 64, 64, 3), np.float32), np.zeros((1, 64, 72, 3), np.float32))


# ----------------------------------------------------------------------------- metrics on embeddings
def _cos(u, v):
  return float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))


def _numpy_pairwise(a, b):
  return np.mean([_cos(u, v) for u in a.astype(np.float64) for v in b.astype(np.float64)])


def test_pairwise_metrics_equal_numpy():
  rng = np.random.default_rng(0)
  generated, real, classes = (rng.normal(size=(n, 16)).astype(np.float32) * rng.uniform(0.5, 3, (n, 1))
                              for n in (7, 4, 5))
  expected = _numpy_pairwise(generated, real)
  for fn in (metrics.clip_i, metrics.dino_score, metrics.mean_pairwise_cosine):
    np.testing.assert_allclose(float(fn(generated, real)), expected, atol=1e-5, rtol=0)
  np.testing.assert_allclose(float(metrics.prior_preservation(classes, real)), _numpy_pairwise(classes, real),
                             atol=1e-5, rtol=0)
  np.testing.assert_allclose(float(metrics.clip_i(real, real)), _numpy_pairwise(real, real), atol=1e-5)


def test_clip_t_equals_numpy():
  rng = np.random.default_rng(1)
  images, texts = rng.normal(size=(6, 16)), rng.normal(size=(6, 16))
  expected = np.mean([_cos(u, v) for u, v in zip(images, texts)])
  np.testing.assert_allclose(float(metrics.clip_t(images, texts)), expected, atol=1e-5, rtol=0)
  one = np.mean([_cos(u, texts[0]) for u in images])  # one prompt for every image
  np.testing.assert_allclose(float(metrics.clip_t(images, texts[0])), one, atol=1e-5, rtol=0)
  np.testing.assert_allclose(float(metrics.clip_t(images, texts[:1])), one, atol=1e-5, rtol=0)


def test_metric_input_errors():
  a = np.ones((3, 8), np.float32)
  with pytest.raises(ValueError, match=r"\[num_images, dim\]"):
    metrics.clip_i(np.ones(8), a)
  with pytest.raises(ValueError, match="empty"):
    metrics.dino_score(np.ones((0, 8)), a)
  with pytest.raises(ValueError, match="different widths"):
    metrics.prior_preservation(np.ones((2, 4)), a)
  with pytest.raises(ValueError, match="rows for 3 images"):
    metrics.clip_t(a, np.ones((2, 8)))
  with pytest.raises(ValueError, match="floating-point"):
    metrics.clip_i(np.ones((2, 8), np.int32), a)
  with pytest.raises(ValueError, match="labels for 3 images"):
    metrics.diversity(lambda i, j: i, [np.zeros((4, 4, 3), np.uint8)] * 3, ["a", "b"])
  with pytest.raises(ValueError, match="two images generated from the same prompt"):
    metrics.diversity(lambda i, j: i, [np.zeros((4, 4, 3), np.uint8)] * 2, ["a", "b"])


def test_same_group_pairs_and_identifier():
  assert metrics.same_group_pairs(["x", "y", "x", "x", "z"]) == {"x": [(0, 2), (0, 3), (2, 3)]}
  assert metrics.strip_identifier("a sks dog on a sksy rug, sks", "sks") == "a dog on a sksy rug,"
  assert metrics.strip_identifier("a photo of sks dog", "sks") == "a photo of dog"


# ----------------------------------------------------------------------------- SubjectMetrics
@pytest.fixture(scope="module")
def subject_metrics(small_dino, reference_lpips):
  clip_model = clip_jax.create_model("ViT-Tiny")
  size, context = clip_model.config.vision.image_size, clip_model.config.text.context_length
  clip_variables = _random_variables(clip_model, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
                                     jax.ShapeDtypeStruct((1, context), jnp.int32))
  _, dino_model, dino_variables = small_dino
  lpips_pair = lpips_lib.lpips_from_state_dict(_numpy_state(reference_lpips["alex"]))
  return metrics.SubjectMetrics(clip=(clip_model, clip_variables), tokenizer=clip_jax.get_tokenizer(),
                                dino=(dino_model, dino_variables), lpips=lpips_pair, batch_size=4)


def _uint8_images(n, height, width, seed):
  return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


@pytest.mark.slow  # ~10 s at low load: kept out of the fast subset (< 5 min)
def test_subject_metrics_evaluate_equals_direct_computation(subject_metrics, reference_lpips):
  generated = _uint8_images(6, 48, 48, 0)
  real = [Image.fromarray(image) for image in _uint8_images(3, 60, 40, 1)]
  class_images = _uint8_images(2, 48, 48, 2)
  prompts = ["a sks dog in the snow"] * 4 + ["a sks dog on the beach"] * 2
  results = subject_metrics.evaluate(generated, real, prompts, class_images, identifier="sks")
  assert set(results) == {"num_generated", "clip_i", "clip_t", "dino", "pres", "div"}

  # The same networks applied directly, each once over all its images (one compile apiece).
  clip_model, clip_variables = subject_metrics.clip
  size = clip_model.config.vision.image_size
  clip_all = np.asarray(jax.jit(clip_model.apply, static_argnames="method")(
      clip_variables, clip_preprocess(list(generated) + real, size), method="encode_image"))
  tokens = clip_jax.get_tokenizer()(["a dog in the snow"] * 4 + ["a dog on the beach"] * 2,
                                    context_length=clip_model.config.text.context_length)
  text = np.asarray(jax.jit(clip_model.apply, static_argnames="method")(clip_variables, tokens, method="encode_text"))
  np.testing.assert_allclose(results["clip_i"], _numpy_pairwise(clip_all[:6], clip_all[6:]), atol=1e-5)
  np.testing.assert_allclose(results["clip_t"], np.mean([_cos(u, v) for u, v in zip(clip_all[:6], text)]),
                             atol=1e-5)

  dino_model, dino_variables = subject_metrics.dino
  dino_all = np.asarray(jax.jit(dino_model.apply)(dino_variables,
                                                  dino.preprocess(list(generated) + real + list(class_images))))
  np.testing.assert_allclose(results["dino"], _numpy_pairwise(dino_all[:6], dino_all[6:9]), atol=1e-5)
  np.testing.assert_allclose(results["pres"], _numpy_pairwise(dino_all[9:], dino_all[6:9]), atol=1e-5)

  # DIV: the lpips package on every same-prompt pair, averaged per prompt, then over prompts.
  reference = reference_lpips["alex"]
  pixels = generated.astype(np.float32) / 127.5 - 1
  with torch.no_grad():
    def lpips_pairs(indices):
      return [float(reference(_nchw(pixels[i:i + 1]), _nchw(pixels[j:j + 1]))) for k, i in enumerate(indices)
              for j in indices[k + 1:]]
    expected_div = np.mean([np.mean(lpips_pairs([0, 1, 2, 3])), np.mean(lpips_pairs([4, 5]))])
  np.testing.assert_allclose(results["div"], expected_div, atol=1e-5, rtol=0)


def test_subject_metrics_partial_inputs_and_errors(subject_metrics):
  generated = _uint8_images(2, 32, 32, 3)
  assert set(subject_metrics.evaluate(generated)) == {"num_generated"}
  assert set(subject_metrics.evaluate(generated, prompts="a photo")) == {"num_generated", "clip_t", "div"}
  with pytest.raises(ValueError, match="one prompt per image"):
    subject_metrics.evaluate(generated, prompts=["a", "b", "c"])
  with pytest.raises(ValueError, match="uint8"):
    subject_metrics.evaluate(generated.astype(np.float32))
  with pytest.raises(ValueError, match=r"RGB images \[H, W, 3\]"):
    subject_metrics.evaluate(generated[..., :1])
  with pytest.raises(ValueError, match="empty"):
    subject_metrics.dino_embeddings([])
  with pytest.raises(ValueError, match="images of one size"):
    mixed = [generated[0], _uint8_images(1, 40, 32, 4)[0]]
    metrics.diversity(subject_metrics.lpips_distances(mixed), mixed)
  with pytest.raises(ValueError, match="without a dino model"):
    metrics.SubjectMetrics(lpips=subject_metrics.lpips).dino_embeddings(generated)
  with pytest.raises(ValueError, match="tokenizer"):
    metrics.SubjectMetrics(clip=subject_metrics.clip)


def test_subject_metrics_from_files(small_dino, reference_lpips, tmp_path):
  reference, _, dino_variables = small_dino
  torch.save(reference.state_dict(), tmp_path / "dino.pth")
  lpips_state = _numpy_state(reference_lpips["alex"])
  save_safetensors({k: v for k, v in lpips_state.items() if k.startswith("net.")}, str(tmp_path / "alex.safetensors"))
  loaded = metrics.SubjectMetrics.from_files(dino=str(tmp_path / "dino.pth"),
                                             lpips_backbone=str(tmp_path / "alex.safetensors"))
  assert loaded.clip is None and loaded.lpips[0].net == "alex"
  for a, b in zip(jax.tree.leaves(loaded.dino[1]), jax.tree.leaves(dino_variables)):
    np.testing.assert_array_equal(a, b)
  _, lpips_variables = lpips_lib.lpips_from_state_dict(lpips_state)
  for a, b in zip(jax.tree.leaves(loaded.lpips[1]), jax.tree.leaves(lpips_variables)):
    np.testing.assert_array_equal(a, b)
