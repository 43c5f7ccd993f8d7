"""Inference: a trained run loaded from its workdir (inference.py), the decode engine (decode.py: prefill and
the KV-cache loop in one jit, the model-family adapter), sampling (sampling.py), stop strings matched on the
device (stops.py), beam search (beam_search.py) and per-token log-likelihoods (loglik.py). Nothing here
needs an optimizer or the training step."""
