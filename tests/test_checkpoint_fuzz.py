"""Checkpoint corruption fuzz: for each loader, tiny checkpoints written here are corrupted one way at a time
(every tensor dropped / truncated / reshaped / retyped / made non-finite, every metadata field dropped or
given a malformed value, the file truncated or its header bytes flipped), and `cometjax.load` must either
raise CheckpointError or return a model whose logits equal the original's.

Seeded and bounded: each loader's cases run in a few seconds on 2 cores. In-range edits of values (a weight
byte, a float field such as rms_norm_eps) are invisible to a loader without a digest: only quantized
directories carry one (`integrity`), so only there do data-byte flips join the cases.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from cometjax.checkpoint import load
from cometjax.errors import CheckpointError
from gguf_files import random_hf_tensors, rewrite_gguf_metadata, write_gguf
from cometjax.models.llama import LlamaConfig

SEED = 17
TOKENS = jnp.asarray([[1, 5, 9, 33, 2, 7]])
V2_FIXTURE = Path(__file__).parent / "data" / "format_v2_w4ax_kv4"
# defaults where a loader has one, so that dropping an optional field leaves the same model
CONFIG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                     rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False,
                     bos_token_id=1, eos_token_id=2)
MALFORMED = ("x", None, -1, 0, 10**9, [], {})
# without a digest, 0 and null are in range for some fields (num_int8_blocks, group_size): left out there
OUT_OF_RANGE = ("x", -1, 10**9, [], {})


class Outcome:
  """Tallies what each case did; a case that neither raises CheckpointError nor reloads the same model fails."""

  def __init__(self, reference: np.ndarray):
    self.reference, self.raised, self.same, self.failures = reference, 0, 0, []

  def check(self, label: str, path: Path) -> None:
    try:
      loaded = load(path)
    except CheckpointError:
      self.raised += 1
      return
    except Exception as e:  # a foreign error type reached the user
      self.failures.append(f"{label}: {type(e).__name__}: {str(e)[:200]}")
      return
    logits = np.asarray(loaded.model(TOKENS)[0])
    if np.isfinite(logits).all() and np.array_equal(logits, self.reference):
      self.same += 1
    else:
      self.failures.append(f"{label}: loaded, but the logits differ from the original's")

  def assert_clean(self, minimum_raised: int) -> None:
    assert not self.failures, "\n".join(self.failures[:20])
    assert self.raised >= minimum_raised, (self.raised, self.same)


def logits_of(path: Path) -> np.ndarray:
  return np.asarray(load(path).model(TOKENS)[0])


# ------------------------------------------------------------------------------------------------
# Corruptions shared by the loaders


def tensor_variants(array: np.ndarray, name: str = ""):
  """(label, corrupted array or None = drop) of one tensor (a repeated entry only in a permutation: in packed
  weights any byte is a valid value)."""
  yield "drop", None
  yield "truncate", array[:-1] if array.shape[0] > 1 else array[:0]
  yield "reshape", array.reshape(-1) if array.ndim > 1 else array.reshape(1, -1)
  if array.dtype.kind == "f":
    yield "as int32", array.astype(np.int32)
    bad = array.copy()
    bad.flat[0] = np.nan
    yield "nan", bad
  else:
    yield "as float32", array.astype(np.float32)
    if name.endswith("perm"):
      bad = array.copy()
      bad.flat[0] = bad.flat[-1]
      yield "repeated entry", bad


def file_variants(data: bytes, rng: random.Random, header_bytes: int, flips: int = 12):
  """(label, corrupted bytes): truncations and seeded byte flips inside the first `header_bytes`."""
  for cut in sorted({0, 7, 8, len(data) // 2, len(data) - 1}):
    yield f"truncate to {cut} bytes", data[:cut]
  for _ in range(flips):
    at = rng.randrange(min(header_bytes, len(data)))
    flipped = bytearray(data)
    flipped[at] ^= 1 << rng.randrange(8)
    yield f"flip a bit of byte {at}", bytes(flipped)


def json_variants(meta, rng: random.Random, limit: int, values=MALFORMED, prefix: tuple = ()):
  """(path, value or "drop") for every scalar field of a JSON object: dropped or given a malformed value
  (booleans also flipped)."""
  cases = []

  def walk(node, path):
    if isinstance(node, dict):
      for key, value in node.items():
        cases.append((path + (key,), "drop"))
        walk(value, path + (key,))
    elif isinstance(node, list):
      for i, value in enumerate(node[:2]):
        walk(value, path + (i,))
    else:
      in_range = lambda v: isinstance(node, float) and _is_number(v) and v > 0  # any positive float is valid
      cases.extend((path, value) for value in values if value != node and not in_range(value))
      if isinstance(node, bool):
        cases.append((path, not node))

  walk(meta, prefix)
  rng.shuffle(cases)
  return cases[:limit]


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def edited(meta, path: tuple, value):
  meta = json.loads(json.dumps(meta))
  node = meta
  for key in path[:-1]:
    node = node[key]
  if value == "drop":
    del node[path[-1]]
  else:
    node[path[-1]] = value
  return meta


# ------------------------------------------------------------------------------------------------
# Writers of tiny checkpoints


def hf_config_json(config: LlamaConfig) -> dict:
  return dict(model_type="llama", vocab_size=config.vocab_size, hidden_size=config.hidden_size,
              intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
              num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
              rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
              max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, hidden_act="silu")


def write_hf_dir(directory: Path, meta: dict, tensors: dict) -> Path:
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(meta))
  save_file(tensors, str(directory / "model.safetensors"))
  return directory


def llama2c_bytes(config: LlamaConfig, tensors: dict, header=None) -> bytes:
  """A llama2.c v0 file of the HF-named tensors (q/k rows kept as they are: only the loader's checks matter)."""
  c = config
  header = header or (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads,
                      -c.vocab_size, 64)
  layer = lambda name: np.stack([tensors[f"model.layers.{i}.{name}.weight"] for i in range(c.num_layers)])
  hd = c.hidden_size // c.num_heads
  parts = [tensors["model.embed_tokens.weight"], layer("input_layernorm"), layer("self_attn.q_proj"),
           layer("self_attn.k_proj"), layer("self_attn.v_proj"), layer("self_attn.o_proj"),
           layer("post_attention_layernorm"), layer("mlp.gate_proj"), layer("mlp.down_proj"), layer("mlp.up_proj"),
           tensors["model.norm.weight"], np.zeros((64, hd // 2)), np.zeros((64, hd // 2)),
           tensors["lm_head.weight"]]
  return struct.pack("<7i", *header) + b"".join(np.asarray(p, "<f4").tobytes() for p in parts)


# ------------------------------------------------------------------------------------------------
# The fuzz, one test per loader


@pytest.mark.slow  # ~10 s on 2 cores
def test_hf_directory_corruptions_raise_or_load_the_same_model(tmp_path):
  rng = random.Random(SEED)
  meta, tensors = hf_config_json(CONFIG), random_hf_tensors(CONFIG, seed=SEED)
  outcome = Outcome(logits_of(write_hf_dir(tmp_path / "original", meta, tensors)))
  case = 0
  names = sorted(tensors)
  for name in rng.sample(names, 8) + ["model.embed_tokens.weight", "model.norm.weight"]:
    for label, variant in tensor_variants(tensors[name]):
      corrupted = {k: v for k, v in tensors.items() if k != name}
      if variant is not None:
        corrupted[name] = variant
      outcome.check(f"tensor {name} {label}", write_hf_dir(tmp_path / f"c{(case := case + 1)}", meta, corrupted))
  for path, value in json_variants(meta, rng, limit=60):
    outcome.check(f"config.json {path} = {value!r}",
                  write_hf_dir(tmp_path / f"c{(case := case + 1)}", edited(meta, path, value), tensors))
  original = (tmp_path / "original" / "model.safetensors").read_bytes()
  header_len = 8 + struct.unpack("<Q", original[:8])[0]
  for label, data in file_variants(original, rng, header_len):
    directory = write_hf_dir(tmp_path / f"c{(case := case + 1)}", meta, {})
    (directory / "model.safetensors").write_bytes(data)
    outcome.check(f"model.safetensors {label}", directory)
  for label, text in (("truncated", json.dumps(meta)[:40]), ("not JSON", "\x00\x01"), ("a list", "[1, 2]")):
    directory = write_hf_dir(tmp_path / f"c{(case := case + 1)}", meta, tensors)
    (directory / "config.json").write_text(text)
    outcome.check(f"config.json {label}", directory)
  outcome.assert_clean(minimum_raised=80)


def test_llama2c_corruptions_raise_or_load_the_same_model(tmp_path):
  rng = random.Random(SEED)
  tensors = random_hf_tensors(CONFIG, seed=SEED)
  original = llama2c_bytes(CONFIG, tensors)
  (tmp_path / "original.bin").write_bytes(original)
  outcome = Outcome(logits_of(tmp_path / "original.bin"))
  header = list(struct.unpack_from("<7i", original))
  cases = [(f"header[{i}] = {value}", struct.pack("<7i", *(header[:i] + [value] + header[i + 1:])) + original[28:])
           for i in range(7) for value in (0, -1, header[i] + 1, 2**31 - 1, -header[i])]
  cases += list(file_variants(original, rng, 28))
  cases.append(("trailing bytes", original + b"\x00" * 8))
  nan_at = 28 + 4 * rng.randrange(CONFIG.vocab_size * CONFIG.hidden_size)
  cases.append(("nan in the embedding", original[:nan_at] + struct.pack("<f", np.nan) + original[nan_at + 4:]))
  for i, (label, data) in enumerate(cases):
    (tmp_path / f"c{i}.bin").write_bytes(data)
    outcome.check(label, tmp_path / f"c{i}.bin")
  outcome.assert_clean(minimum_raised=30)


GGUF_KEYS = ("llama.block_count", "llama.embedding_length", "llama.feed_forward_length", "llama.attention.head_count",
             "llama.attention.head_count_kv", "llama.vocab_size", "llama.context_length",
             "llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base", "llama.rope.dimension_count")


def write_gguf_variant(path: Path, tensors: dict, *, drop_key=None, key_value=None, architecture="llama"):
  """The tiny GGUF with one metadata key dropped or replaced by (key, value, GGUFValueType)."""
  write_gguf(path, CONFIG.replace(rms_norm_eps=1e-5), tensors, tokenizer=False, architecture=architecture)
  if drop_key is None and key_value is None:
    return
  key, value, vtype = (drop_key, None, None) if key_value is None else key_value
  rewrite_gguf_metadata(path, path, key, value, vtype, architecture)


def test_gguf_corruptions_raise_or_load_the_same_model(tmp_path):
  import gguf
  rng = random.Random(SEED)
  tensors = random_hf_tensors(CONFIG, seed=SEED)
  write_gguf_variant(tmp_path / "original.gguf", tensors)
  outcome = Outcome(logits_of(tmp_path / "original.gguf"))
  case = 0
  t = gguf.GGUFValueType
  for key in GGUF_KEYS:
    p = tmp_path / f"c{(case := case + 1)}.gguf"
    write_gguf_variant(p, tensors, drop_key=key)
    outcome.check(f"drop {key}", p)
    is_float = key.endswith(("epsilon", "freq_base"))  # any finite positive float is in range: not malformed
    malformed = ((0.0, t.FLOAT32), (-1.0, t.FLOAT32), (float("nan"), t.FLOAT32)) if is_float else (
        (0, t.UINT32), (-1, t.INT32), (10**9, t.UINT32))
    for value, vtype in (("x", t.STRING),) + malformed:
      p = tmp_path / f"c{(case := case + 1)}.gguf"
      write_gguf_variant(p, tensors, key_value=(key, value, vtype))
      outcome.check(f"{key} = {value!r}", p)
  p = tmp_path / "other_arch.gguf"
  write_gguf_variant(p, tensors, architecture="qwen3moe")
  outcome.check("architecture qwen3moe", p)
  for name in rng.sample(sorted(tensors), 5):
    for label, variant in tensor_variants(tensors[name]):
      if label == "as float32":
        continue
      corrupted = {k: v for k, v in tensors.items() if k != name}
      if variant is not None:
        corrupted[name] = variant
      p = tmp_path / f"c{(case := case + 1)}.gguf"
      try:
        write_gguf(p, CONFIG.replace(rms_norm_eps=1e-5), corrupted, tokenizer=False)
      except Exception:  # the writer itself refuses some shapes (a q/k permutation of a truncated tensor)
        continue
      outcome.check(f"tensor {name} {label}", p)
  original = (tmp_path / "original.gguf").read_bytes()
  # flips in the fixed header (magic, version, counts) and the tensor infos (names, shapes, types, offsets); a
  # flip inside a metadata value (a float such as rope.freq_base) is an in-range edit no loader can see
  reader = gguf.GGUFReader(str(tmp_path / "original.gguf"))
  info_fields = [t.field for t in reader.tensors]
  kv_end = min(int(f.offset) for f in info_fields)
  infos_end = max(int(f.offset) + sum(int(part.nbytes) for part in f.parts) for f in info_fields)
  infos = original[kv_end:infos_end]
  for label, data in file_variants(original[:24], rng, 24, flips=6):
    p = tmp_path / f"c{(case := case + 1)}.gguf"
    p.write_bytes(data + original[24:] if not label.startswith("truncate") else data)
    outcome.check(f"file {label}", p)
  for label, data in file_variants(infos, rng, len(infos), flips=16):
    if label.startswith("truncate"):
      continue
    p = tmp_path / f"c{(case := case + 1)}.gguf"
    p.write_bytes(original[:kv_end] + data + original[infos_end:])
    outcome.check(f"tensor infos {label}", p)
  for label, data in file_variants(original, rng, 0, flips=0):
    p = tmp_path / f"c{(case := case + 1)}.gguf"
    p.write_bytes(data)
    outcome.check(f"file {label}", p)
  outcome.assert_clean(minimum_raised=40)


def _quantized_cases(directory: Path, rng: random.Random, *, json_limit: int, data_flips: bool, values=MALFORMED):
  """(label, function that corrupts a copy of `directory`) for a quantized LLM directory."""
  meta = json.loads((directory / "quantization.json").read_text())
  tensors = load_file(str(directory / "model.safetensors"))
  body = {k: v for k, v in meta.items() if k != "integrity"}
  cases = []
  for path, value in json_variants(body, rng, limit=json_limit, values=values):
    def corrupt(d, path=path, value=value):
      new = edited(body, path, value)
      if "integrity" in meta:
        new["integrity"] = meta["integrity"]
      (d / "quantization.json").write_text(json.dumps(new))
    cases.append((f"quantization.json {path} = {value!r}", corrupt))
  for name in rng.sample(sorted(tensors), 6) + [n for n in tensors if n.endswith(("perm", "embed_tokens"))][:2]:
    for label, variant in tensor_variants(tensors[name], name):
      def corrupt(d, name=name, variant=variant):
        corrupted = {k: v for k, v in tensors.items() if k != name}
        if variant is not None:
          corrupted[name] = variant
        save_file(corrupted, str(d / "model.safetensors"))
      cases.append((f"tensor {name} {label}", corrupt))
  data = (directory / "model.safetensors").read_bytes()
  header_len = 8 + struct.unpack("<Q", data[:8])[0]
  variants = list(file_variants(data, rng, header_len))
  if data_flips:  # past the header: values change, which only the digest can see
    for _ in range(6):
      at = rng.randrange(header_len, len(data))
      flipped = bytearray(data)
      flipped[at] ^= 1 << rng.randrange(8)
      variants.append((f"flip a bit of data byte {at}", bytes(flipped)))
  for label, corrupted_bytes in variants:
    cases.append((f"model.safetensors {label}",
                  lambda d, b=corrupted_bytes: (d / "model.safetensors").write_bytes(b)))
  text = (directory / "quantization.json").read_text()
  cases.append(("quantization.json truncated", lambda d: (d / "quantization.json").write_text(text[:len(text) // 2])))
  return cases


def _run_quantized_fuzz(tmp_path, directory: Path, *, json_limit: int, minimum_raised: int):
  rng = random.Random(SEED)
  outcome = Outcome(logits_of(directory))
  for i, (label, corrupt) in enumerate(_quantized_cases(directory, rng, json_limit=json_limit, data_flips=False,
                                                        values=OUT_OF_RANGE)):
    copy = tmp_path / f"c{i}"
    shutil.copytree(directory, copy)
    corrupt(copy)
    outcome.check(label, copy)
  outcome.assert_clean(minimum_raised)


@pytest.mark.slow  # ~11 s on 2 cores
def test_quantized_v2_directory_corruptions_raise_or_load_the_same_model(tmp_path):
  """The stored version-2 fixture (no digest): every field and tensor check on its own."""
  _run_quantized_fuzz(tmp_path, V2_FIXTURE, json_limit=150, minimum_raised=120)


def test_quantized_directory_with_digest_catches_every_edit(tmp_path):
  """A directory written now carries sha256 digests: in-range edits and data-byte flips raise too."""
  from cometjax.checkpoint.quantized import save_quantized
  loaded = load(V2_FIXTURE)
  directory = tmp_path / "written"
  save_quantized(directory, loaded.model, loaded.quant_config)
  reference = logits_of(directory)
  np.testing.assert_array_equal(reference, logits_of(V2_FIXTURE))
  outcome = Outcome(reference)
  meta = json.loads((directory / "quantization.json").read_text())
  cases = _quantized_cases(directory, random.Random(SEED), json_limit=20, data_flips=True)
  layer = next(name for name, info in meta["layers"].items() if info["activation"] is not None)
  for path, value in ((("layers", layer, "activation", "num_int8_blocks"),
                       meta["layers"][layer]["activation"]["num_int8_blocks"] ^ 1),
                      (("model_config", "rms_norm_eps"), 1e-3)):
    new = edited(meta, path, value)
    cases.append((f"in-range {path} = {value}",
                  lambda d, new=new: (d / "quantization.json").write_text(json.dumps(new))))
  for i, (label, corrupt) in enumerate(cases):
    copy = tmp_path / f"c{i}"
    shutil.copytree(directory, copy)
    corrupt(copy)
    outcome.check(label, copy)
  outcome.assert_clean(minimum_raised=len(cases))
