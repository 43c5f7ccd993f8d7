"""Evaluation of a run: held-out loss, perplexity and bits per byte against compressor baselines
(heldout.py) and multiple-choice log-likelihood tasks (tasks.py)."""
