"""`LoadedModel`: what every LLM loader returns."""

from __future__ import annotations

import dataclasses
from typing import Any

from cometjax.checkpoint.tokenizers import Tokenizer
from cometjax.models.llama import Llama, LlamaConfig


@dataclasses.dataclass
class LoadedModel:
  model: Llama
  tokenizer: Tokenizer | None
  config: LlamaConfig
  source: str
  quant_config: Any = None  # the cometjax.quant.config.QuantConfig of a quantized directory, else None
