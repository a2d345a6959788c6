"""StyleCLIP's three methods (clip_jax.styleclip) on the tiny SD's VAE decoder, and the edit CLI."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clip_jax
from clip_jax import cli, guidance, styleclip
from dreambooth_jax import edit
from dreambooth_jax.embedded.tiny import make_tiny_pipeline, tiny_configs
from dreambooth_jax.models.vae import AutoencoderKL
from dreambooth_jax.models.vae import init_inputs as vae_inputs
from dreambooth_jax.sampling import pipeline as sd


@pytest.fixture(scope="module")
def setup():
  """A random tiny SD (its VAE is the generator), a random tiny CLIP, two texts' embeddings, and
  latents of smooth random images: 8 to train a mapper / direction on, 2 unseen ones to edit."""
  vae = AutoencoderKL(tiny_configs()[1])
  vae_params = jax.jit(vae.init)(jax.random.key(0), *vae_inputs(vae.config))["params"]
  generator, encoder = edit.vae_generator(vae, vae_params, vae.config.scaling_factor)
  model = clip_jax.create_model("ViT-Tiny")
  variables = clip_jax.init_variables(model, jax.random.key(1))
  tokenizer = clip_jax.get_tokenizer("clip", context_length=32)
  neutral_emb, target_emb = guidance.encode_prompts(model, variables, tokenizer, ["a photo of a dog", "a red car"])
  smooth = jax.image.resize(jax.random.uniform(jax.random.key(2), (10, 8, 8, 3)), (10, 32, 32, 3), "linear")
  latents = jax.jit(encoder)(smooth)
  return dict(generator=jax.jit(generator), vae=vae, vae_params=vae_params, model=model, variables=variables, neutral=neutral_emb,
              target=target_emb, train=latents[:8], unseen=latents[8:])


def _clip_loss(s):
  return edit.make_clip_loss(s["model"], s["variables"], s["target"], guidance.NO_AUGMENTATION)


def _distance(s, latents):
  """1 - cos to the target text, per image."""
  return edit.clip_distances(s["model"], s["variables"], s["generator"](latents), s["target"])[0]


def _latent_l2(a, b):
  return np.sqrt(np.sum(np.square(np.asarray(a - b)), axis=(1, 2, 3)))


@pytest.mark.slow  # ~27 s with its setup at low load: kept out of the fast subset (< 5 min)
def test_latent_optimization_reduces_clip_loss_and_l2_holds_the_latent(setup):
  s = setup
  before = _distance(s, s["unseen"])
  runs = {}
  for l2_weight in (0.0, 0.05):
    settings = styleclip.OptimizeSettings(steps=40, l2_weight=l2_weight)
    w, history = styleclip.optimize_latents(s["generator"], _clip_loss(s), s["unseen"], jax.random.key(0), settings)
    runs[l2_weight] = w
    after = _distance(s, w)
    assert np.all(after < before - 0.01), (before, after)
    assert history["clip"].shape == (40, 2) and np.all(np.asarray(history["l2"][0]) == 0)
  # The L2 term holds the latent near the source: the weighted run moves it less.
  assert np.all(_latent_l2(runs[0.05], s["unseen"]) < 0.8 * _latent_l2(runs[0.0], s["unseen"]))


@pytest.mark.slow  # ~10 s at low load: kept out of the fast subset (< 5 min)
def test_gray_generator_and_the_clip_loss_options(setup):
  s = setup
  gray, _ = edit.vae_generator(s["vae"], s["vae_params"], s["vae"].config.scaling_factor, gray=True)
  colour = np.asarray(s["generator"](s["unseen"]))
  np.testing.assert_allclose(gray(s["unseen"]), np.repeat(colour.mean(-1, keepdims=True), 3, -1), atol=1e-6)
  # scan_size and a negative prompt: -cos(E(through 8 px), target) + 0.3 cos(E(through 8 px), negative).
  loss = edit.make_clip_loss(s["model"], s["variables"], s["target"], guidance.NO_AUGMENTATION, scan_size=8,
                             negative_emb=s["neutral"][None])
  emb = np.asarray(guidance.image_embeddings(s["model"], s["variables"],
                                             guidance.through_resolution(jnp.asarray(colour), 8)))
  expected = -emb @ np.asarray(s["target"]) + 0.3 * emb @ np.asarray(s["neutral"])
  np.testing.assert_allclose(loss(jnp.asarray(colour), None), expected, atol=1e-5)


@pytest.mark.slow  # ~9 s at low load: kept out of the fast subset (< 5 min)
def test_identity_term_keeps_the_embedder_close(setup):
  s = setup
  settings = styleclip.OptimizeSettings(steps=40, l2_weight=0.0, id_weight=5.0)
  embedder = lambda images: images.reshape(images.shape[0], -1) - 0.5  # noqa: E731  a pixel "identity"
  source = s["generator"](s["unseen"])
  w_free, _ = styleclip.optimize_latents(s["generator"], _clip_loss(s), s["unseen"], jax.random.key(0),
                                         dataclasses.replace(settings, id_weight=0.0))
  w_id, _ = styleclip.optimize_latents(s["generator"], _clip_loss(s), s["unseen"], jax.random.key(0), settings,
                                       embedder=embedder)
  loss = lambda w: styleclip.identity_loss(embedder, s["generator"](w), source)  # noqa: E731
  assert np.all(np.asarray(loss(w_id)) < np.asarray(loss(w_free)))


@pytest.mark.slow
def test_mapper_trained_on_some_latents_edits_unseen_ones(setup):
  s = setup
  before = _distance(s, s["unseen"])
  residual = {}
  for l2_weight in (0.0, 50.0):
    settings = styleclip.MapperSettings(steps=60, batch_size=4, hidden=64, layers=2, l2_weight=l2_weight)
    mapper, params, history = styleclip.train_mapper(s["generator"], _clip_loss(s), s["train"], jax.random.key(0),
                                                     settings)
    mapped = styleclip.apply_mapper(mapper, params, s["unseen"])
    residual[l2_weight] = _latent_l2(mapped, s["unseen"])
    assert np.all(_distance(s, mapped) < before - 0.01)   # transfers to latents it never saw
    assert float(np.mean(history["clip"][-10:])) < float(np.mean(history["clip"][:10]))
  assert np.all(residual[50.0] < 0.8 * residual[0.0])


@pytest.mark.slow
def test_global_direction_from_texts_edits_unseen_latents(setup):
  s = setup
  embed = lambda images: guidance.image_embeddings(s["model"], s["variables"], images)  # noqa: E731
  delta_i, sigma = styleclip.coordinate_directions(s["generator"], embed, s["train"])
  assert delta_i.shape == s["train"].shape[1:] + (64,)
  delta_t = styleclip.text_direction(s["neutral"], s["target"])
  # Delta i is the Jacobian times sigma: check one coordinate against a finite difference.
  coord = (1, 2, 3)
  eps = 1e-2
  bump = jnp.zeros_like(s["train"]).at[(slice(None),) + coord].set(eps * sigma[coord])
  fd = jnp.mean((embed(s["generator"](s["train"] + bump)) - embed(s["generator"](s["train"] - bump))) / (2 * eps), 0)
  # f32 central differences through a generator that clips pixels to [0, 1] (a pixel crossing the
  # bound inside +-eps bends the difference): agreement to 5% of the largest component.
  np.testing.assert_allclose(delta_i[coord], fd, rtol=0.05, atol=0.05 * float(jnp.abs(fd).max()))
  direction = styleclip.global_direction(delta_i, sigma, delta_t, beta=0.05)
  kept = int(jnp.sum(direction != 0))
  assert 0 < kept < direction.size  # beta drops the coordinates unrelated to the edit
  projection = lambda w: np.asarray(embed(s["generator"](w)) @ delta_t)  # noqa: E731
  edited = styleclip.apply_direction(s["unseen"], direction, alpha=1.0)
  assert np.all(projection(edited) > projection(s["unseen"]))        # moved along Delta t, unseen images
  assert np.all(_distance(s, edited) < _distance(s, s["unseen"]))   # and closer to the target text
  with pytest.raises(ValueError, match="keeps no latent coordinate"):
    styleclip.global_direction(delta_i, sigma, delta_t, beta=1.5)


@pytest.fixture(scope="module")
def cli_inputs(setup, tmp_path_factory):
  from PIL import Image
  root = tmp_path_factory.mktemp("edit")
  model_dir = sd.save_pipeline(make_tiny_pipeline(jax.random.key(0)), str(root / "sd"))
  clip_dir = clip_jax.export_hf(setup["model"], setup["variables"], str(root / "clip"))
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "in.png")
  return root, model_dir, clip_dir


@pytest.mark.slow
def test_edit_cli_writes_image_strip_and_numbers(cli_inputs):
  root, model_dir, clip_dir = cli_inputs
  out = root / "out"
  assert edit.main(["--model", model_dir, "--clip", clip_dir, "--image", str(root / "in.png"), "--neutral", "a dog",
                    "--target", "a red car", "--method", "optimize", "--steps", "20", "--out", str(out)]) == 0
  result = json.loads((out / "result.json").read_text())
  assert result["clip_to_target"]["after"] < result["clip_to_target"]["before"]
  from PIL import Image
  assert Image.open(out / "strip.png").size == (3 * 32 + 4, 32) and Image.open(out / "edited.png").size == (32, 32)


@pytest.mark.slow  # the tiny SD's sampling and the mapper's compile
def test_mapper_saves_the_sd_samples_it_was_trained_on(cli_inputs):
  root, model_dir, clip_dir = cli_inputs
  out = root / "out_mapper"
  assert edit.main(["--model", model_dir, "--clip", clip_dir, "--image", str(root / "in.png"), "--neutral", "a dog",
                    "--target", "a red car", "--method", "mapper", "--steps", "2", "--num-train", "3",
                    "--out", str(out)]) == 0
  record = json.loads((out / "result.json").read_text())["train_images"]
  assert record["source"] == "sampled" and record["sampled"]["prompt"] == "a dog"
  assert (record["count"], record["size"], record["grid"], record["folder"]) == (3, [32, 32], "train_images.png",
                                                                                  "train_images/")
  from PIL import Image
  assert sorted(p.name for p in (out / "train_images").iterdir()) == ["000.png", "001.png", "002.png"]
  assert Image.open(out / "train_images" / "000.png").size == (32, 32) and (out / "train_images.png").exists()
  # The folder is what --train-images reads: the same samples again, no sampling.
  again, _, _, refit = edit.read_train_images(str(out / "train_images"), 32, 32)
  assert again.shape == (3, 32, 32, 3) and refit == {}


@pytest.mark.slow  # the global direction's Jacobians on the tiny SD's VAE
def test_global_direction_from_train_images_of_mixed_sizes(cli_inputs, capsys):
  from PIL import Image
  root, model_dir, clip_dir = cli_inputs
  folder = root / "mixed"
  folder.mkdir()
  rng = np.random.default_rng(1)
  sizes = {"a.png": (32, 32), "b.png": (40, 48), "c.jpg": (28, 20)}  # (h, w): was np.concatenate's traceback
  for name, (h, w) in sizes.items():
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name)
  out = root / "out_global"
  assert edit.main(["--model", model_dir, "--clip", clip_dir, "--image", str(root / "in.png"), "--neutral", "a dog",
                    "--target", "a red car", "--method", "global", "--beta", "0.0", "--train-images", str(folder),
                    "--out", str(out)]) == 0
  line = ("--train-images: 2 of 3 photos are not 32x32, the size of --image (the edit works on latents of its "
          "shape): each resized to cover it (bicubic) and centre-cropped: b.png 48x40, c.jpg 20x28.")
  assert line in capsys.readouterr().out
  record = json.loads((out / "result.json").read_text())["train_images"]
  assert record["source"] == str(folder) and record["files"] == sorted(sizes) and record["size"] == [32, 32]
  used, _, _, _ = edit.read_train_images(str(folder), 32, 32)
  saved = np.stack([np.asarray(Image.open(out / "train_images" / f"{i:03d}.png")) for i in range(3)])
  np.testing.assert_array_equal(saved, np.round(used * 255).astype(np.uint8))


def test_edit_cli_errors_are_one_line(tmp_path):
  from PIL import Image
  Image.fromarray(np.zeros((30, 32, 3), np.uint8)).save(tmp_path / "odd.png")
  # The checks of texts and paths run before anything loads; the model folder only has to exist.
  base = ["--model", str(tmp_path), "--clip", str(tmp_path), "--image", str(tmp_path / "odd.png"), "--neutral", "a dog",
          "--target", "a red car", "--method", "optimize", "--out", str(tmp_path)]

  def args(**changes):
    out = list(base)
    for flag, value in changes.items():
      out[out.index("--" + flag) + 1] = value
    return out

  with pytest.raises(cli.UserError, match="--target is empty"):
    edit.main(args(target=" "))
  with pytest.raises(cli.MissingPathError, match="--clip .*no such file or directory"):
    edit.main(args(clip=str(tmp_path / "missing")))
  with pytest.raises(cli.MissingPathError, match="--model .*no such file or directory"):
    edit.main(args(model=str(tmp_path / "missing_sd")))
  # What main runs on the image once the model is loaded (its VAE's downscale: 4 for the tiny SD).
  with pytest.raises(cli.UserError, match=r"is 32x30; this model's VAE needs sides that are multiples of 4"):
    edit.load_image(str(tmp_path / "odd.png"), 4)
  with pytest.raises(cli.MissingPathError, match="no such file"):
    edit.load_image(str(tmp_path / "none.png"), 4)
