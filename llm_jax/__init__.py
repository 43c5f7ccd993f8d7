"""llm-jax: language-model pretraining, fine-tuning, decoding and evaluation in JAX/Flax."""

__version__ = '0.1.0'


def load(workdir: str):
  """A trained run from its work directory, ready for `generate`, `score` and `chat` (infer/inference.Run)."""
  from llm_jax.infer import inference
  return inference.load_run(workdir)
