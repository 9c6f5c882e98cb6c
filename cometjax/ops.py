"""Matmul and attention entry points: every linear layer of every model calls `linear`.

A weight leaf is either a float array `[in, out]` or a quantized-weight pytree
(`cometjax.qtypes.QuantizedWeight`); `linear` dispatches on the leaf's type, so model code
is the same for bf16 and W4Ax.

`implementation` picks the backend for quantized leaves: "auto" (Pallas on GPU, XLA elsewhere),
"xla" (pure jnp reference path), "pallas" (compiled Pallas kernels), "interpret" (Pallas kernels in
interpret mode, for CPU tests).
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
