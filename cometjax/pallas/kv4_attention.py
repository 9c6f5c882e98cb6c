"""Attention over an INT4 K/V cache (Pallas Triton backend), flash-decoding style.

T query tokens per sequence (T = 1: decode; T > 1: prefill / chunked prefill, causal), grouped-query
heads, a `QuantizedKV` cache (asymmetric INT4 per token, per KV head, per head_dim group; layout in
`cometjax.core.kv`) and a valid length per batch row. The queries are the last T positions of each row:
query t of row b sits at position lengths[b] - T + t and sees keys at positions <= its own.

Grid: (batch, kv_head, row_block, k_split). The T x G query rows of one KV head (G = query heads per
KV head; row r is query r // G, head r % G) are cut into blocks of block_h rows; a program walks its
1/k_splits share of the cache in tiles of block_k tokens with an online softmax, stopping at the last
key its rows can see, and writes an unnormalized partial output plus its running max and sum; the
wrapper merges the splits.

K/V bytes are dequantized in registers: code = nibble, value = (code - zero) * scale. Byte j holds
head_dim channels 2j (low nibble) and 2j+1 (high nibble), so the query is split into even / odd
channels once in the wrapper, each group of head_dim is two dots (even, odd) and the output is
interleaved back at the end. Tiles that start past a row's length are skipped.

The compiled kernel needs S % 16 == 0 and head_dim groups of >= 32 channels (`decode_supported`).

`kv4_attention_reference` is the plain-jnp twin (dequantize, then attend in f32).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from cometjax.core.kv import QuantizedKV, dequantize_kv
from cometjax.pallas.online_softmax import accumulate_values, merge_splits, online_softmax_step

MIN_BLOCK_K = 16  # Triton dots need >= 16 along every dimension


@dataclasses.dataclass(frozen=True)
class KV4AttentionTuning:
  """Tiles and launch knobs; `resolve` fits them to a cache length."""

  block_h: int | None = None  # query rows per program; None: max(16, min(64, next_pow2(T * G)))
  block_k: int = 128
  k_splits: int = 16
  num_warps: int = 4
  num_stages: int = 2

  def resolve(self, cache_len: int, query_rows: int) -> KV4AttentionTuning:
    """query_rows = T * G; shrinks block_k / k_splits to divide the cache length."""
    for name in ("block_h", "block_k", "k_splits"):
      value = getattr(self, name)
      if value is not None and (value <= 0 or value & (value - 1)):
        raise ValueError(f"{name} must be a positive power of two, got {value}")
    block_h = self.block_h
    if block_h is None:
      block_h = max(16, min(64, pl.next_power_of_2(query_rows)))
    block_k = self.block_k
    while cache_len % block_k and block_k > MIN_BLOCK_K:
      block_k //= 2
    if cache_len % block_k:
      raise ValueError(f"the cache length S={cache_len} must be a multiple of {MIN_BLOCK_K} for the "
                       "kv4 attention kernel")
    k_splits = min(self.k_splits, cache_len // block_k)
    while cache_len % (k_splits * block_k):
      k_splits //= 2
    return dataclasses.replace(self, block_h=block_h, block_k=block_k, k_splits=k_splits)


def kernel_supported(kv: QuantizedKV) -> bool:
  """Whether the kernel can run on this cache: S % 16 == 0 and head_dim groups of >= 32 channels."""
  return kv.k.shape[1] % MIN_BLOCK_K == 0 and kv.group_size // 2 >= MIN_BLOCK_K


def _kv4_attention_kernel(
    q_even_ref,  # [block_h, D // 2]
    q_odd_ref,  # [block_h, D // 2]
    k_ref,  # [split_len, D // 2] uint8
    v_ref,  # [split_len, D // 2] uint8
    k_scale_ref,  # [split_len, groups]
    k_zero_ref,  # [split_len, groups]
    v_scale_ref,  # [split_len, groups]
    v_zero_ref,  # [split_len, groups]
    length_ref,  # [] int32
    out_even_ref,  # [block_h, D // 2] f32, unnormalized
    out_odd_ref,  # [block_h, D // 2] f32, unnormalized
    max_ref,  # [block_h] f32
    sum_ref,  # [block_h] f32
    *,
    sm_scale: float,
    block_k: int,
    group_heads: int,
    num_queries: int,
    compute_dtype,
):
  block_h, _ = q_even_ref.shape
  split_len, _ = k_ref.shape
  num_groups = k_scale_ref.shape[1]
  group_half = q_even_ref.shape[1] // num_groups  # bytes (= channel pairs) per head_dim group
  split_start = pl.program_id(3) * split_len
  length = length_ref[()]
  first_row = pl.program_id(2) * block_h
  row_ids = first_row + lax.broadcasted_iota(jnp.int32, (block_h, 1), 0)
  query_pos = length - num_queries + row_ids // group_heads  # [block_h, 1]
  last_query_pos = length - num_queries + (first_row + block_h - 1) // group_heads
  keys_seen = jnp.minimum(length, last_query_pos + 1)  # keys [0, keys_seen) matter to this block
  num_tiles = jnp.clip(pl.cdiv(keys_seen - split_start, block_k), 0, split_len // block_k)

  group_cols = [pl.ds(g * group_half, group_half) for g in range(num_groups)]
  q_even = [q_even_ref[:, cols].astype(compute_dtype) for cols in group_cols]  # [block_h, group_half]
  q_odd = [q_odd_ref[:, cols].astype(compute_dtype) for cols in group_cols]

  def dequantize(codes_ref, scale_ref, zero_ref, rows, g):  # -> even, odd [block_k, group_half]
    packed = codes_ref[rows, group_cols[g]].astype(jnp.int32)
    scale = scale_ref[rows, g][:, None]
    zero = zero_ref[rows, g][:, None]
    even = ((packed & 0xF).astype(jnp.float32) - zero) * scale
    odd = ((packed >> 4).astype(jnp.float32) - zero) * scale
    return even.astype(compute_dtype), odd.astype(compute_dtype)

  def dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)

  def body(t, carry):
    max_prev, sum_prev, outs = carry
    rows = pl.ds(t * block_k, block_k)
    logits = jnp.zeros((block_h, block_k), jnp.float32)
    for g in range(num_groups):
      k_even, k_odd = dequantize(k_ref, k_scale_ref, k_zero_ref, rows, g)
      logits += dot(q_even[g], k_even.T) + dot(q_odd[g], k_odd.T)
    positions = split_start + t * block_k + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    valid = (positions < length) & (positions <= query_pos)  # [block_h, block_k]
    max_next, sum_next, correction, probs = online_softmax_step(max_prev, sum_prev, logits, valid, sm_scale)
    probs = probs.astype(compute_dtype)
    values = [dequantize(v_ref, v_scale_ref, v_zero_ref, rows, g) for g in range(num_groups)]
    return max_next, sum_next, accumulate_values(outs, correction, probs, values, dot)

  init = (jnp.full((block_h,), jnp.finfo(jnp.float32).min, jnp.float32),
          jnp.zeros((block_h,), jnp.float32),
          tuple(jnp.zeros((block_h, group_half), jnp.float32) for _ in range(2 * num_groups)))
  max_i, sum_i, outs = lax.fori_loop(0, num_tiles, body, init)
  for g, cols in enumerate(group_cols):
    out_even_ref[:, cols] = outs[2 * g]
    out_odd_ref[:, cols] = outs[2 * g + 1]
  max_ref[...] = max_i
  sum_ref[...] = sum_i


def _check_inputs(q, kv: QuantizedKV, lengths):
  if not isinstance(kv, QuantizedKV):
    raise ValueError(f"kv must be a QuantizedKV, got {type(kv).__name__}")
  kv.check_arrays()
  batch, _, kv_heads, _ = kv.k.shape
  if q.shape[0] != batch or q.shape[-1] != kv.head_dim:
    raise ValueError(f"q must be [B={batch}, ..., D={kv.head_dim}] to match the cache, got {q.shape}")
  if q.shape[-2] % kv_heads:
    raise ValueError(f"query heads ({q.shape[-2]}) must be a multiple of kv heads ({kv_heads})")
  if tuple(lengths.shape) != (batch,):
    raise ValueError(f"lengths must be int32 [B={batch}], got shape {list(lengths.shape)}")


@functools.partial(
    jax.jit,
    static_argnames=["sm_scale", "block_h", "block_k", "k_splits", "num_warps", "num_stages",
                     "interpret"],
)
def kv4_attention(
    q,  # [B, T, Hq, D] bf16/f32: the last T positions of each row
    kv: QuantizedKV,  # [B, S, Hkv, ...], the T new tokens already written
    lengths,  # [B] int32: valid cache tokens per row, the T query tokens included
    *,
    sm_scale: float | None = None,
    block_h: int | None = KV4AttentionTuning.block_h,
    block_k: int = KV4AttentionTuning.block_k,
    k_splits: int = KV4AttentionTuning.k_splits,
    num_warps: int = KV4AttentionTuning.num_warps,
    num_stages: int = KV4AttentionTuning.num_stages,
    interpret: bool = False,
) -> jax.Array:  # [B, T, Hq, D] q.dtype
  """Causal GQA attention over an INT4 cache; a query that sees no key gives zeros."""
  if q.ndim != 4:
    raise ValueError(f"q must be [B, T, Hq, D], got shape {q.shape}")
  lengths = jnp.asarray(lengths, jnp.int32)
  _check_inputs(q, kv, lengths)
  if kv.group_size // 2 < MIN_BLOCK_K and not interpret:
    raise ValueError(f"the compiled kernel needs head_dim groups of >= {2 * MIN_BLOCK_K} channels, "
                     f"got group_size={kv.group_size}")
  batch, num_queries, q_heads, head_dim = q.shape
  _, cache_len, kv_heads, half = kv.k.shape
  num_groups = kv.k_scale.shape[-1]
  group_heads = q_heads // kv_heads
  query_rows = num_queries * group_heads
  sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
  tuning = KV4AttentionTuning(block_h, block_k, k_splits, num_warps, num_stages).resolve(
      cache_len, query_rows)
  bh, splits = tuning.block_h, tuning.k_splits
  padded_rows = pl.cdiv(query_rows, bh) * bh
  split_len = cache_len // splits
  compute_dtype = jnp.bfloat16 if q.dtype == jnp.bfloat16 else jnp.float32

  q_rows = q.reshape(batch, num_queries, kv_heads, group_heads, head_dim).transpose(0, 2, 1, 3, 4)
  q_rows = q_rows.reshape(batch, kv_heads, query_rows, head_dim)  # row = t * G + g
  q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, padded_rows - query_rows), (0, 0)))
  q_even, q_odd = q_rows[..., 0::2], q_rows[..., 1::2]  # [B, Hkv, rows, D // 2]

  q_spec = pl.BlockSpec((None, None, bh, half), lambda b, h, r, s: (b, h, r, 0))
  codes_spec = pl.BlockSpec((None, split_len, None, half), lambda b, h, r, s: (b, s, h, 0))
  scale_spec = pl.BlockSpec((None, split_len, None, num_groups), lambda b, h, r, s: (b, s, h, 0))
  out_spec = pl.BlockSpec((None, None, None, bh, half), lambda b, h, r, s: (b, h, s, r, 0))
  stat_spec = pl.BlockSpec((None, None, None, bh), lambda b, h, r, s: (b, h, s, r))
  partial_shape = jax.ShapeDtypeStruct((batch, kv_heads, splits, padded_rows, half), jnp.float32)
  stat_shape = jax.ShapeDtypeStruct((batch, kv_heads, splits, padded_rows), jnp.float32)
  kernel = functools.partial(_kv4_attention_kernel, sm_scale=sm_scale, block_k=tuning.block_k,
                             group_heads=group_heads, num_queries=num_queries, compute_dtype=compute_dtype)
  out_even, out_odd, maxes, sums = pl.pallas_call(
      kernel,
      grid=(batch, kv_heads, padded_rows // bh, splits),
      in_specs=[q_spec, q_spec, codes_spec, codes_spec, scale_spec, scale_spec, scale_spec, scale_spec,
                pl.BlockSpec((None,), lambda b, h, r, s: (b,))],
      out_specs=[out_spec, out_spec, stat_spec, stat_spec],
      out_shape=[partial_shape, partial_shape, stat_shape, stat_shape],
      compiler_params=plgpu.CompilerParams(num_warps=tuning.num_warps, num_stages=tuning.num_stages),
      interpret=interpret,
      name="kv4_attention",
  )(q_even, q_odd, kv.k, kv.v, kv.k_scale, kv.k_zero, kv.v_scale, kv.v_zero, lengths)

  # Merge the k splits (flash-decoding's final reduction).
  out = merge_splits(maxes, sums, out_even, out_odd)  # [B, Hkv, padded_rows, D]
  out = out[:, :, :query_rows].reshape(batch, kv_heads, num_queries, group_heads, head_dim)
  return out.transpose(0, 2, 1, 3, 4).reshape(batch, num_queries, q_heads, head_dim).astype(q.dtype)


def kv4_decode_attention(
    q,  # [B, Hq, D] bf16/f32
    kv: QuantizedKV,  # [B, S, Hkv, ...]
    lengths,  # [B] int32: valid cache tokens per row (keys at positions >= length are ignored)
    **tuning,
) -> jax.Array:  # [B, Hq, D] q.dtype
  """Single-token decode: `kv4_attention` with T = 1 (same knobs); rows with length 0 give zeros."""
  if q.ndim != 3:
    raise ValueError(f"q must be [B, Hq, D] (one token per row), got shape {q.shape}")
  return kv4_attention(q[:, None], kv, lengths, **tuning)[:, 0]


@functools.partial(jax.jit, static_argnames=["sm_scale"])
def kv4_attention_reference(
    q,  # [B, T, Hq, D]: the last T positions of each row (T = 1 for decode)
    kv: QuantizedKV,  # [B, S, Hkv, ...]
    lengths,  # [B] int32: valid cache tokens per row, the T query tokens included
    sm_scale: float | None = None,
) -> jax.Array:  # [B, T, Hq, D] q.dtype
  """Causal GQA attention on the dequantized cache in f32; query t of row b sits at lengths[b] - T + t."""
  if q.ndim != 4:
    raise ValueError(f"q must be [B, T, Hq, D], got shape {q.shape}")
  lengths = jnp.asarray(lengths, jnp.int32)
  _check_inputs(q, kv, lengths)
  batch, num_queries, q_heads, head_dim = q.shape
  cache_len, kv_heads = kv.k.shape[1], kv.k.shape[2]
  sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
  keys, values = dequantize_kv(kv)  # f32 [B, S, Hkv, D]
  q_grouped = q.astype(jnp.float32).reshape(batch, num_queries, kv_heads, q_heads // kv_heads, head_dim)
  logits = jnp.einsum("btkgd,bskd->bkgts", q_grouped, keys) * sm_scale
  query_pos = lengths[:, None] - num_queries + jnp.arange(num_queries)[None, :]  # [B, T]
  key_pos = jnp.arange(cache_len)
  visible = (key_pos[None, None, :] <= query_pos[:, :, None]) & (key_pos[None, None, :] < lengths[:, None, None])
  visible = visible[:, None, None]  # [B, 1, 1, T, S]
  logits = jnp.where(visible, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.where(visible, jnp.exp(logits - row_max), 0.0)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  weights = weights / jnp.where(total > 0, total, 1.0)
  out = jnp.einsum("bkgts,bskd->btkgd", weights, values)
  return out.reshape(batch, num_queries, q_heads, head_dim).astype(q.dtype)
