"""The default recipe: a small LLaMA-style model on the built-in corpus, sized for a CPU in minutes.

Variants: `tiny:tiny` shrinks it further to run in seconds (what the tests use).
"""

from llm_jax.config import default_config


def get_config(arg=None):
  c = default_config()
  # Sized by measurement on 2 CPU cores (BENCHMARKS.md): at this compute, a narrow model on short rows
  # beats wider ones (d 192: 1.97 bits/byte held out, d 128: 1.89) and tied embeddings (1.92); halving the
  # batch for twice the steps changed nothing (1.895).
  c.model.update(vocab_size=4096, num_layers=4, embed_dim=128, num_heads=4, num_kv_heads=2, head_dim=32,
                 mlp_dim=352)
  # The CPU step against PyTorch's (BENCHMARKS.md, issue 21): four layers unrolled rather than scanned (a scan's
  # stacked activations cost more than its smaller program saves at this depth), and the loss taken 16
  # positions at a time, so a chunk's logits (16 x 16 x 4096 floats, 4 MiB) stay in cache through the softmax.
  c.model.scan_layers = False
  c.data.update(seq_len=128, batch_size=16)
  # Muon for the hidden matrices (issue 21, BENCHMARKS.md): at the same 1,500 steps the held-out bits per byte
  # go from 1.769 (AdamW) to 1.678, past xz -9's 1.701, for about a tenth more time per step. A peak rate of
  # 6e-3 did no better (1.680). 1,800 steps: what the faster step (matmul.py) buys in the minutes 1,500 took.
  c.train.update(steps=1800, optimizer='muon', learning_rate=3e-3, warmup_steps=100, log_every=50,
                 checkpoint_every=600, loss_chunk=16)
  c.eval.update(every=600, batches=4)
  if arg == 'tiny':
    c.model.scan_layers = True  # the tests' runs keep the schema's defaults: the path larger recipes take
    c.train.loss_chunk = 0
    c.train.optimizer = 'adamw'
    c.model.update(vocab_size=512, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=16,
                   mlp_dim=128)
    c.data.update(seq_len=64, batch_size=8, tokenizer_train_chars=300_000)
    c.train.update(steps=20, warmup_steps=5, log_every=5, checkpoint_every=10)
    c.eval.update(every=10, batches=2, max_tokens=4096)
  elif arg:
    raise ValueError(f'unknown variant {arg!r} (known: tiny)')
  return c
