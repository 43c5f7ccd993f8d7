"""Where a path lives: the local disk, or a store at a URL (`gs://bucket/run`, `s3://...`, any fsspec
protocol). The one place llm-jax asks that question: a work directory, a checkpoint manifest, a tokenizer or
a data file is read and written through these functions, which take the same strings either way.

A local path (and a `file://` URL, which is one) goes to `os` exactly as before this module existed: atomic
renames, `fsync`, free-space and permission checks. A URL goes through fsspec (gs:// needs gcsfs: `pip
install 'llm-jax[gcs]'`). fsspec rather than etils.epath, which orbax uses: epath knows four schemes (gs, s3,
az, hf) and hands them to fsspec itself unless TensorFlow is installed, so the same gcsfs serves both, while
fsspec also gives the in-memory and registered stores the tests stand in with. An unknown protocol, or one
whose package is missing, is one line naming the path (UserError).

What an object store cannot do, and what is done instead:
- rename a file atomically: it needs no rename, since writing one object is atomic by itself (a reader sees
  the old object or the new one, never half of one), so `atomic.replacing` writes the object once, whole;
- append: `Appender` keeps the file's bytes and rewrites the object whole on each flush;
- fsync, file locks, free space, permission bits: there is no such thing; checks that ask them are skipped
  (`free_bytes` is None) and a failed write reports itself when it happens.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import shutil
from llm_jax.errors import UserError

_FILE = 'file://'


def is_url(path: str) -> bool:
  """A path in a store other than the local disk (`file://` URLs are local paths)."""
  return '://' in path and not path.startswith(_FILE)


def _local(path: str) -> str:
  return path[len(_FILE):] if path.startswith(_FILE) else path


def fs(url: str):
  """(fsspec filesystem, path within it) of a URL; a one-line error when no fsspec backend takes it.
  Listings are not cached: tensorstore (orbax) writes checkpoints behind fsspec's back."""
  try:
    import fsspec
  except ImportError:
    raise UserError(f"{url}: URL paths need fsspec: pip install 'llm-jax[gcs]'") from None
  try:
    return fsspec.core.url_to_fs(url, use_listings_cache=False)
  except (ImportError, ValueError, TypeError) as e:  # the protocol's package (gcsfs, s3fs) is missing, or unknown
    raise UserError(f'{url}: cannot open this URL ({e})') from None


def protocol(path: str) -> str | None:
  return path.split('://', 1)[0] if is_url(path) else None


def local_path(path: str) -> str | None:
  """The path on this machine's disk that `path` names (a URL whose fsspec backend is the local disk
  included), or None for a remote store. What a tool that opens paths itself (orbax) is given."""
  if not is_url(path):
    return os.path.abspath(_local(path))
  from fsspec.implementations.local import LocalFileSystem
  store, p = fs(path)
  return p if isinstance(store, LocalFileSystem) else None


def join(base: str, *names: str) -> str:
  return posixpath.join(base, *names) if is_url(base) else os.path.join(base, *names)


def absolute(path: str) -> str:
  """Local paths made absolute (what a run is named by); a URL is absolute already."""
  return path.rstrip('/') if is_url(path) else os.path.abspath(_local(path))


def dirname(path: str) -> str:
  return posixpath.dirname(path.rstrip('/')) if is_url(path) else os.path.dirname(_local(path))


def basename(path: str) -> str:
  return posixpath.basename(path.rstrip('/')) if is_url(path) else os.path.basename(_local(path))


def exists(path: str) -> bool:
  if not is_url(path):
    return os.path.exists(_local(path))
  store, p = fs(path)
  return store.exists(p)


def isdir(path: str) -> bool:
  if not is_url(path):
    return os.path.isdir(_local(path))
  store, p = fs(path)
  return store.isdir(p)


def isfile(path: str) -> bool:
  if not is_url(path):
    return os.path.isfile(_local(path))
  store, p = fs(path)
  return store.isfile(p)


def listdir(path: str) -> list[str]:
  """Names in a directory (FileNotFoundError when there is none)."""
  if not is_url(path):
    return os.listdir(_local(path))
  store, p = fs(path)
  return [posixpath.basename(entry.rstrip('/')) for entry in store.ls(p, detail=False)
          if entry.rstrip('/') != p.rstrip('/')]


def makedirs(path: str) -> None:
  """On an object store a directory is only a prefix of names: nothing to make (fsspec's makedirs is a no-op
  there, and makes the pseudo-directories of stores that keep them)."""
  if not is_url(path):
    os.makedirs(_local(path), exist_ok=True)
    return
  store, p = fs(path)
  store.makedirs(p, exist_ok=True)


def size(path: str) -> int:
  if not is_url(path):
    return os.path.getsize(_local(path))
  store, p = fs(path)
  return int(store.size(p))


def open(path: str, mode: str = 'r'):  # pylint: disable=redefined-builtin
  """A file object; text modes are UTF-8. For writing a whole file use atomic.replacing, for appending
  `Appender`: on a URL, a file opened for writing here is an upload that only lands when it closes."""
  encoding = None if 'b' in mode else 'utf-8'
  if not is_url(path):
    return io.open(_local(path), mode, encoding=encoding)
  store, p = fs(path)
  return store.open(p, mode, encoding=encoding) if encoding else store.open(p, mode)


def read_bytes(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


def read_json(path: str, expect: type = dict, what: str = ''):
  """A JSON file's value, which must be an `expect` (dict or list; `what` names it in the message); a file that
  cannot be read, is not JSON or holds something else is one line naming it (UserError)."""
  try:
    value = json.loads(read_bytes(path))
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f'cannot read {path}: {getattr(e, "strerror", None) or e}') from None
  except json.JSONDecodeError as e:
    raise UserError(f'{path} is not valid JSON (line {e.lineno}): {e.msg}') from None
  if not isinstance(value, expect):
    raise UserError(f'{path}: expected a JSON {what or ("list" if expect is list else "object")}')
  return value


def write_object(path: str, data: bytes) -> None:
  """One object written whole, which on an object store is atomic by itself (URLs only; local files go
  through atomic.replacing's rename)."""
  store, p = fs(path)
  store.pipe_file(p, data)


def remove(path: str) -> None:
  if not is_url(path):
    os.remove(_local(path))
    return
  store, p = fs(path)
  store.rm_file(p)


def rmtree(path: str) -> None:
  """Remove a directory and what it holds, ignoring errors (what is left is reported by whoever looks)."""
  if not is_url(path):
    shutil.rmtree(_local(path), ignore_errors=True)
    return
  try:
    store, p = fs(path)
    store.rm(p, recursive=True)
  except (OSError, UserError):
    pass


def rename(src: str, dst: str) -> None:
  """A rename; on an object store a copy of every object then a delete, which is not atomic: only used
  where a half-done move loses nothing (moving a damaged checkpoint step aside)."""
  if not is_url(src):
    os.rename(_local(src), _local(dst))
    return
  store, p = fs(src)
  store.mv(p, fs(dst)[1], recursive=True)


def files_under(root: str) -> dict[str, int]:
  """Every file below `root`, as its '/'-separated path relative to `root`, with its size."""
  out = {}
  if not is_url(root):
    root = _local(root)
    for dirpath, _, names in os.walk(root):
      for name in names:
        path = os.path.join(dirpath, name)
        out[os.path.relpath(path, root).replace(os.sep, '/')] = os.path.getsize(path)
    return out
  store, p = fs(root)
  p = p.rstrip('/')
  for path, info in store.find(p, detail=True).items():
    if info.get('type') != 'directory':
      out[path[len(p) + 1:]] = int(info['size'])
  return out


def free_bytes(path: str) -> int | None:
  """Free space where `path` lives, or None for an object store, which has no such figure (a bucket's quota
  shows up as a failed write, reported then)."""
  return None if is_url(path) else shutil.disk_usage(_local(path)).free


class Appender:
  """A file that grows by records (metrics.jsonl, TensorBoard events); `flush` makes what was written since
  durable. Locally each flush appends to the file (opened for that flush alone, as a one-off `open('a')`
  would: a file that a flush cannot reach fails that flush). On a URL there is no append: the bytes are kept
  here, the existing object's first, and each flush rewrites the object whole (a single object write,
  atomic: readers never see a torn record). Logs are small, a few hundred bytes per logged step, so the
  rewrite stays cheap."""

  def __init__(self, path: str):
    self.path = path
    self._url = is_url(path)
    self._data = bytearray(read_bytes(path) if self._url and exists(path) else b'')
    self._pending = bytearray()

  def write(self, data: bytes) -> None:
    self._pending += data

  def flush(self) -> None:
    """A failed flush raises once and drops its records (as a failed `open('a')` would have): `close` after
    it does not raise the same failure again."""
    pending, self._pending = self._pending, bytearray()
    if self._url:
      write_object(self.path, bytes(self._data + pending))
      self._data += pending
    elif pending:
      with io.open(_local(self.path), 'ab') as f:
        f.write(pending)

  def close(self) -> None:
    if self._pending:
      self.flush()
