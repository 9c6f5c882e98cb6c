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

from cometjax.cli.common import (at_least, calibration_windows_from_text, check_model_paths, check_output_dir,
                                 read_text_file)
from cometjax.errors import UsageError
from cometjax.quant.config import PRESETS, ROTATIONS, SCALE_DTYPES, WEIGHT_METHODS, preset


# --weight-zero-point: (symmetric, integer_zero)
ZERO_POINTS = {"symmetric": (True, False), "asymmetric": (False, False), "integer": (False, True)}


def _preset_group_sizes() -> str:
  """"w4a16: 32, w8a8: per channel, ..." for --group-size's help (the presets' own defaults)."""
  sizes = {}
  for name in PRESETS:
    weights = preset(name).weights
    if weights is not None and not name.endswith("-kv4"):
      sizes[name] = "per channel" if weights.group_size is None else str(weights.group_size)
  return ", ".join(f"{name}: {size}" for name, size in sizes.items())


def add_command(subparsers) -> argparse.ArgumentParser:
  p = subparsers.add_parser("quantize", help="calibrate + quantize a model and save it (W4AxKV4, ...)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, help="Hugging Face model directory, llama.cpp .gguf file or llama2.c "
                 ".bin file")
  p.add_argument("--tokenizer", default=None, help="tokenizer (default: found beside the model)")
  p.add_argument("--preset", default="w4ax-kv4", help=f"one of: {', '.join(PRESETS)} (default w4ax-kv4)")
  p.add_argument("--out", required=True, help="output directory (new or empty; never the --model directory)")
  p.add_argument("--force", action="store_true", help="write into a non-empty --out (same-named files replaced)")
  p.add_argument("--calib-text", default=None, help="calibration text file (documents split on --separator, "
                 "tokenized with the tokenizer's own BOS rule)")
  p.add_argument("--separator", default="<|endoftext|>", help="document separator in --calib-text")
  p.add_argument("--calib-documents", type=int, default=200, help="use the first N documents (default 200)")
  p.add_argument("--calib-window", type=int, default=512, help="tokens per calibration window (default 512)")
  p.add_argument("--max-calib-windows", type=int, default=64,
                 help="use at most N windows (default 64: 32k tokens at 512; 0 = all)")
  p.add_argument("--batch-size", type=int, default=8, help="windows per calibration forward pass")
  p.add_argument("--weight-method", choices=WEIGHT_METHODS, default=None, help="override the preset's")
  p.add_argument("--group-size", type=int, default=None,
                 help="input rows per weight scale; 0 = one scale per output channel (default: the preset's: "
                      f"{_preset_group_sizes()})")
  p.add_argument("--clip-steps", type=int, default=None, help="Adam steps of learned clipping")
  p.add_argument("--gptq-damp", type=float, default=None, help="GPTQ damping")
  p.add_argument("--int8-fraction", type=float, default=None, help="FMPQ: max fraction of INT8 blocks")
  p.add_argument("--block-size", type=int, default=None, help="FMPQ block size (default auto)")
  p.add_argument("--rotation", choices=[str(r) for r in ROTATIONS], default=None,
                 help="override the preset's rotation (None or hadamard)")
  p.add_argument("--weight-zero-point", choices=tuple(ZERO_POINTS), default=None,
                 help="INT4 weights symmetric, asymmetric with a float zero point per group, or asymmetric with "
                      "an integer zero point stored in 4 bits (default: preset's)")
  p.add_argument("--scale-dtype", choices=SCALE_DTYPES, default=None, help="dtype of weight scales and zeros")
  p.add_argument("--rotate-int4", choices=("none", "region", "block"), default=None,
                 help="FMPQ: signed Hadamard rotation of the INT4 channels (default: the preset's)")
  p.add_argument("--embedding-bits", choices=("float", "16", "8"), default=None,
                 help="how the token embedding (and an untied lm_head) is stored: float (as loaded, "
                      "float32), 16 (bfloat16) or 8 (INT8 per row)")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--json", action="store_true", help="print the report as one JSON line last")
  p.set_defaults(func=run)
  return p


def config_from_args(args):
  try:
    config = preset(args.preset)
  except ValueError as e:
    raise UsageError("--preset", str(e)) from None
  weights, acts = config.weights, config.activations
  symmetric, integer_zero = ZERO_POINTS.get(args.weight_zero_point, (None, None))
  wchanges = {k: v for k, v in dict(method=args.weight_method, group_size=args.group_size or None,
                                     clip_steps=args.clip_steps, gptq_damp=args.gptq_damp, symmetric=symmetric,
                                     integer_zero=integer_zero, scale_dtype=args.scale_dtype).items()
              if v is not None}
  if args.group_size == 0:  # 0 asks for per-channel scales, which the filter above drops
    wchanges["group_size"] = None
  if wchanges:
    if weights is None:
      raise UsageError("--" + next(iter(wchanges)).replace("_", "-"), f"preset {args.preset!r} keeps weights float")
    weights = _replace("--group-size/--weight-method/--clip-steps/--gptq-damp/--weight-zero-point/--scale-dtype",
                       weights, wchanges)
  rotate_int4 = None if args.rotate_int4 is None else (False if args.rotate_int4 == "none" else args.rotate_int4)
  achanges = {k: v for k, v in dict(int8_fraction=args.int8_fraction, block_size=args.block_size,
                                     rotate_int4=rotate_int4).items() if v is not None}
  if achanges:
    flags = "--int8-fraction/--block-size/--rotate-int4"
    if acts is None:
      raise UsageError(flags, f"need an activation-quantized preset; {args.preset!r} is A16")
    acts = _replace(flags, acts, achanges)
  changes = dict(weights=weights, activations=acts)
  if args.rotation is not None:
    changes["rotation"] = None if args.rotation == "None" else args.rotation
  if args.embedding_bits is not None:
    changes["embedding_bits"] = None if args.embedding_bits == "float" else int(args.embedding_bits)
  return _replace("--rotation/--embedding-bits", config, changes)


def _replace(flags: str, config, changes):
  """dataclasses.replace, with the config's own range checks reported against the flags that set them."""
  try:
    return dataclasses.replace(config, **changes)
  except ValueError as e:
    raise UsageError(flags, str(e)) from None


def check_args(args):
  """Everything that can be checked before the model loads; returns (config, calibration text or None)."""
  check_model_paths(args)
  config = config_from_args(args)
  for flag, value, minimum in (("--calib-documents", args.calib_documents, 1), ("--calib-window", args.calib_window, 2),
                               ("--max-calib-windows", args.max_calib_windows, 0), ("--batch-size", args.batch_size, 1),
                               ("--group-size", args.group_size, 0)):
    at_least(flag, value, minimum, allow_none=True)
  check_output_dir("--out", args.out, (args.model, args.tokenizer, args.calib_text), args.force)
  text = None
  if config.needs_calibration:
    if args.calib_text is None:
      raise UsageError("--calib-text", f"missing: preset {args.preset!r} calibrates on text; pass a UTF-8 text file")
    text = read_text_file("--calib-text", args.calib_text)
  return config, text


def run(args) -> int:
  config, text = check_args(args)
  from calib.pipeline import calibrate_and_quantize
  from cometjax.checkpoint.quantized import save_quantized
  from cometjax.cli.common import load_model
  from cometjax.quant.report import quantization_report

  args.dtype, args.seed, args.kv = "float32", 0, None
  model, tokenizer, _ = load_model(args)
  windows = None
  if text is not None:
    windows = calibration_windows_from_text(tokenizer, text, separator=args.separator or None,
                                            documents=args.calib_documents, window=args.calib_window,
                                            max_windows=args.max_calib_windows or None)
  qmodel, _ = calibrate_and_quantize(model, config, windows, batch_size=args.batch_size,
                                     progress=not args.no_progress)
  tokenizer_source = args.tokenizer or _tokenizer_source(args.model, model.config.vocab_size)
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
