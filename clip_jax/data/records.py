"""One image-text record: its on-disk format, its caption cleanup, and why one gets skipped.

Record format (one ArrayRecord entry, written by `python -m clip_jax.data.prepare`):

    bytes 0..3        magic b"CLR1"
    bytes 4..7        N, the header length, uint32 little-endian
    bytes 8..8+N      header: UTF-8 JSON object {"caption": str, "key": str, "label"?: int}
    bytes 8+N..end    the image file as it was (JPEG / PNG / WebP bytes), unchanged

The image is kept encoded (no re-compression, no size blow-up); the JSON header leaves room
for more fields without a format change. Readers ignore header fields they do not know.
"""
from __future__ import annotations

import collections
import json
import struct
import unicodedata

MAGIC = b"CLR1"
_HEADER_LEN = struct.Struct("<I")

# Long enough for any real caption (the tokenizer keeps 77 tokens, ~300 characters); short
# enough that one pathological caption cannot stall a worker inside the BPE.
DEFAULT_MAX_CAPTION_CHARS = 1000


class BadRecord(Exception):
  """A record that cannot be used; `reason` is the short name it is counted under."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail


class QualityCounts:
  """Counts of skipped and repaired records, per reason."""

  def __init__(self):
    self.skipped = collections.Counter()
    self.repaired = collections.Counter()

  def as_dict(self) -> dict:
    return {"skipped": dict(sorted(self.skipped.items())),
            "repaired": dict(sorted(self.repaired.items()))}

  def table(self) -> str:
    lines = []
    for title, counter in (("skipped", self.skipped), ("repaired", self.repaired)):
      lines.append(f"{title}: {sum(counter.values())}")
      for reason, count in sorted(counter.items()):
        lines.append(f"  {reason:<28s}{count:>8d}")
    return "\n".join(lines)


def with_escaped_bytes(name: str) -> str:
  """A file or folder name as valid text: bytes that were not UTF-8 (lone surrogates from Python's
  surrogate-escaped file system names, e.g. Latin-1 names from an old archive) written as \\xNN."""
  try:
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
  except UnicodeEncodeError:  # a lone surrogate outside the escape range (JSON's "\ud83d"): its code point
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def encode_record(image_bytes: bytes, caption: str | list[str], key: str = "", label: int | None = None) -> bytes:
  """One record: the CLR1 magic, the header's length, a JSON header (caption, key, label) and the image's
  bytes. `caption`: one, or a list (several captions of one image; training draws one each time). A key (a file name) holding bytes that were not UTF-8 (a surrogate-escaped name from the file
  system or a table) is kept with those bytes written as \\xNN."""
  header = {"caption": caption, "key": with_escaped_bytes(key)}
  if label is not None:
    header["label"] = int(label)
  header_bytes = json.dumps(header, ensure_ascii=False).encode("utf-8")
  return MAGIC + _HEADER_LEN.pack(len(header_bytes)) + header_bytes + image_bytes


def decode_record(record: bytes) -> tuple[dict, bytes]:
  """-> (header dict, image bytes). Raises BadRecord('corrupt_record') on anything malformed."""
  if len(record) < 8 or record[:4] != MAGIC:
    raise BadRecord("corrupt_record", "missing the CLR1 magic; not written by clip_jax.data.prepare")
  (header_len,) = _HEADER_LEN.unpack_from(record, 4)
  if 8 + header_len > len(record):
    raise BadRecord("corrupt_record", "header length runs past the end of the record")
  try:
    header = json.loads(record[8:8 + header_len].decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise BadRecord("corrupt_record", f"unreadable header ({e})") from e
  if not isinstance(header, dict):
    raise BadRecord("corrupt_record", "header is not a JSON object")
  return header, record[8 + header_len:]


_REPLACE_CHAR = {"Cc": " ", "Cs": ""}


def clean_caption(raw: str | bytes, max_chars: int = DEFAULT_MAX_CAPTION_CHARS) -> tuple[str, list[str]]:
  """-> (caption, repairs). Whitespace is collapsed and control characters dropped.

  Bytes that are not UTF-8 are dropped (repair 'caption_not_utf8'); captions longer than
  `max_chars` are cut at a word boundary (repair 'caption_truncated'). A caption left empty
  raises BadRecord('empty_caption'); one that is neither str nor bytes (a table cell holding a JSON
  object, say) raises BadRecord('caption_not_text').
  """
  repairs = []
  if isinstance(raw, (bytes, bytearray)):
    try:
      text = bytes(raw).decode("utf-8-sig")
    except UnicodeDecodeError:
      text = bytes(raw).decode("utf-8", errors="replace").replace("\ufffd", "")
      repairs.append("caption_not_utf8")
  elif isinstance(raw, str):
    text = raw
  else:
    raise BadRecord("caption_not_text", f"caption is {type(raw).__name__}, not text")
  # Control characters (NUL, escape sequences, ...) carry no meaning and confuse the BPE; lone
  # surrogates (from JSON "\ud800") cannot even be encoded. Every run of whitespace becomes one space.
  text = "".join(_REPLACE_CHAR.get(unicodedata.category(c), c) for c in text)
  text = " ".join(text.split())
  if not text:
    raise BadRecord("empty_caption")
  if len(text) > max_chars:
    cut = text.rfind(" ", 0, max_chars + 1)
    text = text[:cut if cut > max_chars // 2 else max_chars].rstrip()
    repairs.append("caption_truncated")
  return text, repairs
