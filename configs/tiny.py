"""The default recipe: a small LLaMA-style model on the built-in corpus, sized for a CPU in minutes.

Variants: `configs/tiny.py:tiny` shrinks it further to run in seconds (what the tests use).
"""

from llm_jax.config import default_config


def get_config(arg=None):
  c = default_config()
  if arg == 'tiny':
    c.model.update(vocab_size=512, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=16,
                   mlp_dim=128)
    c.data.update(seq_len=64, batch_size=8, tokenizer_train_chars=300_000)
    c.train.update(steps=20, warmup_steps=5, log_every=5, checkpoint_every=10)
    c.eval.update(every=10, batches=2, max_tokens=4096)
  elif arg:
    raise ValueError(f'unknown variant {arg!r} (known: tiny)')
  return c
