"""Re-running, interrupting or changing a run never loses or misstates results (issue 20.1-20.4)."""
import glob
import json
import os
import sys

import pytest

from clip_jax import observe


# ----------------------------------------------------------------------------- metrics without ghosts
def tensorboard_steps(workdir: str, tag: str = "loss") -> tuple[list[int], list[int]]:
  """(steps as TensorBoard's EventAccumulator shows them, steps of every record in the files)."""
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
  accumulator = event_accumulator.EventAccumulator(os.path.join(workdir, "tb"))
  accumulator.Reload()
  shown = [e.step for e in accumulator.Scalars(tag)]
  stored = sorted(e.step for path in glob.glob(os.path.join(workdir, "tb", "*tfevents*"))
                  for e in EventFileLoader(path).Load() if any(v.tag == tag for v in e.summary.value))
  return shown, stored


def jsonl_steps(workdir: str) -> list[int]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f if line.strip()]


def test_a_resume_drops_the_metrics_of_the_lost_attempt(tmp_path):
  workdir = str(tmp_path)
  writer = observe.MetricWriter(workdir, resume_step=0)
  for step in range(1, 11):
    writer.write(step, {"loss": 10.0 - step})
  writer.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 11, "lo')  # a line cut short by SIGKILL
  # The checkpoint of step 6 is what the run resumes from: steps 7-10 of the first attempt are ghosts.
  writer = observe.MetricWriter(workdir, resume_step=6)
  for step in range(7, 13):
    writer.write(step, {"loss": 100.0 + step})
  writer.close()
  assert jsonl_steps(workdir) == list(range(1, 13))
  shown, stored = tensorboard_steps(workdir)
  assert shown == stored == list(range(1, 13))
  values = {r["step"]: r["loss"] for r in observe.read_metrics(str(tmp_path / "metrics.jsonl"))}
  assert values[6] == 4.0 and values[7] == 107.0


def test_a_resume_with_nothing_to_drop_leaves_the_files_alone(tmp_path):
  workdir = str(tmp_path)
  writer = observe.MetricWriter(workdir, resume_step=0)
  writer.write(1, {"loss": 1.0})
  writer.close()
  before = {p: open(p, "rb").read() for p in glob.glob(str(tmp_path / "**" / "*"), recursive=True) if os.path.isfile(p)}
  assert observe.drop_metrics_after(workdir, 1) == 0
  after = {p: open(p, "rb").read() for p in before}
  assert before == after


# ----------------------------------------------------------------------------- runs remember how they were made
def _config(**overrides):
  import ml_collections
  c = ml_collections.ConfigDict(dict(seed=0, global_batch=128, total_steps=600, log_every=10,
                                     model=dict(name="ViT-Tiny"), mesh=dict(data=-1, fsdp=1)))
  c.update_from_flattened_dict(overrides)
  return c


def _fake_checkpoint(workdir, step):
  os.makedirs(os.path.join(workdir, "checkpoints", str(step)), exist_ok=True)


def test_a_resume_that_changes_the_maths_is_refused_with_the_keys_named(tmp_path):
  from clip_jax import loop
  from clip_jax.cli import UserError
  workdir = str(tmp_path)
  said = []
  assert loop.check_workdir(workdir, _config(), total_steps=600, log=said.append) is False
  started = (tmp_path / "config.json").read_text()
  _fake_checkpoint(workdir, 300)
  with pytest.raises(UserError, match=r"global_batch: 128 -> 64.*--allow-config-change") as error:
    loop.check_workdir(workdir, _config(global_batch=64), total_steps=600, log=said.append)
  assert "\n" not in str(error.value) and "model.name" not in str(error.value)
  assert (tmp_path / "config.json").read_text() == started  # refused: the record stays as it was
  # How the run is carried out may change without asking (and is recorded).
  assert loop.check_workdir(workdir, _config(log_every=1, **{"mesh.fsdp": 8}), total_steps=600, log=said.append) is False
  # With the flag it goes on, and the change is recorded.
  assert loop.check_workdir(workdir, _config(global_batch=64), total_steps=600, allow_config_change=True,
                            log=said.append) is False
  changes = [json.loads(line) for line in open(tmp_path / "config_changes.jsonl")]
  assert changes[0]["changes"] == {"log_every": [10, 1], "mesh.fsdp": [1, 8]} and not changes[0]["allowed"]
  assert changes[1]["changes"]["global_batch"] == [128, 64] and changes[1]["allowed"]
  assert changes[1]["resumed_from_step"] == 300
  assert json.load(open(tmp_path / "config.json"))["global_batch"] == 64
  assert any("global_batch" in line and "recorded" in line for line in said)


def test_a_staged_trainer_is_refused_too(tmp_path):
  # The embedded SD pretraining checkpoints in WORKDIR/vae/ and WORKDIR/unet/, not WORKDIR/checkpoints.
  from clip_jax import loop
  from clip_jax.cli import UserError
  workdir = str(tmp_path)
  assert loop.check_workdir(workdir, _config(), total_steps=600) is False
  assert loop.check_workdir(workdir, _config(global_batch=64), total_steps=600) is False  # nothing saved yet
  assert json.load(open(tmp_path / "config.json"))["global_batch"] == 64  # the record of what runs now
  _fake_checkpoint(os.path.join(workdir, "vae"), 40)
  with pytest.raises(UserError, match=r"global_batch: 64 -> 32"):
    loop.check_workdir(workdir, _config(global_batch=32), total_steps=600)
  assert loop.stage_steps(workdir) == [40]


def test_a_finished_run_is_left_alone(tmp_path):
  from clip_jax import loop
  workdir = str(tmp_path)
  loop.check_workdir(workdir, _config(), total_steps=600)
  _fake_checkpoint(workdir, 600)
  loop.mark_finished(workdir, 600, ["results.md"])
  said = []
  before = {p: open(p, "rb").read() for p in glob.glob(str(tmp_path / "*")) if os.path.isfile(p)}
  assert loop.check_workdir(workdir, _config(log_every=1), total_steps=600, log=said.append) is True
  assert len(said) == 1 and "is finished (step 600)" in said[0] and "--rerun-eval" in said[0]
  # A trainer without the option (the embedded SD pretraining) does not offer it.
  assert loop.check_workdir(workdir, _config(), total_steps=600, offers_rerun_eval=False, log=said.append) is True
  assert said[-1].endswith("Results: results.md.") and "--rerun-eval" not in said[-1]
  assert {p: open(p, "rb").read() for p in glob.glob(str(tmp_path / "*")) if os.path.isfile(p)} == before
  assert loop.check_workdir(workdir, _config(), total_steps=600, rerun_eval=True, log=said.append) is False
  # Other settings allowed on a finished run: no step would run under them, so its results must not claim them.
  from clip_jax.cli import UserError
  with pytest.raises(UserError, match=r"is finished \(step 600\); no step would run .*global_batch"):
    loop.check_workdir(workdir, _config(global_batch=64), total_steps=600, allow_config_change=True)
  assert {p: open(p, "rb").read() for p in glob.glob(str(tmp_path / "*")) if os.path.isfile(p)} == before
  # More steps (allowed): not finished any more, and DONE goes until the trainer writes it again.
  assert loop.check_workdir(workdir, _config(total_steps=900), total_steps=900, allow_config_change=True) is False
  assert loop.finished(workdir) is None


def test_operational_keys_are_named_by_group():
  from clip_jax import loop
  assert loop.is_operational("mesh.fsdp") and loop.is_operational("validation.prompts")
  assert not loop.is_operational("global_batch") and not loop.is_operational("meshes")
  assert loop.flatten_config(_config())["model.name"] == "ViT-Tiny"


# ----------------------------------------------------------------------------- the loop: Ctrl-C, finished runs
def _toy(workdir, total_steps, interrupt_at=None, rerun_hooks=False):
  """Least squares through loop.run; `interrupt_at`: a hook sends this process SIGINT (Ctrl-C) there."""
  import signal

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.sharding import NamedSharding, PartitionSpec as P

  from clip_jax import loop, sharding
  mesh = sharding.create_mesh({"data": -1})
  replicated = NamedSharding(mesh, P())
  tx = optax.adam(0.1)
  w = jnp.zeros((4,), jnp.float32)
  state = {**loop.init_counters(), "params": {"w": w}, "opt_state": tx.init({"w": w})}
  shardings = jax.tree.map(lambda _: replicated, state)

  def next_batch(step):
    x = np.random.default_rng(step).normal(size=(8, 4)).astype(np.float32)
    return sharding.place_global_batch({"x": x, "y": x @ np.arange(4, dtype=np.float32)}, mesh)

  def update(state, batch):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean(jnp.square(batch["x"] @ p["w"] - batch["y"])))(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return dict(state, params=optax.apply_updates(state["params"], updates), opt_state=opt_state), \
        {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  hooks = [loop.Hook("probe", 1, lambda step, state: {"probe/w0": float(state["params"]["w"][0])})]
  if interrupt_at is not None:
    def ctrl_c(step, state):
      if step == interrupt_at:
        os.kill(os.getpid(), signal.SIGINT)
        # Handled at once: a second Ctrl-C now would get the system's default (end the process).
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
    hooks.append(loop.Hook("ctrl-c", interrupt_at, ctrl_c))
  options = loop.Options(total_steps=total_steps, log_every=1, checkpoint_every=4, async_checkpoints=False,
                         progress_bar=False, compilation_cache="")
  return loop.run(workdir=str(workdir), mesh=mesh, state=jax.device_put(state, shardings), state_shardings=shardings,
                  update=update, next_batch=next_batch, options=options, hooks=hooks, rerun_hooks=rerun_hooks)


def _files(workdir) -> dict[str, bytes]:
  return {os.path.relpath(p, workdir): open(p, "rb").read()
          for p in glob.glob(os.path.join(str(workdir), "**", "*"), recursive=True) if os.path.isfile(p)}


def test_ctrl_c_saves_at_that_step_and_resumes_to_the_same_result(tmp_path, capsys):
  import random
  import signal

  import numpy as np
  before = signal.getsignal(signal.SIGINT)  # default_int_handler at a terminal; SIG_IGN in a background job
  straight = _toy(tmp_path / "straight", 10)
  at = random.Random().randint(1, 9)  # any step, not only a checkpoint step
  interrupted = _toy(tmp_path / "interrupted", 10, interrupt_at=at)
  assert interrupted.preempted and interrupted.step == at
  assert f"Stopped at step {at} of 10" in capsys.readouterr().out
  assert signal.getsignal(signal.SIGINT) is before  # given back
  from clip_jax import loop
  assert loop.saved_steps(str(tmp_path / "interrupted"))[-1] == at
  resumed = _toy(tmp_path / "interrupted", 10)
  assert resumed.step == 10 and not resumed.preempted
  np.testing.assert_array_equal(np.asarray(resumed.state["params"]["w"]), np.asarray(straight.state["params"]["w"]))
  steps = [r["step"] for r in observe.read_metrics(str(tmp_path / "interrupted" / "metrics.jsonl")) if "loss" in r]
  assert steps == list(range(1, 11))


def test_the_loop_leaves_a_finished_workdir_as_it_is(tmp_path):
  _toy(tmp_path, 4)
  before = _files(tmp_path)
  again = _toy(tmp_path, 4)
  assert again.step == 4 and again.hook_metrics == {}
  assert _files(tmp_path) == before  # no new event file, no rewritten metrics or plot
  rerun = _toy(tmp_path, 4, rerun_hooks=True)
  assert "probe/w0" in rerun.hook_metrics and _files(tmp_path) == before


# ----------------------------------------------------------------------------- through the trainers' commands
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices=4):
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONPATH=REPO)


def _clip_cmd(workdir, steps, *extra):
  return [sys.executable, "-m", "clip_jax.train", "--config=configs/clip/digits.py", f"--workdir={workdir}",
          f"--config.total_steps={steps}", "--config.global_batch=32", "--config.checkpoint_every=3",
          "--config.log_every=1", "--config.progress_bar=False",
          "--config.peak_flops_per_device=1e12", *extra]


def _run(command, env=None):
  import subprocess
  return subprocess.run(command, cwd=REPO, env=env or _env(), capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_clip_rerun_finished_changed_and_allowed(tmp_path):
  """Issue 20.1 and 20.3 through `python -m clip_jax.train`: a finished workdir is left as it is; a
  changed batch size is refused by name; allowed, the run goes on and the change is recorded."""
  workdir = tmp_path / "run"
  first = _run(_clip_cmd(workdir, 3, "--config.eval_every=3", "--config.zeroshot_eval.batch_size=128"))
  assert first.returncode == 0, first.stderr[-3000:]
  results = json.load(open(workdir / "results.json"))
  assert "train/loss" in results and any(k.startswith("zeroshot/") for k in results) and results["step"] == 3
  before = _files(workdir)
  again = _run(_clip_cmd(workdir, 3, "--config.eval_every=3", "--config.zeroshot_eval.batch_size=128"))
  assert again.returncode == 0 and f"{workdir} is finished (step 3)" in again.stdout, again.stderr[-3000:]
  assert "Resuming" not in again.stdout
  assert _files(workdir) == before  # every file, byte for byte
  # --rerun-eval: the evaluation again, its numbers merged into results.json; the training record stays.
  rerun = _run(_clip_cmd(workdir, 3, "--config.eval_every=3", "--config.zeroshot_eval.batch_size=128", "--rerun-eval"))
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  after = json.load(open(workdir / "results.json"))
  assert after["train/loss"] == results["train/loss"]
  assert {k: v for k, v in after.items() if k.startswith("zeroshot/")} == \
      pytest.approx({k: v for k, v in results.items() if k.startswith("zeroshot/")})
  assert (workdir / "metrics.jsonl").read_bytes() == before["metrics.jsonl"]
  # Another batch size: refused, by name, in one line; nothing written.
  changed = _run(_clip_cmd(workdir, 5, "--config.global_batch=16"))
  assert changed.returncode == 2 and "global_batch: 32 -> 16" in changed.stderr, changed.stderr[-2000:]
  assert len(changed.stderr.strip().splitlines()) == 1 and "--allow-config-change" in changed.stderr
  assert not (workdir / "config_changes.jsonl").exists()
  allowed = _run(_clip_cmd(workdir, 5, "--config.global_batch=16", "--allow-config-change"))
  assert allowed.returncode == 0, allowed.stderr[-3000:]
  assert "Resuming from the checkpoint of step 3" in allowed.stdout
  change = json.loads((workdir / "config_changes.jsonl").read_text().splitlines()[-1])
  assert change["changes"]["global_batch"] == [32, 16] and change["changes"]["total_steps"] == [3, 5]
  assert json.load(open(workdir / "config.json"))["global_batch"] == 16
  assert json.load(open(workdir / "results.json"))["step"] == 5
  assert json.load(open(workdir / "results.1.json"))["step"] == 3  # the other settings' results, kept aside


@pytest.mark.slow
def test_clip_ctrl_c_and_sigkill_resume_to_the_same_result_with_each_step_once(tmp_path):
  """Issue 20.2 and 20.4: SIGINT at a random step saves and exits 75, the resumed run equals an
  uninterrupted one; after SIGKILL and resume, metrics.jsonl and TensorBoard hold each step once."""
  import signal

  import jax
  import numpy as np
  from flax import traverse_util

  import clip_jax
  from killresume import kill_then_resume
  steps = 10
  assert _run(_clip_cmd(tmp_path / "straight", steps, "--config.zeroshot_eval.enabled=False")).returncode == 0

  def params(workdir):
    return traverse_util.flatten_dict(jax.device_get(clip_jax.load_checkpoint(str(workdir))[1]["params"]))
  straight = params(tmp_path / "straight")
  for name, sig in (("interrupted", signal.SIGINT), ("killed", signal.SIGKILL)):
    workdir = tmp_path / name
    kill_then_resume(_clip_cmd(workdir, steps, "--config.zeroshot_eval.enabled=False"), str(workdir), cwd=REPO,
                     env=_env(), kill_between=(2, 8), sig=sig)  # stops before the last step
    resumed = params(workdir)
    for key in straight:
      np.testing.assert_array_equal(resumed[key], straight[key], err_msg=f"{name} {key}")
    assert jsonl_steps(str(workdir)) == list(range(1, steps + 1)), name
    shown, stored = tensorboard_steps(str(workdir))
    assert shown == stored == list(range(1, steps + 1)), name


# ----------------------------------------------------------------------------- sweeps
def test_a_sweep_rerun_with_other_overrides_is_refused_unless_allowed(tmp_path, monkeypatch):
  import io

  from clip_jax.cli import UserError
  from launch import sweep
  from test_launch import FAKE_TRAINER, _write_sweep_file
  (tmp_path / "fake_trainer.py").write_text(FAKE_TRAINER)
  monkeypatch.setenv("PYTHONPATH", str(tmp_path))
  sweep_file = _write_sweep_file(tmp_path / "bs.py", """
      from launch.sweep import grid
      BASE_CONFIG = "configs/clip/digits.py"
      def get_sweep():
        return grid(global_batch=[16, 32])
      """)
  root = tmp_path / "root"
  argv = [sweep_file, f"--root={root}", "--module=fake_trainer"]
  assert sweep.main([*argv, "--", "--config.total_steps=3"], out=io.StringIO()) == 0
  record = (root / "sweep.json").read_bytes()
  # The case: the same sweep without the overrides it was run with.
  with pytest.raises(UserError, match=r"--config\.total_steps: '3' -> '\(not given\)'.*--allow-config-change"):
    sweep.main(argv, out=io.StringIO())
  assert (root / "sweep.json").read_bytes() == record
  # How runs are carried out may change; the runs are done.
  out = io.StringIO()
  assert sweep.main([*argv, "--", "--config.total_steps=3", "--config.log_every=5"], out=out) == 0
  assert out.getvalue().count(": done") == 2
  record = (root / "sweep.json").read_bytes()
  # Allowed: the trainers get the flag too, the change is recorded and the runs go on to the new length.
  out = io.StringIO()
  assert sweep.main([*argv, "--allow-config-change", "--dry-run", "--", "--config.total_steps=5"], out=out) == 0
  assert out.getvalue().count("--allow_config_change") == 2 and (root / "sweep.json").read_bytes() == record
  out = io.StringIO()
  assert sweep.main([*argv, "--allow-config-change", "--", "--config.total_steps=5"], out=out) == 0
  saved = json.load(open(root / "sweep.json"))
  assert saved["changes"][-1]["changes"] == {"--config.total_steps": ["3", "5"]}
  assert out.getvalue().count("resume from step 3") == 2


@pytest.mark.slow
def test_a_sweep_interrupted_by_ctrl_c_stops(tmp_path):
  """Issue 20.2: Ctrl-C (SIGINT to the sweep) reaches the running trainer once; it saves and exits
  75, and the sweep stops there with 75 instead of starting the next run."""
  import signal
  import subprocess
  import time

  from test_launch import _write_sweep_file
  sweep_file = _write_sweep_file(tmp_path / "bs.py", """
      from launch.sweep import grid
      def get_sweep():
        return grid(global_batch=[8, 16])
      """)
  root = tmp_path / "root"
  command = [sys.executable, "-m", "launch.sweep", sweep_file, "--base-config=configs/clip/digits.py", f"--root={root}",
             "--", "--config.total_steps=200", "--config.checkpoint_every=50", "--config.log_every=1",
             "--config.eval_every=0", "--config.zeroshot_eval.enabled=False", "--config.progress_bar=False",
             "--config.peak_flops_per_device=1e12", "--config.async_checkpoints=False"]
  proc = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = root / "global_batch=8" / "metrics.jsonl"
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None and not (metrics.exists() and
                                                                 len(metrics.read_text().splitlines()) >= 3):
    time.sleep(0.1)
  proc.send_signal(signal.SIGINT)
  output, _ = proc.communicate(timeout=300)
  assert proc.returncode == 75, output[-3000:]
  assert "Stopped at step" in output and "the sweep stops here" in output
  assert not (root / "global_batch=16").exists()  # the next run never started
  from clip_jax import loop
  saved = loop.saved_steps(str(root / "global_batch=8"))
  assert saved and 3 <= saved[-1] < 200


@pytest.mark.slow
def test_dreambooth_rerun_of_a_finished_workdir_changes_no_file(tmp_path, tiny_sd_dir):
  """Issue 20.1 through `python -m dreambooth_jax.train`; the validation grid is labelled (20.6)."""
  import numpy as np
  from PIL import Image

  model_dir = tiny_sd_dir
  photos = tmp_path / "photos"
  photos.mkdir()
  for i in range(2):
    pixels = np.full((32, 32, 3), 255, np.uint8)
    pixels[8:24, 8 + i:24 + i] = (220, 30, 30)
    Image.fromarray(pixels).save(photos / f"{i}.png")
  workdir = tmp_path / "run"
  command = [sys.executable, "-m", "dreambooth_jax.train", "--config=configs/dreambooth/default.py:runlocal,lora",
             f"--workdir={workdir}", f"--config.pretrained_model={model_dir}", f"--config.instance_dir={photos}",
             "--config.class_noun=square", "--config.dtype=float32", "--config.total_steps=2",
             "--config.with_prior_preservation=False", "--config.eval_every=2", "--config.validation.steps=2",
             "--config.validation.images_per_prompt=1", "--config.progress_bar=False"]
  first = _run(command, env=_env(1))
  assert first.returncode == 0, first.stderr[-3000:]
  assert (workdir / "DONE").exists() and (workdir / "export" / "model_index.json").exists()
  grid = Image.open(workdir / "samples" / "step_000002.png")
  assert grid.width >= 256  # 32 px samples enlarged, a labelled row per validation prompt
  before = _files(workdir)
  again = _run(command, env=_env(1))
  assert again.returncode == 0 and f"{workdir} is finished (step 2)" in again.stdout, again.stderr[-3000:]
  assert _files(workdir) == before
