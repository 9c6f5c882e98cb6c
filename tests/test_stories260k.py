"""The real stories260K checkpoint (../shared/data, see its README): both formats, reference facts."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from cometjax.checkpoint import load
from cometjax.checkpoint.tokenizers import Llama2cTokenizer, SentencePieceTokenizer
from cometjax.serving.generate import generate
from cometjax.serving.perplexity import perplexity

from conftest import require_data

pytestmark = pytest.mark.realdata

# First 64 greedy ids from BOS (README "Reference facts").
REFERENCE_IDS = [403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337,
                 410, 408, 419, 292, 411, 322, 265, 282, 295, 433, 426, 385, 328, 432, 358, 394, 261, 370, 432, 352,
                 266, 268, 388, 426, 338, 391, 266, 267, 337, 335, 312, 432, 398, 312, 286, 267, 414, 270, 333, 415,
                 426, 13, 438, 310]
REFERENCE_200_TEXT_START = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
                            "One day, she saw a big, red ball.")
REFERENCE_PPL = 4.7353
REFERENCE_TOKENS = 390_329


@pytest.fixture(scope="module")
def hf():
  return load(require_data("llama", "stories260K", "hf"))


@pytest.fixture(scope="module")
def llama2c():
  return load(require_data("llama", "stories260K", "llama2c", "stories260K.bin"))


@pytest.mark.slow
def test_both_formats_give_the_same_logits(hf, llama2c):
  tokens = np.array([[1, 403, 407, 261, 378, 432, 383, 286, 261]])
  a, _ = hf.model(tokens)
  b, _ = llama2c.model(tokens)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("fmt", ["hf", "llama2c"])
def test_greedy_from_bos_reproduces_reference(fmt, request):
  loaded = request.getfixturevalue(fmt)
  result = generate(loaded.model, [[1]], 200, stop_at_eos=False)
  assert result.tokens[0][:64] == REFERENCE_IDS
  assert 1 not in result.tokens[0] and 2 not in result.tokens[0]
  assert loaded.tokenizer.decode(result.tokens[0]).startswith(REFERENCE_200_TEXT_START)


def test_tokenizers_agree_on_a_story(hf, llama2c):
  text = "Lily and Ben went to the park. They saw a big dog!"
  ids = hf.tokenizer.encode(text)
  assert ids[0] == 1
  assert isinstance(llama2c.tokenizer, SentencePieceTokenizer)
  assert llama2c.tokenizer.encode(text) == ids
  bin_tok = Llama2cTokenizer(require_data("llama", "stories260K", "llama2c", "tok512.bin"), 512)
  assert bin_tok.encode(text) == ids
  assert bin_tok.decode(ids) == text == hf.tokenizer.decode(ids)


@pytest.mark.slow
def test_perplexity_matches_reference(hf):
  text = require_data("text", "tinystories_val.txt").read_text(encoding="utf-8")
  result = perplexity(hf.model, hf.tokenizer, text, batch_size=16, progress=False)
  assert result.num_documents == 1000
  assert result.num_windows == 763
  assert result.num_tokens == REFERENCE_TOKENS
  assert math.isclose(result.ppl, REFERENCE_PPL, rel_tol=1e-3), result


def test_per_document_perplexity_on_a_subset(llama2c):
  text = require_data("text", "tinystories_val.txt").read_text(encoding="utf-8")
  result = perplexity(llama2c.model, llama2c.tokenizer, text, per_document=True, max_documents=20, progress=False)
  assert result.num_documents == 20
  assert 3.0 < result.ppl < 7.0


def _cli(*args):
  proc = subprocess.run([sys.executable, "-m", "cometjax.cli", *args], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  return proc.stdout.strip().splitlines()


@pytest.mark.slow
def test_cli_generate_json_on_both_formats():
  for model in (require_data("llama", "stories260K", "hf"),
                require_data("llama", "stories260K", "llama2c", "stories260K.bin")):
    out = json.loads(_cli("generate", "--model", str(model), "--max-new-tokens", "64", "--no-stop", "--json")[-1])
    assert out["token_ids"] == REFERENCE_IDS
    assert out["text"].startswith("Once upon a time")
    assert out["decode_tokens_per_s"] > 0


@pytest.mark.slow
def test_installed_console_script():
  """The `cometjax` entry point that `pip install` puts beside the interpreter."""
  import pathlib
  import shutil

  script = pathlib.Path(sys.executable).parent / "cometjax"
  if not script.exists():
    script = shutil.which("cometjax")
  if script is None:
    pytest.skip("the cometjax console script is not installed (pip install -e . installs it)")
  proc = subprocess.run([str(script), "generate", "--model", str(require_data("llama", "stories260K", "hf")),
                         "--max-new-tokens", "16", "--no-stop", "--json"], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert json.loads(proc.stdout.strip().splitlines()[-1])["token_ids"] == REFERENCE_IDS[:16]


@pytest.mark.slow
def test_cli_eval_ppl_subset():
  lines = _cli("eval-ppl", "--model", str(require_data("llama", "stories260K", "hf")),
               "--text", str(require_data("text", "tinystories_val.txt")), "--max-documents", "30", "--json")
  out = json.loads(lines[-1])
  assert out["num_documents"] == 30 and 3.0 < out["ppl"] < 7.0
  assert lines[-2].startswith("perplexity ")
