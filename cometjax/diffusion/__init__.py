"""Diffusion: samplers and schedules, and QuEST's quantizers for the MNIST DiT and CNN.

- `sampling`: noise schedules, DDPM / DDIM samplers, the DDIM trajectory of a float model
- `config`: `DiffusionQuantConfig` and presets
- `quantizers`: fake / integer quantizer modules (the interceptors `cometjax.models.layers` calls)
- `attach`: `attach_quantizers`, `to_integer`
- `evaluation`, `images`: the MNIST test set, the noise-prediction loss, PNG grids

The finetuning drivers (AdaRound, QuEST's TLA/CMA) live in `calib/`.
"""
