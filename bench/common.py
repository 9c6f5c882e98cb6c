"""What every bench script records beside its numbers: date, device, jax version, commit."""

from __future__ import annotations

import datetime
import json
import pathlib
import re
import subprocess

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def device_tag() -> str:
  """A file-name-safe device name: 'cpu', 'nvidia_h100_80gb_hbm3', ..."""
  device = jax.devices()[0]
  kind = device.device_kind if device.platform != "cpu" else "cpu"
  return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_")


def git_commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def run_metadata() -> dict:
  device = jax.devices()[0]
  return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "device": device.device_kind, "platform": device.platform, "jax_version": jax.__version__,
          "commit": git_commit()}


def write_json(path: pathlib.Path, payload: dict) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(payload, indent=1) + "\n")
  return path


def use_kernels_where_supported(model, implementation: str) -> dict:
  """Sets each quantized Linear of `model` to `implementation` ("pallas" / "interpret") where a kernel serves
  its leaf and to "xla" elsewhere (A16 and 8-bit weights, untileable shapes), in place; returns the counts.

  `set_matmul_implementation(model, "pallas")` would raise on the first layer no kernel serves: that is right
  for a user who asked for kernels, but a benchmark wants every layer that can run one to run it.
  """
  from flax import nnx

  from cometjax.core.formats import is_quantized_leaf
  from cometjax.models.llama import Attention, Linear
  from cometjax.ops import registry

  counts = {implementation: 0, "xla": 0}
  for _, node in nnx.iter_graph(model):
    if isinstance(node, Attention):
      node.implementation = implementation
    if isinstance(node, Linear) and is_quantized_leaf(node.kernel.get_value()):
      leaf = node.kernel.get_value()
      inner = getattr(leaf, "inner", leaf)
      try:
        registry.select("linear", inner, implementation)
        node.implementation = implementation
      except ValueError:
        node.implementation = "xla"
      counts[node.implementation] += 1
  return counts
