"""Quantized directories written before the redesign (format version 2) still load, with the same outputs."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from cometjax.checkpoint import load
from cometjax.errors import CheckpointError

FIXTURE = __import__("pathlib").Path(__file__).parent / "data" / "format_v2_w4ax_kv4"


def test_a_version_2_directory_from_the_previous_layout_loads_with_the_same_logits():
  loaded = load(FIXTURE)
  assert loaded.quant_config.name == "w4ax-kv4" and loaded.quant_config.kv is not None
  logits = np.asarray(loaded.model(jnp.asarray([[1, 5, 9, 13, 2, 7]]))[0])
  np.testing.assert_allclose(logits, np.load(FIXTURE / "expected_logits.npy"), rtol=1e-6, atol=1e-6)


def test_another_format_version_is_named(tmp_path):
  directory = tmp_path / "future"
  shutil.copytree(FIXTURE, directory)
  meta = json.loads((directory / "quantization.json").read_text())
  meta["format_version"] = 99
  (directory / "quantization.json").write_text(json.dumps(meta))
  with pytest.raises(CheckpointError, match="expected format cometjax-quantized version 2 or 3, got "
                                            "'cometjax-quantized' version 99"):
    load(directory)
