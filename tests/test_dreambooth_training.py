"""DreamBooth training runs in-process on the tiny SD: what moves, LoRA on the text encoder with
accumulation and remat, non-finite steps, clear errors. (Split from test_dreambooth.py, which keeps
the loss, identifier, data, resume and export tests, so that `-n 2 --dist loadfile` runs the two
halves of these long tests on both workers.)"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from dreambooth_jax import train as db
from dreambooth_jax.sampling import pipeline as sd
from dreambooth_jax.sampling import schedulers
from dreambooth_jax.training import data as db_data
from test_dreambooth import instance_dir, tiny_config, tiny_model_dir  # noqa: F401 (fixtures)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_training_lowers_instance_loss_and_touches_only_trained_params(tmp_path, tiny_model_dir, instance_dir, mode):
  steps = 30
  cfg = tiny_config(tiny_model_dir, instance_dir, *(("lora",) if mode == "lora" else ()),
                    with_prior_preservation=False, random_crop=False, flip=False, checkpoint_every=1000)
  cfg.total_steps = steps
  cfg.optimizer.learning_rate = 5e-3 if mode == "lora" else 1e-3
  cfg.train.lora_rank = 8
  pipe = sd.load_pipeline(tiny_model_dir)
  schedule = schedulers.NoiseSchedule.from_config(pipe.scheduler_config)
  loss_fn = jax.jit(db.make_loss_fn(pipe, schedule, num_instance=4,
                                    params_fn=lambda frozen, trained: db.model_params(cfg, frozen, trained)))
  images, _ = db_data.load_image_folder(instance_dir)
  pixels = jnp.asarray(db_data.sample_batch(images, 4, 32, 0, 0, 0, random_crop=False, flip=False))
  tokens = jnp.asarray(sd.tokenize(pipe, ["a sks square"] * 4))

  def held_out_loss(trainable):  # same noise and timesteps before and after training
    return float(np.mean([loss_fn(trainable, pipe.params, pixels, tokens, jax.random.split(jax.random.key(100 + i), 4))[0]
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
  expected = db.merged_params(cfg, pipe.params, trained)["unet"]
  for a, b in zip(jax.tree.leaves(exported.params["unet"]), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.slow
def test_clear_errors(tmp_path, tiny_model_dir, instance_dir):
  with pytest.raises(ValueError, match="class_noun is empty"):
    db.train_and_export(tiny_config(tiny_model_dir, instance_dir, class_noun=""), str(tmp_path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    db.train_and_export(tiny_config(tiny_model_dir, "/nonexistent/photos"), str(tmp_path))
  with pytest.raises(ValueError, match="train.mode"):
    db.train_and_export(tiny_config(tiny_model_dir, instance_dir, **{"train.mode": "dora"}), str(tmp_path))


@pytest.mark.slow
def test_text_encoder_training_accumulation_and_remat(tmp_path, tiny_model_dir, instance_dir):
  """LoRA on the UNet and the text encoder (as diffusers' LoRA DreamBooth), 2 micro-batches per update, remat."""
  cfg = tiny_config(tiny_model_dir, instance_dir, "lora", with_prior_preservation=False, remat=True,
                    gradient_accumulation=2, checkpoint_every=1000, identifier="sks",
                    **{"train.train_text_encoder": True, "train.text_encoder_learning_rate": 1e-3})
  cfg.total_steps, cfg.global_batch = 2, 2  # updates of 2 micro-batches of 1 instance image
  pipe = sd.load_pipeline(tiny_model_dir)
  out = db.train_and_export(cfg, str(tmp_path))
  assert out["step"] == 2
  trained = jax.device_get(out["state"]["trainable"])
  assert set(trained) == {"unet_lora", "text_encoder_lora"}
  text_params = jax.device_get(db.merged_params(cfg, pipe.params, trained)["text_encoder"])
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(text_params),
                                                     jax.tree.leaves(pipe.params["text_encoder"]))]
  assert any(moved)
  for a, b in zip(jax.tree.leaves(jax.device_get(out["frozen"]["unet"])), jax.tree.leaves(pipe.params["unet"])):
    np.testing.assert_array_equal(a, b)
  exported = sd.load_pipeline(out["export_dir"])
  for a, b in zip(jax.tree.leaves(exported.params["text_encoder"]), jax.tree.leaves(text_params)):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.slow
def test_nan_step_is_skipped_counted_and_never_checkpointed(tmp_path, tiny_model_dir, instance_dir, monkeypatch):
  real = db_data.training_batch

  def poisoned(*args, step, **kwargs):
    batch = real(*args, step=step, **kwargs)
    if step == 2:  # the third step's images are NaN
      batch["pixels"][:] = np.nan
    return batch
  monkeypatch.setattr(db_data, "training_batch", poisoned)
  cfg = tiny_config(tiny_model_dir, instance_dir, "lora", with_prior_preservation=False, identifier="sks",
                    checkpoint_every=1, log_every=1)
  out = db.train_and_export(cfg, str(tmp_path))
  from clip_jax.observe import read_metrics
  records = read_metrics(str(tmp_path / "metrics.jsonl"))
  assert [r["skipped"] for r in records] == [0, 0, 1, 0] and records[-1]["nonfinite_total"] == 1
  # Step 3 was never saved (a streak was on); every checkpoint holds finite weights.
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert 3 not in steps and steps[-1] == 4
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(out["state"]["trainable"])))


def _flat(tree):  # {'down_blocks_0/.../kernel': leaf}: the keys LoRA's targets and db.frozen_params use
  return traverse_util.flatten_dict(tree, sep="/")


def _bf16_setup(tiny_model_dir, instance_dir, mode):
  cfg = tiny_config(tiny_model_dir, instance_dir, *(("lora",) if mode == "lora" else ()), dtype="bfloat16",
                    with_prior_preservation=False)
  pipe = sd.load_pipeline(tiny_model_dir, dtype=jnp.bfloat16)
  # Every weight off bfloat16's grid (the random init leaves biases at 0 and norm scales at 1, which
  # bfloat16 holds exactly): storing a bias or a norm scale in 16 bits would then change the step.
  noise = np.random.default_rng(0)
  pipe.params = jax.tree.map(lambda x: x + jnp.asarray(1e-3 * noise.standard_normal(x.shape), x.dtype), pipe.params)
  trainable = db.init_trainable(cfg, pipe, jax.random.key(0))
  if mode == "lora":  # adapters that change the kernels (up starts at zero)
    trainable = jax.tree.map(lambda x: x + 0.05, trainable)
  return cfg, pipe, trainable


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_frozen_kernels_stored_in_bf16_give_the_same_loss_and_gradients_bitwise(tiny_model_dir, instance_dir, mode):
  # db.frozen_params stores the frozen Dense/Conv kernels in the compute dtype, which the layers cast
  # them to at use anyway: the step must compute exactly what it computed from the float32 kernels.
  cfg, pipe, trainable = _bf16_setup(tiny_model_dir, instance_dir, mode)
  frozen = db.frozen_params(pipe, trainable)
  if mode == "full":
    assert "unet" not in frozen  # trained whole: the step reads the trainable copy only
  for name, tree in frozen.items():
    compute = {"unet": pipe.unet.dtype, "vae": pipe.vae.dtype, "text_encoder": pipe.text_encoder.dtype}[name]
    for key, value in _flat(tree).items():
      lowered = key.endswith("/kernel") and compute == jnp.bfloat16  # LoRA-adapted kernels too
      assert value.dtype == (jnp.bfloat16 if lowered else jnp.float32), (name, key, value.dtype)
  assert sum(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(frozen)) > 0
  schedule = schedulers.NoiseSchedule.from_config(pipe.scheduler_config)
  loss_fn = db.make_loss_fn(pipe, schedule, num_instance=2,
                            params_fn=lambda f, t: db.model_params(cfg, f, t))
  images, _ = db_data.load_image_folder(instance_dir)
  pixels = jnp.asarray(db_data.sample_batch(images, 2, 32, 0, 0, 0, random_crop=False, flip=False))
  tokens = jnp.asarray(sd.tokenize(pipe, ["a sks square"] * 2))
  keys = jax.random.split(jax.random.key(3), 2)
  grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (loss_32, _), grads_32 = grad(trainable, pipe.params, pixels, tokens, keys)
  (loss_16, _), grads_16 = grad(trainable, frozen, pixels, tokens, keys)
  assert float(loss_16) == float(loss_32)
  for a, b in zip(jax.tree.leaves(grads_16), jax.tree.leaves(grads_32)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_bf16_lora_run_exports_the_float32_base_with_the_adapter_merged(tmp_path, tiny_model_dir, instance_dir):
  # The step reads 16-bit frozen kernels; the export must merge into the float32 originals.
  cfg = tiny_config(tiny_model_dir, instance_dir, "lora", dtype="bfloat16", with_prior_preservation=False,
                    checkpoint_every=1000, identifier="sks")
  cfg.total_steps = 2
  out = db.train_and_export(cfg, str(tmp_path))
  assert any(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(out["frozen"]["unet"]))
  source = sd.load_pipeline(tiny_model_dir).params
  trained = jax.device_get(out["state"]["trainable"])
  expected = db.merged_params(cfg, source, trained)
  exported = sd.load_pipeline(out["export_dir"]).params
  adapted = set(trained["unet_lora"])
  for name in ("unet", "vae", "text_encoder"):
    got, want, base = _flat(exported[name]), _flat(expected[name]), _flat(source[name])
    for key, value in got.items():
      assert value.dtype == np.float32, (name, key)
      if name == "unet" and key in adapted:
        np.testing.assert_allclose(value, want[key], atol=1e-6)
        assert not np.array_equal(value, base[key]), key  # the adapter moved it
      else:
        np.testing.assert_array_equal(value, base[key])  # not rounded through bfloat16
