"""Reading and writing safetensors files and reading GGUF files with named errors, and dtypes safetensors
cannot hold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def open_gguf(path: str | Path):
  """A `gguf.GGUFReader` over the file; a truncated or malformed file raises CheckpointError naming it."""
  import gguf
  path = Path(path)
  if not path.is_file():
    raise CheckpointError(f"GGUF file {path} is missing")
  try:
    reader = gguf.GGUFReader(str(path))
  except Exception as e:  # the reader raises ValueError / IndexError / struct errors on bad or short files
    raise CheckpointError(f"cannot read GGUF file {path} (truncated or not a GGUF file?): "
                          f"{type(e).__name__}: {e}") from e
  for tensor in reader.tensors:  # the reader maps data lazily: a short file shows as a short tensor
    if tensor.data.nbytes != tensor.n_bytes:
      raise CheckpointError(f"GGUF file {path} is truncated: tensor {tensor.name!r} needs {tensor.n_bytes} "
                            f"bytes at offset {tensor.data_offset}, the file holds {tensor.data.nbytes} of them")
  spans = sorted((int(t.data_offset), int(t.data_offset) + int(t.n_bytes), t.name) for t in reader.tensors)
  for (_, end, name), (start, _, next_name) in zip(spans, spans[1:]):
    if start < end:  # a corrupted offset would read another tensor's bytes
      raise CheckpointError(f"GGUF file {path}: tensor {next_name!r} overlaps tensor {name!r} (corrupted offsets)")
  return reader


def gguf_metadata(reader) -> dict[str, Any]:
  """Every metadata key -> its Python value (strings, numbers, bools, lists)."""
  out = {}
  for key, field in reader.fields.items():
    if key.startswith("GGUF."):
      continue
    out[key] = field.contents()
  return out


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
