"""Shared fixtures. Eight fake CPU devices so meshes can be tested on any machine."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Implicit rank promotion (adding a [T] array to a [B, T, D] one) hides shape mistakes: an error in the suite,
# in this process and in every command it starts.
os.environ.setdefault('JAX_NUMPY_RANK_PROMOTION', 'raise')
# One persistent compilation cache for the whole run, shared by pytest-xdist's workers and every command the
# tests start: most tests train, evaluate or decode the same tiny models, and a program compiled once is
# loaded, not compiled, by the next process that needs it (a third of a command-line test's time was XLA
# compiling). Created by the first process (xdist's controller, whose environment the workers inherit), empty
# at the start of every run, removed at its end. Results do not change: the cache holds the same executable.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  import atexit
  import shutil
  import tempfile
  _cache = tempfile.mkdtemp(prefix='llm-jax-tests-xla-')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')  # the default, 1 s, skips most

import pytest  # noqa: E402

from llm_jax import config as config_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = 'tiny:tiny'  # the shipped recipe (llm_jax/recipes/tiny.py), found by name from any directory


def tiny_config(*overrides: tuple[str, str]):
  """The tests' config: the tiny recipe's tiny variant plus overrides, validated and locked like the CLI's."""
  return config_lib.load(TINY, list(overrides))


@pytest.fixture(scope='session')
def tokenizer_path(tmp_path_factory):
  """A tokenizer trained once on the built-in corpus for every test that needs one."""
  from llm_jax.data import sources, tokenizer as tokenizer_lib
  cfg = tiny_config()
  docs = sources.open_source(cfg.data, 'train')
  tok = tokenizer_lib.train(sources.texts(docs), cfg.model.vocab_size,
                            cfg.data.tokenizer_train_chars, num_threads=1)
  path = str(tmp_path_factory.mktemp('tok') / 'tokenizer.model')
  tokenizer_lib.save(tok, path)
  return path


@pytest.fixture(scope='session')
def tokenizer(tokenizer_path):
  from llm_jax.data import tokenizer as tokenizer_lib
  return tokenizer_lib.load(tokenizer_path)


@pytest.fixture(scope='session')
def small_corpus(tmp_path_factory):
  """A glob of 64 small .txt documents (pieces of standard-library files): streams over it start fast."""
  from llm_jax.data import sources
  root = tmp_path_factory.mktemp('corpus')
  paths = [path for _, path in sources.builtin_files()[:64]]
  for i, path in enumerate(paths):
    with open(path, encoding='utf-8') as f:
      text = f.read()[:200 + 40 * i]
    (root / f'doc{i:02d}.txt').write_text(text, encoding='utf-8')
  return str(root / '*.txt')


def corpus_config(glob, *overrides):
  return tiny_config(('data.source', glob), ('data.heldout_percent', '10'), *overrides)


def recipe_config(name: str, *overrides: tuple[str, str]):
  """The shipped recipe NAME's tiny variant plus overrides (the families' recipes: gpt2_124m, bert_base,
  t5_small)."""
  return config_lib.load(f'{name}:tiny', list(overrides))


@pytest.fixture(scope='session')
def pretrained_workdir(tmp_path_factory, tokenizer_path):
  """A tiny:tiny run of two steps: the pretrained workdir fine-tuning tests start from."""
  from llm_jax.train import loop
  workdir = str(tmp_path_factory.mktemp('pretrained') / 'run')
  loop.train(tiny_config(('data.tokenizer', tokenizer_path), ('train.steps', '2'), ('eval.every', '0')), workdir)
  return workdir
