"""Direct preference optimisation (DPO) of a fine-tuned run against its frozen self.

JSONL of {"prompt", "chosen", "rejected"}; the frozen reference model is the init_from run itself
(train/dpo.py).

    llm-jax train --config=dpo --workdir=runs/dpo --config.init_from=runs/sft \\
        --config.data.source='data/prefs/*.jsonl'

The model section is the `tiny` recipe's, like `sft`'s: it must match the run it starts from.
Variants: `tiny` runs in seconds; `lora` trains rank-8 adapters (the reference is then the base alone).
"""

from llm_jax.config import load_recipe


def get_config(arg=None):
  variants = set((arg or '').split(',')) - {''}
  unknown = variants - {'tiny', 'lora'}
  if unknown:
    raise ValueError(f'unknown variant {sorted(unknown)[0]!r} (known: tiny, lora)')
  c = load_recipe('tiny' + (':tiny' if 'tiny' in variants else ''))  # the model this fine-tunes
  c.data.update(objective='dpo', source='data/prefs/*.jsonl', dpo_beta=0.1, heldout_percent=0)
  # DPO's published recipes use a learning rate around 5e-7 for 7B models; small models take more. No
  # weight decay: the KL tie to the reference is the regulariser.
  # AdamW whatever the pretraining used: its step sizes are what these rates were chosen for, and LoRA's
  # adapters (the `lora` variant) are not matrices Muon is for.
  c.train.optimizer = 'adamw'
  c.train.update(steps=200, learning_rate=1e-4, warmup_steps=10, weight_decay=0.0, log_every=10,
                 checkpoint_every=100)
  c.eval.update(every=0)  # held-out loss is cross-entropy; preference accuracy is logged from training
  if 'tiny' in variants:
    c.data.update(shards=1)
    c.train.update(steps=20, learning_rate=1e-3, warmup_steps=2, log_every=5, checkpoint_every=20)
  if 'lora' in variants:
    c.model.lora.update(rank=8, alpha=16.0, targets=('q', 'v', 'o'))
    c.train.update(learning_rate=c.train.learning_rate * 10)
  return c
