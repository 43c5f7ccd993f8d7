"""A LLaMA-shaped 1B model for decode benchmarks (tools/bench_decode.py): 16 layers, d 2048, 16 heads (no
grouping, like the Hugging Face reference in ../shared/bench/hf_decode_reference.py), SwiGLU 5632, vocab
32000, bf16 parameters and activations.

Variants: `configs/bench/llama_1b.py:tiny` keeps the layout at CPU size (the benchmark's smoke test).
"""

from llm_jax.config import default_config


def get_config(arg=None):
  c = default_config()
  c.model.update(vocab_size=32000, num_layers=16, embed_dim=2048, num_heads=16, num_kv_heads=16, head_dim=128,
                 mlp_dim=5632, dtype='bfloat16', param_dtype='bfloat16')
  c.data.update(seq_len=2048)
  if arg == 'tiny':
    c.model.update(vocab_size=512, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=4, head_dim=16,
                   mlp_dim=176)
    c.data.update(seq_len=256)
  elif arg:
    raise ValueError(f'unknown variant {arg!r} (known: tiny)')
  return c
