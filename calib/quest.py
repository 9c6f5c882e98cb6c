"""QuEST selective finetuning (Wang et al., ICCV'25) on top of a PTQ model from `calib.adaround`.

- TLA, time-embedding alignment: finetune the layers that carry the timestep embedding (the time MLP,
  and in the DiT the gamma/beta/alpha modulation layers fed by cond) with their activation scales.
- CMA, critical-module alignment: finetune the modules that break first at 4 bit (attention q/k/v/out
  and feed-forward in the DiT; the conv blocks in the CNN) plus *all* activation step sizes.
- Global loss: MSE between the quantized and the float model's noise prediction on the calibration set,
  each sample using the activation scales of its timestep group; optional gain terms (QuestConfig).
Rounding is straight-through: weights stay on the integer grid in the forward pass, gradients reach the
latent float weights and biases and the activation step sizes (optionally zero points and weight scales).
Optax Adam, one learning rate each for weights, activation steps and weight scales.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from calib.adaround import (AdaRoundConfig, CalibrationConfig, CalibrationSet, PTQConfig, build_calibration_set,
                            run_ptq, with_other_labels)
from cometjax.diffusion.attach import named_modules, to_integer
from cometjax.diffusion.config import DiffusionQuantConfig, preset
from cometjax.diffusion.quantizers import QuantParam
from cometjax.diffusion.sampling import NoiseSchedule, predict_noise
from cometjax.models.layers import QuantLinear


@dataclass(frozen=True)
class QuestConfig:
  """Which layers are finetuned (regexes on dotted layer paths) and how."""

  time_embedding_layers: tuple[str, ...]  # TLA
  critical_layers: tuple[str, ...]  # CMA
  train_all_activation_scales: bool = True  # CMA: every activation step size, not only the selected layers'
  steps: int = 300
  batch_size: int = 32
  # The paper's Adam learning rates (hatchetProject/QuEST): 1e-5 for weights and biases, 1e-4 for activation
  # step sizes; weight scales and zero points stay as PTQ left them.  The weights then move a fraction of a
  # grid step: on the DiT 1-7% of the codes change in 1000 steps.
  weight_learning_rate: float = 1e-5
  scale_learning_rate: float = 1e-4  # activation step sizes (and zero points with train_zero_points)
  weight_scale_learning_rate: float = 0.0  # 0: weight scales frozen
  train_zero_points: bool = False
  # Weights of gain terms, mean over samples of (1 - <q, f> / <f, f>)^2: q, f the quantized and the float
  # model's eps (eps_gain_weight) or class signal eps(x, t, y) - eps(x, t, y') for another class y'
  # (class_gain_weight, DiT).  MSE against the float eps falls fastest by shrinking q where W4A4 cannot
  # resolve f (low t, the class signal); the gain terms keep q's projection on f at full size.
  eps_gain_weight: float = 0.0
  class_gain_weight: float = 0.0
  # The finetuned parameters are the mean of the iterates over this last fraction of steps (0: the last one).
  average_fraction: float = 0.0
  seed: int = 0

  def __post_init__(self):
    if self.steps < 0:
      raise ValueError(f"steps must be >= 0, got {self.steps}")
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
    if not 0.0 <= self.average_fraction <= 1.0:
      raise ValueError(f"average_fraction must be in [0, 1], got {self.average_fraction}")
    for name in ("eps_gain_weight", "class_gain_weight", "weight_learning_rate", "scale_learning_rate",
                 "weight_scale_learning_rate"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
    for pattern in self.time_embedding_layers + self.critical_layers:
      re.compile(pattern)

  @property
  def needs_other_labels(self) -> bool:
    """Whether the loss reads eps for another class (CalibrationSet.other_labels / other_eps)."""
    return bool(self.class_gain_weight)


DIT_QUEST = QuestConfig(
  time_embedding_layers=(r"^time_mlp\d$", r"^blocks\.\d+\.(gamma|beta|alpha)[12]$"),
  critical_layers=(r"^blocks\.\d+\.(wq|wk|wv|lv|ff1|ff2)$",),
)
CNN_QUEST = QuestConfig(
  time_embedding_layers=(r"^time_mlp\.\d+$",),
  critical_layers=(r"^blocks\.\d+\.conv\.linear$",),
  batch_size=16,
)


def selected_layers(model, config: QuestConfig) -> dict[str, str]:
  """{layer path: "TLA" | "CMA"} for the quantized linear layers that the rules select."""
  tla = [re.compile(p) for p in config.time_embedding_layers]
  cma = [re.compile(p) for p in config.critical_layers]
  chosen = {}
  for name, layer in named_modules(model, QuantLinear):
    if any(p.search(name) for p in tla):
      chosen[name] = "TLA"
    elif any(p.search(name) for p in cma):
      chosen[name] = "CMA"
  return chosen


def _path_name(path) -> str:
  return ".".join(str(p) for p in path)


def trainable_filters(model, config: QuestConfig):
  """(weight, activation scale, weight scale) filters over (path, variable) for nnx.split."""
  layers = tuple(selected_layers(model, config))

  def in_selected(name: str) -> bool:
    return any(name == layer or name.startswith(layer + ".") for layer in layers)

  def weight_filter(path, variable) -> bool:
    name = _path_name(path)
    return (isinstance(variable, nnx.Param) and not isinstance(variable, QuantParam)
            and path[-1] in ("kernel", "bias") and in_selected(name))

  act_parameters = ("step", "zero") if config.train_zero_points else ("step",)

  def scale_filter(path, variable) -> bool:  # activation step sizes (and zero points)
    if not isinstance(variable, QuantParam) or path[-1] not in act_parameters:
      return False
    return config.train_all_activation_scales or in_selected(_path_name(path))

  def weight_scale_filter(path, variable) -> bool:
    return (config.weight_scale_learning_rate > 0 and isinstance(variable, QuantParam) and path[-1] == "scale"
            and in_selected(_path_name(path)))

  return weight_filter, scale_filter, weight_scale_filter


def gain_penalty(pred: jax.Array, ref: jax.Array) -> jax.Array:
  """Mean over the leading axis of (1 - <pred_i, ref_i> / <ref_i, ref_i>)^2."""
  axes = tuple(range(1, ref.ndim))
  gain = (pred * ref).sum(axes) / ((ref * ref).sum(axes) + 1e-12)
  return ((1.0 - gain) ** 2).mean()


def _quest_losses(model, schedule: NoiseSchedule, quant: DiffusionQuantConfig, weights: tuple[float, float],
                  batch: dict) -> tuple[jax.Array, jax.Array]:
  """(MSE to the float eps, the finetuning objective: that MSE plus the optional gain terms) of one batch."""
  eps_gain_weight, class_gain_weight = weights
  group = quant.timestep_group(batch["index"])
  eps = predict_noise(model, schedule, batch["x"], batch["index"], batch.get("labels"), group)
  mse = ((eps - batch["eps"]) ** 2).mean()
  loss = mse
  if eps_gain_weight:
    loss = loss + eps_gain_weight * gain_penalty(eps, batch["eps"])
  if class_gain_weight:
    other = predict_noise(model, schedule, batch["x"], batch["index"], batch["other_labels"], group)
    loss = loss + class_gain_weight * gain_penalty(eps - other, batch["eps"] - batch["other_eps"])
  return mse, loss


def _keep_positive(params):
  """Step sizes and weight scales stay positive."""
  def clamp(path, value):
    name = jax.tree_util.keystr(path)
    return jnp.maximum(value, 1e-6) if ("'step'" in name or "'scale'" in name) else value
  return jax.tree.map_with_path(clamp, params)


@functools.partial(jax.jit, static_argnames=("graphdef", "schedule", "quant", "optimizers", "weights"))
def _quest_steps(graphdef, rest, carry, data, rows, add_to_average, schedule, quant, optimizers, weights):
  """len(rows) Adam steps in one call.  carry: (trained states, optimizer states, iterate sum or None);
  data: the calibration set on the device; rows: int32 [S, B] its rows per step; add_to_average: bool [S]."""

  def step(carry, inputs):
    trained, opt_states, total = carry
    step_rows, add = inputs
    batch = {name: values[step_rows] for name, values in data.items()}
    loss, grads = jax.value_and_grad(
      lambda t: _quest_losses(nnx.merge(graphdef, *t, rest), schedule, quant, weights, batch)[1])(trained)
    new_trained, new_states = [], []
    for params, grad, optimizer, opt_state in zip(trained, grads, optimizers, opt_states):
      updates, opt_state = optimizer.update(grad, opt_state, params)
      new_trained.append(_keep_positive(optax.apply_updates(params, updates)))
      new_states.append(opt_state)
    trained = tuple(new_trained)
    if total is not None:
      total = jax.tree.map(lambda sum_, value: sum_ + jnp.where(add, value, 0.0), total, trained)
    return (trained, tuple(new_states), total), loss

  return jax.lax.scan(step, carry, (rows, add_to_average))


def chunk_length(steps: int, longest: int = 25) -> int:
  """Steps per jitted call: the largest divisor of `steps` up to `longest` (one compilation)."""
  return max(d for d in range(1, min(steps, longest) + 1) if steps % d == 0)


@functools.partial(jax.jit, static_argnames=("graphdef", "schedule", "quant", "weights"))
def _batch_losses(graphdef, state, schedule, quant, weights, batch):
  return _quest_losses(nnx.merge(graphdef, state), schedule, quant, weights, batch)


def calibration_losses(model, schedule: NoiseSchedule, quant: DiffusionQuantConfig, calib: CalibrationSet,
                       config: QuestConfig | None = None, batch_size: int = 64) -> tuple[float, float]:
  """(MSE between `model`'s and the float model's eps, `config`'s finetuning objective) over `calib`
  (without `config`, or without gain terms, the two are equal)."""
  weights = (0.0, 0.0) if config is None else (float(config.eps_gain_weight), float(config.class_gain_weight))
  if weights[1] and calib.other_eps is None:
    raise ValueError("class_gain_weight > 0 needs a calibration set with other_labels/other_eps "
                     "(calib.adaround.with_other_labels)")
  graphdef, state = nnx.split(model)
  data = _device_data(calib, bool(weights[1]))
  mse = objective = 0.0
  for start in range(0, len(calib), batch_size):
    rows = jnp.arange(start, min(start + batch_size, len(calib)))
    part_mse, part_objective = _batch_losses(graphdef, state, schedule, quant, weights,
                                             {name: values[rows] for name, values in data.items()})
    mse += float(part_mse) * len(rows)
    objective += float(part_objective) * len(rows)
  return mse / len(calib), objective / len(calib)


def global_loss(model, schedule: NoiseSchedule, quant: DiffusionQuantConfig, calib: CalibrationSet,
                batch_size: int = 64) -> float:
  """Mean MSE between `model`'s and the float model's noise prediction over the calibration set."""
  return calibration_losses(model, schedule, quant, calib, None, batch_size)[0]


def _device_data(calib: CalibrationSet, with_other_labels: bool) -> dict:
  data = {"x": calib.x, "index": calib.index, "eps": calib.eps}
  if calib.labels is not None:
    data["labels"] = calib.labels
  if with_other_labels:
    data.update(other_labels=calib.other_labels, other_eps=calib.other_eps)
  return {name: jnp.asarray(values) for name, values in data.items()}


def _trained_report(model, config: QuestConfig, states) -> dict:
  weights, scales, weight_scales = states
  trained = {_path_name(path): int(np.prod(variable.get_value().shape))
             for state in states for path, variable in nnx.to_flat_state(state)}
  layers = selected_layers(model, config)

  def count(*parts):
    return int(sum(int(np.prod(v.get_value().shape)) for state in parts for _, v in nnx.to_flat_state(state)))

  return {"layers": layers, "num_tla_layers": sum(v == "TLA" for v in layers.values()),
          "num_cma_layers": sum(v == "CMA" for v in layers.values()), "trained_parameters": trained,
          "num_trained_tensors": len(trained), "num_trained_values": int(sum(trained.values())),
          "num_weight_values": count(weights), "num_scale_values": count(scales, weight_scales)}


def quest_finetune(model, schedule: NoiseSchedule, quant: DiffusionQuantConfig, calib: CalibrationSet,
                   config: QuestConfig, progress: bool = True) -> dict:
  """Finetune a fake-quantized model in place.  Returns a report: trained parameters and counts,
  the global loss (MSE to the float eps) and the finetuning objective over `calib` before and after, the
  objective per chunk of steps, and the time taken."""
  start = time.time()
  if config.needs_other_labels and calib.other_eps is None:
    raise ValueError("class_gain_weight > 0 needs a calibration set with other_labels/other_eps "
                     "(calib.adaround.with_other_labels)")
  graphdef, *states, rest = nnx.split(model, *trainable_filters(model, config), ...)
  report = _trained_report(model, config, states)
  report["global_loss_before"], report["objective_before"] = calibration_losses(model, schedule, quant, calib, config)

  def adam(learning_rate):  # cosine decay to 10% over the run
    return optax.adam(optax.cosine_decay_schedule(learning_rate, max(config.steps, 1), alpha=0.1))

  optimizers = (adam(config.weight_learning_rate), adam(config.scale_learning_rate),
                adam(config.weight_scale_learning_rate))
  trained = tuple(states)
  num_averaged = int(round(config.average_fraction * config.steps))
  carry = (trained, tuple(opt.init(state) for opt, state in zip(optimizers, trained)),
           jax.tree.map(jnp.zeros_like, trained) if num_averaged else None)
  rng = np.random.default_rng(config.seed)
  batch = min(config.batch_size, len(calib))
  rows = np.zeros((config.steps, batch), np.int32)  # [steps, B]
  for step in range(config.steps):
    rows[step] = rng.choice(len(calib), size=batch, replace=False)
  add_to_average = np.arange(config.steps) >= config.steps - num_averaged
  data = _device_data(calib, config.needs_other_labels)
  weights = (float(config.eps_gain_weight), float(config.class_gain_weight))
  chunk = chunk_length(config.steps) if config.steps else 1
  losses = []
  bar = tqdm(total=config.steps, desc="quest finetuning", unit="step", disable=not progress, mininterval=1.0)
  for first in range(0, config.steps, chunk):
    carry, chunk_losses = _quest_steps(graphdef, rest, carry, data, jnp.asarray(rows[first:first + chunk]),
                                       jnp.asarray(add_to_average[first:first + chunk]), schedule, quant,
                                       optimizers, weights)
    losses.append(float(chunk_losses.mean()))
    bar.update(chunk)
    bar.set_postfix(loss=f"{losses[-1]:.5f}")
  bar.close()
  trained, _, total = carry
  if num_averaged:
    trained = jax.tree.map(lambda v: v / num_averaged, total)
  nnx.update(model, *trained)
  report["loss_per_chunk"] = losses
  report["steps_per_chunk"] = chunk
  report["global_loss_after"], report["objective_after"] = calibration_losses(model, schedule, quant, calib, config)
  report["seconds"] = time.time() - start
  return report


def format_report(report: dict) -> str:
  lines = [f"QuEST: {report['num_tla_layers']} TLA layers, {report['num_cma_layers']} CMA layers; "
           f"{report['num_trained_tensors']} tensors / {report['num_trained_values']:,} values trained "
           f"({report['num_weight_values']:,} weights, {report['num_scale_values']:,} quantizer scales); "
           f"global loss (eps MSE) {report['global_loss_before']:.5f} -> {report['global_loss_after']:.5f}, "
           f"objective {report['objective_before']:.5f} -> {report['objective_after']:.5f} "
           f"in {report['seconds']:.0f}s"]
  for name, kind in sorted(report["layers"].items()):
    lines.append(f"  {kind} {name}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Settings used by the bench and the CLI

SETTINGS = ("fp", "w8a8", "w4a8", "w4a4-ptq", "w4a4-quest")


@dataclass(frozen=True)
class SettingRecipe:
  """Default calibration budget per model kind (sized for a 2-core CPU)."""

  calibration: CalibrationConfig
  adaround: AdaRoundConfig
  quest: QuestConfig
  # DiffusionQuantConfig.act_bits_overrides for the settings with 4-bit activations
  act_bits_overrides: tuple[tuple[str, int], ...] = ()
  # DiffusionQuantConfig.act_granularity / weight_group_size / rotation for every quantized setting
  act_granularity: str = "tensor"
  weight_group_size: int | None = None
  rotation: str | None = None
  # Where w4a4-quest's finetuning starts: the AdaRound PTQ model (w4a4-ptq) or round-to-nearest weights.
  quest_from_adaround: bool = True

  def ptq_adaround(self, setting: str) -> AdaRoundConfig | None:
    """The AdaRound config a setting's PTQ step runs (None: round to nearest)."""
    if setting == "w8a8" or (setting == "w4a4-quest" and not self.quest_from_adaround):
      return None
    return self.adaround


# The DiT's conditioning path (time MLP and the adaLN gamma/beta/alpha layers) runs once per sample, not
# once per token: under 1% of the model's multiply-adds.  At 4 bit its input (the class + time embedding)
# loses the class: W4A4 round-to-nearest with this path at A8 classifies 0.365 vs 0.288 at A4 (1000
# samples, DDIM 25 steps), so the W4A4 recipes read it at 8 bit, like the first and last layers.
DIT_CONDITIONING_A8 = ((r"^time_mlp\d$|^blocks\.\d+\.(gamma|beta|alpha)[12]$", 8),)


def default_recipe(kind: str) -> SettingRecipe:
  if kind == "dit":
    # Calibration states from the checkpoint's own 1000-step DDPM sampler (every 10th step recorded), the
    # states the evaluation visits.  QuEST finetunes from round-to-nearest weights with the gain terms: with
    # MSE alone the finetuned model loses class signal (class accuracy 0.585 vs 0.67 before finetuning; with
    # the gain terms 0.85, FP 0.825; docs/quest.md).  400 steps at 2.5x the paper's rates match 1000 at the
    # paper's (0.84 / Frechet 61.3 vs 0.85 / 56.6; 0.765 / 65.9 at the paper's rates) in the time budget.
    return SettingRecipe(CalibrationConfig(num_trajectories=32, steps=100, num_samples=2048, record_samples=128,
                                           eta=1.0, sampler="ddpm"),
                         AdaRoundConfig(iterations=100, batch_samples=32),
                         dataclasses.replace(DIT_QUEST, steps=400, weight_learning_rate=2.5e-5,
                                             scale_learning_rate=2.5e-4, eps_gain_weight=1.0,
                                             class_gain_weight=1.0),
                         act_bits_overrides=DIT_CONDITIONING_A8, act_granularity="token", quest_from_adaround=False)
  if kind == "cnn":
    # As on the DiT, QuEST starts from round-to-nearest weights at 2.5x the paper's rates, with the eps gain term
    # (the CNN is unconditional): Frechet 73.5-74.9 over seeds 0/1/2 against FP 61.5 and AdaRound PTQ 107.8; from
    # AdaRound 98.8; MSE alone 78.5; the paper's rates 77.0; the earlier rates (1e-3 / 5e-3 / weight scales
    # 2e-5, from AdaRound) 109.4 (64 samples, DDIM 25 steps eta 1, the same noise, fake-quantized; docs/quest.md).
    return SettingRecipe(CalibrationConfig(num_trajectories=32, steps=25, num_samples=384, record_samples=32,
                                           eta=1.0),
                         AdaRoundConfig(iterations=50, batch_samples=8),
                         dataclasses.replace(CNN_QUEST, steps=300, batch_size=16, weight_learning_rate=2.5e-5,
                                             scale_learning_rate=2.5e-4, eps_gain_weight=1.0),
                         quest_from_adaround=False)
  raise ValueError(f"kind must be 'dit' or 'cnn', got {kind!r}")


# Seconds on 2 CPU cores: one float model call on one state (calibration paths), one finetuning step at the
# recipe's batch (both forwards of the gain terms and the backward pass), compiling the finetuning step, and
# what the rest of PTQ costs. DiT: `cometjax sample --setting w4a4-quest` on 2 idle cores with an empty
# compilation cache, 2026-12-02 (quantized in 86 s); other jobs on the cores about double it. CNN (measured
# with other jobs running, load average 3-6): 32 DDIM-25 calibration paths 12 s; round-to-nearest PTQ 5.7 s in
# a fresh process, AdaRound PTQ 20-31 s; QuEST 112 s for 150 steps and 175-219 s for 300
# (bench/results/diffusion_quality.json: 195-205 s).
_MODEL_CALL_SECONDS = {"dit": 0.35e-3, "cnn": 15e-3}
_QUEST_STEP_SECONDS = {"dit": 0.09, "cnn": 0.5}
_QUEST_COMPILE_SECONDS = {"dit": 25.0, "cnn": 40.0}
_PTQ_SECONDS = {"dit": 15.0, "cnn": 6.0}
_ADAROUND_SECONDS_PER_ITERATION = {"dit": 0.3, "cnn": 0.5}


def estimated_seconds(kind: str, setting: str, recipe: SettingRecipe | None = None) -> float:
  """About how long `quantize_for_setting(..., setting)` takes on 2 CPU cores (0 for fp)."""
  if setting not in SETTINGS:
    raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
  if setting == "fp":
    return 0.0
  recipe = recipe or default_recipe(kind)
  calibration = recipe.calibration
  path_steps = 1000 if calibration.sampler == "ddpm" else calibration.steps
  seconds = calibration.num_trajectories * path_steps * _MODEL_CALL_SECONDS[kind] + _PTQ_SECONDS[kind]
  if recipe.ptq_adaround(setting) is not None:
    seconds += recipe.adaround.iterations * _ADAROUND_SECONDS_PER_ITERATION[kind]
  if setting == "w4a4-quest":
    batch_scale = recipe.quest.batch_size / (32 if kind == "dit" else 16)
    seconds += _QUEST_COMPILE_SECONDS[kind] + recipe.quest.steps * _QUEST_STEP_SECONDS[kind] * batch_scale
  return seconds


def describe_plan(kind: str, setting: str, recipe: SettingRecipe | None = None) -> str:
  """One line: what `quantize_for_setting` will run for `setting` and about how long it takes."""
  recipe = recipe or default_recipe(kind)
  calibration = recipe.calibration
  parts = [f"calibration: {calibration.num_trajectories} {calibration.sampler.upper()} paths of the float model"]
  adaround = recipe.ptq_adaround(setting)
  parts.append("PTQ: activation ranges, " + ("round-to-nearest weights" if adaround is None else
                                             f"AdaRound ({adaround.iterations} iterations per layer)"))
  if setting == "w4a4-quest":
    parts.append(f"QuEST: {recipe.quest.steps} finetuning steps of batch {recipe.quest.batch_size}")
  minutes = estimated_seconds(kind, setting, recipe) / 60
  return f"{setting} on the {kind}: " + "; ".join(parts) + f". About {minutes:.1f} min on 2 idle CPU cores (more when other jobs share them)."


def quantize_for_setting(model, schedule: NoiseSchedule, setting: str, *, recipe: SettingRecipe | None = None,
                         calib: CalibrationSet | None = None, progress: bool = True, integer: bool = True):
  """Quantize `model` in place for one of SETTINGS.  Returns (model, quant config or None, report).

  w8a8: round-to-nearest; w4a8, w4a4-ptq: AdaRound PTQ; w4a4-quest: the PTQ model + QuEST finetuning.
  With `integer`, the result runs packed integer weights and int8 activations.
  """
  if setting not in SETTINGS:
    raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
  if setting == "fp":
    return model, None, {"setting": "fp"}
  recipe = recipe or default_recipe(schedule.kind)
  quant = dataclasses.replace(preset(setting.split("-")[0]), act_granularity=recipe.act_granularity,
                              weight_group_size=recipe.weight_group_size, rotation=recipe.rotation)
  if quant.act_bits is not None and quant.act_bits < 8 and recipe.act_bits_overrides:
    quant = dataclasses.replace(quant, act_bits_overrides=recipe.act_bits_overrides)
  adaround = recipe.ptq_adaround(setting)
  if setting == "w4a4-quest" and recipe.quest.needs_other_labels and calib is None:
    calib = build_calibration_set(model, schedule, recipe.calibration, progress)  # on the float model
    calib = with_other_labels(model, schedule, calib, seed=recipe.calibration.seed)
  model, calib, report = run_ptq(model, schedule, PTQConfig(quant, recipe.calibration, adaround), calib, progress)
  report = {"setting": setting, "ptq": report}
  if setting == "w4a4-quest":
    report["quest"] = quest_finetune(model, schedule, quant, calib, recipe.quest, progress)
  if integer:
    to_integer(model)
  return model, quant, report
