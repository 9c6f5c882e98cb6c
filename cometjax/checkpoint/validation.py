"""Checks every loader runs before it returns a model: metadata fields present and of the right type, every
tensor of the expected shape and dtype, no tensor left over, floats finite. Each failure is a
`CheckpointError` naming the file, the field or tensor, and what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cometjax.errors import CheckpointError

_SIMPLE_TYPES = (bool, int, float, str)


def read_json_file(path: Path, what: str) -> dict:
  """The JSON object in `path`; a missing, truncated or non-object file raises CheckpointError naming it."""
  path = Path(path)
  if not path.is_file():
    raise CheckpointError(f"{what} file {path} is missing")
  try:
    value = json.loads(path.read_text(encoding="utf-8"))
  except UnicodeDecodeError as e:
    raise CheckpointError(f"{what} file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{what} file {path} is not valid JSON (truncated?): {e.msg} at line {e.lineno} "
                          f"column {e.colno}") from None
  if not isinstance(value, dict):
    raise CheckpointError(f"{what} file {path} must hold a JSON object, got {type(value).__name__}")
  return value


def _type_name(kind) -> str:
  kinds = kind if isinstance(kind, tuple) else (kind,)
  return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


def _is(value, kind) -> bool:
  kinds = kind if isinstance(kind, tuple) else (kind,)
  if isinstance(value, bool) and bool not in kinds:  # JSON true is not a number here
    return False
  if float in kinds and isinstance(value, int):
    return True
  return isinstance(value, kinds)


def require(mapping: dict, key: str, kind, source: str, where: str = ""):
  """mapping[key], which must exist and be of `kind` (a type or a tuple of types; type(None) allows null)."""
  if not isinstance(mapping, dict):
    raise CheckpointError(f"{source}: field {where.rstrip('.') or '(top level)'} must be an object, "
                          f"got {type(mapping).__name__}")
  if key not in mapping:
    raise CheckpointError(f"{source}: field {where}{key} is missing")
  value = mapping[key]
  if not _is(value, kind):
    raise CheckpointError(f"{source}: field {where}{key} must be {_type_name(kind)}, got {value!r}")
  return value


def _field_kind(hint):
  """The JSON kind of a dataclass field's type hint, or None when it is not a plain scalar (not checked)."""
  if hint in _SIMPLE_TYPES:
    return hint
  if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
    args = typing.get_args(hint)
    if all(a in _SIMPLE_TYPES or a is type(None) for a in args):
      return tuple(args)
  return None


def check_dataclass_dict(cls, d: dict, source: str, where: str, *, optional: tuple[str, ...] = ()) -> None:
  """`d` (a saved `dataclasses.asdict(cls(...))`) has exactly cls's fields, the scalar ones of their type.
  A missing field would silently take its default, so only the names in `optional` may be absent."""
  if not isinstance(d, dict):
    raise CheckpointError(f"{source}: field {where.rstrip('.')} must be an object, got {d!r}")
  hints = typing.get_type_hints(cls)
  names = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(d) - set(names))
  if unknown:
    raise CheckpointError(f"{source}: field {where}{unknown[0]} is not a {cls.__name__} field "
                          f"(expected {names})")
  for name in names:
    if name not in d:
      if name in optional:
        continue
      raise CheckpointError(f"{source}: field {where}{name} is missing")
    kind = _field_kind(hints[name])
    if kind is not None and not _is(d[name], kind):
      raise CheckpointError(f"{source}: field {where}{name} must be {_type_name(kind)}, got {d[name]!r}")


def build(fn: Callable[[], Any], source: str, where: str):
  """fn(), with the ValueError / TypeError / KeyError a constructor raises on bad metadata named."""
  try:
    return fn()
  except CheckpointError:
    raise
  except (ValueError, TypeError, KeyError, ArithmeticError) as e:
    raise CheckpointError(f"{source}: field {where} is invalid: {type(e).__name__}: {e}") from None


def check_model_config(config, source: str) -> None:
  """Ranges `LlamaConfig` itself does not check (a loaded config drives every tensor shape)."""
  if not config.max_position_embeddings or config.max_position_embeddings <= 0:
    raise CheckpointError(f"{source}: max_position_embeddings must be positive, got "
                          f"{config.max_position_embeddings!r}")
  for name in ("rms_norm_eps", "rope_theta"):
    value = getattr(config, name)
    if not math.isfinite(value) or value <= 0:
      raise CheckpointError(f"{source}: {name} must be a positive finite number, got {value!r}")
  if config.head_dim is not None and config.head_dim <= 0:
    raise CheckpointError(f"{source}: head_dim must be positive, got {config.head_dim}")
  eos = config.eos_token_id
  if not (eos is None or _is(eos, int) or (isinstance(eos, tuple) and eos)):
    raise CheckpointError(f"{source}: eos_token_id must be null, an id or a non-empty list of ids, got {eos!r}")
  for name, ids in (("bos_token_id", () if config.bos_token_id is None else (config.bos_token_id,)),
                    ("eos_token_id", config.eos_token_ids)):
    bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < config.vocab_size]
    if bad:
      raise CheckpointError(f"{source}: {name} {bad[0]!r} is outside the vocabulary [0, {config.vocab_size})")


def check_layer_count(source: str, num_layers: int, tensors, last_layer_tensor: str) -> None:
  """The last layer's tensor exists before a name table of num_layers layers is built (a corrupt count such
  as 10**9 would otherwise exhaust memory before any tensor check runs)."""
  name = last_layer_tensor.format(num_layers - 1)
  if name not in tensors:
    raise CheckpointError(f"{source}: missing tensor {name!r} (the config says {num_layers} layers)")


def check_tensor(source: str, name: str, array, shape: tuple[int, ...] | None = None, *, kind: str = "float",
                 finite: bool = True) -> None:
  """`array` has `shape`, a dtype of `kind` ("float", "int", "uint8", "int8", "int32") and, for floats,
  only finite values."""
  array_dtype = np.dtype(array.dtype)
  if shape is not None and tuple(array.shape) != tuple(shape):
    raise CheckpointError(f"{source}: tensor {name!r} has shape {list(array.shape)}, expected {list(shape)}")
  is_float = array_dtype.kind == "f" or array_dtype.name == "bfloat16"
  ok = {"float": is_float, "int": array_dtype.kind in "iu"}.get(kind, array_dtype.name == kind)
  if not ok:
    raise CheckpointError(f"{source}: tensor {name!r} has dtype {array_dtype.name}, expected {kind}")
  if finite and is_float and not bool(np.isfinite(np.asarray(array, np.float32)).all()):
    raise CheckpointError(f"{source}: tensor {name!r} holds non-finite values (NaN or inf)")


def check_permutation(source: str, name: str, perm, size: int) -> None:
  """`perm` is an integer permutation of range(size)."""
  check_tensor(source, name, perm, (size,), kind="int")
  if not np.array_equal(np.sort(np.asarray(perm)), np.arange(size)):
    raise CheckpointError(f"{source}: tensor {name!r} is not a permutation of 0..{size - 1}")


def check_all_used(source: str, names, used: set[str]) -> None:
  """A tensor nothing read means metadata and weights disagree (e.g. a has_perm flag turned off)."""
  left = sorted(set(names) - used)
  if left:
    raise CheckpointError(f"{source}: unexpected tensor {left[0]!r}" +
                          (f" (and {len(left) - 1} more)" if len(left) > 1 else "") +
                          ": the metadata does not account for it")


def check_stored_dtype(source: str, name: str, array: np.ndarray, dtype_name: str) -> None:
  """The array as stored matches the dtype the metadata records (bfloat16 travels as uint16 bits)."""
  stored = "uint16" if dtype_name == "bfloat16" else dtype_name
  try:
    np.dtype(stored)
  except TypeError:
    raise CheckpointError(f"{source}: dtypes[{name!r}] = {dtype_name!r} is not a dtype name") from None
  if array.dtype.name != stored:
    raise CheckpointError(f"{source}: tensor {name!r} is stored as {array.dtype.name}, the metadata says "
                          f"{dtype_name}")


def check_quantized_leaf(source: str, name: str, leaf, expected_shape: tuple[int, int]) -> None:
  """A loaded QuantizedWeight / InputTransformWeight fits its layer: logical shape, permutations, rotations,
  finite scales."""
  from cometjax.core.formats import InputTransformWeight
  from cometjax.core.rotations import HadamardRotation
  if tuple(leaf.shape) != tuple(expected_shape):
    raise CheckpointError(f"{source}: layer {name!r} has shape {list(leaf.shape)}, the model config needs "
                          f"{list(expected_shape)}")
  outer = leaf if isinstance(leaf, InputTransformWeight) else None
  qw = leaf.inner if outer is not None else leaf
  kp = qw.in_features
  check_tensor(source, f"{name}.kernel.scales", qw.scales, kind="float")
  if qw.zeros is not None:
    if qw.integer_zeros:  # packed 4-bit codes: every byte is a valid pair of zero points
      check_tensor(source, f"{name}.kernel.zeros", qw.zeros, qw.packed_zeros_shape, kind="uint8")
    else:
      check_tensor(source, f"{name}.kernel.zeros", qw.zeros, tuple(qw.scales.shape), kind="float")
  if qw.perm is not None:
    check_permutation(source, f"{name}.kernel.perm", qw.perm, kp)
  fmt = qw.activation
  if fmt is not None and fmt.num_blocks * fmt.block_size != kp:
    raise CheckpointError(f"{source}: layer {name!r} activation format covers {fmt.num_blocks} blocks of "
                          f"{fmt.block_size}, the weight has {kp} input rows")
  if outer is None:
    if kp != expected_shape[0]:
      raise CheckpointError(f"{source}: layer {name!r} has {kp} input rows, expected {expected_shape[0]}")
    return
  if isinstance(outer.rotation, HadamardRotation):
    _check_signs(source, f"{name}.kernel.input_rotation_signs", outer.rotation, kp)
  elif outer.rotation is not None:
    check_tensor(source, f"{name}.kernel.input_rotation", outer.rotation, (kp, kp))
  if outer.perm is not None:
    check_permutation(source, f"{name}.kernel.input_perm", outer.perm, kp)
  if isinstance(outer.region, HadamardRotation):
    if not 0 <= outer.region_start < kp:
      raise CheckpointError(f"{source}: layer {name!r} region_start {outer.region_start} is outside 0..{kp - 1}")
    _check_signs(source, f"{name}.kernel.input_region_signs", outer.region, kp - outer.region_start)
  elif outer.region is not None:
    region = outer.region
    b = region.shape[-1] if region.ndim == 3 else 0
    if not 0 <= outer.region_start < kp or b == 0 or region.shape[1] != b or \
        region.shape[0] * b != kp - outer.region_start:
      raise CheckpointError(f"{source}: tensor '{name}.kernel.input_region' has shape {list(region.shape)}, "
                            f"expected [chunks, b, b] covering rows {outer.region_start}..{kp - 1}")
    check_tensor(source, f"{name}.kernel.input_region", region)


_ROTATION_KINDS = (None, "dense", "hadamard")


def _check_transform_metadata(transform: dict, version, source: str, where: str) -> None:
  """Version 2 flags each part with a bool (dense matrices); version 3 names the rotation kind and, for
  signed Hadamard blocks, the block size."""
  require(transform, "perm", bool, source, where)
  require(transform, "region_start", int, source, where)
  for key in ("rotation", "region"):
    if version == 2:
      require(transform, key, bool, source, where)
      continue
    kind = transform.get(key, "missing")
    if kind not in _ROTATION_KINDS:
      raise CheckpointError(f"{source}: field {where}{key} must be one of {_ROTATION_KINDS}, got {kind!r}")
    if kind == "hadamard":
      block = require(transform, f"{key}_block", int, source, where)
      if block < 1:
        raise CheckpointError(f"{source}: field {where}{key}_block must be a positive block size, got {block}")


def _check_signs(source: str, name: str, rotation, features: int) -> None:
  """A signed Hadamard rotation: +-1 signs over exactly the rotated features, whole blocks."""
  signs = np.asarray(rotation.signs)
  if signs.shape != (features,) or features % rotation.block:
    raise CheckpointError(f"{source}: tensor {name!r} has shape {list(signs.shape)}, expected [{features}] "
                          f"(whole blocks of {rotation.block})")
  if not np.isin(signs, (-1, 1)).all():
    raise CheckpointError(f"{source}: tensor {name!r} must hold only +1 / -1")


_LAYER_FIELDS = dict(bits=int, group_size=(int, type(None)), shape=list, in_features=int, transformed=bool,
                     has_perm=bool, activation=(dict, type(None)))
_TOKENIZER_KINDS = ("hf", "gguf", "file")


def check_quantized_metadata(meta: dict, source: str) -> None:
  """The fields of a quantized LLM directory's quantization.json, present and of their types."""
  for key, kind in (("model_config", dict), ("quant_config", dict), ("layers", dict), ("dtypes", dict),
                    ("tokenizer", (dict, type(None)))):
    require(meta, key, kind, source)
  for name, dtype_name in meta["dtypes"].items():
    if not isinstance(dtype_name, str):
      raise CheckpointError(f"{source}: field dtypes.{name} must be a dtype name, got {dtype_name!r}")
  for name, info in meta["layers"].items():
    where = f"layers.{name}."
    for key, kind in _LAYER_FIELDS.items():
      require(info, key, kind, source, where)
    shape = info["shape"]
    if len(shape) != 2 or not all(_is(d, int) and d > 0 for d in shape):
      raise CheckpointError(f"{source}: field {where}shape must be [in_features, out_features], got {shape!r}")
    if info["transformed"]:
      _check_transform_metadata(require(info, "transform", dict, source, where), meta.get("format_version"),
                                source, where + "transform.")
    if "has_zeros" in info:
      require(info, "has_zeros", bool, source, where)
    if info["activation"] is not None:
      for key in ("block_size", "num_int8_blocks", "num_blocks"):
        require(info["activation"], key, int, source, where + "activation.")
  if meta.get("embedding", "float") not in ("float", "int8"):
    raise CheckpointError(f"{source}: field embedding must be 'float' or 'int8', got {meta.get('embedding')!r}")
  tokenizer = meta["tokenizer"]
  if tokenizer is not None:
    kind = require(tokenizer, "kind", str, source, "tokenizer.")
    if kind not in _TOKENIZER_KINDS:
      raise CheckpointError(f"{source}: field tokenizer.kind must be one of {_TOKENIZER_KINDS}, got {kind!r}")
    files = require(tokenizer, "files", list, source, "tokenizer.")
    if not files or not all(isinstance(f, str) and f and "/" not in f and f != ".." for f in files):
      raise CheckpointError(f"{source}: field tokenizer.files must list file names in the directory, "
                            f"got {files!r}")


INTEGRITY_FIELD = "integrity"


def content_digest(meta: dict, weights_path: Path) -> dict:
  """sha256 of the weights file and of the metadata (without this field): any edit of either shows."""
  import hashlib
  body = {k: v for k, v in meta.items() if k != INTEGRITY_FIELD}
  weights = hashlib.sha256()
  with open(weights_path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      weights.update(block)
  metadata = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
  return {"weights_sha256": weights.hexdigest(), "metadata_sha256": metadata}


def check_digest(meta: dict, weights_path: Path, source: str) -> None:
  """A directory written with an integrity field must still match it (absent in older directories)."""
  recorded = meta.get(INTEGRITY_FIELD)
  if recorded is None:
    return
  actual = content_digest(meta, weights_path)
  for key, value in actual.items():
    if not isinstance(recorded, dict) or recorded.get(key) != value:
      what = "weights file" if key.startswith("weights") else "metadata"
      raise CheckpointError(f"{source}: the {what} changed after it was written ({INTEGRITY_FIELD}.{key} does "
                            "not match): corrupted or edited")
