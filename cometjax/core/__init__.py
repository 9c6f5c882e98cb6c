"""Formats and numerics: what a quantized array is, independent of any backend.

- `numerics`: round-half-up rounding, INT4 packing, symmetric / asymmetric quantizers.
- `rotations`: Hadamard matrices (+-1 and orthonormal), random orthogonal matrices, block rotations.
- `formats`: the quantized linear-weight leaves (`QuantizedWeight`, `InputTransformWeight`,
  `StaticActQuantWeight`) and the FMPQ activation layout (`ActivationFormat`, `QuantizedActivation`).
- `kv`: the INT4 KV layouts (`QuantizedKV`, the paged `PagedKV4`) and their setting (`KVQuantConfig`).

Nothing here imports a kernel, a model or a cache: kernels read these layouts, `cometjax.ops` dispatches on
them.
"""
