"""File sources at URLs (`gs://bucket/corpus/*.txt`, `s3://...`, any fsspec protocol), read through fsspec:
a multi-host job keeps its data in a bucket that every host reads. Globs, sizes and byte ranges are asked
of the store, so a document read is one ranged read, as on a local disk. The filesystem behind a URL
is storage.py's, the same one a work directory at a URL is written through. gs:// needs gcsfs installed
(`pip install 'llm-jax[gcs]'`); the tests use fsspec's in-memory store as the stand-in.
"""

from __future__ import annotations

from llm_jax import storage
from llm_jax.errors import UserError

_fs = storage.fs  # the one fsspec entry point, shared with work directories at URLs


def is_url(path: str) -> bool:
  """`file://` included: a data source given as one is read through fsspec like any URL."""
  return '://' in path


def glob(pattern: str) -> list[str]:
  """The files matching `pattern`, as full URLs, sorted."""
  fs, path = _fs(pattern)
  try:
    found = fs.glob(path) if any(c in path for c in '*?[') else ([path] if fs.exists(path) else [])
    return sorted(fs.unstrip_protocol(p) for p in found if fs.isfile(p))
  except OSError as e:
    raise UserError(f'cannot list {pattern}: {e}') from None


def open_binary(url: str):
  fs, path = _fs(url)
  return fs.open(path, 'rb')


def size(url: str) -> int:
  fs, path = _fs(url)
  return int(fs.size(path))
