"""Post-training quantization base for the diffusion models (Q-Diffusion style).

1. `build_calibration_set`: (x_t, t, label) pairs sampled from DDIM or DDPM paths of the float model, with
   the float model's noise prediction there (the target of QuEST's global loss).
2. `record_layer_inputs`: the float inputs of every quantizable layer/matmul on the calibration set.
3. `calibrate_activations`: per timestep group, the (step, zero point) of every activation quantizer by
   an MSE search over clipping ranges.
4. `adaround_layers`: layer-wise AdaRound. For each linear/conv layer, learn the rounding variable V so
   that the layer with fake-quantized inputs and softly rounded weights reproduces the float layer's
   output on its float inputs (reconstruction MSE + annealed rounding regulariser, Optax Adam). Then the
   hard rounding is folded into the weights. Layer-wise (not block-wise) keeps it to seconds per layer on
   a CPU; blocks are what QuEST's finetuning then aligns end to end.

`run_ptq` chains the steps and is the `w4a4-ptq` / `w4a8` / `w8a8` baseline.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from cometjax.core.numerics import signed_range
from cometjax.diffusion.attach import attach_quantizers, named_modules, set_recording
from cometjax.diffusion.config import DiffusionQuantConfig
from cometjax.diffusion.quantizers import ActQuantizer, AdaRoundParam, rectified_sigmoid
from cometjax.diffusion.sampling import NoiseSchedule, ddim_trajectory, ddpm_trajectory, predict_noise
from cometjax.models.cnn_ddpm import QuantConv
from cometjax.models.layers import QuantLinear, QuantMatmul


CALIBRATION_SAMPLERS = ("ddim", "ddpm")


@dataclass(frozen=True)
class CalibrationConfig:
  num_trajectories: int = 64  # paths of the float model (labels cycle 0..9 for the DiT)
  steps: int = 25  # timesteps recorded per path: DDIM's grid, or every (num_steps / steps)-th DDPM step
  num_samples: int = 512  # (x_t, t) pairs kept, drawn uniformly from all paths and recorded steps
  record_samples: int = 128  # of those, how many feed activation ranges and AdaRound
  eta: float = 0.0  # DDIM eta of the calibration paths (1.0: ancestral)
  # "ddim": strided DDIM paths; "ddpm": the checkpoint's own ancestral sampler over every timestep, so the
  # states are those the evaluation sampler visits
  sampler: str = "ddim"
  seed: int = 0

  def __post_init__(self):
    if self.sampler not in CALIBRATION_SAMPLERS:
      raise ValueError(f"sampler must be one of {CALIBRATION_SAMPLERS}, got {self.sampler!r}")
    if self.record_samples > self.num_samples:
      raise ValueError(f"record_samples ({self.record_samples}) must be <= num_samples ({self.num_samples})")
    if self.num_samples > self.num_trajectories * self.steps:
      raise ValueError(f"num_samples must be <= num_trajectories * steps = "
                       f"{self.num_trajectories * self.steps}, got {self.num_samples}")


@dataclass
class CalibrationSet:
  x: np.ndarray  # [N, 1, 28, 28] noisy inputs
  index: np.ndarray  # int32 [N] timestep indices
  labels: np.ndarray | None  # int32 [N] (DiT) or None
  eps: np.ndarray  # [N, 1, 28, 28] float model's noise prediction
  # DiT only (`with_other_labels`): another class per sample and the float eps at (x, t, that class)
  other_labels: np.ndarray | None = None  # int32 [N]
  other_eps: np.ndarray | None = None  # [N, 1, 28, 28]

  def __len__(self) -> int:
    return len(self.x)

  def take(self, rows: np.ndarray) -> "CalibrationSet":
    def pick(a):
      return None if a is None else a[rows]
    return CalibrationSet(self.x[rows], self.index[rows], pick(self.labels), self.eps[rows], pick(self.other_labels),
                          pick(self.other_eps))


def with_other_labels(model, schedule: NoiseSchedule, calib: CalibrationSet, seed: int = 0,
                      batch_size: int = 256) -> CalibrationSet:
  """Add, per sample, a different random class and the float model's eps for it (for the class-signal gain
  term of calib.quest)."""
  if calib.labels is None:
    raise ValueError("with_other_labels needs a class-conditional calibration set (labels is None)")
  rng = np.random.default_rng(seed)
  other = ((calib.labels + rng.integers(1, 10, size=len(calib))) % 10).astype(np.int32)
  graphdef, state = nnx.split(model)
  eps = [np.asarray(_float_eps(graphdef, state, schedule, jnp.asarray(calib.x[s:s + batch_size]),
                               jnp.asarray(calib.index[s:s + batch_size]), jnp.asarray(other[s:s + batch_size])))
         for s in range(0, len(calib), batch_size)]
  return dataclasses.replace(calib, other_labels=other, other_eps=np.concatenate(eps))


@functools.partial(jax.jit, static_argnames=("graphdef", "schedule"))
def _float_eps(graphdef, state, schedule, x, index, labels):
  return predict_noise(nnx.merge(graphdef, state), schedule, x, index, labels)


def build_calibration_set(model, schedule: NoiseSchedule, config: CalibrationConfig = CalibrationConfig(),
                          progress: bool = True, paths_per_call: int = 32) -> CalibrationSet:
  """Run the float model's paths (`config.sampler`) and keep `num_samples` random (x_t, t) pairs with its eps.

  The paths run `paths_per_call` at a time (a progress bar counts them), each batch with its own PRNG key.
  """
  rng = np.random.default_rng(config.seed)
  noise = jnp.asarray(rng.standard_normal((config.num_trajectories, 1, 28, 28)).astype(np.float32))
  labels = None
  if schedule.kind == "dit":
    labels = jnp.arange(config.num_trajectories, dtype=jnp.int32) % 10
  start = time.time()
  xs, eps = [], []
  bar = tqdm(total=config.num_trajectories, desc=f"calibration paths ({config.sampler.upper()})", unit="path",
             disable=not progress)
  for first in range(0, config.num_trajectories, paths_per_call):
    part = slice(first, first + paths_per_call)
    part_labels = None if labels is None else labels[part]
    key = jax.random.fold_in(jax.random.key(config.seed), first)
    if config.sampler == "ddpm":
      x, e, indices = ddpm_trajectory(model, schedule, noise[part], part_labels, key=key, steps=config.steps)
    else:
      x, e, indices = ddim_trajectory(model, schedule, noise[part], part_labels, steps=config.steps, eta=config.eta,
                                      key=key)
    xs.append(np.asarray(x))  # [S, b, ...]
    eps.append(np.asarray(e))
    bar.update(x.shape[1])
  bar.close()
  xs, eps = np.concatenate(xs, axis=1), np.concatenate(eps, axis=1)  # [S, B, ...]
  steps, batch = xs.shape[:2]
  flat = rng.choice(steps * batch, size=config.num_samples, replace=False)
  step_of, path_of = flat // batch, flat % batch
  if progress:
    tqdm.write(f"calibration set: {config.num_samples} of {steps}x{batch} {config.sampler.upper()} states "
               f"({time.time() - start:.1f}s)")
  return CalibrationSet(
    x=xs[step_of, path_of], index=indices[step_of].astype(np.int32),
    labels=None if labels is None else np.asarray(labels)[path_of].astype(np.int32), eps=eps[step_of, path_of])


@functools.partial(jax.jit, static_argnames=("graphdef", "schedule"))
def _recording_forward(graphdef, state, schedule, x, index, labels):
  model = nnx.merge(graphdef, state)
  predict_noise(model, schedule, x, index, labels)
  return nnx.state(model, nnx.Intermediate)


def record_layer_inputs(model, schedule: NoiseSchedule, calib: CalibrationSet, batch_size: int = 64) -> dict:
  """{layer path: float inputs [N, ...]} for QuantLinear (convs: their feature map) and
  {matmul path + ".lhs"/".rhs": operands} for QuantMatmul, recorded on the *float* model."""
  set_recording(model, True)
  graphdef, state = nnx.split(model)
  set_recording(model, False)
  chunks: dict[str, list] = {}
  for start in range(0, len(calib), batch_size):
    part = calib.take(np.arange(start, min(start + batch_size, len(calib))))
    labels = None if part.labels is None else jnp.asarray(part.labels)
    out = _recording_forward(graphdef, state, schedule, jnp.asarray(part.x), jnp.asarray(part.index), labels)
    for path, variable in nnx.to_flat_state(out):
      name = ".".join(str(p) for p in path[:-1])
      suffix = {"inputs": "", "lhs": ".lhs", "rhs": ".rhs"}[path[-1]]
      chunks.setdefault(name + suffix, []).append(np.asarray(variable.get_value()[0]))
  return {name: np.concatenate(parts) for name, parts in chunks.items()}


# ----------------------------------------------------------------------------------------------
# Activation ranges


def mse_range(values: np.ndarray, bits: int, max_values: int = 200_000, seed: int = 0) -> tuple[float, float]:
  """(low, high) minimising the fake-quantization MSE over shrunken min/max ranges."""
  values = np.asarray(values, np.float32).reshape(-1)
  if values.size > max_values:
    values = np.random.default_rng(seed).choice(values, max_values, replace=False)
  low, high = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
  qmin, qmax = signed_range(bits)
  best, best_error = (low, high), np.inf
  for ratio_low in (1.0, 0.8, 0.6, 0.4):
    for ratio_high in np.linspace(1.0, 0.2, 17):
      lo, hi = low * ratio_low, high * ratio_high
      step = max((hi - lo) / (qmax - qmin), 1e-8)
      zero = np.floor(qmin - lo / step + 0.5)  # round half up, as the quantizers do
      q = (np.clip(np.floor(values / step + 0.5) + zero, qmin, qmax) - zero) * step
      error = float(((q - values) ** 2).mean())
      if error < best_error:
        best, best_error = (lo, hi), error
  return best


def calibrate_activations(model, records: dict, groups: np.ndarray, num_groups: int) -> int:
  """Set every activation quantizer's per-group range from recorded float inputs.  Returns how many."""
  count = 0
  targets = []
  for name, layer in named_modules(model, QuantLinear):
    if layer.quant is not None and isinstance(layer.quant.act, ActQuantizer):  # per-token ones are dynamic
      targets.append((layer.quant.act, records[name]))
  for name, matmul in named_modules(model, QuantMatmul):
    if matmul.quant is not None:
      targets.append((matmul.quant.lhs, records[name + ".lhs"]))
      targets.append((matmul.quant.rhs, records[name + ".rhs"]))
  for quantizer, values in targets:
    for g in range(num_groups):
      selected = values[groups == g] if np.any(groups == g) else values
      quantizer.set_range(g, *mse_range(selected, quantizer.bits, seed=g))
    count += 1
  return count


# ----------------------------------------------------------------------------------------------
# AdaRound


@dataclass(frozen=True)
class AdaRoundConfig:
  iterations: int = 300
  learning_rate: float = 1e-2
  batch_samples: int = 32  # samples (images / token sets) per step
  reg_weight: float = 0.01
  beta_start: float = 20.0
  beta_end: float = 2.0
  warmup: float = 0.2  # fraction of iterations without the rounding regulariser
  seed: int = 0


@functools.partial(jax.jit, static_argnames=("graphdef", "optimizer", "reg_weight"))
def _adaround_step(graphdef, v_state, rest, opt_state, optimizer, reg_weight, x, groups, beta, use_reg):
  def loss_fn(v_state):
    layer = nnx.merge(graphdef, v_state, rest)
    target = jax.lax.stop_gradient(layer.float_output(x))
    out = layer(x, groups)
    reconstruction = ((out - target) ** 2).mean() / ((target ** 2).mean() + 1e-12)
    h = rectified_sigmoid(jax.tree.leaves(v_state)[0])
    regulariser = (1 - jnp.abs(2 * h - 1) ** beta).mean()
    return reconstruction + use_reg * reg_weight * regulariser, reconstruction

  (_, reconstruction), grads = jax.value_and_grad(loss_fn, has_aux=True)(v_state)
  updates, opt_state = optimizer.update(grads, opt_state, v_state)
  return optax.apply_updates(v_state, updates), opt_state, reconstruction


def adaround_layer(layer, inputs: np.ndarray, groups: np.ndarray, config: AdaRoundConfig) -> float:
  """Learn the rounding of one QuantLinear / QuantConv; folds the result into its kernel.

  inputs: float inputs [N, ...]; groups: int [N] timestep group per sample.  Returns the final relative
  reconstruction error (hard rounding) on up to 64 samples.
  """
  linear = layer.linear if isinstance(layer, QuantConv) else layer
  linear.quant.weight.start_adaround(linear.kernel[...])
  graphdef, v_state, rest = nnx.split(layer, AdaRoundParam, ...)
  optimizer = optax.adam(config.learning_rate)
  opt_state = optimizer.init(v_state)
  rng = np.random.default_rng(config.seed)
  warmup = int(config.warmup * config.iterations)
  for it in range(config.iterations):
    rows = rng.choice(len(inputs), size=min(config.batch_samples, len(inputs)), replace=False)
    progress = max(0.0, (it - warmup) / max(1, config.iterations - warmup))
    beta = config.beta_start + (config.beta_end - config.beta_start) * progress
    v_state, opt_state, _ = _adaround_step(
      graphdef, v_state, rest, opt_state, optimizer, config.reg_weight, jnp.asarray(inputs[rows]),
      jnp.asarray(groups[rows]), jnp.float32(beta), jnp.float32(it >= warmup))
  nnx.update(layer, v_state)
  linear.quant.weight.finish_adaround(linear.kernel)
  rows = np.arange(min(64, len(inputs)))
  x = jnp.asarray(inputs[rows])
  target = layer.float_output(x)
  out = layer(x, jnp.asarray(groups[rows]))
  return float(((out - target) ** 2).mean() / ((target ** 2).mean() + 1e-12))


def quantizable_layers(model) -> list[tuple[str, nnx.Module]]:
  """(name, layer) of every weight layer with a quantizer: QuantConv for convs, else QuantLinear."""
  convs = {name + ".linear": (name, conv) for name, conv in named_modules(model, QuantConv)}
  layers = []
  for name, linear in named_modules(model, QuantLinear):
    if linear.quant is None:
      continue
    layers.append(convs.get(name, (name, linear)))
  return layers


def adaround_layers(model, records: dict, groups: np.ndarray, config: AdaRoundConfig = AdaRoundConfig(),
                    progress: bool = True) -> dict[str, float]:
  errors = {}
  layers = quantizable_layers(model)
  bar = tqdm(layers, desc="adaround", disable=not progress)
  for name, layer in bar:
    key = name + ".linear" if name + ".linear" in records else name
    errors[name] = adaround_layer(layer, records[key], groups, config)
    bar.set_postfix(layer=name, rel_err=f"{errors[name]:.4f}")
  return errors


@dataclass(frozen=True)
class PTQConfig:
  quant: DiffusionQuantConfig = DiffusionQuantConfig()
  calibration: CalibrationConfig = CalibrationConfig()
  adaround: AdaRoundConfig | None = AdaRoundConfig()  # None: round to nearest


def run_ptq(model, schedule: NoiseSchedule, config: PTQConfig = PTQConfig(), calib: CalibrationSet | None = None,
            progress: bool = True) -> tuple[nnx.Module, CalibrationSet, dict]:
  """Quantize `model` in place (fake execution): attach quantizers, calibrate activation ranges per
  timestep group, AdaRound the weights.  Returns (model, calibration set, report)."""
  start = time.time()
  if calib is None:
    calib = build_calibration_set(model, schedule, config.calibration, progress)
  recorded = calib.take(np.arange(config.calibration.record_samples))
  records = record_layer_inputs(model, schedule, recorded)
  groups = np.asarray(config.quant.timestep_group(recorded.index))
  attach_quantizers(model, config.quant)
  num_act = calibrate_activations(model, records, groups, config.quant.num_timestep_groups)
  errors = {}
  if config.adaround is not None:
    errors = adaround_layers(model, records, groups, config.adaround, progress)
  report = {"activation_quantizers": num_act, "adaround_layers": len(errors),
            "adaround_relative_error": errors, "seconds": time.time() - start}
  return model, calib, report
