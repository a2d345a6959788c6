"""The CLIP trainer: exact gradient accumulation, sharded parameters, non-finite steps, resume."""
import math
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
from clip_jax import loop, sharding
from clip_jax import train as trainer
from configs.clip.common import base_config, runlocal
from killresume import kill_then_resume

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  c = runlocal(base_config())
  c.model.name = "ViT-Tiny"
  c.dtype = "float32"
  c.data.source = "synthetic"
  c.global_batch = 16
  c.progress_bar = False
  c.measure_peak_flops = False
  c.async_checkpoints = False
  c.compilation_cache = ""
  c.update_from_flattened_dict(overrides)  # dotted keys, e.g. {"loss.kind": "sigmoid"}
  return c


def _batch(model, batch_size, seed=0):
  data = trainer.SyntheticData(batch_size, model.config.vision.image_size, model.config.text.context_length, seed)
  return next(data)


# Accumulation does not depend on the loss (it runs the loss once, on the full batch's embeddings). All
# three are slow: each pair of compiles on the 8-device mesh takes 16-60 s on the shared 2 cores, the
# largest single cost of the fast subset (< 5 min) when softmax was in it.
@pytest.mark.parametrize("loss_kind", [pytest.param("softmax", marks=pytest.mark.slow),
                                       pytest.param("sigmoid", marks=pytest.mark.slow),
                                       pytest.param("softmax_ring", marks=pytest.mark.slow)])
def test_accumulated_gradient_equals_full_batch(loss_kind):
  cfg = tiny_config(**{"loss.kind": loss_kind})
  model = trainer.build_model(cfg)
  mesh = sharding.create_mesh({"data": 8})
  variables = clip_jax.init_variables(model, jax.random.key(0))
  batch = _batch(model, 32)
  full = trainer.make_loss_and_grad(model, loss_kind=loss_kind, mesh=mesh, microbatches=1)
  accumulated = trainer.make_loss_and_grad(model, loss_kind=loss_kind, mesh=mesh, microbatches=4)
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


@pytest.mark.slow  # ~24 s at low load: kept out of the fast subset (< 5 min)
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

  step = loop.skip_nonfinite(trainer.make_train_step(model, tx, loss_kind="softmax", mesh=mesh, microbatches=1,
                                                     schedule=lambda s: 0.0))
  assert sharding.batch_axes(mesh) == ("fsdp",)
  batch = sharding.place_local_batch(_batch(model, 16), mesh)
  step_fn = jax.jit(step, in_shardings=(shardings, None), out_shardings=(shardings, None))
  before = np.asarray(c_fc)
  state, metrics = step_fn(state, batch)
  state, metrics = step_fn(state, batch)
  assert np.isfinite(metrics["loss"]) and int(metrics["skipped"]) == 0
  after = state["params"]["visual"]["transformer"]["resblocks_0"]["c_fc"]["kernel"]
  assert after.sharding.spec == c_fc.sharding.spec
  assert not np.allclose(np.asarray(after), before)


@pytest.mark.slow  # ~21 s at low load: kept out of the fast subset (< 5 min)
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
  workdir = tmp_path / "killed"
  kill_then_resume(_train_cmd(workdir, steps), str(workdir), cwd=REPO, env=_env(), kill_between=(4, 9))
  straight, killed = _final_params(tmp_path / "straight"), _final_params(workdir)
  for key in straight:
    np.testing.assert_array_equal(killed[key], straight[key], err_msg=str(key))


def _env_devices(count):
  return dict(_env(), XLA_FLAGS=f"--xla_force_host_platform_device_count={count}")


@pytest.mark.slow
def test_workdir_of_8_devices_opens_on_1_and_resumes_on_4(tmp_path):
  """Issue 12.5: a workdir written on 8 devices loads in a 1-device process (load_checkpoint and
  the evaluation CLI) and resumes on 4 devices; resumed == uninterrupted to float rounding."""
  workdir, straight = tmp_path / "w", tmp_path / "straight"
  fsdp = ["--config.mesh.data=1", "--config.mesh.fsdp=-1",  # parameters sharded over every device
          # A constant learning rate after warmup, so a run made for 3 steps and one made for 6 share
          # their first 3 steps (the default warmup is longer than the run, and clamped to it).
          "--config.optimizer.warmup_steps=2", "--config.optimizer.end_learning_rate=0.001"]
  subprocess.run(_train_cmd(workdir, 3, fsdp), cwd=REPO, env=_env_devices(8), check=True, capture_output=True)
  script = ("import sys, numpy as np, jax, clip_jax; assert jax.device_count() == 1; "
            "m, v = clip_jax.load_checkpoint(sys.argv[1]); "
            "print('logit_scale', float(np.asarray(v['params']['logit_scale'])))")
  one = subprocess.run([sys.executable, "-c", script, str(workdir)], cwd=REPO, env=_env_devices(1),
                       capture_output=True, text=True)
  assert one.returncode == 0, one.stderr[-2000:]
  evaluated = subprocess.run([sys.executable, "-m", "clip_jax.evaluate", "--workdir", str(workdir), "--tasks",
                              "zeroshot:digits", "--limit", "32", "--out", str(tmp_path / "eval")], cwd=REPO, env=_env_devices(1),
                             capture_output=True, text=True)
  assert evaluated.returncode == 0, evaluated.stderr[-2000:]
  # Going on to 6 steps changes total_steps, a key that changes the maths: the trainer asks for the flag.
  resumed = subprocess.run(_train_cmd(workdir, 6, [*fsdp, "--allow-config-change"]), cwd=REPO, env=_env_devices(4),
                           capture_output=True,
                           text=True)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "Resuming from the checkpoint of step 3" in resumed.stdout
  subprocess.run(_train_cmd(straight, 6, fsdp), cwd=REPO, env=_env_devices(8), check=True, capture_output=True)
  # Another device count sums in another order (rounding). Adam's step is about lr * sign(gradient), so
  # where a gradient element is near zero the rounding can flip its sign: up to 2 x lr (1e-3) apart per
  # step on 4 devices (steps 4-6), never more (seen: 3.2e-3 on one element of 4096).
  a, b = _final_params(straight), _final_params(workdir)
  for key in a:
    np.testing.assert_allclose(b[key], a[key], atol=2 * 1e-3 * 3, err_msg=str(key))
  from clip_jax.observe import read_metrics
  losses = [{r["step"]: r["loss"] for r in read_metrics(str(w / "metrics.jsonl"))} for w in (straight, workdir)]
  for step in range(1, 7):
    assert losses[1][step] == pytest.approx(losses[0][step], rel=1e-3), step


@pytest.mark.slow  # ~11 s at low load: kept out of the fast subset (< 5 min)
def test_stored_logit_scale_never_exceeds_ln_100():
  """Issue 12.9: an update that drives logit_scale up is clamped where it is stored (open_clip's
  rule), so what is saved and exported is at most 100."""
  import optax
  cfg = tiny_config()
  model = trainer.build_model(cfg)
  mesh = sharding.create_mesh({"data": 8})
  state, shardings, _ = trainer.create_train_state(model, cfg.optimizer, mesh,
                                                   [tuple(r) for r in cfg.logical_axis_rules], jax.random.key(0))
  # An "optimizer" that adds +1 to every parameter: three steps take ln(1/0.07) = 2.66 past ln 100 = 4.61.
  push_up = optax.GradientTransformation(lambda p: optax.EmptyState(),
                                         lambda g, s, p=None: (jax.tree.map(jnp.ones_like, g), s))
  step = jax.jit(loop.skip_nonfinite(trainer.make_train_step(model, push_up, loss_kind="softmax", mesh=mesh,
                                                             microbatches=1, schedule=lambda s: 0.0)))
  batch = sharding.place_local_batch(_batch(model, 16), mesh)
  state = dict(state, opt_state=optax.EmptyState())
  for _ in range(3):
    state, metrics = step(state, batch)
  assert float(state["params"]["logit_scale"]) == pytest.approx(math.log(100.0), abs=1e-6)
  assert float(metrics["logit_scale"]) <= 100.0


def test_the_train_step_hands_its_gradient_norm_to_the_optimizer():
  """The optimizer gets a global norm from the step (`optim.apply_optimizer`: the metrics' grad_norm), so
  `optim.clip_by_global_norm` does not reduce every gradient again (tests/test_loop.py counts the
  reductions; tests/test_dreambooth.py checks the value on a step that runs). Traced, not compiled."""
  import optax
  cfg = tiny_config()
  model = trainer.build_model(cfg)
  mesh = sharding.create_mesh({"data": 1}, devices=jax.devices()[:1])
  state = jax.eval_shape(lambda: trainer.create_train_state(
      model, cfg.optimizer, mesh, [tuple(r) for r in cfg.logical_axis_rules], jax.random.key(0))[0])
  handed = []

  def keep_norm(updates, opt_state, params=None, *, global_norm=None, **extra_args):
    handed.append(global_norm)
    return updates, opt_state
  recorder = optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), keep_norm)
  step = trainer.make_train_step(model, recorder, loss_kind="softmax", mesh=mesh, microbatches=1,
                                 schedule=lambda s: 0.0)
  jax.eval_shape(step, dict(state, opt_state=optax.EmptyState()), _batch(model, 16))
  assert len(handed) == 1 and handed[0] is not None
  assert handed[0].shape == () and handed[0].dtype == jnp.float32


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
  assert proc.returncode == loop.EXIT_PREEMPTED  # 75: saved and stopped early, not finished
  saved = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert saved and saved[-1] >= 4 and saved[-1] % 3 != 0 or saved[-1] >= 4
  # A shorter run than it was started as: the steps schedule changes, so it must be allowed.
  resumed = subprocess.run(_train_cmd(workdir, saved[-1] + 2, ["--allow-config-change"]), cwd=REPO, env=_env(),
                           capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f"Resuming from the checkpoint of step {saved[-1]}" in resumed.stdout


def test_config_errors_are_clear():
  with pytest.raises(ValueError, match="micro-batches"):
    trainer.validate_config(tiny_config(gradient_accumulation=3))
  with pytest.raises(ValueError, match="loss.kind"):
    trainer.validate_config(tiny_config(**{"loss.kind": "hinge"}))
  with pytest.raises(ValueError, match="paper.py: unknown model"):
    from configs.clip import paper
    paper.get_config("ViT-Z-1")
