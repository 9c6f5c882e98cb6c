"""KV caches passed through the model: `update(layer, k, v, positions) -> (cache, keys, values)`.

A cache is a pytree (it travels through `jax.jit` and `lax.while_loop`); `update` writes the new
keys/values of one layer at their positions and returns the whole (dequantized) layer for attention.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Contiguous float cache.  k, v: [layers, batch, max_len, kv_heads, head_dim]."""
  k: jax.Array
  v: jax.Array

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
    k = self.k.at[layer, rows, positions].set(k_new.astype(self.k.dtype))
    v = self.v.at[layer, rows, positions].set(v_new.astype(self.v.dtype))
    return KVCache(k, v), k[layer], v[layer]
