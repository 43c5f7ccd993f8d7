"""Serving: the HTTP server (server.py: FastAPI + uvicorn, auth, limits), what a request does (service.py)
and the OpenAI-compatible request and response bodies (openai_api.py). It drives llm_jax.infer; it decodes
nothing itself."""
