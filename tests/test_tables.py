"""Parquet files and saved Hugging Face datasets as sources: split, sharded, shuffled by row group, resumed
exactly and mixed like text files. Every dataset here is made by the test (no download)."""

import json

import numpy as np
import pytest

from conftest import tiny_config
from llm_jax.data import pipeline, sources, tables
from llm_jax.data.files import Skipped
from llm_jax.data.mixture import EpochShuffle
from llm_jax.errors import UserError

pa = pytest.importorskip('pyarrow')
pq = pytest.importorskip('pyarrow.parquet')


def _doc(i: int) -> str:
  return f'def function_{i}(x):\n    return x * {i} + {i % 7}\n' * (1 + i % 5)


def _write_parquet(root, files=2, rows=120, group=10):
  root.mkdir()
  texts = []
  for f in range(files):
    column = [_doc(f * rows + i) for i in range(rows)]
    column[3] = None  # a null and an empty text: skipped, not fatal
    column[4] = ''
    texts += column
    table = pa.table({'id': list(range(rows)), 'content': column})
    pq.write_table(table, root / f'part-{f}.parquet', row_group_size=group)
  return texts


def _all(docs):
  return [docs[i] for i in range(len(docs))]


def test_parquet_rows_split_by_name_read_by_row_group(tmp_path):
  texts = _write_parquet(tmp_path / 'pq')
  cfg = tiny_config(('data.source', str(tmp_path / 'pq' / '*.parquet')), ('data.text_field', 'content'))
  train, heldout = sources.open_source(cfg.data, 'train'), sources.open_source(cfg.data, 'heldout')
  names = [train.name(i) for i in range(len(train))] + [heldout.name(i) for i in range(len(heldout))]
  assert len(train) + len(heldout) == len(texts) == len(set(names)) and 0 < len(heldout) < 30
  assert train.name(0) == f'{tmp_path / "pq" / "part-0.parquet"}:row group 0:row 0'
  got = sorted((t for t in _all(train) + _all(heldout) if isinstance(t, str)))
  assert got == sorted(t for t in texts if t)
  moved = tmp_path / 'elsewhere'  # the split is the same wherever the files lie
  moved.mkdir()
  for p in (tmp_path / 'pq').iterdir():
    (moved / p.name).write_bytes(p.read_bytes())
  cfg_moved = tiny_config(('data.source', str(moved / '*.parquet')), ('data.text_field', 'content'))
  assert _all(sources.open_source(cfg_moved.data, 'heldout')) == _all(heldout)
  skipped = [t for t in _all(train) + _all(heldout) if isinstance(t, Skipped)]
  assert sorted(s.kind for s in skipped) == ['empty', 'empty', 'missing_field', 'missing_field']
  # One document read decodes one row group (of its one column), never the file.
  base = tables.ParquetDocuments(sorted(str(p) for p in (tmp_path / 'pq').iterdir()), 'content', 'data.source')
  assert base[25] == texts[25] and list(base._cache) == [2] and len(base._cache[2]) == 10
  # A shard reads its documents row group by row group, each epoch in a new order, each document once.
  shuffle = EpochShuffle(base, 3, 8, seed=0)
  n = len(range(3, len(base), 8))
  for epoch in range(2):
    order = [shuffle._position(epoch, i) for i in range(n)]
    assert sorted(order) == list(range(n))
    groups = base.groups[3 + 8 * np.asarray(order)]
    assert np.count_nonzero(np.diff(groups)) == len(set(groups)) - 1
  assert [shuffle._position(0, i) for i in range(n)] != [shuffle._position(1, i) for i in range(n)]


def test_parquet_table_read_by_several_threads_at_once(tmp_path):
  """Shards on different reading threads (data/workers.py) share a table: its row-group cache, evicting as it
  goes (more groups than it keeps), must give every thread the right rows."""
  import concurrent.futures
  import pickle
  texts = _write_parquet(tmp_path / 'pq', files=2, rows=200, group=5)  # 80 row groups, 16 kept
  docs = tables.ParquetDocuments(sorted(str(p) for p in (tmp_path / 'pq').iterdir()), 'content', 'data.source')
  order = np.random.default_rng(0).permutation(np.tile(np.arange(len(docs)), 3))

  def read(part):
    return [(int(i), docs[int(i)]) for i in part]

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    results = [r for part in pool.map(read, np.array_split(order, 16)) for r in part]
  for i, got in results:
    assert got == texts[i] if texts[i] else isinstance(got, Skipped)
  copy = pickle.loads(pickle.dumps(docs))  # worker processes get their own readers, cache and lock
  assert copy[7] == texts[7] and copy._lock is not docs._lock


def test_parquet_trains_resumes_exactly_and_mixes(tmp_path, tokenizer):
  _write_parquet(tmp_path / 'pq')
  cfg = tiny_config(('data.source', str(tmp_path / 'pq' / '*.parquet')), ('data.text_field', 'content'))

  def run(processes, count, state=None):
    streams = [pipeline.TrainStream(cfg.data, tokenizer, seed=0, process_index=p, process_count=processes)
               for p in range(processes)]
    for s in streams:
      if state is not None:
        s.set_state(state)
    out = [np.concatenate([next(s)['inputs'] for s in streams]) for _ in range(count)]
    return out, pipeline.merge_states([s.local_state() for s in streams])

  uninterrupted, _ = run(1, 4)
  _, state = run(2, 2)
  resumed, _ = run(1, 2, state)
  for a, b in zip(uninterrupted[2:], resumed, strict=True):
    np.testing.assert_array_equal(a, b)
  (tmp_path / 'z.jsonl').write_text(''.join(json.dumps({'content': f'zzz {i} zzz'}) + '\n' for i in range(100)))
  mixed = tiny_config(('data.mixture', f"(('{tmp_path / 'pq' / '*.parquet'}', 0.5), ('{tmp_path / 'z.jsonl'}', 0.5))"),
                      ('data.text_field', 'content'))
  batch = next(pipeline.TrainStream(mixed.data, tokenizer, seed=0))
  zzz = tokenizer.encode('zzz')[0]
  assert 0 < np.mean(batch['inputs'] == zzz) < 0.5


def test_saved_hf_datasets_with_and_without_splits(tmp_path, tokenizer):
  datasets = pytest.importorskip('datasets')
  texts = [_doc(i) for i in range(100)]
  datasets.Dataset.from_dict({'text': texts, 'n': list(range(100))}).save_to_disk(str(tmp_path / 'one'))
  cfg = tiny_config(('data.source', f'hf:{tmp_path / "one"}'))
  train, heldout = sources.open_source(cfg.data, 'train'), sources.open_source(cfg.data, 'heldout')
  assert sorted(_all(train) + _all(heldout)) == sorted(texts) and 0 < len(heldout) < 20
  assert heldout.name(0).startswith(f'hf:{tmp_path / "one"}[')
  first = next(pipeline.TrainStream(cfg.data, tokenizer, seed=0))
  assert first['loss_mask'].all()

  datasets.DatasetDict({
      'train': datasets.Dataset.from_dict({'text': texts[:90]}),
      'validation': datasets.Dataset.from_dict({'text': texts[90:]}),
  }).save_to_disk(str(tmp_path / 'dict'))
  cfg = tiny_config(('data.source', f'hf:{tmp_path / "dict"}'))
  assert _all(sources.open_source(cfg.data, 'heldout')) == texts[90:]
  assert _all(sources.open_source(cfg.data, 'train')) == texts[:90]
  stream = pipeline.TrainStream(cfg.data, tokenizer, seed=0)
  next(stream)
  state = stream.get_state()
  want = next(stream)['inputs']
  again = pipeline.TrainStream(cfg.data, tokenizer, seed=0)
  again.set_state(state)
  np.testing.assert_array_equal(next(again)['inputs'], want)


def test_table_sources_with_few_rows_hold_out_the_tail_of_each(tmp_path):
  datasets = pytest.importorskip('datasets')
  text = _doc(3) * 40
  datasets.Dataset.from_dict({'text': [text]}).save_to_disk(str(tmp_path / 'tiny'))
  cfg = tiny_config(('data.source', f'hf:{tmp_path / "tiny"}'))
  [head] = _all(sources.open_source(cfg.data, 'train'))
  [tail] = _all(sources.open_source(cfg.data, 'heldout'))
  assert head + tail == text and len(tail) == -(-len(text) * 5 // 100)


@pytest.mark.parametrize('spec,needle', [
    ('pq/*.parquet', "has no column 'text' (config key data.text_field; it has id, content)"),
    ('hf:missing', 'the directory does not exist'),
    ('mixed/*', 'matches Parquet and other files'),
])
def test_bad_table_sources_are_one_line(tmp_path, spec, needle):
  _write_parquet(tmp_path / 'pq')
  (tmp_path / 'mixed').mkdir()
  (tmp_path / 'mixed' / 'a.parquet').write_bytes((tmp_path / 'pq' / 'part-0.parquet').read_bytes())
  (tmp_path / 'mixed' / 'b.txt').write_text('text\n')
  cfg = tiny_config(('data.source', spec.replace('pq/', f'{tmp_path}/pq/').replace('hf:', f'hf:{tmp_path}/')
                     .replace('mixed/', f'{tmp_path}/mixed/')))
  with pytest.raises(UserError, match=needle.replace('(', r'\(').replace(')', r'\)')):
    sources.open_source(cfg.data, 'train')


def test_file_and_parquet_sources_at_urls(tmp_path, tokenizer):
  """fsspec's in-memory store stands in for gs:// (the same calls: glob, size, ranged reads)."""
  fsspec = pytest.importorskip('fsspec')
  root = f'memory://bucket-{tmp_path.name}'
  texts = [_doc(i) * 30 for i in range(3)]
  for i, text in enumerate(texts):
    with fsspec.open(f'{root}/corpus/doc{i}.txt', 'wb') as f:
      f.write(text.encode())
  local = tmp_path / 'local'
  local.mkdir()
  for i, text in enumerate(texts):
    (local / f'doc{i}.txt').write_text(text)
  remote_cfg = tiny_config(('data.source', f'{root}/corpus/*.txt'))
  local_cfg = tiny_config(('data.source', str(local / '*.txt')))
  for split in ('train', 'heldout'):
    docs = sources.open_source(remote_cfg.data, split)
    assert _all(docs) == _all(sources.open_source(local_cfg.data, split))
    assert docs.name(0).startswith('memory://') and '/corpus/doc0.txt' in docs.name(0)
  np.testing.assert_array_equal(next(pipeline.TrainStream(remote_cfg.data, tokenizer, seed=0))['inputs'],
                                next(pipeline.TrainStream(local_cfg.data, tokenizer, seed=0))['inputs'])
  with pytest.raises(UserError, match='the glob matches no files'):
    sources.open_source(tiny_config(('data.source', f'{root}/nothing/*.txt')).data, 'train')

  _write_parquet(tmp_path / 'pq')
  for name in ('part-0.parquet', 'part-1.parquet'):
    with fsspec.open(f'{root}/pq/{name}', 'wb') as f:
      f.write((tmp_path / 'pq' / name).read_bytes())
  cfg = tiny_config(('data.source', f'{root}/pq/*.parquet'), ('data.text_field', 'content'))
  here = tiny_config(('data.source', str(tmp_path / 'pq' / '*.parquet')), ('data.text_field', 'content'))
  every = lambda c: sorted(t for split in ('train', 'heldout')  # noqa: E731
                           for t in _all(sources.open_source(c.data, split)) if isinstance(t, str))
  assert every(cfg) == every(here)  # the split hashes names, which differ: the rows are the same
