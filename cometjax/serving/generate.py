"""Jitted prefill + decode with a preallocated KV cache, sampling, per-row stop at EOS.

Shapes are bucketed so that one compilation serves many requests: the prompt length is padded to
a power of two (at least 16), the cache length to a power of two holding prompt + new tokens, and the
decode loop is a `lax.while_loop` whose trip count (max_new_tokens) is a traced value. Prompts of
different lengths share a batch: each row keeps its own positions, so padding never enters attention.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cometjax.core.kv import KVQuantConfig
from cometjax.models.llama import hold_dequantized_weights, shared_input_groups
from cometjax.serving.kvcache import HeldKV4Cache, KV4Cache, create_cache, prefill_chunk
from cometjax.serving.limits import check_request


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
  """temperature 0 is greedy; top_k 0 and top_p 1.0 switch those filters off."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def filter_logits(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
  """logits: [B, V] float32 -> temperature-scaled logits, -inf outside top_k and the top_p nucleus."""
  logits = logits / sampling.temperature
  if sampling.top_k > 0:
    kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < sampling.top_p  # the smallest prefix whose mass reaches top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def sample_logits(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
  """logits: [B, V] float32 -> token ids [B] int32."""
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits, sampling), axis=-1).astype(jnp.int32)


def filter_logits_rows(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """`filter_logits` with one setting per row, as traced arrays (so a new setting never recompiles).

  logits: [B, V] float32; temperature [B] float32 (0 rows are left unscaled: the caller takes their argmax),
  top_k [B] int32 (0 = off), top_p [B] float32 (1.0 = off).
  """
  vocab = logits.shape[-1]
  logits = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V], descending
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth = jnp.take_along_axis(sorted_logits, (k - 1)[:, None], axis=-1)  # [B, 1]
  # masking below a threshold keeps the order, so the sorted top-k logits are the sorted logits masked
  sorted_logits = jnp.where(sorted_logits < kth, -jnp.inf, sorted_logits)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)
  cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < jnp.maximum(kth, cutoff), -jnp.inf, logits)


def sample_logits_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                       top_p: jax.Array) -> jax.Array:
  """logits: [B, V]; keys: [B] typed PRNG keys; the settings as in `filter_logits_rows` -> ids [B] int32.

  Rows with temperature 0 are greedy (argmax), whatever their key, top_k and top_p.
  """
  filtered = filter_logits_rows(logits, temperature, top_k, top_p)
  sampled = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, filtered)
  return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def bucket(n: int, minimum: int = 16) -> int:
  """The smallest power of two >= max(n, minimum)."""
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


# Incremented each time a step function is traced, i.e. compiled for a new shape bucket.
TRACE_COUNTS = {"prefill": 0, "decode": 0}


@dataclasses.dataclass(frozen=True)
class _Static:
  graphdef: nnx.GraphDef
  sampling: SamplingConfig
  eos_ids: tuple[int, ...]
  dequantize_weights: bool = False
  shared_inputs: tuple = ()  # `shared_input_groups` of the model, for the held decode loop
  dequantize_cache: bool = False  # the decode loop reads an INT4 cache through a float copy (HeldKV4Cache)


def forward_with_cache(model, tokens: jax.Array, lengths: jax.Array, cache):
  """Prefill into an empty cache: tokens [B, T] right-padded to T, lengths [B] -> (logits [B, T, V], cache);
  the logits at padding positions are meaningless.

  Padding positions are set to the cache length, which caches drop. A cache with a `prefill_chunk`
  (e.g. KV4 with per-channel K groups) is filled in chunks of that many tokens.
  """
  b, t = tokens.shape
  steps = jnp.arange(t, dtype=jnp.int32)
  positions = jnp.where(steps[None, :] < lengths[:, None], steps[None, :], cache.max_len)
  chunk = cache.prefill_chunk
  if chunk is None or chunk >= t:
    return model(tokens, positions=positions, cache=cache, causal_prefix=True)  # the cache starts empty
  if t % chunk:
    raise ValueError(f"prefill length {t} must be a multiple of the cache's prefill_chunk {chunk}")

  def step(cache, xs):
    chunk_tokens, chunk_positions = xs
    logits, cache = model(chunk_tokens, positions=chunk_positions, cache=cache)
    return cache, logits

  split = lambda x: x.reshape(b, t // chunk, chunk).swapaxes(0, 1)  # [n, B, chunk]
  cache, logits = jax.lax.scan(step, cache, (split(tokens), split(positions)))
  return logits.swapaxes(0, 1).reshape(b, t, -1), cache


def _prefill(static: _Static, state, tokens, lengths, cache, key):
  """tokens: [B, T] right-padded; lengths: [B] -> first sampled token [B] and the filled cache."""
  TRACE_COUNTS["prefill"] += 1
  model = nnx.merge(static.graphdef, state)
  if static.dequantize_weights:  # as the decode loop: float products of the dequantized operands
    hold_dequantized_weights(model, static.shared_inputs)
  logits, cache = forward_with_cache(model, tokens, lengths, cache)
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, V]
  return sample_logits(last, key, static.sampling), cache


def _decode(static: _Static, state, first, lengths, cache, key, max_new_tokens, out_len: int):
  """Runs up to max_new_tokens - 1 decode steps; returns out tokens [B, out_len] and counts [B]."""
  TRACE_COUNTS["decode"] += 1
  model = nnx.merge(static.graphdef, state)
  if static.dequantize_weights:  # XLA-run quantized weights dequantized once per call, not once per step
    hold_dequantized_weights(model, static.shared_inputs)
  if static.dequantize_cache and isinstance(cache, KV4Cache):
    cache = HeldKV4Cache.hold(cache)
  b = first.shape[0]
  eos = jnp.asarray(static.eos_ids or (-1,), jnp.int32)
  is_eos = lambda tok: jnp.any(tok[:, None] == eos[None, :], axis=-1)
  out = jnp.zeros((b, out_len), jnp.int32).at[:, 0].set(first)
  done = is_eos(first) if static.eos_ids else jnp.zeros((b,), bool)
  counts = jnp.ones((b,), jnp.int32)

  def cond(carry):
    step, _, _, done, _, _, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, token, out, done, counts, cache, key = carry
    sub = key
    if not static.sampling.greedy:  # greedy decode draws nothing: no per-step key split
      key, sub = jax.random.split(key)
    positions = (lengths + step - 1)[:, None]  # the position of `token`
    logits, cache = model(token[:, None], positions=positions, cache=cache)
    nxt = sample_logits(logits[:, 0], sub, static.sampling)
    nxt = jnp.where(done, 0, nxt)
    out = out.at[:, step].set(nxt)
    counts = counts + (~done).astype(jnp.int32)
    if static.eos_ids:
      done = done | is_eos(nxt)
    return step + 1, nxt, out, done, counts, cache, key

  carry = (jnp.int32(1), first, out, done, counts, cache, key)
  _, _, out, _, counts, _, _ = jax.lax.while_loop(cond, body, carry)
  return out, counts


_JITTED: dict[tuple[str, bool], Callable] = {}


def _jitted(name: str) -> Callable:
  """The jitted step; the cache buffer is donated where the backend supports donation (not CPU)."""
  donate = jax.default_backend() != "cpu"
  if (name, donate) not in _JITTED:
    fn, static = {"prefill": (_prefill, (0,)), "decode": (_decode, (0, 7))}[name]
    _JITTED[name, donate] = jax.jit(fn, static_argnums=static, donate_argnums=(4,) if donate else ())
  return _JITTED[name, donate]


@dataclasses.dataclass
class GenerateResult:
  tokens: list[list[int]]  # generated ids per prompt, ending with EOS where one was produced
  prefill_s: float
  decode_s: float
  prompt_tokens: int
  generated_tokens: int
  compiled: bool = False  # the timed call traced and compiled a new shape bucket (its timings include that)
  warmup_s: float | None = None  # the untimed warm-up call (compiling on a new bucket), when warmup=True

  @property
  def prefill_tokens_per_s(self) -> float:
    return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

  @property
  def decode_tokens_per_s(self) -> float:
    """Tokens produced by the decode loop (the first token of each row comes from prefill)."""
    decoded = self.generated_tokens - len(self.tokens)
    return decoded / self.decode_s if self.decode_s > 0 else float("nan")

  def timings(self) -> dict:
    return {"prefill_s": self.prefill_s, "decode_s": self.decode_s, "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens, "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s, "compiled": self.compiled,
            "warmup_s": self.warmup_s}


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             sampling: SamplingConfig = SamplingConfig(), key: jax.Array | None = None,
             stop_at_eos: bool = True, eos_ids: Sequence[int] | None = None,
             kv: KVQuantConfig | None = None, cache_dtype=None, truncate: str | None = None,
             warmup: bool = False, dequantize_weights: bool | None = None,
             dequantize_cache: bool | None = None) -> GenerateResult:
  """Generates up to `max_new_tokens` for each prompt (a list of token ids, at least one each).

  `kv` selects the KV cache: None is a float cache (model dtype, or `cache_dtype`), a `KVQuantConfig`
  an INT4 cache.

  Token ids outside the vocabulary, and a prompt + max_new_tokens longer than the model's context
  (config.max_position_embeddings), raise `InputError`; truncate="left" drops the oldest prompt tokens instead.

  `key` is required when sampling (temperature > 0). The first call for a new shape bucket compiles
  (seconds; `compiled` is then True and the timings include it). `warmup=True` first runs the same call
  untimed (its wall time in `warmup_s`), so the timings are steady-state speed.

  dequantize_weights (default: True on a CPU): prefill and the decode loop hold each XLA-run quantized weight
  dequantized (`DequantizedWeight`, once per call) and multiply dequantized operands in float32, several
  times faster on a CPU; the tokens then equal the integer path's up to float32 rounding (False: the integer
  path, bit for bit, as the serving engine runs it).

  dequantize_cache (default: True on a CPU): with an INT4 cache, the decode loop also keeps the keys and
  values as attention reads them in a float copy (`HeldKV4Cache`), so no step dequantizes the attended
  prefix again: the same values, at the cost of a float cache's memory beside the INT4 one (False: reads
  dequantize the INT4 cache, as the serving engine does).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("prompts must be a non-empty list of non-empty token-id lists (start from [bos_id])")
  if not sampling.greedy and key is None:
    raise ValueError("key (a jax.random key) is required when sampling with temperature > 0")
  key = jax.random.key(0) if key is None else key
  config = model.config
  prompts = check_request(config, prompts, max_new_tokens, truncate=truncate)
  lengths = np.array([len(p) for p in prompts], np.int32)
  chunk = prefill_chunk(kv)
  prompt_len = round_up(bucket(int(lengths.max())), chunk)
  cache_len = round_up(bucket(prompt_len + max_new_tokens), chunk)
  if eos_ids is None:
    eos_ids = config.eos_token_ids if stop_at_eos else ()
  tokens = np.zeros((len(prompts), prompt_len), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p

  graphdef, state = nnx.split(model)
  if dequantize_weights is None:
    dequantize_weights = jax.default_backend() == "cpu"
  shared = shared_input_groups(model) if dequantize_weights else ()
  if dequantize_cache is None:
    dequantize_cache = jax.default_backend() == "cpu"
  static = _Static(graphdef, sampling, tuple(int(e) for e in eos_ids), bool(dequantize_weights), shared,
                   bool(dequantize_cache) and kv is not None)
  prefill_key, decode_key = jax.random.split(key)
  lengths_j = jnp.asarray(lengths)

  def run():
    # donated off CPU: one per call; its page table is never replaced, so reads need no gather
    cache = create_cache(kv, config, len(prompts), cache_len, dtype=cache_dtype, contiguous=True)
    start = time.perf_counter()
    first, filled = _jitted("prefill")(static, state, jnp.asarray(tokens), lengths_j, cache, prefill_key)
    first.block_until_ready()
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    out, counts = _jitted("decode")(static, state, first, lengths_j, filled, decode_key,
                                    jnp.int32(max_new_tokens), cache_len - prompt_len)
    out = np.asarray(out)
    return out, np.asarray(counts), prefill_s, time.perf_counter() - start

  warmup_s = None
  if warmup:
    start = time.perf_counter()
    run()
    warmup_s = time.perf_counter() - start
  traces = sum(TRACE_COUNTS.values())
  out, counts, prefill_s, decode_s = run()
  generated = [out[i, :counts[i]].tolist() for i in range(len(prompts))]
  return GenerateResult(tokens=generated, prefill_s=prefill_s, decode_s=decode_s,
                        prompt_tokens=int(lengths.sum()), generated_tokens=int(counts.sum()),
                        compiled=sum(TRACE_COUNTS.values()) > traces, warmup_s=warmup_s)
