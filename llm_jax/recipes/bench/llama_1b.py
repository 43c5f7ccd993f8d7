"""A LLaMA-shaped 1B model for the training and decoding benchmarks.

16 layers, d 2048, 16 heads (no grouping, like the references in ../shared/bench/), SwiGLU 5632, RMSNorm,
vocabulary 32000, rows of 2048 tokens, batch 8.

Training (tools/bench_train.py, issue 9) times it against the torch.compile reference's llama1b shape:
bfloat16 compute over float32 master weights on an accelerator (model.dtype='auto'), flash attention
(model.attention_impl='auto': Pallas on GPU), no rematerialisation (8 x 2048 tokens of a 1B model fit in 80 GB without
it), scanned layers, the optimizer update inside the one jitted step.
Decoding (tools/bench_decode.py, issue 8) loads the same shape with bfloat16 weights (its --param_dtype), as
the Hugging Face reference serves them.

Variants: `bench/llama_1b:tiny` keeps the layout at CPU size (the benchmarks' smoke tests).
"""

from llm_jax.config import default_config


def get_config(arg=None):
  c = default_config()
  c.model.update(vocab_size=32000, num_layers=16, embed_dim=2048, num_heads=16, num_kv_heads=16, head_dim=128,
                 mlp_dim=5632, dtype='auto', param_dtype='float32', remat='none', scan_layers=True,
                 attention_impl='auto')
  c.data.update(seq_len=2048, batch_size=8)
  c.train.update(learning_rate=3e-4, warmup_steps=100, weight_decay=0.1, grad_clip=1.0)
  c.eval.update(every=0)
  if arg == 'tiny':
    c.model.update(vocab_size=512, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=4, head_dim=16,
                   mlp_dim=176)
    c.data.update(seq_len=256, batch_size=8)
  elif arg:
    raise ValueError(f'unknown variant {arg!r} (known: tiny)')
  return c
