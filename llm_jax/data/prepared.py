"""`llm-jax prepare`: a source's documents, tokenized once, written as a TFDS dataset in ArrayRecord format.

The dataset (a `tfds.core.GeneratorBasedBuilder`, no TensorFlow needed) has the splits `train` and
`heldout` of the source, and one example per document: `text` (the original text) and `ids` (its token
ids, uint16 when the vocabulary allows, stored as raw bytes so that reading is a copy, not a parse). The
tokenizer is saved beside it (tfds_source.TOKENIZER_FILE): training from `tfds:DIR` then reads ids and
never tokenizes, and refuses a different tokenizer.
"""

from __future__ import annotations

import multiprocessing
import os
import sys

import numpy as np

from llm_jax.data import sources, tfds_source
from llm_jax.data.files import Skipped
from llm_jax.errors import UserError

VERSION = '1.0.0'
_TOKENIZE = None  # in a worker process: (documents by split, tokenizer)


def _init_worker(docs_by_split, tokenizer) -> None:
  global _TOKENIZE
  _TOKENIZE = (docs_by_split, tokenizer)


def _tokenize(job):
  split, i = job
  docs_by_split, tokenizer = _TOKENIZE
  docs = docs_by_split[split]
  text = sources.doc_text(docs, i)
  if isinstance(text, Skipped):
    return docs.name(i), text, None
  return docs.name(i), text, tokenizer.encode_array(text)


def _examples(docs_by_split, tokenizer, split: str, workers: int, dtype, stats: dict, on_progress):
  jobs = [(split, i) for i in range(len(docs_by_split[split]))]
  if workers > 0:
    ctx = multiprocessing.get_context('spawn')
    with ctx.Pool(workers, initializer=_init_worker, initargs=(docs_by_split, tokenizer)) as pool:
      # In order (imap): the dataset is the same whatever the worker count; chunks amortize the hand-over.
      yield from _to_examples(pool.imap(_tokenize, jobs, chunksize=16), dtype, stats, on_progress)
  else:
    _init_worker(docs_by_split, tokenizer)
    yield from _to_examples(map(_tokenize, jobs), dtype, stats, on_progress)


def _to_examples(results, dtype, stats: dict, on_progress):
  for name, text, ids in results:
    stats['read'] += 1
    if isinstance(text, Skipped):
      if not text.silent:
        stats['skipped'] += 1
        if stats['skipped'] <= 3:
          print(f'llm-jax: warning: skipped {text.message()}', file=sys.stderr, flush=True)
      if on_progress is not None:
        on_progress(stats)
      continue
    stats['documents'] += 1
    stats['tokens'] += len(ids)
    stats['bytes'] += len(text.encode('utf-8'))
    if on_progress is not None:
      on_progress(stats)
    yield name, {'text': text, 'ids': ids.astype(dtype)}


def _builder_class(tfds, dataset_name: str, docs_by_split, tokenizer, workers: int, stats: dict, on_progress):
  dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32

  class Prepared(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = dataset_name
    VERSION = tfds.core.Version(VERSION)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          description='Documents and their token ids, written by `llm-jax prepare`.',
          features=tfds.features.FeaturesDict({
              'text': tfds.features.Text(),
              'ids': tfds.features.Tensor(shape=(None,), dtype=dtype,
                                          encoding=tfds.features.Encoding.BYTES),
          }),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split) for split in docs_by_split}

    def _generate_examples(self, split):
      return _examples(docs_by_split, tokenizer, split, workers, dtype, stats, on_progress)

  return Prepared


def prepare(data_cfg, tokenizer, output: str, name: str, on_progress=None) -> dict:
  """Write the prepared dataset under `output` (a TFDS data_dir); returns what was written.
  `on_progress(stats)` is called after each document: read, documents, skipped, tokens, bytes and total
  (documents of both splits, bad ones included)."""
  tfds = tfds_source._tfds()
  if data_cfg.mixture:
    raise UserError('prepare reads data.source; prepare each source of data.mixture on its own and mix '
                    'the prepared ones (tfds:DIR) in training')
  if data_cfg.source.startswith(sources.TFDS_PREFIX) and sources.prepared_tokenizers(data_cfg):
    raise UserError(f'data.source={data_cfg.source!r} is already prepared')
  target = os.path.join(output, name, VERSION)
  if os.path.exists(target):
    raise UserError(f'{target} already exists; choose another --output or --name, or remove it')
  docs_by_split = {split: sources.open_source(data_cfg, split) for split in sources.SPLITS}
  sources.require_texts(data_cfg, [(docs_by_split['train'], 1.0)])  # nothing written for a source without text
  stats = {'documents': 0, 'tokens': 0, 'skipped': 0, 'bytes': 0, 'read': 0,
           'total': sum(len(d) for d in docs_by_split.values())}
  builder_cls = _builder_class(tfds, name, docs_by_split, tokenizer, data_cfg.workers, stats, on_progress)
  builder = builder_cls(data_dir=output, file_format='array_record')
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  except OSError as e:
    raise UserError(f'cannot write to {output}: {e.strerror or e}') from None
  path = os.path.join(str(builder.data_dir), tfds_source.TOKENIZER_FILE)
  with open(path + '.tmp', 'wb') as f:
    f.write(tokenizer.serialized())
  os.replace(path + '.tmp', path)
  return {'path': str(builder.data_dir), **{k: v for k, v in stats.items() if k not in ('read', 'total')},
          'splits': {s: builder.info.splits[s].num_examples for s in docs_by_split}}
