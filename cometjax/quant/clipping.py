"""Weight clipping: per-output-channel (or per-group) clip ratios for weight quantization.

Weights are [K, N] ([in, out]); a scale group is `group_size` consecutive input rows of one output
column (group_size None: the whole column). With clip ratio r a symmetric grid has scale r * max|w| / qmax;
an asymmetric one (float zero point, `cometjax.core.numerics.quantize_asymmetric_signed`) spans
[r * min, r * max].

- `mse_clip_ratios`: grid search of r minimizing the (optionally Hessian-diagonal weighted) squared
  weight error, per group.
- `learn_clip_ratios`: OmniQuant's learnable weight clipping (LWC). r = sigmoid(theta), trained with
  Optax Adam and a straight-through rounding estimator to minimize ||X W - Q(X) Q_r(W)||^2 / ||X W||^2 on
  calibration activations X, where Q(X) is the layer's own FMPQ activation quantization, so the clip
  factors also absorb activation error. Initialized at the mse search result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cometjax.core.formats import ActivationFormat
from cometjax.core.numerics import asymmetric_signed_params, quantize_with_zero, round_half_up, symmetric_qmax
from cometjax.pallas.quantize_act import quantize_act_reference


def _groups(k: int, group_size: int | None) -> int:
  if group_size is None:
    return 1
  if k % group_size:
    raise ValueError(f"group_size={group_size} must divide in_features={k}")
  return k // group_size


def group_absmax(w, group_size: int | None):  # [K, N] -> [G, N]
  k, n = w.shape
  g = _groups(k, group_size)
  return jnp.max(jnp.abs(w.reshape(g, k // g, n)), axis=1)


def expand_groups(s, k: int):  # [G, N] -> [K, N]
  return jnp.repeat(s, k // s.shape[0], axis=0)


def scales_from_ratios(w, ratios, bits: int, group_size: int | None):
  amax = group_absmax(w, group_size) * ratios
  return jnp.where(amax > 0, amax / symmetric_qmax(bits), 1.0)


def grid_from_ratios(w, ratios, bits: int, group_size: int | None, symmetric: bool = True,
                     integer_zero: bool = False):
  """(scales [G, N], zeros [G, N] or None) of the clipped grid: symmetric, or asymmetric over [r min, r max]
  (integer_zero: over [min(r min, 0), max(r max, 0)] with the zero point rounded to an integer code)."""
  if symmetric:
    return scales_from_ratios(w, ratios, bits, group_size), None
  k, n = w.shape
  g = _groups(k, group_size)
  grouped = w.reshape(g, k // g, n)
  return asymmetric_signed_params(jnp.min(grouped, axis=1) * ratios, jnp.max(grouped, axis=1) * ratios, bits,
                                  integer_zero)


def quantize_codes(w, scales, bits: int, zeros=None):
  """int8 codes [K, N] with scales [G, N]: clip(round_half_up(w / scale), -qmax, qmax), or with zeros [G, N]
  clip(round_half_up(w / scale + zero), -2**(bits-1), 2**(bits-1) - 1)."""
  k = w.shape[0]
  if zeros is not None:
    return quantize_with_zero(w, expand_groups(scales, k), expand_groups(zeros, k), bits)
  q = symmetric_qmax(bits)
  return jnp.clip(round_half_up(w / expand_groups(scales, k)), -q, q).astype(jnp.int8)


def dequantize_codes(codes, scales, zeros=None):
  """Float [K, N] of integer codes [K, N]: scale * (q - zero) per group."""
  k = codes.shape[0]
  values = codes.astype(jnp.float32)
  if zeros is not None:
    values = values - expand_groups(zeros, k)
  return values * expand_groups(scales, k)


def _check_finite(name: str, a) -> None:
  if not np.all(np.isfinite(np.asarray(a))):
    raise ValueError(f"{name} holds NaN/Inf values")


def mse_clip_ratios(w, bits: int, group_size: int | None, grid: int = 20, row_weights=None,
                    min_ratio: float = 0.5, symmetric: bool = True, integer_zero: bool = False):
  """Per-group clip ratio in {1, 1 - (1-min_ratio)/grid, ..., min_ratio} minimizing the squared error of the
  symmetric (or asymmetric) grid.

  w: [K, N]; row_weights: optional [K] non-negative weights per input row (e.g. the Hessian diagonal).
  Returns f32 [G, N].
  """
  w = jnp.asarray(w, jnp.float32)
  _check_finite("w", w)
  k, n = w.shape
  g = _groups(k, group_size)
  rw = jnp.ones((k,), jnp.float32) if row_weights is None else jnp.asarray(row_weights, jnp.float32)
  best_err = jnp.full((g, n), jnp.inf)
  best = jnp.ones((g, n), jnp.float32)
  for i in range(grid + 1):
    r = 1.0 - (1.0 - min_ratio) * i / grid
    s, z = grid_from_ratios(w, jnp.full((g, n), r), bits, group_size, symmetric, integer_zero)
    err = (w - dequantize_codes(quantize_codes(w, s, bits, z), s, z)) ** 2 * rw[:, None]
    err = err.reshape(g, k // g, n).sum(axis=1)
    better = err < best_err
    best = jnp.where(better, r, best)
    best_err = jnp.where(better, err, best_err)
  return best


def fake_quantize_fmpq(x, fmt: ActivationFormat | None):
  """x [M, Kp] (already permuted) -> the per-token FMPQ quantize-dequantize of x (None: unchanged): the
  codes and scales of `quantize_act_reference`, multiplied back."""
  if fmt is None:
    return x
  return quantize_act_reference(x, None, fmt).dequantize()


def learn_clip_ratios(w, x, bits: int, group_size: int | None, act_format: ActivationFormat | None = None,
                      steps: int = 200, learning_rate: float = 5e-3, init_ratios=None):
  """Learned clip ratios f32 [G, N] for w [K, N] on activations x [S, K] (both in the same row order)."""
  w = jnp.asarray(w, jnp.float32)
  x = jnp.asarray(x, jnp.float32)
  _check_finite("w", w)
  _check_finite("calibration activations x", x)
  if x.ndim != 2 or x.shape[1] != w.shape[0]:
    raise ValueError(f"x must be [samples, {w.shape[0]}] to match w {list(w.shape)}, got {list(x.shape)}")
  if x.shape[0] == 0:
    raise ValueError("x holds no calibration rows")
  k, n = w.shape
  g = _groups(k, group_size)
  if init_ratios is None:
    init_ratios = jnp.ones((g, n), jnp.float32)
  init = jnp.clip(jnp.asarray(init_ratios, jnp.float32), 0.05, 0.995)
  theta0 = jnp.log(init / (1.0 - init))
  target = x @ w  # [S, N]
  xq = fake_quantize_fmpq(x, act_format)
  norm = jnp.mean(target**2) + 1e-12
  amax = group_absmax(w, group_size)
  qmax = symmetric_qmax(bits)

  def loss_fn(theta):
    s = jnp.maximum(jax.nn.sigmoid(theta) * amax / qmax, 1e-12)
    v = w / expand_groups(s, k)
    rounded = v + jax.lax.stop_gradient(round_half_up(v) - v)
    wq = jnp.clip(rounded, -qmax, qmax) * expand_groups(s, k)
    return jnp.mean((target - xq @ wq) ** 2) / norm

  opt = optax.adam(learning_rate)

  @jax.jit
  def train(theta):
    def step(carry, _):
      theta, state, best_theta, best_loss = carry
      loss, grad = jax.value_and_grad(loss_fn)(theta)
      better = loss < best_loss
      best_theta = jnp.where(better, theta, best_theta)
      best_loss = jnp.where(better, loss, best_loss)
      updates, state = opt.update(grad, state)
      return (optax.apply_updates(theta, updates), state, best_theta, best_loss), loss

    carry = (theta, opt.init(theta), theta, jnp.inf)
    (theta, _, best_theta, best_loss), _ = jax.lax.scan(step, carry, None, length=steps)
    final = loss_fn(theta)
    return jnp.where(final < best_loss, theta, best_theta)

  theta = train(theta0) if steps > 0 else theta0
  return jax.nn.sigmoid(theta)
