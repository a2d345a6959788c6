r"""Export a CLIP checkpoint for other libraries.

    python -m clip_jax.export --checkpoint workdirs/digits --out exports/digits_hf
    python -m clip_jax.export --checkpoint workdirs/digits --format openai --out exports/digits.safetensors
    python -m clip_jax.export --checkpoint workdirs/digits --format open_clip --out exports/digits_open_clip

--checkpoint is anything `clip_jax.load_checkpoint` reads: a training workdir of this project (its
latest checkpoint), an OpenAI / open_clip file, a Hugging Face or open_clip hub folder.
--format hf (default) writes a folder transformers' CLIPModel.from_pretrained and this project load:
config.json, model.safetensors and the tokenizer's files (vocab.json, merges.txt, ...; --tokenizer
as in clip_jax.evaluate: a Hugging Face folder's own tokenizer, else OpenAI's CLIP BPE).
--format openai writes one OpenAI-layout state dict (.safetensors) that open_clip's
`create_model(NAME, pretrained=FILE)` loads (NAME: the architecture, e.g. ViT-B-32); the layout does
not carry the architecture, so the activation, attention heads and text pooling must be given there
again (the export prints the name to read it back with, where a named architecture matches).
--format open_clip writes an open_clip hub folder (open_clip_config.json with the architecture,
activation, text pooling and image mean/std, and open_clip_model.safetensors) that
`open_clip.create_model_and_transforms('local-dir:OUT')` loads as it is, or that can be pushed as an
`hf-hub:` repository. A model that tokenizes with OpenAI's CLIP BPE (this project's default, 'clip')
names no tokenizer, as open_clip's own folders do; one trained with another BPE gets its files written
into the folder and named in the config, which open_clip's `get_tokenizer('local-dir:OUT')` reads (a
sentencepiece model cannot be named: the export says so). ResNet image towers export as openai or
open_clip (transformers has no ModifiedResNet).

Nothing is written unless the whole export succeeds: the folder or file appears complete or not at
all. An existing --out is refused (one line) unless --overwrite.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from typing import Sequence

FORMATS = ("hf", "openai", "open_clip")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m clip_jax.export", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="what to export (a workdir, a file or a folder)")
  parser.add_argument("--out", required=True,
                      help="the folder (hf, open_clip) or .safetensors file (openai) to write")
  parser.add_argument("--format", choices=FORMATS, default="hf", help="hf: a transformers CLIPModel folder; "
                      "openai: an OpenAI-layout state dict; open_clip: an open_clip hub folder "
                      "(default: %(default)s)")
  from clip_jax.evaluate import add_architecture_flags
  add_architecture_flags(parser, applies_to=" (of --checkpoint)")
  parser.add_argument("--tokenizer", default=None, help="the model's tokenizer, written beside an hf export, and "
                      "beside an open_clip one when it is not OpenAI's CLIP BPE (default: the checkpoint folder's "
                      "own, else OpenAI's CLIP BPE)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  return parser


def check_destination(out: str, fmt: str, overwrite: bool) -> None:
  """Raises clip_jax.cli.UserError for an unknown `fmt`, an openai `out` not named .safetensors, or an
  existing `out` without `overwrite`."""
  from clip_jax.cli import UserError
  if fmt not in FORMATS:
    raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}.")
  if fmt == "openai" and not out.endswith(".safetensors"):
    raise UserError(f"--out {out}: an openai export is one file; name it NAME.safetensors.")
  if os.path.lexists(out) and not overwrite:
    raise UserError(f"--out {out} exists; choose another path or pass --overwrite.")


def export(checkpoint: str, out: str, fmt: str = "hf", *, model_name: str | None = None, act: str | None = None,
           tokenizer: str | None = None, overwrite: bool = False) -> str:
  """Writes `checkpoint` to `out` in `fmt` ('hf', 'openai' or 'open_clip'); returns `out`. Raises
  clip_jax.cli.UserError (one line) for an existing `out` without `overwrite`, a wrong suffix or a
  ResNet CLIP asked for 'hf'; FileNotFoundError / CheckpointError (a ValueError) from loading, and a
  ValueError for `act` with a directory or an unknown `model_name` (`evaluate.load_model`, the rule
  of every command that takes --model-name / --act)."""
  from clip_jax.convert import image_processor_config, stated_preprocessing
  from clip_jax.evaluate import _tokenizer, load_model
  check_destination(out, fmt, overwrite)  # before the (slow) load
  preprocessing = stated_preprocessing(checkpoint)  # the source's own, written into the export
  if fmt == "hf":
    image_processor_config(224, preprocessing)  # one it cannot state: refused before the load
  module, variables = load_model(checkpoint, model_name, act)
  return export_model(module, variables, out, fmt,
                      tokenizer=_tokenizer(tokenizer, checkpoint, module.config.text.context_length),
                      overwrite=overwrite, name=checkpoint, preprocessing=preprocessing)


def export_model(module, variables, out: str, fmt: str = "hf", *, tokenizer=None, overwrite: bool = False,
                 name: str = "the model", preprocessing=None) -> str:
  """Writes a loaded (module, variables) to `out` in `fmt`, whole or not at all; returns `out`.
  tokenizer: the model's `clip_jax.tokenizer` object, written beside an hf export, and beside an open_clip one
    when it is not OpenAI's CLIP BPE (None: OpenAI's); a line says what a format cannot carry.
  preprocessing: the image preprocessing the hf / open_clip folder states (None: OpenAI's).
  Raises clip_jax.cli.UserError as `export` does."""
  from clip_jax.cli import UserError
  from clip_jax.convert import (export_hf, export_open_clip, export_openai_state_dict, export_tokenizer_note,
                                openai_layout_note)
  from clip_jax.weights import save_safetensors
  check_destination(out, fmt, overwrite)
  if fmt == "hf" and module.config.vision.is_resnet:
    raise UserError(f"{name} has a ResNet image tower, which transformers' CLIPModel cannot hold: "
                    "export it with --format open_clip or --format openai.")
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".export_", dir=parent)  # same filesystem: the final rename is atomic
  try:
    if fmt == "hf":
      written = export_hf(module, variables, os.path.join(staging, "out"), tokenizer=tokenizer,
                          preprocessing=preprocessing)
    elif fmt == "open_clip":
      written = export_open_clip(module, variables, os.path.join(staging, "out"), preprocessing=preprocessing,
                                 tokenizer=tokenizer, tokenizer_name=os.path.basename(os.path.abspath(out)))
    else:
      written = os.path.join(staging, "out.safetensors")
      save_safetensors(export_openai_state_dict(module, variables), written)
      print(openai_layout_note(module.config), flush=True)
    if os.path.lexists(out):  # --overwrite
      shutil.rmtree(out) if os.path.isdir(out) and not os.path.islink(out) else os.remove(out)
    os.replace(written, out)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  note = export_tokenizer_note(tokenizer, fmt, out)
  if note:
    print(note, flush=True)
  return out


def main(argv: Sequence[str] | None = None) -> int:
  from clip_jax.cli import as_user_errors
  args = build_parser().parse_args(argv)
  # A missing or unreadable --checkpoint, --act on a folder: one line (they were tracebacks).
  out = as_user_errors(export, args.checkpoint, args.out, args.format, model_name=args.model_name, act=args.act,
                       tokenizer=args.tokenizer, overwrite=args.overwrite)
  listing = ", ".join(sorted(os.listdir(out))) if os.path.isdir(out) else os.path.basename(out)
  print(f"Exported {args.checkpoint} ({args.format}) to {out}: {listing}", flush=True)
  return 0


if __name__ == "__main__":
  from clip_jax import cli
  cli.run(main)
