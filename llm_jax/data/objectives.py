"""Training objectives as per-document transforms, applied before packing.

Each objective maps one document's token ids to aligned per-token features (`inputs`, `targets`,
`loss_mask`), or None to skip the document. The packer after it is objective-agnostic: it concatenates
whatever features it is given and adds segment ids and positions.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Objective = Callable[[np.ndarray], 'dict[str, np.ndarray] | None']


def causal_lm(bos_id: int, eos_id: int, add_bos: bool, add_eos: bool) -> Objective:
  """Next-token prediction: the input at t is token t, the target token t + 1."""

  def apply(ids: np.ndarray) -> dict[str, np.ndarray] | None:
    parts = ([np.array([bos_id], np.int32)] if add_bos else []) + [ids.astype(np.int32)]
    if add_eos:
      parts.append(np.array([eos_id], np.int32))
    tokens = np.concatenate(parts)
    if len(tokens) < 2:
      return None
    return {
        'inputs': tokens[:-1],
        'targets': tokens[1:],
        'loss_mask': np.ones(len(tokens) - 1, np.int32),
    }

  return apply


def for_config(data_cfg, tokenizer) -> Objective:
  return causal_lm(tokenizer.bos_id, tokenizer.eos_id, data_cfg.add_bos, data_cfg.add_eos)
