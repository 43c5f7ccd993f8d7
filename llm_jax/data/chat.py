"""The chat template and the objectives that read conversations: supervised fine-tuning (SFT) and preference
pairs (DPO). They read whole JSONL records (files.Record) instead of one text field.

The template. A conversation is rendered as

    [BOS] <|role|> content <|end|> <|role|> content <|end|> ...

where each `<|role|>` of `data.chat_roles` and `<|end|>` are *marker ids* appended after the tokenizer's
pieces: role i is `pieces + i`, `<|end|>` is `pieces + len(roles)` (config.reserved_ids counts them). They
are never produced by encoding text, so no user text can forge a turn, and sentencepiece models need no
surgery: a pretrained model whose table has no rows for them grows it when fine-tuning starts (run/finetune.py),
and the new run's config.json records the roles, so eval, generate and chat read them back. `decode` drops
ids past the pieces, so markers never show in text.

The last role is the model's voice: its content and the `<|end|>` that closes it are the only targets with a
loss (the model learns to stop), everything else is context. `{"prompt", "response"}` is the conversation
[(roles[-2], prompt), (roles[-1], response)].

Bad records become `Skipped` (file:line and why), counted and reported by the pipeline; a conversation longer
than a row is skipped too (cutting it would train on a reply without its question).

A run whose tokenizer carries its own chat template (tokenizer_config.json's `chat_template`, as Llama 3,
Qwen, Mistral and Gemma instruct checkpoints do) renders with that instead (chat_template.py): same roles, same
trained tokens (the reply role's, through its end marker), no marker ids. `template_for` picks.
"""

from __future__ import annotations

import numpy as np

from llm_jax.data.chat_template import JinjaTemplate, TemplateError
from llm_jax.data.files import Record, Skipped
from llm_jax.data.objectives import Stream


class Template:
  """Rendering messages to ids, for training (with the trained-token flags) and for chat prompts."""

  builtin = True

  def __init__(self, tokenizer, roles, add_bos: bool):
    self.tokenizer, self.roles, self.add_bos = tokenizer, tuple(roles), add_bos
    self.base = tokenizer.vocab_size
    self.end_id = self.base + len(self.roles)
    self.stop_ids = (self.end_id,)  # what ends a reply

  def marker(self, role: str) -> int:
    return self.base + self.roles.index(role)

  @property
  def reply_role(self) -> str:
    return self.roles[-1]

  def render(self, messages) -> tuple[list[int], list[int]]:
    """(ids, trained): trained[i] is 1 where ids[i] is the reply role's content or its closing <|end|>."""
    ids = [self.tokenizer.bos_id] if self.add_bos else []
    trained = [0] * len(ids)
    for role, content in messages:
      body = self.tokenizer.encode(content)
      flag = int(role == self.reply_role)
      ids += [self.marker(role)] + body + [self.end_id]
      trained += [0] + [flag] * (len(body) + 1)
    return ids, trained

  def prompt(self, messages) -> list[int]:
    """The ids that ask the model for its next reply: the conversation, then the reply role's marker."""
    return self.render(messages)[0] + [self.marker(self.reply_role)]


def _string(record: Record, key: str):
  value = record.fields.get(key)
  if not isinstance(value, str):
    what = 'missing' if value is None else f'a {type(value).__name__}, expected a string'
    return Skipped(record.where, 'missing_field', f'field {key!r} is {what}')
  return value


def messages_of(record: Record, roles) -> list[tuple[str, str]] | Skipped:
  """The conversation of an SFT record: {"messages": [{"role", "content"}, ...]} or {"prompt", "response"}."""
  f = record.fields
  if 'messages' in f:
    msgs = f['messages']
    if not isinstance(msgs, list) or not msgs:
      return Skipped(record.where, 'missing_field', "field 'messages' is not a non-empty list")
    out = []
    for i, m in enumerate(msgs):
      if not (isinstance(m, dict) and isinstance(m.get('role'), str) and isinstance(m.get('content'), str)):
        return Skipped(record.where, 'missing_field', f'message {i} is not {{"role": str, "content": str}}')
      if m['role'] not in roles:
        return Skipped(record.where, 'unknown_role',
                       f'message {i} has role {m["role"]!r}, not one of data.chat_roles={tuple(roles)}')
      out.append((m['role'], m['content']))
    if not any(r == roles[-1] and c.strip() for r, c in out):
      return Skipped(record.where, 'empty_response', f'no non-empty {roles[-1]!r} message to train on')
    return out
  if 'prompt' not in f and 'response' not in f:
    return Skipped(record.where, 'missing_field',
                   "record has neither 'messages' nor 'prompt' and 'response'")
  prompt, response = _string(record, 'prompt'), _string(record, 'response')
  for value in (prompt, response):
    if isinstance(value, Skipped):
      return value
  if not response.strip():
    return Skipped(record.where, 'empty_response', "field 'response' is empty")
  return [(roles[-2], prompt), (roles[-1], response)]


def _shifted(ids, trained, prefix: str = '') -> dict[str, np.ndarray]:
  ids = np.asarray(ids, np.int32)
  return {f'{prefix}inputs': ids[:-1], f'{prefix}targets': ids[1:],
          f'{prefix}loss_mask': np.asarray(trained[1:], np.int32)}


def _too_long(record: Record, n: int, seq_len: int) -> Skipped:
  return Skipped(record.where, 'too_long', f'conversation of {n} tokens does not fit data.seq_len={seq_len}')


class SFT:
  """Supervised fine-tuning: next-token prediction on the rendered conversation, loss on replies only.
  Conversations are never cut between rows (split=False)."""

  random = False
  reads_records = True

  def __init__(self, template: Template, seq_len: int):
    self.template, self.seq_len = template, seq_len

  def streams(self, seq_len: int) -> tuple[Stream, ...]:
    return sft_streams(seq_len)

  def __call__(self, ids, rng=None):
    raise TypeError('SFT reads records, not text')  # Featurize hands it Records only

  def from_record(self, record: Record):
    messages = messages_of(record, self.template.roles)
    if isinstance(messages, Skipped):
      return messages
    try:
      ids, trained = self.template.render(messages)
    except TemplateError as e:
      return Skipped(record.where, 'template', str(e))
    if len(ids) - 1 > self.seq_len:
      return _too_long(record, len(ids), self.seq_len)
    return _shifted(ids, trained)


class DPO:
  """Preference pairs {"prompt", "chosen", "rejected"}: two aligned streams, `inputs...` for the chosen
  conversation and `rejected_inputs...` for the rejected one. The packer gives both halves of a pair the
  same segment id in their rows, which is how the loss finds the pairs (train/dpo.py)."""

  random = False
  reads_records = True

  def __init__(self, template: Template, seq_len: int):
    self.template, self.seq_len = template, seq_len

  def streams(self, seq_len: int) -> tuple[Stream, ...]:
    return dpo_streams(seq_len)

  def __call__(self, ids, rng=None):
    raise TypeError('DPO reads records, not text')

  def from_record(self, record: Record):
    values = [_string(record, k) for k in ('prompt', 'chosen', 'rejected')]
    for v in values:
      if isinstance(v, Skipped):
        return v
    prompt, chosen, rejected = values
    if not chosen.strip() or not rejected.strip():
      return Skipped(record.where, 'empty_response', "field 'chosen' or 'rejected' is empty")
    roles = self.template.roles
    out = {}
    for prefix, reply in (('', chosen), ('rejected_', rejected)):
      try:
        ids, trained = self.template.render([(roles[-2], prompt), (roles[-1], reply)])
      except TemplateError as e:
        return Skipped(record.where, 'template', str(e))
      if len(ids) - 1 > self.seq_len:
        return _too_long(record, len(ids), self.seq_len)
      out.update(_shifted(ids, trained, prefix))
    return out


def sft_streams(seq_len: int) -> tuple[Stream, ...]:
  return (Stream(('inputs', 'targets', 'loss_mask'), seq_len, split=False),)


def dpo_streams(seq_len: int) -> tuple[Stream, ...]:
  return (Stream(('inputs', 'targets', 'loss_mask'), seq_len, split=False),
          Stream(('rejected_inputs', 'rejected_targets', 'rejected_loss_mask'), seq_len, 'rejected_',
                 split=False))


def template_for(data_cfg, tokenizer):
  """The tokenizer's own chat template when it has one; else the built-in template for a run fine-tuned
  with it (data.objective sft / dpo); else None."""
  if tokenizer.chat_template:
    return JinjaTemplate(tokenizer, data_cfg.chat_roles, tokenizer.chat_template)
  from llm_jax.config import CHAT_OBJECTIVES
  if data_cfg.objective in CHAT_OBJECTIVES:
    return Template(tokenizer, data_cfg.chat_roles, data_cfg.add_bos)
  return None


def for_config(data_cfg, tokenizer):
  template = template_for(data_cfg, tokenizer)
  cls = DPO if data_cfg.objective == 'dpo' else SFT
  return cls(template, data_cfg.seq_len)
