"""Attention over INT4 KV caches: `attention_kv4` (contiguous `QuantizedKV`, decode and prefill) and
`attention_paged_kv4` (decode over one layer of a paged pool, `PagedKV4`). "xla" runs each kernel's jnp
reference (dequantize, then attend in f32); "pallas" / "interpret" the Pallas kernels.
"""

from __future__ import annotations

import jax

from cometjax.core.kv import PagedKV4, QuantizedKV
from cometjax.ops import registry


def attention_kv4(q: jax.Array, kv: QuantizedKV, lengths: jax.Array, *, sm_scale: float | None = None,
                  implementation: str = "auto") -> jax.Array:
  """Causal GQA attention over an INT4 KV cache.

  q: [B, T, Hq, D], the last T positions of each row; lengths: int32 [B], valid cache tokens per row
  including the T new ones (already written to `kv`). Returns [B, T, Hq, D] in q's dtype.
  """
  if q.ndim != 4:
    raise ValueError(f"q must be [B, T, Hq, D], got shape {q.shape}")
  name, backend = registry.select("attention_kv4", kv, implementation)
  return backend.fn(q, kv, lengths, sm_scale, name)


def attention_paged_kv4(q: jax.Array, kv: PagedKV4, lengths: jax.Array | None = None, *,
                        sm_scale: float | None = None, implementation: str = "auto") -> jax.Array:
  """Decode attention (one query per row, GQA) over one layer of a paged INT4 cache.

  q: [B, Hq, D], the newest token of each row, its key/value already written; lengths: int32 [B]
  visible keys per row (the query sits at lengths - 1), None for the layer's own length.
  Returns [B, Hq, D] in q's dtype.
  """
  name, backend = registry.select("attention_paged_kv4", kv, implementation)
  return backend.fn(q, kv, lengths, sm_scale, name)


def _kv4_reference(q, kv, lengths, sm_scale, implementation):
  from cometjax.pallas import kv4_attention
  return kv4_attention.kv4_attention_reference(q, kv, lengths, sm_scale=sm_scale)


def _kv4_kernel(q, kv, lengths, sm_scale, implementation):
  from cometjax.pallas import kv4_attention
  return kv4_attention.kv4_attention(q, kv, lengths, sm_scale=sm_scale, interpret=implementation == "interpret")


def _kv4_untileable(kv: QuantizedKV) -> str | None:
  from cometjax.pallas import kv4_attention
  if kv4_attention.kernel_supported(kv):
    return None
  return (f"the compiled kernel needs a cache length that is a multiple of 16 and head_dim groups of >= 32 "
          f"channels (cache length {kv.k.shape[1]}, group {kv.group_size})")


def _paged_reference(q, kv, lengths, sm_scale, implementation):
  from cometjax.pallas import paged_kv4_attention
  return paged_kv4_attention.paged_kv4_attention_reference(q, kv, lengths, sm_scale=sm_scale)


def _paged_kernel(q, kv, lengths, sm_scale, implementation):
  from cometjax.pallas import paged_kv4_attention
  return paged_kv4_attention.paged_kv4_attention(q, kv, lengths, sm_scale=sm_scale,
                                                 interpret=implementation == "interpret")


def _paged_untileable(kv: PagedKV4) -> str | None:
  from cometjax.pallas import paged_kv4_attention
  if paged_kv4_attention.kernel_supported(kv):
    return None
  return (f"the compiled kernel needs a power-of-two page_size and head_dim and head_group >= 32 "
          f"(page_size={kv.page_size}, head_dim={kv.head_dim}, head_group={kv.head_group})")


registry.register("attention_kv4", QuantizedKV, "xla", _kv4_reference)
registry.register("attention_kv4", QuantizedKV, "pallas", _kv4_kernel, unsupported=_kv4_untileable,
                  kernels=("kv4_attention",))
registry.register("attention_kv4", QuantizedKV, "interpret", _kv4_kernel)
registry.register("attention_paged_kv4", PagedKV4, "xla", _paged_reference)
registry.register("attention_paged_kv4", PagedKV4, "pallas", _paged_kernel, unsupported=_paged_untileable,
                  kernels=("paged_kv4_attention",))
registry.register("attention_paged_kv4", PagedKV4, "interpret", _paged_kernel)
