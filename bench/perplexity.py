"""Perplexity of a checkpoint on a text file (protocol: `cometjax.serving.perplexity`), FP and with an INT4 KV cache.

    python bench/perplexity.py                        # stories260K on TinyStories validation (shared data)
    python bench/perplexity.py --model DIR --text FILE --kv none channel token hadamard

Writes `bench/results/perplexity.json` (rows: model, text, kv, ppl, num_tokens, seconds) with date, device,
jax version and commit, and prints a table last.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, run_metadata, write_json  # noqa: E402
from cometjax.data import data_path  # noqa: E402
from cometjax.core.kv_config import K_MODES, KVQuantConfig  # noqa: E402
from cometjax.checkpoint import load  # noqa: E402
from cometjax.serving.perplexity import perplexity  # noqa: E402


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default=str(data_path("llama", "stories260K", "hf")))
  parser.add_argument("--text", default=str(data_path("text", "tinystories_val.txt")))
  parser.add_argument("--window", type=int, default=512)
  parser.add_argument("--max-documents", type=int, default=None)
  parser.add_argument("--kv", nargs="+", default=["none", *K_MODES], choices=["none", *K_MODES],
                      help="KV cache settings to evaluate ('none' = float cache)")
  parser.add_argument("--out", default=str(RESULTS / "perplexity.json"))
  args = parser.parse_args(argv)

  loaded = load(args.model)
  text = pathlib.Path(args.text).read_text(encoding="utf-8")
  rows = []
  for name in args.kv:
    kv = None if name == "none" else KVQuantConfig(k_mode=name)
    start = time.perf_counter()
    result = perplexity(loaded.model, loaded.tokenizer, text, window=args.window, kv=kv,
                        max_documents=args.max_documents, batch_size=16)
    rows.append({"model": args.model, "text": args.text, "kv": "fp" if kv is None else kv.as_dict(),
                 "ppl": result.ppl, "nll_per_token": result.nll_per_token, "num_tokens": result.num_tokens,
                 "num_windows": result.num_windows, "seconds": time.perf_counter() - start})
  write_json(pathlib.Path(args.out), {**run_metadata(), "window": args.window, "rows": rows})
  fp = next((r["ppl"] for r in rows if r["kv"] == "fp"), None)
  print(f"{'kv cache':<28} {'ppl':>8} {'vs fp':>8} {'tokens':>8}")
  for r in rows:
    label = "fp" if r["kv"] == "fp" else f"int4 k_mode={r['kv']['k_mode']}"
    delta = f"{(r['ppl'] / fp - 1) * 100:+.2f}%" if fp else ""
    print(f"{label:<28} {r['ppl']:>8.4f} {delta:>8} {r['num_tokens']:>8}")
  return rows


if __name__ == "__main__":
  main()
