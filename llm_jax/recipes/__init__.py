"""The recipes that ship inside the package, and how `--config=SPEC[:variant]` finds one.

A recipe is a Python module with `get_config(arg=None)` returning a config that starts from
`llm_jax.config.default_config()`; the first line of its docstring is what `llm-jax recipes` lists.
They live in the package (not beside it) so that a wheel installed anywhere carries them. `resolve` is the
one place a spec becomes a recipe, for every command (through `llm_jax.config.load_recipe`):

  1. SPEC is a shipped recipe's name: `tiny`, `llama_1b`, `bench/gpt2_124m` (whatever files the current
     directory holds, so that the default, `tiny`, always means the same).
  2. SPEC is an existing file: the user's own recipe (`--config=my_recipe.py:tiny`), as it always was.
  3. SPEC is the spelling of the checkout these recipes came from, `configs/NAME.py` (or `NAME.py`), with
     no such file: the shipped NAME.
  4. Anything else is one line that lists the shipped recipes.

This module imports nothing of llm_jax but the errors: llm_jax.config imports it, and the recipes import
llm_jax.config.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.resources
import importlib.util
import os
import types

from llm_jax.errors import UserError

# Where the recipes of a source checkout lived before they moved into the package (issue 23). Scripts,
# launch commands and notes written for the checkout say `--config=configs/llama_1b.py`; that keeps working.
_OLD_FOLDER = 'configs/'


@dataclasses.dataclass(frozen=True)
class Recipe:
  name: str  # 'tiny', 'bench/llama_1b' for a shipped recipe; the path as given for a user's file
  shipped: bool

  @property
  def label(self) -> str:
    """How error messages name it."""
    return f'recipe {self.name}' if self.shipped else f'config file {self.name}'


def names() -> list[str]:
  """The shipped recipes: top-level ones first, then each folder's (`bench/...`), each group sorted."""
  found = []

  def walk(folder, prefix):
    entries = sorted(folder.iterdir(), key=lambda e: e.name)
    for entry in entries:
      if entry.is_file() and entry.name.endswith('.py') and not entry.name.startswith('_'):
        found.append(prefix + entry.name[:-3])
    for entry in entries:
      if entry.is_dir() and not entry.name.startswith(('_', '.')):
        walk(entry, prefix + entry.name + '/')

  walk(importlib.resources.files(__name__), '')
  return found


def _shipped_name(path: str) -> str | None:
  """`tiny`, `tiny.py`, `configs/tiny.py`, `./configs/bench/llama_1b.py` -> the shipped name, else None."""
  name = path.replace(os.sep, '/')
  while name.startswith('./'):
    name = name[2:]
  if name.startswith(_OLD_FOLDER):
    name = name[len(_OLD_FOLDER):]
  if name.endswith('.py'):
    name = name[:-3]
  return name if name in names() else None


def resolve(spec: str) -> tuple[Recipe, str]:
  """`SPEC[:variant]` -> (the recipe, the variant or '')."""
  path, _, arg = spec.partition(':')
  name = _shipped_name(path)
  if name is not None and name == path:
    return Recipe(name, shipped=True), arg
  if os.path.isfile(path):
    return Recipe(path, shipped=False), arg
  if name is not None:
    return Recipe(name, shipped=True), arg
  if os.path.isdir(path):
    raise UserError(f'config {path} is a directory; expected a recipe file or a shipped recipe\'s name')
  shipped = ', '.join(names())
  if path.endswith('.py') or '/' in path or os.sep in path:
    raise UserError(f'config file not found: {path} (shipped recipes: {shipped}; `llm-jax recipes` '
                    'describes them)')
  raise UserError(f'unknown recipe {path!r}: no such file and no shipped recipe of that name (shipped: '
                  f'{shipped}; `llm-jax recipes` describes them)')


def load_module(recipe: Recipe) -> types.ModuleType:
  """The recipe's module, executed. A user's file that fails is named with its problem."""
  if recipe.shipped:
    return importlib.import_module(f'{__name__}.{recipe.name.replace("/", ".")}')
  path = recipe.name
  module_spec = importlib.util.spec_from_file_location(f'_llm_jax_recipe_{abs(hash(path))}', path)
  if module_spec is None or module_spec.loader is None:  # not a .py file: importlib finds no loader for it
    raise UserError(f'config file {path} is not a Python file (expected recipe.py[:variant])')
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # a broken recipe file is the user's file: name it and the problem
    raise UserError(f'config file {path} failed to load: {type(e).__name__}: {e}') from e
  return module


def summary(module: types.ModuleType) -> str:
  """The first line of the recipe's docstring."""
  doc = (module.__doc__ or '').strip()
  return doc.splitlines()[0].strip() if doc else '(no description)'


def listing() -> str:
  """Every shipped recipe with the first line of its docstring (also what `--config=list` prints)."""
  shipped = names()
  width = max(len(n) for n in shipped)
  lines = ['shipped recipes (--config=NAME[:variant], or --config=FILE.py[:variant] for your own; '
           '`llm-jax recipes NAME` describes one):']
  for name in shipped:
    module = load_module(Recipe(name, shipped=True))
    lines.append(f'  {name:<{width}}  {summary(module)}')
  return '\n'.join(lines)
