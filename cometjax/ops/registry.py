"""The one map from (op, operand type, implementation) to a function, and the rule "auto" follows.

Implementations: "xla" (plain jnp; every op has it), "pallas" (compiled Pallas kernels), "interpret"
(the Pallas kernels in interpret mode, for CPU tests), "auto".

- An explicit "pallas" / "interpret" that has no backend for the operand, or whose backend says it cannot
  tile it, raises `cometjax.errors.UnsupportedError` naming the op, the operand and the reason.
- "auto" runs the compiled kernel only on a GPU whose device kind lists that kernel as validated in
  `validated_kernels.json` (written from a `bench/gpu_validate.py` run on that device kind) and when the
  backend supports the operand; otherwise XLA. No kernel has been validated yet, so "auto" is XLA
  everywhere until a GPU run says otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Callable

import jax

from cometjax.errors import UnsupportedError

IMPLEMENTATIONS = ("auto", "xla", "pallas", "interpret")
VALIDATION_TABLE = pathlib.Path(__file__).with_name("validated_kernels.json")


@dataclasses.dataclass(frozen=True)
class Backend:
  """One implementation of an op for one operand type.

  fn(*args, **kwargs) computes the op; unsupported(operand) returns None when the backend can serve the
  operand, else the reason; kernels names the Pallas kernels it runs (their entries in the validation table).
  """
  fn: Callable
  unsupported: Callable[[object], str | None] | None = None
  kernels: tuple[str, ...] = ()


_BACKENDS: dict[tuple[str, type], dict[str, Backend]] = {}


def check_implementation(implementation: str) -> str:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  return implementation


def register(op: str, operand_type: type, implementation: str, fn: Callable, *,
             unsupported: Callable[[object], str | None] | None = None, kernels: tuple[str, ...] = ()) -> None:
  """Registers `fn` as `implementation` of `op` for operands of `operand_type` (exact type)."""
  if implementation not in IMPLEMENTATIONS[1:]:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS[1:]}, got {implementation!r}")
  _BACKENDS.setdefault((op, operand_type), {})[implementation] = Backend(fn, unsupported, tuple(kernels))


def backends(op: str, operand) -> dict[str, Backend]:
  found = _BACKENDS.get((op, type(operand)))
  if found is None:
    raise UnsupportedError(f"{op}: no implementation is registered for operands of type "
                           f"{type(operand).__name__}")
  return found


@functools.lru_cache(maxsize=1)
def _validation_table() -> dict:
  if not VALIDATION_TABLE.exists():
    return {}
  return json.loads(VALIDATION_TABLE.read_text()).get("devices", {})


def device_kind() -> str | None:
  """The first device's kind ("NVIDIA H200", ...) on a GPU backend, else None."""
  device = jax.devices()[0]
  return device.device_kind if device.platform == "gpu" else None


def is_hopper(device=None) -> bool:
  """Whether `device` (default: the first jax device) is an NVIDIA GPU of compute capability 9.x."""
  device = jax.devices()[0] if device is None else device
  if device.platform != "gpu":
    return False
  return str(getattr(device, "compute_capability", "")).split(".")[0] == "9"


def validated_kernels(kind: str | None = None) -> frozenset[str]:
  """The kernels a validated GPU run of this device kind recorded as correct (empty off-GPU)."""
  kind = device_kind() if kind is None else kind
  if kind is None:
    return frozenset()
  return frozenset(_validation_table().get(kind, {}).get("validated", ()))


def preferred_kernel(op_kernel: str, kind: str | None = None) -> str:
  """The kernel the validation table names as fastest for `op_kernel` on this device kind (default itself)."""
  kind = device_kind() if kind is None else kind
  if kind is None:
    return op_kernel
  return _validation_table().get(kind, {}).get("prefer", {}).get(op_kernel, op_kernel)


def select(op: str, operand, implementation: str) -> tuple[str, Backend]:
  """(implementation that runs, its backend) for `operand` under the rule in the module docstring."""
  check_implementation(implementation)
  available = backends(op, operand)
  if implementation == "auto":
    pallas = available.get("pallas")
    if (pallas is not None and pallas.kernels and device_kind() is not None
        and set(pallas.kernels) <= validated_kernels()
        and (pallas.unsupported is None or pallas.unsupported(operand) is None)):
      return "pallas", pallas
    return "xla", available["xla"]
  backend = available.get(implementation)
  if backend is None:
    raise UnsupportedError(f"{op}: no {implementation!r} implementation for {type(operand).__name__} operands "
                           f"(have {sorted(available)}); use implementation='auto' or 'xla'")
  reason = backend.unsupported(operand) if backend.unsupported is not None else None
  if reason is not None:
    raise UnsupportedError(f"{op}: implementation={implementation!r} cannot serve this "
                           f"{type(operand).__name__}: {reason}; use implementation='auto' (falls back to "
                           "XLA) or 'xla'")
  return implementation, backend


def resolve(op: str, operand, implementation: str) -> str:
  """The implementation `select` would run (raises as it does)."""
  return select(op, operand, implementation)[0]
