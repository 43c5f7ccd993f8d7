"""tools/bench_decode.py runs end to end on CPU at tiny shapes (the real figures need a GPU)."""

import importlib.util
import json
import os

from conftest import ROOT


def test_bench_decode_smoke(capsys):
  spec = importlib.util.spec_from_file_location('bench_decode', os.path.join(ROOT, 'tools', 'bench_decode.py'))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  assert bench.main(['--config=bench/llama_1b:tiny',
                     '--batch', '1', '3', '--prompt_len=16', '--new_tokens=8', '--repeats=1',
                     '--copy_mbytes=8']) == 0
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert lines[0]['param_bytes'] > 0 and lines[0]['copy_GB_per_s'] > 0
  assert [r['batch'] for r in lines[1:]] == [1, 3]
  for r in lines[1:]:
    assert r['ms_per_step'] > 0 and r['tokens_per_sec'] > 0 and r['hbm_floor_ms'] > 0
    assert abs(r['tokens_per_sec'] - r['batch'] * 8 / (r['ms_per_step'] * 8 / 1e3)) <= 0.01 * r['tokens_per_sec'] + 1
