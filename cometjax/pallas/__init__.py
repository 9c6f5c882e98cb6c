"""Pallas kernels (Triton backend; `interpret=True` runs them on CPU), one op per module.

- `w4ax_matmul`: W4Ax mixed INT4/INT8-activation GEMM with a 4-bit weight (`w4ax_matmul`, `..._reference`)
- `quantize_act`: fused permutation + per-token FMPQ quantization (`quantize_act`, `..._reference`)
- `kv4_attention`: causal attention over an INT4 KV cache, decode and prefill (`kv4_attention`,
  `kv4_decode_attention`, `kv4_attention_reference`)

Layouts are defined in `cometjax.qtypes`; models reach these through `cometjax.ops`.
"""
