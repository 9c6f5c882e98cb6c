"""Arguments, their checks and model loading shared by the subcommands.

Every user error is a `UsageError` naming the flag (`cometjax.cli.main` prints `error: <flag>: <what is wrong>`
and exits 2); the checks here run before the model loads, so a typo costs no load time.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cometjax.core.kv_config import K_MODES, KVQuantConfig
from cometjax.errors import CheckpointError, UsageError

BUILTIN_MODEL = "builtin:tiny"
# under the shared data folder; the llama2.c file and tokenizer load without transformers (and torch), seconds sooner
DEFAULT_MODEL_PARTS = ("llama", "stories260K", "llama2c", "stories260K.bin")
DEFAULT_MODEL_HELP = "stories260K from the shared data (COMETJAX_DATA) when present, else " + BUILTIN_MODEL
DTYPES = ("float32", "bfloat16")


def add_model_args(p: argparse.ArgumentParser, default_help: str | None):
  """--model (required unless `default_help` describes what an absent --model means), --tokenizer, --dtype."""
  p.add_argument("--model", default=None, required=default_help is None,
                 help="Hugging Face model directory, llama.cpp .gguf file, llama2.c .bin file, a directory "
                      f"written by `cometjax quantize`, or {BUILTIN_MODEL} (a small random Llama)"
                      + (f"; default: {default_help}" if default_help else ""))
  p.add_argument("--tokenizer", default=None,
                 help="tokenizer (HF dir, .gguf file, SentencePiece .model or llama2.c .bin); default: the "
                      "model's own (inside a GGUF / quantized dir, or beside the model)")
  p.add_argument("--dtype", default="float32", choices=DTYPES)


def default_model() -> str:
  """stories260K from the shared data when it is there, else the builtin random model (saying so)."""
  from cometjax.data import data_path

  stories = data_path(*DEFAULT_MODEL_PARTS)
  if stories.is_file():
    return str(stories)
  print(f"note: {stories} not found (set COMETJAX_DATA); using {BUILTIN_MODEL}, a random model whose tokens "
        "mean nothing", file=sys.stderr)
  return BUILTIN_MODEL


def kv_config(name: str | None) -> KVQuantConfig | None:
  return None if name in (None, "none") else KVQuantConfig(k_mode=name)


def add_kv_arg(p: argparse.ArgumentParser):
  p.add_argument("--kv", default=None, choices=("none",) + K_MODES,
                 help="KV cache: none (float) or INT4 with this K layout (channel: K per channel over 32-token "
                      "groups, the most accurate). Default: a quantized model's own setting, else none")


def load_model(args):
  """(model, tokenizer or None, KV setting) for --model: a HF dir, a .gguf file, a llama2.c .bin, a quantized
  dir, or the builtin random model. The KV setting is --kv, else the quantized dir's own, else float."""
  import jax.numpy as jnp

  dtype = jnp.dtype(args.dtype)
  if args.model is None:
    args.model = default_model()
  if args.model == BUILTIN_MODEL:
    from cometjax.models.llama import TINY_CONFIG, init_llama

    # stories260K's shape with an untied random head, so the random model's tokens vary
    config = TINY_CONFIG.replace(dtype=dtype, tie_word_embeddings=False)
    return init_llama(config, seed=args.seed), None, kv_config(args.kv)
  from cometjax.checkpoint import load
  try:
    loaded = load(args.model, tokenizer=args.tokenizer, dtype=dtype)
  except CheckpointError as e:
    tokenizer_error = args.tokenizer is not None and str(args.tokenizer) in str(e)
    raise UsageError("--tokenizer" if tokenizer_error else "--model", str(e)) from None
  kv = kv_config(args.kv)
  if args.kv is None and loaded.quant_config is not None:
    kv = loaded.quant_config.kv
  return loaded.model, loaded.tokenizer, kv


# ------------------------------------------------------------------------------------------------
# Checks run before anything loads


def check_model_paths(args) -> None:
  """--model (unless the builtin) and --tokenizer exist; no --model picks the default one first."""
  if args.model is None:
    args.model = default_model()
  if args.model != BUILTIN_MODEL and not Path(args.model).exists():
    raise UsageError("--model", f"{args.model} does not exist (a HF directory, .gguf, llama2.c .bin or a "
                                "quantized directory)")
  if getattr(args, "tokenizer", None) is not None and not Path(args.tokenizer).exists():
    raise UsageError("--tokenizer", f"{args.tokenizer} does not exist")


def at_least(flag: str, value, minimum, *, allow_none: bool = False) -> None:
  if value is None and allow_none:
    return
  if value is None or value < minimum:
    raise UsageError(flag, f"must be >= {minimum}, got {value}")


def read_text_file(flag: str, path) -> str:
  """The UTF-8 text of the file a flag names."""
  path = Path(path)
  if not path.is_file():
    raise UsageError(flag, f"{path} is not a file" if path.exists() else f"file {path} does not exist")
  try:
    return path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise UsageError(flag, f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
  except OSError as e:
    raise UsageError(flag, f"cannot read {path}: {e.strerror}") from None


def int_list(flag: str, text: str) -> list[int]:
  """"1,2,3" -> [1, 2, 3]."""
  try:
    return [int(part) for part in text.split(",")]
  except ValueError:
    raise UsageError(flag, f"expected integers separated by commas, got {text!r}") from None


def check_output_dir(flag: str, out, inputs, force: bool) -> None:
  """`out` is not one of the inputs (nor holds one), and is empty unless --force."""
  out_path = Path(out).resolve()
  for given in inputs:
    if given is None:
      continue
    source = Path(given).resolve()
    if out_path == source or out_path in source.parents:
      raise UsageError(flag, f"{out} would overwrite the input {given}; choose another directory")
  if out_path.exists() and not out_path.is_dir():
    raise UsageError(flag, f"{out} exists and is not a directory")
  if out_path.is_dir() and any(out_path.iterdir()) and not force:
    raise UsageError(flag, f"{out} is not empty; pass --force to write into it (files of the same name are "
                           "replaced)")
  existing = next(p for p in out_path.parents if p.exists())
  if not existing.is_dir() or not os.access(existing, os.W_OK):
    raise UsageError(flag, f"cannot create {out}: {existing} is not a writable directory")


def check_output_file(flag: str, out) -> None:
  parent = Path(out).resolve().parent
  if not parent.is_dir():
    raise UsageError(flag, f"folder {parent} does not exist")
  if Path(out).is_dir():
    raise UsageError(flag, f"{out} is a directory; expected a file name")


def calibration_windows_from_text(tokenizer, text: str, *, separator: str | None, documents: int | None,
                                  window: int, max_windows: int | None):
  """Calibration windows of `window` tokens from the first `documents` documents of `text` (split on
  `separator`), at most `max_windows` of them."""
  from calib.stats import calibration_windows
  from cometjax.serving.perplexity import split_documents
  if tokenizer is None:
    raise UsageError("--tokenizer", "calibration needs a tokenizer; none was found beside the model")
  docs = split_documents(text, separator)[:documents]
  try:
    return calibration_windows(tokenizer, docs, window, max_windows)
  except ValueError as e:  # too little text for one window
    raise UsageError("--calib-text", str(e)) from None
