"""TFDS without TensorFlow: `llm-jax prepare` writes ArrayRecord, tfds.data_source reads it back, and
training from it uses the stored token ids."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

tfds = pytest.importorskip('tensorflow_datasets')

from conftest import ROOT, TINY, tiny_config  # noqa: E402

from llm_jax.run import workdir as workdir_lib  # noqa: E402
from llm_jax.data import pipeline, prepared, sources, tokenizer as tokenizer_lib  # noqa: E402
from llm_jax.errors import UserError  # noqa: E402

TEXTS = [f'def f{i}(x):\n    return x * {i}  # ünïcödé {i}\n' for i in range(30)]


@pytest.fixture(scope='module')
def prepared_dir(tmp_path_factory, tokenizer):
  src = tmp_path_factory.mktemp('src')
  (src / 'a.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in TEXTS[:20]), encoding='utf-8')
  for i, t in enumerate(TEXTS[20:]):
    (src / f'b{i}.txt').write_text(t, encoding='utf-8')
  (src / 'bad.jsonl').write_text('not json\n')
  out = str(tmp_path_factory.mktemp('prepared'))
  cfg = tiny_config(('data.source', str(src / '*')), ('data.heldout_percent', '20'))
  info = prepared.prepare(cfg.data, tokenizer, out, 'tiny_corpus')
  return out, info, cfg


def test_prepare_then_read_returns_the_original_text_and_its_ids(prepared_dir, tokenizer):
  out, info, cfg = prepared_dir
  assert info['documents'] == len(TEXTS) and info['skipped'] == 1
  assert info['path'] == os.path.join(out, 'tiny_corpus', '1.0.0')
  texts = {}
  for split in ('train', 'heldout'):
    ds = tfds.data_source('tiny_corpus', split=split, data_dir=out)  # random access, no TensorFlow
    records = [ds[i] for i in range(len(ds))]
    texts[split] = sorted(r['text'].decode('utf-8') for r in records)
    for r in records:
      assert r['ids'].tolist() == tokenizer.encode(r['text'].decode('utf-8'))
    want = sources.open_source(cfg.data, split)
    assert texts[split] == sorted(t for t in sources.texts(want))
  assert sorted(texts['train'] + texts['heldout']) == sorted(TEXTS)
  assert 'tensorflow' not in sys.modules


class _NoTokenizing:
  """The run's tokenizer, except that tokenizing fails: prepared data must not need it."""

  def __init__(self, tok):
    self._tok = tok
    self.bos_id, self.eos_id = tok.bos_id, tok.eos_id

  def serialized(self):
    return self._tok.serialized()

  def encode(self, text):
    raise AssertionError('the prepared dataset was tokenized again')

  encode_array = encode


@pytest.mark.parametrize('how', ['dir', 'name'])
def test_training_from_prepared_shards_reads_ids_by_directory_or_by_name(prepared_dir, tokenizer, how):
  out, info, _ = prepared_dir
  source = f'tfds:{info["path"]}' if how == 'dir' else 'tfds:tiny_corpus'
  cfg = tiny_config(('data.source', source), ('data.tfds_data_dir', out), ('data.shards', '2'))
  stream = pipeline.TrainStream(cfg.data, _NoTokenizing(tokenizer), seed=0)
  batch = next(stream)
  text = tokenizer.decode(batch['inputs'][0][batch['segment_ids'][0] == 1])
  assert any(text and text in t for t in TEXTS), text
  heldout = sources.open_source(cfg.data, 'heldout')  # the 'heldout' split, found without being named
  assert {heldout.text(i) for i in range(len(heldout))} <= set(TEXTS)
  # A new workdir with no data.tokenizer takes the prepared dataset's tokenizer.
  assert workdir_lib.prepared_tokenizer(cfg.data).serialized() == tokenizer.serialized()


def test_prepared_data_refuses_another_tokenizer(prepared_dir, tokenizer):
  _, info, _ = prepared_dir
  cfg = tiny_config(('data.source', f'tfds:{info["path"]}'), ('data.shards', '2'))
  other = tokenizer_lib.train(iter(TEXTS * 30), 300, 100_000, num_threads=1)
  with pytest.raises(UserError, match='was tokenized with tokenizer .* but this run uses'):
    pipeline.TrainStream(cfg.data, other, seed=0)


def _text_only_builder(name):
  class TextOnly(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A stand-in for a catalog dataset such as lm1b: text only, splits train and test."""
    VERSION = tfds.core.Version('1.1.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {'text': tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(0, 24), 'test': self._generate_examples(24, 30)}

    def _generate_examples(self, lo, hi):
      for i in range(lo, hi):
        yield i, {'text': TEXTS[i]}

  TextOnly.name = name
  return TextOnly


def test_catalog_style_text_datasets_are_read_by_name_and_tokenized(tmp_path, tokenizer):
  _text_only_builder('fake_lm1b')(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  cfg = tiny_config(('data.source', 'tfds:fake_lm1b'), ('data.tfds_data_dir', str(tmp_path)),
                    ('data.shards', '2'))
  train, heldout = (sources.open_source(cfg.data, split) for split in ('train', 'heldout'))
  assert sorted(train[i] for i in range(len(train))) == sorted(TEXTS[:24])
  assert sorted(heldout[i] for i in range(len(heldout))) == sorted(TEXTS[24:])  # 'test' found for held-out
  batch = next(pipeline.TrainStream(cfg.data, tokenizer, seed=0))
  assert batch['loss_mask'].all()
  with pytest.raises(UserError, match="no split 'valid' for heldout .*tfds_heldout_split.*train, test"):
    sources.open_source(tiny_config(('data.source', 'tfds:fake_lm1b'), ('data.tfds_data_dir', str(tmp_path)),
                                    ('data.tfds_heldout_split', 'valid')).data, 'heldout')
  with pytest.raises(UserError, match="has no feature 'body'"):
    sources.open_source(tiny_config(('data.source', 'tfds:fake_lm1b'), ('data.tfds_data_dir', str(tmp_path)),
                                    ('data.text_field', 'body')).data, 'train')


def test_missing_tfds_datasets_are_one_clear_error(tmp_path):
  for source, needle in [('tfds:no_such_dataset_xyz', 'tfds:no_such_dataset_xyz: Dataset no_such_dataset_xyz '
                                                       'not found'),
                         (f'tfds:{tmp_path}', 'is not a TFDS dataset directory')]:
    with pytest.raises(UserError, match=needle):
      sources.open_source(tiny_config(('data.source', source), ('data.tfds_data_dir', str(tmp_path))).data,
                          'train')


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'llm_jax.cli', *args], capture_output=True, text=True, cwd=ROOT,
                        timeout=300)


def test_prepare_command_writes_once_and_refuses_to_overwrite(tmp_path, tokenizer_path, small_corpus):
  flags = [f'--config={TINY}', f'--output={tmp_path / "out"}', f'--config.data.source={small_corpus}',
           f'--config.data.tokenizer={tokenizer_path}', '--config.data.heldout_percent=10']
  res = _cli('prepare', *flags)
  assert res.returncode == 0, res.stderr
  assert 'wrote ' in res.stdout and 'train from it with --config.data.source=tfds:' in res.stdout
  assert 'tokens/s' in res.stdout  # the rates, once at the end
  assert os.path.isfile(tmp_path / 'out' / 'llm_jax_text' / '1.0.0' / prepared.tfds_source.TOKENIZER_FILE)
  again = _cli('prepare', *flags)
  assert again.returncode == 2 and again.stderr.strip().endswith('already exists; choose another --output or '
                                                                 '--name, or remove it')
  mixed = _cli('prepare', *flags[:2], "--config.data.mixture=(('builtin', 1.0),)", '--name=other')
  assert mixed.returncode == 2 and 'prepare reads data.source' in mixed.stderr and 'Traceback' not in mixed.stderr


def test_ids_are_stored_compactly(prepared_dir):
  _, info, _ = prepared_dir
  features = json.load(open(os.path.join(info['path'], 'features.json')))
  assert 'uint16' in json.dumps(features)  # a vocabulary under 65,536 pieces: two bytes a token
  assert np.asarray(tfds.data_source('tiny_corpus', split='train', data_dir=os.path.dirname(
      os.path.dirname(info['path'])))[0]['ids']).dtype == np.uint16


def test_prepare_with_worker_processes_writes_the_same_dataset_and_reports_progress(prepared_dir, tokenizer,
                                                                                   tmp_path, capsys):
  out, info, cfg = prepared_dir
  seen = []
  two = tiny_config(('data.source', cfg.data.source), ('data.heldout_percent', '20'), ('data.workers', '2'))
  got = prepared.prepare(two.data, tokenizer, str(tmp_path), 'tiny_corpus', on_progress=lambda s: seen.append(dict(s)))
  assert (got['documents'], got['tokens'], got['skipped']) == (info['documents'], info['tokens'], info['skipped'])
  for split in ('train', 'heldout'):
    a = tfds.data_source('tiny_corpus', split=split, data_dir=out)
    b = tfds.data_source('tiny_corpus', split=split, data_dir=str(tmp_path))
    assert [(r['text'], r['ids'].tolist()) for r in a] == [(r['text'], r['ids'].tolist()) for r in b]
  assert [s['read'] for s in seen] == list(range(1, seen[-1]['total'] + 1))
  assert seen[-1]['bytes'] == got['bytes'] == sum(len(t.encode('utf-8')) for t in TEXTS)
  capsys.readouterr()  # tfds' own lines
  from llm_jax.commands.prepare import Progress
  bar = Progress(interactive=False)
  bar.EVERY = 0.0
  for s in seen[:2]:
    bar(s)
  bar.close()
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith(f'prepare: 1 of {seen[-1]["total"]} documents, ') and 'tokens/s' in lines[0]
  assert lines[-1].startswith('tokenized ') and 'MB/s' in lines[-1]
