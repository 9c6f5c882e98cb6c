"""Accuracy of every quantization preset and calibration choice: a perplexity table.

    python bench/accuracy.py                    # stories260K (TinyStories) + the synthetic outlier Llama
    python bench/accuracy.py --eval-documents 800   # stories260K on the whole held-out rest (slow on CPU)
    python bench/accuracy.py --smoke            # a few seconds: synthetic model only, tiny sizes
    nice -n 10 python bench/accuracy.py --smollm2   # SmolLM2-135M (GGUF) table + outlier profile; resumes
    python bench/accuracy.py --headline-only --eval-documents 800 --out bench/results/accuracy_full_eval.json

(a) stories260K: calibrate on the first `--calib-documents` (200) TinyStories validation stories,
    evaluate on the next `--eval-documents` stories (default 200, i.e. stories 200..399; 800 = all the
    rest) with the perplexity protocol of `cometjax.serving.perplexity` (window 512, concatenated stream).
(b) synthetic outlier Llama (the LLM.int8() phenomenon of 7B+ models, in small): a random Llama whose
    RMSNorm weights carry a few huge channels (x `--outlier-scale`, the same channels in every layer),
    with a sharpened classifier; calibration and evaluation text are token sequences sampled from the
    float model itself (temperature 1, disjoint seeds). W4A4 per-token RTN must break on it, FMPQ not.

Rows go to bench/results/accuracy.json (list under "rows": model, preset, calibration, ppl, fp_ppl,
delta_pct, int4_block_fraction, weight_bytes, bytes_per_param, kv, ...) and a markdown table to
bench/results/accuracy.md; the table is printed last.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import RESULTS, run_metadata, write_json  # noqa: E402
from calib.stats import calibration_windows, collect_stats  # noqa: E402
from cometjax.quant import config as qc  # noqa: E402
from cometjax.serving.perplexity import perplexity_of_ids, split_documents  # noqa: E402
from cometjax.quant.report import quantization_report  # noqa: E402
from cometjax.quant.transform import quantize  # noqa: E402

W = qc.WeightQuantConfig
A = qc.ActivationQuantConfig
FMPQ = A(int8_fraction=0.25)  # without the INT4-region rotation of the w4ax preset
FMPQ_ROT = A(int8_fraction=0.25, rotate_int4=True)


def describe(config: qc.QuantConfig) -> str:
  """A short calibration label: weight method, rotation, FMPQ options."""
  parts = []
  if config.weights is not None:
    w = config.weights
    parts.append(w.method + (f" g{w.group_size}" if w.group_size else "") + ("" if w.symmetric else " asym")
                 + (" integer zero" if w.integer_zero else "")
                 + ("" if w.scale_dtype == "float32" else f" {w.scale_dtype} scales"))
  acts = config.activations
  if acts is not None and acts.mixed:
    parts.append(f"int8<={acts.int8_fraction:g}")
    if acts.permute_unit > 1:
      parts.append(f"permuted in runs of {acts.permute_unit}")
    if acts.rotate_int4:
      parts.append(f"int4-{acts.rotate_int4} rotation")
    if acts.scale_span == "region":
      parts.append("scale per region")
  if config.rotation:
    parts.append(f"{config.rotation} rotation")
  if config.embedding_bits:
    parts.append({8: "int8", 16: "bf16"}[config.embedding_bits] + " embedding")
  return ", ".join(parts) or "none"


def variants(preset_names_and_overrides):
  """(preset name, QuantConfig) for the rows: presets as they are plus calibration variants."""
  rows = []
  for preset_name, changes in preset_names_and_overrides:
    config = qc.preset(preset_name)
    if changes:
      config = config.replace(**changes)
    rows.append((preset_name, config))
  return rows


def stories_rows():
  per_channel = W(method="gptq")
  return variants([
      ("w8a8", {}),
      ("w4a16", {"weights": W(method="rtn")}),
      ("w4a16", {"weights": W(method="mse")}),
      ("w4a16", {"weights": W(method="clip")}),
      ("w4a16", {"weights": per_channel}),
      ("w4a16", {}),
      ("w4a8", {}),
      ("w4a4", {}),
      ("w4a4", {"weights": per_channel, "rotation": "hadamard"}),
      ("w4ax", {"weights": W(method="rtn"), "activations": FMPQ}),
      ("w4ax", {"weights": W(method="clip"), "activations": FMPQ}),
      ("w4ax", {"weights": per_channel, "activations": FMPQ}),
      ("w4ax", {"weights": per_channel, "activations": FMPQ, "rotation": "hadamard"}),
      ("w4ax", {"weights": per_channel}),
      ("w4ax", {}),
      ("w4a4-kv4", {}),
      ("w4ax-kv4", {"weights": per_channel}),
      ("w4ax-kv4", {}),
  ])


def synthetic_rows():
  return variants([
      ("w8a8", {}),
      ("w4a4", {}),
      ("w4a4", {"weights": W(method="gptq"), "rotation": "hadamard"}),
      ("w4ax", {"weights": W(method="rtn"), "activations": FMPQ}),
      ("w4ax", {"weights": W(method="gptq"), "activations": FMPQ}),
      ("w4ax", {}),
  ])


# ------------------------------------------------------------------------------------------------
# Models and data


OUTLIER_CHANNELS = (5, 17, 40)


def outlier_llama(hidden=64, intermediate=172, layers=4, vocab=256, channels=OUTLIER_CHANNELS, scale=30.0,
                  logit_scale=6.0, seed=0):
  """A random Llama with huge RMSNorm channels (same channels in every layer) and a sharp classifier."""
  from cometjax.models.llama import LlamaConfig, init_llama
  config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_layers=layers,
                       num_heads=8, num_kv_heads=4, max_position_embeddings=512, tie_word_embeddings=False)
  model = init_llama(config, seed=seed)
  graphdef, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  rng = np.random.default_rng(seed)
  for i in range(layers):
    for norm in ("input_layernorm", "post_attention_layernorm"):
      weight = rng.uniform(0.6, 1.4, hidden)
      weight[list(channels)] *= scale
      pure["layers"][i][norm]["weight"] = jnp.asarray(weight, jnp.float32)
  lm_head = np.asarray(pure["lm_head"]["kernel"])
  pure["lm_head"]["kernel"] = jnp.asarray(lm_head / lm_head.std() * logit_scale / math.sqrt(hidden), jnp.float32)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def sample_sequences(model, num: int, length: int, seed: int) -> np.ndarray:
  """int32 [num, length] sampled at temperature 1 from BOS (id 1), full forward pass per step."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(tokens, t, key):
    logits, _ = nnx.merge(graphdef, state)(tokens)
    nxt = jax.random.categorical(key, logits[:, t - 1])
    return tokens.at[:, t].set(nxt)

  tokens = jnp.zeros((num, length), jnp.int32).at[:, 0].set(1)
  key = jax.random.key(seed)
  for t in range(1, length):
    key, sub = jax.random.split(key)
    tokens = step(tokens, t, sub)
  return np.asarray(tokens)


# ------------------------------------------------------------------------------------------------
# Evaluation


class StatsCache:
  """One statistics pass per input layout (rotation, block size, group size), shared by the rows."""

  def __init__(self, model, windows, batch_size, samples: int = 2048):
    self.model, self.windows, self.batch_size, self.cache = model, windows, batch_size, {}
    self.samples = samples  # activation rows kept per layer (learned clipping); 0: none

  def get(self, config: qc.QuantConfig):
    if not config.needs_calibration:
      return None
    acts = config.activations
    key = (config.rotation, acts.block_size if acts else None, config.weights.group_size, acts is None)
    if key not in self.cache:
      # the statistics do not depend on the weight grid; learned clipping (the superset) is symmetric-only
      superset = config.replace(weights=dataclasses.replace(config.weights, method="clip", symmetric=True,
                                                            integer_zero=False))
      self.cache[key] = collect_stats(self.model, superset, self.windows, batch_size=self.batch_size,
                                      hessian=True, max_samples=self.samples, progress=False)
    return self.cache[key]


def evaluate(model_name, model, streams, window, configs, stats_cache, fp_ppl_by_kv, batch_size, log):
  rows = []
  for preset_name, config in configs:
    start = time.perf_counter()
    qmodel = quantize(model, config, stats_cache.get(config), progress=False)
    quant_s = time.perf_counter() - start
    nll, count, _ = perplexity_of_ids(qmodel, streams, window=window, batch_size=batch_size, kv=config.kv,
                                      progress=False)
    ppl = math.exp(nll / count)
    report = quantization_report(qmodel)
    kv = qc.kv_to_dict(config.kv)
    fp = fp_ppl_by_kv[None]
    row = dict(model=model_name, preset=preset_name, calibration=describe(config), ppl=ppl, fp_ppl=fp,
               delta_pct=100 * (ppl / fp - 1), int4_block_fraction=report["int4_block_fraction"],
               weight_bytes=report["weight_bytes"], bytes_per_param=report["bytes_per_param"],
               quantized_params=report["quantized_params"], rotation_bytes=report["rotation_bytes"],
               kv=kv, num_tokens=count, quantize_s=round(quant_s, 2),
               seconds=round(time.perf_counter() - start, 2), config=config.to_dict())
    rows.append(row)
    log(row)
  return rows


def fp_rows(model_name, model, streams, window, batch_size, kv_configs, log):
  rows, by_kv = [], {}
  for kv in kv_configs:
    start = time.perf_counter()
    nll, count, _ = perplexity_of_ids(model, streams, window=window, batch_size=batch_size, kv=kv, progress=False)
    ppl = math.exp(nll / count)
    by_kv[kv] = ppl
    fp = by_kv[None]
    _, state = nnx.split(model)
    params = sum(int(x.size) for x in jax.tree.leaves(nnx.to_pure_dict(state)))
    row = dict(model=model_name, preset="fp" if kv is None else "fp-kv4", calibration="none", ppl=ppl, fp_ppl=fp,
               delta_pct=100 * (ppl / fp - 1), int4_block_fraction=None, weight_bytes=None, bytes_per_param=4.0,
               quantized_params=0, rotation_bytes=0, kv=qc.kv_to_dict(kv), num_tokens=count, quantize_s=0.0,
               seconds=round(time.perf_counter() - start, 2), config=None, float_params=params)
    rows.append(row)
    log(row)
  return rows, by_kv


def _log(row):
  frac = row["int4_block_fraction"]
  print(f"  {row['model']:<14} {row['preset']:<9} {row['calibration']:<48} ppl {row['ppl']:.4f} "
        f"({row['delta_pct']:+.1f}%) int4 {'-' if frac is None else f'{frac:.3f}'} [{row['seconds']:.0f}s]",
        flush=True)


def markdown(rows, meta, notes) -> str:
  lines = [f"# Quantization accuracy ({meta['date']}, {meta['device']}, jax {meta['jax_version']}, "
           f"commit {meta['commit'][:10]})", ""] + notes + ["",
           "| model | preset | calibration | KV | ppl | FP ppl | vs FP | INT4 blocks | weight bytes | bytes/param |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    frac = "-" if r["int4_block_fraction"] is None else f"{100 * r['int4_block_fraction']:.1f}%"
    kv = "fp" if r["kv"] is None else f"KV4 ({r['kv']['k_mode']})"
    wb = "-" if r["weight_bytes"] is None else str(r["weight_bytes"])
    lines.append(f"| {r['model']} | {r['preset']} | {r['calibration']} | {kv} | {r['ppl']:.4f} | "
                 f"{r['fp_ppl']:.4f} | {r['delta_pct']:+.1f}% | {frac} | {wb} | {r['bytes_per_param']:.3f} |")
  lines += ["", "## Headline (computed from the rows above)", ""] + headline(rows)
  return "\n".join(lines) + "\n"


def headline(rows) -> list[str]:
  out = []
  for model in dict.fromkeys(r["model"] for r in rows):
    mine = [r for r in rows if r["model"] == model]
    best = {}
    for preset_name in ("w4ax-kv4", "w4a4-kv4", "w4ax", "w4a4"):
      candidates = [r for r in mine if r["preset"] == preset_name]
      if candidates:
        best[preset_name] = min(candidates, key=lambda r: r["ppl"])
    for ax, a4 in (("w4ax-kv4", "w4a4-kv4"), ("w4ax", "w4a4")):
      if ax in best and a4 in best:
        rx, r4 = best[ax], best[a4]
        ratio = r4["delta_pct"] / rx["delta_pct"] if rx["delta_pct"] > 0 else float("inf")
        out.append(f"- {model}: {ax} ({rx['calibration']}) {rx['delta_pct']:+.1f}% vs FP with "
                   f"{100 * rx['int4_block_fraction']:.1f}% INT4 blocks and {rx['bytes_per_param']:.3f} bytes/param; "
                   f"{a4} ({r4['calibration']}) {r4['delta_pct']:+.1f}%: {ratio:.1f}x smaller increase.")
        break
  return out


# ------------------------------------------------------------------------------------------------
# SmolLM2-135M (a real Llama, from its GGUF file)

SMOLLM2_GGUF = ("llama", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
SMOLLM2_EVAL_WINDOWS = 40
SMOLLM2_STORIES = 100


def smollm2_rows():
  """(label, QuantConfig or None, KV setting) for the SmolLM2 table; None config = the float model."""
  kv4 = qc.default_kv_config()
  w4ax = qc.preset("w4ax")
  sweep = [(f"fmpq int8={f:g}", w4ax.replace(activations=dataclasses.replace(w4ax.activations, int8_fraction=f),
                                              name=f"w4ax int8<={f:g}"), None) for f in (0.0, 0.125, 0.25, 0.5)]
  return [  # headline rows first: a run stopped early still has them
      ("fp", None, None),
      ("w4axkv4 (preset)", qc.preset("w4ax-kv4"), kv4),
      ("w4a4kv4 rtn", qc.preset("w4a4-kv4"), kv4),
      # what the preset's loss is made of: its weights alone, and its activations + KV with 8-bit weights
      ("w4a16 (preset)", qc.preset("w4a16"), None),
      ("w8axkv4", qc.preset("w4ax-kv4").replace(weights=W(bits=8, method="rtn"), name="w8ax-kv4"), kv4),
      ("w4a16 gptq g128", qc.preset("w4a16").replace(weights=W(method="gptq", group_size=128)), None),
      *sweep,
      ("w8a8", qc.preset("w8a8"), None),
      ("w4a4 rtn", qc.preset("w4a4"), None),
      ("w4a8", qc.preset("w4a8"), None),
      ("w4a16 rtn", qc.preset("w4a16").replace(weights=W(method="rtn")), None),
      ("w4a16 rtn g128", qc.preset("w4a16").replace(weights=W(method="rtn", group_size=128)), None),
      *[(f"kv4 {m}", None, qc.KVQuantConfig(k_mode=m)) for m in ("channel", "token", "hadamard")],
  ]


def smollm2_data(calib_windows: int):
  """(loaded model, calibration windows int32 [n, 512], WikiText-2 evaluation ids, TinyStories ids).

  WikiText-2 is cut by characters at its middle: calibration windows come from the second half, the
  evaluation windows from the first, so they share no text."""
  from cometjax.checkpoint import load
  from cometjax.data import data_path
  from calib.stats import calibration_windows
  loaded = load(data_path(*SMOLLM2_GGUF))
  wiki = data_path("text", "wikitext2_test.raw").read_text(encoding="utf-8")
  first, second = wiki[:len(wiki) // 2], wiki[len(wiki) // 2:]
  calib = calibration_windows(loaded.tokenizer, [second], 512, calib_windows)
  eval_ids = loaded.tokenizer.encode(first)
  stories = split_documents(data_path("text", "tinystories_val.txt").read_text(encoding="utf-8"))[:SMOLLM2_STORIES]
  story_ids = [i for story in stories for i in loaded.tokenizer.encode(story)]
  return loaded, calib, eval_ids, story_ids


def _disk_bytes(qmodel, config, tokenizer_source) -> int:
  import shutil
  import tempfile
  from cometjax.checkpoint.quantized import save_quantized
  directory = pathlib.Path(tempfile.mkdtemp(prefix="cometjax-accuracy-"))
  try:
    save_quantized(directory, qmodel, config, tokenizer_source=tokenizer_source)
    return sum(f.stat().st_size for f in directory.iterdir())
  finally:
    shutil.rmtree(directory)


def _float_params(model) -> int:
  _, state = nnx.split(model)
  return sum(int(x.size) for x in jax.tree.leaves(nnx.to_pure_dict(state)))


def smollm2_row(label, config, kv, loaded, stats_cache, eval_ids, story_ids, batch_size, fp):
  from cometjax.data import data_path
  start = time.perf_counter()
  stats = stats_cache.get(config) if config is not None else None
  calib_s = time.perf_counter() - start
  start = time.perf_counter()
  model = loaded.model if config is None else quantize(loaded.model, config, stats, progress=False)
  quant_s = time.perf_counter() - start
  report = quantization_report(model) if config is not None else None  # before the evaluations: fail early
  disk = (4 * _float_params(model) if config is None else _disk_bytes(model, config, data_path(*SMOLLM2_GGUF)))
  nll, count, _ = perplexity_of_ids(model, [eval_ids], window=512, batch_size=batch_size, kv=kv, progress=False,
                                    windowing="disjoint", max_windows=SMOLLM2_EVAL_WINDOWS)
  snll, scount, _ = perplexity_of_ids(model, [story_ids], window=512, batch_size=batch_size, kv=kv, progress=False)
  wiki, stories = math.exp(nll / count), math.exp(snll / scount)
  fp = fp or dict(wiki=wiki, stories=stories)
  return dict(model="SmolLM2-135M", label=label, preset=None if config is None else config.name,
              calibration="none" if config is None else describe(config), kv=qc.kv_to_dict(kv),
              wiki_ppl=wiki, wiki_delta_pct=100 * (wiki / fp["wiki"] - 1), wiki_tokens=count,
              stories_ppl=stories, stories_delta_pct=100 * (stories / fp["stories"] - 1), stories_tokens=scount,
              int4_block_fraction=None if report is None else report["int4_block_fraction"],
              weight_bytes=None if report is None else report["weight_bytes"],
              bytes_per_param=None if report is None else report["bytes_per_param"], disk_bytes=disk,
              calib_s=round(calib_s, 1), quantize_s=round(quant_s, 1), calib_windows=len(stats_cache.windows),
              config=None if config is None else config.to_dict())


def smollm2_markdown(rows, meta, notes) -> str:
  lines = [f"# Quantization accuracy on SmolLM2-135M-Instruct ({meta['date']}, {meta['device']}, jax "
           f"{meta['jax_version']}, commit {meta['commit'][:10]})", ""] + notes + ["",
           "| row | calibration | KV | WikiText-2 ppl | vs FP | TinyStories ppl | vs FP | INT4 blocks | "
           "bytes on disk | calib s | quantize s |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    frac = "-" if r["int4_block_fraction"] is None else f"{100 * r['int4_block_fraction']:.1f}%"
    kv = "fp" if r["kv"] is None else f"KV4 ({r['kv']['k_mode']})"
    lines.append(f"| {r['label']} | {r['calibration']} | {kv} | {r['wiki_ppl']:.3f} | {r['wiki_delta_pct']:+.1f}% | "
                 f"{r['stories_ppl']:.3f} | {r['stories_delta_pct']:+.1f}% | {frac} | {r['disk_bytes']:,} | "
                 f"{r['calib_s']:.0f} | {r['quantize_s']:.0f} |")
  by = {r["label"]: r for r in rows}
  if "w4axkv4 (preset)" in by and "w4a4kv4 rtn" in by:
    ax, a4 = by["w4axkv4 (preset)"], by["w4a4kv4 rtn"]
    lines += ["", "## Headline (computed from the rows above)", "",
              f"- W4AxKV4 (preset) {ax['wiki_delta_pct']:+.1f}% vs FP on WikiText-2 (goal +10%) with "
              f"{100 * ax['int4_block_fraction']:.1f}% INT4 blocks; W4A4KV4 RTN {a4['wiki_delta_pct']:+.1f}%: the "
              f"increase is {ax['wiki_delta_pct'] / a4['wiki_delta_pct']:.2f} of RTN's (goal < 0.5)."]
  return "\n".join(lines) + "\n"


def run_smollm2(args, meta) -> list[dict]:
  """The SmolLM2 table; rows already in --out (same label and config) are kept, so a run can resume."""
  import json
  out = pathlib.Path(args.out if args.out != str(RESULTS / "accuracy.json") else RESULTS / "accuracy_smollm2.json")
  saved = json.loads(out.read_text())["rows"] if out.exists() and not args.fresh else []
  wanted = [r for r in smollm2_rows() if not args.rows or r[0] in args.rows]
  loaded, calib, eval_ids, story_ids = smollm2_data(args.calib_windows)
  print(f"SmolLM2: calibrate on {len(calib)} windows of 512 (second half of WikiText-2), evaluate on the first "
        f"{SMOLLM2_EVAL_WINDOWS} disjoint windows of the first half and {SMOLLM2_STORIES} TinyStories stories "
        f"({len(story_ids)} tokens)", flush=True)
  stats_cache = StatsCache(loaded.model, calib, args.batch_size, samples=0)
  notes = [f"- calibration: {len(calib)} windows of 512 tokens from the second half of text/wikitext2_test.raw "
           "(split by characters at the middle), tokenized with SmolLM2's rule (no BOS).",
           f"- WikiText-2: the first {SMOLLM2_EVAL_WINDOWS} disjoint windows of 512 tokens of the first half, each a "
           "fresh sequence scoring 511 tokens (cometjax.serving.perplexity, windowing='disjoint').",
           f"- TinyStories: the first {SMOLLM2_STORIES} stories of text/tinystories_val.txt, the default stream "
           "protocol (stories concatenated without BOS, windows of 512).",
           "- bytes on disk: the directory `cometjax quantize` writes (packed weights, scales, permutations, "
           "rotations, the float embedding shared with the head, the tokenizer); FP: float32 parameters. The "
           "source GGUF (Q4_1 linears, Q8_0 embedding) is 98,362,432 bytes.",
           "- calib s: the statistics pass the row needed first (shared by later rows with the same input "
           "layout); quantize s: quantize() alone. CPU, 2 cores shared with other jobs: times are indicative.",
           f"- KV4 rows: {qc.default_kv_config()} unless the row names another K mode."]
  rows = []
  for label, config, kv in wanted:
    keep = next((r for r in saved if r["label"] == label and r.get("calib_windows") == len(calib) and
                 r["config"] == (None if config is None else config.to_dict()) and r["kv"] == qc.kv_to_dict(kv)), None)
    if keep is None:
      fp = next(({"wiki": r["wiki_ppl"], "stories": r["stories_ppl"]} for r in rows + saved if r["label"] == "fp"),
                None)
      keep = smollm2_row(label, config, kv, loaded, stats_cache, eval_ids, story_ids, args.batch_size, fp)
    rows.append(keep)
    print(f"  {label:<20} wiki {keep['wiki_ppl']:.3f} ({keep['wiki_delta_pct']:+.1f}%) stories "
          f"{keep['stories_ppl']:.3f} ({keep['stories_delta_pct']:+.1f}%) int4 {keep['int4_block_fraction']} "
          f"[calib {keep['calib_s']:.0f}s, quantize {keep['quantize_s']:.0f}s]", flush=True)
    merged = rows + [r for r in saved if r["label"] not in {x["label"] for x in rows}]
    write_json(out, {**meta, "notes": notes, "rows": merged})
    out.with_suffix(".md").write_text(smollm2_markdown(merged, meta, notes))
  if args.outliers and stats_cache.cache:
    from bench.outlier_profile import profile_from_stats, write_profile
    fmpq_stats = next(v for k, v in stats_cache.cache.items() if not k[3])  # key[3]: A16
    in_features = {n: loaded.config.intermediate_size if n.endswith("down_proj") else loaded.config.hidden_size
                   for n in fmpq_stats.layers}
    write_profile(profile_from_stats(fmpq_stats, in_features), RESULTS / "outliers_smollm2.json", notes[:1])
  print(out.with_suffix(".md").read_text())
  return rows


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--smoke", action="store_true", help="synthetic model only, tiny sizes (seconds)")
  parser.add_argument("--calib-documents", type=int, default=200)
  parser.add_argument("--eval-documents", type=int, default=200, help="stories after the calibration ones")
  parser.add_argument("--outlier-scale", type=float, default=30.0)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--skip-stories", action="store_true")
  parser.add_argument("--headline-only", action="store_true",
                      help="stories260K only, rows fp, fp-kv4, w4a4-kv4 and w4ax-kv4 (for the long --eval-documents 800)")
  parser.add_argument("--out", default=str(RESULTS / "accuracy.json"))
  parser.add_argument("--smollm2", action="store_true",
                      help="the SmolLM2-135M table instead (bench/results/accuracy_smollm2.{json,md}; resumes)")
  parser.add_argument("--rows", nargs="*", default=None, help="--smollm2: only these row labels")
  parser.add_argument("--fresh", action="store_true", help="--smollm2: recompute rows already in the JSON")
  parser.add_argument("--calib-windows", type=int, default=32, help="--smollm2: calibration windows of 512")
  parser.add_argument("--no-outliers", dest="outliers", action="store_false",
                      help="--smollm2: skip the outlier profile (bench/results/outliers_smollm2.{json,png})")
  parser.add_argument("--render", default=None, metavar="JSON",
                      help="only rewrite the markdown table next to an existing results JSON")
  args = parser.parse_args(argv)
  if args.render:
    import json
    saved = json.loads(pathlib.Path(args.render).read_text())
    table = markdown(saved["rows"], saved, saved.get("notes", []))
    pathlib.Path(args.render).with_suffix(".md").write_text(table)
    print(table)
    return saved["rows"]
  jax.config.update("jax_default_matmul_precision", "highest")
  meta = run_metadata()
  if args.smollm2:
    return run_smollm2(args, meta)
  rows, notes = [], []
  kv4 = qc.default_kv_config()

  # (b) synthetic outlier Llama
  size = dict(hidden=32, intermediate=44, layers=2, vocab=64, channels=(3, 11, 20)) if args.smoke else {}
  num, length = (8, 32) if args.smoke else (48, 128)
  model = None if args.headline_only else outlier_llama(scale=args.outlier_scale, **size)
  if model is not None:
    calib = sample_sequences(model, num, length, seed=1)
    held_out = sample_sequences(model, num, length, seed=2)
    streams = [list(s) for s in held_out]
    print("synthetic outlier Llama", flush=True)
    fp, by_kv = fp_rows("synthetic", model, streams, length, args.batch_size, [None], _log)
    rows += fp
    configs = synthetic_rows()
    if args.smoke:
      configs = [configs[1], configs[3]]  # w4a4 rtn, w4ax rtn
    rows += evaluate("synthetic", model, streams, length, configs, StatsCache(model, calib, args.batch_size),
                     by_kv, args.batch_size, _log)
    notes.append(f"- synthetic: random Llama (hidden {model.config.hidden_size}, intermediate "
                 f"{model.config.intermediate_size}, {model.config.num_layers} layers, vocab {model.config.vocab_size}), "
                 f"RMSNorm channels {size.get('channels', OUTLIER_CHANNELS)} x {args.outlier_scale:g} in every layer; "
                 f"calibration and evaluation on {num} sequences of {length} tokens each sampled from the float model "
                 "(disjoint seeds).")

  # (a) stories260K
  if not args.smoke and not args.skip_stories:
    from cometjax.data import data_path
    from cometjax.checkpoint import load
    model_dir, text_path = data_path("llama", "stories260K", "hf"), data_path("text", "tinystories_val.txt")
    if not model_dir.exists() or not text_path.exists():
      print(f"skipping stories260K: {model_dir} or {text_path} missing (set COMETJAX_DATA)")
    else:
      loaded = load(model_dir)
      docs = split_documents(text_path.read_text(encoding="utf-8"))
      calib_docs = docs[:args.calib_documents]
      eval_docs = docs[args.calib_documents:args.calib_documents + args.eval_documents]
      windows = calibration_windows(loaded.tokenizer, calib_docs, 512)
      stream = [i for d in eval_docs for i in loaded.tokenizer.encode(d, bos=True)]
      print(f"stories260K: calibrate on {len(calib_docs)} stories ({windows.size} tokens), evaluate on "
            f"{len(eval_docs)} ({len(stream)} tokens)", flush=True)
      fp, by_kv = fp_rows("stories260K", loaded.model, [stream], 512, args.batch_size, [None, kv4], _log)
      rows += fp
      configs = stories_rows()
      if args.headline_only:
        configs = [c for c in configs if c[0] in ("w4a4-kv4", "w4ax-kv4")]
      rows += evaluate("stories260K", loaded.model, [stream], 512, configs,
                       StatsCache(loaded.model, windows, args.batch_size), by_kv, args.batch_size, _log)
      notes.append(f"- stories260K: calibration on TinyStories validation stories 0..{args.calib_documents - 1} "
                   f"({windows.size} tokens in windows of 512), evaluation on stories {args.calib_documents}.."
                   f"{args.calib_documents + len(eval_docs) - 1} ({len(stream)} tokens; the protocol of "
                   "cometjax.serving.perplexity, window 512).")
  notes += [
      "- vs FP: against the float model with a float KV cache. INT4 blocks: share of FMPQ activation blocks "
      "at INT4 over all quantized layers. weight bytes: packed codes + f32 scales + int32 permutations of "
      "the quantized linears (embeddings / lm_head stay float and are not counted); bytes/param over those "
      "layers' parameters. Online rotation matrices (dense here, a fast Hadamard in a kernel) are listed in "
      "the JSON as rotation_bytes.",
      f"- KV4: {kv4} (cometjax.serving.kvcache).",
  ]
  out = pathlib.Path(args.out)
  if args.smoke and args.out == str(RESULTS / "accuracy.json"):
    import tempfile
    out = pathlib.Path(tempfile.mkdtemp()) / "accuracy.json"
  write_json(out, {**meta, "smoke": args.smoke, "notes": notes, "rows": rows})
  table = markdown(rows, meta, notes)
  out.with_suffix(".md").write_text(table)
  print(table)
  return rows


if __name__ == "__main__":
  main()
