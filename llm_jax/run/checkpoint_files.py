"""The files of checkpoint steps on disk: what makes a step trustworthy, and what to do with one that is not.

What orbax 0.12 does on a local filesystem (checked in tests/test_checkpoint.py, not assumed): a step is
written into `checkpoints/N.orbax-checkpoint-tmp` and renamed to `checkpoints/N` once every process has
finished writing; `commit_success.txt` is written into the temporary directory just before the rename. Orbax
calls every directory without that suffix a finalized step, whatever it holds: a step that a kill -9
interrupted while orbax was deleting it (`max_to_keep`), or one whose files were truncated later, looks just
as complete as a good one, and restoring it fails with errors that rarely name a file (or, for some files,
quietly succeeds).

So each step carries a manifest of its own files and their sizes, `llm_jax_files.json`, written inside the
temporary directory just before the rename (orbax's post-finalization callback runs there, on the primary
process, after all processes wrote their part). The rename commits data and manifest together: a step
whose files do not match its manifest is damaged, and the manifest names the file. A step without a
manifest (written before manifests existed, or one whose deletion was interrupted) is trusted only if it
restores.

At a gs:// URL orbax renames nothing (an object store cannot rename a directory atomically): it writes the
step straight into `checkpoints/N` and commits it with `commit_success.txt`; the manifest is then written
into `N` itself, before that commit. Every file operation here goes through storage.py, so the same code
reads a bucket.
"""

from __future__ import annotations

import json
import re
import sys

import jax

from llm_jax import atomic, storage
from llm_jax.errors import UserError

MANIFEST = 'llm_jax_files.json'
TMP_MARK = '.orbax-checkpoint-tmp'  # orbax's suffix of a step still being written
DAMAGED_MARK = '.damaged'  # a step moved aside because it cannot be read: `N.damaged`
# Written at the step's root by orbax's commit itself, after the manifest: not part of it.
_COMMIT_FILES = ('_CHECKPOINT_METADATA', 'commit_success.txt')


def warn(msg: str) -> None:
  if jax.process_index() == 0:
    print(f'llm-jax: warning: {msg}', file=sys.stderr, flush=True)


def orbax_directory(directory: str) -> str:
  """What orbax is given for a checkpoint directory: a local path (also for a URL whose fsspec backend is
  the local disk), or a gs:// or s3:// URL, which orbax hands to etils.epath and to tensorstore's own
  drivers. orbax opens paths itself and knows no other store: another protocol is one line, before any
  work."""
  local = storage.local_path(directory)
  if local is not None:
    return local
  if storage.protocol(directory) in ('gs', 's3'):
    return directory
  raise UserError(f'{directory}: checkpoints are written by orbax, which writes to local paths, gs:// and '
                  's3:// only')


def step_dir(directory: str, step: int) -> str:
  return storage.join(directory, str(step))


def _files(root: str) -> dict[str, int]:
  return {rel: size for rel, size in storage.files_under(root).items()
          if rel not in _COMMIT_FILES and rel != MANIFEST}


def write_manifest(directory: str, step: int) -> None:
  """Record the files of `step` while it is still in its temporary directory (the final one if the save
  already renamed it, as a different orbax atomicity mode would)."""
  pending = [name for name in storage.listdir(directory) if name.startswith(f'{step}{TMP_MARK}')]
  root = storage.join(directory, pending[0]) if len(pending) == 1 else step_dir(directory, step)
  body = json.dumps({'step': step, 'files': _files(root)}, indent=0, sort_keys=True)
  atomic.write_text(storage.join(root, MANIFEST), body, fsync=True)


def check_step(directory: str, step: int) -> tuple[bool, str | None]:
  """(whether a manifest vouches for the step, what is wrong with it or None)."""
  root = step_dir(directory, step)
  path = storage.join(root, MANIFEST)
  try:
    manifest = json.loads(storage.read_bytes(path))
    expected = manifest['files']
    if not isinstance(expected, dict):
      raise TypeError
  except FileNotFoundError:
    return False, None
  except (OSError, ValueError, KeyError, TypeError):
    return False, f'{MANIFEST} is unreadable'
  for rel, size in sorted(expected.items()):
    try:
      actual = storage.size(storage.join(root, rel))
    except OSError:
      return True, f'{rel} is missing'
    if actual != size:
      return True, f'{rel} has {actual} bytes, {size} were written'
  return True, None


def incomplete_saves(directory: str) -> list[str]:
  """Names of saves that never finished (killed mid-write, or a write that failed)."""
  try:
    return sorted(name for name in storage.listdir(directory) if TMP_MARK in name)
  except (FileNotFoundError, NotADirectoryError):
    return []


def remove_incomplete(directory: str, names: list[str]) -> None:
  for name in names:
    storage.rmtree(storage.join(directory, name))


def move_aside(directory: str, step: int) -> str:
  """Rename a damaged step out of orbax's sight (`N.damaged`, `N.damaged.2`, ...) rather than delete what
  may be the only copy of something; the training that follows writes step N afresh. On an object store the
  move is a copy then a delete: interrupted, it leaves the step where it was (read again, found damaged
  again) or a copy beside it, never less than there was."""
  base = step_dir(directory, step) + DAMAGED_MARK
  target, n = base, 1
  while storage.exists(target):
    n += 1
    target = f'{base}.{n}'
  storage.rename(step_dir(directory, step), target)
  return f'{storage.basename(directory)}/{storage.basename(target)}'


def describe_error(e: BaseException) -> str:
  """One short line for an exception raised while restoring: tensorstore's messages run to kilobytes of
  JSON spec; the useful part is the first clause, and the file when one is named."""
  seen = []
  while e is not None and e not in seen and len(seen) < 8:
    seen.append(e)
    e = e.__cause__ or e.__context__
  for err in seen:
    match = re.search(r'local file "([^"]+)"[^\[]*', str(err))
    if match:
      return _clip(match.group(0))
  first = seen[0]
  text = str(first).split('\n', 1)[0].split(' [tensorstore_spec', 1)[0].split('See full TensorStore', 1)[0]
  return _clip(f'{type(first).__name__}: {text}'.strip())


def _clip(text: str, limit: int = 240) -> str:
  text = ' '.join(text.split())
  return text if len(text) <= limit else text[:limit - 3] + '...'
