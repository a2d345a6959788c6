"""DreamBooth: the loss, the identifier, class-image caching, training, resume and export."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from clip_jax.tokenizer import default_tokenizer
from configs.dreambooth.default import get_config
from dreambooth_jax.training import data as db_data
from dreambooth_jax.training import identifier as ident
from dreambooth_jax.training import lora as lora_lib
from dreambooth_jax.sampling import pipeline as sd
from dreambooth_jax.sampling import schedulers
from dreambooth_jax import train as db
from dreambooth_jax.embedded.tiny import SD_SCHEDULER
from killresume import kill_then_resume

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_sd_dir):
  return tiny_sd_dir  # conftest.py: made once per session


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("instance")
  for i in range(4):  # a red square that the random base model has never drawn
    pixels = np.full((40, 48, 3), 255, np.uint8)
    pixels[8:32, 10 + i:34 + i] = (220, 30, 30)
    Image.fromarray(pixels).save(directory / f"{i}.png")
  (directory / "broken.jpg").write_bytes(b"not an image")
  return str(directory)


def tiny_config(model_dir, instance_dir, *args, **overrides):
  c = get_config(",".join(("runlocal",) + args))
  c.pretrained_model, c.instance_dir, c.class_noun = model_dir, instance_dir, "square"
  c.dtype = "float32"
  c.progress_bar = False
  c.async_checkpoints = False
  c.eval_every = 0
  c.compilation_cache = ""
  c.update_from_flattened_dict(overrides)  # dotted keys, e.g. {"loss.kind": "sigmoid"}
  return c


# ----------------------------------------------------------------------------- loss
def test_loss_equals_naive_and_lambda_scales_only_the_prior_term():
  rng = np.random.default_rng(0)
  prediction, target = rng.normal(size=(2, 6, 4, 4, 4)).astype(np.float32)
  num_instance = 2
  naive_instance = np.mean((prediction[:2] - target[:2]) ** 2)
  naive_prior = np.mean((prediction[2:] - target[2:]) ** 2)
  for weight in (0.0, 1.0, 2.5):
    loss, parts = db.dreambooth_loss(jnp.asarray(prediction), jnp.asarray(target), num_instance, weight)
    np.testing.assert_allclose(parts["instance_loss"], naive_instance, rtol=1e-6)
    np.testing.assert_allclose(parts["prior_loss"], naive_prior, rtol=1e-6)
    np.testing.assert_allclose(loss, naive_instance + weight * naive_prior, rtol=1e-6)
  weights = rng.uniform(size=6).astype(np.float32)
  loss, _ = db.dreambooth_loss(jnp.asarray(prediction), jnp.asarray(target), num_instance, 1.0, jnp.asarray(weights))
  per = np.mean((prediction - target) ** 2, axis=(1, 2, 3)) * weights
  np.testing.assert_allclose(loss, per[:2].mean() + per[2:].mean(), rtol=1e-6)


def test_v_prediction_target_comes_from_the_scheduler_config():
  schedule = schedulers.NoiseSchedule.from_config(dict(SD_SCHEDULER, prediction_type="v_prediction"))
  x0, noise = jnp.ones((1, 2, 2, 4)), jnp.full((1, 2, 2, 4), 0.5)
  t = jnp.array([500])
  v = schedulers.training_target(schedule, x0, noise, t)
  alphas_cumprod = np.asarray(schedule.alphas_cumprod)
  alpha, sigma = np.sqrt(alphas_cumprod[500]), np.sqrt(1 - alphas_cumprod[500])
  np.testing.assert_allclose(v, alpha * 0.5 - sigma * 1.0, rtol=1e-5)


# ----------------------------------------------------------------------------- identifier
def test_identifier_is_rare_short_single_token_and_seeded():
  tokenizer = default_tokenizer()
  candidates = ident.candidate_identifiers(tokenizer)
  assert len(candidates) > 100
  for token_id, text in candidates:
    assert token_id >= ident.DEFAULT_RARE_RANGE[0] and len(text) <= 3 and " " not in text
    assert tokenizer.encode(f"a {text} dog") == [tokenizer.encode("a")[0], token_id, tokenizer.encode("dog")[0]]
  assert ident.sample_identifier(tokenizer, 3) == ident.sample_identifier(tokenizer, 3)
  assert len({ident.sample_identifier(tokenizer, s) for s in range(10)}) > 5
  assert len(ident.sample_identifier(tokenizer, 0, num_tokens=2).split()) == 2
  # With a prior check, the candidate with the lowest score wins.
  chosen = ident.sample_identifier(tokenizer, 0, prior_score=lambda v: float(len(v) + (v[0] > "m")))
  assert isinstance(chosen, str)


# ----------------------------------------------------------------------------- data
def test_class_images_top_up_equals_a_single_run(tmp_path):
  calls = []

  def generate(block):  # deterministic in the block, as the trainer's generator is
    calls.append(block)
    rng = np.random.default_rng(block)
    return rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)

  once = tmp_path / "once"
  assert db_data.top_up_class_images(str(once), 7, generate, 3) == 7
  interrupted = tmp_path / "interrupted"
  db_data.top_up_class_images(str(interrupted), 7, generate, 3)
  for name in ("class_00001.png", "class_00005.png", "class_00006.png"):
    os.remove(interrupted / name)
  (interrupted / "class_00002.png.tmp").write_bytes(b"half")  # a write cut short
  calls.clear()
  assert db_data.top_up_class_images(str(interrupted), 7, generate, 3) == 3
  assert calls == [0, 1, 2]
  for i in range(7):
    a = np.asarray(Image.open(once / f"class_{i:05d}.png"))
    b = np.asarray(Image.open(interrupted / f"class_{i:05d}.png"))
    np.testing.assert_array_equal(a, b)


def test_instance_batches_are_a_function_of_the_step(instance_dir):
  images, skipped = db_data.load_image_folder(instance_dir)
  assert len(images) == 4 and skipped == {"corrupt_image": ["broken.jpg"]}
  a = db_data.sample_batch(images, 2, 32, seed=0, step=5, stream=0)
  b = db_data.sample_batch(images, 2, 32, seed=0, step=5, stream=0)
  c = db_data.sample_batch(images, 2, 32, seed=0, step=6, stream=0)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (2, 32, 32, 3) and a.min() >= -1 and a.max() <= 1 and not np.array_equal(a, c)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    db_data.load_image_folder("/nonexistent/photos")


def test_files_left_out_of_the_photos_are_counted_by_reason_and_named(tmp_path):
  """A new user's folder: 5 photos, an iPhone .heic, notes, a corrupt jpg and the OS's files. The .heic
  was neither read nor counted ('5 images' of 6 photos), the corrupt file counted but not named."""
  for i in (1, 3, 4):
    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / f"IMG_000{i}.jpg")
  (tmp_path / "IMG_0002.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
  (tmp_path / "IMG_0005.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
  (tmp_path / "notes.txt").write_text("shot on my phone")
  (tmp_path / "IMG_0006.jpg").write_bytes(b"cut short")
  for name in (".DS_Store", "._IMG_0001.jpg", "Thumbs.db"):  # the OS's: passed over unsaid
    (tmp_path / name).write_bytes(b"\x00")
  (tmp_path / "edited").mkdir()
  images, skipped = db_data.load_image_folder(str(tmp_path))
  assert len(images) == 3
  assert skipped == {"not a readable image type (.heic)": ["IMG_0002.heic", "IMG_0005.HEIC"],
                     "corrupt_image": ["IMG_0006.jpg"], "not a readable image type (.txt)": ["notes.txt"]}
  said = db_data.describe_left_out(skipped)
  assert "2 not a readable image type (.heic): IMG_0002.heic, IMG_0005.HEIC" in said
  assert "1 corrupt_image: IMG_0006.jpg" in said and "notes.txt" in said and "convert HEIC" in said
  assert db_data.describe_left_out({"unused": [f"{i}.png" for i in range(5)]}) == "5 unused: 0.png, 1.png, 2.png and 2 more"


def test_a_folder_of_heic_photos_alone_says_what_it_holds(tmp_path):
  (tmp_path / "IMG_0002.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
  (tmp_path / ".DS_Store").write_bytes(b"\x00")
  with pytest.raises(ValueError, match=r"left out: 1 not a readable image type \(\.heic\): IMG_0002\.heic; convert"):
    db_data.load_image_folder(str(tmp_path))
  (tmp_path / "IMG_0002.heic").unlink()
  with pytest.raises(ValueError, match="left out: nothing, it is empty"):
    db_data.load_image_folder(str(tmp_path))


# ----------------------------------------------------------------------------- LoRA
@pytest.mark.slow  # builds the tiny SD folder (~45 s) at low load: kept out of the fast subset (< 5 min)
def test_lora_merge_starts_at_base_and_exports_peft_names(tiny_model_dir):
  pipe = sd.load_pipeline(tiny_model_dir)
  lora = lora_lib.init_lora(jax.random.key(1), pipe.params["unet"], rank=2)
  merged = lora_lib.merge(pipe.params["unet"], lora, alpha=2.0)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(pipe.params["unet"])):
    np.testing.assert_array_equal(a, b)
  key = next(iter(lora))
  lora[key]["up"] = jnp.ones_like(lora[key]["up"])
  merged = traverse_util.flatten_dict(lora_lib.merge(pipe.params["unet"], lora, alpha=4.0), sep="/")
  base = traverse_util.flatten_dict(pipe.params["unet"], sep="/")
  np.testing.assert_allclose(merged[key], base[key] + 2.0 * lora[key]["down"] @ lora[key]["up"], rtol=1e-6)
  state = lora_lib.to_diffusers_state_dict(jax.device_get(lora), alpha=4.0)
  name = [k for k in state if k.endswith("lora_B.weight")][0]
  assert name.startswith("unet.") and ".attn" in name and ".to_" in name


# ----------------------------------------------------------------------------- training
@pytest.mark.slow
def test_prior_preservation_run_writes_class_images_samples_and_a_diffusers_export(tmp_path, tiny_model_dir,
                                                                                    instance_dir):
  diffusers = pytest.importorskip("diffusers")
  torch = pytest.importorskip("torch")
  cfg = tiny_config(tiny_model_dir, instance_dir)
  cfg.eval_every = 4
  out = db.train_and_export(cfg, str(tmp_path))
  assert db_data.count_class_images(str(tmp_path / "class_images")) == cfg.num_class_images
  assert os.path.exists(tmp_path / "samples" / "step_000004.png")
  assert os.path.exists(tmp_path / "identifier.json")
  assert (tmp_path / "export" / "identifier.json").read_text() == (tmp_path / "identifier.json").read_text()
  assert "prior_loss" in out["metrics"]
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(out["export_dir"], safety_checker=None)
  image = pipe("a square", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
  assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


@pytest.mark.slow  # the tiny SD folder and a torch pipeline
def test_the_export_keeps_the_base_folders_safety_checker_and_feature_extractor(tmp_path, tiny_model_dir, caplog):
  """The export wrote [null, null] and requires_safety_checker false over an SD 1.5 base's safety
  checker: diffusers loaded it without one, and without a warning. A diffusers DreamBooth export keeps them."""
  import json
  import shutil
  diffusers = pytest.importorskip("diffusers")
  transformers = pytest.importorskip("transformers")
  from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
  base = tmp_path / "sd15"
  shutil.copytree(tiny_model_dir, base)
  tiny = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
  StableDiffusionSafetyChecker(transformers.CLIPConfig(
      text_config=tiny, vision_config=dict(tiny, image_size=32, patch_size=8), projection_dim=16)
  ).save_pretrained(base / "safety_checker")
  transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                                  ).save_pretrained(base / "feature_extractor")
  index = json.loads((base / "model_index.json").read_text())
  index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
               feature_extractor=["transformers", "CLIPImageProcessor"], requires_safety_checker=True)
  (base / "model_index.json").write_text(json.dumps(index))

  cfg = tiny_config(str(base), "unused", **{"train.mode": "full"})
  pipe = sd.load_pipeline(str(base))
  out = db.export(cfg, pipe, {"trainable": {"unet": pipe.params["unet"]}}, str(tmp_path / "export"))
  exported = json.loads((tmp_path / "export" / "model_index.json").read_text())
  assert exported["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
  assert exported["feature_extractor"] == ["transformers", "CLIPImageProcessor"]
  assert exported["requires_safety_checker"] is True
  for name in ("safety_checker", "feature_extractor"):
    for file in os.listdir(base / name):
      assert (base / name / file).read_bytes() == (tmp_path / "export" / name / file).read_bytes(), (name, file)
  loaded = diffusers.StableDiffusionPipeline.from_pretrained(out)
  assert isinstance(loaded.safety_checker, StableDiffusionSafetyChecker)
  assert isinstance(loaded.feature_extractor, transformers.CLIPImageProcessor)

  shutil.rmtree(base / "feature_extractor")  # named in the index, folder gone: left out, said
  sd.save_pipeline(pipe, str(tmp_path / "export2"), base_dir=str(base))
  assert "names a feature_extractor (CLIPImageProcessor) but there is no feature_extractor/ folder" in caplog.text
  exported = json.loads((tmp_path / "export2" / "model_index.json").read_text())
  assert exported["feature_extractor"] == [None, None] and exported["safety_checker"][1] == "StableDiffusionSafetyChecker"


def _cmd(workdir, model_dir, instance_dir, steps):
  return [sys.executable, "-m", "dreambooth_jax.train", "--config=configs/dreambooth/default.py:runlocal,lora",
          f"--workdir={workdir}", f"--config.pretrained_model={model_dir}", f"--config.instance_dir={instance_dir}",
          "--config.class_noun=square", "--config.dtype=float32", f"--config.total_steps={steps}",
          "--config.checkpoint_every=2", "--config.eval_every=0", "--config.progress_bar=False",
          "--config.num_class_images=2", "--config.class_generation.batch_size=2"]


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path, tiny_model_dir, instance_dir):
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  steps = 8
  subprocess.run(_cmd(tmp_path / "straight", tiny_model_dir, instance_dir, steps), cwd=REPO, env=env, check=True,
                 capture_output=True)
  workdir = tmp_path / "killed"
  kill_then_resume(_cmd(workdir, tiny_model_dir, instance_dir, steps), str(workdir), cwd=REPO, env=env)
  a = sd.load_pipeline(str(tmp_path / "straight" / "export")).params["unet"]
  b = sd.load_pipeline(str(workdir / "export")).params["unet"]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------- one loop, one vocabulary
def test_the_train_step_hands_its_gradient_norm_to_the_optimizer():
  """The optimizer gets the metrics' grad_norm as `global_norm` (`optim.apply_optimizer`), so
  `optim.clip_by_global_norm` does not reduce every gradient again: an SD UNet's 3.4 GB of f32
  gradients read once less per step (tests/test_loop.py counts the reductions)."""
  import optax
  from clip_jax import loop

  def loss_fn(trainable, frozen, pixels, tokens, row_keys):  # any differentiable loss of the rows
    loss = jnp.mean((pixels.reshape(pixels.shape[0], -1)[:, :3] @ trainable["w"] - frozen["b"]) ** 2)
    return loss, {"instance_loss": loss, "prior_loss": jnp.zeros(())}

  def keep_norm(updates, opt_state, params=None, *, global_norm=None, **extra_args):  # no update; norm kept
    return jax.tree.map(jnp.zeros_like, updates), {"global_norm": global_norm}
  recorder = optax.GradientTransformationExtraArgs(lambda params: {"global_norm": jnp.zeros(())}, keep_norm)
  trainable = {"w": jnp.asarray([[1.0], [-2.0], [0.5]])}
  state = {**loop.init_counters(), "trainable": trainable, "opt_state": recorder.init(trainable),
           "rng": jax.random.key(0)}
  batch = {"pixels": jnp.asarray(np.random.default_rng(0).normal(size=(4, 2, 2, 3)), jnp.float32),
           "tokens": jnp.zeros((4, 77), jnp.int32)}
  new_state, metrics = jax.jit(db.make_train_step(loss_fn, recorder, 1, 2))(state, batch, {"b": jnp.ones(())})
  assert float(metrics["grad_norm"]) > 0
  assert float(new_state["opt_state"]["global_norm"]) == float(metrics["grad_norm"])


def test_class_images_beyond_the_number_asked_are_left_out_and_said(tmp_path, capsys):
  """Issue 12.10: 7 class images on disk, num_class_images=4: the first 4 by name, and a line says so."""
  for i in range(7):
    Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(tmp_path / f"class_{i:05d}.png")
  cfg = get_config("runlocal")
  cfg.num_class_images = 4
  images = db.load_class_images(cfg, str(tmp_path))
  assert [int(np.asarray(im)[0, 0, 0]) for im in images] == [0, 20, 40, 60]
  said = capsys.readouterr().out
  assert "Using 4 of the class images" in said and "3 more are left out" in said
  cfg.num_class_images = 9
  assert len(db.load_class_images(cfg, str(tmp_path))) == 7
  assert "Only 7 class images" in capsys.readouterr().out
  # A user's own class_dir with too few: the line says what happens (trains on those; none generated).
  (tmp_path / "class_00009.png").write_bytes(b"cut short")
  cfg.class_dir = str(tmp_path)
  assert len(db.load_class_images(cfg, str(tmp_path))) == 7
  said = capsys.readouterr().out
  assert "Class images left out of" in said and "1 corrupt_image: class_00009.png" in said
  assert "the prior loss uses these 7; none are generated into a class_dir of your own" in said


def test_training_batch_lays_out_micro_batches_for_the_devices():
  """Each micro-batch that `split_microbatches` recovers is [its instance rows; its class rows]."""
  from clip_jax.sharding import split_microbatches
  instance = [Image.fromarray(np.full((4, 4, 3), v, np.uint8)) for v in (0, 10, 20, 30)]
  classes = [Image.fromarray(np.full((4, 4, 3), v, np.uint8)) for v in (200, 210, 220, 230)]
  kwargs = dict(global_batch=4, size=4, seed=0, step=3, random_crop=False, flip=False)
  whole = db_data.training_batch(instance, classes, np.array([1, 1]), np.array([2, 2]), microbatches=1, **kwargs)
  split = db_data.training_batch(instance, classes, np.array([1, 1]), np.array([2, 2]), microbatches=2, **kwargs)
  micro = np.asarray(split_microbatches(split["pixels"], 2))      # [2, 4, 4, 4, 3]
  tokens = np.asarray(split_microbatches(split["tokens"], 2))     # [2, 4, 2]
  for j in range(2):
    np.testing.assert_array_equal(micro[j, :2], whole["pixels"][2 * j:2 * j + 2])   # instance rows
    np.testing.assert_array_equal(micro[j, 2:], whole["pixels"][4 + 2 * j:6 + 2 * j])  # class rows
    assert tokens[j, :2].tolist() == [[1, 1]] * 2 and tokens[j, 2:].tolist() == [[2, 2]] * 2


@pytest.mark.slow
def test_microbatches_give_the_full_batch_loss_and_gradient(tiny_model_dir, instance_dir):
  import optax
  from clip_jax import loop, sharding
  pipe = sd.load_pipeline(tiny_model_dir)
  schedule = schedulers.NoiseSchedule.from_config(pipe.scheduler_config)
  images, _ = db_data.load_image_folder(instance_dir)
  tokens = sd.tokenize(pipe, ["a sks square", "a square"])
  trainable = {"unet": pipe.params["unet"]}
  tx = optax.sgd(1.0)
  state = {**loop.init_counters(), "trainable": trainable, "opt_state": tx.init(trainable), "rng": jax.random.key(0)}
  results = []
  for k in (1, 2):
    loss_fn = db.make_loss_fn(pipe, schedule, num_instance=4 // k, params_fn=lambda f, t: {**f, **t})
    batch = db_data.training_batch(images, images, tokens[0], tokens[1], global_batch=4, microbatches=k, size=32,
                                   seed=0, step=0)
    mesh = sharding.create_mesh({"data": 8})
    step = jax.jit(db.make_train_step(loss_fn, tx, k, 4 // k))
    results.append(step(state, sharding.place_global_batch(batch, mesh), pipe.params))
  (state_1, metrics_1), (state_2, metrics_2) = results
  for key in ("loss", "instance_loss", "prior_loss", "grad_norm"):
    np.testing.assert_allclose(metrics_2[key], metrics_1[key], rtol=2e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(state_2["trainable"]), jax.tree.leaves(state_1["trainable"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _photos_and_classes_config(tmp_path, count: int):
  """`count` instance photos IMG_i.png and class images ci.png (8x8 greys), a run folder and the
  runlocal config naming them (2 class images used)."""
  photos, classes, workdir = tmp_path / "photos", tmp_path / "classes", tmp_path / "run"
  photos.mkdir()
  classes.mkdir()
  for i in range(count):
    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(photos / f"IMG_{i}.png")
    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(classes / f"c{i}.png")
  cfg = get_config("runlocal")
  cfg.pretrained_model, cfg.instance_dir, cfg.class_noun, cfg.class_dir = "sd", str(photos), "toy", str(classes)
  cfg.num_class_images = 2
  return photos, classes, workdir, cfg


def test_a_resume_after_the_photos_changed_is_refused_by_name(tmp_path):
  """A new user's Ctrl-C, photos swapped, same command: it resumed silently on other photos. The photos
  (and a class_dir of the user's own) are compared by name and content as `train_and_export` does
  through `loop.check_workdir`; --allow-config-change goes on and records the change."""
  import json

  from clip_jax import loop
  from clip_jax.cli import UserError
  photos, classes, workdir, cfg = _photos_and_classes_config(tmp_path, 3)

  def resume(allow=False):
    return loop.check_workdir(str(workdir), db.config_with_images(cfg, str(workdir)), total_steps=cfg.total_steps,
                              allow_config_change=allow)
  assert not resume()  # the first start records the photos
  recorded = json.loads((workdir / "config.json").read_text())["instance_images"]
  assert set(recorded) == {f"IMG_{i}.png" for i in range(3)}
  (workdir / "checkpoints" / "2").mkdir(parents=True)  # an interrupted run
  assert not resume()  # the same photos: resumes
  (photos / "IMG_1.png").unlink()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photos / "IMG_5.png")
  with pytest.raises(UserError, match=r"instance_images\.IMG_1\.png: '[0-9a-f]+' -> None.*IMG_5\.png"):
    resume()
  Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(classes / "c0.png")  # replaced, same name
  with pytest.raises(UserError, match=r"class_images\.c0\.png"):
    resume()
  Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(classes / "c9.png")  # beyond num_class_images: unused
  assert "c9.png" not in db.config_with_images(cfg, str(workdir))["class_images"]
  assert not resume(allow=True)
  record = json.loads((workdir / "config_changes.jsonl").read_text().splitlines()[-1])
  assert record["allowed"] and "instance_images.IMG_5.png" in record["changes"]
  assert not resume()  # the new photos are now the run's


def test_a_workdir_from_before_photos_were_recorded_resumes(tmp_path):
  import json

  from clip_jax import loop
  cfg = get_config("runlocal")
  cfg.pretrained_model, cfg.instance_dir, cfg.class_noun = "sd", str(tmp_path / "gone"), "toy"
  (tmp_path / "config.json").write_text(cfg.to_json_best_effort())
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)
  assert db.config_with_images(cfg, str(tmp_path)) is cfg
  assert not loop.check_workdir(str(tmp_path), db.config_with_images(cfg, str(tmp_path)), total_steps=cfg.total_steps)
  assert "instance_images" not in json.loads((tmp_path / "config.json").read_text())


def test_a_finished_run_with_recorded_photos_is_finished_again_with_the_same_command(tmp_path):
  """The regression: a finished workdir's config.json records its photos, and config_with_images gave a
  finished run the config alone, so the same command (and --rerun-eval) read the photos as removed
  ('instance_images.IMG_0.png: ... -> None') instead of saying the run is finished."""
  import json

  from clip_jax import loop
  photos, classes, workdir, cfg = _photos_and_classes_config(tmp_path, 2)

  def again(**kwargs):
    return loop.check_workdir(str(workdir), db.config_with_images(cfg, str(workdir)), total_steps=cfg.total_steps,
                              log=lines.append, **kwargs)
  lines = []
  assert not again()  # the trainer's start records the photos
  recorded = json.loads((workdir / "config.json").read_text())
  assert set(recorded["instance_images"]) == {"IMG_0.png", "IMG_1.png"} and set(recorded["class_images"]) == {
      "c0.png", "c1.png"}
  (workdir / "checkpoints" / str(cfg.total_steps)).mkdir(parents=True)
  loop.mark_finished(str(workdir), cfg.total_steps)  # as the trainer marks it
  files = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  assert again() is True  # the same command: finished, one line
  assert len(lines) == 1 and "is finished" in lines[0] and "nothing was changed" in lines[0]
  assert again(rerun_eval=True) is False  # --rerun-eval goes on to evaluate, no settings error
  import shutil
  shutil.rmtree(photos)  # a finished run needs no photos, as before they were recorded
  assert again() is True
  assert again(rerun_eval=True) is False
  assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == files  # nothing touched


def test_the_resume_record_names_exactly_the_photos_training_reads(tmp_path):
  """image_fingerprints lists what load_image_folder reads: hidden files, other types, subfolders and
  unreadable files are passed over, and `limit` counts readable images. With limit 2 training reads
  IMG_1.jpg and a.png; the record was ['._IMG_1.jpg', 'IMG_0.jpg'] and missed a replaced a.png."""
  from clip_jax import loop
  from clip_jax.cli import UserError
  from dreambooth_jax.training import data as db_data
  classes, workdir = tmp_path / "classes", tmp_path / "run"
  classes.mkdir()
  (classes / "._IMG_1.jpg").write_bytes(b"macOS resource fork")  # hidden: nobody's photo
  (classes / "IMG_0.jpg").write_bytes(b"not a jpeg")  # corrupt: left out, not counted
  Image.fromarray(np.full((8, 8, 3), 10, np.uint8)).save(classes / "IMG_1.jpg")
  Image.fromarray(np.full((8, 8, 3), 20, np.uint8)).save(classes / "a.png")
  Image.fromarray(np.full((8, 8, 3), 30, np.uint8)).save(classes / "b.png")  # beyond the limit
  (classes / "folder.png").mkdir()  # not a file
  images, skipped = db_data.load_image_folder(str(classes), "class", limit=2)
  assert len(images) == 2 and skipped["unused"] == ["b.png"] and skipped["corrupt_image"] == ["IMG_0.jpg"]
  assert list(db_data.image_fingerprints(str(classes), "class", limit=2)) == ["IMG_1.jpg", "a.png"]
  assert [name for name, _, _ in db_data.read_image_folder(str(classes), "class", limit=2)[0]] == [
      "IMG_1.jpg", "a.png"]

  cfg = get_config("runlocal")
  cfg.pretrained_model, cfg.instance_dir, cfg.class_noun, cfg.class_dir = "sd", str(classes), "toy", str(classes)
  cfg.num_class_images = 2

  def resume():
    return loop.check_workdir(str(workdir), db.config_with_images(cfg, str(workdir)), total_steps=cfg.total_steps)
  assert not resume()
  (workdir / "checkpoints" / "2").mkdir(parents=True)  # an interrupted run
  (classes / "._IMG_1.jpg").write_bytes(b"another resource fork")  # ignored by training: no change
  assert not resume()
  Image.fromarray(np.full((8, 8, 3), 99, np.uint8)).save(classes / "a.png")  # replaced, used by training
  with pytest.raises(UserError, match=r"class_images\.a\.png"):
    resume()


def test_a_resolution_the_vae_cannot_encode_whole_is_refused_at_start(tmp_path):
  """--config.resolution=60 trained on 7x7 latents where dreambooth_jax.sample refuses 60."""
  import json
  (tmp_path / "vae").mkdir()
  (tmp_path / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
  cfg = get_config("runlocal")
  cfg.pretrained_model, cfg.class_noun, cfg.resolution = str(tmp_path), "toy", 60
  with pytest.raises(ValueError, match=r"resolution must be a multiple of 8 .*got 60; e\.g\. 64\.$"):
    db.validate_config(cfg)
  cfg.resolution = 64
  db.validate_config(cfg)


def test_a_single_file_checkpoint_or_a_hub_id_says_what_to_do(tmp_path, monkeypatch):
  """A civitai .safetensors or 'runwayml/stable-diffusion-v1-5' got 'no such directory'."""
  from clip_jax.cli import MissingPathError, UserError
  for name in ("mymodel.safetensors", "mymodel.ckpt"):
    (tmp_path / name).write_bytes(b"weights")
    with pytest.raises(UserError, match=r"single-file checkpoint.*from_single_file\(.*" + name
                       + r".*\)\.save_pretrained\(DIR\)"):
      sd.load_pipeline(str(tmp_path / name))
  monkeypatch.chdir(tmp_path)
  with pytest.raises(MissingPathError, match="hub id, nothing is downloaded here: download the folder first"):
    sd.check_pipeline_path("runwayml/stable-diffusion-v1-5")
  cfg = get_config("runlocal")
  cfg.pretrained_model, cfg.class_noun = "runwayml/stable-diffusion-v1-5", "toy"
  with pytest.raises(MissingPathError, match="huggingface-cli download runwayml/stable-diffusion-v1-5"):
    db.validate_config(cfg)  # the trainer refuses it before any work
  with pytest.raises(MissingPathError, match="expected a diffusers Stable Diffusion pipeline folder"):
    sd.check_pipeline_path(str(tmp_path / "no_sd"))


def test_the_finished_run_prints_a_sample_command_that_parses():
  import shlex

  from clip_jax import cli
  from dreambooth_jax import sample
  line = db.sample_command("/runs/my dog/export", "sks", "dog", "/runs/my dog/samples")
  args = shlex.split(line.split(": ", 1)[1])
  assert args[:3] == [cli.shown_python(), "-m", "dreambooth_jax.sample"]
  parsed = sample.parse_args(args[3:])
  assert parsed.model == "/runs/my dog/export" and parsed.prompt == ["a sks dog", "a dog"]
  assert parsed.out == "/runs/my dog/samples"


def test_the_finished_run_prints_an_evaluation_command_with_the_runs_identifier():
  """A new user evaluated with WORKSPACE's `--identifier sks` while the trainer had picked 'sqm'."""
  import shlex

  from clip_jax import cli
  line = db.evaluate_command("/runs/my toy/export", "sqm", "toy", "/photos", "/runs/my toy/eval")
  args = shlex.split(line.split(": ", 1)[1])
  assert args[:3] == [cli.shown_python(), "-m", "dreambooth_jax.evaluate"]
  assert args[args.index("--identifier") + 1] == "sqm" and args[args.index("--model") + 1] == "/runs/my toy/export"
  assert args[args.index("--class-noun") + 1] == "toy" and args[args.index("--instance-dir") + 1] == "/photos"
