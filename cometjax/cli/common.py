"""Arguments and model loading shared by the LLM subcommands."""

from __future__ import annotations

import argparse
import sys

from cometjax.core.kv_config import K_MODES, KVQuantConfig

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
  loaded = load(args.model, tokenizer=args.tokenizer, dtype=dtype)
  kv = kv_config(args.kv)
  if args.kv is None and loaded.quant_config is not None:
    kv = loaded.quant_config.kv
  return loaded.model, loaded.tokenizer, kv
