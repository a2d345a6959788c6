"""Evaluation: zero-shot, retrieval and linear probes equal plain numpy on the same embeddings;
sharded passes count every example once; the CLI runs every task on TFDS mock data."""
import json
import os
import re

import jax
import numpy as np
import pytest
from PIL import Image

import clip_jax
from clip_jax import evaluate as cli
from clip_jax.data import DIGIT_CLASS_NAMES, DIGIT_ZEROSHOT_TEMPLATES, labelled
from clip_jax.eval import classnames, embed, linear_probe, paper_results, report, retrieval, zeroshot
from clip_jax.sharding import create_mesh
from clip_jax.tokenizer import get_tokenizer

tfds = pytest.importorskip("tensorflow_datasets")


def _jit_apply(model):
  """`model.apply` as one compiled program (eager apply compiles every op on its own)."""
  return jax.jit(model.apply, static_argnames="method")


class ClipJaxTestCaptions(tfds.core.GeneratorBasedBuilder):
  """An image-caption dataset in COCO's layout (captions/text), for mock data only."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "captions": tfds.features.Sequence({"text": tfds.features.Text()})}))

  def _split_generators(self, dl_manager):
    return {"test": self._generate_examples()}

  def _generate_examples(self):
    yield 0, {}


@pytest.fixture(scope="module")
def tiny():
  model = clip_jax.create_model("ViT-Tiny")
  return model, clip_jax.init_variables(model, jax.random.key(0))


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8
  return create_mesh({"data": -1})


# ----------------------------------------------------------------------------- data
def _norm(name: str) -> str:
  name = re.sub(r"^/[a-z]/", "", name.lower()).replace("/", " ").replace("_", " ").replace("-", " ")
  return " ".join(name.split())


# CLIP's own wording where it renamed a class; everything else must match TFDS's name.
_RENAMED = {
    "caltech101": {"airplanes": "airplane", "background_google": "background", "car_side": "side of a car",
                   "cougar_body": "body of a cougar cat", "cougar_face": "face of a cougar cat",
                   "crocodile_head": "head of a crocodile", "faces": "off-center face",
                   "faces_easy": "centered face", "flamingo_head": "head of a flamingo", "leopards": "leopard",
                   "motorbikes": "motorbike", "snoopy": "snoopy (cartoon beagle)", "yin_yang": "yin and yang symbol"},
    "eurosat": {"AnnualCrop": "annual crop land", "HerbaceousVegetation": "brushland or shrubland",
                "Highway": "highway or road", "Industrial": "industrial buildings or commercial buildings",
                "Pasture": "pasture land", "PermanentCrop": "permanent crop land",
                "Residential": "residential buildings or homes or apartments", "SeaLake": "lake or sea"},
    "oxford_flowers102": {"pink-yellow dahlia?": "pink and yellow dahlia", "ball moss": "air plant"},
}


def test_class_names_follow_tfds_label_order():
  checked = 0
  for info in classnames.DATASETS.values():
    if not (info.source or "").startswith("tfds:"):
      continue
    tfds_names = tfds.builder(info.source[len("tfds:"):]).info.features["label"].names
    assert len(tfds_names) == len(info.class_names), info.name
    if tfds_names[0] in ("0", "n01440764"):  # digits or WordNet ids: nothing to compare
      continue
    renamed = _RENAMED.get(info.name, {})
    for tfds_name, ours in zip(tfds_names, info.class_names):
      assert renamed.get(tfds_name, _norm(tfds_name)) == (ours if tfds_name in renamed else _norm(ours)), \
          (info.name, tfds_name, ours)
    checked += 1
  assert checked == 9
  assert len(classnames.DATASETS["imagenet"].templates) == 80
  assert len(classnames.DATASETS["imagenet"].class_names) == 1000  # "crane" and "maillot" twice, as in CLIP
  assert classnames.find_dataset("tfds:cifar10").name == "cifar10"
  assert classnames.find_dataset("pets").name == "oxford_iiit_pet"
  assert classnames.find_dataset("nope") is None


def test_paper_numbers_are_data_with_their_table():
  number = paper_results.paper_number("zeroshot", "ViT-B-32-quickgelu", "imagenet", "top1")
  assert (number.value, number.source, number.model) == (63.2, "Table 11", "ViT-B/32")
  assert paper_results.paper_number("zeroshot", "ViT-L-14-336", "imagenet", "top1").value == 76.2
  assert paper_results.paper_model("ViT-L/14@336px") == "ViT-L/14@336px"
  assert paper_results.paper_model("RN50x4") == "RN50x4"
  assert paper_results.paper_model("ViT-Tiny") is None
  assert paper_results.paper_number("zeroshot", "ViT-Tiny", "cifar10", "top1") is None
  assert paper_results.paper_number("retrieval", "ViT-L-14-336", "coco_captions", "image_to_text/R@1").value == 58.4
  assert paper_results.paper_number("linear_probe", "ViT-L-14-336", "imagenet", "top1").source == "Table 10"
  for (task, model, dataset, _), number in paper_results.PAPER_RESULTS.items():
    assert model in paper_results.PAPER_MODELS and 0 < number.value <= 100
  # Numbers added from the reference CSV (checked against the PDF), each with its table.
  cells = {("zeroshot", "ViT-L-14-336", "birdsnap", "top1"): (49.5, "Table 11"),
           ("zeroshot", "ViT-L-14-336", "oxford_iiit_pet", "mean_per_class"): (93.5, "Table 11"),
           ("zeroshot", "RN50", "eurosat", "top1"): (41.1, "Table 11"),
           ("linear_probe", "ViT-L-14", "cifar100", "top1"): (87.5, "Table 10"),
           ("linear_probe", "RN50x64", "fgvc_aircraft", "mean_per_class"): (67.7, "Table 10"),
           ("zeroshot", "ViT-L-14-336", "imagenet_sketch", "top1"): (60.2, "Table 16"),
           ("zeroshot", "ViT-L-14-336", "svhn", "top1"): (51.0, "Table 14"),
           ("zeroshot", "ViT-L-14-336", "imagenet", "top1"): (76.2, "Table 11")}  # also Table 16: first cited
  for (task, model, dataset, metric), (value, source) in cells.items():
    number = paper_results.paper_number(task, model, dataset, metric)
    assert (number.value, number.source) == (value, source), (task, model, dataset, metric)


def test_packaged_paper_numbers_hold_every_reference_row():
  """clip_jax/assets/paper_numbers.csv = the shared reference CSV + the numbers once typed into the
  code (CLIP Tables 10, 11, 13, Sec. 3.1.3; DreamBooth Tables 1, 3), no cell given two values."""
  rows = paper_results.paper_rows()
  cells = {}
  for row in rows:
    key = (row.paper, row.dataset, row.model, row.metric)
    assert cells.setdefault(key, row.value) == row.value, key
  assert {r.paper for r in rows} == {"CLIP", "DreamBooth"} and {r.table for r in rows} >= {"1", "3", "4", "10", "11",
                                                                                          "13", "14", "16"}
  reference = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference", "paper_numbers.csv")
  if not os.path.isfile(reference):
    pytest.skip("the shared reference CSV is not beside this checkout")
  import csv
  with open(reference, newline="") as f:
    for record in csv.DictReader(f):
      key = (record["paper"], record["dataset"], record["model"], record["metric"])
      assert cells[key] == float(record["value"]), key
      assert any(r.table == record["table"] for r in rows if (r.paper, r.dataset, r.model, r.metric) == key), key


# ----------------------------------------------------------------------------- metrics vs numpy
def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_zeroshot_metrics_equal_numpy():
  rng = np.random.default_rng(0)
  num_classes, num_templates, n, d = 7, 3, 300, 16
  prompt_emb = _unit(rng.normal(size=(num_classes * num_templates, d))).astype(np.float32)
  classifier = zeroshot.ensemble_classifier(prompt_emb, num_classes)
  naive = np.stack([_unit(prompt_emb[c * num_templates:(c + 1) * num_templates].mean(0)) for c in range(num_classes)])
  np.testing.assert_allclose(classifier, naive, atol=1e-6)
  labels = rng.integers(0, num_classes, n)
  image_emb = _unit(classifier[labels] + rng.normal(size=(n, d)) * 0.4).astype(np.float32)
  metrics, predictions = zeroshot.classify(image_emb, classifier, labels)
  scores = image_emb @ classifier.T
  order = np.argsort(-scores, axis=1)
  assert metrics["top1"] == pytest.approx(100 * np.mean(order[:, 0] == labels))
  assert metrics["top5"] == pytest.approx(100 * np.mean([labels[i] in order[i, :5] for i in range(n)]))
  per_class = [np.mean(order[labels == c, 0] == c) for c in range(num_classes)]
  assert metrics["mean_per_class"] == pytest.approx(100 * np.mean(per_class))
  assert 20 < metrics["top1"] < 100
  matrix = zeroshot.confusion_matrix(labels, predictions, num_classes)
  assert matrix.sum() == n and np.trace(matrix) == np.sum(predictions == labels)
  assert matrix[labels[0], predictions[0]] == np.sum((labels == labels[0]) & (predictions == predictions[0]))


def test_percentages_of_whole_counts_are_the_correctly_rounded_decimals():
  # 7 of 50 right is 14.0 in results.json and the tables, not 100 * mean = 14.000000000000002.
  labels = np.zeros(50, np.int64)
  predictions = np.where(np.arange(50) < 7, 0, 1)
  classifier = np.eye(2, dtype=np.float32)
  image_emb = classifier[predictions]
  metrics, _ = zeroshot.classify(image_emb, classifier, labels, top_k=(1,))
  assert repr(metrics["top1"]) == "14.0" and repr(metrics["mean_per_class"]) == "14.0"
  assert repr(linear_probe._score(labels, predictions, "top1")) == "14.0"
  assert zeroshot.percent(np.array([0.5, 0.25, 1.0, 0.0])) == 43.75  # retrieval's tie expectations
  assert np.isnan(zeroshot.percent(np.array([], bool)))  # nothing scored: NaN, not 0%
  assert np.isnan(zeroshot.mean_per_class_accuracy(np.array([], np.int64), np.array([], np.int64)))
  image_emb = np.eye(50, dtype=np.float32)
  shifted = np.concatenate([np.arange(7), 7 + (np.arange(7, 50) - 6) % 43])  # texts 7.. name the next image
  text_emb = image_emb[shifted]
  found = retrieval.retrieval_metrics(image_emb, text_emb, np.arange(50))
  assert repr(found["image_to_text/R@1"]) == repr(found["text_to_image/R@1"]) == "14.0"


def test_retrieval_metrics_equal_numpy():
  rng = np.random.default_rng(1)
  n, d = 40, 12
  image_emb = _unit(rng.normal(size=(n, d))).astype(np.float32)
  text_image = np.repeat(np.arange(n), rng.integers(1, 6, n))  # 1-5 captions per image
  text_emb = _unit(image_emb[text_image] + rng.normal(size=(len(text_image), d))).astype(np.float32)
  metrics = retrieval.retrieval_metrics(image_emb, text_emb, text_image, chunk=7)
  scores = image_emb @ text_emb.T  # [n, m]
  for k in (1, 5, 10):
    i2t = [np.any(text_image[np.argsort(-scores[i])[:k]] == i) for i in range(n)]
    t2i = [text_image[j] in np.argsort(-scores[:, j])[:k] for j in range(len(text_image))]
    assert metrics[f"image_to_text/R@{k}"] == pytest.approx(100 * np.mean(i2t))
    assert metrics[f"text_to_image/R@{k}"] == pytest.approx(100 * np.mean(t2i))
  assert 0 < metrics["text_to_image/R@1"] < metrics["text_to_image/R@10"] < 100


# ----------------------------------------------------------------------------- sharded passes
@pytest.mark.slow  # 7-9 s; the sharded text pass below stays in the fast subset
def test_sharded_zeroshot_counts_every_example_once(tiny, mesh, tmp_path):
  model, variables = tiny
  tokenizer = get_tokenizer("clip", context_length=model.config.text.context_length)
  evaluator = zeroshot.ZeroShotEvaluator("digits", tokenizer, DIGIT_CLASS_NAMES, DIGIT_ZEROSHOT_TEMPLATES,
                                         batch_size=20, image_size=32)
  num = len(evaluator.source)
  assert num == 359 and embed.global_batch_size(20, mesh) == 24 and num % 24  # a padded last batch
  out = evaluator(model, variables, mesh)
  assert set(out) == {"zeroshot/digits/top1", "zeroshot/digits/top5", "zeroshot/digits/mean_per_class"}
  features = evaluator.last_features
  np.testing.assert_array_equal(features.indices, np.arange(num))
  np.testing.assert_array_equal(features.labels, clip_jax.data.heldout_labels())

  # The same images through an unsharded forward pass, batch by batch.
  encode = jax.jit(lambda v, x: clip_jax.l2_normalize(model.apply(v, x, method="encode_image")))
  reference = np.zeros((num, model.config.embed_dim), np.float32)
  seen = np.zeros(num, int)
  for batch in evaluator.batches(mesh):
    rows = batch["index"][batch["mask"]]
    reference[rows] = np.asarray(encode(variables, batch["image"]))[batch["mask"]]
    seen[rows] += 1
  np.testing.assert_array_equal(seen, 1)
  np.testing.assert_allclose(features.features, reference, atol=2e-5)

  prompts = tokenizer(zeroshot.prompt_texts(DIGIT_CLASS_NAMES, DIGIT_ZEROSHOT_TEMPLATES))
  text_emb = np.asarray(clip_jax.l2_normalize(_jit_apply(model)(variables, prompts, method="encode_text")))
  naive_classifier = np.stack([_unit(e.mean(0)) for e in text_emb.reshape(10, 3, -1)])
  np.testing.assert_allclose(evaluator.last_classifier, naive_classifier, atol=2e-5)

  # The reported numbers are plain numpy on these embeddings.
  predictions = np.argmax(features.features @ evaluator.last_classifier.T, axis=1)
  assert out["zeroshot/digits/top1"] == pytest.approx(100 * np.mean(predictions == features.labels))
  assert evaluator(model, variables, mesh) == out and len(evaluator._batches) == 1  # reused
  assert os.path.getsize(evaluator.save_confusion_png(str(tmp_path / "confusion.png"))) > 1000


def test_pre_projection_features_are_the_pooled_vit_output(tiny, mesh):
  model, variables = tiny
  source = embed.Subset(clip_jax.data.open_source("digits", "test", image_size=32), 10)
  batches = embed.image_batches(source, batch_size=8, image_size=32, mesh=mesh)
  on_one_device = jax.device_put(variables, jax.devices()[0])  # as checkpoint loaders return them
  features = embed.embed_images(model, on_one_device, batches, len(source), mesh, features="pre_projection")
  assert features.features.shape == (10, model.config.vision.width)
  first = next(iter(batches))
  images = first["image"][first["mask"]]  # [8, 32, 32, 3]
  projected = np.asarray(_jit_apply(model)(variables, images, method="encode_image"))
  proj = np.asarray(variables["params"]["visual"]["proj"])
  np.testing.assert_allclose(features.features[:8] @ proj, projected, atol=2e-4)


def test_text_pass_on_a_mesh_with_a_tensor_axis(tiny):
  model, variables = tiny
  mesh = create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  tokens = get_tokenizer("clip", context_length=32)([f"a photo of {i} things." for i in range(13)])
  sharded = embed.embed_texts(model, variables, tokens, batch_size=3, mesh=mesh)  # 4 shards: batches of 4
  direct = np.asarray(clip_jax.l2_normalize(_jit_apply(model)(variables, tokens, method="encode_text")))
  np.testing.assert_allclose(sharded, direct, atol=2e-5)


# ----------------------------------------------------------------------------- linear probe
def test_linear_probe_matches_test_classes_to_training_classes_by_name(tmp_path):
  # A new user's folder tree: test/ lacks 'eight' (sorted first), or holds an extra empty folder; each
  # split numbers its own folders, so every label shifted and the probe scored 0% / 11%, silently.
  from PIL import Image
  from clip_jax.data import sources
  names = ["eight", "five", "one"]
  for split, folders in (("train", names), ("test", names[1:] + ["zz_empty"])):
    for folder in folders:
      os.makedirs(tmp_path / split / folder)
      if folder != "zz_empty":
        Image.new("RGB", (4, 4)).save(tmp_path / split / folder / "0.png")
  train, test = (sources.open_source(str(tmp_path / "{split}"), split) for split in ("train", "test"))
  assert test.class_names == ["five", "one", "zz empty"]
  test_labels = np.array([test[i]["label"] for i in range(len(test))])
  assert list(test_labels) == [0, 1]
  assert list(linear_probe.labels_in_train_classes(test_labels, test.class_names, train.class_names)) == [1, 2]
  assert linear_probe.labels_in_train_classes(test_labels, None, train.class_names) is test_labels
  with pytest.raises(ValueError, match=r"test classes with no training class: 'six' \(2 images\)"):
    linear_probe.labels_in_train_classes(np.array([0, 3, 3]), ["five", "one", "x", "six"], train.class_names)


def test_a_record_the_scan_found_wrong_is_named_once_in_the_data_problems():
  from clip_jax.eval import report
  result = {"task": "zeroshot", "dataset": "mine", "data": {"test": {
      "problems": {"missing_file": 1, "not_an_image": 2}, "skipped": {"missing_file": 1, "corrupt_image": 3}}}}
  assert report.data_problem_lines(result) == [
      "zeroshot:mine test data: not_an_image 2, skipped corrupt_image 3, skipped missing_file 1"]
  result["data"]["test"]["problems"]["missing_file"] = 4  # the scan's whole-source count; process 0 skipped 1
  assert "skipped missing_file 4" in report.data_problem_lines(result)[0]


def test_transparent_images_are_said_to_lose_their_alpha(tiny_checkpoint, tmp_path, capsys):
  # A new user's RGBA digits on a transparent (black-stored) background scored 11% against 97% opaque,
  # with nothing said: open_clip's rule drops alpha; the data line now counts those images.
  from PIL import Image
  for i, folder in enumerate(("cat", "dog")):
    os.makedirs(tmp_path / "mine" / folder)
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "mine" / folder / "clear.png")
    Image.new("RGB", (8, 8), (i * 200, 0, 0)).save(tmp_path / "mine" / folder / "plain.png")
  Image.new("P", (8, 8), 0).save(tmp_path / "mine" / "cat" / "palette.png", transparency=0)  # a PNG-8 tRNS entry
  rc = cli.main(["--checkpoint", tiny_checkpoint, "--tasks", f"zeroshot:mine={tmp_path / 'mine'}", "--out",
                 str(tmp_path / "out")])
  assert rc == 0
  (result,) = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
  assert result["data"]["test"]["converted"] == {"mode_PA": 1, "mode_RGBA": 2} and result["num_examples"] == 5
  line = "zeroshot:mine test data: kept with their alpha dropped (open_clip's rule): PA 1, RGBA 2"
  printed = capsys.readouterr()
  assert line in printed.err and line in (tmp_path / "out" / "results.md").read_text()
  assert "(5 images, 2 classes, " in printed.out  # the class count shows a label typo's extra class at once


def test_linear_probe_on_separable_features_reaches_100():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(4, 8)) * 6

  def sample(n):
    labels = rng.integers(0, 4, n)
    return (centers[labels] + rng.normal(size=(n, 8))).astype(np.float32), labels

  (train_x, train_y), (test_x, test_y) = sample(200), sample(100)
  result = linear_probe.fit_linear_probe(train_x, train_y, test_x, test_y, val_fraction=0.25)
  assert result.top1 >= 99.0 and result.mean_per_class >= 99.0
  assert 7 <= len(result.sweep) <= 15 and result.best_c in result.sweep
  assert min(result.sweep) == pytest.approx(1e-6) and max(result.sweep) == pytest.approx(1e6)


def test_c_search_split_is_stratified_under_imbalance():
  """The issue's case: 21 rows, 19 of class 0 and 2 of class 1, val_fraction 0.2, seed 6. A plain
  permutation put both class-1 rows into validation (scikit-learn: "needs samples of at least 2
  classes"); stratified, each class keeps rows on both sides."""
  rng = np.random.default_rng(0)
  labels = np.array([0] * 19 + [1] * 2)
  features = (np.where(labels[:, None] == 1, 3.0, -3.0) + rng.normal(size=(21, 4))).astype(np.float32)
  plain = np.random.default_rng(6).permutation(21)[:4]
  assert set(labels[plain]) == {0, 1} and (labels[plain] == 1).sum() == 2  # the old split's failure
  fit_rows, val_rows, too_small = linear_probe.split_train_val(labels, 0.2, seed=6)
  assert (np.bincount(labels[val_rows]) == [4, 1]).all() and (np.bincount(labels[fit_rows]) == [15, 1]).all()
  assert too_small == [] and not set(fit_rows) & set(val_rows) and len(fit_rows) + len(val_rows) == 21
  for seed in range(20):
    result = linear_probe.fit_linear_probe(features, labels, features, labels, val_fraction=0.2, seed=seed)
    assert result.top1 == 100.0


def test_a_class_too_small_to_split_is_reported():
  rng = np.random.default_rng(1)
  labels = np.array([0] * 8 + [1] * 8 + [2])
  features = (np.eye(3)[labels] * 5 + rng.normal(size=(17, 3))).astype(np.float32)
  fit_rows, val_rows, too_small = linear_probe.split_train_val(labels, 0.25, seed=0)
  assert too_small == [2] and 16 in fit_rows and 16 not in val_rows
  result = linear_probe.fit_linear_probe(features, labels, features, labels, val_fraction=0.25)
  assert result.too_small_to_split == (2,) and result.top1 > 90
  with pytest.raises(ValueError, match="needs at least 2"):
    linear_probe.fit_linear_probe(features, np.zeros(17, int), features, labels)
  with pytest.raises(ValueError, match="no class of two or more rows"):
    linear_probe.split_train_val(np.arange(5), 0.2, seed=0)


def test_template_files_and_prompt_overrides(tmp_path):
  path = tmp_path / "t.txt"
  path.write_text("# clip_benchmark's placeholder works too\na photo of a {c}.\n\n{} in the wild\n")
  assert zeroshot.read_templates_file(str(path)) == ("a photo of a {}.", "{} in the wild")
  path.write_text("no placeholder\n")
  with pytest.raises(ValueError, match="needs exactly one"):
    zeroshot.read_templates_file(str(path))
  # Notepad's byte-order mark stays out of the first prompt and the first class name (it was kept).
  path.write_text("a photo of a {}.\n", encoding="utf-8-sig")
  assert zeroshot.read_templates_file(str(path)) == ("a photo of a {}.",)
  (tmp_path / "names.txt").write_text("cat\ndog\n", encoding="utf-8-sig")
  assert labelled.read_class_names_file(str(tmp_path / "names.txt")) == ["cat", "dog"]
  (tmp_path / "names.txt").write_bytes(b"cat\ncaf\xe9\n")
  with pytest.raises(ValueError, match=r"names.txt: line 2 is not UTF-8 text"):
    labelled.read_class_names_file(str(tmp_path / "names.txt"))
  (task,) = cli.with_prompts(cli.parse_tasks("zeroshot:cifar10"), templates=["itap of a {}."])
  assert task.templates == ("itap of a {}.",) and not task.paper_comparable and len(task.class_names) == 10
  (probe,) = cli.with_prompts(cli.parse_tasks("linear_probe:cifar10"), templates=["x {}"])
  assert probe.paper_comparable
  from clip_jax.eval import report
  result = {"task": "zeroshot", "dataset": "cifar10", "metrics": {"top1": 50.0}, "paper_comparable": False}
  table = report.markdown_table([report.attach_paper_numbers(result, None)], {"out_dir": str(tmp_path)})
  assert "| zeroshot | cifar10 |  | top1 | 50.0 |  |  |" in table and "No paper numbers for zeroshot:cifar10" in table
  own = cli.parse_task(f"zeroshot:{tmp_path}")
  assert (own.dataset, own.source, own.class_names) == (os.path.basename(tmp_path), str(tmp_path), None)
  # A path alone is named as the trainer's zero-shot hook names it (was '{00000..00003}' for a tar range).
  assert cli.parse_task("zeroshot:/x/wds/{00000..00003}.tar").dataset == "wds"
  assert cli.parse_task("linear_probe:/data/my shapes/{split}").dataset == "my_shapes"


def test_c_search_is_a_parametric_binary_search(monkeypatch):
  peak = 1.3  # validation score peaks at log10 C = 1.3

  class Fake:
    def __init__(self, c):
      self.c = c

    def predict(self, x):
      correct = max(0, int(round(100 - 60 * abs(np.log10(self.c) - peak))))
      return np.array([0] * correct + [1] * (100 - correct))

  monkeypatch.setattr(linear_probe, "_fit", lambda x, y, c, max_iter: Fake(c))
  sweep = linear_probe.search_c(None, None, None, np.zeros(100, int))
  best = max(sweep, key=sweep.get)
  assert len(sweep) == 15
  assert abs(np.log10(best) - peak) <= linear_probe.FINEST_STEP / 2 + 1e-9


# ----------------------------------------------------------------------------- sources, CLI, hook
def _write_images(directory, count):
  rng = np.random.default_rng(0)
  paths = []
  for i in range(count):
    path = os.path.join(directory, f"img{i}.png")
    Image.fromarray(rng.integers(0, 255, (24 + i, 40, 3), dtype=np.uint8)).save(path)
    paths.append(os.path.basename(path))
  return paths


def test_caption_files_group_captions_per_image(tmp_path):
  names = _write_images(tmp_path, 3)
  jsonl = tmp_path / "caps.jsonl"
  jsonl.write_text("\n".join([json.dumps({"image": names[0], "captions": ["a", "b"]}),
                              json.dumps({"image": names[1], "caption": "c"}),
                              json.dumps({"image": names[0], "caption": "d"})]) + "\n")
  source = retrieval.CaptionFileSource(str(jsonl))
  assert len(source) == 2 and source.all_captions() == [["a", "b", "d"], ["c"]]
  assert source[0]["image"][:4] == b"\x89PNG"
  csv_file = tmp_path / "caps.csv"
  csv_file.write_text(f"filepath,title\n{names[2]},x\n{names[1]},y\n{names[2]},z\n")
  assert retrieval.CaptionFileSource(str(csv_file)).all_captions() == [["x", "z"], ["y"]]
  # open_clip's default caption table is a TSV (was refused: "no label column among ['filepath', 'title']").
  tsv_file = tmp_path / "caps.tsv"
  tsv_file.write_text(f"filepath\ttitle\n{names[1]}\ta, b\n")
  assert isinstance(retrieval.open_retrieval_source(str(tsv_file), "test"), retrieval.CaptionFileSource)
  assert retrieval.CaptionFileSource(str(tsv_file)).all_captions() == [["a, b"]]
  (tmp_path / "bad.csv").write_text("path,label\na.png,1\n")
  with pytest.raises(ValueError, match="caption column"):
    retrieval.CaptionFileSource(str(tmp_path / "bad.csv"))
  # The byte-order mark a spreadsheet's "CSV UTF-8" starts with (was read into the column's name).
  (tmp_path / "bom.csv").write_text(f"filepath,title\n{names[2]},x\n", encoding="utf-8-sig")
  assert retrieval.CaptionFileSource(str(tmp_path / "bom.csv")).all_captions() == [["x"]]
  # One malformed line (not JSON, or no image) is skipped and counted, as label tables count theirs;
  # it used to refuse the whole file. 'txt' is a caption column here as in clip_jax.data.prepare.
  (tmp_path / "broken.jsonl").write_text(
      json.dumps({"image": names[0], "txt": "a"}) + "\n{not json\n" + json.dumps({"txt": "b"}) + "\n")
  broken = retrieval.CaptionFileSource(str(tmp_path / "broken.jsonl"))
  assert broken.all_captions() == [["a"]] and broken.problems == {"malformed_row": 2}
  assert broken.problem_examples["malformed_row"] == ["broken.jsonl:2", "broken.jsonl:3"]
  (tmp_path / "none.jsonl").write_text("{not json\n")
  with pytest.raises(ValueError, match="no image column"):
    retrieval.CaptionFileSource(str(tmp_path / "none.jsonl"))


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny, tmp_path_factory):
  model, variables = tiny
  return clip_jax.export_hf(model, variables, str(tmp_path_factory.mktemp("tiny_hf")))


def test_cli_runs_every_task_on_mock_data_and_writes_the_table(tiny_checkpoint, tmp_path, capsys):
  names = _write_images(tmp_path, 5)
  captions = tmp_path / "captions.jsonl"
  (tmp_path / "broken.png").write_bytes(b"not a png")
  captions.write_text("".join(json.dumps({"image": n, "captions": [f"photo {i}", f"picture {i}"]}) + "\n"
                              for i, n in enumerate(names + ["broken.png"])))
  out = tmp_path / "eval"
  tasks = f"zeroshot:cifar10,linear_probe:cifar10,retrieval:tfds:clip_jax_test_captions,retrieval:{captions}"
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    rc = cli.main(["--checkpoint", tiny_checkpoint, "--tasks", tasks, "--batch-size", "12", "--out", str(out),
                   "--model-name", "ViT-B-32"])
  assert rc == 0
  report = json.loads((out / "results.json").read_text())
  assert [(r["task"], r["dataset"]) for r in report["results"]] == [
      ("zeroshot", "cifar10"), ("linear_probe", "cifar10"), ("retrieval", "clip_jax_test_captions"),
      ("retrieval", "captions")]
  zs, probe, tfds_retrieval, file_retrieval = report["results"]
  assert zs["num_examples"] == 12 and set(zs["metrics"]) == {"top1", "top5", "mean_per_class"}
  assert zs["paper"]["top1"] == {"value": 91.3, "source": "Table 11", "model": "ViT-B/32"}
  assert probe["num_train"] == 12 and 0 <= probe["metrics"]["top1"] <= 100
  assert tfds_retrieval["num_examples"] == 12 and tfds_retrieval["num_texts"] > 12
  assert file_retrieval["num_examples"] == 5 and file_retrieval["num_texts"] == 10
  assert file_retrieval["num_skipped"] == 1 and file_retrieval["data"]["test"]["skipped"] == {"corrupt_image": 1}
  assert report["meta"]["paper_model"] == "ViT-B/32" and report["meta"]["devices"] == 8
  # The settings behind the numbers (issue 20.5): prompts per task, versions for the whole file.
  assert zs["templates"] == list(classnames.DATASETS["cifar10"].templates) and len(zs["class_names"]) == 10
  assert report["meta"]["tokenizer"] == "clip" and report["meta"]["versions"]["jax"] == jax.__version__
  table = (out / "results.md").read_text()
  assert "| zeroshot | cifar10 | test | top1 * |" in table and "| 91.3 | Table 11 |" in table
  assert "| retrieval | captions | test | image_to_text/R@1 |" in table
  assert "retrieval:captions test data: skipped corrupt_image 1" in table  # was in results.json only
  for plot in zs["plots"] + probe["plots"]:
    assert os.path.isfile(plot)
  assert "Wrote" in capsys.readouterr().out


@pytest.mark.parametrize("tasks, message", [
    ("bogus:cifar10", "unknown task kind 'bogus'"),
    ("zeroshot:not_a_dataset", "unknown dataset 'not_a_dataset'"),
    ("zeroshot:fgvc_aircraft", "fgvc_aircraft is not in TFDS"),
    ("linear_probe:imagenet_v2", "no training split"),
    ("retrieval:flickr30k", "give its caption file"),
    ("cifar10", "is not KIND:DATASET"),
    # one would replace the other's results, plots and predictions
    ("zeroshot:mine=/a,zeroshot:mine=/b", "two tasks are named zeroshot:mine (/a and /b); name them apart"),
    ("retrieval:/x/caps.jsonl,retrieval:/y/caps.csv", "two tasks are named retrieval:caps"),
])
def test_cli_bad_task_gives_one_clear_error(tasks, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["--checkpoint", "unused", "--tasks", tasks])
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err


def test_cli_unreadable_data_is_one_error_line(tiny_checkpoint, tmp_path, capsys):
  rc = cli.main(["--checkpoint", tiny_checkpoint, "--tasks", "zeroshot:dtd", "--data-dir", str(tmp_path),
                 "--out", str(tmp_path / "out")])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and err.startswith("error: ") and "dtd" in err and len(err.splitlines()) == 1


def test_cli_keeps_the_finished_tasks_when_a_later_one_fails(tiny_checkpoint, tmp_path, capsys):
  # A new user's second task failed in one line and the first task's finished numbers were never written.
  out = tmp_path / "out"
  rc = cli.main(["--checkpoint", tiny_checkpoint, "--tasks", "zeroshot:digits,zeroshot:dtd", "--limit", "24",
                 "--data-dir", str(tmp_path), "--out", str(out)])
  err = capsys.readouterr().err
  assert rc == 2 and "1 of 2 tasks finished; their results are in" in err and "dtd" in err.strip().splitlines()[-1]
  report = json.loads((out / "results.json").read_text())
  assert [(r["task"], r["dataset"]) for r in report["results"]] == [("zeroshot", "digits")]
  # The results files say which tasks did not finish (they listed only the finished ones, as if complete).
  assert [u["task"] for u in report["unfinished"]] == ["zeroshot:dtd"]
  assert report["unfinished"][0]["error"].startswith(("ValueError: ", "FileNotFoundError: "))
  assert "Not finished (no numbers above; run these tasks again):\n- zeroshot:dtd (test): " in (
      out / "results.md").read_text()


def test_merged_reports_list_a_task_unfinished_until_a_run_finishes_it():
  def row(dataset):
    return {"task": "zeroshot", "dataset": dataset, "split": "test", "metrics": {"acc1": 1.0}}
  first = {"meta": {}, "results": [row("digits")], "unfinished": [
      {"task": "zeroshot:dtd", "split": "test", "error": "ValueError: x"},
      {"task": "zeroshot:cifar10", "split": "test", "error": "not run"}]}
  second = report.merge_reports(first, {"meta": {}, "results": [row("cifar10")]})
  assert [r["dataset"] for r in second["results"]] == ["digits", "cifar10"]
  assert second["unfinished"] == first["unfinished"][:1]
  third = report.merge_reports(second, {"meta": {}, "results": [row("dtd")]})
  assert "unfinished" not in third and len(third["results"]) == 3


def test_training_hook_from_the_digits_config(tiny, mesh, tmp_path):
  from configs.clip.digits import get_config
  cfg = get_config()
  cfg.zeroshot_eval.limit = 40
  (evaluator,) = zeroshot.build_training_evaluators(cfg, workdir=str(tmp_path))
  assert evaluator.name == "digits" and evaluator.image_size == 32 and len(evaluator.source) == 40
  assert evaluator.prompt_tokens.shape == (10 * len(DIGIT_ZEROSHOT_TEMPLATES), 32)
  model, variables = tiny
  out = evaluator(model, variables, mesh)
  assert 0 <= out["zeroshot/digits/top1"] <= 100 and "zeroshot/digits/top5" in out
  assert (tmp_path / "plots" / "confusion_digits.png").is_file()


def test_a_workdirs_recorded_tokenizer_that_is_gone_names_the_record_and_the_flag(tmp_path):
  """A workdir records its init folder's tokenizer by absolute path (config.json's data.tokenizer); once
  that folder moved, evaluation (export, draw, WiSE-FT) failed with get_tokenizer's line, which names
  neither the record nor --tokenizer."""
  from clip_jax import convert
  from clip_jax.cli import MissingPathError
  workdir, gone = tmp_path / "run", tmp_path / "moved_init"
  (workdir / "checkpoints" / "4").mkdir(parents=True)
  (workdir / "clip_config.json").write_text("{}")  # a workdir of this project (its model config)
  (workdir / "config.json").write_text(json.dumps({"data": {"tokenizer": str(gone)}}))
  line = (f"the tokenizer path recorded in {workdir}/config.json (data.tokenizer: {gone}) no longer exists (its "
          "folder was moved or deleted): pass --tokenizer DIR, or restore the folder or edit data.tokenizer in "
          "that config.json.")
  for path in (workdir, workdir / "checkpoints" / "4"):  # the workdir, or one of its step folders
    with pytest.raises(MissingPathError) as raised:
      cli.tokenizer_for(None, str(path), 32)
    assert str(raised.value) == line
  with pytest.raises(MissingPathError, match=r"pass --config\.data\.tokenizer=DIR, or restore the folder"):
    convert.checkpoint_tokenizer(str(workdir), option="--config.data.tokenizer=DIR")  # training from it
  assert cli.tokenizer_for("clip", str(workdir), 32)[1] == "clip"  # --tokenizer wins over the record
  # Resuming the training run itself: the trainer reads the record too (train.resolve_tokenizer)
  import ml_collections
  from clip_jax import train
  cfg = ml_collections.ConfigDict({"data": {"tokenizer": ""}})
  train.resolve_tokenizer(cfg, str(workdir))  # the record is taken as it is (a finished run needs no tokenizer)
  assert cfg.data.tokenizer == str(gone)
  with pytest.raises(MissingPathError, match=r"\(data\.tokenizer: .*moved_init\) no longer exists .*pass "
                                             r"--config\.data\.tokenizer=DIR --allow-config-change, or restore"):
    train.check_resumed_tokenizer(cfg, str(workdir))  # resuming: one line
  train.check_resumed_tokenizer(ml_collections.ConfigDict({"data": {"tokenizer": "clip"}}), str(workdir))  # given
  gone.mkdir()
  (gone / "vocab.json").write_text("{}")
  (gone / "merges.txt").write_text("")
  assert convert.checkpoint_tokenizer(str(workdir)) == (str(gone), None)  # restored: the record holds again
