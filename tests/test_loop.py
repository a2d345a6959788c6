"""The shared training loop on a toy trainer (least squares): cadence, non-finite steps, resume
across layouts, corrupt checkpoints. The CLIP and DreamBooth trainers' own tests cover the same
guarantees through their entry points."""
import json
import logging as py_logging
import os
import re
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from clip_jax import checkpoint as ckpt
from clip_jax import loop, sharding
from clip_jax.observe import read_metrics

DIM, ROWS = 8, 16


def test_every_is_periodic_and_includes_the_last_step():
  assert [s for s in range(1, 11) if loop.every(s, 4, 10)] == [4, 8, 10]
  assert [s for s in range(1, 11) if loop.every(s, 0, 10)] == [10]


class CountingIterator:
  """An input iterator with a checkpointable position (as grain's), yielding the position."""

  def __init__(self):
    self.position = 0

  def __next__(self):
    self.position += 1
    return self.position

  def get_state(self) -> bytes:
    return json.dumps({"position": self.position}).encode()

  def set_state(self, state: bytes) -> None:
    self.position = json.loads(state)["position"]

  def start_prefetch(self):
    pass


def toy_run(workdir, mesh, total_steps, nan_steps=(), max_nonfinite_steps=10, checkpoint_every=2, sigterm_step=None,
            **options):
  """Least squares on batches that are a function of the step; returns (loop result, iterator).
  sigterm_step: this process is sent SIGTERM while the batch of that (0-based) step is made."""
  replicated = NamedSharding(mesh, P())
  tx = optax.adam(0.1)
  w = jnp.zeros((DIM,), jnp.float32)
  state = {**loop.init_counters(), "params": {"w": w}, "opt_state": tx.init({"w": w})}
  state_shardings = jax.tree.map(lambda _: replicated, state)
  state = jax.device_put(state, state_shardings)
  data = CountingIterator()
  true_w = np.arange(DIM, dtype=np.float32)

  def next_batch(step):
    assert next(data) == step + 1  # the iterator resumes where the checkpoint left it
    rng = np.random.default_rng(step)
    x = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    y = x @ true_w
    if step in nan_steps:
      x[0, 0] = np.nan
    if step == sigterm_step:
      os.kill(os.getpid(), signal.SIGTERM)
    return sharding.place_global_batch({"x": x, "y": y}, mesh)

  def update(state, batch):
    def loss_fn(params):
      return jnp.mean(jnp.square(batch["x"] @ params["w"] - batch["y"]))
    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return dict(state, params=optax.apply_updates(state["params"], updates), opt_state=opt_state), \
        {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  opts = loop.Options(total_steps=total_steps, log_every=1, checkpoint_every=checkpoint_every, async_checkpoints=False,
                      max_nonfinite_steps=max_nonfinite_steps, progress_bar=False, compilation_cache="", **options)
  result = loop.run(workdir=str(workdir), mesh=mesh, state=state, state_shardings=state_shardings, update=update,
                    next_batch=next_batch, options=opts, data_iterator=data)
  return result, data


def _steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def _restored_w(workdir, step):
  manager = ckpt.make_manager(str(workdir), async_save=False)
  state, _ = ckpt.restore(manager, ckpt.single_device_abstract(manager, step), step=step)
  manager.close()
  return np.asarray(state["params"]["w"])


def test_nonfinite_step_is_skipped_counted_and_never_checkpointed(tmp_path):
  mesh = sharding.create_mesh({"data": 8})
  clean, _ = toy_run(tmp_path / "clean", mesh, 6)
  # A NaN in step 3 (0-based 2): skipped (parameters unchanged), counted, no checkpoint at step 4
  # holds it; the run goes on and ends finite.
  result, _ = toy_run(tmp_path / "nan", mesh, 6, nan_steps=(2,))
  records = read_metrics(str(tmp_path / "nan" / "metrics.jsonl"))
  assert [r["skipped"] for r in records] == [0, 0, 1, 0, 0, 0]
  assert records[-1]["nonfinite_total"] == 1
  assert not np.isfinite(records[2]["loss"])
  for step in _steps(tmp_path / "nan"):
    assert np.isfinite(_restored_w(tmp_path / "nan", step)).all()
  # The skipped step left the parameters as they were after step 2.
  np.testing.assert_array_equal(_restored_w(tmp_path / "nan", 2), _restored_w(tmp_path / "clean", 2))
  assert np.isfinite(np.asarray(result.state["params"]["w"])).all()


def test_without_a_progress_bar_each_logged_step_prints_a_line(tmp_path, capsys):
  """A new user's sweep (progress_bar=False, as the sweep configs set it) printed nothing for minutes
  between its start and its results: a slow run looked like a hung one."""
  toy_run(tmp_path, sharding.create_mesh({"data": 8}), 3)
  lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("train: step")]
  assert [line.split(",")[0] for line in lines] == [f"train: step {i} of 3" for i in (1, 2, 3)]
  assert all(", loss " in line and line.endswith(" s/step") for line in lines)
  assert loop.progress_line("pretrain unet", 1200, 1200, 0.08125, 0.5) == (
      "pretrain unet: step 1,200 of 1,200, loss 0.08125, 0.5 s/step")


@pytest.mark.parametrize("sigterm_step, stops_at", [(2, 3), (5, None)])
def test_sigterm_stops_after_the_step_unless_it_was_the_last(tmp_path, capsys, sigterm_step, stops_at):
  # Reported: a stop during the last step printed 'Stopped at step 12 of 12 ... resumes it' and
  # the trainer exited 75 although every step was done (DreamBooth then exported and wrote DONE).
  mesh = sharding.create_mesh({"data": 8})
  handler_before = signal.getsignal(signal.SIGTERM)
  result, _ = toy_run(tmp_path, mesh, 6, sigterm_step=sigterm_step, checkpoint_every=4)
  out = capsys.readouterr().out
  if stops_at is not None:
    assert result.preempted and result.stop_requested and result.step == stops_at
    assert f"Stopped at step {stops_at} of 6" in out
    assert _steps(tmp_path)[-1] == stops_at  # saved where it stopped, off the checkpoint cadence
  else:
    assert not result.preempted and result.step == 6
    assert result.stop_requested  # a caller with stages after this run still stops
    assert "Stopped at" not in out and "the run is complete" in out
    assert _steps(tmp_path)[-1] == 6
  assert signal.getsignal(signal.SIGTERM) is handler_before  # the loop's own handler is removed again


def test_the_host_stays_one_step_ahead_so_a_stop_saves_at_once(tmp_path, capsys):
  """Reported: a one-process run stopped up to log_every steps after Ctrl-C. JAX dispatches steps
  asynchronously, so the host had queued every step up to the next logged one, and the save after the
  stop waited for all of them. Each device step here takes ~50 ms (a callback), making a batch ~0 ms."""
  import time
  mesh = sharding.create_mesh({"data": 8})
  replicated = NamedSharding(mesh, P())
  state = jax.device_put({**loop.init_counters(), "w": jnp.zeros(())}, replicated)
  done, lead = [], []

  def device_step(step):
    time.sleep(0.05)
    done.append(int(step))

  def next_batch(step):
    lead.append(step - len(done))  # steps dispatched (0 .. step-1) that the device has not finished
    if step == 6:
      os.kill(os.getpid(), signal.SIGTERM)
    return jax.device_put(jnp.float32(step), replicated)

  def update(state, batch):
    jax.debug.callback(device_step, state["step"])
    return dict(state, w=state["w"] + batch), {"loss": state["w"], "grad_norm": batch}

  opts = loop.Options(total_steps=40, log_every=40, checkpoint_every=40, async_checkpoints=False, progress_bar=False,
                      compilation_cache="")
  result = loop.run(workdir=str(tmp_path), mesh=mesh, state=state, state_shardings=jax.tree.map(lambda _: replicated, state),
                    update=update, next_batch=next_batch, options=opts)
  assert result.preempted and result.step == 7  # the stop came while step 7's batch was made
  assert max(lead) <= 2, lead
  assert len(done) == 7 and "Stopped at step 7 of 40" in capsys.readouterr().out


def test_nonfinite_streak_stops_with_the_last_good_checkpoint(tmp_path):
  mesh = sharding.create_mesh({"data": 8})
  with pytest.raises(FloatingPointError, match="3 training steps in a row.*last good checkpoint is step 2"):
    toy_run(tmp_path, mesh, 10, nan_steps=(2, 3, 4, 5), max_nonfinite_steps=3)
  assert _steps(tmp_path) == [2]


def test_resume_on_another_mesh_and_device_count_equals_one_run(tmp_path):
  """Written on 8 devices (data=8), resumed on 4 (fsdp=2 x tensor=2) and then 1: same result."""
  straight, _ = toy_run(tmp_path / "straight", sharding.create_mesh({"data": 8}), 6)
  toy_run(tmp_path / "moved", sharding.create_mesh({"data": 8}), 2)
  toy_run(tmp_path / "moved", sharding.create_mesh({"fsdp": 2, "tensor": 2}, devices=jax.devices()[:4]), 4)
  moved, data = toy_run(tmp_path / "moved", sharding.create_mesh({"data": 1}, devices=jax.devices()[:1]), 6)
  assert data.position == 6
  np.testing.assert_allclose(np.asarray(moved.state["params"]["w"]), np.asarray(straight.state["params"]["w"]),
                             rtol=1e-6)


def _corrupt(workdir, step, kind):
  step_dir = os.path.join(workdir, "checkpoints", str(step))
  if kind == "truncated_iterator_json":
    path = os.path.join(step_dir, "data", "process_0-of-1.json")
    with open(path) as f:
      text = f.read()
    with open(path, "w") as f:
      f.write(text[:len(text) // 2])
  elif kind == "missing_array_data":
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
      for name in files:
        if "metadata" not in name and not name.startswith("_"):
          os.remove(os.path.join(root, name))
  else:
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["truncated_iterator_json", "missing_array_data"])
def test_corrupt_newest_checkpoint_falls_back_with_one_warning(tmp_path, kind, caplog):
  mesh = sharding.create_mesh({"data": 8})
  straight, _ = toy_run(tmp_path / "straight", mesh, 6)
  toy_run(tmp_path / "run", mesh, 4)
  _corrupt(tmp_path / "run", 4, kind)
  with caplog.at_level(py_logging.WARNING):
    result, data = toy_run(tmp_path / "run", mesh, 6)
  warnings = [r.getMessage() for r in caplog.records if "does not restore" in r.getMessage()]
  assert len(warnings) == 1 and "step 4" in warnings[0] and "resuming from step 2" in warnings[0], warnings
  assert os.path.isdir(tmp_path / "run" / "checkpoints_corrupt" / "4")  # set aside, not deleted
  assert _steps(tmp_path / "run")[-1] == 6 and data.position == 6
  np.testing.assert_allclose(np.asarray(result.state["params"]["w"]), np.asarray(straight.state["params"]["w"]),
                             rtol=1e-6)


def test_no_restorable_checkpoint_is_one_clear_error(tmp_path):
  mesh = sharding.create_mesh({"data": 8})
  toy_run(tmp_path, mesh, 2)
  _corrupt(tmp_path, 2, "missing_array_data")
  with pytest.raises(Exception, match=r"no checkpoint in .* restores \(steps 2\)"):
    toy_run(tmp_path, mesh, 4)


def test_leftover_temporary_folders_are_removed(tmp_path):
  mesh = sharding.create_mesh({"data": 8})
  toy_run(tmp_path, mesh, 2)
  leftover = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1234567"
  (leftover / "state").mkdir(parents=True)
  (leftover / "state" / "partial").write_bytes(b"half a write")
  result, _ = toy_run(tmp_path, mesh, 4)
  assert result.step == 4 and not leftover.exists()
  assert _steps(tmp_path) == [2, 4]


def test_iterator_state_of_another_process_count_is_refused_clearly(tmp_path):
  mesh = sharding.create_mesh({"data": 8})
  toy_run(tmp_path, mesh, 2)
  data_dir = tmp_path / "checkpoints" / "2" / "data"
  os.rename(data_dir / "process_0-of-1.json", data_dir / "process_0-of-2.json")
  (data_dir / "process_1-of-2.json").write_text('{"position": 2}')
  with pytest.raises(Exception, match="input pipeline state of 2 processes; this run has 1"):
    toy_run(tmp_path, mesh, 4)


def _adam_toy(guarded: bool, use_cond: bool | None = None):
  """Adam on two weight matrices; the update guarded by `update_if_finite` or left to skip_nonfinite's
  select. Returns (jitted donating step, initial state)."""
  tx = optax.adamw(1e-2)
  params = {"a": jnp.ones((64, 32), jnp.float32), "b": jnp.full((32, 16), 0.5, jnp.float32)}
  state = {**loop.init_counters(), "params": params, "opt_state": tx.init(params)}

  def update(state, x):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean(jnp.tanh(x @ p["a"] @ p["b"]) ** 2))(state["params"])
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    def apply(state):
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      return dict(state, params=optax.apply_updates(state["params"], updates), opt_state=opt_state)
    if guarded:
      return loop.update_if_finite(state, metrics, apply, use_cond=use_cond)
    return apply(state), metrics
  return jax.jit(loop.skip_nonfinite(update), donate_argnums=(0,)), state


@pytest.mark.parametrize("use_cond", [True, False])
def test_update_if_finite_keeps_every_entry_of_a_nonfinite_step_and_applies_a_finite_one(use_cond):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 64)), jnp.float32)
  guarded, state = _adam_toy(True, use_cond)
  plain, plain_state = _adam_toy(False)
  copy = lambda tree: jax.tree.map(jnp.array, tree)  # noqa: E731  (the steps donate their input)
  new, metrics = guarded(copy(state), x)
  reference, _ = plain(copy(plain_state), x)
  assert int(metrics["skipped"]) == 0 and int(new["step"]) == 1
  for got, want in zip(jax.tree.leaves(new), jax.tree.leaves(reference)):  # the same optimizer step
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)
  bad = x.at[0, 0].set(jnp.nan)
  kept, metrics = guarded(copy(new), bad)
  assert int(metrics["skipped"]) == 1 and int(kept["nonfinite_streak"]) == 1 and int(kept["step"]) == 2
  for got, want in zip(jax.tree.leaves({k: kept[k] for k in ("params", "opt_state")}),
                       jax.tree.leaves({k: new[k] for k in ("params", "opt_state")})):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # bit for bit, moments and count too
  assert jax.tree.structure(kept) == jax.tree.structure(state)


def test_update_if_finite_on_cpu_updates_the_moments_in_place():
  """The reason for the cond (jax 0.10.2, XLA:CPU): selecting the old state back after the update made
  XLA copy each Adam moment before overwriting it; under the cond no moment-sized f32 copy is left."""
  x = jnp.zeros((8, 64), jnp.float32)

  def moment_copies(step, state):
    text = step.lower(state, x).compile().as_text()
    return len(re.findall(r"= f32\[(?:64,32|32,16)\]\{1,0\} copy\(", text))
  assert moment_copies(*_adam_toy(guarded=False)) > 0       # the select: copies (fails if XLA stops making them)
  assert moment_copies(*_adam_toy(guarded=True)) == 0


def test_clip_by_global_norm_is_optax_s_rule_as_one_factor():
  """`optim.clip_by_global_norm` against `optax.clip_by_global_norm`: bitwise where nothing is clipped,
  within 4 ulp where the norm is over the limit (each form rounds twice), zeros stay zeros,
  and a NaN gradient stays NaN (the trainers skip that step)."""
  from clip_jax import optim
  for seed in range(20):
    rng = np.random.default_rng(seed)
    grads = {"w": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32), "b": jnp.asarray(rng.normal(size=(32,)), jnp.float32),
             "h": jnp.asarray(rng.normal(size=(16,)), jnp.bfloat16)}
    _check_clip_against_optax(grads, optim)
  zeros = jax.tree.map(jnp.zeros_like, grads)
  out, _ = optim.clip_by_global_norm(1.0).update(zeros, optax.EmptyState())
  assert all(not np.any(np.asarray(v, np.float32)) for v in jax.tree.leaves(out))
  nan = {**grads, "b": grads["b"].at[0].set(jnp.nan)}
  out, _ = optim.clip_by_global_norm(1.0).update(nan, optax.EmptyState())
  assert np.isnan(np.asarray(out["w"])).all()


def _check_clip_against_optax(grads, optim):
  norm = float(optax.tree.norm(grads))
  for max_norm in (norm * 2, norm / 3, norm / 1e4):
    ours, _ = optim.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    theirs, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    for key in grads:
      a, b = np.asarray(ours[key], np.float32), np.asarray(theirs[key], np.float32)
      if max_norm > norm:
        np.testing.assert_array_equal(a, b, err_msg=key)
      else:
        ulp = np.spacing(np.abs(b)) if grads[key].dtype == jnp.float32 else 2.0 ** -7 * np.abs(b)
        assert np.all(np.abs(a - b) <= 4 * ulp), key
    clipped_norm = float(optax.tree.norm(ours))
    assert clipped_norm == pytest.approx(min(norm, max_norm), rel=1e-2 if max_norm < norm else 0)


def test_clipped_gradients_are_not_written_out_before_adam_reads_them():
  """The point of `optim.clip_by_global_norm` on CPU: no fusion of the compiled update divides by the norm
  and none writes a clipped gradient out for both Adam moments to read (XLA:CPU would not duplicate
  optax's divide into them)."""
  from clip_jax import optim
  params = {f"w{i}": jnp.ones((256, 128), jnp.float32) for i in range(3)}
  for clip, divides in ((optim.clip_by_global_norm, False), (optax.clip_by_global_norm, True)):
    tx = optax.chain(clip(1.0), optax.adamw(1e-3))
    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state
    hlo = jax.jit(step).lower(params, tx.init(params), params).compile().as_text()
    fusions = [l for l in hlo.splitlines() if re.match(r"\s*%\w*divide\w*(\.\d+)? = f32\[256,128\]", l)]
    assert bool(fusions) == divides, (clip, fusions)


def _clipped_adam_step(hand_over_norm: bool):
  """`update_if_finite`'s CPU step (a cond) over Adam with clipping at 1e-4 (below the toy's gradient norm,
  3.3e-4: it clips); the optimizer given the metrics' norm (`optim.apply_optimizer`) or left to compute its own."""
  from clip_jax import optim
  tx = optax.chain(optim.clip_by_global_norm(1e-4), optax.adamw(1e-2))
  params = {"a": jnp.ones((64, 32), jnp.float32), "b": jnp.full((32, 16), 0.5, jnp.float32)}
  state = {"params": params, "opt_state": tx.init(params)}

  def update(state, x):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean(jnp.tanh(x @ p["a"] @ p["b"]) ** 2))(state["params"])
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    def apply(state):
      if hand_over_norm:
        new, opt_state = optim.apply_optimizer(tx, grads, state["opt_state"], state["params"], metrics["grad_norm"])
      else:
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new = optax.apply_updates(state["params"], updates)
      return dict(state, params=new, opt_state=opt_state)
    return loop.update_if_finite(state, metrics, apply, use_cond=True)
  return jax.jit(update), state


def test_the_metrics_norm_is_the_clipping_norm_so_a_step_computes_it_once():
  """Under the cond XLA cannot share a norm computed inside with the metrics' one outside: handed over,
  each gradient is reduced once per step instead of twice (a read of every gradient saved: on an SD UNet,
  3.4 GB of f32 per step), and the step is the same."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 64)), jnp.float32)
  results, reductions = [], []
  for hand_over in (False, True):
    step, state = _clipped_adam_step(hand_over)
    hlo = step.lower(state, x).compile().as_text()
    # The norms' sums of squares, one per gradient leaf and norm (the loss's own mean is under jvp()).
    sums = [line for line in hlo.splitlines() if " reduce(" in line and 'op_name="jit(update)/jvp()' not in line]
    reductions.append((len(sums), sum("cond/branch" in line for line in sums)))
    results.append(step(state, x))
  assert reductions == [(4, 2), (2, 0)], reductions   # (all, inside the cond), over 2 leaves
  (old, old_metrics), (new, new_metrics) = results
  assert int(new_metrics["skipped"]) == 0 and float(new_metrics["grad_norm"]) > 1e-4   # it clipped
  for got, want in zip(jax.tree.leaves(new), jax.tree.leaves(old)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_a_frozen_group_clips_by_the_norm_of_its_own_gradients():
  """With a frozen regex the clipping runs inside `multi_transform` over the trained leaves only, so the
  trainers' norm of every gradient (frozen ones too, nonzero here) must not reach it."""
  import ml_collections
  from clip_jax import optim
  # eps 0.1 makes Adam's first step depend on the gradient's size: g / (|g| + 0.1) at lr 1.
  cfg = ml_collections.ConfigDict(dict(learning_rate=1.0, warmup_steps=0, total_steps=10, b1=0.9, b2=0.98,
                                       eps=0.1, weight_decay=0.0, grad_clip_norm=1.0, frozen_regex="^b$"))
  params = {"a": jnp.zeros((4,), jnp.float32), "b": jnp.zeros((4,), jnp.float32)}
  grads = {"a": jnp.full((4,), 3.0), "b": jnp.full((4,), 100.0)}   # norms: 'a' 6, all 200.09
  tx = optim.make_optimizer(cfg, params)
  opt_state = tx.init(params)
  got, _ = optim.apply_optimizer(tx, grads, opt_state, params, optax.tree.norm(grads))
  updates, _ = tx.update(grads, opt_state, params)
  want = optax.apply_updates(params, updates)
  for key in params:
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)
  # 'a' clipped by its own norm: 3 / 6 = 0.5 each, step 0.5 / 0.6; by all the norm it would be ~0.13.
  np.testing.assert_allclose(np.asarray(got["a"]), -0.5 / 0.6, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(got["b"]), 0.0)
  own, _ = optim.clip_by_global_norm(1.0).update({"a": grads["a"]}, optax.EmptyState(), global_norm=jnp.float32(12.0))
  np.testing.assert_allclose(np.asarray(own["a"]), 0.25)   # a handed-over norm is used as it is
