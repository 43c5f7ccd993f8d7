"""BERT-base (110M): the encoder-only masked LM of Devlin et al. 2019.

Post-norm LayerNorm (eps 1e-12) with biases, learned positions and the token-type table, exact GELU,
12 layers of d 768 and 12 heads, tied masked-LM output with its own bias; 15% of tokens predicted by the
80/10/10 rule, rows of 512 tokens.
Optimisation as BERT's: AdamW at 1e-4 (beta2 0.999, eps 1e-6, weight decay 0.01), 10k warmup steps.

Our sentencepiece vocabulary takes BERT's 30522 ids less the one the mask token reserves.

Variants: `bert_base:tiny` keeps the layout at CPU size (the tests train it end to end).
"""

from llm_jax.config import default_config


def get_config(arg=None):
  c = default_config()
  c.model.update(family='encoder', vocab_size=30522, num_layers=12, embed_dim=768, num_heads=12, num_kv_heads=12,
                 head_dim=64, mlp_dim=3072, norm_type='layer', norm_position='post', norm_eps=1e-12,
                 mlp_activation='gelu', mlp_gated=False, use_bias=True, position_type='learned',
                 max_positions=512, type_vocab_size=2, tie_embeddings=True, init_std=0.02, dropout_rate=0.1)
  c.data.update(objective='mlm', seq_len=512, batch_size=256, add_bos=True, add_eos=True, mask_rate=0.15,
                mask_random_rate=0.1, mask_keep_rate=0.1)
  c.train.update(steps=1_000_000, learning_rate=1e-4, warmup_steps=10_000, min_lr_ratio=0.0, weight_decay=0.01,
                 beta1=0.9, beta2=0.999, eps=1e-6, grad_clip=1.0, log_every=100, checkpoint_every=10_000)
  c.eval.update(every=10_000, batches=20)
  if arg == 'tiny':
    c.model.update(vocab_size=576, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=4, head_dim=16,
                   mlp_dim=256, max_positions=64, dropout_rate=0.0)
    c.data.update(seq_len=64, batch_size=8, tokenizer_train_chars=300_000, whole_word_masking=True)
    c.train.update(steps=20, learning_rate=3e-3, warmup_steps=5, log_every=5, checkpoint_every=10)
    c.eval.update(every=10, batches=2, max_tokens=4096)
  elif arg:
    raise ValueError(f'unknown variant {arg!r} (known: tiny)')
  return c
