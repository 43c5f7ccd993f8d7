"""Metric sinks and what they report: TensorBoard files that parse back, W&B only when asked, FLOPs and MFU,
and `llm-jax plot`."""

import json
import struct
import sys
import types

import jax
import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from conftest import tiny_config

from llm_jax import cli
from llm_jax.models import flops
from llm_jax.train import tensorboard
from llm_jax.errors import UserError
from llm_jax.train.sinks import Sinks


def test_crc32c_is_castagnoli():
  assert tensorboard.crc32c(b'123456789') == 0xE3069283  # the standard check value of CRC-32C
  assert tensorboard.crc32c(b'') == 0


def _event_class():
  """Event / Summary protos declared from scratch, so protobuf's own decoder checks our hand encoding."""
  f = descriptor_pb2.FileDescriptorProto(name='tb_test_event.proto', package='tbtest')
  value = f.message_type.add(name='Value')
  value.field.add(name='tag', number=1, type=9, label=1)  # string
  value.field.add(name='simple_value', number=2, type=2, label=1)  # float
  summary = f.message_type.add(name='Summary')
  summary.field.add(name='value', number=1, type=11, label=3, type_name='.tbtest.Value')
  event = f.message_type.add(name='Event')
  event.field.add(name='wall_time', number=1, type=1, label=1)  # double
  event.field.add(name='step', number=2, type=3, label=1)  # int64
  event.field.add(name='file_version', number=3, type=9, label=1)
  event.field.add(name='summary', number=5, type=11, label=1, type_name='.tbtest.Summary')
  pool = descriptor_pool.DescriptorPool()
  pool.Add(f)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName('tbtest.Event'))


def _read_records(path):
  data = open(path, 'rb').read()
  records, i = [], 0
  while i < len(data):
    (length,) = struct.unpack('<Q', data[i:i + 8])
    (length_crc,) = struct.unpack('<I', data[i + 8:i + 12])
    assert length_crc == tensorboard.masked_crc32c(data[i:i + 8])
    payload = data[i + 12:i + 12 + length]
    (data_crc,) = struct.unpack('<I', data[i + 12 + length:i + 16 + length])
    assert data_crc == tensorboard.masked_crc32c(payload)
    records.append(payload)
    i += 16 + length
  return records


def test_tensorboard_event_file_parses_back(tmp_path):
  writer = tensorboard.EventWriter(str(tmp_path))
  writer.scalars(7, {'train/loss': 2.5, 'train/mfu': 0.375})
  writer.scalars(2 ** 40, {'eval/loss': -1.25})
  writer.close()
  assert 'tfevents' in writer.path
  Event = _event_class()
  events = [Event.FromString(r) for r in _read_records(writer.path)]
  assert events[0].file_version == 'brain.Event:2'
  assert events[1].step == 7 and events[2].step == 2 ** 40
  assert {v.tag: v.simple_value for v in events[1].summary.value} == {'train/loss': 2.5, 'train/mfu': 0.375}
  assert [(v.tag, v.simple_value) for v in events[2].summary.value] == [('eval/loss', -1.25)]
  assert abs(events[1].wall_time - events[0].wall_time) < 60


def test_wandb_is_used_only_when_enabled(tmp_path, monkeypatch):
  record = {'step': 3, 'split': 'train', 'loss': 1.5, 'mfu': None}
  monkeypatch.setitem(sys.modules, 'wandb', None)  # `import wandb` now fails, as when not installed
  sinks = Sinks(str(tmp_path), tiny_config(('train.tensorboard', 'false')).train, {})
  sinks.write(record)  # no W&B asked for: never imported, no error
  sinks.close()
  assert json.loads((tmp_path / 'metrics.jsonl').read_text()) == record  # MFU unknown: null, not dropped
  assert not (tmp_path / 'tensorboard').exists()
  with pytest.raises(UserError, match=r'train.wandb_project=.proj. .*pip install wandb'):
    Sinks(str(tmp_path), tiny_config(('train.wandb_project', 'proj')).train, {})

  logged = []
  fake = types.SimpleNamespace(init=lambda **kw: types.SimpleNamespace(
      log=lambda values, step: logged.append((step, values)), finish=lambda: logged.append('finished'),
      kw=kw))
  monkeypatch.setitem(sys.modules, 'wandb', fake)
  sinks = Sinks(str(tmp_path), tiny_config(('train.wandb_project', 'proj')).train, {'seed': 0})
  sinks.write(record)
  sinks.close()
  assert logged == [(3, {'train/loss': 1.5}), 'finished']


def test_flops_per_token_counts_matmul_weights_and_attention():
  m = tiny_config().model
  L, D, N, K, H, F, V = (m.num_layers, m.embed_dim, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim,
                         m.vocab_size)
  per_layer = D * N * H + 2 * D * K * H + N * H * D + 3 * D * F
  assert flops.matmul_params(m) == L * per_layer + D * V  # the unembedding; the input lookup is a gather
  tied = tiny_config(('model.tie_embeddings', 'true')).model
  assert flops.matmul_params(tied) == L * per_layer + V * D  # the shared table is the output matmul
  T = 64
  assert flops.flops_per_token(m, T) == 6 * (L * per_layer + D * V) + 12 * L * N * H * T


def test_peak_table_and_mfu():
  assert flops.peak_flops('TPU v4') == 275e12
  assert flops.peak_flops('TPU v5 lite') == 197e12
  assert flops.peak_flops('TPU v5') == 459e12 and flops.peak_flops('TPU v5p') == 459e12
  assert flops.peak_flops('TPU v6 lite') == 918e12
  assert flops.peak_flops('NVIDIA A100-SXM4-80GB') == 312e12
  assert flops.peak_flops('NVIDIA H100 80GB HBM3') == 989e12
  assert flops.peak_flops('NVIDIA H100 PCIe') == 756e12
  assert flops.peak_flops('NVIDIA H200') == 989e12
  assert flops.peak_flops('cpu') is None and flops.peak_flops('NVIDIA GeForce GTX 1080') is None
  assert flops.device_peak_flops(jax.devices()) is None  # these tests run on CPU: no MFU
  assert flops.mfu(1000.0, 1e9, 2, 1e12) == pytest.approx(0.5)
  assert flops.mfu(1000.0, 1e9, 2, None) is None


def _write_metrics(workdir, records, tail=''):
  workdir.mkdir()
  (workdir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records) + tail)


def test_plot_draws_several_runs_into_one_png(tmp_path, capsys):
  a, b = tmp_path / 'a', tmp_path / 'b'
  train = [{'step': s, 'split': 'train', 'loss': 5.0 / s, 'tokens_per_sec': 1000.0 + s} for s in range(1, 30)]
  _write_metrics(a, train + [{'step': 10, 'split': 'eval', 'loss': 0.6}], tail='{"step": 3')  # torn last line
  _write_metrics(b, train[:12] + train[8:])  # resumed from step 8: steps 9-12 logged twice
  out = tmp_path / 'loss.png'
  assert cli.main(['plot', f'--workdir={a}', f'--workdir={b}', f'--out={out}']) == 0
  png = out.read_bytes()
  assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 10_000
  width, height = struct.unpack('>II', png[16:24])
  assert width > 600 and height > 400
  assert not list(tmp_path.glob('*.tmp*'))


@pytest.mark.parametrize('case,needle', [
    ('missing', 'does not exist'),
    ('empty', 'has no metrics.jsonl'),
    ('garbage', 'metrics.jsonl:1: not a metrics record'),
    ('outdir', 'directory'),
])
def test_plot_errors_are_one_line_and_write_nothing(tmp_path, capsys, case, needle):
  run = tmp_path / 'run'
  out = tmp_path / ('nowhere/loss.png' if case == 'outdir' else 'loss.png')
  if case == 'empty':
    run.mkdir()
  elif case == 'garbage':
    _write_metrics(run, [], tail='not json\n')
  elif case == 'outdir':
    _write_metrics(run, [{'step': 1, 'split': 'train', 'loss': 1.0, 'tokens_per_sec': 1.0}])
  assert cli.main(['plot', f'--workdir={run}', f'--out={out}']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('llm-jax: error:') and needle in err[0], err
  assert not out.exists()


def test_metrics_values_are_plain_json_numbers(tmp_path):
  sinks = Sinks(str(tmp_path), tiny_config().train, {})
  sinks.write({'step': 1, 'split': 'train', 'loss': np.float32(2.0).item(), 'mfu': None, 'skipped': 0})
  sinks.close()
  [event_file] = list((tmp_path / 'tensorboard').glob('events.out.tfevents.*'))
  tags = [v.tag for r in _read_records(str(event_file))[1:] for v in _event_class().FromString(r).summary.value]
  assert tags == ['train/loss', 'train/skipped']  # None (unknown MFU) is not invented as a number


def test_progress_plain_lines_and_bar(capsys):
  from llm_jax.train.progress import Progress
  record = {'loss': 2.5, 'learning_rate': 1e-3, 'tokens_per_sec': 12345.0, 'step_time': 0.5, 'mfu': 0.42}
  plain = Progress(0, 100, interactive=False)
  plain.update(40, record)
  plain.update(50, dict(record, mfu=None))
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith('step     40  loss 2.5000') and '12,345 tok/s' in lines[0]
  assert 'MFU 42.0%' in lines[0] and lines[0].endswith('ETA 0:30')  # 60 steps left at 0.5 s
  assert 'MFU' not in lines[1]
  bar = Progress(0, 100, interactive=True)
  bar.update(40, record)
  bar.close()
  err = capsys.readouterr().err
  assert '40/100' in err and 'loss=2.5000' in err and '12,345' in err and 'mfu=42.0%' in err
