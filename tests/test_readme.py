"""The README's Quick start stays true: two commands, and CI runs the second one verbatim."""

import os
import re

from conftest import ROOT


def _quick_start_commands():
  text = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
  section = text.split('## Quick start', 1)[1].split('\n## ', 1)[0]
  blocks = re.findall(r'```bash\n(.*?)```', section, flags=re.S)
  return [[line for line in b.splitlines() if line.strip() and not line.startswith('#')] for b in blocks]


def test_quick_start_has_exactly_two_commands_and_ci_runs_the_second():
  blocks = _quick_start_commands()
  assert [len(b) for b in blocks] == [1, 1]
  demo, tests = blocks[0][0], blocks[1][0]
  assert 'llm-jax train' in demo and 'llm-jax eval' in demo and 'llm-jax generate' in demo
  ci = open(os.path.join(ROOT, '.ci', 'run'), encoding='utf-8').read().splitlines()
  assert tests in ci
