"""A work directory at a URL (`llm-jax train --workdir=gs://bucket/run`), with local stand-ins for a bucket.

The stand-in store is an fsspec protocol registered here, `llmjaxbucket://`, whose objects are files under a
temporary directory. llm-jax treats it as any URL: config, tokenizer, metrics, TensorBoard events, eval
output and the checkpoint manifests go through storage.py's fsspec branch (whole-object writes instead of
renames, rewrites instead of appends, no free-space or permission checks). orbax cannot open that protocol
(it knows local paths, gs:// and s3://), so it is given the directory on disk behind it
(storage.local_path): the arrays themselves go through orbax's local code. What a real bucket adds, and
these tests cannot reach, is orbax's gs:// path (tensorstore's GCS driver, commit_success.txt instead of a
rename) and gcsfs itself. fsspec's in-memory store checks the files llm-jax writes itself without touching
the disk at all.
"""

import json
import os

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from conftest import TINY

from llm_jax import atomic, cli, storage
from llm_jax.commands import plot
from llm_jax.run import workdir as workdir_lib

PROTOCOL = 'llmjaxbucket'


class _Bucket(LocalFileSystem):
  """`llmjaxbucket://NAME/...` is ROOT/NAME/... on the local disk."""
  protocol = (PROTOCOL,)
  root_dir = ''

  @classmethod
  def _strip_protocol(cls, path):
    path = fsspec.utils.stringify_path(path)
    if path.startswith(f'{PROTOCOL}://'):
      return os.path.join(cls.root_dir, path[len(PROTOCOL) + 3:]).rstrip('/')
    return super()._strip_protocol(path)


@pytest.fixture
def bucket(tmp_path):
  _Bucket.root_dir = str(tmp_path / 'bucket')
  os.makedirs(_Bucket.root_dir)
  fsspec.register_implementation(PROTOCOL, _Bucket, clobber=True)
  return _Bucket.root_dir


def _cli(capsys, *argv):
  rc = cli.main(list(argv))
  out = capsys.readouterr()
  return rc, out.out, out.err


@pytest.mark.slow
def test_train_resume_eval_generate_with_the_workdir_at_a_url(bucket, capsys, tokenizer_path):
  url = f'{PROTOCOL}://runs/tiny'
  disk = os.path.join(bucket, 'runs', 'tiny')
  assert storage.is_url(url) and storage.local_path(url) == disk
  rc, out, err = _cli(capsys, 'train', f'--workdir={url}', f'--config={TINY}',
                      f'--config.data.tokenizer={tokenizer_path}', '--config.train.steps=4',
                      '--config.train.checkpoint_every=2', '--config.train.log_every=1', '--config.eval.every=2')
  assert rc == 0, err
  for name in ('config.json', 'tokenizer.model', 'metrics.jsonl', 'checkpoints/4/llm_jax_files.json'):
    assert os.path.isfile(os.path.join(disk, name)), name
  assert not [n for n in os.listdir(disk) if '.tmp' in n]  # no rename's leftovers: objects are written whole
  events = os.listdir(os.path.join(disk, 'tensorboard'))
  assert len(events) == 1 and events[0].startswith('events.out.tfevents.')

  # Resumed from the URL alone: its saved config, four more steps.
  rc, out, err = _cli(capsys, 'train', f'--workdir={url}', '--config.train.steps=6')
  assert rc == 0, err
  assert 'resumed from step 4' in out
  series = plot.read_metrics(url)  # `plot` reads the metrics at the URL
  # Records of both runs, each once (the first step of each run is not logged: its time is the compilation's).
  assert sorted(series['train']) == [2, 3, 4, 6] and sorted(series['eval']) == [2, 4, 6]
  with open(os.path.join(disk, 'metrics.jsonl'), encoding='utf-8') as f:
    steps = [json.loads(line)['step'] for line in f if '"train"' in line]
  assert steps == [2, 3, 4, 6]

  rc, out, err = _cli(capsys, 'eval', f'--workdir={url}', f'--output={url}/eval.json')
  assert rc == 0, err
  result = json.loads(storage.read_bytes(f'{url}/eval.json'))
  assert result['step'] == 6 and result['loss'] > 0

  rc, out, err = _cli(capsys, 'generate', f'--workdir={url}', '--prompt=import os', '--max_new_tokens=4',
                      '--temperature=0')
  assert rc == 0, err
  assert out.startswith('import os')


def test_files_llm_jax_writes_itself_at_an_in_memory_url(tokenizer):
  url = 'memory://llm-jax-test/run'
  atomic.write_text(f'{url}/a.txt', 'one')
  atomic.write_text(f'{url}/a.txt', 'two')
  assert storage.read_bytes(f'{url}/a.txt') == b'two'
  with pytest.raises(RuntimeError):  # a failed block writes nothing: the old object stays
    with atomic.replacing(f'{url}/a.txt') as f:
      f.write('half')
      raise RuntimeError
  assert storage.read_bytes(f'{url}/a.txt') == b'two'

  metrics = workdir_lib.MetricsWriter(url)
  metrics.write({'step': 1, 'split': 'train', 'loss': 2.0})
  metrics.close()
  metrics = workdir_lib.MetricsWriter(url)  # a resumed run keeps what was there
  metrics.write({'step': 2, 'split': 'train', 'loss': 1.5})
  metrics.close()
  assert sorted(plot.read_metrics(url)['train']) == [1, 2]

  from conftest import tiny_config
  cfg = tiny_config()
  workdir_lib.prepare(url, cfg, tokenizer)
  assert workdir_lib.load_config(url).to_dict() == cfg.to_dict()
  assert workdir_lib.load_tokenizer(url, cfg).serialized() == tokenizer.serialized()
  assert storage.listdir(url) and not workdir_lib.has_checkpoints(url)
  storage.rmtree('memory://llm-jax-test')


@pytest.mark.parametrize('url, why', [
    ('nosuch://bucket/run', 'cannot open this URL'),
    ('memory://llm-jax-test/orbax', 'checkpoints are written by orbax, which writes to local paths, gs:// and '
                                   's3:// only'),
])
def test_a_workdir_url_that_cannot_work_is_one_line(capsys, url, why):
  rc, out, err = _cli(capsys, 'train', f'--workdir={url}', f'--config={TINY}', '--config.train.steps=1')
  assert rc == 2 and len(err.strip().splitlines()) == 1 and 'Traceback' not in err
  assert url in err and why in err
  assert not storage.exists('memory://llm-jax-test/orbax')  # refused before anything was written


def test_gs_without_gcsfs_is_one_line(capsys):
  pytest.importorskip('fsspec')
  try:
    import gcsfs  # noqa: F401
    pytest.skip('gcsfs is installed: the missing-backend message cannot be seen')
  except ImportError:
    pass
  rc, out, err = _cli(capsys, 'eval', '--workdir=gs://no-bucket/run')
  assert rc == 2 and len(err.strip().splitlines()) == 1
  assert 'gs://no-bucket/run' in err and 'gcsfs' in err
