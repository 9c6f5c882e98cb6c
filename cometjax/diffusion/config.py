"""`DiffusionQuantConfig`: how a diffusion model is quantized (QuEST / Q-Diffusion style), and presets.

Weights: INT4 (or INT8) symmetric, one scale per output channel (or per group of `weight_group_size`
input channels), rounding either to nearest or learned with AdaRound. Activations, by `act_granularity`:
  - "tensor" (Q-Diffusion / QuEST): asymmetric (step + zero point), *static* step sizes learned per
    timestep group, so a sampler switches scales by timestep;
  - "token": symmetric, one scale per token computed at run time (max |x| / qmax), the format of the W4Ax
    GEMM (`cometjax.core.formats.QuantizedActivation` with a single INT4 or INT8 region).
Softmax outputs and the inputs of the first and last layer run at 8 bit. With `rotation="hadamard"`
(token mode) each quantized linear's input is multiplied online by a randomized Hadamard matrix R and the
stored kernel becomes R^T W, so the float function is unchanged (QuaRot's online rotation).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import jax
import jax.numpy as jnp

ACT_GRANULARITIES = ("tensor", "token")
ROTATIONS = (None, "hadamard")


@dataclass(frozen=True)
class DiffusionQuantConfig:
  """How a diffusion model is quantized.  `act_bits=None` keeps activations in float."""

  weight_bits: int = 4
  act_bits: int | None = 4
  edge_act_bits: int = 8  # inputs of the first and last layer
  edge_weight_bits: int = 8  # weights of the first and last layer (BRECQ / Q-Diffusion convention)
  softmax_bits: int = 8  # attention probabilities
  num_timestep_groups: int = 4
  num_timesteps: int = 1000
  quantize_attention_matmuls: bool = True
  # Layers (path regexes, matched against "a.b.0.c") that stay in float entirely.
  keep_float: tuple[str, ...] = ()
  # (path regex, bits): input activation bits of the matching layers (first match wins), e.g. the
  # conditioning path of a DiT, which runs once per sample rather than once per token.
  act_bits_overrides: tuple[tuple[str, int], ...] = ()
  # "tensor": static per-tensor scales per timestep group; "token": dynamic per-token scales (module doc).
  act_granularity: str = "tensor"
  # Input channels per weight scale (None: one scale per output channel); layers whose input width it
  # does not divide keep per-output-channel scales.  Needs act_granularity="token" (the W4Ax GEMM path).
  weight_group_size: int | None = None
  # None, or "hadamard": rotate every quantized linear's input online (module doc).  Needs "token".
  rotation: str | None = None

  def __post_init__(self):
    if self.weight_bits not in (2, 3, 4, 8):
      raise ValueError(f"weight_bits must be one of 2, 3, 4, 8, got {self.weight_bits}")
    for name in ("act_bits", "edge_act_bits", "softmax_bits"):
      bits = getattr(self, name)
      if bits is not None and not 2 <= bits <= 8:
        raise ValueError(f"{name} must be in 2..8 (int8 carries the integer activations), got {bits}")
    if self.num_timestep_groups < 1:
      raise ValueError(f"num_timestep_groups must be >= 1, got {self.num_timestep_groups}")
    for entry in self.act_bits_overrides:
      if (not isinstance(entry, tuple) or len(entry) != 2 or not isinstance(entry[0], str)
          or not isinstance(entry[1], int) or not 2 <= entry[1] <= 8):
        raise ValueError(f"act_bits_overrides entries must be (path regex, bits in 2..8), got {entry!r}")
      re.compile(entry[0])
    if self.act_granularity not in ACT_GRANULARITIES:
      raise ValueError(f"act_granularity must be one of {ACT_GRANULARITIES}, got {self.act_granularity!r}")
    if self.weight_group_size is not None:
      if not isinstance(self.weight_group_size, int) or self.weight_group_size < 2 or self.weight_group_size % 2:
        raise ValueError(f"weight_group_size must be an even int >= 2 or None, got {self.weight_group_size!r}")
      if self.act_granularity != "token":
        raise ValueError("weight_group_size needs act_granularity='token' (grouped weights run through the "
                         f"W4Ax GEMM, whose activations are per token), got {self.act_granularity!r}")
      if self.act_bits is None:
        raise ValueError("weight_group_size needs act_bits (the W4Ax GEMM path quantizes activations)")
    if self.rotation not in ROTATIONS:
      raise ValueError(f"rotation must be one of {ROTATIONS}, got {self.rotation!r}")
    if self.rotation is not None and (self.act_granularity != "token" or self.act_bits is None):
      raise ValueError("rotation needs per-token activations (act_granularity='token' and act_bits set), got "
                       f"act_granularity={self.act_granularity!r}, act_bits={self.act_bits!r}")

  def timestep_group(self, t: jax.Array) -> jax.Array:
    """Integer timestep(s) in [0, num_timesteps) -> activation-scale group index."""
    t = jnp.asarray(t)
    group = (t.astype(jnp.int32) * self.num_timestep_groups) // self.num_timesteps
    return jnp.clip(group, 0, self.num_timestep_groups - 1)


PRESETS = {
  "w8a8": DiffusionQuantConfig(weight_bits=8, act_bits=8),
  "w4a8": DiffusionQuantConfig(weight_bits=4, act_bits=8),
  "w4a4": DiffusionQuantConfig(weight_bits=4, act_bits=4),
}


def preset(name: str) -> DiffusionQuantConfig:
  if name not in PRESETS:
    raise ValueError(f"quantization preset must be one of {sorted(PRESETS)}, got {name!r}")
  return PRESETS[name]
