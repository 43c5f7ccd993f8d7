"""Evaluation: multiple-choice scores are the model's log-likelihoods split the harness's way, and --data
scores every document of any source."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.evaluate import heldout, tasks
from llm_jax.errors import UserError
from random_run import make_run


@pytest.fixture(scope='module')
def run(tokenizer_path):
  return make_run(tokenizer_path)


def test_trailing_spaces_of_the_context_move_into_the_choice(tokenizer):
  context_ids, choice_ids = tasks.encode_pair(tokenizer, 'x = ', '1', [1])
  assert context_ids == [1] + tokenizer.encode('x =')
  assert tokenizer.decode(choice_ids) == ' 1'


@functools.partial(jax.jit, static_argnums=2)
def _log_softmax(params, ids, model):
  return jax.nn.log_softmax(model.apply({'params': params}, ids, jnp.arange(ids.shape[1])[None],
                                        jnp.ones_like(ids))[0][0], axis=-1)


def _loglik_by_full_forward(run, context, choice):
  ctx, ch = tasks.encode_pair(run.tokenizer, context, choice, [run.tokenizer.bos_id])
  ids = np.zeros((1, 32), np.int32)  # one padded shape, one compilation; the model is causal
  ids[0, :len(ctx + ch)] = ctx + ch
  logp = _log_softmax(run.params, jnp.asarray(ids), run.model)
  return float(sum(logp[len(ctx) - 1 + k, t] for k, t in enumerate(ch)))


def test_choices_are_ranked_by_their_log_likelihood_after_the_context(run):
  items = [tasks.Item('import os\nimport ', ['sys', 'json', 'zz'], 0),
           tasks.Item('def f(x):\n    return ', ['x', 'x + 1'], 1),
           tasks.Item('for i in ', ['range(10):', 'items:'], 0)]
  got = tasks.choice_logliks(run, items, batch_size=4)
  want = [[_loglik_by_full_forward(run, i.context, c) for c in i.choices] for i in items]
  np.testing.assert_allclose(np.concatenate(got), np.concatenate(want), atol=1e-3)
  # Point gold at the best choice of two items and the worst of the third: accuracy is exactly 2/3.
  for item, lls, best in zip(items, want, (True, True, False)):
    item.gold = int(np.argmax(lls) if best else np.argmin(lls))
  assert tasks.evaluate(run, items, batch_size=4)['accuracy'] == pytest.approx(2 / 3)


def test_an_empty_context_without_bos_scores_every_choice_token_after_the_first_and_says_so(tokenizer_path, run):
  nobos = make_run(tokenizer_path, ('data.add_bos', 'false'))  # the same params: the same seed
  items = [tasks.Item('', ['import sys', 'for i in range(3):'], 0)]
  got = tasks.choice_logliks(nobos, items, batch_size=4)[0]
  for choice, ll in zip(items[0].choices, got):
    ids = nobos.tokenizer.encode(choice)
    padded = np.zeros((1, 32), np.int32)
    padded[0, :len(ids)] = ids
    logp = _log_softmax(nobos.params, jnp.asarray(padded), nobos.model)
    assert len(ids) > 2
    np.testing.assert_allclose(ll, sum(float(logp[k - 1, ids[k]]) for k in range(1, len(ids))), atol=1e-3)
  assert tasks.evaluate(nobos, items, batch_size=4)['choices_first_token_unscored'] == 2
  assert tasks.evaluate(run, items, batch_size=4)['choices_first_token_unscored'] == 0  # BOS predicts it
  one = next(w for w in ('x', 'a', 'for', 'import', '=') if len(nobos.tokenizer.encode(w)) == 1)
  with pytest.raises(UserError, match='task item 1: the choice .* no token of it has a predecessor'):
    tasks.choice_logliks(nobos, [tasks.Item('', [one], 0)], batch_size=4)


def test_bad_task_files_name_the_line(tmp_path):
  path = tmp_path / 't.jsonl'
  path.write_text('{"context": "a", "choices": ["b", "c"], "gold": 0}\n\n{"context": "a", "choices": ["b"], '
                  '"gold": 3}\n')
  with pytest.raises(UserError, match=r't.jsonl:3: "gold" must be an index'):
    tasks.read(str(path))
  path.write_text('{"context": "a", "choices": []}\n')
  with pytest.raises(UserError, match='"choices" must be a non-empty list'):
    tasks.read(str(path))


def test_data_flag_scores_every_document_of_a_source(run, tmp_path):
  texts = [f'value_{i} = {i} * {i}\n' for i in range(12)]
  for i, t in enumerate(texts):
    (tmp_path / f'doc{i}.txt').write_text(t)
  result = heldout.evaluate_run(run, data=str(tmp_path / '*.txt'))
  assert result['documents'] == 12  # both splits of the source
  # Every token after BOS is predicted once: the document's tokens and its EOS.
  assert result['tokens'] == sum(len(run.tokenizer.encode(t)) + 1 for t in texts)
  assert result['bytes'] == sum(len(t.encode()) for t in texts)
  with pytest.raises(UserError, match='matches no files'):
    heldout.evaluate_run(run, data=str(tmp_path / '*.none'))
