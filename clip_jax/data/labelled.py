"""Labelled image collections as people keep them on disk, as random-access sources (see sources.py
for the record format): the sources of zero-shot classification and linear probes on one's own data.

  class folders   ROOT/CLASS/.../image.jpg (torchvision's ImageFolder layout): one class per
                  sub-folder of ROOT, label = the folder's index in sorted order (ImageFolder's
                  `class_to_idx`), class name = the folder name with '_' read as a space
  a label table   a .csv / .tsv / .jsonl file with one row per image: an image-path column
                  (path / filepath / file_path / image / image_path / file / filename, or `path_column`)
                  and a label column (label / class / class_name / cls / target / category, or
                  `label_column`); the label is a class index or a class name; relative paths are
                  resolved against the file's folder. A caption column (CAPTION_COLUMNS), where
                  there is one, gives a row's training captions (templates otherwise). Other
                  columns are ignored. Where several
                  candidates are present, the one most rows fill is taken, ties in the order above
                  (`find_column`; `clip_jax.data.prepare` reads tables by the same rule).
  webdataset tars members KEY.jpg|png|webp|... + KEY.cls (the class index as text) grouped by KEY;
                  clip_benchmark's layout, whose `classnames.txt` beside the tars (or one folder up)
                  names the classes. Tars whose samples carry captions (KEY.txt, or KEY.json's
                  "caption": img2dataset's output) are caption data: a key's caption is used, its
                  label is optional (-1 without), a key with neither is skipped ('missing_caption')

What is wrong with the data is counted, never fatal: at scan time (`problems`, reason -> count, with
the first few names in `problem_examples`): non-image files, empty class folders, files of one
folder whose names differ only in extension (kept, both), class names that collide, rows with a
missing file or an unknown label, tar members without an image or a label (or, in caption tars, without
a caption). Unreadable images are counted later by the pipeline, as for every source. Image-caption data
without labels (caption tables, folders of images with sidecar .txt captions) is read by
clip_jax/data/captioned.py.
"""
from __future__ import annotations

import collections
import csv
import io
import json
import os
import tarfile
from typing import Mapping, Sequence

from absl import logging

from clip_jax.data.records import with_escaped_bytes

# torchvision's ImageFolder extensions, plus the formats the pipeline decodes anyway.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
PATH_COLUMNS = ("path", "filepath", "file_path", "image", "image_path", "file", "filename")
LABEL_COLUMNS = ("label", "class", "class_name", "cls", "target", "category")
# A caption column's names, for training tables (clip_jax.data.prepare) and retrieval's caption files
# alike; a cell holds one caption or (JSONL) a list of them.
CAPTION_COLUMNS = ("caption", "captions", "text", "title", "txt", "description")
CLASSNAMES_FILE = "classnames.txt"
_EXAMPLES_KEPT = 5

# Captions for image-label data (cifar10, imagenet2012, class folders, ...), `{}` is the class name:
# what a labelled source gives the training pipeline. Zero-shot prompts are chosen separately.
LABEL_CAPTION_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a close-up photo of the {}.",
    "a picture of a {}.",
    "a low resolution photo of a {}.",
)

ClassNames = Sequence[str] | Mapping[str, str] | None
# Problems that leave no image out (both files of a name collision are kept; colliding class names
# stay separate classes): reported, not skipped.
KEPT_PROBLEMS = ("name_collision", "class_name_collision")


def is_image_file(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def display_name(folder: str) -> str:
  """A class folder's name as a prompt reads it: 'golden_retriever' -> 'golden retriever'; bytes of
  the name that are not UTF-8 are written as \\xNN (`records.with_escaped_bytes`)."""
  return " ".join(with_escaped_bytes(folder).replace("_", " ").split())


class Problems:
  """Scan-time counts per reason, with the first few names of each."""

  def __init__(self):
    self.counts: collections.Counter = collections.Counter()
    self.examples: dict[str, list[str]] = {}

  def add(self, reason: str, name: str, count: int = 1) -> None:
    self.counts[reason] += count
    kept = self.examples.setdefault(reason, [])
    if len(kept) < _EXAMPLES_KEPT:
      kept.append(with_escaped_bytes(name))  # reports are UTF-8 files

  def log(self, where: str) -> None:
    for reason, count in sorted(self.counts.items()):
      logging.warning("%s: %d x %s (e.g. %s)", where, count, reason, ", ".join(self.examples[reason][:3]))


class LabelledFiles:
  """Base of the file-backed sources: parallel lists of paths (or tar spans), labels and keys.

  A record whose scan already failed (missing file, unknown label) stays in the list as a
  {'skip': reason} record, so that it is counted with the unreadable images.
  """
  class_names: list[str]
  templates: tuple[str, ...]
  _captions: list[list[str]] | None = None  # per record, a table's own captions ([]: none, templates instead)

  def _init_records(self, entries, class_names, problems: Problems, where: str, templates):
    self._entries = entries  # [(locator, label, key, skip reason or None)]
    self.class_names = list(class_names)
    self.templates = tuple(templates or LABEL_CAPTION_TEMPLATES)
    for name in _colliding_names(self.class_names):
      problems.add("class_name_collision", name)
    self.problems, self.problem_examples = dict(sorted(problems.counts.items())), problems.examples
    self.where = where
    problems.log(where)

  def __len__(self) -> int:
    return len(self._entries)

  def templated_captions(self) -> bool:
    """Whether records are captioned from `templates` of their class name (no caption of their own)."""
    return self._captions is None and not getattr(self, "has_captions", False)

  def record_key(self, index: int) -> str:
    """The record's name (its path below the root, or tar/key), without reading it; bytes of a file
    name that are not UTF-8 written as \\xNN."""
    return with_escaped_bytes(self._entries[index][2])

  def _read(self, locator) -> bytes:
    with open(locator, "rb") as f:
      return f.read()

  def __getitem__(self, index: int) -> dict:
    locator, label, key, skip = self._entries[index]
    if skip is not None:
      return {"skip": skip, "key": key, "detail": str(locator)}
    try:
      data = self._read(locator)
    except OSError as e:
      return {"skip": "unreadable_file", "key": key, "detail": f"{type(e).__name__}: {e}"}
    own = self._captions[index] if self._captions is not None else None
    if own:
      return {"image": data, "captions": own, "label": label, "key": key}
    name = self.class_names[label] if 0 <= label < len(self.class_names) else str(label)
    return {"image": data, "captions": [t.format(name) for t in self.templates], "label": label, "key": key}

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.where!r}, {len(self)} images, {len(self.class_names)} classes)"


def _colliding_names(class_names: Sequence[str]) -> list[str]:
  """Class names that two or more classes share (case and spacing aside): their prompts are the
  same, so zero-shot cannot tell them apart."""
  seen = collections.Counter(" ".join(n.lower().split()) for n in class_names)
  return sorted(n for n, count in seen.items() if count > 1)


def names_for_folders(folders: Sequence[str], class_names: ClassNames, where: str) -> list[str]:
  """Class names of sorted class folders: their own (display_name), a list in folder order, or
  {folder: name} (folders it leaves out keep their own). Raises ValueError on a mismatch."""
  if class_names is None:
    return [display_name(f) for f in folders]
  if isinstance(class_names, Mapping):  # {folder: name}; folders it does not name keep their own
    unknown = sorted(set(class_names) - set(folders))
    if unknown:
      raise ValueError(f"{where}: the class names name folders that are not there: {unknown[:5]} "
                       f"(folders: {list(folders)[:5]}...).")
    own = [f for f in folders if f not in class_names]
    if own:  # documented, and still said: a typo'd key would otherwise pass silently
      logging.warning("%s: the class names name %d of %d folders; the others keep their own names: %s", where,
                      len(folders) - len(own), len(folders), ", ".join(own[:5]) + (" ..." if len(own) > 5 else ""))
    return [class_names.get(f, display_name(f)) for f in folders]
  if len(class_names) != len(folders):
    raise ValueError(f"{where}: {len(folders)} class folders but {len(class_names)} class names; give one "
                     "name per folder, in sorted folder order, or a JSON object {folder: name}.")
  for own in (list(folders), [display_name(f) for f in folders]):
    if _reordered(class_names, own, where, "the class folders' own names"):
      return own
  renamed = [(f, n) for f, n in zip(folders, class_names) if display_name(f).lower() != " ".join(str(n).lower().split())]
  if renamed:  # by position, as documented (ImageNet's sorted wnid folders), but said: plane/car would be misread
    logging.warning("%s: %d of %d class folders take a listed name by position (sorted folder order): %s; give a "
                    "JSON object {folder: name} to name them by folder instead.", where, len(renamed), len(folders),
                    ", ".join(f"{f} -> {n}" for f, n in renamed[:4]) + (" ..." if len(renamed) > 4 else ""))
  return list(class_names)


def same_names_reordered(given: Sequence[str], own: Sequence[str]) -> bool:
  """Whether a positional list of class names holds exactly `own`'s names in another order (a list
  in the order its author thought of, e.g. zero..nine for sorted folders eight, five, ...): read by
  position it would give each class another's name, silently."""
  return list(given) != list(own) and sorted(given) == sorted(own)


def _reordered(given: Sequence[str], own: Sequence[str], where: str, what: str) -> bool:
  """`same_names_reordered`, said in a warning where true (the caller then takes `own`)."""
  if not same_names_reordered(given, own):
    return False
  logging.warning("%s: the class names are %s in another order; each class keeps its own name (a list is read "
                  "by position: sorted folder order, or the label index of tars).", where, what)
  return True


class ImageFolderSource(LabelledFiles):
  """ROOT/CLASS/**/image files (torchvision's ImageFolder layout); see the module docstring.

  `class_names`: None (the folder names), a list in sorted folder order (the folders' own names in
  another order are matched by name, with a warning: `names_for_folders`), or {folder: name}.
  Raises FileNotFoundError when ROOT has no sub-folder.
  """

  def __init__(self, root: str, class_names: ClassNames = None, templates: Sequence[str] | None = None):
    folders, entries, problems = scan_image_folder(root)
    self.root, self.folders = root, folders
    self._init_records(entries, names_for_folders(folders, class_names, root), problems, root, templates)


def scan_image_folder(root: str) -> tuple[list[str], list, Problems]:
  """-> (sorted class folder names, [(path, label, key, None)], problems). Follows ImageFolder: every
  image file below a class folder (recursively, sorted) is one example of that class."""
  problems = Problems()
  try:
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir())
  except OSError as e:
    raise FileNotFoundError(f"{root}: cannot list the folder ({e}).") from e
  if not folders:
    raise FileNotFoundError(f"{root}: holds no class sub-folders (ROOT/CLASS/image.jpg), no .array_record "
                            "shards and no .tar shards.")
  for entry in os.scandir(root):
    if entry.is_file():
      problems.add("outside_class_folder", entry.name)
  entries = []
  for label, folder in enumerate(folders):
    count = 0
    for directory, subfolders, files in os.walk(os.path.join(root, folder), followlinks=True):
      subfolders.sort()
      stems = collections.Counter()
      for name in sorted(files):
        relative = os.path.relpath(os.path.join(directory, name), root)
        if not is_image_file(name):
          problems.add("not_an_image", relative)
          continue
        stems[os.path.splitext(name)[0]] += 1
        entries.append((os.path.join(directory, name), label, relative, None))
        count += 1
      for stem, n in sorted(stems.items()):
        if n > 1:  # 'a.jpg' and 'a.png': both kept, but keys without extension (webdataset's) would clash
          problems.add("name_collision", os.path.relpath(os.path.join(directory, stem), root) + ".*", n)
    if count == 0:
      problems.add("empty_class_folder", folder)
  return folders, entries, problems


def read_class_names_file(path: str) -> list[str] | dict[str, str]:
  """A class-name file: JSON (a list, or an object {folder or label: name}) or one name per line
  (blank lines and lines starting with '#' ignored). Raises ValueError when it names nothing."""
  text = read_text(path)
  if path.lower().endswith(".json") or text.lstrip().startswith(("[", "{")):
    try:
      names = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e}).") from e
    if isinstance(names, dict):
      names = {str(k): str(v) for k, v in names.items()}
    elif isinstance(names, list) and all(isinstance(n, str) for n in names):
      names = list(names)
    else:
      raise ValueError(f"{path}: JSON class names must be a list of strings or an object {{folder: name}}.")
  else:
    names = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
  if not names:
    raise ValueError(f"{path}: names no classes.")
  return names


class LabelTableSource(LabelledFiles):
  """A .csv / .tsv / .jsonl of image paths and labels (see the module docstring).

  Labels: a value equal to one of `class_names` is that class; otherwise an integer is a class
  index. Without `class_names`, integer labels are indices (names '0', '1', ...) and other labels
  are class names, sorted. A row whose file is missing or whose label is unknown is a skipped
  record (counted); an unreadable table or a missing column raises ValueError. A caption column
  (`caption_column`, or the CAPTION_COLUMNS one `find_column` picks), where present, gives the
  training captions of the rows that fill it (`caption_list`); the others get `templates`.
  `table`: `read_table(path)`'s result when the caller has read it already (sources.open_table).
  A row with a caption but no label is an unlabelled training record (label -1, as `prepare` keeps it);
  with `read_captions=False` (evaluation reads labels) it is skipped as 'missing_label', as is a row
  with neither.
  """

  def __init__(self, path: str, class_names: Sequence[str] | None = None, *, path_column: str | None = None,
               label_column: str | None = None, caption_column: str | None = None,
               templates: Sequence[str] | None = None, table: tuple | None = None, read_captions: bool = True):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: no such label file.")
    if isinstance(class_names, Mapping):
      raise ValueError(f"{path}: class names for a label table are a list (index order), not an object.")
    row_counts, rows = table if table is not None else read_table(path)
    path_col = pick_column(row_counts, path_column, PATH_COLUMNS, "path", path)
    label_col = pick_column(row_counts, label_column, LABEL_COLUMNS, "label", path)
    caption_col = find_column(row_counts, caption_column, CAPTION_COLUMNS)
    labels = [label_text(row.get(label_col)) if isinstance(row, dict) else "" for _, row in rows]
    names = list(class_names) if class_names else _names_from_labels(labels)
    index_of = {n: i for i, n in enumerate(names)}
    base = os.path.dirname(os.path.abspath(path))
    problems, entries, captions = Problems(), [], []
    for (where, row), written_label in zip(rows, labels):
      image = row.get(path_col) if isinstance(row, dict) else None
      captions.append(caption_list(row.get(caption_col)) if caption_col and isinstance(row, dict) else [])
      if not isinstance(image, str) or not image.strip():
        problems.add("malformed_row", where)
        entries.append((where, -1, where, "malformed_row"))
        continue
      full = image.strip() if os.path.isabs(image.strip()) else os.path.join(base, image.strip())
      label = index_of.get(written_label)
      if label is None and written_label.lstrip("-").isdigit() and 0 <= int(written_label) < len(names):
        label = int(written_label)
      if label is None and not written_label and read_captions and captions[-1]:
        label = -1  # a captioned row without a label: an unlabelled training record, as `prepare` keeps it
      if label is None:
        reason = "unknown_label" if written_label else "missing_label"
        problems.add(reason, f"{where} ({written_label!r})" if written_label else where)
        entries.append((full, -1, image.strip(), reason))
      elif not os.path.isfile(full):
        problems.add("missing_file", image.strip())
        entries.append((full, label, image.strip(), "missing_file"))
      else:
        entries.append((full, label, image.strip(), None))
    if not entries:
      raise ValueError(f"{path}: lists no images.")
    self.path = path
    self._captions = captions if any(captions) else None
    self._init_records(entries, names, problems, path, templates)


def label_text(value) -> str:
  """A table cell's label as text: stripped; "" for a missing, list or object value."""
  return "" if value is None or isinstance(value, (dict, list)) else str(value).strip()


def caption_list(value) -> list[str]:
  """A table cell's captions: one text, or a JSONL list of them (COCO's five per image); numbers read as
  text; blank, missing and other values give none. Cleaned later, by the pipeline (records.clean_caption)."""
  values = value if isinstance(value, list) else [value]
  texts = [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in values]
  return [t for t in texts if isinstance(t, str) and t.strip()]


def _names_from_labels(labels: Sequence[str]) -> list[str]:
  present = [label for label in labels if label]
  if present and all(label.lstrip("-").isdigit() for label in present):
    return [str(i) for i in range(max(int(label) for label in present) + 1)]
  return sorted(set(present))


def find_column(row_counts: Mapping[str, int], explicit: str | None, choices: Sequence[str]) -> str | None:
  """The column of a table that holds one kind of value, or None: `explicit` if the table has it;
  otherwise, of the `choices` present, the one the most rows fill (JSONL rows may differ), ties in
  the order of `choices`. `row_counts`: column name -> how many rows give it a value (`read_table`)."""
  if explicit:
    return explicit if explicit in row_counts else None
  present = [choice for choice in choices if choice in row_counts]
  return max(present, key=lambda choice: row_counts[choice], default=None)  # max keeps the first of equals


def pick_column(row_counts: Mapping[str, int], explicit: str | None, choices: Sequence[str], what: str, path: str,
                how_to_name: str = "") -> str:
  """`find_column`, raising ValueError (naming the table's columns) where there is none."""
  column = find_column(row_counts, explicit, choices)
  if column is not None:
    return column
  if explicit:
    raise ValueError(f"{path}: has no column {explicit!r} (columns: {list(row_counts)}).")
  raise ValueError(f"{path}: no {what} column among {list(row_counts)}; expected one of {', '.join(choices)}"
                   f"{how_to_name}.")


def read_text(path: str, undecodable: str = "strict") -> str:
  """A text file people write (a table, class names, prompt templates) as UTF-8, with or without the
  byte-order mark Windows editors and spreadsheets put first. `undecodable` as for bytes.decode;
  "strict" raises ValueError naming the first line that is not UTF-8."""
  with open(path, "rb") as f:
    data = f.read()
  data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data  # the mark, so that offsets count from the text
  try:
    return data.decode("utf-8", errors=undecodable)
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise ValueError(f"{path}: line {line} is not UTF-8 text (byte {data[e.start]:#04x}); save the file as "
                     "UTF-8.") from None


def read_table(path: str, undecodable: str = "strict") -> tuple[dict[str, int], list[tuple[str, dict | None]]]:
  """A .csv / .tsv / .jsonl table: (column name -> how many rows give it a value, [(where, row or None)]),
  `where` being "file:line" and None a JSONL line that is not a JSON object. Read as UTF-8 with or
  without the byte-order mark spreadsheets write ("CSV UTF-8"). `undecodable`: "strict" raises
  ValueError naming the first line that is not UTF-8; "surrogateescape" keeps such bytes as lone
  surrogates for the caller to count (`clip_jax.data.prepare`)."""
  text = read_text(path, undecodable)
  name = os.path.basename(path)
  rows = []
  if path.lower().endswith((".jsonl", ".json")):
    for line_number, line in enumerate(io.StringIO(text, newline=None), start=1):  # \r\n and \r end lines too
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        row = None
      rows.append((f"{name}:{line_number}", row if isinstance(row, dict) else None))
    return _filled_counts(rows), rows
  reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if path.lower().endswith(".tsv") else ",")
  rows = [(f"{name}:{line_number}", row) for line_number, row in enumerate(reader, start=2)]
  return _filled_counts(rows, reader.fieldnames or []), rows


def _filled_counts(rows, columns=()) -> dict[str, int]:
  """Column name -> how many rows give it a value (not missing, None or blank); `columns` (a CSV's
  header) are listed even where no row fills them."""
  counts = dict.fromkeys(columns, 0)
  for _, row in rows:
    for key, value in (row or {}).items():
      if key is not None and value is not None and not (isinstance(value, str) and not value.strip()):
        counts[key] = counts.get(key, 0) + 1
  return counts


# ----------------------------------------------------------------------------- webdataset tars
def tar_key(member_name: str) -> tuple[str, str]:
  """webdataset's grouping: the key is the path up to the first dot of the basename, the rest the field."""
  folder, base = os.path.split(member_name)
  stem, _, field = base.partition(".")
  return os.path.join(folder, stem), field.lower()


class WebDatasetSource(LabelledFiles):
  """Uncompressed webdataset tar shards with an image and a `cls` member per key, or a caption
  (KEY.txt, or KEY.json's "caption"; see the module docstring). The tars are indexed once (headers,
  and the small `cls` members); reads seek to the image's bytes and the caption's.

  `class_names`: a list in label order; None reads `classnames.txt` beside the tars or one folder
  up (clip_benchmark's layout), else the names are the label indices. `has_captions`: whether the
  tars are caption data (labels optional): a key has a .txt caption, or no key has a `cls` label and
  some have .json metadata (img2dataset's "caption"); .json beside `cls` labels is metadata, and
  such tars stay labelled data. `read_captions=False` (evaluation reads labels): labelled data always.
  """

  def __init__(self, paths: Sequence[str], class_names: Sequence[str] | None = None,
               templates: Sequence[str] | None = None, read_captions: bool = True):
    if not paths:
      raise FileNotFoundError("no .tar shards given.")
    problems, indexed = Problems(), []
    for path in paths:
      indexed.extend(_index_tar(path, problems))
    # Caption data (img2dataset's tars) needs no label; labelled data (clip_benchmark's) needs one.
    usable = [(label, caption_members) for _, label, _, skip, caption_members in indexed if skip is None]
    # (a stray .txt without its image does not make caption data)
    any_label = any(label is not None for label, _ in usable)
    self.has_captions = read_captions and (any(txt is not None for _, (txt, _) in usable) or (
        not any_label and any(json_member is not None for _, (_, json_member) in usable)))
    self._caption_members = [caption_members for *_, caption_members in indexed] if self.has_captions else None
    names_file = find_classnames_file(paths[0])
    try:
      own_names = read_class_names_file(names_file) if names_file else None
    except ValueError:
      if class_names is None:
        raise
      own_names = None  # the given names replace a file that does not read
    if isinstance(class_names, Mapping):
      raise ValueError("class names for webdataset tars are a list (index order), not an object.")
    if class_names is None:
      class_names = own_names
    elif isinstance(own_names, list) and _reordered(class_names, own_names, paths[0], f"those of {names_file}"):
      class_names = own_names
    labels = [label for _, label, _, skip, _ in indexed if skip is None and label is not None]
    names = list(class_names) if class_names else [str(i) for i in range(max(labels, default=-1) + 1)]
    checked = []
    for locator, label, key, skip, _ in indexed:
      if skip is None and label is None:  # caption data: an unlabelled record (-1); labelled data: skipped
        label = -1
        if not self.has_captions:
          problems.add("missing_label", key)
          skip = "missing_label"
      elif skip is None and not 0 <= label < len(names):
        problems.add("unknown_label", f"{key} ({label})")
        skip = "unknown_label"
      checked.append((locator, label, key, skip))
    self.paths = list(paths)
    self._init_records(checked, names, problems, os.path.dirname(paths[0]) or ".", templates)

  def _read(self, locator) -> bytes:
    path, offset, size = locator
    with open(path, "rb") as f:
      f.seek(offset)
      data = f.read(size)
    if len(data) != size:
      raise OSError(f"{path} is cut short inside this member")
    return data

  def __getitem__(self, index: int) -> dict:
    """A labelled record (template captions) or, in caption tars, the key's own caption: KEY.txt's
    bytes (decoded and cleaned by the pipeline), else KEY.json's "caption" (text or a list); a key
    with neither caption nor label is {'skip': 'missing_caption'}."""
    record = super().__getitem__(index)
    if "skip" in record or self._caption_members is None:
      return record
    try:
      captions = self._read_caption(*self._caption_members[index])
    except OSError as e:
      return {"skip": "unreadable_file", "key": record["key"], "detail": f"{type(e).__name__}: {e}"}
    if captions:
      record["captions"] = captions
    elif record["label"] < 0:
      return {"skip": "missing_caption", "key": record["key"], "detail": "neither a .txt caption, a .json "
              "'caption' nor a .cls label"}
    return record

  def __repr__(self) -> str:
    if not self.has_captions:
      return super().__repr__()
    classes = f"{len(self.class_names)} classes" if self.class_names else "no class labels"  # caption data needs none
    return f"WebDatasetSource({self.where!r}, {len(self)} captioned images, {classes})"

  def _read_caption(self, txt, json_member) -> list:
    if txt is not None:
      return [self._read(txt)]
    if json_member is None:
      return []
    try:
      meta = json.loads(self._read(json_member))
    except (json.JSONDecodeError, UnicodeDecodeError):
      return []  # img2dataset's metadata is optional; a broken one leaves the key uncaptioned
    return caption_list(meta.get("caption")) if isinstance(meta, dict) else []


def find_classnames_file(tar_path: str) -> str | None:
  folder = os.path.dirname(os.path.abspath(tar_path))
  for candidate in (os.path.join(folder, CLASSNAMES_FILE), os.path.join(os.path.dirname(folder), CLASSNAMES_FILE)):
    if os.path.isfile(candidate):
      return candidate
  return None


def _index_tar(path: str, problems: Problems) -> list:
  """[((path, offset, size), label or None, key, skip, (txt locator, json locator))] for every key of
  one tar, in archive order; a locator is (path, offset, size) or None where the key has no such member."""
  name = os.path.basename(path)
  groups: dict[str, dict[str, tarfile.TarInfo]] = {}
  small: dict[tuple[str, str], bytes] = {}
  try:
    with tarfile.open(path, "r:") as archive:  # random access: headers only, data skipped
      for member in archive:
        if not member.isfile():
          continue
        key, field = tar_key(member.name)
        groups.setdefault(key, {})[field] = member
        if field == "cls":
          small[(key, field)] = archive.extractfile(member).read()
  except (tarfile.TarError, OSError, EOFError) as e:
    problems.add("tar_read_error", f"{name} ({type(e).__name__}: {e})")  # the keys read before it still count
  entries = []
  for key, fields in groups.items():
    where = f"{name}/{key}"
    image_field = next((f for f in fields if "." + f in IMAGE_EXTENSIONS), None)
    caption_members = tuple((path, fields[f].offset_data, fields[f].size) if f in fields else None
                            for f in ("txt", "json"))
    if image_field is None:
      problems.add("missing_image", where)
      entries.append(((path, 0, 0), -1, where, "missing_image", caption_members))
      continue
    member = fields[image_field]
    locator = (path, member.offset_data, member.size)
    raw = small.get((key, "cls"))
    text = raw.decode("utf-8", "replace").strip() if raw is not None else ""
    label = int(text) if text.lstrip("-").isdigit() else None  # None: the caller decides whether one is needed
    entries.append((locator, label, where, None, caption_members))
  return entries
