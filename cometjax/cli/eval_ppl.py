"""`cometjax eval-ppl`: perplexity of a text file under the protocol of `cometjax.serving.perplexity`."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import textwrap
from pathlib import Path

from cometjax.cli.common import add_kv_arg, add_model_args, at_least, check_model_paths, load_model, read_text_file
from cometjax.errors import UsageError

DEFAULT_SEPARATOR = "<|endoftext|>"
WINDOWINGS = ("stream", "disjoint")  # cometjax.serving.perplexity.WINDOWINGS, without importing jax


def _protocol_text() -> str:
  """The perplexity module's docstring (the protocol), read from its source without importing jax."""
  source = Path(importlib.util.find_spec("cometjax.serving.perplexity").origin).read_text()
  return textwrap.dedent(ast.get_docstring(ast.parse(source)) or "")


def add_command(sub) -> argparse.ArgumentParser:
  e = sub.add_parser("eval-ppl", help="perplexity of a text file",
                     description="Perplexity of a text file.\n\n" + _protocol_text(),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_args(e, None)
  e.add_argument("--text", required=True, help="UTF-8 text file")
  e.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
  e.add_argument("--separator", default=DEFAULT_SEPARATOR,
                 help="document separator (default <|endoftext|>; '' = the file is one document)")
  e.add_argument("--per-document", action="store_true", help="window each document separately")
  e.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
  e.add_argument("--skip-documents", type=int, default=0,
                 help="skip the first N documents (e.g. the ones `quantize` calibrated on)")
  e.add_argument("--max-documents", type=int, default=None, help="only the first N documents (after skipping)")
  e.add_argument("--max-windows", type=int, default=None,
                 help="only the first N windows (a fixed prefix of one-document text such as WikiText-2)")
  e.add_argument("--windowing", choices=WINDOWINGS, default="stream",
                 help="stream (default): each window of W tokens also predicts the token after it; disjoint: "
                      "full windows of W tokens sharing nothing, each scoring W - 1 tokens (GPTQ's WikiText-2 "
                      "protocol)")
  add_kv_arg(e)
  e.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
  e.add_argument("--json", action="store_true", help="print one JSON object as the last line")
  e.set_defaults(func=run)
  return e


def run(args) -> int:
  check_model_paths(args)
  at_least("--window", args.window, 2)
  at_least("--batch-size", args.batch_size, 1)
  at_least("--max-documents", args.max_documents, 1, allow_none=True)
  at_least("--max-windows", args.max_windows, 1, allow_none=True)
  text_path = Path(args.text)
  text = read_text_file("--text", text_path)
  from cometjax.serving.perplexity import perplexity

  model, tokenizer, kv = load_model(args)
  if tokenizer is None:
    raise UsageError("--tokenizer", f"eval-ppl needs a tokenizer; none was found for {args.model}")
  if args.window > model.config.max_position_embeddings:
    raise UsageError("--window", f"{args.window} exceeds the model's context "
                                 f"({model.config.max_position_embeddings} tokens)")
  result = perplexity(model, tokenizer, text, window=args.window,
                      separator=args.separator or None, per_document=args.per_document,
                      batch_size=args.batch_size, max_documents=args.max_documents,
                      max_windows=args.max_windows, windowing=args.windowing, kv=kv, progress=not args.json,
                      skip_documents=args.skip_documents)
  print(f"perplexity {result.ppl:.4f} over {result.num_tokens} tokens "
        f"({result.num_windows} {args.windowing} windows of {args.window}, {result.num_documents} documents)")
  if args.json:
    kv_json = None if kv is None else kv.as_dict()
    print(json.dumps({"model": args.model, "text": str(text_path), "window": args.window, "kv": kv_json,
                      "per_document": args.per_document, "windowing": args.windowing,
                      "max_windows": args.max_windows, **result.as_dict()}))
  return 0
