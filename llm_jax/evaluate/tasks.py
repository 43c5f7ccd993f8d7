"""Multiple-choice log-likelihood tasks in the lm-evaluation-harness style.

A task file is JSONL, one item a line: {"context": "...", "choices": ["...", ...], "gold": i}. Each choice is
scored by the log-likelihood of its tokens after the context; `accuracy` counts items whose gold choice
scores highest, `accuracy_norm` the same with each score divided by the choice's length in characters
(the harness's `acc_norm`, which removes the bias towards short choices).

Tokenisation follows the harness: the context and choice are encoded together and the choice's tokens are
what follows the context's own encoding, with trailing spaces of the context moved into the choice, so a
tokenizer that merges a space into the next word scores the word as it would be written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from llm_jax.errors import UserError


@dataclass
class Item:
  context: str
  choices: list[str]
  gold: int


def read(path: str) -> list[Item]:
  try:
    with open(path, encoding='utf-8') as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise UserError(f'cannot read --task={path}: {e.strerror}') from None
  except UnicodeDecodeError:
    raise UserError(f'--task={path} is not UTF-8 text') from None
  items = []
  for lineno, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f'{path}:{lineno}'
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f'{where}: not valid JSON ({e.msg})') from None
    if not isinstance(rec, dict) or not isinstance(rec.get('context'), str):
      raise UserError(f'{where}: expected an object with a string "context"')
    choices = rec.get('choices')
    if not (isinstance(choices, list) and choices and all(isinstance(c, str) and c for c in choices)):
      raise UserError(f'{where}: "choices" must be a non-empty list of non-empty strings')
    gold = rec.get('gold')
    if not (isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(choices)):
      raise UserError(f'{where}: "gold" must be an index into "choices" (0 to {len(choices) - 1}), got {gold!r}')
    items.append(Item(rec['context'], choices, gold))
  if not items:
    raise UserError(f'--task={path} holds no items')
  return items


def encode_pair(tokenizer, context: str, choice: str, bos: list[int]) -> tuple[list[int], list[int]]:
  """(context ids with BOS, choice ids) as the harness splits them."""
  spaces = len(context) - len(context.rstrip(' '))
  if spaces:
    context, choice = context[:-spaces], context[-spaces:] + choice
  context_ids = tokenizer.encode(context)
  whole = tokenizer.encode(context + choice)
  if whole[:len(context_ids)] == context_ids and len(whole) > len(context_ids):
    choice_ids = whole[len(context_ids):]
  else:  # the tokenizer merged across the boundary: score the choice encoded alone
    choice_ids = tokenizer.encode(choice)
  return bos + context_ids, choice_ids


def score_choices(run, items: list[Item], batch_size: int, progress=None) -> tuple[list[list[float]], int]:
  """(the log-likelihood of each item's choices after its context, how many choices had a first token that
  could not be scored). Scored by Run.score, the Python API's own: a choice's tokens from the model's
  prediction after the token before each; with an empty context and no BOS (data.add_bos false) its first
  token has none, so it is left out of the sum and counted, as the output says."""
  bos = [run.tokenizer.bos_id] if run.cfg.data.add_bos else []
  unscored = 0
  for n, item in enumerate(items):
    for choice in item.choices:
      context_ids, choice_ids = encode_pair(run.tokenizer, item.context, choice, bos)
      if not context_ids:
        unscored += 1
        if len(choice_ids) < 2:
          raise UserError(f'task item {n + 1}: the choice {choice!r} is one token after an empty context and the '
                          'run adds no BOS (data.add_bos=false): no token of it has a predecessor to be scored '
                          'after; give the item a context')
  try:
    scores = iter(run.score([(item.context, c) for item in items for c in item.choices], batch_size=batch_size,
                            progress=progress))
  except UserError as e:
    raise UserError(f'task: {e}') from None
  return [[next(scores) for _ in item.choices] for item in items], unscored


def choice_logliks(run, items: list[Item], batch_size: int, progress=None) -> list[list[float]]:
  """The log-likelihood of each item's choices after its context (score_choices)."""
  return score_choices(run, items, batch_size, progress)[0]


def evaluate(run, items: list[Item], batch_size: int, progress=None) -> dict:
  """Accuracy and length-normalised accuracy of `items` with the run's latest params."""
  correct = correct_norm = 0
  logliks, unscored = score_choices(run, items, batch_size, progress)
  for item, lls in zip(items, logliks):
    norm = [ll / len(c) for ll, c in zip(lls, item.choices)]
    correct += int(max(range(len(lls)), key=lls.__getitem__) == item.gold)
    correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == item.gold)
  return {'items': len(items), 'accuracy': correct / len(items), 'accuracy_norm': correct_norm / len(items),
          'choices_scored': sum(len(i.choices) for i in items), 'choices_first_token_unscored': unscored}
