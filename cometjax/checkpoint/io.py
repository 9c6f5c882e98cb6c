"""Reading and writing safetensors files with named errors, and dtypes safetensors cannot hold."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from cometjax.errors import CheckpointError


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
  """All tensors of one safetensors file as numpy arrays; a missing or unreadable file raises CheckpointError."""
  from safetensors.numpy import load_file
  path = Path(path)
  if not path.is_file():
    raise CheckpointError(f"weight file {path} is missing")
  try:
    return load_file(str(path))
  except Exception as e:  # safetensors raises its own error types on truncated headers / data
    raise CheckpointError(f"cannot read weight file {path}: {e}") from e


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
  from safetensors.numpy import save_file
  save_file(tensors, str(path))


def to_storable(a) -> tuple[np.ndarray, str]:
  """A numpy array safetensors can hold, plus the dtype name to restore (bfloat16 travels as uint16 bits)."""
  a = np.asarray(a)
  name = a.dtype.name
  if name == "bfloat16":
    return a.view(np.uint16), name
  return a, name


def from_storable(a: np.ndarray, dtype_name: str):
  if dtype_name == "bfloat16":
    return jnp.asarray(a.view(jnp.bfloat16))
  return jnp.asarray(a, dtype=dtype_name)
