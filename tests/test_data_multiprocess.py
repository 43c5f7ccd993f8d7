"""Two real JAX processes (CPU, gloo collectives): the data state each would checkpoint holds every process's
shards, and equals what one process reaches after the same batches."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from conftest import ROOT, TINY, corpus_config
from llm_jax.data import pipeline

WORKER = r'''
import json, sys
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from llm_jax import config as config_lib
from llm_jax.data import pipeline, tokenizer
cfg = config_lib.load(sys.argv[5], json.loads(sys.argv[3]))
stream = pipeline.TrainStream(cfg.data, tokenizer.load(sys.argv[4]), seed=0)
rows = [next(stream)['inputs'].tolist() for _ in range(3)]
print('RESULT ' + json.dumps({'state': stream.get_state(), 'rows': rows}), flush=True)
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_checkpoint_every_shard_and_match_one_process(tmp_path, tokenizer, tokenizer_path,
                                                                   small_corpus):
  overrides = [('data.source', small_corpus), ('data.heldout_percent', '10')]
  address = f'localhost:{_free_port()}'
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2',
             PYTHONPATH=ROOT)
  procs = [subprocess.Popen([sys.executable, '-c', WORKER, address, str(i), json.dumps(overrides), tokenizer_path,
                             TINY],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(tmp_path))
           for i in range(2)]
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, err[-2000:]
    # Other lines may reach stdout (runtime warnings under load); the result line is marked.
    [line] = [l for l in out.splitlines() if l.startswith('RESULT ')]
    # raw_decode: gloo's C++ logging can land on the same line right after the JSON (seen under load).
    outs.append(json.JSONDecoder().raw_decode(line[len('RESULT '):])[0])
  assert outs[0]['state'] == outs[1]['state']  # process 0 writes it, and it is the whole truth
  assert set(outs[0]['state']['positions']) == {str(s) for s in range(8)}

  single = pipeline.TrainStream(corpus_config(small_corpus).data, tokenizer, seed=0)
  for step in range(3):
    rows = next(single)['inputs']
    np.testing.assert_array_equal(rows, np.asarray(outs[0]['rows'][step] + outs[1]['rows'][step]))
  assert single.get_state() == outs[0]['state']
