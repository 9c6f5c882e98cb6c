"""GPTQ (Frantar et al. 2023) for weights in the [in=K, out=N] layout, with fixed scales.

Rows of W are input channels. Input rows are quantized one at a time (in order of decreasing Hessian
diagonal with act_order); the rounding error of row i, divided by the i-th diagonal entry of the upper
Cholesky factor U of H^-1, is spread over the not yet quantized rows: W[j] -= U[i, j] * err for j > i.
H = sum x x^T over calibration tokens, damped by damp * mean(diag H). Scales are fixed before the sweep
(from `cometjax.quant.clipping.mse_clip_ratios`), so act_order and groups combine freely. Dead channels (zero
Hessian diagonal: never active, e.g. zero padding) get weight 0. Runs in numpy float64 (fine for the
layer sizes of the models tested here; a blocked device version is the path to 7B-size layers). One layer
at a time: the float64 copies of W and H live only while that layer is swept.
"""

from __future__ import annotations

import numpy as np

from cometjax.core.numerics import signed_range, symmetric_qmax


def gptq_codes(w: np.ndarray, hessian: np.ndarray, scales: np.ndarray, bits: int, *,
               damp: float = 0.01, act_order: bool = True, zeros: np.ndarray | None = None) -> np.ndarray:
  """Integer codes int8 [K, N] for w [K, N] with per-group scales [G, N] (and float zero points [G, N] for
  the asymmetric grid w ~= scale * (q - zero), q in [-2**(bits-1), 2**(bits-1) - 1]) and Hessian [K, K]."""
  w = np.array(w, np.float64)
  h = np.array(hessian, np.float64)
  k, n = w.shape
  if h.shape != (k, k):
    raise ValueError(f"hessian must be [{k}, {k}] to match w {list(w.shape)}, got {list(h.shape)}")
  if scales.ndim != 2 or scales.shape[1] != n or k % scales.shape[0]:
    raise ValueError(f"scales must be [G, {n}] with G dividing {k}, got {list(scales.shape)}")
  if zeros is not None and np.shape(zeros) != np.shape(scales):
    raise ValueError(f"zeros must be shaped like scales {list(np.shape(scales))}, got {list(np.shape(zeros))}")
  for name, a in (("w", w), ("hessian", h), ("scales", scales)) + ((("zeros", zeros),) if zeros is not None else ()):
    if not np.all(np.isfinite(a)):
      raise ValueError(f"{name} holds NaN/Inf values")
  if damp <= 0:
    raise ValueError(f"damp must be > 0, got {damp}")
  if zeros is None:
    qmin, qmax = -symmetric_qmax(bits), symmetric_qmax(bits)
    row_zeros = np.zeros((k, n))
  else:
    qmin, qmax = signed_range(bits)
    row_zeros = np.repeat(np.asarray(zeros, np.float64), k // scales.shape[0], axis=0)  # [K, N]
  row_scales = np.repeat(np.asarray(scales, np.float64), k // scales.shape[0], axis=0)  # [K, N]
  diag = np.diag(h).copy()
  dead = diag <= 0
  h[dead, dead] = 1.0
  w[dead] = 0.0
  order = np.argsort(-diag, kind="stable") if act_order else np.arange(k)
  w, h, row_scales, row_zeros = w[order], h[order][:, order], row_scales[order], row_zeros[order]
  h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
  u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = U^T U
  codes = np.zeros((k, n), np.int8)
  for i in range(k):
    q = np.clip(np.floor(w[i] / row_scales[i] + row_zeros[i] + 0.5), qmin, qmax)
    codes[i] = q
    err = (w[i] - (q - row_zeros[i]) * row_scales[i]) / u[i, i]
    w[i + 1:] -= np.outer(u[i, i + 1:], err)
  out = np.zeros_like(codes)
  out[order] = codes
  return out
