"""Training straight from image-caption data as people keep it (no `prepare` first): img2dataset /
webdataset tars, caption tables (open_clip's filepath,title CSV, JSONL with caption lists) and folders
of images with sidecar .txt captions; what is wrong is skipped and counted by reason, mistakes at start
are one-line UserErrors. The trainer says how big its data is; its zero-shot hook names a path safely."""
import io
import json
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from clip_jax import train as trainer
from clip_jax.cli import UserError
from clip_jax.data import captioned, labelled, make_pipeline, quality_counts, sources
from clip_jax.eval import retrieval, zeroshot
from configs.clip.common import base_config, runlocal
from tarfiles import write_tar

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png_bytes(seed, size=(12, 16)):
  buffer = io.BytesIO()
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buffer, "PNG")
  return buffer.getvalue()


class RecordingTokenizer:
  """Texts -> int32 [n, 8] (their length in the first column); keeps every text it was given."""

  def __init__(self):
    self.texts = []

  def __call__(self, texts):
    self.texts.extend(texts)
    tokens = np.zeros((len(texts), 8), np.int32)
    tokens[:, 0] = [len(t) for t in texts]
    return tokens


def _train_captions(source, batches=2, batch_size=4):
  """The captions the training pipeline tokenizes over `batches` batches, and its skip/repair counts."""
  tokenizer = RecordingTokenizer()
  iterator = iter(make_pipeline(source, tokenizer, batch_size=batch_size, image_size=8, train=True,
                                process_index=0, process_count=1, prefetch_batches=0))
  for _ in range(batches):
    next(iterator)
  return set(tokenizer.texts[1:]), quality_counts(iterator)  # [0]: ExampleMaker's probe "a"


def test_img2dataset_tars_train_on_their_captions(tmp_path):
  # img2dataset's layout: KEY.jpg + KEY.txt + KEY.json; json-only captions; a label beside a caption;
  # keys without any caption (skipped, counted); a .txt without its image. Was: every key 'missing_label',
  # the pipeline died after 1000 unusable records.
  os.makedirs(tmp_path / "wds")
  write_tar(tmp_path / "wds" / "00000.tar", [
      ("00000.png", _png_bytes(0)), ("00000.txt", b"a red square"), ("00000.json", b'{"caption": "ignored"}'),
      ("00001.png", _png_bytes(1)), ("00001.json", json.dumps({"caption": "a blue circle", "status": "success"}).encode()),
      ("00002.png", _png_bytes(2)), ("00002.json", b'{"status": "failed_to_download"}'),
      ("00003.png", _png_bytes(3))])
  write_tar(tmp_path / "wds" / "00001.tar", [
      ("00004.png", _png_bytes(4)), ("00004.txt", b"a green star"), ("00004.cls", b"1"),
      ("00005.txt", b"no image")])
  source = sources.open_source(str(tmp_path / "wds" / "{00000..00001}.tar"))
  assert isinstance(source, labelled.WebDatasetSource) and source.has_captions
  records = [source[i] for i in range(len(source))]
  assert [r.get("captions", r.get("skip")) for r in records] == [
      [b"a red square"], ["a blue circle"], "missing_caption", "missing_caption", [b"a green star"], "missing_image"]
  assert [r.get("label") for r in records] == [-1, -1, None, None, 1, None]
  assert source.problems == {"missing_image": 1}
  assert repr(source).endswith("6 captioned images, 2 classes)")  # one key has cls 1
  write_tar(tmp_path / "wds" / "00001.tar", [("00004.png", _png_bytes(4)), ("00004.txt", b"a green star")])
  assert repr(sources.open_source(str(tmp_path / "wds"))).endswith("captioned images, no class labels)")  # was '0 classes'
  write_tar(tmp_path / "wds" / "00001.tar", [
      ("00004.png", _png_bytes(4)), ("00004.txt", b"a green star"), ("00004.cls", b"1"),
      ("00005.txt", b"no image")])
  texts, counts = _train_captions(source)
  assert texts == {"a red square", "a blue circle", "a green star"}
  assert counts["skipped"]["missing_caption"] >= 2 and set(counts["skipped"]) == {"missing_caption", "missing_image"}
  # Labelled tars without captions stay labelled data, as before: template captions, unlabelled keys skipped.
  os.makedirs(tmp_path / "cls")
  write_tar(tmp_path / "cls" / "0.tar", [("a.png", _png_bytes(5)), ("a.cls", b"0"), ("b.png", _png_bytes(6))])
  labelled_tars = sources.open_source(str(tmp_path / "cls"))
  assert not labelled_tars.has_captions and labelled_tars[0]["captions"][0] == "a photo of a 0."
  assert labelled_tars[1]["skip"] == "missing_label"


def test_a_table_is_read_once_when_opened(tmp_path, monkeypatch):
  """open_table read the whole table to tell labels from captions, then the source read it again (a
  LAION-size CSV twice into memory): the source now takes the rows already read."""
  reads, read_table = [], labelled.read_table

  def counting_read_table(path, *args, **kwargs):
    reads.append(path)
    return read_table(path, *args, **kwargs)
  for module in (sources, captioned, labelled):
    monkeypatch.setattr(module, "read_table", counting_read_table)
  (tmp_path / "0.png").write_bytes(_png_bytes(0))
  (tmp_path / "captions.csv").write_text("filepath,title\n0.png,a red square\n")
  (tmp_path / "labels.csv").write_text("path,label\n0.png,cat\n")
  assert sources.open_source(str(tmp_path / "captions.csv")).all_captions() == [["a red square"]]
  assert sources.open_source(str(tmp_path / "labels.csv")).class_names == ["cat"]
  assert reads == [str(tmp_path / "captions.csv"), str(tmp_path / "labels.csv")]


def test_tar_shards_beside_images_are_refused_by_training_and_prepare_alike(tmp_path, capsys):
  """A folder of class sub-folders with a stray archive beside them trained on the archive (sources.find_tars
  took any top-level .tar) while `prepare` read the images: one rule now (`prepare.folder_tars`), and a
  folder holding both is one line that says how to name either; a hidden folder does not count."""
  from clip_jax.data import prepare
  mixed = tmp_path / "photos"
  (mixed / "cat").mkdir(parents=True)
  (mixed / "cat" / "0.png").write_bytes(_png_bytes(0))
  write_tar(mixed / "backup.tar", [("a.png", _png_bytes(1)), ("a.txt", b"a caption")])
  for labelled_data in (False, True):
    with pytest.raises(UserError, match=r"photos holds 1 \.tar shard beside 1 sub-folder: name the shards .*\*\.tar"):
      sources.open_source(str(mixed), labelled=labelled_data)
  assert prepare.main(["--input", str(mixed), "--output", str(tmp_path / "auto")]) == 2
  assert "beside 1 sub-folder" in capsys.readouterr().err
  assert prepare.main(["--input", str(mixed), "--output", str(tmp_path / "classes"), "--layout", "classes"]) == 0
  named = sources.open_source(str(mixed / "*.tar"))  # the shards, named
  assert isinstance(named, sources.WebDatasetSource) and len(named) == 1
  (mixed / "cat" / "0.png").unlink()
  (mixed / "cat").rmdir()
  (mixed / ".ipynb_checkpoints").mkdir()
  assert isinstance(sources.open_source(str(mixed)), sources.WebDatasetSource)
  (mixed / "preview.jpg").write_bytes(_png_bytes(2))
  with pytest.raises(UserError, match="beside 1 image:"):
    sources.open_source(str(mixed))


def test_caption_tables_train_on_their_captions(tmp_path):
  for i in range(3):
    (tmp_path / "img").mkdir(exist_ok=True)
    (tmp_path / "img" / f"{i}.png").write_bytes(_png_bytes(i))
  # open_clip's CSV: was "no label column among ['filepath', 'title']". Rows naming one image are one
  # record; a row without a path is 'malformed_row'; a missing image is skipped when read.
  (tmp_path / "train.csv").write_text('filepath,title\nimg/0.png,a red square\nimg/1.png,"a circle, blue"\n'
                                      "img/0.png,a square\n,no image\nimg/gone.png,lost\n")
  source = sources.open_source(str(tmp_path / "train.csv"))
  assert isinstance(source, captioned.CaptionFileSource) and retrieval.CaptionFileSource is captioned.CaptionFileSource
  assert source.all_captions() == [["a red square", "a square"], ["a circle, blue"], ["lost"]]
  assert source.problems == {"malformed_row": 1} and source[2]["skip"] == "missing_image"
  texts, counts = _train_captions(source, batches=3)
  assert texts == {"a red square", "a square", "a circle, blue"} and counts["skipped"] == {"missing_image": counts["skipped"]["missing_image"]}
  # JSONL: a caption may be a list (one drawn per read); TSV as CSV.
  (tmp_path / "train.jsonl").write_text(json.dumps({"image": "img/2.png", "captions": ["one", "two"]}) + "\n")
  assert sources.open_source(str(tmp_path / "train.jsonl"))[0]["captions"] == ["one", "two"]
  (tmp_path / "train.tsv").write_text("image\tcaption\nimg/1.png\ttab separated\n")
  assert sources.open_source(str(tmp_path / "train.tsv"))[0]["captions"] == ["tab separated"]
  # A label column keeps the table labelled (zero-shot reads its labels); its captions are what training reads.
  (tmp_path / "both.csv").write_text("path,label,caption\nimg/0.png,cat,a cat on a mat\nimg/1.png,dog,\n")
  both = sources.open_source(str(tmp_path / "both.csv"))
  assert isinstance(both, labelled.LabelTableSource) and both.class_names == ["cat", "dog"]
  assert both[0]["captions"] == ["a cat on a mat"] and both[1]["captions"][0] == "a photo of a dog."
  # A captioned row without a label trains on its caption (label -1), as `prepare` keeps it; it was skipped
  # as unknown_label. Where labels are read it is skipped as missing_label, as is a row with neither.
  (tmp_path / "some.csv").write_text("path,label,caption\nimg/0.png,cat,a cat\nimg/1.png,,a dog asleep\n"
                                     "img/2.png,,\n")
  some = sources.open_source(str(tmp_path / "some.csv"))
  assert some[1]["captions"] == ["a dog asleep"] and some[1]["label"] == -1
  assert some.problems == {"missing_label": 1} and some[2]["skip"] == "missing_label"
  assert _train_captions(some, batches=2)[0] == {"a cat", "a dog asleep"}
  evaluated = sources.open_source(str(tmp_path / "some.csv"), labelled=True)
  assert evaluated.problems == {"missing_label": 2} and evaluated[0]["label"] == 0
  (tmp_path / "neither.csv").write_text("path,note\nimg/0.png,x\n")
  with pytest.raises(UserError, match=r"neither.csv: no caption or label column among \['path', 'note'\]"):
    sources.open_source(str(tmp_path / "neither.csv"))


def test_folders_of_captioned_images(tmp_path):
  root = tmp_path / "pairs"
  os.makedirs(root / "00001")  # img2dataset's 'files' output: numbered sub-folders
  for stem, caption in (("a", b"first"), ("00001/b", b"\xef\xbb\xbfsecond with a BOM")):
    (root / f"{stem}.jpg").write_bytes(_png_bytes(len(stem)))  # a PNG named .jpg decodes all the same
    (root / f"{stem}.txt").write_bytes(caption)
  (root / "c.png").write_bytes(_png_bytes(9))   # no caption: skipped, counted
  (root / "orphan.txt").write_text("no image")  # no image: a scan problem
  source = sources.open_source(str(root))       # was: "holds no class sub-folders" (FileNotFoundError)
  assert isinstance(source, captioned.CaptionFolderSource) and len(source) == 3
  assert source.problems == {"missing_caption": 1, "missing_image": 1}
  assert [source.record_key(i) for i in range(3)] == ["a.jpg", "c.png", os.path.join("00001", "b.jpg")]
  texts, counts = _train_captions(source)
  assert texts == {"first", "second with a BOM"} and set(counts["skipped"]) == {"missing_caption"}
  # Class folders with a stray note beside one image stay class folders (prepare.folder_layout's rule).
  for cls in ("cat", "dog"):
    for i in range(3):
      os.makedirs(tmp_path / "classes" / cls, exist_ok=True)
      (tmp_path / "classes" / cls / f"{i}.png").write_bytes(_png_bytes(i))
  (tmp_path / "classes" / "cat" / "0.txt").write_text("a note")
  assert isinstance(sources.open_source(str(tmp_path / "classes")), labelled.ImageFolderSource)
  os.makedirs(tmp_path / "uncaptioned")
  (tmp_path / "uncaptioned" / "x.png").write_bytes(_png_bytes(0))
  with pytest.raises(UserError, match="holds no captioned images among its 1 images"):
    sources.open_source(str(tmp_path / "uncaptioned"))


def test_evaluation_reads_labels_whatever_captions_the_data_also_has(tmp_path):
  # Review of session 25: training's caption reading reached evaluation, which needs labels. Class folders
  # with sidecar .txt beside every image became caption data without labels ("carries no class names");
  # labelled tars with img2dataset's .json metadata left a key without cls as label -1 instead of skipped.
  for cls in ("cat", "dog"):
    os.makedirs(tmp_path / "classes" / cls)
    for i in range(2):
      (tmp_path / "classes" / cls / f"{i}.png").write_bytes(_png_bytes(i))
      (tmp_path / "classes" / cls / f"{i}.txt").write_text(f"a {cls}")
  folder = str(tmp_path / "classes")
  assert isinstance(sources.open_source(folder), captioned.CaptionFolderSource)  # training: its captions
  labels = sources.open_source(folder, labelled=True)
  assert isinstance(labels, labelled.ImageFolderSource) and labels.class_names == ["cat", "dog"]
  assert [labels[i]["label"] for i in range(len(labels))] == [0, 0, 1, 1]

  meta = json.dumps({"caption": "metadata", "url": "x"}).encode()
  write_tar(tmp_path / "labelled.tar", [("a.png", _png_bytes(1)), ("a.cls", b"0"), ("a.json", meta),
                                   ("b.png", _png_bytes(2)), ("b.cls", b"1"), ("b.json", meta),
                                   ("c.png", _png_bytes(3)), ("c.json", meta)])
  for reading in (sources.open_source(str(tmp_path / "labelled.tar")),
                  sources.open_source(str(tmp_path / "labelled.tar"), labelled=True)):
    assert not reading.has_captions and reading.problems == {"missing_label": 1}
    assert [reading[i].get("label", reading[i].get("skip")) for i in range(3)] == [0, 1, "missing_label"]
  # Tars with .txt captions are caption data for training, labelled data for evaluation.
  write_tar(tmp_path / "both.tar", [("a.png", _png_bytes(1)), ("a.cls", b"0"), ("a.txt", b"a cat"),
                               ("c.png", _png_bytes(3)), ("c.txt", b"no label")])
  assert sources.open_source(str(tmp_path / "both.tar")).has_captions
  both = sources.open_source(str(tmp_path / "both.tar"), labelled=True)
  assert not both.has_captions and both.problems == {"missing_label": 1}
  # Unlabelled tars with json captions alone stay caption data.
  write_tar(tmp_path / "json_only.tar", [("a.png", _png_bytes(1)), ("a.json", meta)])
  assert sources.open_source(str(tmp_path / "json_only.tar")).has_captions

  # A label column that no row fills is no label column: the captions are the data.
  table = tmp_path / "blank_labels.csv"
  table.write_text("path,caption,label\nclasses/cat/0.png,a cat,\nclasses/dog/0.png,a dog,\n")
  assert isinstance(sources.open_source(str(table)), captioned.CaptionFileSource)


def test_a_tar_range_with_missing_shards_is_refused(tmp_path):
  # A re-check: '{00000..00009}.tar' with only 00000-00003 written trained on 4 of 10 shards without a word
  # (prepare refused the same range).
  for i in range(2):
    write_tar(tmp_path / f"{i:05d}.tar", [("a.png", _png_bytes(i)), ("a.txt", b"a caption")])
  assert len(sources.open_source(str(tmp_path / "{00000..00001}.tar"))) == 2
  with pytest.raises(UserError, match=r"3 of the 5 shards it names are missing \(e.g. .*00002.tar\)"):
    sources.open_source(str(tmp_path / "{00000..00004}.tar"))
  with pytest.raises(FileNotFoundError, match="1 of the 1 shards it names is missing"):
    sources.open_source(str(tmp_path / "nowhere.tar"))
  assert len(sources.open_source(str(tmp_path / "*.tar"))) == 2  # a glob takes what matches


def test_the_start_says_what_the_zero_shot_hook_evaluates_or_that_it_is_off():
  # A re-check: training on one's own captions reported the config's digits zero-shot (chance) unannounced,
  # and :runlocal (eval_every=0) dropped a configured zero-shot source without a word.
  class Named:
    name = "digits"
  assert trainer.zeroshot_line([], 100) is None
  assert trainer.zeroshot_line([Named()], 600) == (
      "Zero-shot evaluation of digits every 600 steps and at the last (--config.zeroshot_eval.source=NAME=DATA "
      "for your own labelled test images).")
  assert trainer.zeroshot_line([Named()], 0).startswith("Zero-shot evaluation is off (eval_every=0): digits")
  # A new user's own source got the hint to pass their own source all the same.
  assert trainer.zeroshot_line([Named()], 50, own_data_hint=False) == (
      "Zero-shot evaluation of digits every 50 steps and at the last.")
  users = lambda source: trainer.zeroshot_sources_are_users(_tiny_config(zeroshot_eval=dict(source=source)))  # noqa: E731
  assert not users("digits") and not users("digits,cifar10")
  assert users("shapes=/data/test") and users("/data/test") and users("digits,cifar10=/data/c10")


def test_the_start_line_the_closing_hint_and_the_hook_read_the_zero_shot_sources_alike():
  """One parser (zeroshot.zeroshot_sources) for the hook, the start line's 'your own data' hint and the closing
  evaluate hint. The start line called 'cifar10=' (the name alone) and cifar10=tfds:cifar10 the user's own
  data, where the hook and the closing hint read the known dataset (its names, prompts, TFDS data)."""
  cfg = lambda source: _tiny_config(zeroshot_eval=dict(enabled=True, source=source))  # noqa: E731
  for spec in ("cifar10", "cifar10=", "cifar10=cifar10", "cifar10=tfds:cifar10", "tfds:cifar10"):
    assert not trainer.zeroshot_sources_are_users(cfg(spec)), spec
    assert zeroshot.evaluate_tasks(cfg(spec)) == ["zeroshot:cifar10", "linear_probe:cifar10"], spec
  for spec in ("mycifar=cifar10", "cifar10=/d/c10/{split}", "/d/shapes"):
    assert trainer.zeroshot_sources_are_users(cfg(spec)), spec
    assert zeroshot.evaluate_tasks(cfg(spec))[0].startswith(f"zeroshot:{zeroshot.named_source(spec)[0]}="), spec
  parsed = zeroshot.zeroshot_sources(dict(source=[" cifar10=/d/c10/{split} ", " ", "digits"]))
  assert [(s.name, s.data, s.dataset.name, s.own_data, s.split) for s in parsed] == [
      ("cifar10", "/d/c10/{split}", "cifar10", True, "test"), ("digits", "digits", "digits", False, "test")]
  assert [(s.name, s.dataset.name) for s in zeroshot.zeroshot_sources({})] == [("digits", "digits")]
  assert zeroshot.zeroshot_sources(dict(source="/d/shapes"))[0].dataset is None


def test_a_known_name_reads_its_zero_shot_split_in_training_as_in_evaluate(tmp_path):
  """zeroshot_eval.source=food101=/d/{split} with configs/clip/digits.py read its 'test' split (the config's,
  meant for digits), where `clip_jax.evaluate --tasks zeroshot:food101=/d/{split}` reads 'validation'. A
  source reads its own split unless the config sets one, which then holds for every source."""
  from clip_jax import evaluate
  from clip_jax.eval.classnames import find_dataset
  from configs.clip import digits
  info = find_dataset("food101")
  assert info.test_split == "validation"
  for i, name in enumerate(info.class_names):
    os.makedirs(tmp_path / "validation" / name)
    (tmp_path / "validation" / name / "0.png").write_bytes(_png_bytes(i, (4, 4)))
  spec = f"food101={tmp_path}/{{split}}"
  cfg = digits.get_config()
  cfg.zeroshot_eval.source = spec
  [evaluator] = zeroshot.build_training_evaluators(cfg)
  assert evaluator.split == evaluate.parse_task(f"zeroshot:{spec}").test_split == "validation"
  assert len(evaluator.source) == len(info.class_names)
  cfg.zeroshot_eval.source = "digits,imagenet=/d/{split},imagenet,/d/mine/{split}"
  assert [s.split for s in zeroshot.zeroshot_sources(cfg.zeroshot_eval)] == ["test", "validation", "validation", "test"]
  cfg.zeroshot_eval.split = "train"  # one's own choice, for every source
  assert {s.split for s in zeroshot.zeroshot_sources(cfg.zeroshot_eval)} == {"train"}
  # A name of one's own for a known dataset (myin=imagenet) is that dataset under the name, in both: evaluate
  # read it as unknown data ('test' split, the TFDS label names, generic prompts).
  cfg.zeroshot_eval.split = ""
  for data in ("imagenet", "cifar10"):
    cfg.zeroshot_eval.source = f"mine={data}"
    [source] = zeroshot.zeroshot_sources(cfg.zeroshot_eval)
    task = evaluate.parse_task(f"zeroshot:mine={data}")
    assert (task.dataset, task.source, task.test_split) == (source.name, source.dataset.source, source.split)
    assert (task.class_names, task.templates) == (source.dataset.class_names, source.dataset.templates)
  assert evaluate.parse_task("linear_probe:mine=cifar10").train_split == "train"
  for refuse in (lambda: evaluate.parse_task("zeroshot:cifar10=cifar100"),
                 lambda: zeroshot.zeroshot_sources({"source": "cifar10=tfds:cifar100"})):
    with pytest.raises(ValueError, match=r"names two known datasets \(cifar10 and cifar100\)"):
      refuse()
  assert zeroshot.zeroshot_sources({"source": "cifar10=tfds:cifar10"})[0].dataset.name == "cifar10"  # the same one
  cfg.zeroshot_eval.enabled = True  # the trainer's closing evaluate hint names that probe too
  assert zeroshot.evaluate_tasks(cfg) == ["zeroshot:mine=cifar10", "linear_probe:mine=cifar10"]


def _tiny_config(zeroshot_eval=None, **overrides):
  c = runlocal(base_config())
  c.model.name = "ViT-Tiny"
  c.global_batch = 16
  c.total_steps = 4
  c.update_from_flattened_dict(overrides)  # dotted keys, e.g. {"data.source": PATH}
  if zeroshot_eval is not None:
    c.zeroshot_eval = ml_collections.ConfigDict(zeroshot_eval)
  return c


def test_a_known_name_for_ones_own_copy_gets_the_papers_names_and_prompts_in_training_as_in_evaluate(tmp_path, caplog):
  """zeroshot_eval.source=cifar10=/my/cifar10 used the folder's names and generic prompts in the trainer,
  the paper's 10 names and 18 prompts in `clip_jax.evaluate --tasks zeroshot:cifar10=...`: the same now."""
  from clip_jax import evaluate
  from clip_jax.eval.classnames import find_dataset
  info = find_dataset("cifar10")
  for i, name in enumerate(info.class_names):  # the paper's names as folders, one scan each
    os.makedirs(tmp_path / "mine" / name)
    (tmp_path / "mine" / name / "0.png").write_bytes(_png_bytes(i))
  spec = f"cifar10={tmp_path / 'mine'}"
  [evaluator] = zeroshot.build_training_evaluators(_tiny_config(zeroshot_eval=dict(enabled=True, source=spec,
                                                                                   batch_size=8)))
  task = evaluate.parse_task(f"zeroshot:{spec}")
  assert evaluator.name == task.dataset == "cifar10"
  assert evaluator.class_names == tuple(task.class_names) == tuple(info.class_names)
  assert evaluator.templates == tuple(task.templates) == tuple(info.templates) and len(info.templates) == 18
  labels = {evaluator.source.record_key(i).split("/")[0]: evaluator.source[i]["label"]
            for i in range(len(evaluator.source))}
  assert labels == {name: i for i, name in enumerate(info.class_names)}
  own = _tiny_config(zeroshot_eval=dict(enabled=True, source=spec, batch_size=8, templates=["a {}."]))
  assert zeroshot.build_training_evaluators(own)[0].templates == ("a {}.",)  # the config's own wins
  shutil.rmtree(tmp_path / "mine" / "truck")  # not cifar10's 10 folders: the line says why 10 names were used
  with pytest.raises(ValueError, match=r"'cifar10' names a known dataset, so its 10 class names were used: give"):
    zeroshot.build_training_evaluators(_tiny_config(zeroshot_eval=dict(enabled=True, source=spec)))
  with pytest.raises(ValueError) as missing:  # a path mistake is not blamed on the name
    zeroshot.build_training_evaluators(_tiny_config(zeroshot_eval=dict(enabled=True, source=f"cifar10={tmp_path}/gone")))
  assert "known dataset" not in str(missing.value)
  assert zeroshot.split_name("cifar10=") == ("cifar10", None) and evaluate.parse_task("zeroshot:cifar10=").dataset == "cifar10"
  # Folders named otherwise than the list take its names by position (ImageNet's wnid folders), said with the pairs.
  with caplog.at_level("WARNING"):
    assert labelled.names_for_folders(["car", "plane"], ["airplane", "automobile"], "two") == ["airplane", "automobile"]
  assert "2 of 2 class folders take a listed name by position (sorted folder order): car -> airplane, plane -> automobile" in caplog.text


def test_the_trainer_says_how_big_its_data_is_and_refuses_bad_data_in_one_line(tmp_path, capsys, caplog):
  (tmp_path / "img.png").write_bytes(_png_bytes(0))
  (tmp_path / "one.csv").write_text("filepath,title\nimg.png,a lone pair\n")
  cfg = _tiny_config(**{"data.source": str(tmp_path / "one.csv")})
  model = trainer.build_model(cfg)
  trainer.build_input(cfg, model)
  out = capsys.readouterr().out
  assert "Training data: 1 record (CaptionFileSource(" in out and "4 steps x 16 = 64 examples, 64 epochs." in out
  assert "holds 1 record, fewer than the global batch of 16: every batch repeats records" in caplog.text
  assert "Captions:" not in out  # a caption table's own
  for cls in ("circle", "square"):  # class folders train on their names in templates: said so
    os.makedirs(tmp_path / "classes" / cls)
    (tmp_path / "classes" / cls / "0.png").write_bytes(_png_bytes(0))
  trainer.build_input(_tiny_config(**{"data.source": str(tmp_path / "classes")}), model)
  assert "Captions: the class name in 5 templates, one drawn per example ('a photo of a {}.', " in capsys.readouterr().out
  assert trainer.describe_training_data(1000, 16, 125)[1] is None
  assert trainer.describe_training_data(1000, 16, 125)[0].endswith("2,000 examples, 2 epochs.")
  # Mistakes in the data are cli.UserErrors (one line, exit 2), not tracebacks.
  (tmp_path / "labels.csv").write_text("filepath,score\nimg.png,3\n")
  os.makedirs(tmp_path / "empty")
  for spec, message in ((tmp_path / "labels.csv", "no caption or label column"),
                        (tmp_path / "empty", "holds no captioned images"),
                        (tmp_path / "gone", "no such file")):
    with pytest.raises(UserError, match=message):
      trainer.build_input(_tiny_config(**{"data.source": str(spec)}), model)


def test_zeroshot_hook_names_paths_safely_and_takes_name_equals_data(tmp_path, monkeypatch):
  for cls in ("red_circle", "blue_square"):
    os.makedirs(tmp_path / "shapes" / cls)
    (tmp_path / "shapes" / cls / "0.png").write_bytes(_png_bytes(0))
  path = str(tmp_path / "shapes")
  assert zeroshot.named_source(path) == ("shapes", path)
  assert zeroshot.named_source(f"pets={path}") == ("pets", path)
  assert zeroshot.named_source("digits") == ("digits", "digits")
  # A relative path with '=' in its first folder (hive-style partitions) is a path when it exists and
  # its part after '=' does not; it was read as NAME 'year' with DATA '2024/...'.
  hive = tmp_path / "year=2024" / "shapes"
  shutil.copytree(path, hive)
  monkeypatch.chdir(tmp_path)
  assert zeroshot.named_source("year=2024/shapes") == ("shapes", "year=2024/shapes")
  assert zeroshot.named_source("pets=shapes") == ("pets", "shapes")
  from clip_jax import evaluate
  task = evaluate.parse_task("zeroshot:year=2024/shapes")  # evaluate's --tasks follow the same rule
  assert (task.dataset, task.source) == ("shapes", "year=2024/shapes")
  task = evaluate.parse_task(f"zeroshot:{tmp_path}/year=2024/shapes")  # an absolute path: always a path
  assert (task.dataset, task.source) == ("shapes", f"{tmp_path}/year=2024/shapes")
  assert evaluate.parse_task("retrieval:mine=caps.jsonl").source == "caps.jsonl"
  assert zeroshot.data_name("/data/wds/{00000..00003}.tar") == "wds"
  assert zeroshot.data_name("/data/shapes/{split}") == "shapes"
  assert zeroshot.data_name("tfds:foo/bar") == "foo_bar"
  # Two tables of one folder keep their own names (the pattern part is removed, not the whole component).
  assert [zeroshot.data_name(f"/d/eval/{n}_{{split}}.csv") for n in ("pets", "flowers")] == ["pets", "flowers"]
  cfg = _tiny_config(zeroshot_eval=dict(enabled=True, source=f"{path},toys={path}", batch_size=8))
  evaluators = zeroshot.build_training_evaluators(cfg, str(tmp_path / "wd"))
  assert [e.name for e in evaluators] == ["shapes", "toys"]  # was: the whole path, in keys and file names
  assert [e.confusion_png for e in evaluators] == [str(tmp_path / "wd" / "plots" / f"confusion_{n}.png")
                                                   for n in ("shapes", "toys")]
  assert evaluators[0].class_names == ("blue square", "red circle")
  # The closing hint names the configured zero-shot data, or leaves the tasks to the user.
  assert zeroshot.evaluate_tasks(cfg) == [f"zeroshot:shapes={path}", f"zeroshot:toys={path}"]
  assert zeroshot.evaluate_tasks(_tiny_config(zeroshot_eval=dict(enabled=True, source="digits"))) == [
      "zeroshot:digits", "linear_probe:digits"]
  assert "--tasks zeroshot:NAME=DATA for the full evaluation, DATA being" in trainer.evaluate_hint(_tiny_config(), "wd")
  assert trainer.evaluate_hint(cfg, "wd").endswith(
      f"--workdir wd --tasks zeroshot:shapes={path},zeroshot:toys={path} for the full evaluation")


@pytest.mark.slow
def test_the_trainer_trains_on_a_caption_csv_from_the_command_line(tmp_path):
  # One short run through the CLI: open_clip's CSV as it is, the data line and its warning, zero-shot
  # metrics under the folder's short name, and a closing hint that names that folder.
  os.makedirs(tmp_path / "img")
  rows = []
  for i in range(6):
    (tmp_path / "img" / f"{i}.png").write_bytes(_png_bytes(i, (32, 32)))
    rows.append(f"img/{i}.png,picture number {i}")
  (tmp_path / "train.csv").write_text("filepath,title\n" + "\n".join(rows) + "\n")
  for cls in ("a", "b"):
    os.makedirs(tmp_path / "zs" / cls)
    (tmp_path / "zs" / cls / "0.png").write_bytes(_png_bytes(7, (32, 32)))
  workdir = tmp_path / "wd"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=REPO)
  done = subprocess.run([sys.executable, "-m", "clip_jax.train", "--config=configs/clip/digits.py:runlocal",
                         f"--workdir={workdir}", f"--config.data.source={tmp_path / 'train.csv'}",
                         "--config.total_steps=2", "--config.eval_every=2", "--config.global_batch=8",
                         f"--config.zeroshot_eval.source={tmp_path / 'zs'}", "--config.progress_bar=False",
                         "--config.peak_flops_per_device=1e12", "--config.compilation_cache="],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "Training data: 6 records" in done.stdout and "2 steps x 8 = 16 examples, 2.67 epochs." in done.stdout
  assert "fewer than the global batch of 8" in done.stderr
  assert "zeroshot/zs/top1" in done.stdout and os.path.isfile(workdir / "plots" / "confusion_zs.png")
  assert f"--tasks zeroshot:zs={tmp_path / 'zs'}" in done.stdout and "linear_probe:digits" not in done.stdout
  settings = json.load(open(workdir / "results.json"))["settings"]
  assert settings["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}  # the mesh the run used
