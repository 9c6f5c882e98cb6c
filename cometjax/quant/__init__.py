"""LLM quantization as a transform of the parameter tree (COMET's W4Ax + KV4).

- `config`: `QuantConfig` (weights, FMPQ activations, KV4, rotation) and the named presets
- `fmpq`: per-layer input plans (padding, online rotation) and FMPQ block plans from statistics
- `rotation`: QuaRot-style rotations of a Llama, exact in float
- `clipping`, `gptq`: weight algorithms, arrays in and arrays out (clip search, learned clipping, GPTQ)
- `layer`: one float kernel -> its quantized leaf
- `transform`: `quantize(model, config, stats)` over the whole model
- `report`: `quantization_report(model)`
- `tree`: walking a model's pure state dict

Calibration statistics come from the drivers in `calib/` (which depend on this package, never the reverse).
"""
