"""CPU speed side by side with the peers, in one process: cometjax against transformers/torch (the same thread
count) and against llama2.c's `run` binary when `--llama2c-run` points at one.

    python bench/cpu_speed.py --llama2c-run /path/to/llama2.c/run   # stories260K rows
    python bench/cpu_speed.py --smollm2                             # + SmolLM2-135M eval-ppl
    python bench/cpu_speed.py --smoke                               # a few reps, shorter workloads

Workloads on stories260K (shared data; `run` reads the llama2.c .bin, the others the HF directory):
- decode_b1 / decode_b32: greedy from BOS, 256 tokens per row, EOS ignored. tokens/s = tokens produced /
  wall time of the whole generate call (a 1-token prefill included), for cometjax (`generate`, warmed up) and
  torch (`model.generate`). llama2.c's own "achieved tok/s" line is used for `run` (-n 256 -t 0).
- prefill_b32: 32 prompts of 256 random ids; cometjax `generate(..., max_new_tokens=1).prefill_s`, torch one
  forward with use_cache=True.
- eval_ppl: the first 200 stories of tinystories_val.txt under `cometjax.perplexity`'s protocol (512-token
  windows, batches of 8); torch scores the same windows; both perplexities are recorded.
- w4axkv4_decode_b1: decode_b1 for the `w4ax-kv4` preset (calibrated on 8 windows) against the float model.
- cli_generate_wall: the default main job, `python -m cometjax.cli generate` (stories260K's llama2.c file,
  256 tokens) as a subprocess, wall
  seconds, with an empty and then a filled persistent compilation cache (all cores, as a user runs it);
  `run`'s whole process beside it.
- smollm2_eval_ppl (--smollm2): SmolLM2-135M-Instruct from its GGUF, the first --smollm2-windows disjoint
  512-token windows of wikitext2_test.raw; torch loads the same GGUF through transformers.
Every number is the median of --reps runs after a warm-up; peers run interleaved with cometjax (paired) so a
noisy machine moves both. Both sides run on --threads threads (default 1). Results: bench/results/cpu_speed_<device>.json.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from cometjax.data import data_path  # noqa: E402  (no jax: XLA_FLAGS must be set before jax is imported)

STORIES_HF = ("llama", "stories260K", "hf")
STORIES_BIN = ("llama", "stories260K", "llama2c", "stories260K.bin")
STORIES_TOK = ("llama", "stories260K", "llama2c", "tok512.bin")
USER_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
SMOLLM2 = ("llama", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")


def timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def paired(ours, theirs, reps: int) -> tuple[list[float], list[float]]:
  """Runs ours() and theirs() (each returning tokens/s) alternately after one warm-up each."""
  ours(), theirs()
  a, b = [], []
  for _ in range(reps):
    a.append(ours())
    b.append(theirs())
  return a, b


def row(name: str, ours: list[float], peer: str, theirs: list[float] | None, unit: str = "tokens/s",
        note: str = "") -> dict:
  entry = {"workload": name, "unit": unit, "cometjax": statistics.median(ours), "cometjax_runs": ours,
           "peer": peer, "note": note}
  if theirs:
    entry.update(peer_value=statistics.median(theirs), peer_runs=theirs,
                 ratio=statistics.median(ours) / statistics.median(theirs))
  return entry


class Torch:
  """transformers' Llama on torch with `threads` intra-op threads."""

  def __init__(self, source: pathlib.Path, threads: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    self.torch = torch
    if source.suffix == ".gguf":
      self.model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    else:
      self.model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    self.model.eval()

  def decode(self, batch: int, new_tokens: int, bos: int) -> float:
    ids = self.torch.full((batch, 1), bos)
    with self.torch.inference_mode():
      seconds = timed(lambda: self.model.generate(ids, attention_mask=self.torch.ones_like(ids), do_sample=False,
                                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens))
    return batch * new_tokens / seconds

  def prefill(self, tokens: np.ndarray) -> float:
    ids = self.torch.from_numpy(tokens.astype(np.int64))
    with self.torch.inference_mode():
      return tokens.size / timed(lambda: self.model(ids, use_cache=True))

  def total_nll(self, pairs, batch_size: int) -> tuple[float, int]:
    """The summed NLL and count over (inputs, targets) windows, as `perplexity_of_ids` batches them."""
    total, count = 0.0, 0
    with self.torch.inference_mode():
      for start in range(0, len(pairs), batch_size):
        group = pairs[start:start + batch_size]
        width = max(len(x) for x, _ in group)
        inputs = np.zeros((len(group), width), np.int64)
        targets = np.zeros((len(group), width), np.int64)
        valid = np.zeros((len(group), width), bool)
        for i, (x, y) in enumerate(group):
          inputs[i, :len(x)], targets[i, :len(y)], valid[i, :len(y)] = x, y, True
        logits = self.model(self.torch.from_numpy(inputs)).logits.float()
        logp = self.torch.log_softmax(logits, dim=-1)
        nll = -logp.gather(-1, self.torch.from_numpy(targets)[..., None])[..., 0]
        total += float(nll[self.torch.from_numpy(valid)].double().sum())
        count += int(valid.sum())
    return total, count


def cometjax_decode(model, batch: int, new_tokens: int, bos: int, kv=None) -> float:
  from cometjax.serving.generate import generate

  result = generate(model, [[bos]] * batch, new_tokens, stop_at_eos=False, kv=kv)
  return result.generated_tokens / (result.prefill_s + result.decode_s)


def cometjax_prefill(model, tokens: np.ndarray) -> float:
  from cometjax.serving.generate import generate

  result = generate(model, tokens.tolist(), 1, stop_at_eos=False)
  return tokens.size / result.prefill_s


def llama2c_decode(run: pathlib.Path, new_tokens: int) -> float:
  out = subprocess.run([str(run), str(data_path(*STORIES_BIN)), "-z", str(data_path(*STORIES_TOK)), "-t", "0",
                        "-n", str(new_tokens), "-i", ""], capture_output=True, text=True, check=True)
  return float(re.search(r"achieved tok/s: ([0-9.]+)", out.stdout + out.stderr).group(1))


def decode_rows(model, peer: Torch, llama2c: pathlib.Path | None, reps: int, new_tokens: int) -> list[dict]:
  bos = model.config.bos_token_id
  rows = []
  ours, theirs = paired(lambda: cometjax_decode(model, 1, new_tokens, bos),
                        lambda: llama2c_decode(llama2c, new_tokens) if llama2c else float("nan"), reps)
  rows.append(row("decode_b1", ours, "llama2.c run.c" if llama2c else "llama2.c run.c (skipped)",
                  theirs if llama2c else None,
                  note="" if llama2c else "no --llama2c-run binary given: build karpathy/llama2.c's run.c "
                                          "(gcc -O3 -o run run.c -lm) and pass its path"))
  ours_t, torch_t = paired(lambda: cometjax_decode(model, 1, new_tokens, bos),
                           lambda: peer.decode(1, new_tokens, bos), reps)
  rows.append(row("decode_b1_vs_torch", ours_t, "transformers/torch", torch_t))
  ours, theirs = paired(lambda: cometjax_decode(model, 32, new_tokens, bos),
                        lambda: peer.decode(32, new_tokens, bos), reps)
  rows.append(row("decode_b32", ours, "transformers/torch", theirs))
  return rows


def prefill_row(model, peer: Torch, reps: int, prompt: int) -> dict:
  tokens = np.random.default_rng(0).integers(3, model.config.vocab_size, (32, prompt)).astype(np.int32)
  ours, theirs = paired(lambda: cometjax_prefill(model, tokens), lambda: peer.prefill(tokens), reps)
  return row("prefill_b32", ours, "transformers/torch", theirs, note=f"prompt {prompt} tokens")


def eval_ppl_row(name: str, model, peer: Torch, streams, reps: int, windowing: str, max_windows=None) -> dict:
  from cometjax.serving.perplexity import perplexity_of_ids, windows

  pairs = [p for ids in streams for p in windows(ids, 512, windowing)][:max_windows]
  result = {}

  def ours():
    seconds = timed(lambda: result.update(
        ours=perplexity_of_ids(model, streams, windowing=windowing, max_windows=max_windows, progress=False)))
    return result["ours"][1] / seconds

  def theirs():
    seconds = timed(lambda: result.update(theirs=peer.total_nll(pairs, 8)))
    return result["theirs"][1] / seconds

  a, b = paired(ours, theirs, reps)
  ppl = lambda total_count: float(np.exp(total_count[0] / total_count[1]))
  return row(name, a, "transformers/torch", b, note=f"{len(pairs)} windows of 512, {result['ours'][1]} tokens; "
             f"ppl cometjax {ppl(result['ours']):.4f}, torch {ppl(result['theirs']):.4f}")


def quantized_row(model, tokenizer, documents, reps: int, new_tokens: int) -> dict:
  import cometjax
  from calib.pipeline import calibrate_and_quantize
  from calib.stats import calibration_windows

  config = cometjax.preset("w4ax-kv4")
  windows = calibration_windows(tokenizer, documents, 512, 8)
  quantized, _ = calibrate_and_quantize(model, config, windows, progress=False)
  bos = model.config.bos_token_id
  first = timed(lambda: cometjax_decode(quantized, 1, new_tokens, bos, kv=config.kv))
  ours, theirs = paired(lambda: cometjax_decode(quantized, 1, new_tokens, bos, kv=config.kv),
                        lambda: cometjax_decode(model, 1, new_tokens, bos), reps)
  return row("w4axkv4_decode_b1", ours, "cometjax float", theirs,
             note=f"first (compiling) call {first:.1f} s; preset w4ax-kv4, 8 calibration windows")


def cli_rows(llama2c: pathlib.Path | None, new_tokens: int) -> list[dict]:
  command = [sys.executable, "-m", "cometjax.cli", "generate", "--max-new-tokens", str(new_tokens), "--no-stop"]
  rows = []
  with tempfile.TemporaryDirectory() as cache:
    env = {**os.environ, "COMETJAX_CACHE_DIR": cache, "XLA_FLAGS": USER_XLA_FLAGS}
    for label in ("empty", "filled"):
      wall = timed(lambda: subprocess.run(command, env=env, check=True, capture_output=True))
      rows.append(dict(workload=f"cli_generate_wall_{label}_cache", unit="s", cometjax=wall,
                       note="whole process: python start, imports, load, compile or cache read, warm-up, run"))
  if llama2c:
    walls = [timed(lambda: llama2c_decode(llama2c, new_tokens)) for _ in range(5)]
    rows.append(dict(workload="llama2c_run_wall", unit="s", peer_value=statistics.median(walls)))
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--llama2c-run", type=pathlib.Path, default=None, help="llama2.c's compiled `run` binary")
  parser.add_argument("--threads", type=int, default=1,
                      help="threads for both: torch.set_num_threads, and for jax 1 = XLA's single-threaded CPU "
                           "runtime; more than 1 leaves jax on all cores (default 1: on a shared machine a "
                           "descheduled OpenMP thread stalls every torch op)")
  parser.add_argument("--reps", type=int, default=7)
  parser.add_argument("--smollm2", action="store_true", help="add SmolLM2-135M eval-ppl (minutes on 2 cores)")
  parser.add_argument("--smollm2-windows", type=int, default=8)
  parser.add_argument("--skip-quantized", action="store_true")
  parser.add_argument("--smoke", action="store_true", help="2 reps, 64-token decode, 20 stories")
  parser.add_argument("--out", type=pathlib.Path, default=None)
  args = parser.parse_args(argv)
  if args.llama2c_run is not None and not args.llama2c_run.is_file():
    parser.error(f"--llama2c-run {args.llama2c_run} is not a file")
  if not data_path(*STORIES_HF).is_dir():
    parser.error(f"stories260K not found at {data_path(*STORIES_HF)} (set COMETJAX_DATA)")
  if args.threads == 1:
    os.environ["XLA_FLAGS"] = (USER_XLA_FLAGS + " --xla_cpu_multi_thread_eigen=false "
                               "intra_op_parallelism_threads=1").strip()
  import cometjax
  from bench.common import RESULTS, device_tag, run_metadata, write_json
  from cometjax.serving.perplexity import split_documents

  reps, new_tokens, stories = (2, 64, 20) if args.smoke else (args.reps, 256, 200)
  loaded = cometjax.load(data_path(*STORIES_HF))
  peer = Torch(data_path(*STORIES_HF), args.threads)
  documents = split_documents(data_path("text", "tinystories_val.txt").read_text())[:stories]
  out = args.out or RESULTS / f"cpu_speed_{device_tag()}{'_smoke' if args.smoke else ''}.json"
  meta = {**run_metadata(), "threads": args.threads, "cpu_count": os.cpu_count(), "reps": reps,
          "smoke": args.smoke}
  rows = []
  save = lambda: write_json(out, {**meta, "rows": rows})  # after every section: a stopped run keeps its rows
  rows += decode_rows(loaded.model, peer, args.llama2c_run, reps, new_tokens)
  save()
  rows.append(prefill_row(loaded.model, peer, reps, 256 if not args.smoke else 64))
  stream = [[i for d in documents for i in loaded.tokenizer.encode(d)]]
  rows.append(eval_ppl_row("eval_ppl", loaded.model, peer, stream, reps, "stream"))
  save()
  rows += cli_rows(args.llama2c_run, new_tokens)
  save()
  if not args.skip_quantized:
    rows.append(quantized_row(loaded.model, loaded.tokenizer, documents, reps, new_tokens))
    save()
  if args.smollm2:
    gguf = data_path(*SMOLLM2)
    smol = cometjax.load(gguf)
    text = data_path("text", "wikitext2_test.raw").read_text()
    rows.append(eval_ppl_row("smollm2_eval_ppl", smol.model, Torch(gguf, args.threads),
                             [smol.tokenizer.encode(text)], max(1, reps // 2), "disjoint", args.smollm2_windows))
    save()
  for r in rows:
    ratio = f"{r['ratio']:.2f}x" if "ratio" in r else ""
    ours = f"{r['cometjax']:.1f}" if "cometjax" in r else ""
    theirs = f"{r['peer_value']:.1f}" if "peer_value" in r else ""
    print(f"{r['workload']:34s} {ours:>10s} {theirs:>10s} {r['unit']:9s} {ratio:>6s} {r.get('peer', '')}")
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
