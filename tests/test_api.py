"""The Python API (`llm_jax.load`): the README's example runs, and its methods give what the commands give."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llm_jax
from conftest import ROOT
from llm_jax.errors import UserError
from llm_jax.infer import inference
from llm_jax.infer.sampling import SamplingParams
from random_run import write_workdir


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, tokenizer_path):
  return write_workdir(str(tmp_path_factory.mktemp('api') / 'run'), tokenizer_path)


def test_the_readme_example_runs(workdir, capsys):
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    readme = f.read()
  [code] = re.findall(r'```python\n(import llm_jax\n.*?)```', readme, re.S)
  exec(code.replace("'runs/demo'", repr(workdir)), {})
  lines = capsys.readouterr().out.splitlines()
  assert re.fullmatch(r'\[-[\d.]+, -[\d.]+\]', lines[-1]) and re.fullmatch(r'-[\d.]+', lines[-2]), lines


def test_generate_score_and_chat(workdir):
  run = llm_jax.load(workdir)
  got = run.generate('import os', max_new_tokens=5)
  ids = inference.prompt_tokens(run, 'import os', 5)
  [want] = inference.complete(run, [ids], [SamplingParams(max_new_tokens=5)])
  assert (got.text, got.tokens, got.prompt_tokens) == (want.text, want.tokens, len(ids))
  samples = run.generate(['a', 'b'], temperature=1.0, num_samples=2, max_new_tokens=4)
  assert len(samples) == 4 and samples[0].tokens != samples[1].tokens
  # score: the log-softmax of the full forward pass at the continuation's tokens.
  context, continuation = 'def f(x):\n    return ', 'x + 1'
  ctx_ids = [run.tokenizer.bos_id] + run.tokenizer.encode('def f(x):\n    return')
  full = [run.tokenizer.bos_id] + run.tokenizer.encode('def f(x):\n    return x + 1')
  assert full[:len(ctx_ids)] == ctx_ids
  tokens = jnp.asarray([full])
  logits = run.model.apply({'params': run.params}, tokens, jnp.arange(len(full))[None], jnp.ones_like(tokens))[0][0]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  want = float(sum(logp[t - 1, full[t]] for t in range(len(ctx_ids), len(full))))
  np.testing.assert_allclose(run.score(context, continuation), want, atol=1e-4)
  assert run.score([(context, continuation), ('x', 'y')])[0] == pytest.approx(want, abs=1e-4)
  with pytest.raises(UserError, match='no chat template'):
    run.chat([('user', 'hi')])
  with pytest.raises(UserError, match='temperature'):
    run.generate('x', temperature=-1)
