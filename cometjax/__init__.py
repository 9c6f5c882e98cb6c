"""cometjax: COMET (W4AxKV4 LLM serving) and QuEST (4-bit diffusion) in JAX/Pallas.

The public API, by data path: `load` (checkpoint -> model + tokenizer), `quantize` (model -> quantized
model), `generate` / `perplexity` / `Engine` (model -> tokens / ppl / a serving loop), with their configs.
Names resolve on first use, so `import cometjax` stays cheap; no submodule shares a name with them.
Calibration drivers (statistics, `calibrate_and_quantize`, AdaRound, QuEST finetuning) live in `calib`.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load": "cometjax.checkpoint.loading",
    "LoadedModel": "cometjax.checkpoint.loaded",
    "save_quantized": "cometjax.checkpoint.quantized",
    "load_quantized": "cometjax.checkpoint.quantized",
    "load_dit": "cometjax.checkpoint.diffusion",
    "load_cnn": "cometjax.checkpoint.diffusion",
    "enable_compilation_cache": "cometjax.compile_cache",
    "CheckpointError": "cometjax.errors",
    "ConfigError": "cometjax.errors",
    "UnsupportedError": "cometjax.errors",
    "Llama": "cometjax.models.llama",
    "LlamaConfig": "cometjax.models.llama",
    "generate": "cometjax.serving.generate",
    "SamplingConfig": "cometjax.serving.generate",
    "perplexity": "cometjax.serving.perplexity",
    "Engine": "cometjax.serving.engine",
    "KVQuantConfig": "cometjax.core.kv_config",
    "QuantizedWeight": "cometjax.core.formats",
    "ActivationFormat": "cometjax.core.formats",
    "QuantConfig": "cometjax.quant.config",
    "WeightQuantConfig": "cometjax.quant.config",
    "ActivationQuantConfig": "cometjax.quant.config",
    "preset": "cometjax.quant.config",
    "PRESETS": "cometjax.quant.config",
    "quantize": "cometjax.quant.transform",
    "quantization_report": "cometjax.quant.report",
    "ddim_sample": "cometjax.diffusion.sampling",
    "ddpm_sample": "cometjax.diffusion.sampling",
    "DiffusionQuantConfig": "cometjax.diffusion.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this hook
    return value
  raise AttributeError(f"module 'cometjax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + __all__)
