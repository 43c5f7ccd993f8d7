"""The package's shape: imports never run in a circle (counting imports inside functions, which only defer a
circle), and no module grows past ~400 lines without saying why at its top."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / 'llm_jax'
MAX_LINES = 400


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
  """The llm_jax modules `path` imports anywhere in its body (a package's own __init__ excluded when a
  submodule is named: `from llm_jax.run import workdir` imports llm_jax.run.workdir)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.startswith('llm_jax'))
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('llm_jax') and not node.level:
      subs = [f'{node.module}.{a.name}' for a in node.names if f'{node.module}.{a.name}' in modules]
      found.update(subs or [node.module])
  return {m for m in found if m in modules}


def _graph():
  paths = {_module_name(p): p for p in ROOT.rglob('*.py')}
  modules = set(paths)
  return {m: _imports(p, modules) - {m} for m, p in paths.items()}


def _cycle(graph):
  state, stack = {}, []

  def visit(m):
    state[m] = 'open'
    stack.append(m)
    for n in sorted(graph[m]):
      if state.get(n) == 'open':
        return stack[stack.index(n):] + [n]
      if n not in state:
        found = visit(n)
        if found:
          return found
    stack.pop()
    state[m] = 'done'
    return None

  for m in sorted(graph):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return None


def test_no_import_circle():
  cycle = _cycle(_graph())
  assert cycle is None, 'import circle: ' + ' -> '.join(cycle)


def test_checker_finds_a_circle():
  assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert _cycle({'a': {'b'}, 'b': set()}) is None


def test_long_modules_say_why():
  for path in ROOT.rglob('*.py'):
    lines = path.read_text().splitlines()
    if len(lines) > MAX_LINES:
      head = '\n'.join(lines[:40]).lower()
      assert 'why this file is long' in head, (
          f'{path.relative_to(ROOT.parent)} has {len(lines)} lines: split it by job, or say at its top '
          f'("why this file is long: ...") why it is one job')
