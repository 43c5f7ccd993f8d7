"""`python -m llm_jax ...` is the `llm-jax` command (for an environment whose scripts are not on PATH)."""

import sys

from llm_jax.cli import main

sys.exit(main())
