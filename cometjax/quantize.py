"""`quantize(model, config, stats=None)`: a float Llama -> the same model with quantized linear kernels.

Quantization is a transform of the nnx state: every linear kernel that `config` quantizes becomes a
`cometjax.qtypes.QuantizedWeight` leaf (or an `InputTransformWeight` wrapping one, when the layer's input
is zero-padded to a block multiple or rotated online), and the unchanged model code runs it through
`cometjax.ops.linear`. With config.rotation the model is first rotated (`cometjax.rotation`), so the
result may have an explicit lm_head where the float model tied it to the embedding.

Per layer: the input plan and the FMPQ activation plan (`cometjax.fmpq`), then the weight rows are padded,
rotated, permuted and quantized with config.weights.method (`calib.clipping`, `calib.gptq`).

Typical use:
    windows = calib.stats.calibration_windows(tokenizer, documents, window=512)
    stats = calib.stats.collect_stats(model, config, windows)
    qmodel = quantize(model, config, stats)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from cometjax.config import QuantConfig
from cometjax.fmpq import ActivationPlan, InputPlan, input_plan, plan_activation
from cometjax.qtypes import ActivationFormat, QuantizedWeight, pack_int4


def apply_block_rotation(x: jax.Array, blocks: jax.Array) -> jax.Array:
  """x [..., C * b] -> each consecutive chunk i of b channels times blocks[i] ([C, b, b])."""
  chunks, b, _ = blocks.shape
  if x.shape[-1] != chunks * b:
    raise ValueError(f"x must have {chunks} * {b} = {chunks * b} channels in its last axis, got shape {x.shape}")
  x = jnp.einsum("...cb,cbd->...cd", x.reshape(*x.shape[:-1], chunks, b), blocks.astype(x.dtype))
  return x.reshape(*x.shape[:-2], chunks * b)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class InputTransformWeight:
  """A QuantizedWeight whose input is transformed first (our extension of the qtypes format):

  x [..., in_features] -> zero-pad to Kp -> (x @ rotation) -> x[..., perm] -> the channels from
  region_start on, in consecutive chunks of b, each times region[i] ([b, b]) -> inner.quantized_matmul.
  `rotation` is the dense online rotation of rotation="hadamard" (a fast Hadamard transform is the kernel
  equivalent); `perm` + `region` are FMPQ's INT4-region rotation (identity on the INT8 channels), kept
  block-structured so their storage is Kp * b, not Kp^2. Every part is optional.
  """
  inner: QuantizedWeight
  rotation: jax.Array | None  # f32 [Kp, Kp]
  in_features: int = dataclasses.field(metadata=dict(static=True))
  perm: jax.Array | None = None  # int32 [Kp]
  region: jax.Array | None = None  # f32 [num_chunks, b, b], num_chunks * b = Kp - region_start
  region_start: int = dataclasses.field(default=0, metadata=dict(static=True))

  def __post_init__(self):
    if self.in_features > self.inner.in_features:
      raise ValueError(f"in_features={self.in_features} exceeds the inner weight's {self.inner.in_features}")

  @property
  def shape(self) -> tuple[int, int]:
    return (self.in_features, self.inner.out_features)

  def transform_input(self, x: jax.Array) -> jax.Array:
    if x.shape[-1] != self.in_features:
      raise ValueError(f"x must have {self.in_features} channels in its last axis, got shape {x.shape}")
    pad = self.inner.in_features - self.in_features
    if pad:
      x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    if self.rotation is not None:
      x = jnp.dot(x, self.rotation.astype(x.dtype))
    if self.perm is not None:
      x = jnp.take(x, self.perm, axis=-1)
    if self.region is not None:
      head, tail = x[..., :self.region_start], x[..., self.region_start:]
      x = jnp.concatenate([head, apply_block_rotation(tail, self.region)], axis=-1)
    return x

  def quantized_matmul(self, x: jax.Array, implementation: str = "xla") -> jax.Array:
    return self.inner.quantized_matmul(self.transform_input(x), implementation=implementation)

  @property
  def transform_nbytes(self) -> int:
    return sum(int(a.nbytes) for a in (self.rotation, self.perm, self.region) if a is not None)


def is_quantized_leaf(value) -> bool:
  return isinstance(value, (QuantizedWeight, InputTransformWeight))


# ------------------------------------------------------------------------------------------------
# Layers of a model


def linear_layers(pure: dict, prefix: tuple = ()) -> dict[str, tuple]:
  """Dotted layer name -> path in a pure state dict, for every node holding a "kernel"."""
  found = {}
  if isinstance(pure, dict):
    if "kernel" in pure:
      found[".".join(str(p) for p in prefix)] = prefix
    for key, value in pure.items():
      if isinstance(value, dict):
        found.update(linear_layers(value, prefix + (key,)))
  return found


def _node(pure, path):
  for key in path:
    pure = pure[key]
  return pure


def prepare_model(model, config: QuantConfig):
  """The float model that quantize() quantizes: rotated when config.rotation says so, else `model`."""
  _, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  for name, path in linear_layers(pure).items():
    if is_quantized_leaf(_node(pure, path)["kernel"]):
      raise ValueError(f"model is already quantized (layer {name!r}); pass the float model")
  if config.rotation == "hadamard":
    from cometjax.rotation import rotate_llama
    return rotate_llama(model)
  return model


# ------------------------------------------------------------------------------------------------
# One layer


def _weight_codes(name: str, w: np.ndarray, config: QuantConfig, fmt: ActivationFormat | None,
                  hessian: np.ndarray | None, samples: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
  """(int8 codes [Kp, N], f32 scales [G, N]) of the final weight w [Kp, N] (rows in the order the
  quantized activations arrive); hessian [Kp, Kp] and samples [S, Kp] are in that same space."""
  from calib import clipping, gptq

  wcfg = config.weights
  method = wcfg.method
  wj = jnp.asarray(w, jnp.float32)
  k, n = w.shape
  g = 1 if wcfg.group_size is None else k // wcfg.group_size
  if method == "gptq" and wcfg.gptq_act_aware and fmt is not None:
    w, hessian = _activation_aware_target(w, samples, fmt, wcfg.gptq_damp)
    wj = jnp.asarray(w, jnp.float32)
  if method == "rtn":
    ratios = jnp.ones((g, n), jnp.float32)
  else:
    row_weights = None if hessian is None else np.maximum(np.diag(hessian), 0) + 1e-8
    ratios = clipping.mse_clip_ratios(wj, wcfg.bits, wcfg.group_size, wcfg.mse_grid, row_weights=row_weights)
  if method == "clip":
    ratios = clipping.learn_clip_ratios(wj, samples, wcfg.bits, wcfg.group_size, fmt, steps=wcfg.clip_steps,
                                        learning_rate=wcfg.clip_learning_rate, init_ratios=ratios)
  scales = clipping.scales_from_ratios(wj, ratios, wcfg.bits, wcfg.group_size)
  if method == "gptq":
    codes = gptq.gptq_codes(w, hessian, np.asarray(scales), wcfg.bits, damp=wcfg.gptq_damp,
                            act_order=wcfg.gptq_act_order)
  else:
    codes = np.asarray(clipping.quantize_codes(wj, scales, wcfg.bits))
  return codes, np.asarray(scales, np.float32)


def _activation_aware_target(w: np.ndarray, samples: np.ndarray, fmt: ActivationFormat, damp: float):
  """(W*, H_q) for GPTQ against quantized activations: W* = argmin ||X W - Q(X) W*|| (ridge-damped) and
  H_q = Q(X)^T Q(X), on the sampled calibration rows X [S, Kp] (the runtime input is Q(X), not X)."""
  from calib.clipping import fake_quantize_activation
  x = np.asarray(samples, np.float64)
  xq = np.asarray(fake_quantize_activation(jnp.asarray(samples, jnp.float32), fmt), np.float64)
  hq = xq.T @ xq
  ridge = hq + damp * np.mean(np.diag(hq)) * np.eye(hq.shape[0])
  target = np.linalg.solve(ridge, xq.T @ (x @ w))
  return target, hq


MAX_REGION_CHUNK = 1024


def int4_region_blocks(fmt: ActivationFormat, seed: int = 2) -> np.ndarray:
  """Orthogonal chunks [num_chunks, b, b] rotating the INT4 region (K4 channels) of `fmt`.

  One chunk over the whole region when K4 <= MAX_REGION_CHUNK (randomized Hadamard when one of order K4
  exists, else a random orthogonal matrix); larger regions use the largest Hadamard order b <= 1024
  dividing K4 (the block size always qualifies for power-of-two blocks), the same matrix in every chunk.
  """
  from cometjax import rotation as rotation_lib
  k4 = fmt.int4_channels
  if k4 <= MAX_REGION_CHUNK:
    q = (rotation_lib.random_hadamard(k4, seed) if rotation_lib.hadamard_exists(k4)
         else rotation_lib.random_orthogonal(k4, seed))
    return q[None]
  b = next(c for c in range(MAX_REGION_CHUNK, 1, -1)
           if k4 % c == 0 and (rotation_lib.hadamard_exists(c) or c == fmt.block_size))
  q = rotation_lib.random_hadamard(b, seed) if rotation_lib.hadamard_exists(b) else rotation_lib.random_orthogonal(b, seed)
  return np.broadcast_to(q, (k4 // b, b, b)).copy()


def _block_diagonal(start: int, blocks: np.ndarray) -> np.ndarray:
  chunks, b, _ = blocks.shape
  out = np.eye(start + chunks * b)
  for c in range(chunks):
    lo = start + c * b
    out[lo:lo + b, lo:lo + b] = blocks[c]
  return out


def quantize_layer(name: str, kernel, config: QuantConfig, layer_stats=None):
  """One float kernel [K, N] -> QuantizedWeight or InputTransformWeight (see the module docstring)."""
  kernel = np.asarray(kernel, np.float64)
  if kernel.ndim != 2:
    raise ValueError(f"layer {name!r}: kernel must be 2-D [in, out], got shape {kernel.shape}")
  if not np.all(np.isfinite(kernel)):
    raise ValueError(f"layer {name!r}: kernel holds NaN/Inf values")
  k, n = kernel.shape
  wcfg = config.weights
  plan: InputPlan = input_plan(name, k, config)
  acts = config.activations
  act_plan = None if acts is None else plan_activation(name, plan, acts, layer_stats)
  fmt = None if act_plan is None else act_plan.format
  if wcfg.method in ("clip", "gptq") and layer_stats is None:
    raise ValueError(f"stats are missing for layer {name!r}: weights.method={wcfg.method!r} needs calibration "
                     "statistics (calib.stats.collect_stats)")
  if wcfg.method == "gptq" and layer_stats.hessian is None:
    raise ValueError(f"stats for layer {name!r} have no Hessian; weights.method='gptq' needs "
                     "collect_stats(..., hessian=True)")
  if (wcfg.method == "clip" or (wcfg.method == "gptq" and wcfg.gptq_act_aware and acts is not None)) and \
      layer_stats.samples is None:
    raise ValueError(f"stats for layer {name!r} have no activation samples; weights.method={wcfg.method!r} "
                     "needs collect_stats(..., max_samples=N)")
  # x_final = x_padded @ transform, with transform = online rotation, then the permutation, then the
  # INT4-region rotation; the weight becomes transform^T W and the statistics move along.
  kp = plan.padded_features
  w = np.zeros((kp, n))
  w[:k] = kernel
  online = plan.rotation_matrix()
  perm = None if act_plan is None else act_plan.perm
  region_blocks = (int4_region_blocks(fmt) if acts is not None and acts.rotate_int4 and fmt.num_int4_blocks
                   and fmt.num_int8_blocks else None)
  region = None if region_blocks is None else _block_diagonal(fmt.int8_channels, region_blocks)
  hessian = None if layer_stats is None else layer_stats.hessian
  samples = None if layer_stats is None else layer_stats.samples
  if online is not None:
    w = online.T @ w
  if perm is not None:
    w = w[perm]
    hessian = None if hessian is None else hessian[perm][:, perm]
    samples = None if samples is None else samples[:, perm]
  if region is not None:
    w = region.T @ w
    hessian = None if hessian is None else region.T @ hessian @ region
    samples = None if samples is None else samples @ region
  codes, scales = _weight_codes(name, w, config, fmt, hessian, samples)
  bits = wcfg.bits
  data = pack_int4(jnp.asarray(codes), axis=0) if bits == 4 else jnp.asarray(codes, jnp.int8)
  # with a region rotation the permutation must run before it, outside the kernel's fused permute
  inner_perm = None if region is not None else perm
  inner = QuantizedWeight(data=data, scales=jnp.asarray(scales),
                          perm=None if inner_perm is None else jnp.asarray(inner_perm, jnp.int32),
                          bits=bits, group_size=wcfg.group_size, shape=(kp, n), activation=fmt)
  inner.check_arrays()
  outer_perm = None if region is None else perm
  if kp == k and online is None and region is None:
    return inner
  return InputTransformWeight(
      inner=inner, rotation=None if online is None else jnp.asarray(online, jnp.float32), in_features=k,
      perm=None if outer_perm is None else jnp.asarray(outer_perm, jnp.int32),
      region=None if region_blocks is None else jnp.asarray(region_blocks, jnp.float32),
      region_start=0 if region is None else fmt.int8_channels)


# ------------------------------------------------------------------------------------------------
# Whole model


def quantize(model, config: QuantConfig, stats=None, *, progress: bool = True):
  """The quantized model: every linear kernel config.quantizes() replaced by a quantized leaf.

  stats (`calib.stats.CalibrationStats`, collected with the same model and config) is required when
  config.needs_calibration (FMPQ INT8 blocks, or a weight method other than rtn).
  """
  if not isinstance(config, QuantConfig):
    raise ValueError(f"config must be a cometjax.config.QuantConfig, got {type(config).__name__}")
  if config.needs_calibration and stats is None:
    raise ValueError("stats are required by this config (FMPQ channel ranking or weights.method="
                     f"{config.weights.method!r}); collect them with calib.stats.collect_stats(model, config, "
                     "windows)")
  if stats is not None and stats.rotation != config.rotation:
    raise ValueError(f"stats were collected with rotation={stats.rotation!r} but config.rotation="
                     f"{config.rotation!r}; collect them with this config")
  prepared = prepare_model(model, config)
  if config.weights is None:
    return prepared
  graphdef, state = nnx.split(prepared)
  pure = nnx.to_pure_dict(state)
  layers = {name: path for name, path in linear_layers(pure).items() if config.quantizes(name)}
  for name, path in tqdm(layers.items(), desc="quantize", unit="layer", disable=not progress):
    node = _node(pure, path)
    layer_stats = stats.layer(name) if stats is not None else None
    node["kernel"] = quantize_layer(name, node["kernel"], config, layer_stats)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------------------------
# Report


def _leaf_parts(leaf) -> tuple[QuantizedWeight, int, int]:
  """(inner weight, bytes of the input transform, in_features)."""
  if isinstance(leaf, InputTransformWeight):
    return leaf.inner, leaf.transform_nbytes, leaf.in_features
  return leaf, 0, leaf.in_features


def quantization_report(model) -> dict:
  """Per-layer formats and byte counts, plus totals (weight bytes of quantized layers, float params)."""
  _, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  layers = []
  linear_paths = linear_layers(pure)
  for name, path in linear_paths.items():
    leaf = _node(pure, path)["kernel"]
    if not is_quantized_leaf(leaf):
      continue
    qw, transform_bytes, in_features = _leaf_parts(leaf)
    fmt: ActivationFormat | None = qw.activation
    weight_bytes = int(qw.data.nbytes + qw.scales.nbytes + (0 if qw.perm is None else qw.perm.nbytes))
    layers.append(dict(
        name=name, in_features=in_features, padded_in_features=qw.in_features, out_features=qw.out_features,
        weight_bits=qw.bits, group_size=qw.group_size,
        block_size=None if fmt is None else fmt.block_size, num_blocks=None if fmt is None else fmt.num_blocks,
        int8_blocks=None if fmt is None else fmt.num_int8_blocks,
        int4_block_fraction=None if fmt is None else fmt.int4_block_fraction,
        params=in_features * qw.out_features, weight_bytes=weight_bytes,
        rotation_bytes=transform_bytes))
  float_params = 0
  for leaf in jax.tree.leaves(pure, is_leaf=is_quantized_leaf):
    if not is_quantized_leaf(leaf) and hasattr(leaf, "size"):
      float_params += int(leaf.size)
  blocks = [(l["num_blocks"], l["int8_blocks"]) for l in layers if l["num_blocks"] is not None]
  total_blocks = sum(b for b, _ in blocks)
  params = sum(l["params"] for l in layers)
  weight_bytes = sum(l["weight_bytes"] for l in layers)
  return dict(
      layers=layers, quantized_params=params, weight_bytes=weight_bytes,
      bytes_per_param=weight_bytes / params if params else None,
      rotation_bytes=sum(l["rotation_bytes"] for l in layers), float_params=float_params,
      int4_block_fraction=(sum(b - i for b, i in blocks) / total_blocks) if total_blocks else None)


# ------------------------------------------------------------------------------------------------
# Save / load

METADATA_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 2
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def _llama_config_to_dict(config) -> dict:
  d = dataclasses.asdict(config)
  d["dtype"] = jnp.dtype(config.dtype).name
  if isinstance(d.get("eos_token_id"), tuple):
    d["eos_token_id"] = list(d["eos_token_id"])
  return d


def _llama_config_from_dict(d: dict):
  from cometjax.models.llama import LlamaConfig, RopeScaling
  d = dict(d)
  d["dtype"] = jnp.dtype(d["dtype"])
  if d.get("rope_scaling") is not None:
    d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
  if isinstance(d.get("eos_token_id"), list):
    d["eos_token_id"] = tuple(d["eos_token_id"])
  return LlamaConfig(**d)


def _to_storable(a) -> tuple[np.ndarray, str]:
  """numpy array safetensors can hold, plus the dtype name to restore (bfloat16 travels as uint16 bits)."""
  a = np.asarray(a)
  name = a.dtype.name
  if name == "bfloat16":
    return a.view(np.uint16), name
  return a, name


def _from_storable(a: np.ndarray, dtype_name: str):
  if dtype_name == "bfloat16":
    return jnp.asarray(a.view(jnp.bfloat16))
  return jnp.asarray(a, dtype=dtype_name)


def _flatten_floats(tree, prefix=()) -> dict[str, object]:
  out = {}
  for key, value in tree.items():
    path = prefix + (key,)
    if isinstance(value, dict):
      out.update(_flatten_floats(value, path))
    elif value is not None:
      out[".".join(str(p) for p in path)] = value
  return out


def _copy_tokenizer(source, directory) -> dict | None:
  import shutil
  from pathlib import Path
  if source is None:
    return None
  source = Path(source)
  if source.is_dir():
    copied = [f for f in _HF_TOKENIZER_FILES if (source / f).exists()]
    if not copied:
      raise ValueError(f"tokenizer_source {source} holds none of {_HF_TOKENIZER_FILES}")
    for f in copied:
      shutil.copyfile(source / f, Path(directory) / f)
    return dict(kind="hf", files=copied)
  if source.is_file() and source.suffix in (".model", ".bin"):
    shutil.copyfile(source, Path(directory) / source.name)
    return dict(kind="file", files=[source.name])
  raise ValueError(f"tokenizer_source must be a HF tokenizer directory or a .model/.bin file, got {source}")


def save_quantized(directory, model, quant_config: QuantConfig, tokenizer_source=None) -> None:
  """Writes DIR/model.safetensors (all arrays), DIR/quantization.json (model config, QuantConfig,
  per-layer formats) and copies the tokenizer files from `tokenizer_source` (a HF dir or a .model/.bin)."""
  import json
  from pathlib import Path
  from safetensors.numpy import save_file

  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  _, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  tensors, dtypes, layers = {}, {}, {}

  def put(key, value):
    tensors[key], dtypes[key] = _to_storable(value)

  for name, path in linear_layers(pure).items():
    node = _node(pure, path)
    leaf = node["kernel"]
    if not is_quantized_leaf(leaf):
      continue
    qw, _, in_features = _leaf_parts(leaf)
    outer = leaf if isinstance(leaf, InputTransformWeight) else None
    fmt = qw.activation
    layers[name] = dict(
        bits=qw.bits, group_size=qw.group_size, shape=list(qw.shape), in_features=in_features,
        transformed=outer is not None, has_perm=qw.perm is not None,
        transform=None if outer is None else dict(
            rotation=outer.rotation is not None, perm=outer.perm is not None, region=outer.region is not None,
            region_start=outer.region_start),
        activation=None if fmt is None else dict(block_size=fmt.block_size, num_int8_blocks=fmt.num_int8_blocks,
                                                 num_blocks=fmt.num_blocks))
    put(f"{name}.kernel.data", qw.data)
    put(f"{name}.kernel.scales", qw.scales)
    if qw.perm is not None:
      put(f"{name}.kernel.perm", qw.perm)
    for part in ("rotation", "perm", "region"):
      if outer is not None and getattr(outer, part) is not None:
        put(f"{name}.kernel.input_{part}", getattr(outer, part))
    node["kernel"] = None
  for key, value in _flatten_floats(pure).items():
    put(key, value)
  tokenizer = _copy_tokenizer(tokenizer_source, directory)
  save_file(tensors, str(directory / WEIGHTS_FILE))
  metadata = dict(format="cometjax-quantized", format_version=FORMAT_VERSION,
                  model_config=_llama_config_to_dict(model.config), quant_config=quant_config.to_dict(),
                  layers=layers, dtypes=dtypes, tokenizer=tokenizer)
  (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=1))


def load_quantized(directory):
  """`LoadedModel` (with `.quant_config`) from a directory written by `save_quantized`; needs no original
  checkpoint. `cometjax.models.loaders.load(DIR)` dispatches here when DIR holds quantization.json."""
  import json
  from pathlib import Path
  from safetensors.numpy import load_file
  from cometjax.config import config_from_dict
  from cometjax.models.llama import abstract_llama
  from cometjax.models.loaders import HFTokenizer, LoadedModel, load_tokenizer

  directory = Path(directory)
  meta_path = directory / METADATA_FILE
  if not meta_path.exists():
    raise ValueError(f"{directory} has no {METADATA_FILE} (not a cometjax quantized model directory)")
  meta = json.loads(meta_path.read_text())
  if meta.get("format") != "cometjax-quantized" or meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{meta_path}: expected format cometjax-quantized version {FORMAT_VERSION}, got "
                     f"{meta.get('format')!r} version {meta.get('format_version')!r}")
  config = _llama_config_from_dict(meta["model_config"])
  quant_config = config_from_dict(meta["quant_config"])
  tensors = load_file(str(directory / WEIGHTS_FILE))
  dtypes = meta["dtypes"]

  def get(key):
    if key not in tensors:
      raise ValueError(f"{directory / WEIGHTS_FILE} lacks tensor {key!r}")
    return _from_storable(tensors[key], dtypes[key])

  graphdef, state = nnx.split(abstract_llama(config))
  pure = nnx.to_pure_dict(state)
  for name, path in linear_layers(pure).items():
    node = _node(pure, path)
    info = meta["layers"].get(name)
    if info is None:
      node["kernel"] = get(f"{name}.kernel")
      continue
    act = info["activation"]
    qw = QuantizedWeight(
        data=get(f"{name}.kernel.data"), scales=get(f"{name}.kernel.scales"),
        perm=get(f"{name}.kernel.perm") if info["has_perm"] else None, bits=info["bits"],
        group_size=info["group_size"], shape=tuple(info["shape"]),
        activation=None if act is None else ActivationFormat(**act))
    qw.check_arrays()
    if info["transformed"]:
      t = info["transform"]
      node["kernel"] = InputTransformWeight(
          inner=qw, in_features=info["in_features"], region_start=t["region_start"],
          rotation=get(f"{name}.kernel.input_rotation") if t["rotation"] else None,
          perm=get(f"{name}.kernel.input_perm") if t["perm"] else None,
          region=get(f"{name}.kernel.input_region") if t["region"] else None)
    else:
      node["kernel"] = qw
  for key, path in _float_paths(pure).items():
    node = _node(pure, path[:-1])
    node[path[-1]] = get(key)
  nnx.replace_by_pure_dict(state, pure)
  model = nnx.merge(graphdef, state)
  tokenizer = None
  tok = meta.get("tokenizer")
  if tok is not None:
    tokenizer = HFTokenizer(directory) if tok["kind"] == "hf" else load_tokenizer(directory / tok["files"][0],
                                                                                    config.vocab_size)
  return LoadedModel(model=model, tokenizer=tokenizer, config=config, source=str(directory),
                     quant_config=quant_config)


def _float_paths(pure, prefix=()) -> dict[str, tuple]:
  """Dotted name -> path for every non-kernel-of-a-quantized-layer leaf still abstract in `pure`."""
  out = {}
  for key, value in pure.items():
    path = prefix + (key,)
    if isinstance(value, dict):
      out.update(_float_paths(value, path))
    elif value is not None and not is_quantized_leaf(value):
      out[".".join(str(p) for p in path)] = path
  return out


def calibrate_and_quantize(model, config: QuantConfig, windows=None, *, batch_size: int = 8,
                           progress: bool = True):
  """(quantized model, stats or None): collects statistics on `windows` (int [n, T]) when the config
  needs them, then quantizes."""
  stats = None
  if config.needs_calibration:
    if windows is None:
      raise ValueError("windows (calibration token windows) are required: this config needs calibration "
                       "statistics")
    from calib.stats import collect_stats
    stats = collect_stats(model, config, windows, batch_size=batch_size, progress=progress)
  return quantize(model, config, stats, progress=progress), stats
