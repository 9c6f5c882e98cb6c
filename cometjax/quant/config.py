"""Quantization configs (frozen dataclasses) and the named presets.

A `QuantConfig` says, for a Llama-family model:
  weights      `WeightQuantConfig`: INT4/INT8, symmetric or asymmetric (a float zero point per group), per
               output channel or per group, the scale dtype stored, and the method that picks the integer
               values and scales (RTN, clipping search, learned clipping, GPTQ).
  activations  `ActivationQuantConfig` or None (A16, weight-only). FMPQ: each linear layer's input
               channels are split into blocks of `block_size`, each with its own per-token scale; the most
               outlying channels (ranked on calibration statistics) are permuted into the first blocks,
               which run at INT8, every other block runs at INT4.
  kv           the KV-cache setting (`cometjax.core.kv_config.KVQuantConfig`) or None (float cache); the cache
               lives in `cometjax.serving.kvcache` and is chosen at evaluation / generation time
               (`perplexity(..., kv=config.kv)`); quantize() does not touch it.
  rotation     "hadamard": fold RMSNorm weights into the next linears, rotate the residual stream by an
               orthogonal (randomized) Hadamard matrix, rotate each head's V/O pair, and rotate the
               down_proj input online (see `cometjax.quant.rotation`). None: no rotation.
  keep_float   fnmatch patterns of layer names that stay in float (default: embeddings and lm_head).
  embedding_bits  None (the token embedding and an untied lm_head stay as loaded, float32), 16 (both stored
               as bfloat16) or 8: both stored as INT8 with one scale per row (per vocabulary entry), a
               weight-only format (`QuantizedEmbedding`, and an 8-bit A16 `QuantizedWeight` for the lm_head).

Layer names are dotted paths in the model: "layers.3.self_attn.q_proj", "layers.0.mlp.down_proj",
"lm_head", "embed_tokens".

Presets (`preset(name)`, `PRESETS`): w4a16, w8a8, w4a8, w4a4 (per-token RTN, no calibration), w4ax (FMPQ),
each also with a "-kv4" suffix that adds the INT4 KV cache. A preset's defaults are the best calibration
measured on stories260K (bench/results/accuracy.md).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math

from cometjax.core.kv_config import KVQuantConfig

WEIGHT_METHODS = ("rtn", "mse", "clip", "gptq")
"""rtn: round to nearest, scale = max|w| / qmax.
mse: per output channel, the clip ratio on a grid that minimizes the weight's squared error.
clip: OmniQuant-style learnable weight clipping: per-output-channel clip factors trained with Optax (Adam)
  to minimize ||X W - Q(X) Q(W)||^2 on calibration activations X, initialized at the mse search (needs
  stats with samples).
gptq: GPTQ (OBQ column by column with the calibration Hessian X^T X), scales from the mse search
  (needs stats with the Hessian)."""

ROTATIONS = (None, "hadamard")
CHANNEL_RANKINGS = ("absmax", "rms")
SCALE_DTYPES = ("float32", "float16", "bfloat16")
INT4_ROTATIONS = (False, "region", "block")  # True is read as "region" (configs of format version 2)
SCALE_SPANS = ("block", "region")


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightQuantConfig:
  bits: int = 4
  group_size: int | None = None  # None: one scale per output channel
  method: str = "rtn"
  mse_grid: int = 20  # mse / gptq: clip ratios 1, 1 - 1/grid*0.5, ... down to 0.5
  clip_steps: int = 200  # clip: Adam steps
  clip_learning_rate: float = 5e-3
  gptq_damp: float = 0.01  # gptq: damping, a fraction of the mean Hessian diagonal
  gptq_act_order: bool = True  # gptq: quantize columns in order of decreasing Hessian diagonal
  # gptq with quantized activations: fit W* = argmin ||X W - Q(X) W*|| and run GPTQ with H = Q(X)^T Q(X) on
  # the sampled calibration rows, so the weights also absorb the activation rounding (needs samples)
  gptq_act_aware: bool = False
  symmetric: bool = True  # False: asymmetric grid with a float zero point per group (zeros stored like scales)
  scale_dtype: str = "float32"  # the dtype scales (and zero points) are stored in: float32, float16, bfloat16
  # asymmetric: round the zero point to an integer code stored in 4 bits (GPTQ's / QServe's format: 2.5 bytes per
  # group with f16 scales, not 4) instead of a float in scale_dtype (exact for GGUF Q4_1 grids)
  integer_zero: bool = False

  def __post_init__(self):
    if self.bits not in (4, 8):
      raise ValueError(f"weights.bits must be 4 or 8, got {self.bits!r}")
    if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0
                                        or self.group_size % 2):
      raise ValueError(f"weights.group_size must be None or a positive even int, got {self.group_size!r}")
    if self.method not in WEIGHT_METHODS:
      raise ValueError(f"weights.method must be one of {WEIGHT_METHODS}, got {self.method!r}")
    if self.mse_grid < 1:
      raise ValueError(f"weights.mse_grid must be >= 1, got {self.mse_grid}")
    if self.clip_steps < 0:
      raise ValueError(f"weights.clip_steps must be >= 0, got {self.clip_steps}")
    if self.gptq_damp <= 0:
      raise ValueError(f"weights.gptq_damp must be > 0, got {self.gptq_damp}")
    if self.scale_dtype not in SCALE_DTYPES:
      raise ValueError(f"weights.scale_dtype must be one of {SCALE_DTYPES}, got {self.scale_dtype!r}")
    if self.integer_zero and (self.symmetric or self.bits != 4):
      raise ValueError(f"weights.integer_zero=True needs asymmetric 4-bit weights (symmetric=False, bits=4), got "
                       f"symmetric={self.symmetric}, bits={self.bits}")
    if not self.symmetric and self.method == "clip":
      raise ValueError("weights.method='clip' (learned clipping) trains symmetric clip factors only; use "
                       "symmetric=True or method 'rtn', 'mse' or 'gptq'")

  @property
  def needs_hessian(self) -> bool:
    return self.method == "gptq"

  @property
  def needs_samples(self) -> bool:
    return self.method == "clip" or (self.method == "gptq" and self.gptq_act_aware)


# block_size None: 128, halved while a layer would have fewer than MIN_AUTO_BLOCKS blocks, not below
# MIN_AUTO_BLOCK. Finer per-token scales pay on narrow layers: stories260K's 64-channel inputs at blocks of 16 / 8
# / 4 gave +9.5% / +8.5% / +7.1% over FP (W4AxKV4 preset, every layer at that block size); layers of 2048
# inputs and more keep 128.
MIN_AUTO_BLOCKS = 16
MIN_AUTO_BLOCK = 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class ActivationQuantConfig:
  """Per-token symmetric activation quantization, FMPQ mixed INT8/INT4 blocks.

  bits=8: every block INT8 (W8A8 / W4A8, no permutation). bits=4: INT4 blocks, with up to
  `int8_fraction` of each layer's blocks (rounded down) at INT8 holding the highest-ranked channels;
  `outlier_ratio` set: only as many INT8 blocks as needed for the channels whose statistic exceeds
  outlier_ratio x the layer's median (still capped by int8_fraction). Every block has its own per-token
  scale (`scale_span="block"`); "region" shares one per precision region (the format of version 2).
  rotate_int4: after the INT8 channels are picked, the INT4 channels are rotated online by a signed
  Hadamard matrix folded into the weight rows (`cometjax.core.rotations.HadamardRotation`: only the signs
  are stored): "region" one over the whole INT4 region (block-diagonal chunks where no Hadamard matrix of
  that order is built here), "block" one per FMPQ block (spreading each block's outliers under its own
  scale). Outliers stay exact at INT8.
  permute_unit: channels move in runs of this many consecutive input channels, ranked by the run's largest
  statistic (1: single channels). Set to the weight group size, the permutation moves whole weight groups
  and keeps each group's channels together, so a checkpoint whose weights already sit on a 4-bit grid per
  group (GGUF Q4_1: 32 inputs, a scale and a minimum) keeps that grid exactly under asymmetric RTN.
  block_size None ("auto"): 128, halved while the layer would have fewer than 16 blocks, not below 4.
  A layer whose in_features is not a multiple of its block size is padded with zero weight rows and
  zero activation channels up to the next multiple (the padding sits in the last INT4 block; zeros do
  not change any per-token scale, so the result equals the unpadded math).
  """

  bits: int = 4
  block_size: int | None = None
  int8_fraction: float = 0.0
  outlier_ratio: float | None = None
  ranking: str = "absmax"  # per-channel statistic that ranks channels: max |x| or root mean square
  rotate_int4: bool | str = False  # False, "region" or "block" (module docstring); True means "region"
  scale_span: str = "block"
  permute_unit: int = 1

  def __post_init__(self):
    if self.bits not in (4, 8):
      raise ValueError(f"activations.bits must be 4 or 8, got {self.bits!r}")
    if self.block_size is not None and (not isinstance(self.block_size, int) or self.block_size <= 0
                                        or self.block_size % 2):
      raise ValueError(f"activations.block_size must be None (auto) or a positive even int, "
                       f"got {self.block_size!r}")
    if not 0.0 <= self.int8_fraction <= 1.0:
      raise ValueError(f"activations.int8_fraction must be in [0, 1], got {self.int8_fraction}")
    if self.outlier_ratio is not None and self.outlier_ratio <= 1.0:
      raise ValueError(f"activations.outlier_ratio must be None or > 1, got {self.outlier_ratio}")
    if self.ranking not in CHANNEL_RANKINGS:
      raise ValueError(f"activations.ranking must be one of {CHANNEL_RANKINGS}, got {self.ranking!r}")
    if self.rotate_int4 is True:
      object.__setattr__(self, "rotate_int4", "region")
    if self.rotate_int4 not in INT4_ROTATIONS:
      raise ValueError(f"activations.rotate_int4 must be one of {INT4_ROTATIONS}, got {self.rotate_int4!r}")
    if self.scale_span not in SCALE_SPANS:
      raise ValueError(f"activations.scale_span must be one of {SCALE_SPANS}, got {self.scale_span!r}")
    if not isinstance(self.permute_unit, int) or self.permute_unit < 1:
      raise ValueError(f"activations.permute_unit must be a positive int, got {self.permute_unit!r}")
    if self.block_size is not None and self.block_size % self.permute_unit:
      raise ValueError(f"activations.permute_unit={self.permute_unit} must divide block_size={self.block_size}")

  @property
  def mixed(self) -> bool:
    """True when some blocks may be INT8 and others INT4 (needs calibration statistics)."""
    return self.bits == 4 and self.int8_fraction > 0

  def block_size_for(self, in_features: int) -> int:
    if self.block_size is not None:
      return self.block_size
    block = 128
    while block > MIN_AUTO_BLOCK and math.ceil(in_features / block) < MIN_AUTO_BLOCKS:
      block //= 2
    return block


DEFAULT_KEEP_FLOAT = ("embed_tokens", "lm_head")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
  weights: WeightQuantConfig | None = WeightQuantConfig()
  activations: ActivationQuantConfig | None = None
  kv: KVQuantConfig | None = None
  rotation: str | None = None
  keep_float: tuple[str, ...] = DEFAULT_KEEP_FLOAT
  embedding_bits: int | None = None  # 8: the token embedding (and an untied lm_head) INT8 per row; 16: bf16
  name: str | None = None  # the preset this came from, for reports

  def __post_init__(self):
    if self.weights is None and self.activations is not None:
      raise ValueError("activations quantization needs quantized weights: weights must not be None "
                       "when activations is set")
    if self.kv is not None and not isinstance(self.kv, KVQuantConfig):
      raise ValueError(f"kv must be None or a cometjax.core.kv_config.KVQuantConfig, got {type(self.kv).__name__}")
    if self.rotation not in ROTATIONS:
      raise ValueError(f"rotation must be one of {ROTATIONS}, got {self.rotation!r}")
    if isinstance(self.keep_float, str) or not all(isinstance(p, str) for p in self.keep_float):
      raise ValueError(f"keep_float must be a tuple of fnmatch patterns, got {self.keep_float!r}")
    object.__setattr__(self, "keep_float", tuple(self.keep_float))
    if self.embedding_bits not in (None, 8, 16):
      raise ValueError(f"embedding_bits must be None, 8 or 16, got {self.embedding_bits!r}")

  def quantizes(self, layer_name: str) -> bool:
    """Whether the linear layer `layer_name` is quantized (not matched by a keep_float pattern)."""
    return self.weights is not None and not any(fnmatch.fnmatchcase(layer_name, p) for p in self.keep_float)

  @property
  def needs_calibration(self) -> bool:
    if self.weights is None:
      return False
    acts = self.activations
    return self.weights.method in ("clip", "gptq") or (acts is not None and acts.mixed)

  def replace(self, **changes) -> "QuantConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return config_to_dict(self)


# ------------------------------------------------------------------------------------------------
# KV setting


def default_kv_config() -> KVQuantConfig:
  """The KV4 setting the "-kv4" presets name: K per channel over groups of 32 tokens (KIVI-style, the
  open group exact), V per token per head (the best measured in bench/results/perplexity.json)."""
  return KVQuantConfig(k_mode="channel", group_tokens=32)


def kv_to_dict(kv: KVQuantConfig | None) -> dict | None:
  if kv is None:
    return None
  if not isinstance(kv, KVQuantConfig):
    raise ValueError(f"kv must be None or a cometjax.core.kv_config.KVQuantConfig, got {type(kv).__name__}")
  return dataclasses.asdict(kv)


def kv_from_dict(d: dict | None) -> KVQuantConfig | None:
  return None if d is None else KVQuantConfig(**d)


# ------------------------------------------------------------------------------------------------
# Presets

# The measured best calibration (bench/results/accuracy.md): GPTQ with one scale per 32 input rows (0.625
# bytes/param); per output channel (COMET's layout, 0.53 bytes/param) costs about 3 ppl points more there.
_W4_BEST = WeightQuantConfig(bits=4, method="gptq", group_size=32)
_W4_RTN = WeightQuantConfig(bits=4, method="rtn")
# Under FMPQ activations, asymmetric weights (f16 scale + f16 zero per 32 rows: the bytes of one f32 scale)
# measured +7.7% against +11.1% symmetric on stories260K (bench/results/format_v3.md)
_W4_FMPQ = WeightQuantConfig(bits=4, method="gptq", group_size=32, symmetric=False, scale_dtype="float16")
_FMPQ = ActivationQuantConfig(bits=4, int8_fraction=0.25, rotate_int4="region")


def _base_presets() -> dict[str, QuantConfig]:
  return {
      "w4a16": QuantConfig(weights=_W4_BEST),
      "w8a8": QuantConfig(weights=WeightQuantConfig(bits=8, method="rtn"), activations=ActivationQuantConfig(bits=8)),
      "w4a8": QuantConfig(weights=_W4_BEST, activations=ActivationQuantConfig(bits=8)),
      # plain per-token RTN, no calibration: the baseline FMPQ is measured against
      "w4a4": QuantConfig(weights=_W4_RTN, activations=ActivationQuantConfig(bits=4)),
      "w4ax": QuantConfig(weights=_W4_FMPQ, activations=_FMPQ),
  }


def preset_names() -> tuple[str, ...]:
  names = []
  for base in _base_presets():
    names += [base, base + "-kv4"]
  return tuple(names)


PRESETS = preset_names()


def preset(name: str) -> QuantConfig:
  """The QuantConfig of a named preset ("w4ax-kv4", ...); unknown names raise listing the presets."""
  if not isinstance(name, str):
    raise ValueError(f"preset name must be a string, one of {PRESETS}; got {name!r}")
  base, kv4 = (name[:-4], True) if name.endswith("-kv4") else (name, False)
  presets = _base_presets()
  if base not in presets:
    raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
  config = presets[base]
  return config.replace(kv=default_kv_config() if kv4 else None, name=name)


# ------------------------------------------------------------------------------------------------
# JSON round trip


def config_to_dict(config: QuantConfig) -> dict:
  return {
      "weights": None if config.weights is None else dataclasses.asdict(config.weights),
      "activations": None if config.activations is None else dataclasses.asdict(config.activations),
      "kv": kv_to_dict(config.kv),
      "rotation": config.rotation,
      "keep_float": list(config.keep_float),
      "embedding_bits": config.embedding_bits,
      "name": config.name,
  }


def config_from_dict(d: dict) -> QuantConfig:
  expected = {"weights", "activations", "kv", "rotation", "keep_float", "embedding_bits", "name"}
  unknown = set(d) - expected
  if unknown:
    raise ValueError(f"quantization config has unknown fields {sorted(unknown)} (expected {sorted(expected)})")
  return QuantConfig(
      weights=None if d.get("weights") is None else WeightQuantConfig(**d["weights"]),
      activations=None if d.get("activations") is None else ActivationQuantConfig(**d["activations"]),
      kv=kv_from_dict(d.get("kv")), rotation=d.get("rotation"),
      keep_float=tuple(d.get("keep_float", DEFAULT_KEEP_FLOAT)), embedding_bits=d.get("embedding_bits"),
      name=d.get("name"))
