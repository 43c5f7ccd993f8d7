"""T5-small (60M): the encoder-decoder of Raffel et al. 2020, trained on span corruption.

6 + 6 layers of d 512, 8 heads of 64, ReLU MLP of 2048, pre-norm RMSNorm (eps 1e-6) without biases,
relative-position buckets (32, max distance 128), unscaled attention logits, output tied to the embedding;
span corruption with 15% noise in spans of mean length 3 and 100 sentinels, inputs of 512 and targets of 114
tokens (T5's pair), 128 rows per step.

Optimisation as T5's: Adafactor at 0.01 with inverse-square-root decay after 10k steps, no weight decay and
no global-norm clipping (Adafactor clips each update to RMS 1). Its 32128 ids are the tokenizer's pieces,
then the sentinels (<extra_id_0> the highest), then padding.

Variants: `t5_small:tiny` keeps the layout at CPU size (the tests train it end to end).
"""

from llm_jax.config import default_config


def get_config(arg=None):
  c = default_config()
  c.model.update(family='encdec', vocab_size=32128, num_layers=6, num_decoder_layers=6, embed_dim=512,
                 num_heads=8, num_kv_heads=8, head_dim=64, mlp_dim=2048, norm_type='rms', norm_position='pre',
                 norm_eps=1e-6, mlp_activation='relu', mlp_gated=False, use_bias=False, position_type='relative',
                 relative_buckets=32, relative_max_distance=128, scale_attention=False, tie_embeddings=True,
                 decoder_start_id=0, dropout_rate=0.1)
  c.data.update(objective='span', seq_len=512, target_len=114, batch_size=128, add_bos=False, add_eos=True,
                noise_density=0.15, mean_span_length=3.0, num_sentinels=100)
  c.train.update(steps=524_288, optimizer='adafactor', learning_rate=1e-2, schedule='rsqrt', warmup_steps=10_000,
                 weight_decay=0.0, grad_clip=0.0, log_every=100, checkpoint_every=10_000)
  c.eval.update(every=10_000, batches=20)
  if arg == 'tiny':
    c.model.update(vocab_size=640, num_layers=2, num_decoder_layers=2, embed_dim=64, num_heads=4, num_kv_heads=4,
                   head_dim=16, mlp_dim=128, dropout_rate=0.0)
    c.data.update(seq_len=64, target_len=16, batch_size=8, tokenizer_train_chars=300_000)
    c.train.update(steps=20, warmup_steps=5, log_every=5, checkpoint_every=10)
    c.eval.update(every=10, batches=2, max_tokens=4096)
  elif arg:
    raise ValueError(f'unknown variant {arg!r} (known: tiny)')
  return c
