"""Which part of a file source's records is a split's documents, and how they are cut into pieces.

- By document, when the source has enough records for the held-out split to get several of them
  (EXPECTED_HELDOUT at data.heldout_percent) and both splits get at least one: a record is held out when a
  hash of its name says so, stable across machines, runs and process counts.
- By position otherwise (one big file, a handful of files): the last heldout_percent% of every record is
  held out and the rest trains, nanoGPT's split of one text, taken from every file so that a folder whose
  last file is unusable still has held-out text. It depends only on the records' sizes: stable too.
  Chat records are never cut: the last records are held out instead.

Records longer than data.max_doc_chars are cut into pieces of that size. A training split with fewer
than PIECES_PER_SHARD pieces per data shard is cut finer (pieces of at least MIN_PIECE), so that one big
file gives every shard work; a shard still left without documents reads the whole source (mixture.py).
"""

from __future__ import annotations

import hashlib

from llm_jax.data import files as files_lib
from llm_jax.data.files import Part

EXPECTED_HELDOUT = 4
PIECES_PER_SHARD = 4
MIN_PIECE = 1000


def in_heldout(name: str, heldout_percent: int) -> bool:
  digest = hashlib.sha256(name.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'little') % 100 < heldout_percent


def by_document(names: list[str], percent: int) -> bool:
  held = sum(in_heldout(n, percent) for n in names)
  return len(names) * percent >= EXPECTED_HELDOUT * 100 and 0 < held < len(names)


def plan(files, names, split: str, percent: int, max_doc_chars: int, shards: int = 0,
         whole_records: bool = False):
  """(rows for files.FileDocuments, the Part kept or None, whether the split is by document)."""
  records = files_lib.record_names(files, names)
  want_heldout = split == 'heldout'
  part = None
  doc_split = percent == 0 or by_document([n for _, _, n in records], percent)
  if doc_split:
    chosen = [(f, r) for f, r, n in records if in_heldout(n, percent) == want_heldout]
  elif whole_records:
    n = len(records)
    held = max(1, round(n * percent / 100)) if n >= 2 else 0
    chosen = [(f, r) for f, r, _ in (records[n - held:] if want_heldout else records[:n - held])]
  else:
    part = Part('tail' if want_heldout else 'head', percent)
    chosen = [(f, r) for f, r, _ in records]
  spans = files_lib.ranges(files, chosen, part)
  piece = files_lib._TO_END if whole_records else max_doc_chars
  if split == 'train' and shards and not whole_records:
    target = shards * PIECES_PER_SHARD
    if sum(max(1, -(-(hi - lo) // piece)) for _, _, lo, hi in spans) < target:
      total = sum(hi - lo for _, _, lo, hi in spans)
      piece = max(MIN_PIECE, min(piece, -(-total // target)))
  return files_lib.cut(files, spans, piece), part, doc_split
