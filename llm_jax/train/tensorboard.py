"""TensorBoard scalar event files, written without TensorFlow (or the tensorboard package).

An event file is a TFRecord stream of `Event` protocol buffers. Each record is

    uint64 length | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)

(little-endian), and the protos needed for scalars are small enough to encode by hand:

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }   Value { string tag = 1; float simple_value = 2; }

`tensorboard --logdir=WORKDIR/tensorboard` reads the result (tests/test_sinks.py parses it back with
protobuf's own decoder).
"""

from __future__ import annotations

import os
import socket
import struct
import time

from llm_jax import storage

# ---------------------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli), the checksum TFRecord uses: reflected polynomial 0x82F63B78.


def _crc_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """TFRecord stores a rotated, offset CRC so that CRCs of data containing CRCs stay well distributed."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
  length = struct.pack('<Q', len(data))
  return length + struct.pack('<I', masked_crc32c(length)) + data + struct.pack('<I', masked_crc32c(data))


# ---------------------------------------------------------------------------------------------------------
# Protocol-buffer encoding of the few fields used.


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # negative int64s are ten-byte two's complement varints
  out = bytearray()
  while True:
    bits = n & 0x7F
    n >>= 7
    if n:
      out.append(bits | 0x80)
    else:
      out.append(bits)
      return bytes(out)


def _bytes_field(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def scalar_summary(values: dict[str, float]) -> bytes:
  """A Summary proto with one simple_value per tag."""
  out = b''
  for tag, value in values.items():
    entry = _bytes_field(1, tag.encode('utf-8')) + _varint(2 << 3 | 5) + struct.pack('<f', float(value))
    out += _bytes_field(1, entry)
  return out


def event(step: int, wall_time: float, summary: bytes | None = None, file_version: str | None = None) -> bytes:
  out = _varint(1 << 3 | 1) + struct.pack('<d', wall_time) + _varint(2 << 3 | 0) + _varint(step)
  if file_version is not None:
    out += _bytes_field(3, file_version.encode('utf-8'))
  if summary is not None:
    out += _bytes_field(5, summary)
  return out


class EventWriter:
  """Appends scalar events to a new `events.out.tfevents.*` file in `logdir` (a local directory or a URL:
  storage.Appender)."""

  def __init__(self, logdir: str):
    storage.makedirs(logdir)
    name = f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}'
    self.path = storage.join(logdir, name)
    self._file = storage.Appender(self.path)
    self._file.write(frame(event(0, time.time(), file_version='brain.Event:2')))
    self._file.flush()

  def scalars(self, step: int, values: dict[str, float]) -> None:
    self._file.write(frame(event(step, time.time(), summary=scalar_summary(values))))
    self._file.flush()  # one record per logged step: a crash loses nothing already logged

  def close(self) -> None:
    self._file.close()
