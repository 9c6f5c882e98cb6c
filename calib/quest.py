"""QuEST selective finetuning (Wang et al., ICCV'25) on top of a PTQ model from `calib.adaround`.

- TLA, time-embedding alignment: finetune the layers that carry the timestep embedding (the time MLP,
  and in the DiT the gamma/beta/alpha modulation layers fed by cond) with their activation scales.
- CMA, critical-module alignment: finetune the modules that break first at 4 bit (attention q/k/v/out
  and feed-forward in the DiT; the conv blocks in the CNN) plus *all* activation step sizes.
- Global loss: MSE between the quantized and the float model's noise prediction on the calibration set,
  each sample using the activation scales of its timestep group.
Rounding is straight-through: weights stay on the integer grid in the forward pass, gradients reach the
latent float weights, the per-channel weight scales and the activation steps/zero points. Optax Adam,
one learning rate for weights and one for quantizer scales.
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
  train_all_activation_scales: bool = True
  steps: int = 300
  batch_size: int = 32
  weight_learning_rate: float = 1e-4
  scale_learning_rate: float = 1e-3  # activation step sizes and zero points
  # Weight scales are ~1e-2, so an absolute Adam step of scale_learning_rate would be far too coarse.
  weight_scale_learning_rate: float = 1e-5
  # Weights of gain terms, mean over samples of (1 - <q, f> / <f, f>)^2: q, f the quantized and the float
  # model's eps (eps_gain_weight) or class signal eps(x, t, y) - eps(x, t, y') for another class y'
  # (class_gain_weight, DiT).  The class signal is small against W4A4 noise (rel. MSE 3-170x), and MSE on
  # eps or on the class signal is lowered by shrinking it: measured gain 0.6 -> 0.3 (eps MSE) and -> 0.04
  # (MSE on the class signal), with class accuracy falling.  The gain terms hold it at 1.
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
    for name in ("eps_gain_weight", "class_gain_weight"):
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
  """(weight filter, scale filter) as nnx filters over (path, variable)."""
  layers = tuple(selected_layers(model, config))

  def in_selected(name: str) -> bool:
    return any(name == layer or name.startswith(layer + ".") for layer in layers)

  def weight_filter(path, variable) -> bool:
    name = _path_name(path)
    return (isinstance(variable, nnx.Param) and not isinstance(variable, QuantParam)
            and path[-1] in ("kernel", "bias") and in_selected(name))

  def scale_filter(path, variable) -> bool:  # activation step sizes / zero points
    if not isinstance(variable, QuantParam) or path[-1] not in ("step", "zero"):
      return False
    return config.train_all_activation_scales or in_selected(_path_name(path))

  def weight_scale_filter(path, variable) -> bool:
    return isinstance(variable, QuantParam) and path[-1] == "scale" and in_selected(_path_name(path))

  return weight_filter, scale_filter, weight_scale_filter


def gain_penalty(pred: jax.Array, ref: jax.Array) -> jax.Array:
  """Mean over the leading axis of (1 - <pred_i, ref_i> / <ref_i, ref_i>)^2."""
  axes = tuple(range(1, ref.ndim))
  gain = (pred * ref).sum(axes) / ((ref * ref).sum(axes) + 1e-12)
  return ((1.0 - gain) ** 2).mean()


@functools.partial(jax.jit, static_argnames=("graphdef", "schedule", "quant", "optimizers", "weights"))
def _quest_step(graphdef, trained, rest, opt_states, schedule, quant, optimizers, weights, x, index, labels,
                target, other_labels, other_target):
  eps_gain_weight, class_gain_weight = weights

  def loss_fn(trained):
    model = nnx.merge(graphdef, *trained, rest)
    group = quant.timestep_group(index)
    eps = predict_noise(model, schedule, x, index, labels, group)
    loss = ((eps - target) ** 2).mean()
    if eps_gain_weight:
      loss = loss + eps_gain_weight * gain_penalty(eps, target)
    if class_gain_weight:
      other = predict_noise(model, schedule, x, index, other_labels, group)
      loss = loss + class_gain_weight * gain_penalty(eps - other, target - other_target)
    return loss

  loss, grads = jax.value_and_grad(loss_fn)(trained)
  new_trained, new_states = [], []
  for params, grad, optimizer, opt_state in zip(trained, grads, optimizers, opt_states):
    updates, opt_state = optimizer.update(grad, opt_state, params)
    params = optax.apply_updates(params, updates)
    # step sizes and weight scales must stay positive
    params = jax.tree.map_with_path(
      lambda p, v: jnp.maximum(v, 1e-6) if ("'step'" in jax.tree_util.keystr(p) or "'scale'" in jax.tree_util.keystr(p))
      else v, params)
    new_trained.append(params)
    new_states.append(opt_state)
  return tuple(new_trained), tuple(new_states), loss


@functools.partial(jax.jit, static_argnames=("graphdef", "schedule", "quant"))
def _global_loss(graphdef, state, schedule, quant, x, index, labels, target):
  model = nnx.merge(graphdef, state)
  eps = predict_noise(model, schedule, x, index, labels, quant.timestep_group(index))
  return ((eps - target) ** 2).mean()


def global_loss(model, schedule: NoiseSchedule, quant: DiffusionQuantConfig, calib: CalibrationSet,
                batch_size: int = 64) -> float:
  """Mean MSE between `model`'s and the float model's noise prediction over the calibration set."""
  graphdef, state = nnx.split(model)
  total = 0.0
  for start in range(0, len(calib), batch_size):
    part = calib.take(np.arange(start, min(start + batch_size, len(calib))))
    labels = None if part.labels is None else jnp.asarray(part.labels)
    total += float(_global_loss(graphdef, state, schedule, quant, jnp.asarray(part.x), jnp.asarray(part.index),
                                labels, jnp.asarray(part.eps))) * len(part)
  return total / len(calib)


def quest_finetune(model, schedule: NoiseSchedule, quant: DiffusionQuantConfig, calib: CalibrationSet,
                   config: QuestConfig, progress: bool = True) -> dict:
  """Finetune a fake-quantized model in place.  Returns a report: trained parameters and counts,
  the global loss before and after, and the time taken."""
  start = time.time()
  weight_filter, scale_filter, weight_scale_filter = trainable_filters(model, config)
  graphdef, weights, scales, weight_scales, rest = nnx.split(model, weight_filter, scale_filter,
                                                             weight_scale_filter, ...)
  trained = {}
  for state in (weights, scales, weight_scales):
    for path, variable in nnx.to_flat_state(state):
      trained[_path_name(path)] = int(np.prod(variable.get_value().shape))
  layers = selected_layers(model, config)
  report = {
    "layers": layers,
    "num_tla_layers": sum(v == "TLA" for v in layers.values()),
    "num_cma_layers": sum(v == "CMA" for v in layers.values()),
    "trained_parameters": trained,
    "num_trained_tensors": len(trained),
    "num_trained_values": int(sum(trained.values())),
    "num_weight_values": int(sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(weights))),
    "num_scale_values": int(sum(int(np.prod(v.get_value().shape))
                                for state in (scales, weight_scales) for _, v in nnx.to_flat_state(state))),
  }
  report["global_loss_before"] = global_loss(model, schedule, quant, calib)
  def adam(learning_rate):  # cosine decay to 10% over the run
    return optax.adam(optax.cosine_decay_schedule(learning_rate, max(config.steps, 1), alpha=0.1))

  optimizers = (adam(config.weight_learning_rate), adam(config.scale_learning_rate),
                adam(config.weight_scale_learning_rate))
  trained_state = (weights, scales, weight_scales)
  opt_states = tuple(opt.init(state) for opt, state in zip(optimizers, trained_state))
  weights = (float(config.eps_gain_weight), float(config.class_gain_weight))
  other_labels_needed = config.needs_other_labels
  if other_labels_needed and calib.other_eps is None:
    raise ValueError("class_gain_weight > 0 needs a calibration set with other_labels/other_eps "
                     "(calib.adaround.with_other_labels)")
  rng = np.random.default_rng(config.seed)
  bar = tqdm(range(config.steps), desc="quest", disable=not progress, mininterval=2.0)
  running = None
  num_averaged = int(round(config.average_fraction * config.steps))
  total = None
  for step in bar:
    rows = rng.choice(len(calib), size=min(config.batch_size, len(calib)), replace=False)
    part = calib.take(rows)
    labels = None if part.labels is None else jnp.asarray(part.labels)
    other_labels = other_eps = None
    if other_labels_needed:
      other_labels, other_eps = jnp.asarray(part.other_labels), jnp.asarray(part.other_eps)
    trained_state, opt_states, loss = _quest_step(
      graphdef, trained_state, rest, opt_states, schedule, quant, optimizers, weights, jnp.asarray(part.x),
      jnp.asarray(part.index), labels, jnp.asarray(part.eps), other_labels, other_eps)
    running = float(loss) if running is None else 0.9 * running + 0.1 * float(loss)
    bar.set_postfix(loss=f"{running:.5f}")
    if step >= config.steps - num_averaged:
      total = trained_state if total is None else jax.tree.map(jnp.add, total, trained_state)
  if num_averaged:
    trained_state = jax.tree.map(lambda v: v / num_averaged, total)
  nnx.update(model, *trained_state)
  report["global_loss_after"] = global_loss(model, schedule, quant, calib)
  report["seconds"] = time.time() - start
  return report


def format_report(report: dict) -> str:
  lines = [f"QuEST: {report['num_tla_layers']} TLA layers, {report['num_cma_layers']} CMA layers; "
           f"{report['num_trained_tensors']} tensors / {report['num_trained_values']:,} values trained "
           f"({report['num_weight_values']:,} weights, {report['num_scale_values']:,} quantizer scales); "
           f"global loss {report['global_loss_before']:.5f} -> {report['global_loss_after']:.5f} "
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
    # Calibration states from 100-step ancestral paths, so the time-embedding layers that TLA trains see
    # 100 timesteps (a 25-step grid overfits them to 25 timesteps and hurts the 1000-step sampler).
    # QuEST starts from round-to-nearest weights: with the gain terms, class accuracy over finetuning seeds
    # 0/1/2 was 0.845/0.880/0.680 from round-to-nearest and 0.715/0.718/0.775 from AdaRound (FP 0.795; 400
    # samples, float simulation).  Averaging the second half's iterates: 0.835/0.895/0.735.
    return SettingRecipe(CalibrationConfig(num_trajectories=256, steps=100, num_samples=4096, record_samples=128,
                                           eta=1.0),
                         AdaRoundConfig(iterations=100, batch_samples=32),
                         dataclasses.replace(DIT_QUEST, steps=1000, weight_learning_rate=2e-3,
                                             scale_learning_rate=5e-3, weight_scale_learning_rate=2e-5,
                                             eps_gain_weight=1.0, class_gain_weight=1.0, average_fraction=0.5),
                         act_bits_overrides=DIT_CONDITIONING_A8, act_granularity="token", quest_from_adaround=False)
  if kind == "cnn":
    return SettingRecipe(CalibrationConfig(num_trajectories=32, steps=25, num_samples=384, record_samples=32,
                                           eta=1.0),
                         AdaRoundConfig(iterations=50, batch_samples=8),
                         dataclasses.replace(CNN_QUEST, steps=150, batch_size=16, weight_learning_rate=1e-3,
                                             scale_learning_rate=5e-3, weight_scale_learning_rate=2e-5))
  raise ValueError(f"kind must be 'dit' or 'cnn', got {kind!r}")


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
