"""kvloom past one process, on torch.distributed.

Two things live here:

* :func:`total_memory_bytes`: under tensor parallelism each rank's cache holds its own kv heads
  (``memory_bytes()`` is the rank's); this sums them over the process group.
* KV transfer between processes, for disaggregated serving (prefill in one process, decode in
  another): :func:`send_cache` / :func:`recv_cache` move a whole ``kvloom.Cache`` (the batch's
  sequences, their per-head plans, statistics and logical length), :func:`send_sequences` /
  :func:`recv_sequences` move chosen sequences of a low-level ``KVCache`` into a cache that may
  hold others. What travels is the cache as it is: after eviction, in its stored format
  (quantized blocks stay quantized), so the bytes on the wire are the compressed cache's bytes
  plus 14 bytes of metadata per slot of the blocks it holds and a small JSON header, not the
  full KV.

Wire format, version 1, point-to-point on the group (``tag`` keeps concurrent transfers apart)::

    header   int64[4]   WIRE_MAGIC, WIRE_VERSION, kind (1 cache, 2 kvcache), n_bytes
    payload  uint8[n]   a kvloom snapshot (kvloom.snapshot: magic, version, JSON header with the
                        model/cache settings and the sender's ``extra``, the C++ sequence
                        snapshot, sha256 of everything)

The receiver checks the header (magic, version, kind, size limit), then the whole snapshot
(checksum, model fingerprint, geometry, every count in the KV) before it builds anything.
A sender that dies, closes the connection or stays silent past ``timeout`` raises
:class:`TransferError`; a payload that is corrupted or cut short raises
:class:`kvloom.SnapshotError`. Either way nothing on the receiver changes. (With gloo, a
timeout or a dead peer closes the connection to that peer: later transfers with it need a new
process group.)

The bytes travel as CPU tensors, where kvloom's caches live today. In a job whose default
group is NCCL (which moves CUDA tensors only), pass ``group=torch.distributed.new_group(
backend="gloo")``. This module has been run with gloo on the CPU only.
"""
from __future__ import annotations

import datetime
from typing import Any, List, Optional, Sequence, Tuple

import torch

from .snapshot import dumps, parse

__all__ = ["TransferError", "total_memory_bytes", "enforce_budget", "send_cache", "recv_cache", "send_sequences",
           "recv_sequences", "WIRE_MAGIC", "WIRE_VERSION", "DEFAULT_MAX_BYTES"]

WIRE_MAGIC = 0x4B564C4F4F4D5458  # "KVLOOMTX"
WIRE_VERSION = 1
_KINDS = {"cache": 1, "kvcache": 2}
DEFAULT_MAX_BYTES = 1 << 40  # what a header may announce before the receiver allocates


class TransferError(RuntimeError):
    """A KV transfer that did not arrive: the peer died, closed the connection or timed out, or
    sent something that is not a kvloom transfer of the expected kind and version. Nothing on
    the receiving side changed."""


def _dist():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group "
                           "(e.g. under torchrun) before moving KV between processes")
    return dist


def _peer(dist, rank, group, what: str) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"{what} must be a rank (int), got {type(rank).__name__}")
    world = dist.get_world_size()
    if not 0 <= rank < world:
        raise ValueError(f"{what}={rank} is not a rank of this job (world size {world})")
    if rank == dist.get_rank():
        raise ValueError(f"{what}={rank} is this process's own rank")
    if group is not None and rank not in dist.get_process_group_ranks(group):
        raise ValueError(f"{what}={rank} is not in the given process group")
    return rank


def _timeout(timeout) -> Optional[datetime.timedelta]:
    if timeout is None or isinstance(timeout, datetime.timedelta):
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds or a timedelta, got {timeout!r}")
    return datetime.timedelta(seconds=float(timeout))


def total_memory_bytes(cache, group=None) -> int:
    """The bytes held by `cache` summed over the process group (every rank must call it): under
    tensor parallelism, the KV of all heads. ``cache`` is a ``kvloom.Cache`` or ``KVCache``."""
    dist = _dist()
    n = torch.tensor([int(cache.memory_bytes())], dtype=torch.int64)
    dist.all_reduce(n, group=group)
    return int(n.item())


# --- a budget across the ranks that share a layer's heads -------------------------------
_UNIT_FIELDS = ("tier", "value", "ord", "head", "index", "block", "frees")


def enforce_budget(cache, items) -> int:
    """The ``kv_budget`` of a ``KVCache`` that holds some of a layer's heads
    (:meth:`KVCache.share_heads`), for ``items``: (layer, seq, full_tokens) triples, the same on
    every rank of the group (each rank calls this with them). One exchange sums every item's
    bytes over the ranks; then each item still over its budget, in order, goes round by round:
    the ranks gather every rank's give-way units (C++ ``budget_units``: key, ord, head
    renumbered to the model's, bytes each frees), merge them in the one give-way order, take
    units until the projected layer fits (at least one), each evicts its own, and they sum the
    bytes again. That is the single-process ``cache::enforce_budget``, item by item. Returns
    the slots this rank freed."""
    dist = _dist()
    group = cache._shared[0]
    limits = [cache.budget_bytes(ft) for _, _, ft in items]
    found, every = _layer_sums(dist, group, cache, items)
    freed = 0
    for i in range(len(items)):
        while _over(every[:, i], limits[i]):
            freed += _give_way_round(dist, group, cache, items[i], found[i], every[:, i], limits[i])
            found_i, every_i = _layer_sums(dist, group, cache, [items[i]])
            found[i], every[:, i] = found_i[0], every_i[:, 0]
    return freed


def _layer_sums(dist, group, cache, items):
    """Each item's C++ budget units here, and [rank, item, (bytes held, projected bytes,
    units)] from every rank (float64: exact for these integers)."""
    found = [cache._c.budget_units(layer, seq) for layer, seq, _ in items]
    sums = torch.tensor([[cache._c.layer_bytes(layer, seq), proj, len(u["tier"])]
                         for (layer, seq, _), (u, proj) in zip(items, found)], dtype=torch.float64).reshape(-1, 3)
    every = [torch.empty_like(sums) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, sums, group=group)
    return found, torch.stack(every)


def _over(sums, limit) -> bool:
    """Over the budget with something left to give way (else only protected tokens remain)."""
    return sums[:, 0].sum().item() > limit and sums[:, 2].sum().item() > 0


def _give_way_round(dist, group, cache, item, found, sums, limit) -> int:
    import numpy as np

    units, _ = found
    offset = cache._shared[1]
    n = len(units["tier"])
    local = np.stack([units[f].astype(np.float64) for f in _UNIT_FIELDS], axis=1) if n else np.zeros((0, 7))
    local[:, 3] += offset  # the model's head numbers: the merged order breaks ties by them
    width = int(sums[:, 2].max().item())
    padded = torch.zeros(width, 7, dtype=torch.float64)
    padded[:n] = torch.from_numpy(local)
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, padded, group=group)
    merged = np.concatenate([p[:int(c)].numpy() for p, c in zip(parts, sums[:, 2].tolist())])
    merged = merged[np.lexsort((merged[:, 4], merged[:, 3], merged[:, 2], merged[:, 1], merged[:, 0]))]
    proj, take = sums[:, 1].sum().item(), 0
    while take < len(merged) and (take == 0 or proj > limit):
        proj -= merged[take, 6]
        take += 1
    chosen = merged[:take]
    chosen = chosen[(chosen[:, 3] >= offset) & (chosen[:, 3] < offset + cache.n_kv_heads)]
    if not len(chosen):
        return 0
    layer, seq, _ = item
    return cache._c.give_way(layer, seq, (chosen[:, 3] - offset).astype(int).tolist(),
                             chosen[:, 4].astype(np.int64).tolist(), chosen[:, 5].astype(bool).tolist())


# --- the wire -------------------------------------------------------------------------
def _send_blob(dist, blob: bytearray, kind: str, dst: int, group, tag: int) -> int:
    header = torch.tensor([WIRE_MAGIC, WIRE_VERSION, _KINDS[kind], len(blob)], dtype=torch.int64)
    dist.send(header, dst, group=group, tag=tag)
    dist.send(torch.frombuffer(blob, dtype=torch.uint8), dst, group=group, tag=tag)
    return header.numel() * 8 + len(blob)


def _recv_blob(dist, kind: str, src: int, group, tag: int, timeout, max_bytes: int) -> memoryview:
    def wait(t, what):
        try:
            work = dist.irecv(t, src, group=group, tag=tag)
            if timeout is None:
                work.wait()
            else:
                work.wait(timeout=timeout)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TransferError(f"receiving a kvloom {kind} from rank {src}: no {what} arrived (the sender died, "
                                f"closed the connection or timed out): {first}") from None

    header = torch.zeros(4, dtype=torch.int64)
    wait(header, "header")
    magic, version, code, n = (int(x) for x in header)
    if magic != WIRE_MAGIC:
        raise TransferError(f"receiving from rank {src}: not a kvloom transfer (bad magic {magic:#x})")
    if version != WIRE_VERSION:
        newer = " (sent by a newer kvloom)" if version > WIRE_VERSION else ""
        raise TransferError(f"receiving from rank {src}: wire version {version}{newer}; this kvloom speaks "
                            f"version {WIRE_VERSION}")
    if code != _KINDS[kind]:
        got = {v: k for k, v in _KINDS.items()}.get(code, f"unknown kind {code}")
        raise TransferError(f"receiving from rank {src}: expected a {kind!r} transfer, the sender sent {got!r} "
                            f"(pair send_cache with recv_cache, send_sequences with recv_sequences)")
    if not 0 < n <= max_bytes:
        raise TransferError(f"receiving from rank {src}: the header announces {n} bytes (the limit is "
                            f"max_bytes={max_bytes})")
    payload = torch.empty(n, dtype=torch.uint8)
    wait(payload, "payload")
    return memoryview(payload.numpy())


def _check_extra(extra):
    if extra is None:
        return None
    import json

    try:
        json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"extra must be JSON-serialisable (lists, dicts, numbers, strings): {e}") from None
    return extra


# --- kvloom.Cache ---------------------------------------------------------------------
def send_cache(cache, dst: int, *, extra: Any = None, group=None, tag: int = 0) -> int:
    """Sends a ``kvloom.Cache`` (every row of its batch, as it is now: evicted, compressed,
    with its plans and statistics) to rank `dst`, which calls :func:`recv_cache`. `extra` is any
    JSON value that travels with it (e.g. the prompt's token ids, so the receiver can call
    ``generate``). Blocks until the peer has the bytes; returns the bytes sent."""
    from .hf.cache import LoomCache

    if not isinstance(cache, LoomCache):
        raise TypeError(f"send_cache sends a kvloom.Cache, got {type(cache).__name__} "
                        "(for a KVCache use send_sequences)")
    dist = _dist()
    dst = _peer(dist, dst, group, "dst")
    meta, sections = cache._snapshot_parts(extra=_check_extra(extra))
    return _send_blob(dist, dumps("cache", meta, sections), "cache", dst, group, tag)


def recv_cache(model, src: int, *, tokenizer=None, capacity_bytes: Optional[int] = None, group=None, tag: int = 0,
               timeout=None, max_bytes: int = DEFAULT_MAX_BYTES):
    """Receives what :func:`send_cache` sent from rank `src`: returns ``(cache, extra)``, a
    ``kvloom.Cache`` for `model` (the same checkpoint: geometry and a weight digest are checked)
    that continues exactly as the sender's would have. ``tokenizer`` as for ``kvloom.Cache``
    (FastGen needs it); ``timeout`` in seconds (default: the process group's)."""
    from .hf.cache import LoomCache

    dist = _dist()
    src = _peer(dist, src, group, "src")
    data = _recv_blob(dist, "cache", src, group, tag, _timeout(timeout), max_bytes)
    meta, sections = parse(data, "cache", f"transfer from rank {src}")
    cache = LoomCache._from_snapshot_parts(meta, sections, model, f"transfer from rank {src}", tokenizer,
                                           capacity_bytes)
    return cache, meta.get("extra")


# --- KVCache --------------------------------------------------------------------------
def send_sequences(cache, seqs: Sequence[int], dst: int, *, extra: Any = None, group=None, tag: int = 0) -> int:
    """Sends sequences `seqs` of a ``KVCache`` (forks among them keep sharing their blocks) to
    rank `dst`, which calls :func:`recv_sequences`; returns the bytes sent."""
    from .cache import KVCache

    if not isinstance(cache, KVCache):
        raise TypeError(f"send_sequences sends from a KVCache, got {type(cache).__name__} "
                        "(for a kvloom.Cache use send_cache)")
    dist = _dist()
    dst = _peer(dist, dst, group, "dst")
    meta, sections = cache._snapshot_parts(seqs, extra=_check_extra(extra))
    return _send_blob(dist, dumps("kvcache", meta, sections), "kvcache", dst, group, tag)


def recv_sequences(cache, src: int, *, group=None, tag: int = 0, timeout=None,
                   max_bytes: int = DEFAULT_MAX_BYTES) -> Tuple[List[int], Any]:
    """Adds the sequences rank `src` sent with :func:`send_sequences` to `cache` (same geometry,
    dtype, block size and layer sharing; it may hold other sequences) under fresh ids. Returns
    ``(ids, extra)``. All or nothing: on any error every sequence already here stays as it was."""
    from .cache import KVCache

    if not isinstance(cache, KVCache):
        raise TypeError(f"recv_sequences adds to a KVCache, got {type(cache).__name__}")
    dist = _dist()
    src = _peer(dist, src, group, "src")
    data = _recv_blob(dist, "kvcache", src, group, tag, _timeout(timeout), max_bytes)
    meta, sections = parse(data, "kvcache", f"transfer from rank {src}")
    return cache._import(sections, f"transfer from rank {src}", keep_ids=False), meta.get("extra")

