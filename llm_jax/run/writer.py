"""The one writer of a new work directory from params that exist elsewhere: `convert from-hf` (imported
weights) and `export --merge-lora` (a LoRA run folded into its base). It holds config.json, the tokenizer
files and a params-only checkpoint at `step`, is built in a temporary sibling and renamed into place at the
end (atomic.new_directory): an interrupted write leaves no half-written workdir and never touches an
existing one. `eval`, `generate`, `chat` and `serve` read the result like any run; `train` continues from it
with a fresh optimizer.
"""

from __future__ import annotations

import os
from typing import Any

from llm_jax import atomic, config as config_lib
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.errors import UserError
from llm_jax.run import workdir as workdir_lib
from llm_jax.run.checkpoint import Checkpointer


def write_run(output: str, cfg, params: Any, step: int, tokenizer=None, extra_files=None,
              flag: str = '--output') -> None:
  """Write the run `output`: `cfg` (validated), `params` (on the devices, laid out for cfg's mesh), the
  tokenizer's files (sentencepiece's tokenizer.model, or tokenizer.json and its config) and `extra_files`
  ({relative path: bytes}, e.g. a checkpoint's sentence-transformers files). Failures are one line naming
  `flag`."""
  try:
    with atomic.new_directory(output) as tmp:
      config_lib.write_json_atomic(cfg, workdir_lib.config_path(tmp))
      if tokenizer is not None:
        tokenizer_lib.write_files(tokenizer, tmp)
      for name, data in (extra_files or {}).items():
        os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
        atomic.write_bytes(os.path.join(tmp, name), data)
      ckpt = Checkpointer(tmp, async_save=False)
      try:
        ckpt.save_params(step, params, cfg.to_dict())
      finally:
        ckpt.close()
  except OSError as e:
    raise UserError(f'cannot write {flag}={output}: {e.strerror or e}') from None
