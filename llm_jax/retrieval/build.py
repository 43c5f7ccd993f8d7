"""Building and extending an index: documents from any data source the pipeline reads, cut into passages,
embedded in batches, written as the index's next generation (index.py)."""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from llm_jax.errors import UserError
from llm_jax.retrieval import embeddings, index as index_lib, passages as passages_lib


def check_new_output(path: str) -> None:
  """A new index goes to a new (or empty) directory; an existing index is extended with --append only."""
  if not os.path.exists(path):
    return
  if not os.path.isdir(path):
    raise UserError(f'--output={path} exists and is not a directory')
  if os.path.isfile(os.path.join(path, index_lib.MANIFEST)):
    raise UserError(f'--output={path} is an index already: add documents to it with --append, or choose a new '
                    'directory')
  if os.listdir(path):
    raise UserError(f'--output={path} exists and is not empty; choose a new directory')


def data_config(source: str, text_field: str, txt_mode: str):
  """The data section that reads `source` whole: every document (none held out), none cut in pieces (so
  passages keep their places in the files)."""
  from llm_jax import config as config_lib
  d = config_lib.default_config().data
  d.source, d.text_field, d.txt_mode = source, text_field, txt_mode
  d.heldout_percent = 0
  d.max_doc_chars = 1 << 62
  d.objective = 'mlm'
  return d


def read_documents(source: str, text_field: str = 'text', txt_mode: str = 'file', say=print):
  """(name, text) of every readable document of `source`; bad records are counted and said once."""
  from llm_jax.data import sources
  from llm_jax.data.files import Record, Skipped
  # Whole documents, in their files' places: not cut into pieces for data shards, not split for held-out.
  docs = sources.open_whole(data_config(source, text_field, txt_mode), source, '--data')
  out, skipped = [], []
  for i in range(len(docs)):
    text = sources.doc_text(docs, i)
    if isinstance(text, Record):
      text = text.text()
    if isinstance(text, Skipped):
      if not text.silent:
        skipped.append(text)
      continue
    if not isinstance(text, str):  # pre-tokenized records of a prepared dataset carry no text
      continue
    name = docs.name(i) if hasattr(docs, 'name') else f'{source}#{i}'
    out.append((name, text))
  if not out:
    first = f' ({skipped[0].message()})' if skipped else ''
    raise UserError(f'--data={source} holds no text documents{first}')
  if skipped:
    say(f'left out {len(skipped)} unreadable document(s), first: {skipped[0].message()}')
  return out


DEFAULT_PASSAGE_TOKENS, DEFAULT_OVERLAP = 128, 32


def build(run, source: str, output: str, passage_tokens: int | None = None, overlap: int | None = None,
          append: bool = False,
          text_field: str = 'text', txt_mode: str = 'file', say=print,
          progress: Callable[[int], Callable[[int], None]] | None = None) -> dict:
  """Index the documents of `source` with the encoder `run` into `output` (new, or extended with `append`);
  `progress(total)` gives the callback told how many passages each batch embedded. Passage sizes left None
  are the index's own (appending) or the defaults. Returns a summary."""
  embedder = embeddings.embedder(run)
  old = None
  if append:
    old = index_lib.load(output, '--output')
    index_lib.check_embedder(old, run)
    own = (old.meta['passage_tokens'], old.meta['overlap'])
    if (passage_tokens, overlap) != (None, None) and (passage_tokens, overlap) != own:
      say(f'note: the index cuts passages of {own[0]} tokens overlapping by {own[1]}; the new documents are cut '
          'the same way')
    passage_tokens, overlap = own
  else:
    check_new_output(output)
    if passage_tokens is None:
      passage_tokens = min(DEFAULT_PASSAGE_TOKENS, embedder.room)
    if overlap is None:
      overlap = min(DEFAULT_OVERLAP, passage_tokens // 4)
  passages_lib.check_sizes(passage_tokens, overlap, embedder.room)
  documents = read_documents(source, text_field, txt_mode, say)
  known = {p.source for p in old.passages} if old else set()
  fresh = [(name, text) for name, text in documents if name not in known]
  if old and len(fresh) < len(documents):
    say(f'{len(documents) - len(fresh)} document(s) of --data are in the index already: left as they are')
  new_passages, rows = [], []
  for name, text in fresh:
    for passage, ids in passages_lib.cut(run.tokenizer, name, text, passage_tokens, overlap):
      new_passages.append(passage)
      rows.append(embedder.wrap(ids))
  vectors = embedder.embed_ids(rows, progress(len(rows)) if progress else None) if rows else np.zeros(
      (0, embedder.dim), np.float32)
  record = index_lib.embedder_record(run, embedder)
  if old:
    meta = dict(old.meta, sources=old.meta.get('sources', []) + [source])
    all_vectors = np.concatenate([old.vectors, vectors]) if len(vectors) else old.vectors
    all_passages = old.passages + new_passages
  else:
    meta = {'embedder': record, 'passage_tokens': passage_tokens, 'overlap': overlap, 'sources': [source]}
    all_vectors, all_passages = vectors, new_passages
  if not all_passages:
    raise UserError(f'--data={source}: no passages to index (documents of whitespace only?)')
  index_lib.write(output, meta, all_vectors, all_passages)
  return {'documents': len(fresh), 'passages': len(new_passages), 'total': len(all_passages),
          'dim': embedder.dim, 'output': output}
