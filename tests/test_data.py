"""The built-in corpus, the tokenizer and the packed, resumable input stream."""

import itertools
import re

import numpy as np
import pytest

from conftest import tiny_config
from llm_jax.data import pipeline, sources
from llm_jax.errors import UserError


def test_builtin_corpus_is_the_stdlib_without_tests_split_by_name():
  cfg = tiny_config()
  train = sources.open_source(cfg.data, 'train')
  heldout = sources.open_source(cfg.data, 'heldout')
  train_names = {train.name(i) for i in range(len(train))}
  heldout_names = {heldout.name(i) for i in range(len(heldout))}
  assert not train_names & heldout_names
  assert len(train) > 300 and 0.01 < len(heldout) / (len(train) + len(heldout)) < 0.12
  assert 'os.py' in train_names | heldout_names
  assert not any('/test/' in n or n.startswith(('test/', 'tests/')) for n in train_names | heldout_names)
  # The split depends only on the name: recomputing it gives the same answer.
  assert all(sources.in_heldout(n, cfg.data.heldout_percent) for n in heldout_names)


def test_tokenizer_round_trips_code_exactly(tokenizer):
  text = 'def f(x):\n    return {"a": x ** 2}  # ünïcödé\n\n\tpass\n'
  ids = tokenizer.encode(text)
  assert tokenizer.decode(ids) == text
  assert tokenizer.id_to_piece(tokenizer.encode('\n')[0]) == '\n'


def test_packed_rows_have_consistent_segments_positions_and_targets(tokenizer):
  cfg = tiny_config()
  stream = pipeline.TrainStream(cfg.data, tokenizer, seed=0)
  for batch in itertools.islice(stream, 5):
    B, T = batch['inputs'].shape
    assert (B, T) == (cfg.data.batch_size, cfg.data.seq_len)
    for b in range(B):
      seg, pos = batch['segment_ids'][b], batch['positions'][b]
      for t in range(1, T):
        if seg[t] == seg[t - 1] and seg[t] > 0:
          assert pos[t] == pos[t - 1] + 1
          # Within a document the target at t - 1 is the input at t: next-token prediction.
          assert batch['targets'][b, t - 1] == batch['inputs'][b, t]
        elif seg[t] > 0:
          assert pos[t] == 0
      assert np.all(batch['loss_mask'][b][seg == 0] == 0)


def test_data_stream_resumes_exactly(tokenizer):
  cfg = tiny_config()
  first = pipeline.TrainStream(cfg.data, tokenizer, seed=0)
  for _ in range(3):
    next(first)
  state = first.get_state()
  expected = [next(first) for _ in range(4)]
  resumed = pipeline.TrainStream(cfg.data, tokenizer, seed=0)
  resumed.set_state(state)
  for want, got in zip(expected, (next(resumed) for _ in range(4))):
    for k in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(want[k], got[k])
  other_seed = next(pipeline.TrainStream(cfg.data, tokenizer, seed=1))
  assert not np.array_equal(other_seed['inputs'], expected[0]['inputs'])


def test_processes_read_disjoint_documents(tokenizer):
  cfg = tiny_config()
  docs = sources.open_source(cfg.data, 'train')
  import grain
  shards = [set(grain.MapDataset.source(range(len(docs)))[i::2]) for i in range(2)]
  assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(len(docs)))


def test_eval_batches_pad_to_full_batches(tokenizer):
  cfg = tiny_config()
  texts = ['print(1)\n', 'x = 2\n']
  batches = list(pipeline.eval_batches(texts, tokenizer, cfg.data, batch_size=4))
  assert len(batches) == 1 and batches[0]['inputs'].shape == (4, cfg.data.seq_len)
  assert batches[0]['loss_mask'].sum() == sum(len(tokenizer.encode(t)) + 1 for t in texts)
  fixed = list(pipeline.eval_batches(texts, tokenizer, cfg.data, batch_size=4, num_batches=3))
  assert len(fixed) == 3 and fixed[2]['loss_mask'].sum() == 0


def test_user_text_files_and_bad_sources(tmp_path):
  for i in range(40):
    (tmp_path / f'doc{i}.txt').write_text(f'document number {i}\n' * 3)
  (tmp_path / 'more.jsonl').write_text('{"text": "a jsonl document"}\n\n{"text": "another"}\n')
  cfg = tiny_config(('data.source', str(tmp_path / '*')), ('data.heldout_percent', '20'))
  train = sources.open_source(cfg.data, 'train')
  heldout = sources.open_source(cfg.data, 'heldout')
  assert len(train) + len(heldout) == 42
  names = [train.name(i) for i in range(len(train))] + [heldout.name(i) for i in range(len(heldout))]
  assert any(n.endswith('more.jsonl:3') for n in names)  # blank line 2 skipped, line numbers kept
  with pytest.raises(UserError, match='matches no files'):
    sources.open_source(tiny_config(('data.source', str(tmp_path / '*.none'))).data, 'train')
  (tmp_path / 'bad.jsonl').write_text('{"txt": 1}\n')
  docs = sources.open_source(tiny_config(('data.source', str(tmp_path / 'bad.jsonl')),
                                         ('data.heldout_percent', '1')).data, 'train')
  skipped = docs[0]
  assert isinstance(skipped, sources.Skipped) and skipped.kind == 'missing_field'
  assert re.search(r'bad.jsonl:1: record has no field .text.', skipped.message())
