"""Input pipeline: converter, sources, bad-input handling, grain pipeline, global batches."""
import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from clip_jax.data import digits, images, pipeline, prepare, records, sources
from tarfiles import write_tar

try:
  from clip_jax.tokenizer import tokenize
except ImportError:  # pragma: no cover - the tokenizer lands separately
  tokenize = None
needs_tokenizer = pytest.mark.skipif(tokenize is None, reason="clip_jax.tokenizer is not importable")


# ----------------------------------------------------------------------------- test files

def encode(array, fmt="JPEG"):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt)
  return buffer.getvalue()


def rgb(h=30, w=40, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_header_only(width, height):
  """A PNG whose header claims width x height but holds no pixel data (a decompression bomb)."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def image_files():
  """name -> bytes for every kind of image the converter must take or skip."""
  gray16 = (np.arange(20 * 20, dtype=np.uint16).reshape(20, 20) * 150)
  buffer = io.BytesIO()
  Image.fromarray(gray16).save(buffer, format="PNG")
  cmyk = io.BytesIO()
  Image.fromarray(rgb()).convert("CMYK").save(cmyk, format="JPEG")
  good = encode(rgb())
  return {
      "good.jpg": good,
      "gray.jpg": encode(rgb()[..., 0]),
      "rgba.png": encode(np.dstack([rgb(), np.full((30, 40), 128, np.uint8)]), "PNG"),
      "palette.png": _palette_png(),
      "cmyk.jpg": cmyk.getvalue(),
      "gray16.png": buffer.getvalue(),
      "tiny.png": encode(rgb(1, 1), "PNG"),
      "truncated.jpg": good[:len(good) // 2],
      "garbage.jpg": b"this is not an image at all" * 10,
      "empty.png": b"",
      "bomb.png": png_header_only(10_000, 10_000),
  }


def _palette_png():
  buffer = io.BytesIO()
  Image.fromarray(rgb()).convert("P").save(buffer, format="PNG")
  return buffer.getvalue()


GOOD_IMAGES = ("good", "gray", "rgba", "palette", "cmyk", "gray16", "tiny")


def write_folder(root):
  os.makedirs(root)
  for name, data in image_files().items():
    with open(os.path.join(root, name), "wb") as f:
      f.write(data)
    stem = os.path.splitext(name)[0]
    with open(os.path.join(root, stem + ".txt"), "w") as f:
      f.write(f"a picture called {stem}")
  extra_images = {"nocap.jpg": None, "emptycap.jpg": b"", "spacecap.jpg": b"  \n\t ",
                  "latin.jpg": b"caf\xe9 au lait", "long.jpg": b"word " * 1000}
  for name, caption in extra_images.items():
    with open(os.path.join(root, name), "wb") as f:
      f.write(encode(rgb(seed=3)))
    if caption is not None:
      with open(os.path.join(root, name[:-4] + ".txt"), "wb") as f:
        f.write(caption)
  with open(os.path.join(root, "orphan.txt"), "w") as f:
    f.write("a caption without its image")


# ----------------------------------------------------------------------------- records and captions

def test_record_roundtrip_and_corruption():
  record = records.encode_record(b"\xff\xd8image", "a cat", key="k", label=3)
  header, image = records.decode_record(record)
  assert header == {"caption": "a cat", "key": "k", "label": 3} and image == b"\xff\xd8image"
  for bad in (b"", b"XXXX" + record[4:], record[:9]):
    with pytest.raises(records.BadRecord) as e:
      records.decode_record(bad)
    assert e.value.reason == "corrupt_record"


def test_clean_caption():
  assert records.clean_caption("  a\tdog\n\x00on  grass ") == ("a dog on grass", [])
  assert records.clean_caption(b"caf\xc3\xa9") == ("café", [])
  assert records.clean_caption(b"caf\xe9 au lait") == ("caf au lait", ["caption_not_utf8"])
  text, repairs = records.clean_caption("word " * 1000, max_chars=100)
  assert repairs == ["caption_truncated"] and len(text) <= 100 and text.endswith("word")
  for empty in ("", "   \n\t", b"\xff\xfe", "\x00\x01"):
    with pytest.raises(records.BadRecord, match="empty_caption"):
      records.clean_caption(empty)


# ----------------------------------------------------------------------------- images

@pytest.mark.parametrize("name, repair", [("good.jpg", []), ("gray.jpg", []), ("rgba.png", ["mode_RGBA"]),
                                          ("palette.png", ["mode_P"]), ("cmyk.jpg", ["mode_CMYK"]),
                                          ("gray16.png", ["mode_I;16"]), ("tiny.png", [])])
def test_decode_repairs_modes(name, repair):
  image, repairs = images.decode_image(image_files()[name])
  assert image.mode == "RGB" and repairs == repair


def test_decode_16bit_keeps_range_and_alpha_becomes_white():
  image, _ = images.decode_image(image_files()["gray16.png"])
  values = np.asarray(image)[..., 0]
  assert values.min() == 0 and values.max() == (399 * 150) >> 8  # top 8 bits, not clipped at 255
  transparent = np.zeros((4, 4, 4), np.uint8)  # black but fully transparent
  image, _ = images.decode_image(encode(transparent, "PNG"))
  assert np.all(np.asarray(image) == 255)


@pytest.mark.parametrize("name, reason", [("truncated.jpg", "corrupt_image"), ("garbage.jpg", "corrupt_image"),
                                          ("empty.png", "empty_image"), ("bomb.png", "image_too_large")])
def test_decode_rejects(name, reason):
  with pytest.raises(records.BadRecord) as e:
    images.decode_image(image_files()[name])
  assert e.value.reason == reason


def test_pixel_limit_is_configurable():
  with pytest.raises(records.BadRecord, match="image_too_large"):
    images.decode_image(encode(rgb(30, 40)), max_pixels=1000)


def test_eval_transform_matches_torchvision():
  # open_clip's and OpenAI's eval preprocessing: Resize(bicubic) + CenterCrop + ToTensor + Normalize.
  transforms = pytest.importorskip("torchvision.transforms")
  reference = transforms.Compose([
      transforms.Resize(64, interpolation=transforms.InterpolationMode.BICUBIC),
      transforms.CenterCrop(64), transforms.ToTensor(),
      transforms.Normalize(images.OPENAI_MEAN, images.OPENAI_STD)])
  for h, w in ((50, 80), (90, 40), (64, 64), (7, 3)):
    image = Image.fromarray(rgb(h, w, seed=h))
    expected = reference(image).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(images.normalize(images.eval_transform(image, 64)), expected, atol=1e-5)


def test_random_resized_crop_box_bounds():
  rng = np.random.default_rng(0)
  for _ in range(200):
    left, top, right, bottom = images.random_resized_crop_box(200, 100, rng, scale=(0.9, 1.0))
    w, h = right - left, bottom - top
    assert 0 <= left and right <= 200 and 0 <= top and bottom <= 100
    assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
  out = images.train_transform(Image.fromarray(rgb()), 16, rng)
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8


# ----------------------------------------------------------------------------- converter

EXPECTED_FOLDER_SKIPS = {"corrupt_image": 2, "empty_image": 1, "image_too_large": 1, "missing_caption": 1,
                         "empty_caption": 2, "missing_image": 1}
EXPECTED_FOLDER_REPAIRS = {"mode_RGBA": 1, "mode_P": 1, "mode_CMYK": 1, "mode_I;16": 1,
                           "caption_not_utf8": 1, "caption_truncated": 1}


def read_all(output):
  source = sources.ArrayRecordSource(output)
  return [source[i] for i in range(len(source))]


def test_prepare_folder_exact_counts(tmp_path, capsys):
  root = tmp_path / "photos"
  write_folder(str(root))
  assert prepare.main(["--input", str(root), "--output", str(tmp_path / "out"), "--shard-size", "4"]) == 0
  report = json.loads((tmp_path / "out" / "report.json").read_text())
  assert report["written"] == len(GOOD_IMAGES) + 2  # + the repaired latin-1 and overlong captions
  assert report["skipped"] == EXPECTED_FOLDER_SKIPS
  assert report["repaired"] == EXPECTED_FOLDER_REPAIRS
  assert report["shards"] == [f"data-0000{i}-of-00003.array_record" for i in range(3)]
  printed = capsys.readouterr().out
  assert "wrote 9 records in 3 shards" in printed and "image_too_large" in printed
  rows = {r["key"]: r for r in read_all(str(tmp_path / "out"))}
  assert set(rows) == {*GOOD_IMAGES, "latin", "long"}
  assert rows["latin"]["captions"] == ["caf au lait"]
  assert rows["good"]["image"] == image_files()["good.jpg"]  # stored byte for byte
  assert Image.open(io.BytesIO(rows["rgba"]["image"])).mode == "RGB"  # re-encoded once, repaired
  # An existing output is refused unless --overwrite.
  assert prepare.main(["--input", str(root), "--output", str(tmp_path / "out")]) == 2
  assert "--overwrite" in capsys.readouterr().err


def test_prepare_csv_and_jsonl(tmp_path):
  root = tmp_path / "photos"
  write_folder(str(root))
  csv_path = tmp_path / "pairs.csv"
  csv_path.write_bytes(b"filepath,caption\n"
                       b"photos/good.jpg,a good photo\n"
                       b"photos/rgba.png,\"a caption, with a comma\"\n"
                       b"photos/missing.jpg,a file that is gone\n"
                       b"photos/garbage.jpg,garbage bytes\n"
                       b"photos/gray.jpg,   \n"
                       b"photos/tiny.png,caf\xe9\n")
  report = prepare.convert([str(csv_path)], str(tmp_path / "csv"), verbose=False)
  assert report["written"] == 3
  assert report["skipped"] == {"missing_file": 1, "corrupt_image": 1, "empty_caption": 1}
  assert report["repaired"] == {"mode_RGBA": 1, "caption_not_utf8": 1}
  captions = sorted(r["captions"][0] for r in read_all(str(tmp_path / "csv")))
  assert captions == ["a caption, with a comma", "a good photo", "caf"]

  jsonl_path = tmp_path / "pairs.jsonl"
  jsonl_path.write_text("\n".join([
      json.dumps({"image": "photos/good.jpg", "text": "one", "label": 4}),
      "{not json",
      json.dumps({"image": "photos/nowhere.png", "text": "two"}),
      json.dumps({"image": "photos/bomb.png", "text": "three"}),
      "",
      json.dumps({"image": "photos/cmyk.jpg", "text": "four"})]))
  report = prepare.convert([str(jsonl_path)], str(tmp_path / "jsonl"), verbose=False)
  assert report["written"] == 2
  assert report["skipped"] == {"malformed_row": 1, "missing_file": 1, "image_too_large": 1}
  labels = sorted(r["label"] for r in read_all(str(tmp_path / "jsonl")))
  assert labels == [-1, 4]


def test_prepare_keeps_a_jsonl_rows_list_of_captions(tmp_path):
  # COCO-style rows (the caption files retrieval reads) were skipped whole as 'empty_caption' ("caption is
  # list"): the list is stored, cleaned, and training draws one caption of it each time.
  root = tmp_path / "photos"
  write_folder(str(root))
  jsonl_path = tmp_path / "coco_style.jsonl"
  jsonl_path.write_text("\n".join([
      json.dumps({"image": "photos/good.jpg", "captions": ["a  dog", "", "a\tbrown dog", 7]}),
      json.dumps({"image": "photos/gray.jpg", "captions": ["  ", None]}),
      json.dumps({"image": "photos/rgba.png", "captions": ["just one"]}),
      json.dumps({"image": "photos/tiny.png", "captions": [], "label": 2})]))
  report = prepare.convert([str(jsonl_path)], str(tmp_path / "out"), verbose=False)
  assert report["written"] == 3 and report["skipped"] == {"empty_caption": 1}
  assert report["repaired"]["caption_dropped"] == 1  # the first row's "" (a skipped record's repairs are not counted)
  rows = {r["key"]: r for r in read_all(str(tmp_path / "out"))}
  assert rows["photos/good.jpg"]["captions"] == ["a dog", "a brown dog", "7"]
  assert rows["photos/rgba.png"]["captions"] == ["just one"]
  assert rows["photos/tiny.png"]["captions"] == ["2"] and rows["photos/tiny.png"]["label"] == 2  # template '{}'


def test_prepare_webdataset_tars(tmp_path):
  files = image_files()
  write_tar(tmp_path / "00000.tar", [
      ("000.jpg", files["good.jpg"]), ("000.txt", b"first"),
      ("001.png", files["gray16.png"]), ("001.json", json.dumps({"caption": "from json"}).encode()),
      ("002.jpg", files["garbage.jpg"]), ("002.txt", b"bad image"),
      ("003.jpg", files["good.jpg"]),  # no caption
      ("004.txt", b"no image"),
      ("sub/005.webp", encode(rgb(), "WEBP")), ("sub/005.txt", b"\xef\xbb\xbfwebp with a BOM")])
  write_tar(tmp_path / "00001.tar", [(f"{i:03d}.{ext}", files["good.jpg"] if ext == "jpg" else b"a caption")
                                     for i in range(10, 14) for ext in ("jpg", "txt")], truncate=True)
  report = prepare.convert([str(tmp_path / "{00000..00001}.tar")], str(tmp_path / "out"), verbose=False)
  assert report["skipped"] == {"corrupt_image": 1, "missing_caption": 1, "missing_image": 1,
                               "tar_read_error": 1}
  assert report["repaired"] == {"mode_I;16": 1}
  rows = read_all(str(tmp_path / "out"))
  by_key = {r["key"]: r["captions"][0] for r in rows}
  assert by_key["00000.tar/000"] == "first" and by_key["00000.tar/001"] == "from json"
  assert by_key["00000.tar/sub/005"] == "webp with a BOM"
  # The truncated shard still gave the groups that were complete before the damage.
  assert report["written"] == 3 + sum(k.startswith("00001.tar/") for k in by_key) and report["written"] > 3


def _class_folders(root, classes=("cat", "dog"), per_class=4):
  for c, name in enumerate(classes):
    os.makedirs(root / name)
    for i in range(per_class):
      (root / name / f"{i}.png").write_bytes(encode(rgb(6, 6, seed=10 * c + i), "PNG"))


def test_prepare_auto_layout_needs_most_images_captioned(tmp_path, capsys):
  # One stray .txt beside one image of a class folder made 'auto' read captions: 1 record written, every other
  # image skipped as missing_caption, --caption-template ignored, and nothing said which layout was read.
  root = tmp_path / "classes"
  _class_folders(root)
  (root / "cat" / "0.txt").write_text("a stray note")
  args = ["--input", str(root), "--caption-template", "a photo of a {}"]
  assert prepare.main([*args, "--output", str(tmp_path / "auto")]) == 0
  report = json.loads((tmp_path / "auto" / "report.json").read_text())
  assert report["written"] == 8 and report["skipped"] == {"not_an_image": 1}
  assert report["layouts"] == {str(root): "classes"}
  assert {r["captions"][0] for r in read_all(str(tmp_path / "auto"))} == {"a photo of a cat", "a photo of a dog"}
  line, = [l for l in capsys.readouterr().out.splitlines() if "read as layout" in l]
  assert "'classes'" in line and "1 of 8 images" in line and "--layout captions" in line
  # Forced, the other layout is read and the line says why; the template, unused there, is said to be.
  assert prepare.main([*args, "--output", str(tmp_path / "forced"), "--layout", "captions"]) == 0
  line, = [l for l in capsys.readouterr().out.splitlines() if "read as layout" in l]
  assert "'captions'" in line and "--layout captions" in line and "--caption-template" in line and "unused" in line
  # Sub-folders whose images mostly have captions (img2dataset's files layout) are caption folders.
  files = tmp_path / "files"
  _class_folders(files, ("00000", "00001"), per_class=2)
  for image in files.glob("*/*.png"):
    if image.name != "1.png" or image.parent.name != "00001":
      image.with_suffix(".txt").write_text(f"caption of {image.parent.name}/{image.stem}")
  report = prepare.convert([str(files)], str(tmp_path / "files_out"), verbose=False)
  assert report["written"] == 3 and report["skipped"] == {"missing_caption": 1}
  assert report["layouts"] == {str(files): "captions"}


def test_prepare_folder_of_tars_and_nothing_written(tmp_path, capsys):
  # A folder of img2dataset .tar shards (beside its .parquet and _stats.json files) wrote 0 records, exit 0.
  wds = tmp_path / "wds"
  wds.mkdir()
  for shard in range(2):
    write_tar(wds / f"0000{shard}.tar", [(f"{shard}{i}.{ext}", encode(rgb(6, 6)) if ext == "jpg" else b"a shape")
                                         for i in range(3) for ext in ("jpg", "txt")])
    (wds / f"0000{shard}.parquet").write_bytes(b"PAR1")
    (wds / f"0000{shard}_stats.json").write_text("{}")
  assert prepare.main(["--input", str(wds), "--output", str(tmp_path / "from_wds")]) == 0
  report = json.loads((tmp_path / "from_wds" / "report.json").read_text())
  assert report["written"] == 6 and report["layouts"] == {str(wds): "tars"}
  assert len({r["key"].split("/")[0] for r in read_all(str(tmp_path / "from_wds"))}) == 2
  assert "2 .tar shards" in capsys.readouterr().out
  # Nothing written is an error (one line, exit 2), and report.json keeps the counts.
  flat = tmp_path / "flat"
  flat.mkdir()
  for i in range(3):
    (flat / f"{i}.png").write_bytes(encode(rgb(6, 6), "PNG"))
  assert prepare.main(["--input", str(flat), "--output", str(tmp_path / "none")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("error: wrote no records") and "missing_caption 3" in err[-1]
  assert "report.json" in err[-1] and not any(l.startswith("error:") for l in err[:-1])
  report = json.loads((tmp_path / "none" / "report.json").read_text())
  assert report["written"] == 0 and report["skipped"] == {"missing_caption": 3}
  (tmp_path / "empty").mkdir()
  assert prepare.main(["--input", str(tmp_path / "empty"), "--output", str(tmp_path / "none2")]) == 2
  assert "found nothing to convert" in capsys.readouterr().err
  with pytest.raises(prepare.NothingWritten) as e:
    prepare.convert([str(flat)], str(tmp_path / "none3"), verbose=False)
  assert e.value.report["skipped"] == {"missing_caption": 3}


def test_prepare_groups_rows_that_name_one_image(tmp_path, capsys):
  # COCO-style caption lists (one row per caption) were written as one record per row: retrieval then
  # counted each image once per caption. An image is one record, whatever number of rows name it.
  root = tmp_path / "photos"
  write_folder(str(root))
  jsonl_path = tmp_path / "lines.jsonl"
  jsonl_path.write_text("\n".join(json.dumps(row) for row in [
      {"image": "photos/good.jpg", "caption": "a dog"},
      {"image": "photos/gray.jpg", "caption": "a gray thing"},
      {"image": "./photos/good.jpg", "caption": "a brown dog"},         # the same file, written another way
      {"image": str(root / "good.jpg"), "caption": ["a dog", "a pet"]},  # absolute; "a dog" again is not kept twice
      {"image": "photos/good.jpg", "caption": "a labelled dog", "label": 1},  # another label: its own record
      {"image": "photos/gone.jpg", "caption": "one"},
      {"image": "photos/gone.jpg", "caption": "two"},
      {"image": "photos/gray.jpg", "caption": "  "}]))                 # blank beside a caption: dropped, counted
  assert prepare.main(["--input", str(jsonl_path), "--output", str(tmp_path / "out")]) == 0
  report = json.loads((tmp_path / "out" / "report.json").read_text())
  assert report["written"] == 3 and report["grouped_rows"] == 4
  assert report["skipped"] == {"missing_file": 1} and report["repaired"] == {"caption_dropped": 1}
  rows = read_all(str(tmp_path / "out"))
  assert [(r["key"], r["captions"], r["label"]) for r in rows] == [  # first-seen order
      ("photos/good.jpg", ["a dog", "a brown dog", "a pet"], -1), ("photos/gray.jpg", ["a gray thing"], -1),
      ("photos/good.jpg", ["a labelled dog"], 1)]
  assert "grouped 4 rows" in capsys.readouterr().out
  csv_path = tmp_path / "lines.csv"
  csv_path.write_text("filepath,title\nphotos/good.jpg,one\nphotos/rgba.png,two\nphotos/good.jpg,three\n")
  report = prepare.convert([str(csv_path)], str(tmp_path / "csv"), verbose=False)
  assert report["written"] == 2 and report["grouped_rows"] == 1
  assert [r["captions"] for r in read_all(str(tmp_path / "csv"))] == [["one", "three"], ["two"]]


def test_caption_that_is_not_text_is_named(tmp_path):
  with pytest.raises(records.BadRecord) as e:
    records.clean_caption({"en": "a dog"})
  assert e.value.reason == "caption_not_text"
  root = tmp_path / "photos"
  write_folder(str(root))
  jsonl_path = tmp_path / "odd.jsonl"
  jsonl_path.write_text("\n".join(json.dumps(row) for row in [
      {"image": "photos/good.jpg", "caption": {"en": "a dog"}},
      {"image": "photos/gray.jpg", "caption": [{"en": "a"}, ["b"]]},
      {"image": "photos/rgba.png", "caption": "  "},
      {"image": "photos/cmyk.jpg", "caption": "kept"}]))
  report = prepare.convert([str(jsonl_path)], str(tmp_path / "out"), verbose=False)
  assert report["written"] == 1 and report["skipped"] == {"caption_not_text": 2, "empty_caption": 1}


def test_prepare_bad_arguments(tmp_path, capsys):
  assert prepare.main(["--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")]) == 2
  assert "no such file or directory" in capsys.readouterr().err
  (tmp_path / "notes.md").write_text("x")
  assert prepare.main(["--input", str(tmp_path / "notes.md"), "--output", str(tmp_path / "o")]) == 2


# ----------------------------------------------------------------------------- sources

def test_digits_dataset():
  train, test = digits.DigitsSource("train"), digits.DigitsSource("test", image_size=64)
  assert len(train) + len(test) == 1797 and len(test) == 359
  assert not set(train.indices) & set(test.indices)
  np.testing.assert_array_equal(test.labels, digits.heldout_labels())
  np.testing.assert_array_equal(digits.split_indices("test"), digits.split_indices("test"))  # fixed
  assert np.bincount(test.labels, minlength=10).min() > 20  # every class is held out
  example = test[0]
  assert example["image"].shape == (64, 64, 3) and example["image"].dtype == np.uint8
  assert example["image"].max() == 255 and example["image"].min() < 100  # ink on white paper
  name = digits.CLASS_NAMES[example["label"]]
  assert len(set(example["captions"])) == len(digits.CAPTION_TEMPLATES)
  assert all(name in c or str(example["label"]) in c for c in example["captions"])
  assert digits.CLASS_NAMES[7] == "seven" and len(digits.CLASS_NAMES) == 10
  with pytest.raises(ValueError, match="splits"):
    digits.DigitsSource("validation")


def test_open_source_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such file"):
    sources.open_source(str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="no .array_record shards"):
    sources.open_source(str(tmp_path))
  with pytest.raises(ValueError, match="TFDS has no dataset named"):
    sources.open_source("tfds:surely_not_a_dataset_name")


@needs_tokenizer
def test_tfds_source_on_mock_cifar10(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6, data_dir=str(tmp_path)):
    source = sources.open_source("tfds:cifar10", "test")
    assert len(source) == 6 and source.class_names is not None and len(source.class_names) == 10
    raw = source[0]
    assert raw["captions"][0] == f"a photo of a {source.class_names[raw['label']]}."
    ds = pipeline.make_pipeline(source, tokenize, batch_size=4, image_size=24, train=False,
                                process_index=0, process_count=1, prefetch_batches=0)
    batches = list(ds)
  assert len(batches) == 2 and batches[0]["image"].shape == (4, 24, 24, 3)
  assert batches[1]["mask"].tolist() == [True, True, False, False]
  labels = np.concatenate([b["label"][b["mask"]] for b in batches])
  assert labels.shape == (6,) and labels.min() >= 0 and labels.max() < 10


def test_tfds_image_text_features_like_coco_captions():
  tfds = pytest.importorskip("tensorflow_datasets")
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)), "id": tfds.features.Text(),
      "captions": tfds.features.Sequence({"id": tfds.features.Scalar(dtype=np.int64),
                                          "text": tfds.features.Text()})})
  assert sources._find_caption(features, tfds, None) == ("captions", "text")
  assert sources._find_feature(features, tfds.features.Image) == "image"
  # coco_captions' builder needs TensorFlow, so read one example through a stand-in data source.
  source = object.__new__(sources.TfdsSource)
  source.name, source.split, source.image_key, source.label_key = "coco_captions", "train", "image", None
  source.caption_path = ("captions", "text")
  source._source = [{"image": rgb(), "id": "x", "captions": {"id": np.arange(2),
                                                             "text": np.array([b"a cat", b"a dog"], object)}}]
  raw = source[0]
  assert raw["captions"] == [b"a cat", b"a dog"] and raw["label"] == -1
  assert sources._find_caption(tfds.features.FeaturesDict({"id": tfds.features.Text()}), tfds, None) is None


# ----------------------------------------------------------------------------- pipeline

class ListSource:
  """In-memory raw records: image i is filled with the value i so a test can tell them apart."""

  def __init__(self, n, bad=()):
    self.n, self.bad = n, set(bad)

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if i in self.bad:
      return {"image": b"broken", "captions": [f"number {i}"], "label": i % 10, "key": str(i)}
    return {"image": np.full((12, 10, 3), i, np.uint8), "captions": [f"number {i}", f"item {i}"],
            "label": i % 10, "key": str(i)}


def fake_tokenize(texts, context_length=8):
  out = np.zeros((len(texts), context_length), np.int32)
  for row, text in enumerate(texts):
    ids = [ord(c) for c in text][:context_length]
    out[row, :len(ids)] = ids
  return out


def make(source, **kwargs):
  options = dict(batch_size=4, image_size=8, train=True, process_index=0, process_count=1,
                 prefetch_batches=0, read_threads=0)
  options.update(kwargs)
  return pipeline.make_pipeline(source, options.pop("tokenizer", fake_tokenize), **options)


def take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def assert_same(batches_a, batches_b):
  for a, b in zip(batches_a, batches_b, strict=True):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_pipeline_batches_and_determinism():
  batches = take(make(ListSource(20), seed=3), 3)
  batch = batches[0]
  assert batch["image"].shape == (4, 8, 8, 3) and batch["image"].dtype == np.float32
  assert batch["tokens"].shape == (4, 8) and batch["tokens"].dtype == np.int32
  assert batch["mask"].all() and batch["label"].tolist() == (batch["index"] % 10).tolist()
  # Normalized pixels of the constant image i: (i / 255 - mean) / std.
  i = int(batch["index"][0])
  expected = (i / 255.0 - np.asarray(images.OPENAI_MEAN)) / np.asarray(images.OPENAI_STD)
  np.testing.assert_allclose(batch["image"][0, 3, 3], expected, rtol=1e-4, atol=0.02)
  assert_same(batches, take(make(ListSource(20), seed=3, read_threads=2, prefetch_batches=2), 3))
  other = take(make(ListSource(20), seed=4), 3)
  assert any(not np.array_equal(a["index"], b["index"]) for a, b in zip(batches, other))


def test_pipeline_reshuffles_each_epoch():
  batches = take(make(ListSource(12), batch_size=6), 4)
  epoch1 = np.concatenate([b["index"] for b in batches[:2]])
  epoch2 = np.concatenate([b["index"] for b in batches[2:]])
  assert sorted(epoch1) == sorted(epoch2) == list(range(12))
  assert epoch1.tolist() != epoch2.tolist()
  finite = list(make(ListSource(12), batch_size=5, num_epochs=2))
  assert len(finite) == 4  # 24 examples, the last 4 dropped with the remainder
  per_process = [list(make(ListSource(13), batch_size=3, num_epochs=1, process_index=p, process_count=2))
                 for p in range(2)]
  assert len(per_process[0]) == len(per_process[1]) == 2  # 13 records: 6 each, not 7 and 6


def test_pipeline_process_shards_are_disjoint_and_cover():
  shards = [np.concatenate([b["index"] for b in take(make(ListSource(20), process_index=p, process_count=2,
                                                          seed=7), 5)]) for p in range(2)]
  assert len(shards[0]) == len(shards[1]) == 20
  first_epoch = [s[:10] for s in shards]
  assert not set(first_epoch[0]) & set(first_epoch[1])
  assert sorted(np.concatenate(first_epoch)) == list(range(20))
  # The two processes share one global order: interleaving them gives the single-process order.
  single = np.concatenate([b["index"] for b in take(make(ListSource(20), seed=7), 5)])
  np.testing.assert_array_equal(np.stack(first_epoch, 1).reshape(-1), single)


def test_pipeline_checkpoint_resumes_at_exact_next_batch():
  ds = make(ListSource(20, bad={5}), seed=1, prefetch_batches=2, read_threads=2)
  it = iter(ds)
  for _ in range(6):  # past an epoch boundary and past the bad record
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint holds
  expected = [next(it) for _ in range(3)]
  resumed = iter(ds)
  resumed.set_state(state)
  assert_same(expected, [next(resumed) for _ in range(3)])
  assert pipeline.quality_counts(resumed) == pipeline.quality_counts(it)
  assert pipeline.quality_counts(it)["skipped"] == {"corrupt_image": 2}  # once per epoch, 2 epochs
  it.close(), resumed.close()


def test_pipeline_filters_bad_records_in_training_and_masks_them_in_eval():
  bad = {1, 4, 9}
  train_batches = take(make(ListSource(12, bad=bad), batch_size=3), 3)
  seen = np.concatenate([b["index"] for b in train_batches])
  assert len(seen) == 9 and not set(seen) & bad  # batches stay full
  eval_ds = make(ListSource(12, bad=bad), batch_size=5, train=False, process_count=2, process_index=1)
  it = iter(eval_ds)
  eval_batches = list(it)
  assert len(eval_batches) == pipeline.eval_num_batches(12, 5, 2) == 2
  valid = np.concatenate([b["index"][b["mask"]] for b in eval_batches])
  assert sorted(valid) == [i for i in range(1, 12, 2) if i not in bad]
  assert pipeline.quality_counts(it) == {"skipped": {"corrupt_image": 2}, "repaired": {}}


def test_pipeline_survives_a_source_that_raises():
  class FlakySource(ListSource):
    def __getitem__(self, i):
      if i == 3:
        raise OSError("disk hiccup")
      return super().__getitem__(i)
  it = iter(make(FlakySource(8), batch_size=7, num_epochs=1))
  (batch,) = list(it)
  assert sorted(batch["index"].tolist()) == [0, 1, 2, 4, 5, 6, 7]
  assert pipeline.quality_counts(it)["skipped"] == {"processing_error": 1}


def test_pipeline_refuses_to_spin_on_data_that_is_all_bad():
  with pytest.raises(ValueError, match="records in a row were unusable"):
    take(make(ListSource(10, bad=range(10))), 1)


def test_pipeline_eval_covers_every_record_once_across_processes():
  per_process = [list(make(ListSource(23), batch_size=5, train=False, process_index=p, process_count=2))
                 for p in range(2)]
  assert len(per_process[0]) == len(per_process[1]) == 3  # equal counts: no process waits in a collective
  valid = np.concatenate([b["index"][b["mask"]] for batches in per_process for b in batches])
  assert sorted(valid) == list(range(23))
  first = per_process[0][0]
  assert first["tokens"][0].tolist()[:6] == [ord(c) for c in "number"]  # eval uses the first caption


def test_pipeline_on_written_shards_with_bad_records(tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter
  files = image_files()
  entries = [records.encode_record(files["good.jpg"], "fine"),
             records.encode_record(files["truncated.jpg"], "truncated"),
             b"not a record at all",
             records.encode_record(files["rgba.png"], "x" * 5000),
             records.encode_record(files["good.jpg"], "  "),
             records.encode_record(files["gray16.png"], "sixteen bits")]
  writer = ArrayRecordWriter(str(tmp_path / "data-00000-of-00001.array_record"), "group_size:1")
  for entry in entries:
    writer.write(entry)
  writer.close()
  it = iter(make(sources.open_source(str(tmp_path)), batch_size=3, num_epochs=1))
  (batch,) = list(it)
  assert sorted(batch["index"].tolist()) == [0, 3, 5]
  assert pipeline.quality_counts(it) == {
      "skipped": {"corrupt_image": 1, "corrupt_record": 1, "empty_caption": 1},
      "repaired": {"caption_truncated": 1, "mode_I;16": 1, "mode_RGBA": 1}}


@needs_tokenizer
@pytest.mark.slow  # ~8 s at low load: kept out of the fast subset (< 5 min)
def test_pipeline_digits_with_worker_processes_matches_in_process():
  source = digits.DigitsSource("train")
  kwargs = dict(tokenizer=tokenize, batch_size=8, image_size=32, seed=0)
  in_process = take(make(source, **kwargs), 2)
  ds = make(source, num_workers=2, **kwargs)
  it = iter(ds)
  with_workers = [next(it) for _ in range(2)]
  assert_same(in_process, with_workers)
  state = it.get_state()
  expected = next(it)
  it.close()
  resumed = iter(ds)
  resumed.set_state(state)
  assert_same([expected], [next(resumed)])
  resumed.close()
  assert with_workers[0]["tokens"][0, 0] == 49406  # CLIP's start-of-text


# ----------------------------------------------------------------------------- global arrays

def test_to_global_batch_on_8_devices():
  import jax
  from jax.sharding import AxisType, PartitionSpec
  assert jax.device_count() == 8
  batch = {"image": np.arange(16 * 2 * 2 * 3, dtype=np.float32).reshape(16, 2, 2, 3),
           "tokens": np.arange(16 * 5, dtype=np.int32).reshape(16, 5)}
  for shape, names, spec in (((8,), ("data",), ("data",)),
                             ((2, 2, 2), ("data", "fsdp", "tensor"), (("data", "fsdp"),))):
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))
    global_batch = pipeline.to_global_batch(batch, mesh)
    for key, array in global_batch.items():
      assert array.shape == batch[key].shape and array.sharding.spec == PartitionSpec(*spec)
      np.testing.assert_array_equal(np.asarray(array), batch[key])
      rows = 16 // (8 if len(shape) == 1 else 4)
      for shard in array.addressable_shards:
        assert shard.data.shape[0] == rows
        np.testing.assert_array_equal(np.asarray(shard.data), batch[key][shard.index])
