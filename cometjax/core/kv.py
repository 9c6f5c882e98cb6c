"""INT4 KV-cache layouts: a contiguous `QuantizedKV` and one layer of a paged pool, `PagedKV4`.

Both store asymmetric INT4 codes packed two per byte along head_dim (`pack_int4`, low nibble = even
channel) with f32 scales and zero points; value = (code - zero) * scale. The zero point is the float
-min / scale (the levels span [min, max], as KIVI's quantizer), or an integer with
`KVQuantConfig.integer_zero` (`cometjax.core.numerics.quantize_asymmetric`).

Contiguous (`QuantizedKV`, `quantize_kv`, `dequantize_kv`)
  k, v uint8 [B, S, Hkv, D // 2]; k_scale, k_zero, v_scale, v_zero f32 [B, S, Hkv, D // group]:
  asymmetric INT4 per token, per KV head, per group of `group` head_dim channels (group = head_dim by
  default).

Paged (`PagedKV4`): a pool of P pages of `page_size` tokens and a page table per batch row
  Sequence position p of row b lives in page `page_table[b, p // page_size]`, slot `p % page_size`;
  entries < 0 are unallocated. V is asymmetric INT4 per token, per KV head, per group of `head_group`
  channels. K has three layouts (`KVQuantConfig.k_mode`):
    "token"    like V;
    "hadamard" K rotated by an orthonormal Hadamard matrix over head_dim, then like V (QuaRot-style: the
               rotation spreads outlier channels; it is undone on read);
    "channel"  KIVI-style: asymmetric per channel over groups of `group_tokens` tokens, one page per group.
               The group that holds the newest token stays full precision in `k_recent` and is quantized
               once it is complete, so every query sees earlier groups quantized and its own group exact.
               Writes must not straddle a group: prefill runs in chunks of `group_tokens`, decode writes
               one token at a time.
  Positions >= max_len mark padding: they are dropped, never written.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from cometjax.core.kv_config import KVQuantConfig
from cometjax.core.numerics import dequantize_asymmetric, pack_int4, quantize_asymmetric, unpack_int4
from cometjax.core.rotations import fast_hadamard_transform, hadamard_exists

# ------------------------------------------------------------------------------------------------
# Contiguous layout


def _rotate_heads(x: jax.Array) -> jax.Array:
  """x [..., D] @ H(D) / sqrt(D), H symmetric (its own inverse once normalized), by butterflies: the values do
  not depend on how many tokens one call rotates (a matmul's summation order does), so decoding token by token
  writes the bytes a chunked prefill writes."""
  d = x.shape[-1]
  return fast_hadamard_transform(x, d) * (1.0 / math.sqrt(d))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKV:
  """One layer's INT4 K/V cache, asymmetric per token, per KV head, per head_dim group."""

  k: jax.Array  # uint8 [B, S, Hkv, D // 2]
  v: jax.Array  # uint8 [B, S, Hkv, D // 2]
  k_scale: jax.Array  # f32 [B, S, Hkv, D // group]
  k_zero: jax.Array  # f32 [B, S, Hkv, D // group]
  v_scale: jax.Array  # f32 [B, S, Hkv, D // group]
  v_zero: jax.Array  # f32 [B, S, Hkv, D // group]

  @property
  def head_dim(self) -> int:
    return 2 * self.k.shape[-1]

  @property
  def group_size(self) -> int:
    return self.head_dim // self.k_scale.shape[-1]

  def check_arrays(self) -> None:
    b, s, h, half = self.k.shape
    if self.k.dtype != jnp.uint8 or self.v.dtype != jnp.uint8 or self.v.shape != self.k.shape:
      raise ValueError(f"k and v must both be uint8 [B, S, Hkv, D // 2], got k {self.k.dtype} "
                       f"{list(self.k.shape)}, v {self.v.dtype} {list(self.v.shape)}")
    groups = self.k_scale.shape[-1]
    if groups <= 0 or (2 * half) % groups:
      raise ValueError(f"k_scale's last axis ({groups}) must divide head_dim={2 * half}")
    for name in ("k_scale", "k_zero", "v_scale", "v_zero"):
      value = getattr(self, name)
      if tuple(value.shape) != (b, s, h, groups):
        raise ValueError(f"{name} must have shape {[b, s, h, groups]}, got {list(value.shape)}")


def _grouped_head_dim(x: jax.Array, group: int) -> jax.Array:
  d = x.shape[-1]
  if group <= 0 or group % 2 or d % group:
    raise ValueError(f"group must be an even divisor of head_dim={d}, got {group}")
  return x.reshape(*x.shape[:-1], d // group, group)


def quantize_kv_tensor(x: jax.Array, group: int | None = None, integer_zero: bool = False):
  """One of K or V [..., D] -> (packed uint8 [..., D//2], scale, zero [..., D//group])."""
  group = x.shape[-1] if group is None else group
  grouped = _grouped_head_dim(x, group)  # [..., D // group, group]
  q, scale, zero = quantize_asymmetric(grouped, 4, axis=-1, integer_zero=integer_zero)
  packed = pack_int4(q.reshape(x.shape), axis=-1)
  return packed, scale[..., 0], zero[..., 0]


def dequantize_kv_tensor(packed: jax.Array, scale: jax.Array, zero: jax.Array, dtype=jnp.float32) -> jax.Array:
  codes = unpack_int4(packed, axis=-1, signed=False)  # [..., D]
  d = codes.shape[-1]
  group = d // scale.shape[-1]
  grouped = codes.reshape(*codes.shape[:-1], d // group, group)
  x = dequantize_asymmetric(grouped, scale[..., None], zero[..., None])
  return x.reshape(codes.shape).astype(dtype)


def quantize_kv(k: jax.Array, v: jax.Array, group: int | None = None, integer_zero: bool = False) -> QuantizedKV:
  """K and V [B, S, Hkv, D] float -> QuantizedKV (group = head_dim by default)."""
  if k.shape != v.shape or k.ndim != 4:
    raise ValueError(f"k and v must share one [B, S, Hkv, D] shape, got {k.shape} and {v.shape}")
  kq, ks, kz = quantize_kv_tensor(k, group, integer_zero)
  vq, vs, vz = quantize_kv_tensor(v, group, integer_zero)
  return QuantizedKV(k=kq, v=vq, k_scale=ks, k_zero=kz, v_scale=vs, v_zero=vz)


def dequantize_kv(kv: QuantizedKV, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  """QuantizedKV -> (k, v) float [B, S, Hkv, D]."""
  return (dequantize_kv_tensor(kv.k, kv.k_scale, kv.k_zero, dtype),
          dequantize_kv_tensor(kv.v, kv.v_scale, kv.v_zero, dtype))


# ------------------------------------------------------------------------------------------------
# Paged layout


def check_kv_shape(head_dim: int, config: KVQuantConfig) -> int:
  """Validates head_dim against `config`; returns the resolved head_group."""
  if head_dim % 2:
    raise ValueError(f"head_dim must be even for INT4 packing, got {head_dim}")
  head_group = config.head_group or head_dim
  if head_dim % head_group or head_group % 2:
    raise ValueError(f"head_group must be an even divisor of head_dim={head_dim}, got {head_group}")
  if config.k_mode == "hadamard" and not hadamard_exists(head_dim):
    raise ValueError(f"k_mode='hadamard' needs a Hadamard matrix of order head_dim={head_dim}; none is built "
                     "here (use a power of two)")
  return head_group


# Writes of up to this many rows of one token each run as one dynamic-update-slice per row: XLA's scatter
# costs more on a CPU than the rest of a small model's decode step.
MAX_ROW_WRITES = 64


def set_rows(pool: jax.Array, index: jax.Array, values: jax.Array) -> jax.Array:
  """pool.at[index[:, 0], index[:, 1], ...].set(values, mode="drop") for index int32 [R, n] (one entry of
  the first n axes per row; out of range: dropped) and values [R, *pool.shape[n:]]."""
  rows, n = index.shape
  if rows > MAX_ROW_WRITES:
    return pool.at[tuple(index[:, i] for i in range(n))].set(values, mode="drop")
  size = (1,) * n + pool.shape[n:]
  for r in range(rows):
    inside = jnp.all((index[r] >= 0) & (index[r] < jnp.asarray(pool.shape[:n])))
    start = tuple(jnp.clip(index[r, i], 0, pool.shape[i] - 1) for i in range(n)) + (0,) * (pool.ndim - n)
    kept = jax.lax.dynamic_slice(pool, start, size)
    pool = jax.lax.dynamic_update_slice(pool, jnp.where(inside, values[r].reshape(size).astype(pool.dtype), kept),
                                        start)
  return pool


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKV4:
  """One layer of a paged INT4 KV cache (module docstring): what the paged attention kernel reads."""

  k: jax.Array  # uint8 [P, page, Hkv, D // 2]
  v: jax.Array  # uint8 [P, page, Hkv, D // 2]
  k_scale: jax.Array  # per-token modes: f32 [P, page, Hkv, D // head_group]; channel: [P, Hkv, D]
  k_zero: jax.Array  # like k_scale
  v_scale: jax.Array  # f32 [P, page, Hkv, D // head_group]
  v_zero: jax.Array  # like v_scale
  k_recent: jax.Array  # channel: f32 [B, page, Hkv, D], the open group; else [B, 0, Hkv, D]
  length: jax.Array  # int32 [B]: tokens written so far per row
  page_table: jax.Array  # int32 [B, max_len // page]; entries < 0 are unallocated
  config: KVQuantConfig = dataclasses.field(metadata=dict(static=True))
  # True: the page table is the identity over the whole pool (row b owns pages b*n .. b*n+n-1), so reads
  # are reshapes of the pool rather than gathers through the table (a gather per read is slow on a CPU)
  contiguous: bool = dataclasses.field(default=False, metadata=dict(static=True))

  @classmethod
  def create(cls, batch: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
             page_table: jax.Array, config: KVQuantConfig, contiguous: bool = False) -> "PagedKV4":
    """An empty layer: codes 0, scales 1, zero points 0, every row's length 0 (`contiguous`: the field)."""
    head_group = check_kv_shape(head_dim, config)
    channel = config.k_mode == "channel"
    pool = (num_pages, page_size, num_kv_heads)
    codes = jnp.zeros(pool + (head_dim // 2,), jnp.uint8)
    token_scales = jnp.ones(pool + (head_dim // head_group,), jnp.float32)
    k_scales = jnp.ones((num_pages, num_kv_heads, head_dim), jnp.float32) if channel else token_scales
    recent = jnp.zeros((batch, page_size if channel else 0, num_kv_heads, head_dim), jnp.float32)
    return cls(k=codes, v=codes, k_scale=k_scales, k_zero=jnp.zeros_like(k_scales), v_scale=token_scales,
               v_zero=jnp.zeros_like(token_scales), k_recent=recent, length=jnp.zeros((batch,), jnp.int32),
               page_table=page_table, config=config, contiguous=contiguous)

  @property
  def page_size(self) -> int:
    return self.k.shape[1]

  @property
  def num_pages(self) -> int:
    return self.k.shape[0]

  @property
  def head_dim(self) -> int:
    return 2 * self.k.shape[-1]

  @property
  def head_group(self) -> int:
    return self.config.head_group or self.head_dim

  @property
  def max_len(self) -> int:
    return self.page_table.shape[1] * self.page_size

  def nbytes(self) -> int:
    """Bytes of the pool: codes plus scales (the open group's ring buffer excluded)."""
    fields = (self.k, self.v, self.k_scale, self.k_zero, self.v_scale, self.v_zero)
    return sum(x.size * x.dtype.itemsize for x in fields)

  def physical(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(page, slot) of positions [B, T]; padding or unallocated positions get page P (dropped)."""
    pages_per_row = self.page_table.shape[1]
    logical = jnp.clip(positions // self.page_size, 0, pages_per_row - 1)
    if self.contiguous:  # the identity table: arithmetic on the positions alone, which XLA then computes once
      # for all layers rather than once per layer's table (a decode step's cost on a CPU is its op count)
      page = jnp.arange(positions.shape[0], dtype=positions.dtype)[:, None] * pages_per_row + logical
      ok = positions < self.max_len
    else:
      page = jnp.take_along_axis(self.page_table, logical, axis=1)
      ok = (positions < self.max_len) & (page >= 0)
    return jnp.where(ok, page, self.num_pages), positions % self.page_size

  def write(self, k_new: jax.Array, v_new: jax.Array, positions: jax.Array) -> "PagedKV4":
    """Writes k_new, v_new [B, T, Hkv, D] at positions [B, T]; returns the updated layer."""
    b, t, _, d = k_new.shape
    valid = positions < self.max_len
    new_length = jnp.maximum(self.length, jnp.max(jnp.where(valid, positions + 1, 0), axis=1))
    page, slot = self.physical(positions)
    integer_zero = self.config.integer_zero
    v_codes, v_scale, v_zero = quantize_kv_tensor(v_new.astype(jnp.float32), self.head_group, integer_zero)
    if t == 1:  # a decode step: in-place row writes (`set_rows`), no scatter
      at = jnp.concatenate([page, slot], axis=1)  # [B, 2]
      put = lambda pool, values: set_rows(pool, at, values[:, 0])
    else:
      put = lambda pool, values: pool.at[page, slot].set(values, mode="drop")
    fields = dict(v=put(self.v, v_codes), v_scale=put(self.v_scale, v_scale), v_zero=put(self.v_zero, v_zero),
                  length=new_length)
    k32 = k_new.astype(jnp.float32)
    if self.config.k_mode == "channel":
      fields.update(self._write_channel_keys(k32, positions, valid, new_length))
    else:
      if self.config.k_mode == "hadamard":
        k32 = _rotate_heads(k32)
      k_codes, k_scale, k_zero = quantize_kv_tensor(k32, self.head_group, integer_zero)
      fields.update(k=put(self.k, k_codes), k_scale=put(self.k_scale, k_scale), k_zero=put(self.k_zero, k_zero))
    return dataclasses.replace(self, **fields)

  def _write_channel_keys(self, k32, positions, valid, new_length) -> dict:
    """Channel mode: keys go to the open group's ring buffer; a group that completes is quantized
    per channel over its tokens into its page."""
    b, t = positions.shape
    g = self.config.group_tokens
    if t > g:
      raise ValueError(f"k_mode='channel' writes at most group_tokens={g} tokens per update, got {t}; "
                       "prefill in chunks of group_tokens (serving.generate.forward_with_cache does)")
    rows = jnp.arange(b)[:, None]  # [B, 1]
    ring_slot = jnp.where(valid, positions % g, g)
    if t == 1:
      recent = set_rows(self.k_recent, jnp.concatenate([rows, ring_slot], axis=1), k32[:, 0])
    else:
      recent = self.k_recent.at[rows, ring_slot].set(k32, mode="drop")  # [B, G, Hkv, D]
    completed = (new_length % g == 0) & (new_length > self.length)  # [B]
    group_page, _ = self.physical(jnp.where(completed, new_length - g, self.max_len)[:, None])  # [B, 1]

    def close_groups(pools):  # quantize each completed group per channel over its tokens into its page
      k, k_scale, k_zero = pools
      codes, scale, zero = quantize_asymmetric(recent, 4, axis=1, integer_zero=self.config.integer_zero)
      return (set_rows(k, group_page, pack_int4(codes, axis=-1)), set_rows(k_scale, group_page, scale[:, 0]),
              set_rows(k_zero, group_page, zero[:, 0]))

    pools = (self.k, self.k_scale, self.k_zero)
    if t == 1:  # a decode step closes a group once every g steps: skip the work in between
      pools = jax.lax.cond(jnp.any(completed), close_groups, lambda pools: pools, pools)
    else:
      pools = close_groups(pools)
    return dict(k=pools[0], k_scale=pools[1], k_zero=pools[2], k_recent=recent)

  def _pages(self, pool: jax.Array, num_pages: int) -> jax.Array:
    """A pool [P, ...] -> the first num_pages logical pages of every row [B, num_pages, ...]."""
    b, n = self.page_table.shape
    if self.contiguous:
      return pool.reshape(b, n, *pool.shape[1:])[:, :num_pages]
    return pool[jnp.maximum(self.page_table[:, :num_pages], 0)]  # unallocated pages lie past length

  def _num_pages(self, num_tokens: int | None) -> int:
    if num_tokens is None:
      return self.page_table.shape[1]
    if num_tokens % self.page_size or not 0 < num_tokens <= self.max_len:
      raise ValueError(f"num_tokens must be a multiple of the page size {self.page_size} in (0, {self.max_len}], "
                       f"got {num_tokens}")
    return num_tokens // self.page_size

  def gather(self, pool: jax.Array, num_tokens: int | None = None) -> jax.Array:
    """A pool [P, page, ...] -> the rows' sequences [B, S, ...] through the page table (the first
    num_tokens positions when given)."""
    pages = self._pages(pool, self._num_pages(num_tokens))  # [B, n, page, ...]
    return pages.reshape(pages.shape[0], -1, *pages.shape[3:])

  def read_values(self, num_tokens: int | None = None) -> jax.Array:
    """[B, S, Hkv, D] float32 values as attention sees them (S = num_tokens when given, else max_len)."""
    return dequantize_kv_tensor(self.gather(self.v, num_tokens), self.gather(self.v_scale, num_tokens),
                                self.gather(self.v_zero, num_tokens))

  def token_as_read(self, k_new: jax.Array, v_new: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The key and value [B, 1, Hkv, D] of a token `write` just stored as the next reads return them (f32,
    equal to `read_keys` / `read_values` at its position): V and per-token K dequantized from the codes they
    quantize to; channel-mode K exact (its group is the open one)."""
    integer_zero = self.config.integer_zero
    round_trip = lambda x: dequantize_kv_tensor(*quantize_kv_tensor(x, self.head_group, integer_zero))
    k32, v32 = k_new.astype(jnp.float32), v_new.astype(jnp.float32)
    if self.config.k_mode == "hadamard":
      keys = _rotate_heads(round_trip(_rotate_heads(k32)))
    else:
      keys = k32 if self.config.k_mode == "channel" else round_trip(k32)
    return keys, round_trip(v32)

  def group_keys(self, positions: jax.Array) -> jax.Array:
    """Channel mode: the dequantized keys [B, page, Hkv, D] of the group holding positions [B] (one per row),
    as `read_keys` returns them once that group is closed."""
    page, _ = self.physical(positions[:, None])  # [B, 1]
    page = jnp.minimum(page[:, 0], self.num_pages - 1)
    codes = unpack_int4(self.k[page], axis=-1, signed=False).astype(jnp.float32)  # [B, page, Hkv, D]
    return (codes - self.k_zero[page][:, None]) * self.k_scale[page][:, None]

  def read_keys(self, lengths: jax.Array | None = None, num_tokens: int | None = None) -> jax.Array:
    """[B, S, Hkv, D] float32 keys as attention sees them (S as in read_values); in channel mode the
    group of position lengths - 1 (default: the newest token) comes exact from k_recent."""
    codes = self.gather(self.k, num_tokens)
    if self.config.k_mode != "channel":
      keys = dequantize_kv_tensor(codes, self.gather(self.k_scale, num_tokens), self.gather(self.k_zero, num_tokens))
      return _rotate_heads(keys) if self.config.k_mode == "hadamard" else keys
    lengths = self.length if lengths is None else lengths
    g = self.page_size
    n = self._num_pages(num_tokens)
    b = codes.shape[0]
    scale, zero = self._pages(self.k_scale, n)[:, :, None], self._pages(self.k_zero, n)[:, :, None]  # [B, n, 1, H, D]
    codes = unpack_int4(codes, axis=-1, signed=False).astype(jnp.float32).reshape(b, n, g, *scale.shape[3:])
    keys = ((codes - zero) * scale).reshape(b, n * g, *scale.shape[3:])
    positions = jnp.arange(n * g)
    open_group = (lengths - 1) // g  # [B]: the group of the newest token stays exact
    in_open = (positions[None, :] // g) == open_group[:, None]  # [B, S]
    recent = jnp.tile(self.k_recent, (1, n, 1, 1))  # [B, S, Hkv, D]: position p reads ring slot p % g
    return jnp.where(in_open[:, :, None, None], recent, keys)
