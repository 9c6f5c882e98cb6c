"""SmolLM2-135M with the FMPQ format v3: the rows the must-show needs, and the bytes of the saved directory.

    nice -n 10 python bench/smollm2_v3.py                 # resumes rows already in the JSON
    nice -n 10 python bench/smollm2_v3.py --rows "w4a4kv4 rtn"

The protocol of `bench/accuracy.py --smollm2` (calibration: 32 windows of 512 from the second half of
WikiText-2; evaluation: the first 40 disjoint windows of its first half, and 100 TinyStories stories); the
v2 table it wrote (bench/results/accuracy_smollm2.md) is the "before". Rows go to
bench/results/accuracy_smollm2_v3.{json,md}. "bytes on disk" is the directory `cometjax quantize` writes;
"vs bf16" divides it by 2 bytes per parameter of the float model; "rotation / packed" is the stored rotation
bytes over the packed weight bytes (codes + scales + zeros).
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

from bench.accuracy import (SMOLLM2_EVAL_WINDOWS, SMOLLM2_GGUF, StatsCache, W, _disk_bytes, _float_params,  # noqa: E402
                            describe, smollm2_data)
from bench.common import RESULTS, run_metadata, write_json  # noqa: E402
from cometjax.quant import config as qc  # noqa: E402
from cometjax.quant.report import quantization_report  # noqa: E402
from cometjax.quant.transform import quantize, with_embedding_bits  # noqa: E402
from cometjax.serving.perplexity import perplexity_of_ids  # noqa: E402

OUT = RESULTS / "accuracy_smollm2_v3.json"


def rows():
  """(label, QuantConfig, KV setting, int8 embedding afterwards); the headline rows first."""
  kv4 = qc.default_kv_config()
  preset = qc.preset("w4ax-kv4")
  # the GGUF's linears are Q4_1 (a scale and a minimum per 32 inputs): FMPQ that permutes whole 32-input
  # groups and leaves the INT4 region unrotated keeps that grid, so asymmetric RTN g32 stores it as it is
  aligned = preset.replace(
      weights=W(method="rtn", group_size=32, symmetric=False, scale_dtype="float16"),
      activations=qc.ActivationQuantConfig(bits=4, int8_fraction=0.25, rotate_int4=False, permute_unit=32),
      embedding_bits=16)
  integer_zero = preset.replace(weights=dataclasses.replace(preset.weights, integer_zero=True), embedding_bits=16)
  # activation probes: 8-bit RTN weights (close to lossless on the Q4_1 grid) isolate what FMPQ costs
  w8 = preset.replace(weights=W(bits=8, method="rtn"))
  probes = [
      ("probe w8 + preset activations", w8, kv4, False),
      ("probe w8 + preset activations + residual hadamard", w8.replace(rotation="hadamard"), kv4, False),
      ("probe w8 + int4-block rotation", w8.replace(activations=dataclasses.replace(
          preset.activations, rotate_int4="block")), kv4, False),
      ("probe w8 + int8<=0.5", w8.replace(activations=dataclasses.replace(preset.activations, int8_fraction=0.5)),
       kv4, False),
  ]
  return probes + [
      ("w4axkv4 (preset)", preset, kv4, False),
      ("w4axkv4 group-aligned rtn, bf16 embedding", aligned, kv4, False),
      ("w4axkv4 group-aligned rtn, int8 embedding", aligned.replace(embedding_bits=8), kv4, False),
      ("w4ax group-aligned rtn, float KV", aligned, None, False),
      ("w4axkv4 (preset) + int8 embedding", preset, kv4, True),  # the same quantized linears, embedding INT8
      # integer zero points (4 bits, packed) instead of f16 ones: 1.5 bytes less per group of 32
      ("w4axkv4 (preset) integer zero, bf16 embedding", integer_zero, kv4, False),
      ("w4axkv4 (preset) integer zero + int8 embedding", integer_zero, kv4, True),
      ("w4a4kv4 rtn", qc.preset("w4a4-kv4"), kv4, False),
      # the GGUF's Q4_1 grid is asymmetric per 32 inputs (float minimum): asymmetric RTN g32 can hold it exactly
      ("w4a16 rtn g32 asym", qc.preset("w4a16").replace(weights=W(method="rtn", group_size=32, symmetric=False)),
       None, False),
      ("w4a16 rtn g128", qc.preset("w4a16").replace(weights=W(method="rtn", group_size=128)), None, False),
      ("w4a16 gptq g128", qc.preset("w4a16").replace(weights=W(method="gptq", group_size=128)), None, False),
  ]


def evaluate(model, kv, eval_ids, story_ids, batch_size):
  nll, count, _ = perplexity_of_ids(model, [eval_ids], window=512, batch_size=batch_size, kv=kv, progress=False,
                                    windowing="disjoint", max_windows=SMOLLM2_EVAL_WINDOWS)
  snll, scount, _ = perplexity_of_ids(model, [story_ids], window=512, batch_size=batch_size, kv=kv, progress=False)
  return math.exp(nll / count), math.exp(snll / scount), count, scount


def markdown(saved) -> str:
  lines = [f"# SmolLM2-135M-Instruct, FMPQ format v3 ({saved['date']}, {saved['device']}, jax {saved['jax_version']}, "
           f"commit {saved['commit'][:10]})", ""] + saved["notes"] + ["",
           "| row | calibration | KV | WikiText-2 ppl | vs FP | TinyStories ppl | vs FP | INT4 blocks | bytes on disk | "
           "vs bf16 | rotation / packed | quantize s |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in saved["rows"]:
    frac = "-" if r["int4_block_fraction"] is None else f"{100 * r['int4_block_fraction']:.1f}%"
    kv = "fp" if r["kv"] is None else f"KV4 ({r['kv']['k_mode']})"
    lines.append(f"| {r['label']} | {r['calibration']} | {kv} | {r['wiki_ppl']:.3f} | {r['wiki_delta_pct']:+.1f}% | "
                 f"{r['stories_ppl']:.3f} | {r['stories_delta_pct']:+.1f}% | {frac} | {r['disk_bytes']:,} | "
                 f"{r['vs_bf16']:.3f} | {100 * r['rotation_over_packed']:.3f}% | {r['quantize_s']:.0f} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rows", nargs="*", default=None, help="only these row labels")
  parser.add_argument("--calib-windows", type=int, default=32)
  parser.add_argument("--batch-size", type=int, default=8)
  args = parser.parse_args(argv)
  from cometjax.data import data_path
  before = json.loads((RESULTS / "accuracy_smollm2.json").read_text())["rows"]
  fp = next(r for r in before if r["label"] == "fp")  # the float model is unchanged by the format
  saved = json.loads(OUT.read_text()) if OUT.exists() else {"rows": []}
  done = {r["label"]: r for r in saved["rows"]}
  loaded, calib, eval_ids, story_ids = smollm2_data(args.calib_windows)
  bf16_bytes = 2 * _float_params(loaded.model)
  stats_cache = StatsCache(loaded.model, calib, args.batch_size, samples=0)
  notes = [f"- protocol of bench/accuracy.py --smollm2 ({len(calib)} calibration windows; WikiText-2 first "
           f"{SMOLLM2_EVAL_WINDOWS} disjoint windows; 100 TinyStories stories); FP from accuracy_smollm2.json "
           f"(WikiText-2 {fp['wiki_ppl']:.3f}, TinyStories {fp['stories_ppl']:.3f}).",
           f"- vs bf16: bytes on disk / {bf16_bytes:,} (the float model's parameters at 2 bytes).",
           f"- KV4 rows: {qc.default_kv_config()} (float zero point)."]
  last = None  # (label, quantized model) of the previous row: the int8-embedding row reuses its linears
  for label, config, kv, int8_embedding in rows():
    if (args.rows and label not in args.rows) or label in done:
      continue
    start = time.perf_counter()
    if int8_embedding and last is not None and last[0] == config.to_dict():
      model = with_embedding_bits(last[1], 8, config.weights.scale_dtype)
      config = config.replace(embedding_bits=8)
    else:
      if int8_embedding:
        config = config.replace(embedding_bits=8)
      model = quantize(loaded.model, config, stats_cache.get(config), progress=False)
      last = (config.to_dict(), model)
    quant_s = time.perf_counter() - start
    report = quantization_report(model)
    disk = _disk_bytes(model, config, data_path(*SMOLLM2_GGUF))
    wiki, stories, count, scount = evaluate(model, kv, eval_ids, story_ids, args.batch_size)
    done[label] = dict(
        label=label, calibration=describe(config), kv=qc.kv_to_dict(kv), wiki_ppl=wiki,
        wiki_delta_pct=100 * (wiki / fp["wiki_ppl"] - 1), stories_ppl=stories,
        stories_delta_pct=100 * (stories / fp["stories_ppl"] - 1), wiki_tokens=count, stories_tokens=scount,
        int4_block_fraction=report["int4_block_fraction"], disk_bytes=disk, vs_bf16=disk / bf16_bytes,
        **{k: report[k] for k in ("total_bytes", "bytes_per_param", "weight_bytes", "perm_bytes", "rotation_bytes",
                                  "embedding_bytes", "float_bytes", "params")},
        rotation_over_packed=report["rotation_bytes"] / report["weight_bytes"], quantize_s=round(quant_s, 1),
        calib_windows=len(calib), config=config.to_dict())
    r = done[label]
    print(f"{label:<36} wiki {wiki:.3f} ({r['wiki_delta_pct']:+.1f}%) stories {stories:.3f} "
          f"({r['stories_delta_pct']:+.1f}%) disk {disk:,} ({r['vs_bf16']:.3f} x bf16) [{quant_s:.0f}s]", flush=True)
    write_json(OUT, {**run_metadata(), "notes": notes, "rows": list(done.values())})
    OUT.with_suffix(".md").write_text(markdown(json.loads(OUT.read_text())))
  print(OUT.with_suffix(".md").read_text() if OUT.exists() else "no rows")


if __name__ == "__main__":
  main()
