"""`cometjax serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

    cometjax serve --model ../shared/data/llama/stories260K/hf --port 8000
    curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "../shared/data/llama/stories260K/hf", "prompt": "Once upon a time", "max_tokens": 32}'

--model is a HF directory, a llama2.c .bin or a `cometjax quantize` directory (served with its own
KV setting); --preset quantizes a float model at start-up (presets that calibrate need --calib-text).
An INT4 KV cache (--kv, or the quantized model's) is paged and shared by all requests. The server binds
to loopback unless --host says otherwise, and stops gracefully on SIGINT / SIGTERM.
"""

from __future__ import annotations

import argparse
import sys

from cometjax.cli.common import (add_kv_arg, add_model_args, at_least, calibration_windows_from_text,
                                 check_model_paths, kv_config, load_model, read_text_file)
from cometjax.errors import UsageError

DEFAULT_SEPARATOR = "<|endoftext|>"


def add_command(sub) -> argparse.ArgumentParser:
  p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming)",
                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_args(p, None)
  p.add_argument("--preset", default=None, help="quantize the float --model at start-up with this preset "
                                                "(w4a4-kv4, w4ax-kv4, ...; see `cometjax quantize`)")
  p.add_argument("--calib-text", default=None, help="calibration text for presets that calibrate "
                                                    "(documents split on <|endoftext|>; the first 50 used)")
  add_kv_arg(p)
  p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--slots", type=int, default=8, help="requests decoded together (default 8)")
  p.add_argument("--max-len", type=int, default=512, help="prompt + completion tokens per request (default 512)")
  p.add_argument("--chunk", type=int, default=32, help="prefill chunk in tokens (default 32)")
  p.add_argument("--num-pages", type=int, default=None,
                 help="INT4 KV cache: pages in the shared pool (default: slots * max_len worth)")
  p.add_argument("--model-name", default=None, help="the name clients pass as 'model' (default: --model as given)")
  p.add_argument("--seed", type=int, default=0, help="seeds requests sent without a seed")
  p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
  p.set_defaults(func=run)
  return p


def _quantize(model, tokenizer, config, text: str | None):
  from calib.pipeline import calibrate_and_quantize

  windows = None
  if text is not None:
    windows = calibration_windows_from_text(tokenizer, text, separator=DEFAULT_SEPARATOR, documents=50,
                                            window=512, max_windows=None)
  quantized, _ = calibrate_and_quantize(model, config, windows, progress=False)
  return quantized


def check_args(args):
  """Everything checkable before the model loads; returns (preset config or None, calibration text or None)."""
  check_model_paths(args)
  for flag, value, minimum in (("--slots", args.slots, 1), ("--max-len", args.max_len, 1), ("--chunk", args.chunk, 1),
                               ("--num-pages", args.num_pages, 1), ("--port", args.port, 0)):
    at_least(flag, value, minimum, allow_none=True)
  if args.port > 65535:
    raise UsageError("--port", f"must be <= 65535, got {args.port}")
  if args.max_len % args.chunk:
    raise UsageError("--max-len", f"{args.max_len} must be a multiple of --chunk ({args.chunk})")
  if args.preset is None:
    if args.calib_text is not None:
      raise UsageError("--calib-text", "only applies with --preset")
    return None, None
  from cometjax.quant.config import preset
  try:
    config = preset(args.preset)
  except ValueError as e:
    raise UsageError("--preset", str(e)) from None
  if not config.needs_calibration:
    return config, None
  if args.calib_text is None:
    raise UsageError("--calib-text", f"missing: preset {args.preset!r} calibrates on text; pass a UTF-8 text file")
  return config, read_text_file("--calib-text", args.calib_text)


def build_engine(args):
  """(Engine, tokenizer, served model name) from the parsed arguments."""
  config, text = check_args(args)
  import jax

  from cometjax.serving.engine import Engine

  model, tokenizer, kv = load_model(args)
  if tokenizer is None:
    raise UsageError("--tokenizer", f"--model {args.model} has no tokenizer; the server needs one")
  if config is not None:
    model = _quantize(model, tokenizer, config, text)
    kv = kv_config(args.kv) if args.kv is not None else config.kv
  try:
    engine = Engine(model, slots=args.slots, max_len=args.max_len, chunk=args.chunk, kv=kv,
                    num_pages=args.num_pages, key=jax.random.key(args.seed))
  except ValueError as e:  # chunk vs the INT4 cache's prefill group, pool sizes
    raise UsageError("--chunk/--max-len/--num-pages", str(e)) from None
  return engine, tokenizer, args.model_name or args.model


def serve(app, host: str, port: int, log_level: str = "warning") -> int:
  """Runs uvicorn until SIGINT / SIGTERM (streams still open get 5 s to finish); 0 after a graceful stop."""
  import signal

  import uvicorn

  # uvicorn re-raises the signal it stopped on once it is done; with these handlers in place that ends
  # the process with status 0 instead of the signal's default (death by SIGTERM, KeyboardInterrupt)
  stopped_by = []
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda number, frame: stopped_by.append(number))
  config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                          timeout_graceful_shutdown=5)
  server = uvicorn.Server(config)
  server.run()
  if stopped_by:
    print(f"stopped on {signal.Signals(stopped_by[0]).name}", file=sys.stderr, flush=True)
  return 0 if server.started else 1


def run(args) -> int:
  from cometjax.serving.http import create_app

  engine, tokenizer, name = build_engine(args)
  app = create_app(engine, tokenizer, model_name=name)
  kv = "float" if engine.kv is None else f"INT4 ({engine.kv.k_mode}), {engine.num_pages} pages"
  print(f"serving {name!r} on http://{args.host}:{args.port}/v1 ({engine.slots} slots x {engine.max_len} tokens, "
        f"KV cache {kv})", file=sys.stderr, flush=True)
  return serve(app, args.host, args.port, args.log_level)
