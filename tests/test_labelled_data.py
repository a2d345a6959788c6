"""The user's own labelled images: class folders, path/label tables and webdataset tars as sources;
`prepare` converts the same layouts; what is wrong with the data is counted and reported, never a crash."""
import io
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

import clip_jax
from clip_jax import evaluate as cli
from clip_jax.data import labelled, prepare, sources
from tarfiles import write_tar


def _png(path, rng, size=(20, 30)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def _messy_folder(root, rng):
  """Two good classes; a corrupt .jpg, a non-image file, an empty class folder, and two files whose
  names differ only in extension (a name collision)."""
  for i in range(4):
    _png(root / "golden_retriever" / f"{i}.png", rng)
    _png(root / "tabby_cat" / f"{i}.png", rng)
  _png(root / "tabby_cat" / "3.jpeg", rng)                 # collides with 3.png: both kept
  (root / "golden_retriever" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
  (root / "golden_retriever" / "notes.txt").write_text("taken in May")
  os.makedirs(root / "zebra")                             # no image at all
  return root


def test_image_folder_source_counts_what_is_wrong(tmp_path, caplog):
  root = _messy_folder(tmp_path / "pets", np.random.default_rng(0))
  source = sources.open_source(str(root))
  assert isinstance(source, labelled.ImageFolderSource)
  assert source.class_names == ["golden retriever", "tabby cat", "zebra"]  # sorted folders, '_' read as ' '
  assert source.problems == {"empty_class_folder": 1, "name_collision": 2, "not_an_image": 1}
  assert source.problem_examples["name_collision"] == ["tabby_cat/3.*"]
  assert len(source) == 10  # 4 + corrupt + 4 + the collision's second file
  labels = [source[i]["label"] for i in range(len(source))]
  assert labels == [0] * 5 + [1] * 5
  assert source.record_key(0) == os.path.join("golden_retriever", "0.png")
  assert source[0]["captions"][0] == "a photo of a golden retriever."
  renamed = sources.open_source(str(root), class_names={"tabby_cat": "cat", "zebra": "golden retriever"})
  assert renamed.class_names == ["golden retriever", "cat", "golden retriever"]
  assert renamed.problems["class_name_collision"] == 1
  assert "the class names name 2 of 3 folders; the others keep their own names: golden_retriever" in caplog.text
  with pytest.raises(ValueError, match="3 class folders but 2 class names"):
    sources.open_source(str(root), class_names=["a", "b"])


def test_label_tables_take_indices_or_names(tmp_path):
  rng = np.random.default_rng(1)
  for name in ("a.png", "b.png", "c.png"):
    _png(tmp_path / "img" / name, rng)
  (tmp_path / "by_name.csv").write_text("filepath,class,note\nimg/a.png,dog,x\nimg/b.png,cat,y\n"
                                        "img/gone.png,cat,z\nimg/c.png,bird,w\n")
  source = sources.open_source(str(tmp_path / "by_name.csv"))
  assert source.class_names == ["bird", "cat", "dog"]
  assert [source[i].get("label") for i in (0, 1, 3)] == [2, 1, 0]
  assert source[2]["skip"] == "missing_file" and source.problems == {"missing_file": 1}
  (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in (
      {"image": "img/a.png", "label": 1}, {"image": "img/b.png", "label": "cat"}, {"image": "img/c.png", "label": 7},
      {"path": None})) + "\n")
  source = sources.open_source(str(tmp_path / "rows.jsonl"), class_names=["dog", "cat"])
  assert [source[i].get("label", source[i].get("skip")) for i in range(4)] == [1, 1, "unknown_label", "malformed_row"]
  # Without a label column a table is image-caption data (clip_jax.data.captioned), without either it is refused.
  (tmp_path / "nolabel.csv").write_text("path,caption\nimg/a.png,hi\n")
  assert sources.open_source(str(tmp_path / "nolabel.csv"))[0]["captions"] == ["hi"]
  (tmp_path / "neither.csv").write_text("path,note\nimg/a.png,hi\n")
  with pytest.raises(ValueError, match="no caption or label column"):
    sources.open_source(str(tmp_path / "neither.csv"))


def test_evaluation_and_prepare_read_the_same_columns_of_a_table(tmp_path):
  # Both take a column by one rule (labelled.find_column): of the candidates, the one most rows fill,
  # ties in the documented order. The CSV names a wrong 'image' column before the 'path' one, which
  # the evaluation's source used to take (the first in the file) while prepare took 'path'.
  rng = np.random.default_rng(4)
  for name in ("a.png", "b.png"):
    _png(tmp_path / "img" / name, rng)
  (tmp_path / "both.csv").write_text("image,path,label\nthumbs/a.png,img/a.png,0\nthumbs/b.png,img/b.png,1\n")
  (tmp_path / "mostly_image.jsonl").write_text("\n".join(json.dumps(r) for r in (
      {"image": "img/a.png", "label": 0}, {"image": "img/b.png", "label": 1}, {"path": "img/a.png", "label": 1})))
  # A candidate column that is there but empty is not the one (the header alone made it count).
  (tmp_path / "empty_path.csv").write_text("path,image,label\n,img/a.png,0\n ,img/b.png,1\n")
  for table, kept in (("both.csv", 2), ("mostly_image.jsonl", 2), ("empty_path.csv", 2)):
    source = sources.open_source(str(tmp_path / table), class_names=["zero", "one"])
    assert [source[i].get("label") for i in range(kept)] == [0, 1], table
    assert source.problems == ({"malformed_row": 1} if table.endswith("jsonl") else {}), (table, source.problems)
    report = prepare.convert([str(tmp_path / table)], str(tmp_path / f"out_{table}"), verbose=False,
                             caption_template="a {}")
    assert report["written"] == kept and report["skipped"] == source.problems, (table, report)


def test_tables_with_a_byte_order_mark_or_not_utf8_and_latin1_file_names(tmp_path):
  # Spreadsheets' "CSV UTF-8" starts with a byte-order mark: it was read into the first column's name
  # ('\ufeffpath': "no path column") and a JSONL's first row was malformed. A Latin-1 table is one
  # line for the evaluation and counted by prepare; Latin-1 file and folder names (old archives) crashed
  # prepare's records, its classnames.txt and the evaluation's predictions CSV.
  rng = np.random.default_rng(5)
  for name in ("a.png", "b.png"):
    _png(tmp_path / "img" / name, rng)
  (tmp_path / "bom.csv").write_text("path,label\nimg/a.png,chat\nimg/b.png,chien\n", encoding="utf-8-sig")
  (tmp_path / "bom.jsonl").write_text('{"path": "img/a.png", "label": "chat"}\n{"path": "img/b.png", "label": "chien"}\n',
                                      encoding="utf-8-sig")
  for table in ("bom.csv", "bom.jsonl"):
    source = sources.open_source(str(tmp_path / table))
    assert source.class_names == ["chat", "chien"] and [source[i]["label"] for i in range(2)] == [0, 1], table
    report = prepare.convert([str(tmp_path / table)], str(tmp_path / f"out_{table}"), caption_template="a {}",
                             verbose=False)
    assert report["written"] == 2 and report["skipped"] == {}, (table, report)

  (tmp_path / "latin1.csv").write_bytes(b"path,label\nimg/a.png,chat\nimg/b.png,caf\xe9\n")
  with pytest.raises(ValueError, match=r"latin1.csv: line 3 is not UTF-8 text \(byte 0xe9\)"):
    sources.open_source(str(tmp_path / "latin1.csv"))
  (tmp_path / "bom_latin1.csv").write_bytes(b"\xef\xbb\xbfpath,label\nimg/a.png,caf\xe9\n")  # offsets after the mark
  with pytest.raises(ValueError, match=r"bom_latin1.csv: line 2 is not UTF-8 text \(byte 0xe9\)"):
    sources.open_source(str(tmp_path / "bom_latin1.csv"))
  from clip_jax.data.records import with_escaped_bytes
  assert with_escaped_bytes("caf\udce9") == "caf\\xe9" and with_escaped_bytes("half \ud83d") == "half \\ud83d"
  report = prepare.convert([str(tmp_path / "latin1.csv")], str(tmp_path / "out_latin1"), caption_template="a {}",
                           verbose=False)  # the class is kept (its name as folder names are), not dropped
  assert report["written"] == 2 and report["skipped"] == {}
  assert sources.open_source(str(tmp_path / "out_latin1")).class_names == ["caf\\xe9", "chat"]

  tree = os.fsencode(tmp_path / "tree")
  for folder, name in ((b"caf\xe9", b"x\xe9.png"), (b"chien", b"b.png")):
    os.makedirs(os.path.join(tree, folder))
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(os.path.join(tree, folder, name), "PNG")
  report = prepare.convert([os.fsdecode(tree)], str(tmp_path / "out_tree"), caption_template="a {}", verbose=False)
  assert report["written"] == 2 and report["num_classes"] == 2
  shards = sources.open_source(str(tmp_path / "out_tree"))
  assert shards.class_names == ["caf\\xe9", "chien"]
  assert sorted((r["key"], r["captions"][0]) for r in (shards[0], shards[1])) == [
      ("caf\\xe9/x\\xe9.png", "a caf\\xe9"), ("chien/b.png", "a chien")]
  folder = sources.open_source(os.fsdecode(tree))
  assert folder.class_names == ["caf\\xe9", "chien"] and folder.record_key(0) == "caf\\xe9/x\\xe9.png"
  rows = cli.write_predictions(str(tmp_path / "predictions.csv"), [0, 1], [0, 1], [1, 1], folder, folder.class_names)
  assert open(rows, encoding="utf-8").read().splitlines()[1] == "0,caf\\xe9/x\\xe9.png,0,1,caf\\xe9,chien"


def test_class_names_listed_in_another_order_keep_each_class_its_own(tmp_path, caplog):
  # A new user passed zero..nine for folders sorted eight, five, four, ...: read by position every
  # image got another digit's name (8.9% zero-shot, silently). A list that is the folders' (or the
  # tars' classnames.txt) own names in another order is matched by name, and says so.
  rng = np.random.default_rng(6)
  for folder in ("golden_retriever", "tabby_cat", "zebra"):
    _png(tmp_path / "pets" / folder / "0.png", rng)
  for given in (["zebra", "golden retriever", "tabby cat"], ["tabby_cat", "zebra", "golden_retriever"]):
    source = sources.open_source(str(tmp_path / "pets"), class_names=given)
    assert source.class_names == sorted(given), given
  assert "in another order" in caplog.text
  renamed = ["dog", "cat", "horse"]  # other names: by position, as documented
  assert sources.open_source(str(tmp_path / "pets"), class_names=renamed).class_names == renamed
  # The zero-shot classifier's prompts follow the source's label order (the first fix stopped at the
  # source: the evaluator kept the given list's order, 8.9% on the new user's digits).
  from clip_jax.eval.zeroshot import ZeroShotEvaluator
  from clip_jax.tokenizer import get_tokenizer
  for given, expected in ((["zebra", "golden retriever", "tabby cat"], ("golden retriever", "tabby cat", "zebra")),
                          (renamed, tuple(renamed))):
    evaluator = ZeroShotEvaluator(str(tmp_path / "pets"), get_tokenizer("clip", context_length=16), given,
                                  image_size=8)
    assert evaluator.class_names == expected, given

  os.makedirs(tmp_path / "wds")
  write_tar(tmp_path / "wds" / "0.tar", [("s0.png", _png_bytes(rng)), ("s0.cls", b"1")])
  (tmp_path / "wds" / "classnames.txt").write_text("one\nzero\n")
  tars = sources.open_source(str(tmp_path / "wds" / "0.tar"), class_names=["zero", "one"])
  assert tars.class_names == ["one", "zero"] and tars[0]["label"] == 1


def test_a_file_that_is_no_data_source_is_one_line(tmp_path):
  # A templates file passed as DATA reached grain: "ArrayRecord file should be at least 64KB big" (traceback).
  from clip_jax.cli import MissingPathError, UserError
  (tmp_path / "templates.txt").write_text("a photo of a {}.\n")
  with pytest.raises(UserError, match=r"templates.txt: not ArrayRecord shards \(RuntimeError: .*\). Pass a folder of class"):
    sources.open_source(str(tmp_path / "templates.txt"))
  with pytest.raises(MissingPathError, match=r"no such file, directory or matching shards. Pass a folder of class"):
    sources.open_source(str(tmp_path / "no_folder"))


def _png_bytes(rng):
  buffer = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


def test_webdataset_tars_with_cls_and_classnames_file(tmp_path):
  rng = np.random.default_rng(2)
  os.makedirs(tmp_path / "wds" / "test")
  images = [_png_bytes(rng) for _ in range(4)]
  write_tar(tmp_path / "wds" / "test" / "0.tar", [("s0.png", images[0]), ("s0.cls", b"1"), ("s1.png", images[1]),
                                              ("s1.cls", b"0\n"), ("s2.cls", b"1")])
  write_tar(tmp_path / "wds" / "test" / "1.tar", [("s3.png", images[2]), ("s3.cls", b"5"), ("s4.webp", b"RIFF"),
                                              ("s5.png", images[3])])
  (tmp_path / "wds" / "classnames.txt").write_text("cat\ndog\n")  # clip_benchmark's layout: one folder up
  source = sources.open_source(str(tmp_path / "wds" / "{split}"), "test")
  assert isinstance(source, labelled.WebDatasetSource) and source.class_names == ["cat", "dog"]
  assert source[0]["image"] == images[0] and source[0]["label"] == 1 and source[1]["label"] == 0
  reasons = [source[i].get("skip") for i in range(len(source))]
  assert reasons == [None, None, "missing_image", "unknown_label", "missing_label", "missing_label"]
  assert source.problems == {"missing_image": 1, "missing_label": 2, "unknown_label": 1}
  assert len(sources.open_source(str(tmp_path / "wds" / "test" / "{0..1}.tar"))) == 6


def test_prepare_converts_class_folders_tables_and_tars(tmp_path, capsys):
  rng = np.random.default_rng(3)
  root = _messy_folder(tmp_path / "pets", rng)
  report = prepare.convert([str(root)], str(tmp_path / "shards"), caption_template="a photo of a {}.", verbose=False)
  assert report["written"] == 9 and report["num_classes"] == 3
  assert report["skipped"] == {"corrupt_image": 1, "empty_class_folder": 1, "not_an_image": 1}
  assert report["notes"] == {"name_collision": 2}
  shards = sources.open_source(str(tmp_path / "shards"))
  assert shards.class_names == ["golden retriever", "tabby cat", "zebra"]  # from OUTPUT/classnames.txt
  records = [shards[i] for i in range(len(shards))]
  assert sorted(r["label"] for r in records) == [0] * 4 + [1] * 5
  assert {r["captions"][0] for r in records} == {"a photo of a golden retriever.", "a photo of a tabby cat."}

  (tmp_path / "rows.csv").write_text("path,label,caption\npets/tabby_cat/0.png,tabby,\n"
                                     "pets/tabby_cat/1.png,1,a cat on a mat\npets/zebra.png,tabby,\n")
  (tmp_path / "names.txt").write_text("dog\ntabby\n")
  report = prepare.convert([str(tmp_path / "rows.csv")], str(tmp_path / "table"), classnames_file=str(tmp_path / "names.txt"),
                           caption_template="a {} photo", verbose=False)
  assert report["written"] == 2 and report["skipped"] == {"missing_file": 1}
  table = sources.open_source(str(tmp_path / "table"))
  assert sorted((r["label"], r["captions"][0]) for r in (table[0], table[1])) == [(1, "a cat on a mat"), (1, "a tabby photo")]

  os.makedirs(tmp_path / "tars")
  write_tar(tmp_path / "tars" / "0.tar", [("k0.png", _png_bytes(rng)), ("k0.cls", b"1"), ("k1.png", _png_bytes(rng)),
                                     ("k1.txt", b"its own caption"), ("k1.cls", b"0")])
  (tmp_path / "tars" / "classnames.txt").write_text("cat\ndog\n")
  report = prepare.convert([str(tmp_path / "tars" / "0.tar")], str(tmp_path / "from_tar"), verbose=False)
  records = [sources.open_source(str(tmp_path / "from_tar"))[i] for i in range(2)]
  assert report["written"] == 2 and [(r["label"], r["captions"][0]) for r in records] == [(1, "dog"), (0, "its own caption")]
  assert prepare.main(["--input", str(root), "--output", str(tmp_path / "bad"), "--caption-template", "no slot"]) == 2
  assert "needs exactly one '{}'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  model = clip_jax.create_model("ViT-Tiny")
  return clip_jax.export_hf(model, clip_jax.init_variables(model, jax.random.key(0)),
                            str(tmp_path_factory.mktemp("tiny_hf")))


def test_cli_on_a_messy_folder_counts_and_reports(tiny_checkpoint, tmp_path, capsys):
  rng = np.random.default_rng(4)
  for split in ("train", "test"):
    _messy_folder(tmp_path / "pets" / split, rng)
  _png(tmp_path / "pets" / "train" / "tabby_cat" / "only_in_train.png", rng)
  out = tmp_path / "eval"
  rc = cli.main(["--checkpoint", tiny_checkpoint, "--tasks", f"zeroshot:mine={tmp_path / 'pets' / 'test'},"
                 f"linear_probe:mine={tmp_path / 'pets' / '{split}'}", "--batch-size", "8", "--out", str(out)])
  assert rc == 0
  report = json.loads((out / "results.json").read_text())
  zeroshot, probe = report["results"]
  assert zeroshot["num_examples"] == 9 and zeroshot["num_skipped"] == 1 and zeroshot["num_classes"] == 3
  assert zeroshot["data"]["test"]["skipped"] == {"corrupt_image": 1}
  assert zeroshot["data"]["test"]["problems"] == {"empty_class_folder": 1, "name_collision": 2, "not_an_image": 1}
  assert probe["num_train"] == 10 and probe["num_examples"] == 9
  assert probe["data"]["train"]["skipped"] == {"corrupt_image": 1}
  predictions = (out / "predictions" / "zeroshot_mine.csv").read_text().splitlines()
  assert predictions[0] == "index,key,label,prediction,label_name,prediction_name" and len(predictions) == 10
  assert "broken" not in "".join(predictions)
  table = (out / "results.md").read_text()
  assert "Data problems" in table and "skipped corrupt_image 1" in table and "empty_class_folder 1" in table
  err = capsys.readouterr().err
  assert "zeroshot:mine test data: empty_class_folder 1, name_collision 2, not_an_image 1, skipped corrupt_image 1" in err


@pytest.mark.parametrize("args, message", [
    (["--tasks", "linear_probe:mine=/data/mine"], "needs a training and a test split"),
    (["--tasks", "zeroshot:cifar10", "--templates", "/no/such/file.txt"], "--templates /no/such/file.txt: no such"),
    (["--tasks", "zeroshot:nope"], "NAME=PATH for your own data"),
])
def test_cli_user_data_errors_are_one_line(args, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["--checkpoint", "unused", *args])
  assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cli_act_on_a_directory_and_unknown_model_name(tiny_checkpoint, tmp_path, capsys):
  folder = tmp_path / "data"
  _png(folder / "a" / "0.png", np.random.default_rng(5))
  assert cli.main(["--checkpoint", tiny_checkpoint, "--act", "gelu", "--tasks", f"zeroshot:d={folder}"]) == 2
  assert "--act applies to bare state-dict files" in capsys.readouterr().err
  (tmp_path / "model.pt").write_bytes(b"")
  assert cli.main(["--checkpoint", str(tmp_path / "model.pt"), "--model-name", "ViT-Q-99",
                   "--tasks", f"zeroshot:d={folder}"]) == 2
  assert "--model-name 'ViT-Q-99' is not a named architecture" in capsys.readouterr().err


@pytest.mark.slow  # five image/text passes: ~30-160 s on the shared 2-core box
def test_prompt_ablation_equals_the_zero_shot_evaluator(tiny_checkpoint, tmp_path):
  """Each prompt set's numbers equal a ZeroShotEvaluator run with those templates alone."""
  from clip_jax.data.digits import CLASS_NAMES
  from clip_jax.eval import prompt_ablation, zeroshot
  from clip_jax.sharding import create_mesh
  from clip_jax.tokenizer import get_tokenizer
  sweep = tmp_path / "sweep.py"
  sweep.write_text('DATASET = "digits"\nREFERENCE = "both"\n'
                   'def get_prompt_sets():\n  return {"name": ("{}",), "both": ("{}", "a photo of a {}.")}\n')
  out = prompt_ablation.run(str(sweep), [tiny_checkpoint], str(tmp_path / "out"), batch_size=16, limit=40)
  rows = {r["prompt_set"]: r for r in out["rows"]}
  model, variables = clip_jax.load_checkpoint(tiny_checkpoint)
  tokenizer = get_tokenizer("clip", context_length=model.config.text.context_length)
  for name, templates in (("name", ("{}",)), ("both", ("{}", "a photo of a {}."))):
    evaluator = zeroshot.ZeroShotEvaluator("digits", tokenizer, CLASS_NAMES, templates, batch_size=16, image_size=32,
                                           limit=40)
    metrics = evaluator.evaluate(model, variables, create_mesh({"data": -1}))
    assert rows[name]["top1"] == pytest.approx(metrics["top1"]) and rows[name]["num_templates"] == len(templates)
  assert rows["both"]["delta_top1"] == 0 and rows["both"]["delta_ci95"] == [0, 0]
  low, high = rows["name"]["delta_ci95"]
  assert low <= rows["name"]["delta_top1"] <= high
  for suffix in ("md", "csv", "json", "png"):
    assert (tmp_path / "out" / f"prompt_ablation.{suffix}").stat().st_size > 100
  better, worse = np.ones(50, bool), np.r_[np.ones(40, bool), np.zeros(10, bool)]
  assert prompt_ablation.paired_bootstrap(better, worse)[0] > 0 and prompt_ablation.paired_bootstrap(worse, worse) == (0, 0)


def test_prompt_ablation_takes_a_tokenizer_for_every_workdir(monkeypatch, tmp_path):
  # The line for a workdir whose recorded tokenizer folder is gone says "pass --tokenizer DIR": the
  # ablation had no such flag.
  from clip_jax.eval import prompt_ablation
  calls = []
  monkeypatch.setattr(prompt_ablation, "run", lambda *args, **kwargs: calls.append((args, kwargs)))
  assert prompt_ablation.main(["sweep.py", "--workdir", "a", "b", "--out", str(tmp_path), "--tokenizer", "clip"]) == 0
  assert calls[0][0] == ("sweep.py", ["a", "b"], str(tmp_path)) and calls[0][1]["tokenizer"] == "clip"
