"""tools/bench_train.py: the smoke run of the real train step at tiny shapes (the GPU figures need a GPU), the
FLOPs of the full benchmark shapes counted as the torch reference counts them, and the ratio it reports."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from conftest import ROOT

from llm_jax import config as config_lib
from llm_jax.models import flops


def _bench():
  spec = importlib.util.spec_from_file_location('bench_train', os.path.join(ROOT, 'tools', 'bench_train.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _recipe(name: str, variant: str = ''):
  return f'bench/{name}' + (f':{variant}' if variant else '')


def test_smoke_tiny_step(capsys):
  bench = _bench()
  assert bench.main(['--config=' + _recipe('gpt2_124m', 'tiny'), '--steps=4', '--warmup=1', '--windows=2',
                     '--name=smoke', '--config.train.loss_chunk=32']) == 0
  r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert r['impl'] == 'llm-jax' and r['name'] == 'smoke' and r['shape'] == 'gpt2_124m'
  assert r['overrides'] == {'train.loss_chunk': '32'} and r['xla_flags'] == 'none'
  assert r['devices'] == 8 and r['tokens_per_step'] == 8 * 64 == r['batch'] * r['seq_len']
  assert r['compile_s'] > 0 and r['first_step_s'] > 0 and len(r['window_ms']) == 2 and r['timed_steps'] == 4
  assert min(r['window_ms']) <= r['step_ms'] <= max(r['window_ms'])
  assert r['tokens_per_sec'] == pytest.approx(r['tokens_per_step'] / (r['step_ms'] / 1e3), rel=1e-3)
  assert r['cudnn_attention'] is False and r['attention_impl'] == 'xla'  # 'auto' on a CPU: XLA's attention
  assert r['mfu'] is None and r['peak_flops'] is None  # no peak is known for a CPU: no made-up MFU
  assert 5.0 < r['loss'] < 7.5  # random tokens over 512 ids: about ln 512 = 6.2, and finite
  assert r['flops_per_token'] == flops.flops_per_token(config_lib.load(_recipe('gpt2_124m', 'tiny')).model, 64)


def test_op_profile_says_where_the_step_time_went(capsys):
  bench = _bench()
  assert bench.main(['--config=tiny:tiny', '--steps=2', '--warmup=1', '--windows=1', '--op_profile=2']) == 0
  r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert 0 < r['cpu_ms'] and r['cores_busy'] > 0
  profile = r['op_profile']
  parts, kinds = profile['by_part_ms'], profile['by_kind_ms']
  # The step's matmuls and both passes of attention and the MLP are found in the trace by their HLO names.
  assert kinds.get('matmul', 0) > 0 and profile['ops_ms'] > 0
  assert {'attention (forward)', 'attention (backward)', 'mlp (forward)', 'mlp (backward)'} <= set(parts)
  assert sum(parts.values()) <= profile['ops_ms'] * 1.01  # the top entries of the total, never more


@pytest.mark.parametrize('name,L,d,h,T,V,ffn,gated,B', [
    ('gpt2_124m', 12, 768, 12, 1024, 50304, 3072, False, 16),
    ('llama_1b', 16, 2048, 16, 2048, 32000, 5632, True, 8),
])
def test_full_shapes_count_flops_as_the_reference(name, L, d, h, T, V, ffn, gated, B):
  cfg = config_lib.load(_recipe(name))
  m = cfg.model
  assert (m.num_layers, m.embed_dim, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim, m.vocab_size,
          m.mlp_gated) == (L, d, h, h, d // h, ffn, V, gated)  # multi-head attention, like the reference
  assert (cfg.data.seq_len, cfg.data.batch_size) == (T, B)
  assert (m.param_dtype, m.dtype, m.remat, m.attention_impl) == ('float32', 'auto', 'none', 'auto')
  reference_fpt, reference_n = _bench().reference_flops_per_token(L, d, T, V, ffn, gated)
  assert flops.matmul_params(m) == reference_n  # counted from the model's own (abstract) parameters
  assert flops.flops_per_token(m, T) == reference_fpt
  # The reference's own figures check the formula: gpt124m at 474k tokens/s was 0.41 MFU of 989 TFLOP/s.
  if name == 'gpt2_124m':
    assert 474_000 * reference_fpt / 989e12 == pytest.approx(0.41, abs=0.01)
  else:
    assert 88_000 * reference_fpt / 989e12 == pytest.approx(0.545, abs=0.01)


def test_ratio_is_reference_time_over_ours(tmp_path):
  ours = [{'reference_shape': 'gpt124m', 'name': 'gpt2_124m', 'overrides': {}, 'xla_flags': 'none',
           'step_ms': 40.0, 'mfu': 0.5},
          {'reference_shape': 'gpt124m', 'name': 'lhs', 'overrides': {}, 'xla_flags': 'lhs', 'step_ms': 32.0,
           'mfu': 0.625},
          {'reference_shape': 'llama1b', 'name': 'llama_1b', 'overrides': {}, 'xla_flags': 'none', 'step_ms': None}]
  ref = [{'shape': 'gpt124m', 'step_ms': 50.0, 'mfu': 0.4}, {'shape': 'llama1b', 'step_ms': 180.0, 'mfu': 0.5}]
  (tmp_path / 'ours.jsonl').write_text('\n'.join(json.dumps(r) for r in ours) + '\nnot json\n')
  (tmp_path / 'ref.jsonl').write_text('\n'.join(json.dumps(r) for r in ref) + '\n')
  rows = _bench().ratios(ours, ref)
  assert len(rows) == 1  # llama has no timed run of ours: no ratio rather than a wrong one
  assert rows[0]['ratio'] == 1.25 and rows[0]['ours_mfu'] == 0.5  # the recipe as shipped
  assert rows[0]['best_ratio'] == pytest.approx(50 / 32, abs=1e-3) and rows[0]['best_name'] == 'lhs'


def test_ratio_command(tmp_path, capsys):
  (tmp_path / 'ours.jsonl').write_text(json.dumps({'reference_shape': 'gpt124m', 'overrides': {},
                                                   'xla_flags': 'none', 'step_ms': 25.0, 'mfu': 0.8}) + '\n')
  (tmp_path / 'ref.jsonl').write_text(json.dumps({'shape': 'gpt124m', 'step_ms': 50.0, 'mfu': 0.4}) + '\n')
  assert _bench().main(['--ratio', str(tmp_path / 'ours.jsonl'), str(tmp_path / 'ref.jsonl')]) == 0
  assert json.loads(capsys.readouterr().out)['ratio'] == 2.0


def test_every_flag_set_names_known_xla_flags():
  """XLA aborts on an unknown flag in XLA_FLAGS: start a process with each set (this jaxlib checks names)."""
  import subprocess
  import sys
  flags = sorted({f for fs in _bench().XLA_FLAG_SETS.values() for f in fs})
  env = dict(os.environ, XLA_FLAGS=' '.join(flags), JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', 'import jax; jax.numpy.ones(2).block_until_ready()'], env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-500:]
