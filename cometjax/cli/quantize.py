"""`cometjax quantize`: calibrate and quantize a checkpoint, save it to a directory.

    cometjax quantize --model M --calib-text FILE --preset w4ax-kv4 --out DIR

The preset's defaults are the best calibration measured (bench/results/accuracy.md); flags override
single fields. DIR then loads with `cometjax.load` (and `--model DIR` in eval-ppl and generate).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from cometjax.quant.config import PRESETS, ROTATIONS, SCALE_DTYPES, WEIGHT_METHODS, preset


def add_command(subparsers) -> argparse.ArgumentParser:
  p = subparsers.add_parser("quantize", help="calibrate + quantize a model and save it (W4AxKV4, ...)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, help="Hugging Face model directory, llama.cpp .gguf file or llama2.c "
                 ".bin file")
  p.add_argument("--tokenizer", default=None, help="tokenizer (default: found beside the model)")
  p.add_argument("--preset", default="w4ax-kv4", help=f"one of: {', '.join(PRESETS)} (default w4ax-kv4)")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--calib-text", default=None, help="calibration text file (documents split on --separator, "
                 "tokenized with the tokenizer's own BOS rule)")
  p.add_argument("--separator", default="<|endoftext|>", help="document separator in --calib-text")
  p.add_argument("--calib-documents", type=int, default=200, help="use the first N documents (default 200)")
  p.add_argument("--calib-window", type=int, default=512, help="tokens per calibration window (default 512)")
  p.add_argument("--max-calib-windows", type=int, default=64,
                 help="use at most N windows (default 64: 32k tokens at 512; 0 = all)")
  p.add_argument("--batch-size", type=int, default=8, help="windows per calibration forward pass")
  p.add_argument("--weight-method", choices=WEIGHT_METHODS, default=None, help="override the preset's")
  p.add_argument("--group-size", type=int, default=None, help="weight scale group (default: per channel)")
  p.add_argument("--clip-steps", type=int, default=None, help="Adam steps of learned clipping")
  p.add_argument("--gptq-damp", type=float, default=None, help="GPTQ damping")
  p.add_argument("--int8-fraction", type=float, default=None, help="FMPQ: max fraction of INT8 blocks")
  p.add_argument("--block-size", type=int, default=None, help="FMPQ block size (default auto)")
  p.add_argument("--rotation", choices=[str(r) for r in ROTATIONS], default=None,
                 help="override the preset's rotation (None or hadamard)")
  p.add_argument("--weight-zero-point", choices=("symmetric", "asymmetric"), default=None,
                 help="INT4 weights symmetric, or asymmetric with a float zero point per group (default: preset's)")
  p.add_argument("--scale-dtype", choices=SCALE_DTYPES, default=None, help="dtype of weight scales and zeros")
  p.add_argument("--rotate-int4", choices=("none", "region", "block"), default=None,
                 help="FMPQ: signed Hadamard rotation of the INT4 channels (default: the preset's)")
  p.add_argument("--embedding-bits", choices=("float", "8"), default=None,
                 help="8: store the token embedding (and an untied lm_head) INT8 per row")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--json", action="store_true", help="print the report as one JSON line last")
  p.set_defaults(func=run)
  return p


def config_from_args(args):
  config = preset(args.preset)
  weights, acts = config.weights, config.activations
  symmetric = None if args.weight_zero_point is None else args.weight_zero_point == "symmetric"
  wchanges = {k: v for k, v in dict(method=args.weight_method, group_size=args.group_size,
                                     clip_steps=args.clip_steps, gptq_damp=args.gptq_damp, symmetric=symmetric,
                                     scale_dtype=args.scale_dtype).items() if v is not None}
  if wchanges:
    weights = dataclasses.replace(weights, **wchanges)
  rotate_int4 = None if args.rotate_int4 is None else (False if args.rotate_int4 == "none" else args.rotate_int4)
  achanges = {k: v for k, v in dict(int8_fraction=args.int8_fraction, block_size=args.block_size,
                                     rotate_int4=rotate_int4).items() if v is not None}
  if achanges:
    if acts is None:
      raise ValueError(f"--int8-fraction/--block-size/--rotate-int4 need an activation-quantized preset; "
                       f"{args.preset!r} is A16")
    acts = dataclasses.replace(acts, **achanges)
  changes = dict(weights=weights, activations=acts)
  if args.rotation is not None:
    changes["rotation"] = None if args.rotation == "None" else args.rotation
  if args.embedding_bits is not None:
    changes["embedding_bits"] = None if args.embedding_bits == "float" else int(args.embedding_bits)
  return config.replace(**changes)


def run(args) -> int:
  from calib.pipeline import calibrate_and_quantize
  from calib.stats import calibration_windows
  from cometjax.checkpoint import load
  from cometjax.checkpoint.quantized import save_quantized
  from cometjax.quant.report import quantization_report
  from cometjax.serving.perplexity import split_documents

  config = config_from_args(args)
  loaded = load(args.model, tokenizer=args.tokenizer)
  windows = None
  if config.needs_calibration:
    if args.calib_text is None:
      raise ValueError(f"--calib-text is required: preset {args.preset!r} calibrates on text")
    path = Path(args.calib_text)
    if not path.is_file():
      raise FileNotFoundError(f"--calib-text file not found: {path}")
    if loaded.tokenizer is None:
      raise ValueError("calibration needs a tokenizer; none was found beside the model (pass --tokenizer)")
    docs = split_documents(path.read_text(encoding="utf-8"), args.separator or None)[:args.calib_documents]
    windows = calibration_windows(loaded.tokenizer, docs, args.calib_window, args.max_calib_windows or None)
  qmodel, _ = calibrate_and_quantize(loaded.model, config, windows, batch_size=args.batch_size,
                                     progress=not args.no_progress)
  tokenizer_source = args.tokenizer or _tokenizer_source(args.model, loaded.config.vocab_size)
  save_quantized(args.out, qmodel, config, tokenizer_source=tokenizer_source)
  report = quantization_report(qmodel)
  print(f"saved {args.out}: {len(report['layers'])} quantized layers; {report['total_bytes']} bytes stored "
        f"({report['bytes_per_param']:.3f} bytes/param over {report['params']} params): weights "
        f"{report['weight_bytes']}, permutations {report['perm_bytes']}, rotations {report['rotation_bytes']}, "
        f"embedding {report['embedding_bytes']}, other float {report['float_bytes']}; INT4 block fraction "
        f"{report['int4_block_fraction']}", file=sys.stderr if args.json else sys.stdout)
  if args.json:
    summary = {k: v for k, v in report.items() if k != "layers"}
    print(json.dumps(dict(out=args.out, preset=args.preset, **summary)))
  return 0


def _tokenizer_source(model_path: str, vocab_size: int):
  from cometjax.checkpoint.llama2c import find_llama2c_tokenizer
  path = Path(model_path)
  if path.is_dir() or path.suffix == ".gguf":
    return path
  return find_llama2c_tokenizer(path, vocab_size) if path.suffix == ".bin" else None
