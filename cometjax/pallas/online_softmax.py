"""The online-softmax (flash) step shared by the attention kernels' bodies."""

from __future__ import annotations

import jax.numpy as jnp


def online_softmax_step(max_prev, sum_prev, logits, valid, sm_scale):
  """One tile of keys: masked, scaled logits [rows, keys] -> (max, sum, correction, probs).

  max_prev, sum_prev: [rows] running max and normalizer; `valid` broadcasts against logits. The caller
  rescales its running outputs by `correction` and adds probs @ values (`accumulate_values`).
  """
  logits = jnp.where(valid, logits * sm_scale, jnp.finfo(jnp.float32).min)
  max_next = jnp.maximum(max_prev, jnp.max(logits, axis=1))
  correction = jnp.exp(max_prev - max_next)
  probs = jnp.where(valid, jnp.exp(logits - max_next[:, None]), 0.0)
  sum_next = correction * sum_prev + jnp.sum(probs, axis=1)
  return max_next, sum_next, correction, probs


def accumulate_values(outs, correction, probs, values, dot):
  """Running outputs (even, odd halves per head_dim group, flattened) rescaled and advanced by one tile.

  values: [(v_even, v_odd)] per group, each [keys, width]; dot: the kernel's matmul.
  """
  new_outs = []
  for g, (v_even, v_odd) in enumerate(values):
    new_outs.append(correction[:, None] * outs[2 * g] + dot(probs, v_even))
    new_outs.append(correction[:, None] * outs[2 * g + 1] + dot(probs, v_odd))
  return tuple(new_outs)


def merge_splits(maxes, sums, out_even, out_odd):
  """Flash-decoding's final reduction over key splits (axis 2) -> [B, Hkv, rows, D] normalized outputs.

  maxes, sums: [B, Hkv, splits, rows]; out_even, out_odd: [B, Hkv, splits, rows, D // 2] (even / odd
  head_dim channels). Rows that saw no key give 0.
  """
  global_max = jnp.max(maxes, axis=2, keepdims=True)  # [B, Hkv, 1, rows]
  correction = jnp.exp(maxes - global_max)  # [B, Hkv, splits, rows]
  total = jnp.sum(sums * correction, axis=2)  # [B, Hkv, rows]
  denominator = jnp.where(total > 0, total, 1.0)[..., None]
  out_even = jnp.sum(out_even * correction[..., None], axis=2) / denominator  # [B, Hkv, rows, D // 2]
  out_odd = jnp.sum(out_odd * correction[..., None], axis=2) / denominator
  b, h, rows, half = out_even.shape
  return jnp.stack([out_even, out_odd], axis=-1).reshape(b, h, rows, 2 * half)
