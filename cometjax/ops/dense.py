"""`linear(x, weight, bias)`: every linear layer of every model calls it, float or quantized.

A weight leaf is a float array [in, out] (plain `jnp.dot`) or a quantized leaf of `cometjax.core.formats`:
- `QuantizedWeight`: A16 (activation=None): dequantized, then a float dot (XLA only). W4Ax / W8Ax:
  x is permuted and quantized to the FMPQ layout (`quantize_act`), then multiplied with integer
  accumulation (`w4ax_matmul`; on a device whose validation table prefers it, `w4ax_matmul_sm90`, which reads
  K-major weights: `QuantizedWeight.layout == "nk"` avoids its per-call transpose).
  The Pallas GEMM takes 4-bit weights whose scale segments it can tile (`w4ax_matmul.pallas_supported`).
- `InputTransformWeight`: the input is transformed (pad, rotate, permute), then the inner weight runs.
- `StaticActQuantWeight`: XLA's int8 dot with int32 accumulation and the zero-point term.
- `DequantizedWeight`: a QuantizedWeight's float weight held for a loop; the input is quantized to its
  activation plan and the dequantized operands multiplied in float32 (XLA only); a small input transform
  may be folded into it as one matrix (`input_matrix`).

`linears(x, weights, biases)`: several projections of one input (q / k / v, gate / up). Held leaves that read
the input through the very same arrays (`models.llama.hold_dequantized_weights` with `shared_inputs` makes
them so) transform and quantize it once; every other leaf runs as `linear` would run it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cometjax.core.formats import (DequantizedWeight, InputTransformWeight, QuantizedWeight, StaticActQuantWeight,
                                   dequantize_weight, inner_weight, is_held, shares_input_arrays)
from cometjax.core.numerics import round_half_up
from cometjax.ops import registry


def linear(x: jax.Array, weight, bias: jax.Array | None = None, *, implementation: str = "auto") -> jax.Array:
  """y = x @ weight (+ bias).  x: [..., in]; weight: float [in, out] or a quantized leaf."""
  if isinstance(weight, InputTransformWeight):
    x, weight = weight.transform_input(x), weight.inner
  if isinstance(weight, (jax.Array, np.ndarray)):  # a float kernel
    registry.check_implementation(implementation)
    y = jnp.dot(x, weight.astype(x.dtype))
  else:
    name, backend = registry.select("linear", weight, implementation)
    y = backend.fn(x, weight, name)
  if bias is not None:
    y = y + bias.astype(y.dtype)
  return y


def _flatten(x: jax.Array, k: int) -> jax.Array:  # [..., K] -> [M, K]
  return x.reshape(-1, k)


def linears(x: jax.Array, weights, biases=None, *, implementations=None) -> list[jax.Array]:
  """[linear(x, w, b) for each weight]: one input, several projections.  x: [..., in]; biases: one per weight
  (None entries allowed); implementations: one per weight (default "auto").

  A held leaf (`DequantizedWeight`, alone or inside an `InputTransformWeight`) whose input arrays are the
  same objects as an earlier held leaf's reuses that leaf's quantized input: the same values, computed once
  (a CPU decode step then runs 4 input quantizations per layer instead of 7); when that first leaf holds
  the group's weights side by side (`joint_weight`), the group is one product."""
  biases = [None] * len(weights) if biases is None else list(biases)
  implementations = ["auto"] * len(weights) if implementations is None else list(implementations)
  if not len(biases) == len(implementations) == len(weights):
    raise ValueError(f"linears needs one bias and one implementation per weight: {len(weights)} weights, "
                     f"{len(biases)} biases, {len(implementations)} implementations")
  outs = [None] * len(weights)
  groups = {}  # index of a group's first held leaf -> indices of the held leaves reading its input arrays
  for i, (weight, implementation) in enumerate(zip(weights, implementations)):
    if not is_held(weight) or implementation not in ("auto", "xla"):  # linear raises for what cannot run
      outs[i] = linear(x, weight, biases[i], implementation=implementation)
      continue
    first = next((j for j in groups if shares_input_arrays(weights[j], weight)), i)
    groups.setdefault(first, []).append(i)
  for first, members in groups.items():
    x_hat = _held_input(x, weights[first])
    leader, held = inner_weight(weights[first]), [inner_weight(weights[i]) for i in members]
    widths = tuple(leaf.shape[1] for leaf in held)
    in_order = [leaf.joint_slot for leaf in held] == list(range(len(held)))  # the group, as it was joined
    if leader.joint_weight is not None and in_order and leader.joint_outputs == widths:
      ys = jnp.split(_held_product(x, x_hat, leader.joint_weight), np.cumsum(widths)[:-1].tolist(), axis=-1)
    else:
      ys = [_held_product(x, x_hat, leaf.weight) for leaf in held]
    for i, y in zip(members, ys):
      outs[i] = y if biases[i] is None else y + biases[i].astype(y.dtype)
  return outs


def _held_input(x, weight) -> jax.Array:
  """x [..., K] -> the held leaf's transformed, quantized and dequantized input, f32 [M, Kp] (permuted order)."""
  from cometjax.pallas import quantize_act
  if isinstance(weight, InputTransformWeight):
    x, weight = weight.transform_input(x), weight.inner
  x2d = _flatten(x, weight.shape[0])
  if weight.input_matrix is not None:  # the folded transform (permutation included), rounded to x's dtype as
    # the unfolded transform's output is (a bf16 model quantizes bf16 values)
    transformed = jnp.dot(x2d.astype(jnp.float32), weight.input_matrix, precision=jax.lax.Precision.HIGHEST)
    return quantize_act.dequantized_act_reference(transformed.astype(x.dtype), None, weight.activation)
  if weight.activation is None:
    return x2d if weight.perm is None else jnp.take(x2d, weight.perm, axis=1)
  return quantize_act.dequantized_act_reference(x2d, weight.perm, weight.activation)


def _held_product(x, x_hat, weight: jax.Array) -> jax.Array:
  """x_hat [M, Kp] @ a held weight [Kp, N] -> [..., N] in x's dtype (x: the layer's input, for shape and dtype)."""
  y = jnp.dot(x_hat.astype(jnp.float32), weight, precision=jax.lax.Precision.HIGHEST)
  return y.astype(x.dtype).reshape(*x.shape[:-1], weight.shape[1])


def _quantized_weight_xla(x, qw: QuantizedWeight, implementation: str):
  from cometjax.pallas import quantize_act, w4ax_matmul
  qw.check_arrays()
  qw.check_input(x)
  k, n = qw.shape
  x2d = _flatten(x, k)
  if qw.activation is None:  # weight-only: dequantize, multiply in float
    w = dequantize_weight(qw).astype(x.dtype)  # [K, N] permuted rows
    y = jnp.dot(qw.permute_input(x2d), w, preferred_element_type=jnp.float32).astype(x.dtype)
  else:
    qx = quantize_act.quantize_act_reference(x2d, qw.perm, qw.activation)
    # float32 segment sums where they are exact: int8 dots are the slow part of quantized decode on CPU
    y = w4ax_matmul.w4ax_matmul_reference(qx, qw, out_dtype=x.dtype,
                                          float_sums=w4ax_matmul.float_sums_are_exact(qw))
  return y.reshape(*x.shape[:-1], n)


def _quantized_weight_pallas(x, qw: QuantizedWeight, implementation: str):
  from cometjax.pallas import quantize_act, w4ax_matmul, w4ax_matmul_sm90
  qw.check_arrays()
  qw.check_input(x)
  k, n = qw.shape
  x2d = _flatten(x, k)
  interpret = implementation == "interpret"
  qx = quantize_act.quantize_act(x2d, qw.perm, fmt=qw.activation, interpret=interpret)
  if (not interpret and registry.preferred_kernel("w4ax_matmul") == "w4ax_matmul_sm90"
      and w4ax_matmul_sm90.shape_supported(qw)):
    y = w4ax_matmul_sm90.w4ax_matmul_sm90(qx, qw, out_dtype=x.dtype)
  else:  # the Triton kernel reads [K // 2, N]: a K-major ("nk") weight pays a transpose here
    y = w4ax_matmul.w4ax_matmul(qx, qw.with_layout("kn"), out_dtype=x.dtype, interpret=interpret)
  return y.reshape(*x.shape[:-1], n)


def _no_kernel_for(qw: QuantizedWeight) -> str | None:
  """Why no Pallas GEMM serves this weight in any mode (None: the kernels serve it in interpret mode)."""
  if qw.activation is None:
    return "weight-only (A16) weights are dequantized in XLA; no Pallas kernel serves them"
  if qw.bits != 4:
    return f"the Pallas W4Ax GEMM takes 4-bit weights, this one has bits={qw.bits}"
  return None


def _not_compilable(qw: QuantizedWeight) -> str | None:
  from cometjax.pallas import w4ax_matmul
  reason = _no_kernel_for(qw)
  if reason is None and not w4ax_matmul.pallas_supported(qw):
    reason = (f"the compiled GEMM cannot tile it (out_features={qw.out_features} must be a multiple of 16, "
              f"block_size / group_size multiples of 64; activation={qw.activation}, group_size={qw.group_size})")
  return reason


def _dequantized_weight_xla(x, leaf: DequantizedWeight, implementation: str):
  return _held_product(x, _held_input(x, leaf), leaf.weight)


def _static_act_xla(x, leaf: StaticActQuantWeight, implementation: str):
  x_int = leaf.quantize_input(x)  # int8 [..., K]
  accumulator = jnp.dot(x_int, leaf.integer_weight(), preferred_element_type=jnp.int32)  # [..., N]
  zero = round_half_up(leaf.act_zero).astype(jnp.int32)
  accumulator = accumulator - zero * leaf.column_sums
  return accumulator.astype(jnp.float32) * (leaf.act_step * leaf.weight_scale[0])


registry.register("linear", QuantizedWeight, "xla", _quantized_weight_xla)
registry.register("linear", QuantizedWeight, "pallas", _quantized_weight_pallas, unsupported=_not_compilable,
                  kernels=("quantize_act", "w4ax_matmul"))
registry.register("linear", QuantizedWeight, "interpret", _quantized_weight_pallas, unsupported=_no_kernel_for)
registry.register("linear", StaticActQuantWeight, "xla", _static_act_xla)
registry.register("linear", DequantizedWeight, "xla", _dequantized_weight_xla)
