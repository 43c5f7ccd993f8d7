"""A LLaMA-style 1.1B model (TinyLlama's shape) for pretraining on a TPU slice or a GPU node.

22 layers, d 2048, 32 query heads sharing 4 key/value heads, SwiGLU 5632, vocabulary 32000, context 2048;
bfloat16 compute over float32 master weights, full rematerialisation, FSDP over every device.

    llm-jax plan  --config=llama_1b --devices=8 --device_kind=h100  # does it fit? (any machine)
    llm-jax train --config=llama_1b --workdir=...                   # on the slice / node

16 rows of 2048 per device need about 40 GiB (plan's CPU estimate): 8 x H100 yes, a v5e-8 (16 GiB per
chip) only with --config.data.batch_size=32 or 32 chips.

Add tensor parallelism with --config.mesh.tensor=2 (the fsdp_tp preset splits heads, MLP and vocabulary over
it), context parallelism with --config.mesh.sequence=N, and slices / nodes with --config.mesh.dcn_data=N.

Variants: `llama_1b:tiny` keeps the layout (grouped-query attention, untied embeddings, the mesh
preset) at CPU size.
"""

from llm_jax.config import default_config


def get_config(arg=None):
  c = default_config()
  c.model.update(vocab_size=32000, num_layers=22, embed_dim=2048, num_heads=32, num_kv_heads=4, head_dim=64,
                 mlp_dim=5632, dtype='bfloat16', param_dtype='float32', remat='full')
  # 128 rows of 2048 tokens: 256K tokens a step, 100K steps ~ 26B tokens (a Chinchilla-plus budget for 1.1B).
  c.data.update(seq_len=2048, batch_size=128)
  c.train.update(steps=100_000, learning_rate=4e-4, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1,
                 log_every=50, checkpoint_every=1000)
  c.eval.update(every=2000, batches=16)
  c.mesh.update(data=1, fsdp=-1, sequence=1, tensor=1, preset='fsdp_tp')
  if arg == 'tiny':
    c.model.update(vocab_size=512, num_layers=2, embed_dim=64, num_heads=8, num_kv_heads=2, head_dim=8,
                   mlp_dim=176, dtype='float32', remat='none')
    c.data.update(seq_len=64, batch_size=8, tokenizer_train_chars=300_000)
    c.train.update(steps=20, warmup_steps=5, log_every=5, checkpoint_every=10)
    c.eval.update(every=10, batches=2, max_tokens=4096)
  elif arg:
    raise ValueError(f'unknown variant {arg!r} (known: tiny)')
  return c
