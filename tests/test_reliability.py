"""Issue 17's cases: each bad checkpoint, input and flag gets a named error (no silent wrong answer, no foreign
exception), and the CLI answers `error: <flag>: <what is wrong>` with exit status 2 before any model loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from cometjax.checkpoint import load
from cometjax.cli import main
from cometjax.errors import CheckpointError, ConfigError, InputError
from cometjax.models.llama import TINY_CONFIG, init_llama

FIXTURE = Path(__file__).parent / "data" / "format_v2_w4ax_kv4"


@pytest.fixture(scope="module")
def tiny():
  return init_llama(TINY_CONFIG, seed=0)


# ------------------------------------------------------------------------------------------------
# Requests: token ids and the context


def test_negative_token_id_is_refused_not_wrapped(tiny):
  from cometjax.serving.generate import generate
  with pytest.raises(InputError, match=r"token id -1 is outside \[0, vocab_size\) = \[0, 512\)"):
    generate(tiny, [[1, -1, 300]], 6)
  with pytest.raises(InputError, match="must be integers"):
    generate(tiny, [[1, 2.5]], 6)


@pytest.mark.parametrize("prompt_len, new", [(513, 1), (504, 40), (10, 512)])
def test_prompt_plus_new_tokens_beyond_the_context_is_refused(tiny, prompt_len, new):
  from cometjax.serving.generate import generate
  with pytest.raises(InputError, match="exceeds the model's context|leaves no room"):
    generate(tiny, [[1] * prompt_len], new)


def test_truncation_drops_the_oldest_tokens_only_when_asked():
  from cometjax.serving.limits import fit_context
  prompt = list(range(600))
  assert fit_context(prompt, 40, 512, truncate="left") == prompt[128:]
  assert fit_context(prompt[:100], 40, 512) == prompt[:100]
  with pytest.raises(InputError, match="truncate must be"):
    fit_context(prompt, 40, 512, truncate="right")


def test_engine_refuses_requests_beyond_the_model_context(tiny):
  from cometjax.serving.engine import Engine
  engine = Engine(tiny, slots=1, max_len=1024, chunk=32)
  assert engine.max_request_tokens == TINY_CONFIG.max_position_embeddings
  with pytest.raises(InputError, match="exceeds the model's context"):
    engine.submit([1] * 500, 20)
  with pytest.raises(InputError, match="vocab_size"):
    engine.submit([1, -3], 4)


def test_nan_calibration_stats_are_refused(tiny):
  from calib.stats import CalibrationStats, LayerStats
  from cometjax.quant.config import preset
  from cometjax.quant.transform import quantize
  config = preset("w4ax")
  kp = TINY_CONFIG.hidden_size
  absmax = np.ones(kp, np.float32)
  absmax[3] = np.nan

  class EveryLayer(dict):  # the same statistics for whichever layer quantize asks about first
    def __contains__(self, name):
      return True

    def __getitem__(self, name):
      return LayerStats(absmax, np.ones(kp), 8, np.eye(kp), None)

  stats = CalibrationStats(EveryLayer(), config.rotation, 8)
  with pytest.raises(ConfigError, match=r"calibration stats of layer 'layers\.0\.[a-z_.]+': absmax holds non-finite"):
    quantize(tiny, config, stats, progress=False)


# ------------------------------------------------------------------------------------------------
# Quantized directories


def _copy(tmp_path) -> Path:
  directory = tmp_path / "q"
  shutil.copytree(FIXTURE, directory)
  return directory


def _edit_tensor(directory: Path, name: str, fn):
  tensors = load_file(str(directory / "model.safetensors"))
  tensors[name] = fn(tensors[name])
  save_file(tensors, str(directory / "model.safetensors"))


@pytest.mark.parametrize("name, fn, match", [
    ("embed_tokens", lambda a: np.zeros((63, 32), a.dtype),
     r"'embed_tokens' has shape \[63, 32\], expected \[64, 32\]"),
    ("norm.weight", lambda a: a[:-1], r"'norm.weight' has shape \[31\], expected \[32\]"),
    ("layers.0.mlp.up_proj.kernel.input_perm", lambda a: a[:-1], "input_perm' has shape"),
    ("layers.0.mlp.up_proj.kernel.input_perm", lambda a: np.zeros_like(a), "not a permutation"),
    ("layers.0.mlp.up_proj.kernel.scales", lambda a: np.full_like(a, np.inf), "non-finite"),
    ("embed_tokens", lambda a: a.astype(np.float64), "stored as float64, the metadata says float32"),
])
def test_quantized_tensor_of_the_wrong_shape_or_values_is_named(tmp_path, name, fn, match):
  directory = _copy(tmp_path)
  _edit_tensor(directory, name, fn)
  with pytest.raises(CheckpointError, match=match):
    load(directory)


@pytest.mark.parametrize("path, match", [
    (("layers",), "field layers is missing"),
    (("model_config", "hidden_size"), "field model_config.hidden_size is missing"),
    (("dtypes",), "field dtypes is missing"),
    (("layers", "layers.0.mlp.up_proj", "bits"), r"field layers.layers.0.mlp.up_proj.bits is missing"),
    (("layers", "layers.0.mlp.up_proj", "activation"), r"field layers.layers.0.mlp.up_proj.activation is missing"),
    (("model_config", "rms_norm_eps"), "field model_config.rms_norm_eps is missing"),
])
def test_quantized_metadata_missing_field_is_named(tmp_path, path, match):
  directory = _copy(tmp_path)
  meta = json.loads((directory / "quantization.json").read_text())
  node = meta
  for key in path[:-1]:
    node = node[key]
  del node[path[-1]]
  (directory / "quantization.json").write_text(json.dumps(meta))
  with pytest.raises(CheckpointError, match=match):
    load(directory)


def test_quantized_metadata_of_the_wrong_type_is_named(tmp_path):
  directory = _copy(tmp_path)
  meta = json.loads((directory / "quantization.json").read_text())
  meta["layers"]["layers.0.mlp.up_proj"]["bits"] = "4"
  (directory / "quantization.json").write_text(json.dumps(meta))
  with pytest.raises(CheckpointError, match=r"bits must be int, got '4'"):
    load(directory)


def test_a_flag_that_disowns_a_tensor_is_caught(tmp_path):
  directory = _copy(tmp_path)
  meta = json.loads((directory / "quantization.json").read_text())
  meta["layers"]["layers.0.mlp.up_proj"]["transform"]["perm"] = False
  (directory / "quantization.json").write_text(json.dumps(meta))
  with pytest.raises(CheckpointError, match="unexpected tensor 'layers.0.mlp.up_proj.kernel.input_perm'"):
    load(directory)


def test_truncated_metadata_and_weights_name_the_file(tmp_path):
  directory = _copy(tmp_path)
  text = (directory / "quantization.json").read_text()
  (directory / "quantization.json").write_text(text[:len(text) // 2])
  with pytest.raises(CheckpointError, match=r"quantization.json is not valid JSON \(truncated\?\)"):
    load(directory)
  directory = tmp_path / "q2"
  shutil.copytree(FIXTURE, directory)
  data = (directory / "model.safetensors").read_bytes()
  (directory / "model.safetensors").write_bytes(data[:len(data) // 2])
  with pytest.raises(CheckpointError, match="cannot read weight file .*model.safetensors"):
    load(directory)
  (directory / "model.safetensors").write_bytes(b"garbage" * 10)
  with pytest.raises(CheckpointError, match="cannot read weight file"):
    load(directory)


def test_saved_directory_digest_catches_a_changed_weight_byte(tmp_path):
  from cometjax.checkpoint.quantized import save_quantized
  loaded = load(FIXTURE)
  directory = tmp_path / "written"
  save_quantized(directory, loaded.model, loaded.quant_config)
  load(directory)  # untouched: loads
  data = bytearray((directory / "model.safetensors").read_bytes())
  data[-3] ^= 0x10
  (directory / "model.safetensors").write_bytes(bytes(data))
  with pytest.raises(CheckpointError, match="weights file changed after it was written"):
    load(directory)


def test_hf_config_missing_field_and_missing_tokenizer_are_named(tmp_path):
  from test_checkpoint_fuzz import CONFIG, hf_config_json, write_hf_dir
  from gguf_files import random_hf_tensors
  meta = hf_config_json(CONFIG)
  del meta["num_attention_heads"]
  write_hf_dir(tmp_path / "hf", meta, random_hf_tensors(CONFIG))
  with pytest.raises(CheckpointError, match="config.json: field num_attention_heads is missing"):
    load(tmp_path / "hf")
  with pytest.raises(CheckpointError, match="tokenizer .*nonexistent.model does not exist"):
    load(FIXTURE, tokenizer=tmp_path / "nonexistent.model")
  (tmp_path / "bad.model").write_bytes(b"not a sentencepiece model")
  with pytest.raises(CheckpointError, match="not a readable SentencePiece model"):
    load(FIXTURE, tokenizer=tmp_path / "bad.model")


# ------------------------------------------------------------------------------------------------
# The command line


def _error_line(capsys) -> str:
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  return err[0]


@pytest.fixture
def no_model_load(monkeypatch):
  """Fails the test if a subcommand loads a model: argument checks must come first."""
  def refuse(*args, **kwargs):
    raise AssertionError("the model was loaded before the arguments were checked")
  from cometjax.cli import common, eval_ppl, generate, serve
  for module in (common, eval_ppl, generate, serve):
    monkeypatch.setattr(module, "load_model", refuse)


@pytest.mark.parametrize("argv, line", [
    (["generate", "--tokenizer", "/nonexistent.model"], "error: --tokenizer: /nonexistent.model does not exist"),
    (["generate", "--max-new-tokens", "0"], "error: --max-new-tokens: must be >= 1, got 0"),
    (["generate", "--top-p", "1.5"], "error: --top-p: must be in (0, 1], got 1.5"),
    (["generate", "--model", "/nonexistent/model"], "error: --model: /nonexistent/model does not exist"),
    (["sample", "--classes", "1,x"], "error: --classes: expected integers separated by commas, got '1,x'"),
    (["sample", "--classes", "12"], "error: --classes: must be digits 0..9 separated by commas, got '12'"),
    (["sample", "--count", "0"], "error: --count: must be >= 1, got 0"),
    (["sample", "--setting", "w9a9"], "error: --setting: must be one of"),
    (["serve", "--model", ".", "--max-len", "100"], "error: --max-len: 100 must be a multiple of --chunk (32)"),
    (["serve", "--model", ".", "--preset", "w4ax"], "error: --calib-text: missing: preset 'w4ax' calibrates on text"),
    (["serve", "--model", ".", "--port", "70000"], "error: --port: must be <= 65535, got 70000"),
])
def test_cli_user_errors_are_one_named_line_with_status_2(capsys, no_model_load, argv, line):
  assert main(argv) == 2
  assert _error_line(capsys).startswith(line)


def test_eval_ppl_text_is_checked_before_the_model_loads(tmp_path, capsys, no_model_load):
  binary = tmp_path / "binary.txt"
  binary.write_bytes(b"\xff\xfe\x00\x81" * 8)
  assert main(["eval-ppl", "--model", str(tmp_path), "--text", str(binary)]) == 2
  assert _error_line(capsys).startswith(f"error: --text: {binary} is not UTF-8 text")
  assert main(["eval-ppl", "--model", str(tmp_path), "--text", str(tmp_path / "none.txt")]) == 2
  assert "error: --text: file" in _error_line(capsys)
  with pytest.raises(SystemExit) as exit_info:  # argparse: a required flag
    main(["eval-ppl", "--model", str(tmp_path)])
  assert exit_info.value.code == 2 and "--text" in capsys.readouterr().err


def test_unknown_flag_shows_the_subcommands_usage(capsys):
  with pytest.raises(SystemExit) as exit_info:
    main(["generate", "--preset", "x"])
  err = capsys.readouterr().err
  assert exit_info.value.code == 2
  assert "usage: cometjax generate" in err and "cometjax generate: error: unrecognized arguments: --preset x" in err


def test_quantize_out_is_never_the_input_nor_a_non_empty_directory(tmp_path, capsys, monkeypatch):
  model = tmp_path / "model"
  model.mkdir()
  (model / "config.json").write_text("{}")
  base = ["quantize", "--model", str(model), "--preset", "w4a16"]
  assert main(base + ["--out", str(model)]) == 2
  line = _error_line(capsys)
  assert line.startswith("error: --out:") and "would overwrite the input" in line
  assert main(base + ["--out", str(tmp_path)]) == 2  # holds the model: would also overwrite it
  assert _error_line(capsys).startswith("error: --out:")
  full = tmp_path / "full"
  full.mkdir()
  (full / "keep.txt").write_text("mine")
  assert main(base + ["--out", str(full)]) == 2
  assert "is not empty; pass --force" in _error_line(capsys)
  from cometjax.cli import quantize
  monkeypatch.setattr(quantize, "check_args", lambda args: (_ for _ in ()).throw(SystemExit(0)))
  with pytest.raises(SystemExit):  # with --force the checks pass on to the run
    main(base + ["--out", str(full), "--force"])
  assert (full / "keep.txt").read_text() == "mine"


def test_quantize_group_size_help_and_per_channel(capsys):
  import argparse

  from cometjax.cli.quantize import add_command, config_from_args
  parser = argparse.ArgumentParser()
  add_command(parser.add_subparsers())
  args = parser.parse_args(["quantize", "--model", "m", "--out", "o", "--preset", "w4ax", "--group-size", "0"])
  assert config_from_args(args).weights.group_size is None
  args = parser.parse_args(["quantize", "--model", "m", "--out", "o", "--preset", "w4ax"])
  assert config_from_args(args).weights.group_size == 32
  with pytest.raises(SystemExit):
    parser.parse_args(["quantize", "--help"])
  help_text = " ".join(capsys.readouterr().out.split())
  assert "0 = one scale per output channel" in help_text and "w4ax: 32" in help_text


def test_a_subcommand_returning_a_path_exits_0(monkeypatch):
  from cometjax.cli import sample
  monkeypatch.setattr(sample, "run", lambda args: Path("samples.png"))
  assert main(["sample"]) == 0


def test_generate_refuses_a_prompt_beyond_the_context_unless_truncated(capsys):
  assert main(["generate", "--max-new-tokens", "600"]) == 2  # the builtin model's context is 512
  assert _error_line(capsys).startswith("error: --max-new-tokens: max_new_tokens (600) leaves no room")


# ------------------------------------------------------------------------------------------------
# Diffusion checkpoints


def test_quantized_diffusion_metadata_is_checked(tmp_path):
  from cometjax.checkpoint.diffusion import load_quantized_diffusion
  folder = tmp_path / "qd"
  folder.mkdir()
  (folder / "quantized.json").write_text('{"format": "cometjax-quantized-diffusion", "format_version": 1, "ki')
  with pytest.raises(CheckpointError, match="quantized.json is not valid JSON"):
    load_quantized_diffusion(folder)
  meta = {"format": "cometjax-quantized-diffusion", "format_version": 1, "kind": "dit", "setting": "w4a4-ptq"}
  (folder / "quantized.json").write_text(json.dumps(meta))
  with pytest.raises(CheckpointError, match="field quant is missing"):
    load_quantized_diffusion(folder)
  (folder / "quantized.json").write_text(json.dumps(dict(meta, quant={"weight_bits": "4"})))
  with pytest.raises(CheckpointError, match="field quant.weight_bits must be int, got '4'"):
    load_quantized_diffusion(folder)
  (folder / "quantized.json").write_text(json.dumps(dict(meta, kind="unet")))
  with pytest.raises(CheckpointError, match="field kind must be one of"):
    load_quantized_diffusion(folder)


@pytest.mark.realdata
@pytest.mark.parametrize("name, edit, match", [
    ("dits.0.wq.weight", None, "missing tensor 'dits.0.wq.weight'"),
    ("dits.0.wq.weight", lambda a: a[:-1], "the tensors do not fit the model config"),
    ("label_emb.weight", lambda a: a[:-1], r"'label_emb.weight' has shape \[9, 64\]"),
    ("ln.bias", lambda a: np.full_like(a, np.nan), "'ln.bias' holds non-finite values"),
])
def test_dit_checkpoint_tensors_are_checked(tmp_path, name, edit, match):
  from conftest import require_data

  from cometjax.checkpoint.diffusion import load_dit
  source = require_data("diffusion", "mnist_dit", "model.safetensors")
  tensors = load_file(str(source))
  if edit is None:
    del tensors[name]
  else:
    tensors[name] = edit(tensors[name])
  shutil.copyfile(source.parent / "config.json", tmp_path / "config.json")
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(CheckpointError, match=match):
    load_dit(tmp_path)


def _gguf_with(path: Path, source: Path, key: str, value=None, vtype=None) -> Path:
  """A copy of the GGUF at `source` with metadata `key` dropped (value None) or replaced."""
  from gguf_files import rewrite_gguf_metadata
  return rewrite_gguf_metadata(source, path, key, value, vtype)


@pytest.mark.parametrize("key, value, kind, match", [
    ("tokenizer.ggml.merges", None, None, "'tokenizer.ggml.merges' is missing"),
    ("tokenizer.ggml.tokens", "x", "STRING", "tokenizer.ggml.tokens must be a non-empty list of strings"),
    ("tokenizer.ggml.token_type", 7, "UINT32", "tokenizer.ggml.token_type must be a list of integers"),
    ("tokenizer.chat_template", 7, "UINT32", "tokenizer.chat_template must be a string"),
    ("tokenizer.ggml.bos_token_id", 10**6, "UINT32", "outside the vocabulary"),
])
def test_gguf_tokenizer_metadata_is_checked(tmp_path, key, value, kind, match):
  import gguf

  from gguf_files import random_hf_tensors, tiny_config, write_gguf
  config = tiny_config(273)  # the byte-level test vocabulary's size
  write_gguf(tmp_path / "good.gguf", config, random_hf_tensors(config))
  assert load(tmp_path / "good.gguf").tokenizer.encode("the cat")
  vtype = None if kind is None else getattr(gguf.GGUFValueType, kind)
  with pytest.raises(CheckpointError, match=match):
    load(_gguf_with(tmp_path / "bad.gguf", tmp_path / "good.gguf", key, value, vtype))
