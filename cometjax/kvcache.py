"""KV caches passed through the model: `update(layer, k, v, positions) -> (cache, keys, values)`.

A cache is a pytree (it travels through `jax.jit` and `lax.while_loop`); `update` writes one layer's
new keys/values at their positions and returns that whole layer (dequantized) for attention.
Positions >= max_len mark padding: they are dropped, never written.

Caches:
- `KVCache`: float K/V.
- `KV4Cache`: INT4 K/V (the COMET/QServe "KV4"). V is asymmetric INT4 per token, per KV head, per group
  of `head_group` channels. K has three layouts (`KVQuantConfig.k_mode`):
    "token"    like V;
    "hadamard" K rotated by an orthonormal Hadamard matrix over head_dim, then like V (QuaRot-style:
               the rotation spreads outlier channels; it is undone on read);
    "channel"  KIVI-style: asymmetric per channel over groups of `group_tokens` tokens. The group that
               holds the newest token stays full precision in a ring buffer and is quantized once it is
               complete, so every query sees earlier groups quantized and its own group exact, in prefill
               as in decode. Writes must not straddle a group: prefill runs in chunks of `group_tokens`
               (`prefill_chunk`), decode writes one token at a time.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cometjax.qtypes import dequantize_kv_tensor, pack_int4, quantize_asymmetric, quantize_kv_tensor, unpack_int4

K_MODES = ("token", "hadamard", "channel")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Contiguous float cache.  k, v: [layers, batch, max_len, kv_heads, head_dim]."""
  k: jax.Array
  v: jax.Array
  prefill_chunk = None  # prefill may write any number of tokens at once

  @classmethod
  def create(cls, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
             dtype=jnp.float32) -> "KVCache":
    shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

  @property
  def max_len(self) -> int:
    return self.k.shape[2]

  def update(self, layer: int, k_new: jax.Array, v_new: jax.Array, positions: jax.Array):
    """k_new, v_new: [B, T, Hkv, D] written at positions [B, T]; returns (cache, keys, values)."""
    rows = jnp.arange(k_new.shape[0])[:, None]
    k = self.k.at[layer, rows, positions].set(k_new.astype(self.k.dtype), mode="drop")
    v = self.v.at[layer, rows, positions].set(v_new.astype(self.v.dtype), mode="drop")
    return KVCache(k, v), k[layer], v[layer]

  def reset_rows(self, rows: jax.Array) -> "KVCache":
    """Frees batch rows (bool [B]) for new sequences. A float cache keeps no per-row state: a new
    sequence rewrites every position before its queries can see it."""
    return self


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVQuantConfig:
  """INT4 KV cache settings (see the module docstring for the layouts)."""
  k_mode: str = "channel"
  head_group: int | None = None  # channels per scale for per-token layouts; None = the whole head
  group_tokens: int = 32  # tokens per K scale group in "channel" mode

  def __post_init__(self):
    if self.k_mode not in K_MODES:
      raise ValueError(f"k_mode must be one of {K_MODES}, got {self.k_mode!r}")
    if self.group_tokens < 1:
      raise ValueError(f"group_tokens must be >= 1, got {self.group_tokens}")

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def hadamard_matrix(n: int) -> np.ndarray:
  """Orthonormal Sylvester Hadamard matrix [n, n] (n a power of two); symmetric, its own inverse."""
  if n < 1 or n & (n - 1):
    raise ValueError(f"Hadamard size must be a power of two, got {n}")
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h / np.sqrt(n)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KV4Cache:
  """Paged INT4 cache: a pool of pages of `page_size` tokens and a page table per batch row.

  Sequence position p of row b lives in page `page_table[b, p // page_size]`, slot `p % page_size`.
  `create` builds the identity table (row b owns pages b*n .. b*n+n-1, i.e. a contiguous cache); a
  serving engine sets its own tables over a smaller pool (`with_page_table`). In "channel" mode a page is
  one K scale group (page_size == group_tokens).
  """
  k: jax.Array  # uint8 [L, P, page, Hkv, D/2]
  v: jax.Array  # uint8 [L, P, page, Hkv, D/2]
  k_scale: jax.Array  # per token: [L, P, page, Hkv, D/hg]; channel: [L, P, Hkv, D]
  k_zero: jax.Array
  v_scale: jax.Array  # [L, P, page, Hkv, D/hg]
  v_zero: jax.Array
  k_recent: jax.Array  # channel: f32 [L, B, G, Hkv, D], the open group; else [L, B, 0, Hkv, D]
  length: jax.Array  # int32 [L, B]: tokens written so far per layer and row
  page_table: jax.Array  # int32 [B, max_len // page]; entries < 0 are unallocated
  config: KVQuantConfig = dataclasses.field(metadata=dict(static=True))
  dtype: jnp.dtype = dataclasses.field(metadata=dict(static=True))

  @classmethod
  def create(cls, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
             dtype=jnp.float32, *, config: KVQuantConfig = KVQuantConfig(), page_size: int | None = None,
             num_pages: int | None = None) -> "KV4Cache":
    if head_dim % 2:
      raise ValueError(f"head_dim must be even for INT4 packing, got {head_dim}")
    hg = config.head_group or head_dim
    if head_dim % hg or hg % 2:
      raise ValueError(f"head_group must be an even divisor of head_dim={head_dim}, got {hg}")
    if config.k_mode == "hadamard":
      hadamard_matrix(head_dim)  # validates the size
    channel = config.k_mode == "channel"
    if channel:
      if page_size not in (None, config.group_tokens):
        raise ValueError(f"page_size must equal group_tokens ({config.group_tokens}) for k_mode='channel', "
                         f"got {page_size}")
      page_size = config.group_tokens
    page_size = page_size or min(16, max_len)
    if max_len % page_size:
      what = "group_tokens" if channel else "page_size"
      raise ValueError(f"max_len ({max_len}) must be a multiple of {what} ({page_size})")
    pages_per_row = max_len // page_size
    num_pages = batch * pages_per_row if num_pages is None else num_pages
    if num_pages < 1:
      raise ValueError(f"num_pages must be >= 1, got {num_pages}")
    pool = (num_layers, num_pages, page_size, num_kv_heads)
    codes = jnp.zeros(pool + (head_dim // 2,), jnp.uint8)
    token_scales = jnp.ones(pool + (head_dim // hg,), jnp.float32)
    if channel:
      k_scales = jnp.ones((num_layers, num_pages, num_kv_heads, head_dim), jnp.float32)
    else:
      k_scales = token_scales
    recent = jnp.zeros((num_layers, batch, page_size if channel else 0, num_kv_heads, head_dim), jnp.float32)
    identity = np.arange(batch * pages_per_row, dtype=np.int32).reshape(batch, pages_per_row)
    table = jnp.asarray(np.where(identity < num_pages, identity, -1))
    return cls(k=codes, v=codes, k_scale=k_scales, k_zero=jnp.zeros_like(k_scales), v_scale=token_scales,
               v_zero=jnp.zeros_like(token_scales), k_recent=recent,
               length=jnp.zeros((num_layers, batch), jnp.int32), page_table=table, config=config,
               dtype=jnp.dtype(dtype))

  @property
  def page_size(self) -> int:
    return self.k.shape[2]

  @property
  def num_pages(self) -> int:
    return self.k.shape[1]

  @property
  def max_len(self) -> int:
    return self.page_table.shape[1] * self.page_size

  @property
  def prefill_chunk(self) -> int | None:
    return self.config.group_tokens if self.config.k_mode == "channel" else None

  @property
  def head_group(self) -> int:
    return self.config.head_group or 2 * self.k.shape[-1]

  def with_page_table(self, page_table) -> "KV4Cache":
    """The same pool under new per-row page tables (int32 [B, max_len // page_size], -1 = none)."""
    page_table = jnp.asarray(page_table, jnp.int32)
    if page_table.shape != self.page_table.shape:
      raise ValueError(f"page_table must have shape {list(self.page_table.shape)}, got {list(page_table.shape)}")
    return dataclasses.replace(self, page_table=page_table)

  def _physical(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(page, slot) of positions [B, T]; padding or unallocated positions get page P (dropped)."""
    logical = jnp.clip(positions // self.page_size, 0, self.page_table.shape[1] - 1)
    page = jnp.take_along_axis(self.page_table, logical, axis=1)
    ok = (positions < self.max_len) & (page >= 0)
    return jnp.where(ok, page, self.num_pages), positions % self.page_size

  def update(self, layer: int, k_new: jax.Array, v_new: jax.Array, positions: jax.Array):
    """k_new, v_new: [B, T, Hkv, D] written at positions [B, T]; returns (cache, keys, values)."""
    cache = self.write(layer, k_new, v_new, positions)
    return cache, cache.read_keys(layer).astype(self.dtype), cache.read_values(layer).astype(self.dtype)

  def write(self, layer: int, k_new: jax.Array, v_new: jax.Array, positions: jax.Array) -> "KV4Cache":
    """`update` without the read: writes k_new, v_new [B, T, Hkv, D] at positions [B, T] and returns the
    cache (for attention kernels that read the pool themselves, e.g. paged_kv4_attention)."""
    b, t, _, d = k_new.shape
    rows = jnp.arange(b)[:, None]  # [B, 1]
    valid = positions < self.max_len
    new_length = jnp.maximum(self.length[layer], jnp.max(jnp.where(valid, positions + 1, 0), axis=1))
    page, slot = self._physical(positions)
    fields = {}

    v_codes, v_scale, v_zero = quantize_kv_tensor(v_new.astype(jnp.float32), self.head_group)
    fields["v"] = self.v.at[layer, page, slot].set(v_codes, mode="drop")
    fields["v_scale"] = self.v_scale.at[layer, page, slot].set(v_scale, mode="drop")
    fields["v_zero"] = self.v_zero.at[layer, page, slot].set(v_zero, mode="drop")

    k32 = k_new.astype(jnp.float32)
    if self.config.k_mode == "channel":
      g = self.config.group_tokens
      if t > g:
        raise ValueError(f"k_mode='channel' writes at most group_tokens={g} tokens per update, got {t}; "
                         "prefill through generate.forward_with_cache, which chunks")
      ring_slot = jnp.where(valid, positions % g, g)
      recent = self.k_recent.at[layer, rows, ring_slot].set(k32, mode="drop")[layer]  # [B, G, Hkv, D]
      completed = (new_length % g == 0) & (new_length > self.length[layer])  # [B]
      group_page, _ = self._physical(jnp.where(completed, new_length - g, self.max_len)[:, None])
      codes, scale, zero = quantize_asymmetric(recent, 4, axis=1)  # over the group's tokens
      group_page = group_page[:, 0]
      fields["k"] = self.k.at[layer, group_page].set(pack_int4(codes, axis=-1), mode="drop")
      fields["k_scale"] = self.k_scale.at[layer, group_page].set(scale[:, 0], mode="drop")
      fields["k_zero"] = self.k_zero.at[layer, group_page].set(zero[:, 0], mode="drop")
      fields["k_recent"] = self.k_recent.at[layer].set(recent)
    else:
      if self.config.k_mode == "hadamard":
        k32 = k32 @ hadamard_matrix(d)
      k_codes, k_scale, k_zero = quantize_kv_tensor(k32, self.head_group)
      fields["k"] = self.k.at[layer, page, slot].set(k_codes, mode="drop")
      fields["k_scale"] = self.k_scale.at[layer, page, slot].set(k_scale, mode="drop")
      fields["k_zero"] = self.k_zero.at[layer, page, slot].set(k_zero, mode="drop")
    fields["length"] = self.length.at[layer].set(new_length)
    return dataclasses.replace(self, **fields)

  def reset_rows(self, rows: jax.Array) -> "KV4Cache":
    """Frees batch rows (bool [B]) for new sequences: their written length goes back to 0."""
    return dataclasses.replace(self, length=jnp.where(rows[None, :], 0, self.length))

  def _gather(self, pool: jax.Array) -> jax.Array:
    """One layer's pool [P, page, ...] -> the rows' sequences [B, S, ...] through the page table."""
    pages = pool[jnp.maximum(self.page_table, 0)]  # [B, n, page, ...]; unallocated pages lie past length
    return pages.reshape(pages.shape[0], -1, *pages.shape[3:])

  def read_values(self, layer: int) -> jax.Array:
    return dequantize_kv_tensor(self._gather(self.v[layer]), self._gather(self.v_scale[layer]),
                                self._gather(self.v_zero[layer]))

  def read_keys(self, layer: int) -> jax.Array:
    """[B, S, Hkv, D] float32 keys of one layer, as attention sees them."""
    codes = self._gather(self.k[layer])
    if self.config.k_mode != "channel":
      keys = dequantize_kv_tensor(codes, self._gather(self.k_scale[layer]), self._gather(self.k_zero[layer]))
      return keys @ hadamard_matrix(keys.shape[-1]) if self.config.k_mode == "hadamard" else keys
    g = self.config.group_tokens
    table = jnp.maximum(self.page_table, 0)
    scale = jnp.repeat(self.k_scale[layer][table], g, axis=1)  # [B, n, Hkv, D] -> [B, S, Hkv, D]
    zero = jnp.repeat(self.k_zero[layer][table], g, axis=1)
    keys = (unpack_int4(codes, axis=-1, signed=False).astype(jnp.float32) - zero) * scale
    positions = jnp.arange(self.max_len)
    open_group = (self.length[layer] - 1) // g  # [B]: the group of the newest token stays exact
    in_open = (positions[None, :] // g) == open_group[:, None]  # [B, S]
    recent = jnp.take(self.k_recent[layer], positions % g, axis=1)  # [B, S, Hkv, D]
    return jnp.where(in_open[:, :, None, None], recent, keys)

  def nbytes_per_token(self) -> float:
    """Bytes one pooled token costs across layers, codes plus scales (the ring buffer excluded)."""
    pool_tokens = self.num_pages * self.page_size
    fields = (self.k, self.v, self.k_scale, self.k_zero, self.v_scale, self.v_zero)
    return sum(x.size * x.dtype.itemsize for x in fields) / pool_tokens


def prefill_chunk(kv: KVQuantConfig | None) -> int:
  """Tokens per prefill write the cache accepts (1 = any number)."""
  return kv.group_tokens if kv is not None and kv.k_mode == "channel" else 1


def create_cache(kv: KVQuantConfig | None, config, batch: int, max_len: int, dtype=None, **paging):
  """An empty cache for a model config (`LlamaConfig`): float when kv is None, else INT4 (`paging`:
  page_size / num_pages for `KV4Cache.create`)."""
  dtype = dtype or config.dtype
  shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.resolved_head_dim)
  if kv is None:
    if paging:
      raise ValueError(f"paging options {sorted(paging)} need an INT4 cache (kv=KVQuantConfig(...))")
    return KVCache.create(*shape, dtype=dtype)
  return KV4Cache.create(*shape, dtype=dtype, config=kv, **paging)
