"""JAX's persistent compilation cache in a user-visible folder, so a second run of a command skips compiling.

The folder is $COMETJAX_CACHE_DIR, else $XDG_CACHE_HOME/cometjax/xla (default ~/.cache/cometjax/xla);
COMETJAX_CACHE_DIR=off turns the cache off. Deleting the folder is always safe.
"""

from __future__ import annotations

import os
from pathlib import Path

OFF = ("off", "none", "0", "")


def compilation_cache_dir() -> Path | None:
  """The folder `enable_compilation_cache` uses, or None when COMETJAX_CACHE_DIR turns it off."""
  env = os.environ.get("COMETJAX_CACHE_DIR")
  if env is not None:
    return None if env.strip().lower() in OFF else Path(env).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base) / "cometjax" / "xla"


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
  """Points JAX's persistent compilation cache at `path` (default `compilation_cache_dir()`); returns the
  folder, or None when the cache is off. Every compilation is kept, however quick."""
  folder = Path(path).expanduser() if path is not None else compilation_cache_dir()
  if folder is None:
    return None
  import jax

  folder.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(folder))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return folder
