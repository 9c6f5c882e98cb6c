"""Layers of the diffusion models that a quantizer can attach to, through an interceptor object.

The models here never import a quantizer class: `QuantLinear.quant` and `QuantMatmul.quant` hold None
(float) or an object with this protocol (`cometjax.diffusion.quantizers` implements it):

  LinearInterceptor (on QuantLinear.quant):
    linear(x, kernel, bias, group) -> y        the quantized layer (fake-quantized or integer)
    float_input(x) -> x                        the input the float kernel expects (an online rotation
                                               folded into the kernel is applied here)
    rotates_input: bool                        whether float_input changes x
    runs_as_matmul: bool                       a conv must run as im2col + `linear` (integer execution,
                                               per-token activations: one token = one patch)
    quantize_input(x, group), quantize_kernel(kernel)
                                               the fake quantizers of a conv that runs as a convolution
  MatmulInterceptor (on QuantMatmul.quant):
    __call__(a, b, group) -> a @ b quantized

`group` is the timestep group of the sample(s): quantizers with per-timestep scales pick theirs by it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cometjax import ops


class QuantLinear(nnx.Module):
  """y = x @ kernel + bias through `ops.linear`; the attached interceptor (module docstring) quantizes it."""

  def __init__(self, kernel: jax.Array, bias: jax.Array | None):  # kernel [in, out]
    self.kernel = nnx.Param(jnp.asarray(kernel, jnp.float32))
    self.bias = nnx.Param(jnp.asarray(bias, jnp.float32)) if bias is not None else nnx.data(None)
    self.quant = nnx.data(None)
    self.edge = False  # first or last layer: its input stays at 8 bit
    self.record = False  # sow the input (nnx.Intermediate "inputs") for calibration

  def bias_value(self) -> jax.Array | None:
    return self.bias[...] if self.bias is not None else None

  def __call__(self, x: jax.Array, group=0) -> jax.Array:  # x [..., in] -> [..., out]
    if self.record:
      self.sow(nnx.Intermediate, "inputs", x)
    if self.quant is None:
      return ops.linear(x, self.kernel[...], self.bias_value())
    return self.quant.linear(x, self.kernel[...], self.bias_value(), group)

  def float_output(self, x: jax.Array) -> jax.Array:
    """The unquantized layer: x @ kernel + bias, with the input rotation the kernel was rotated for."""
    if self.quant is not None:
      x = self.quant.float_input(x)
    return ops.linear(x, self.kernel[...], self.bias_value())


class QuantMatmul(nnx.Module):
  """a @ b, quantized when an interceptor is attached."""

  def __init__(self, softmax_lhs: bool = False):
    self.softmax_lhs = softmax_lhs  # lhs is a softmax output (kept at 8 bit)
    self.quant = nnx.data(None)
    self.record = False

  def __call__(self, a: jax.Array, b: jax.Array, group=0) -> jax.Array:
    if self.record:
      self.sow(nnx.Intermediate, "lhs", a)
      self.sow(nnx.Intermediate, "rhs", b)
    if self.quant is None:
      return jnp.matmul(a, b)
    return self.quant(a, b, group)
