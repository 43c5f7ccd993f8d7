"""Golden shardings: every parameter of the llama_1b recipe under the fsdp_tp preset on 8 devices, compared
with tests/golden/llama_1b_fsdp_tp.json, so that any change to how weights are split shows up in review.

After an intended change, refresh the file and commit it with the change:

    LLM_JAX_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_golden_sharding.py
"""

import json
import os

import jax

from conftest import ROOT
from llm_jax import config as config_lib, sharding
from llm_jax.models import build_model
from llm_jax.train.state import abstract_params, param_logical_specs

GOLDEN = os.path.join(ROOT, 'tests', 'golden', 'llama_1b_fsdp_tp.json')
RECIPE = 'llama_1b'
MESH = {'data': 1, 'fsdp': 4, 'sequence': 1, 'tensor': 2}


def _spec_json(spec):
  return [list(e) if isinstance(e, tuple) else e for e in spec]


def current() -> dict:
  """Shape, logical axes, PartitionSpec and per-device shard shape of every parameter (no memory used)."""
  cfg = config_lib.load(RECIPE, [('mesh.preset', 'fsdp_tp')] + [(f'mesh.{a}', str(s)) for a, s in MESH.items()])
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.rules_from_config(cfg.mesh)
  model = build_model(cfg.model)
  shapes = abstract_params(model, mesh, rules)
  logical = jax.tree.leaves(param_logical_specs(model), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  params = {}
  for (path, a), names in zip(jax.tree_util.tree_leaves_with_path(shapes), logical):
    params[jax.tree_util.keystr(path, simple=True, separator='/')] = {
        'shape': list(a.shape), 'logical': list(names), 'spec': _spec_json(a.sharding.spec),
        'shard': list(a.sharding.shard_shape(a.shape))}
  return {'recipe': RECIPE, 'preset': 'fsdp_tp', 'mesh': MESH, 'params': params}


def _dumps(golden: dict) -> str:
  """JSON with one line per parameter, so that a review diff shows exactly the parameters that changed."""
  head = {k: v for k, v in golden.items() if k != 'params'}
  lines = [f'  {json.dumps(name)}: {json.dumps(p, sort_keys=True)}' for name, p in sorted(golden['params'].items())]
  return ('{\n' + ''.join(f' {json.dumps(k)}: {json.dumps(v, sort_keys=True)},\n' for k, v in sorted(head.items()))
          + ' "params": {\n' + ',\n'.join(lines) + '\n }\n}\n')


def test_llama_1b_fsdp_tp_shardings_match_the_golden_file():
  got = current()
  if os.environ.get('LLM_JAX_UPDATE_GOLDEN'):
    with open(GOLDEN + '.tmp', 'w') as f:
      f.write(_dumps(got))
    os.replace(GOLDEN + '.tmp', GOLDEN)
  with open(GOLDEN) as f:
    want = json.load(f)
  changed = [f'  {name}: {want["params"].get(name)} -> {got["params"].get(name)}'
             for name in sorted(set(want['params']) | set(got['params']))
             if want['params'].get(name) != got['params'].get(name)]
  assert not changed and want == got, (
      'parameter shardings of the llama_1b recipe (fsdp_tp, 8 devices) changed:\n' + '\n'.join(changed)
      + '\nIf intended, refresh with: LLM_JAX_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q '
        'tests/test_golden_sharding.py')
  # The file itself says something: FSDP x tensor split the big matrices eight ways.
  assert got['params']['layers/mlp/gate']['shard'] == [22, 512, 2816]
  assert got['params']['embedding']['spec'] == ['tensor', ['fsdp', 'sequence']]
