"""A checkpoint's own chat template: the Jinja `chat_template` of its tokenizer_config.json, rendered as
`transformers`' `apply_chat_template` renders it, for SFT / DPO, `llm-jax chat` and serve's
/v1/chat/completions. A run whose tokenizer has one uses it instead of the built-in template (chat.py), and
reserves no marker ids: the template writes the tokenizer's own special tokens (<|eot_id|>, <|im_end|>...).

Rendering: a sandboxed Jinja environment (no attribute access to Python internals, immutable containers)
with trim_blocks, lstrip_blocks and loop controls, the `tojson` filter, `raise_exception(msg)` and
`strftime_now(fmt)`, and as variables `messages` (a list of {"role", "content"}), `add_generation_prompt`
and the tokenizer's special tokens (bos_token, eos_token, ...). The text is then encoded whole, without the
tokenizer's post-processor tokens (the template writes bos itself), which gives apply_chat_template's ids.

Which tokens are trained: the reply role's. For each reply message k, the conversation up to k rendered with
the generation prompt is the text before the reply, and up to and including k without it is the text through
the reply's end marker; tokens that start between the two are the reply's. That needs each rendering to be a
prefix of the next (true of the templates of Llama 3, Qwen, Mistral, Gemma, ChatML); a template that rewrites
earlier turns (e.g. one dropping past reasoning) makes the record a Skipped 'template' with the reason.
"""

from __future__ import annotations

import datetime
import functools
import json

from llm_jax.errors import UserError


class TemplateError(ValueError):
  """The template refused a conversation (raise_exception) or failed while rendering it."""


def _raise_exception(message):
  raise TemplateError(str(message))


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
  return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=8)
def compile_template(source: str, where: str = 'tokenizer_config.json chat_template'):
  import jinja2
  from jinja2.sandbox import ImmutableSandboxedEnvironment
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=['jinja2.ext.loopcontrols'])
  env.filters['tojson'] = _tojson
  env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
  try:
    return env.from_string(source)
  except jinja2.TemplateSyntaxError as e:
    raise UserError(f'{where}: line {e.lineno}: {e.message}') from None


class JinjaTemplate:
  """The interface of chat.Template: roles, render (ids and trained flags), prompt, stop_ids."""

  builtin = False

  def __init__(self, tokenizer, roles, source: str):
    self.tokenizer, self.roles = tokenizer, tuple(roles)
    self._template = compile_template(source)
    self._specials = self._special_strings(tokenizer)
    self.stop_ids = self._find_stop_ids()
    self.end_id = self.stop_ids[0] if self.stop_ids else -1

  @staticmethod
  def _special_strings(tokenizer) -> dict[str, str]:
    from llm_jax.data.hf_tokenizer import _content
    out = {}
    for key, value in getattr(tokenizer, 'config', {}).items():
      if key.endswith('_token') and _content(value) is not None:
        out[key] = _content(value)
    for name in ('bos', 'eos', 'pad', 'unk'):  # read from tokenizer.json when the config names none
      i = getattr(tokenizer, f'{name}_id')
      if f'{name}_token' not in out and i >= 0:
        out[f'{name}_token'] = tokenizer.raw_token(i)
    return out

  @property
  def reply_role(self) -> str:
    return self.roles[-1]

  def text(self, messages, add_generation_prompt: bool) -> str:
    """The conversation (pairs of role, content) as the template writes it."""
    import jinja2
    dicts = [{'role': role, 'content': content} for role, content in messages]
    try:
      return self._template.render(messages=dicts, add_generation_prompt=add_generation_prompt,
                                   **self._specials)
    except TemplateError:
      raise
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
      raise TemplateError(f'the chat template failed: {type(e).__name__}: {e}') from None

  def render(self, messages) -> tuple[list[int], list[int]]:
    """(ids, trained): trained[i] is 1 where ids[i] is part of a reply (its content and end marker).
    TemplateError when the template refuses the conversation or rewrites earlier turns."""
    full = self.text(messages, False)
    spans = []
    for k, (role, _) in enumerate(messages):
      if role != self.reply_role:
        continue
      before = self.text(messages[:k], True)
      through = self.text(messages[:k + 1], False)
      if not (full.startswith(through) and through.startswith(before)):
        raise TemplateError(f'the chat template renders message {k} differently once later messages follow '
                            '(the reply cannot be found in the conversation)')
      spans.append((len(before), len(through)))
    ids, offsets = self.tokenizer.encode_with_offsets(full)
    trained = [int(any(a <= start < b for a, b in spans)) for start, _ in offsets]
    return ids, trained

  def prompt(self, messages) -> list[int]:
    """The ids that ask the model for its next reply (add_generation_prompt=True)."""
    return self.tokenizer.encode(self.text(messages, True))

  def _find_stop_ids(self) -> tuple[int, ...]:
    """The ids that end a reply: the special token the template writes right after a reply's content
    (<|eot_id|>, <|im_end|>, <end_of_turn>...), and EOS."""
    found = []
    probe = 'llm-jax probe reply'
    roles = self.roles
    try:
      text = self.text([(roles[-2], 'hello'), (roles[-1], probe)], False)
    except TemplateError:
      text = ''
    at = text.rfind(probe)
    if at >= 0:
      after = self.tokenizer.encode(text[at + len(probe):])
      if after and self.tokenizer.is_special(after[0]):
        found.append(after[0])
    if self.tokenizer.eos_id >= 0 and self.tokenizer.eos_id not in found:
      found.append(self.tokenizer.eos_id)
    return tuple(found)
