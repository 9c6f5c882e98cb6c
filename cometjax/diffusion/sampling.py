"""Noise schedules and DDPM/DDIM samplers (jitted `lax` loops) for the MNIST diffusion models.

The two checkpoints differ in schedule and update rule (see shared/data/README.md):
  - "dit": betas = linspace(1e-4, 0.02, 1000), t in 0..999 passed as an integer, data in [-1, 1];
    DDPM with the posterior variance, x clamped to [-1, 1] after every step.
  - "cnn": its own 1001-entry beta_t/alpha_t (alpha-bar) buffers, i in 1..1000, model input i/1000,
    data in [-0.5, 0.5]; its own DDPM rule z = (z - b_i/sqrt(1-ab_i) eps)/sqrt(1-b_i) + sqrt(b_i) n.
DDIM (eta = 0) works for both on the same alpha-bar table; x0 is clipped to the data range.

Per-timestep hook: every sampler takes `group_fn(index) -> int group`, passed to the model as `group`,
so quantized layers pick the activation scales of that timestep group.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cometjax.models.cnn_ddpm import CNNDenoiser
from cometjax.models.dit import DiT

MODEL_KINDS = ("dit", "cnn")


@dataclass(frozen=True)
class NoiseSchedule:
  kind: str  # "dit" | "cnn": which update rule / time input the checkpoint expects
  betas: tuple[float, ...]  # [table] indexed by timestep index (tuples keep the schedule hashable)
  alpha_bars: tuple[float, ...]  # [table]
  first_index: int  # smallest timestep index used (0 for dit, 1 for cnn)
  last_index: int  # largest (999 for dit, 1000 for cnn)
  data_low: float
  data_high: float

  def __post_init__(self):
    if self.kind not in MODEL_KINDS:
      raise ValueError(f"kind must be one of {MODEL_KINDS}, got {self.kind!r}")

  @property
  def num_steps(self) -> int:
    return self.last_index - self.first_index + 1

  def model_time(self, index: jax.Array) -> jax.Array:
    """What the network receives as t: the integer index (dit) or index/1000 (cnn)."""
    if self.kind == "dit":
      return index.astype(jnp.int32)
    return index.astype(jnp.float32) / self.last_index

  def to_unit(self, x: jax.Array) -> jax.Array:
    """Model data range -> [0, 1] pixels."""
    return jnp.clip((x - self.data_low) / (self.data_high - self.data_low), 0.0, 1.0)

  def from_uint8(self, images: np.ndarray) -> np.ndarray:
    return (images.astype(np.float32) / 255.0) * (self.data_high - self.data_low) + self.data_low

  def q_sample(self, x0: jax.Array, index: jax.Array, noise: jax.Array) -> jax.Array:
    ab = jnp.asarray(self.alpha_bars, jnp.float32)[index][:, None, None, None]
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * noise

  def ddim_indices(self, steps: int) -> np.ndarray:
    """`steps` evenly spaced timestep indices, descending, from last_index."""
    if not 1 <= steps <= self.num_steps:
      raise ValueError(f"steps must be in 1..{self.num_steps}, got {steps}")
    idx = np.round(np.linspace(self.last_index, self.first_index, steps)).astype(np.int32)
    return idx


def dit_schedule(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
  betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float32)
  alpha_bars = np.cumprod(1.0 - betas, dtype=np.float32)
  return NoiseSchedule("dit", tuple(betas.tolist()), tuple(alpha_bars.tolist()), 0, num_timesteps - 1, -1.0, 1.0)


def cnn_schedule(beta_t: np.ndarray | None = None, alpha_t: np.ndarray | None = None, num_timesteps: int = 1000,
                 beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
  """The CNN's 1001-entry table (its checkpoint buffers when given, else recomputed as in DDPM.ipynb)."""
  if beta_t is None:
    beta_t = ((beta_end - beta_start) * np.arange(0, num_timesteps + 1, dtype=np.float32) / num_timesteps
              + beta_start).astype(np.float32)
    alpha_t = np.exp(np.cumsum(np.log(1 - beta_t))).astype(np.float32)
  return NoiseSchedule("cnn", tuple(np.asarray(beta_t, np.float32).tolist()),
                       tuple(np.asarray(alpha_t, np.float32).tolist()), 1, num_timesteps,
                       -0.5, 0.5)


def schedule_for(model) -> NoiseSchedule:
  """The schedule that belongs to a loaded model (DiT or CNNDenoiser)."""
  if isinstance(model, DiT):
    return dit_schedule(model.config.num_timesteps)
  if isinstance(model, CNNDenoiser):
    return cnn_schedule(np.asarray(model.beta_t[...]), np.asarray(model.alpha_bar_t[...]), model.config.num_timesteps)
  raise TypeError(f"model must be a DiT or CNNDenoiser, got {type(model).__name__}")


# An eps function: (graph state, x [B,1,28,28], timestep index [B] int32, group int, labels [B]) -> eps
GroupFn = Callable[[jax.Array], jax.Array]


def _no_groups(index: jax.Array) -> jax.Array:
  return jnp.zeros((), jnp.int32)


def predict_noise(model, schedule: NoiseSchedule, x: jax.Array, index: jax.Array, labels=None, group=0):
  """Call the model with the time input its checkpoint expects.  index: int [B]."""
  t = schedule.model_time(index)
  if schedule.kind == "dit":
    if labels is None:
      raise ValueError("the DiT is class-conditional: labels (int [B] in 0..9) are required")
    return model(x, t, labels, group)
  return model(x, t, group)


@functools.partial(jax.jit, static_argnames=("graphdef", "schedule", "indices", "group_fn", "clip"))
def _ddim_loop(graphdef, state, schedule, indices, group_fn, clip, noise, labels, eta, key):
  table = jnp.asarray(schedule.alpha_bars, jnp.float32)
  steps = jnp.asarray(indices)
  prev = jnp.concatenate([steps[1:], jnp.array([-1], jnp.int32)])
  batch = noise.shape[0]

  def body(i, carry):
    x, key = carry
    model = nnx.merge(graphdef, state)
    index = steps[i]
    ab = table[index]
    ab_prev = jnp.where(prev[i] >= 0, table[jnp.maximum(prev[i], 0)], 1.0)
    eps = predict_noise(model, schedule, x, jnp.full((batch,), index, jnp.int32), labels, group_fn(index))
    x0 = (x - jnp.sqrt(1 - ab) * eps) / jnp.sqrt(ab)
    if clip:
      x0 = jnp.clip(x0, schedule.data_low, schedule.data_high)
    # eta = 0: deterministic DDIM; eta = 1: ancestral (DDPM posterior) on the strided grid.
    sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    key, sub = jax.random.split(key)
    z = jax.random.normal(sub, x.shape, x.dtype)
    direction = jnp.sqrt(jnp.maximum(1 - ab_prev - sigma ** 2, 0.0)) * eps
    return jnp.sqrt(ab_prev) * x0 + direction + sigma * z, key

  x, _ = jax.lax.fori_loop(0, len(indices), body, (noise, key))
  return x


def ddim_sample(model, schedule: NoiseSchedule, noise: jax.Array, labels=None, *, steps: int = 50,
                group_fn: GroupFn | None = None, clip: bool = True, eta: float = 0.0,
                key: jax.Array | None = None) -> jax.Array:
  """DDIM from `noise` [B,1,28,28] on `steps` strided timesteps; returns samples in the data range.

  eta = 0 is deterministic DDIM; eta = 1 is ancestral sampling with the DDPM posterior variance on the
  strided grid (needs `key`).
  """
  if eta < 0:
    raise ValueError(f"eta must be >= 0, got {eta}")
  if eta > 0 and key is None:
    raise ValueError("ddim_sample with eta > 0 needs a PRNG key")
  graphdef, state = nnx.split(model)
  indices = tuple(int(i) for i in schedule.ddim_indices(steps))
  key = key if key is not None else jax.random.key(0)
  return _ddim_loop(graphdef, state, schedule, indices, group_fn or _no_groups, clip, noise, labels,
                    jnp.float32(eta), key)


def _ddpm_update(schedule: NoiseSchedule, x: jax.Array, eps: jax.Array, index: jax.Array, z: jax.Array) -> jax.Array:
  """One step of the checkpoint's own ancestral rule from timestep `index` (module docstring)."""
  betas = jnp.asarray(schedule.betas, jnp.float32)
  table = jnp.asarray(schedule.alpha_bars, jnp.float32)
  beta, ab = betas[index], table[index]
  if schedule.kind == "dit":
    ab_prev = jnp.where(index > 0, table[jnp.maximum(index - 1, 0)], 1.0)
    mean = (x - beta / jnp.sqrt(1 - ab) * eps) / jnp.sqrt(1 - beta)
    sigma = jnp.sqrt(beta * (1 - ab_prev) / (1 - ab))
    x = mean + jnp.where(index > 0, sigma, 0.0) * z
    return jnp.clip(x, schedule.data_low, schedule.data_high)
  x = (x - beta / jnp.sqrt(1 - ab) * eps) / jnp.sqrt(1 - beta)
  return x + jnp.where(index > schedule.first_index, jnp.sqrt(beta), 0.0) * z


def _ddpm_step(graphdef, state, schedule, labels, group_fn, carry, i):
  """Step i (from last_index down) of the ancestral DDPM path: ((x_next, key), (x, eps))."""
  x, key = carry
  index = schedule.last_index - i
  key, sub = jax.random.split(key)
  z = jax.random.normal(sub, x.shape, x.dtype)
  model = nnx.merge(graphdef, state)
  eps = predict_noise(model, schedule, x, jnp.full((x.shape[0],), index, jnp.int32), labels, group_fn(index))
  return (_ddpm_update(schedule, x, eps, index, z), key), (x, eps)


@functools.partial(jax.jit, static_argnames=("graphdef", "schedule", "group_fn"))
def _ddpm_loop(graphdef, state, schedule, group_fn, noise, labels, key):
  def body(i, carry):
    return _ddpm_step(graphdef, state, schedule, labels, group_fn, carry, i)[0]

  x, _ = jax.lax.fori_loop(0, schedule.num_steps, body, (noise, key))
  return x


def ddpm_sample(model, schedule: NoiseSchedule, noise: jax.Array, labels=None, *, key: jax.Array,
                group_fn: GroupFn | None = None) -> jax.Array:
  """Ancestral DDPM over all timesteps with the checkpoint's own update rule."""
  graphdef, state = nnx.split(model)
  return _ddpm_loop(graphdef, state, schedule, group_fn or _no_groups, noise, labels, key)


@functools.partial(jax.jit, static_argnames=("graphdef", "schedule", "indices"))
def _ddim_trajectory(graphdef, state, schedule, indices, noise, labels, eta, key):
  table = jnp.asarray(schedule.alpha_bars, jnp.float32)
  steps = jnp.asarray(indices, jnp.int32)
  prev = jnp.concatenate([steps[1:], jnp.array([-1], jnp.int32)])
  batch = noise.shape[0]

  def body(carry, step):
    x, key = carry
    index, prev_index = step
    model = nnx.merge(graphdef, state)
    ab = table[index]
    ab_prev = jnp.where(prev_index >= 0, table[jnp.maximum(prev_index, 0)], 1.0)
    eps = predict_noise(model, schedule, x, jnp.full((batch,), index, jnp.int32), labels)
    x0 = jnp.clip((x - jnp.sqrt(1 - ab) * eps) / jnp.sqrt(ab), schedule.data_low, schedule.data_high)
    sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    key, sub = jax.random.split(key)
    z = jax.random.normal(sub, x.shape, x.dtype)
    x_next = jnp.sqrt(ab_prev) * x0 + jnp.sqrt(jnp.maximum(1 - ab_prev - sigma ** 2, 0.0)) * eps + sigma * z
    return (x_next, key), (x, eps)

  _, (xs, eps) = jax.lax.scan(body, (noise, key), (steps, prev))
  return xs, eps  # [S, B, ...] inputs of every step and the model's noise prediction there


def ddim_trajectory(model, schedule: NoiseSchedule, noise: jax.Array, labels=None, *, steps: int = 50,
                    eta: float = 0.0, key: jax.Array | None = None):
  """The DDIM path of a float model: (x_t [S,B,...], eps [S,B,...], indices [S])."""
  graphdef, state = nnx.split(model)
  indices = tuple(int(i) for i in schedule.ddim_indices(steps))
  key = key if key is not None else jax.random.key(0)
  xs, eps = _ddim_trajectory(graphdef, state, schedule, indices, noise, labels, jnp.float32(eta), key)
  return xs, eps, np.asarray(indices, np.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "schedule", "record_every"))
def _ddpm_trajectory(graphdef, state, schedule, record_every, noise, labels, key):
  step = functools.partial(_ddpm_step, graphdef, state, schedule, labels, _no_groups)

  def stride(carry, first):  # `record_every` steps; the first one's input and eps are kept
    carry, (x, eps) = step(carry, first)
    carry = jax.lax.fori_loop(first + 1, first + record_every, lambda i, c: step(c, i)[0], carry)
    return carry, (x, eps)

  firsts = jnp.arange(0, schedule.num_steps, record_every, dtype=jnp.int32)
  _, (xs, eps) = jax.lax.scan(stride, (noise, key), firsts)
  return xs, eps


def ddpm_trajectory(model, schedule: NoiseSchedule, noise: jax.Array, labels=None, *, key: jax.Array,
                    steps: int = 100):
  """The checkpoint's own ancestral DDPM path of a float model over all timesteps, recorded at `steps`
  evenly spaced ones (every num_steps / steps-th, from last_index): (x_t [S,B,...], eps [S,B,...], indices [S])."""
  if steps < 1 or schedule.num_steps % steps:
    raise ValueError(f"steps must be >= 1 and divide the {schedule.num_steps} timesteps, got {steps}")
  graphdef, state = nnx.split(model)
  record_every = schedule.num_steps // steps
  xs, eps = _ddpm_trajectory(graphdef, state, schedule, record_every, noise, labels, key)
  indices = schedule.last_index - np.arange(0, schedule.num_steps, record_every)
  return xs, eps, indices.astype(np.int32)
