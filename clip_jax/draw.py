r"""CLIPDraw (Frans, Soros & Witkowski 2021, arXiv 2106.14843): a drawing of Bezier strokes optimised
so that a CLIP model matches it to a text.

    python -m clip_jax.draw --checkpoint CKPT [CKPT ...] --prompt "a drawing of a cat" --out DIR [--negative "..."]

CKPT is anything `clip_jax.load_checkpoint` reads (OpenAI / open_clip files, a Hugging Face
directory, a training workdir). Several checkpoints guide as an ensemble: the loss is their mean
(`guidance.ensemble_loss`), each model with its own text embeddings and views. Writes DIR/drawing.png, DIR/drawing.gif and DIR/frames/ (the drawing
appearing), DIR/strokes.npz (the kept drawing's points, width, color) and DIR/result.json:

  loss_first_step, loss_last_step  the optimised loss (with random views, so noisy) at the first and last step
  restart_losses, restart_kept     each restart's loss averaged over the last tenth of the steps, and the
                                   index of the one kept (the lowest); one entry without --restarts
  cosine_to_prompt                 cosine(drawing, prompt) of the final drawing seen without augmentation
                                   (through --view-resolution if set): the number to compare across runs;
                                   with several checkpoints their mean, each in cosine_to_prompt_per_checkpoint
  settings                         every DrawSettings field as used; points_lr and max_width are in pixels of
                                   a 224 px canvas (the run multiplies them by canvas / 224)
  seconds                          wall time of the optimisation (a resumed run's parts summed)
  stopped, resumed_at_steps        "Ctrl-C at step N of M" while stopped, else null; the steps a run resumed at

Ctrl-C after the first step writes all of these for the drawing so far (result.json marked stopped, exit
130) and DIR/resume_state.npz: the strokes of every restart, Adam's moments and step count, the losses
and frames so far. The same command then resumes from that step and ends at the same total, with
the result of an uninterrupted run (each step keeps its random views; `draw`'s `resume`), and
removes the file when finished; rerun once finished, it says so and does nothing. Another command
on that --out is refused while a stopped run is there (one line naming what differs).

Settings (`DrawSettings`). From the authors' released code (kvfrans/clipdraw, its notebook and
predict.py), which the paper's experiments ran: 256 paths, 1000 iterations, a 224 px canvas, 4
augmented views per step (RandomPerspective(distortion 0.5, fill white) then RandomResizedCrop(scale
0.7-0.9)), Adam with learning rates 1.0 for the points (pixels), 0.1 for the widths and 0.01 for the
colours, the points' rate dropped to 0.4 at 50% and 0.1 at 75% of the run, widths clamped to
[1, 50] px and colours to [0, 1] after each step, paths started as random walks of radius 0.1 canvas
from a uniform point, width 1 px and a uniform random RGBA colour, negative prompts weighted 0.3.
Our choices: every path has the same number of joined cubic segments (2 by default; the code draws
1-3 at random per path, 2 on average); the point rate and the width limit scale with
canvas / 224, so a 32 px canvas moves and widens strokes by the same fraction of the canvas; the
rasteriser is `clip_jax.rasterize` (distance-based coverage) instead of diffvg. Three options, off by
default (the paper's behaviour): `--view-resolution N` shows the CLIP the drawing through N px (box
average down, bicubic back up: `guidance.through_resolution`), for a CLIP trained on low-resolution
images, e.g. the embedded digits CLIP with `--canvas 32 --view-resolution 8`; `--view-jitter` moves that
N px grid by a random offset each step; `--restarts R` starts R drawings and keeps the one with the
lowest CLIP loss. The embedded digits demo (`dreambooth_jax.embedded.clip_demos`) is closest to
`--checkpoint workdirs/digits workdirs/digits_seed1 workdirs/digits_seed2 --canvas 32 --gray
--view-resolution 8 --strokes 6 --steps 300 --distortion 0.1` with the other nine digits as `--negative`
prompts; it also widens and speeds up the strokes for a 32 px canvas (its own settings, not flags here),
so its numbers come from it, not from this command.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clip_jax.guidance import Augmentations
from clip_jax.rasterize import Strokes, render_batch

REFERENCE_CANVAS = 224  # the canvas the authors' learning rates and width limit are for


@dataclasses.dataclass(frozen=True)
class DrawSettings:
  num_strokes: int = 256
  segments: int = 2                          # cubic segments per stroke (path)
  steps: int = 1000
  canvas: int = 224                          # pixels per side
  augment: Augmentations = Augmentations()   # 4 views: perspective 0.5 + resized crop 0.7-0.9
  points_lr: float = 1.0                     # pixels at a 224 px canvas (scaled with the canvas)
  width_lr: float = 0.1
  color_lr: float = 0.01
  min_width: float = 1.0                     # pixels
  max_width: float = 50.0                    # pixels at a 224 px canvas (scaled with the canvas)
  init_radius: float = 0.1                   # random-walk step of the initial control points (canvas fraction)
  init_spread: float = 1.0                   # our option: first points uniform in the central fraction (1: all)
  init_width: float = 1.0                    # pixels
  negative_weight: float = 0.3
  background: float = 1.0                    # white paper
  curve_samples: int = 32                    # points per segment for the rasteriser's polyline
  gray: bool = False                         # our option: colours tied to one grey level (ink drawings)
  view_resolution: int = 0                   # our option: the CLIP sees the drawing through N px (0: off)
  restarts: int = 1                          # our option: drawings started per result, the lowest loss kept
  view_jitter: bool = False                  # our option: the view_resolution grid at a random offset per step
  frame_every: int = 10                      # a frame of the GIF every N steps

  def __post_init__(self):
    for name in ("num_strokes", "segments", "steps", "canvas", "frame_every", "restarts"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
    if self.view_resolution < 0 or (self.view_resolution and self.canvas % self.view_resolution):
      raise ValueError(f"view_resolution {self.view_resolution} px must divide the {self.canvas} px canvas (0: off).")
    if self.view_jitter and not self.view_resolution:
      raise ValueError("view_jitter moves the view_resolution grid; set view_resolution too.")

  @property
  def scale(self) -> float:
    return self.canvas / REFERENCE_CANVAS


def init_strokes(rng: jax.Array, num_drawings: int, s: DrawSettings) -> Strokes:
  """CLIPDraw's random start for `num_drawings` drawings: points [n, S, 3K + 1, 2] in pixels (a
  uniform first point (in the central s.init_spread of each side), then a random walk), width [n, S],
  RGBA colour [n, S, 4]."""
  start_rng, walk_rng, color_rng = jax.random.split(rng, 3)
  shape = (num_drawings, s.num_strokes)
  start = 0.5 + s.init_spread * (jax.random.uniform(start_rng, shape + (1, 2)) - 0.5)
  steps = s.init_radius * (jax.random.uniform(walk_rng, shape + (3 * s.segments, 2)) - 0.5)
  points = jnp.concatenate([start, start + jnp.cumsum(steps, axis=-2)], axis=-2) * s.canvas
  color = jax.random.uniform(color_rng, shape + (4,))
  if s.gray:
    color = color.at[..., :3].set(color[..., :1])
  return Strokes(points, jnp.full(shape, s.init_width, jnp.float32), color)


def make_optimizer(s: DrawSettings) -> optax.GradientTransformation:
  """Adam per parameter group, the points' rate annealed as in the authors' code."""
  points_lr = optax.piecewise_constant_schedule(s.points_lr * s.scale,
                                                {int(s.steps * 0.5): 0.4, int(s.steps * 0.75): 0.25})
  return optax.multi_transform({"points": optax.adam(points_lr), "width": optax.adam(s.width_lr),
                                "color": optax.adam(s.color_lr)}, Strokes("points", "width", "color"))


def project(strokes: Strokes, s: DrawSettings) -> Strokes:
  """The authors' clamps after each step: widths to [min, max] px, colours to [0, 1]."""
  color = jnp.clip(strokes.color, 0.0, 1.0)
  if s.gray:  # one grey level per stroke: the mean of its RGB
    color = color.at[..., :3].set(jnp.mean(color[..., :3], axis=-1, keepdims=True))
  return Strokes(strokes.points, jnp.clip(strokes.width, s.min_width, s.max_width * s.scale), color)


def render(strokes: Strokes, s: DrawSettings) -> jax.Array:
  """[n, canvas, canvas, 3] in [0, 1]."""
  return render_batch(strokes, s.canvas, s.canvas, s.background, s.curve_samples)


def shift(image: jax.Array, dy: jax.Array, dx: jax.Array, fill: float) -> jax.Array:
  """[h, w, c] -> [h, w, c]: the content moved down dy and right dx whole pixels (|dy|, |dx| <= h, w;
  may be traced), `fill` where nothing moved in."""
  h, w, c = image.shape
  padded = jnp.pad(image, ((h, h), (w, w), (0, 0)), constant_values=fill)
  return jax.lax.dynamic_slice(padded, (h - dy, w - dx, 0), (h, w, c))


def through_offset_grid(images: jax.Array, size: int, rng: jax.Array, fill: float) -> jax.Array:
  """`guidance.through_resolution` with the box-average grid at a random whole-pixel offset per
  image (uniform over the cell's phases, -cell/2 .. cell/2 - 1 per axis): each image is moved by the
  offset, seen through `size` px, and moved back, so a drawing cannot place its ink to suit one
  fixed grid. [n, h, w, c] -> [n, h, w, c]; size must divide h and w."""
  cell = images.shape[1] // size
  offsets = jax.random.randint(rng, (images.shape[0], 2), -(cell // 2), cell - cell // 2)
  moved = jax.vmap(lambda im, o: shift(im, o[0], o[1], fill))(images, offsets)
  from clip_jax.guidance import through_resolution
  seen = through_resolution(moved, size)
  return jax.vmap(lambda im, o: shift(im, -o[0], -o[1], fill))(seen, offsets)


def as_seen(images: jax.Array, s: DrawSettings, rng: jax.Array | None = None) -> jax.Array:
  """What the loss is shown: the images [n, canvas, canvas, 3] as they are, or through
  s.view_resolution px (`guidance.through_resolution`: box average down, bicubic back up) for a CLIP
  trained on low-resolution images upscaled, which never saw sharp stroke edges; with
  s.view_jitter the grid is at a random offset per image (`through_offset_grid`, needs rng)."""
  from clip_jax.guidance import through_resolution
  if not s.view_resolution:
    return images
  if s.view_jitter:
    if rng is None:
      raise ValueError("view_jitter needs an rng key.")
    return through_offset_grid(images, s.view_resolution, rng, s.background)
  return through_resolution(images, s.view_resolution)


def best_restarts(final_losses: jax.Array, restarts: int) -> jax.Array:
  """final_losses [restarts * n] (row r * n + i: restart r of drawing i) -> the row kept for each
  drawing [n]: the restart with the lowest loss."""
  n = final_losses.shape[0] // restarts
  return jnp.argmin(final_losses.reshape(restarts, n), axis=0) * n + jnp.arange(n)


LossFn = Callable[[jax.Array, jax.Array], jax.Array]  # (images [n, h, w, 3], rng) -> losses [n]


@dataclasses.dataclass(frozen=True)
class DrawState:
  """Where a stopped `draw` goes on from (`save_state` writes it to a file, `read_state_file` +
  `state_from_arrays` read it back).

  step: the steps done. strokes: every drawing of every restart (row r * n + i: restart r of drawing
  i), points [R * n, S, 3K + 1, 2] in pixels, width [R * n, S] in pixels, colour [R * n, S, 4] in
  [0, 1], as the last step left them. opt_state: `make_optimizer(settings)`'s state of those strokes
  (Adam's moments and its step count, which also drives the points' learning-rate schedule).
  losses: [step, R * n] float32, each step's loss (what picks the restart kept at the end)."""
  step: int
  strokes: Strokes
  opt_state: Any
  losses: np.ndarray


def draw(loss_fn: LossFn, num_drawings: int, settings: DrawSettings, rng: jax.Array, *,
         progress: bool = True, on_frame: Callable[[int, np.ndarray], None] | None = None,
         stop_on_interrupt: bool = False, mesh=None, resume: DrawState | None = None):
  """Optimises `num_drawings` drawings at once against `loss_fn` (e.g. a bound
  `guidance.make_guidance_fn`; row i of the images is drawing i, so each may have its own target),
  shown the drawings through `as_seen`. The drawings are independent: the summed loss gives each
  its own gradient and Adam is per element.

  With settings.restarts = R > 1, R drawings are started for each result (R calls of loss_fn on
  num_drawings rows per step, restart r with the step key folded with r) and the one whose loss,
  averaged over the last tenth of the steps (the views are random, one step's loss is noisy), is
  lowest is kept (`best_restarts`): several random starts of a non-convex problem, chosen by the
  objective itself. Returns (strokes, images [n, canvas, canvas, 3] as numpy, history {'step',
  'loss' [steps, n] of the kept drawings, 'restart_loss' [R, n] (the averaged losses compared),
  'kept' [n] (the restart kept), 'start_images' [n, canvas, canvas, 3] (the kept drawings before the
  first step), 'state' (a `DrawState` of every restart: what `resume` takes)}). `on_frame(step, images)`
  is called every settings.frame_every steps and at the end with all R * n drawings (row r * n + i:
  restart r of drawing i).
  stop_on_interrupt: Ctrl-C after at least one step ends the loop there and returns the drawings as
  they are, history over the steps done (len(history['step']) < settings.steps says so); before it,
  or without this, KeyboardInterrupt propagates.
  resume: a stopped run's `DrawState` (same loss_fn, num_drawings, settings and rng): the loop goes on
  from its step with its strokes and optimiser state, each later step with the key an uninterrupted
  run gives it, so the result equals that run's (bitwise on one machine: the same compiled step on
  the same values); history covers all steps, the earlier ones from state.losses. ValueError: a state
  that does not fit (its step past settings.steps, or losses not [step, R * n]).
  mesh: the mesh loss_fn's CLIP variables are replicated on (`eval.embed.place_on_mesh`); the strokes
  and optimiser state start replicated on it too, as the step returns them (started on one device,
  the second step saw other input shardings and compiled again: 30-45 s at 224 px)."""
  from clip_jax.observe import Progress
  restarts = settings.restarts
  init_rng, loop_rng = jax.random.split(rng)
  strokes = init_strokes(init_rng, restarts * num_drawings, settings)
  tx = make_optimizer(settings)
  opt_state = tx.init(strokes)
  if resume is not None and (not 0 <= resume.step <= settings.steps
                             or resume.losses.shape != (resume.step, restarts * num_drawings)):
    raise ValueError(f"a state of {resume.step} steps and losses {resume.losses.shape} cannot go on to "
                     f"{settings.steps} steps of {restarts * num_drawings} drawings.")
  placed = lambda tree: tree  # noqa: E731
  if mesh is not None:
    from jax.sharding import NamedSharding, PartitionSpec
    placed = lambda tree: jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))  # noqa: E731
  strokes, opt_state = placed((strokes, opt_state))
  draw_images = jax.jit(lambda st: render(st, settings))
  start_images = np.asarray(draw_images(strokes))  # the start, also of a resumed run (its first frame, the report's)
  first_step, past_losses = 0, np.zeros((0, restarts * num_drawings), np.float32)
  if resume is not None:
    strokes, opt_state = placed((resume.strokes, resume.opt_state))
    first_step, past_losses = resume.step, resume.losses

  def total_loss(strokes, key):
    if settings.view_jitter:  # its own key; the views' keys stay those of the unjittered loop
      seen = as_seen(render(strokes, settings), settings, jax.random.fold_in(key, restarts))
    else:
      seen = as_seen(render(strokes, settings), settings)
    if restarts == 1:
      losses = loss_fn(seen, key)
    else:
      losses = jnp.concatenate([loss_fn(seen[r * num_drawings:(r + 1) * num_drawings], jax.random.fold_in(key, r))
                                for r in range(restarts)])
    return jnp.sum(losses), losses

  @jax.jit
  def step_fn(strokes, opt_state, key):
    (_, losses), grads = jax.value_and_grad(total_loss, has_aux=True)(strokes, key)
    updates, opt_state = tx.update(grads, opt_state, strokes)
    return project(optax.apply_updates(strokes, updates), settings), opt_state, losses

  bar = Progress(settings.steps, initial=first_step, enabled=progress, desc="draw")
  losses_seen = []
  try:
    for step in range(first_step, settings.steps):
      if on_frame is not None and step % settings.frame_every == 0:
        on_frame(step, start_images if step == 0 else np.asarray(draw_images(strokes)))
      strokes, opt_state, losses = step_fn(strokes, opt_state, jax.random.fold_in(loop_rng, step))
      losses_seen.append(losses)
      bar.update(step + 1)
      if step % 10 == 0 or step + 1 == settings.steps:
        bar.set_postfix(loss=float(jnp.mean(losses)))
  except KeyboardInterrupt:
    if not (stop_on_interrupt and first_step + len(losses_seen)):
      raise
  bar.close()
  steps_done = first_step + len(losses_seen)
  images = np.asarray(draw_images(strokes))
  if on_frame is not None:
    on_frame(steps_done, images)
  new_losses = np.asarray(jnp.stack(losses_seen)) if losses_seen else past_losses[:0]
  losses = np.concatenate([past_losses, new_losses])  # [steps_done, R * n]
  final = jnp.mean(jnp.asarray(losses[-max(1, steps_done // 10):]), axis=0)
  rows = best_restarts(final, restarts)
  kept = jax.tree_util.tree_map(lambda x: x[rows], strokes)
  state = DrawState(steps_done, jax.device_get(strokes), jax.device_get(opt_state), losses)
  history = {"step": list(range(1, steps_done + 1)), "loss": losses[:, np.asarray(rows)],
             "restart_loss": np.asarray(final.reshape(restarts, num_drawings)),
             "kept": np.asarray(rows // num_drawings), "start_images": start_images[np.asarray(rows)],
             "state": state}
  return kept, images[np.asarray(rows)], history


# ----------------------------------------------------------------------------- files
def to_uint8(images: np.ndarray) -> np.ndarray:
  return np.round(np.clip(np.asarray(images), 0.0, 1.0) * 255.0).astype(np.uint8)


def save_gif(frames: Sequence[np.ndarray], path: str, upscale: int = 1, ms_per_frame: int = 80) -> str:
  """[h, w, 3] uint8 frames -> an animated GIF (the last frame held for a second)."""
  from PIL import Image
  images = [Image.fromarray(f).resize((f.shape[1] * upscale, f.shape[0] * upscale), Image.NEAREST) for f in frames]
  durations = [ms_per_frame] * (len(images) - 1) + [1000]
  images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0)
  return path


STATE_FILE = "resume_state.npz"  # in --out while a run is stopped; removed when it finishes


def save_state(path: str, state: DrawState, command: dict, frames: Sequence[tuple[int, np.ndarray]] = (),
               meta: dict | None = None) -> str:
  """Writes `state` to `path` whole (`observe.write_atomic`: a second Ctrl-C never leaves half a file),
  with `command` (what made the run: the CLI compares it before resuming), `frames` ((step, uint8
  [R * n, canvas, canvas, 3]) of the GIF so far) and `meta` (JSON: seconds spent, ...). Returns path."""
  import io

  from clip_jax.observe import write_atomic
  leaves = jax.tree_util.tree_leaves(state.opt_state)
  arrays = {f"opt_{i:03d}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
  arrays.update({name: np.asarray(value) for name, value in state.strokes._asdict().items()})
  frame_steps = np.asarray([step for step, _ in frames], np.int64)
  frame_images = (np.stack([images for _, images in frames]) if len(frames)
                  else np.zeros((0,) + state.strokes.points.shape[:1], np.uint8))
  buffer = io.BytesIO()
  np.savez_compressed(buffer, step=np.int64(state.step), losses=np.asarray(state.losses, np.float32),
                      frame_steps=frame_steps, frames=frame_images, command=np.array(json.dumps(command)),
                      meta=np.array(json.dumps(meta or {})), **arrays)
  return write_atomic(path, buffer.getvalue())


def read_state_file(path: str) -> tuple[dict, dict, dict[str, np.ndarray]]:
  """(command, meta, arrays) of a `save_state` file. ValueError: a file that is not one (truncated,
  or another program's), naming it."""
  import zipfile
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = {name: data[name] for name in data.files}
    return json.loads(str(arrays.pop("command"))), json.loads(str(arrays.pop("meta"))), arrays
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path} is not a drawing's resume state this version can read ({type(e).__name__}: {e}); "
                     "remove it to start again from step 0.") from e


def state_from_arrays(arrays: dict[str, np.ndarray], settings: DrawSettings, num_drawings: int
                      ) -> tuple[DrawState, list[tuple[int, np.ndarray]]]:
  """The `DrawState` and frames a `save_state` file holds, checked against what `draw` makes for
  `settings` and `num_drawings` (shapes and dtypes of every stroke and optimiser array). ValueError
  on a mismatch."""
  rows = settings.restarts * num_drawings
  template = jax.eval_shape(lambda: init_strokes(jax.random.key(0), rows, settings))
  opt_template = jax.eval_shape(make_optimizer(settings).init, template)
  leaves, treedef = jax.tree_util.tree_flatten(opt_template)
  expected = {f"opt_{i:03d}": leaf for i, leaf in enumerate(leaves)}
  expected.update(template._asdict())
  for name, leaf in expected.items():
    got = arrays.get(name)
    if got is None or got.shape != leaf.shape or got.dtype != leaf.dtype:
      raise ValueError(f"the resume state's {name} is {None if got is None else (got.shape, str(got.dtype))}; "
                       f"these settings make {(leaf.shape, str(leaf.dtype))}.")
  missing = [name for name in ("frame_steps", "frames", "step", "losses") if name not in arrays]
  if missing:
    raise ValueError(f"the resume state has no {', '.join(missing)}; remove it to start again from step 0.")
  step, losses = int(arrays["step"]), arrays["losses"]
  if not 0 <= step <= settings.steps or losses.shape != (step, rows):  # draw() checks it too, as a bug
    raise ValueError(f"the resume state of {step} steps has losses {losses.shape}; these settings make "
                     f"{settings.steps} steps of {rows} drawings. Remove it to start again from step 0.")
  strokes = Strokes(*(arrays[name] for name in Strokes._fields))
  opt_state = jax.tree_util.tree_unflatten(treedef, [arrays[f"opt_{i:03d}"] for i in range(len(leaves))])
  frames = [(int(step), images) for step, images in zip(arrays["frame_steps"], arrays["frames"])]
  return DrawState(step, strokes, opt_state, losses), frames


# ----------------------------------------------------------------------------- CLI
def bound_loss(fn, variables, target: jax.Array, negatives: jax.Array | None) -> LossFn:
  """`make_guidance_fn`'s fn with one model's variables and prompt embeddings bound: (images, rng) -> [n]."""
  return lambda images, key: fn(variables, images, target, key, negatives)


def build_parser() -> argparse.ArgumentParser:
  d = DrawSettings()
  p = argparse.ArgumentParser(prog="python -m clip_jax.draw", description=__doc__.split("\n\n")[0],
                              epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True, nargs="+", metavar="CKPT",
                 help="CLIP checkpoint(s): OpenAI/open_clip file, HF directory or workdir; several: the loss is "
                 "their mean (an ensemble; on the embedded digits three seeds of one recipe drew far more "
                 "recognisable digits than one: WORKSPACE, issue 18)")
  p.add_argument("--prompt", required=True, help="the text to draw")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--negative", action="append", default=[], help="a prompt to draw away from (repeatable)")
  p.add_argument("--strokes", type=int, default=d.num_strokes, help="strokes per drawing (default %(default)s)")
  p.add_argument("--segments", type=int, default=d.segments, help="cubic segments per stroke (default %(default)s)")
  p.add_argument("--steps", type=int, default=d.steps, help="optimisation steps (default %(default)s)")
  p.add_argument("--canvas", type=int, default=d.canvas, help="canvas side in pixels (default %(default)s)")
  p.add_argument("--augmentations", type=int, default=d.augment.num, help="random views per step (default %(default)s)")
  p.add_argument("--distortion", type=float, default=d.augment.distortion,
                 help="the views' perspective distortion (default %(default)s, the paper's; the embedded digits "
                 "demo uses 0.1, which its CLIP can read)")
  p.add_argument("--crop-scale", type=float, nargs=2, default=d.augment.crop_scale, metavar=("LOW", "HIGH"),
                 help="the views' random resized crop, area fraction (default %(default)s, the paper's)")
  p.add_argument("--gray", action="store_true", help="grey-level strokes only (ink drawings)")
  p.add_argument("--view-resolution", type=int, default=d.view_resolution, metavar="N",
                 help="the CLIP sees the drawing box-averaged to N x N px and bicubically upscaled back "
                 "(guidance.through_resolution), for a CLIP trained on low-resolution images such as the "
                 "embedded digits' 8x8 scans (--view-resolution 8); N must divide --canvas; 0 (default): "
                 "the drawing as it is, the paper's behaviour")
  p.add_argument("--view-jitter", action="store_true",
                 help="with --view-resolution: box-average on a grid moved by a random whole-pixel offset per "
                 "step (through_offset_grid), so the drawing cannot fit one fixed grid (embedded digits demo, "
                 "draw keys 0/3/4, 60 drawings each: 64%% vs 54%% read as the prompt's digit; WORKSPACE, issue 18)")
  p.add_argument("--restarts", type=int, default=d.restarts, metavar="R",
                 help="start R drawings and keep the one with the lowest CLIP loss (default 1: the paper's single run)")
  p.add_argument("--seed", type=int, default=0, help="random key of the strokes' start and the views (default 0)")
  p.add_argument("--frame-every", type=int, default=d.frame_every, help="GIF frame every N steps (default %(default)s)")
  p.add_argument("--tokenizer", help="tokenizer spec (default: the checkpoint directory's own, else 'clip')")
  from clip_jax.evaluate import add_architecture_flags
  add_architecture_flags(p, applies_to="; with several --checkpoint files, to every one")
  return p


def settings_record(settings: DrawSettings) -> dict:
  """Every DrawSettings field as JSON holds it (result.json's 'settings'; tuples as lists)."""
  return json.loads(json.dumps(dataclasses.asdict(settings)))


def command_changes(before: dict, now: dict) -> list[str]:
  """'key old -> new' for every entry of two JSON records that differs (nested keys dotted), by the
  trainers' rule for a changed configuration (`loop.config_changes`)."""
  from clip_jax import loop
  changes = loop.config_changes(loop.flatten_config(before), loop.flatten_config(now))
  return [f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items()]


def finished_drawing(out: str, command: dict) -> dict | None:
  """result.json in `out` when it records a finished run of `command` (the same prompt, negatives,
  checkpoints, seed, loader flags and settings), else None."""
  try:
    with open(os.path.join(out, "result.json")) as f:
      result = json.load(f)
  except (OSError, ValueError):
    return None
  done = result.get("stopped") is None and result.get("steps_done") == command["settings"]["steps"]
  return result if done and not command_changes({k: result.get(k) for k in command}, command) else None


def main(argv: Sequence[str] | None = None) -> int:
  from clip_jax import cli, guidance
  args = build_parser().parse_args(argv)
  if args.view_jitter and not args.view_resolution:
    raise cli.UserError("--view-jitter moves the --view-resolution grid: give --view-resolution N too (e.g. 8 "
                        "for the embedded digits CLIP).")
  settings = cli.as_user_errors(DrawSettings, num_strokes=args.strokes, segments=args.segments, steps=args.steps, canvas=args.canvas,
                                augment=cli.as_user_errors(Augmentations, num=args.augmentations,
                                                           distortion=args.distortion,
                                                           crop_scale=tuple(args.crop_scale)), gray=args.gray,
                                view_resolution=args.view_resolution, view_jitter=args.view_jitter,
                                restarts=args.restarts,
                                frame_every=args.frame_every)
  if not args.prompt.strip():
    raise cli.UserError("--prompt is empty; give the text to draw, e.g. --prompt 'a drawing of a cat'.")
  from clip_jax.convert import check_checkpoint_exists
  for path in args.checkpoint:
    check_checkpoint_exists(path)
  cli.make_out_dir(args.out)  # before loading: a file there was found only after the checkpoints had loaded
  # What makes this drawing: the same command on the same --out resumes a stopped run, and says a finished one is.
  command = {"prompt": args.prompt, "negative": args.negative, "checkpoints": args.checkpoint, "seed": args.seed,
             "tokenizer": args.tokenizer, "model_name": args.model_name, "act": args.act,
             "settings": settings_record(settings)}
  state_path = os.path.join(args.out, STATE_FILE)
  resume, frames, meta = None, [], {"seconds": 0.0, "resumed_at": []}
  if os.path.exists(state_path):
    kept_command, kept_meta, arrays = cli.as_user_errors(read_state_file, state_path)
    changes = command_changes(kept_command, command)
    if changes:
      raise cli.UserError(
          f"--out {args.out} holds a drawing stopped at step {int(arrays.get('step', 0))} of "
          f"{kept_command.get('settings', {}).get('steps')} by another command ({'; '.join(changes)}): rerun that "
          f"command to resume it, or give another --out (removing {state_path} starts this one there from step 0).")
    resume, frames = cli.as_user_errors(state_from_arrays, arrays, settings, 1)
    meta = {**meta, **kept_meta}
    meta["resumed_at"] = meta["resumed_at"] + [resume.step]
    print(f"Resuming the drawing in {args.out} at step {resume.step} of {settings.steps} from {STATE_FILE}: "
          "the strokes of every restart, Adam's moments and step count (the learning-rate schedule's too), the "
          "losses and frames so far; each step keeps the random views it has in an uninterrupted run.", flush=True)
  else:
    finished = finished_drawing(args.out, command)
    if finished is not None:
      cosine = finished.get("cosine_to_prompt")
      print(f"{args.out} already holds this drawing, finished at step {finished['steps_done']} of {settings.steps}"
            + (f" (result.json: cosine(drawing, prompt) {cosine:.3f})" if isinstance(cosine, float) else "")
            + "; nothing to do. Another --out, or other settings, draws anew.", flush=True)
      return 0
    if os.path.exists(os.path.join(args.out, "result.json")):
      print(f"{args.out} holds another drawing (result.json without {STATE_FILE}): replacing it, from step 0.",
            flush=True)
  from clip_jax.eval.embed import place_on_mesh
  from clip_jax.sharding import create_mesh
  mesh = create_mesh({"data": -1})
  guides = []  # per checkpoint: (model, variables, prompt embedding [d], negative embeddings [m, d] or None)
  for path in args.checkpoint:
    model, variables, tokenizer = cli.as_user_errors(guidance.load_guide, path, args.tokenizer, args.model_name, args.act)
    variables = place_on_mesh(variables, mesh)
    target = cli.as_user_errors(guidance.encode_prompts, model, variables, tokenizer, [args.prompt], mesh)[0]
    negatives = (cli.as_user_errors(guidance.encode_prompts, model, variables, tokenizer, args.negative, mesh)
                 if args.negative else None)
    guides.append((model, variables, target, negatives))
  loss_fn = guidance.ensemble_loss([bound_loss(guidance.make_guidance_fn(
      model, mesh, augment=settings.augment, negative_weight=settings.negative_weight), variables, target, negatives)
      for model, variables, target, negatives in guides])

  os.makedirs(os.path.join(args.out, "frames"), exist_ok=True)
  # frames: (step, [restarts, canvas, canvas, 3] uint8), a resumed run's earlier ones first; the kept
  # restart's are written at the end

  def on_frame(step, images):
    frames.append((step, to_uint8(images)))

  print(f"Drawing {args.prompt!r} with {settings.num_strokes} strokes, {settings.steps} steps, "
        f"{settings.canvas} px, {settings.augment.num} views/step"
        + (f", through {settings.view_resolution} px" if settings.view_resolution else "")
        + (f", guided by {len(guides)} CLIPs (mean loss)" if len(guides) > 1 else "")
        + (" (grid jittered)" if settings.view_jitter else "")
        + (f", best of {settings.restarts} restarts" if settings.restarts > 1 else ""), flush=True)
  start = time.time()
  strokes, images, history = draw(loss_fn, 1, settings, jax.random.key(args.seed), on_frame=on_frame,
                                  stop_on_interrupt=True, mesh=mesh, resume=resume)
  steps_done = len(history["step"])
  seconds = round(meta["seconds"] + time.time() - start, 1)
  if steps_done < settings.steps:  # first what the same command resumes from (a frame at steps_done it makes again)
    save_state(state_path, history["state"], command, [(step, f) for step, f in frames if step < steps_done],
               {**meta, "seconds": seconds})
  from PIL import Image
  kept = int(history["kept"][0])
  # The drawing and its strokes first: a second Ctrl-C while the rest is written still leaves them.
  Image.fromarray(to_uint8(images[0])).save(os.path.join(args.out, "drawing.png"))
  np.savez(os.path.join(args.out, "strokes.npz"), **{k: np.asarray(v[0]) for k, v in strokes._asdict().items()})
  names = {f"frame_{step:05d}.png" for step, _ in frames}
  for name in os.listdir(os.path.join(args.out, "frames")):  # a stopped run's last frame, another run's
    if name.startswith("frame_") and name.endswith(".png") and name not in names:
      os.remove(os.path.join(args.out, "frames", name))
  for step, frame in frames:
    Image.fromarray(frame[kept]).save(os.path.join(args.out, "frames", f"frame_{step:05d}.png"))
  save_gif([frame[kept] for _, frame in frames], os.path.join(args.out, "drawing.gif"),
           upscale=max(1, 224 // settings.canvas))

  def clean_cosines(drawings):  # cosine(drawing, prompt) per checkpoint, without augmentation
    seen = as_seen(jnp.asarray(drawings), settings, jax.random.key(0))
    return [-float(guidance.make_guidance_fn(model, mesh, augment=guidance.NO_AUGMENTATION)(
        variables, seen, target, None)[0]) for model, variables, target, _ in guides]
  cosines, start_cosines = clean_cosines(images), clean_cosines(history["start_images"])
  result = {**command, "steps_done": steps_done, "stopped": (f"Ctrl-C at step {steps_done} of {settings.steps}"
                                                            if steps_done < settings.steps else None),
            "resumed_at_steps": meta["resumed_at"],
            "loss_first_step": float(history["loss"][0, 0]), "loss_last_step": float(history["loss"][-1, 0]),
            "cosine_to_prompt_start": float(np.mean(start_cosines)),
            "cosine_to_prompt": float(np.mean(cosines)), "cosine_to_prompt_per_checkpoint": cosines,
            "restart_losses": history["restart_loss"][:, 0].tolist(), "restart_kept": kept,
            "seconds": seconds}
  from clip_jax.observe import write_atomic
  write_atomic(os.path.join(args.out, "result.json"), json.dumps(result, indent=2))
  if steps_done < settings.steps:
    print(f"interrupted (Ctrl-C) at step {steps_done} of {settings.steps}: wrote the drawing so far to "
          f"{args.out}/drawing.png, strokes.npz, drawing.gif, frames/ ({len(frames)} frames), result.json "
          f"(marked stopped at step {steps_done} of {settings.steps}) and {STATE_FILE}; the same command resumes "
          f"from step {steps_done} (strokes, Adam's moments and step count) and ends at step {settings.steps}.",
          file=sys.stderr, flush=True)
    return cli.INTERRUPTED_EXIT_CODE
  if os.path.exists(state_path):
    os.remove(state_path)  # finished: result.json now says so
  print(f"cosine(drawing, prompt) = {result['cosine_to_prompt_start']:.3f} at the start -> "
        f"{result['cosine_to_prompt']:.3f}"
        + (f" (mean of {len(cosines)} CLIPs)" if len(cosines) > 1 else "") + f"; wrote {args.out}/drawing.png, drawing.gif, "
        f"frames/, strokes.npz, result.json", flush=True)
  return 0


if __name__ == "__main__":
  from clip_jax import cli
  cli.run(main)
