"""Matmul and attention entry points: every linear layer of every model calls `linear`.

A weight leaf is either a float array `[in, out]` or a quantized-weight pytree
(`cometjax.qtypes.QuantizedWeight`); `linear` dispatches on the leaf's type, so model code
is the same for bf16 and W4Ax.

`implementation` picks the backend for quantized leaves: "auto" (Pallas on GPU, XLA elsewhere),
"xla" (pure jnp reference path), "pallas" (compiled Pallas kernels: the Mosaic GPU GEMM on Hopper where it
tiles the shape, else the Triton-backend kernels), "interpret" (Pallas kernels in interpret mode, for CPU
tests). `attention_kv4` and `attention_paged_kv4` are the KV4 attention entries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "pallas", "interpret")


def check_implementation(implementation: str) -> str:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  return implementation


def resolve_implementation(implementation: str) -> str:
  """"auto" -> "pallas" on GPU, "xla" otherwise; other names pass through (validated)."""
  check_implementation(implementation)
  if implementation == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "xla"
  return implementation


def linear(x: jax.Array, weight, bias: jax.Array | None = None, *, implementation: str = "auto") -> jax.Array:
  """y = x @ weight (+ bias).  x: [..., in]; weight: float [in, out] or a quantized-weight leaf."""
  if hasattr(weight, "quantized_matmul"):
    # Quantized leaves implement their own matmul (see cometjax.qtypes); keeps this module free of
    # import cycles and lets new formats plug in without editing model code.
    y = weight.quantized_matmul(x, implementation=resolve_implementation(implementation))
  else:
    y = jnp.dot(x, weight.astype(x.dtype))
  if bias is not None:
    y = y + bias.astype(y.dtype)
  return y


def attention_kv4(q: jax.Array, kv, lengths: jax.Array, *, sm_scale: float | None = None,
                  implementation: str = "auto") -> jax.Array:
  """Causal GQA attention over an INT4 KV cache (`cometjax.qtypes.QuantizedKV`).

  q: [B, T, Hq, D], the last T positions of each row; lengths: int32 [B], valid cache tokens per row
  including the T new ones (already written to `kv`). Returns [B, T, Hq, D] in q's dtype.
  "pallas" / "interpret" run the Pallas kernel (decode and prefill alike); "xla", and caches the
  compiled kernel cannot tile (`kv4_attention.kernel_supported`), use the jnp reference (dequantize,
  then attend in f32).
  """
  from cometjax.pallas import kv4_attention  # the Pallas modules import jax.experimental.pallas

  implementation = resolve_implementation(implementation)
  if q.ndim != 4:
    raise ValueError(f"q must be [B, T, Hq, D], got shape {q.shape}")
  interpret = implementation == "interpret"
  if implementation == "xla" or not (interpret or kv4_attention.kernel_supported(kv)):
    return kv4_attention.kv4_attention_reference(q, kv, lengths, sm_scale=sm_scale)
  return kv4_attention.kv4_attention(q, kv, lengths, sm_scale=sm_scale, interpret=interpret)


def attention_paged_kv4(q: jax.Array, cache, layer: int, lengths: jax.Array | None = None, *,
                        sm_scale: float | None = None, implementation: str = "auto") -> jax.Array:
  """Decode attention (one query per row, GQA) over one layer of a paged INT4 cache (`KV4Cache`).

  q: [B, Hq, D], the newest token of each row, its key/value already written; lengths: int32 [B]
  visible keys per row (the query sits at lengths - 1), None for the cache's own length of `layer`.
  Returns [B, Hq, D] in q's dtype. "pallas" / "interpret" run `paged_kv4_attention` (flash-decoding over
  pages through the page table); "xla", and caches the compiled kernel cannot tile
  (`paged_kv4_attention.kernel_supported`), use the jnp reference (gather pages, dequantize, attend).
  """
  from cometjax.pallas import paged_kv4_attention as paged  # the Pallas modules import jax.experimental.pallas

  implementation = resolve_implementation(implementation)
  interpret = implementation == "interpret"
  if implementation == "xla" or not (interpret or paged.kernel_supported(cache)):
    return paged.paged_kv4_attention_reference(q, cache, layer, lengths, sm_scale=sm_scale)
  return paged.paged_kv4_attention(q, cache, layer, lengths, sm_scale=sm_scale, interpret=interpret)
