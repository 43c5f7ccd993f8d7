"""Supervised fine-tuning from a pretrained workdir: the chat template's masks, init_from, bad records, and
`llm-jax chat` through a pipe."""

import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config

from llm_jax import cli, config as config_lib, sharding
from llm_jax.run import finetune, params as params_lib
from llm_jax.infer import inference
from llm_jax.data import chat
from llm_jax.data.files import Record, Skipped
from llm_jax.errors import UserError
from llm_jax.models import build_model
from llm_jax.infer.sampling import SamplingParams
from llm_jax.train import loop
from llm_jax.train.step import loss_and_stats

SFT = 'sft'
PAIRS = [('What is the capital of France?', 'Paris.'), ('Name a prime number.', 'Seven.'),
         ('def add(a, b):', 'return a + b'), ('Say hi', 'hello there')]


def write_jsonl(path, records):
  with open(path, 'w', encoding='utf-8') as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r)) + '\n')
  return str(path)


def sft_config(pretrained, source, *overrides):
  """The sft recipe's tiny variant starting from `pretrained` (loop.train resolves vocabulary and tokenizer)."""
  return config_lib.load(SFT + ':tiny', [('init_from', pretrained), ('data.source', source), *overrides])


@pytest.fixture(scope='module')
def pretrained(pretrained_workdir):
  return pretrained_workdir


@pytest.fixture(scope='module')
def sft_run(tmp_path_factory, pretrained):
  """SFT of the pretrained run on PAIRS (and one bad record of each kind) until it knows them by heart."""
  root = tmp_path_factory.mktemp('sft')
  source = write_jsonl(root / 'pairs.jsonl', [{'prompt': p, 'response': r} for p, r in PAIRS] + [
      {'messages': [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'},
                    {'role': 'assistant', 'content': 'Hello.'}]},
      {'prompt': 'no response'}, {'prompt': 'x', 'response': ' '},
      '{"messages": [{"role": "robot", "content": "Hi"}]}'])
  workdir = str(root / 'run')
  cfg = sft_config(pretrained, source, ('train.steps', '40'), ('train.learning_rate', '1e-2'))
  loop.train(cfg, workdir)
  return workdir


def _template(tokenizer, roles=('system', 'user', 'assistant')):
  return chat.Template(tokenizer, roles, add_bos=True)


def test_only_reply_tokens_and_their_end_marker_are_trained(tokenizer):
  template = _template(tokenizer)
  sft = chat.SFT(template, seq_len=64)
  f = sft.from_record(Record('x.jsonl:1', {'messages': [
      {'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi there'},
      {'role': 'assistant', 'content': 'Hello.'}, {'role': 'user', 'content': 'Bye'},
      {'role': 'assistant', 'content': 'Ciao.'}]}))
  trained = f['targets'][f['loss_mask'] == 1].tolist()
  reply = tokenizer.encode('Hello.') + [template.end_id] + tokenizer.encode('Ciao.') + [template.end_id]
  assert trained == reply
  assert np.array_equal(f['inputs'][1:], f['targets'][:-1])  # next-token prediction over the whole chat
  assert f['inputs'][1] == template.marker('system') and template.end_id == tokenizer.vocab_size + 3


def test_a_prompt_label_changes_nothing_in_the_gradient(tokenizer):
  cfg = tiny_config(('model.vocab_size', str(tokenizer.vocab_size + 4)), ('data.objective', 'sft'))
  model = build_model(cfg.model)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), *[jnp.zeros((1, 8), jnp.int32)] * 2,
                               jnp.ones((1, 8), jnp.int32))['params']
  params = jax.tree.map(lambda x: getattr(x, 'value', x), params, is_leaf=lambda x: hasattr(x, 'value'))
  f = chat.SFT(_template(tokenizer), 64).from_record(Record('x:1', {'prompt': 'What is two and two?',
                                                                    'response': 'Four.'}))
  n = len(f['inputs'])
  batch = {k: jnp.asarray(v)[None] for k, v in f.items()}
  batch.update(segment_ids=jnp.ones((1, n), jnp.int32), positions=jnp.arange(n)[None])

  grad = jax.jit(jax.grad(lambda p, b: loss_and_stats(model, p, b)[0]))

  def grads(b):
    return grad(params, b)

  prompt_at = int(np.flatnonzero(f['loss_mask'] == 0)[-1])
  reply_at = int(np.flatnonzero(f['loss_mask'] == 1)[0])
  base = grads(batch)
  relabelled = grads({**batch, 'targets': batch['targets'].at[0, prompt_at].set(7)})
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(relabelled)))
  changed = grads({**batch, 'targets': batch['targets'].at[0, reply_at].set(7)})
  assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(changed)))


@pytest.mark.parametrize('fields,kind,needle', [
    ({'prompt': 'q'}, 'missing_field', "field 'response' is missing"),
    ({'text': 'q'}, 'missing_field', "neither 'messages' nor 'prompt'"),
    ({'prompt': 'q', 'response': ''}, 'empty_response', "'response' is empty"),
    ({'prompt': 'q', 'response': 3}, 'missing_field', 'a int, expected a string'),
    ({'messages': [{'role': 'robot', 'content': 'hi'}]}, 'unknown_role', "role 'robot'"),
    ({'messages': [{'role': 'user', 'content': 'hi'}]}, 'empty_response', "no non-empty 'assistant'"),
    ({'prompt': 'word ' * 100, 'response': 'ok'}, 'too_long', 'does not fit data.seq_len=64'),
])
def test_bad_records_are_skipped_with_file_and_line(tokenizer, fields, kind, needle):
  out = chat.SFT(_template(tokenizer), 64).from_record(Record('data/x.jsonl:7', fields))
  assert isinstance(out, Skipped) and out.kind == kind
  assert out.message().startswith('data/x.jsonl:7: ') and needle in out.message()


def test_sft_reproduces_the_seen_responses_and_skips_bad_records(sft_run, pretrained, capfd):
  run = inference.load_run(sft_run)
  assert run.cfg.model.vocab_size == run.tokenizer.vocab_size + 4  # grown from the pretrained 512 rows
  assert run.cfg.init_from == pretrained and run.step == 40
  template = _template(run.tokenizer)
  params = SamplingParams(max_new_tokens=12, stop_tokens=(template.end_id,))
  for prompt, response in PAIRS:
    result = run.engine.generate_one(template.prompt([('user', prompt)]), params)
    assert result.tokens[-1] == template.end_id
    assert run.tokenizer.decode(result.tokens) == response



def test_served_chat_completions_use_the_template_and_stop_at_its_end(sft_run):
  """/v1/chat/completions of a fine-tuned run: the same prompt ids and reply as the template gives the engine,
  and a role the template does not know is a 400 naming it."""
  from llm_jax.serve import openai_api, service
  run = inference.load_run(sft_run)
  app = service.App(run, 'sft', max_batch=4, batch_wait_s=0.0)
  try:
    for prompt, response in PAIRS[:2]:
      body = {'messages': [{'role': 'user', 'content': prompt}], 'max_tokens': 12, 'temperature': 0}
      parsed, answer = app.complete(body, chat=True)
      assert parsed.prompts == [app.template.prompt([('user', prompt)])]
      assert parsed.sampling.stop_tokens == (app.template.end_id,) and '\nuser:' not in parsed.sampling.stop_strings
      assert answer['choices'][0]['message']['content'] == response
      assert answer['choices'][0]['finish_reason'] == 'stop'
    with pytest.raises(openai_api.ApiError, match="role 'robot' is not one of this run's chat roles"):
      app.complete({'messages': [{'role': 'robot', 'content': 'hi'}]}, chat=True)
  finally:
    app.close()

def test_init_from_loads_params_and_grows_the_vocabulary(pretrained, tmp_path):
  cfg = finetune.resolve(sft_config(pretrained, 'unused.jsonl'))
  pre = config_lib.from_json_file(os.path.join(pretrained, 'config.json'))
  assert cfg.model.vocab_size == pre.model.vocab_size + 4 and cfg.data.tokenizer.startswith(pretrained)
  mesh, rules = sharding.make_mesh(cfg.mesh), sharding.rules_from_config(cfg.mesh)
  from llm_jax.train.state import param_shardings
  grown, step = params_lib.from_init(cfg, mesh, rules, param_shardings(build_model(cfg.model), mesh, rules))
  old = inference.load_run(pretrained).params
  assert step == 2
  emb, old_emb = np.asarray(grown['embedding']), np.asarray(old['embedding'])
  np.testing.assert_array_equal(emb[:512], old_emb)
  new = emb[512:]
  assert len({row.tobytes() for row in new}) == 4  # the markers differ from the first step
  assert abs(new.std() / old_emb.std() - 1) < 0.5 and abs(new.mean() - old_emb.mean()) < 3 * old_emb.std()
  np.testing.assert_array_equal(np.asarray(grown['layers']['mlp']['up']), np.asarray(old['layers']['mlp']['up']))


def test_init_from_reads_a_scanned_run_into_unrolled_layers(pretrained):
  # The Quick start's recipe unrolls its layers; runs trained scanned (the tests' tiny:tiny, older demos)
  # still fine-tune with it: the same weights, one layer per entry.
  cfg = finetune.resolve(sft_config(pretrained, 'unused.jsonl', ('model.scan_layers', 'False')))
  mesh, rules = sharding.make_mesh(cfg.mesh), sharding.rules_from_config(cfg.mesh)
  from llm_jax.train.state import param_shardings
  unrolled, _ = params_lib.from_init(cfg, mesh, rules, param_shardings(build_model(cfg.model), mesh, rules))
  old = inference.load_run(pretrained).params
  assert 'layers' not in unrolled and sorted(k for k in unrolled if k.startswith('layers_')) == ['layers_0', 'layers_1']
  for i in range(2):
    np.testing.assert_array_equal(np.asarray(unrolled[f'layers_{i}']['attn']['q']),
                                  np.asarray(old['layers']['attn']['q'])[i])


def test_init_from_refuses_another_architecture_naming_the_key(pretrained):
  with pytest.raises(UserError, match=r'model.num_layers=3 differs from the pretrained model .*\(2\)'):
    finetune.resolve(sft_config(pretrained, 'x.jsonl', ('model.num_layers', '3')))
  with pytest.raises(UserError, match='init_from=.*the workdir does not exist'):
    finetune.resolve(sft_config('/nonexistent/run', 'x.jsonl'))


def test_sft_reads_jsonl_only(pretrained, tmp_path):
  (tmp_path / 'a.txt').write_text('hello')
  cfg = sft_config(pretrained, str(tmp_path / 'a.txt'))
  with pytest.raises(UserError, match=r"is not .jsonl; data.objective='sft' reads JSONL records"):
    loop.train(cfg, str(tmp_path / 'run'))


def _chat(monkeypatch, capsys, workdir, text, *flags):
  monkeypatch.setattr('sys.stdin', io.StringIO(text))
  code = cli.main(['chat', f'--workdir={workdir}', *flags])
  out = capsys.readouterr()
  return code, out.out, out.err


def test_chat_keeps_the_conversation_and_drops_the_oldest_turns(sft_run, monkeypatch, capsys):
  code, out, err = _chat(monkeypatch, capsys, sft_run, 'What is the capital of France?\n\nnot read\n')
  assert code == 0 and out.splitlines() == ['Paris.'] and not err
  # Turns of ~10-20 tokens each overflow the 64 - 32 tokens of room by the third: the oldest go, with a note.
  code, out, err = _chat(monkeypatch, capsys, sft_run, 'What is the capital of France?\nSay hi\nSay hi\n')
  assert code == 0 and len(out.splitlines()) == 3 and out.splitlines()[0] == 'Paris.'
  assert 'dropped the oldest 1 turn(s)' in err


def test_chat_prompt_holds_the_earlier_turns_until_they_must_go(tokenizer):
  from llm_jax.commands.chat import fit
  template = _template(tokenizer)
  system = [('system', 'Be brief.')]
  turns = [[('user', 'one'), ('assistant', 'uno')], [('user', 'two'), ('assistant', 'dos')], [('user', 'three')]]
  ids, dropped = fit(template, system, list(turns), room=1000)
  assert dropped == 0 and ids == template.prompt(system + [m for t in turns for m in t])
  assert ids[-1] == template.marker('assistant')
  smaller = len(template.prompt(system + turns[1] + turns[2]))
  kept = list(turns)
  ids, dropped = fit(template, system, kept, room=smaller)
  assert dropped == 1 and kept == turns[1:] and ids[:6] == template.prompt(system)[:6]


@pytest.mark.parametrize('which,needle', [
    ('missing', 'does not exist'), ('pretrained', "data.objective='causal' and has no chat template"),
    ('garbage', 'config.json'),
])
def test_chat_refuses_bad_input_in_one_line(which, needle, pretrained, tmp_path, monkeypatch, capsys):
  workdir = {'missing': str(tmp_path / 'nope'), 'pretrained': pretrained, 'garbage': str(tmp_path)}[which]
  (tmp_path / 'config.json').write_text('{not json')
  code, out, err = _chat(monkeypatch, capsys, workdir, 'hi\n')
  assert code == 2 and err.count('\n') == 1 and err.startswith('llm-jax: error: ') and needle in err


def test_a_source_with_no_usable_record_stops_with_one_line(pretrained, tmp_path):
  # A DPO file handed to SFT: every record lacks 'response'. Reading it forever would hang the run.
  source = write_jsonl(tmp_path / 'prefs.jsonl', [{'prompt': 'q', 'chosen': 'a', 'rejected': 'b'}] * 3)
  cfg = sft_config(pretrained, source)
  with pytest.raises(UserError, match=r"documents in a row could not be used.*prefs.jsonl:\d: field 'response' is "
                                      'missing'):
    loop.train(cfg, str(tmp_path / 'run'))
