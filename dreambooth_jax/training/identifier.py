"""The rare-token identifier [V] that DreamBooth binds the subject to.

The paper (Sec. 3.2) wants a token with a weak prior in both the language model and the diffusion
model: it samples tokens that decode to at most 3 characters without spaces from a rare range of
the vocabulary, then de-tokenizes them. The same procedure over the CLIP BPE vocabulary: its merges
are ranked by frequency, so late ids are rare. Every choice is reproducible from a seed.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from clip_jax.tokenizer import ClipTokenizer

# The run's identifier, written by dreambooth_jax.train in its workdir and copied into its export, read by
# dreambooth_jax.evaluate: {"identifier", "instance_prompt", "class_prompt"}.
IDENTIFIER_FILE = "identifier.json"

# The last ~fifth of the CLIP BPE merges; the final two ids are <start_of_text>/<end_of_text>.
DEFAULT_RARE_RANGE = (40_000, 49_406)


def candidate_identifiers(tokenizer: ClipTokenizer, id_range: tuple[int, int] = DEFAULT_RARE_RANGE,
                          max_chars: int = 3) -> list[tuple[int, str]]:
  """(id, text) of tokens in `id_range` that are whole words of <= `max_chars` letters and come
  back as that single token when written in a prompt."""
  out = []
  for token_id in range(*id_range):
    piece = tokenizer.decoder.get(token_id, "")
    if not piece.endswith("</w>"):  # word pieces would fuse with the next word
      continue
    text = tokenizer.decode([token_id]).strip()
    if not (0 < len(text) <= max_chars) or not text.isascii() or not text.isalpha() or " " in text:
      continue
    if tokenizer.encode(f"a {text} dog")[1:2] != [token_id]:
      continue
    out.append((token_id, text))
  return out


def sample_identifier(tokenizer: ClipTokenizer, seed: int = 0, *, num_tokens: int = 1,
                      id_range: tuple[int, int] = DEFAULT_RARE_RANGE, max_chars: int = 3,
                      prior_score: Callable[[str], float] | None = None, num_candidates: int = 8) -> str:
  """A rare-token identifier, e.g. 'xjy' or (num_tokens=2) 'qev zol'.

  prior_score(identifier) -> float (lower = weaker prior), optional: `num_candidates` identifiers
  are drawn and the one the frozen model knows least is kept (see `text_prior_shift`).
  """
  candidates = candidate_identifiers(tokenizer, id_range, max_chars)
  if len(candidates) < num_tokens:
    raise ValueError(f"only {len(candidates)} usable tokens in ids {id_range}; widen the range.")
  rng = np.random.default_rng(seed)
  draws = []
  for _ in range(num_candidates if prior_score else 1):
    picks = rng.choice(len(candidates), size=num_tokens, replace=False)
    draws.append(" ".join(candidates[i][1] for i in picks))
  if prior_score is None:
    return draws[0]
  scores = [prior_score(d) for d in draws]
  return draws[int(np.argmin(scores))]


def text_prior_shift(encode: Callable[[Sequence[str]], np.ndarray], class_noun: str) -> Callable[[str], float]:
  """A prior score for `sample_identifier`: how far 'a [V] [class]' moves from 'a [class]' in the
  frozen text encoder (mean-pooled states, 1 - cosine). A token the model knows little about
  moves it little, which is what the identifier should do before training."""
  def score(identifier: str) -> float:
    states = np.asarray(encode([f"a {identifier} {class_noun}", f"a {class_noun}"]), np.float64)
    pooled = states.mean(axis=1)
    a, b = pooled[0], pooled[1]
    return float(1.0 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
  return score


def instance_prompt(identifier: str, class_noun: str) -> str:
  return f"a {identifier} {class_noun}"


def class_prompt(class_noun: str) -> str:
  return f"a {class_noun}"
