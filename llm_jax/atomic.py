"""The one way llm-jax writes a file or a directory that something else reads: whole or not at all.

A local file is written beside its final name and renamed over it (`os.replace` is atomic within a
filesystem), so a reader, a crash or a full disk never sees half of it and a previous version survives a
failed write. A file at a URL (storage.py) is one object written once, when the block ends without an error:
an object store makes a single object write atomic by itself, so no rename is needed (and none exists).

A local directory (a new work directory, a Hugging Face export) is built in a temporary sibling and renamed
into place at the end; on failure it is removed, with any parent directories that had to be made for it. An
object store cannot rename a directory atomically (a rename is a copy of every object): there the files are
written in place and removed again if the block fails.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from typing import IO, Iterator

from llm_jax import storage


@contextlib.contextmanager
def replacing(path: str, mode: str = 'w', fsync: bool = False) -> Iterator[IO]:
  """A file object whose contents replace `path` when the block ends without an error. `fsync` also forces
  the bytes to disk before the rename (what a checkpoint's manifest needs to vouch for a step); an object
  store's write is durable once it returns, so it has nothing to force."""
  if storage.is_url(path):
    buf = io.BytesIO() if 'b' in mode else io.StringIO()
    yield buf
    data = buf.getvalue()
    storage.write_object(path, data if isinstance(data, bytes) else data.encode('utf-8'))
    return
  path = storage.local_path(path)
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, mode, encoding=None if 'b' in mode else 'utf-8') as f:
      yield f
      if fsync:
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):  # the block failed: leave nothing behind
      os.remove(tmp)


def write_text(path: str, text: str, fsync: bool = False) -> None:
  with replacing(path, 'w', fsync) as f:
    f.write(text)


def write_bytes(path: str, data: bytes, fsync: bool = False) -> None:
  with replacing(path, 'wb', fsync) as f:
    f.write(data)


@contextlib.contextmanager
def new_directory(output: str) -> Iterator[str]:
  """A temporary directory beside `output`, renamed to it when the block succeeds, removed otherwise (with
  the parent directories it had to create). `output` must not exist, or be an empty directory. OSError from
  making the parent is the caller's to report. At a URL: `output` itself, its objects removed on failure."""
  if storage.is_url(output):
    ok = False
    try:
      yield output.rstrip('/')
      ok = True
    finally:
      if not ok:
        storage.rmtree(output)
    return
  output = os.path.abspath(storage.local_path(output))
  parent = os.path.dirname(output)
  created = parent  # the outermost directory made here, removed on failure
  while not os.path.exists(os.path.dirname(created)):
    created = os.path.dirname(created)
  created = None if os.path.exists(parent) else created
  ok = False
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(output)}.tmp', dir=parent)
  except OSError:
    if created is not None:
      shutil.rmtree(created, ignore_errors=True)
    raise
  try:
    yield tmp
    if os.path.isdir(output):
      os.rmdir(output)  # empty: callers refuse a non-empty one before writing anything
    os.replace(tmp, output)
    ok = True
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
    if not ok and created is not None:
      shutil.rmtree(created, ignore_errors=True)
