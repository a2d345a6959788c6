"""Inputs of the CLIP-guided commands (clip_jax.draw, dreambooth_jax.edit, dreambooth_jax.sample):
photos read as the project reads every image, architecture flags, long prompts, --out checks."""
import numpy as np
import pytest
from PIL import Image

from clip_jax import cli
from dreambooth_jax import edit


# ----------------------------------------------------------------------------- edit's photos
def _save_exif_rotated(path, pixels, orientation):
  exif = Image.Exif()
  exif[0x0112] = orientation
  Image.fromarray(pixels).save(path, exif=exif)


def test_edit_reads_a_photo_upright_by_its_exif_orientation(tmp_path):
  pixels = np.zeros((8, 16, 3), np.uint8)  # stored 16 wide, 8 high: orientation 6 shows it 8 wide, 16 high
  pixels[:, :8] = 255
  _save_exif_rotated(tmp_path / "rot6.png", pixels, 6)
  image, changes = edit.load_image(str(tmp_path / "rot6.png"), 4)
  assert image.shape == (1, 16, 8, 3)
  np.testing.assert_allclose(image[0], np.rot90(pixels, -1) / 255.0)  # 6: turned 90 degrees clockwise
  assert changes == ["turned upright (EXIF orientation 6)"]


def test_edit_keeps_16_bit_gray_and_puts_transparency_on_white(tmp_path):
  Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(tmp_path / "gray16.png")
  image, changes = edit.load_image(str(tmp_path / "gray16.png"), 4)
  np.testing.assert_allclose(image, 40000 // 256 / 255.0)  # convert("RGB") made this 1.0, white
  assert changes == ["I;16 pixels kept to their top 8 bits"]
  rgba = np.zeros((8, 8, 4), np.uint8)  # black, transparent on the left half
  rgba[:, 4:, 3] = 255
  Image.fromarray(rgba).save(tmp_path / "alpha.png")
  image, changes = edit.load_image(str(tmp_path / "alpha.png"), 4)
  np.testing.assert_allclose(image[0, :, :4], 1.0)
  np.testing.assert_allclose(image[0, :, 4:], 0.0)
  assert changes == ["RGBA transparency on white"]
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "plain.png")
  assert edit.load_image(str(tmp_path / "plain.png"), 4)[1] == []
  (tmp_path / "text.png").write_text("not an image")
  with pytest.raises(cli.UserError, match="--image .*text.png: not an image this project can read"):
    edit.load_image(str(tmp_path / "text.png"), 4)
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "noise.png")
  data = (tmp_path / "noise.png").read_bytes()
  (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])  # a truncated PNG was an OSError traceback
  with pytest.raises(cli.UserError, match="--image .*cut.png: not an image this project can read"):
    edit.load_image(str(tmp_path / "cut.png"), 4)


def test_edit_resizes_a_photo_over_max_side_to_multiples_of_the_vae_downscale(tmp_path):
  Image.fromarray(np.full((24, 40, 3), 128, np.uint8)).save(tmp_path / "large.png")
  image, changes = edit.load_image(str(tmp_path / "large.png"), 4, max_side=16)
  assert image.shape == (1, 8, 16, 3)  # 24 * 16 / 40 = 9.6 px, the nearest multiple of 4
  assert changes == ["resized 40x24 -> 16x8 to fit --max-side 16 (sides multiples of 4; --max-side 0 keeps the size)"]
  assert edit.fit_size(3000, 2000, 512, 8) == (512, 344)
  assert edit.fit_size(2000, 3000, 510, 8) == (336, 504)  # the longer side stays within the limit
  # Within the limit (or with 0) the size is kept, and its sides must be multiples as before.
  assert edit.load_image(str(tmp_path / "large.png"), 4, max_side=0)[0].shape == (1, 24, 40, 3)
  with pytest.raises(cli.UserError, match="is 40x24; this model's VAE needs sides that are multiples of 16"):
    edit.load_image(str(tmp_path / "large.png"), 16, max_side=64)


def test_edit_brings_train_images_of_other_sizes_to_the_edited_images_size(tmp_path, capsys, monkeypatch):
  folder = tmp_path / "train"
  folder.mkdir()
  wide = np.zeros((8, 24, 3), np.uint8)  # 24 wide, 8 high: black, white in the middle 8 columns
  wide[:, 8:16] = 255
  Image.fromarray(wide).save(folder / "a_wide.png")
  Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(folder / "b_same.png")
  Image.fromarray(np.full((5, 3, 3), 200, np.uint8)).save(folder / "c_small.png")  # not multiples of 4 either
  images, names, changed, refit = edit.read_train_images(str(folder), 16, 16)
  assert images.shape == (3, 16, 16, 3) and names == ["a_wide.png", "b_same.png", "c_small.png"] and changed == {}
  assert refit == {"a_wide.png": (24, 8), "c_small.png": (3, 5)}  # (width, height) as read
  # The centre 8x8 square, enlarged twice: white (the bicubic kernel reaches the black beside it at the edges).
  np.testing.assert_allclose(images[0][:, 2:-2], 1.0, atol=1 / 255)
  np.testing.assert_allclose(images[0], images[0][:, ::-1], atol=1 / 255)
  np.testing.assert_allclose(images[1], 128 / 255)
  np.testing.assert_allclose(images[2], 200 / 255)
  line = edit.refit_line(refit, 3, 16, 16)
  assert line == ("--train-images: 2 of 3 photos are not 16x16, the size of --image (the edit works on latents of "
                  "its shape): each resized to cover it (bicubic) and centre-cropped: a_wide.png 24x8, c_small.png 3x5.")
  # Through the command: said in that one line, before the CLIP loads (np.concatenate's traceback came after it).
  from types import SimpleNamespace

  from clip_jax import guidance
  from dreambooth_jax.sampling import pipeline as sd
  monkeypatch.setattr(sd, "load_pipeline", lambda model: SimpleNamespace(vae_scale_factor=4))
  monkeypatch.setattr(guidance, "load_guide", lambda *a, **k: (_ for _ in ()).throw(cli.UserError("stop here")))
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "in.png")
  with pytest.raises(cli.UserError, match="stop here"):
    edit.main(["--model", str(tmp_path), "--clip", str(tmp_path), "--image", str(tmp_path / "in.png"), "--neutral",
               "a", "--target", "b", "--method", "mapper", "--train-images", str(folder), "--out", str(tmp_path / "e")])
  assert line in capsys.readouterr().out.splitlines()


# ----------------------------------------------------------------------------- architecture flags
@pytest.fixture(scope="module")
def bare_gelu_open_clip(tmp_path_factory):
  """A bare open_clip state dict of a tiny exact-GELU CLIP (one 64-wide head per tower, so the
  loader's head rule holds and only the activation is unknown), its path and the open_clip model."""
  torch = pytest.importorskip("torch")
  open_clip = pytest.importorskip("open_clip")
  torch.manual_seed(0)
  reference = open_clip.model.CLIP(embed_dim=32, vision_cfg={"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
                                   text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1,
                                             "layers": 1}).eval()
  with torch.no_grad():  # open_clip starts some weights at zero (projections' biases, ...): exercise them all
    for tensor in reference.parameters():
      tensor.add_(torch.randn(tensor.shape) * 0.05)
  path = tmp_path_factory.mktemp("bare") / "tiny_gelu.pt"
  torch.save(reference.state_dict(), path)
  return str(path), reference


@pytest.mark.slow  # torch + open_clip's import and the exact-GELU towers' compile: ~15 s
def test_act_gelu_loads_a_bare_exact_gelu_state_dict_as_open_clip_runs_it(bare_gelu_open_clip, caplog):
  import jax.numpy as jnp
  import torch

  from clip_jax import guidance
  from clip_jax.tokenizer import tokenize
  path, reference = bare_gelu_open_clip
  with caplog.at_level("WARNING", logger="clip_jax.convert"):
    model, variables, tokenizer = guidance.load_guide(path)
  assert model.config.act == "quick_gelu" and "assumed QuickGELU activation" in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING", logger="clip_jax.convert"):
    model, variables, tokenizer = guidance.load_guide(path, act="gelu")
  assert model.config.act == "gelu" and "QuickGELU" not in caplog.text
  tokens = tokenize(["a drawing of a cat"])
  images = np.random.default_rng(0).uniform(size=(1, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    ref_text = reference.encode_text(torch.from_numpy(tokens.astype(np.int64))).numpy()
    ref_image = reference.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  np.testing.assert_allclose(model.apply(variables, jnp.asarray(tokens), method="encode_text"), ref_text, atol=1e-4)
  np.testing.assert_allclose(model.apply(variables, jnp.asarray(images), method="encode_image"), ref_image, atol=1e-4)


def test_architecture_flags_reach_the_loader_of_draw_and_edit(tmp_path, monkeypatch):
  from clip_jax import draw, guidance
  path = str(tmp_path / "bare.pt")
  open(path, "wb").close()  # only has to exist: the loader is replaced
  # Both commands take the flags (they were 'unrecognized arguments') and hand them to load_guide.
  seen = []

  def stop_at_load(checkpoint, tokenizer=None, model_name=None, act=None):
    seen.append((checkpoint, model_name, act))
    raise cli.UserError("stop here")
  monkeypatch.setattr(guidance, "load_guide", stop_at_load)
  with pytest.raises(cli.UserError, match="stop here"):
    draw.main(["--checkpoint", path, path, "--prompt", "a cat", "--out", str(tmp_path / "d"), "--act", "gelu",
               "--model-name", "ViT-B-32"])
  assert seen == [(path, "ViT-B-32", "gelu")]
  from types import SimpleNamespace

  from dreambooth_jax.sampling import pipeline as sd
  monkeypatch.setattr(sd, "load_pipeline", lambda model: SimpleNamespace(vae_scale_factor=4))
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "in.png")
  with pytest.raises(cli.UserError, match="stop here"):
    edit.main(["--model", str(tmp_path), "--clip", path, "--image", str(tmp_path / "in.png"), "--neutral", "a",
               "--target", "b", "--method", "optimize", "--out", str(tmp_path / "e"), "--act", "gelu"])
  assert seen[-1] == (path, None, "gelu")


# ----------------------------------------------------------------------------- draw: Ctrl-C, one compile
def _square_loss_on(mesh):
  """A non-CLIP loss (dark in the middle square) that, like a CLIP guide, constrains its batch to the mesh."""
  import jax.numpy as jnp

  from clip_jax.guidance import batch_constraint
  constrain = batch_constraint(mesh)
  target = jnp.ones((32, 32, 3)).at[8:24, 8:24].set(0.0)
  return lambda images, rng: jnp.mean((constrain(images) - target) ** 2, axis=(1, 2, 3))


@pytest.mark.slow  # the rasteriser's compile: ~7 s
def test_draw_compiles_its_step_once(caplog):
  import jax

  from clip_jax import draw
  from clip_jax.sharding import create_mesh
  mesh = create_mesh({"data": -1})
  settings = draw.DrawSettings(num_strokes=1, segments=1, steps=3, canvas=32, curve_samples=4,
                               augment=draw.Augmentations(num=0))
  with jax.log_compiles(), caplog.at_level("WARNING", logger="jax"):
    draw.draw(_square_loss_on(mesh), 1, settings, jax.random.key(0), progress=False, mesh=mesh)
  # The step's output came back replicated on the guides' mesh while its first input was on one
  # device: the second step compiled again.
  assert caplog.text.count("Compiling jit(step_fn)") == 1


@pytest.mark.slow  # two runs' compiles: ~8 s
def test_draw_keeps_the_steps_done_on_ctrl_c():
  import jax

  from clip_jax import draw
  settings = draw.DrawSettings(num_strokes=1, segments=1, curve_samples=4, steps=40, canvas=32, augment=draw.Augmentations(num=0), frame_every=2)
  frames = []

  def ctrl_c_at_step_6(step, images):
    if step == 6 and 6 not in frames:
      frames.append(6)
      raise KeyboardInterrupt
    frames.append(step)
  loss = _square_loss_on(None)
  strokes, images, history = draw.draw(loss, 1, settings, jax.random.key(0), progress=False,
                                       on_frame=ctrl_c_at_step_6, stop_on_interrupt=True)
  assert history["step"] == list(range(1, 7)) and history["loss"].shape == (6, 1)
  assert frames == [0, 2, 4, 6, 6]  # the last: the drawing as it was stopped
  np.testing.assert_allclose(loss(draw.render(strokes, settings), None), history["loss"][-1], atol=0.05)
  assert images.shape == (1, 32, 32, 3) and history["start_images"].shape == (1, 32, 32, 3)
  frames.clear()
  with pytest.raises(KeyboardInterrupt):  # without stop_on_interrupt a library caller's Ctrl-C stays one
    draw.draw(loss, 1, settings, jax.random.key(0), progress=False, on_frame=ctrl_c_at_step_6)


@pytest.mark.slow  # a tiny CLIP, four runs: ~65 s at load ~10
def test_draw_cli_writes_the_drawing_so_far_on_ctrl_c_and_the_same_command_resumes_it(tmp_path, monkeypatch, capsys):
  import json

  import jax

  import clip_jax
  from clip_jax import draw
  model = clip_jax.create_model("ViT-Tiny")
  checkpoint = clip_jax.export_hf(model, clip_jax.init_variables(model, jax.random.key(0)), str(tmp_path / "clip"))
  real_draw = draw.draw
  stopped = []

  def ctrl_c_at_step_4(*args, on_frame, **kwargs):
    def frame(step, images):
      if step == 4 and not stopped:
        stopped.append(step)
        raise KeyboardInterrupt
      on_frame(step, images)
    return real_draw(*args, on_frame=frame, **kwargs)
  monkeypatch.setattr(draw, "draw", ctrl_c_at_step_4)
  out = tmp_path / "out"
  argv = ["--checkpoint", checkpoint, "--prompt", "a red circle", "--out", str(out), "--strokes", "3", "--steps", "10",
          "--canvas", "32", "--frame-every", "2", "--augmentations", "2", "--distortion", "0.1"]
  assert draw.main(argv) == cli.INTERRUPTED_EXIT_CODE
  assert sorted(p.name for p in (out / "frames").iterdir()) == ["frame_00000.png", "frame_00002.png", "frame_00004.png"]
  assert (out / "drawing.png").exists() and (out / "strokes.npz").exists() and (out / "drawing.gif").exists()
  assert (out / draw.STATE_FILE).exists()
  result = json.loads((out / "result.json").read_text())
  assert result["steps_done"] == 4 and result["stopped"] == "Ctrl-C at step 4 of 10"
  assert -1 <= result["cosine_to_prompt_start"] <= 1 and result["cosine_to_prompt_start"] != result["cosine_to_prompt"]
  message = capsys.readouterr().err.strip().splitlines()[-1]
  assert message.startswith("interrupted (Ctrl-C) at step 4 of 10: wrote the drawing so far to") and \
      "(3 frames)" in message and "the same command resumes from step 4" in message and "ends at step 10" in message

  # The same command goes on from step 4 (was: from step 0) and ends where an unstopped run does, bitwise:
  # the same compiled step on the same strokes, Adam moments and step count, with each step's own views.
  assert draw.main(argv) == 0
  assert "Resuming the drawing in" in capsys.readouterr().out and not (out / draw.STATE_FILE).exists()
  whole = tmp_path / "whole"
  assert draw.main([a if a != str(out) else str(whole) for a in argv]) == 0  # the patch stops only once
  resumed, unstopped = (json.loads((d / "result.json").read_text()) for d in (out, whole))
  assert resumed["resumed_at_steps"] == [4] and unstopped["resumed_at_steps"] == [] and resumed["stopped"] is None
  for key in ("steps_done", "loss_first_step", "loss_last_step", "cosine_to_prompt", "cosine_to_prompt_start",
              "restart_losses"):
    assert resumed[key] == unstopped[key], key
  for name in ("points", "width", "color"):
    np.testing.assert_array_equal(np.load(out / "strokes.npz")[name], np.load(whole / "strokes.npz")[name])
  frames = sorted(p.name for p in (whole / "frames").iterdir())
  assert frames == sorted(p.name for p in (out / "frames").iterdir()) and len(frames) == 6  # 0, 2, ..., 10
  for name in frames + ["../drawing.png"]:
    assert (out / "frames" / name).read_bytes() == (whole / "frames" / name).read_bytes(), name
  # Once finished, the same command says so and touches nothing.
  before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
  assert draw.main(argv) == 0
  assert "already holds this drawing, finished at step 10 of 10" in capsys.readouterr().out
  assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


# ----------------------------------------------------------------------------- --out
def test_an_existing_file_as_out_is_one_line(tmp_path, monkeypatch):
  from clip_jax import draw
  from dreambooth_jax import sample
  a_file = tmp_path / "gray.png"
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(a_file)
  with pytest.raises(cli.UserError, match=r"^--out .*gray.png is a file"):
    cli.make_out_dir(str(a_file))
  with pytest.raises(cli.UserError, match=r"^--out .*gray.png/sub is a file \(or lies under one\)"):
    cli.make_out_dir(str(a_file / "sub"))
  # Each command checks it before loading anything (the loaders here would fail on these paths).
  monkeypatch.setattr("clip_jax.guidance.load_guide", lambda *a, **k: pytest.fail("loaded before the --out check"))
  with pytest.raises(cli.UserError, match=r"^--out .*gray.png is a file"):
    draw.main(["--checkpoint", str(a_file), "--prompt", "a cat", "--out", str(a_file)])
  with pytest.raises(cli.UserError, match=r"^--out .*gray.png is a file"):
    sample.main(["--model", str(tmp_path), "--prompt", "a cat", "--out", str(a_file)])
  with pytest.raises(cli.UserError, match=r"^--out .*gray.png is a file"):
    edit.main(["--model", str(tmp_path), "--clip", str(a_file), "--image", str(a_file), "--neutral", "a",
               "--target", "b", "--method", "optimize", "--out", str(a_file)])


def test_a_prompt_longer_than_the_text_tower_reads_is_said_not_cut_silently(capsys, monkeypatch):
  """draw, edit and sample cut a 112-token prompt at 77 without a word (diffusers warns): one line each,
  from one check (clip_jax.tokenizer.truncation_notes) that counts the start and end tokens."""
  from clip_jax import guidance
  from clip_jax.tokenizer import default_tokenizer, truncation_notes
  tokenizer = default_tokenizer()
  long_prompt = " ".join(["a watercolor of a lighthouse"] * 20)  # 100 words + start and end: 102 tokens
  assert truncation_notes(tokenizer, ["a cat", "x " * 75]) == []  # 75 + 2 = 77: read whole
  [note] = truncation_notes(tokenizer, ["a cat", long_prompt])
  assert note == ("Prompt 'a watercolor of a lighthouse a waterc...' is 102 tokens; the text encoder reads the "
                  "first 77, so its last 25 are dropped.")
  assert truncation_notes(tokenizer, ["x " * 10], context_length=8) and not truncation_notes(lambda t: t, [long_prompt])
  import types

  from clip_jax.eval import embed
  model = types.SimpleNamespace(config=types.SimpleNamespace(text=types.SimpleNamespace(context_length=77)))
  monkeypatch.setattr(embed, "embed_texts", lambda model, variables, tokens, **kwargs: np.zeros((len(tokens), 4)))
  guidance.encode_prompts(model, {}, tokenizer, ["a cat", long_prompt])  # what draw and edit call
  assert "is 102 tokens; the text encoder reads the first 77" in capsys.readouterr().out
