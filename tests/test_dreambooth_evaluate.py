"""The DreamBooth evaluation CLI: the paper's prompts, its numbers beside ours, and a tiny end-to-end run."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import clip_jax
from clip_jax.weights import save_safetensors
from dreambooth_jax.eval import dino as dino_lib
from dreambooth_jax import evaluate as db_eval


def test_the_papers_25_prompts():
  live = db_eval.evaluation_prompts("sks", "dog", live=True)
  objects = db_eval.evaluation_prompts("sks", "teapot", live=False)
  assert len(live) == len(objects) == 25 and len(set(live)) == 25
  assert all("sks dog" in p for p in live) and all("sks teapot" in p for p in objects)
  assert "a sks dog wearing a santa hat" in live and "a sks teapot floating in an ocean of milk" in objects
  same = lambda prompts: [p.replace("teapot", "dog") for p in prompts]  # noqa: E731
  assert live[:10] == same(objects[:10]) and live[-5:] == same(objects[-5:]) and live[10:20] != same(objects[10:20])


def test_table_puts_the_paper_beside_ours():
  table = db_eval.markdown_table({"dino": 0.5, "clip_i": 0.7, "clip_t": 0.2, "pres": 0.4}, "ours")
  assert "| ours | 0.500 | 0.700 | 0.200 | 0.400 |  |" in table
  assert "| DreamBooth (Stable Diffusion) | 0.668 | 0.803 | 0.305 |" in table
  assert "Table 1" in table and "Table 3" in table
  # A new user's DIV cell was empty without a word: the note names what is missing and its flag.
  assert "Our row leaves out (no network given): DIV (needs --lpips-backbone)." in table
  table = db_eval.markdown_table({"dino": 0.5, "pres": 0.4}, "ours")
  assert "CLIP-I, CLIP-T (needs --clip); DIV (needs --lpips-backbone)." in table
  assert "leaves out" not in db_eval.markdown_table(dict.fromkeys(db_eval.METRICS, 0.5), "ours")


def test_the_docstring_names_only_flags_that_exist(capsys):
  """It advertised `[--base-model SD_DIR]`, a flag the command does not have."""
  import re
  with pytest.raises(SystemExit):
    db_eval.main(["--help"])
  helped = set(re.findall(r"--[a-z][a-z-]+", capsys.readouterr().out))
  assert set(re.findall(r"--[a-z][a-z-]+", db_eval.__doc__)) <= helped


def test_cli_needs_a_metric_network(tmp_path, capsys):
  with pytest.raises(SystemExit):
    db_eval.main(["--model", str(tmp_path), "--instance-dir", str(tmp_path), "--class-noun", "dog",
                  "--identifier", "sks", "--out", str(tmp_path / "out")])
  assert "give at least one of --clip" in capsys.readouterr().err


def test_the_identifier_is_the_runs_and_a_different_one_is_refused(tmp_path, capsys):
  """A new user's --identifier sks on a run whose trainer picked 'sqm': every prompt named a token the
  model never learned. The run's identifier is the default; a disagreeing one is refused in one line."""
  run, export = tmp_path / "run", tmp_path / "run" / "export"
  export.mkdir(parents=True)
  (run / "identifier.json").write_text(json.dumps({"identifier": "sqm", "instance_prompt": "a sqm toy"}))
  assert db_eval.resolve_identifier(None, str(export)) == "sqm"  # the run folder's (older exports)
  assert db_eval.resolve_identifier("sqm", str(export)) == "sqm"
  assert "Identifier 'sqm'" in capsys.readouterr().out
  code = db_eval.main(["--model", str(export), "--instance-dir", str(tmp_path), "--class-noun", "toy",
                       "--identifier", "sks", "--clip", "x", "--out", str(tmp_path / "out")])
  err = capsys.readouterr().err
  assert code == 2 and len(err.strip().splitlines()) == 1 and "'sks'" in err and "'sqm'" in err
  (export / "identifier.json").write_text(json.dumps({"identifier": "zwx"}))  # the export's own comes first
  assert db_eval.resolve_identifier(None, str(export)) == "zwx"
  with pytest.raises(ValueError, match="pass --identifier"):
    db_eval.resolve_identifier(None, str(tmp_path))  # a model folder from elsewhere: no default


def test_the_class_noun_is_the_runs_unless_given(tmp_path, capsys):
  """`evaluate` needed --class-noun although the run's identifier.json knew it: the run's is the default
  (the file's class_noun, or for older runs its class_prompt "a toy"), another one is used and said,
  and a model that records none asks for it in one line."""
  run, export = tmp_path / "run", tmp_path / "run" / "export"
  export.mkdir(parents=True)
  (run / "identifier.json").write_text(json.dumps({"identifier": "sqm", "class_prompt": "a stuffed toy"}))
  assert db_eval.resolve_class_noun(None, str(export)) == "stuffed toy"  # older run: from its class prompt
  assert "Class noun 'stuffed toy'" in capsys.readouterr().out
  (export / "identifier.json").write_text(json.dumps({"identifier": "sqm", "class_noun": "dog",
                                                       "class_prompt": "a dog"}))
  assert db_eval.resolve_class_noun(None, str(export)) == "dog"
  assert db_eval.resolve_class_noun("puppy", str(export)) == "puppy"
  assert "'puppy' differs from the run's 'dog'" in capsys.readouterr().out
  with pytest.raises(ValueError, match="pass --class-noun"):
    db_eval.resolve_class_noun(None, str(tmp_path))
  code = db_eval.main(["--model", str(tmp_path), "--instance-dir", str(tmp_path), "--identifier", "sks",
                       "--clip", "x", "--out", str(tmp_path / "out")])
  err = capsys.readouterr().err
  assert code == 2 and len(err.strip().splitlines()) == 1 and "--class-noun" in err


def test_the_trainer_records_the_class_noun_for_evaluation(tmp_path):
  import ml_collections

  from dreambooth_jax import train as db_train
  cfg = ml_collections.ConfigDict({"identifier": "sqm", "class_noun": "red seven"})
  assert db_train.choose_identifier(cfg, None, str(tmp_path)) == "sqm"
  assert db_eval.run_record(str(tmp_path / "export"))[0]["class_noun"] == "red seven"
  assert db_eval.resolve_class_noun(None, str(tmp_path / "export")) == "red seven"


def test_the_identifier_file_has_one_name_the_trainer_and_evaluation_share():
  """The trainer wrote 'identifier.json' by a literal and evaluate had its own IDENTIFIER_FILE: one
  definition (dreambooth_jax.training.identifier.IDENTIFIER_FILE) names the file for both."""
  import inspect
  import os

  from dreambooth_jax import train as db_train
  from dreambooth_jax.training import identifier as ident
  assert db_eval.IDENTIFIER_FILE is ident.IDENTIFIER_FILE
  assert db_train.identifier_path("w") == os.path.join("w", ident.IDENTIFIER_FILE)
  for module in (db_train, db_eval):
    assert '"identifier.json"' not in inspect.getsource(module), module.__name__


@pytest.mark.slow
def test_cli_end_to_end_on_tiny_models(tmp_path, tiny_sd_dir):
  model_dir = tiny_sd_dir
  clip_model = clip_jax.create_model("ViT-Tiny")
  clip_dir = clip_jax.export_hf(clip_model, clip_jax.init_variables(clip_model, jax.random.key(1)),
                                str(tmp_path / "clip"))
  dino_model = dino_lib.DinoViT(dino_lib.DinoConfig(layers=1))
  dino_vars = jax.jit(dino_model.init)(jax.random.key(2), jnp.zeros((1, 224, 224, 3)))
  save_safetensors(dino_lib.dino_to_state_dict(dino_model, jax.device_get(dino_vars)),
                   str(tmp_path / "dino.safetensors"))
  photos = tmp_path / "photos"
  photos.mkdir()
  for i in range(3):
    Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(photos / f"{i}.png")
  out = tmp_path / "eval"
  code = db_eval.main(["--model", model_dir, "--instance-dir", str(photos), "--class-noun", "dog",
                       "--identifier", "sks", "--live", "--clip", clip_dir, "--dino", str(tmp_path / "dino.safetensors"),
                       "--num-prompts", "2", "--images-per-prompt", "2", "--class-images", "2", "--steps", "2",
                       "--out", str(out)])
  assert code == 0
  results = json.loads((out / "results.json").read_text())
  assert results["num_generated"] == 4
  for key in ("dino", "clip_i", "clip_t", "pres"):
    assert -1.0 <= results[key] <= 1.0, key
  assert "| DreamBooth (Imagen) |" in (out / "results.md").read_text()
  assert (out / "samples.png").exists()
  settings = results["settings"]  # what made the numbers (issue 20.5)
  assert settings["steps"] == 2 and settings["sampler"] == "ddim" and settings["clip"] == clip_dir
  assert len(settings["prompts"]) == 2 and settings["versions"]["jax"] == jax.__version__
  assert "Settings: model" in (out / "results.md").read_text()
