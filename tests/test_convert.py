"""Hugging Face interop without torch: tokenizers with other special ids, checkpoints read and written as
safetensors, and bad HF directories refused with one line that names the problem."""

import io

import sentencepiece as spm

from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.infer import stops


def _t5_style_tokenizer() -> tokenizer_lib.Tokenizer:
  """pad 0, eos 1, unk 2 and no BOS, like T5's spiece.model."""
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(['hello world foo bar baz'] * 50 + ['the quick brown fox'] * 50),
      model_writer=out, vocab_size=40, model_type='bpe', pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      minloglevel=2)
  return tokenizer_lib.Tokenizer(out.getvalue())


def test_special_ids_come_from_the_sentencepiece_model():
  tok = _t5_style_tokenizer()
  assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.bos_id) == (0, 1, 2, -1)
  ids = tok.encode('hello fox')
  # Specials and ids past the tokenizer (a model's table may be larger) decode to nothing.
  assert tok.decode([1, 0, 2] + ids + [1, 40, 10_000]) == tok.decode(ids) == 'hello fox'
  pieces = stops.token_bytes(tok, 64)
  assert pieces[0] == pieces[1] == pieces[2] == pieces[50] == b''
  assert b''.join(pieces[i] for i in ids) == b' hello fox'  # sentencepiece's dummy prefix space


# ---------------------------------------------------------------------------------------------------------
# Round trips through a Hugging Face directory, and the work directory an import makes.

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from conftest import ROOT, recipe_config, tiny_config  # noqa: E402

from llm_jax import atomic, config as config_lib, convert, sharding  # noqa: E402
from llm_jax.run import workdir as workdir_lib
from llm_jax.run.checkpoint import Checkpointer, open_for_reading  # noqa: E402
from llm_jax.errors import UserError  # noqa: E402
from llm_jax.models import build_model  # noqa: E402
from llm_jax.train.state import abstract_params, init_params  # noqa: E402


def _workdir(path, cfg, tokenizer_path=None) -> str:
  """A run's directory holding the config's random initial params (no training to compile)."""
  os.makedirs(path)
  config_lib.write_json_atomic(cfg, workdir_lib.config_path(path))
  if tokenizer_path:
    shutil.copyfile(tokenizer_path, os.path.join(path, workdir_lib.TOKENIZER))
  model = build_model(cfg.model)
  params = jax.jit(lambda: init_params(model, jax.random.PRNGKey(1)))()
  ckpt = Checkpointer(path, async_save=False)
  ckpt.save_params(3, params, cfg.to_dict())
  ckpt.close()
  return path


def _params(path):
  cfg = workdir_lib.load_config(path)
  mesh = sharding.make_mesh(cfg.mesh)
  ckpt = open_for_reading(path)
  try:
    step, params = ckpt.restore_latest_params(abstract_params(build_model(cfg.model), mesh,
                                                              sharding.rules_from_config(cfg.mesh)))
    return step, jax.device_get(params)
  finally:
    ckpt.close()


@pytest.mark.parametrize('recipe,layout', [
    ('tiny', 'LlamaForCausalLM'), ('gpt2_124m', 'GPT2LMHeadModel'), ('bert_base', 'BertForMaskedLM'),
    ('t5_small', 'T5ForConditionalGeneration')])
def test_to_hf_then_from_hf_gives_back_the_same_params(tmp_path, tokenizer_path, recipe, layout):
  cfg = tiny_config(('model.scan_layers', 'false')) if recipe == 'tiny' else recipe_config(recipe)
  run = _workdir(str(tmp_path / 'run'), cfg, tokenizer_path)
  summary = convert.to_hf(run, str(tmp_path / 'hf'))
  assert summary['architecture'] == layout
  hf_config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert hf_config['architectures'] == [layout]
  # The tests' sentencepiece model is BPE: transformers reads it as LlamaTokenizer's tokenizer.model whatever
  # the family (a Unigram one, as T5's own, is written as T5Tokenizer's spiece.model).
  assert (tmp_path / 'hf' / 'tokenizer.model').is_file()
  convert.from_hf(str(tmp_path / 'hf'), str(tmp_path / 'back'), say=lambda msg: None)
  step, want = _params(run)
  again, got = _params(str(tmp_path / 'back'))
  assert (step, again) == (3, 0)
  if recipe == 'tiny':  # the run unrolled its layers; the import scans them: compare stacked
    want = convert.from_layout(want)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  back = workdir_lib.load_config(str(tmp_path / 'back'))
  for key in ('family', 'vocab_size', 'num_layers', 'embed_dim', 'num_heads', 'num_kv_heads', 'head_dim',
              'mlp_dim', 'norm_type', 'norm_position', 'mlp_activation', 'mlp_gated', 'use_bias', 'position_type',
              'tie_embeddings', 'scale_attention', 'norm_eps'):
    assert back.model[key] == cfg.model[key], key


@pytest.mark.slow
def test_an_imported_run_evaluates_generates_and_trains(tmp_path, tokenizer_path):
  cfg = tiny_config(('data.tokenizer', tokenizer_path))
  run = _workdir(str(tmp_path / 'run'), cfg, tokenizer_path)
  convert.to_hf(run, str(tmp_path / 'hf'))
  res = _cli('convert', 'from-hf', str(tmp_path / 'hf'), f'--output={tmp_path / "imported"}',
             '--config.train.steps=2', '--config.eval.every=0', '--config.data.heldout_percent=5')
  assert res.returncode == 0, res.stderr
  assert 'LlamaForCausalLM' in res.stdout and 'with its sentencepiece tokenizer' in res.stdout
  imported = str(tmp_path / 'imported')
  # Greedy generation from the import equals generation from the original run.
  outs = [_cli('generate', f'--workdir={w}', '--prompt=import os', '--max_new_tokens=5') for w in (run, imported)]
  assert outs[0].returncode == 0 and outs[0].stdout == outs[1].stdout, outs[1].stderr
  res = _cli('train', f'--workdir={imported}')
  assert res.returncode == 0, res.stderr
  assert 'starting from the params of step 0' in res.stdout
  assert _params(imported)[0] == 2


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'llm_jax.cli', *args], capture_output=True, text=True, cwd=ROOT,
                        timeout=300)


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line that names the architecture or tensor, and nothing left in the output's place.


@pytest.fixture(scope='module')
def gpt2_hf(tmp_path_factory):
  root = tmp_path_factory.mktemp('gpt2')
  run = _workdir(str(root / 'run'), recipe_config('gpt2_124m'))
  convert.to_hf(run, str(root / 'hf'))
  return str(root / 'hf')


def _variant(tmp_path, src, config_change=None, tensors_change=None) -> str:
  dst = str(tmp_path / 'variant')
  shutil.copytree(src, dst)
  if config_change:
    config = json.loads(open(os.path.join(dst, 'config.json')).read())
    config_change(config)
    with open(os.path.join(dst, 'config.json'), 'w') as f:
      json.dump(config, f)
  if tensors_change:
    tensors = load_file(os.path.join(dst, 'model.safetensors'))
    tensors_change(tensors)
    save_file(tensors, os.path.join(dst, 'model.safetensors'), metadata={'format': 'pt'})
  return dst


def _refused(src, tmp_path, needle):
  output = tmp_path / 'out'
  with pytest.raises(UserError, match=needle):
    convert.from_hf(src, str(output), say=lambda msg: None)
  assert not output.exists()
  assert not [p for p in os.listdir(tmp_path) if p.startswith('.out')], 'a temporary directory was left behind'


def test_unsupported_architecture_is_named(tmp_path, gpt2_hf):
  src = _variant(tmp_path, gpt2_hf, lambda c: c.update(model_type='falcon', architectures=['FalconForCausalLM']))
  _refused(src, tmp_path, r'architecture FalconForCausalLM \(model_type .falcon.\) is not supported')


def test_settings_llm_jax_cannot_reproduce_are_named(tmp_path, gpt2_hf):
  src = _variant(tmp_path, gpt2_hf, lambda c: c.update(scale_attn_by_inverse_layer_idx=True))
  _refused(src, tmp_path, 'scale_attn_by_inverse_layer_idx=True is not supported')


def test_a_config_field_no_converter_understands_is_named(tmp_path, gpt2_hf):
  src = _variant(tmp_path, gpt2_hf, lambda c: c.update(attn_temperature=0.5))
  _refused(src, tmp_path, r"config.json attn_temperature=0.5 is not understood by the GPT2LMHeadModel converter")


def _as_llama(rope: dict):
  def change(c):
    c.clear()
    c.update(model_type='llama', architectures=['LlamaForCausalLM'], vocab_size=320, hidden_size=64,
             num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, **rope)
  return change


@pytest.mark.parametrize('rope,needle', [
    ({'rope_scaling': {'rope_type': 'yarn', 'factor': 4.0}}, r"rotary scaling rope_type='yarn' is not supported"),
    ({'rope_scaling': {'type': 'dynamic', 'factor': 2.0}}, r"rotary scaling rope_type='dynamic' is not supported"),
    ({'rope_parameters': {'rope_type': 'longrope', 'rope_theta': 1e4}}, r"rope_type='longrope' is not supported"),
    ({'rope_parameters': {'rope_type': 'llama3', 'factor': 8.0, 'rope_theta': 1e4}},
     r"rope_type='llama3' has no low_freq_factor"),
    ({'rope_parameters': {'rope_type': 'linear', 'factor': 2.0, 'attention_factor': 0.5}},
     r"rotary scaling attention_factor=0.5 is not supported for rope_type='linear'"),
])
def test_rotary_scalings_llm_jax_lacks_are_named(tmp_path, gpt2_hf, rope, needle):
  _refused(_variant(tmp_path, gpt2_hf, _as_llama(rope)), tmp_path, needle)


def test_config_and_weights_that_disagree_name_the_tensor(tmp_path, gpt2_hf):
  more = _variant(tmp_path, gpt2_hf, lambda c: c.update(n_layer=3))
  _refused(more, tmp_path, r'no tensor transformer\.h\.2\.ln_1\.weight \(config.json has 3 layers\)')
  shutil.rmtree(more)
  fewer = _variant(tmp_path, gpt2_hf, lambda c: c.update(n_layer=1))
  _refused(fewer, tmp_path, r'the weights hold transformer\.h\.1\..*which config.json does not describe')
  shutil.rmtree(fewer)
  wider = _variant(tmp_path, gpt2_hf, lambda c: c.update(n_inner=200))
  _refused(wider, tmp_path, r'tensor transformer\.h\.0\.mlp\.c_fc\.weight has shape \(64, 256\), but config.json '
           r'describes \(64, 200\)')


def test_a_missing_tensor_is_named(tmp_path, gpt2_hf):
  src = _variant(tmp_path, gpt2_hf, tensors_change=lambda t: t.pop('transformer.ln_f.weight'))
  _refused(src, tmp_path, r'the weights have no tensor transformer\.ln_f\.weight')


def test_missing_files_and_occupied_outputs(tmp_path, gpt2_hf):
  src = _variant(tmp_path, gpt2_hf)
  os.remove(os.path.join(src, 'model.safetensors'))
  open(os.path.join(src, 'pytorch_model.bin'), 'wb').close()
  _refused(src, tmp_path, r'has no model\.safetensors.*pytorch_model\.bin: save the model with safe_serialization')
  os.remove(os.path.join(src, 'config.json'))
  _refused(src, tmp_path, r'has no config\.json')
  occupied = tmp_path / 'occupied'
  occupied.mkdir()
  (occupied / 'keep.txt').write_text('mine')
  res = _cli('convert', 'from-hf', gpt2_hf, f'--output={occupied}')
  assert res.returncode == 2 and 'exists and is not empty' in res.stderr and len(res.stderr.splitlines()) == 1
  assert os.listdir(occupied) == ['keep.txt']


def test_a_layout_without_a_hugging_face_architecture_is_refused(tmp_path):
  cfg = tiny_config(('model.position_type', 'learned'), ('model.max_positions', '64'))  # LLaMA, learned positions
  run = _workdir(str(tmp_path / 'run'), cfg)
  with pytest.raises(UserError, match=r"closest is LlamaForCausalLM, which differs in model.position_type='learned' "
                                      r"\(needs 'rope'\)"):
    convert.to_hf(run, str(tmp_path / 'hf'))
  assert not (tmp_path / 'hf').exists()


def test_a_sharded_checkpoint_reads_like_one_file(tmp_path, gpt2_hf):
  src = _variant(tmp_path, gpt2_hf)
  tensors = load_file(os.path.join(src, 'model.safetensors'))
  os.remove(os.path.join(src, 'model.safetensors'))
  names = sorted(tensors)
  shards = {'model-00001-of-00002.safetensors': names[:len(names) // 2],
            'model-00002-of-00002.safetensors': names[len(names) // 2:]}
  for file, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, os.path.join(src, file), metadata={'format': 'pt'})
  with open(os.path.join(src, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {}, 'weight_map': {k: file for file, keys in shards.items() for k in keys}}, f)
  convert.from_hf(src, str(tmp_path / 'sharded'), say=lambda msg: None)
  convert.from_hf(gpt2_hf, str(tmp_path / 'single'), say=lambda msg: None)
  for a, b in zip(jax.tree.leaves(_params(str(tmp_path / 'sharded'))[1]),
                  jax.tree.leaves(_params(str(tmp_path / 'single'))[1])):
    np.testing.assert_array_equal(a, b)


def test_a_failed_conversion_leaves_none_of_the_directories_it_made(tmp_path):
  with pytest.raises(RuntimeError):
    with atomic.new_directory(str(tmp_path / 'a' / 'b' / 'out')) as tmp:
      open(os.path.join(tmp, 'half.safetensors'), 'w').close()
      raise RuntimeError('the write failed half way')
  assert os.listdir(tmp_path) == []
  with atomic.new_directory(str(tmp_path / 'a' / 'b' / 'out')) as tmp:  # a success keeps them
    open(os.path.join(tmp, 'model.safetensors'), 'w').close()
  assert os.listdir(tmp_path / 'a' / 'b' / 'out') == ['model.safetensors']
