"""Class-conditional DiT for MNIST (Franfee/DM-DiT-DDPM-MNIST-class-cond-ImageGen) in Flax NNX.

Matches `shared/data/diffusion/mnist_dit` (config.json there): patchify conv 4x4/4 (run as a linear on
non-overlapping patches, which is exact), width 64, 3 blocks with adaLN-style modulation from
cond = label_emb(y) + MLP(sinusoid(t)), 4 heads of width 64, attention scaled by 1/sqrt(49).
Every linear goes through `QuantLinear` -> `cometjax.ops.linear`, so quantizers attach without edits
(`cometjax.models.layers`). `cometjax.checkpoint.diffusion.load_dit` loads the checkpoint.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from cometjax.models.layers import QuantLinear, QuantMatmul


@dataclass(frozen=True)
class DiTConfig:
  image_size: int = 28
  in_channels: int = 1
  patch_size: int = 4
  hidden_size: int = 64
  depth: int = 3
  num_heads: int = 4
  num_classes: int = 10
  num_timesteps: int = 1000
  layer_norm_eps: float = 1e-5

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid ** 2

  @property
  def patch_dim(self) -> int:
    return self.in_channels * self.patch_size ** 2

  @classmethod
  def from_json(cls, path) -> "DiTConfig":
    raw = json.loads(Path(path).read_text())
    return cls(image_size=raw["image_size"], in_channels=raw["in_channels"], patch_size=raw["patch_size"],
               hidden_size=raw["hidden_size"], depth=raw["depth"], num_heads=raw["num_heads"],
               num_classes=raw["num_classes"], num_timesteps=raw["diffusion"]["timesteps"])


class LayerNorm(nnx.Module):
  def __init__(self, weight: jax.Array, bias: jax.Array, eps: float):
    self.weight = nnx.Param(jnp.asarray(weight, jnp.float32))
    self.bias = nnx.Param(jnp.asarray(bias, jnp.float32))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.weight[...] + self.bias[...]


def _linear(tensors: dict, name: str) -> QuantLinear:
  # torch stores [out, in]; ops.linear wants [in, out]
  return QuantLinear(tensors[f"{name}.weight"].T, tensors.get(f"{name}.bias"))


class DiTBlock(nnx.Module):
  def __init__(self, tensors: dict, prefix: str, config: DiTConfig):
    self.num_heads = config.num_heads
    self.head_dim = config.hidden_size  # every head has the full width (as in the checkpoint)
    for name in ("gamma1", "beta1", "alpha1", "gamma2", "beta2", "alpha2", "wq", "wk", "wv", "lv"):
      setattr(self, name, _linear(tensors, f"{prefix}.{name}"))
    self.ff1 = _linear(tensors, f"{prefix}.ff.0")
    self.ff2 = _linear(tensors, f"{prefix}.ff.2")
    self.ln1 = LayerNorm(tensors[f"{prefix}.ln1.weight"], tensors[f"{prefix}.ln1.bias"], config.layer_norm_eps)
    self.ln2 = LayerNorm(tensors[f"{prefix}.ln2.weight"], tensors[f"{prefix}.ln2.bias"], config.layer_norm_eps)
    self.qk = QuantMatmul()
    self.pv = QuantMatmul(softmax_lhs=True)

  def __call__(self, x: jax.Array, cond: jax.Array, group=0) -> jax.Array:  # x [B,L,D], cond [B,D]
    batch, length, _ = x.shape
    gamma1, beta1, alpha1 = (m(cond, group)[:, None] for m in (self.gamma1, self.beta1, self.alpha1))
    gamma2, beta2, alpha2 = (m(cond, group)[:, None] for m in (self.gamma2, self.beta2, self.alpha2))

    h = self.ln1(x) * (1 + gamma1) + beta1

    def heads(t):  # [B, L, H*E] -> [B, H, L, E]
      return t.reshape(batch, length, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

    q, k, v = heads(self.wq(h, group)), heads(self.wk(h, group)), heads(self.wv(h, group))
    # The original divides by sqrt(q.size(2)) on [B,H,L,E]: the sequence length, not head_dim.
    logits = self.qk(q, k.transpose(0, 1, 3, 2), group) / math.sqrt(length)  # [B,H,L,L]
    probs = jax.nn.softmax(logits, axis=-1)
    attn = self.pv(probs, v, group).transpose(0, 2, 1, 3).reshape(batch, length, -1)  # [B,L,H*E]
    x = x + alpha1 * self.lv(attn, group)

    h = self.ln2(x) * (1 + gamma2) + beta2
    return x + alpha2 * self.ff2(jax.nn.relu(self.ff1(h, group)), group)


class DiT(nnx.Module):
  """eps = model(x [B,1,28,28] in [-1,1], t int [B] in 0..999, y int [B] in 0..9, group)."""

  def __init__(self, tensors: dict, config: DiTConfig = DiTConfig()):
    self.config = config
    conv_w = tensors["conv.weight"]  # [C*p*p, C, p, p]: out channels, then (c, kh, kw)
    self.patch_conv = QuantLinear(conv_w.reshape(conv_w.shape[0], -1).T, tensors["conv.bias"])
    self.patch_conv.edge = True  # first layer: its input (the noisy image) stays at 8 bit
    self.patch_emb = _linear(tensors, "patch_emb")
    # conv and patch_emb are two linear maps in a row: together they are the first layer.
    self.patch_emb.edge = True
    self.pos_emb = nnx.Param(jnp.asarray(tensors["patch_pos_emb"], jnp.float32))  # [1, L, D]
    self.half_emb = nnx.Variable(jnp.asarray(tensors["time_emb.0.half_emb"], jnp.float32))  # [D/2]
    self.time_mlp1 = _linear(tensors, "time_emb.1")
    self.time_mlp2 = _linear(tensors, "time_emb.3")
    self.label_emb = nnx.Param(jnp.asarray(tensors["label_emb.weight"], jnp.float32))  # [classes, D]
    self.blocks = nnx.List([DiTBlock(tensors, f"dits.{i}", config) for i in range(config.depth)])
    self.final_ln = LayerNorm(tensors["ln.weight"], tensors["ln.bias"], config.layer_norm_eps)
    self.final = _linear(tensors, "linear")
    self.final.edge = True

  def patchify(self, x: jax.Array) -> jax.Array:  # [B,C,H,W] -> [B, L, C*p*p] in (c, kh, kw) order
    c = self.config
    b = x.shape[0]
    x = x.reshape(b, c.in_channels, c.grid, c.patch_size, c.grid, c.patch_size)
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(b, c.num_patches, c.patch_dim)

  def unpatchify(self, x: jax.Array) -> jax.Array:  # [B, L, C*p*p] -> [B,C,H,W]
    c = self.config
    b = x.shape[0]
    x = x.reshape(b, c.grid, c.grid, c.in_channels, c.patch_size, c.patch_size)
    return x.transpose(0, 3, 1, 4, 2, 5).reshape(b, c.in_channels, c.image_size, c.image_size)

  def time_embedding(self, t: jax.Array) -> jax.Array:  # [B] -> [B, D]
    angles = t.astype(jnp.float32)[:, None] * self.half_emb[...][None]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)

  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, group=0) -> jax.Array:
    t_emb = self.time_mlp2(jax.nn.relu(self.time_mlp1(self.time_embedding(t), group)), group)
    cond = self.label_emb[...][y] + t_emb  # [B, D]
    h = self.patch_emb(self.patch_conv(self.patchify(x), group), group) + self.pos_emb[...]  # [B,L,D]
    for block in self.blocks:
      h = block(h, cond, group)
    return self.unpatchify(self.final(self.final_ln(h), group))
