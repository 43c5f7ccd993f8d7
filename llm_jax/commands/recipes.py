"""`llm-jax recipes`: the recipes shipped in the package, one line each; `llm-jax recipes NAME` shows one."""

from llm_jax.commands import common
from llm_jax.errors import UserError

HELP = 'list the shipped recipes (--config=NAME[:variant]), or describe one'


def add_arguments(p) -> None:
  p.add_argument('name', nargs='?', default=None,
                 help='a shipped recipe (or a recipe file): print its description, variants and file')


def listing() -> str:
  """Every shipped recipe with the first line of its docstring (also what `--config=list` prints)."""
  from llm_jax import recipes
  names = recipes.names()
  width = max(len(n) for n in names)
  lines = ['shipped recipes (--config=NAME[:variant], or --config=FILE.py[:variant] for your own; '
           '`llm-jax recipes NAME` describes one):']
  for name in names:
    module = recipes.load_module(recipes.Recipe(name, shipped=True))
    lines.append(f'  {name:<{width}}  {recipes.summary(module)}')
  return '\n'.join(lines)


def run(args, overrides) -> int:
  if overrides:
    raise UserError('recipes takes no --config.* overrides (they belong to train, plan and prepare)')
  if args.name is None:
    print(listing())
    return 0
  from llm_jax import recipes
  common.nonempty('recipes NAME', args.name)
  recipe, _ = recipes.resolve(args.name)
  module = recipes.load_module(recipe)
  if not hasattr(module, 'get_config'):
    raise UserError(f'{recipe.label} has no get_config(arg=None) function')
  print(f'{recipe.name}: {module.__file__}')
  print((module.__doc__ or '(no description)').strip())
  return 0
