"""End-to-end generation throughput: our engine (bf16 / W4A16 / W8A8 / W4A8-KV4 / W4Ax-KV4) vs transformers.

    python bench/e2e.py                  # GPU: Llama-3-8B and Llama-2-7B shapes (32 layers, real dims)
    python bench/e2e.py --smoke          # tiny shapes on CPU, a few seconds: shows the script runs

Models have random weights (throughput does not depend on their values). Quantized presets are built
directly with `cometjax.core.formats.quantize_weight` (RTN; W4Ax uses 128-channel blocks with 25% of them INT8,
the INT4 fraction COMET reports); calibration changes the values, not the work. Each run: prompts of
`in_len` random tokens, `out_len` new tokens (EOS ignored), one warm-up call for the shape, then the timed
call of `cometjax.serving.generate.generate` (prefill + decode). tokens_per_s = batch * out_len / (prefill + decode
seconds); peak_mem_gb from the device allocator (jax) or torch.cuda.max_memory_allocated. transformers runs
its own `generate` in bf16 with the same shapes when torch sees a GPU. Cases whose estimated weight + KV
bytes exceed 90% of device memory are skipped and listed. Results: `bench/results/e2e_<device>.json` and a
table printed last.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, device_tag, run_metadata, use_kernels_where_supported, write_json  # noqa: E402
from cometjax.serving.generate import generate  # noqa: E402
from cometjax.core.kv_config import KVQuantConfig  # noqa: E402
from cometjax.models.llama import LlamaConfig, RopeScaling, abstract_llama, set_matmul_implementation  # noqa: E402
from cometjax.core.formats import ActivationFormat, quantize_weight  # noqa: E402

SHAPES = {
    "llama3-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                             num_heads=32, num_kv_heads=8, rope_theta=500000.0, max_position_embeddings=8192,
                             rope_scaling=RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                      high_freq_factor=4.0, original_max_position_embeddings=8192),
                             dtype=jnp.bfloat16, eos_token_id=None),
    "llama2-7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                             num_heads=32, num_kv_heads=32, max_position_embeddings=4096, dtype=jnp.bfloat16,
                             eos_token_id=None),
}
SMOKE_SHAPE = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                          num_kv_heads=2, max_position_embeddings=512, dtype=jnp.bfloat16, eos_token_id=None)


@dataclasses.dataclass(frozen=True)
class Preset:
  name: str
  weight_bits: int | None  # None: bf16 weights
  int8_fraction: float | None  # None: weight-only (activations stay bf16)
  kv: KVQuantConfig | None


PRESETS = (Preset("bf16", None, None, None), Preset("w4a16", 4, None, None), Preset("w8a8", 8, 1.0, None),
           Preset("w4a8-kv4", 4, 1.0, KVQuantConfig()), Preset("w4ax-kv4", 4, 0.25, KVQuantConfig()))


def random_model(config: LlamaConfig, seed: int = 0):
  """A model of `config` with N(0, 0.02) weights and unit norms, made on the device leaf by leaf."""
  graphdef, state = nnx.split(abstract_llama(config))
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  make = jax.jit(lambda k, shape, dtype: (0.02 * jax.random.normal(k, shape)).astype(dtype), static_argnums=(1, 2))
  filled = [jnp.ones(x.shape, x.dtype) if len(x.shape) == 1 else make(k, x.shape, x.dtype)
            for k, x in zip(keys, leaves)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, filled))


def apply_preset(model, preset: Preset, block_size: int):
  if preset.weight_bits is None:
    return model
  graphdef, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  for layer in pure["layers"].values():
    for block in ("self_attn", "mlp"):
      for proj in layer[block].values():
        w = proj["kernel"]
        k = w.shape[0]
        fmt = None
        perm = None
        if preset.int8_fraction is not None:
          fmt = ActivationFormat.for_features(k, block_size, preset.int8_fraction)
          perm = jax.random.permutation(jax.random.key(k), k).astype(jnp.int32)
        proj["kernel"] = quantize_weight(w.astype(jnp.float32), preset.weight_bits, activation=fmt, perm=perm)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def estimated_bytes(config: LlamaConfig, preset: Preset, batch: int, total_len: int) -> float:
  d, f, layers = config.hidden_size, config.intermediate_size, config.num_layers
  hd = config.resolved_head_dim
  linear = layers * (d * hd * (config.num_heads * 2 + config.num_kv_heads * 2) + 3 * d * f)
  weight_bytes = linear * (2 if preset.weight_bits is None else preset.weight_bits / 8) + 2 * 2 * config.vocab_size * d
  kv_values = 2 * layers * batch * total_len * config.num_kv_heads * hd
  kv_bytes = kv_values * (2 if preset.kv is None else 0.5 + 0.25)
  return weight_bytes + kv_bytes


def device_memory_bytes() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def peak_memory_gb() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


def run_ours(model, preset: Preset, batch: int, in_len: int, out_len: int) -> dict:
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, model.config.vocab_size, (batch, in_len)).tolist()
  generate(model, prompts, out_len, stop_at_eos=False, kv=preset.kv)  # compile this shape
  result = generate(model, prompts, out_len, stop_at_eos=False, kv=preset.kv)
  seconds = result.prefill_s + result.decode_s
  return {"tokens_per_s": batch * out_len / seconds, "prefill_s": result.prefill_s, "decode_s": result.decode_s,
          "peak_mem_gb": peak_memory_gb()}


def run_transformers(config: LlamaConfig, batch: int, in_len: int, out_len: int) -> dict | None:
  try:
    import torch
    import transformers
  except ImportError:
    return None
  if not torch.cuda.is_available():
    return None
  hf_config = transformers.LlamaConfig(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
      num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
      num_key_value_heads=config.num_kv_heads, max_position_embeddings=config.max_position_embeddings,
      rope_theta=config.rope_theta)
  with torch.device("cuda"):
    model = transformers.LlamaForCausalLM(hf_config).to(torch.bfloat16).eval()
  ids = torch.randint(3, config.vocab_size, (batch, in_len), device="cuda")
  kwargs = dict(max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False, pad_token_id=0)
  with torch.no_grad():
    model.generate(ids, **kwargs)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model.generate(ids, **kwargs)
    torch.cuda.synchronize()
  seconds = time.perf_counter() - start
  peak = torch.cuda.max_memory_allocated() / 2**30
  del model
  torch.cuda.empty_cache()
  return {"tokens_per_s": batch * out_len / seconds, "peak_mem_gb": peak}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--smoke", action="store_true", help="tiny shapes on any device; not results")
  parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
  parser.add_argument("--presets", nargs="+", default=[p.name for p in PRESETS], choices=[p.name for p in PRESETS])
  parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64, 256])
  parser.add_argument("--lengths", nargs="+", default=["1024/512", "128/128"], help="in_len/out_len pairs")
  parser.add_argument("--no-transformers", action="store_true")
  parser.add_argument("--implementation", default="auto", choices=("auto", "xla", "pallas", "interpret"),
                      help="backend of quantized matmuls and INT4-cache decode attention (auto: validated kernels only; "
                           "pallas / interpret: kernels on every layer one serves, XLA on the rest)")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  if not args.smoke and jax.default_backend() == "cpu":
    parser.error("full shapes need a GPU; use --smoke on CPU")

  shapes = {"smoke": SMOKE_SHAPE} if args.smoke else {name: SHAPES[name] for name in args.shapes}
  lengths = [(16, 8)] if args.smoke else [tuple(int(v) for v in pair.split("/")) for pair in args.lengths]
  batches = [2] if args.smoke else args.batches
  block_size = 32 if args.smoke else 128
  presets = [p for p in PRESETS if p.name in args.presets]
  limit = device_memory_bytes()
  rows, skipped = [], []
  for shape_name, config in shapes.items():
    base = random_model(config)
    for preset in presets:
      model = apply_preset(base, preset, block_size)
      if args.implementation in ("pallas", "interpret"):  # kernels on every layer one serves, XLA elsewhere
        use_kernels_where_supported(model, args.implementation)
      else:
        set_matmul_implementation(model, args.implementation)
      for batch in batches:
        for in_len, out_len in lengths:
          case = dict(model_shape=shape_name, engine="cometjax", preset=preset.name, batch=batch, in_len=in_len,
                      out_len=out_len)
          if limit and estimated_bytes(config, preset, batch, in_len + out_len) > 0.9 * limit:
            skipped.append({**case, "reason": "estimated memory exceeds 90% of the device"})
            continue
          print(f"running {case}", flush=True)
          rows.append({**case, **run_ours(model, preset, batch, in_len, out_len)})
      del model
    if not args.no_transformers:
      for batch in batches:
        for in_len, out_len in lengths:
          case = dict(model_shape=shape_name, engine="transformers", preset="bf16", batch=batch, in_len=in_len,
                      out_len=out_len)
          if limit and estimated_bytes(config, PRESETS[0], batch, in_len + out_len) > 0.9 * limit:
            skipped.append({**case, "reason": "estimated memory exceeds 90% of the device"})
            continue
          measured = run_transformers(config, batch, in_len, out_len)
          if measured is None:
            skipped.append({**case, "reason": "torch with CUDA not available"})
          else:
            rows.append({**case, **measured})
    del base

  for row in rows:  # speedups against our bf16 engine and transformers at the same case
    for ref_engine, key in (("cometjax", "vs_our_bf16"), ("transformers", "vs_transformers")):
      ref = next((r for r in rows if r["engine"] == ref_engine and r["preset"] == "bf16"
                  and all(r[k] == row[k] for k in ("model_shape", "batch", "in_len", "out_len"))), None)
      row[key] = row["tokens_per_s"] / ref["tokens_per_s"] if ref else None
  out = pathlib.Path(args.out) if args.out else RESULTS / f"e2e_{device_tag()}{'_smoke' if args.smoke else ''}.json"
  report = {**run_metadata(), "smoke": args.smoke, "implementation": args.implementation, "rows": rows,
            "skipped": skipped}
  write_json(out, report)
  print(f"wrote {out}")
  print(f"{'shape':<10} {'engine':<13} {'preset':<9} {'batch':>5} {'in/out':>9} {'tok/s':>10} {'mem GB':>7} "
        f"{'vs bf16':>8} {'vs HF':>7}")
  for r in rows:
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"
    print(f"{r['model_shape']:<10} {r['engine']:<13} {r['preset']:<9} {r['batch']:>5} "
          f"{str(r['in_len']) + '/' + str(r['out_len']):>9} {r['tokens_per_s']:>10.1f} "
          f"{fmt(r['peak_mem_gb'], '7.2f'):>7} {fmt(r['vs_our_bf16'], '8.2f'):>8} {fmt(r['vs_transformers'], '7.2f'):>7}")
  return report


if __name__ == "__main__":
  main()
