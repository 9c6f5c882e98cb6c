"""`cometjax.ops.registry`: "auto" runs a compiled kernel only on a GPU whose device kind lists it as validated."""

import jax
import numpy as np
import pytest

from cometjax.core.formats import ActivationFormat, quantize_weight
from cometjax.errors import UnsupportedError
from cometjax.ops import registry


def w4ax_weight(k=256, n=64, block=64):
  w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
  return quantize_weight(w, 4, activation=ActivationFormat(block, 1, k // block))


@pytest.fixture
def fake_gpu(monkeypatch):
  """A GPU of kind "NVIDIA H200" whose validation table the test sets."""
  table = {}
  monkeypatch.setattr(registry, "device_kind", lambda: "NVIDIA H200")
  monkeypatch.setattr(registry, "_validation_table", lambda: table)
  return table


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU rule")
def test_auto_is_xla_off_gpu():
  assert registry.device_kind() is None and registry.validated_kernels() == frozenset()
  assert registry.resolve("linear", w4ax_weight(), "auto") == "xla"


def test_auto_never_picks_an_unvalidated_kernel(fake_gpu):
  qw = w4ax_weight()
  assert registry.resolve("linear", qw, "auto") == "xla"  # nothing validated on this device kind
  fake_gpu["NVIDIA H200"] = {"validated": ["w4ax_matmul"]}
  assert registry.resolve("linear", qw, "auto") == "xla"  # quantize_act, which the path also runs, is not
  fake_gpu["NVIDIA H200"] = {"validated": ["quantize_act", "w4ax_matmul"]}
  assert registry.resolve("linear", qw, "auto") == "pallas"
  fake_gpu["NVIDIA H100 80GB HBM3"] = fake_gpu.pop("NVIDIA H200")  # another kind's run does not count
  assert registry.resolve("linear", qw, "auto") == "xla"


def test_auto_falls_back_where_the_validated_kernel_cannot_tile(fake_gpu):
  fake_gpu["NVIDIA H200"] = {"validated": ["quantize_act", "w4ax_matmul"]}
  small_blocks = w4ax_weight(k=128, block=32)  # 32-channel scale segments: the compiled GEMM needs 64
  assert registry.resolve("linear", small_blocks, "auto") == "xla"
  with pytest.raises(UnsupportedError, match="cannot tile it"):
    registry.resolve("linear", small_blocks, "pallas")


def test_preferred_kernel_reads_the_table(fake_gpu):
  assert registry.preferred_kernel("w4ax_matmul") == "w4ax_matmul"
  fake_gpu["NVIDIA H200"] = {"validated": [], "prefer": {"w4ax_matmul": "w4ax_matmul_sm90"}}
  assert registry.preferred_kernel("w4ax_matmul") == "w4ax_matmul_sm90"


def test_backends_without_a_kernel_are_never_auto(fake_gpu, monkeypatch):
  class Leaf:  # a leaf type whose "pallas" entry runs no Pallas kernel
    pass

  monkeypatch.setitem(registry._BACKENDS, ("linear", Leaf), {})
  registry.register("linear", Leaf, "xla", lambda x, w, impl: x)
  registry.register("linear", Leaf, "pallas", lambda x, w, impl: x)
  assert registry.resolve("linear", Leaf(), "auto") == "xla"
  assert registry.resolve("linear", Leaf(), "pallas") == "pallas"


def test_unknown_implementation_and_operand_are_named():
  with pytest.raises(ValueError, match="implementation must be one of"):
    registry.resolve("linear", w4ax_weight(), "cuda")
  with pytest.raises(UnsupportedError, match="no implementation is registered for operands of type int"):
    registry.resolve("linear", 3, "xla")
