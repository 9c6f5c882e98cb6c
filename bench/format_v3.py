"""The FMPQ format v3 choices on stories260K, each row with every byte the quantized model stores.

    python bench/format_v3.py                       # all rows, evaluation on stories 200..999
    python bench/format_v3.py --rows kv             # one section (kv, scales, rotation, weights, embedding)
    python bench/format_v3.py --render bench/results/format_v3.json

Protocol of bench/accuracy.py: calibrate on TinyStories validation stories 0..199 (windows of 512),
evaluate on the next `--eval-documents` (800 = stories 200..999) with cometjax.serving.perplexity (window
512, one concatenated stream). Sections:
  kv         the float model with KV4 (K per channel over 32 tokens, V per token): float zero point
             (KIVI's float minimum) vs the integer zero point of format v2
  scales     the w4ax-kv4 configuration with one per-token scale per FMPQ block vs one per precision region
  rotation   the INT4 activations' rotation: none, signed Hadamard over the INT4 region, one per block,
             and the residual-stream rotation folded offline into the weights (QuaRot), each with its stored bytes
  weights    symmetric vs asymmetric (float zero per group) INT4 weights at equal bytes: g32 f32 scales
             against asymmetric g32 with f16 scale + zero, and asymmetric g64 with f32 scale + zero
  embedding  the token embedding at INT8 per row
  tune       on top of the asymmetric preset: activation-aware GPTQ, RMS channel ranking, per-block
             INT4 rotation, INT8 embedding, blocks of 8 channels (more runtime scales, no stored byte)
Rows go to bench/results/format_v3.json (resumed by key: a row already there is not recomputed) and a
markdown table to format_v3.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from bench.accuracy import StatsCache, describe  # noqa: E402
from bench.common import RESULTS, run_metadata, write_json  # noqa: E402
from calib.stats import calibration_windows  # noqa: E402
from cometjax.core.kv_config import KVQuantConfig  # noqa: E402
from cometjax.quant import config as qc  # noqa: E402
from cometjax.quant.report import quantization_report  # noqa: E402
from cometjax.quant.transform import quantize  # noqa: E402
from cometjax.serving.perplexity import perplexity_of_ids, split_documents  # noqa: E402

KV_FLOAT_ZERO = qc.default_kv_config()
KV_INTEGER_ZERO = dataclasses.replace(KV_FLOAT_ZERO, integer_zero=True)
SECTIONS = ("kv", "scales", "rotation", "weights", "embedding", "tune")


def _w4ax(**changes) -> qc.QuantConfig:
  """The w4ax-kv4 preset with `weights` / `activations` fields changed ("acts_" prefix for activations)."""
  config = qc.preset("w4ax-kv4")
  acts = {k[5:]: v for k, v in changes.items() if k.startswith("acts_")}
  weights = {k: v for k, v in changes.items() if not k.startswith("acts_") and k not in ("rotation", "embedding_bits")}
  top = {k: v for k, v in changes.items() if k in ("rotation", "embedding_bits")}
  return config.replace(weights=dataclasses.replace(config.weights, **weights),
                        activations=dataclasses.replace(config.activations, **acts), **top)


def section_rows(section: str) -> list[tuple[str, qc.QuantConfig | None, KVQuantConfig | None]]:
  """(key, quant config or None for the float model, kv) per row."""
  if section == "kv":
    return [("fp", None, None), ("fp-kv4 float zero", None, KV_FLOAT_ZERO),
            ("fp-kv4 integer zero", None, KV_INTEGER_ZERO)]
  if section == "scales":
    return [("scales per block", _w4ax(acts_scale_span="block"), KV_FLOAT_ZERO),
            ("scales per region", _w4ax(acts_scale_span="region"), KV_FLOAT_ZERO)]
  if section == "rotation":
    return [("int4 rotation none", _w4ax(acts_rotate_int4=False), KV_FLOAT_ZERO),
            ("int4 rotation region", _w4ax(acts_rotate_int4="region"), KV_FLOAT_ZERO),
            ("int4 rotation block", _w4ax(acts_rotate_int4="block"), KV_FLOAT_ZERO),
            ("residual hadamard", _w4ax(acts_rotate_int4=False, rotation="hadamard"), KV_FLOAT_ZERO),
            ("residual hadamard + int4 region", _w4ax(rotation="hadamard"), KV_FLOAT_ZERO)]
  if section == "weights":
    return [("sym g32 f32", _w4ax(), KV_FLOAT_ZERO),
            ("asym g32 f16", _w4ax(symmetric=False, scale_dtype="float16"), KV_FLOAT_ZERO),
            ("asym g64 f32", _w4ax(symmetric=False, group_size=64), KV_FLOAT_ZERO),
            ("asym g32 f32", _w4ax(symmetric=False), KV_FLOAT_ZERO),
            ("sym g32 f16", _w4ax(scale_dtype="float16"), KV_FLOAT_ZERO)]
  if section == "embedding":
    return [("preset + int8 embedding", _w4ax(embedding_bits=8), KV_FLOAT_ZERO)]
  if section == "tune":  # on top of the asymmetric f16 preset
    asym = dict(symmetric=False, scale_dtype="float16")
    return [("asym f16 + act-aware gptq", _w4ax(**asym, gptq_act_aware=True), KV_FLOAT_ZERO),
            ("asym f16 + rms ranking", _w4ax(**asym, acts_ranking="rms"), KV_FLOAT_ZERO),
            ("asym f16 + int4 block rotation", _w4ax(**asym, acts_rotate_int4="block"), KV_FLOAT_ZERO),
            ("asym f16 + int8 embedding", _w4ax(**asym, embedding_bits=8), KV_FLOAT_ZERO),
            ("asym f16 + blocks of 8", _w4ax(**asym, acts_block_size=8), KV_FLOAT_ZERO)]
  raise ValueError(f"unknown section {section!r}; sections: {SECTIONS}")


def run_row(key, config, kv, model, stream, stats_cache, batch_size, fp_ppl) -> dict:
  start = time.perf_counter()
  qmodel = model if config is None else quantize(model, config, stats_cache.get(config), progress=False)
  nll, count, _ = perplexity_of_ids(qmodel, [stream], window=512, batch_size=batch_size, kv=kv, progress=False)
  ppl = math.exp(nll / count)
  report = quantization_report(qmodel)
  fields = ("total_bytes", "bytes_per_param", "weight_bytes", "perm_bytes", "rotation_bytes", "embedding_bytes",
            "float_bytes", "params", "int4_block_fraction")
  return dict(key=key, calibration="float" if config is None else describe(config), ppl=ppl,
              fp_ppl=fp_ppl if fp_ppl is not None else ppl,
              delta_pct=0.0 if fp_ppl is None else 100 * (ppl / fp_ppl - 1), kv=qc.kv_to_dict(kv),
              num_tokens=count, seconds=round(time.perf_counter() - start, 1),
              config=None if config is None else config.to_dict(), **{f: report[f] for f in fields})


def markdown(saved: dict) -> str:
  lines = [f"# FMPQ format v3 on stories260K ({saved['date']}, {saved['device']}, jax {saved['jax_version']}, "
           f"commit {saved['commit'][:10]})", ""] + saved.get("notes", []) + ["",
           "| row | calibration | KV | ppl | vs FP | INT4 blocks | total bytes | bytes/param | rotation bytes |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|"]
  for r in saved["rows"]:
    kv = "fp" if r["kv"] is None else ("KV4 int zero" if r["kv"].get("integer_zero") else "KV4 float zero")
    frac = "-" if r["int4_block_fraction"] is None else f"{100 * r['int4_block_fraction']:.1f}%"
    lines.append(f"| {r['key']} | {r['calibration']} | {kv} | {r['ppl']:.4f} | {r['delta_pct']:+.2f}% | {frac} | "
                 f"{r['total_bytes']} | {r['bytes_per_param']:.3f} | {r['rotation_bytes']} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rows", nargs="*", default=list(SECTIONS), choices=SECTIONS)
  parser.add_argument("--calib-documents", type=int, default=200)
  parser.add_argument("--eval-documents", type=int, default=800)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--out", default=str(RESULTS / "format_v3.json"))
  parser.add_argument("--render", default=None, metavar="JSON", help="only rewrite the markdown of a results JSON")
  args = parser.parse_args(argv)
  if args.render:
    saved = json.loads(pathlib.Path(args.render).read_text())
    pathlib.Path(args.render).with_suffix(".md").write_text(markdown(saved))
    return saved["rows"]
  jax.config.update("jax_default_matmul_precision", "highest")
  from cometjax.checkpoint import load
  from cometjax.data import data_path
  loaded = load(data_path("llama", "stories260K", "hf"))
  docs = split_documents(data_path("text", "tinystories_val.txt").read_text(encoding="utf-8"))
  windows = calibration_windows(loaded.tokenizer, docs[:args.calib_documents], 512)
  eval_docs = docs[args.calib_documents:args.calib_documents + args.eval_documents]
  stream = [i for d in eval_docs for i in loaded.tokenizer.encode(d, bos=True)]
  out = pathlib.Path(args.out)
  saved = json.loads(out.read_text()) if out.exists() else {"rows": []}
  done = {r["key"]: r for r in saved["rows"]}
  stats_cache = StatsCache(loaded.model, windows, args.batch_size)
  rows = [("fp", None, None)] + [r for s in args.rows for r in section_rows(s) if r[0] != "fp"]
  for key, config, kv in rows:
    if key not in done:
      fp_ppl = done["fp"]["ppl"] if "fp" in done else None
      same = [r for r in done.values() if r["config"] == (None if config is None else config.to_dict())
              and r["kv"] == qc.kv_to_dict(kv)]
      done[key] = ({**same[0], "key": key} if same else
                   run_row(key, config, kv, loaded.model, stream, stats_cache, args.batch_size, fp_ppl))
      r = done[key]
      print(f"{key:<34} ppl {r['ppl']:.4f} ({r['delta_pct']:+.2f}%) total {r['total_bytes']} B "
            f"int4 {r['int4_block_fraction']} [{r['seconds']}s]", flush=True)
      notes = [f"- stories260K: calibration on TinyStories validation stories 0..{args.calib_documents - 1} "
               f"({windows.size} tokens, windows of 512), evaluation on stories {args.calib_documents}.."
               f"{args.calib_documents + len(eval_docs) - 1} ({len(stream)} tokens, window 512); vs FP: against "
               "the float model with a float KV cache.",
               "- total bytes: every array the quantized model stores (packed weights, scales, zero points, "
               "permutations, rotation signs, embedding, norms) = the tensor bytes of its saved directory; "
               "bytes/param over all parameters (the float model: 4.0).",
               "- KV4: K per channel over groups of 32 tokens (the open group exact), V per token per head; "
               "float zero = KIVI's float minimum, integer zero = format v2's rounded zero point."]
      write_json(out, {**run_metadata(), "notes": notes, "rows": list(done.values())})
      saved = json.loads(out.read_text())
      out.with_suffix(".md").write_text(markdown(saved))
  print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
  main()
