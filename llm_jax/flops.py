"""Model FLOPs of training, per token (PaLM, Chowdhery et al. 2022, appendix B):

    6 * N  +  12 * L * num_heads * head_dim * T

N: the weights that multiply activations (every matrix, the output projection included; the input
embedding only when tied to the output, since a lookup is no matmul; norm gains never). 6 = 2 FLOPs per
multiply-add x (forward + backward, which is twice the forward). The second term is attention's scores and
weighted sum over a row of T positions, counted over the whole row as the convention is. Recomputation
under remat is not counted: it is the implementation's cost, not the model's work.
"""

from __future__ import annotations

import math

import jax


def _is_matmul_weight(path, tie_embeddings: bool) -> bool:
  names = [str(getattr(k, 'key', k)) for k in path]
  if any('norm' in n for n in names):
    return False
  if names and names[-1] == 'embedding':
    return tie_embeddings
  return True


def matmul_params(model_cfg) -> int:
  """N above, from the model's abstract parameters (nothing is allocated)."""
  from llm_jax.models import build_model
  from llm_jax.train.state import init_params
  model = build_model(model_cfg)
  shapes = jax.eval_shape(lambda rng: init_params(model, rng), jax.random.PRNGKey(0))
  return sum(math.prod(a.shape) for path, a in jax.tree_util.tree_leaves_with_path(shapes)
             if _is_matmul_weight(path, model_cfg.tie_embeddings))


def flops_per_token(model_cfg, seq_len: int) -> float:
  """Training FLOPs (forward and backward) per token of rows of `seq_len` tokens."""
  m = model_cfg
  return 6 * matmul_params(m) + 12 * m.num_layers * m.num_heads * m.head_dim * seq_len
