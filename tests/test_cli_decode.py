"""`llm-jax generate`, `eval` and `serve` from the command line, on a workdir holding an untrained run."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from random_run import write_workdir


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, tokenizer_path):
  return write_workdir(str(tmp_path_factory.mktemp('cli') / 'run'), tokenizer_path)


def _cli(*args, stdin=''):
  return subprocess.run([sys.executable, '-m', 'llm_jax.cli', *args], capture_output=True, text=True, cwd=ROOT,
                        input=stdin, timeout=300)


def _one_line_error(res, needle):
  assert res.returncode == 2, res.stderr
  lines = res.stderr.strip().splitlines()
  assert len(lines) == 1 and needle in lines[0] and 'Traceback' not in res.stderr, res.stderr


def test_generate_from_a_prompts_file_and_stdin_to_jsonl(workdir, tmp_path):
  prompts = tmp_path / 'prompts.jsonl'
  prompts.write_text('{"prompt": "import os"}\n\n{"prompt": "def f(x):\\n"}\n')
  out = tmp_path / 'out.jsonl'
  res = _cli('generate', f'--workdir={workdir}', f'--prompts_file={prompts}', '--num_samples=2',
             '--temperature=0.8', '--max_new_tokens=5', '--seed=1', f'--output={out}')
  assert res.returncode == 0, res.stderr
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert [(r['index'], r['sample']) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
  assert records[1]['prompt'] == 'import os' and records[2]['prompt'] == 'def f(x):\n'
  for r in records:
    assert r['finish_reason'] in ('stop', 'length') and 1 <= len(r['tokens']) <= 5
  assert records[0]['tokens'] != records[1]['tokens']  # two samples of one prompt differ
  # The same prompts on standard input, one a line, with the same seed: the same completions.
  res = _cli('generate', f'--workdir={workdir}', '--num_samples=2', '--temperature=0.8', '--max_new_tokens=5',
             '--seed=1', '--jsonl', stdin='import os\n{"prompt": "def f(x):\\n"}\n')
  assert res.returncode == 0, res.stderr
  again = [json.loads(line) for line in res.stdout.splitlines()]
  assert [r['tokens'] for r in again] == [r['tokens'] for r in records]


def test_generate_bad_input_is_one_line(workdir):
  _one_line_error(_cli('generate', f'--workdir={workdir}', '--prompt=x', '--temperature=-1'), '--temperature=-1')
  _one_line_error(_cli('generate', f'--workdir={workdir}', '--prompt=x', '--top_p=0'), '--top_p=0')
  long = 'word ' * 100
  _one_line_error(_cli('generate', f'--workdir={workdir}', f'--prompt={long}', '--max_new_tokens=8'), '--truncate')
  res = _cli('generate', f'--workdir={workdir}', f'--prompt={long}', '--max_new_tokens=8', '--truncate', '--jsonl')
  assert res.returncode == 0, res.stderr
  assert json.loads(res.stdout)['prompt_tokens'] == 64 - 8  # the context (data.seq_len) less the new tokens
  res = _cli('generate', f'--workdir={workdir}', '--prompt=import', '--num_beams=3', '--num_samples=2',
             '--max_new_tokens=4', '--jsonl')
  beams = [json.loads(line) for line in res.stdout.splitlines()]
  assert res.returncode == 0 and len(beams) == 2 and beams[0]['score'] >= beams[1]['score'], res.stderr


def test_eval_task_and_data_write_one_json(workdir, tmp_path):
  task = tmp_path / 'mc.jsonl'
  task.write_text('{"context": "import ", "choices": ["os", "sys"], "gold": 0}\n'
                  '{"context": "x = ", "choices": ["1", "2", "3"], "gold": 2}\n')
  docs = tmp_path / 'docs.jsonl'
  docs.write_text(''.join(json.dumps({'text': f'print({i})\n'}) + '\n' for i in range(30)))
  out = tmp_path / 'result.json'
  res = _cli('eval', f'--workdir={workdir}', f'--task={task}', f'--data={docs}', f'--output={out}')
  assert res.returncode == 0, res.stderr
  result = json.loads(out.read_text())
  assert result['documents'] == 30 and result['bits_per_byte'] > 0
  assert result['tasks']['mc']['items'] == 2 and 0 <= result['tasks']['mc']['accuracy'] <= 1
  assert 'task mc: 2 items' in res.stdout
  task.write_text('{"context": "import ", "choices": "os", "gold": 0}\n')
  _one_line_error(_cli('eval', f'--workdir={workdir}', f'--task={task}', f'--output={out}'), 'mc.jsonl:1')
  assert json.loads(out.read_text()) == result  # the failed run left the earlier result intact


def test_serve_answers_on_its_port_warns_without_a_key_and_finishes_requests_on_sigterm(workdir):
  import signal
  import time
  env = {k: v for k, v in os.environ.items() if k != 'LLM_JAX_API_KEY'}
  proc = subprocess.Popen([sys.executable, '-m', 'llm_jax.cli', 'serve', f'--workdir={workdir}', '--port=0',
                           '--host=0.0.0.0'], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                          env=env)
  try:
    line = proc.stdout.readline()
    port = re.search(r'http://0\.0\.0\.0:(\d+)/v1', line).group(1)
    import http.client
    answers = []
    for last in (False, True):
      conn = http.client.HTTPConnection('127.0.0.1', int(port), timeout=120)
      body = json.dumps({'prompt': 'import', 'max_tokens': 48, 'temperature': 0})
      conn.request('POST', '/v1/completions', body=body, headers={'Content-Type': 'application/json'})
      if last:  # the first request compiled; SIGTERM while this one decodes: it is still answered
        time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
      answers.append(json.loads(conn.getresponse().read()))
      conn.close()
    for answer in answers:
      assert answer['object'] == 'text_completion' and answer['usage']['completion_tokens'] >= 1
    assert proc.wait(timeout=60) == 0
    assert 'without an API key' in proc.stderr.read()
  finally:
    proc.kill()
    proc.wait(timeout=30)
