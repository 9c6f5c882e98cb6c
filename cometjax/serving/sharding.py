"""Tensor-parallel sharding of a (quantized) Llama over a device mesh axis.

Megatron layout: q/k/v/gate/up are column-parallel (output features split over the axis), o/down are
row-parallel (input features split), norms and embeddings replicated. XLA's SPMD partitioner inserts the
collectives; outputs equal the single-device model's. A dimension the axis size does not divide stays
replicated (so any model runs on any mesh; such layers just do not shard). Quantized leaves shard the
same way: packed data [K/2, N] and scales [G, N] along N (column) or K (row); the permutation is
replicated.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cometjax.core.formats import QuantizedWeight

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")
ROW_PARALLEL = ("o_proj", "down_proj")


def make_mesh(num_devices: int | None = None, axis: str = "tp") -> Mesh:
  """A 1-D mesh over the first `num_devices` devices (all by default)."""
  devices = jax.devices()
  num_devices = num_devices or len(devices)
  if not 1 <= num_devices <= len(devices):
    raise ValueError(f"num_devices must be in [1, {len(devices)}] (devices present), got {num_devices}")
  return Mesh(np.array(devices[:num_devices]), (axis,))


def _spec(shape, split_axis: int | None, size: int, axis: str) -> P:
  if split_axis is None or shape[split_axis] % size:
    return P()
  spec = [None] * len(shape)
  spec[split_axis] = axis
  return P(*spec)


def _leaf_spec(path: tuple, leaf, size: int, axis: str, transposed: bool = False) -> P:
  """PartitionSpec of one array leaf of the model state, from its path (transposed: the array is a K-major
  weight's data, [N, K..] rather than [K.., N])."""
  names = [getattr(k, "key", getattr(k, "name", k)) for k in path]
  module = next((n for n in names if n in COLUMN_PARALLEL + ROW_PARALLEL), None)
  field = names[-1]
  shape = np.shape(leaf)
  if module is None or field == "perm" or len(shape) == 0:
    return P()
  column = module in COLUMN_PARALLEL
  if len(shape) == 1:  # biases live on the output features
    return _spec(shape, 0, size, axis) if column else P()
  if field == "scales" and not column and shape[0] == 1:
    return P()  # per-output-channel scales of a row-parallel weight: every shard needs all of them
  return _spec(shape, (1 if column else 0) if not transposed else (0 if column else 1), size, axis)


def _specs(state, size: int, axis: str):
  """The PartitionSpec tree of `state`; quantized weights are read whole, for their data layout."""
  def spec(path, leaf):
    if isinstance(leaf, QuantizedWeight):
      fields = {name: None if getattr(leaf, name) is None else
                _leaf_spec(path + (jax.tree_util.GetAttrKey(name),), getattr(leaf, name), size, axis,
                           transposed=name == "data" and leaf.layout == "nk")
                for name in ("data", "scales", "perm")}
      return dataclasses.replace(leaf, **fields)
    return _leaf_spec(path, leaf, size, axis)

  return jax.tree_util.tree_map_with_path(spec, state, is_leaf=lambda x: isinstance(x, QuantizedWeight))


def shard_model(model, mesh: Mesh, axis: str = "tp"):
  """Returns the model with its state placed on `mesh`, tensor-parallel over `axis`."""
  if axis not in mesh.axis_names:
    raise ValueError(f"axis {axis!r} is not a mesh axis {mesh.axis_names}")
  size = mesh.shape[axis]
  graphdef, state = nnx.split(model)
  specs = _specs(state, size, axis)
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  return nnx.merge(graphdef, jax.device_put(state, shardings))
