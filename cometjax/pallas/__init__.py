"""Pallas kernels (Triton backend; `interpret=True` runs them on CPU), one op per module.

- `w4ax_matmul`: W4Ax mixed INT4/INT8-activation GEMM with a 4-bit weight (`w4ax_matmul`, `..._reference`)
- `quantize_act`: fused permutation + per-token FMPQ quantization (`quantize_act`, `..._reference`)
- `kv4_attention`: causal attention over an INT4 KV cache, decode and prefill (`kv4_attention`,
  `kv4_decode_attention`, `kv4_attention_reference`)
- `paged_kv4_attention`: decode attention over the paged `cometjax.kvcache.KV4Cache` (all K layouts),
  used by the model's decode step on Pallas backends (`paged_kv4_attention`, `..._reference`)
- `w4ax_matmul_sm90`: the W4Ax GEMM for Hopper on Mosaic GPU (int8 wgmma, TMA pipeline, persistent
  schedule); "pallas" picks it on compute capability 9.x where it can tile the shape (unmeasured until a
  GPU session times it against `w4ax_matmul`)
- `online_softmax`: the flash step shared by the attention kernels

Layouts are defined in `cometjax.qtypes`; models reach these through `cometjax.ops`.
"""
