"""Pallas kernels, one op per module; `interpret=True` runs them on CPU. Kernels take arrays and the
formats of `cometjax.core`, never a model, a cache object or a config of a layer above.

- `w4ax_matmul`: W4Ax mixed INT4/INT8-activation GEMM with a 4-bit weight (Triton backend)
- `w4ax_matmul_sm90`: the same GEMM for Hopper on Mosaic GPU (int8 wgmma, TMA pipeline, persistent schedule)
- `quantize_act`: fused permutation + per-token FMPQ quantization of activations
- `kv4_attention`: causal attention over a contiguous INT4 KV cache, decode and prefill
- `paged_kv4_attention`: decode attention over one layer of a paged INT4 cache (every K layout)
- `online_softmax`, `common`: the flash step and the register helpers the kernel bodies share

Each kernel file holds the kernel body, its `pallas_call` wrapper, a jitted entry with static tuning knobs,
a frozen tuning dataclass and a `*_reference` in plain jnp. `cometjax.ops` chooses between them.
"""
