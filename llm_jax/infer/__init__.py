"""Inference: a trained run loaded from its workdir and the Python API on it (inference.py), the decode engine
(decode.py: prefill and the KV-cache loop in one jit, the model-family adapter), continuous batching over decode
slots for the server (slots.py), sampling (sampling.py), stop strings (stops.py), beam search (beam_search.py)
and per-token log-likelihoods (loglik.py). Nothing here needs an optimizer or the training step."""
