"""Results files and pictures (issue 20.5, 20.6): written whole, never with less than they held,
with the settings that made them; grids a row per label with the label above it; sample files
named by prompt and seed with a JSON sidecar."""
import argparse
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from clip_jax import observe


# ----------------------------------------------------------------------------- the writer
def test_write_atomic_replaces_whole_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "sub" / "results.json"
  observe.write_atomic(str(path), "first")
  observe.write_atomic(str(path), b"second")
  assert path.read_text() == "second" and os.listdir(path.parent) == ["results.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
  path = str(tmp_path / "results.json")
  observe.save_results(path, {"step": 5, "zeroshot/top1": 90.0})
  with pytest.raises(TypeError):  # not JSON: nothing may be written
    observe.save_results(path, {"step": 6, "bad": object()})
  assert json.load(open(path)) == {"step": 5, "zeroshot/top1": 90.0}
  assert os.listdir(tmp_path) == ["results.json"]


def test_the_training_results_of_a_rerun_keep_what_the_file_held(tmp_path):
  """The issue's case: a rerun that only knew the step overwrote the zero-shot numbers."""
  workdir = str(tmp_path)
  observe.write_results(workdir, 600, {"loss": 2.63}, {"zeroshot/digits/top1": 96.9})
  observe.write_results(workdir, 600, {}, {})
  results = json.load(open(tmp_path / "results.json"))
  assert results["train/loss"] == 2.63 and results["zeroshot/digits/top1"] == 96.9 and results["step"] == 600
  assert set(results["settings"]["versions"]) >= {"python", "jax", "flax", "numpy"}
  # Where it ran (a new user could not tell a 1 x 8 run's results from a 2 x 4 one's); a resume on another
  # layout is not other settings.
  assert {k: results["settings"][k] for k in ("devices", "processes", "platform")} == {
      "devices": jax.device_count(), "processes": 1, "platform": "cpu"}
  assert not observe.settings_changes({"seed": 0, "devices": 8, "mesh": {"data": 8}},
                                      {"seed": 0, "devices": 4, "mesh": {"data": 2, "fsdp": 2}})
  table = (tmp_path / "results.md").read_text()
  assert "| final training loss | 2.6300 |" in table and "| zeroshot/digits/top1 | 96.9000 |" in table
  assert "None" not in table


def test_results_of_other_settings_are_moved_aside_not_mixed(tmp_path):
  path = str(tmp_path / "results.json")
  said = []
  render = lambda data: f"{data['score']}\n"  # noqa: E731
  observe.save_results(path, {"score": 1, "settings": {"seed": 0, "versions": {"jax": "1"}}}, render, log=said.append)
  # Other package versions alone do not make other settings: merged in place.
  observe.save_results(path, {"extra": 2, "settings": {"seed": 0, "versions": {"jax": "2"}}}, render, log=said.append)
  assert json.load(open(path)) == {"score": 1, "extra": 2, "settings": {"seed": 0, "versions": {"jax": "2"}}}
  assert said == []
  observe.save_results(path, {"score": 3, "settings": {"seed": 1}}, render, log=said.append)
  assert json.load(open(path)) == {"score": 3, "settings": {"seed": 1}}
  assert json.load(open(tmp_path / "results.1.json"))["score"] == 1
  assert (tmp_path / "results.1.md").read_text() == "1\n" and (tmp_path / "results.md").read_text() == "3\n"
  assert len(said) == 1 and "seed differ" in said[0] and "results.1.json" in said[0]
  observe.save_results(path, {"score": 4, "settings": {"seed": 2}}, render, log=said.append)
  assert json.load(open(tmp_path / "results.2.json"))["score"] == 3  # the next free number


def test_settings_changes_name_the_keys():
  assert observe.settings_changes({"a": 1, "b": 2, "devices": 8}, {"a": 1, "b": 3, "c": 0, "devices": 1}) == ["b", "c"]
  # A setting recorded only since some version: an older record holds its implicit value
  assert observe.settings_changes({"a": 1}, {"a": 1, "p": "openai"}, added={"p": "openai"}) == []
  assert observe.settings_changes({"a": 1}, {"a": 1, "p": "imagenet"}, added={"p": "openai"}) == ["p"]
  assert observe.settings_changes({"a": 1, "p": "x"}, {"a": 1, "p": "openai"}, added={"p": "openai"}) == ["p"]
  assert observe.settings_changes({"a": 1}, {"a": 1}, added={"p": "openai"}) == []  # neither records it
  assert observe.merge_kept({"x": {"p": 1, "q": 2}, "y": 1}, {"x": {"p": 5}}) == {"x": {"p": 5, "q": 2}, "y": 1}


def test_evaluations_from_before_the_preprocessing_record_still_merge(tmp_path, monkeypatch):
  # Session 28 added 'preprocessing' to evaluate's meta: a folder evaluated before (all as OpenAI's CLIP)
  # set its results aside on the next evaluation instead of merging with them.
  from clip_jax.data.images import OPENAI
  from clip_jax.eval import report
  path = str(tmp_path / "results.json")
  observe.save_results(path, {"score": 1, "meta": {"seed": 0}}, settings_key="meta")  # an old file
  new_meta = {"seed": 0, "preprocessing": OPENAI.to_dict()}
  said = []
  observe.save_results(path, {"extra": 2, "meta": new_meta}, settings_key="meta", log=said.append,
                       added_settings={"preprocessing": OPENAI.to_dict()})
  assert said == [] and json.load(open(path))["score"] == 1 and not (tmp_path / "results.1.json").exists()
  calls = []
  monkeypatch.setattr(observe, "save_results", lambda *args, **kwargs: calls.append(kwargs))
  report.write_report(str(tmp_path), [], new_meta)
  assert calls[0]["added_settings"] == {"preprocessing": OPENAI.to_dict()}
  assert report.settings_older_reports_held() == {"preprocessing": OPENAI.to_dict()}


# ----------------------------------------------------------------------------- the CLIP evaluation
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
  import clip_jax
  model = clip_jax.create_model("ViT-Tiny")
  return clip_jax.export_hf(model, clip_jax.init_variables(model, jax.random.key(0)),
                            str(tmp_path_factory.mktemp("tiny_clip")))


def _image_folder(root, classes=("cat", "dog"), per_class=2):
  for c, name in enumerate(classes):
    os.makedirs(root / name, exist_ok=True)
    for i in range(per_class):
      Image.fromarray(np.full((24, 24, 3), 40 * (c * per_class + i), np.uint8)).save(root / name / f"{i}.png")
  return str(root)


@pytest.mark.slow  # ~30-200 s on the shared 2-core box
def test_clip_evaluation_records_its_settings_and_keeps_other_tasks(tiny_clip, tmp_path, capsys):
  from clip_jax import evaluate
  folder = _image_folder(tmp_path / "pets")
  templates = tmp_path / "prompts.txt"
  templates.write_text("a photo of a {}.\na {} drawn\n")
  out = tmp_path / "eval"
  common = ["--checkpoint", tiny_clip, "--batch-size", "8", "--out", str(out)]
  assert evaluate.main(common + ["--tasks", f"zeroshot:mine={folder}", "--templates", str(templates)]) == 0
  assert evaluate.main(common + ["--tasks", f"zeroshot:again={folder}"]) == 0
  report = json.load(open(out / "results.json"))
  meta = report["meta"]
  assert meta["checkpoint"] == tiny_clip and meta["tokenizer"] == "clip" and meta["act"] == "gelu"
  assert meta["limit"] is None and meta["probe_seed"] == 0 and meta["versions"]["jax"] == jax.__version__
  by_name = {r["dataset"]: r for r in report["results"]}
  assert set(by_name) == {"mine", "again"}  # the second run added its task, kept the first's
  assert by_name["mine"]["templates"] == ["a photo of a {}.", "a {} drawn"]
  assert by_name["mine"]["class_names"] == ["cat", "dog"] and by_name["mine"]["source"] == folder
  table = (out / "results.md").read_text()
  assert "Settings:" in table and f"- zeroshot:mine: data `{folder}`" in table and "2 prompt templates" in table
  # Other settings (--limit): the earlier report moves aside whole.
  assert evaluate.main(common + ["--tasks", f"zeroshot:mine={folder}", "--limit", "2"]) == 0
  assert "limit differ" in capsys.readouterr().out
  assert {r["dataset"] for r in json.load(open(out / "results.1.json"))["results"]} == {"mine", "again"}
  assert [r["dataset"] for r in json.load(open(out / "results.json"))["results"]] == ["mine"]


# ----------------------------------------------------------------------------- the DreamBooth evaluation
def test_dreambooth_evaluation_settings_name_everything_that_made_the_numbers():
  from dreambooth_jax import evaluate as db_eval
  args = argparse.Namespace(model="runs/dog/export", instance_dir="photos", class_noun="dog", identifier="sks",
                            live=True, clip="clip.pt", dino=None, lpips_backbone=None, images_per_prompt=4,
                            class_images=25, num_prompts=2, steps=50, guidance=7.5, sampler="ddim", seed=3)
  prompts = db_eval.evaluation_prompts("sks", "dog", True)[:2]
  settings = db_eval.evaluation_settings(args, prompts)
  assert settings["prompts"] == prompts and settings["class_images"] == 0  # no DINO: no PRES images
  for key in ("model", "clip", "sampler", "steps", "guidance", "seed", "images_per_prompt", "versions"):
    assert key in settings, key
  text = db_eval.settings_markdown(settings)
  assert "2 prompts x 4 images" in text and "ddim 50 steps, guidance 7.5, seed 3" in text and "clip `clip.pt`" in text


# ----------------------------------------------------------------------------- grids
def test_grid_rows_labels_and_nearest_upscaling():
  green = np.array([12, 200, 34], np.uint8)  # a colour no grey text pixel has
  rows = [np.broadcast_to(green, (3, 32, 32, 3)), np.full((3, 32, 32, 3), 200, np.uint8)]
  bare = observe.image_grid(rows, min_cell=0)
  assert bare.shape == (2 * 32 + 3 * 4, 3 * 32 + 4 * 4, 3)
  grid = observe.image_grid(rows, ["a photo of a dog", "a photo of a cat"], title="step 7")
  scale = 8  # ceil(256 / 32)
  assert grid.shape[1] == 3 * (32 * scale + 4) + 4 and grid.shape[0] > 2 * 32 * scale + 2 * 16
  # Each image is one flat block (nearest neighbour: no blur at the edges) ...
  top, left = np.argwhere(np.all(grid == green, axis=-1)).min(0)
  assert np.all(grid[top:top + 32 * scale, left:left + 32 * scale] == green)
  # ... with its label written (dark pixels on white) in the band above the row.
  band = grid[top - 20:top, :200]
  assert band.min() < 100 and np.any(np.all(band == 255, axis=-1))
  # A flat batch cut into rows of `columns`; floats in [0, 1] too.
  flat = observe.image_grid(np.ones((6, 8, 8, 3), np.float32), columns=3, min_cell=0)
  assert flat.shape == (2 * 8 + 3 * 4, 3 * 8 + 4 * 4, 3) and flat.max() == 255
  with pytest.raises(ValueError, match="2 labels for 1 rows"):
    observe.image_grid([rows[0]], ["a", "b"])
  with pytest.raises(ValueError, match="one size"):
    observe.image_grid([rows[0], np.zeros((1, 16, 16, 3), np.uint8)])


def test_grid_labels_wrap_to_the_grid_width():
  row = [np.zeros((1, 32, 32, 3), np.uint8)]
  short = observe.image_grid(row, ["a dog"])
  long = observe.image_grid(row, ["a photo of a dog on a cobblestone street with a city in the background " * 3])
  assert long.shape[1] == short.shape[1] and long.shape[0] > short.shape[0] + 30


# ----------------------------------------------------------------------------- the sample CLI
@pytest.fixture(scope="module")
def tiny_sd(tiny_sd_dir):
  return tiny_sd_dir  # conftest.py: made once per session


@pytest.mark.slow  # ~30-200 s on the shared 2-core box
def test_sample_files_are_named_by_prompt_and_seed_and_reproduce_alone(tiny_sd, tmp_path):
  from dreambooth_jax import sample
  common = ["--model", tiny_sd, "--steps", "2", "--sampler", "ddim", "--guidance", "1"]
  both = tmp_path / "both"
  assert sample.main(common + ["--prompt", "a zero", "--prompt", "a one", "--num-images", "2",
                               "--seed", "5", "--out", str(both)]) == 0
  stems = [f"prompt{p:02d}_seed{s}" for p in (0, 1) for s in (5, 6)]
  assert sorted(os.listdir(both)) == sorted(["grid.png"] + [s + ext for s in stems for ext in (".png", ".json")])
  record = json.load(open(both / "prompt01_seed6.json"))
  assert record["prompt"] == "a one" and record["prompt_index"] == 1 and record["seed"] == 6
  assert record["sampler"] == "ddim" and record["steps"] == 2 and record["model"] == tiny_sd
  assert Image.open(both / "prompt01_seed6.png").text["prompt"] == "a one"
  grid = Image.open(both / "grid.png")
  assert grid.width == 2 * (256 + 4) + 4  # two columns of 32 px images enlarged 8x; a row per prompt
  # The (prompt, seed) image alone, in a batch of one: the same picture (seeds draw the latents).
  alone = tmp_path / "alone"
  assert sample.main(common + ["--prompt", "a one", "--num-images", "1", "--seed", "6", "--out", str(alone)]) == 0
  a = np.asarray(Image.open(both / "prompt01_seed6.png"), np.int16)
  b = np.asarray(Image.open(alone / "prompt00_seed6.png"), np.int16)
  assert np.abs(a - b).max() <= 1  # batch 4 vs batch 1: float rounding may move a pixel by one level
