"""KV caches passed through the model (the protocol is in `cometjax.models.llama`'s docstring).

A cache is a pytree (it travels through `jax.jit` and `lax.while_loop`); `update` writes one layer's new
keys/values at their positions and returns that whole layer (dequantized) for attention. Positions >=
max_len mark padding: they are dropped, never written.

- `KVCache`: float K/V, contiguous.
- `KV4Cache`: INT4 K/V (COMET's / QServe's "KV4"), one `cometjax.core.kv.PagedKV4` pool per layer sharing one
  page table per batch row; the layouts and K modes are in `cometjax.core.kv`. Keeping each layer's pool
  its own array means no single array holds more than one layer's pages (kernels index it with 32-bit
  offsets).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cometjax.core import kv as kv_layouts
from cometjax.core.kv import KVQuantConfig, PagedKV4, check_kv_shape


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Contiguous float cache, one array per layer.  k, v: tuples of [batch, max_len, kv_heads, head_dim].

  Separate per-layer arrays (not one [layers, ...] stack) let XLA write a decode step's row in place: with
  a stack, every layer's update inside the decode loop copied all layers (measured on stories260K)."""
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  prefill_chunk = None  # prefill may write any number of tokens at once
  page_size = 1  # `read` takes any prefix length

  @classmethod
  def create(cls, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
             dtype=jnp.float32) -> "KVCache":
    shape = (batch, max_len, num_kv_heads, head_dim)
    return cls(tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
               tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)))

  @property
  def max_len(self) -> int:
    return self.k[0].shape[1]

  def update(self, layer: int, k_new: jax.Array, v_new: jax.Array, positions: jax.Array):
    """k_new, v_new: [B, T, Hkv, D] written at positions [B, T]; returns (cache, keys, values)."""
    k = _write_rows(self.k[layer], k_new, positions)
    v = _write_rows(self.v[layer], v_new, positions)
    replace = lambda layers, new: layers[:layer] + (new,) + layers[layer + 1:]
    return KVCache(replace(self.k, k), replace(self.v, v)), k, v

  def write(self, layer: int, k_new: jax.Array, v_new: jax.Array, positions: jax.Array) -> "KVCache":
    return self.update(layer, k_new, v_new, positions)[0]

  def read(self, layer: int, num_tokens: int) -> tuple[jax.Array, jax.Array]:
    """The first num_tokens positions of one layer: (keys, values) [B, num_tokens, Hkv, D]."""
    return self.k[layer][:, :num_tokens], self.v[layer][:, :num_tokens]

  def paged_layer(self, layer: int) -> None:
    return None  # not paged: attention reads `update`'s keys and values

  def reset_rows(self, rows: jax.Array) -> "KVCache":
    """Frees batch rows (bool [B]) for new sequences. A float cache keeps no per-row state: a new
    sequence rewrites every position before its queries can see it."""
    return self


def _write_rows(pool: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
  """pool [B, S, H, D] with new [B, T, H, D] written at positions [B, T] (>= S dropped).

  A decode step (T = 1) avoids XLA's scatter, which on CPU costs more than the rest of a small model's
  step: each row is a dynamic-update-slice in place (`core.kv.set_rows`), or beyond `core.kv.MAX_ROW_WRITES` rows
  a select against a one-hot of their positions (which reads and writes the whole layer).
  """
  new = new.astype(pool.dtype)
  b, t = positions.shape
  if t != 1:
    rows = jnp.arange(b)[:, None]
    return pool.at[rows, positions].set(new, mode="drop")
  if b > kv_layouts.MAX_ROW_WRITES:
    hit = jnp.arange(pool.shape[1])[None, :] == positions  # [B, S]
    return jnp.where(hit[:, :, None, None], new, pool)
  return kv_layouts.set_rows(pool, jnp.concatenate([jnp.arange(b)[:, None], positions], axis=1), new[:, 0])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KV4Cache:
  """Paged INT4 cache: one `PagedKV4` pool per layer and a page table per batch row (shared by the layers).

  `create` builds the identity table (row b owns pages b*n .. b*n+n-1, i.e. a contiguous cache); a serving
  engine sets its own tables over a smaller pool (`with_page_table`). In "channel" mode a page is one K
  scale group (page_size == group_tokens).
  """
  layers: tuple[PagedKV4, ...]
  dtype: jnp.dtype = dataclasses.field(metadata=dict(static=True))

  @classmethod
  def create(cls, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
             dtype=jnp.float32, *, config: KVQuantConfig = KVQuantConfig(), page_size: int | None = None,
             num_pages: int | None = None, contiguous: bool = False) -> "KV4Cache":
    """contiguous=True promises that the identity page table built here is never replaced (generate's cache):
    reads then reshape the pools instead of gathering through the table. A cache whose tables change
    (`with_page_table`, or a replaced `page_table` field) must leave it False."""
    check_kv_shape(head_dim, config)
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
    identity = np.arange(batch * pages_per_row, dtype=np.int32).reshape(batch, pages_per_row)
    table = jnp.asarray(np.where(identity < num_pages, identity, -1))
    if contiguous and num_pages != batch * pages_per_row:
      raise ValueError(f"contiguous=True needs num_pages == batch * max_len / page_size = {batch * pages_per_row}, "
                       f"got {num_pages}")
    layer = PagedKV4.create(batch, num_pages, page_size, num_kv_heads, head_dim, table, config,
                            contiguous=contiguous)
    return cls(layers=tuple(layer for _ in range(num_layers)), dtype=jnp.dtype(dtype))

  @property
  def config(self) -> KVQuantConfig:
    return self.layers[0].config

  @property
  def page_table(self) -> jax.Array:
    return self.layers[0].page_table

  @property
  def page_size(self) -> int:
    return self.layers[0].page_size

  @property
  def num_pages(self) -> int:
    return self.layers[0].num_pages

  @property
  def max_len(self) -> int:
    return self.layers[0].max_len

  @property
  def prefill_chunk(self) -> int | None:
    return self.config.group_tokens if self.config.k_mode == "channel" else None

  @property
  def head_group(self) -> int:
    return self.layers[0].head_group

  @property
  def length(self) -> jax.Array:
    """int32 [L, B]: tokens written so far per layer and row."""
    return jnp.stack([layer.length for layer in self.layers])

  def paged_layer(self, layer: int) -> PagedKV4:
    return self.layers[layer]

  def _replace_layer(self, layer: int, new: PagedKV4) -> "KV4Cache":
    return dataclasses.replace(self, layers=self.layers[:layer] + (new,) + self.layers[layer + 1:])

  def with_page_table(self, page_table) -> "KV4Cache":
    """The same pools under new per-row page tables (int32 [B, max_len // page_size], -1 = none)."""
    page_table = jnp.asarray(page_table, jnp.int32)
    if page_table.shape != self.page_table.shape:
      raise ValueError(f"page_table must have shape {list(self.page_table.shape)}, got {list(page_table.shape)}")
    return dataclasses.replace(self, layers=tuple(dataclasses.replace(l, page_table=page_table, contiguous=False)
                                                  for l in self.layers))

  def update(self, layer: int, k_new: jax.Array, v_new: jax.Array, positions: jax.Array):
    """k_new, v_new: [B, T, Hkv, D] written at positions [B, T]; returns (cache, keys, values)."""
    cache = self.write(layer, k_new, v_new, positions)
    return cache, cache.read_keys(layer).astype(self.dtype), cache.read_values(layer).astype(self.dtype)

  def write(self, layer: int, k_new: jax.Array, v_new: jax.Array, positions: jax.Array) -> "KV4Cache":
    """`update` without the read (for attention kernels that read the pool themselves)."""
    return self._replace_layer(layer, self.layers[layer].write(k_new, v_new, positions))

  def read(self, layer: int, num_tokens: int) -> tuple[jax.Array, jax.Array]:
    """The first num_tokens positions of one layer, dequantized: (keys, values) [B, num_tokens, Hkv, D]
    (num_tokens a multiple of the page size); only those pages are read."""
    paged = self.layers[layer]
    return (paged.read_keys(num_tokens=num_tokens).astype(self.dtype),
            paged.read_values(num_tokens).astype(self.dtype))

  def reset_rows(self, rows: jax.Array) -> "KV4Cache":
    """Frees batch rows (bool [B]) for new sequences: their written length goes back to 0."""
    return dataclasses.replace(self, layers=tuple(
        dataclasses.replace(l, length=jnp.where(rows, 0, l.length)) for l in self.layers))

  def read_values(self, layer: int) -> jax.Array:
    return self.layers[layer].read_values()

  def read_keys(self, layer: int) -> jax.Array:
    """[B, S, Hkv, D] float32 keys of one layer, as attention sees them."""
    return self.layers[layer].read_keys()

  def nbytes_per_token(self) -> float:
    """Bytes one pooled token costs across layers, codes plus scales (the ring buffer excluded)."""
    return sum(layer.nbytes() for layer in self.layers) / (self.num_pages * self.page_size)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HeldKV4Cache:
  """A `KV4Cache` and, beside it, every layer's keys and values as attention reads them (float), for a CPU
  decode loop (`hold`, like held weights: an execution form, never returned to the caller).

  Each write stores the token in the INT4 cache as always and its key and value, as the next read returns
  them, in the float copy (`PagedKV4.token_as_read`); in "channel" mode, a group's exact keys are replaced by
  their dequantized values once a row writes past that group, when reads start to see them quantized. Reads
  are then slices of the copy: the values dequantizing the INT4 cache gives (bit for bit in "token" and
  "channel" mode; "hadamard" keys up to float32 rounding of the inverse rotation), without dequantizing the
  attended prefix at every step. Decode writes (one token per row) are kept incrementally, several tokens
  copy the layer afresh. Memory: the float cache's on top of the INT4 one."""
  cache: KV4Cache
  k: tuple[jax.Array, ...]  # [B, S, Hkv, D] per layer, the cache's dtype
  v: tuple[jax.Array, ...]
  page_size = 1  # `read` takes any prefix length

  @classmethod
  def hold(cls, cache: KV4Cache) -> "HeldKV4Cache":
    """The copy of a filled cache (its keys and values as read now)."""
    return cls(cache, tuple(cache.read_keys(i).astype(cache.dtype) for i in range(len(cache.layers))),
               tuple(cache.read_values(i).astype(cache.dtype) for i in range(len(cache.layers))))

  @property
  def max_len(self) -> int:
    return self.cache.max_len

  @property
  def prefill_chunk(self) -> int | None:
    return self.cache.prefill_chunk

  def paged_layer(self, layer: int) -> None:
    return None  # attention reads the float copy

  def update(self, layer: int, k_new: jax.Array, v_new: jax.Array, positions: jax.Array):
    held = self.write(layer, k_new, v_new, positions)
    return held, held.k[layer], held.v[layer]

  def write(self, layer: int, k_new: jax.Array, v_new: jax.Array, positions: jax.Array) -> "HeldKV4Cache":
    cache = self.cache.write(layer, k_new, v_new, positions)
    replace = lambda layers, new: layers[:layer] + (new,) + layers[layer + 1:]
    if positions.shape[1] != 1:  # several tokens (prefill): copy the layer as read
      return HeldKV4Cache(cache, replace(self.k, cache.read_keys(layer).astype(cache.dtype)),
                          replace(self.v, cache.read_values(layer).astype(cache.dtype)))
    paged = cache.layers[layer]
    keys, values = paged.token_as_read(k_new, v_new)
    k = _write_rows(self.k[layer], keys, positions)
    v = _write_rows(self.v[layer], values, positions)
    if paged.config.k_mode == "channel":
      k = self._close_groups(k, paged, self.cache.layers[layer].length, positions[:, 0])
    return HeldKV4Cache(cache, replace(self.k, k), replace(self.v, v))

  def _close_groups(self, k: jax.Array, paged: PagedKV4, length: jax.Array, positions: jax.Array) -> jax.Array:
    """Rows whose new token opens a later group than their newest one (length [B] before the write): that
    group is closed, and reads now see it dequantized."""
    g = paged.page_size
    newest = jnp.maximum(length - 1, 0) // g * g  # [B]: first position of the group open before the write
    closes = (length > 0) & (positions < paged.max_len) & (positions // g > newest // g)

    def close(k):
      b, s = k.shape[:2]
      groups = k.reshape(b, s // g, g, *k.shape[2:])
      index = jnp.stack([jnp.arange(b), jnp.where(closes, newest // g, s // g)], axis=1)  # past the end: kept
      return kv_layouts.set_rows(groups, index, paged.group_keys(newest).astype(k.dtype)).reshape(k.shape)

    return jax.lax.cond(jnp.any(closes), close, lambda k: k, k)

  def read(self, layer: int, num_tokens: int) -> tuple[jax.Array, jax.Array]:
    return self.k[layer][:, :num_tokens], self.v[layer][:, :num_tokens]

  def reset_rows(self, rows: jax.Array) -> "HeldKV4Cache":
    return dataclasses.replace(self, cache=self.cache.reset_rows(rows))


def prefill_chunk(kv: KVQuantConfig | None) -> int:
  """Tokens per prefill write the cache accepts (1 = any number)."""
  return 1 if kv is None else kv.prefill_chunk


def create_cache(kv: KVQuantConfig | None, config, batch: int, max_len: int, dtype=None, **paging):
  """An empty cache for a model config (`LlamaConfig`): float when kv is None, else INT4 (`paging`:
  page_size / num_pages / contiguous for `KV4Cache.create`)."""
  dtype = dtype or config.dtype
  shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.resolved_head_dim)
  if kv is None:
    paging.pop("contiguous", None)  # a float cache is always contiguous
    if paging:
      raise ValueError(f"paging options {sorted(paging)} need an INT4 cache (kv=KVQuantConfig(...))")
    return KVCache.create(*shape, dtype=dtype)
  return KV4Cache.create(*shape, dtype=dtype, config=kv, **paging)
