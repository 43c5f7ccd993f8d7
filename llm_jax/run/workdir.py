"""A run's work directory: its resolved config, its tokenizer and its metrics, found with `--workdir` alone.

    WORKDIR/config.json       the resolved config (written at the start of training)
    WORKDIR/tokenizer.model   the tokenizer every command of this run uses: a sentencepiece model, or
    WORKDIR/tokenizer.json    a Hugging Face tokenizer with its tokenizer_config.json (data/tokenizer.py)
    WORKDIR/checkpoints/      orbax steps (see checkpoint.py)
    WORKDIR/metrics.jsonl     one JSON object per logged step

WORKDIR may be a URL (`gs://bucket/run`): every file here is read and written through storage.py.
"""

from __future__ import annotations

import errno
import json
import os

import jax
import numpy as np

from llm_jax import config as config_lib, storage
from llm_jax.data import objectives, sources, tokenizer as tokenizer_lib
from llm_jax.errors import UserError
from llm_jax.run import checkpoint_files

CONFIG = 'config.json'
TOKENIZER = 'tokenizer.model'
METRICS = 'metrics.jsonl'


def config_path(workdir: str) -> str:
  return storage.join(workdir, CONFIG)


def load_config(workdir: str):
  """The config a run was trained with; a one-line error when the workdir is not a run."""
  path = config_path(workdir)
  if storage.isfile(path):  # one request for the common case, on a bucket as on a disk
    return config_lib.from_json_file(path)
  if not storage.exists(workdir):
    raise UserError(f'workdir {workdir} does not exist')
  if not storage.isdir(workdir):
    raise UserError(f'workdir {workdir} is not a directory')
  if not storage.isfile(path):
    raise UserError(f'workdir {workdir} has no {CONFIG} (not an llm-jax run?)')
  return config_lib.from_json_file(path)


def default_recipe() -> str:
  """The recipe a command uses without --config: the shipped `tiny` (llm_jax/recipes/), wherever the
  package is installed and whatever the current directory."""
  return 'tiny'


def has_checkpoints(workdir: str) -> bool:
  d = storage.join(workdir, 'checkpoints')
  try:
    return any(name.isdigit() for name in storage.listdir(d))
  except (FileNotFoundError, NotADirectoryError):
    return False


def unwritable(path: str) -> str | None:
  """Why an existing directory cannot be written to, or None; asks the OS (access, statvfs) instead of
  writing a probe file, so that checking changes nothing."""
  if os.access(path, os.W_OK | os.X_OK):
    return None
  try:
    if os.statvfs(path).f_flag & os.ST_RDONLY:
      return os.strerror(errno.EROFS)
  except OSError:
    pass
  return os.strerror(errno.EACCES)


def check_writable(workdir: str) -> None:
  """Fail before any work if the workdir cannot be written (read-only filesystem, a file in the way), and
  without writing anything: the run's files change only once its inputs are known to be good (`prepare`)."""
  if jax.process_index() != 0:
    return
  if storage.is_url(workdir):
    _check_url(workdir)
    return
  local = storage.local_path(workdir)
  if os.path.exists(local) and not os.path.isdir(local):
    raise UserError(f'workdir {workdir} is not a directory')
  existing = local
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  why = unwritable(existing) if os.path.isdir(existing) else 'not a directory'
  if why and existing == local:
    raise UserError(f'cannot write to workdir {workdir}: {why}')
  if why:
    raise UserError(f'cannot create workdir {workdir}: {existing}: {why}')


def _check_url(workdir: str) -> None:
  """A workdir at a URL: its store must have an fsspec backend and orbax must be able to write checkpoints
  there; a file in the way is refused. Permissions cannot be asked of a bucket without writing to it (no
  access bits, no read-only flag): a bucket that refuses writes fails at the first one, as one line."""
  try:
    if storage.isfile(workdir):
      raise UserError(f'workdir {workdir} is not a directory')
  except OSError as e:
    raise UserError(f'cannot reach workdir {workdir}: {e.strerror or e}') from None
  checkpoint_files.orbax_directory(storage.join(workdir, 'checkpoints'))


def prepare(workdir: str, cfg, tok: tokenizer_lib.Tokenizer) -> None:
  """Create the workdir and write the resolved config and the tokenizer (process 0). Training calls it once
  the data, the tokenizer and the checkpoint to resume from have been read: a mistake in a resumed run's
  overrides then fails without touching its config.json, which eval and generate read."""
  if jax.process_index() != 0:
    return
  try:
    storage.makedirs(workdir)
    config_lib.write_json_atomic(cfg, config_path(workdir))
    tokenizer_lib.write_files(tok, workdir)
    for name, _ in tokenizer_lib.BACKENDS:  # one tokenizer per run: a replaced one of the other kind goes
      if name not in tok.files() and storage.isfile(storage.join(workdir, name)):
        storage.remove(storage.join(workdir, name))
  except OSError as e:
    raise UserError(f'cannot write to workdir {workdir}: {e.strerror}') from None


def tokenizer_for_training(workdir: str, cfg) -> tokenizer_lib.Tokenizer:
  """The run's tokenizer, made once: data.tokenizer, the workdir's own, or trained on the training split
  (`prepare` saves it in the workdir).

  Process 0 makes it and hands the bytes to the others, so hosts need no shared filesystem.
  """
  proto = b''
  if jax.process_index() == 0:
    path = tokenizer_lib.find(workdir) if storage.isdir(workdir) else None
    if cfg.data.tokenizer:
      tok = tokenizer_lib.load(cfg.data.tokenizer)
    elif path:
      tok = tokenizer_lib.load(path)
    elif has_checkpoints(workdir):  # e.g. imported from a Hugging Face directory without tokenizer files
      raise UserError(f'workdir {workdir} holds checkpoints but no tokenizer ({_TOKENIZER_NAMES}); a new one '
                      'would not match their embeddings: give the one they were trained with '
                      '(--config.data.tokenizer=PATH)')
    else:
      tok = prepared_tokenizer(cfg.data) or train_tokenizer(cfg)
    proto = tok.serialized()
  proto = _broadcast_bytes(proto)
  tok = tokenizer_lib.from_bytes(proto)
  check_vocab(tok, cfg)
  return tok


def train_tokenizer(cfg) -> tokenizer_lib.Tokenizer:
  """Trained to model.vocab_size less the ids the objective reserves after the pieces (mask, sentinels)."""
  parts = sources.open_sources(cfg.data, 'train')
  sources.require_texts(cfg.data, parts)  # one line naming the files, not sentencepiece's own complaint
  docs = parts[0][0] if len(parts) == 1 else sources.Interleaved(parts)
  pieces = cfg.model.vocab_size - objectives.reserved_ids(cfg.data)
  return tokenizer_lib.train(sources.texts(docs), pieces, cfg.data.tokenizer_train_chars)


def prepared_tokenizer(data_cfg) -> tokenizer_lib.Tokenizer | None:
  """The tokenizer of the prepared (pre-tokenized) TFDS sources the config reads, if any: a run trains on
  their ids, so it must use their tokenizer."""
  if not any(spec.startswith(sources.TFDS_PREFIX) for spec, _ in sources.source_specs(data_cfg)):
    return None
  from llm_jax.data import tfds_source
  protos = sources.prepared_tokenizers(data_cfg)
  if len(set(protos.values())) > 1:
    raise UserError('the prepared sources of data.mixture were made with different tokenizers: '
                    + ', '.join(f'{spec} ({tfds_source.tokenizer_digest(p)})' for spec, p in protos.items()))
  return tokenizer_lib.from_bytes(next(iter(protos.values()))) if protos else None


_TOKENIZER_NAMES = ' or '.join(name for name, _ in tokenizer_lib.BACKENDS)


def tokenizer_path(workdir: str) -> str | None:
  """The run's tokenizer file (tokenizer.model or tokenizer.json), or None."""
  return tokenizer_lib.find(workdir)


def load_tokenizer(workdir: str, cfg):
  path = tokenizer_lib.find(workdir)
  if path is None:
    raise UserError(f'workdir {workdir} has no tokenizer ({_TOKENIZER_NAMES}); a run imported from Hugging '
                    'Face has one when the checkpoint came with its tokenizer files')
  tok = tokenizer_lib.load(path)
  check_vocab(tok, cfg)
  return tok


def check_vocab(tok, cfg) -> None:
  reserved = objectives.reserved_ids(cfg.data, tok)
  if tok.vocab_size + reserved > cfg.model.vocab_size:
    extra = f' plus the {reserved} ids data.objective={cfg.data.objective!r} reserves' if reserved else ''
    raise UserError(f'config key model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer\'s '
                    f'{tok.vocab_size} pieces{extra}')
  objective = objectives.of(cfg.data)
  own_template = objective.chat and tok.chat_template  # writes BOS itself
  if cfg.data.add_bos and objective.bos and tok.bos_id < 0 and not own_template:
    raise UserError('config key data.add_bos=True, but the tokenizer has no BOS piece')


def _broadcast_bytes(data: bytes) -> bytes:
  if jax.process_count() == 1:
    return data
  from jax.experimental import multihost_utils
  length = int(multihost_utils.broadcast_one_to_all(np.int64(len(data))))
  buf = np.zeros(length, np.uint8)
  if jax.process_index() == 0:
    buf[:] = np.frombuffer(data, np.uint8)
  return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf)))


class MetricsWriter:
  """Appends one JSON object per logged step to WORKDIR/metrics.jsonl (process 0 only), flushed per record:
a crash loses nothing already logged."""

  def __init__(self, workdir: str):
    self._path = storage.join(workdir, METRICS)
    self._enabled = jax.process_index() == 0
    self._file = None
    if self._enabled:
      _drop_partial_last_line(self._path)
      self._file = storage.Appender(self._path)

  def write(self, record: dict) -> None:
    if not self._enabled:
      return
    line = json.dumps({k: (float(v) if isinstance(v, (np.floating, np.integer)) else v)
                       for k, v in record.items()})
    self._file.write((line + '\n').encode('utf-8'))
    self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file, f = None, self._file
      f.close()


def _drop_partial_last_line(path: str) -> None:
  """A run killed in the middle of appending a record (or stopped by a full disk) can leave a last line
  without its newline; the resumed run's first record would be glued onto it, corrupting both. An object
  at a URL is always whole records (storage.Appender rewrites it whole), so there is nothing to drop."""
  if storage.is_url(path):
    return
  try:
    with open(path, 'rb+') as f:
      size = f.seek(0, os.SEEK_END)
      start = max(0, size - 65536)  # records are far shorter than this
      f.seek(start)
      tail = f.read()
      if not tail or tail.endswith(b'\n'):
        return
      cut = tail.rfind(b'\n')
      if cut >= 0 or start == 0:
        f.truncate(start + cut + 1)
  except FileNotFoundError:
    return
