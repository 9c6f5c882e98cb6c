"""GGUF loading on tiny files written with the `gguf` package: the Q/K permutation is undone, tensor types
dequantize, metadata maps to the config, the tokenizer equals transformers' for the same file, and bad
files raise named errors."""

import numpy as np
import pytest

from cometjax.checkpoint import load
from cometjax.checkpoint.hf import params_from_tensors
from cometjax.errors import CheckpointError
from gguf_files import byte_level_vocab, random_hf_tensors, tiny_config, write_gguf

VOCAB = len(byte_level_vocab()[0])
TOKENS = np.array([[5, 70, 200, 9, 33, 260, 3, 41]])
TEXTS = ["the cat and the dog", " was in an inn", "Hello,  world!\n\nThe end.", "naïve café — 42 µs",
         "<|im_start|>user\nhi<|im_end|>", "", "   ", "a\tb\r\nc"]


@pytest.fixture(scope="module")
def float_gguf(tmp_path_factory):
  config = tiny_config(VOCAB)
  tensors = random_hf_tensors(config)
  path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
  write_gguf(path, config, tensors)
  return path, config, tensors


def test_float_gguf_equals_the_hf_tensors(float_gguf):
  path, config, tensors = float_gguf
  loaded = load(path)
  expected, _ = params_from_tensors(config, tensors, "reference")(TOKENS)
  logits, _ = loaded.model(TOKENS)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=0, atol=1e-5)
  c = loaded.config
  assert (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads) == (2, 32, 64, 4, 2)
  assert (c.rope_theta, c.rms_norm_eps, c.max_position_embeddings, c.tie_word_embeddings) == (50000.0, 1e-5, 128, False)
  assert (c.bos_token_id, c.eos_token_id, c.vocab_size) == (1, 2, VOCAB)


def test_tied_output_when_the_file_has_no_output_tensor(tmp_path):
  config = tiny_config(VOCAB, tie=True)
  tensors = random_hf_tensors(config, seed=1)
  write_gguf(tmp_path / "tied.gguf", config, tensors)
  loaded = load(tmp_path / "tied.gguf")
  assert loaded.config.tie_word_embeddings
  expected, _ = params_from_tensors(config, tensors, "reference")(TOKENS)
  np.testing.assert_allclose(np.asarray(loaded.model(TOKENS)[0]), np.asarray(expected), atol=1e-5)


@pytest.mark.parametrize("linear_type, tolerance", [("F16", 2e-3), ("BF16", 2e-2), ("Q8_0", 2e-2),
                                                    ("Q4_0", 0.3), ("Q4_1", 0.3)])
def test_quantized_tensor_types_dequantize(tmp_path, float_gguf, linear_type, tolerance):
  import gguf
  _, config, tensors = float_gguf
  path = tmp_path / f"{linear_type}.gguf"
  write_gguf(path, config, tensors, linear_type=linear_type)
  reader = gguf.GGUFReader(str(path))
  assert {t.tensor_type.name for t in reader.tensors if t.name.endswith("attn_q.weight")} == {linear_type}
  logits = np.asarray(load(path).model(TOKENS)[0])
  reference = np.asarray(params_from_tensors(config, tensors, "reference")(TOKENS)[0])
  error = np.abs(logits - reference).max() / np.abs(reference).max()
  assert 0 < error < tolerance if linear_type != "F16" else error < tolerance


def test_tokenizer_equals_transformers_for_the_same_file(float_gguf):
  from transformers import AutoTokenizer
  path, _, _ = float_gguf
  ours = load(path).tokenizer
  theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  for text in TEXTS:
    assert ours.encode(text) == theirs(text, add_special_tokens=False).input_ids, text
    assert ours.decode(ours.encode(text)) == theirs.decode(theirs(text).input_ids, skip_special_tokens=True)
  assert ours.encode("<|im_start|>")[0] == 1  # a control token stays whole
  messages = [{"role": "user", "content": "What is 2+2?"}]
  rendered = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  assert ours.apply_chat_template(messages) == theirs(rendered, add_special_tokens=False).input_ids
  assert ours.end_of_turn_ids == (2,)  # <|im_end|>, which is also EOS here


def test_bos_rule_comes_from_the_file(tmp_path, float_gguf):
  _, config, tensors = float_gguf
  assert load(float_gguf[0]).tokenizer.encode(" the") == [261]  # add_bos_token false: no BOS
  assert load(float_gguf[0]).tokenizer.encode(" the", bos=True) == [1, 261]
  path = tmp_path / "bos.gguf"
  write_gguf(path, config, tensors, add_bos=True)
  assert load(path).tokenizer.encode(" the") == [1, 261]


@pytest.mark.slow
def test_quantized_directory_from_a_gguf_keeps_its_tokenizer(tmp_path, float_gguf):
  from cometjax.checkpoint.quantized import save_quantized
  from cometjax.quant.config import preset
  from cometjax.quant.transform import quantize
  path, _, _ = float_gguf
  loaded = load(path)
  save_quantized(tmp_path / "q", quantize(loaded.model, preset("w4a4"), progress=False), preset("w4a4"),
                 tokenizer_source=path)
  again = load(tmp_path / "q").tokenizer
  for text in TEXTS:
    assert again.encode(text) == loaded.tokenizer.encode(text)
  assert again.apply_chat_template([{"role": "user", "content": "x"}]) == \
      loaded.tokenizer.apply_chat_template([{"role": "user", "content": "x"}])
  assert not (tmp_path / "q" / path.name).exists()  # the weights are not copied


def test_other_architecture_is_named(tmp_path, float_gguf):
  _, config, tensors = float_gguf
  write_gguf(tmp_path / "q2.gguf", config, tensors, architecture="qwen2")
  with pytest.raises(CheckpointError, match=r"general.architecture='qwen2' is not supported"):
    load(tmp_path / "q2.gguf")


def test_unsupported_tensor_type_is_named(tmp_path, float_gguf):
  _, config, tensors = float_gguf
  bad = dict(tensors)
  bad["model.layers.1.mlp.up_proj.weight"] = bad["model.layers.1.mlp.up_proj.weight"].astype(np.int32)
  write_gguf(tmp_path / "int.gguf", config, bad)
  with pytest.raises(CheckpointError, match=r"tensor 'blk.1.ffn_up.weight' has integer type I32"):
    load(tmp_path / "int.gguf")


def test_type_the_gguf_package_cannot_dequantize_is_named(tmp_path, float_gguf, monkeypatch):
  import gguf.quants

  def refuse(data, qtype):
    raise NotImplementedError(f"Dequantization for {qtype.name} is not yet implemented")
  monkeypatch.setattr(gguf.quants, "dequantize", refuse)
  with pytest.raises(CheckpointError, match=r"tensor 'token_embd.weight' has type F32, which the gguf package"):
    load(float_gguf[0])


def test_unknown_tensor_and_rope_freqs_are_named(tmp_path, float_gguf):
  _, config, tensors = float_gguf
  write_gguf(tmp_path / "extra.gguf", config, tensors, extra_tensors={"blk.0.attn_sinks.weight": np.ones(4, np.float32)})
  with pytest.raises(CheckpointError, match=r"tensor 'blk.0.attn_sinks.weight' is not part of the llama"):
    load(tmp_path / "extra.gguf")
  write_gguf(tmp_path / "freqs.gguf", config, tensors, extra_tensors={"rope_freqs.weight": np.ones(4, np.float32)})
  with pytest.raises(CheckpointError, match=r"rope_freqs.weight"):
    load(tmp_path / "freqs.gguf")


@pytest.mark.parametrize("keep", [0.5, 0.999, 40])
def test_truncated_gguf_is_named(tmp_path, float_gguf, keep):
  raw = float_gguf[0].read_bytes()
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(raw[:int(len(raw) * keep) if keep < 1 else keep])
  with pytest.raises(CheckpointError, match=r"cut.gguf"):
    load(cut)


def test_unsupported_tokenizer_model_is_named(tmp_path, float_gguf):
  from cometjax.checkpoint.tokenizers import GGUFTokenizer
  with pytest.raises(CheckpointError, match=r"tokenizer.ggml.model='bert' is not supported"):
    GGUFTokenizer({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}, "x.gguf")


def _sentencepiece_gguf(path, model_file):
  """A tensor-less GGUF holding tok512.model's vocabulary as llama.cpp writes a SentencePiece one."""
  import gguf
  import sentencepiece
  sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
  pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
  types = [6 if sp.is_byte(i) else 3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 1
           for i in range(len(pieces))]
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_tokenizer_model("llama")
  w.add_token_list(pieces)
  w.add_token_scores([sp.get_score(i) for i in range(len(pieces))])
  w.add_token_types(types)
  w.add_bos_token_id(sp.bos_id())
  w.add_eos_token_id(sp.eos_id())
  w.add_unk_token_id(sp.unk_id())
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return sp


@pytest.mark.realdata
def test_sentencepiece_vocabulary_equals_transformers_and_sentencepiece(tmp_path):
  from transformers import AutoTokenizer
  from conftest import require_data
  from cometjax.checkpoint.tokenizers import load_tokenizer
  model_file = require_data("llama", "stories260K", "llama2c", "tok512.model")
  stories = require_data("text", "tinystories_val.txt").read_text(encoding="utf-8").split("<|endoftext|>")
  stories = [s.strip() for s in stories if s.strip()][:200]
  path = tmp_path / "spm.gguf"
  sp = _sentencepiece_gguf(path, model_file)
  ours = load_tokenizer(path, 0)
  theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
  assert ours.add_bos and ours.encode("Hi")[0] == sp.bos_id()  # llama.cpp's default for SentencePiece files
  ids = [ours.encode(s, bos=False) for s in stories]
  assert ids == [theirs(s, add_special_tokens=False).input_ids for s in stories]
  single = [i for i, s in enumerate(stories) if "  " not in s]  # SentencePiece also collapses repeated spaces
  assert len(single) > 150 and all(ids[i] == sp.encode(stories[i]) for i in single)
  assert ours.decode(ids[0]) == sp.decode(ids[0])


def test_cli_chat_and_max_windows_on_a_gguf(float_gguf, tmp_path, capsys):
  import json
  from cometjax.cli import main
  path = float_gguf[0]
  tokenizer = load(path).tokenizer
  assert main(["generate", "--model", str(path), "--chat", "--prompt", "the cat", "--max-new-tokens", "3",
               "--json", "--no-warmup"]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["prompt_ids"] == tokenizer.apply_chat_template([{"role": "user", "content": "the cat"}])
  text = tmp_path / "one_document.txt"
  text.write_text("the cat was in an inn and the dog was on the mat " * 8)
  assert main(["eval-ppl", "--model", str(path), "--text", str(text), "--window", "16", "--max-windows", "2",
               "--windowing", "disjoint", "--json"]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert (out["num_windows"], out["num_tokens"], out["windowing"]) == (2, 30, "disjoint")


@pytest.mark.parametrize("post_processor_adds_bos", [False, True])
def test_hf_directory_bos_rule_follows_its_post_processor(tmp_path, float_gguf, post_processor_adds_bos):
  import json
  from tokenizers import processors
  from cometjax.checkpoint.tokenizers import HFTokenizer
  backend = load(float_gguf[0]).tokenizer._tk
  if post_processor_adds_bos:
    backend.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
  backend.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
  tokenizer = HFTokenizer(tmp_path)
  assert tokenizer.add_bos is post_processor_adds_bos
  assert tokenizer.encode(" the") == ([1] if post_processor_adds_bos else []) + [261]
  assert tokenizer.encode(" the", bos=False) == [261]
