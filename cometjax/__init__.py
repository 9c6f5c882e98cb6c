"""cometjax: COMET (W4AxKV4 LLM serving) and QuEST (4-bit diffusion) in JAX/Pallas."""

__version__ = "0.1.0"
