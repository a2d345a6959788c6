"""The words after a config file's colon (`--config=FILE.py:a,b`), checked against what the file knows.

A misspelled word must not be dropped: `digits.py:runlocl` would otherwise start the full run.
"""
from __future__ import annotations


def config_words(arg: str | None, known: tuple[str, ...], config_path: str) -> list[str]:
  """Splits `arg` at commas; raises ValueError naming any word not in `known` (the CLIs print it as one line)."""
  words = [w for w in (arg or "").split(",") if w]
  unknown = [w for w in words if w not in known]
  if unknown:
    raise ValueError(f"{config_path}: unknown argument {unknown[0]!r} after the colon; known: "
                     f"{', '.join(known)}.")
  return words
