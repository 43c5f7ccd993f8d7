"""llm-jax as a user installs it: a wheel (not the editable checkout) in a fresh virtual environment, used
from a directory that is not the checkout (issue 23).

The wheel is built from a copy of the package's files (pyproject.toml, README.md, llm_jax/), so the build
neither writes into the checkout nor picks up a stale build/ there. The new environment reuses this test
environment's installed packages through a .pth file of plain paths: a plain path adds the folder without
running the .pth files inside it, so the editable install's finder (which maps llm_jax to the checkout) is
never installed there and the only llm_jax to import is the wheel's, which the test checks.

An audit hook in the new environment (sys.addaudithook, loaded by another .pth file) records every file or
folder a process opens or lists under the checkout, outside this environment's own packages: anything the
commands read at run time must come from the installed package, so the record must stay empty.
"""

import os
import shutil
import site
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # builds and installs a wheel, then five commands in fresh processes: ~45 s CPU

# Loaded at start-up by every Python process of the new environment (through a .pth line): it appends each
# opened or listed path that lies in the checkout, but not in an allowed folder, to the log.
AUDIT = '''
import os, sys

_log = os.environ.get('LLM_JAX_AUDIT_LOG')
_root = os.environ.get('LLM_JAX_AUDIT_ROOT')
_allowed = tuple(p for p in os.environ.get('LLM_JAX_AUDIT_ALLOWED', '').split(os.pathsep) if p)


def _hook(event, args):
  if event not in ('open', 'os.listdir', 'os.scandir') or not args or args[0] is None:
    return
  try:
    path = os.path.realpath(os.fsdecode(args[0]))
  except TypeError:  # a file descriptor
    return
  if (path == _root or path.startswith(_root + os.sep)) and not path.startswith(_allowed):
    with open(_log, 'a', encoding='utf-8') as f:
      f.write(f'{event} {path}\\n')


if _log and _root:
  sys.addaudithook(_hook)
'''


def _build_wheel(tmp) -> str:
  src = os.path.join(tmp, 'src')
  os.makedirs(src)
  for name in ('pyproject.toml', 'README.md'):
    shutil.copy(os.path.join(ROOT, name), src)
  shutil.copytree(os.path.join(ROOT, 'llm_jax'), os.path.join(src, 'llm_jax'),
                  ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
  dist = os.path.join(tmp, 'dist')
  res = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--no-index',
                        '--disable-pip-version-check', '-q', '-w', dist, src], capture_output=True, text=True,
                       timeout=300)
  assert res.returncode == 0, res.stdout + res.stderr
  [wheel] = os.listdir(dist)
  return os.path.join(dist, wheel)


def _site_packages(python: str) -> str:
  out = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                       capture_output=True, text=True, check=True, timeout=60)
  return out.stdout.strip()


def test_the_wheel_trains_plans_evaluates_and_generates_from_any_directory(tmp_path, tokenizer_path):
  import zipfile
  wheel = _build_wheel(str(tmp_path))
  names = zipfile.ZipFile(wheel).namelist()
  for member in ('llm_jax/__main__.py', 'llm_jax/recipes/__init__.py', 'llm_jax/recipes/tiny.py',
                 'llm_jax/recipes/llama_1b.py', 'llm_jax/recipes/sft.py', 'llm_jax/recipes/bench/__init__.py',
                 'llm_jax/recipes/bench/gpt2_124m.py'):
    assert member in names, member

  venv = str(tmp_path / 'venv')
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', venv], check=True, timeout=120)
  python = os.path.join(venv, 'bin', 'python')
  new_site = _site_packages(python)
  ours = [p for p in site.getsitepackages() if os.path.isdir(p)]
  with open(os.path.join(new_site, '_llm_jax_test_env.pth'), 'w') as f:
    f.write(''.join(p + '\n' for p in ours))  # plain paths: their own .pth files (the editable finder) never run
  env = {k: v for k, v in os.environ.items()
         if k not in ('PYTHONPATH', 'PYTHONHOME', 'PYTHONSTARTUP', 'VIRTUAL_ENV', 'XLA_FLAGS', '__PYVENV_LAUNCHER__')}
  env.update(JAX_PLATFORMS='cpu', PYTHONNOUSERSITE='1', PIP_DISABLE_PIP_VERSION_CHECK='1',
             PATH=os.path.join(venv, 'bin') + os.pathsep + env.get('PATH', ''))
  # pip from this environment installs into the new one (its sys.prefix); --ignore-installed: the editable
  # llm-jax it can see through the .pth is another environment's, never to be uninstalled.
  res = subprocess.run([python, '-m', 'pip', 'install', '--no-deps', '--no-index', '--ignore-installed', '-q', wheel],
                       capture_output=True, text=True, env=env, timeout=300)
  assert res.returncode == 0, res.stdout + res.stderr

  with open(os.path.join(new_site, '_llm_jax_audit.py'), 'w') as f:
    f.write(AUDIT)
  with open(os.path.join(new_site, '_llm_jax_audit.pth'), 'w') as f:
    f.write('import _llm_jax_audit\n')
  log = str(tmp_path / 'opened_in_checkout.log')
  allowed = [os.path.realpath(p) for p in [sys.prefix, *ours]]  # this environment (CI keeps it in the checkout)
  env.update(LLM_JAX_AUDIT_LOG=log, LLM_JAX_AUDIT_ROOT=os.path.realpath(ROOT),
             LLM_JAX_AUDIT_ALLOWED=os.pathsep.join(allowed))
  work = tmp_path / 'elsewhere'
  work.mkdir()
  llm_jax = os.path.join(venv, 'bin', 'llm-jax')
  # The hook sees what it should: reading the checkout's pyproject.toml is recorded.
  subprocess.run([python, '-c', f'open({os.path.join(ROOT, "pyproject.toml")!r}).read()'], env=env, check=True,
                 timeout=60)
  assert 'pyproject.toml' in open(log, encoding='utf-8').read()
  os.remove(log)

  def run(*argv, ok=(0,)):
    res = subprocess.run(list(argv), capture_output=True, text=True, cwd=work, env=env, timeout=600)
    assert res.returncode in ok, f'{argv}: exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}'
    return res.stdout

  # The wheel's llm_jax is the one imported, recipes included; the version is the installed metadata's.
  where = run(python, '-c', 'import importlib.metadata as m, llm_jax, llm_jax.recipes as r; '
                            'print(llm_jax.__file__); print(r.__file__); print(m.version("llm-jax"))').split()
  assert where[0] == os.path.join(new_site, 'llm_jax', '__init__.py'), where
  assert where[1] == os.path.join(new_site, 'llm_jax', 'recipes', '__init__.py'), where
  version = run(llm_jax, '--version')
  assert version.startswith(f'llm-jax {where[2]} (jax '), version
  assert run(python, '-m', 'llm_jax', '--version') == version
  listing = run(llm_jax, 'recipes')
  assert 'tiny ' in listing and 'bench/llama_1b ' in listing

  # The default recipe (tiny) for two steps, at the tiny variant's sizes, with the tests' tokenizer.
  run(llm_jax, 'train', '--workdir=runs/x', '--config.train.steps=2', '--config.train.warmup_steps=1',
      '--config.eval.every=0', '--config.model.vocab_size=512', '--config.model.num_layers=2',
      '--config.model.embed_dim=64', '--config.model.head_dim=16', '--config.model.mlp_dim=128',
      '--config.data.seq_len=64', '--config.data.batch_size=8', f'--config.data.tokenizer={tokenizer_path}')
  assert os.path.isdir(work / 'runs' / 'x' / 'checkpoints' / '2')
  # The 1.1B recipe by name; one fake device is the quickest compile, and no capacity given means exit 0.
  plan = run(llm_jax, 'plan', '--config=llama_1b', '--devices=1')
  assert 'parameters: 1,100,048,384' in plan, plan
  evaluated = run(llm_jax, 'eval', '--workdir=runs/x', '--max_tokens=512')
  assert 'step 2:' in evaluated and 'bits per byte' in evaluated, evaluated
  generated = run(llm_jax, 'generate', '--workdir=runs/x', '--prompt=def f(', '--max_new_tokens=4',
                  '--temperature=0')
  assert generated.startswith('def f('), generated

  opened = open(log, encoding='utf-8').read() if os.path.exists(log) else ''
  assert not opened, f'read from the checkout at run time:\n{opened[:3000]}'
