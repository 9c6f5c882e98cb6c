"""cometjax: COMET (W4AxKV4 LLM serving) and QuEST (4-bit diffusion) in JAX/Pallas.

The public API, by data path: `load` (checkpoint -> model + tokenizer), `quantize` (model -> quantized
model), `generate` / `perplexity` (model -> tokens / ppl), with their configs.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load": "cometjax.models.loaders",
    "LoadedModel": "cometjax.models.loaders",
    "CheckpointError": "cometjax.models.loaders",
    "Llama": "cometjax.models.llama",
    "LlamaConfig": "cometjax.models.llama",
    "generate": "cometjax.generate",
    "SamplingConfig": "cometjax.generate",
    "perplexity": "cometjax.perplexity",
    "KVQuantConfig": "cometjax.kvcache",
    "QuantizedWeight": "cometjax.qtypes",
    "ActivationFormat": "cometjax.qtypes",
    "QuantConfig": "cometjax.config",
    "WeightQuantConfig": "cometjax.config",
    "ActivationQuantConfig": "cometjax.config",
    "preset": "cometjax.config",
    "PRESETS": "cometjax.config",
    "quantize": "cometjax.quantize",
    "calibrate_and_quantize": "cometjax.quantize",
    "save_quantized": "cometjax.quantize",
    "load_quantized": "cometjax.quantize",
    "quantization_report": "cometjax.quantize",
    "Engine": "cometjax.engine",
    "load_dit": "cometjax.models.dit",
    "load_cnn": "cometjax.models.cnn_ddpm",
    "ddim_sample": "cometjax.diffusion",
    "ddpm_sample": "cometjax.diffusion",
    "DiffusionQuantConfig": "cometjax.quest_quant",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):  # imported on first use: `import cometjax` stays cheap and cycle-free
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'cometjax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + __all__)
