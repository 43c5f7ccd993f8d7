"""Your own text as it comes (issue 16): one big file, a handful of files, a held-out source of its own."""

import json

import numpy as np
import pytest

from conftest import TINY, tiny_config
from llm_jax.data import pipeline, sources, splitting
from llm_jax.data.files import Skipped
from llm_jax.errors import UserError


def _stdlib_text(n_chars: int) -> str:
  out, size = [], 0
  for _, path in sources.builtin_files():
    with open(path, encoding='utf-8') as f:
      out.append(f.read())
    size += len(out[-1])
    if size >= n_chars:
      break
  return ''.join(out)[:n_chars]


def _texts(docs):
  return [docs[i] for i in range(len(docs))]


def _batches(cfg, tokenizer, processes, count, state=None):
  streams = [pipeline.TrainStream(cfg.data, tokenizer, seed=0, process_index=p, process_count=processes)
             for p in range(processes)]
  for s in streams:
    if state is not None:
      s.set_state(state)
  out = []
  for _ in range(count):
    parts = [next(s) for s in streams]
    out.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
  return out, pipeline.merge_states([s.local_state() for s in streams]), streams


def _assert_same(a, b):
  for x, y in zip(a, b, strict=True):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_one_big_file_fills_every_shard_holds_out_its_tail_and_resumes_exactly(tmp_path, tokenizer, capfd):
  text = _stdlib_text(120_000) + 'é ünï 😀\n' * 50  # multi-byte characters near the cut
  (tmp_path / 'input.txt').write_text(text, encoding='utf-8')
  cfg = tiny_config(('data.source', str(tmp_path / 'input.txt')))
  assert cfg.data.shards == 8 and cfg.data.heldout_percent == 5
  train, heldout = sources.open_source(cfg.data, 'train'), sources.open_source(cfg.data, 'heldout')
  # nanoGPT's split by position: the head trains, the tail is held out, nothing lost or doubled.
  assert ''.join(_texts(train)) + ''.join(_texts(heldout)) == text
  tail = len(''.join(_texts(heldout)).encode()) / len(text.encode())
  assert 0.049 < tail < 0.051 and len(heldout) == 1 and heldout.name(0).endswith('input.txt (last 5%)')
  assert len(train) >= cfg.data.shards * splitting.PIECES_PER_SHARD  # cut finer so that every shard has work
  # The split depends on sizes only: the same file elsewhere splits at the same byte.
  (tmp_path / 'elsewhere').mkdir()
  (tmp_path / 'elsewhere' / 'other.txt').write_text(text, encoding='utf-8')
  again = sources.open_source(tiny_config(('data.source', str(tmp_path / 'elsewhere' / 'other.txt'))).data,
                              'heldout')
  assert _texts(again) == _texts(heldout)

  uninterrupted, _, _ = _batches(cfg, tokenizer, 1, 5)
  assert all(b['loss_mask'].all() for b in uninterrupted)  # every row of every shard is full of text
  err = capfd.readouterr().err  # said once, by the training stream
  assert err.count('llm-jax: note: ') == 1 and 'has 1 document, too few to hold out whole ones' in err
  assert 'the last 5% of each is held out, by position' in err
  _, state, _ = _batches(cfg, tokenizer, 2, 2)
  resumed, _, _ = _batches(cfg, tokenizer, 4, 3, state)
  _assert_same(uninterrupted[2:], resumed)


def test_a_handful_of_files_where_most_shards_have_nothing_usable_draws_from_the_others(
    tmp_path, tokenizer, capfd):
  (tmp_path / 'a_good.txt').write_text(_stdlib_text(1800), encoding='utf-8')
  (tmp_path / 'b_binary.txt').write_bytes(bytes(range(256)) * 8)
  (tmp_path / 'c_latin1.txt').write_bytes('caf\xe9 au lait, cr\xe8me br\xfbl\xe9e\n'.encode('latin-1') * 40)
  cfg = tiny_config(('data.source', str(tmp_path / '*.txt')))
  train = sources.open_source(cfg.data, 'train')
  assert len(train) < cfg.data.shards  # some shards get no document of their own, others only bad ones
  assert sum(isinstance(t, str) for t in _texts(train)) == 2  # the good file's two pieces
  held = _texts(sources.open_source(cfg.data, 'heldout'))
  assert [isinstance(t, str) for t in held] == [True, False, False]  # the good file's tail is there

  uninterrupted, _, streams = _batches(cfg, tokenizer, 1, 6)
  assert all(b['loss_mask'].all() for b in uninterrupted)
  assert any(p._dry for p in streams[0]._packers)
  err = capfd.readouterr().err
  assert 'has no usable documents of its own' in err and 'reads the whole source from now on' in err
  _, state, _ = _batches(cfg, tokenizer, 2, 3)  # saved after shards ran dry: the switch is in the state
  assert any(pos['dry'] for pos in state['positions'].values())
  resumed, _, _ = _batches(cfg, tokenizer, 1, 3, state)
  _assert_same(uninterrupted[3:], resumed)
  workers = tiny_config(('data.source', str(tmp_path / '*.txt')), ('data.workers', '1'), ('data.prefetch', '4'))
  stream = pipeline.TrainStream(workers.data, tokenizer, seed=0)
  try:  # the fallback is read through the worker processes the same way
    _assert_same(uninterrupted, [next(stream) for _ in range(6)])
  finally:
    stream.close()


def test_a_held_out_source_of_its_own(tmp_path):
  (tmp_path / 'train.txt').write_text(_stdlib_text(5000), encoding='utf-8')
  (tmp_path / 'valid.txt').write_text('held out text\n', encoding='utf-8')
  cfg = tiny_config(('data.source', str(tmp_path / 'train.txt')),
                    ('data.heldout_source', str(tmp_path / 'valid.txt')), ('data.heldout_percent', '0'))
  train = sources.open_source(cfg.data, 'train')
  assert ''.join(_texts(train)) == _stdlib_text(5000)  # all of it trains
  heldout = sources.open_source(cfg.data, 'heldout')
  assert _texts(heldout) == ['held out text\n'] and heldout.name(0) == str(tmp_path / 'valid.txt')
  assert not isinstance(heldout[0], Skipped)


def _messy_folder(root):
  """Two good files (code, one long line) and three unusable ones (latin-1, random bytes, empty)."""
  root.mkdir()
  (root / 'code.txt').write_text(_stdlib_text(30_000), encoding='utf-8')
  (root / 'line.txt').write_text(' '.join(f'word{i % 97}' for i in range(12_000)), encoding='utf-8')
  (root / 'latin1.txt').write_bytes('caf\xe9 cr\xe8me br\xfbl\xe9e\n'.encode('latin-1') * 200)
  (root / 'random.txt').write_bytes(np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes())
  (root / 'empty.txt').write_bytes(b'')


def test_a_messy_folder_trains_on_its_usable_text_and_reports_the_rest(tmp_path, tokenizer, capfd):
  _messy_folder(tmp_path / 'messy')
  cfg = tiny_config(('data.source', str(tmp_path / 'messy' / '*')))
  batches, _, streams = _batches(cfg, tokenizer, 1, 4)
  assert all(b['loss_mask'].all() for b in batches)
  kinds = set(streams[0].skips.counts)
  assert kinds <= {'invalid_utf8', 'binary', 'empty'} and kinds, kinds
  said = [line for line in capfd.readouterr().err.splitlines() if ' skipped ' in line]
  assert said and all(any(f'{bad}.txt (first 95%)' in line for bad in ('latin1', 'random', 'empty'))
                      for line in said), said
  heldout = sources.open_source(cfg.data, 'heldout')
  assert {heldout.name(i).split('/')[-1] for i in range(len(heldout)) if isinstance(heldout[i], str)} == {
      'code.txt (last 5%)', 'line.txt (last 5%)'}


def test_encoding_and_decode_errors_keep_files_that_are_not_utf8(tmp_path):
  _messy_folder(tmp_path / 'messy')

  def usable(*overrides):
    cfg = tiny_config(('data.source', str(tmp_path / 'messy' / 'latin1.txt')), ('data.heldout_percent', '0'),
                      ('eval.every', '0'), *overrides)
    return _texts(sources.open_source(cfg.data, 'train'))
  assert all(isinstance(t, Skipped) and t.kind == 'invalid_utf8' for t in usable())
  assert ''.join(usable(('data.encoding', 'latin-1'))) == 'café crème brûlée\n' * 200
  assert ''.join(usable(('data.decode_errors', 'replace'))) == 'caf\ufffd cr\ufffdme br\ufffdl\ufffde\n' * 200
  with pytest.raises(UserError, match="data.encoding='klingon'"):
    tiny_config(('data.encoding', 'klingon'))
  with pytest.raises(UserError, match="data.decode_errors='maybe'"):
    tiny_config(('data.decode_errors', 'maybe'))


def test_a_source_without_usable_text_is_one_line_before_anything_is_written(tmp_path, capsys):
  _messy_folder(tmp_path / 'messy')
  bad = tmp_path / 'bad'
  bad.mkdir()
  for name in ('latin1.txt', 'random.txt', 'empty.txt'):
    (bad / name).write_bytes((tmp_path / 'messy' / name).read_bytes())
  workdir = tmp_path / 'run'
  from llm_jax import cli
  rc = cli.main(['train', f'--workdir={workdir}', f'--config={TINY}', f'--config.data.source={bad}/*.txt'])
  err = capsys.readouterr().err
  assert rc == 2 and err.count('\n') == 1, err
  line = err.strip()
  assert line.startswith(f"llm-jax: error: data.source='{bad}/*.txt' has no usable text: 3 files tried"), line
  for name, why in (('empty.txt', 'empty document'), ('latin1.txt', 'invalid UTF-8'), ('random.txt', 'binary')):
    assert f'{bad / name}' in line and why in line, line
  assert not workdir.exists()


def test_a_messy_folder_trains_and_evaluates_from_the_command_line(tmp_path, tokenizer_path, capfd):
  """The issue's case end to end: only data.source changed (and a short run), held-out loss evaluated.
  In-process (cli.main): a subprocess would spend most of its time importing jax on a busy machine."""
  from llm_jax import cli
  _messy_folder(tmp_path / 'messy')
  workdir = tmp_path / 'run'
  rc = cli.main(['train', f'--workdir={workdir}', f'--config={TINY}', f'--config.data.source={tmp_path / "messy"}/*',
                 f'--config.data.tokenizer={tokenizer_path}', '--config.train.steps=2', '--config.eval.every=2'])
  err = capfd.readouterr().err
  assert rc == 0, err
  assert 'too few to hold out whole ones' in err and 'llm-jax: warning:' in err
  with open(workdir / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  evals = [r for r in records if r['split'] == 'eval']
  assert [r['step'] for r in evals] == [2] and np.isfinite(evals[0]['loss']) and evals[0]['loss'] > 0


def test_a_missing_held_out_source_is_one_line_and_writes_nothing(tmp_path, tokenizer_path, capsys):
  from llm_jax import cli
  (tmp_path / 'train.txt').write_text(_stdlib_text(5000), encoding='utf-8')
  workdir = tmp_path / 'run'
  rc = cli.main(['train', f'--workdir={workdir}', f'--config={TINY}', f'--config.data.source={tmp_path}/train.txt',
                 f'--config.data.tokenizer={tokenizer_path}', f'--config.data.heldout_source={tmp_path}/nope.txt'])
  err = capsys.readouterr().err
  assert rc == 2 and err == (f"llm-jax: error: config key data.heldout_source='{tmp_path}/nope.txt': the path "
                             'does not exist\n'), err
  assert not workdir.exists()
