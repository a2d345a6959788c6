"""Tokenizers: ids equal to open_clip and to Hugging Face's CLIPTokenizer, and the row contract."""
import functools
import html
import json
import os
import pickle
import random
import unicodedata

import numpy as np
import pytest

from clip_jax import tokenizer as tk

open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")

# ------------------------------------------------------------------ a varied, deterministic corpus

_WORDS = ("a photo of the dog cat bird red blue green small large old young man woman child "
          "running sitting standing on in at with near beach street table kitchen city night "
          "sunset snow river mountain car bus train bicycle holding wearing eating two three "
          "painting sketch close-up portrait landscape view from above vintage").split()
_PIECES = {
    "contractions": ["don't", "I'M", "we'll", "they've", "she'd", "it's", "O'Neil", "rock'n'roll",
                     "'s", "''", "it’s", "can't've", "Y'ALL'D", "'ſ", "'S"],
    "numbers": ["3.14", "1,000,000", "2024", "007", "½", "²", "٣٤", "Ⅻ", "①", "१२३", "1e-5", "-42"],
    "punctuation": ["...", "!?", "--", "—", "«»", "“quoted”", "(parens)", "#hashtag", "@user",
                    "http://example.com/a?b=c&d=e", "mail@x.org", "C++", "<b>bold</b>", "~`^|\\",
                    "[x]", "{y}", "a/b", "__init__", "$9.99", "100%", ";-)", "¿qué?", "‽"],
    "html": ["&amp;", "&lt;3", "&gt;", "&quot;", "&#39;", "&#x1F600;", "&nbsp;", "&amp;amp;",
             "&copy;", "&notanentity;", "& ", "&#12345678;", "&AMP;", "&lt;b&gt;"],
    "scripts": ["Καλημέρα κόσμε", "Привет мир", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया",
                "สวัสดีชาวโลก", "你好世界", "こんにちは世界 カタカナ", "안녕하세요 세계", "გამარჯობა",
                "Բարեւ", "வணக்கம்", "ওহে বিশ্ব", "ሰላም", "Xin chào thế giới", "İstanbul ılık",
                "Straße ÖKONOMIE", "garçon déjà vu", "Zażółć gęślą jaźń", "Þórður", "བཀྲ་ཤིས",
                "សួស្តី", "ǅemal ǈ", "ΣΊΣΥΦΟΣ"],
    "emoji": ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🇯🇵", "❤️", "🏳️‍🌈", "🤖🦄", "✨", "☃", "©®™", "🐶🐱🐭"],
    "odd": ["e\u0301", "Ｆｕｌｌ ｗｉｄｔｈ", "ﬁ ﬂ", "a\u200bb\u200dc\ufeff", "\u200fק", "x\u2028y",
            "soft\xadhyphen", "Ã©tÃ©", "â€œhiâ€\x9d", "Ã¢â‚¬â„¢", "∑∫√∞≈", "─│┌", "⠁⠃",
            "\ue000", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𠜎", "𐌰𐌱", "\x00\x07bell", "\x1b[31mred\x1b[0m", "\x85\x9d",
            "\ufffd", "\x0bvt\x0cff\x1cfs", "K\u212a", "ǰ\u0331"],
    "special": ["<start_of_text>", "<end_of_text>", "<START_OF_TEXT>", "<|endoftext|>"],
    "spaces": ["   ", "\t\t", "\n\n\n", "\r\n", "\u3000", "\xa0\xa0", "\u2003", " \t \n "],
}
_SEPARATORS = [" ", " ", " ", "", "  ", "\t", "\n", "\u3000", "\xa0", ", ", ". "]


def _random_code_point(rng: random.Random) -> str:
  while True:
    c = rng.choice([rng.randrange(0x20, 0x800), rng.randrange(0x800, 0x10000),
                    rng.randrange(0x10000, 0x30000)])
    if not 0xD800 <= c <= 0xDFFF:  # lone surrogates are not encodable text
      return chr(c)


@functools.lru_cache(maxsize=1)
def varied_strings(count: int = 2100, seed: int = 0,
                   random_code_points: bool = True) -> tuple[str, ...]:
  """Captions, every script and oddity above mixed at random, plus edge cases and long texts."""
  rng = random.Random(seed)
  texts = ["", " ", "\t\n  \r\n", "\u3000\xa0", "A photo of a dog.", "a" * 300, "ab" * 400,
           " ".join(["word"] * 200), "🐶" * 100, "x" * 5000]
  texts += [piece for pieces in _PIECES.values() for piece in pieces]
  kinds = list(_PIECES)
  while len(texts) < count:
    parts = []
    for _ in range(rng.choice([1, 2, 4, 8, 12, 30, 120])):
      roll = rng.random()
      if roll < 0.45:
        word = rng.choice(_WORDS)
        parts.append(word.upper() if rng.random() < 0.1 else word.capitalize()
                     if rng.random() < 0.1 else word)
      elif roll < 0.9:
        parts.append(rng.choice(_PIECES[rng.choice(kinds)]))
      elif random_code_points:
        parts.append("".join(_random_code_point(rng) for _ in range(rng.randrange(1, 6))))
      parts.append(rng.choice(_SEPARATORS))
    texts.append("".join(parts))
  return tuple(texts)


@functools.lru_cache(maxsize=1)
def open_clip_ids() -> np.ndarray:
  return open_clip_tokenizer.tokenize(list(varied_strings())).numpy()


# ----------------------------------------------------------------------------- CLIP BPE parity

def test_varied_strings_cover_the_cases():
  texts = varied_strings()
  assert len(texts) >= 2000
  assert "" in texts and any(t.strip() == "" and t for t in texts)
  # Some need truncation, some carry entities, some are not Latin.
  lengths = [len(open_clip_tokenizer._tokenizer.encode(t)) for t in texts[:400]]
  assert max(lengths) > 75 and sum(n > 75 for n in lengths) >= 10
  assert sum("&" in t for t in texts) > 100 and sum(not t.isascii() for t in texts) > 1000


def test_ids_equal_open_clip_tokenize():
  ids = tk.tokenize(list(varied_strings()))
  assert ids.dtype == np.int32 and ids.shape == (len(varied_strings()), 77)
  np.testing.assert_array_equal(ids, open_clip_ids())


@pytest.mark.parametrize("context_length", [2, 5, 16, 200])
def test_ids_equal_open_clip_at_other_context_lengths(context_length):
  texts = list(varied_strings()[:300])
  np.testing.assert_array_equal(tk.tokenize(texts, context_length=context_length),
                                open_clip_tokenizer.tokenize(texts, context_length).numpy())


def test_encode_equals_open_clip_encode_without_truncation():
  tokenizer = tk.default_tokenizer()
  for text in varied_strings()[:400]:
    assert tokenizer.encode(text) == open_clip_tokenizer._tokenizer.encode(text), repr(text)


def test_clean_text_equals_open_clip_cleaning():
  # Covers the ASCII fast path that skips ftfy: every ASCII character, alone and between words.
  ascii_texts = [f"a{chr(c)}b {chr(c)}" for c in range(128)] + ["x &amp; y", "tom&jerry"]
  for text in ascii_texts + list(varied_strings()[:500]):
    assert tk.clean_text(text) == open_clip_tokenizer._clean_lower(text), repr(text)


def test_special_attributes():
  tokenizer = tk.default_tokenizer()
  assert tokenizer.vocab_size == len(tokenizer.encoder) == len(tokenizer.decoder) == 49408
  assert (tokenizer.sot_token_id, tokenizer.eot_token_id) == (49406, 49407)
  assert tokenizer.eot_is_largest_id and tokenizer.pad_token_id == 0
  assert tokenizer.encoder == open_clip_tokenizer._tokenizer.encoder
  assert all(tokenizer.decoder[i] == token for token, i in tokenizer.encoder.items())
  assert tk.get_tokenizer("clip") is tk.get_tokenizer() is tokenizer
  from_path = tk.get_tokenizer(tk.DEFAULT_BPE_PATH, context_length=32)
  assert from_path.encoder == tokenizer.encoder and from_path("a").shape == (1, 32)


def test_row_contract():
  tokenizer = tk.default_tokenizer()
  rows = tokenizer(["a dog", "word " * 100, ""])
  assert rows.shape == (3, 77) and rows.dtype == np.int32
  # Pooling at argmax(ids) finds the end token, truncated or not.
  np.testing.assert_array_equal(np.argmax(rows, axis=-1), [3, 76, 1])
  assert (rows[:, 0] == tokenizer.sot_token_id).all() and rows[1, -1] == tokenizer.eot_token_id
  assert (rows[0, 4:] == 0).all() and (rows[2, 2:] == 0).all()
  assert tokenizer("a dog").shape == (1, 77) and tokenizer([]).shape == (0, 77)
  eot_padded = tokenizer(["a dog"], pad_token_id=tokenizer.eot_token_id)
  assert (eot_padded[0, 3:] == tokenizer.eot_token_id).all()
  # bytes (as TFDS yields captions) and numpy string arrays are accepted.
  np.testing.assert_array_equal(tokenizer([b"a dog", np.str_("a cat")]),
                                tokenizer(np.array(["a dog", "a cat"])))


def test_decode_inverts_encode():
  tokenizer = tk.default_tokenizer()
  for text in varied_strings()[:600]:
    ids = tokenizer.encode(text)
    decoded = tokenizer.decode(ids)
    # Byte-level BPE loses nothing but the word boundaries the pre-tokenizer introduced.
    assert decoded.replace(" ", "") == tk.clean_text(text).replace(" ", ""), repr(text)
    assert decoded == open_clip_tokenizer._tokenizer.decode(ids).strip()
  rows = tokenizer(["A photo of a Dog.", "two  cats"])
  assert tokenizer.decode_rows(rows) == ["a photo of a dog .", "two cats"]
  assert tokenizer.decode(np.array(tokenizer.encode("hello world"))) == "hello world"


def test_decode_of_a_padded_row_stops_at_the_end_token():
  """A padded row decoded to '<start_of_text>a dog <end_of_text>!!!!...' (id 0 is '!'), as open_clip's
  decode renders it: the padding is dropped, the rest is open_clip's text up to its first end token."""
  tokenizer = tk.default_tokenizer()
  for pad in (0, tokenizer.eot_token_id):
    row = tokenizer(["A photo of a Dog!"], pad_token_id=pad)[0]
    reference = open_clip_tokenizer._tokenizer.decode(row.tolist())
    assert reference.endswith("!!!!") or pad  # open_clip's own rendering of the zero padding
    expected = reference[:reference.index("<end_of_text>") + len("<end_of_text>")]
    assert tokenizer.decode(row) == expected == "<start_of_text>a photo of a dog ! <end_of_text>"
  assert tokenizer.decode(tokenizer.encode("wow!!")) == "wow !!"  # real '!'s stay
  rows = tokenizer(["a dog", "a cat"])  # a batch: one joined string with the padding between, before
  with pytest.raises(tk.TokenizerError, match=r"decode takes one sequence of ids, got an array of shape \(2, 77\); "
                     "decode_rows"):
    tokenizer.decode(rows)
  assert tokenizer.decode_rows(rows) == ["a dog", "a cat"] and tokenizer.decode(rows[:1]) == tokenizer.decode(rows[0])


def test_bpe_cache_is_bounded_and_pickles():
  tokenizer = tk.ClipTokenizer.from_bpe_file(cache_size=8)
  reference = tk.default_tokenizer()
  texts = list(varied_strings()[:200])
  np.testing.assert_array_equal(tokenizer(texts), reference(texts))
  assert tokenizer._word_ids.cache_info().currsize <= 8
  restored = pickle.loads(pickle.dumps(tokenizer))
  np.testing.assert_array_equal(restored(texts), reference(texts))


# ------------------------------------------------------------------------------- Hugging Face

def _hf_agrees_on(text: str) -> bool:
  """Where Hugging Face's CLIPTokenizer (tokenizers backend) is comparable with CLIP's.

  It normalizes with NFC only (no ftfy repair, no HTML unescaping), lower-cases without the
  final-sigma rule, matches the contractions case-sensitively (CLIP's "'s" also matches "'ſ"),
  splits special-token spellings before lower-casing, and its regex engine has its own Unicode
  tables (so random code points, some unassigned in one table, are left out by the caller).
  """
  if any(c in text for c in "&<Σſ") or any(ord(c) < 32 and c not in "\t\n\r" for c in text):
    return False
  import ftfy
  return ftfy.fix_text(text) == unicodedata.normalize("NFC", text) == html.unescape(text)


def test_save_hf_loads_in_transformers_with_equal_ids(tmp_path):
  transformers = pytest.importorskip("transformers")
  tokenizer = tk.default_tokenizer()
  tokenizer.save_hf(str(tmp_path))
  hf = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
  texts = [t for t in varied_strings(random_code_points=False) if _hf_agrees_on(t)]
  assert len(texts) > 500
  hf_rows = hf(texts, padding="max_length", max_length=77, truncation=True,
               return_tensors="np")["input_ids"]
  # transformers pads with the end token (its CLIP files name it as pad token).
  np.testing.assert_array_equal(hf_rows, tokenizer(texts, pad_token_id=tokenizer.eot_token_id))
  assert [hf(t)["input_ids"][1:-1] for t in texts[:200]] == [tokenizer.encode(t)
                                                            for t in texts[:200]]
  assert hf.bos_token_id == tokenizer.sot_token_id and hf.eos_token_id == tokenizer.eot_token_id

  # Reading the files back gives the default tokenizer's ids (special tokens now spelled HF's way).
  reloaded = tk.ClipTokenizer.from_hf(tmp_path / "vocab.json", tmp_path / "merges.txt")
  assert reloaded.encoder["<|endoftext|>"] == tokenizer.eot_token_id
  texts = [t for t in varied_strings() if "<" not in t]
  np.testing.assert_array_equal(reloaded(texts), tokenizer(texts))
  np.testing.assert_array_equal(tk.get_tokenizer(str(tmp_path))(texts), tokenizer(texts))

  # A vocabulary with a token added after the end token (as textual inversion leaves one): the
  # end token is no longer the largest id, which the text tower must be told.
  vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
  vocab["<new-concept>"] = len(vocab)
  (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
  extended = tk.ClipTokenizer.from_hf(tmp_path / "vocab.json", tmp_path / "merges.txt")
  assert extended.vocab_size == 49409 and not extended.eot_is_largest_id


def test_files_written_by_transformers_load_with_open_clip_ids(tmp_path):
  transformers = pytest.importorskip("transformers")
  # Built from open_clip's own tables, saved by transformers: none of our writing code involved.
  reference = open_clip_tokenizer._tokenizer
  hf_names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
  vocab = {hf_names.get(token, token): i for token, i in reference.encoder.items()}
  merges = sorted(reference.bpe_ranks, key=reference.bpe_ranks.get)
  transformers.CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(str(tmp_path))
  texts = [t for t in varied_strings() if "<" not in t]
  expected = open_clip_tokenizer.tokenize(texts).numpy()
  np.testing.assert_array_equal(tk.get_tokenizer(str(tmp_path))(texts), expected)

  # The same content as the vocab.json + merges.txt pair found in hub repositories.
  model = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))["model"]
  pair_dir = tmp_path / "pair"
  pair_dir.mkdir()
  (pair_dir / "vocab.json").write_text(json.dumps(model["vocab"]), encoding="utf-8")
  lines = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
  (pair_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n",
                                       encoding="utf-8")
  from_pair = tk.ClipTokenizer.from_hf(pair_dir / "vocab.json", pair_dir / "merges.txt")
  np.testing.assert_array_equal(from_pair(texts), expected)


# ----------------------------------------------------------------------------- sentencepiece

def _captions(count: int, seed: int = 1) -> list[str]:
  rng = random.Random(seed)
  return [" ".join(rng.choice(_WORDS) for _ in range(rng.randrange(3, 12))) + "."
          for _ in range(count)]


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
  prefix = tmp_path_factory.mktemp("spm") / "captions"
  return tk.SentencePieceTokenizer.train(iter(_captions(2000)), vocab_size=64,
                                         out_prefix=str(prefix), context_length=24)


def test_sentencepiece_row_contract(sentencepiece_model):
  tokenizer = sentencepiece_model
  assert tokenizer.vocab_size == 64 and tokenizer.eot_token_id == 63 and tokenizer.eot_is_largest_id
  assert tokenizer.sot_token_id == 62 and tokenizer.pad_token_id == 0
  texts = ["A photo of the dog.", " ".join(_WORDS), ""]
  rows = tokenizer(texts)
  assert rows.shape == (3, 24) and rows.dtype == np.int32
  assert (rows[:, 0] == tokenizer.sot_token_id).all() and rows[1, -1] == tokenizer.eot_token_id
  eot_positions = np.argmax(rows == tokenizer.eot_token_id, axis=-1)
  np.testing.assert_array_equal(np.argmax(rows, axis=-1), eot_positions)
  assert eot_positions[2] == 1 and (rows[2, 2:] == 0).all()
  content = tokenizer.encode(texts[0])
  np.testing.assert_array_equal(rows[0, 1:len(content) + 1], content)
  assert tokenizer.decode(content) == "a photo of the dog."
  assert tokenizer(texts, context_length=40).shape == (3, 40)


def test_sentencepiece_loads_from_file_and_pickles(sentencepiece_model):
  texts = _captions(50, seed=7)
  loaded = tk.get_tokenizer(sentencepiece_model.model_path, context_length=24)
  np.testing.assert_array_equal(loaded(texts), sentencepiece_model(texts))
  by_directory = tk.get_tokenizer(os.path.dirname(sentencepiece_model.model_path),
                                  context_length=24)
  np.testing.assert_array_equal(by_directory(texts), sentencepiece_model(texts))
  restored = pickle.loads(pickle.dumps(sentencepiece_model))
  np.testing.assert_array_equal(restored(texts), sentencepiece_model(texts))


def test_sentencepiece_vocab_too_large_is_a_clear_error(tmp_path):
  with pytest.raises(tk.TokenizerError, match=r"\(at most \d+\); lower vocab_size"):
    tk.SentencePieceTokenizer.train(["a dog", "a cat"] * 10, vocab_size=5000,
                                    out_prefix=str(tmp_path / "tiny"))
  with pytest.raises(tk.TokenizerError, match="too small for this corpus's characters"):
    tk.SentencePieceTokenizer.train(["abcdefghijklmnopqrstuvwxyz"] * 10, vocab_size=10,
                                    out_prefix=str(tmp_path / "tiny"))


# -------------------------------------------------------------------------------- bad input

def test_bad_paths_and_files_give_clear_errors(tmp_path):
  missing = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="no such BPE merges file"):
    tk.ClipTokenizer.from_bpe_file(missing + ".txt.gz")
  with pytest.raises(FileNotFoundError, match="no such vocab.json file"):
    tk.ClipTokenizer.from_hf(missing + ".json", missing + ".txt")
  with pytest.raises(FileNotFoundError, match="no such sentencepiece model"):
    tk.get_tokenizer(missing + ".model")
  with pytest.raises(tk.TokenizerError, match="is not 'clip' and no such file"):
    tk.get_tokenizer(missing)
  with pytest.raises(tk.TokenizerError, match="neither vocab.json"):
    tk.get_tokenizer(str(tmp_path))

  garbage = tmp_path / "garbage.model"
  garbage.write_bytes(b"\x00not a model")
  with pytest.raises(tk.TokenizerError, match="not a sentencepiece model"):
    tk.get_tokenizer(str(garbage))
  short = tmp_path / "short.txt"
  short.write_text("#version: 0.2\ni n\nt h\n", encoding="utf-8")
  with pytest.raises(tk.TokenizerError, match="holds 2 merges"):
    tk.ClipTokenizer.from_bpe_file(str(short))
  vocab = tmp_path / "vocab.json"
  vocab.write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1}), encoding="utf-8")
  with pytest.raises(tk.TokenizerError, match="do not match"):
    tk.ClipTokenizer.from_hf(vocab, short)
  vocab.write_text("{not json", encoding="utf-8")
  with pytest.raises(tk.TokenizerError, match="not valid JSON"):
    tk.ClipTokenizer.from_hf(vocab, short)
  bad_line = tmp_path / "bad.txt"
  bad_line.write_text("#version: 0.2\ni n x\n", encoding="utf-8")
  with pytest.raises(tk.TokenizerError, match="line 2"):
    tk.ClipTokenizer.from_bpe_file(str(bad_line))


def test_bad_arguments_give_clear_errors():
  tokenizer = tk.default_tokenizer()
  with pytest.raises(TypeError, match="not a str"):
    tokenizer(["a dog", None])
  with pytest.raises(TypeError, match="sequence of str"):
    tokenizer(42)
  with pytest.raises(TypeError, match="one text"):
    tokenizer.encode(["a", "b"])
  with pytest.raises(tk.TokenizerError, match="not valid UTF-8"):
    tokenizer([b"\xff\xfe"])
  with pytest.raises(tk.TokenizerError, match="context_length"):
    tokenizer("a dog", context_length=1)
  with pytest.raises(tk.TokenizerError, match="0..49407"):
    tokenizer.decode([5, 49408])
  with pytest.raises(tk.TokenizerError, match="must be integers"):
    tokenizer.decode([1.5])
  with pytest.raises(tk.TokenizerError, match="pad_token_id"):
    tokenizer("a dog", pad_token_id=49408)
  with pytest.raises(tk.TokenizerError, match="pad_token_id"):
    tk.ClipTokenizer.from_bpe_file(pad_token_id=-1)
