"""Local file sources, bad input (each with its message, skipped and counted where safe), and mixtures."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, TINY, corpus_config, tiny_config
from llm_jax.data import files, objectives, pipeline, sources, splitting
from llm_jax.data.mixture import BLOCK, Featurize, WeightedMix, block_counts
from llm_jax.data.packing import Packer, empty_batch
from llm_jax.errors import UserError


def _all(docs):
  return [docs[i] for i in range(len(docs))], [docs.name(i) for i in range(len(docs))]


def _open(tmp_path, pattern, *overrides, split='train'):
  cfg = tiny_config(('data.source', str(tmp_path / pattern)), ('data.heldout_percent', '0'), ('eval.every', '0'),
                    *overrides)
  return sources.open_source(cfg.data, split)


def test_txt_files_blocks_jsonl_and_their_gzip_forms(tmp_path):
  text = 'first block\nstill first\n\n\n  \nsecond block ünï\n\nthird\n'
  (tmp_path / 'a.txt').write_text(text)
  with gzip.open(tmp_path / 'b.txt.gz', 'wt') as f:
    f.write(text)
  lines = [json.dumps({'text': f'jsonl document {i}', 'id': i}) for i in range(3)]
  (tmp_path / 'c.jsonl').write_text(lines[0] + '\n\n' + '\n'.join(lines[1:]) + '\n')
  with gzip.open(tmp_path / 'd.jsonl.gz', 'wt') as f:
    f.write('\n'.join(lines) + '\n')

  texts, names = _all(_open(tmp_path, '*.txt*'))
  assert texts == [text, text] and names == [str(tmp_path / 'a.txt'), str(tmp_path / 'b.txt.gz')]
  texts, names = _all(_open(tmp_path, '*.txt*', ('data.txt_mode', 'blocks')))
  assert texts == ['first block\nstill first\n', 'second block ünï\n', 'third\n'] * 2
  assert names[:3] == [f'{tmp_path / "a.txt"}:{n}' for n in (1, 6, 8)]
  texts, names = _all(_open(tmp_path, '*.jsonl*'))
  assert texts == [f'jsonl document {i}' for i in range(3)] * 2
  assert names[:3] == [f'{tmp_path / "c.jsonl"}:{n}' for n in (1, 3, 4)]  # blank line 2 is no document
  heldout = _open(tmp_path, '*', ('data.heldout_percent', '50'), split='heldout')
  train = _open(tmp_path, '*', ('data.heldout_percent', '50'))
  held_names = {heldout.name(i) for i in range(len(heldout))}
  train_names = {train.name(i) for i in range(len(train))}
  everything = _all(_open(tmp_path, '*'))[1]
  if splitting.by_document(everything, 50):  # the 8 records split between them by their names' hashes
    assert len(train) + len(heldout) == 8 and not held_names & train_names
  else:  # all 8 names (they hold tmp_path) hashed to one side, 1 time in 128: each record's head and tail
    assert len(train) == len(heldout) == 8 and not held_names & train_names  # named "first/last 50%"


@pytest.mark.parametrize('pattern,needle', [
    ('nothing-here/*.txt', 'the glob matches no files'),
    ('missing.txt', 'the path does not exist'),
    ('notes.md', 'unsupported file type'),
])
def test_missing_paths_empty_globs_and_unknown_files_are_errors(tmp_path, pattern, needle):
  (tmp_path / 'notes.md').write_text('# not a document type we read\n')
  with pytest.raises(UserError, match=needle):
    _open(tmp_path, pattern)


def test_unreadable_and_corrupt_files_are_errors_naming_the_file(tmp_path, monkeypatch):
  (tmp_path / 'locked.jsonl').write_text('{"text": "x"}\n')
  (tmp_path / 'broken.txt.gz').write_bytes(b'not gzip at all')
  real_open = open

  def fake_open(path, *args, **kwargs):  # root can read anything, so permission is simulated
    if str(path).endswith('locked.jsonl'):
      raise PermissionError(13, 'Permission denied')
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr(files, 'open', fake_open, raising=False)
  with pytest.raises(UserError, match=r'cannot read .*locked.jsonl: Permission denied'):
    _open(tmp_path, 'locked.jsonl')
  with pytest.raises(UserError, match=r'broken.txt.gz: not a valid gzip file'):
    _open(tmp_path, 'broken.txt.gz')


def _bad_corpus(tmp_path):
  good = [json.dumps({'text': f'good document {i}'}) for i in range(20)]
  bad = [
      '{"text": "unterminated',  # line 21
      '{"body": "no text field"}',  # 22
      '{"text": 42}',  # 23
      '{"text": "   "}',  # 24
  ]
  data = ('\n'.join(good + bad) + '\n').encode() + b'{"text": "bad \xff byte"}\n'  # 25
  (tmp_path / 'mixed.jsonl').write_bytes(data)
  (tmp_path / 'latin1.txt').write_bytes('caf\xe9 au lait'.encode('latin-1'))
  (tmp_path / 'image.txt').write_bytes(b'\x89PNG\r\n\x1a\n\0\0\0\rIHDR')
  (tmp_path / 'empty.txt').write_bytes(b'')
  return [f'good document {i}' for i in range(20)]


def test_each_bad_record_is_skipped_with_a_message_naming_file_and_line(tmp_path):
  _bad_corpus(tmp_path)
  docs = _open(tmp_path, '*')
  items = {docs.name(i): docs[i] for i in range(len(docs))}
  expect = {
      'mixed.jsonl:21': ('bad_json', 'not valid JSON'),
      'mixed.jsonl:22': ('missing_field', "record has no field 'text'"),
      'mixed.jsonl:23': ('missing_field', "field 'text' is int, expected a string"),
      'mixed.jsonl:24': ('empty', 'empty document'),
      'mixed.jsonl:25': ('invalid_utf8', 'invalid UTF-8'),
      'latin1.txt': ('invalid_utf8', 'invalid UTF-8 at byte 3'),
      'image.txt': ('binary', 'binary data'),
      'empty.txt': ('empty', 'empty document'),
  }
  for suffix, (kind, reason) in expect.items():
    [item] = [v for name, v in items.items() if name.endswith(suffix)]
    assert isinstance(item, sources.Skipped) and item.kind == kind, (suffix, item)
    assert item.message().startswith(str(tmp_path / suffix)) and reason in item.message()
  assert sum(isinstance(v, str) for v in items.values()) == 20


def test_training_stream_skips_counts_and_logs_bad_records(tmp_path, tokenizer, capfd):
  good = _bad_corpus(tmp_path)
  cfg = tiny_config(('data.source', str(tmp_path / '*')), ('data.heldout_percent', '0'), ('eval.every', '0'),
                    ('data.shards', '1'), ('data.batch_size', '2'))
  # One pass over the documents, through the packer and the skip log the training stream uses.
  every = files.open_files(sources.glob_paths(cfg.data.source), 'file', 'text', cfg.data.max_doc_chars,
                           select=lambda name: True)  # both splits: which file lands where depends on tmp_path
  docs = [every[i] for i in range(len(every))]
  log = pipeline.SkipLog()
  featurize = Featurize(tokenizer, objectives.for_config(cfg.data, tokenizer), cfg.data.max_doc_chars)
  packer = Packer(objectives.for_config(cfg.data, tokenizer).streams(cfg.data.seq_len),
                  lambda start: (featurize(docs[i]) for i in range(start, len(docs))), log)
  batch = empty_batch(packer._streams, 64)
  rows = sum(packer.fill(batch, r) for r in range(64))
  assert packer.exhausted and batch['loss_mask'].sum() == sum(len(tokenizer.encode(t)) + 1 for t in good)
  assert log.counts == {'bad_json': 1, 'missing_field': 2, 'empty': 2, 'invalid_utf8': 2, 'binary': 1}
  assert log.summary() == ('skipped 8 bad records (1 bad_json, 1 binary, 2 empty, 2 invalid_utf8, '
                           '2 missing_field)') and rows > 0
  err = capfd.readouterr().err
  assert f'llm-jax: warning: skipped {tmp_path / "mixed.jsonl"}:21: not valid JSON' in err
  assert f'llm-jax: warning: skipped {tmp_path / "image.txt"}: binary data' in err
  # The endless stream keeps going over them, counting every time and logging only the first few.
  stream = pipeline.TrainStream(cfg.data, tokenizer, seed=0)
  for _ in range(20):
    next(stream)
  err = capfd.readouterr().err
  assert set(stream.skips.counts) <= set(log.counts) and sum(stream.skips.counts.values()) > 8
  reasons = {'bad_json': 'not valid JSON', 'missing_field': 'field', 'empty': 'empty document',
             'invalid_utf8': 'invalid UTF-8', 'binary': 'binary data'}
  for kind, n in stream.skips.counts.items():  # each met at least twice, said at most three times
    said = [line for line in err.splitlines() if reasons[kind] in line]
    assert n >= 2 and 1 <= len(said) <= 3, (kind, said)


def test_a_single_100mb_line_is_cut_into_pieces_and_never_hangs(tmp_path, tokenizer):
  size = 100 * 1024 * 1024
  with open(tmp_path / 'huge.txt', 'wb') as f:
    f.write(('é' + 'x' * 99).encode() * (size // 101))  # two-byte characters straddle piece boundaries
  with open(tmp_path / 'huge.jsonl', 'wb') as f:
    f.write(b'{"text": "' + b'y' * size + b'"}\n')
  txt = _open(tmp_path, 'huge.txt')
  pieces = -(-os.path.getsize(tmp_path / 'huge.txt') // 1_000_000)
  assert len(txt) == pieces and txt.name(2).endswith(f'huge.txt (piece 3 of {pieces})')
  joined = txt[0] + txt[1] + txt[2]
  assert joined == ('é' + 'x' * 99) * (len(joined) // 100) + joined[-(len(joined) % 100):]  # nothing lost
  assert all(len(txt[i]) <= 1_000_000 for i in (0, 1, pieces - 1))
  jsonl = _open(tmp_path, 'huge.jsonl')
  assert len(jsonl) == -(-os.path.getsize(tmp_path / 'huge.jsonl') // 1_000_000) and jsonl[5] == 'y' * 1_000_000
  cfg = tiny_config(('data.source', str(tmp_path / 'huge.txt')), ('data.heldout_percent', '0'),
                    ('eval.every', '0'))
  batch = next(pipeline.TrainStream(cfg.data, tokenizer, seed=0))  # 8 shards each tokenize one piece
  assert batch['loss_mask'].all()


def test_mixture_proportions_are_within_two_percent_over_10000_documents():
  weights = [0.6, 0.3, 0.1]
  parents = [[(j, i) for i in range(20_000)] for j in range(3)]

  class Endless:  # a stand-in for an epoch-shuffled source: element i of parent j
    def __init__(self, j):
      self.j = j

    def __getitem__(self, i):
      return parents[self.j][i % 20_000]

  for seed in (0, 1):
    mix = WeightedMix([Endless(j) for j in range(3)], weights, seed)
    items = [mix[k] for k in range(10_000)]
    share = np.bincount([j for j, _ in items], minlength=3) / 10_000
    assert np.all(np.abs(share - weights) < 0.02), share
    for j in range(3):  # each source is read in order, nothing skipped or repeated
      mine = [i for jj, i in items if jj == j]
      assert mine == list(range(len(mine)))
  assert [mix.source_of(k) for k in range(50)] != [WeightedMix(
      [Endless(j) for j in range(3)], weights, 0).source_of(k) for k in range(50)]  # the seed matters
  assert block_counts([1, 1, 1]).sum() == BLOCK


def test_mixture_of_sources_in_the_training_stream(tmp_path, tokenizer, small_corpus):
  (tmp_path / 'other.jsonl').write_text(''.join(json.dumps({'text': f'zzz {i} zzz'}) + '\n' for i in range(100)))
  mixture = f"(('{small_corpus}', 0.5), ('{tmp_path / 'other.jsonl'}', 0.5))"
  cfg = corpus_config(small_corpus, ('data.mixture', mixture))
  batch = next(pipeline.TrainStream(cfg.data, tokenizer, seed=0))
  zzz = tokenizer.encode('zzz')[0]
  assert 0 < np.mean(batch['inputs'] == zzz)  # the jsonl source is in the mix
  heldout = sources.open_source(cfg.data, 'heldout')
  names = [heldout.name(i) for i in range(len(heldout))]
  assert any('other.jsonl' in n for n in names) and any(n.endswith('.txt') for n in names)


@pytest.mark.parametrize('value,needle', [
    ("(('builtin', 0),)", 'each entry is (source, positive weight)'),
    ("(('builtin',),)", 'each entry is (source, positive weight)'),
    ("(('builtin', 1.0), ('x/*.txt', 0.0001))", 'below 1/1000'),
])
def test_bad_mixtures_name_the_key(value, needle):
  with pytest.raises(UserError, match=r'data\.mixture.*' + needle.replace('(', r'\(').replace(')', r'\)')):
    tiny_config(('data.mixture', value))


def test_cli_reports_an_empty_glob_in_one_line(tmp_path):
  res = subprocess.run([sys.executable, '-m', 'llm_jax.cli', 'train', f'--workdir={tmp_path / "run"}',
                        f'--config={TINY}', f'--config.data.source={tmp_path}/*.jsonl'],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert res.returncode == 2 and 'Traceback' not in res.stderr
  assert res.stderr.strip() == (f"llm-jax: error: config key data.source='{tmp_path}/*.jsonl': the glob "
                                'matches no files')


@pytest.mark.parametrize('key,value,needle', [
    ('data.txt_mode', 'lines', "data.txt_mode='lines': expected one of ('file', 'blocks')"),
    ('data.max_doc_chars', '10', 'data.max_doc_chars=10: expected at least 1000'),
    ('data.workers', '-1', 'data.workers=-1'),
    ('data.prefetch', '-1', 'data.prefetch=-1'),
    ('data.shards', '0', 'data.shards=0'),
    ('data.tfds_train_split', '', 'data.tfds_train_split'),
    ('data.heldout_percent', '0', 'data.heldout_percent=0: expected above 0 while eval.every > 0'),
])
def test_data_keys_are_validated_by_name(key, value, needle):
  with pytest.raises(UserError, match=needle.replace('(', r'\(').replace(')', r'\)')):
    tiny_config((key, value))
