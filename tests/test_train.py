"""The CLIP trainer: exact gradient accumulation, sharded parameters, non-finite steps, resume."""
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

import clip_jax
from clip_jax import sharding
from clip_jax import train as trainer
from configs.clip.common import base_config, runlocal

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _has_checkpoint(workdir) -> bool:
  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def tiny_config(**overrides):
  c = runlocal(base_config())
  c.model.name = "ViT-Tiny"
  c.model.dtype = "float32"
  c.data.source = "synthetic"
  c.global_batch = 16
  c.progress_bar = False
  c.measure_peak_flops = False
  c.async_checkpoints = False
  c.update_from_flattened_dict(overrides)  # dotted keys, e.g. {"loss.kind": "sigmoid"}
  return c


def _batch(model, batch_size, seed=0):
  data = trainer.SyntheticData(batch_size, model.config.vision.image_size, model.config.text.context_length, seed)
  return next(data)


@pytest.mark.parametrize("loss_kind", ["softmax", "sigmoid", "softmax_ring"])
def test_accumulated_gradient_equals_full_batch(loss_kind):
  cfg = tiny_config(**{"loss.kind": loss_kind})
  model = trainer.build_model(cfg)
  mesh = sharding.create_mesh({"data": 8})
  variables = clip_jax.init_variables(model, jax.random.key(0))
  batch = _batch(model, 32)
  full = trainer.make_loss_and_grad(model, loss_kind=loss_kind, mesh=mesh, batch_axes=("data",), microbatches=1)
  accumulated = trainer.make_loss_and_grad(model, loss_kind=loss_kind, mesh=mesh, batch_axes=("data",),
                                           microbatches=4)
  run = lambda f: jax.jit(f)(variables["params"], None, batch["image"], batch["tokens"])  # noqa: E731
  loss_1, grads_1, _ = run(full)
  loss_4, grads_4, _ = run(accumulated)
  np.testing.assert_allclose(loss_4, loss_1, rtol=1e-5)
  flat_1, flat_4 = traverse_util.flatten_dict(grads_1), traverse_util.flatten_dict(grads_4)
  assert flat_1.keys() == flat_4.keys()
  # Relative to the largest gradient entry: some gradients are exactly zero in exact arithmetic
  # (e.g. key biases: a softmax ignores a shift shared by a row) and differ only by rounding.
  largest = max(float(jnp.abs(g).max()) for g in flat_1.values())
  for key in flat_1:
    np.testing.assert_allclose(flat_4[key], flat_1[key], rtol=1e-5, atol=1e-5 * largest, err_msg=str(key))


def test_parameters_are_sharded_and_train():
  """fsdp x tensor = 4 x 2: every large kernel lives on the devices in pieces."""
  cfg = tiny_config(**{"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2})
  model = trainer.build_model(cfg)
  mesh = sharding.create_mesh(dict(cfg.mesh))
  state, shardings, tx = trainer.create_train_state(model, cfg.optimizer, mesh,
                                                    [tuple(r) for r in cfg.logical_axis_rules], jax.random.key(0))
  c_fc = state["params"]["visual"]["transformer"]["resblocks_0"]["c_fc"]["kernel"]       # [64, 256]
  assert c_fc.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert c_fc.addressable_shards[0].data.shape == (16, 128)
  token_embedding = state["params"]["text"]["token_embedding"]                           # [49408, 64]
  assert token_embedding.addressable_shards[0].data.shape == (49408 // 2, 16)
  mu = state["opt_state"][1][0].mu["text"]["token_embedding"]  # Adam's moments are sharded alike
  assert mu.sharding == token_embedding.sharding
  per_device = sum(s.data.nbytes for x in jax.tree.leaves(state["params"]) for s in x.addressable_shards
                   if s.device == jax.devices()[0])
  total = sum(x.nbytes for x in jax.tree.leaves(state["params"]))
  assert per_device < total / 4

  step = trainer.make_train_step(model, tx, loss_kind="softmax", mesh=mesh, batch_axes=("fsdp",),
                                 microbatches=1, schedule=lambda s: 0.0)
  batch_sharding = sharding.batch_sharding(mesh)
  batch = {k: jax.device_put(v, batch_sharding) for k, v in _batch(model, 16).items()}
  step_fn = jax.jit(step, in_shardings=(shardings, {"image": batch_sharding, "tokens": batch_sharding}),
                    out_shardings=(shardings, None))
  before = np.asarray(c_fc)
  state, metrics = step_fn(state, batch)
  state, metrics = step_fn(state, batch)
  assert np.isfinite(metrics["loss"]) and int(metrics["skipped"]) == 0
  after = state["params"]["visual"]["transformer"]["resblocks_0"]["c_fc"]["kernel"]
  assert after.sharding.spec == c_fc.sharding.spec
  assert not np.allclose(np.asarray(after), before)


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
  cfg = tiny_config(total_steps=8, checkpoint_every=2, max_nonfinite_steps=3, log_every=1)
  cfg.optimizer.total_steps = 8

  class PoisonedAfter(trainer.SyntheticData):
    def __next__(self):
      batch = super().__next__()
      if self.position > 3:  # from the 4th batch on, NaN images
        batch["image"][:] = np.nan
      return batch

  monkeypatch.setattr(trainer, "build_input", lambda cfg, model: PoisonedAfter(
      cfg.global_batch, model.config.vision.image_size, model.config.text.context_length, cfg.seed))
  with pytest.raises(FloatingPointError, match="non-finite"):
    trainer.train_and_evaluate(cfg, str(tmp_path))
  from clip_jax.observe import read_metrics
  records = read_metrics(str(tmp_path / "metrics.jsonl"))
  assert [r["skipped"] for r in records] == [0, 0, 0, 1, 1, 1]
  # The last good checkpoint is still the newest one, and it loads.
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [2]
  module, variables = clip_jax.load_checkpoint(str(tmp_path))
  assert np.isfinite(np.asarray(variables["params"]["logit_scale"]))


def _train_cmd(workdir, steps, extra=()):
  return [sys.executable, "-m", "clip_jax.train", "--config=configs/clip/digits.py", f"--workdir={workdir}",
          f"--config.total_steps={steps}", "--config.global_batch=32", "--config.checkpoint_every=3",
          "--config.log_every=1", "--config.eval_every=0", "--config.zeroshot_eval.enabled=False",
          "--config.progress_bar=False", "--config.peak_flops_per_device=1e12", *extra]


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  env["PYTHONPATH"] = REPO
  return env


def _final_params(workdir):
  _, variables = clip_jax.load_checkpoint(str(workdir))
  return traverse_util.flatten_dict(jax.device_get(variables["params"]))


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path):
  steps = 10
  subprocess.run(_train_cmd(tmp_path / "straight", steps), cwd=REPO, env=_env(), check=True,
                 capture_output=True)
  # Kill the second run hard once it has passed a checkpoint (step 3 or 6), then restart it.
  workdir = tmp_path / "killed"
  proc = subprocess.Popen(_train_cmd(workdir, steps), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  rng = np.random.default_rng()
  kill_after = int(rng.integers(4, 9))
  while time.time() < deadline and proc.poll() is None:
    # After the first finalized checkpoint (an async save may still be in flight at that step).
    if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after and _has_checkpoint(workdir):
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.05)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  resumed = subprocess.run(_train_cmd(workdir, steps), cwd=REPO, env=_env(), capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "Resuming from the checkpoint of step" in resumed.stdout
  straight, killed = _final_params(tmp_path / "straight"), _final_params(workdir)
  for key in straight:
    np.testing.assert_array_equal(killed[key], straight[key], err_msg=str(key))


@pytest.mark.slow
def test_sigterm_saves_and_exits_then_resumes(tmp_path):
  workdir = tmp_path / "preempted"
  proc = subprocess.Popen(_train_cmd(workdir, 200), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=120)
  assert proc.returncode == 0
  saved = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert saved and saved[-1] >= 4 and saved[-1] % 3 != 0 or saved[-1] >= 4
  resumed = subprocess.run(_train_cmd(workdir, saved[-1] + 2), cwd=REPO, env=_env(), capture_output=True,
                           text=True)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f"Resuming from the checkpoint of step {saved[-1]}" in resumed.stdout


def test_config_errors_are_clear():
  with pytest.raises(ValueError, match="micro-batches"):
    trainer.validate_config(tiny_config(microbatches=3))
  with pytest.raises(ValueError, match="loss.kind"):
    trainer.validate_config(tiny_config(**{"loss.kind": "hinge"}))
  with pytest.raises(ValueError, match="paper.py: unknown model"):
    from configs.clip import paper
    paper.get_config("ViT-Z-1")
