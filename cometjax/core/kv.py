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

import jax
import jax.numpy as jnp

from cometjax.core.kv_config import KVQuantConfig
from cometjax.core.numerics import dequantize_asymmetric, pack_int4, quantize_asymmetric, unpack_int4
from cometjax.core.rotations import hadamard_exists, hadamard_orthonormal

# ------------------------------------------------------------------------------------------------
# Contiguous layout


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

  @classmethod
  def create(cls, batch: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
             page_table: jax.Array, config: KVQuantConfig) -> "PagedKV4":
    """An empty layer: codes 0, scales 1, zero points 0, every row's length 0."""
    head_group = check_kv_shape(head_dim, config)
    channel = config.k_mode == "channel"
    pool = (num_pages, page_size, num_kv_heads)
    codes = jnp.zeros(pool + (head_dim // 2,), jnp.uint8)
    token_scales = jnp.ones(pool + (head_dim // head_group,), jnp.float32)
    k_scales = jnp.ones((num_pages, num_kv_heads, head_dim), jnp.float32) if channel else token_scales
    recent = jnp.zeros((batch, page_size if channel else 0, num_kv_heads, head_dim), jnp.float32)
    return cls(k=codes, v=codes, k_scale=k_scales, k_zero=jnp.zeros_like(k_scales), v_scale=token_scales,
               v_zero=jnp.zeros_like(token_scales), k_recent=recent, length=jnp.zeros((batch,), jnp.int32),
               page_table=page_table, config=config)

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
    logical = jnp.clip(positions // self.page_size, 0, self.page_table.shape[1] - 1)
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
    fields = dict(v=self.v.at[page, slot].set(v_codes, mode="drop"),
                  v_scale=self.v_scale.at[page, slot].set(v_scale, mode="drop"),
                  v_zero=self.v_zero.at[page, slot].set(v_zero, mode="drop"), length=new_length)
    k32 = k_new.astype(jnp.float32)
    if self.config.k_mode == "channel":
      fields.update(self._write_channel_keys(k32, positions, valid, new_length))
    else:
      if self.config.k_mode == "hadamard":
        k32 = k32 @ hadamard_orthonormal(d)
      k_codes, k_scale, k_zero = quantize_kv_tensor(k32, self.head_group, integer_zero)
      fields.update(k=self.k.at[page, slot].set(k_codes, mode="drop"),
                    k_scale=self.k_scale.at[page, slot].set(k_scale, mode="drop"),
                    k_zero=self.k_zero.at[page, slot].set(k_zero, mode="drop"))
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
    recent = self.k_recent.at[rows, ring_slot].set(k32, mode="drop")  # [B, G, Hkv, D]
    completed = (new_length % g == 0) & (new_length > self.length)  # [B]
    group_page, _ = self.physical(jnp.where(completed, new_length - g, self.max_len)[:, None])
    group_page = group_page[:, 0]
    codes, scale, zero = quantize_asymmetric(recent, 4, axis=1,  # over the group's tokens
                                             integer_zero=self.config.integer_zero)
    return dict(k=self.k.at[group_page].set(pack_int4(codes, axis=-1), mode="drop"),
                k_scale=self.k_scale.at[group_page].set(scale[:, 0], mode="drop"),
                k_zero=self.k_zero.at[group_page].set(zero[:, 0], mode="drop"), k_recent=recent)

  def gather(self, pool: jax.Array) -> jax.Array:
    """A pool [P, page, ...] -> the rows' sequences [B, S, ...] through the page table."""
    pages = pool[jnp.maximum(self.page_table, 0)]  # [B, n, page, ...]; unallocated pages lie past length
    return pages.reshape(pages.shape[0], -1, *pages.shape[3:])

  def read_values(self) -> jax.Array:
    """[B, S, Hkv, D] float32 values as attention sees them."""
    return dequantize_kv_tensor(self.gather(self.v), self.gather(self.v_scale), self.gather(self.v_zero))

  def read_keys(self, lengths: jax.Array | None = None) -> jax.Array:
    """[B, S, Hkv, D] float32 keys as attention sees them; in channel mode the group of position
    lengths - 1 (default: the newest token) comes exact from k_recent."""
    codes = self.gather(self.k)
    if self.config.k_mode != "channel":
      keys = dequantize_kv_tensor(codes, self.gather(self.k_scale), self.gather(self.k_zero))
      return keys @ hadamard_orthonormal(keys.shape[-1]) if self.config.k_mode == "hadamard" else keys
    lengths = self.length if lengths is None else lengths
    g = self.page_size
    table = jnp.maximum(self.page_table, 0)
    scale = jnp.repeat(self.k_scale[table], g, axis=1)  # [B, n, Hkv, D] -> [B, S, Hkv, D]
    zero = jnp.repeat(self.k_zero[table], g, axis=1)
    keys = (unpack_int4(codes, axis=-1, signed=False).astype(jnp.float32) - zero) * scale
    positions = jnp.arange(self.max_len)
    open_group = (lengths - 1) // g  # [B]: the group of the newest token stays exact
    in_open = (positions[None, :] // g) == open_group[:, None]  # [B, S]
    recent = jnp.take(self.k_recent, positions % g, axis=1)  # [B, S, Hkv, D]
    return jnp.where(in_open[:, :, None, None], recent, keys)
