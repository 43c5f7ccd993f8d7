"""Serving: the HTTP server and its request batcher (server.py) and the OpenAI-compatible request and
response bodies (openai_api.py). It drives llm_jax.infer; it decodes nothing itself."""
