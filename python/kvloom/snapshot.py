"""Snapshot files: caches and conversations that survive the process.

A snapshot file (format version 1, little-endian) is::

    magic      16 bytes  b"KVLOOM-SNAPSHOT\\0"
    version    u32       1
    header_len u32       length of the header
    header     JSON      {"kind": "kvcache" | "cache" | "conversation", "kvloom": version,
                          "meta": {...what the kind needs to rebuild itself...},
                          "sections": [[name, n_bytes], ...]}
    sections   bytes     in the order listed; "kv" is the C++ sequence snapshot (its own
                         format: cpp/src/snapshot.cpp), others are raw arrays the meta describes
    sha256     32 bytes  of everything above

Files are written atomically (a temporary file in the same directory, flushed and fsynced,
then renamed over the target, then the directory fsynced), so a crash or kill during a
save leaves the previous snapshot in place. Loading checks the magic, the version, the
checksum, the header and every section before anything is built; the C++ importer then
checks the KV itself against the cache it goes into. Anything wrong raises
:class:`SnapshotError` and changes nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
from pathlib import Path
from typing import Dict, Tuple

__all__ = ["SnapshotError", "write", "dumps", "read", "parse", "MAGIC", "VERSION"]

MAGIC = b"KVLOOM-SNAPSHOT\x00"
VERSION = 1
_FIXED = len(MAGIC) + 8  # magic, version, header_len
_MAX_HEADER = 64 << 20


class SnapshotError(ValueError):
    """A snapshot file that cannot be loaded: truncated, corrupted, of another version or kind,
    or made for another model or cache geometry. Nothing was changed."""


def _header(kind: str, meta: dict, sections: Dict[str, bytes]) -> bytes:
    from . import __version__

    header = json.dumps({"kind": kind, "kvloom": __version__, "meta": meta,
                         "sections": [[name, len(data)] for name, data in sections.items()]},
                        separators=(",", ":"), allow_nan=False).encode()
    if len(header) > _MAX_HEADER:
        raise ValueError(f"snapshot header of {len(header)} bytes is too large")
    return header


def _chunks(kind: str, meta: dict, sections: Dict[str, bytes]):
    """The snapshot's pieces in order, the sha256 of them all last."""
    header = _header(kind, meta, sections)
    h = hashlib.sha256()
    for chunk in (MAGIC, struct.pack("<II", VERSION, len(header)), header, *sections.values()):
        h.update(chunk)
        yield chunk
    yield h.digest()


def dumps(kind: str, meta: dict, sections: Dict[str, bytes]) -> bytearray:
    """A snapshot in memory (what :func:`write` puts in a file); :func:`parse` reads it back."""
    out = bytearray()
    for chunk in _chunks(kind, meta, sections):
        out += chunk
    return out


def write(path, kind: str, meta: dict, sections: Dict[str, bytes]) -> int:
    """Writes a snapshot atomically; returns its size in bytes."""
    path = Path(path)
    chunks = _chunks(kind, meta, sections)
    first = next(chunks)  # builds (and checks) the header before any file exists
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    size = 0
    try:
        with open(tmp, "wb") as f:
            for chunk in (first, *chunks):
                f.write(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent if str(path.parent) else ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return size


def read(path, kind: str) -> Tuple[dict, Dict[str, memoryview]]:
    """(meta, sections) of a snapshot of `kind`, every byte checked; SnapshotError otherwise."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"no snapshot at {path}") from None
    return parse(data, kind, f"snapshot {path}")


def parse(data: bytes, kind: str, where: str = "snapshot") -> Tuple[dict, Dict[str, memoryview]]:
    """:func:`read` on bytes already in memory."""
    if len(data) < _FIXED + 32 or data[:len(MAGIC)] != MAGIC:
        raise SnapshotError(f"{where}: not a kvloom snapshot (bad magic or too short: {len(data)} bytes)")
    version, header_len = struct.unpack_from("<II", data, len(MAGIC))
    if version != VERSION:
        newer = " (written by a newer kvloom)" if version > VERSION else ""
        raise SnapshotError(f"{where}: format version {version}{newer}; this kvloom reads version {VERSION}")
    if header_len > len(data) - _FIXED - 32:
        raise SnapshotError(f"{where}: truncated (header of {header_len} bytes in a {len(data)}-byte file)")
    body = memoryview(data)[:-32]
    if hashlib.sha256(body).digest() != data[-32:]:
        raise SnapshotError(f"{where}: checksum mismatch: the file is corrupted or was cut short")
    try:
        header = json.loads(bytes(body[_FIXED:_FIXED + header_len]))
        got_kind, meta, listed = header["kind"], header["meta"], header["sections"]
        sizes = [(str(name), int(n)) for name, n in listed]
    except (ValueError, KeyError, TypeError) as e:
        raise SnapshotError(f"{where}: unreadable header ({e})") from None
    if got_kind != kind:
        raise SnapshotError(f"{where}: holds a {got_kind!r} snapshot, not a {kind!r} one")
    if not isinstance(meta, dict):
        raise SnapshotError(f"{where}: unreadable header (meta is not an object)")
    at = _FIXED + header_len
    if any(n < 0 for _, n in sizes) or at + sum(n for _, n in sizes) != len(body):
        raise SnapshotError(f"{where}: section sizes do not add up to the file")
    sections = {}
    for name, n in sizes:
        sections[name] = body[at:at + n]
        at += n
    return meta, sections


def policy_from(d, where: str):
    """The policy a snapshot recorded as {"name": ..., "values": {...}} (Policy.saved_values)."""
    from . import policies

    if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not isinstance(d.get("values"), dict):
        raise SnapshotError(f"{where}: a policy entry is malformed")
    try:
        return policies.make(d["name"], **d["values"])
    except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
        raise SnapshotError(f"{where}: its policy cannot be made here: {e}") from None


def need(meta: dict, key: str, types, where: str):
    """meta[key], checked to be of `types` (SnapshotError otherwise)."""
    v = meta.get(key)
    if not isinstance(v, types) or isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise SnapshotError(f"{where}: header field {key!r} missing or of the wrong type")
    return v
