"""SmolLM2-135M-Instruct from its GGUF file against transformers/torch loading the same file: logits, greedy
continuations, the tokenizer on every WikiText-2 line and TinyStories story, and the chat template."""

import numpy as np
import pytest

from conftest import require_data

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

GGUF = ("llama", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
PROMPTS = ["The capital of France is", "Once upon a time, there was a little",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]


@pytest.fixture(scope="module")
def ours():
  from cometjax.checkpoint import load
  return load(require_data(*GGUF))


@pytest.fixture(scope="module")
def theirs():
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer
  path = require_data(*GGUF)
  tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
  return model.eval(), tokenizer


def test_config_from_the_gguf_header(ours):
  c = ours.config
  assert (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.resolved_head_dim) == \
      (30, 576, 1536, 9, 3, 64)
  assert (c.vocab_size, c.rope_theta, c.rms_norm_eps, c.max_position_embeddings, c.tie_word_embeddings) == \
      (49152, 100000.0, 1e-5, 8192, True)
  assert not ours.tokenizer.add_bos  # <|im_start|> (id 1) is a chat token, not a BOS to prepend


def test_logits_match_transformers(ours, theirs):
  import torch
  model, tokenizer = theirs
  for prompt in PROMPTS:
    ids = ours.tokenizer.encode(prompt)
    assert ids == tokenizer(prompt, add_special_tokens=False).input_ids
    logits = np.asarray(ours.model(np.asarray([ids]))[0][0])
    with torch.no_grad():
      reference = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(logits - reference).max() <= 1e-3 * np.abs(reference).max(), prompt


def test_greedy_continuations_match_transformers(ours, theirs):
  import torch
  from cometjax.serving.generate import generate
  model, _ = theirs
  prompts = [ours.tokenizer.encode(p) for p in PROMPTS[:2]]  # one shape bucket: one compilation
  mine = generate(ours.model, prompts, 20, stop_at_eos=False).tokens
  for ids, continuation in zip(prompts, mine):
    with torch.no_grad():
      out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=20, min_new_tokens=20)
    assert continuation == out[0, len(ids):].tolist(), ours.tokenizer.decode(ids)
  assert ours.tokenizer.decode(mine[0]).startswith(" Paris")


def test_tokenizer_equals_transformers_on_every_line_and_story(ours, theirs):
  _, tokenizer = theirs
  wiki = require_data("text", "wikitext2_test.raw").read_text(encoding="utf-8")
  stories = require_data("text", "tinystories_val.txt").read_text(encoding="utf-8").split("<|endoftext|>")
  texts = [line for line in wiki.split("\n") if line] + [s.strip() for s in stories if s.strip()]
  assert len(texts) > 3800
  expected = tokenizer(texts, add_special_tokens=False).input_ids
  assert ours.tokenizer.encode_batch(texts) == expected
  assert [ours.tokenizer.encode(t) for t in texts[:50]] == expected[:50]


def test_chat_answers_through_the_template(ours, theirs):
  from cometjax.serving.generate import generate
  _, tokenizer = theirs
  messages = [{"role": "user", "content": "What is 2+2?"}]
  rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  prompt = ours.tokenizer.apply_chat_template(messages)
  assert prompt == tokenizer(rendered, add_special_tokens=False).input_ids
  assert ours.tokenizer.end_of_turn_ids == (2,)  # <|im_end|>
  reply = generate(ours.model, [prompt], 20, eos_ids=ours.tokenizer.end_of_turn_ids).tokens[0]
  assert reply[-1] == 2 and "4" in ours.tokenizer.decode(reply)
