"""GPT-2 small (124M) at the training benchmark's shape, against the torch.compile reference.

tools/bench_train.py, issue 9: 12 layers, d 768, 12 heads, GELU (tanh) MLP 3072, LayerNorm, vocabulary 50304,
rows of 1024 tokens, batch 16: the shape of the torch.compile reference (../shared/bench/torch_reference.py
gpt124m) on one GPU.

The model keeps the `gpt2_124m` recipe's layout (learned positions, biases, tied embeddings); the reference
has no position table, no biases and an untied head, which changes no matmul FLOPs (the tied table is the
output projection, counted once either way; tests/test_bench_train.py checks the counts agree).
Speed levers as the defaults choose them on an accelerator: bfloat16 compute over float32 master weights
(model.dtype='auto'), flash attention (model.attention_impl='auto': Pallas on GPU), no rematerialisation (a 124M
model's activations at 16 x 1024 fit many times over), scanned layers, the optimizer update in the step.

Variants: `bench/gpt2_124m:tiny` keeps the layout at CPU size (the benchmark's smoke test).
"""

from llm_jax.config import default_config


def get_config(arg=None):
  c = default_config()
  c.model.update(family='decoder', vocab_size=50304, num_layers=12, embed_dim=768, num_heads=12, num_kv_heads=12,
                 head_dim=64, mlp_dim=3072, norm_type='layer', norm_position='pre', norm_eps=1e-5,
                 mlp_activation='gelu_tanh', mlp_gated=False, use_bias=True, position_type='learned',
                 max_positions=1024, tie_embeddings=True, init_std=0.02, dtype='auto', param_dtype='float32',
                 remat='none', scan_layers=True, attention_impl='auto')
  c.data.update(objective='causal', seq_len=1024, batch_size=16, add_bos=False, add_eos=True)
  c.train.update(learning_rate=6e-4, warmup_steps=100, weight_decay=0.1, beta2=0.95, grad_clip=1.0)
  c.eval.update(every=0)
  if arg == 'tiny':
    c.model.update(vocab_size=512, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=4, head_dim=16,
                   mlp_dim=256, max_positions=64)
    c.data.update(seq_len=64, batch_size=8)
  elif arg:
    raise ValueError(f'unknown variant {arg!r} (known: tiny)')
  return c
