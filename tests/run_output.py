"""What a failed run's output shows in an assertion message.

The last characters alone can hide why a multi-process run failed: a process that crashes prints
Python's fatal-error dump, whose list of loaded extension modules alone is ~4,000 characters (CI,
session 28: the whole tail was that list). `excerpt` shortens that list and keeps, from before the
tail, the lines that name an error.
"""
import re

_MODULE_LIST = re.compile(r"^((?:\[\d+\] )?Extension modules: ).*$", re.M)  # faulthandler, Python >= 3.10
_NAMES_AN_ERROR = re.compile(r"Fatal Python error|Terminating process|^(?:\[\d+\] )?[EF]\d{4} |Error|Traceback|"
                             r"launch\.worker\[|launch: ")


def excerpt(text: str, chars: int = 3000, max_lines: int = 30) -> str:
  """The last `chars` characters of `text` (module lists shortened), after up to `max_lines` earlier
  lines that name an error."""
  text = _MODULE_LIST.sub(r"\1[list left out]", text)
  if len(text) <= chars:
    return text
  earlier = [line for line in text[:-chars].splitlines() if _NAMES_AN_ERROR.search(line)][-max_lines:]
  head = "earlier lines naming an error:\n" + "\n".join(earlier) + "\n[...]\n" if earlier else "[...]\n"
  return head + text[-chars:]
