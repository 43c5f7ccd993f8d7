"""Retrieval-augmented generation: sentence embeddings from an encoder run (embeddings.py), passages cut
from any data source the pipeline reads (passages.py), an index of their vectors searched exactly on the
device (index.py), and retrieved passages put into prompts (context.py)."""
