"""DreamBooth: the loss, the identifier, class-image caching, training, resume and export."""
import os
import signal
import subprocess
import sys
import time

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
from dreambooth_jax.embedded.tiny import SD_SCHEDULER, make_tiny_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _has_checkpoint(workdir) -> bool:
  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("tiny_sd"))
  sd.save_pipeline(make_tiny_pipeline(jax.random.key(0)), directory)
  return directory


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
  c.validation.every = 0
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
  assert len(images) == 4 and skipped == {"corrupt_image": 1}
  a = db_data.sample_batch(images, 2, 32, seed=0, step=5, stream=0)
  b = db_data.sample_batch(images, 2, 32, seed=0, step=5, stream=0)
  c = db_data.sample_batch(images, 2, 32, seed=0, step=6, stream=0)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (2, 32, 32, 3) and a.min() >= -1 and a.max() <= 1 and not np.array_equal(a, c)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    db_data.load_image_folder("/nonexistent/photos")


# ----------------------------------------------------------------------------- LoRA
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
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_training_lowers_instance_loss_and_touches_only_trained_params(tmp_path, tiny_model_dir, instance_dir, mode):
  steps = 30
  cfg = tiny_config(tiny_model_dir, instance_dir, *(("lora",) if mode == "lora" else ()),
                    with_prior_preservation=False, random_crop=False, flip=False, checkpoint_every=1000)
  cfg.optimizer.total_steps = steps
  cfg.optimizer.learning_rate = 5e-3 if mode == "lora" else 1e-3
  cfg.train.lora_rank = 8
  pipe = sd.load_pipeline(tiny_model_dir)
  schedule = schedulers.NoiseSchedule.from_config(pipe.scheduler_config)
  loss_fn = jax.jit(db.make_loss_fn(cfg, pipe, schedule, num_instance=4))
  images, _ = db_data.load_image_folder(instance_dir)
  pixels = jnp.asarray(db_data.sample_batch(images, 4, 32, 0, 0, 0, random_crop=False, flip=False))
  tokens = jnp.asarray(sd.tokenize(pipe, ["a sks square"] * 4))

  def held_out_loss(trainable):  # same noise and timesteps before and after training
    return float(np.mean([loss_fn(trainable, pipe.params, pixels, tokens, jax.random.key(100 + i))[0]
                          for i in range(8)]))

  before = held_out_loss(db.init_trainable(cfg, pipe, jax.random.key(cfg.seed)))
  cfg.identifier = "sks"
  out = db.train_and_export(cfg, str(tmp_path))
  trained = jax.device_get(out["state"]["trainable"])
  after = held_out_loss(trained)
  assert after < 0.9 * before, (before, after)
  # Only the trained parameters moved.
  assert set(trained) == ({"unet_lora"} if mode == "lora" else {"unet"})
  for name in ("vae", "text_encoder") + (("unet",) if mode == "lora" else ()):
    for a, b in zip(jax.tree.leaves(jax.device_get(out["frozen"][name])), jax.tree.leaves(pipe.params[name])):
      np.testing.assert_array_equal(a, b)
  assert os.path.exists(tmp_path / "plots" / "loss.png")
  exported = sd.load_pipeline(out["export_dir"])
  expected = db.model_params(cfg, pipe.params, trained)["unet"]
  for a, b in zip(jax.tree.leaves(exported.params["unet"]), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.slow
def test_prior_preservation_run_writes_class_images_samples_and_a_diffusers_export(tmp_path, tiny_model_dir,
                                                                                    instance_dir):
  diffusers = pytest.importorskip("diffusers")
  torch = pytest.importorskip("torch")
  cfg = tiny_config(tiny_model_dir, instance_dir)
  cfg.validation.every = 4
  out = db.train_and_export(cfg, str(tmp_path))
  assert db_data.count_class_images(str(tmp_path / "class_images")) == cfg.num_class_images
  assert os.path.exists(tmp_path / "samples" / "step_000004.png")
  assert os.path.exists(tmp_path / "identifier.json")
  assert "prior_loss" in out["metrics"]
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(out["export_dir"], safety_checker=None)
  image = pipe("a square", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
  assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


@pytest.mark.slow
def test_clear_errors(tmp_path, tiny_model_dir, instance_dir):
  with pytest.raises(ValueError, match="class_noun is empty"):
    db.train_and_export(tiny_config(tiny_model_dir, instance_dir, class_noun=""), str(tmp_path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    db.train_and_export(tiny_config(tiny_model_dir, "/nonexistent/photos"), str(tmp_path))
  with pytest.raises(ValueError, match="train.mode"):
    db.train_and_export(tiny_config(tiny_model_dir, instance_dir, **{"train.mode": "dora"}), str(tmp_path))


def _cmd(workdir, model_dir, instance_dir, steps):
  return [sys.executable, "-m", "dreambooth_jax.train", "--config=configs/dreambooth/default.py:runlocal,lora",
          f"--workdir={workdir}", f"--config.pretrained_model={model_dir}", f"--config.instance_dir={instance_dir}",
          "--config.class_noun=square", "--config.dtype=float32", f"--config.optimizer.total_steps={steps}",
          "--config.checkpoint_every=2", "--config.validation.every=0", "--config.progress_bar=False",
          "--config.num_class_images=2", "--config.class_generation.batch_size=2"]


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path, tiny_model_dir, instance_dir):
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  steps = 8
  subprocess.run(_cmd(tmp_path / "straight", tiny_model_dir, instance_dir, steps), cwd=REPO, env=env, check=True,
                 capture_output=True)
  workdir = tmp_path / "killed"
  proc = subprocess.Popen(_cmd(workdir, tiny_model_dir, instance_dir, steps), cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metrics, deadline = workdir / "metrics.jsonl", time.time() + 300
  kill_after = int(np.random.default_rng().integers(3, 7))
  while time.time() < deadline and proc.poll() is None:
    # After the first finalized checkpoint (an async save may still be in flight at that step).
    if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after and _has_checkpoint(workdir):
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.05)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  resumed = subprocess.run(_cmd(workdir, tiny_model_dir, instance_dir, steps), cwd=REPO, env=env,
                           capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "Resuming from the checkpoint of step" in resumed.stdout
  a = sd.load_pipeline(str(tmp_path / "straight" / "export")).params["unet"]
  b = sd.load_pipeline(str(workdir / "export")).params["unet"]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_text_encoder_training_accumulation_and_remat(tmp_path, tiny_model_dir, instance_dir):
  """LoRA on the UNet and the text encoder (as diffusers' LoRA DreamBooth), 2 micro-steps per update, remat."""
  cfg = tiny_config(tiny_model_dir, instance_dir, "lora", with_prior_preservation=False, remat=True,
                    gradient_accumulation=2, checkpoint_every=1000, identifier="sks",
                    **{"train.train_text_encoder": True, "train.text_encoder_learning_rate": 1e-3})
  cfg.optimizer.total_steps = 2  # updates; 4 micro-steps
  pipe = sd.load_pipeline(tiny_model_dir)
  out = db.train_and_export(cfg, str(tmp_path))
  assert out["step"] == 4
  trained = jax.device_get(out["state"]["trainable"])
  assert set(trained) == {"unet_lora", "text_encoder_lora"}
  text_params = jax.device_get(db.model_params(cfg, pipe.params, trained)["text_encoder"])
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(text_params),
                                                     jax.tree.leaves(pipe.params["text_encoder"]))]
  assert any(moved)
  for a, b in zip(jax.tree.leaves(jax.device_get(out["frozen"]["unet"])), jax.tree.leaves(pipe.params["unet"])):
    np.testing.assert_array_equal(a, b)
  exported = sd.load_pipeline(out["export_dir"])
  for a, b in zip(jax.tree.leaves(exported.params["text_encoder"]), jax.tree.leaves(text_params)):
    np.testing.assert_allclose(a, b, atol=1e-6)
