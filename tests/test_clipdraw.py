"""CLIPDraw: the Bezier rasteriser against analytic coverage and finite differences; the loop; the CLI."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clip_jax
from clip_jax import cli, draw, rasterize


def _area_coverage(inside, height, width, sub=16):
  """The exact pixel-area coverage of an analytic shape, integrated on a sub x sub grid per pixel."""
  offsets = (np.arange(sub) + 0.5) / sub
  ys = (np.arange(height)[:, None] + offsets).ravel()
  xs = (np.arange(width)[:, None] + offsets).ravel()
  yy, xx = np.meshgrid(ys, xs, indexing="ij")
  return inside(xx, yy).astype(np.float64).reshape(height, sub, width, sub).mean((1, 3))


def _check_coverage(coverage, reference):
  # Stated tolerance: a one-pixel linear edge ramp differs from exact box-filter area by at most
  # ~0.05 on these shapes (0 for an axis-aligned edge); the total painted area within 1.5%.
  error = np.abs(coverage - reference)
  touched = (reference > 0) | (coverage > 0)
  assert error.max() < 0.06, error.max()
  assert error[touched].mean() < 0.015, error[touched].mean()
  np.testing.assert_allclose(coverage.sum(), reference.sum(), rtol=0.015)


def test_straight_thick_segment_matches_analytic_capsule():
  a, b, width = np.array([5.3, 7.1]), np.array([24.6, 20.2]), 4.0

  def capsule(x, y):
    p = np.stack([x, y], -1)
    t = np.clip(((p - a) @ (b - a)) / ((b - a) @ (b - a)), 0.0, 1.0)
    return np.linalg.norm(p - (a + t[..., None] * (b - a)), axis=-1) <= width / 2

  points = jnp.asarray(np.stack([a, a + (b - a) / 3, a + 2 * (b - a) / 3, b]), jnp.float32)
  _check_coverage(np.asarray(rasterize.coverage(points, width, 32, 32)), _area_coverage(capsule, 32, 32))


def _circle_path(centre, radius):
  """A circle as 4 joined cubic segments (the standard kappa = 4(sqrt 2 - 1)/3; radial error 3e-4 r)."""
  kappa = 4 * (np.sqrt(2) - 1) / 3
  points = [centre + radius * np.array([1.0, 0.0])]
  for quarter in range(4):
    angle = quarter * np.pi / 2
    u, v = np.array([np.cos(angle), np.sin(angle)]), np.array([-np.sin(angle), np.cos(angle)])
    points += [centre + radius * (u + kappa * v), centre + radius * (v + kappa * u), centre + radius * v]
  return jnp.asarray(np.stack(points), jnp.float32)  # [13, 2]


def test_circle_matches_analytic_ring_and_renders_as_its_coverage():
  centre, radius, width = np.array([16.0, 15.0]), 10.0, 3.0

  def ring(x, y):
    return np.abs(np.hypot(x - centre[0], y - centre[1]) - radius) <= width / 2

  path = _circle_path(centre, radius)
  coverage = np.asarray(rasterize.coverage(path, width, 32, 32))
  _check_coverage(coverage, _area_coverage(ring, 32, 32))
  # Black ink at full alpha on white paper: the image is 1 - coverage in every channel.
  image = rasterize.render(rasterize.Strokes(path[None], jnp.array([width]), jnp.array([[0.0, 0.0, 0.0, 1.0]])), 32, 32)
  np.testing.assert_allclose(image, np.repeat(1.0 - coverage[..., None], 3, -1), atol=1e-5)


def test_compositing_is_over_in_stroke_order():
  a = rasterize.Strokes(jnp.array([[[2.0, 8.0], [6.0, 8.0], [10.0, 8.0], [14.0, 8.0]]] * 2),
                        jnp.array([20.0, 20.0]), jnp.array([[1.0, 0.0, 0.0, 0.5], [0.0, 0.0, 1.0, 0.5]]))
  pixel = rasterize.render(a, 16, 16, background=jnp.array([0.0, 1.0, 0.0]))[8, 8]
  # green paper, then red at alpha 0.5, then blue at alpha 0.5
  np.testing.assert_allclose(pixel, [0.25, 0.25, 0.5], atol=1e-6)


def test_gradients_match_finite_differences():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    points = jnp.asarray(rng.uniform(3, 13, (3, 7, 2)))      # 3 strokes of 2 segments on 16 px
    strokes = rasterize.Strokes(points, jnp.asarray([2.5, 3.0, 1.7]), jnp.asarray(rng.uniform(0.2, 0.9, (3, 4))))
    weights = jnp.asarray(rng.normal(size=(16, 16, 3)))

    @jax.jit
    def loss(s):
      return jnp.sum(weights * rasterize.render(s, 16, 16, background=0.8))

    grads = jax.grad(loss)(strokes)
    assert float(jnp.abs(grads.points).max()) > 0 and float(jnp.abs(grads.width).max()) > 0
    eps = 1e-6
    for field in ("points", "width", "color"):
      value = getattr(strokes, field)
      direction = jnp.asarray(rng.normal(size=value.shape))
      bump = lambda sign: loss(strokes._replace(**{field: value + sign * eps * direction}))  # noqa: E731
      fd = (bump(1) - bump(-1)) / (2 * eps)
      # float64, eps 1e-6: agreement to 1e-6 relative unless a pixel's ramp kink is crossed.
      np.testing.assert_allclose(float(jnp.vdot(getattr(grads, field), direction)), float(fd), rtol=1e-5, atol=1e-7)


def test_bad_strokes_are_refused():
  with pytest.raises(ValueError, match=r"\[S, 3K \+ 1, 2\]"):
    rasterize.render(rasterize.Strokes(jnp.zeros((2, 5, 2)), jnp.ones(2), jnp.ones((2, 4))), 8, 8)


@pytest.mark.slow  # ~9 s at load ~1.7: out of the fast subset (< 5 min)
def test_draw_loop_lowers_its_loss_and_keeps_the_clamps():
  # A non-CLIP target keeps this fast: make the drawing dark in the middle square.
  target = jnp.ones((32, 32, 3)).at[8:24, 8:24].set(0.0)

  def loss_fn(images, rng):
    return jnp.mean((images - target) ** 2, axis=(1, 2, 3))

  settings = draw.DrawSettings(num_strokes=12, steps=30, canvas=32, frame_every=10, gray=True)
  frames = []
  strokes, images, history = draw.draw(loss_fn, 2, settings, jax.random.key(0), progress=False,
                                       on_frame=lambda step, imgs: frames.append(step))
  assert images.shape == (2, 32, 32, 3) and frames == [0, 10, 20, 30]
  assert np.all(history["loss"][-1] < 0.7 * history["loss"][0])
  assert float(strokes.width.min()) >= 1.0 and float(strokes.width.max()) <= 50 * 32 / 224 + 1e-6
  assert float(strokes.color.min()) >= 0 and float(strokes.color.max()) <= 1
  np.testing.assert_allclose(strokes.color[..., 0], strokes.color[..., 2])  # gray: one level per stroke


def _square_loss(images, rng):  # a non-CLIP target keeps these fast: dark in the middle square
  target = jnp.ones((32, 32, 3)).at[8:24, 8:24].set(0.0)
  return jnp.mean((images - target) ** 2, axis=(1, 2, 3))


@pytest.mark.slow  # ~12 s at low load: kept out of the fast subset (< 5 min)
def test_view_resolution_is_what_the_loss_sees():
  from clip_jax.guidance import through_resolution
  settings = draw.DrawSettings(num_strokes=3, steps=1, canvas=32, view_resolution=8)
  _, _, history = draw.draw(_square_loss, 2, settings, jax.random.key(0), progress=False)
  # The first step's loss is of the starting strokes, which draw() makes from the key's first half.
  rendered = draw.render(draw.init_strokes(jax.random.split(jax.random.key(0))[0], 2, settings), settings)
  np.testing.assert_allclose(history["loss"][0], _square_loss(through_resolution(rendered, 8), None), rtol=1e-5)
  assert np.all(np.abs(history["loss"][0] - np.asarray(_square_loss(rendered, None))) > 1e-4)
  with pytest.raises(ValueError, match="view_resolution 5 px must divide the 32 px canvas"):
    draw.DrawSettings(canvas=32, view_resolution=5)


def test_offset_grid_is_the_grid_of_a_moved_image():
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(3, 32, 32, 3)).astype(np.float32)
  # shift: numpy's reference, the content moved down 2 and left 3 with white coming in.
  expected = np.ones_like(images[0])
  expected[2:, :29] = images[0, :30, 3:]
  np.testing.assert_array_equal(draw.shift(jnp.asarray(images[0]), 2, -3, 1.0), expected)
  # The jittered view = the naive one: move by the offset, box average + bicubic, move back.
  from clip_jax.guidance import through_resolution
  key = jax.random.key(4)
  got = np.asarray(jax.jit(draw.through_offset_grid, static_argnums=(1, 3))(jnp.asarray(images), 8, key, 1.0))
  offsets = np.asarray(jax.random.randint(key, (3, 2), -2, 2))
  assert offsets.min() >= -2 and offsets.max() <= 1  # the 4 phases of a 4 px cell, centred

  def naive_move(image, dy, dx):  # content moved by (dy, dx), white elsewhere
    out = np.ones_like(image)
    out[max(dy, 0):32 + min(dy, 0), max(dx, 0):32 + min(dx, 0)] = image[max(-dy, 0):32 - max(dy, 0),
                                                                         max(-dx, 0):32 - max(dx, 0)]
    return out
  for i, (dy, dx) in enumerate(offsets):
    seen = np.asarray(through_resolution(jnp.asarray(naive_move(images[i], dy, dx))[None], 8))[0]
    np.testing.assert_allclose(got[i], naive_move(seen, -dy, -dx), atol=1e-6)
  # Over many keys every phase occurs, and the loss sees a different image than the fixed grid.
  many = np.asarray(jax.random.randint(jax.random.key(0), (200, 2), -2, 2))
  assert set(many.ravel()) == {-2, -1, 0, 1}
  settings = draw.DrawSettings(num_strokes=3, steps=1, canvas=32, view_resolution=8, view_jitter=True)
  assert not np.allclose(draw.as_seen(jnp.asarray(images), settings, jax.random.key(1)),
                         through_resolution(jnp.asarray(images), 8))
  with pytest.raises(ValueError, match="view_jitter needs an rng key"):
    draw.as_seen(jnp.asarray(images), settings)
  with pytest.raises(ValueError, match="view_jitter moves the view_resolution grid"):
    draw.DrawSettings(canvas=32, view_jitter=True)


def test_init_spread_keeps_the_first_points_central():
  settings = draw.DrawSettings(num_strokes=50, canvas=32, init_spread=0.5)
  first = np.asarray(draw.init_strokes(jax.random.key(0), 2, settings).points[:, :, 0])
  assert first.min() >= 8 and first.max() <= 24 and first.max() - first.min() > 12  # the central half of 32 px


@pytest.mark.slow  # ~7 s at low load: kept out of the fast subset (< 5 min)
def test_restarts_keep_the_lowest_loss():
  # Rows r * n + i for n = 2 drawings: drawing 0's losses are 3, 2, 4, drawing 1's 1, 5, 0.
  np.testing.assert_array_equal(draw.best_restarts(jnp.array([3.0, 1.0, 2.0, 5.0, 4.0, 0.0]), 3), [2, 5])
  settings = draw.DrawSettings(num_strokes=3, steps=4, canvas=32, restarts=3, frame_every=4)
  final = []
  _, images, history = draw.draw(_square_loss, 2, settings, jax.random.key(1), progress=False,
                                 on_frame=lambda step, imgs: final.append(imgs) if step == 4 else None)
  assert final[0].shape == (6, 32, 32, 3) and history["restart_loss"].shape == (3, 2)
  np.testing.assert_array_equal(history["kept"], np.argmin(history["restart_loss"], axis=0))
  np.testing.assert_array_equal(images, final[0][history["kept"] * 2 + np.arange(2)])
  np.testing.assert_allclose(history["restart_loss"].min(0), history["loss"][-1:].mean(0), rtol=1e-6)


def _noisy_square_loss(images, rng):  # uses its key: a resumed step must get the key it has unstopped
  target = jnp.ones((32, 32, 3)).at[8:24, 8:24].set(0.0)
  noise = 0.2 * jax.random.normal(rng, images.shape[1:])
  return jnp.mean((images - target - noise) ** 2, axis=(1, 2, 3))


@pytest.mark.slow  # three runs' compiles: ~10 s
def test_a_stopped_draw_resumed_from_its_state_file_equals_an_unstopped_one(tmp_path, monkeypatch):
  from clip_jax import observe
  settings = draw.DrawSettings(num_strokes=2, segments=1, curve_samples=4, steps=7, canvas=32, frame_every=2,
                               restarts=2, augment=draw.Augmentations(num=0))
  whole_frames = []
  strokes, images, history = draw.draw(_noisy_square_loss, 1, settings, jax.random.key(3), progress=False,
                                       on_frame=lambda step, imgs: whole_frames.append((step, imgs)))

  class CtrlCAfterStep5(observe.Progress):  # Ctrl-C between frames: after step 5's update, before step 6
    def update(self, step):
      super().update(step)
      if step == 5:
        raise KeyboardInterrupt
  monkeypatch.setattr(observe, "Progress", CtrlCAfterStep5)
  frames = []
  _, _, stopped = draw.draw(_noisy_square_loss, 1, settings, jax.random.key(3), progress=False,
                            on_frame=lambda step, imgs: frames.append((step, imgs)), stop_on_interrupt=True)
  monkeypatch.undo()
  assert stopped["state"].step == 5 and stopped["state"].strokes.points.shape == (2, 2, 4, 2)  # both restarts
  # Through the file the CLI keeps: the frames before the stop (the stop's own frame is made again if due).
  path = draw.save_state(str(tmp_path / draw.STATE_FILE), stopped["state"], {"prompt": "x"},
                         [(step, f) for step, f in frames if step < 5], {"seconds": 1.0})
  command, meta, arrays = draw.read_state_file(path)
  assert command == {"prompt": "x"} and meta == {"seconds": 1.0}
  state, kept_frames = draw.state_from_arrays(arrays, settings, 1)
  resumed_frames = list(kept_frames)
  strokes2, images2, history2 = draw.draw(_noisy_square_loss, 1, settings, jax.random.key(3), progress=False,
                                          on_frame=lambda step, imgs: resumed_frames.append((step, imgs)),
                                          resume=state)
  # Bitwise: the same compiled step on the same strokes, Adam moments, step count and keys.
  for field in ("points", "width", "color"):
    np.testing.assert_array_equal(getattr(strokes2, field), getattr(strokes, field))
  np.testing.assert_array_equal(images2, images)
  for key in ("loss", "restart_loss", "kept", "start_images"):
    np.testing.assert_array_equal(history2[key], history[key])
  assert history2["step"] == history["step"] == list(range(1, 8))
  assert [s for s, _ in resumed_frames] == [s for s, _ in whole_frames] == [0, 2, 4, 6, 7]
  for (_, a), (_, b) in zip(resumed_frames, whole_frames):
    np.testing.assert_array_equal(draw.to_uint8(a), draw.to_uint8(b))
  with pytest.raises(ValueError, match="these settings make"):  # a state of other settings is refused
    draw.state_from_arrays(arrays, dataclasses.replace(settings, num_strokes=3), 1)
  with pytest.raises(ValueError, match="these settings make 3 steps of 2 drawings"):  # fewer steps than it holds
    draw.state_from_arrays(arrays, dataclasses.replace(settings, steps=3), 1)
  with pytest.raises(ValueError, match="the resume state has no losses"):  # was a KeyError traceback
    draw.state_from_arrays({k: v for k, v in arrays.items() if k != "losses"}, settings, 1)
  (tmp_path / "cut.npz").write_bytes(open(path, "rb").read()[:100])
  with pytest.raises(ValueError, match="cut.npz is not a drawing's resume state"):
    draw.read_state_file(str(tmp_path / "cut.npz"))


def test_the_same_command_on_a_finished_drawing_says_so_and_another_cannot_take_a_stopped_one(tmp_path, monkeypatch,
                                                                                              capsys):
  from clip_jax import guidance
  monkeypatch.setattr(guidance, "load_guide", lambda *a, **k: pytest.fail("loaded a CLIP for no work"))
  out = tmp_path / "out"
  out.mkdir()
  argv = ["--checkpoint", str(tmp_path), "--prompt", "a cat", "--out", str(out), "--strokes", "3", "--steps", "10",
          "--canvas", "32"]
  settings = draw.DrawSettings(num_strokes=3, steps=10, canvas=32)
  command = {"prompt": "a cat", "negative": [], "checkpoints": [str(tmp_path)], "seed": 0, "tokenizer": None,
             "model_name": None, "act": None, "settings": draw.settings_record(settings)}
  (out / "result.json").write_text(json.dumps({**command, "steps_done": 10, "stopped": None, "cosine_to_prompt": 0.25}))
  before = (out / "result.json").stat().st_mtime_ns
  assert draw.main(argv) == 0
  assert "already holds this drawing, finished at step 10 of 10 (result.json: cosine(drawing, prompt) 0.250); " \
         "nothing to do" in capsys.readouterr().out
  assert (out / "result.json").stat().st_mtime_ns == before and sorted(os.listdir(out)) == ["result.json"]
  # A stopped run's state: only its own command resumes it; another is one line naming what differs.
  zeros = lambda tree: jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), tree)  # noqa: E731  no compiles: fast
  strokes = zeros(jax.eval_shape(lambda: draw.init_strokes(jax.random.key(0), 1, settings)))
  state = draw.DrawState(4, strokes, zeros(jax.eval_shape(draw.make_optimizer(settings).init, strokes)),
                         np.zeros((4, 1), np.float32))
  draw.save_state(str(out / draw.STATE_FILE), state, command)
  with pytest.raises(cli.UserError, match=r"holds a drawing stopped at step 4 of 10 by another command \(prompt "
                     r"'a cat' -> 'a dog'; settings.steps 10 -> 20\): rerun that command"):
    draw.main([{"a cat": "a dog", "10": "20"}.get(a, a) for a in argv])
  with pytest.raises(pytest.fail.Exception, match="loaded a CLIP"):  # its own command goes on to the work
    draw.main(argv)
  assert "Resuming the drawing in" in capsys.readouterr().out


def test_cli_flags_for_view_resolution_and_restarts(tmp_path):
  args = draw.build_parser().parse_args(["--checkpoint", "c", "--prompt", "p", "--out", "o"])
  assert (args.view_resolution, args.restarts) == (0, 1)  # off: the paper's behaviour
  args = draw.build_parser().parse_args(["--checkpoint", "c", "--prompt", "p", "--out", "o", "--view-resolution", "8",
                                         "--restarts", "3"])
  assert (args.view_resolution, args.restarts) == (8, 3)
  assert "--view-resolution N" in draw.build_parser().format_help()
  assert not args.view_jitter and draw.build_parser().parse_args(
      ["--checkpoint", "c", "--prompt", "p", "--out", "o", "--view-jitter"]).view_jitter
  with pytest.raises(cli.UserError, match="view_resolution 5 px must divide the 32 px canvas"):
    draw.main(["--checkpoint", str(tmp_path), "--prompt", "a cat", "--out", str(tmp_path / "o"), "--canvas", "32",
               "--view-resolution", "5"])
  with pytest.raises(cli.UserError, match="--view-jitter moves the --view-resolution grid"):
    draw.main(["--checkpoint", str(tmp_path), "--prompt", "a cat", "--out", str(tmp_path / "o"), "--view-jitter"])
  assert (args.distortion, tuple(args.crop_scale)) == (0.5, (0.7, 0.9))  # the paper's views
  with pytest.raises(cli.UserError, match="crop_scale must satisfy"):
    draw.main(["--checkpoint", str(tmp_path), "--prompt", "a cat", "--out", str(tmp_path / "o"), "--crop-scale", "0.9",
               "0.5"])


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  model = clip_jax.create_model("ViT-Tiny")
  return clip_jax.export_hf(model, clip_jax.init_variables(model, jax.random.key(0)),
                            str(tmp_path_factory.mktemp("tiny_hf")))


@pytest.fixture(scope="module")
def other_tiny_checkpoint(tmp_path_factory):
  model = clip_jax.create_model("ViT-Tiny")
  return clip_jax.export_hf(model, clip_jax.init_variables(model, jax.random.key(1)),
                            str(tmp_path_factory.mktemp("tiny_hf_1")))


@pytest.mark.slow
def test_cli_draws_with_an_ensemble_of_two_clips(tiny_checkpoint, other_tiny_checkpoint, tmp_path):
  out = tmp_path / "out"
  assert draw.main(["--checkpoint", tiny_checkpoint, other_tiny_checkpoint, "--prompt", "a red circle",
                    "--out", str(out), "--strokes", "3", "--steps", "2", "--canvas", "32", "--frame-every", "2"]) == 0
  result = json.loads((out / "result.json").read_text())
  assert result["checkpoints"] == [tiny_checkpoint, other_tiny_checkpoint]
  cosines = result["cosine_to_prompt_per_checkpoint"]
  assert len(cosines) == 2 and cosines[0] != cosines[1]  # each CLIP with its own text embedding
  assert result["cosine_to_prompt"] == pytest.approx(np.mean(cosines))
  with pytest.raises(cli.MissingPathError, match="missing.pt"):  # every checkpoint is checked before loading
    draw.main(["--checkpoint", tiny_checkpoint, str(tmp_path / "missing.pt"), "--prompt", "a cat", "--out", str(out)])


@pytest.mark.slow
def test_cli_draws_with_a_tiny_clip(tiny_checkpoint, tmp_path):
  out = tmp_path / "out"
  assert draw.main(["--checkpoint", tiny_checkpoint, "--prompt", "a red circle", "--negative", "a square",
                    "--out", str(out), "--strokes", "4", "--steps", "4", "--canvas", "32", "--frame-every", "2",
                    "--view-resolution", "8", "--view-jitter", "--restarts", "2"]) == 0
  result = json.loads((out / "result.json").read_text())
  assert result["settings"]["view_jitter"] is True
  assert result["settings"]["view_resolution"] == 8 and result["restart_kept"] == int(np.argmin(result["restart_losses"]))
  assert np.isfinite(result["loss_last_step"]) and -1 <= result["cosine_to_prompt"] <= 1
  assert result["checkpoints"] == [tiny_checkpoint] and result["cosine_to_prompt_per_checkpoint"] == [
      result["cosine_to_prompt"]]
  assert sorted(os.listdir(out / "frames")) == ["frame_00000.png", "frame_00002.png", "frame_00004.png"]
  assert (out / "drawing.gif").stat().st_size > 0 and (out / "drawing.png").exists()


def test_cli_errors_are_one_line(tmp_path):
  with pytest.raises(cli.UserError, match="--prompt is empty"):
    draw.main(["--checkpoint", str(tmp_path), "--prompt", "  ", "--out", str(tmp_path / "o")])
  with pytest.raises(cli.MissingPathError, match="no such file or directory"):
    draw.main(["--checkpoint", str(tmp_path / "missing.pt"), "--prompt", "a cat", "--out", str(tmp_path / "o")])
  # Through the real entry point: one line on stderr, exit code 2.
  run = subprocess.run([sys.executable, "-m", "clip_jax.draw", "--checkpoint", str(tmp_path / "missing.pt"),
                        "--prompt", "a cat", "--out", str(tmp_path / "o")], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)), env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and "missing.pt" in run.stderr


def test_digits_demo_trains_only_the_unfinished_seeds_of_its_ensemble(tmp_path, monkeypatch):
  from clip_jax import child_runs, loop
  from dreambooth_jax.embedded import clip_demos
  calls = []
  monkeypatch.setattr(child_runs, "train_child", lambda config, workdir, *overrides: calls.append(
      (config, workdir, overrides)) or 0.0)
  clip = str(tmp_path / "digits")
  os.makedirs(clip + "_seed1")
  loop.mark_finished(clip + "_seed1", 600)
  assert clip_demos.seed_workdirs(clip + "/", 3) == [clip + "/", clip + "_seed1", clip + "_seed2"]
  assert calls == [("configs/clip/digits.py", clip + "_seed2", ("--config.seed=2",))]
  assert clip_demos.seed_workdirs(clip, 1) == [clip] and len(calls) == 1  # --clip-seeds 1: --clip alone
  exported = tmp_path / "digits.safetensors"  # a file: its seeds' workdirs drop the suffix
  exported.write_bytes(b"")
  assert clip_demos.seed_workdirs(str(exported), 2) == [str(exported), str(tmp_path / "digits_seed1")]
  with pytest.raises(cli.UserError, match="--clip-seeds must be at least 1"):
    clip_demos.main(["--clip-seeds", "0"])


def test_drawing_captions_name_the_digit_and_what_the_judge_read():
  from dreambooth_jax.embedded import clip_demos
  predicted = np.tile(np.arange(10), (3, 1))
  predicted[1, 3], predicted[2, 3] = 5, 8  # two of digit 3's three drawings misread
  labels = clip_demos.drawing_labels(predicted)
  assert len(labels) == 10 and labels[0] == "0: judge read 0, 0, 0 (3/3)" and labels[3] == "3: judge read 3, 5, 8 (1/3)"


def test_the_judges_view_is_its_ink_map_as_an_image():
  from dreambooth_jax.embedded import clip_demos
  from dreambooth_jax.eval.digit_classifier import ink_features
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(2, 32, 32, 3)).astype(np.float32)
  view = clip_demos.judge_view(images)
  assert view.shape == images.shape
  np.testing.assert_allclose(ink_features(view), ink_features(images), atol=1e-6)  # the judge reads both alike
  assert np.all(view[:, :4, :4] == view[:, :1, :1])  # one grey level per 4x4 block


_CHILD_THAT_SAVES_ON_CTRL_C = """
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
def on_int(signum, frame):
  time.sleep(1.0)  # a trainer writing its checkpoint
  (out / "saved").write_text("ok")
  sys.exit(75)
signal.signal(signal.SIGINT, on_int)
(out / "ready").write_text("ok")
time.sleep(60)
"""


def test_a_demos_child_trainer_finishes_its_ctrl_c_save(tmp_path):
  # The digits demo trains its seed CLIPs in child processes (child_runs.run_child): on Ctrl-C the
  # child must be let finish saving; subprocess.run killed it 0.25 s in and lost its last steps.
  import signal
  import time
  child = tmp_path / "child.py"
  child.write_text(_CHILD_THAT_SAVES_ON_CTRL_C)
  # The parent is a command (clip_jax.cli.run), as the demos are: once its child trainer saved and
  # exited with 75, it exits with 75 too (resumable), not the 130 of a bare Ctrl-C.
  parent = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from clip_jax import cli; from clip_jax.child_runs import run_child; "
            "cli.run(lambda: run_child([sys.executable, sys.argv[1], sys.argv[2]]))")
  proc = subprocess.Popen([sys.executable, "-c", parent, str(child), str(tmp_path)], start_new_session=True,
                          cwd=os.path.dirname(os.path.dirname(__file__)), stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "CLIP_JAX_MALLOC": "system"})
  deadline = time.time() + 60
  while not (tmp_path / "ready").exists():
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else "timeout"
    time.sleep(0.05)
  os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
  _, stderr = proc.communicate(timeout=60)
  assert (tmp_path / "saved").exists()
  assert proc.returncode == 75, stderr
  assert "interrupted (Ctrl-C) (its child trainer saved a checkpoint)" in stderr and "Traceback" not in stderr
