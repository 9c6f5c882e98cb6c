"""Unconditional CNN DDPM for MNIST (sdaloglu/diffusion_with_entropy, DDPM.ipynb) in Flax NNX.

Matches `shared/data/diffusion/mnist_cnn`: blocks Conv7x7 -> LayerNorm((C,28,28)) -> GELU with channels
1->16->32->32->16, then Conv3x3 16->1; a time MLP (32->128->128->128->16, GELU) of
[sin(t f), cos(t f) - 1] with t = i/1000 is added after block 0.

Convolutions: `QuantConv` runs a float or fake-quantized conv through `lax.conv_general_dilated`; when
its quantizer says so (integer weights, per-token activations) it runs im2col
(`lax.conv_general_dilated_patches`, features in (c, kh, kw) order, i.e. torch's weight flattening)
followed by the quantized linear. Both compute the same sum: a zero-padded pixel quantizes to the zero
point and so contributes exactly 0. `cometjax.checkpoint.diffusion.load_cnn` loads the checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cometjax.models.layers import QuantLinear


@dataclass(frozen=True)
class CNNConfig:
  image_size: int = 28
  in_channels: int = 1
  n_hidden: tuple[int, ...] = (16, 32, 32, 16)
  kernel_size: int = 7
  last_kernel_size: int = 3
  num_timesteps: int = 1000
  layer_norm_eps: float = 1e-5

  @classmethod
  def from_json(cls, path) -> "CNNConfig":
    raw = json.loads(Path(path).read_text())
    return cls(image_size=raw["image_size"], in_channels=raw["in_channels"], n_hidden=tuple(raw["n_hidden"]),
               kernel_size=raw["kernel_size"], last_kernel_size=raw["last_kernel_size"],
               num_timesteps=raw["diffusion"]["n_T"])


def im2col(x: jax.Array, kernel_size: int) -> jax.Array:
  """[B,C,H,W] -> [B,H,W,C*k*k] ('same' padding, stride 1), features in (c, kh, kw) order."""
  pad = kernel_size // 2
  patches = jax.lax.conv_general_dilated_patches(
    x, (kernel_size, kernel_size), (1, 1), [(pad, pad), (pad, pad)],
    precision=jax.lax.Precision.HIGHEST)  # [B, C*k*k, H, W]
  return patches.transpose(0, 2, 3, 1)


class QuantConv(nnx.Module):
  """Conv2d (stride 1, 'same' padding) whose weights live in a `QuantLinear` [C*k*k, O]."""

  def __init__(self, weight: np.ndarray, bias: np.ndarray):  # torch layout [O, C, k, k]
    self.out_channels, self.in_channels, self.kernel_size, _ = weight.shape
    self.linear = QuantLinear(weight.reshape(weight.shape[0], -1).T, bias)

  def _conv(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
    weight = kernel.T.reshape(self.out_channels, self.in_channels, self.kernel_size, self.kernel_size)
    pad = self.kernel_size // 2
    y = jax.lax.conv_general_dilated(x, weight, (1, 1), [(pad, pad), (pad, pad)],
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return y + self.linear.bias[...][None, :, None, None]

  def float_output(self, x: jax.Array) -> jax.Array:
    """The unquantized conv (through im2col when the kernel was rotated for an input rotation)."""
    quant = self.linear.quant
    if quant is not None and quant.rotates_input:
      return self.linear.float_output(im2col(x, self.kernel_size)).transpose(0, 3, 1, 2)
    return self._conv(x, self.linear.kernel[...])

  def __call__(self, x: jax.Array, group=0) -> jax.Array:  # [B,C,H,W] -> [B,O,H,W]
    if self.linear.record:
      self.linear.sow(nnx.Intermediate, "inputs", x)
    quant = self.linear.quant
    if quant is not None and quant.runs_as_matmul:
      patches = im2col(x, self.kernel_size)  # [B,H,W,C*k*k]
      return quant.linear(patches, self.linear.kernel[...], self.linear.bias_value(), group).transpose(0, 3, 1, 2)
    kernel = self.linear.kernel[...]
    if quant is not None:
      x = quant.quantize_input(x, group)
      kernel = quant.quantize_kernel(kernel)
    return self._conv(x, kernel)


class CNNBlock(nnx.Module):
  def __init__(self, tensors: dict, prefix: str, eps: float):
    self.conv = QuantConv(tensors[f"{prefix}.net.0.weight"], tensors[f"{prefix}.net.0.bias"])
    self.norm_weight = nnx.Param(jnp.asarray(tensors[f"{prefix}.net.1.weight"], jnp.float32))  # [C,H,W]
    self.norm_bias = nnx.Param(jnp.asarray(tensors[f"{prefix}.net.1.bias"], jnp.float32))
    self.eps = eps

  def __call__(self, x: jax.Array, group=0) -> jax.Array:
    h = self.conv(x, group)
    mean = h.mean((1, 2, 3), keepdims=True)
    var = ((h - mean) ** 2).mean((1, 2, 3), keepdims=True)
    h = (h - mean) * jax.lax.rsqrt(var + self.eps) * self.norm_weight[...] + self.norm_bias[...]
    return jax.nn.gelu(h, approximate=False)


class CNNDenoiser(nnx.Module):
  """eps = model(z [B,1,28,28] in about [-0.5,0.5], t float [B] = i/1000, group)."""

  def __init__(self, tensors: dict, config: CNNConfig = CNNConfig()):
    self.config = config
    n = len(config.n_hidden)
    self.blocks = nnx.List([CNNBlock(tensors, f"gt.blocks.{i}", config.layer_norm_eps) for i in range(n)])
    self.blocks[0].conv.linear.edge = True
    self.final = QuantConv(tensors[f"gt.blocks.{n}.weight"], tensors[f"gt.blocks.{n}.bias"])
    self.final.linear.edge = True
    self.frequencies = nnx.Variable(jnp.asarray(tensors["gt.frequencies"], jnp.float32))  # [16]
    self.time_mlp = nnx.List([
      QuantLinear(tensors[f"gt.time_embed.{i}.weight"].T, tensors[f"gt.time_embed.{i}.bias"]) for i in (0, 2, 4, 6)])
    # DDPM wrapper buffers: beta_t and alpha_t (alpha-bar), indices 0..n_T.
    self.beta_t = nnx.Variable(jnp.asarray(tensors["beta_t"], jnp.float32))
    self.alpha_bar_t = nnx.Variable(jnp.asarray(tensors["alpha_t"], jnp.float32))

  def time_embedding(self, t: jax.Array, group=0) -> jax.Array:  # [B] float -> [B, C0]
    angles = t.astype(jnp.float32)[:, None] * self.frequencies[...][None]
    h = jnp.concatenate([jnp.sin(angles), jnp.cos(angles) - 1], axis=-1)
    for i, layer in enumerate(self.time_mlp):
      h = layer(h, group)
      if i < len(self.time_mlp) - 1:
        h = jax.nn.gelu(h, approximate=False)
    return h

  def __call__(self, x: jax.Array, t: jax.Array, group=0) -> jax.Array:
    h = self.blocks[0](x, group) + self.time_embedding(t, group)[:, :, None, None]
    for block in self.blocks[1:]:
      h = block(h, group)
    return self.final(h, group)
