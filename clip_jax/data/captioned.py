"""Image-caption collections as people keep them on disk, as random-access sources (record format in
sources.py): what training reads straight from a user's pairs, and retrieval's caption files.

  a caption table   a .csv / .tsv / .jsonl: an image-path column (labelled.PATH_COLUMNS) and a caption
                    column (labelled.CAPTION_COLUMNS), each taken by `labelled.find_column`'s rule (of
                    the candidates, the one most rows fill); a JSONL cell may hold a list of captions
                    (COCO's five per image). Rows that name the same image are one record holding all
                    their captions (training draws one per read). open_clip's `filepath,title` CSV is one.
                    Relative paths are resolved against the table's folder.
  a caption folder  ROOT/**/photo.jpg with its caption in photo.txt beside it (img2dataset's 'files'
                    output is one); sub-folders are walked in sorted order.

What is wrong is counted, never fatal: a row without an image path (or a JSONL line that is not an
object) is 'malformed_row' at scan time, an image missing on read 'missing_image', an image without its
.txt 'missing_caption' (a skipped record), a .txt without its image 'missing_image' (scan problem only).
Captions are cleaned by the pipeline (records.clean_caption: empty ones are skipped, 'empty_caption').
"""
from __future__ import annotations

import os

from clip_jax.cli import MissingPathError, UserError
from clip_jax.data.labelled import (CAPTION_COLUMNS, PATH_COLUMNS, Problems, caption_list, is_image_file,
                                    pick_column, read_table)
from clip_jax.data.records import with_escaped_bytes


class CaptionFileSource:
  """Images on disk with their captions, listed in a .jsonl, .csv or .tsv table (see the module docstring).

  A row without an image path (or a JSONL line that is not a JSON object) is a skipped record, counted
  as 'malformed_row' with the unreadable images, as label tables count theirs; a file with no image at
  all, or no image or caption column, raises ValueError (a UserError); a missing file
  FileNotFoundError (MissingPathError)."""

  def __init__(self, path: str, table: tuple | None = None):
    if not os.path.isfile(path):
      raise MissingPathError(f"{path}: no such caption file.")
    self.path = path
    root = os.path.dirname(os.path.abspath(path))
    grouped: dict[str, list[str]] = {}
    problems = Problems()
    for where, image, captions in self._read_rows(path, table):
      if image is None:
        problems.add("malformed_row", where)
        continue
      grouped.setdefault(image, []).extend(captions)
    if not grouped:
      raise UserError(f"{path}: lists no images.")
    self.image_paths = [p if os.path.isabs(p) else os.path.join(root, p) for p in grouped]
    self.captions = list(grouped.values())
    self.class_names = None
    # Malformed rows hold no image to read: counted here, for training's and evaluation's data reports.
    self.problems, self.problem_examples = dict(problems.counts), problems.examples
    problems.log(path)

  @staticmethod
  def _read_rows(path: str, table: tuple | None = None):
    """(where, image path or None for a malformed row, [captions]) per row of a caption table
    (labelled.read_table: UTF-8 with or without a byte-order mark; `table`: its result, when the
    caller has read it already); a JSONL row may name its captions with any caption column."""
    row_counts, rows = table if table is not None else read_table(path)
    try:
      image_key = pick_column(row_counts, None, PATH_COLUMNS, "image", path)
      caption_key = pick_column(row_counts, None, CAPTION_COLUMNS, "caption", path)
    except ValueError as e:
      raise UserError(str(e)) from e
    for where, row in rows:
      image = row.get(image_key) if row is not None else None
      if not isinstance(image, str) or not image.strip():
        yield where, None, []
        continue
      cell = next((row[key] for key in (caption_key, *CAPTION_COLUMNS) if row.get(key) is not None), None)
      yield where, image.strip(), caption_list(cell)

  def __len__(self) -> int:
    return len(self.image_paths)

  def __getitem__(self, index: int) -> dict:
    path = self.image_paths[index]
    try:
      with open(path, "rb") as f:
        data = f.read()
    except OSError as e:
      return {"skip": "missing_image", "key": path, "detail": f"{type(e).__name__}: {e}"}
    return {"image": data, "captions": self.captions[index], "label": -1, "key": path}

  def all_captions(self) -> list[list[str]]:
    return self.captions

  def __repr__(self) -> str:
    return f"CaptionFileSource({self.path!r}, {len(self)} images)"


def is_caption_folder(root: str) -> bool:
  """Whether a folder holds captioned images rather than class sub-folders, by the converter's rule
  (`prepare.folder_layout`: no sub-folders, or at least half of its images with a sidecar .txt; one
  stray note in a class folder keeps it labelled), so that training on a folder and converting it
  read it the same way."""
  from clip_jax.data.prepare import folder_layout  # lazily, as sources.find_tars takes expand_braces
  return folder_layout(root)[0] == "captions"


class CaptionFolderSource:
  """ROOT/**/photo.jpg + photo.txt (see the module docstring). Records are the image files, in sorted
  walk order; the caption is read with the image, as bytes (the pipeline decodes and cleans it and
  counts text that is not UTF-8). Raises MissingPathError (a UserError and FileNotFoundError) when no
  image has a caption."""

  def __init__(self, root: str):
    problems = Problems()
    entries = []  # [(image path, caption path or None, key)]
    for folder, subfolders, files in os.walk(root, followlinks=True):
      subfolders.sort()
      names = set(files)
      image_stems = set()
      for name in sorted(files):
        if not is_image_file(name):
          continue
        stem = os.path.splitext(name)[0]
        image_stems.add(stem)
        caption = os.path.join(folder, stem + ".txt") if stem + ".txt" in names else None
        entries.append((os.path.join(folder, name), caption, os.path.relpath(os.path.join(folder, name), root)))
        if caption is None:
          problems.add("missing_caption", entries[-1][2])
      for name in sorted(files):
        stem, ext = os.path.splitext(name)
        if ext == ".txt" and stem not in image_stems:
          problems.add("missing_image", os.path.relpath(os.path.join(folder, name), root))
    if not any(caption for _, caption, _ in entries):
      among = f" among its {len(entries)} images" if entries else ""
      # A FileNotFoundError, as ImageFolderSource's was for this folder: no data of any form is there.
      raise MissingPathError(f"{root}: holds no captioned images{among} (photo.jpg with its caption in photo.txt), "
                             "no class sub-folders (ROOT/CLASS/image.jpg), no .array_record shards and no .tar shards.")
    self.root, self._entries, self.class_names = root, entries, None
    self.problems, self.problem_examples = dict(sorted(problems.counts.items())), problems.examples
    problems.log(root)

  def __len__(self) -> int:
    return len(self._entries)

  def record_key(self, index: int) -> str:
    return with_escaped_bytes(self._entries[index][2])

  def __getitem__(self, index: int) -> dict:
    image_path, caption_path, key = self._entries[index]
    if caption_path is None:
      return {"skip": "missing_caption", "key": key, "detail": f"no {os.path.splitext(key)[0]}.txt beside it"}
    try:
      with open(image_path, "rb") as f:
        data = f.read()
      with open(caption_path, "rb") as f:
        caption = f.read()
    except OSError as e:
      return {"skip": "unreadable_file", "key": key, "detail": f"{type(e).__name__}: {e}"}
    return {"image": data, "captions": [caption], "label": -1, "key": key}

  def __repr__(self) -> str:
    return f"CaptionFolderSource({self.root!r}, {len(self)} images)"
