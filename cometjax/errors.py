"""The error types cometjax raises: each message names the file, tensor, field or argument and what was expected.

All derive from ValueError, so `except ValueError` keeps working for callers that do not care which kind.
"""

from __future__ import annotations


class CometError(ValueError):
  """Base of every named cometjax error."""


class CheckpointError(CometError):
  """A checkpoint is missing, truncated, malformed or uses a feature cometjax does not implement."""


class ConfigError(CometError):
  """A configuration value is out of range or inconsistent with another one."""


class UnsupportedError(CometError):
  """An explicitly requested implementation cannot serve this operand (e.g. implementation="pallas" for a
  weight no Pallas kernel tiles); implementation="auto" falls back instead of raising."""


class InputError(CometError):
  """A request's input is outside what the model accepts (token ids outside the vocabulary, a prompt plus
  max_new_tokens longer than the model's context or the cache)."""


class UsageError(ConfigError):
  """A command-line flag's value is wrong; prints as `<flag>: <what is wrong>`."""

  def __init__(self, flag: str, message: str):
    super().__init__(f"{flag}: {message}")
    self.flag = flag
