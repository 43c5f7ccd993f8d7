"""Retrieved context: the passages of an index nearest to a prompt (or a conversation's last user turn),
put in front of it with a plain template that names each passage's source:

    Context:
    [1] docs/setup.md, lines 12-30
    <the passage's text>

    [2] src/server.py, lines 101-140
    <the passage's text>

    <the prompt>

The passages go in best first while the whole prompt fits its budget (the context less the new tokens);
the first one that does not fit whole is cut to the room left (if at least a quarter of it fits) and the
rest are left out. A prompt that does not fit alone gets no passages (and the usual error about its length).
`generate --jsonl`, and the server's responses, list the passages used: rank, score, source, lines,
character span, text, and whether it was cut.
"""

from __future__ import annotations

from typing import Callable, Sequence

from llm_jax.errors import UserError
from llm_jax.retrieval import embeddings, index as index_lib
from llm_jax.retrieval.passages import Passage

HEADER = 'Context:\n'
DEFAULT_K = 4


def render(chosen: Sequence[tuple[Passage, str]], prompt: str) -> str:
  """The template: each passage (with the text shown, maybe cut) numbered and named, then the prompt."""
  if not chosen:
    return prompt
  parts = [f'[{i}] {p.where}\n{text.strip()}\n' for i, (p, text) in enumerate(chosen, 1)]
  return HEADER + '\n'.join(parts) + '\n' + prompt


class Retriever:
  """An index, its embedder (loaded from the work directory the index records) and the device search."""

  def __init__(self, path: str, k: int = DEFAULT_K, flag: str = '--retrieve'):
    if k < 1:
      raise UserError(f'{flag}_k={k}: expected a positive integer')
    import os
    from llm_jax.infer import inference
    from llm_jax.run import workdir as workdir_lib
    self.index = index_lib.load(path, flag)
    self.k = k
    where = self.index.embedder.get('workdir', '')
    if not os.path.isdir(where):
      raise UserError(f'{flag}={path}: its embedder {where} does not exist any more (moved? build the index '
                      'again with `llm-jax index --embedder=...`)')
    from llm_jax import models
    models.require_family(workdir_lib.load_config(where), 'embed', 'embeds')
    self.run = inference.load_run(where)
    index_lib.check_embedder(self.index, self.run, flag)
    self.embedder = embeddings.embedder(self.run)
    self.searcher = index_lib.Searcher(self.index.vectors, self.run.mesh)

  def search(self, queries: Sequence[str]) -> list[list[tuple[float, Passage]]]:
    """The k best passages of each query, best first."""
    scores, ids = self.searcher.search(self.embedder(list(queries)), self.k)
    return [[(float(s), self.index.passages[int(i)]) for s, i in zip(row_s, row_i)]
            for row_s, row_i in zip(scores, ids)]


def choose(hits: Sequence[tuple[float, Passage]], prompt: str, count: Callable[[str], int],
           budget: int) -> tuple[str, list[dict]]:
  """(the prompt with the passages that fit, records of those passages). `count(text)` is the number of
  tokens the model's prompt would have with `text` as the prompt; it must stay within `budget`."""
  if count(prompt) > budget:
    return prompt, []
  chosen: list[tuple[Passage, str]] = []
  used = []
  for rank, (score, p) in enumerate(hits, 1):
    text, cut = p.text, False
    if count(render(chosen + [(p, text)], prompt)) > budget:
      n = _longest_prefix(p.text, lambda t: count(render(chosen + [(p, t)], prompt)) <= budget)
      if n < max(1, len(p.text) // 4):
        break
      text, cut = p.text[:n], True
    chosen.append((p, text))
    used.append({'rank': rank, 'score': round(score, 6), 'source': p.source, 'line': p.line,
                 'end_line': p.end_line, 'start': p.start, 'end': p.start + len(text), 'text': text,
                 'truncated': cut})
    if cut:
      break
  return render(chosen, prompt), used


def _longest_prefix(text: str, fits: Callable[[str], bool]) -> int:
  lo, hi = 0, len(text)  # fits(text[:lo]) holds (or lo is 0); the answer is in [lo, hi)
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if fits(text[:mid]):
      lo = mid
    else:
      hi = mid - 1
  return lo


def prompt_counter(run) -> Callable[[str], int]:
  """Tokens of `text` as generate's prompt: BOS if the run adds it; an encoder-decoder's EOS."""
  extra = 1 if run.cfg.model.family == 'encdec' or run.cfg.data.add_bos else 0
  return lambda text: extra + len(run.encode(text))


def prompt_budget(run, max_new_tokens: int) -> int:
  if run.cfg.model.family == 'encdec':
    return run.cfg.data.seq_len
  return run.context_len - max_new_tokens


def augment(retriever: Retriever, run, prompts: Sequence[str], max_new_tokens: int) -> list[tuple[str, list[dict]]]:
  """Each prompt with its passages (generate): (augmented prompt, passages used)."""
  count = prompt_counter(run)
  budget = prompt_budget(run, max_new_tokens)
  hits = retriever.search(prompts)
  return [choose(h, p, count, budget) for h, p in zip(hits, prompts)]


def augment_messages(retriever: Retriever, messages: list[tuple[str, str]], user_role: str,
                     count: Callable[[list[tuple[str, str]]], int], budget: int) -> tuple[list, list[dict]]:
  """A conversation with passages for its last user turn put into that turn (chat and the server):
  (messages, passages used). `count(messages)` is the rendered conversation's length in tokens."""
  last = max((i for i, (role, _) in enumerate(messages) if role == user_role), default=None)
  if last is None or not messages[last][1].strip():
    return messages, []
  role, content = messages[last]
  hits = retriever.search([content])[0]

  def with_text(text: str) -> list:
    return messages[:last] + [(role, text)] + messages[last + 1:]

  text, used = choose(hits, content, lambda t: count(with_text(t)), budget)
  return with_text(text), used


def sources_line(used: list[dict]) -> str:
  return '; '.join(f'[{u["rank"]}] {u["source"]}, lines {u["line"]}-{u["end_line"]}' + (' (cut)' if u['truncated']
                                                                                          else '') for u in used)


def augment_request(retriever: Retriever, run, body: dict, chat: bool, max_tokens: int | None,
                    template=None) -> tuple[dict, list[list[dict]]]:
  """An OpenAI request body (already checked by openai_api.parse) with passages in its prompts or its last
  user message: (body, passages used per prompt). Prompts given as token ids get none. A chat request that
  leaves the reply's length open keeps a quarter of the context (at most 256 tokens) for it."""
  from llm_jax.serve import openai_api
  reply = max_tokens if max_tokens is not None else min(256, run.context_len // 4)
  budget = run.context_len - max(reply, 1)
  if chat:
    pairs = openai_api.chat_messages(body['messages'])
    user = template.roles[-2] if template is not None else 'user'

    def count(m: list) -> int:
      if template is not None:
        return len(template.prompt(m))
      return prompt_counter(run)(openai_api.render_chat([{'role': r, 'content': c} for r, c in m]))
    pairs, used = augment_messages(retriever, pairs, user, count, budget)
    messages = [dict(m, content=c) for m, (_, c) in zip(body['messages'], pairs)]
    return dict(body, messages=messages), [used]
  prompt = body['prompt']
  prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
  texts = [p for p in prompts if isinstance(p, str)]
  done = iter(augment(retriever, run, texts, max(reply, 1)) if texts else [])
  out, used = [], []
  for p in prompts:
    text, u = next(done) if isinstance(p, str) else (p, [])
    out.append(text)
    used.append(u)
  single = isinstance(prompt, str) or (prompt and isinstance(prompt[0], int))
  return dict(body, prompt=out[0] if single else out), used
