"""`llm-jax recipes`: the recipes shipped in the package, one line each; `llm-jax recipes NAME` shows one."""

from llm_jax import recipes as recipes_lib
from llm_jax.commands import common
from llm_jax.errors import UserError

HELP = 'list the shipped recipes (--config=NAME[:variant]), or describe one'


def add_arguments(p) -> None:
  p.add_argument('name', nargs='?', default=None,
                 help='a shipped recipe (or a recipe file): print its description, variants and file')


def run(args, overrides) -> int:
  if overrides:
    raise UserError('recipes takes no --config.* overrides (they belong to train, plan and prepare)')
  if args.name is None:
    print(recipes_lib.listing())
    return 0
  common.nonempty('recipes NAME', args.name)
  recipe, _ = recipes_lib.resolve(args.name)
  module = recipes_lib.load_module(recipe)
  if not hasattr(module, 'get_config'):
    raise UserError(f'{recipe.label} has no get_config(arg=None) function')
  print(f'{recipe.name}: {module.__file__}')
  print((module.__doc__ or '(no description)').strip())
  return 0
