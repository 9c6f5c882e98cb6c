import json

import pytest

from cometjax.cli import main
from tests.conftest import require_data


@pytest.mark.slow
def test_default_main_job_without_shared_data_says_it_uses_the_random_model(capsys, monkeypatch, tmp_path):
  monkeypatch.setenv("COMETJAX_DATA", str(tmp_path))  # no stories260K there
  assert main(["generate", "--max-new-tokens", "8", "--json"]) == 0
  captured = capsys.readouterr()
  out = json.loads(captured.out.strip().splitlines()[-1])
  assert "builtin:tiny" in captured.err and str(tmp_path) in captured.err
  assert out["model"] == "builtin:tiny" and out["text"] is None
  assert len(out["token_ids"]) == 8 and out["decode_tokens_per_s"] > 0
  assert len(set(out["token_ids"])) > 1  # the builtin random model's untied head gives varied tokens


@pytest.mark.slow
@pytest.mark.realdata
def test_default_main_job_prints_stories260k_text(capsys):
  stories = require_data("llama", "stories260K", "llama2c", "stories260K.bin")
  assert main(["generate", "--max-new-tokens", "24", "--json"]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["model"] == str(stories)
  assert len(out["text"].split()) >= 4 and out["text"].isascii()  # words, not ids


@pytest.mark.slow
def test_generate_with_kv4(capsys):
  assert main(["generate", "--max-new-tokens", "8", "--kv", "channel", "--json"]) == 0
  assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"]) == 8


def test_missing_model_is_a_clear_error(capsys, tmp_path):
  assert main(["generate", "--model", str(tmp_path / "nope")]) == 2
  assert capsys.readouterr().err.startswith(f"error: --model: {tmp_path / 'nope'} does not exist")


def test_prompt_without_tokenizer_is_refused(capsys):
  assert main(["generate", "--model", "builtin:tiny", "--prompt", "hello", "--max-new-tokens", "2"]) == 2
  assert capsys.readouterr().err.startswith("error: --prompt: text (and --chat) needs a tokenizer")


def test_eval_ppl_help_states_the_protocol(capsys):
  with pytest.raises(SystemExit):
    main(["eval-ppl", "--help"])
  help_text = capsys.readouterr().out
  assert "<|endoftext|>" in help_text and "[BOS]" in help_text and "512" in help_text


def test_module_entry_point_prints_help_without_jax():
  """`python -m cometjax.cli --help` builds every subcommand's parser and never imports jax."""
  import subprocess
  import sys
  code = ("import runpy, sys; sys.argv = ['cometjax', '--help']\n"
          "try:\n  runpy.run_module('cometjax.cli', run_name='__main__')\n"
          "except SystemExit as e:\n  assert e.code == 0, e.code\n"
          "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if m.startswith('jax'))[:5]")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "generate" in proc.stdout and "eval-ppl" in proc.stdout and "sample" in proc.stdout
