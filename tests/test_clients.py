"""`llm-jax serve` driven by the real clients on loopback: the official `openai` Python client and
lm-evaluation-harness's `local-completions` model (with its own tokenizer detection, offline)."""

import json
import textwrap

import pytest

from llm_jax.evaluate import tasks
from llm_jax.infer import inference
from llm_jax.infer.sampling import SamplingParams
from llm_jax.serve import server, service
from random_run import write_workdir

openai = pytest.importorskip('openai')


@pytest.fixture(scope='module')
def served_app(tmp_path_factory, tokenizer_path):
  workdir = write_workdir(str(tmp_path_factory.mktemp('clients') / 'run'), tokenizer_path)
  app = service.App(inference.load_run(workdir), 'tiny')
  httpd = server.Server(server.make_app(app)).start()
  yield app, httpd.url
  httpd.stop()
  app.close()


@pytest.fixture(scope='module')
def served(served_app):
  app, url = served_app
  return app.run, url


def _greedy(run, prompt, n):
  [want] = inference.complete(run, [inference.prompt_tokens(run, prompt, n)], [SamplingParams(max_new_tokens=n)])
  return want


def test_openai_client_completions_chat_n_and_bad_requests(served):
  run, url = served
  client = openai.OpenAI(base_url=f'{url}/v1', api_key='unused', max_retries=0)
  got = client.completions.create(model='tiny', prompt='import os', max_tokens=6, temperature=0)
  want = _greedy(run, 'import os', 6)
  assert got.choices[0].text == want.text and got.usage.completion_tokens == len(want.tokens)
  many = client.completions.create(model='tiny', prompt=['def f(', 'class A'], max_tokens=4, temperature=1.0,
                                   n=2, seed=3)
  assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]
  assert many.usage.prompt_tokens > 0 and many.usage.total_tokens > many.usage.prompt_tokens
  chat = client.chat.completions.create(model='tiny', messages=[{'role': 'user', 'content': 'hi'}], max_tokens=5,
                                        temperature=0)
  assert chat.choices[0].message.role == 'assistant' and chat.usage.completion_tokens >= 1
  scored = client.completions.create(model='tiny', prompt='import os', max_tokens=0, echo=True, logprobs=5)
  lp = scored.choices[0].logprobs
  assert scored.choices[0].text == 'import os' and lp.token_logprobs[0] is None
  assert all(len(top) <= 5 and max(top.values()) >= chosen for top, chosen in
             zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
  with pytest.raises(openai.BadRequestError, match='top_p'):
    client.completions.create(model='tiny', prompt='x', max_tokens=2, top_p=1.5)
  with pytest.raises(openai.BadRequestError, match='messages'):
    client.chat.completions.create(model='tiny', messages=[])


def test_openai_chat_logprobs_in_the_chat_shape(served):
  """Chat's `logprobs: true` + `top_logprobs` come back as the chat API's `content` list (what the `openai`
  client parses into objects), streamed or not, with the log-probabilities the completions endpoint gives for
  the same rendered prompt; `top_logprobs` past 5 or without `logprobs` is a 400 naming it."""
  from llm_jax.serve import openai_api
  _, url = served
  client = openai.OpenAI(base_url=f'{url}/v1', api_key='unused', max_retries=0)
  messages = [{'role': 'user', 'content': 'def f(x):'}]
  chat = client.chat.completions.create(model='tiny', messages=messages, max_tokens=6, temperature=0,
                                        logprobs=True, top_logprobs=3)
  content = chat.choices[0].logprobs.content
  assert len(content) == chat.usage.completion_tokens == 6
  plain = client.completions.create(model='tiny', prompt=openai_api.render_chat(messages), max_tokens=6,
                                    temperature=0, logprobs=3, stop=['\nuser:'])
  assert [c.token for c in content] == plain.choices[0].logprobs.tokens
  assert [c.logprob for c in content] == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-6)
  for c in content:
    tops = c.top_logprobs
    assert len(tops) == 3 and [t.logprob for t in tops] == sorted((t.logprob for t in tops), reverse=True)
    assert (tops[0].token, tops[0].logprob) == (c.token, c.logprob)  # greedy: the likeliest
    assert c.bytes == list(c.token.encode('utf-8'))
  streamed = [chunk.choices[0].logprobs for chunk in client.chat.completions.create(
      model='tiny', messages=messages, max_tokens=6, temperature=0, logprobs=True, stream=True)
      if chunk.choices and chunk.choices[0].logprobs]
  assert [c.token for lp in streamed for c in lp.content] == [c.token for c in content]
  assert all(c.top_logprobs == [] for lp in streamed for c in lp.content)
  with pytest.raises(openai.BadRequestError, match='top_logprobs'):
    client.chat.completions.create(model='tiny', messages=messages, max_tokens=2, logprobs=True, top_logprobs=6)
  with pytest.raises(openai.BadRequestError, match='top_logprobs'):
    client.chat.completions.create(model='tiny', messages=messages, max_tokens=2, top_logprobs=2)


def test_lm_eval_local_completions_equals_eval_task_and_generates(served, tmp_path, monkeypatch):
  run, url = served
  lm_eval = pytest.importorskip('lm_eval')
  from lm_eval.tasks import TaskManager
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
  items = [{'context': 'import ', 'choices': ['os', 'sys', 'json'], 'gold': 0},
           {'context': 'def f(x):\n    return ', 'choices': ['x', 'None', 'x + 1'], 'gold': 2},
           {'context': 'for i in ', 'choices': ['range(10):', 'items:'], 'gold': 0},
           {'context': 'class A', 'choices': ['(object):', ':', '(Base):'], 'gold': 1},
           {'context': 'x = ', 'choices': ['1', '[]', '{}', 'None'], 'gold': 3},
           {'context': 'print(', 'choices': ['x)', '"hello")'], 'gold': 1}]
  data = tmp_path / 'mc.jsonl'
  data.write_text(''.join(json.dumps({**item, 'answer': ''}) + '\n' for item in items))
  (tmp_path / 'tiny_mc.yaml').write_text(textwrap.dedent(f'''\
      task: tiny_mc
      dataset_path: json
      dataset_kwargs:
        data_files:
          test: {data}
      test_split: test
      output_type: multiple_choice
      doc_to_text: "{{{{context}}}}"
      doc_to_choice: "{{{{choices}}}}"
      doc_to_target: "{{{{gold}}}}"
      target_delimiter: ""
      metric_list:
        - metric: acc
      '''))
  (tmp_path / 'tiny_gen.yaml').write_text(textwrap.dedent(f'''\
      task: tiny_gen
      dataset_path: json
      dataset_kwargs:
        data_files:
          test: {data}
      test_split: test
      output_type: generate_until
      doc_to_text: "{{{{context}}}}"
      doc_to_target: "{{{{answer}}}}"
      generation_kwargs:
        until: ["\\n"]
        max_gen_toks: 8
        do_sample: false
      metric_list:
        - metric: exact_match
      '''))
  results = lm_eval.simple_evaluate(
      model='local-completions', model_args=f'base_url={url}/v1/completions,model=tiny,max_length=64',
      tasks=['tiny_mc', 'tiny_gen'], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
  ours = tasks.evaluate(run, tasks.read(str(data)), batch_size=8)  # what `llm-jax eval --task` reports
  assert results['results']['tiny_mc']['acc,none'] == ours['accuracy']
  harness = [[float(r[0][0]) for r in s['resps']] for s in sorted(results['samples']['tiny_mc'],
                                                                   key=lambda s: s['doc_id'])]
  mine = tasks.choice_logliks(run, tasks.read(str(data)), 8)
  for h, m in zip(harness, mine):
    assert h == pytest.approx(m, abs=1e-4)
  for sample in results['samples']['tiny_gen']:
    context = items[sample['doc_id']]['context']
    want = _greedy(run, context, 8).text.split('\n')[0]
    assert sample['resps'][0][0] == want
  # Its chat model, with the harness's chat template (one user message): our chat endpoint's greedy answers.
  chat = lm_eval.simple_evaluate(
      model='local-chat-completions', model_args=f'base_url={url}/v1/chat/completions,model=tiny',
      tasks=['tiny_gen'], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
      apply_chat_template=True, limit=3)
  from llm_jax.serve import openai_api
  for sample in chat['samples']['tiny_gen']:
    prompt = openai_api.render_chat([{'role': 'user', 'content': items[sample['doc_id']]['context']}])
    want = _greedy(run, prompt, 8).text.split('\nuser:')[0].split('\n')[0]
    assert sample['resps'][0][0] == want
  assert any(sample['resps'][0][0] for sample in chat['samples']['tiny_gen'])


def test_openai_streaming_arrives_token_by_token_and_equals_the_whole_answer(served):
  run, url = served
  client = openai.OpenAI(base_url=f'{url}/v1', api_key='unused', max_retries=0)
  whole = client.completions.create(model='tiny', prompt='def f(x):', max_tokens=12, temperature=0)
  # Every chunk has its choice (the loop of OpenAI's docs reads chunk.choices[0] of each): usage comes only
  # with stream_options.include_usage, in a last chunk of its own.
  pieces = [c.choices[0].text for c in client.completions.create(
      model='tiny', prompt='def f(x):', max_tokens=12, temperature=0, stream=True)]
  assert ''.join(pieces) == whole.choices[0].text
  assert len([p for p in pieces if p]) >= 4  # not one event at the end
  chat_whole = client.chat.completions.create(model='tiny', messages=[{'role': 'user', 'content': 'hi'}],
                                              max_tokens=10, temperature=0)
  chunks = list(client.chat.completions.create(model='tiny', messages=[{'role': 'user', 'content': 'hi'}],
                                               max_tokens=10, temperature=0, stream=True))
  text = ''.join(c.choices[0].delta.content or '' for c in chunks)
  assert text == chat_whole.choices[0].message.content and all(c.usage is None for c in chunks)
  counted = list(client.chat.completions.create(model='tiny', messages=[{'role': 'user', 'content': 'hi'}],
                                                max_tokens=10, temperature=0, stream=True,
                                                stream_options={'include_usage': True}))
  assert counted[-1].choices == [] and all(c.choices for c in counted[:-1])
  assert counted[-1].usage.completion_tokens == chat_whole.usage.completion_tokens
  with pytest.raises(openai.BadRequestError, match='stream_options'):
    client.chat.completions.create(model='tiny', messages=[{'role': 'user', 'content': 'hi'}], max_tokens=2,
                                   stream_options={'include_usage': True})
  # A stop string inside the greedy text: neither answer shows it or anything after it.
  full = whole.choices[0].text  # (a random model's text: bytes that are not UTF-8 show as U+FFFD)
  at = [i for i in range(1, len(full) - 1) if full[i:i + 2].isascii() and full[i:i + 2].strip()]
  if at:
    stop = full[at[len(at) // 2]:at[len(at) // 2] + 2]
    streamed = ''.join(c.choices[0].text for c in client.completions.create(
        model='tiny', prompt='def f(x):', max_tokens=12, temperature=0, stop=[stop], stream=True) if c.choices)
    cut = client.completions.create(model='tiny', prompt='def f(x):', max_tokens=12, temperature=0, stop=[stop])
    assert streamed == cut.choices[0].text == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == 'stop'


@pytest.mark.parametrize('echo', [False, True])
def test_streamed_logprobs_come_with_their_chunks_and_equal_the_whole_answers(served, echo):
  """Streamed, each chunk carries the log-probabilities of the tokens that arrived since the last (an echoed
  prompt's with the prompt's chunk); joined, they are the whole answer's, text offsets included."""
  _, url = served
  client = openai.OpenAI(base_url=f'{url}/v1', api_key='unused', max_retries=0)
  args = dict(model='tiny', prompt='def f(x):', max_tokens=8, temperature=0, logprobs=2, echo=echo)
  whole = client.completions.create(**args).choices[0].logprobs
  pieces = [c.choices[0].logprobs for c in client.completions.create(**args, stream=True)
            if c.choices[0].logprobs]
  assert len(pieces) >= 3  # not all in the last chunk
  for key in ('tokens', 'token_logprobs', 'top_logprobs', 'text_offset'):
    joined = [x for p in pieces for x in getattr(p, key)]
    assert joined == getattr(whole, key), key


@pytest.mark.parametrize('stream', [True, False])
def test_a_client_that_leaves_frees_its_slot(served_app, stream):
  """Streamed, the client hangs up after the first event; whole, it gives up waiting (the server polls for a
  disconnect while the answer is made)."""
  import time
  import httpx
  app, url = served_app
  engine = app.engine
  step = engine._generate
  # 60 steps take 3 s: the whole answer's client gives up after 0.3 s and the server notices within a poll
  # (0.5 s), so a cancelled job stops 15 to 20 steps in; at 20 ms a step the bound of 40 was that 0.8 s
  # itself, and a loaded machine crossed it.
  engine._generate = lambda *a, **k: time.sleep(0.05) or step(*a, **k)
  try:
    seen = []
    engine_submit = engine.submit
    engine.submit = lambda job: seen.append(job) or engine_submit(job)
    body = {'prompt': 'x', 'max_tokens': 60, 'temperature': 0, 'stream': stream}
    if stream:
      with httpx.Client(base_url=url, timeout=60) as c:
        with c.stream('POST', '/v1/completions', json=body) as r:
          next(r.iter_lines())  # the job holds a slot; hang up
    else:
      with httpx.Client(base_url=url, timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
        c.post('/v1/completions', json=body)
    [job] = seen
    deadline = time.monotonic() + 20  # the job may not have reached a slot yet (a first compile)
    while not (job.cancelled and job not in engine._active) and time.monotonic() < deadline:
      time.sleep(0.05)
    assert job.cancelled and not any(engine._active) and job.count < 40, job.count
  finally:
    engine._generate = step
    engine.submit = engine_submit
