"""Where the shared real data lives: one setting, `COMETJAX_DATA` (default `../shared/data`)."""

from __future__ import annotations

import os
from pathlib import Path

_DEFAULT = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def data_dir() -> Path:
  """The shared data folder: $COMETJAX_DATA, else `../shared/data` beside the repository root."""
  env = os.environ.get("COMETJAX_DATA")
  return Path(env).expanduser().resolve() if env else _DEFAULT


def data_path(*parts: str) -> Path:
  """A path under the shared data folder (it may not exist; callers check)."""
  return data_dir().joinpath(*parts)
