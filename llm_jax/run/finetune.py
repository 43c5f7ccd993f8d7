"""Starting a run from a pretrained workdir (`init_from`): its params only, with a fresh optimizer, step 0 and a
new data stream; its tokenizer; its architecture.

The new run's model must be the pretrained one. Keys that change no parameter shape or meaning may differ
(FREE_KEYS: dropout, dtypes, remat, LoRA, layers scanned or unrolled), and `model.vocab_size` is set here, not
by the recipe: the pretrained table's size, grown when the objective reserves ids past the tokenizer's pieces
that the table has no rows for (the chat template's role markers, data/chat.py). New embedding rows (output
columns) are drawn around the mean of the old ones with their per-dimension spread (Hewitt 2021, "Initializing
new word embeddings"): each marker starts as a plausible, ordinary token whose logit is near the mean logit,
never an outlier that dominates the softmax, and the markers differ from each other from the first step, which
matters most under LoRA, where these rows stay frozen.

The resolved config (grown vocabulary, the tokenizer copied into the new workdir) is what the new run saves,
so `eval`, `generate` and `chat` read the new workdir alone; only a LoRA run reads `init_from` again, for
the frozen base params it never copies (lora.py).
"""

from __future__ import annotations

from typing import Sequence

import jax
import ml_collections

from llm_jax import config as config_lib, storage
from llm_jax.run import params as params_lib, workdir as workdir_lib
from llm_jax.data import objectives, tokenizer as tokenizer_lib
from llm_jax.errors import UserError

FREE_KEYS = ('vocab_size', 'dropout_rate', 'dtype', 'logits_dtype', 'remat', 'init_std', 'lora', 'scan_layers')


def resolve_train_config(workdir: str, spec: str | None, overrides: Sequence[tuple[str, str]]):
  """The config of a training run: the recipe (default `tiny`) plus overrides, or, when resuming
  a workdir without --config, its saved config plus overrides (e.g. more steps)."""
  saved = workdir_lib.config_path(workdir)
  if spec is None and storage.isfile(saved):
    return resolve(config_lib.load(None, overrides, base=config_lib.from_json_file(saved)))
  if spec is None:
    spec = workdir_lib.default_recipe()
  cfg = resolve(config_lib.load(spec, overrides))
  if storage.isfile(saved):
    changed = config_lib.model_differences(config_lib.from_json_file(saved), cfg)
    if changed and workdir_lib.has_checkpoints(workdir):
      raise UserError(f'workdir {workdir} holds checkpoints of a different model ({", ".join(changed)} '
                      'changed); use a new --workdir')
  return cfg


def resolve(cfg):
  """`cfg` with the model checked against init_from's, model.vocab_size set and data.tokenizer pointed at the
  pretrained tokenizer (unless given). Unchanged when init_from is empty."""
  if not cfg.init_from:
    # Checked here rather than in validate(): recipes name no workdir, the command line does.
    if objectives.of(cfg.data).preference:
      raise UserError(f"config key init_from='' : data.objective={cfg.data.objective!r} needs a pretrained "
                      'workdir (its params are the frozen reference model): --config.init_from=WORKDIR')
    if cfg.model.lora.rank:
      raise UserError("config key init_from='' : model.lora.rank > 0 needs a pretrained workdir (adapters "
                      'train on top of its frozen params): --config.init_from=WORKDIR')
    return cfg
  pre = params_lib.pretrained_config(cfg.init_from)
  diffs = config_lib.model_differences(pre, cfg, ignore=FREE_KEYS)
  if diffs:
    key = diffs[0].split('.', 1)[1]
    raise UserError(f'config key {diffs[0]}={cfg.model[key]!r} differs from the pretrained model in init_from='
                    f'{cfg.init_from} ({pre.model[key]!r}); fine-tuning keeps the architecture')
  overrides = []
  tok_path = cfg.data.tokenizer
  if not tok_path:
    tok_path = workdir_lib.tokenizer_path(cfg.init_from)
    if tok_path is None:
      raise UserError(f'init_from={cfg.init_from} has no tokenizer ({workdir_lib.TOKENIZER} or tokenizer.json); '
                      'give the one it was trained with (--config.data.tokenizer=PATH)')
    overrides.append(('data.tokenizer', tok_path))
  tok = tokenizer_lib.load(tok_path)
  need = tok.vocab_size + objectives.reserved_ids(cfg.data, tok)
  vocab = max(pre.model.vocab_size, need)
  if vocab != cfg.model.vocab_size:
    overrides.append(('model.vocab_size', str(vocab)))
  if not overrides:
    return cfg
  base = ml_collections.ConfigDict(cfg.to_dict())
  return config_lib.load(None, overrides, base=base)


def initial_state(cfg, factory, mesh, rules):
  """Step 0 of a fine-tuning run: init_from's params (plus freshly initialised adapters for LoRA) with a new
  optimizer state."""
  from llm_jax.run import lora
  from llm_jax.train.state import init_params
  base_shardings, adapter_shardings = lora.split(factory.param_shardings)
  params, _ = params_lib.from_init(cfg, mesh, rules, base_shardings)
  if adapter_shardings:
    fresh = jax.jit(lambda rng: lora.split(init_params(factory.model, rng))[1],
                    out_shardings=adapter_shardings)(jax.random.PRNGKey(cfg.seed))
    params = lora.merge(params, fresh)
  return factory.init_from_params(params, cfg.seed)
