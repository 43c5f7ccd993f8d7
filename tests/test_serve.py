"""The OpenAI-compatible server, in process: answers equal the library's, concurrent requests share a batch,
echo + logprobs score the prompt like the model does, bad requests get a 400 and the server keeps serving."""

import json
import threading
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.infer import inference
from llm_jax.serve import server, service
from llm_jax.infer.sampling import SamplingParams
from random_run import make_run


@pytest.fixture(scope='module')
def served(tokenizer_path):
  run = make_run(tokenizer_path)
  app = service.App(run, 'tiny', max_batch=8, batch_wait_s=0.3)
  httpd = server.Server(server.make_app(app)).start()
  yield run, httpd.url, app.engine
  httpd.stop()
  app.close()


def _post(url, body, raw=None):
  data = raw if raw is not None else json.dumps(body).encode()
  req = urllib.request.Request(url, data=data, headers={'Content-Type': 'application/json'})
  try:
    with urllib.request.urlopen(req, timeout=120) as r:
      return r.status, r.read().decode()
  except urllib.error.HTTPError as e:
    return e.code, e.read().decode()


def test_concurrent_completions_are_batched_and_equal_the_library(served):
  run, base, engine = served
  prompts = ['import os\n', 'def f(x):', 'class A:']
  answers = [None] * 3

  def ask(i):
    answers[i] = _post(f'{base}/v1/completions', {'prompt': prompts[i], 'max_tokens': 6, 'temperature': 0})

  threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
  engine.most_active = 0
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert engine.most_active == 3  # the three requests were decoded together
  for prompt, (status, text) in zip(prompts, answers):
    assert status == 200, text
    body = json.loads(text)
    ids = inference.prompt_tokens(run, prompt, 6)
    [want] = inference.complete(run, [ids], [SamplingParams(max_new_tokens=6)])
    assert body['choices'][0]['text'] == want.text
    assert body['usage'] == {'prompt_tokens': len(ids), 'completion_tokens': len(want.tokens),
                             'total_tokens': len(ids) + len(want.tokens)}


def test_echo_logprobs_score_the_prompt_like_the_model(served):
  run, base, _ = served
  status, text = _post(f'{base}/v1/completions', {'prompt': 'import os', 'max_tokens': 0, 'echo': True,
                                                  'logprobs': 1})
  assert status == 200, text
  lp = json.loads(text)['choices'][0]['logprobs']
  ids = inference.prompt_tokens(run, 'import os', 1)
  tokens = jnp.asarray([ids])
  logits = run.model.apply({'params': run.params}, tokens, jnp.arange(len(ids))[None], jnp.ones_like(tokens))[0]
  want = jax.nn.log_softmax(logits[0], axis=-1)[jnp.arange(len(ids) - 1), tokens[0, 1:]]
  assert lp['token_logprobs'][0] is None
  np.testing.assert_allclose(lp['token_logprobs'][1:], np.asarray(want), atol=1e-4)
  assert ''.join(lp['tokens']) == 'import os'


def test_chat_and_streaming(served):
  _, base, _ = served
  body = {'messages': [{'role': 'user', 'content': 'hello'}], 'max_tokens': 5, 'temperature': 0}
  status, text = _post(f'{base}/v1/chat/completions', body)
  assert status == 200, text
  answer = json.loads(text)
  assert answer['object'] == 'chat.completion'
  content = answer['choices'][0]['message']['content']
  status, text = _post(f'{base}/v1/chat/completions', {**body, 'stream': True})
  events = [line[len('data: '):] for line in text.splitlines() if line.startswith('data: ')]
  assert status == 200 and events[-1] == '[DONE]'
  chunks = [json.loads(e) for e in events[:-1]]
  assert ''.join(c['choices'][0]['delta'].get('content', '') for c in chunks if c['choices']) == content


@pytest.mark.parametrize('body,raw,needle', [
    (None, b'{"prompt": ', 'not valid JSON'),
    ({'prompt': 'x', 'top_p': 1.5}, None, '"top_p"'),
    ({'prompt': 'x', 'temperature': -1}, None, '"temperature"'),
    ({'prompt': 7}, None, '"prompt"'),
    ({'prompt': 'x', 'max_tokens': 1000}, None, 'context'),
    ({'prompt': 'word ' * 200, 'max_tokens': 4}, None, 'context'),
    ({'prompt': [1, 99999], 'max_tokens': 4}, None, 'token id'),
    ({'messages': 'hi'}, None, '"messages"'),
    # Fields the server does not implement: answering as if they were absent would mislead.
    ({'prompt': 'x', 'logit_bias': {'5': 100}}, None, '"logit_bias" is not supported'),
    ({'prompt': 'x', 'best_of': 3}, None, '"best_of"'),
    ({'messages': [{'role': 'user', 'content': 'hi'}], 'response_format': {'type': 'json_object'}}, None,
     '"response_format"'),
    ({'messages': [{'role': 'user', 'content': 'hi'}], 'tools': [{'type': 'function'}]}, None, '"tools"'),
])
def test_bad_requests_get_a_400_naming_the_problem_and_the_server_keeps_serving(served, body, raw, needle):
  _, base, _ = served
  chat = body is not None and 'messages' in body
  status, text = _post(f'{base}/v1/{"chat/" if chat else ""}completions', body, raw)
  assert status == 400 and needle in json.loads(text)['error']['message'], text
  status, _ = _post(f'{base}/v1/completions', {'prompt': 'x', 'max_tokens': 2})
  assert status == 200


def test_unserved_fields_at_their_inert_values_are_accepted(served):
  """What clients send by default (LangChain's completions client sends best_of 1 and an empty logit_bias)
  asks for nothing this server lacks."""
  _, base, _ = served
  status, text = _post(f'{base}/v1/completions', {'prompt': 'x', 'max_tokens': 2, 'best_of': 1, 'logit_bias': {},
                                                  'suffix': '', 'presence_penalty': 0, 'frequency_penalty': 0})
  assert status == 200, text
  status, text = _post(f'{base}/v1/chat/completions', {'messages': [{'role': 'user', 'content': 'hi'}],
                                                       'max_tokens': 2, 'response_format': {'type': 'text'},
                                                       'tools': []})
  assert status == 200, text


def test_api_key_is_required_as_a_bearer_token_and_bodies_are_limited(served):
  run, _, _ = served
  import httpx
  app = service.App(run, 'tiny', max_batch=4, batch_wait_s=0.0)
  httpd = server.Server(server.make_app(app, api_key='s3cret', max_body_bytes=1000)).start()
  try:
    body = {'prompt': 'x', 'max_tokens': 1}
    with httpx.Client(base_url=httpd.url, timeout=120) as c:
      for headers in ({}, {'Authorization': 'Bearer wrong'}, {'Authorization': 's3cret'}):
        r = c.post('/v1/completions', json=body, headers=headers)
        assert r.status_code == 401 and 'API key' in r.json()['error']['message'], r.text
      assert c.get('/v1/models').status_code == 401
      assert c.get('/health').status_code == 200  # probes need no key
      auth = {'Authorization': 'Bearer s3cret'}
      assert c.post('/v1/completions', json=body, headers=auth).status_code == 200
      r = c.post('/v1/completions', json={'prompt': 'x' * 2000}, headers=auth)
      assert r.status_code == 413 and '1000' in r.json()['error']['message']
      chunked = c.post('/v1/completions', content=iter([b'{"prompt": "', b'x' * 2000, b'"}']), headers=auth)
      assert chunked.status_code == 413  # no Content-Length: counted as it arrives
      r = c.get('/v1/nowhere', headers=auth)
      assert r.status_code == 404 and 'no such path' in r.json()['error']['message']
  finally:
    httpd.stop()
    app.close()


def test_hundreds_of_concurrent_connections_are_all_answered(served):
  """More clients at once than the standard library server's listen queue (5) held: none is reset."""
  import asyncio
  import httpx
  _, base, _ = served

  async def main():
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)  # one connection each
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as c:
      replies = await asyncio.gather(*[c.post('/v1/completions', json={'prompt': f'x = {i}', 'max_tokens': 2})
                                       for i in range(300)])
    return [r.status_code for r in replies]

  assert asyncio.run(main()) == [200] * 300


def test_bench_serve_measures_the_served_model(served):
  """tools/bench_serve.py's load generator and one level's figures, against the real server: every request
  answered with the tokens it asked for (ignore_eos), the figures consistent with each other."""
  import importlib.util
  import random
  from conftest import ROOT
  spec = importlib.util.spec_from_file_location('bench_serve', f'{ROOT}/tools/bench_serve.py')
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  run, base, _ = served
  requests = bench.make_requests(6, run.context_len, random.Random(0))
  import asyncio
  wall, results = asyncio.run(bench.load(base, requests, 3))
  assert sorted(r[0] for r in results) == sorted(b['max_tokens'] for b in requests)
  assert all(asked == got for asked, got, *_ in results) and wall > max(r[2] for r in results) > 0
  assert sorted(r[3] for r in results) == list(range(6))
  # Sent in order (measure counts the requests after its warm-up ones by their index).
  sent = [r[4] for r in sorted(results, key=lambda r: r[3])]
  assert sent == sorted(sent)
  row = bench.measure(base, 2, 4, run.context_len, random.Random(1))
  assert row['requests'] == 4 and row['tokens_per_sec'] > 0 and 0 < row['p50_s'] <= row['p99_s']
  assert row['short_p99_s'] is None or row['short_p50_s'] <= row['short_p99_s'] <= row['p99_s']
  assert row['burst_short_max_s'] > 0
