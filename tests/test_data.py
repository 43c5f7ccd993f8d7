"""The built-in corpus, the tokenizer, packing, and the sharded, resumable training stream."""

import itertools

import time

import numpy as np
import pytest

from conftest import corpus_config, tiny_config
from llm_jax.data import objectives, pipeline, sources
from llm_jax.data.mixture import EpochShuffle
from llm_jax.data.packing import Packer, empty_batch
from llm_jax.errors import UserError
from llm_jax.data.streams import Stream
from llm_jax.models.attention import attention_mask


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
  assert all(isinstance(train[i], str) and train[i].strip() for i in range(0, len(train), 50))


def test_tokenizer_round_trips_code_exactly(tokenizer):
  text = 'def f(x):\n    return {"a": x ** 2}  # ünïcödé\n\n\tpass\n'
  ids = tokenizer.encode(text)
  assert tokenizer.decode(ids) == text
  assert tokenizer.id_to_piece(tokenizer.encode('\n')[0]) == '\n'


def _assert_rows_are_well_formed(batch, streams):
  for stream in streams:
    seg, pos = batch[stream.segment_key], batch[stream.position_key]
    for b in range(seg.shape[0]):
      for t in range(1, seg.shape[1]):
        if seg[b, t] == seg[b, t - 1] and seg[b, t] > 0:
          assert pos[b, t] == pos[b, t - 1] + 1
        elif seg[b, t] > 0:
          assert pos[b, t] == 0 and seg[b, t] == seg[b, t - 1] + 1
      assert pos[b, 0] == 0
    for key in stream.features:
      assert np.all(batch[key][seg == 0] == 0)


def test_packed_rows_have_consistent_segments_positions_and_targets(tokenizer):
  cfg = tiny_config()
  stream = pipeline.TrainStream(cfg.data, tokenizer, seed=0)
  for batch in itertools.islice(stream, 5):
    assert batch['inputs'].shape == (cfg.data.batch_size, cfg.data.seq_len)
    _assert_rows_are_well_formed(batch, stream.streams)
    seg = batch['segment_ids']
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    # Within a document the target at t - 1 is the input at t: next-token prediction.
    assert np.all(batch['targets'][:, :-1][same] == batch['inputs'][:, 1:][same])


def _docs_feed(lengths):
  """Document d is the token 100 + d, repeated lengths[d] times (a causal-LM objective's features)."""
  def feed(start):
    for d in range(start, len(lengths)):
      ids = np.full(lengths[d], 100 + d, np.int32)
      yield {'inputs': ids, 'targets': ids, 'loss_mask': np.ones_like(ids)}
  return feed


def test_no_token_of_one_document_is_visible_to_another():
  lengths = [5, 40, 3, 17, 9, 1, 64, 30, 2, 11]
  streams = objectives.CausalLM(1, 2, True, True).streams(16)
  packer = Packer(streams, _docs_feed(lengths))
  batch = empty_batch(streams, 16)
  rows = sum(packer.fill(batch, r) for r in range(16))
  # Overlong documents are split over rows, never dropped: every token of every document is packed.
  assert rows == -(-sum(lengths) // 16) and packer.exhausted
  tokens = batch['inputs'][batch['segment_ids'] > 0]
  assert sorted(np.unique(tokens, return_counts=True)[1]) == sorted(lengths)
  mask = np.asarray(attention_mask(batch['positions'], batch['segment_ids'], batch['positions'],
                                   batch['segment_ids']))
  docs = batch['inputs']
  b, t, s = np.nonzero(mask)
  real = batch['segment_ids'][b, t] > 0
  assert np.all(docs[b, t][real] == docs[b, s][real])  # a query only ever sees keys of its own document


def test_packing_takes_stream_lengths_from_the_objective():
  """An encoder-decoder layout: two streams of different lengths sharing segment ids."""
  streams = (Stream(('enc',), 12, 'encoder_'), Stream(('dec',), 4, 'decoder_'))

  def feed(start):
    for d in range(start, 6):
      yield {'enc': np.full(5, 10 + d, np.int32), 'dec': np.full(2, 10 + d, np.int32)}

  packer = Packer(streams, feed)
  batch = empty_batch(streams, 4)
  for r in range(4):
    packer.fill(batch, r)
  assert batch['enc'].shape == (4, 12) and batch['dec'].shape == (4, 4)
  _assert_rows_are_well_formed(batch, streams)
  for r in range(4):  # the decoder stream fills first (2 of 4 per document): two documents per row
    for seg in range(1, 3):
      enc = set(batch['enc'][r][batch['encoder_segment_ids'][r] == seg])
      dec = set(batch['dec'][r][batch['decoder_segment_ids'][r] == seg])
      assert enc == dec and len(enc) <= 1


def test_same_seed_same_batches_and_resume_equals_uninterrupted(tokenizer, small_corpus):
  cfg = corpus_config(small_corpus)
  first = pipeline.TrainStream(cfg.data, tokenizer, seed=0)
  for _ in range(3):
    next(first)
  state = first.get_state()
  expected = [next(first) for _ in range(4)]
  resumed = pipeline.TrainStream(cfg.data, tokenizer, seed=0)
  resumed.set_state(state)
  again = pipeline.TrainStream(cfg.data, tokenizer, seed=0)
  for _ in range(3):
    next(again)
  for want, got, same in zip(expected, (next(resumed) for _ in range(4)), (next(again) for _ in range(4))):
    for k in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(want[k], got[k])
      np.testing.assert_array_equal(want[k], same[k])
  other_seed = next(pipeline.TrainStream(cfg.data, tokenizer, seed=1))
  assert not np.array_equal(other_seed['inputs'], expected[0]['inputs'])


def _run(cfg, tokenizer, processes, batches, state=None):
  """`batches` global batches as `processes` simulated processes would make them, and the merged state."""
  streams = [pipeline.TrainStream(cfg.data, tokenizer, seed=0, process_index=p, process_count=processes)
             for p in range(processes)]
  if state is not None:
    for s in streams:
      s.set_state(state)
  out = []
  for _ in range(batches):
    parts = [next(s) for s in streams]
    out.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
  return out, pipeline.merge_states([s.local_state() for s in streams])


@pytest.mark.parametrize('processes', [2, 4])
def test_processes_read_disjoint_shards_that_together_make_the_one_process_batches(tokenizer, processes,
                                                                                  small_corpus):
  cfg = corpus_config(small_corpus)
  single, _ = _run(cfg, tokenizer, 1, 3)
  split, _ = _run(cfg, tokenizer, processes, 3)
  for a, b in zip(single, split):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  owned = [set(pipeline.shards_of(p, processes, cfg.data.shards)) for p in range(processes)]
  assert set().union(*owned) == set(range(cfg.data.shards)) and sum(map(len, owned)) == cfg.data.shards
  # Document level: over one epoch, the shards read every document exactly once.
  docs = list(range(103))
  seen = [EpochShuffle(docs, s, 8, seed=s)[k] for s in range(8) for k in range(len(range(s, 103, 8)))]
  assert sorted(seen) == docs


def test_resume_with_a_different_number_of_processes_is_exact(tokenizer, small_corpus):
  cfg = corpus_config(small_corpus)
  uninterrupted, _ = _run(cfg, tokenizer, 1, 5)
  _, state = _run(cfg, tokenizer, 2, 2)  # saved by 2 processes after 2 batches
  for processes in (1, 4):
    resumed, _ = _run(cfg, tokenizer, processes, 3, state=state)
    for a, b in zip(uninterrupted[2:], resumed):
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_state_mismatches_are_refused_with_one_clear_line(tokenizer, small_corpus):
  cfg = corpus_config(small_corpus)
  stream = pipeline.TrainStream(cfg.data, tokenizer, seed=0)
  state = stream.get_state()
  other = pipeline.TrainStream(corpus_config(small_corpus, ('data.shards', '4')).data, tokenizer, seed=0)
  with pytest.raises(UserError, match='data.shards=8.*data.shards=4'):
    other.set_state(state)
  with pytest.raises(UserError, match='older llm-jax'):
    stream.set_state({'last_seen_indices': {}})
  with pytest.raises(UserError, match='data.shards=8 cannot be split evenly over 3 processes'):
    pipeline.TrainStream(cfg.data, tokenizer, seed=0, process_index=0, process_count=3)
  with pytest.raises(UserError, match='data.shards'):
    tiny_config(('data.shards', '3'))  # does not divide data.batch_size=8


def test_gathered_state_of_one_process_is_its_local_state(tokenizer, small_corpus):
  stream = pipeline.TrainStream(corpus_config(small_corpus).data, tokenizer, seed=0)
  next(stream)
  assert pipeline.gather_states(stream.local_state()) == stream.local_state()


@pytest.mark.parametrize('reader', [('data.workers', '1'), ('data.prefetch', '5')], ids=['process', 'thread'])
def test_reading_ahead_changes_speed_not_batches(tokenizer, small_corpus, reader):
  """A worker process, or the reading thread (workers=0, prefetch > 0, chunks of an odd size), against reading
  each document when the packer asks for it (prefetch=0): the same batches, before and after a resume."""
  inline = pipeline.TrainStream(corpus_config(small_corpus, ('data.prefetch', '0')).data, tokenizer, seed=0)
  ahead = pipeline.TrainStream(corpus_config(small_corpus, reader, ('data.prefetch', '5')).data, tokenizer, seed=0)
  try:
    for _ in range(3):
      a, b = next(inline), next(ahead)
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    state = inline.get_state()
    next(ahead)  # moves on: the resume below must re-position its feeds
    ahead.set_state(state)
    inline.set_state(state)
    np.testing.assert_array_equal(next(inline)['inputs'], next(ahead)['inputs'])
  finally:
    ahead.close()
    inline.close()


def test_reading_thread_reads_ahead_in_order_up_to_a_limit():
  import threading
  from llm_jax.data.workers import Feeds

  class Recorder:
    """A dataset that notes which thread read each element."""

    def __init__(self):
      self.readers = {}

    def __getitem__(self, k):
      self.readers[k] = threading.current_thread().name
      return k * 10

  data = Recorder()
  feeds = Feeds([data], workers=0, prefetch=8)
  try:
    feed = feeds.feed(0, 3, limit=40)
    assert next(feed) == 30
    deadline = time.monotonic() + 10
    while len(data.readers) < 8 and time.monotonic() < deadline:
      time.sleep(0.01)
    assert len(data.readers) >= 8  # read ahead of what was asked for
    assert [30] + list(feed) == [k * 10 for k in range(3, 40)]
    names = set(data.readers.values())
    assert len(names) == 1 and threading.main_thread().name not in names  # the shard's one reading thread
    assert max(data.readers) == 39  # never past the limit
  finally:
    feeds.close()


def test_eval_batches_pad_to_full_batches(tokenizer):
  cfg = tiny_config()
  texts = ['print(1)\n', 'x = 2\n']
  batches = list(pipeline.eval_batches(texts, tokenizer, cfg.data, batch_size=4))
  assert len(batches) == 1 and batches[0]['inputs'].shape == (4, cfg.data.seq_len)
  assert batches[0]['loss_mask'].sum() == sum(len(tokenizer.encode(t)) + 1 for t in texts)
  fixed = list(pipeline.eval_batches(texts, tokenizer, cfg.data, batch_size=4, num_batches=3))
  assert len(fixed) == 3 and fixed[2]['loss_mask'].sum() == 0
