"""python -m clip_jax.export: a checkpoint -> a Hugging Face folder (with its tokenizer), an OpenAI-layout
file or an open_clip hub folder, read back to the same weights (open_clip's own loader: test_models); existing outputs, wrong suffixes and ResNets for 'hf' get one line;
a failed export leaves nothing at --out."""
import os
import stat

import jax
import numpy as np
import pytest
from flax import traverse_util

import clip_jax
from clip_jax import cli, export
from clip_jax.convert import export_hf, load_checkpoint


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A random ViT-Tiny as a Hugging Face folder without tokenizer files (what export_hf writes by default)."""
  model = clip_jax.create_model("ViT-Tiny")
  variables = clip_jax.init_variables(model, jax.random.key(0))
  return export_hf(model, variables, str(tmp_path_factory.mktemp("src") / "hf"))


def _same_weights(a, b):
  flat_a, flat_b = (traverse_util.flatten_dict(v) for v in (a, b))
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_b[key]), np.asarray(flat_a[key]), err_msg=str(key))


def test_hf_export_has_the_weights_config_and_tokenizer(source, tmp_path, capsys):
  out = str(tmp_path / "out")
  assert export.main(["--checkpoint", source, "--out", out]) == 0
  assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= set(os.listdir(out))
  assert "Exported" in capsys.readouterr().out
  _same_weights(load_checkpoint(source)[1], load_checkpoint(out)[1])
  umask = os.umask(0o022)
  os.umask(umask)
  mode = stat.S_IMODE(os.stat(os.path.join(out, "model.safetensors")).st_mode)
  assert mode == 0o666 & ~umask  # safetensors alone makes it 0600
  transformers = pytest.importorskip("transformers")
  tokenizer = transformers.CLIPTokenizer.from_pretrained(out)
  assert tokenizer("a photo of a cat").input_ids[0] == 49406  # OpenAI's start token
  # The image processor too (a new user's CLIPProcessor and zero-shot pipeline failed without it):
  # on a 48x40 image (resized, then center-cropped), its pixels are this project's preprocessing's but for
  # transformers' own bicubic rounding: at most one 8-bit level, on under 1% of the values.
  from PIL import Image
  from clip_jax.preprocess import eval_transform, normalize
  image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
  processor = transformers.CLIPProcessor.from_pretrained(out)
  theirs = processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  difference = np.abs(theirs - normalize(eval_transform(image, 32)))
  one_level = 1 / 255 / min(processor.image_processor.image_std)
  assert difference.max() <= one_level + 1e-5 and np.mean(difference > 1e-5) < 0.01, difference.max()


def test_openai_export_reads_back_as_the_same_model(source, tmp_path, capsys):
  out = str(tmp_path / "digits.safetensors")
  export.main(["--checkpoint", source, "--format", "openai", "--out", out])
  # The layout drops the heads and activation: the export names what reads it back whole (a new user's
  # read-back assumed 1 text head and QuickGELU: 96.38% instead of 96.66%).
  assert "read it back with --model-name ViT-Tiny" in capsys.readouterr().out
  model, variables = load_checkpoint(out, model_name="ViT-Tiny")
  assert model.config == load_checkpoint(source)[0].config
  _same_weights(load_checkpoint(source)[1], variables)


def test_open_clip_export_is_a_hub_folder_that_reads_back_as_the_same_model(source, tmp_path):
  out = str(tmp_path / "open_clip")
  assert export.main(["--checkpoint", source, "--format", "open_clip", "--out", out]) == 0
  assert sorted(os.listdir(out)) == ["open_clip_config.json", "open_clip_model.safetensors"]
  model, variables = load_checkpoint(out)  # no --model-name: the folder carries the architecture
  assert model.config == load_checkpoint(source)[0].config
  _same_weights(load_checkpoint(source)[1], variables)


def test_mistakes_are_one_line_and_nothing_half_written(source, tmp_path, monkeypatch):
  out = tmp_path / "out"
  out.mkdir()
  with pytest.raises(cli.UserError, match="exists; choose another path or pass --overwrite"):
    export.export(source, str(out))
  export.export(source, str(out), overwrite=True)
  assert "model.safetensors" in os.listdir(out)
  with pytest.raises(cli.UserError, match="name it NAME.safetensors"):
    export.export(source, str(tmp_path / "model.pt"), "openai")

  def fails_midway(module, variables, out_dir, tokenizer=None, preprocessing=None):
    os.makedirs(out_dir)
    open(os.path.join(out_dir, "config.json"), "w").close()
    raise OSError("disk full")
  monkeypatch.setattr("clip_jax.convert.export_hf", fails_midway)
  with pytest.raises(OSError, match="disk full"):
    export.export(source, str(tmp_path / "cut"))
  assert not os.path.exists(tmp_path / "cut") and os.listdir(tmp_path) == ["out"]  # no staging folder left


@pytest.mark.slow  # ~11 s: a ResNet's init and load
def test_a_resnet_is_refused_for_hf_in_one_line(tmp_path):
  model = clip_jax.create_model("RN-Tiny")
  variables = clip_jax.init_variables(model, jax.random.key(0))
  from clip_jax.convert import export_openai_state_dict
  from clip_jax.weights import save_safetensors
  path = str(tmp_path / "rn.safetensors")
  save_safetensors(export_openai_state_dict(model, variables), path)
  with pytest.raises(cli.UserError, match="ResNet image tower.*--format openai"):
    export.export(path, str(tmp_path / "hf"), model_name="RN-Tiny")
  assert not os.path.exists(tmp_path / "hf")


def test_architecture_flags_follow_the_evaluation_rule(source, tmp_path):
  """--model-name / --act as every command that loads a CLIP takes them (evaluate.load_model): --act on a
  folder was dropped silently here, an unknown name reached the loader; both are one line now."""
  with pytest.raises(cli.UserError, match="--act applies to bare state-dict files; .* is a directory"):
    export.main(["--checkpoint", source, "--act", "gelu", "--out", str(tmp_path / "a")])
  bare = tmp_path / "bare.safetensors"
  bare.write_bytes(b"")  # the name is checked before the file is read
  with pytest.raises(cli.UserError, match="--model-name 'ViT-Nope' is not a named architecture"):
    export.main(["--checkpoint", str(bare), "--model-name", "ViT-Nope", "--out", str(tmp_path / "b")])
  with pytest.raises(cli.MissingPathError, match="missing.pt: no such file"):
    export.main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "c")])
  assert sorted(os.listdir(tmp_path)) == ["bare.safetensors"]


def test_open_clip_export_carries_a_tokenizer_other_than_openais(tmp_path, capsys):
  """A model trained with another BPE (session 28's fresh user: the open_clip export wrote no tokenizer
  files, so open_clip tokenized it with OpenAI's BPE and no line said so): its files are written and
  named in open_clip_config.json, and open_clip's own get_tokenizer('local-dir:') gives our ids."""
  import json
  from clip_jax.tokenizer import default_tokenizer, get_tokenizer
  vocab_dir = tmp_path / "bpe"
  default_tokenizer().save_hf(str(vocab_dir))
  vocab = json.loads((vocab_dir / "vocab.json").read_text(encoding="utf-8"))
  vocab["cat</w>"], vocab["dog</w>"] = vocab["dog</w>"], vocab["cat</w>"]  # another BPE: two ids swapped
  (vocab_dir / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
  model = clip_jax.create_model("ViT-Tiny")
  variables = clip_jax.init_variables(model, jax.random.key(0))
  ours = get_tokenizer(str(vocab_dir), context_length=model.config.text.context_length)
  source = export_hf(model, variables, str(tmp_path / "src"), tokenizer=ours)  # the folder holds its files
  out = str(tmp_path / "my_clip")
  assert export.main(["--checkpoint", source, "--format", "open_clip", "--out", out]) == 0
  said = capsys.readouterr().out
  assert "text_cfg.hf_tokenizer_name: 'my_clip'" in said and f"get_tokenizer('local-dir:{out}')" in said, said
  config = json.loads(open(os.path.join(out, "open_clip_config.json")).read())
  assert config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] == "my_clip"
  texts = ["a photo of a cat.", "a dog"]
  expected = np.asarray(ours(texts))
  assert expected[0].tolist() != np.asarray(default_tokenizer()(texts))[0].tolist()  # the swap shows
  assert np.asarray(get_tokenizer(out, context_length=expected.shape[1])(texts)).tolist() == expected.tolist()
  open_clip = pytest.importorskip("open_clip")
  pytest.importorskip("transformers")
  theirs = open_clip.get_tokenizer(f"local-dir:{out}")(texts).numpy()
  for row_theirs, row_ours in zip(theirs, expected):  # up to the end token (padding ids differ by design)
    end = list(row_ours).index(ours.eot_token_id) + 1
    assert row_theirs[:end].tolist() == row_ours[:end].tolist()
  # OpenAI's BPE itself: nothing written or said, as before (open_clip's own convention)
  plain = str(tmp_path / "plain")
  export.export_model(model, variables, plain, "open_clip", tokenizer=default_tokenizer())
  assert sorted(os.listdir(plain)) == ["open_clip_config.json", "open_clip_model.safetensors"]
  assert "tokenizer" not in capsys.readouterr().out


def test_a_tokenizer_a_format_cannot_carry_is_said(tmp_path):
  import types
  from clip_jax.convert import export_tokenizer_note
  from clip_jax.tokenizer import default_tokenizer
  sentencepiece = types.SimpleNamespace(model_path="/data/spm.model")  # what the note reads of one
  assert "an open_clip folder cannot name it here" in export_tokenizer_note(sentencepiece, "open_clip", "o")
  assert "no tokenizer files are written" in export_tokenizer_note(sentencepiece, "hf", "o")
  assert "give them this model's tokenizer by hand" in export_tokenizer_note(sentencepiece, "openai", "o.safetensors")
  hf_spelled = tmp_path / "hf_spelled"  # OpenAI's BPE as an HF folder writes it: '<|startoftext|>'
  default_tokenizer().save_hf(str(hf_spelled))
  from clip_jax.tokenizer import get_tokenizer
  for fmt in ("hf", "open_clip", "openai"):
    assert export_tokenizer_note(default_tokenizer(), fmt, "o") is None
    assert export_tokenizer_note(get_tokenizer(str(hf_spelled)), fmt, "o") is None
    assert export_tokenizer_note(None, fmt, "o") is None
