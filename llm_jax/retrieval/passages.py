"""Documents cut into passages for an index: windows of the embedder's tokens that overlap, each keeping where it
came from (the document's name, its character span and its lines).

A window is `size` tokens and the next starts `size - overlap` tokens later, so a sentence cut at one window's
end is whole at the next one's start; the last window ends at the document's end and is moved back to be whole
(it overlaps its neighbour more) rather than a short tail. The passage's text is the document's own characters
from its first token's start to its last token's end (not the tokens decoded: a lowercasing tokenizer would
lose the case), and its vector is computed from the window's ids.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Iterator

from llm_jax.errors import UserError


@dataclasses.dataclass
class Passage:
  source: str  # the document's name: a file path (with `:line` for a .jsonl record), or a built-in name
  start: int  # character span in the document
  end: int
  line: int  # its first and last lines (1-based)
  end_line: int
  text: str

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict, where: str) -> 'Passage':
    try:
      return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})
    except (KeyError, TypeError):
      raise UserError(f'{where}: not a passage record (needs {", ".join(f.name for f in dataclasses.fields(cls))})'
                      ) from None

  @property
  def where(self) -> str:
    """`source, lines a-b`: how a prompt names it."""
    lines = f'line {self.line}' if self.line == self.end_line else f'lines {self.line}-{self.end_line}'
    return f'{self.source}, {lines}'


def check_sizes(size: int, overlap: int, room: int) -> None:
  if size < 1:
    raise UserError(f'--passage_tokens={size}: expected a positive integer')
  if size > room:
    raise UserError(f'--passage_tokens={size}: the embedder reads {room} tokens of text per input')
  if not 0 <= overlap < size:
    raise UserError(f'--overlap={overlap}: expected 0 to {size - 1} (less than --passage_tokens)')


def token_spans(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
  ids, offsets = tokenizer.encode_with_offsets(text)
  return list(ids), [(int(a), int(b)) for a, b in offsets]


def cut(tokenizer, source: str, text: str, size: int, overlap: int) -> Iterator[tuple[Passage, list[int]]]:
  """(passage, its token ids) of each window of `text`."""
  ids, spans = token_spans(tokenizer, text)
  if not ids:
    return
  stride = size - overlap
  line_starts = [0] + [i + 1 for i, c in enumerate(text) if c == '\n']
  start = 0
  while True:
    end = min(start + size, len(ids))
    lo = spans[start][0]
    hi = max(b for _, b in spans[start:end])
    if text[lo:hi].strip():
      yield Passage(source, lo, hi, _line(line_starts, lo), _line(line_starts, max(lo, hi - 1)),
                    text[lo:hi]), ids[start:end]
    if end == len(ids):
      return
    start = min(start + stride, max(len(ids) - size, 0))


def _line(line_starts: list[int], at: int) -> int:
  return bisect.bisect_right(line_starts, at)
