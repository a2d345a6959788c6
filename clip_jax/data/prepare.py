r"""Converts image-text collections, and labelled image collections, into ArrayRecord shards.

    python -m clip_jax.data.prepare --input photos/ --output data/mine/train
    python -m clip_jax.data.prepare --input pairs.csv --output data/mine/train --shard-size 10000
    python -m clip_jax.data.prepare --input 'laion/{00000..00009}.tar' --output data/laion/train
    python -m clip_jax.data.prepare --input pets/train --output data/pets/train --caption-template "a photo of a {}, a type of pet."

Inputs (several may be given, in any mix):
  a directory   either captioned images: photo.jpg with a sidecar caption photo.txt beside it;
                or class sub-folders (torchvision's ImageFolder layout, ROOT/CLASS/**/image.jpg): the
                label is the folder's index in sorted order, the class name the folder name ('_' read
                as a space) or --classnames'; or a folder of .tar shards (img2dataset's output: .tar
                files, and no images or sub-folders, beside them anything, e.g. .parquet and _stats.json),
                read as those tars, sorted. --layout chooses between captions and classes; 'auto' reads
                captions when the directory has no sub-folders, or when at least half of the images below
                it have a sidecar caption, and class folders otherwise (a stray .txt beside a few images of
                a class folder stays a non-image file, counted as skipped). One line says which layout
                was read and why, and how to force the other
  a .csv/.tsv   a header row, then a row per image, or per caption. Columns read (others are ignored):
                  path      path / filepath / file_path / image / image_path / file / filename
                            (or --path-column): the image, relative to the table's folder
                  caption   caption / captions / text / title / txt / description (or --caption-column)
                  label     label / class / class_name / cls / target / category (or --label-column),
                            optional: a class index, or a class name (numbered in sorted order, or by
                            --classnames). With a label, the caption column is optional
  a .jsonl      one object per line with the same keys; a caption may be a list (COCO's five per
                image, as retrieval's caption files): stored together, and training draws one at random
                each time it reads the image
  a .tar file   webdataset / img2dataset shards: members KEY.jpg|png|webp|... grouped by KEY, with the
                caption in KEY.txt (or KEY.json's "caption") and/or the label in KEY.cls (a class index
                as text; class names from --classnames or a classnames.txt beside the tars); a glob or
                {a..b} range names many
An image is one record however many rows of a table name it: rows naming the same file (after resolving
against the table's folder) with the same label are grouped, in first-seen order, into one record holding
all their captions (an exact repeat once; COCO's caption lists written a caption per line), and training
draws one of them at random each time it reads the image, as for a JSONL list; the rows folded into an
earlier row's record are counted (report.json 'grouped_rows'). A row with another label is its own record.
A labelled image without a caption gets one from --caption-template ('{}' = the class name; default
'{}', the class name itself). Every image is fully decoded once to check it; files in an odd mode or
format are stored re-encoded as PNG (counted as repaired), all others byte-for-byte. Each record is
skipped or repaired for a reason that is counted; the counts are printed and written to
OUTPUT/report.json, and the class names of labelled data to OUTPUT/classnames.txt (read back by the
shards' source). A run that writes no record ends with one `error:` line and exit code 2 (report.json
still written, with its counts).
"""
from __future__ import annotations

import argparse
import collections
import glob
import io
import itertools
import json
import os
import re
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Iterator

from absl import logging

from clip_jax.cli import UserError
from clip_jax.data import images as image_ops
from clip_jax.data.labelled import (CAPTION_COLUMNS, CLASSNAMES_FILE, IMAGE_EXTENSIONS, KEPT_PROBLEMS, LABEL_COLUMNS,
                                    PATH_COLUMNS, find_classnames_file, find_column, is_image_file, label_text,
                                    names_for_folders, pick_column, read_class_names_file, read_table,
                                    scan_image_folder, tar_key)
from clip_jax.data.records import (DEFAULT_MAX_CAPTION_CHARS, BadRecord, QualityCounts, clean_caption,
                                   encode_record, with_escaped_bytes)

_STORED_AS_IS = ("JPEG", "PNG", "WEBP")  # formats every reader decodes; others are re-encoded
DEFAULT_SHARD_SIZE = 5000


class NothingWritten(UserError):
  """convert() wrote no record (every candidate skipped, or none found): the user's data or flags are wrong.
  `report`: the report dict, also in OUTPUT/report.json."""

  def __init__(self, message: str, report: dict):
    super().__init__(message)
    self.report = report


class ClassNames:
  """The class names of the labelled inputs, shared by all of them. Fixed by --classnames (a list
  in label order; a name not in it is an unknown label) or by class folders (their sorted order);
  otherwise numbered as they come, each input's new names in sorted order."""

  def __init__(self, names: list[str] | None = None):
    self.fixed = names is not None
    self.names: list[str] = list(names or [])

  def set_for_folders(self, names: list[str], where: str) -> None:
    if self.names and self.names != names:
      raise ValueError(f"{where}: its class folders give the classes {names[:5]}..., another input gave "
                       f"{self.names[:5]}...; convert them separately or give --classnames.")
    self.names, self.fixed = list(names), True

  def add(self, names) -> None:
    if not self.fixed:
      self.names.extend(n for n in sorted(set(names)) if n not in self.names)

  def index(self, text: str) -> int | None:
    """A class name -> its index; an integer -> itself (None: unknown, or past fixed names)."""
    if text in self.names:
      return self.names.index(text)
    if text.isdigit() and (not self.fixed or int(text) < len(self.names)):
      return int(text)
    return None

  def name(self, label: int) -> str:
    return self.names[label] if 0 <= label < len(self.names) else str(label)


class Candidate:
  """One would-be record before validation; `skip` set when it is already known to be unusable."""
  __slots__ = ("key", "image", "caption", "label", "skip", "detail")

  def __init__(self, key, image=None, caption=None, label=None, skip=None, detail=""):
    self.key, self.image, self.caption, self.label = key, image, caption, label
    self.skip, self.detail = skip, detail


# ----------------------------------------------------------------------------- reading inputs

def expand_inputs(patterns: list[str]) -> list[str]:
  """Globs and webdataset-style {000..009} ranges -> existing paths; one clear error otherwise."""
  paths = []
  for pattern in patterns:
    for expanded in expand_braces(pattern):
      matches = [expanded] if os.path.exists(expanded) else sorted(glob.glob(expanded))
      if not matches:
        raise FileNotFoundError(f"--input {expanded}: no such file or directory.")
      paths.extend(matches)
  return paths


def expand_braces(pattern: str) -> list[str]:
  match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
  if not match:
    return [pattern]
  first, last = match.group(1), match.group(2)
  width = len(first)
  return [e for i in range(int(first), int(last) + 1)
          for e in expand_braces(pattern[:match.start()] + str(i).zfill(width) + pattern[match.end():])]


def read_candidates(path: str, args) -> Iterator[Candidate]:
  if os.path.isdir(path):
    layout, why = folder_layout(path, args.layout)
    args.layouts[path] = layout
    if args.verbose:
      print(_layout_line(path, layout, why, args.caption_template))
    if layout == "tars":
      for tar in folder_tars(path):
        yield from _read_tar(tar, args)
    elif layout == "classes":
      yield from _read_class_folders(path, args)
    else:
      yield from _read_folder(path)
  elif path.lower().endswith(".tar"):
    yield from _read_tar(path, args)
  elif path.lower().endswith((".csv", ".tsv", ".jsonl", ".json")):
    yield from _read_table(path, args)
  else:
    raise ValueError(f"--input {path}: not a directory, .csv/.tsv, .jsonl or .tar file.")


def _read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def folder_layout(root: str, layout: str = "auto") -> tuple[str, str]:
  """How a directory input is read: -> (layout, why), layout 'captions', 'classes' or 'tars', why a
  phrase for the user (with the --layout that reads it the other way, where there is one). `layout`
  'captions' / 'classes' (--layout) is taken as given. 'auto': 'tars' when the top level holds .tar
  files and no images or sub-folders; else 'captions' when there are no sub-folders (nothing to be
  classes) or at least half of the images below have a sidecar caption (IMAGE.txt beside IMAGE.jpg);
  else 'classes'. Half, not any: one stray note beside an image of a class folder must not turn 96
  labelled images into 95 skipped for want of a caption."""
  entries = list(os.scandir(root))
  subfolders = sum(e.is_dir() for e in entries)
  if layout == "auto":
    tars = len(folder_tars(root))
    if tars:
      return "tars", f"it holds {tars} .tar shard{'s' * (tars != 1)} and no images or sub-folders"
  images = captioned = 0
  for _, _, files in os.walk(root):
    names = set(files)
    for name in files:
      if is_image_file(name):
        images += 1
        captioned += os.path.splitext(name)[0] + ".txt" in names
  counts = f"{captioned} of {images} images below it with a sidecar .txt caption"
  if layout != "auto":
    return layout, f"--layout {layout}; {counts}"
  if not subfolders:
    return "captions", f"no sub-folders to be classes; {counts}"
  if images and 2 * captioned >= images:
    return "captions", f"{counts}, at least half; --layout classes reads its sub-folders as classes"
  return "classes", (f"{subfolders} sub-folder{'s' * (subfolders != 1)} as classes; {counts}, under half; "
                     "--layout captions reads the sidecar captions instead")


def folder_tars(root: str) -> list[str]:
  """The .tar shards a folder stands for, sorted: those at its top level when it holds no images and no
  sub-folders beside them (img2dataset's output: shards with their .parquet and .json stats); [] when it
  holds none. The one rule of `prepare` and of training and evaluation (`sources.find_tars`).

  Raises UserError when shards sit beside images or (visible) sub-folders: either could be the data,
  and taking one without a word is how a stray archive becomes the training set (training took the
  shards of such a folder, `prepare` its images); the line says how to name the one meant."""
  entries = list(os.scandir(root))
  tars = sorted(e.path for e in entries if e.is_file() and e.name.lower().endswith(".tar"))
  if not tars:
    return []
  images = sum(e.is_file() and is_image_file(e.name) for e in entries)
  subfolders = sum(e.is_dir() and not e.name.startswith(".") for e in entries)
  if images or subfolders:
    beside = " and ".join(f"{n} {what}{'s' * (n != 1)}" for n, what in ((images, "image"), (subfolders, "sub-folder"))
                          if n)
    raise UserError(f"{root} holds {len(tars)} .tar shard{'s' * (len(tars) != 1)} beside {beside}: name the shards "
                    f"({os.path.join(root, '*.tar')}) to read them, or move them out to read the images "
                    "(`prepare --layout captions|classes` reads the images as they are).")
  return tars


def _layout_line(path: str, layout: str, why: str, caption_template: str) -> str:
  """The one line that says how a directory input is read and why (`folder_layout`)."""
  line = f"{path}: read as layout '{layout}' ({why})"
  if layout == "captions" and caption_template != "{}":  # the default cannot be told from a given '{}'
    line += "; --caption-template is unused: these images have their own captions"
  return line


def _read_class_folders(root: str, args) -> Iterator[Candidate]:
  """ROOT/CLASS/**/image -> labelled candidates (label = the folder's sorted index); what the scan
  found wrong (non-image files, empty class folders, ...) becomes skipped candidates, so it is
  counted with the rest."""
  folders, entries, problems = scan_image_folder(root)
  args.class_names.set_for_folders(names_for_folders(folders, args.given_class_names, root), root)
  base = os.path.basename(os.path.normpath(root))
  for reason, count in sorted(problems.counts.items()):
    examples = problems.examples.get(reason, [])
    if reason in KEPT_PROBLEMS:  # noted in the report, nothing left out
      args.notes[reason] += count
      continue
    for i in range(count):
      yield Candidate(f"{base}/{examples[i]}" if i < len(examples) else base, skip=reason,
                      detail="found when scanning the class folders")
  for path, label, key, _ in entries:
    try:
      image = _read_bytes(path)
    except OSError as e:
      yield Candidate(key, skip="unreadable_file", detail=str(e))
      continue
    yield Candidate(key, image, args.caption_template.format(args.class_names.name(label)), label)


def _read_folder(root: str) -> Iterator[Candidate]:
  for folder, subfolders, files in os.walk(root):
    subfolders.sort()
    names = set(files)
    image_stems = set()
    for name in sorted(files):
      stem, ext = os.path.splitext(name)
      if ext.lower() not in IMAGE_EXTENSIONS:
        continue
      image_stems.add(stem)
      key = os.path.relpath(os.path.join(folder, stem), root)
      if stem + ".txt" not in names:
        yield Candidate(key, skip="missing_caption", detail=f"{name} has no {stem}.txt beside it")
        continue
      try:
        yield Candidate(key, _read_bytes(os.path.join(folder, name)),
                        _read_bytes(os.path.join(folder, stem + ".txt")))
      except OSError as e:
        yield Candidate(key, skip="unreadable_file", detail=str(e))
    for name in sorted(files):
      stem, ext = os.path.splitext(name)
      if ext == ".txt" and stem not in image_stems:
        yield Candidate(os.path.relpath(os.path.join(folder, stem), root), skip="missing_image",
                        detail=f"{name} has no image beside it")


def _row_fields(row: dict, columns: tuple, base: str, key: str, args) -> Candidate | tuple:
  """One table row -> (image path as written, its full path, caption cell or list, label or None), or a
  skipped Candidate (no path, unknown label)."""
  path_col, caption_col, label_col = columns
  image_path = row.get(path_col)
  caption = row.get(caption_col) if caption_col else None
  if not isinstance(image_path, str) or not image_path.strip():
    return Candidate(key, skip="malformed_row", detail=f"no {path_col!r} value")
  label = None
  text = with_escaped_bytes(label_text(row.get(label_col))) if label_col is not None else ""
  if text:  # a row without a label is an unlabelled record, as in a plain caption table
    label = args.class_names.index(text)
    if label is None:
      return Candidate(key, skip="unknown_label", detail=f"label {text!r} is not a class index or a known name")
    if caption is None or caption == [] or (isinstance(caption, str) and not caption.strip()):
      caption = args.caption_template.format(args.class_names.name(label))
  caption = [_caption_value(c) for c in caption] if isinstance(caption, list) else _caption_value(caption)
  return image_path.strip(), os.path.normpath(os.path.join(base, image_path.strip())), caption, label


class _ImageRows:
  """The rows of a table that name one image with one label: their captions, merged in row order."""
  __slots__ = ("key", "image_path", "full_path", "label", "captions", "rows")

  def __init__(self, key, image_path, full_path, label, caption):
    self.key, self.image_path, self.full_path, self.label = key, image_path, full_path, label
    self.captions, self.rows = [caption], 1

  def add(self, caption) -> None:
    self.rows += 1
    for one in (caption if isinstance(caption, list) else [caption]):
      if one not in self.caption_list():  # a caption already held (a row repeated verbatim) is kept once
        self.captions.append(one)

  def caption_list(self) -> list:
    return [one for c in self.captions for one in (c if isinstance(c, list) else [c])]

  def caption(self):
    """One row's caption cell unchanged (text or its list); several rows' as one list."""
    return self.captions[0] if self.rows == 1 else self.caption_list()

  def candidate(self) -> Candidate:
    if not os.path.isfile(self.full_path):
      return Candidate(self.key, skip="missing_file", detail=f"{self.full_path} does not exist")
    try:
      return Candidate(self.image_path, _read_bytes(self.full_path), self.caption(), self.label)
    except OSError as e:
      return Candidate(self.key, skip="unreadable_file", detail=str(e))


def _caption_value(cell):
  """A table's caption cell as clean_caption takes it: text, or bytes where it held some that are not UTF-8
  (read with surrogateescape), so that clean_caption counts them; numbers as text; None as ""."""
  if cell is None:
    return ""
  if isinstance(cell, (int, float)):
    return str(cell)
  if isinstance(cell, str) and _undecodable(cell):
    return cell.encode("utf-8", errors="surrogateescape")
  return cell


def _clean_captions(raw, max_chars: int) -> tuple[str | list[str], list[str]]:
  """clean_caption for one caption, or for a list of them (a JSONL's "captions"): -> (the cleaned list, or
  its one caption alone; each repair once). Empty or non-text captions leave a list (repair
  'caption_dropped'); when none is left, BadRecord('caption_not_text') if none was text, else
  BadRecord('empty_caption')."""
  if not isinstance(raw, list):
    return clean_caption(raw, max_chars)
  kept, repairs = [], set()
  for one in raw:
    try:
      text, fixes = clean_caption(one, max_chars)
    except BadRecord:
      repairs.add("caption_dropped")
      continue
    kept.append(text)
    repairs.update(fixes)
  if not kept:
    if raw and not any(isinstance(one, (str, bytes, bytearray)) for one in raw):
      raise BadRecord("caption_not_text", f"none of its {len(raw)} captions is text")
    raise BadRecord("empty_caption", f"none of its {len(raw)} captions is left once cleaned")
  return (kept[0] if len(kept) == 1 else kept), sorted(repairs)


def _table_columns(row_counts, args, path: str) -> tuple[str, str | None, str | None]:
  """(path column, caption column or None, label column or None); with a label the caption may be absent.
  `row_counts`: column name -> how many rows give it a value (labelled.find_column's rule)."""
  path_col = pick_column(row_counts, args.path_column, PATH_COLUMNS, "path", path, "; name one with --path-column")
  if args.label_column:
    label_col = pick_column(row_counts, args.label_column, LABEL_COLUMNS, "label", path)
  else:
    label_col = find_column(row_counts, None, LABEL_COLUMNS)
  if label_col is None:
    return path_col, pick_column(row_counts, args.caption_column, CAPTION_COLUMNS, "caption", path,
                                 "; name one with --caption-column"), None
  return path_col, find_column(row_counts, args.caption_column, CAPTION_COLUMNS), label_col


def _undecodable(text: str) -> bool:
  """Whether `text` holds bytes that were not UTF-8 (read with errors="surrogateescape")."""
  return any("\udc80" <= c <= "\udcff" for c in text)


def _register_labels(rows, label_col: str | None, args, path: str) -> None:
  """Names among the labels (not integers) join the class names, sorted, before any row is converted.
  A label with bytes that are not UTF-8 is a class named with them as \\xNN (as folder names are), said
  in one warning: the table's real names need it saved as UTF-8."""
  if label_col is not None:
    texts = [label_text(row.get(label_col)) for row in rows if isinstance(row, dict)]
    undecodable = sorted({t for t in texts if _undecodable(t)})
    if undecodable:
      logging.warning("%s: %d label(s) hold bytes that are not UTF-8 (e.g. '%s'); they are kept with those bytes "
                      "as \\xNN: save the table as UTF-8 for their real names.", path, len(undecodable),
                      with_escaped_bytes(undecodable[0]))
    args.class_names.add(with_escaped_bytes(t) for t in texts if t and not t.isdigit())


def _read_table(path: str, args) -> Iterator[Candidate]:
  """A .csv / .tsv / .jsonl table's rows as candidates; undecodable bytes in a caption are counted
  (clean_caption), a label with them names a class with those bytes as \\xNN (`_register_labels`)."""
  row_counts, rows = read_table(path, undecodable="surrogateescape")
  columns = _table_columns(row_counts, args, path) if row_counts else None
  if columns is not None:
    _register_labels([row for _, row in rows], columns[2], args, path)
  base = os.path.dirname(os.path.abspath(path))
  # Rows naming one file with one label are one image: one record, or retrieval counts it once per caption.
  ordered: list[Candidate | _ImageRows] = []  # first-seen order
  images: dict[tuple, _ImageRows] = {}
  for key, row in rows:
    fields = _row_fields(row, columns, base, key, args) if row is not None else \
        Candidate(key, skip="malformed_row", detail="not a JSON object")
    if isinstance(fields, Candidate):
      ordered.append(fields)
      continue
    image_path, full_path, caption, label = fields
    if (full_path, label) in images:
      images[full_path, label].add(caption)
      args.grouped_rows += 1
    else:
      images[full_path, label] = _ImageRows(key, image_path, full_path, label, caption)
      ordered.append(images[full_path, label])
  for item in ordered:
    yield item if isinstance(item, Candidate) else item.candidate()


def _read_tar(path: str, args) -> Iterator[Candidate]:
  name = os.path.basename(path)
  group_key, fields = None, {}
  if not args.class_names.fixed and not args.class_names.names:  # clip_benchmark's classnames.txt
    names_file = find_classnames_file(path)
    if names_file:
      names = read_class_names_file(names_file)
      args.class_names = ClassNames(names if isinstance(names, list) else None)

  def flush():
    if group_key is None:
      return None
    key = f"{name}/{group_key}"
    image_field = next((f for f in fields if "." + f in IMAGE_EXTENSIONS), None)
    caption = fields.get("txt")
    if caption is None and "json" in fields:
      try:
        caption = json.loads(fields["json"]).get("caption")
      except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        caption = None
    label = None
    if "cls" in fields:
      label = args.class_names.index(fields["cls"].decode("utf-8", "replace").strip())
      if label is None:
        return Candidate(key, skip="unknown_label", detail=f"cls {fields['cls'][:20]!r}")
      if caption is None:
        caption = args.caption_template.format(args.class_names.name(label))
    if image_field is None:
      return Candidate(key, skip="missing_image", detail=f"fields {sorted(fields)}")
    if caption is None:
      return Candidate(key, skip="missing_caption", detail=f"fields {sorted(fields)}")
    return Candidate(key, fields[image_field], caption, label)

  data_end = 0
  try:
    with tarfile.open(path, "r|*") as archive:  # streaming: shards are read once, front to back
      for member in archive:
        data_end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        if not member.isfile():
          continue
        key, field = tar_key(member.name)
        if key != group_key:
          candidate = flush()
          if candidate is not None:
            yield candidate
          group_key, fields = key, {}
        fields[field] = archive.extractfile(member).read()
  except (tarfile.TarError, OSError, EOFError) as e:
    yield Candidate(f"{name}", skip="tar_read_error", detail=f"{type(e).__name__}: {e}")
    return  # an incomplete last group is not trusted
  # tarfile ends quietly when a file is cut between members; a complete archive has two zero
  # blocks after its last member, so their absence means the last group may be incomplete.
  if not path.endswith(".gz") and os.path.getsize(path) < data_end + 2 * tarfile.BLOCKSIZE:
    yield Candidate(f"{name}", skip="tar_read_error", detail="archive is cut short; its last group is dropped")
    return
  candidate = flush()
  if candidate is not None:
    yield candidate


# ----------------------------------------------------------------------------- validation

def validate(candidate: Candidate, max_pixels: int, max_caption_chars: int):
  """-> ('ok', key, record bytes, repairs) or ('skip', key, reason, detail). Runs in workers."""
  if candidate.skip:
    return ("skip", candidate.key, candidate.skip, candidate.detail)
  try:
    caption, repairs = _clean_captions(candidate.caption, max_caption_chars)
    image_format = image_ops.open_image(candidate.image, max_pixels).format
    image, image_repairs = image_ops.decode_image(candidate.image, max_pixels)
  except BadRecord as e:
    return ("skip", candidate.key, e.reason, e.detail)
  image_bytes = candidate.image
  if image_repairs or image_format not in _STORED_AS_IS:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    image_bytes = buffer.getvalue()
    image_repairs = image_repairs or [f"format_{image_format}"]
  record = encode_record(image_bytes, caption, key=candidate.key, label=candidate.label)
  return ("ok", candidate.key, record, repairs + image_repairs)


class ShardWriter:
  """Writes records into numbered ArrayRecord shards of `shard_size` records each."""

  def __init__(self, output: str, shard_size: int):
    from array_record.python.array_record_module import ArrayRecordWriter
    self._writer_cls = ArrayRecordWriter
    self.output, self.shard_size = output, shard_size
    self.paths: list[str] = []
    self._writer, self._in_shard = None, 0

  def write(self, record: bytes) -> None:
    if self._writer is None or self._in_shard == self.shard_size:
      self._close_current()
      path = os.path.join(self.output, f"shard-{len(self.paths):05d}.array_record.tmp")
      # group_size:1 keeps every record separately addressable: cheap random access for shuffling.
      self._writer = self._writer_cls(path, "group_size:1")
      self.paths.append(path)
      self._in_shard = 0
    self._writer.write(record)
    self._in_shard += 1

  def _close_current(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def close(self) -> list[str]:
    """Renames the shards to data-XXXXX-of-NNNNN.array_record only once all are complete."""
    self._close_current()
    final = []
    for i, path in enumerate(self.paths):
      name = os.path.join(self.output, f"data-{i:05d}-of-{len(self.paths):05d}.array_record")
      os.replace(path, name)
      final.append(name)
    return final


def convert(inputs: list[str], output: str, *, shard_size: int = DEFAULT_SHARD_SIZE,
            max_pixels: int = image_ops.DEFAULT_MAX_PIXELS,
            max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS, workers: int = 1,
            overwrite: bool = False, path_column: str | None = None,
            caption_column: str | None = None, label_column: str | None = None, layout: str = "auto",
            classnames_file: str | None = None, caption_template: str = "{}", verbose: bool = True) -> dict:
  """Writes shards, OUTPUT/report.json and (for labelled data) OUTPUT/classnames.txt; returns the
  report. Raises ValueError / FileNotFoundError / FileExistsError for what the user must fix, and
  NothingWritten (a ValueError) after writing report.json when no record was written."""
  if shard_size < 1:
    raise ValueError(f"--shard-size must be at least 1, got {shard_size}.")
  if caption_template.count("{}") != 1:
    raise ValueError(f"--caption-template {caption_template!r} needs exactly one '{{}}' for the class name.")
  if layout not in ("auto", "captions", "classes"):
    raise ValueError(f"--layout must be auto, captions or classes, not {layout!r}.")
  given = read_class_names_file(classnames_file) if classnames_file else None
  paths = expand_inputs(inputs)
  os.makedirs(output, exist_ok=True)
  existing = glob.glob(os.path.join(output, "*.array_record"))
  if existing:
    if not overwrite:
      raise FileExistsError(f"{output}: already holds {len(existing)} shards; choose another "
                            "--output or pass --overwrite.")
    for path in existing:
      os.remove(path)
  options = argparse.Namespace(path_column=path_column, caption_column=caption_column, label_column=label_column,
                               layout=layout, caption_template=caption_template, given_class_names=given,
                               class_names=ClassNames(given if isinstance(given, list) else None),
                               notes=collections.Counter(), layouts={}, grouped_rows=0, verbose=verbose)
  counts = QualityCounts()
  writer = ShardWriter(output, shard_size)
  written, started = 0, time.time()
  candidates = (c for path in paths for c in read_candidates(path, options))
  pool = ProcessPoolExecutor(workers) if workers > 1 else None
  try:
    if pool is None:
      results = (validate(c, max_pixels, max_caption_chars) for c in candidates)
    else:
      results = _bounded_map(pool, candidates, max_pixels, max_caption_chars, chunk=64 * workers)
    for status, key, payload, extra in results:
      if status == "skip":
        counts.skipped[payload] += 1
        if verbose and counts.skipped[payload] <= 3:
          print(f"skipped {key}: {payload} {extra}".rstrip(), file=sys.stderr)
        continue
      writer.write(payload)
      written += 1
      for reason in extra:
        counts.repaired[reason] += 1
      if verbose and written % 10000 == 0:
        print(f"{written} records written ({written / (time.time() - started):.0f}/s)", file=sys.stderr)
  finally:
    if pool is not None:
      pool.shutdown()
  shards = writer.close()
  class_names = options.class_names.names
  if class_names:
    with open(os.path.join(output, CLASSNAMES_FILE), "w", encoding="utf-8") as f:
      f.write("".join(f"{name}\n" for name in class_names))
  report = {"written": written, "shards": [os.path.basename(s) for s in shards],
            "inputs": paths, "layouts": options.layouts, "num_classes": len(class_names),
            "grouped_rows": options.grouped_rows, **counts.as_dict(),
            "notes": dict(sorted(options.notes.items())),
            "format": "clip_jax.data.records (CLR1: JSON header + image bytes)",
            "seconds": round(time.time() - started, 2)}
  with open(os.path.join(output, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
  if verbose:
    print(f"wrote {written} records in {len(shards)} shards to {output}")
    print(counts.table())
    for reason, count in sorted(options.notes.items()):
      print(f"noted (all kept): {reason} {count}")
    if options.grouped_rows:
      print(f"grouped {options.grouped_rows} rows into the record of an image an earlier row named "
            "(one record per image, holding all its captions)")
  if not written:
    raise NothingWritten(_nothing_written(paths, options.layouts, counts, output), report)
  return report


def _nothing_written(paths: list[str], layouts: dict, counts: QualityCounts, output: str) -> str:
  """The one line for a run that wrote no record: what was skipped and why, or that nothing was found."""
  report_path = os.path.join(output, "report.json")
  if not counts.skipped:
    return (f"wrote no records: found nothing to convert in {', '.join(paths)} (no image, table row or .tar "
            f"member); {report_path} has the run's details.")
  reasons = ", ".join(f"{reason} {n}" for reason, n in counts.skipped.most_common(3))
  line = f"wrote no records: all {sum(counts.skipped.values())} skipped ({reasons}); {report_path} has the counts"
  if counts.skipped["missing_caption"] and any(layout == "captions" and any(e.is_dir() for e in os.scandir(path))
                                               for path, layout in layouts.items()):
    line += "; if a folder's sub-folders are classes, give --layout classes"
  return line + "."


def _bounded_map(pool, candidates, max_pixels, max_caption_chars, chunk):
  # Executor.map would submit every candidate (with its image bytes) at once; go chunk by chunk.
  while True:
    block = list(itertools.islice(candidates, chunk))
    if not block:
      return
    yield from pool.map(validate, block, [max_pixels] * len(block), [max_caption_chars] * len(block),
                        chunksize=8)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m clip_jax.data.prepare", description=__doc__,
      epilog="Read the shards with the data spec OUTPUT (clip_jax.data.sources.open_source).",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--input", nargs="+", required=True,
                      help="image folders, .csv/.tsv/.jsonl files, .tar shards, globs or {000..009} ranges")
  parser.add_argument("--output", required=True, help="directory for the shards and report.json")
  parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="records per shard")
  parser.add_argument("--max-pixels", type=int, default=image_ops.DEFAULT_MAX_PIXELS,
                      help="images with more pixels are skipped before decoding (decompression bombs)")
  parser.add_argument("--max-caption-chars", type=int, default=DEFAULT_MAX_CAPTION_CHARS,
                      help="longer captions are cut at a word boundary")
  parser.add_argument("--workers", type=int, default=1, help="processes that decode and check images")
  parser.add_argument("--path-column", help="CSV/JSONL column holding the image path")
  parser.add_argument("--caption-column", help="CSV/JSONL column holding the caption")
  parser.add_argument("--label-column", help="CSV/JSONL column holding the class index or name")
  parser.add_argument("--layout", default="auto", choices=("auto", "captions", "classes"),
                      help="a directory input: captioned images (photo.jpg + photo.txt) or class sub-folders; 'auto' "
                      "reads captions when it has no sub-folders or at least half of its images have a .txt caption, "
                      "a folder of .tar shards as those tars")
  parser.add_argument("--classnames", help="class names: one per line (label order; for class folders, sorted "
                      "folder order) or JSON (a list, or {folder: name})")
  parser.add_argument("--caption-template", default="{}",
                      help="caption of a labelled image without one; '{}' is the class name (default: the name)")
  parser.add_argument("--overwrite", action="store_true", help="replace shards already in --output")
  args = parser.parse_args(argv)
  try:
    convert(args.input, args.output, shard_size=args.shard_size, max_pixels=args.max_pixels,
            max_caption_chars=args.max_caption_chars, workers=args.workers, overwrite=args.overwrite,
            path_column=args.path_column, caption_column=args.caption_column, label_column=args.label_column,
            layout=args.layout, classnames_file=args.classnames, caption_template=args.caption_template)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    from clip_jax import cli
    return cli.print_user_error(str(e), e)
  return 0


if __name__ == "__main__":
  from clip_jax import cli
  cli.run(main)  # user mistakes: one line, exit code 2
