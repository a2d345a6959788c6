"""Flax UNet / VAE against diffusers' PyTorch models on the same random weights.

Tiny configs (two resolutions, 32/64 channels) keep every model compile a few seconds on CPU.
"""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from clip_jax.weights import CheckpointError, load_state_dict  # noqa: E402
from dreambooth_jax.models import convert  # noqa: E402
from dreambooth_jax.models import unet as unet_lib  # noqa: E402
from dreambooth_jax.models import vae as vae_lib  # noqa: E402

torch.set_num_threads(1)

SD1_UNET = dict(  # SD 1.x shape: attention_head_dim is one int (= heads), 1x1-conv projections
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
SD2_UNET = dict(  # SD 2.x shape: heads per block, linear projections, fp32 attention
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=(1, 2),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24, attention_head_dim=(2, 4), use_linear_projection=True,
    upcast_attention=True, transformer_layers_per_block=(1, 2), flip_sin_to_cos=False, freq_shift=1)
TINY_VAE = dict(
    block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    sample_size=16)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _torch_unet(model, latents, timesteps, context):
  with torch.no_grad():
    return _nhwc(model(_nchw(latents), torch.as_tensor(timesteps), torch.from_numpy(context)).sample)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
  """A diffusers-format folder: unet/ (SD1-like, safetensors), unet_v2/ (.bin), vae/."""
  root = tmp_path_factory.mktemp("pipeline")
  torch.manual_seed(0)
  models = {"unet": diffusers.UNet2DConditionModel(**SD1_UNET),
            "unet_v2": diffusers.UNet2DConditionModel(**SD2_UNET),
            "vae": diffusers.AutoencoderKL(**TINY_VAE)}
  for name, model in models.items():
    # Random-init weights are tiny in places (zeroed outputs); perturb every tensor so all
    # of them matter for the comparison.
    with torch.no_grad():
      for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
    model.eval().save_pretrained(str(root / name), safe_serialization=(name != "unet_v2"))
  return str(root), models


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.RandomState(0)
  return {"latents": rng.randn(2, 8, 8, 4).astype(np.float32),
          "odd_latents": rng.randn(2, 7, 6, 4).astype(np.float32),
          "timesteps": np.array([3, 781]),
          "context": rng.randn(2, 5, 32).astype(np.float32),
          "context_v2": rng.randn(2, 5, 24).astype(np.float32),
          "images": rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)}


@pytest.fixture(scope="module")
def sd1_apply():
  # One compiled function per module: each tiny-UNet compile costs seconds on 2 cores.
  config = unet_lib.UNetConfig.from_diffusers(SD1_UNET)
  return config, jax.jit(unet_lib.UNet2DConditionModel(config).apply)


def test_sd1_unet_matches_diffusers(pipeline_dir, inputs, sd1_apply):
  root, models = pipeline_dir
  config, apply = sd1_apply
  loaded_config, params = convert.load_component(root, "unet")
  assert loaded_config == config
  assert config.attention_head_dim == (8, 8)  # 8 heads: head size 4 at 32 channels, 8 at 64
  ours = apply({"params": params}, inputs["latents"], inputs["timesteps"], inputs["context"])
  ref = _torch_unet(models["unet"], inputs["latents"], inputs["timesteps"], inputs["context"])
  assert ours.shape == (2, 8, 8, 4) and ours.dtype == jnp.float32
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.slow  # ~10 s at low load: kept out of the fast subset (< 5 min)
def test_sd2_unet_matches_diffusers_with_remat_odd_size_and_scalar_timestep(pipeline_dir, inputs):
  root, models = pipeline_dir
  config, params = convert.load_component(root, "unet_v2")  # read from the .bin file
  assert config.use_linear_projection and config.upcast_attention
  model = unet_lib.UNet2DConditionModel(config, remat=True)
  latents, context = inputs["odd_latents"], inputs["context_v2"]  # 7x6: upsampling crops
  ours = jax.jit(model.apply)({"params": params}, latents, jnp.float32(421.5), context)
  ref = _torch_unet(models["unet_v2"], latents, torch.tensor(421.5), context)
  assert ours.shape == latents.shape
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_vae_matches_diffusers(pipeline_dir, inputs):
  root, models = pipeline_dir
  config, params = convert.load_component(root, "vae")
  assert config.scaling_factor == pytest.approx(0.18215)
  model = vae_lib.AutoencoderKL(config)
  images = inputs["images"]
  mean, logvar = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(params, images)
  with torch.no_grad():
    posterior = models["vae"].encode(_nchw(images)).latent_dist
    ref_images = _nhwc(models["vae"].decode(posterior.mean).sample)
  np.testing.assert_allclose(mean, _nhwc(posterior.mean), atol=1e-4, rtol=0)
  np.testing.assert_allclose(logvar, _nhwc(posterior.logvar), atol=1e-4, rtol=0)
  decoded = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))(
      params, _nhwc(posterior.mean))
  assert decoded.shape == images.shape
  np.testing.assert_allclose(decoded, ref_images, atol=1e-4, rtol=0)

  rng = jax.random.PRNGKey(1)
  sample = vae_lib.sample_posterior(rng, mean, logvar)
  noise = jax.random.normal(rng, mean.shape)
  np.testing.assert_allclose(sample, mean + np.exp(0.5 * logvar) * noise, rtol=1e-6, atol=1e-6)


def test_vae_accepts_legacy_attention_names(pipeline_dir):
  root, models = pipeline_dir
  state = {k: v.numpy() for k, v in models["vae"].state_dict().items()}
  legacy = {}
  for name, value in state.items():
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
      if f".attentions.0.{new}." in name:
        name = name.replace(f".{new}.", f".{old}.")
        if old != "proj_attn" and value.ndim == 2:
          value = value[:, :, None, None]  # some original-format files store 1x1 convs
    legacy[name] = value
  assert any(".query." in k for k in legacy)
  config = vae_lib.VAEConfig.from_diffusers(TINY_VAE)
  expected = convert.vae_from_diffusers(state, config)
  got = convert.vae_from_diffusers(legacy, config)
  jax.tree.map(np.testing.assert_array_equal, got, expected)


@pytest.mark.slow  # 6 s; test_sd_pipeline's save-then-diffusers test stays fast
def test_save_then_diffusers_from_pretrained_round_trips(pipeline_dir, inputs, sd1_apply, tmp_path):
  root, models = pipeline_dir
  for name, cls in (("unet", diffusers.UNet2DConditionModel), ("vae", diffusers.AutoencoderKL)):
    config, params = convert.load_component(root, name)
    convert.save_component(str(tmp_path), name, config, params)
    reloaded = cls.from_pretrained(str(tmp_path), subfolder=name).eval()
    original = models[name].state_dict()
    assert set(reloaded.state_dict()) == set(original)
    for key, value in reloaded.state_dict().items():
      torch.testing.assert_close(value, original[key], rtol=0, atol=0)
  # The reloaded UNet computes what the original does, and our reload of our save too.
  ref = _torch_unet(models["unet"], inputs["latents"], inputs["timesteps"], inputs["context"])
  again = _torch_unet(diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path), subfolder="unet"),
                      inputs["latents"], inputs["timesteps"], inputs["context"])
  np.testing.assert_array_equal(again, ref)
  config, params = convert.load_component(str(tmp_path), "unet")
  _, apply = sd1_apply
  ours = apply({"params": params}, inputs["latents"], inputs["timesteps"], inputs["context"])
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_logical_axis_names_on_parameters():
  config = unet_lib.UNetConfig.from_diffusers(SD1_UNET)
  model = unet_lib.UNet2DConditionModel(config)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), *unet_lib.init_inputs(config))
  specs = nn.get_partition_spec(abstract)["params"]
  assert tuple(specs["conv_in"]["kernel"]) == (None, None, "conv_in", "conv_out")
  block = specs["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]
  assert tuple(block["attn2"]["to_k"]["kernel"]) == ("embed", "heads")
  assert tuple(block["attn1"]["to_out_0"]["kernel"]) == ("heads", "embed")
  assert tuple(block["ff"]["net_0"]["proj"]["kernel"]) == ("embed", "mlp")
  assert tuple(block["norm1"]["scale"]) == ("norm",)


@pytest.mark.slow  # a bf16 compile of the UNet takes 10-20 s on 2 shared cores
def test_bfloat16_compute_stays_close(pipeline_dir, inputs, sd1_apply):
  root, _ = pipeline_dir
  config, params = convert.load_component(root, "unet")
  _, apply = sd1_apply
  args = (inputs["latents"], inputs["timesteps"], inputs["context"])
  ref = apply({"params": params}, *args)
  model = unet_lib.UNet2DConditionModel(config, dtype=jnp.bfloat16)
  low = jax.jit(model.apply)({"params": params}, *args)
  assert low.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(low - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))


# --- bad input --------------------------------------------------------------------------


def test_missing_directory_component_and_weights(pipeline_dir, tmp_path):
  root, _ = pipeline_dir
  with pytest.raises(FileNotFoundError, match="no such model directory"):
    convert.load_component(str(tmp_path / "nowhere"), "unet")
  with pytest.raises(CheckpointError, match="no 'text_unet' component folder"):
    convert.load_component(root, "text_unet")
  os.makedirs(tmp_path / "unet")
  with open(tmp_path / "unet" / "config.json", "w") as f:
    json.dump(dict(SD1_UNET, _class_name="UNet2DConditionModel"), f)
  with pytest.raises(CheckpointError, match="no weights named diffusion_pytorch_model.safetensors or "
                                            "diffusion_pytorch_model.bin .*found no weight files"):
    convert.load_component(str(tmp_path), "unet")


def _sd1_state(root):
  return load_state_dict(os.path.join(root, "unet", "diffusion_pytorch_model.safetensors"))


def test_wrong_shape_names_the_weight_and_both_shapes(pipeline_dir):
  root, _ = pipeline_dir
  state = _sd1_state(root)
  state["conv_in.weight"] = np.zeros((32, 9, 3, 3), np.float32)
  with pytest.raises(CheckpointError,
                     match=r"'conv_in.weight' has shape \(32, 9, 3, 3\) but the config implies "
                           r"\(32, 4, 3, 3\)"):
    convert.unet_from_diffusers(state, SD1_UNET)


def test_missing_and_unexpected_weights(pipeline_dir):
  root, _ = pipeline_dir
  state = _sd1_state(root)
  del state["mid_block.resnets.1.conv1.weight"]
  with pytest.raises(CheckpointError, match="lacks 1 weight.*mid_block.resnets.1.conv1.weight"):
    convert.unet_from_diffusers(state, SD1_UNET)
  state = _sd1_state(root)
  state["extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(CheckpointError, match="1 weight.*does not use.*'extra.weight'"):
    convert.unet_from_diffusers(state, SD1_UNET)
  # Params of another config do not export under this one.
  params = convert.unet_from_diffusers(_sd1_state(root), SD1_UNET)
  with pytest.raises(CheckpointError, match="does not belong|do not belong|shape"):
    convert.unet_to_diffusers(params, dict(SD1_UNET, cross_attention_dim=16))


def test_unsupported_config_options_are_refused():
  with pytest.raises(ValueError, match="class_embed_type='timestep' is not supported"):
    unet_lib.UNetConfig.from_diffusers(dict(SD1_UNET, class_embed_type="timestep"))
  with pytest.raises(ValueError, match="attention_head_dim.*3 entries"):
    unet_lib.UNetConfig.from_diffusers(dict(SD1_UNET, attention_head_dim=(2, 2, 2)))
  with pytest.raises(ValueError, match="'AttnDownBlock2D' is not supported"):
    unet_lib.UNetConfig.from_diffusers(dict(SD1_UNET, down_block_types=("AttnDownBlock2D", "DownBlock2D")))


# --- full-size structure (shapes only: no real weights can be downloaded here) -------------

SD15_UNET = dict(
    block_out_channels=[320, 640, 1280, 1280], attention_head_dim=8, cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, layers_per_block=2, sample_size=64)
SD21_UNET = dict(SD15_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                 use_linear_projection=True, upcast_attention=True, sample_size=96)
SD_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


@pytest.mark.parametrize("name, config, n_params", [  # SD 2.1's UNet is slow-only: SD 1.5's stays fast
    ("unet", SD15_UNET, 859_520_964), pytest.param("unet", SD21_UNET, 865_910_724, marks=pytest.mark.slow),
    ("vae", SD_VAE, 83_653_863)])
def test_full_size_names_and_shapes_match_diffusers(name, config, n_params):
  cls = diffusers.UNet2DConditionModel if name == "unet" else diffusers.AutoencoderKL
  with torch.device("meta"):  # the reference's structure without allocating 3 GB
    reference = {k: tuple(v.shape) for k, v in cls(**config).state_dict().items()}
  if name == "unet":
    shapes = convert._unet_shapes(unet_lib.UNetConfig.from_diffusers(config))
  else:
    shapes = convert._vae_shapes(vae_lib.VAEConfig.from_diffusers(config))
  ours = {convert.flax_path_to_torch_name(p): convert._torch_shape(s) for p, s in shapes.items()}
  assert ours == reference
  assert sum(int(np.prod(s)) for s in ours.values()) == n_params


# --- full-size parity (random weights; ~3.4 GB per UNet in fp32, so one at a time) ----------


@pytest.mark.slow  # ~1-2 minutes each on 2 cores: torch init + XLA compile of the full UNet
@pytest.mark.parametrize("config, context_width", [(SD15_UNET, 768), (SD21_UNET, 1024)],
                         ids=["sd15", "sd21"])
def test_full_size_unet_matches_diffusers_at_32x32(config, context_width):
  import gc
  rng = np.random.RandomState(0)
  latents = rng.randn(1, 32, 32, 4).astype(np.float32)
  context = rng.randn(1, 77, context_width).astype(np.float32)
  timesteps = np.array([500])
  torch.manual_seed(0)
  reference_model = diffusers.UNet2DConditionModel(**config).eval()
  ref = _torch_unet(reference_model, latents, timesteps, context)
  state = {k: v.numpy() for k, v in reference_model.state_dict().items()}
  params = convert.unet_from_diffusers(state, config)
  del reference_model, state  # peak memory: torch model + converted params, never three copies
  gc.collect()
  model = unet_lib.UNet2DConditionModel(unet_lib.UNetConfig.from_diffusers(config))
  ours = np.asarray(jax.jit(model.apply)({"params": params}, latents, timesteps, context))
  del params
  gc.collect()
  assert float(np.std(ref)) > 0.1  # a real signal, not a near-zero output
  assert np.abs(ours - ref).max() <= 1e-3, np.abs(ours - ref).max()
