"""The Stable Diffusion pipeline (text encoder, load/save, generate, sample CLI) against diffusers.

One tiny diffusers StableDiffusionPipeline with random weights (UNet/VAE of two resolutions,
a 3-layer 32-wide CLIPTextModel over CLIP's real BPE vocabulary) is the reference throughout.
"""
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from clip_jax.tokenizer import ClipTokenizer  # noqa: E402
from clip_jax.weights import CheckpointError  # noqa: E402
from dreambooth_jax.sampling import pipeline as pipeline_lib  # noqa: E402
from dreambooth_jax import sample as sample_cli  # noqa: E402
from dreambooth_jax.models import text_encoder as text_encoder_lib  # noqa: E402

torch.set_num_threads(1)

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
TINY_VAE = dict(
    block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    sample_size=16)
TINY_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 num_hidden_layers=3, max_position_embeddings=77, hidden_act="quick_gelu")
SD_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)
PROMPTS = ["a photo of a sks dog", "an oil painting of a castle on a hill at dawn, " * 6]  # 2nd: cut
NEGATIVES = ["blurry", ""]
STEPS = 3


def _perturb(model, scale=0.05):
  # Random-init weights are zero in places (e.g. biases): perturb all so that all matter.
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn_like(p))
  return model.eval()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tokenizer"))
  ClipTokenizer.from_bpe_file().save_hf(path)
  return path


@pytest.fixture(scope="module")
def torch_pipe(tmp_path_factory, tokenizer_dir):
  """(folder written by diffusers' save_pretrained, the diffusers pipeline)."""
  torch.manual_seed(0)
  pipe = diffusers.StableDiffusionPipeline(
      vae=_perturb(diffusers.AutoencoderKL(**TINY_VAE)),
      text_encoder=_perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_TEXT)), 0.02),
      tokenizer=transformers.CLIPTokenizer.from_pretrained(tokenizer_dir),
      unet=_perturb(diffusers.UNet2DConditionModel(**TINY_UNET)),
      scheduler=diffusers.DDIMScheduler(**SD_SCHEDULER),
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  root = str(tmp_path_factory.mktemp("sd_pipeline"))
  pipe.save_pretrained(root)
  return root, pipe


@pytest.fixture(scope="module")
def ours(torch_pipe):
  return pipeline_lib.load_pipeline(torch_pipe[0])


@pytest.fixture(scope="module")
def initial_latents():
  return np.random.RandomState(0).randn(2, 4, 8, 8).astype(np.float32)  # NCHW, diffusers' layout


def _diffusers_images(pipe, latents_nchw, **kwargs):
  with torch.no_grad():
    return pipe(prompt=PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=STEPS,
                latents=torch.from_numpy(latents_nchw), output_type="np", **kwargs).images


# ------------------------------------------------------------------------------ text encoder
def _text_model(tmp_path, act, layers, vocab=1000):
  config = transformers.CLIPTextConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96,
                                       num_attention_heads=6, num_hidden_layers=layers,
                                       max_position_embeddings=16, hidden_act=act,
                                       bos_token_id=vocab - 2, eos_token_id=vocab - 1)
  torch.manual_seed(1)
  model = _perturb(transformers.CLIPTextModel(config), 0.02)
  model.save_pretrained(str(tmp_path))
  return model


@pytest.mark.parametrize("act, layers", [("quick_gelu", 2), ("gelu", 3)])
def test_text_encoder_matches_clip_text_model_last_and_penultimate(tmp_path, act, layers):
  reference = _text_model(tmp_path, act, layers)
  module, params, hf_config = text_encoder_lib.load_text_encoder(str(tmp_path))
  shape = (module.layers, module.width, module.heads, module.act, module.output_dim)
  assert shape == (layers, 48, 6, act, None)
  tokens = np.random.RandomState(2).randint(0, 1000, (2, 16)).astype(np.int32)
  with torch.no_grad():
    out = reference(torch.from_numpy(tokens).long(), output_hidden_states=True)
    penultimate = reference.final_layer_norm(out.hidden_states[-2]).numpy()
  last = text_encoder_lib.encode_tokens(module, params, tokens)
  assert last.shape == (2, 16, 48) and last.dtype == jnp.float32
  np.testing.assert_allclose(last, out.last_hidden_state.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(text_encoder_lib.encode_tokens(module, params, tokens, num_layers=layers - 1),
                             penultimate, atol=1e-4, rtol=0)
  assert hf_config["hidden_act"] == act


def test_text_encoder_export_loads_in_transformers_and_prefixed_keys_load(tmp_path):
  reference = _text_model(tmp_path / "ref", "gelu", 2)
  module, params, hf_config = text_encoder_lib.load_text_encoder(str(tmp_path / "ref"))
  text_encoder_lib.save_text_encoder(str(tmp_path / "out"), module, params, hf_config)
  reloaded = transformers.CLIPTextModel.from_pretrained(str(tmp_path / "out"))
  assert reloaded.config.eos_token_id == 999 and reloaded.config.hidden_act == "gelu"
  original = reference.state_dict()
  for key, value in reloaded.state_dict().items():
    torch.testing.assert_close(value, original[key], rtol=0, atol=0)
  # Our export uses hub checkpoints' `text_model.` prefix; it reads back to the same params.
  _, again, _ = text_encoder_lib.load_text_encoder(str(tmp_path / "out"))
  jax.tree.map(np.testing.assert_array_equal, again, params)


def test_text_encoder_bad_checkpoints(tmp_path):
  _text_model(tmp_path, "gelu", 2)
  with open(tmp_path / "config.json") as f:
    config = json.load(f)
  with open(tmp_path / "config.json", "w") as f:
    json.dump(dict(config, num_hidden_layers=3), f)
  with pytest.raises(CheckpointError, match="weights the 3-layer, 48-wide text encoder needs are missing"):
    text_encoder_lib.load_text_encoder(str(tmp_path))
  with open(tmp_path / "config.json", "w") as f:
    json.dump(dict(config, hidden_act="relu"), f)
  with pytest.raises(CheckpointError, match="hidden_act 'relu'"):
    text_encoder_lib.load_text_encoder(str(tmp_path))
  module, _ = text_encoder_lib.create_text_encoder(config)
  with pytest.raises(ValueError, match="num_layers=5: the encoder has 2 layers"):
    text_encoder_lib.encode_tokens(module, {}, np.zeros((1, 16), np.int32), num_layers=5)


# ------------------------------------------------------------------------------ pipeline
def test_load_pipeline_reads_every_component(ours):
  assert ours.unet.config.cross_attention_dim == 32 and ours.vae.config.latent_channels == 4
  assert ours.text_encoder.layers == 3 and ours.text_encoder.act == "quick_gelu"
  assert set(ours.params) == {"unet", "vae", "text_encoder"}
  assert ours.vae_scaling_factor == pytest.approx(0.18215)
  assert ours.scheduler_config["_class_name"] == "DDIMScheduler"
  assert ours.default_size == 16 and ours.vae_scale_factor == 2 and ours.context_length == 77
  assert ours.tokenizer.pad_token_id == ours.tokenizer.eot_token_id  # SD 1.x pads with <|endoftext|>


def test_load_pipeline_variants_as_diffusers(torch_pipe, ours, tmp_path, caplog):
  """variant='fp16' reads every component's variant files; a component without them falls back to
  its plain files with a warning (diffusers' rule); a variant no component has is refused."""
  root, pipe = torch_pipe
  pipe.save_pretrained(str(tmp_path / "fp16"), variant="fp16")  # variant names, float32 weights
  assert os.path.exists(tmp_path / "fp16" / "text_encoder" / "model.fp16.safetensors")
  same = lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # noqa: E731
  jax.tree.map(same, pipeline_lib.load_pipeline(str(tmp_path / "fp16"), variant="fp16").params, ours.params)
  # A folder of the variant's files alone (a hub download of fp16 files only) reads without variant=,
  # which `dreambooth_jax.sample --model` and the trainer's config cannot pass.
  jax.tree.map(same, pipeline_lib.load_pipeline(str(tmp_path / "fp16")).params, ours.params)
  os.remove(tmp_path / "fp16" / "text_encoder" / "model.fp16.safetensors")
  shutil.copy(os.path.join(root, "text_encoder", "model.safetensors"), tmp_path / "fp16" / "text_encoder")
  with caplog.at_level("WARNING"):
    mixed = pipeline_lib.load_pipeline(str(tmp_path / "fp16"), variant="fp16")
  assert [r.getMessage() for r in caplog.records if "text_encoder has no such files" in r.getMessage()]
  jax.tree.map(same, mixed.params, ours.params)
  with pytest.raises(CheckpointError, match="no component has variant='bf16' weights .variants here: fp16."):
    pipeline_lib.load_pipeline(str(tmp_path / "fp16"), variant="bf16")


def test_encode_prompt_equals_diffusers(torch_pipe, ours):
  _, pipe = torch_pipe
  with torch.no_grad():
    reference, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
  embeddings = pipeline_lib.encode_prompt(ours, ours.params, PROMPTS)
  assert embeddings.shape == (2, 77, 32)
  np.testing.assert_allclose(embeddings, reference.numpy(), atol=1e-4, rtol=0)
  mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = pipeline_lib.encode_prompt(ours, ours.params, PROMPTS, mesh=mesh)
  # The same maths over 2 devices: f32 sums in another order, a few ulp of values ~1 (1.07e-6 seen on an
  # AVX2-only CPU, session 19).
  np.testing.assert_allclose(sharded, embeddings, atol=1e-5, rtol=0)


@pytest.mark.slow  # ~15 s at load ~1.7: out of the fast subset (< 5 min); the schedulers' own parity tests stay in it
def test_generate_ddim_equals_diffusers_given_the_same_latents(torch_pipe, ours, initial_latents):
  _, pipe = torch_pipe
  reference = _diffusers_images(pipe, initial_latents, guidance_scale=4.0)  # [2, 16, 16, 3] in [0, 1]
  images = pipeline_lib.generate(ours, ours.params, PROMPTS, NEGATIVES, num_steps=STEPS,
                                 guidance_scale=4.0, sampler="ddim", output_type="float",
                                 latents=initial_latents.transpose(0, 2, 3, 1))
  assert images.shape == (2, 16, 16, 3) and images.dtype == np.float32
  assert float(np.std(reference)) > 0.02  # the comparison is not between two flat images
  np.testing.assert_allclose(images, reference, atol=1e-4, rtol=0)


@pytest.mark.slow  # ~10 s at low load: kept out of the fast subset (< 5 min)
def test_generate_without_guidance_uint8_and_rng(torch_pipe, ours, initial_latents):
  _, pipe = torch_pipe
  reference = _diffusers_images(pipe, initial_latents, guidance_scale=1.0)  # no CFG branch
  kwargs = dict(num_steps=STEPS, guidance_scale=1.0, sampler="ddim")
  images = pipeline_lib.generate(ours, ours.params, PROMPTS, NEGATIVES, **kwargs,
                                 latents=initial_latents.transpose(0, 2, 3, 1))
  assert images.dtype == np.uint8 and images.shape == (2, 16, 16, 3)
  assert np.abs(images.astype(int) - np.round(reference * 255).astype(int)).max() <= 1
  first = pipeline_lib.generate(ours, ours.params, PROMPTS, NEGATIVES, **kwargs, rng=jax.random.key(3))
  again = pipeline_lib.generate(ours, ours.params, PROMPTS, NEGATIVES, **kwargs, rng=3)  # an int seed: that key
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, images)
  # A mesh made with jax.make_mesh (Explicit axes) splits the batch as an Auto one does: the same images.
  explicit = jax.make_mesh((2,), ("data",))
  assert jax.sharding.AxisType.Explicit in explicit.axis_types
  on_mesh = pipeline_lib.generate(ours, ours.params, PROMPTS, NEGATIVES, **kwargs, rng=3, mesh=explicit)
  np.testing.assert_array_equal(on_mesh, first)


def test_save_pipeline_loads_in_diffusers_with_the_same_outputs(torch_pipe, ours, initial_latents,
                                                                tmp_path):
  _, pipe = torch_pipe
  pipeline_lib.save_pipeline(ours, str(tmp_path))
  reloaded = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path))
  reloaded.set_progress_bar_config(disable=True)
  for name in ("unet", "vae", "text_encoder"):
    original = getattr(pipe, name).state_dict()
    for key, value in getattr(reloaded, name).state_dict().items():
      torch.testing.assert_close(value, original[key], rtol=0, atol=0, msg=f"{name}: {key}")
  assert type(reloaded.scheduler).__name__ == "DDIMScheduler"
  ids = lambda tok: tok(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids  # noqa: E731
  assert ids(reloaded.tokenizer) == ids(pipe.tokenizer)
  np.testing.assert_array_equal(_diffusers_images(reloaded, initial_latents, guidance_scale=4.0),
                                _diffusers_images(pipe, initial_latents, guidance_scale=4.0))
  again = pipeline_lib.load_pipeline(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, again.params, ours.params)


def test_text_encoder_layers_and_sd2_pad_token_survive_save(torch_pipe, ours, tmp_path):
  root, pipe = torch_pipe
  # SD 2.x style: '!' (id 0) pads, and only the first 2 of 3 text layers condition the UNet.
  shutil.copytree(root, tmp_path / "sd2")
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    path = tmp_path / "sd2" / "tokenizer" / name
    if path.exists():
      content = json.loads(path.read_text())
      content["pad_token"] = "!"
      path.write_text(json.dumps(content))
  sd2 = pipeline_lib.load_pipeline(str(tmp_path / "sd2"), text_encoder_layers=2)
  assert sd2.tokenizer.pad_token_id == 0
  assert pipeline_lib.tokenize(sd2, "a dog")[0, -1] == 0
  ours_embeddings = pipeline_lib.encode_prompt(sd2, sd2.params, PROMPTS)
  pipeline_lib.save_pipeline(sd2, str(tmp_path / "saved"))
  reloaded = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "saved"))
  assert reloaded.text_encoder.config.num_hidden_layers == 2
  assert reloaded.tokenizer.pad_token == "!"
  with torch.no_grad():
    reference, _ = reloaded.encode_prompt(PROMPTS, "cpu", 1, False)
  np.testing.assert_allclose(ours_embeddings, reference.numpy(), atol=1e-4, rtol=0)


def test_clear_errors(torch_pipe, ours, tmp_path):
  root, _ = torch_pipe
  with pytest.raises(FileNotFoundError, match="no such directory"):
    pipeline_lib.load_pipeline(str(tmp_path / "nowhere"))
  shutil.copytree(root, tmp_path / "broken")
  shutil.rmtree(tmp_path / "broken" / "vae")
  with pytest.raises(CheckpointError, match="the 'vae' component is missing"):
    pipeline_lib.load_pipeline(str(tmp_path / "broken"))
  os.remove(tmp_path / "broken" / "model_index.json")
  with pytest.raises(CheckpointError, match="no model_index.json"):
    pipeline_lib.load_pipeline(str(tmp_path / "broken"))
  with pytest.raises(ValueError, match="unknown sampler 'heun'"):
    pipeline_lib.generate(ours, ours.params, "a dog", sampler="heun")
  with pytest.raises(ValueError, match="multiples of 2"):
    pipeline_lib.generate(ours, ours.params, "a dog", height=15)
  with pytest.raises(ValueError, match="2 negative prompts for 1 prompts"):
    pipeline_lib.generate(ours, ours.params, "a dog", ["x", "y"])
  with pytest.raises(ValueError, match=r"\[batch, height/2, width/2, channels\]"):  # this VAE's factor, not SD's 8
    pipeline_lib.generate(ours, ours.params, "a dog", latents=np.zeros((1, 2, 2, 4), np.float32))
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  with pytest.raises(ValueError, match="batch of 2 does not split over the mesh's 8-way"):
    pipeline_lib.encode_prompt(ours, ours.params, PROMPTS, mesh=mesh)


@pytest.mark.slow  # ~13 s at low load: kept out of the fast subset (< 5 min)
def test_sample_cli_writes_images_and_a_grid(torch_pipe, tmp_path, capsys):
  root, _ = torch_pipe
  out = tmp_path / "samples"
  # Guidance 1 and 2 images of 16 px: the program test_generate_without_guidance compiled.
  sample_cli.main(["--model", root, "--prompt", PROMPTS[0], "--negative-prompt", "blurry",
                   "--num-images", "2", "--steps", str(STEPS), "--sampler", "ddim", "--guidance", "1",
                   "--seed", "3", "--out", str(out)])
  names = sorted(os.listdir(out))
  assert names == ["grid.png", "prompt00_seed3.json", "prompt00_seed3.png", "prompt00_seed4.json",
                   "prompt00_seed4.png"], names
  from PIL import Image
  assert Image.open(out / "prompt00_seed3.png").size == (16, 16)
  assert json.loads((out / "prompt00_seed4.json").read_text())["prompt"] == PROMPTS[0]
  assert Image.open(out / "grid.png").width == 2 * (256 + 4) + 4  # a row of two, 16 px enlarged 16x
  assert "2/2 images" in capsys.readouterr().out


@pytest.mark.slow  # ~13 s at low load: kept out of the fast subset (< 5 min)
def test_generate_dpm_solver_on_a_mesh_equals_diffusers(torch_pipe, ours, initial_latents):
  root, pipe = torch_pipe
  # From the saved config, as `from_pretrained` would: an in-memory config's default-valued keys
  # (timestep_spacing) would be dropped on the way to another scheduler class.
  scheduler = diffusers.DPMSolverMultistepScheduler.from_pretrained(root, subfolder="scheduler")
  dpm = diffusers.StableDiffusionPipeline(**{**pipe.components, "scheduler": scheduler})
  dpm.set_progress_bar_config(disable=True)
  reference = _diffusers_images(dpm, initial_latents, guidance_scale=4.0)
  mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  images = pipeline_lib.generate(ours, ours.params, PROMPTS, NEGATIVES, num_steps=STEPS,
                                 guidance_scale=4.0, sampler="dpm++2m", output_type="float",
                                 latents=initial_latents.transpose(0, 2, 3, 1), mesh=mesh)
  np.testing.assert_allclose(images, reference, atol=1e-4, rtol=0)


@pytest.mark.slow  # ~12 s at low load: kept out of the fast subset (< 5 min)
def test_generate_at_zero_terminal_snr_is_finite(torch_pipe, ours, initial_latents):
  """Issue 12.4 through `generate`: SD1 betas rescaled to zero terminal SNR, v-prediction, trailing
  spacing, DDIM at eta = 1, 10 steps. diffusers' own pipeline gives NaN images on the AVX-512 hosts (its
  root of a rounded-negative 0; finite on an AVX2-only CPU, where that 0 rounds above: ZERO_SNR_ROOT_RTOL in
  tests/test_schedulers.py); ours are finite (the scheduler-level equality where diffusers is finite: there)."""
  _, pipe = torch_pipe
  config = dict(ours.scheduler_config, rescale_betas_zero_snr=True, prediction_type="v_prediction",
                timestep_spacing="trailing")
  reference = diffusers.StableDiffusionPipeline(
      **{**pipe.components, "scheduler": diffusers.DDIMScheduler.from_config(config)})
  reference.set_progress_bar_config(disable=True)
  with torch.no_grad():
    theirs = reference(prompt=PROMPTS, num_inference_steps=10, guidance_scale=1.0, eta=1.0,
                       latents=torch.from_numpy(initial_latents), output_type="np",
                       generator=torch.Generator().manual_seed(0)).images
  assert np.isnan(theirs).all() or np.isfinite(theirs).all()   # by the CPU's rounding, as above
  zero_snr = dataclasses.replace(ours, scheduler_config=config)
  images = pipeline_lib.generate(zero_snr, ours.params, PROMPTS, num_steps=10, guidance_scale=1.0,
                                 sampler="ddim", eta=1.0, output_type="float", rng=jax.random.key(0),
                                 latents=initial_latents.transpose(0, 2, 3, 1))
  assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
  assert float(np.std(images)) > 0.01


def test_sample_cli_help_and_bad_input(torch_pipe, tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    sample_cli.main(["--help"])
  assert exit_info.value.code == 0
  help_text = capsys.readouterr().out
  assert "--prompt" in help_text and "diffusers format" in help_text
  assert sample_cli.main(["--model", str(tmp_path / "nowhere"), "--prompt", "x", "--out", str(tmp_path)]) == 2
  assert "no such directory" in capsys.readouterr().err
  assert sample_cli.main(["--model", torch_pipe[0], "--prompt", "x", "--height", "15",
                          "--out", str(tmp_path)]) == 2
  assert "multiples of 2" in capsys.readouterr().err
  import dreambooth_jax
  assert dreambooth_jax.generate is pipeline_lib.generate  # the package exports the pipeline API
