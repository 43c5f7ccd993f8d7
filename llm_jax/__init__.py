"""llm-jax: language-model pretraining, fine-tuning, decoding and evaluation in JAX/Flax."""

__version__ = '0.1.0'
