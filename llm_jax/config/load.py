"""Loading a config: a recipe file's `get_config(arg)`, command-line overrides parsed into each key's type,
defaults filled in, validated once and locked."""

from __future__ import annotations

import ast
from typing import Any, Sequence

import ml_collections

from llm_jax import recipes as recipes_lib
from llm_jax.config.schema import default_config
from llm_jax.config.validate import validate
from llm_jax.errors import UserError


def load_recipe(spec: str) -> ml_collections.ConfigDict:
  """`RECIPE[:arg]` -> the recipe's `get_config(arg)`. RECIPE is a file (a user's own recipe) or the name of
  one shipped in llm_jax/recipes/ (`tiny`, `llama_1b`, `bench/gpt2_124m`; `configs/NAME.py` too): see
  `llm_jax.recipes.resolve`, the one resolver every command goes through."""
  recipe, arg = recipes_lib.resolve(spec)
  module = recipes_lib.load_module(recipe)
  if not hasattr(module, 'get_config'):
    raise UserError(f'{recipe.label} has no get_config(arg=None) function')
  try:
    cfg = module.get_config(arg or None)
  except UserError:
    raise
  except Exception as e:
    raise UserError(f'{recipe.label}: get_config({arg!r}) failed: {type(e).__name__}: {e}') from e
  check_schema(cfg, default_config(), where=recipe.name)
  return cfg


def check_schema(cfg, schema, where: str, prefix: str = '') -> None:
  """Every key of `cfg` exists in `schema` (the defaults), recursively."""
  for key in cfg.keys():
    name = prefix + key
    if key not in schema:
      raise UserError(f'{where}: unknown config key {name}')
    if isinstance(schema[key], ml_collections.ConfigDict):
      check_schema(cfg[key], schema[key], where, name + '.')


def _parse_bool(text: str) -> bool:
  low = text.strip().lower()
  if low in ('true', '1', 'yes', 'on'):
    return True
  if low in ('false', '0', 'no', 'off'):
    return False
  raise ValueError(text)


def parse_value(key: str, text: str, current: Any) -> Any:
  """Parse the command-line text for `key` into the type of its current value."""
  def bad(expected):
    return UserError(f'config key {key} expects {expected}, got {text!r}')

  if isinstance(current, ml_collections.ConfigDict):
    raise UserError(f'config key {key} is a section; set one of its keys, e.g. --config.{key}.'
                    f'{next(iter(current.keys()), "x")}=...')
  if isinstance(current, bool):
    try:
      return _parse_bool(text)
    except ValueError:
      raise bad('a boolean (true/false)') from None
  if isinstance(current, int):
    try:
      return int(text.replace('_', ''))
    except ValueError:
      raise bad('an integer') from None
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise bad('a number') from None
  if isinstance(current, str):
    return text
  if isinstance(current, (tuple, list)):
    try:
      value = ast.literal_eval(text) if text.strip() else ()
    except (ValueError, SyntaxError):
      value = tuple(part.strip() for part in text.split(','))
    if not isinstance(value, (tuple, list)):
      value = (value,)
    return tuple(value)
  # None or another type: a Python literal if it parses, else the string.
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_override(cfg: ml_collections.ConfigDict, key: str, text: str) -> None:
  node = cfg
  parts = key.split('.')
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise UserError(f'unknown config key {key}')
    if i < len(parts) - 1:
      node = node[part]
  last = parts[-1]
  value = parse_value(key, text, node[last])
  with node.ignore_type():
    node[last] = value


def load(spec: str | None, overrides: Sequence[tuple[str, str]] = (),
         base: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """The resolved, validated, locked config: recipe (or `base`, or defaults) plus overrides."""
  if spec:
    cfg = load_recipe(spec)
  elif base is not None:
    cfg = base
  else:
    cfg = default_config()
  cfg = fill_defaults(cfg)
  for key, text in overrides:
    apply_override(cfg, key, text)
  validate(cfg)
  cfg.lock()
  return cfg


def fill_defaults(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Recipes may return a partial config; the defaults fill the rest so every key exists."""
  full = default_config()
  _merge_into(full, cfg)
  return full


def _merge_into(dst: ml_collections.ConfigDict, src, prefix: str = '') -> None:
  for key in src.keys():
    value = src[key]
    if isinstance(dst[key], ml_collections.ConfigDict):
      _merge_into(dst[key], value, prefix + key + '.')
    else:
      if isinstance(dst[key], tuple) and isinstance(value, list):
        value = _to_tuples(value)
      with dst.ignore_type():
        dst[key] = value


def _to_tuples(value):
  if isinstance(value, (list, tuple)):
    return tuple(_to_tuples(v) for v in value)
  return value
