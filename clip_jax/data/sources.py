"""Random-access sources of raw image-text records, and the one place that picks among them.

Every source maps an index to a raw record, a dict:
  {'image': encoded bytes or a uint8 array, 'captions': [str or UTF-8 bytes, ...] (training draws one
   per read), 'label': int (-1: none), 'key': str}
or, when the stored record itself is unreadable, {'skip': reason, 'key': str}. Decoding, caption
choice, augmentation and tokenization happen later, in the pipeline's workers.

A data spec names the source ('{split}' in a path is replaced by the split name first):
  'digits'              the embedded handwritten digits (clip_jax.data.digits), no download
  'tfds:NAME[/CONFIG]'  any TFDS dataset prepared as array_record (tfds.data_source)
  a path to ArrayRecord shards from `python -m clip_jax.data.prepare`: a directory, one file, or a glob
  image-caption data on disk, read as it is (no conversion first):
    webdataset .tar shards (img2dataset's output: KEY.jpg + KEY.txt, or KEY.json's "caption"; a .tar
      file, a glob, a {00000..00009} range or a folder of tars); a KEY.cls label is kept where present
    a .csv/.tsv/.jsonl caption table (open_clip's `filepath,title` CSV; columns by labelled.find_column
      among labelled.PATH_COLUMNS and labelled.CAPTION_COLUMNS; a JSONL caption may be a list)
    a folder of images with their captions in same-name .txt files beside them (photo.jpg + photo.txt)
    see clip_jax/data/captioned.py and, for tars, clip_jax/data/labelled.py
  labelled data on disk (captions from LABEL_CAPTION_TEMPLATES), see clip_jax/data/labelled.py:
    a folder of class sub-folders (ImageFolder layout), a .csv/.tsv/.jsonl of image paths and labels
    (a caption column, if any, gives the rows' captions), webdataset tars with a `cls` member and no
    captions (clip_benchmark's layout)
  Which one: a table with a label column is labelled, else it needs a caption column; a folder is
  captioned when it has no sub-folders or at least half of its images have a .txt (prepare's rule,
  captioned.is_caption_folder), class folders otherwise or when `class_names` are given.
"""
from __future__ import annotations

import glob
import os

import numpy as np

from clip_jax.data.captioned import CaptionFileSource, CaptionFolderSource, is_caption_folder
from clip_jax.data.labelled import (CAPTION_COLUMNS, LABEL_CAPTION_TEMPLATES, CLASSNAMES_FILE, LABEL_COLUMNS,
                                    PATH_COLUMNS, ImageFolderSource, LabelTableSource, WebDatasetSource, find_column,
                                    read_class_names_file, read_table)
from clip_jax.cli import MissingPathError, UserError, did_you_mean
from clip_jax.data.records import BadRecord, decode_record

_CAPTION_FEATURE_NAMES = ("caption", "captions", "text", "texts", "sentences", "description")


class ArrayRecordSource:
  """Records written by clip_jax.data.prepare, read with grain's ArrayRecordDataSource."""

  def __init__(self, path: str):
    self.paths = find_shards(path)
    import grain  # Imported lazily: keeps `import clip_jax.data` light.
    try:
      self._source = grain.sources.ArrayRecordDataSource(self.paths)
    except Exception as e:  # noqa: BLE001 - e.g. "ArrayRecord file should be at least 64KB big" (a text file)
      raise UserError(f"{self.paths[0] if len(self.paths) == 1 else path}: not ArrayRecord shards "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Pass {DATA_FORMS}.") from e
    # `prepare` writes the class names of labelled data beside the shards.
    names_file = os.path.join(os.path.dirname(self.paths[0]), CLASSNAMES_FILE)
    names = read_class_names_file(names_file) if os.path.isfile(names_file) else None
    self.class_names = names if isinstance(names, list) else None

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    key = f"record {index}"
    try:
      header, image_bytes = decode_record(self._source[index])
    except BadRecord as e:
      return {"skip": e.reason, "key": key, "detail": e.detail}
    captions = header.get("caption", "")
    label = header.get("label", -1)
    return {"image": image_bytes, "captions": captions if isinstance(captions, list) else [captions],
            "label": label if isinstance(label, int) else -1, "key": header.get("key") or key}

  def __repr__(self) -> str:
    return f"ArrayRecordSource({len(self.paths)} shards, {len(self)} records)"


def find_shards(path: str) -> list[str]:
  """A directory, a file or a glob -> sorted .array_record paths; a clear error if there are none."""
  if os.path.isdir(path):
    paths = sorted(glob.glob(os.path.join(path, "*.array_record")))
    if not paths:
      raise MissingPathError(f"{path}: directory holds no .array_record shards; write them with "
                              "`python -m clip_jax.data.prepare --input ... --output DIR`.")
    return paths
  if os.path.isfile(path):
    return [path]
  paths = sorted(p for p in glob.glob(path) if os.path.isfile(p))
  if not paths:
    raise MissingPathError(f"{path}: no such file, directory or matching shards. Pass {DATA_FORMS}.")
  shards = [p for p in paths if ".array_record" in os.path.basename(p)]
  return shards or paths  # OUT/* also matches prepare's report.json and classnames.txt beside its shards


DATA_FORMS = ("a folder of class sub-folders or of images with .txt captions, a .csv/.tsv/.jsonl caption or label "
              "table, webdataset .tar shards, "
              ".array_record shards (a folder, file or glob; `python -m clip_jax.data.prepare` writes them), "
              "'tfds:NAME' or 'digits'")


class TfdsSource:
  """A TFDS dataset through `tfds.data_source` (random access over array_record files).

  Image-text datasets (a Text feature named like 'caption(s)', possibly inside a Sequence, as
  in coco_captions) give all their captions; image-label datasets (a ClassLabel, as in cifar10
  or imagenet2012) give captions from `templates` and the label for zero-shot evaluation.
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None, *,
               image_key: str | None = None, caption_key: str | None = None,
               label_key: str | None = None, templates=LABEL_CAPTION_TEMPLATES,
               class_names: list[str] | None = None):
    import tensorflow_datasets as tfds  # Imported lazily: only TFDS sources need it.
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      # Community datasets left out: listing them reads a GCS index (gcsfs/TensorFlow, and a network).
      close = did_you_mean(name, tfds.list_builders(with_community_datasets=False))
      raise UserError(f"TFDS has no dataset named {name!r};{close} check the name against "
                       "https://www.tensorflow.org/datasets/catalog, or pass a path to ArrayRecord shards.") from e
    features = builder.info.features
    self.image_key = image_key or _find_feature(features, tfds.features.Image)
    self.label_key = label_key or _find_feature(features, tfds.features.ClassLabel)
    self.caption_path = _find_caption(features, tfds, caption_key)
    if self.image_key is None:
      raise ValueError(f"TFDS dataset {name!r} has no image feature (features: {list(features)}).")
    if self.caption_path is None and self.label_key is None:
      raise ValueError(f"TFDS dataset {name!r} has neither a caption nor a class label "
                       f"(features: {list(features)}); pass caption_key= or label_key=.")
    self.class_names = None
    if self.label_key is not None:
      names = class_names or features[self.label_key].names
      self.class_names = [n.replace("_", " ") for n in names]
    self.templates = tuple(templates)
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # not prepared, prepared as tfrecord, unknown split: all need the user
      first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise ValueError(f"TFDS dataset {name!r} split {split!r} cannot be read from "
                       f"{builder.data_dir} ({first_line}). Prepare it on a machine with network: "
                       f"`tfds build {name} --file_format=array_record`.") from e
    self.name, self.split = name, split

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    key = f"{self.name}/{self.split}[{index}]"
    try:
      example = self._source[index]
    except Exception as e:  # a damaged shard must not end the run
      return {"skip": "corrupt_record", "key": key, "detail": f"{type(e).__name__}: {e}"}
    label = int(example[self.label_key]) if self.label_key is not None else -1
    if self.caption_path is not None:
      value = example
      for part in self.caption_path:
        value = value[part]
      captions = [_as_text(v) for v in np.asarray(value, dtype=object).reshape(-1)]
    else:
      captions = [t.format(self.class_names[label]) for t in self.templates]
    return {"image": np.asarray(example[self.image_key]), "captions": captions, "label": label,
            "key": key}

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, split={self.split!r}, n={len(self)})"


def _find_feature(features, feature_type) -> str | None:
  for key, feature in features.items():
    if isinstance(feature, feature_type):
      return key
  return None


def _find_caption(features, tfds, caption_key: str | None) -> tuple[str, ...] | None:
  """-> the key path to the caption text, e.g. ('captions', 'text') for coco_captions."""
  if caption_key is not None:
    return tuple(caption_key.split("/"))
  for key in _CAPTION_FEATURE_NAMES:
    feature = features[key] if key in features else None
    if isinstance(feature, tfds.features.Text):
      return (key,)
    inner = getattr(feature, "feature", None)  # Sequence(Text) or Sequence({'text': Text, ...})
    if isinstance(inner, tfds.features.Text):
      return (key,)
    if isinstance(inner, tfds.features.FeaturesDict):
      for sub_key, sub_feature in inner.items():
        if isinstance(sub_feature, tfds.features.Text):
          return (key, sub_key)
  return None


def _as_text(value) -> str | bytes:
  return value if isinstance(value, (str, bytes)) else str(value)


def open_source(spec: str, split: str = "train", *, data_dir: str | None = None,
                image_size: int = 32, class_names=None, labelled: bool = False):
  """A data spec (see the module docstring) -> a random-access source. Errors are raised here,
  at start, with what to do about them (ValueError / FileNotFoundError; the caption sources' are
  already cli.UserError). `class_names` names the classes of labelled data (TFDS, folders, label
  tables, tars); see clip_jax/data/labelled.py for the forms each accepts. `labelled`: the caller
  reads labels (zero-shot, linear probe), so data on disk is read as labelled data whatever captions
  it also carries: a folder is class folders (sidecar .txt files are not images), a table needs a label
  column, tars' captions are not read, and a tar key without `cls` or a table row without a label is
  skipped as 'missing_label'."""
  if spec == "digits":
    from clip_jax.data.digits import DigitsSource
    return DigitsSource(split, image_size=image_size)
  if spec.startswith("tfds:"):
    return TfdsSource(spec[len("tfds:"):], split, data_dir, class_names=class_names)
  path = spec.replace("{split}", split)
  if path.lower().endswith((".csv", ".tsv", ".jsonl")):
    return LabelTableSource(path, class_names, read_captions=False) if labelled else open_table(path, class_names)
  tars = find_tars(path)
  if tars:
    return WebDatasetSource(tars, class_names, read_captions=not labelled)
  if os.path.isdir(path) and not glob.glob(os.path.join(path, "*.array_record")):
    if not labelled and class_names is None and is_caption_folder(path):
      return CaptionFolderSource(path)
    return ImageFolderSource(path, class_names)
  source = ArrayRecordSource(path)
  if class_names is not None:
    source.class_names = list(class_names)
  return source


def open_table(path: str, class_names=None):
  """A .csv/.tsv/.jsonl -> a LabelTableSource when it has a label column that some row fills (its caption
  column, if any, gives the captions), else a CaptionFileSource; UserError when it has neither column."""
  if not os.path.isfile(path):
    raise MissingPathError(f"{path}: no such file.")
  table = read_table(path)  # read once: the source built from it takes it as it is
  row_counts, _ = table
  label_column = find_column(row_counts, None, LABEL_COLUMNS)
  if label_column is not None and row_counts[label_column] > 0:  # a header alone, every cell blank: no labels
    return LabelTableSource(path, class_names, table=table)
  if find_column(row_counts, None, CAPTION_COLUMNS) is not None:
    return CaptionFileSource(path, table=table)
  raise UserError(f"{path}: no caption or label column among {list(row_counts)}; an image-caption table needs "
                  f"an image column ({', '.join(PATH_COLUMNS)}) and a caption column ({', '.join(CAPTION_COLUMNS)}); "
                  f"a labelled one a label column ({', '.join(LABEL_COLUMNS)}) instead.")


def find_tars(path: str) -> list[str]:
  """webdataset shards named by `path` (a .tar file, a glob or {a..b} range of them, or a folder that
  holds .tar files and no .array_record shards: `prepare.folder_tars`, which refuses shards beside
  images or sub-folders), sorted; [] when it names none."""
  if os.path.isdir(path):
    if glob.glob(os.path.join(path, "*.array_record")):
      return []
    from clip_jax.data.prepare import folder_tars  # the converter's rule: shards alone, not beside images
    return folder_tars(path)
  if not path.endswith(".tar"):
    return []
  from clip_jax.data.prepare import expand_braces  # the same {000..009} rule as the converter
  patterns = expand_braces(path)
  # A shard named exactly (a file or a {a..b} range) must be there, as `prepare` requires: a range
  # reaching past the shards written would otherwise train on a fraction of the data without a word.
  missing = [p for p in patterns if not glob.has_magic(p) and not os.path.isfile(p)]
  if missing:
    raise MissingPathError(f"{path}: {len(missing)} of the {len(patterns)} shards it names "
                           f"{'is' if len(missing) == 1 else 'are'} missing (e.g. {missing[0]}); name the shards that exist.")
  return sorted(p for pattern in patterns for p in (glob.glob(pattern) or [pattern]) if os.path.isfile(p))
