"""The family and objective keys of the config: each bad value stops with one error that names its key."""

import pytest

from conftest import recipe_config, tiny_config
from llm_jax.errors import UserError


@pytest.mark.parametrize('recipe,key,value,needle', [
    ('tiny', 'model.family', 'rnn', 'model.family'),
    ('tiny', 'data.objective', 'mlm', "data.objective='mlm': expected 'causal' for model.family='decoder'"),
    ('tiny', 'model.norm_type', 'batch', 'model.norm_type'),
    ('tiny', 'model.norm_position', 'middle', 'model.norm_position'),
    ('tiny', 'model.mlp_activation', 'tanh', 'model.mlp_activation'),
    ('tiny', 'model.position_type', 'alibi', 'model.position_type'),
    ('tiny', 'model.head_dim', '15', 'model.head_dim=15: expected an even number (rotary embeddings)'),
    ('gpt2_124m', 'model.max_positions', '32', 'model.max_positions=32: expected at least the longest row, 64'),
    ('t5_small', 'model.relative_buckets', '7', 'model.relative_buckets'),
    ('t5_small', 'model.relative_max_distance', '8', 'model.relative_max_distance'),
    ('bert_base', 'model.type_vocab_size', '-1', 'model.type_vocab_size'),
    ('t5_small', 'model.decoder_start_id', '640', 'model.decoder_start_id=640'),
    ('t5_small', 'model.num_decoder_layers', '-2', 'model.num_decoder_layers'),
    ('t5_small', 'model.vocab_size', '300', 'model.vocab_size=300: expected at least 360'),
    ('bert_base', 'data.mask_rate', '0', 'data.mask_rate'),
    ('bert_base', 'data.mask_random_rate', '-0.1', 'data.mask_random_rate'),
    ('bert_base', 'data.mask_keep_rate', '0.95', 'data.mask_keep_rate'),
    ('t5_small', 'data.noise_density', '1.5', 'data.noise_density'),
    ('t5_small', 'data.mean_span_length', '0.5', 'data.mean_span_length'),
    ('t5_small', 'data.num_sentinels', '0', 'data.num_sentinels'),
    ('t5_small', 'data.target_len', '2', 'data.target_len=2: expected room for the targets'),
    ('bert_base', 'train.loss_chunk', '16', "train.loss_chunk=16: expected 0 for an encoder with biases"),
    ('t5_small', 'train.loss_chunk', '32', 'train.loss_chunk=32: expected a divisor of data.target_len=16'),
    ('tiny', 'model.rope_scaling.type', 'yarn', "model.rope_scaling.type='yarn': expected one of"),
    ('tiny', 'model.rope_scaling.factor', '0.5', 'model.rope_scaling.factor=0.5: expected at least 1'),
    ('gpt2_124m', 'model.rope_scaling.type', 'linear', "expected 'none' for model.position_type='learned'"),
    ('tiny', 'model.sliding_window', '-1', 'model.sliding_window=-1'),
    ('tiny', 'model.global_every', '2', 'model.global_every=2: expected 0 without model.sliding_window'),
    ('tiny', 'model.attn_logit_softcap', '-1.0', 'model.attn_logit_softcap=-1.0: expected non-negative'),
    ('bert_base', 'model.sliding_window', '4', "model.sliding_window=4: expected 0 for model.family other than"),
    ('t5_small', 'model.qk_norm', 'true', "model.qk_norm=True: expected False for model.family other than"),
    ('bert_base', 'model.post_norms', 'true', 'model.post_norms'),
])
def test_bad_family_keys_name_the_key(recipe, key, value, needle):
  load = tiny_config if recipe == 'tiny' else (lambda *o: recipe_config(recipe, *o))
  with pytest.raises(UserError, match=needle.replace('(', r'\(').replace(')', r'\)')):
    load((key, value))


def test_the_recipes_hold_their_published_shapes():
  """The full-size recipes describe the published models (parameter counts from the papers' tables)."""
  import jax

  from llm_jax.models import build_model
  from llm_jax.train.state import init_params
  from llm_jax import config as config_lib

  def count(name, **vocab):
    cfg = config_lib.load(name)
    model = build_model(cfg.model)
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    return sum(a.size for a in jax.tree.leaves(shapes))

  assert abs(count('gpt2_124m') - 124.4e6) < 0.2e6  # 124M with GPT-2's 50257 ids; 50304 adds 36k
  assert abs(count('bert_base') - 109.5e6) < 0.6e6  # 110M (BERT-base's table; its pooler is not here)
  assert abs(count('t5_small') - 60.5e6) < 0.5e6  # 60M


def test_llama3_scaling_needs_ordered_frequency_factors_and_cudnn_has_no_softcap():
  with pytest.raises(UserError, match='model.rope_scaling.high_freq_factor=0.5: expected more than'):
    tiny_config(('model.rope_scaling.type', 'llama3'), ('model.rope_scaling.high_freq_factor', '0.5'))
  with pytest.raises(UserError, match="model.attention_impl='cudnn': expected 'auto' or 'xla' with "
                                      'model.attn_logit_softcap'):
    tiny_config(('model.attn_logit_softcap', '50.0'), ('model.attention_impl', 'cudnn'))
