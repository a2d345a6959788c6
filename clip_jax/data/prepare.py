"""Converts image-text collections into ArrayRecord shards for the input pipeline.

    python -m clip_jax.data.prepare --input photos/ --output data/mine/train
    python -m clip_jax.data.prepare --input pairs.csv --output data/mine/train --shard-size 10000
    python -m clip_jax.data.prepare --input 'laion/{00000..00009}.tar' --output data/laion/train

Inputs (several may be given, in any mix):
  a directory   images (jpg, png, webp, ...) with a sidecar caption: photo.jpg + photo.txt
  a .csv file   columns for the image path and the caption (path relative to the CSV's folder);
                named path/filepath/image/file and caption/text/title, or --path-column/--caption-column
  a .jsonl file one object per line with the same keys
  a .tar file   webdataset / img2dataset shards: members KEY.jpg|png|webp + KEY.txt (or KEY.json
                with a "caption") grouped by KEY; a glob or {a..b} range names many
Every image is fully decoded once to check it; files in an odd mode or format are stored re-encoded
as PNG (counted as repaired), all others byte-for-byte. Each record is skipped or repaired for a
reason that is counted; the counts are printed and written to OUTPUT/report.json.
"""
from __future__ import annotations

import argparse
import csv
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

from clip_jax.data import images as image_ops
from clip_jax.data.records import (DEFAULT_MAX_CAPTION_CHARS, BadRecord, QualityCounts, clean_caption,
                                   encode_record)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_STORED_AS_IS = ("JPEG", "PNG", "WEBP")  # formats every reader decodes; others are re-encoded
_PATH_COLUMNS = ("path", "filepath", "file_path", "image", "image_path", "file", "filename")
_CAPTION_COLUMNS = ("caption", "text", "title", "txt", "description")
DEFAULT_SHARD_SIZE = 5000


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
    yield from _read_folder(path)
  elif path.endswith(".tar"):
    yield from _read_tar(path)
  elif path.endswith(".csv") or path.endswith(".tsv"):
    yield from _read_table(path, args, delimiter="\t" if path.endswith(".tsv") else ",")
  elif path.endswith(".jsonl") or path.endswith(".json"):
    yield from _read_jsonl(path, args)
  else:
    raise ValueError(f"--input {path}: not a directory, .csv/.tsv, .jsonl or .tar file.")


def _read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


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


def _pick_column(columns, explicit: str | None, choices, what: str, path: str) -> str:
  if explicit:
    if explicit not in columns:
      raise ValueError(f"{path}: has no column {explicit!r} (columns: {list(columns)}).")
    return explicit
  for choice in choices:
    if choice in columns:
      return choice
  raise ValueError(f"{path}: no {what} column among {list(columns)}; name one with "
                   f"--{what}-column.")


def _row_candidate(row: dict, path_col: str, caption_col: str, base: str, key: str) -> Candidate:
  image_path, caption = row.get(path_col), row.get(caption_col)
  if not isinstance(image_path, str) or not image_path.strip():
    return Candidate(key, skip="malformed_row", detail=f"no {path_col!r} value")
  if caption is None:
    caption = ""
  elif isinstance(caption, (int, float)):
    caption = str(caption)
  if isinstance(caption, str) and any("\udc80" <= c <= "\udcff" for c in caption):
    caption = caption.encode("utf-8", errors="surrogateescape")  # undecodable bytes: let clean_caption count them
  label = row.get("label")
  label = int(label) if isinstance(label, (int, str)) and str(label).strip().lstrip("-").isdigit() else None
  full_path = os.path.join(base, image_path.strip())
  if not os.path.isfile(full_path):
    return Candidate(key, skip="missing_file", detail=f"{full_path} does not exist")
  try:
    return Candidate(image_path.strip(), _read_bytes(full_path), caption, label)
  except OSError as e:
    return Candidate(key, skip="unreadable_file", detail=str(e))


def _read_table(path: str, args, delimiter: str) -> Iterator[Candidate]:
  base = os.path.dirname(os.path.abspath(path))
  with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
    reader = csv.DictReader(f, delimiter=delimiter)
    columns = reader.fieldnames or []
    path_col = _pick_column(columns, args.path_column, _PATH_COLUMNS, "path", path)
    caption_col = _pick_column(columns, args.caption_column, _CAPTION_COLUMNS, "caption", path)
    for line, row in enumerate(reader, start=2):
      yield _row_candidate(row, path_col, caption_col, base, f"{os.path.basename(path)}:{line}")


def _read_jsonl(path: str, args) -> Iterator[Candidate]:
  base = os.path.dirname(os.path.abspath(path))
  columns = None
  with open(path, encoding="utf-8", errors="surrogateescape") as f:
    for line_number, line in enumerate(f, start=1):
      key = f"{os.path.basename(path)}:{line_number}"
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        assert isinstance(row, dict)
      except (json.JSONDecodeError, AssertionError):
        yield Candidate(key, skip="malformed_row", detail="not a JSON object")
        continue
      if columns is None:
        columns = (_pick_column(row, args.path_column, _PATH_COLUMNS, "path", path),
                   _pick_column(row, args.caption_column, _CAPTION_COLUMNS, "caption", path))
      yield _row_candidate(row, columns[0], columns[1], base, key)


def _tar_key(member_name: str) -> tuple[str, str]:
  # webdataset: the key is the path up to the first dot of the basename; the rest is the field.
  folder, base = os.path.split(member_name)
  stem, _, field = base.partition(".")
  return os.path.join(folder, stem), field.lower()


def _read_tar(path: str) -> Iterator[Candidate]:
  name = os.path.basename(path)
  group_key, fields = None, {}

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
    if image_field is None:
      return Candidate(key, skip="missing_image", detail=f"fields {sorted(fields)}")
    if caption is None:
      return Candidate(key, skip="missing_caption", detail=f"fields {sorted(fields)}")
    return Candidate(key, fields[image_field], caption)

  data_end = 0
  try:
    with tarfile.open(path, "r|*") as archive:  # streaming: shards are read once, front to back
      for member in archive:
        data_end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        if not member.isfile():
          continue
        key, field = _tar_key(member.name)
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
    caption, repairs = clean_caption(candidate.caption, max_caption_chars)
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
            caption_column: str | None = None, verbose: bool = True) -> dict:
  """Writes shards and OUTPUT/report.json; returns the report."""
  if shard_size < 1:
    raise ValueError(f"--shard-size must be at least 1, got {shard_size}.")
  paths = expand_inputs(inputs)
  os.makedirs(output, exist_ok=True)
  existing = glob.glob(os.path.join(output, "*.array_record"))
  if existing:
    if not overwrite:
      raise FileExistsError(f"{output}: already holds {len(existing)} shards; choose another "
                            "--output or pass --overwrite.")
    for path in existing:
      os.remove(path)
  options = argparse.Namespace(path_column=path_column, caption_column=caption_column)
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
  report = {"written": written, "shards": [os.path.basename(s) for s in shards],
            "inputs": paths, **counts.as_dict(),
            "format": "clip_jax.data.records (CLR1: JSON header + image bytes)",
            "seconds": round(time.time() - started, 2)}
  with open(os.path.join(output, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
  if verbose:
    print(f"wrote {written} records in {len(shards)} shards to {output}")
    print(counts.table())
  return report


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
  parser.add_argument("--overwrite", action="store_true", help="replace shards already in --output")
  args = parser.parse_args(argv)
  try:
    convert(args.input, args.output, shard_size=args.shard_size, max_pixels=args.max_pixels,
            max_caption_chars=args.max_caption_chars, workers=args.workers, overwrite=args.overwrite,
            path_column=args.path_column, caption_column=args.caption_column)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
