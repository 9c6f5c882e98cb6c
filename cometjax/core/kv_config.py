"""`KVQuantConfig`: the INT4 KV-cache setting (its layouts are in `cometjax.core.kv`). Plain Python, so the
CLI can list the K modes without importing jax."""

from __future__ import annotations

import dataclasses

K_MODES = ("token", "hadamard", "channel")


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVQuantConfig:
  """INT4 KV cache settings: the K layout, channels per scale, tokens per K group in "channel" mode."""
  k_mode: str = "channel"
  head_group: int | None = None  # channels per scale for per-token layouts; None = the whole head
  group_tokens: int = 32  # tokens per K scale group in "channel" mode
  # False: the zero point is the float -min / scale, so the 16 levels span [min, max] exactly (KIVI);
  # True: rounded to an integer (the grid shifts off min by up to half a step)
  integer_zero: bool = False

  def __post_init__(self):
    if self.k_mode not in K_MODES:
      raise ValueError(f"k_mode must be one of {K_MODES}, got {self.k_mode!r}")
    if self.group_tokens < 1:
      raise ValueError(f"group_tokens must be >= 1, got {self.group_tokens}")

  @property
  def prefill_chunk(self) -> int:
    """Tokens per prefill write the cache accepts (1 = any number)."""
    return self.group_tokens if self.k_mode == "channel" else 1

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)
