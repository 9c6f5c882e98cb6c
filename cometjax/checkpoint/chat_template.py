"""Chat templates (`tokenizer.chat_template`, a Jinja2 string) rendered as transformers renders them: a
sandboxed environment with trim_blocks / lstrip_blocks and loop controls, and the same globals
(`raise_exception`, `strftime_now`, a JSON `tojson` filter, `dict`, `namespace`) and variables
(`messages`, `add_generation_prompt`, the special-token strings).
"""

from __future__ import annotations

import datetime
import functools
import json
from typing import Sequence

from cometjax.errors import CheckpointError

_PROBE_REPLY = "cometjax-reply-probe"


@functools.lru_cache(maxsize=16)
def _compiled(template: str):
  import jinja2
  import jinja2.ext
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; transformers' (and so the templates' authors') does not
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  env.globals["dict"] = dict
  env.globals["namespace"] = jinja2.utils.Namespace
  try:
    return env.from_string(template)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise CheckpointError(f"the tokenizer's chat_template is not valid Jinja2: {e}") from e


def render_chat(template: str | None, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                special_tokens: dict[str, str | None] | None = None) -> str:
  """The prompt text `template` renders for `messages` ([{"role": ..., "content": ...}, ...])."""
  if not template:
    raise CheckpointError("this tokenizer has no chat_template (tokenizer.chat_template / tokenizer_config.json)")
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
  return _compiled(template).render(messages=list(messages), tools=None, documents=None,
                                    add_generation_prompt=add_generation_prompt, **(special_tokens or {}))


def end_of_turn_text(template: str | None, special_tokens: dict[str, str | None]) -> str | None:
  """The text the template writes right after an assistant reply (e.g. "<|im_end|>\\n"), or None when the
  template cannot render a user/assistant exchange."""
  if not template:
    return None
  messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE_REPLY}]
  try:
    text = render_chat(template, messages, add_generation_prompt=False, special_tokens=special_tokens)
  except Exception:  # a template may insist on a system turn or other roles; then EOS alone ends a turn
    return None
  at = text.rfind(_PROBE_REPLY)
  return None if at < 0 else text[at + len(_PROBE_REPLY):]
