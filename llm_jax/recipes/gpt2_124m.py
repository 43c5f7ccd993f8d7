"""GPT-2 small (124M): the decoder of Radford et al. 2019, trained as nanoGPT reproduces it.

Pre-norm LayerNorm with biases, learned positions, GELU (tanh form) MLP of 4 x d, tied embeddings, 12 layers
of d 768 and 12 heads, 1024-token rows.
Optimisation as nanoGPT's reproduction: ~0.5M tokens per step, AdamW at 6e-4, cosine to 6e-5.

The vocabulary is our own sentencepiece one, padded to a multiple of 64 as nanoGPT pads GPT-2's 50257; a
checkpoint imported from Hugging Face (`llm-jax convert from-hf`) keeps 50257.

Variants: `gpt2_124m:tiny` keeps the layout at CPU size (the tests train it end to end).
"""

from llm_jax.config import default_config


def get_config(arg=None):
  c = default_config()
  c.model.update(family='decoder', vocab_size=50304, num_layers=12, embed_dim=768, num_heads=12, num_kv_heads=12,
                 head_dim=64, mlp_dim=3072, norm_type='layer', norm_position='pre', norm_eps=1e-5,
                 mlp_activation='gelu_tanh', mlp_gated=False, use_bias=True, position_type='learned',
                 max_positions=1024, tie_embeddings=True, init_std=0.02)
  c.data.update(objective='causal', seq_len=1024, batch_size=480, add_bos=False, add_eos=True)
  c.train.update(steps=600_000, learning_rate=6e-4, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1,
                 beta1=0.9, beta2=0.95, grad_clip=1.0, log_every=100, checkpoint_every=5000)
  c.eval.update(every=5000, batches=20)
  if arg == 'tiny':
    c.model.update(vocab_size=512, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=4, head_dim=16,
                   mlp_dim=256, max_positions=64)
    c.data.update(seq_len=64, batch_size=8, tokenizer_train_chars=300_000)
    c.train.update(steps=20, learning_rate=3e-3, warmup_steps=5, log_every=5, checkpoint_every=10)
    c.eval.update(every=10, batches=2, max_tokens=4096)
  elif arg:
    raise ValueError(f'unknown variant {arg!r} (known: tiny)')
  return c
