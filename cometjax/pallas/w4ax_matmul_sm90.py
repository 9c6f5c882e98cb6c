"""W4Ax mixed-precision GEMM for Hopper (Pallas Mosaic GPU, `plgpu`): y[M, N] = x_q[M, K] . w_q[K, N].

Same inputs, outputs and numbers as `w4ax_matmul` (the Triton-backend kernel, whose module docstring
defines the layout, the x16 trick and the scale segments); `w4ax_matmul_reference` is the reference
for both. What differs is how the tensor cores are driven:

- int8 `wgmma` with an int32 accumulator (`plgpu.ACC(..., jnp.int32)`), one warpgroup per output tile
  of block_m (64 or 128) tokens x block_n (64..256) output channels. Each pipeline step covers
  block_k channels = two wgmmas of K = block_k // 2 (the even and the odd channel planes).
- INT4 -> INT8 unpack in registers (COMET's x16 trick, `pallas.common.unpack_int4_x16` in 16-bit lanes:
  Mosaic GPU has no 8-bit shifts): each nibble lands in the high half of an int8 (value * 16, sign
  included) and the 1/16 per 4-bit operand is folded into the f32 scale. Unpacked tiles are stored to shared memory (`commit_smem` fences them for the async
  proxy) and fed to the wgmma from there.
- Operands arrive by TMA through a multi-stage `plgpu.emit_pipeline` (max_concurrent_steps stages):
  the INT8 region reads the even/odd planes of `int8_part` and the INT4 region `int4_part`, each with
  the matching rows of the packed weight. One pipeline per scale segment: per-output-channel weights
  have one segment per activation block, group-wise weights one per gcd(group, block) channels (short
  pipelines when blocks or groups are small).
- Epilogue: at every segment end the int32 sum S becomes f32, S / 16 or / 256 (exact), minus zero[col] *
  code_sum[row] for asymmetric weights, times x_scale[block, row] * w_scale[col] (the row vectors come by
  TMA from the block's row of qx.scales and qx.code_sums); the f32 tile finally goes to shared memory and
  back to HBM by TMA, in out_dtype.
- warp_specialized=True (`plgpu.emit_pipeline_warp_specialized`): a producer warpgroup issues the
  TMA copies while the consumer warpgroup unpacks and multiplies; the f32 accumulator tile then lives in
  shared memory between segments. Off by default: not timed yet.
- Schedule (COMET's load balancing, `W4AxSm90Tuning.schedule`): "persistent" launches one program
  per SM and walks output tiles with stride num_programs, tiles ordered M-fastest within each block_n
  column band (consecutive programs read the same weight tile: L2 reuse); "grid" launches one program
  per tile. Every tile runs the whole K range, so INT8 and INT4 work is the same in every tile (FMPQ
  splits K, not M or N); what the persistent schedule balances is the tail wave of tiles over SMs.

int8 wgmma takes only K-major operands (the PTX instruction transposes 16-bit types only), so the
B operand (the weight) must be [N, K]-contiguous in shared memory: on hardware the wrapper passes the
packed weight [N, K // 2]: a weight stored with layout="nk" (`QuantizedWeight.with_layout`, done at quantize or
load time where this kernel is the device's preferred GEMM) goes in as it is, a "kn" one is transposed per call
(one extra read and write of the packed weight); the kernel hands transposed views (`ref.transpose`) to the
wgmma. The Mosaic GPU interpreter
(CPU) supports no transposed refs, so in interpret mode the weight stays [K // 2, N] and B is used
as loaded ([block_k // 2, block_n], N-contiguous); everything else (TMA, barriers, pipeline, wgmma
with int32 accumulators, scales, schedule) is the same code. The interpreter (jax 0.10.2) runs the
warp-specialized variant only with schedule="grid" and one pipeline per tile (a tracer leaks out of
the pipeline's compute context, also in jax's own hopper_matmul_mgpu, and a second pipeline trips on
it); `w4ax_matmul_sm90` raises ValueError for the other interpreted combinations.
`tests/test_w4ax_matmul_sm90.py` runs the interpreter against the reference and lowers the hardware
variant to Mosaic GPU MLIR for CUDA without a GPU (Pallas's lowering with its wgmma, layout and
shared-memory checks; not ptxas).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from cometjax.core.formats import QuantizedActivation, QuantizedWeight
from cometjax.pallas.common import is_power_of_two, unpack_int4_x16
from cometjax.pallas.w4ax_matmul import MAX_EXACT_K, check_operands, segment_length, w4ax_matmul_reference

__all__ = ["W4AxSm90Tuning", "w4ax_matmul_sm90", "w4ax_matmul_reference", "shape_supported"]

SCHEDULES = ("persistent", "grid")
WGMMA_M = 64  # Hopper wgmma: M is a multiple of 64 per warpgroup
MIN_BLOCK_N = 64
MAX_BLOCK_N = 256  # wgmma N <= 256
MIN_BLOCK_K = 64  # 32-byte planes: the smallest swizzle the int8 wgmma path takes
MAX_BLOCK_K = 256  # 128-byte planes: the largest swizzle
H100_SMS = 132
MAX_SMEM_BYTES = 232448  # Hopper: 227 KiB of dynamic shared memory per block


@dataclasses.dataclass(frozen=True)
class W4AxSm90Tuning:
  """Tiles, pipeline depth and schedule; `resolve` fits them to a problem (M is padded)."""

  block_m: int = 64  # tokens per tile: 64 or 128 (one warpgroup, wgmma M)
  block_n: int = 128  # output channels per tile: 64, 128 or 256 (wgmma N)
  block_k: int = 128  # channels per pipeline step: 64, 128 or 256 (two wgmmas of K = block_k // 2)
  max_concurrent_steps: int = 3  # TMA stages in flight
  schedule: str = "persistent"  # "persistent" (one program per SM, strided tiles) | "grid" (one per tile)
  num_programs: int | None = None  # persistent programs; None: the device's SM count (132 off-GPU)
  warp_specialized: bool = False  # a producer warpgroup issues the TMA copies, a consumer one the math

  def resolve(self, m: int, n: int, segment: int) -> W4AxSm90Tuning:
    if self.block_m not in (64, 128):
      raise ValueError(f"block_m must be 64 or 128 (wgmma M per warpgroup), got {self.block_m}")
    for name in ("block_n", "block_k"):
      if not is_power_of_two(getattr(self, name)):
        raise ValueError(f"{name} must be a power of two, got {getattr(self, name)}")
    if not MIN_BLOCK_N <= self.block_n <= MAX_BLOCK_N:
      raise ValueError(f"block_n must be in [{MIN_BLOCK_N}, {MAX_BLOCK_N}], got {self.block_n}")
    if not MIN_BLOCK_K <= self.block_k <= MAX_BLOCK_K:
      raise ValueError(f"block_k must be in [{MIN_BLOCK_K}, {MAX_BLOCK_K}], got {self.block_k}")
    if self.max_concurrent_steps < 1:
      raise ValueError(f"max_concurrent_steps must be >= 1, got {self.max_concurrent_steps}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
    if self.num_programs is not None and self.num_programs < 1:
      raise ValueError(f"num_programs must be >= 1 or None, got {self.num_programs}")
    block_m = WGMMA_M if m <= WGMMA_M else self.block_m
    block_n = self.block_n
    while n % block_n and block_n > MIN_BLOCK_N:
      block_n //= 2
    if n % block_n:
      raise ValueError(f"out_features N={n} must be a multiple of {MIN_BLOCK_N} for the sm90 kernel")
    block_k = self.block_k
    while segment % block_k and block_k > MIN_BLOCK_K:
      block_k //= 2
    if segment % block_k:
      raise ValueError(f"block_size and group_size must be multiples of {MIN_BLOCK_K} for the sm90 kernel "
                       f"(scale segment of {segment} channels)")
    return dataclasses.replace(self, block_m=block_m, block_n=block_n, block_k=block_k)


def shape_supported(qw: QuantizedWeight) -> bool:
  """Whether the sm90 kernel can tile this weight (device aside)."""
  if not isinstance(qw, QuantizedWeight) or qw.bits != 4 or qw.activation is None:
    return False
  if qw.in_features >= MAX_EXACT_K:
    return False
  try:
    W4AxSm90Tuning().resolve(1, qw.out_features, segment_length(qw))
  except ValueError:
    return False
  return True


# ------------------------------------------------------------------------------------------------
# Kernel


def _smem_transforms(row_bytes: int):
  """Tiling + swizzle for a shared-memory tile whose rows are `row_bytes` wide."""
  swizzle = plgpu.find_swizzle(row_bytes * 8)
  return plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle)


def _out_transforms(block_n: int, dtype):
  swizzle = plgpu.find_swizzle(block_n * jnp.dtype(dtype).itemsize * 8)
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static facts of one call (hashable: it parametrizes the traced kernel)."""

  block_m: int
  block_n: int
  block_k: int
  m_tiles: int
  n_tiles: int
  stages: int
  schedule: str
  num_programs: int
  int8_channels: int
  int4_channels: int
  block_size: int
  segment: int
  group_size: int | None
  asymmetric: bool
  kmajor_weight: bool  # hardware: weight [N, K // 2] and transposed B views; interpreter: [K // 2, N]
  warp_specialized: bool

  @property
  def half_k(self) -> int:
    return self.block_k // 2

  def smem_bytes(self, out_itemsize: int) -> int:
    """Shared memory the kernel allocates (the two regions' pipelines are scoped one after the other)."""
    bm, bn, hk = self.block_m, self.block_n, self.half_k
    pipelines = []
    for channels, x_tile in ((self.int8_channels, 2 * bm * hk), (self.int4_channels, bm * hk)):
      if channels:
        pipelines.append(min(self.stages, self.segment // self.block_k) * (x_tile + bn * hk))
    vectors = 4 * (bm + bn) * (2 if self.asymmetric else 1)
    fixed = 2 * bm * hk * bool(self.int4_channels) + 2 * bn * hk + bm * bn * out_itemsize + vectors
    fixed += 4 * bm * bn * self.warp_specialized  # the f32 accumulator tile lives in shared memory
    return max(pipelines) + fixed + 1024  # + barriers and alignment


# jax 0.10 takes the index as a required argument of plgpu.load; 0.11 deprecates passing one.
_LOAD_TAKES_INDEX = inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty


def _row_vector(ref, axis: int, kmajor: bool):
  """Loads a shared-memory vector laid out for broadcasting along `axis` of a wgmma tile."""
  if not kmajor:  # the interpreter runs plain jnp: no layouts
    return ref[...]
  layout = plgpu.Layout.WGMMA.reduce(1 - axis)
  return plgpu.load(ref, (), layout=layout) if _LOAD_TAKES_INDEX else plgpu.load(ref, layout=layout)


def _zeros_tile(shape, kmajor: bool):
  zeros = jnp.zeros(shape, jnp.float32)
  return plgpu.layout_cast(zeros, plgpu.Layout.WGMMA) if kmajor else zeros


def _w4ax_sm90_kernel(*refs, plan: _Plan):
  refs = list(refs)
  int8_gmem = refs.pop(0) if plan.int8_channels else None  # int8 [2, Mp, K8 // 2]
  int4_gmem = refs.pop(0) if plan.int4_channels else None  # uint8 [Mp, K4 // 2]
  x_scales_gmem = refs.pop(0)  # f32 [num_blocks, Mp]
  code_sums_gmem = refs.pop(0) if plan.asymmetric else None  # f32 [K // segment, Mp] (integer-valued)
  w_gmem = refs.pop(0)  # uint8 [N, K // 2] (kmajor_weight) or [K // 2, N]
  w_scales_gmem = refs.pop(0)  # f32 [G, N]
  w_zeros_gmem = refs.pop(0) if plan.asymmetric else None  # f32 [G, N]
  (out_gmem,  # [Mp, N] out_dtype
   b_smem,  # int8 [2, bn, hk] (kmajor) or [2, hk, bn]: unpacked weight (even, odd rows)
   out_smem,  # [bm, bn] out_dtype
   row_scale_smem,  # f32 [bm]
   col_scale_smem,  # f32 [bn]
   barrier,
   *optional) = refs  # [f32 [bm], f32 [bn]: code sums, zeros] [int8 [2, bm, hk]: unpacked INT4 activations]
                      # [f32 [bm, bn]: warp-specialized acc]
  row_sum_smem = optional.pop(0) if plan.asymmetric else None
  col_zero_smem = optional.pop(0) if plan.asymmetric else None
  a_smem = optional.pop(0) if plan.int4_channels else None
  acc_smem = optional.pop(0) if plan.warp_specialized else None
  bm, bn, hk = plan.block_m, plan.block_n, plan.half_k
  kmajor = plan.kmajor_weight

  def b_view(index):  # logical [hk, bn] B operand
    plane = b_smem.at[index]
    return plane.transpose((1, 0)) if kmajor else plane

  def store_weight(w_tile):  # uint8 [bn, hk] (kmajor) or [hk, bn]: unpacked in place, no transpose
    low16, high16 = unpack_int4_x16(w_tile, jnp.int16)
    b_smem[0] = low16
    b_smem[1] = high16

  def weight_operand(n_idx, first_step, steps):  # (spec, gmem window): index maps see only the step
    rows = pl.ds(first_step * hk, steps * hk)
    if kmajor:
      return (plgpu.BlockSpec((bn, hk), lambda k: (0, k), transforms=_smem_transforms(hk)),
              w_gmem.at[pl.ds(n_idx * bn, bn), rows])
    return (plgpu.BlockSpec((hk, bn), lambda k: (k, 0), transforms=_smem_transforms(bn)),
            w_gmem.at[rows, pl.ds(n_idx * bn, bn)])

  def load_vector(src, dst):
    plgpu.copy_gmem_to_smem(src, dst, barrier)
    plgpu.barrier_wait(barrier)

  def mma_step(acc_ref, region, x_tile, w_tile):  # one pipeline step: unpack, fence, two wgmmas
    if region == "int8":  # x_tile int8 [2, bm, hk]
      a_even, a_odd = x_tile.at[0], x_tile.at[1]
    else:  # x_tile uint8 [bm, hk]: unpack the INT4 activations next to the weight
      low16, high16 = unpack_int4_x16(x_tile[...], jnp.int16)
      a_smem[0] = low16
      a_smem[1] = high16
      a_even, a_odd = a_smem.at[0], a_smem.at[1]
    store_weight(w_tile[...])
    plgpu.commit_smem()  # fence.proxy.async + warpgroup barrier: the wgmma reads what we stored
    plgpu.wgmma(acc_ref, a_even, b_view(0))
    plgpu.wgmma(acc_ref, a_odd, b_view(1))
    plgpu.wgmma_wait(0)  # the next step overwrites a_smem / b_smem

  def segment_sum(m_idx, n_idx, region: str, region_step, weight_step, steps: int, fold):
    """Pipelines one scale segment into an int32 accumulator and returns fold(int32 [bm, bn])."""
    rows, cols = pl.ds(m_idx * bm, bm), pl.ds(region_step * hk, steps * hk)
    if region == "int8":
      x_spec = plgpu.BlockSpec((2, bm, hk), lambda k: (0, 0, k), transforms=_smem_transforms(hk))
      x_gmem = int8_gmem.at[:, rows, cols]
    else:
      x_spec = plgpu.BlockSpec((bm, hk), lambda k: (0, k), transforms=_smem_transforms(hk))
      x_gmem = int4_gmem.at[rows, cols]
    w_spec, w_window = weight_operand(n_idx, weight_step, steps)
    in_specs = [x_spec, w_spec]

    if not plan.warp_specialized:
      def scope(acc_ref):
        plgpu.emit_pipeline(lambda _, x_tile, w_tile: mma_step(acc_ref, region, x_tile, w_tile), grid=(steps,),
                            in_specs=in_specs, max_concurrent_steps=min(plan.stages, steps))(x_gmem, w_window)
        return acc_ref[...]

      return fold(pl.run_scoped(scope, plgpu.ACC((bm, bn), jnp.int32)))

    def ws_body(_, x_tile, w_tile, acc_ref):
      mma_step(acc_ref, region, x_tile, w_tile)
      return acc_ref

    def compute_context(eval_pipeline):  # runs in the consumer warpgroup only
      def scope(acc_ref):
        eval_pipeline(acc_ref)
        fold(acc_ref[...])

      pl.run_scoped(scope, plgpu.ACC((bm, bn), jnp.int32))

    plgpu.emit_pipeline_warp_specialized(
        ws_body, grid=(steps,), memory_registers=40, in_specs=in_specs, wg_axis="wg", num_compute_wgs=1,
        max_concurrent_steps=min(plan.stages, steps), compute_context=compute_context)(x_gmem, w_window)
    return None

  ws = plan.warp_specialized

  def consumer_only(fn):  # warp-specialized: code outside the pipelines runs in the consumer warpgroup
    if ws:
      pl.when(lax.axis_index("wg") == 0)(fn)
    else:
      fn()

  def tile(m_idx, n_idx):
    rows = pl.ds(m_idx * bm, bm)
    cols = pl.ds(n_idx * bn, bn)
    acc = None if ws else _zeros_tile((bm, bn), kmajor)  # f32 [bm, bn]: registers, or acc_smem when ws
    if ws:
      @consumer_only
      def _():
        acc_smem[...] = _zeros_tile((bm, bn), kmajor)

    segment = plan.segment
    steps = segment // plan.block_k
    regions = (("int8", 0, plan.int8_channels, 1.0 / 16), ("int4", plan.int8_channels, plan.int4_channels, 1.0 / 256))
    for region, first_channel, channels, unscale in regions:
      if not channels:
        continue

      def segment_body(s, acc, region=region, first_channel=first_channel, unscale=unscale):
        segment_start = first_channel + s * segment
        group = 0 if plan.group_size is None else segment_start // plan.group_size

        def fold(acc_int):  # int32 [bm, bn] -> f32 acc + (acc_int * unscale - sum * zero) * x_scale * w_scale
          rows_of = lambda v: lax.broadcast_in_dim(v, (bm, bn), (0,))  # [bm] -> [bm, bn]
          cols_of = lambda v: lax.broadcast_in_dim(v, (bm, bn), (1,))  # [bn] -> [bm, bn]
          load_vector(x_scales_gmem.at[segment_start // plan.block_size, rows], row_scale_smem)
          load_vector(w_scales_gmem.at[group, cols], col_scale_smem)
          total = acc_int.astype(jnp.float32) * unscale  # exact: unscale is 2**-4 or 2**-8
          if plan.asymmetric:
            load_vector(code_sums_gmem.at[segment_start // segment, rows], row_sum_smem)
            load_vector(w_zeros_gmem.at[group, cols], col_zero_smem)
            total = total - rows_of(_row_vector(row_sum_smem, 0, kmajor)) * cols_of(
                _row_vector(col_zero_smem, 1, kmajor))
          scale = rows_of(_row_vector(row_scale_smem, 0, kmajor)) * cols_of(_row_vector(col_scale_smem, 1, kmajor))
          if ws:
            acc_smem[...] = acc_smem[...] + total * scale
            return None
          return acc + total * scale

        return segment_sum(m_idx, n_idx, region, s * steps, segment_start // plan.block_k, steps, fold)

      num_segments = channels // segment
      if num_segments == 1:
        acc = segment_body(0, acc)
      else:
        acc = lax.fori_loop(0, num_segments, segment_body, acc)

    @consumer_only
    def _():
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store has read out_smem
      out_smem[...] = (acc_smem[...] if ws else acc).astype(out_smem.dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[rows, cols])

  if plan.schedule == "grid":
    tile(lax.axis_index("m"), lax.axis_index("n"))
  else:
    program = lax.axis_index("sm")
    num_tiles = plan.m_tiles * plan.n_tiles
    my_tiles = (num_tiles - program + plan.num_programs - 1) // plan.num_programs

    def tile_loop(i, carry):
      linear = program + i * plan.num_programs
      tile(linear % plan.m_tiles, linear // plan.m_tiles)  # M fastest: neighbours share a weight tile
      return carry

    lax.fori_loop(0, my_tiles, tile_loop, 0)
  consumer_only(lambda: plgpu.wait_smem_to_gmem(0))


def _interpret_params():
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # no public alias yet

  return InterpretGPUParams()


def _gpu_interpret_mode():
  from jax._src.pallas.mosaic_gpu.interpret.params import force_gpu_interpret_mode

  return force_gpu_interpret_mode(_interpret_params())


def _num_sms() -> int:
  device = jax.devices()[0]
  return int(getattr(device, "core_count", 0) or H100_SMS) if device.platform == "gpu" else H100_SMS


def _check_plan(plan: _Plan, interpret: bool, out_itemsize: int) -> None:
  pipelines_per_tile = (plan.int8_channels + plan.int4_channels) // plan.segment
  if interpret and plan.warp_specialized and (pipelines_per_tile > 1 or plan.schedule != "grid"):
    raise ValueError("warp_specialized=True with interpret=True needs schedule='grid' and one pipeline per tile "
                     "(one activation block over all of K, per-output-channel weight scales): the Mosaic GPU "
                     "interpreter of jax 0.10.2 fails on a second warp-specialized pipeline in one kernel "
                     "(a tracer leaks out of the pipeline's compute context); compiled kernels take any format")
  smem = plan.smem_bytes(out_itemsize)
  if smem > MAX_SMEM_BYTES:
    raise ValueError(f"tiles block_m={plan.block_m}, block_n={plan.block_n}, block_k={plan.block_k} with "
                     f"max_concurrent_steps={plan.stages} need ~{smem} bytes of shared memory > {MAX_SMEM_BYTES}; "
                     "lower max_concurrent_steps or a block size")


def _scratch_types(plan: _Plan, out_dtype) -> list:
  """Shared memory of one program, in the kernel's scratch argument order."""
  bm, bn, hk = plan.block_m, plan.block_n, plan.half_k
  b_shape = (2, bn, hk) if plan.kmajor_weight else (2, hk, bn)
  b_row_bytes = hk if plan.kmajor_weight else bn
  scratch = [
      plgpu.SMEM(b_shape, jnp.int8, transforms=_smem_transforms(b_row_bytes)),
      plgpu.SMEM((bm, bn), out_dtype, transforms=_out_transforms(bn, out_dtype)),
      plgpu.SMEM((bm,), jnp.float32),
      plgpu.SMEM((bn,), jnp.float32),
      plgpu.Barrier(),
  ]
  if plan.asymmetric:
    scratch += [plgpu.SMEM((bm,), jnp.float32), plgpu.SMEM((bn,), jnp.float32)]
  if plan.int4_channels:
    scratch.append(plgpu.SMEM((2, bm, hk), jnp.int8, transforms=_smem_transforms(hk)))
  if plan.warp_specialized:
    scratch.append(plgpu.SMEM((bm, bn), jnp.float32, transforms=_out_transforms(bn, jnp.float32)))
  return scratch


@functools.partial(
    jax.jit,
    static_argnames=["out_dtype", "block_m", "block_n", "block_k", "max_concurrent_steps", "schedule",
                     "num_programs", "warp_specialized", "interpret"],
)
def w4ax_matmul_sm90(
    qx: QuantizedActivation,  # M tokens, K channels (FMPQ layout)
    qw: QuantizedWeight,  # bits=4, [K, N]
    *,
    out_dtype=jnp.float32,
    block_m: int = W4AxSm90Tuning.block_m,
    block_n: int = W4AxSm90Tuning.block_n,
    block_k: int = W4AxSm90Tuning.block_k,
    max_concurrent_steps: int = W4AxSm90Tuning.max_concurrent_steps,
    schedule: str = W4AxSm90Tuning.schedule,
    num_programs: int | None = W4AxSm90Tuning.num_programs,
    warp_specialized: bool = W4AxSm90Tuning.warp_specialized,
    interpret: bool = False,
) -> jax.Array:  # [M, N] out_dtype
  """The W4Ax GEMM as one Mosaic GPU kernel (Hopper); interpret=True runs the Mosaic GPU interpreter."""
  check_operands(qx, qw)
  if qw.bits != 4:
    raise ValueError(f"w4ax_matmul_sm90 needs a 4-bit weight (bits=4), got bits={qw.bits}; "
                     "use w4ax_matmul_reference for 8-bit weights")
  if jnp.dtype(out_dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise ValueError(f"out_dtype must be float32, bfloat16 or float16, got {jnp.dtype(out_dtype).name}")
  fmt = qx.format
  m = qx.int4_part.shape[0]
  k, n = qw.shape
  if m < 1:
    raise ValueError("qx must hold at least one token (M >= 1)")
  segment = segment_length(qw)
  tuning = W4AxSm90Tuning(block_m, block_n, block_k, max_concurrent_steps, schedule, num_programs,
                          warp_specialized).resolve(m, n, segment)
  bm, bn = tuning.block_m, tuning.block_n
  m_tiles, n_tiles = pl.cdiv(m, bm), n // bn
  padded_m = m_tiles * bm
  pad_rows = padded_m - m
  if tuning.schedule == "persistent":
    programs = min(tuning.num_programs or _num_sms(), m_tiles * n_tiles)
  else:
    programs = m_tiles * n_tiles
  plan = _Plan(block_m=bm, block_n=bn, block_k=tuning.block_k, m_tiles=m_tiles, n_tiles=n_tiles,
               stages=tuning.max_concurrent_steps, schedule=tuning.schedule, num_programs=programs,
               int8_channels=fmt.int8_channels, int4_channels=fmt.int4_channels, block_size=fmt.block_size,
               segment=segment, group_size=qw.group_size, asymmetric=qw.asymmetric, kmajor_weight=not interpret, warp_specialized=tuning.warp_specialized)
  _check_plan(plan, interpret, jnp.dtype(out_dtype).itemsize)

  operands = []
  if fmt.int8_channels:
    operands.append(jnp.pad(qx.int8_part, ((0, 0), (0, pad_rows), (0, 0))))
  if fmt.int4_channels:
    operands.append(jnp.pad(qx.int4_part, ((0, pad_rows), (0, 0))))
  # int8 wgmma takes B K-major ([N, K // 2]) on hardware; the interpreter reads [K // 2, N]
  wanted = "kn" if interpret else "nk"
  weight = qw.data if qw.layout == wanted else qw.data.T
  operands.append(jnp.pad(qx.scales.astype(jnp.float32), ((0, 0), (0, pad_rows))))
  if qw.asymmetric:  # f32 rows for TMA next to the scales; the sums are < 2**24, so exact
    operands.append(jnp.pad(qx.code_sums.astype(jnp.float32), ((0, 0), (0, pad_rows))))
  operands += [weight, qw.scales.astype(jnp.float32)]
  if qw.asymmetric:
    operands.append(qw.zero_points())

  scratch = _scratch_types(plan, out_dtype)
  # warp-specialized: consumer warpgroup 0, producer 1
  mesh_threads = dict(num_threads=2, thread_name="wg") if plan.warp_specialized else {}
  if plan.schedule == "grid":
    mesh = dict(grid=(m_tiles, n_tiles), grid_names=("m", "n"))
  else:
    mesh = dict(grid=(programs,), grid_names=("sm",))
  call = plgpu.kernel(
      functools.partial(_w4ax_sm90_kernel, plan=plan),
      out_type=jax.ShapeDtypeStruct((padded_m, n), out_dtype),
      scratch_types=scratch,
      kernel_name="w4ax_matmul_sm90",
      **mesh,
      **mesh_threads,
  )
  if interpret:  # the context (rather than interpret=) also reaches kernels with a warpgroup axis
    with _gpu_interpret_mode():
      out = call(*operands)
  else:
    out = call(*operands)
  return out[:m]
