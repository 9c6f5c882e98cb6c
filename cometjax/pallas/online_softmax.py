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
