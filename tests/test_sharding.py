"""Sharded equals unsharded: loss and gradients of a step on data / FSDP / tensor / sequence meshes equal one
device's; parameters really split; mesh and rule mistakes are one clear line."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import tiny_config

from llm_jax import sharding
from llm_jax.errors import UserError
from llm_jax.models import build_model
from llm_jax.train import optim
from llm_jax.train.state import StateFactory
from llm_jax.train.step import loss_and_stats, make_train_step


def _batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  B, T = cfg.data.batch_size, cfg.data.seq_len
  tokens = rng.integers(4, cfg.model.vocab_size, size=(B, T + 1), dtype=np.int32)
  segments = np.ones((B, T), np.int32)
  segments[:, T // 2:] = 2  # two documents per row: a sequence shard boundary falls inside each
  positions = np.concatenate([np.arange(T // 2), np.arange(T - T // 2)])[None].repeat(B, 0).astype(np.int32)
  mask = np.ones((B, T), np.int32)
  mask[0, :5] = 0  # uneven token counts per shard: the mean must still be over all tokens
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'loss_mask': mask,
          'segment_ids': segments, 'positions': positions}


def _setup(cfg, devices):
  mesh = sharding.make_mesh(cfg.mesh, devices)
  rules = sharding.rules_from_config(cfg.mesh)
  model = build_model(cfg.model)
  tx = optim.make_optimizer(cfg.train)
  factory = StateFactory(model, tx, mesh, rules)
  batch_sh = sharding.batch_sharding(mesh, rules)
  batch = {k: jax.device_put(v, batch_sh) for k, v in _batch(cfg).items()}
  return mesh, rules, model, tx, factory, batch_sh, batch


def _loss_and_grads(cfg, devices, host_params=None):
  """Loss and gradients of the first step: the train step's own loss function, mesh, rules and shardings.
  (`host_params` are placed on the mesh rather than initialised there again: one compile per mesh.)"""
  mesh, rules, model, _, factory, batch_sh, batch = _setup(cfg, devices)

  def fn(params, batch):
    with sharding.activation_sharding(mesh, rules):
      return jax.value_and_grad(lambda p: loss_and_stats(model, p, batch)[0])(params)
  if host_params is None:
    params = factory.init(cfg.seed).params
  else:
    params = jax.device_put(host_params, factory.param_shardings)
  loss, grads = jax.jit(fn, in_shardings=(factory.param_shardings, batch_sh),
                        out_shardings=(sharding.replicated(mesh), factory.param_shardings))(params, batch)
  return jax.device_get(params), jax.device_get(loss), jax.device_get(grads)


def _train_step(cfg, devices):
  """Metrics and parameters after one real (jitted, donated) train step."""
  mesh, rules, model, tx, factory, batch_sh, batch = _setup(cfg, devices)
  step = make_train_step(model, tx, optim.schedule(cfg.train), mesh, rules, factory.shardings, batch_sh)
  state, metrics = step(factory.init(cfg.seed), batch)
  return jax.device_get(metrics), state


ONE_DEVICE = tiny_config(('mesh.data', '1'))


@functools.lru_cache(maxsize=None)
def _reference():
  return _loss_and_grads(ONE_DEVICE, jax.devices()[:1])


MESHES = {
    'data8': {'data': 8},
    'fsdp8': {'data': 1, 'fsdp': 8},
    'data2_fsdp2_tensor2': {'data': 2, 'fsdp': 2, 'tensor': 2},
    'sequence8': {'data': 1, 'sequence': 8},
    'fsdp2_sequence2_tensor2': {'data': 1, 'fsdp': 2, 'sequence': 2, 'tensor': 2},
}


def _mesh_config(name):
  return tiny_config(*[(f'mesh.{axis}', str(size)) for axis, size in MESHES[name].items()])


@pytest.mark.parametrize('name', list(MESHES))
def test_loss_and_gradients_on_8_devices_equal_one_device(name):
  assert len(jax.devices()) == 8, 'conftest sets 8 fake CPU devices'
  params, loss1, grads1 = _reference()
  _, loss8, grads8 = _loss_and_grads(_mesh_config(name), jax.devices(), host_params=params)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads1), jax.tree.leaves(grads8)):
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
  # Not trivially equal: every gradient is non-zero.
  assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads1))


def test_train_step_on_8_devices_equals_one_device_and_splits_the_weights():
  m1, s1 = _train_step(ONE_DEVICE, jax.devices()[:1])
  m8, s8 = _train_step(_mesh_config('fsdp2_sequence2_tensor2'), jax.devices())
  np.testing.assert_allclose(m8['loss'], m1['loss'], rtol=1e-5)
  np.testing.assert_allclose(m8['grad_norm'], m1['grad_norm'], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(jax.device_get(s1.params)), jax.tree.leaves(jax.device_get(s8.params))):
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-4)
  # The weights, and the optimizer moments beside them, really are split as the preset says.
  gate = s8.params['layers']['mlp']['gate']  # [layers, embed, mlp]
  assert gate.sharding.spec == P(None, ('fsdp', 'sequence'), 'tensor')
  assert gate.addressable_shards[0].data.shape == (gate.shape[0], gate.shape[1] // 4, gate.shape[2] // 2)
  moments = [x for x in jax.tree.leaves(s8.opt_state) if x.shape == gate.shape]
  assert moments and all(x.sharding.spec == gate.sharding.spec for x in moments)


def test_presets_shard_parameters_as_named():
  P_ = P
  def spec(preset, names):
    rules = sharding.rules_from_config(tiny_config(('mesh.preset', preset)).mesh)
    return sharding.logical_to_spec(names, rules)
  assert spec('dp', ('embed', 'mlp')) == P_(None, None)
  assert spec('fsdp', ('embed', 'mlp')) == P_(('fsdp', 'sequence'), None)
  assert spec('fsdp_tp', ('embed', 'mlp')) == P_(('fsdp', 'sequence'), 'tensor')
  for preset in ('dp', 'fsdp', 'fsdp_tp'):
    # Activations: rows over data and fsdp, positions over sequence, whatever the preset.
    assert spec(preset, ('batch', 'seq', 'embed')) == P_(('data', 'fsdp'), 'sequence', None)
    assert spec(preset, ('batch', 'kv_seq', 'kv_heads', 'head_dim'))[1] is None


def test_extra_rules_go_before_the_preset():
  cfg = tiny_config(('mesh.rules', "(('mlp', None), ('vocab', 'fsdp'))"))
  rules = sharding.rules_from_config(cfg.mesh)
  assert sharding.logical_to_spec(('embed', 'mlp'), rules) == P(('fsdp', 'sequence'), None)
  # vocab claims fsdp first, so embed's (fsdp, sequence) is no longer free: flax's priority semantics.
  assert sharding.logical_to_spec(('vocab', 'embed'), rules) == P('fsdp', None)
  with pytest.raises(TypeError, match='cfg.mesh'):
    sharding.rules_from_config(cfg.mesh.rules)


def test_mesh_that_does_not_fit_the_devices_is_a_clear_error():
  with pytest.raises(UserError, match='needs 12 devices, 8 are present'):
    sharding.make_mesh(tiny_config(('mesh.data', '3'), ('mesh.fsdp', '2'), ('mesh.tensor', '2')).mesh)
  with pytest.raises(UserError, match='cannot fill 8 devices'):
    sharding.make_mesh(tiny_config(('mesh.tensor', '3')).mesh)
  with pytest.raises(UserError, match='slices/nodes do not divide the 8 devices'):
    sharding.make_mesh(tiny_config(('mesh.dcn_data', '3')).mesh)
  with pytest.raises(UserError, match=r"mesh.tensor has 2 devices but no rule of mesh.preset=fsdp"):
    sharding.make_mesh(tiny_config(('mesh.preset', 'fsdp'), ('mesh.tensor', '2')).mesh)


@pytest.mark.parametrize('key,value,needle', [
    ('mesh.rules', "(('embd', 'fsdp'),)", "names logical axis 'embd'"),
    ('mesh.rules', "(('embed', 'pod'),)", "names mesh axis 'pod'"),
    ('mesh.preset', 'zero3', "mesh.preset='zero3': expected one of ('dp', 'fsdp', 'fsdp_tp')"),
    ('mesh.sequence', '0', 'mesh.sequence=0: expected a positive integer or -1'),
    ('mesh.dcn_fsdp', '-1', 'mesh.dcn_fsdp=-1: expected a positive integer'),
])
def test_bad_mesh_config_names_the_key(key, value, needle):
  with pytest.raises(UserError, match=needle.replace('(', r'\(').replace(')', r'\)')):
    tiny_config((key, value))
  with pytest.raises(UserError, match='mesh.fsdp, mesh.tensor are all -1'):
    tiny_config(('mesh.data', '2'), ('mesh.fsdp', '-1'), ('mesh.tensor', '-1'))


def test_batch_and_arrays_that_do_not_split_evenly_are_named():
  mesh = sharding.make_mesh(tiny_config(('mesh.data', '1'), ('mesh.fsdp', '4'), ('mesh.sequence', '2')).mesh)
  rules = sharding.rules_from_config(tiny_config().mesh)
  sharding.check_batch(8, 64, mesh, rules)
  with pytest.raises(UserError, match=r'data.batch_size=6 is not divisible by the 4 batch shards of the mesh '
                                      r'\(mesh.data x mesh.fsdp\)'):
    sharding.check_batch(6, 64, mesh, rules)
  with pytest.raises(UserError, match=r'data.seq_len=63 is not divisible by the 2 sequence shards'):
    sharding.check_batch(8, 63, mesh, rules)
  # kv_heads=2 cannot split over tensor=4: the parameter, its axis and the sizes are named.
  cfg = tiny_config(('mesh.data', '2'), ('mesh.tensor', '4'))
  model = build_model(cfg.model)
  with pytest.raises(UserError, match=r'parameter layers/attn/k \(2, 64, 2, 16\): its kv_heads dimension \(2\) '
                                      r'does not split over tensor = 4 devices'):
    StateFactory(model, optim.make_optimizer(cfg.train), sharding.make_mesh(cfg.mesh),
                 sharding.rules_from_config(cfg.mesh))


class _FakeDevice:
  """Enough of a device for mesh_utils: an id, a kind, a process and (on TPU) a slice."""
  platform = device_kind = 'cpu'

  def __init__(self, id, process_index, slice_index=None):
    self.id, self.process_index = id, process_index
    if slice_index is not None:
      self.slice_index = slice_index

  def __repr__(self):
    return f'D{self.id}'


@pytest.mark.parametrize('dcn_axis', ['data', 'fsdp'])
def test_dcn_axes_span_slices_outermost(dcn_axis):
  # Two slices of 4 devices: the DCN factor is the outer half of its axis, each slice one contiguous half.
  devices = [_FakeDevice(i, process_index=i // 2, slice_index=i // 4) for i in range(8)]
  cfg = tiny_config(('mesh.data', '1'), ('mesh.fsdp', '2'), ('mesh.tensor', '2'), (f'mesh.dcn_{dcn_axis}', '2'))
  ici, dcn = sharding.mesh_layout(cfg.mesh, len(devices))
  assert ici == (1, 2, 1, 2) and dcn == ((2, 1, 1, 1) if dcn_axis == 'data' else (1, 2, 1, 1))
  array = sharding.hybrid_device_array(ici, dcn, devices)
  assert array.shape == tuple(i * d for i, d in zip(ici, dcn))
  axis = 0 if dcn_axis == 'data' else 1
  halves = np.split(array, 2, axis=axis)
  for s, half in enumerate(halves):
    assert {d.slice_index for d in half.flat} == {s}
  # Within a slice the tensor axis stays innermost: neighbours on it are devices of one slice.
  assert all(d.slice_index == array[..., 0].flat[k].slice_index for k, d in enumerate(array[..., 1].flat))


def test_dcn_without_slices_groups_processes_in_order():
  # Two GPU nodes, one process per GPU (4 per node): nodes are groups of consecutive processes.
  devices = [_FakeDevice(i, process_index=i) for i in range(8)]
  cfg = tiny_config(('mesh.data', '1'), ('mesh.fsdp', '4'), ('mesh.dcn_data', '2'))
  ici, dcn = sharding.mesh_layout(cfg.mesh, 8)
  array = sharding.hybrid_device_array(ici, dcn, devices)
  assert array.shape == (2, 4, 1, 1)
  assert [d.process_index for d in array[0].flat] == [0, 1, 2, 3]
  assert [d.process_index for d in array[1].flat] == [4, 5, 6, 7]
  # One process per node: processes are the granules.
  devices = [_FakeDevice(i, process_index=i // 4) for i in range(8)]
  array = sharding.hybrid_device_array(ici, dcn, devices)
  assert {d.process_index for d in array[1].flat} == {1}
  with pytest.raises(UserError, match='= 3 does not divide the 2 processes'):
    sharding.hybrid_device_array((1, 1, 1, 1), (3, 1, 1, 1), [_FakeDevice(i, process_index=i) for i in range(2)])
  with pytest.raises(UserError, match='= 4, but the devices span 2 slices'):
    sharding.hybrid_device_array((1, 2, 1, 1), (4, 1, 1, 1),
                                 [_FakeDevice(i, 0, slice_index=i // 4) for i in range(8)])


def test_decoding_on_a_context_parallel_mesh_equals_unsharded():
  # `generate` decodes on the run's own mesh: a sequence axis must not change a token.
  import test_decode
  from llm_jax.infer import decode
  _, model, params = test_decode._model()
  cfg = tiny_config(('mesh.data', '2'), ('mesh.sequence', '2'), ('mesh.tensor', '2'))
  mesh, rules = sharding.make_mesh(cfg.mesh), sharding.rules_from_config(cfg.mesh)
  engine = decode.Engine(model, test_decode._sharded_params(model, params, mesh, rules), eos_id=-1, mesh=mesh,
                         rules=rules)
  requests = [decode.Request(p, s) for p, s in zip(test_decode.PROMPTS, test_decode.MIXED)]
  alone = [test_decode._engine().generate([r])[0].tokens for r in requests]
  assert [r.tokens for r in engine.generate(requests)] == alone
