"""Text tokenizers for the CLIP text tower and the Stable Diffusion text encoder.

Two families share one calling contract, `tokenizer(texts, context_length) -> int32 [n, L]`:

* `ClipTokenizer`: CLIP's byte-level BPE (49,408 tokens). Its ids equal `open_clip.tokenize`
  (and OpenAI's `clip.tokenize`, whose cleaning and BPE it reimplements). They equal Hugging
  Face's `CLIPTokenizer` on ordinary text; that one skips CLIP's ftfy repair and HTML unescaping,
  lower-cases a final 'Σ' as 'σ' rather than 'ς', and matches contractions case-sensitively, so
  text with entities, mojibake or such letters can differ there. Reads the packaged merges file,
  a Hugging Face `vocab.json` + `merges.txt` pair or `tokenizer.json`, and writes the pair back
  (`save_hf`).
* `SentencePieceTokenizer`: a sentencepiece model, loaded or trained on a caption corpus.

Row layout (both): `[sot, t_1, ..., t_k, eot, pad, ..., pad]`. Text too long for the row is cut so
that the end token is still the last one: `[sot, t_1, ..., t_{L-2}, eot]`.

Pooling contract with the text tower: the tower reads its sentence embedding at the end-of-text
token. Every tokenizer here exposes `eot_token_id`; the robust way to find the position is
`argmax(ids == eot_token_id)` (the first end token), which the tower uses when its config sets
`TextConfig.eot_token_id` (Hugging Face checkpoints). Otherwise it uses OpenAI's `argmax(ids)`, which
finds the same position only when the end token has the largest id in the row: true for
`ClipTokenizer` (eot = 49407 = vocab_size - 1) and for every model `SentencePieceTokenizer.train`
writes (eos = vocab_size - 1); `eot_is_largest_id` says whether it holds for a loaded one (it
does not, e.g., for a Hugging Face vocabulary with added tokens after `<|endoftext|>`).
"""
from __future__ import annotations

import functools
import gzip
import html
import itertools
import json
import os
import tempfile
from typing import Iterable, Sequence

import ftfy
import numpy as np
import regex

DEFAULT_CONTEXT_LENGTH = 77
DEFAULT_BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                                "bpe_simple_vocab_16e6.txt.gz")
CLIP_VOCAB_SIZE = 49408
# 256 byte symbols, 256 end-of-word byte symbols, two special tokens; the rest are merges.
_CLIP_NUM_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2
_END_OF_WORD = "</w>"
# Special-token spellings: OpenAI's BPE file / open_clip, and Hugging Face's.
_OPENAI_SOT, _OPENAI_EOT = "<start_of_text>", "<end_of_text>"
_HF_SOT, _HF_EOT = "<|startoftext|>", "<|endoftext|>"

# CLIP's pre-tokenizer: English contractions, runs of letters, single digits, runs of other
# non-space symbols. Case-insensitive as in CLIP (this matters for a few letters, e.g. the long s
# 'ſ' matches the "'s" contraction), although the text is lower-cased before it runs.
_WORD_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"
# ASCII text that ftfy.fix_text can change: HTML entities, and the control characters it deletes
# (deleting \x0b or \x1c-\x1f joins words that str.split() would otherwise separate).
_ASCII_NEEDS_FTFY = regex.compile(r"[^\t\n\x0c\r\x20-\x7e]|&")


class TokenizerError(ValueError):
  """A tokenizer file that is missing or malformed, or input the tokenizer cannot take."""


# ------------------------------------------------------------------------------ text cleaning

def clean_text(text: str) -> str:
  """CLIP's caption cleaning: repair mojibake (ftfy), unescape HTML twice, collapse whitespace,
  lower-case."""
  if not text.isascii() or _ASCII_NEEDS_FTFY.search(text) is not None:
    # Only non-ASCII text or the characters above can be changed by ftfy or html.unescape, and
    # ftfy costs ~20 us a caption: most captions skip it with identical output.
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
  return " ".join(text.split()).lower()


def _as_text_list(texts) -> list[str]:
  """Accepts a str, bytes (UTF-8, as TFDS yields captions), or a sequence of either."""
  if isinstance(texts, (str, bytes, np.str_, np.bytes_)):
    texts = [texts]
  elif isinstance(texts, np.ndarray):
    texts = texts.reshape(-1).tolist()
  elif not isinstance(texts, Sequence):
    raise TypeError(f"texts must be a str or a sequence of str, got {type(texts).__name__}.")
  out = []
  for i, text in enumerate(texts):
    if isinstance(text, bytes):
      try:
        text = text.decode("utf-8")
      except UnicodeDecodeError as e:
        raise TokenizerError(f"text {i} is bytes that are not valid UTF-8 ({e.reason} at byte "
                             f"{e.start}); decode it before tokenizing.") from e
    elif not isinstance(text, str):
      raise TypeError(f"texts[{i}] is a {type(text).__name__}, not a str: pass captions as str.")
    out.append(str(text))
  return out


def _as_text(text) -> str:
  if isinstance(text, (list, tuple, np.ndarray)):
    raise TypeError("encode takes one text; call the tokenizer itself on a batch.")
  return _as_text_list(text)[0]


def _check_context_length(context_length: int) -> int:
  if not isinstance(context_length, (int, np.integer)) or context_length < 2:
    raise TokenizerError(f"context_length must be an int >= 2 (room for the start and end "
                         f"tokens), got {context_length!r}.")
  return int(context_length)


def _check_ids(ids, vocab_size: int) -> list[int]:
  ids = np.asarray(ids)
  if not ids.size:
    return []
  if not np.issubdtype(ids.dtype, np.integer):
    raise TokenizerError(f"ids must be integers, got an array of {ids.dtype}.")
  if ids.min() < 0 or ids.max() >= vocab_size:
    raise TokenizerError(f"ids must lie in 0..{vocab_size - 1}; got {ids.min()}..{ids.max()}.")
  return ids.reshape(-1).tolist()


def _check_pad_id(pad_token_id: int, vocab_size: int) -> int:
  if not isinstance(pad_token_id, (int, np.integer)) or not 0 <= pad_token_id < vocab_size:
    raise TokenizerError(f"pad_token_id={pad_token_id!r} is outside the vocabulary "
                         f"(0..{vocab_size - 1}).")
  return int(pad_token_id)


def _pack_rows(contents: Iterable[Sequence[int]], num_rows: int, context_length: int,
               sot_id: int | None, eot_id: int, pad_id: int) -> np.ndarray:
  """`[sot] + content + [eot]`, content cut so that eot stays the last token; pad after it."""
  room = context_length - 1 - (sot_id is not None)
  head = [] if sot_id is None else [sot_id]
  out = np.full((num_rows, context_length), pad_id, dtype=np.int32)  # [n, L]
  for row, content in enumerate(contents):
    tokens = head + list(content[:room]) + [eot_id]
    out[row, :len(tokens)] = tokens
  return out


# ---------------------------------------------------------------------------- byte-level BPE

def _byte_symbols() -> list[tuple[int, str]]:
  """(byte, symbol) pairs in vocabulary order.

  BPE runs on strings, so each byte gets a printable stand-in character: bytes that are visible
  Latin-1 characters stand for themselves; the rest (space, control bytes, ...) are moved to
  U+0100 onwards, in byte order. The first 256 vocabulary ids follow this list's order.
  """
  visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
             *range(ord("®"), ord("ÿ") + 1)]
  hidden = sorted(set(range(256)) - set(visible))
  return ([(b, chr(b)) for b in visible]
          + [(b, chr(256 + i)) for i, b in enumerate(hidden)])


_BYTE_SYMBOLS = _byte_symbols()
# str.translate tables between a word's UTF-8 bytes (read as Latin-1) and their BPE symbols.
_BYTES_TO_SYMBOLS = {b: symbol for b, symbol in _BYTE_SYMBOLS}
_SYMBOLS_TO_BYTES = {ord(symbol): b for b, symbol in _BYTE_SYMBOLS}


def _merge_symbols(symbols: list[str], merge_ranks: dict[tuple[str, str], int]) -> list[str]:
  """Applies BPE merges in rank order: each round merges every occurrence of the adjacent pair with
  the lowest rank, scanning left to right (so 'a a a' under ('a', 'a') gives 'aa a')."""
  while len(symbols) > 1:
    best_rank, best_pair = None, None
    for pair in zip(symbols, symbols[1:]):
      rank = merge_ranks.get(pair)
      if rank is not None and (best_rank is None or rank < best_rank):
        best_rank, best_pair = rank, pair
    if best_pair is None:
      break
    first, second = best_pair
    merged, i, n = [], 0, len(symbols)
    while i < n:
      if i + 1 < n and symbols[i] == first and symbols[i + 1] == second:
        merged.append(first + second)
        i += 2
      else:
        merged.append(symbols[i])
        i += 1
    symbols = merged
  return symbols


def _read_text(path: str, what: str) -> str:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such {what} file.")
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      return f.read().decode("utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise TokenizerError(f"{path}: cannot read it as a UTF-8 {what} file ({e}).") from e


def _parse_merges(text: str, path: str, limit: int | None = None) -> list[tuple[str, str]]:
  """Merge lines 'a b' (at most `limit`), after an optional '#version' header line."""
  lines = text.split("\n", -1 if limit is None else limit + 1)
  if lines and "#version" in lines[0]:
    lines = lines[1:]
  if limit is not None:
    lines = lines[:limit]
  merges = []
  for number, line in enumerate(lines, start=2):
    if not line:
      continue
    parts = line.split()
    if len(parts) != 2:
      raise TokenizerError(f"{path}: line {number} is {line!r}, not a BPE merge 'left right'.")
    merges.append((parts[0], parts[1]))
  return merges


class ClipTokenizer:
  """CLIP's byte-level BPE tokenizer.

  Attributes: `vocab_size`, `encoder` (token string -> id), `decoder` (id -> token string),
  `merges`, `sot_token_id`, `eot_token_id`, `eot_is_largest_id`, `context_length`, and
  `pad_token_id`: 0 as in open_clip (and Stable Diffusion 2.x); Stable Diffusion 1.x's text
  encoder was trained on rows padded with the end token, and its UNet reads every position, so
  its pipelines pass `pad_token_id=eot_token_id`.
  Special-token strings inside a text become those tokens, as in CLIP.
  Pickles without its BPE cache, so it can be handed to data-loader worker processes.
  """

  def __init__(self, encoder: dict[str, int], merges: Sequence[tuple[str, str]], *,
               sot_token: str = _OPENAI_SOT, eot_token: str = _OPENAI_EOT,
               context_length: int = DEFAULT_CONTEXT_LENGTH, pad_token_id: int = 0,
               cache_size: int = 1 << 16, source: str = "vocabulary"):
    self.encoder = dict(encoder)
    self.merges = [tuple(m) for m in merges]
    self.vocab_size = len(self.encoder)
    self.decoder = {i: token for token, i in self.encoder.items()}
    if sorted(self.decoder) != list(range(self.vocab_size)):
      raise TokenizerError(f"{source}: token ids are not 0..{self.vocab_size - 1} without gaps "
                           "or repeats.")
    for token in (sot_token, eot_token):
      if token not in self.encoder:
        raise TokenizerError(f"{source}: the special token {token!r} is not in the vocabulary.")
    needed = [s for _, s in _BYTE_SYMBOLS] + [s + _END_OF_WORD for _, s in _BYTE_SYMBOLS]
    needed += [a + b for a, b in self.merges]
    missing = [t for t in needed if t not in self.encoder]
    if missing:
      raise TokenizerError(f"{source}: {len(missing)} byte symbols or merge results are not in "
                           f"the vocabulary (first: {missing[0]!r}); the vocab and merges do not "
                           "match.")
    self.sot_token, self.eot_token = sot_token, eot_token
    self.sot_token_id, self.eot_token_id = self.encoder[sot_token], self.encoder[eot_token]
    self.eot_is_largest_id = self.eot_token_id == self.vocab_size - 1
    self.pad_token_id = _check_pad_id(pad_token_id, self.vocab_size)
    self.context_length = _check_context_length(context_length)
    self.cache_size = cache_size
    self._setup()

  def _setup(self):
    """Derived lookup tables; rebuilt after unpickling (grain workers receive a pickled copy)."""
    self._merge_ranks = {pair: rank for rank, pair in enumerate(self.merges)}
    self._id_of = self.encoder.__getitem__
    self._id_to_token = [self.decoder[i] for i in range(self.vocab_size)]
    self._special_ids = {self.sot_token: (self.sot_token_id,),
                         self.eot_token: (self.eot_token_id,)}
    # Special-token strings found in the text map to their ids, as in CLIP; they come first so that
    # '<end_of_text>' is not split into symbols.
    specials = "|".join(regex.escape(t) for t in (self.sot_token, self.eot_token))
    self._find_words = regex.compile(specials + "|" + _WORD_PATTERN, regex.IGNORECASE).findall
    # One BPE run per distinct word; bounded so that a stream of rare words cannot grow memory.
    self._word_ids = functools.lru_cache(maxsize=self.cache_size)(self._bpe_word)

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._setup()

  # --- constructors

  @classmethod
  def from_bpe_file(cls, path: str | None = None, **kwargs) -> "ClipTokenizer":
    """From OpenAI's merges file (`bpe_simple_vocab_16e6.txt.gz`; default: the packaged copy).

    The vocabulary is implied: byte symbols, end-of-word byte symbols, the first 48,894 merges,
    then `<start_of_text>` and `<end_of_text>`.
    """
    path = DEFAULT_BPE_PATH if path is None else os.fspath(path)
    # The file holds more merges than CLIP's vocabulary uses; only the first ones count.
    merges = _parse_merges(_read_text(path, "BPE merges"), path, limit=_CLIP_NUM_MERGES)
    if len(merges) < _CLIP_NUM_MERGES:
      raise TokenizerError(f"{path}: holds {len(merges)} merges; CLIP's vocabulary needs "
                           f"{_CLIP_NUM_MERGES}.")
    tokens = [s for _, s in _BYTE_SYMBOLS] + [s + _END_OF_WORD for _, s in _BYTE_SYMBOLS]
    tokens += [a + b for a, b in merges] + [_OPENAI_SOT, _OPENAI_EOT]
    encoder = {token: i for i, token in enumerate(tokens)}
    return cls(encoder, merges, source=path, **kwargs)

  @classmethod
  def from_hf(cls, vocab_json_path: str, merges_txt_path: str, **kwargs) -> "ClipTokenizer":
    """From a Hugging Face CLIPTokenizer's `vocab.json` and `merges.txt` (as in Stable
    Diffusion's `tokenizer/` folder)."""
    vocab_json_path, merges_txt_path = os.fspath(vocab_json_path), os.fspath(merges_txt_path)
    try:
      encoder = json.loads(_read_text(vocab_json_path, "vocab.json"))
    except json.JSONDecodeError as e:
      raise TokenizerError(f"{vocab_json_path}: not valid JSON ({e}).") from e
    if not isinstance(encoder, dict) or not all(isinstance(v, int) for v in encoder.values()):
      raise TokenizerError(f"{vocab_json_path}: expected a JSON object of token -> integer id.")
    merges = _parse_merges(_read_text(merges_txt_path, "merges.txt"), merges_txt_path)
    kwargs.setdefault("sot_token", _HF_SOT if _HF_SOT in encoder else _OPENAI_SOT)
    kwargs.setdefault("eot_token", _HF_EOT if _HF_EOT in encoder else _OPENAI_EOT)
    return cls(encoder, merges, source=vocab_json_path, **kwargs)

  @classmethod
  def from_hf_tokenizer_json(cls, path: str, **kwargs) -> "ClipTokenizer":
    """From the `tokenizer.json` that recent `transformers` versions save for a CLIP tokenizer."""
    path = os.fspath(path)
    try:
      content = json.loads(_read_text(path, "tokenizer.json"))
      model = content["model"]
      encoder, raw_merges = model["vocab"], model["merges"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise TokenizerError(f"{path}: not a BPE tokenizer.json (no model.vocab / model.merges: "
                           f"{e}).") from e
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in raw_merges]
    if not isinstance(encoder, dict) or any(len(m) != 2 for m in merges):
      raise TokenizerError(f"{path}: model.vocab or model.merges is malformed.")
    kwargs.setdefault("sot_token", _HF_SOT if _HF_SOT in encoder else _OPENAI_SOT)
    kwargs.setdefault("eot_token", _HF_EOT if _HF_EOT in encoder else _OPENAI_EOT)
    return cls(encoder, merges, source=path, **kwargs)

  # --- encoding

  def _bpe_word(self, word: str) -> tuple[int, ...]:
    special = self._special_ids.get(word)
    if special is not None:
      return special
    symbols = list(word.encode("utf-8").decode("latin-1").translate(_BYTES_TO_SYMBOLS))
    symbols[-1] += _END_OF_WORD
    return tuple(map(self._id_of, _merge_symbols(symbols, self._merge_ranks)))

  def _encode_clean(self, text: str, max_tokens: int | None = None) -> list[int]:
    """Ids of cleaned text; with max_tokens, at least its first max_tokens ids (or all)."""
    words = self._find_words(text)
    if max_tokens is not None:
      # Every word gives at least one id, so later words cannot reach the row: skip their BPE.
      words = words[:max_tokens]
    return list(itertools.chain.from_iterable(map(self._word_ids, words)))

  def encode(self, text: str) -> list[int]:
    """Token ids of one text, without start/end tokens and without truncation."""
    return self._encode_clean(clean_text(_as_text(text)))

  def __call__(self, texts: str | Sequence[str], context_length: int | None = None,
               pad_token_id: int | None = None) -> np.ndarray:
    """int32 [n, context_length] rows `[sot, ..., eot, pad...]` (see the module docstring)."""
    texts = _as_text_list(texts)
    length = _check_context_length(self.context_length if context_length is None
                                   else context_length)
    pad = self.pad_token_id if pad_token_id is None else _check_pad_id(pad_token_id,
                                                                       self.vocab_size)
    room = length - 2
    contents = (self._encode_clean(clean_text(t), room) for t in texts)
    return _pack_rows(contents, len(texts), length, self.sot_token_id, self.eot_token_id, pad)

  # --- decoding

  def decode(self, ids) -> str:
    """Text of a sequence of ids; end-of-word marks become spaces (trailing one stripped).
    The start and end tokens are decoded too (`decode_rows` gives the bare texts of `__call__`
    rows); padding after the end token is not: a padded row decodes to '<start_of_text>a dog
    <end_of_text>', not followed by one '!' (id 0) per padding position as open_clip's decode
    renders it (its own captioning code cuts at '<end_of_text>' afterwards). TokenizerError for a
    batch of rows [n, T] (n > 1): `decode_rows` gives one text per row."""
    if np.ndim(ids) > 1 and np.shape(ids)[0] > 1:
      raise TokenizerError(f"decode takes one sequence of ids, got an array of shape {np.shape(ids)}; "
                           "decode_rows gives one text per row.")
    ids = _check_ids(ids, self.vocab_size)
    # Padding: the trailing run of pad ids (0, pad_token_id or the end token repeated) after an end token.
    pads = {0, self.pad_token_id, self.eot_token_id}
    end = len(ids)
    while end and ids[end - 1] in pads:
      end -= 1
    if self.eot_token_id in ids[end:]:
      ids = ids[:end + ids[end:].index(self.eot_token_id) + 1]
    symbols = "".join([self._id_to_token[i] for i in ids])
    raw = symbols.translate(_SYMBOLS_TO_BYTES).encode("latin-1")
    # A cut-off multi-byte character decodes to U+FFFD rather than failing.
    return raw.decode("utf-8", errors="replace").replace(_END_OF_WORD, " ").strip()

  def decode_rows(self, rows: np.ndarray) -> list[str]:
    """Texts of `__call__` rows: the tokens between the start token and the first end token."""
    texts = []
    for row in np.asarray(rows).reshape(-1, np.shape(rows)[-1]).tolist():
      if row and row[0] == self.sot_token_id:
        row = row[1:]
      if self.eot_token_id in row:
        row = row[:row.index(self.eot_token_id)]
      texts.append(self.decode(row))
    return texts

  # --- Hugging Face export

  def save_hf(self, directory: str) -> None:
    """Writes vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json, which
    `transformers.CLIPTokenizer.from_pretrained(directory)` loads with the same ids.

    Special tokens are renamed to Hugging Face's spelling (`<|startoftext|>`, `<|endoftext|>`).
    The pad token written is `<|endoftext|>`, as in OpenAI's and Stable Diffusion 1.x's files, so
    `padding="max_length"` there equals `self(texts, pad_token_id=self.eot_token_id)` here. (Naming
    '!', id 0, as pad token would make transformers treat every '!' as a special token.)
    """
    os.makedirs(directory, exist_ok=True)
    hf_names = {self.sot_token: _HF_SOT, self.eot_token: _HF_EOT}
    vocab = {hf_names.get(token, token): i for token, i in self.encoder.items()}
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
      json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
      f.write("#version: 0.2\n")
      f.writelines(f"{a} {b}\n" for a, b in self.merges)
    special = {"bos_token": _HF_SOT, "eos_token": _HF_EOT, "unk_token": _HF_EOT,
               "pad_token": _HF_EOT}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.context_length,
              "do_lower_case": True, "errors": "replace", **special}
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
      with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2, ensure_ascii=False)


# ----------------------------------------------------------------------------- sentencepiece

class SentencePieceTokenizer:
  """A sentencepiece model behind the same `__call__` contract as `ClipTokenizer`.

  `eot_token_id` is the model's eos id; `sot_token_id` its bos id (None if it has none, and then
  rows start with the first text token); `pad_token_id` its pad id, or 0 if it has none (the
  causal text tower never reads past the end token). Models written by `train` put pad at 0, unk
  at 1, bos at vocab_size - 2 and eos at vocab_size - 1, so `argmax(ids)` pools at the end token
  as in CLIP.
  Texts get CLIP's cleaning (`clean=True`) before sentencepiece sees them, in training too.
  """

  def __init__(self, model_path: str, *, context_length: int = DEFAULT_CONTEXT_LENGTH,
               clean: bool = True):
    import sentencepiece
    model_path = os.fspath(model_path)
    if not os.path.isfile(model_path):
      raise FileNotFoundError(f"{model_path}: no such sentencepiece model file.")
    try:
      self._processor = sentencepiece.SentencePieceProcessor(model_file=model_path)
    except (RuntimeError, OSError) as e:
      raise TokenizerError(f"{model_path}: not a sentencepiece model ({e}).") from e
    self.model_path = model_path
    self.vocab_size = self._processor.get_piece_size()
    if self._processor.eos_id() < 0:
      raise TokenizerError(f"{model_path}: the model has no eos piece, which the text tower pools "
                           "at; retrain it with an eos_id.")
    self.eot_token_id = self._processor.eos_id()
    self.sot_token_id = self._processor.bos_id() if self._processor.bos_id() >= 0 else None
    self.pad_token_id = max(self._processor.pad_id(), 0)
    self.eot_is_largest_id = self.eot_token_id == self.vocab_size - 1
    self.context_length = _check_context_length(context_length)
    self.clean = clean

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_processor"}

  def __setstate__(self, state):
    self.__init__(state["model_path"], context_length=state["context_length"],
                  clean=state["clean"])

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int, out_prefix: str, *,
            model_type: str = "unigram", clean: bool = True,
            context_length: int = DEFAULT_CONTEXT_LENGTH, **trainer_options
            ) -> "SentencePieceTokenizer":
    """Trains on an iterable of captions; writes `{out_prefix}.model` and `.vocab`.

    Extra keyword arguments go to `sentencepiece.SentencePieceTrainer.train` (e.g.
    `character_coverage`, `input_sentence_size`).
    """
    import sentencepiece
    if isinstance(texts, (str, bytes)):
      raise TypeError("train takes an iterable of texts, not one text.")
    if vocab_size < 8:
      raise TokenizerError(f"vocab_size={vocab_size} is too small for a sentencepiece model.")
    directory = os.path.dirname(os.fspath(out_prefix))
    if directory:
      os.makedirs(directory, exist_ok=True)
    # Streamed: the corpus need not fit in memory as a list.
    sentences = (clean_text(t) if clean else t for t in map(_as_text, texts))
    options = dict(model_prefix=os.fspath(out_prefix), vocab_size=vocab_size,
                   model_type=model_type, pad_id=0, unk_id=1, bos_id=vocab_size - 2,
                   eos_id=vocab_size - 1, minloglevel=2)
    options.update(trainer_options)
    try:
      sentencepiece.SentencePieceTrainer.train(sentence_iterator=sentences, **options)
    except RuntimeError as e:
      message = str(e)
      if "required_chars" in message:
        raise TokenizerError(f"vocab_size={vocab_size} is too small for this corpus's characters: "
                             f"{message.split(']')[-1].strip()}") from e
      if "pieces_size" in message or "too high" in message:
        limit = ""
        if isinstance(texts, Sequence):
          limit = _sentencepiece_vocab_limit(texts, clean, options)
        raise TokenizerError(f"vocab_size={vocab_size} is more pieces than this corpus yields"
                             f"{limit}; lower vocab_size or train on more text.") from e
      raise TokenizerError(f"sentencepiece training failed: {message}") from e
    return cls(f"{out_prefix}.model", context_length=context_length, clean=clean)

  def encode(self, text: str) -> list[int]:
    """Token ids of one text, without bos/eos and without truncation."""
    text = _as_text(text)
    return self._processor.encode(clean_text(text) if self.clean else text)

  def decode(self, ids) -> str:
    return self._processor.decode(_check_ids(ids, self.vocab_size))

  def __call__(self, texts: str | Sequence[str], context_length: int | None = None
               ) -> np.ndarray:
    """int32 [n, context_length] rows `[bos, ..., eos, pad...]`."""
    texts = _as_text_list(texts)
    length = _check_context_length(self.context_length if context_length is None
                                   else context_length)
    if self.clean:
      texts = [clean_text(t) for t in texts]
    contents = self._processor.encode(texts) if texts else []
    return _pack_rows(contents, len(texts), length, self.sot_token_id, self.eot_token_id,
                      self.pad_token_id)


def _sentencepiece_vocab_limit(texts: Sequence[str], clean: bool, options: dict) -> str:
  """The largest vocab_size sentencepiece accepts for this corpus, as ' (at most N)', or ''.

  With the special ids at the end of the vocabulary, sentencepiece fails with an internal check
  instead of its usual hint; training again with its default ids recovers the hint."""
  import sentencepiece
  retry = {k: v for k, v in options.items() if k not in ("pad_id", "unk_id", "bos_id", "eos_id")}
  with tempfile.TemporaryDirectory() as directory:
    retry["model_prefix"] = os.path.join(directory, "probe")
    sentences = (clean_text(t) if clean else t for t in map(_as_text, texts))
    try:
      sentencepiece.SentencePieceTrainer.train(sentence_iterator=sentences, **retry)
    except RuntimeError as e:
      found = regex.search(r"value <= (\d+)", str(e))
      if found:
        return f" (at most {found.group(1)})"
  return ""


def truncation_notes(tokenizer, texts: Sequence[str], context_length: int | None = None) -> list[str]:
  """One line per text longer than the text tower reads (`context_length`, default the tokenizer's:
  77 tokens with its start and end tokens), saying how much is dropped: the rows `tokenizer(texts)`
  makes are cut without a word, as CLIP and open_clip cut them (diffusers warns). For commands that
  take a prompt from the user (clip_jax.draw, dreambooth_jax.edit / sample), not for training captions."""
  length = context_length or getattr(tokenizer, "context_length", DEFAULT_CONTEXT_LENGTH)
  if not hasattr(tokenizer, "encode"):  # a bare callable (tests' stand-ins): nothing to count with
    return []
  notes = []
  for text in _as_text_list(texts):
    tokens = len(tokenizer.encode(text)) + 2  # with the start and end tokens
    if tokens > length:
      shown = text if len(text) <= 40 else text[:37] + "..."
      notes.append(f"Prompt {shown!r} is {tokens} tokens; the text encoder reads the first {length}, "
                   f"so its last {tokens - length} are dropped.")
  return notes


# ------------------------------------------------------------------------------- entry points

@functools.lru_cache(maxsize=1)
def default_tokenizer() -> ClipTokenizer:
  """The packaged CLIP BPE tokenizer, built once per process."""
  return ClipTokenizer.from_bpe_file()


def tokenize(texts: str | Sequence[str],
             context_length: int = DEFAULT_CONTEXT_LENGTH) -> np.ndarray:
  """int32 [n, context_length]; the same ids as `open_clip.tokenize` (which returns int64)."""
  return default_tokenizer()(texts, context_length=context_length)


def tokenizer_files(directory: str) -> tuple[str, ...]:
  """The tokenizer files in `directory` that `get_tokenizer` reads, in its order: ('vocab.json',
  'merges.txt'), ('tokenizer.json',) or the one sentencepiece model ('NAME.model',); () when none."""
  if all(os.path.isfile(os.path.join(directory, f)) for f in ("vocab.json", "merges.txt")):
    return ("vocab.json", "merges.txt")
  if os.path.isfile(os.path.join(directory, "tokenizer.json")):
    return ("tokenizer.json",)
  models = sorted(name for name in os.listdir(directory) if name.endswith(".model"))
  return (models[0],) if len(models) == 1 else ()


def get_tokenizer(spec: str | None = "clip", *, context_length: int = DEFAULT_CONTEXT_LENGTH):
  """A tokenizer from a config string.

  spec: 'clip' (or None): the packaged CLIP BPE; a `.model` file: sentencepiece; a directory with
  `vocab.json` + `merges.txt` or `tokenizer.json` (a Hugging Face CLIP tokenizer, e.g. Stable
  Diffusion's `tokenizer/`) or with one `.model` file; a BPE merges file (`.txt` / `.txt.gz`).
  """
  if spec is None or spec == "clip":
    if context_length == DEFAULT_CONTEXT_LENGTH:
      return default_tokenizer()
    return ClipTokenizer.from_bpe_file(context_length=context_length)
  spec = os.fspath(spec)
  if os.path.isdir(spec):
    files = tokenizer_files(spec)
    if files == ("vocab.json", "merges.txt"):
      return ClipTokenizer.from_hf(*(os.path.join(spec, f) for f in files), context_length=context_length)
    if files == ("tokenizer.json",):
      return ClipTokenizer.from_hf_tokenizer_json(os.path.join(spec, files[0]), context_length=context_length)
    if files:
      return SentencePieceTokenizer(os.path.join(spec, files[0]), context_length=context_length)
    raise TokenizerError(f"{spec}: the directory holds neither vocab.json + merges.txt, nor "
                         "tokenizer.json, nor a single sentencepiece .model file.")
  if spec.endswith(".model"):
    return SentencePieceTokenizer(spec, context_length=context_length)
  if spec.endswith((".txt", ".txt.gz")):
    return ClipTokenizer.from_bpe_file(spec, context_length=context_length)
  if not os.path.exists(spec):
    raise TokenizerError(f"tokenizer spec {spec!r} is not 'clip' and no such file or directory "
                         "exists; pass 'clip', a sentencepiece .model file, or a directory with "
                         "vocab.json + merges.txt.")
  raise TokenizerError(f"{spec}: not a tokenizer file this project reads; pass 'clip', a "
                       "sentencepiece .model file, or a directory with vocab.json + merges.txt.")
