"""The one exception type that means "the user asked for something we cannot do".

The command line turns it into a single line on stderr and a non-zero exit, never a traceback. Everything
else that escapes is a bug in llm-jax and keeps its traceback.
"""


class UserError(Exception):
  """A mistake in the user's input: a config key, a path, a file's contents, a flag."""
