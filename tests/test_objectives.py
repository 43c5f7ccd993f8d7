"""Masked LM and span corruption as pure functions of (ids, rng), and how the packer lays out their examples."""

import numpy as np
import pytest

from conftest import corpus_config
from llm_jax.data import objectives, pipeline
from llm_jax.data.objectives import MaskedLM, SpanCorruption, Stream
from llm_jax.data.packing import Packer, empty_batch

MASK = 999
RANDOM_IDS = np.arange(10, 500)


def _mlm(**kw):
  args = dict(bos_id=1, eos_id=2, add_bos=True, add_eos=True, mask_id=MASK, random_ids=RANDOM_IDS, rate=0.15,
              random_rate=0.1, keep_rate=0.1)
  args.update(kw)
  return MaskedLM(**args)


def test_mlm_predicts_15_percent_with_the_80_10_10_rule():
  rng = np.random.default_rng(0)
  mlm = _mlm()
  counts = {'mask': 0, 'random': 0, 'keep': 0}
  for _ in range(300):
    ids = rng.integers(10, 500, size=int(rng.integers(20, 200))).astype(np.int32)
    out = mlm(ids, rng)
    assert out['targets'][0] == 1 and out['targets'][-1] == 2
    np.testing.assert_array_equal(out['targets'][1:-1], ids)
    chosen = out['loss_mask'].astype(bool)
    assert not chosen[0] and not chosen[-1]  # BOS and EOS are never predicted
    assert chosen.sum() == max(1, round(0.15 * len(ids)))
    np.testing.assert_array_equal(out['inputs'][~chosen], out['targets'][~chosen])  # the rest is untouched
    got, want = out['inputs'][chosen], out['targets'][chosen]
    counts['mask'] += int(np.sum(got == MASK))
    counts['keep'] += int(np.sum(got == want))
    counts['random'] += int(np.sum((got != MASK) & (got != want)))
  total = sum(counts.values())
  # A random replacement equals the original 1 time in 490, so "random" is very slightly undercounted.
  assert abs(counts['mask'] / total - 0.8) < 0.03
  assert abs(counts['random'] / total - 0.1) < 0.02
  assert abs(counts['keep'] / total - 0.1) < 0.02


def test_mlm_masks_are_a_function_of_the_generator():
  ids = np.arange(10, 110, dtype=np.int32)
  a, b, c = (_mlm()(ids, np.random.default_rng(s)) for s in (5, 5, 6))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a['loss_mask'], c['loss_mask'])


def test_whole_word_masking_takes_every_piece_of_a_chosen_word(tokenizer):
  text = ('def tokenize_everything(source_lines, maximum_length):\n    return [normalise(line) for line in '
          'source_lines if len(line) < maximum_length]\n') * 4
  ids = np.asarray(tokenizer.encode(text), np.int32)
  table = objectives.whole_word_table(tokenizer, tokenizer.vocab_size)
  mlm = _mlm(word_table=table, rate=0.3)
  words = mlm._words(ids)
  assert any(len(w) > 1 for w in words), 'the text must have words of several pieces'
  assert len(words) < len(ids)
  for seed in range(20):
    chosen = set(np.flatnonzero(mlm(ids, np.random.default_rng(seed))['loss_mask'][1:-1]).tolist())
    for w in words:
      assert set(w.tolist()) <= chosen or not set(w.tolist()) & chosen
    assert len(chosen) <= max(round(0.3 * len(ids)), max(len(w) for w in words))
  # Words split where a piece starts with a space or a non-word character: "maximum_length" is one word.
  pieces = [tokenizer.decode(ids[w]) for w in words]
  assert 'maximum_length' in [p.strip() for p in pieces]


def _span(**kw):
  args = dict(eos_id=2, first_sentinel=999, num_sentinels=100, noise_density=0.15, mean_span_length=3.0,
              seq_len=64, target_len=24, decoder_start_id=0)
  args.update(kw)
  return SpanCorruption(**args)


def _uncorrupt(example, span):
  """The original tokens from the encoder input and the targets (sentinel i marks span i in both)."""
  targets = list(example['targets'][:-1])
  spans, current = {}, None
  for t in targets:
    if t > span.first_sentinel - span.num_sentinels:
      current = t
      spans[current] = []
    else:
      spans[current].append(t)
  out = []
  for t in example['inputs'][:-1]:
    out.extend(spans[t] if t in spans else [t])
  return out


def test_span_corruption_hides_spans_behind_sentinels_and_fits_its_rows():
  span = _span()
  rng = np.random.default_rng(0)
  noise = spans = kept_tokens = 0
  for _ in range(200):
    ids = rng.integers(10, 500, size=int(rng.integers(2, 300))).astype(np.int32)
    examples = span(ids, rng)
    assert sum(len(_uncorrupt(e, span)) for e in examples) == len(ids)
    assert np.concatenate([_uncorrupt(e, span) for e in examples]).tolist() == ids.tolist()
    for e in examples:
      assert len(e['inputs']) <= 64 and len(e['targets']) <= 24
      assert e['inputs'][-1] == 2 and e['targets'][-1] == 2
      np.testing.assert_array_equal(e['decoder_inputs'], np.concatenate([[0], e['targets'][:-1]]))
      sentinels = e['targets'][e['targets'] > 899]
      assert sentinels.tolist() == list(range(999, 999 - len(sentinels), -1))  # <extra_id_0>, <extra_id_1>...
      assert e['inputs'][e['inputs'] > 899].tolist() == sentinels.tolist()
      noise += len(e['targets']) - 1 - len(sentinels)
      spans += len(sentinels)
      kept_tokens += len(e['inputs']) - 1 - len(sentinels)
  assert abs(noise / (noise + kept_tokens) - 0.15) < 0.01
  assert abs(noise / spans - 3.0) < 0.3


def test_span_chunk_is_the_longest_piece_that_fits():
  n = objectives.span_chunk_length(64, 24, 0.15, 3.0)
  enc, dec = objectives.span_lengths(n, 0.15, 3.0)
  assert enc <= 64 and dec <= 24
  enc, dec = objectives.span_lengths(n + 1, 0.15, 3.0)
  assert enc > 64 or dec > 24
  assert objectives.span_chunk_length(4, 2, 0.15, 3.0) == 0


def _packer(docs, streams):
  return Packer(streams, lambda start: iter(docs[start:]))


def test_unsplit_streams_keep_each_example_whole_and_resume_inside_a_document():
  streams = (Stream(('enc',), 8, split=False), Stream(('dec',), 4, 'decoder_', split=False))

  def example(k, n_enc, n_dec):
    return {'enc': np.full(n_enc, k, np.int32), 'dec': np.full(n_dec, k, np.int32)}

  # Document 0 makes three examples, document 1 none, document 2 one.
  docs = [[example(1, 5, 2), example(2, 4, 1), example(3, 3, 3)], [], [example(4, 8, 4)]]
  packer = _packer(docs, streams)
  out = empty_batch(streams, 4)
  rows = [packer.fill(out, r) for r in range(4)]
  assert rows == [True, True, True, False]
  # Example 2 (4 tokens) does not fit the 3 left in row 0's encoder: it starts row 1 instead of being cut.
  assert out['enc'][0].tolist() == [1] * 5 + [0] * 3 and out['dec'][0].tolist() == [1, 1, 0, 0]
  assert out['enc'][1].tolist() == [2] * 4 + [3] * 3 + [0] and out['dec'][1].tolist() == [2, 3, 3, 3]
  assert out['segment_ids'][1].tolist() == [1] * 4 + [2] * 3 + [0]
  assert out['decoder_segment_ids'][1].tolist() == [1, 2, 2, 2]
  assert out['decoder_positions'][1].tolist() == [0, 0, 1, 2]
  assert out['enc'][2].tolist() == [4] * 8

  # A state saved between examples of one document resumes there.
  packer = _packer(docs, streams)
  packer.fill(empty_batch(streams, 1), 0)
  state = packer.state()
  assert state == {'index': 0, 'part': 1, 'offsets': [0, 0], 'dry': 0}
  resumed = _packer(docs, streams)
  resumed.restore(state)
  again = empty_batch(streams, 1)
  resumed.fill(again, 0)
  np.testing.assert_array_equal(again['enc'][0], out['enc'][1])


@pytest.mark.parametrize('objective,extra', [
    ('mlm', [('model.family', 'encoder'), ('data.whole_word_masking', 'true')]),
    ('span', [('model.family', 'encdec'), ('model.position_type', 'relative'), ('data.target_len', '24')]),
])
def test_random_objectives_resume_exactly(small_corpus, tokenizer, objective, extra):
  cfg = corpus_config(small_corpus, ('data.objective', objective), *extra)
  first = pipeline.TrainStream(cfg.data, tokenizer, seed=0, model_cfg=cfg.model)
  for _ in range(2):
    next(first)
  state = first.get_state()
  expected = [next(first) for _ in range(3)]
  resumed = pipeline.TrainStream(cfg.data, tokenizer, seed=0, model_cfg=cfg.model)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    assert set(got) == set(want)
    for k in want:
      np.testing.assert_array_equal(want[k], got[k])
  first.close()
  resumed.close()
  batch = expected[0]
  assert batch['loss_mask'].sum() > 0
  if objective == 'mlm':  # the reserved mask id is the first id after the tokenizer's pieces
    assert np.sum(batch['inputs'] == tokenizer.vocab_size) > 0
  else:
    assert batch['inputs'].shape == (cfg.data.batch_size, cfg.data.seq_len)
    assert batch['targets'].shape == (cfg.data.batch_size, 24)
    assert batch['inputs'].max() == tokenizer.vocab_size + cfg.data.num_sentinels - 1  # <extra_id_0>
