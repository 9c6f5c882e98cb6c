"""Lowering every kernel for CUDA raises no deprecation warning from our code (under jax 0.10 and 0.11 alike);
the Pallas Triton backend's own deprecation (jax 0.11) is jax's, not ours."""

import pathlib
import warnings

import jax
import jax.numpy as jnp

from cometjax import ops
from cometjax.core.formats import ActivationFormat, QuantizedActivation, QuantizedWeight
from cometjax.core.kv import QuantizedKV
from cometjax.core.kv_config import KVQuantConfig
from cometjax.pallas import kv4_attention, paged_kv4_attention, w4ax_matmul_sm90
from cometjax.serving.kvcache import KV4Cache
from kernel_cases import lowered_for_cuda

PACKAGE = pathlib.Path(ops.__file__).resolve().parents[1]


def test_lowering_raises_no_deprecation_warning_from_cometjax():
  spec = jax.ShapeDtypeStruct
  fmt = ActivationFormat(128, 1, 2)
  qw = QuantizedWeight(spec((128, 256), jnp.uint8), spec((1, 256), jnp.float32), spec((256,), jnp.int32), bits=4,
                       group_size=None, shape=(256, 256), activation=fmt)
  qx = QuantizedActivation(spec((2, 64, 64), jnp.int8), spec((64, 64), jnp.uint8), spec((64,), jnp.float32),
                           spec((64,), jnp.float32), fmt)
  codes, stats = spec((2, 256, 2, 64), jnp.uint8), spec((2, 256, 2, 1), jnp.float32)
  kv = QuantizedKV(codes, codes, stats, stats, stats, stats)
  paged = jax.eval_shape(lambda: KV4Cache.create(1, 4, 256, 2, 128, dtype=jnp.bfloat16,
                                                 config=KVQuantConfig()).paged_layer(0))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    lowered_for_cuda(lambda x, qw: ops.linear(x, qw, implementation="pallas"), spec((3, 256), jnp.bfloat16), qw)
    lowered_for_cuda(lambda qx, qw: w4ax_matmul_sm90.w4ax_matmul_sm90(qx, qw), qx, qw)
    lowered_for_cuda(lambda qx, qw: w4ax_matmul_sm90.w4ax_matmul_sm90(qx, qw, warp_specialized=True), qx, qw)
    lowered_for_cuda(lambda q, kv, n: kv4_attention.kv4_attention(q, kv, n), spec((2, 4, 8, 128), jnp.bfloat16), kv,
                     spec((2,), jnp.int32))
    lowered_for_cuda(lambda q, kv: paged_kv4_attention.paged_kv4_attention(q, kv), spec((4, 8, 128), jnp.bfloat16),
                     paged)
  ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
          if issubclass(w.category, DeprecationWarning) and pathlib.Path(w.filename).resolve().is_relative_to(PACKAGE)]
  assert not ours, "\n".join(ours)
