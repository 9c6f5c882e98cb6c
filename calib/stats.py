"""Activation statistics of every quantized linear layer over calibration batches (streamed).

`collect_stats(model, config, windows)` runs the float model (rotated first when config.rotation asks
for it, exactly as `cometjax.quant.transform.quantize` will) over batches of token windows. Each linear
layer's kernel is temporarily swapped for a capturing leaf (registered with `cometjax.ops`) that hands its
input back as an output of the jitted forward pass; the input is transformed as the quantized leaf will
transform it (zero padding, online rotation; `cometjax.quant.fmpq.InputPlan`) and reduced inside the same
jit to
  absmax  [Kp]      max |x| per input channel
  sumsq   [Kp]      sum x^2 per input channel (RMS ranking)
  hessian [Kp, Kp]  sum x x^T (GPTQ), when asked for
  samples [S, Kp]   a fixed random subset of token rows (learned clipping), when asked for
so only the reductions leave the device. Layers that read one input under one plan (q/k/v, gate/up)
share one `LayerStats` (one Hessian). Non-finite activations raise, naming the layer and the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from cometjax import ops
from cometjax.quant.config import QuantConfig
from cometjax.quant.fmpq import InputPlan, input_plan
from cometjax.quant.transform import prepare_model
from cometjax.quant.tree import linear_layers, node_at


@dataclasses.dataclass
class LayerStats:
  absmax: np.ndarray  # f32 [Kp]
  sumsq: np.ndarray  # f64 [Kp]
  count: int  # token rows seen
  hessian: np.ndarray | None = None  # f64 [Kp, Kp], sum of x x^T
  samples: np.ndarray | None = None  # f32 [S, Kp]

  @property
  def rms(self) -> np.ndarray:
    return np.sqrt(self.sumsq / max(self.count, 1))


@dataclasses.dataclass
class CalibrationStats:
  layers: dict[str, LayerStats]
  rotation: str | None  # the config.rotation the statistics were collected under
  num_tokens: int

  def layer(self, name: str) -> LayerStats:
    if name not in self.layers:
      raise ValueError(f"stats are missing for layer {name!r} (have {len(self.layers)} layers: "
                       f"{sorted(self.layers)[:4]}...); collect them with the same model and config")
    return self.layers[name]


# ------------------------------------------------------------------------------------------------
# Calibration data


def calibration_windows(tokenizer, documents: Sequence[str], window: int = 512,
                        max_windows: int | None = None) -> np.ndarray:
  """int32 [n, window]: documents tokenized with the tokenizer's own BOS rule, concatenated, cut into full
  windows (the first `max_windows` of them)."""
  if window < 2:
    raise ValueError(f"window must be >= 2, got {window}")
  stream = [i for doc in documents for i in tokenizer.encode(doc)]
  n = len(stream) // window
  if n == 0:
    raise ValueError(f"calibration text gives {len(stream)} tokens, fewer than one window of {window}")
  if max_windows is not None:
    n = min(n, max_windows)
  return np.asarray(stream[:n * window], np.int32).reshape(n, window)


# ------------------------------------------------------------------------------------------------
# Capture


_SINKS: list[list] = []


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CaptureWeight:
  """A float kernel that records its input while tracing (only inside `collect_stats`)."""
  kernel: jax.Array  # [K, N]
  name: str = dataclasses.field(metadata=dict(static=True))


def _capturing_matmul(x, weight: CaptureWeight, implementation: str):
  if _SINKS:
    _SINKS[-1].append((weight.name, x))
  return jnp.dot(x, weight.kernel.astype(x.dtype))


for _implementation in ("xla", "pallas", "interpret"):  # capture whatever backend the model was set to
  ops.register("linear", CaptureWeight, _implementation, _capturing_matmul)


def _batch_stats(graphdef, state, tokens, sample_rows, *, plans: tuple, want_hessian: bool, order: list,
                 aliases: dict):
  """Reductions of each distinct layer input; layers reading the same input under the same plan (q/k/v,
  gate/up) are reduced once and listed in `aliases` (name -> the name holding their statistics)."""
  plans = dict(plans)
  sink: list = []
  _SINKS.append(sink)
  try:
    nnx.merge(graphdef, state)(tokens)
  finally:
    _SINKS.pop()
  order[:] = [name for name, _ in sink]  # forward order, so errors name the first bad layer
  out, first_reader = {}, {}
  for name, x in sink:
    plan: InputPlan = plans[name]
    holder = first_reader.setdefault((id(x), plan), name)
    if holder != name:
      aliases[name] = holder
      continue
    x2 = plan.transform(x.reshape(-1, x.shape[-1]).astype(jnp.float32))  # [M, Kp]
    d = dict(absmax=jnp.max(jnp.abs(x2), axis=0), sumsq=jnp.sum(x2 * x2, axis=0),
             finite=jnp.all(jnp.isfinite(x2)))
    if want_hessian:
      d["hessian"] = jnp.dot(x2.T, x2, precision=jax.lax.Precision.HIGHEST)
    if sample_rows is not None:
      d["samples"] = x2[sample_rows]
    out[name] = d
  return out


def _check_windows(windows, vocab: int, batch_size: int) -> np.ndarray:
  windows = np.asarray(windows)
  if windows.ndim != 2 or windows.shape[0] == 0 or not np.issubdtype(windows.dtype, np.integer):
    raise ValueError(f"windows must be a non-empty int array [num_windows, window], got "
                     f"{windows.dtype} {windows.shape}")
  if windows.min() < 0 or windows.max() >= vocab:
    raise ValueError(f"windows hold token ids outside [0, {vocab}): min {windows.min()}, max {windows.max()}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  return windows


def _capturing_model(model, config: QuantConfig):
  """(graphdef, state, input plans): the model quantize() will see, every layer it quantizes capturing."""
  graphdef, state = nnx.split(prepare_model(model, config))
  pure = nnx.to_pure_dict(state)
  plans = {}
  for name, path in linear_layers(pure).items():
    if not config.quantizes(name):
      continue
    node = node_at(pure, path)
    kernel = node["kernel"]
    plans[name] = input_plan(name, kernel.shape[0], config)
    node["kernel"] = CaptureWeight(kernel=jnp.asarray(kernel), name=name)
  if not plans:
    raise ValueError("config quantizes no linear layer of this model (check keep_float)")
  nnx.replace_by_pure_dict(state, pure)
  return graphdef, state, plans


def collect_stats(model, config: QuantConfig, windows: np.ndarray, *, batch_size: int = 8,
                  hessian: bool | None = None, max_samples: int | None = None, seed: int = 0,
                  progress: bool = True) -> CalibrationStats:
  """Statistics of every layer `config` quantizes, over `windows` (int [n, T] token ids).

  hessian / max_samples default to what config.weights.method needs (GPTQ: Hessian; learned clipping:
  2048 sampled token rows per layer).
  """
  windows = _check_windows(windows, model.config.vocab_size, batch_size)
  weights = config.weights
  if hessian is None:
    hessian = weights is not None and weights.needs_hessian
  if max_samples is None:
    max_samples = 2048 if weights is not None and weights.needs_samples else 0
  graphdef, state, plans = _capturing_model(model, config)

  num_batches = math.ceil(len(windows) / batch_size)
  tokens_per_batch = batch_size * windows.shape[1]
  rows_per_batch = min(tokens_per_batch, math.ceil(max_samples / num_batches)) if max_samples else 0
  order: list = []
  aliases: dict = {}
  fn = jax.jit(functools.partial(_batch_stats, plans=tuple(sorted(plans.items())), want_hessian=hessian,
                                 order=order, aliases=aliases))
  rng = np.random.default_rng(seed)
  acc: dict[str, dict] = {}
  count = 0
  bar = tqdm(total=num_batches, desc="calibration stats", unit="batch", disable=not progress)
  for b in range(num_batches):
    batch = windows[b * batch_size:(b + 1) * batch_size]
    valid_rows = len(batch) * windows.shape[1]
    if len(batch) < batch_size:  # fixed shape (one compilation): repeat rows, count only the real ones
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - len(batch), axis=0)])
    sample_rows = (np.sort(rng.choice(valid_rows, size=min(rows_per_batch, valid_rows), replace=False))
                   if rows_per_batch else None)
    if sample_rows is not None and len(sample_rows) < rows_per_batch:  # keep the shape
      sample_rows = np.resize(sample_rows, rows_per_batch)
    result = jax.device_get(fn(graphdef, state, jnp.asarray(batch, jnp.int32),
                               None if sample_rows is None else jnp.asarray(sample_rows)))
    partial_batch = valid_rows < tokens_per_batch
    if partial_batch:  # the repeated rows would bias sums: recompute exactly on the real rows only
      result = _exact_partial(fn, graphdef, state, windows[b * batch_size:], sample_rows, result, batch_size)
    for name in order:
      if name in aliases:
        continue
      d = result[name]
      if not bool(d["finite"]):
        raise ValueError(f"calibration activations of layer {name!r} hold NaN/Inf (batch {b}); check the "
                         "model weights and the calibration data")
      a = acc.setdefault(name, dict(absmax=None, sumsq=0.0, hessian=0.0, samples=[]))
      a["absmax"] = d["absmax"] if a["absmax"] is None else np.maximum(a["absmax"], d["absmax"])
      a["sumsq"] = a["sumsq"] + np.asarray(d["sumsq"], np.float64)
      if hessian:
        a["hessian"] = a["hessian"] + np.asarray(d["hessian"], np.float64)
      if sample_rows is not None:
        a["samples"].append(np.asarray(d["samples"]))
    count += valid_rows
    bar.update(1)
  bar.close()
  layers = {}
  for name, a in acc.items():
    samples = np.concatenate(a["samples"])[:max_samples] if a["samples"] else None
    layers[name] = LayerStats(absmax=np.asarray(a["absmax"], np.float32), sumsq=a["sumsq"], count=count,
                              hessian=a["hessian"] if hessian else None, samples=samples)
  for name, holder in aliases.items():  # one object per distinct input: no second copy of its Hessian
    layers[name] = layers[holder]
  return CalibrationStats(layers=layers, rotation=config.rotation, num_tokens=count)


def _exact_partial(fn, graphdef, state, rows, sample_rows, result, batch_size):
  """Sums over only the real windows of a short last batch: subtract the repeated padding windows."""
  real = len(rows)
  repeat = np.repeat(rows[-1:], batch_size, axis=0)
  padded_only = jax.device_get(fn(graphdef, state, jnp.asarray(repeat, jnp.int32),
                                  None if sample_rows is None else jnp.asarray(sample_rows)))
  fraction = (batch_size - real) / batch_size  # share of the padded batch that is the repeated window
  for name, d in result.items():
    p = padded_only[name]
    d["sumsq"] = np.asarray(d["sumsq"], np.float64) - fraction * np.asarray(p["sumsq"], np.float64)
    if "hessian" in d:
      d["hessian"] = np.asarray(d["hessian"], np.float64) - fraction * np.asarray(p["hessian"], np.float64)
  return result
