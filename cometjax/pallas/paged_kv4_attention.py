"""Decode attention over one layer of a paged INT4 cache (`cometjax.core.kv.PagedKV4`), Pallas Triton backend.

One query token per batch row (decode), grouped-query heads, read straight from the layer's page pool
through its page table (no dequantized copy of the layer is ever built). The query
of row b sits at position lengths[b] - 1 and sees keys at positions < lengths[b].

Grid: (batch, kv_head, row_block, split). The G query heads of one KV head (padded to block_h rows) are
one row block for usual GQA ratios. The row's logical pages are cut into `num_splits` partitions
(flash-decoding); a program walks its partition in tiles of `pages_per_block` pages: it loads the tile's
physical page ids from the page table, gathers those pages' codes and scales, unpacks the INT4 nibbles
by shifts, dequantizes in registers (value = (code - zero) * scale) and runs an online softmax. It
writes an unnormalized partial output with its running max and sum; the wrapper merges the splits.

The cache layouts (see `cometjax.core.kv`):
- V, and K in "token" / "hadamard" mode: asymmetric per token, per KV head, per group of head_group
  channels; scales [P, page, groups]. Byte j holds channels 2j (low nibble) and 2j+1 (high nibble), so
  the wrapper splits q into even / odd channels once and every group is two dots.
- "hadamard": keys were stored rotated, k_stored = k @ H (H symmetric orthonormal); attention sees
  k_stored @ H, and q . (k_stored @ H) = (q @ H) . k_stored, so the wrapper rotates q instead.
- "channel" (KIVI): closed K groups are pages with per-channel scale / zero [P, D]; the group holding
  the newest token, logical page (length - 1) // page, is still open and exact in `k_recent`
  [B, page, Hkv, D] f32. Channel mode has one extra split (the last) that attends to that open group:
  keys from `k_recent`, values from the open page of the pool. The other splits stop before it.

Each layer's pool is its own array, so no per-layer slice is copied before the kernel.

The compiled kernel needs a power-of-two page size and head_dim, and head_dim groups of >= 32
channels (`kernel_supported`); interpret mode takes any cache.

`paged_kv4_attention_reference` is the plain-jnp twin: gather the row's pages, dequantize, softmax.
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

from cometjax.core.kv import PagedKV4
from cometjax.core.rotations import hadamard_orthonormal
from cometjax.pallas.common import is_power_of_two
from cometjax.pallas.online_softmax import accumulate_values, merge_splits, online_softmax_step

MIN_DOT = 16  # Triton dots need >= 16 along every dimension
DEFAULT_BLOCK_TOKENS = 64  # tokens per tile when pages_per_block is None


@dataclasses.dataclass(frozen=True)
class PagedKV4AttentionTuning:
  """Tiles and launch knobs; `resolve` fits them to a cache."""

  block_h: int | None = None  # query heads per program; None: max(16, min(64, next_pow2(G)))
  pages_per_block: int | None = None  # pages per tile; None: DEFAULT_BLOCK_TOKENS // page_size (>= 1)
  num_splits: int = 8  # partitions of the page range (flash-decoding); fewer when pages are few
  num_warps: int = 4
  num_stages: int = 2

  def resolve(self, pages_per_row: int, page_size: int, group_heads: int,
              compiled: bool) -> tuple[PagedKV4AttentionTuning, int]:
    """-> (tuning with every field set, pages per split); the splits cover >= pages_per_row pages."""
    for name in ("block_h", "pages_per_block"):
      value = getattr(self, name)
      if value is not None and not is_power_of_two(value):
        raise ValueError(f"{name} must be a positive power of two, got {value}")
    if self.num_splits < 1:
      raise ValueError(f"num_splits must be >= 1, got {self.num_splits}")
    block_h = self.block_h or max(MIN_DOT, min(64, pl.next_power_of_2(group_heads)))
    pages_per_block = self.pages_per_block or max(1, DEFAULT_BLOCK_TOKENS // page_size)
    pages_per_block = min(pages_per_block, pl.next_power_of_2(pages_per_row))
    if compiled:  # a tile must hold >= 16 tokens for the dots
      pages_per_block = max(pages_per_block, pl.cdiv(MIN_DOT, page_size))
    num_splits = min(self.num_splits, pl.cdiv(pages_per_row, pages_per_block))
    pages_per_split = pl.cdiv(pl.cdiv(pages_per_row, num_splits), pages_per_block) * pages_per_block
    num_splits = pl.cdiv(pages_per_row, pages_per_split)  # drop splits that would hold no page
    tuning = dataclasses.replace(self, block_h=block_h, pages_per_block=pages_per_block, num_splits=num_splits)
    return tuning, pages_per_split


def kernel_supported(kv: PagedKV4) -> bool:
  """Whether the compiled kernel can tile this cache: power-of-two page size and head_dim, and head_dim
  groups of >= 32 channels (power of two)."""
  return (is_power_of_two(kv.page_size) and is_power_of_two(kv.head_dim) and is_power_of_two(kv.head_group)
          and kv.head_group // 2 >= MIN_DOT)


def _paged_kv4_attention_kernel(
    q_even_ref,  # [block_h, D // 2]
    q_odd_ref,  # [block_h, D // 2]
    table_ref,  # [pages_padded] int32: this row's physical page per logical page
    length_ref,  # [] int32
    k_ref,  # [P, page, D // 2] uint8
    k_scale_ref,  # token modes: [P, page, groups]; channel: [P, D // 2, 2] (even, odd channel)
    k_zero_ref,  # like k_scale_ref
    v_ref,  # [P, page, D // 2] uint8
    v_scale_ref,  # [P, page, groups]
    v_zero_ref,  # [P, page, groups]
    *refs,  # channel: recent_ref [page, D // 2, 2] f32; then out_even, out_odd, max, sum
    sm_scale: float,
    pages_per_block: int,
    pages_per_split: int,
    num_splits: int,
    channel: bool,
    compute_dtype,
):
  if channel:
    recent_ref, out_even_ref, out_odd_ref, max_ref, sum_ref = refs
  else:
    out_even_ref, out_odd_ref, max_ref, sum_ref = refs
  block_h, half = q_even_ref.shape
  page_size = k_ref.shape[1]
  num_groups = v_scale_ref.shape[-1]
  group_half = half // num_groups  # bytes (= channel pairs) per head_dim group
  v_cols = [pl.ds(g * group_half, group_half) for g in range(num_groups)]
  k_cols = [pl.ds(0, half)] if channel else v_cols  # channel-mode K scales are per channel: one group
  split = pl.program_id(3)
  length = length_ref[()]
  if channel:
    open_page = jnp.maximum(length - 1, 0) // page_size  # logical page of the newest token's group
    limit = open_page * page_size  # the splits below see the closed groups only
  else:
    limit = length
  first_page = split * pages_per_split
  pages_left = jnp.clip(pl.cdiv(limit, page_size) - first_page, 0, pages_per_split)
  num_tiles = pl.cdiv(pages_left, pages_per_block)

  q_even = [q_even_ref[:, cols].astype(compute_dtype) for cols in k_cols]  # [block_h, width]
  q_odd = [q_odd_ref[:, cols].astype(compute_dtype) for cols in k_cols]

  def flat(x):  # [n, page, width] -> [n * page, width]
    return x.reshape(x.shape[0] * x.shape[1], x.shape[2]).astype(compute_dtype)

  def dequantize_tokens(codes_ref, scale_ref, zero_ref, pages, g):  # -> even, odd [n * page, width]
    packed = codes_ref[pages, :, v_cols[g]].astype(jnp.int32)  # [n, page, width]
    scale = scale_ref[pages, :, g][..., None]  # [n, page, 1]
    zero = zero_ref[pages, :, g][..., None]
    even = ((packed & 0xF).astype(jnp.float32) - zero) * scale
    odd = ((packed >> 4).astype(jnp.float32) - zero) * scale
    return flat(even), flat(odd)

  def dequantize_channel_keys(pages):  # -> even, odd [n * page, D // 2]
    packed = k_ref[pages, :, :].astype(jnp.int32)  # [n, page, D // 2]
    scale_even, scale_odd = (k_scale_ref[pages, :, i][:, None, :] for i in (0, 1))  # [n, 1, D // 2]
    zero_even, zero_odd = (k_zero_ref[pages, :, i][:, None, :] for i in (0, 1))
    even = ((packed & 0xF).astype(jnp.float32) - zero_even) * scale_even
    odd = ((packed >> 4).astype(jnp.float32) - zero_odd) * scale_odd
    return flat(even), flat(odd)

  def dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)

  def attend(carry, keys, pages, first_position, visible):
    """One online-softmax step over the tile's tokens; keys: [(even, odd) [n_tok, width]] per K group."""
    max_prev, sum_prev, outs = carry
    logits = jnp.zeros((block_h, keys[0][0].shape[0]), jnp.float32)
    for g, (k_even, k_odd) in enumerate(keys):
      logits += dot(q_even[g], k_even.T) + dot(q_odd[g], k_odd.T)
    positions = first_position + lax.broadcasted_iota(jnp.int32, (1, logits.shape[1]), 1)
    valid = positions < visible  # [1, n_tok]
    max_next, sum_next, correction, probs = online_softmax_step(max_prev, sum_prev, logits, valid, sm_scale)
    probs = probs.astype(compute_dtype)
    values = [dequantize_tokens(v_ref, v_scale_ref, v_zero_ref, pages, g) for g in range(num_groups)]
    return max_next, sum_next, accumulate_values(outs, correction, probs, values, dot)

  def closed_tile(t, carry):
    start = first_page + t * pages_per_block
    pages = jnp.maximum(table_ref[pl.ds(start, pages_per_block)], 0)  # [pages_per_block] physical
    if channel:
      keys = [dequantize_channel_keys(pages)]
    else:
      keys = [dequantize_tokens(k_ref, k_scale_ref, k_zero_ref, pages, g) for g in range(num_groups)]
    return attend(carry, keys, pages, start * page_size, limit)

  init = (jnp.full((block_h,), jnp.finfo(jnp.float32).min, jnp.float32),
          jnp.zeros((block_h,), jnp.float32),
          tuple(jnp.zeros((block_h, group_half), jnp.float32) for _ in range(2 * num_groups)))
  carry = lax.fori_loop(0, num_tiles, closed_tile, init)

  if channel:  # the last split: the open group, keys exact from k_recent, values from the pool
    def open_tile(_, carry):
      page = jnp.maximum(table_ref[pl.ds(open_page, 1)], 0)  # [1] physical
      keys = [(recent_ref[:, :, 0].astype(compute_dtype), recent_ref[:, :, 1].astype(compute_dtype))]
      return attend(carry, keys, page, open_page * page_size, length)

    has_open = (split == num_splits) & (length > 0)
    carry = lax.fori_loop(0, jnp.where(has_open, 1, 0), open_tile, carry)

  max_i, sum_i, outs = carry
  for g, cols in enumerate(v_cols):
    out_even_ref[:, cols] = outs[2 * g]
    out_odd_ref[:, cols] = outs[2 * g + 1]
  max_ref[...] = max_i
  sum_ref[...] = sum_i



def _check_inputs(q, kv: PagedKV4, lengths) -> None:
  if not isinstance(kv, PagedKV4):
    raise ValueError(f"kv must be a PagedKV4 (one layer of a paged INT4 cache), got {type(kv).__name__}")
  _, _, kv_heads, half = kv.k.shape
  batch = kv.page_table.shape[0]
  if q.ndim != 3:
    raise ValueError(f"q must be [B, Hq, D] (one token per row), got shape {q.shape}")
  if q.shape[0] != batch or q.shape[2] != 2 * half:
    raise ValueError(f"q must be [B={batch}, Hq, D={2 * half}] to match the cache, got {q.shape}")
  if q.shape[1] % kv_heads:
    raise ValueError(f"q's heads ({q.shape[1]}) must be a multiple of the cache's kv heads ({kv_heads})")
  if not jnp.issubdtype(q.dtype, jnp.floating):
    raise ValueError(f"q must be a float array, got {q.dtype}")
  if lengths is not None and tuple(lengths.shape) != (batch,):
    raise ValueError(f"lengths must be int32 [B={batch}], got shape {list(lengths.shape)}")


def _lengths(kv: PagedKV4, lengths) -> jax.Array:
  """lengths [B] int32 clipped to [0, max_len]; None: the layer's own written length."""
  lengths = kv.length if lengths is None else jnp.asarray(lengths)
  return jnp.clip(lengths.astype(jnp.int32), 0, kv.max_len)


def _pool_operands(kv: PagedKV4, channel: bool) -> tuple[list, list]:
  """(arrays, BlockSpecs) of the pool, in the kernel's argument order after the page table and length."""
  num_pages, page_size, _, half = kv.k.shape
  num_groups = kv.v_scale.shape[-1]
  codes_spec = pl.BlockSpec((num_pages, page_size, None, half), lambda b, h, r, s: (0, 0, h, 0))
  token_scale_spec = pl.BlockSpec((num_pages, page_size, None, num_groups), lambda b, h, r, s: (0, 0, h, 0))
  inputs, specs = [kv.k], [codes_spec]
  if channel:  # [P, Hkv, D] viewed as [P, Hkv, D // 2, 2]: a free reshape, (even, odd) last
    channel_view = lambda x: x.reshape(*x.shape[:-1], half, 2)
    inputs += [channel_view(kv.k_scale), channel_view(kv.k_zero)]
    specs += 2 * [pl.BlockSpec((num_pages, None, half, 2), lambda b, h, r, s: (0, h, 0, 0))]
  else:
    inputs += [kv.k_scale, kv.k_zero]
    specs += [token_scale_spec, token_scale_spec]
  inputs += [kv.v, kv.v_scale, kv.v_zero]
  specs += [codes_spec, token_scale_spec, token_scale_spec]
  if channel:
    inputs.append(kv.k_recent.reshape(*kv.k_recent.shape[:-1], half, 2))  # [B, page, Hkv, D // 2, 2]
    specs.append(pl.BlockSpec((None, page_size, None, half, 2), lambda b, h, r, s: (b, 0, h, 0, 0)))
  return inputs, specs


@functools.partial(
    jax.jit,
    static_argnames=["sm_scale", "block_h", "pages_per_block", "num_splits", "num_warps", "num_stages",
                     "interpret"],
)
def paged_kv4_attention(
    q,  # [B, Hq, D] bf16/f32: the newest token of each row
    kv: PagedKV4,  # pool [P, page, Hkv, ...]; the query's own key/value already written
    lengths=None,  # [B] int32: visible keys per row (query at lengths - 1); None: kv.length
    *,
    sm_scale: float | None = None,
    block_h: int | None = PagedKV4AttentionTuning.block_h,
    pages_per_block: int | None = PagedKV4AttentionTuning.pages_per_block,
    num_splits: int = PagedKV4AttentionTuning.num_splits,
    num_warps: int = PagedKV4AttentionTuning.num_warps,
    num_stages: int = PagedKV4AttentionTuning.num_stages,
    interpret: bool = False,
) -> jax.Array:  # [B, Hq, D] q.dtype
  """GQA decode attention over one layer of a paged INT4 cache; a row with length 0 gives zeros."""
  _check_inputs(q, kv, lengths)
  if not interpret and not kernel_supported(kv):
    raise ValueError("the compiled kernel needs a power-of-two page_size and head_dim and head_group >= 32 "
                     f"(page_size={kv.page_size}, head_dim={kv.head_dim}, head_group={kv.head_group}); use "
                     "interpret=True or the reference")
  lengths = _lengths(kv, lengths)
  batch, q_heads, head_dim = q.shape
  _, page_size, kv_heads, half = kv.k.shape
  pages_per_row = kv.page_table.shape[1]
  group_heads = q_heads // kv_heads
  channel = kv.config.k_mode == "channel"
  sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
  tuning, pages_per_split = PagedKV4AttentionTuning(block_h, pages_per_block, num_splits, num_warps,
                                                    num_stages).resolve(pages_per_row, page_size, group_heads,
                                                                        compiled=not interpret)
  bh, splits = tuning.block_h, tuning.num_splits
  padded_rows = pl.cdiv(group_heads, bh) * bh
  grid_splits = splits + int(channel)  # channel mode: one more program for the open group
  compute_dtype = jnp.bfloat16 if q.dtype == jnp.bfloat16 else jnp.float32

  if kv.config.k_mode == "hadamard":
    q = (q.astype(jnp.float32) @ hadamard_orthonormal(head_dim)).astype(q.dtype)
  q_rows = q.reshape(batch, kv_heads, group_heads, head_dim)  # head = kv_head * G + g
  q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, padded_rows - group_heads), (0, 0)))
  q_even, q_odd = q_rows[..., 0::2], q_rows[..., 1::2]  # [B, Hkv, rows, D // 2]
  table = jnp.pad(kv.page_table, ((0, 0), (0, splits * pages_per_split - pages_per_row)))

  q_spec = pl.BlockSpec((None, None, bh, half), lambda b, h, r, s: (b, h, r, 0))
  table_spec = pl.BlockSpec((None, table.shape[1]), lambda b, h, r, s: (b, 0))
  length_spec = pl.BlockSpec((None,), lambda b, h, r, s: (b,))
  pool_inputs, pool_specs = _pool_operands(kv, channel)
  out_spec = pl.BlockSpec((None, None, None, bh, half), lambda b, h, r, s: (b, h, s, r, 0))
  stat_spec = pl.BlockSpec((None, None, None, bh), lambda b, h, r, s: (b, h, s, r))
  partial_shape = jax.ShapeDtypeStruct((batch, kv_heads, grid_splits, padded_rows, half), jnp.float32)
  stat_shape = jax.ShapeDtypeStruct((batch, kv_heads, grid_splits, padded_rows), jnp.float32)
  kernel = functools.partial(_paged_kv4_attention_kernel, sm_scale=sm_scale,
                             pages_per_block=tuning.pages_per_block, pages_per_split=pages_per_split,
                             num_splits=splits, channel=channel, compute_dtype=compute_dtype)
  out_even, out_odd, maxes, sums = pl.pallas_call(
      kernel,
      grid=(batch, kv_heads, padded_rows // bh, grid_splits),
      in_specs=[q_spec, q_spec, table_spec, length_spec] + pool_specs,
      out_specs=[out_spec, out_spec, stat_spec, stat_spec],
      out_shape=[partial_shape, partial_shape, stat_shape, stat_shape],
      compiler_params=plgpu.CompilerParams(num_warps=tuning.num_warps, num_stages=tuning.num_stages),
      interpret=interpret,
      name="paged_kv4_attention",
  )(q_even, q_odd, table, lengths, *pool_inputs)

  # Merge the splits (flash-decoding's final reduction).
  out = merge_splits(maxes, sums, out_even, out_odd)  # [B, Hkv, padded_rows, D]
  return out[:, :, :group_heads].reshape(batch, q_heads, head_dim).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=["sm_scale"])
def paged_kv4_attention_reference(
    q,  # [B, Hq, D]: the newest token of each row
    kv: PagedKV4,
    lengths=None,  # [B] int32: visible keys per row (query at lengths - 1); None: kv.length
    *,
    sm_scale: float | None = None,
) -> jax.Array:  # [B, Hq, D] q.dtype
  """Reads the row's pages through the page table (`PagedKV4.read_keys` / `read_values`: channel mode takes
  the group of position lengths - 1 exact from k_recent) and attends in f32."""
  _check_inputs(q, kv, lengths)
  lengths = _lengths(kv, lengths)
  batch, q_heads, head_dim = q.shape
  kv_heads = kv.k.shape[2]
  sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
  keys, values = kv.read_keys(lengths), kv.read_values()  # f32 [B, S, Hkv, D]
  positions = jnp.arange(kv.max_len)
  q_grouped = q.astype(jnp.float32).reshape(batch, kv_heads, q_heads // kv_heads, head_dim)
  logits = jnp.einsum("bkgd,bskd->bkgs", q_grouped, keys) * sm_scale
  visible = (positions[None, :] < lengths[:, None])[:, None, None]  # [B, 1, 1, S]
  logits = jnp.where(visible, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.where(visible, jnp.exp(logits - row_max), 0.0)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  weights = weights / jnp.where(total > 0, total, 1.0)
  out = jnp.einsum("bkgs,bskd->bkgd", weights, values)
  return out.reshape(batch, q_heads, head_dim).astype(q.dtype)
