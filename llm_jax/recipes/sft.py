"""Supervised fine-tuning of a `tiny` run on chat data, the loss on the assistant's replies only.

JSONL of {"prompt", "response"} or {"messages": [{"role", "content"}, ...]} (data/chat.py).

    llm-jax train --config=sft --workdir=runs/sft --config.init_from=runs/tiny \\
        --config.data.source='data/sft/*.jsonl'

The model section is the `tiny` recipe's: it must match the pretrained run (model.vocab_size is set from it).
Variants: `tiny` pairs with `tiny:tiny` and runs in seconds; `lora` trains rank-8 adapters instead.
"""

from llm_jax.config import load_recipe


def get_config(arg=None):
  variants = set((arg or '').split(',')) - {''}
  unknown = variants - {'tiny', 'lora'}
  if unknown:
    raise ValueError(f'unknown variant {sorted(unknown)[0]!r} (known: tiny, lora)')
  c = load_recipe('tiny' + (':tiny' if 'tiny' in variants else ''))  # the model this fine-tunes
  c.data.update(objective='sft', source='data/sft/*.jsonl', heldout_percent=5)
  # Fine-tuning moves far less than pretraining: a tenth of the learning rate, short warmup, no decay of
  # the pretrained weights toward zero.
  # AdamW whatever the pretraining used: its step sizes are what these rates were chosen for, and LoRA's
  # adapters (the `lora` variant) are not matrices Muon is for.
  c.train.optimizer = 'adamw'
  c.train.update(steps=300, learning_rate=3e-4, warmup_steps=20, weight_decay=0.0, log_every=10,
                 checkpoint_every=100)
  c.eval.update(every=100, batches=2)
  if 'tiny' in variants:
    c.data.update(shards=1, heldout_percent=0)
    c.train.update(steps=20, learning_rate=1e-3, warmup_steps=2, log_every=5, checkpoint_every=20)
    c.eval.update(every=0)
  if 'lora' in variants:
    c.model.lora.update(rank=8, alpha=16.0, targets=('q', 'v', 'o'))
    c.train.update(learning_rate=c.train.learning_rate * 10)  # adapters start at zero: they need more
  return c
