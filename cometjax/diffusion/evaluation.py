"""Evaluation data and losses for the MNIST diffusion models: the MNIST test set and the noise-prediction
loss protocol of shared/data/README.md."""

from __future__ import annotations

import functools
import gzip
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cometjax.data import data_path
from cometjax.diffusion.sampling import predict_noise, schedule_for


def load_mnist_test(folder=None) -> tuple[np.ndarray, np.ndarray]:
  """The MNIST test set: uint8 images [10000, 28, 28] and uint8 labels [10000]."""
  folder = Path(folder) if folder is not None else data_path("mnist")
  images_path, labels_path = folder / "t10k-images-idx3-ubyte.gz", folder / "t10k-labels-idx1-ubyte.gz"
  for p in (images_path, labels_path):
    if not p.exists():
      raise FileNotFoundError(f"MNIST file missing: {p} (set COMETJAX_DATA)")
  raw = gzip.decompress(images_path.read_bytes())
  magic, count, rows, cols = struct.unpack(">IIII", raw[:16])
  if magic != 2051:
    raise ValueError(f"{images_path}: bad IDX magic {magic}, expected 2051")
  images = np.frombuffer(raw, np.uint8, offset=16).reshape(count, rows, cols)
  raw = gzip.decompress(labels_path.read_bytes())
  magic, count = struct.unpack(">II", raw[:8])
  if magic != 2049:
    raise ValueError(f"{labels_path}: bad IDX magic {magic}, expected 2049")
  return images, np.frombuffer(raw, np.uint8, offset=8)


@functools.partial(jax.jit, static_argnames=("graphdef", "schedule"))
def _loss_terms(graphdef, state, schedule, x0, labels, index, noise):
  model = nnx.merge(graphdef, state)
  x_t = schedule.q_sample(x0, index, noise)
  eps = predict_noise(model, schedule, x_t, index, labels)
  err = eps - noise
  return jnp.abs(err).mean((1, 2, 3)), (err ** 2).mean((1, 2, 3))


def noise_prediction_loss(model, images: np.ndarray, labels: np.ndarray | None, *, seed: int = 0,
                          batch_size: int = 500, label_shift: int = 0) -> dict:
  """The README's protocol: one random timestep and noise per image; returns mean L1 and MSE.

  images: uint8 [N,28,28]. DiT: t ~ U{0..999}; CNN: t ~ U{1..999}.
  """
  schedule = schedule_for(model)
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(seed)
  high = schedule.last_index if schedule.kind == "dit" else schedule.last_index - 1
  l1, mse = [], []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    x0 = jnp.asarray(schedule.from_uint8(chunk))[:, None]
    index = jnp.asarray(rng.integers(schedule.first_index, high + 1, size=len(chunk)), jnp.int32)
    noise = jnp.asarray(rng.standard_normal(x0.shape).astype(np.float32))
    y = None
    if schedule.kind == "dit":
      y = jnp.asarray((labels[start:start + batch_size].astype(np.int32) + label_shift) % 10)
    a, b = _loss_terms(graphdef, state, schedule, x0, y, index, noise)
    l1.append(np.asarray(a))
    mse.append(np.asarray(b))
  return {"l1": float(np.concatenate(l1).mean()), "mse": float(np.concatenate(mse).mean()), "count": len(images)}
