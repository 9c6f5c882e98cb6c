import importlib.util
import os
import pathlib
import sys

# pytest -n N runs N processes: on a GPU none may take most of its memory up front
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# CLI tests run in-process: keep them off the user's persistent compilation cache
os.environ.setdefault("COMETJAX_CACHE_DIR", "off")

import jax
import pytest

from cometjax.data import data_dir, data_path

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def shared_data():
  """The shared data folder; the test is skipped with the reason when it is absent."""
  root = data_dir()
  if not root.is_dir():
    pytest.skip(f"shared data not found at {root} (set COMETJAX_DATA to the folder holding shared/data)")
  return root


def require_data(*parts: str):
  """Path to a shared data file, or skip the calling test naming the missing path."""
  path = data_path(*parts)
  if not path.exists():
    pytest.skip(f"shared data file missing: {path} (set COMETJAX_DATA)")
  return path


def load_bench_script(name: str):
  """bench/<name>.py as a module (bench/ is not an installed package)."""
  path = pathlib.Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
  spec.loader.exec_module(module)
  return module
