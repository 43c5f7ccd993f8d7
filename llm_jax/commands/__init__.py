"""One module per `llm-jax` subcommand. Each defines:

    HELP: str                         one line for `llm-jax --help`
    add_arguments(parser) -> None     its flags
    run(args, overrides) -> int       the command; `overrides` are the --config.KEY=VALUE pairs

User mistakes raise `llm_jax.errors.UserError`; cli.py turns them into one line and exit code 2.
"""

# The order `llm-jax --help` lists them in.
NAMES = ('train', 'eval', 'generate', 'chat', 'serve', 'prepare', 'plot', 'plan', 'convert', 'export', 'recipes',
         'embed', 'index')
