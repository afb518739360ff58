"""Python face of the C++ paged KV cache."""
from __future__ import annotations

import math
import operator
import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import _core, policies
from ._tensors import as_tensor, host, kv_dtype_name, parse_device, quant_bits, torch_dtype, use_stream
from .policies import Policy

__all__ = ["BlockPool", "KVCache", "default_capacity_bytes", "make_policy"]

BlockPool = _core.BlockPool
CapacityError = _core.CapacityError


def default_capacity_bytes(device=None) -> int:
    """Default hard limit of a pool: half the machine's physical memory, or half a CUDA
    device's memory (the arena grows lazily, so an unused limit costs nothing).
    KVLOOM_POOL_BYTES overrides it."""
    env = os.environ.get("KVLOOM_POOL_BYTES")
    if env:
        try:
            val = int(float(env))
        except ValueError:
            raise ValueError(f"KVLOOM_POOL_BYTES must be a number of bytes, got {env!r}") from None
        if val <= 0:
            raise ValueError(f"KVLOOM_POOL_BYTES must be positive, got {env!r}")
        return val
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.get_device_properties(torch.device(device)).total_memory // 2
    try:
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        phys = 8 << 30
    return max(phys // 2, 64 << 20)


def make_policy(policy) -> Policy:
    """A policy object from a policy, None (``Full``) or a registered name ("window", "h2o", ...)."""
    if policy is None:
        return policies.Full()
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, str):
        return policies.make(policy)
    raise TypeError(f"policy must be a kvloom policy (e.g. kvloom.Window(...)) or a name from "
                    f"{policies.names()}, got {type(policy).__name__}")


View = Union[int, Sequence[Union[int, Tuple[int, int]]]]
_INT32 = (-(2**31), 2**31 - 1)


def check_budget(kv_budget) -> Optional[float]:
    """None, or kv_budget as a float in (0, 1] (a fraction of ``Full``'s bytes)."""
    if kv_budget is None:
        return None
    if isinstance(kv_budget, bool) or not isinstance(kv_budget, (int, float)):
        raise TypeError(f"kv_budget must be a number in (0, 1] (a fraction of Full's bytes), got {kv_budget!r}")
    b = float(kv_budget)
    if not (0.0 < b <= 1.0):
        raise ValueError(f"kv_budget must be in (0, 1] (a fraction of Full's bytes), got {kv_budget!r}")
    return b


def _int(x, what: str) -> int:
    """An index argument (layer, head, sequence id, count) as a Python int; bools, floats and
    other non-integers are refused rather than silently converted."""
    if type(x) is int:  # the common case, first
        return x
    if isinstance(x, (bool, np.bool_)) or (isinstance(x, (torch.Tensor, np.ndarray)) and x.dtype in (torch.bool, np.bool_)):
        raise TypeError(f"{what} must be an integer, got a bool ({x!r})")
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {type(x).__name__} ({x!r})") from None


def _int_list(xs, what: str) -> List[int]:
    """A 1-D list of integers from a tensor, array or sequence; bool masks and floats are
    refused (``[False, True]`` is not a list of slots)."""
    if isinstance(xs, torch.Tensor):
        if xs.dtype == torch.bool or xs.dtype.is_floating_point or xs.dtype.is_complex:
            raise TypeError(f"{what} must hold integers, got a {xs.dtype} tensor")
        return [int(x) for x in xs.reshape(-1).tolist()]
    if isinstance(xs, np.ndarray):
        if xs.dtype.kind not in "iu":
            raise TypeError(f"{what} must hold integers, got a {xs.dtype} array")
        return [int(x) for x in xs.reshape(-1).tolist()]
    if isinstance(xs, (str, bytes)) or not hasattr(xs, "__iter__"):
        raise TypeError(f"{what} must be a sequence of integers, got {type(xs).__name__}")
    return [_int(x, what) for x in xs]


def _int_list_or_views(seqs) -> list:
    if type(seqs) is list:
        return seqs
    if isinstance(seqs, (str, bytes)) or not hasattr(seqs, "__iter__"):
        raise TypeError(f"seqs must be a list (one sequence id or segment list per batch row), got {type(seqs).__name__}")
    return list(seqs)


def _view(x, b: int):
    """seqs[b] of attend(): a sequence id, or a list of segments (seq, rope_delta) or seq."""
    if isinstance(x, (list, tuple)):
        segs = []
        for seg in x:
            if isinstance(seg, (list, tuple)):
                if len(seg) != 2:
                    raise ValueError(f"seqs[{b}]: a segment is seq or (seq, rope_delta), got {seg!r}")
                segs.append((_int(seg[0], f"seqs[{b}] sequence"), _int(seg[1], f"seqs[{b}] rope delta")))
            else:
                segs.append((_int(seg, f"seqs[{b}] sequence"), 0))
        return segs
    return _int(x, f"seqs[{b}]")


def _int_tensor(t: torch.Tensor, what: str, lo: int, hi: int) -> torch.Tensor:
    """Checks an integer metadata tensor lies in [lo, hi] before it is narrowed."""
    if t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex:
        raise TypeError(f"{what} must be an integer tensor, got {t.dtype}")
    if t.numel() and (int(t.min()) < lo or int(t.max()) > hi):
        raise ValueError(f"{what} must lie in [{lo}, {hi}], got values in [{int(t.min())}, {int(t.max())}]")
    return t


class KVCache:
    """A paged KV cache of ``n_layers x n_kv_heads x sequences`` head stores (C++).

    Each (layer, kv head, sequence) keeps its own block table, so per-head lengths may
    differ (eviction frees real memory). Sequences can be forked (blocks shared,
    copy-on-write), rolled back and dropped. Every failed operation raises and leaves the
    cache unchanged; running out of pool capacity raises :class:`kvloom.CapacityError`.

    Args:
        n_layers, n_kv_heads, head_dim: the model's KV geometry.
        dtype: storage dtype (torch.float32 / float16 / bfloat16 or its name).
        policy: eviction policy (``kvloom.Full()``, ``kvloom.Window(sinks, recent)``, ... or a
            registered name, see ``kvloom.policies.names()``).
        block_size: tokens per block.
        capacity_bytes: hard limit of the block pool (default: :func:`default_capacity_bytes`).
        layer_store: cross-layer KV sharing (CLA): ``layer_store[l]`` is the layer whose KV
            layer l reads (an earlier owner, or l itself). Readers hold no memory; appends go
            to owners. Default: no sharing.
        pool: share an existing :class:`kvloom.BlockPool` instead of making one.
        kv_dtype: quantized storage, ``"int8"``, ``"int4"`` or ``"int2"`` (default None: ``dtype``
            throughout). A block is quantized once all its slots are live and no append writes it
            any more (and at the end of ``apply_policy``, after the policy's evictions), in
            kvloom's block format (README, *Quantized KV*); the block being filled stays in
            ``dtype`` (with int2 also each head's first block and the full block holding its
            newest token). Default block size 32 then (16 with int2). On a CUDA device the quantized
            blocks live there too (README, *On the GPU*). Appends must be finite and within
            fp16's range; ``capacity_bytes`` bounds each of the two pools.
        kv_budget: a memory budget, as a fraction in (0, 1] of what ``Full`` holds (default
            None: none). After each :meth:`apply_policy`, one layer of one sequence holds at
            most ``kv_budget`` x the bytes ``Full`` would hold for its tokens (in ``dtype``, with
            this block size), never less than one block per kv head (plus one quantized block
            with ``kv_dtype``); while it holds more, tokens of the layer's heads give way in the
            order of the policy's rule (README, *Memory budget*; :meth:`give_way_keys`).
        device: where the blocks live: "cpu" (default) or a CUDA device ("cuda", "cuda:1");
            tensors passed in must be on it (positions and classes may be anywhere). CUDA work
            runs on torch's current stream.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, *, dtype=None, policy=None,
                 block_size: Optional[int] = None, capacity_bytes: Optional[int] = None, pool: Optional[BlockPool] = None,
                 layer_store: Optional[Sequence[int]] = None, device=None, kv_dtype: Optional[str] = None,
                 kv_budget: Optional[float] = None):
        kv_budget = check_budget(kv_budget)
        n_layers, n_kv_heads, head_dim = _int(n_layers, "n_layers"), _int(n_kv_heads, "n_kv_heads"), _int(head_dim, "head_dim")
        bits = quant_bits(kv_dtype)
        if bits and pool is not None:
            raise ValueError("kv_dtype= makes the cache's own two pools (full precision and quantized); leave pool= out")
        if pool is not None:
            self._check_pool(pool, dtype, block_size, capacity_bytes, device)
        dev = parse_device(device)
        if pool is None:
            name = kv_dtype_name(torch.float32 if dtype is None else dtype)
            if capacity_bytes is None:
                capacity_bytes = default_capacity_bytes(dev)
            capacity_bytes = _int(capacity_bytes, "capacity_bytes")
            block_size = (32 if bits in (8, 4) else 16) if block_size is None else _int(block_size, "block_size")
            if block_size <= 0:
                raise ValueError(f"block_size must be >= 1, got {block_size}")
            elt = 4 if name == "float32" else 2
            block_bytes = 2 * int(block_size) * int(head_dim) * elt
            capacity_blocks = int(capacity_bytes) // max(block_bytes, 1)
            if capacity_blocks < 1:
                raise ValueError(f"capacity_bytes={capacity_bytes} holds no block of {block_bytes} bytes")
            # device arenas come in larger chunks (each one is a cudaMalloc)
            chunk = 0 if dev.type == "cpu" else max(1, (64 << 20) // block_bytes)
            pool = BlockPool(name, int(head_dim), int(block_size), min(capacity_blocks, 1 << 30), chunk,
                             dev.type, dev.index or 0)
        elif pool.head_dim != head_dim:
            raise ValueError(f"pool head_dim {pool.head_dim} != head_dim {head_dim}")
        self._pool = pool
        self._qpool = None
        if bits:
            qbytes = _core.quant_block_bytes(bits, int(block_size), int(head_dim))  # validates head_dim
            qchunk = 0 if dev.type == "cpu" else max(1, (64 << 20) // qbytes)
            self._qpool = BlockPool(name, int(head_dim), int(block_size), max(1, min(int(capacity_bytes) // qbytes, 1 << 30)),
                                    qchunk, dev.type, dev.index or 0, bits)
        self._device = torch.device(pool.device)
        self._policy = make_policy(policy)
        self._layer_policy: dict = {}  # layer -> Policy overriding self._policy
        self._layer_window: dict = {}  # layer -> recent tokens kept (set_layer_window)
        self._c = _core.Cache(pool, int(n_layers), int(n_kv_heads), self._policy.plan())
        if layer_store is not None:
            self._c.set_layer_sharing([int(x) for x in layer_store])
        if self._qpool is not None:
            self._c.set_quantized(self._qpool)
        if kv_budget is not None:
            self._c.set_budget(kv_budget)
        self._kv_budget = kv_budget
        self._shared = None  # (group, head_offset, total_heads): share_heads
        self._defer = False
        self._pending: list = []  # (layer, seq, full_tokens) whose budget waits for flush_budget

    def share_heads(self, group, head_offset: int, total_heads: int, *, defer: bool = False) -> None:
        """Tensor parallelism: this cache holds kv heads ``head_offset .. head_offset +
        n_kv_heads - 1`` of a model with ``total_heads``, the others live in the caches of the
        other ranks of the torch.distributed ``group``. The ``kv_budget`` then counts the whole
        layer and every rank evicts exactly what one cache of all the heads would (the ranks
        merge their give-way units: :func:`kvloom.distributed.enforce_budget`), so with a budget
        each :meth:`apply_policy` is a collective: every rank calls it for the same layer and
        sequence in the same order. With ``defer=True`` the budget waits for
        :meth:`flush_budget` (also a collective), which settles every layer waiting in one
        exchange; that gives the same state as long as nothing reads the layers in between
        (``kvloom.Cache`` flushes at the end of each forward, and defers only without layer
        sharing, where a later layer would read an earlier one's KV in the same forward)."""
        head_offset, total_heads = _int(head_offset, "head_offset"), _int(total_heads, "total_heads")
        if not (0 <= head_offset and head_offset + self.n_kv_heads <= total_heads):
            raise ValueError(f"heads {head_offset}..{head_offset + self.n_kv_heads - 1} are not among the "
                             f"{total_heads} kv heads")
        self._shared = (group, head_offset, total_heads)
        self._defer = bool(defer)
        self._c.set_budget(0.0)  # the budget is enforced across the ranks, in kvloom.distributed

    def flush_budget(self) -> int:
        """Settles the budget of the layers :meth:`apply_policy` deferred (see
        :meth:`share_heads`); returns the slots this rank freed. A collective."""
        if not self._pending:
            return 0
        from .distributed import enforce_budget

        items, self._pending = self._pending, []
        live = set(self.sequences())
        return enforce_budget(self, [it for it in items if it[1] in live])

    @staticmethod
    def _check_pool(pool, dtype, block_size, capacity_bytes, device) -> None:
        """With pool=, the storage settings are the pool's: given ones must agree with it."""
        if not isinstance(pool, BlockPool):
            raise TypeError(f"pool must be a kvloom.BlockPool, got {type(pool).__name__}")
        if dtype is not None and kv_dtype_name(dtype) != pool.dtype:
            raise ValueError(f"dtype={dtype} conflicts with the pool's {pool.dtype} (with pool=, leave dtype out)")
        if block_size is not None and _int(block_size, "block_size") != pool.block_size:
            raise ValueError(f"block_size={block_size} conflicts with the pool's {pool.block_size} (with pool=, leave it out)")
        if capacity_bytes is not None:
            raise ValueError("capacity_bytes is the pool's (fixed when the BlockPool was made); with pool=, leave it out")
        if device is not None and parse_device(device) != torch.device(pool.device):
            raise ValueError(f"device={device} conflicts with the pool's {pool.device}")

    # --- geometry ---------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self._c.n_layers

    @property
    def n_kv_heads(self) -> int:
        return self._c.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self._c.head_dim

    @property
    def block_size(self) -> int:
        return self._c.block_size

    @property
    def layer_store(self) -> List[int]:
        """The layer each layer reads its KV from (itself unless layers share, CLA)."""
        return list(self._c.layer_sharing)

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self._c.dtype)

    @property
    def pool(self) -> BlockPool:
        return self._pool

    @property
    def kv_dtype(self) -> Optional[str]:
        """"int8", "int4" or "int2" for quantized storage, else None."""
        return None if self._qpool is None else f"int{self._qpool.quant_bits}"

    @property
    def kv_budget(self) -> Optional[float]:
        """The memory budget (a fraction of ``Full``'s bytes), or None."""
        return self._kv_budget

    def budget_bytes(self, full_tokens: int) -> int:
        """The bytes one layer of a sequence may hold under the budget when ``Full`` would hold
        ``full_tokens`` tokens per head (see ``kv_budget``; under :meth:`share_heads`, the bytes
        of the whole layer, every rank's heads)."""
        if self.kv_budget is None:
            raise ValueError("this cache has no kv_budget")
        full_tokens = _int(full_tokens, "full_tokens")
        if self._shared is None:
            return self._c.budget_bytes(full_tokens)
        heads, bs = self._shared[2], self.block_size
        fbb = self._pool.block_bytes
        qbb = self._qpool.block_bytes if self._qpool is not None else 0
        want = math.floor(self._kv_budget * float(heads * ((full_tokens + bs - 1) // bs) * fbb))
        return max(heads * (fbb + qbb), want)

    @property
    def sealed_pool(self) -> Optional[BlockPool]:
        """The pool of quantized blocks (kv_dtype), else None."""
        return self._qpool

    @property
    def device(self) -> torch.device:
        """Where the blocks live (torch.device("cpu") or a CUDA device)."""
        return self._device

    @property
    def policy(self) -> Policy:
        """The cache-wide policy (a :class:`kvloom.policies.Policy`)."""
        return self._policy

    @property
    def policy_name(self) -> str:
        """The policy and its parameters, e.g. ``window(sinks=4, recent=1024)``."""
        return self._policy.label

    def set_layer_policy(self, layer: int, policy) -> None:
        """Policy of one layer for sequences added from now on (None: the cache-wide one)."""
        pol = None if policy is None else make_policy(policy)
        self._c.set_layer_plan(_int(layer, "layer"), None if pol is None else pol.plan())
        self._layer_window.pop(int(layer), None)
        if pol is None:
            self._layer_policy.pop(int(layer), None)
        else:
            self._layer_policy[int(layer)] = pol

    def set_layer_window(self, layer: int, recent: int) -> None:
        """Keeps only the ``recent`` newest tokens of one layer (a model's own sliding-window
        layers), whatever the cache-wide policy; for sequences added from now on."""
        self._c.set_layer_plan(_int(layer, "layer"), _core.make_plan("window", {"sinks": 0, "recent": _int(recent, "recent")}))
        self._layer_policy.pop(int(layer), None)
        self._layer_window[int(layer)] = int(recent)

    def set_policy(self, policy) -> None:
        """Policy for sequences added from now on (existing heads keep their plans)."""
        pol = make_policy(policy)
        self._c.set_plan(pol.plan())
        self._policy = pol

    # --- sequences ----------------------------------------------------------------------
    def add_sequence(self) -> int:
        """A new empty sequence; returns its id."""
        return self._c.seq_add()

    def fork(self, seq: int) -> int:
        """A new sequence sharing every block of ``seq`` (copy-on-write); returns its id."""
        return self._c.seq_fork(_int(seq, "seq"))

    def drop(self, seq: int) -> None:
        """Releases every block of ``seq``; its id is never reused."""
        self._c.seq_drop(_int(seq, "seq"))

    def rollback(self, seq: int, n_tokens: int) -> None:
        """Forgets the last ``n_tokens`` appended tokens of ``seq`` in every head."""
        self._c.seq_rollback(_int(seq, "seq"), _int(n_tokens, "n_tokens"))

    def sequences(self) -> List[int]:
        return list(self._c.seq_ids())

    def seq_length(self, seq: int) -> int:
        """Logical length: tokens appended to ``seq`` (layer 0), evicted ones included."""
        return self._c.seq_length(_int(seq, "seq"))

    # --- tokens -------------------------------------------------------------------------
    def append(self, layer: int, seq: int, k, v, positions=None, classes=None) -> None:
        """Appends tokens to every kv head of ``layer``: k, v are [n_kv_heads, n, head_dim]
        (any float dtype; converted to the cache's); positions int [n] (default: the
        logical token index); classes uint8 [n] token-class bits (1 special, 2
        punctuation; FastGen uses them)."""
        k = as_tensor(k, "k")
        v = as_tensor(v, "v")
        if positions is not None:  # stored as int32: wider values are refused, not wrapped
            positions = _int_tensor(host(as_tensor(positions, "positions")), "positions", *_INT32)
            positions = positions.to(torch.int32).contiguous()
        if classes is not None:  # one byte of class bits per token
            classes = host(as_tensor(classes, "classes"))
            if classes.dtype not in (torch.bool, torch.uint8):  # (every uint8 value is a valid class byte)
                classes = _int_tensor(classes, "classes", 0, 255)
            classes = classes.to(torch.uint8).contiguous()
        use_stream(self._device)
        self._c.append(_int(layer, "layer"), _int(seq, "seq"), k, v, positions, classes)

    def evict(self, layer: int, head: int, seq: int, slots) -> None:
        """Frees the given live slots of one head (see :meth:`slots`)."""
        slots = _int_list(slots, "slots")
        bad = [x for x in slots if not 0 <= x <= _INT32[1]]
        if bad:
            raise IndexError(f"evict: slot {bad[0]} out of range (slots are >= 0; see slots())")
        self._c.evict(_int(layer, "layer"), _int(head, "head"), _int(seq, "seq"), slots)

    def apply_policy(self, layer: int, seq: int, *, full_tokens: Optional[int] = None) -> int:
        """Runs the policy of every head of (layer, seq) (the policy's Python ``evict`` hook,
        then each head's C++ plan and compaction), then the ``kv_budget`` if there is one;
        returns the number of slots freed. ``full_tokens``: the tokens ``Full`` would hold per
        head of this layer, which sizes the budget (default: the tokens appended, or the
        layer's window, :meth:`set_layer_window`, if smaller)."""
        layer, seq = _int(layer, "layer"), _int(seq, "seq")
        if full_tokens is None:
            full_tokens = -1
            window = self._layer_window.get(layer)
            if window is not None and self._kv_budget is not None:
                full_tokens = min(self._c.seq_length(seq), window)
        else:
            full_tokens = _int(full_tokens, "full_tokens")
            if full_tokens < 0:
                raise ValueError(f"full_tokens must be >= 0, got {full_tokens}")
        freed = self._layer_policy.get(layer, self._policy).evict(self, layer, seq)
        use_stream(self._device)  # compaction moves rows on the device
        freed += self._c.apply_policy(layer, seq, full_tokens)
        if self._shared is not None and self._kv_budget is not None:
            item = (layer, seq, self._c.seq_length(seq) if full_tokens < 0 else full_tokens)
            if self._defer:
                self._pending.append(item)
            else:
                from .distributed import enforce_budget

                freed += enforce_budget(self, [item])
        return freed

    def give_way_keys(self, layer: int, head: int, seq: int):
        """The budget rule's key of each live slot of one head, in :meth:`slots` order:
        (tier int32 array, value float64 array); lower keys give way first (tier, then value,
        then ord), tier 2**31 - 1 never (each head's newest token)."""
        return self._c.give_way_keys(_int(layer, "layer"), _int(head, "head"), _int(seq, "seq"))

    def length(self, layer: int, head: int, seq: int) -> int:
        """Live tokens of one head."""
        return self._c.length(_int(layer, "layer"), _int(head, "head"), _int(seq, "seq"))

    def lengths(self, seq: int) -> List[List[int]]:
        """Live tokens per [layer][kv head]."""
        return self._c.lengths(_int(seq, "seq"))

    def slots(self, layer: int, head: int, seq: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(slot, ord, pos) int32 arrays of the live slots of one head, in slot order."""
        return self._c.live_slots(_int(layer, "layer"), _int(head, "head"), _int(seq, "seq"))[:3]

    def gather(self, layer: int, head: int, seq: int, dtype=None):
        """(k, v, ord, pos) of one head's live tokens in append order: k, v [len, head_dim]."""
        layer, head, seq = _int(layer, "layer"), _int(head, "head"), _int(seq, "seq")
        n = self.length(layer, head, seq)
        dt = self.dtype if dtype is None else dtype
        k = torch.empty(n, self.head_dim, dtype=dt, device=self._device)
        v = torch.empty(n, self.head_dim, dtype=dt, device=self._device)
        ords = torch.empty(n, dtype=torch.int32)
        pos = torch.empty(n, dtype=torch.int32)
        use_stream(self._device)
        try:
            self._c.gather(layer, head, seq, k, v, ords, pos)
        except ValueError:
            now = self.length(layer, head, seq)
            if now != n:  # a write between sizing and reading: another thread's, i.e. misuse
                raise _core.ConcurrencyError(
                    f"gather on sequence {seq}: another thread changed it while it was read ({n} -> {now} live "
                    "tokens); operations on one sequence must not overlap with a write to it") from None
            raise
        return k, v, ords, pos

    def attend(self, layer: int, q, seqs: Sequence[View], *, scale: Optional[float] = None, inv_freq=None,
               accumulate: bool = False):
        """Decode attention of q [B, Hq, head_dim] over the cache at ``layer``.

        ``seqs[b]`` is the sequence row b attends to, or a list of segments
        ``[(seq, delta), ...]`` (Hogwild!-style views: the query is rotated by delta per
        segment, needs ``inv_freq``). Returns out [B, Hq, head_dim] in q's dtype.

        ``accumulate=True`` (one distinct sequence per row, no segments) also adds to each live
        slot the attention it receives, as :meth:`accumulate_attention` with q as one query
        token would, in the same pass over the keys (CPU caches; two passes on CUDA).
        """
        from .ops import _check_q, _check_scale
        from ._tensors import kernel_ready

        q = as_tensor(q, "q")
        _check_q(q)  # before any copy
        views = [x if type(x) is int else _view(x, b) for b, x in enumerate(_int_list_or_views(seqs))]
        q = kernel_ready(q)
        if inv_freq is not None:
            inv_freq = host(as_tensor(inv_freq, "inv_freq")).float().contiguous()
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        use_stream(self._device)
        scale = 0.0 if scale is None else _check_scale(scale)
        if accumulate:
            if not all(type(x) is int for x in views):
                raise ValueError("attend(accumulate=True) takes one sequence per row, not segment views")
            self._c.attend_accumulate(_int(layer, "layer"), q, out, views, scale)
        else:
            self._c.attend(_int(layer, "layer"), q, out, views, scale, inv_freq)
        return out

    def chunk_attention(self, layer: int, q, seqs: Sequence[int], *, mask=None, scale: Optional[float] = None):
        """Attention of a chunk of query tokens over the cache at ``layer`` (chunked prefill, a
        continued conversation): q [B, Hq, Tq, head_dim]; the chunk's Tq tokens must already be
        appended to each ``seqs[b]``; query t sees the live keys up to its own position (causal
        by token index, whatever was evicted) that ``mask`` allows: an optional [B, Tq, K]
        bool/float attention mask indexed by token position (transformers' mask, without its
        head dimension). A query that sees no key gets zeros. Returns out [B, Hq, Tq, head_dim]
        in q's dtype.

        CPU and CUDA caches run kvloom's chunk kernels, which read each head's live slots in
        place. On CUDA a chunk with more than :attr:`CUDA_CHUNK_KERNEL_ROWS` query rows per kv
        head (Tq x the query group) gathers each head's live keys and runs torch SDPA instead:
        its flash kernels read the keys once for the whole chunk, where kvloom's kernel reads
        them once per tile of 8 query rows."""
        from .ops import _check_q, _check_scale

        q = as_tensor(q, "q")
        _check_q(q, rank=4)  # before the output is allocated
        if mask is not None:
            mask = as_tensor(mask, "mask")
        seqs = _int_list(seqs, "seqs")
        scale = 0.0 if scale is None else _check_scale(scale)
        rows = q.shape[2] * (q.shape[1] // max(1, self.n_kv_heads))
        if self._device.type == "cuda" and rows > self.CUDA_CHUNK_KERNEL_ROWS and q.device == self._device:
            return self._chunk_by_gather(_int(layer, "layer"), q, seqs, mask, scale or None)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        use_stream(self._device)
        self._c.chunk_attend(_int(layer, "layer"), q, out, seqs, mask, scale)
        return out

    #: Query rows per kv head (chunk tokens x query group) up to which a chunk on a CUDA cache
    #: runs kvloom's kernel; longer chunks gather and run torch SDPA (see chunk_attention).
    #: Not tuned on a GPU yet.
    CUDA_CHUNK_KERNEL_ROWS = 64

    def _chunk_by_gather(self, layer: int, q: torch.Tensor, seqs: List[int], mask, scale):
        """chunk_attention by gathering: each head's live keys, padded to the longest head, with
        the same visibility (causal by ord, then the mask), through torch SDPA."""
        B, Hq, Tq, D = q.shape
        Hkv = self.n_kv_heads
        if len(seqs) != B:
            raise ValueError(f"need one sequence per batch row: {len(seqs)} for batch {B}")
        if mask is not None and (mask.dim() != 3 or mask.shape[0] != B or mask.shape[1] != Tq):
            raise ValueError(f"mask must be [batch={B}, tokens={Tq}, K], got {list(mask.shape)}")
        per = [[self.gather(layer, h, s) for h in range(Hkv)] for s in seqs]
        L = max(1, max(k.shape[0] for row in per for k, *_ in row))
        dev = q.device
        K = q.new_zeros(B, Hkv, L, D)
        V = q.new_zeros(B, Hkv, L, D)
        vis = torch.zeros(B, Hkv, Tq, L, dtype=torch.bool, device=dev)
        for b, row in enumerate(per):
            first = self.seq_length(seqs[b]) - Tq
            if first < 0:
                raise ValueError(f"the chunk's {Tq} tokens must be appended to sequence {seqs[b]} first")
            q_ord = torch.arange(first, first + Tq, device=dev)
            for h, (k, v, ords, _) in enumerate(row):
                n = k.shape[0]
                if n == 0:
                    continue
                K[b, h, :n] = k.to(K.dtype)
                V[b, h, :n] = v.to(V.dtype)
                o = ords.long().to(dev)
                m = o[None, :] <= q_ord[:, None]
                if mask is not None:
                    mm = mask[b][:, o]
                    m = m & (mm if mm.dtype == torch.bool else mm > torch.finfo(mm.dtype).min / 2 if mm.is_floating_point()
                             else mm != 0)
                vis[b, h, :, :n] = m
        G = Hq // Hkv
        vis = vis.repeat_interleave(G, dim=1)
        empty = ~vis.any(dim=-1, keepdim=True)  # such a query gets zeros, as from the kernel
        attn_mask = vis | (empty & (torch.arange(L, device=dev) == 0))
        out = torch.nn.functional.scaled_dot_product_attention(q, K, V, attn_mask=attn_mask, scale=scale, enable_gqa=G > 1)
        return out.masked_fill(empty, 0)

    def accumulate_attention(self, layer: int, q, seqs: Sequence[int], *, scale: Optional[float] = None) -> None:
        """Adds to each live slot of (layer, seqs[b]) the attention it receives from q[b]
        [B, Hq, Tq, head_dim] (causal: query i is the (len - Tq + i)-th token), summed over
        each kv head's query group: H2O's accumulated-attention statistic."""
        from .ops import _check_scale

        from .ops import _check_q

        q = as_tensor(q, "q")
        _check_q(q, rank=4)
        if q.device.type == "cuda":
            q = q.contiguous()  # the statistic runs on the host from one copy of q
        use_stream(self._device)
        self._c.accumulate_attention(_int(layer, "layer"), _int_list(seqs, "seqs"), q,
                                     0.0 if scale is None else _check_scale(scale))

    def set_head_plan(self, layer: int, head: int, seq: int, plan) -> None:
        """Replaces one head's eviction plan (a ``kvloom._core.make_plan(...)``, e.g. the hybrid
        ``FastGen.hybrid_plan(...)`` chose)."""
        self._c.set_head_plan(_int(layer, "layer"), _int(head, "head"), _int(seq, "seq"), plan)

    def classes(self, layer: int, head: int, seq: int) -> np.ndarray:
        """Class bytes of the live slots of one head, in slot order."""
        return self._c.live_slots(_int(layer, "layer"), _int(head, "head"), _int(seq, "seq"))[3]

    def scores(self, layer: int, head: int, seq: int) -> np.ndarray:
        """Accumulated attention of the live slots of one head, in slot order (see :meth:`slots`)."""
        return self._c.live_slots(_int(layer, "layer"), _int(head, "head"), _int(seq, "seq"))[4]

    # --- snapshots ----------------------------------------------------------------------
    def save(self, path, seqs: Optional[Sequence[int]] = None) -> int:
        """Writes ``seqs`` (default: every sequence) to a snapshot file, atomically (see
        :mod:`kvloom.snapshot`); returns the file's size. Concurrent writes to those sequences
        raise :class:`kvloom.ConcurrencyError` (the file is then not written)."""
        from . import snapshot

        return snapshot.write(path, "kvcache", *self._snapshot_parts(seqs))

    def dumps(self, seqs: Optional[Sequence[int]] = None) -> bytes:
        """:meth:`save` into memory: the snapshot's bytes (for a transport of your own;
        :mod:`kvloom.distributed` sends them over torch.distributed)."""
        from . import snapshot

        return bytes(snapshot.dumps("kvcache", *self._snapshot_parts(seqs)))

    def _snapshot_parts(self, seqs=None, extra=None):
        seqs = self.sequences() if seqs is None else _int_list(seqs, "seqs")
        blob = self._c.export_sequences(seqs)
        meta = {**self._snapshot_meta(), "sequences": seqs}
        if extra is not None:
            meta["extra"] = extra
        return meta, {"kv": blob}

    @classmethod
    def load(cls, path, *, device=None, capacity_bytes: Optional[int] = None, pool: Optional[BlockPool] = None) -> "KVCache":
        """A cache rebuilt from a snapshot file: the saved geometry, dtype, block size, layer
        sharing and policies, holding the saved sequences under their saved ids, each exactly as
        it was (tokens, slots, metadata, per-head plans; forks still share blocks). ``device``,
        ``capacity_bytes`` and ``pool`` are chosen anew. Raises :class:`kvloom.SnapshotError`
        for a file that cannot be loaded."""
        from . import snapshot

        meta, sections = snapshot.read(path, "kvcache")
        return cls._from_parsed(meta, sections, f"snapshot {path}", device=device, capacity_bytes=capacity_bytes,
                                pool=pool)

    @classmethod
    def loads(cls, data, *, device=None, capacity_bytes: Optional[int] = None,
              pool: Optional[BlockPool] = None) -> "KVCache":
        """:meth:`load` from the bytes :meth:`dumps` made."""
        from . import snapshot

        meta, sections = snapshot.parse(data, "kvcache")
        return cls._from_parsed(meta, sections, "snapshot bytes", device=device, capacity_bytes=capacity_bytes,
                                pool=pool)

    @classmethod
    def _from_parsed(cls, meta: dict, sections, where: str, **kw) -> "KVCache":
        from .snapshot import SnapshotError

        cache = cls._from_snapshot_meta(meta, where, **kw)
        ids = cache._import(sections, where, keep_ids=True)
        if ids != meta.get("sequences"):
            raise SnapshotError(f"{where}: the header's sequence list does not match its KV")
        return cache

    def restore(self, path) -> List[int]:
        """Adds the sequences of a snapshot file to this cache (same geometry, dtype, block size
        and layer sharing) under fresh ids, returned in the file's order. All or nothing: a
        snapshot that cannot be added raises and leaves every sequence here as it was."""
        from . import snapshot

        meta, sections = snapshot.read(path, "kvcache")
        return self._import(sections, f"snapshot {path}", keep_ids=False)

    def restore_bytes(self, data) -> List[int]:
        """:meth:`restore` from the bytes :meth:`dumps` made."""
        from . import snapshot

        meta, sections = snapshot.parse(data, "kvcache")
        return self._import(sections, "snapshot bytes", keep_ids=False)

    def _snapshot_meta(self) -> dict:
        def pol(p):
            return {"name": p.name, "values": p.saved_values()}

        return {"n_layers": self.n_layers, "n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim,
                "dtype": self._c.dtype, "block_size": self.block_size, "layer_store": self.layer_store,
                "kv_dtype": self.kv_dtype, "kv_budget": self.kv_budget,
                "policy": pol(self._policy), "layer_policies": {str(k): pol(v) for k, v in self._layer_policy.items()},
                "layer_windows": {str(k): v for k, v in self._layer_window.items()}}

    @classmethod
    def _from_snapshot_meta(cls, meta: dict, where: str, **kw) -> "KVCache":
        from .snapshot import SnapshotError, need, policy_from

        def policy(d):
            return policy_from(d, where)

        try:
            geo = [need(meta, k, int, where) for k in ("n_layers", "n_kv_heads", "head_dim", "block_size")]
            layer_store = need(meta, "layer_store", list, where)
            cache = cls(geo[0], geo[1], geo[2], dtype=need(meta, "dtype", str, where), block_size=geo[3],
                        policy=policy(meta.get("policy")), layer_store=layer_store, kv_dtype=meta.get("kv_dtype"),
                        kv_budget=meta.get("kv_budget"), **kw)
            for k, v in need(meta, "layer_policies", dict, where).items():
                cache.set_layer_policy(int(k), policy(v))
            for k, v in need(meta, "layer_windows", dict, where).items():
                cache.set_layer_window(int(k), v)
        except SnapshotError:
            raise
        except (ValueError, TypeError, IndexError) as e:
            raise SnapshotError(f"{where}: its cache settings are invalid: {e}") from None
        return cache

    def _import(self, sections, where: str, keep_ids: bool) -> List[int]:
        from .snapshot import SnapshotError

        if "kv" not in sections:
            raise SnapshotError(f"{where}: no KV section")
        try:
            return list(self._c.import_sequences(sections["kv"], keep_ids))
        except ValueError as e:
            raise SnapshotError(f"{where}: {e}") from None

    # --- memory -------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Exact bytes held: distinct live blocks of this cache x block bytes (quantized blocks,
        scales included, at their own size)."""
        return self._c.memory_bytes()

    def blocks_held(self) -> int:
        return self._c.blocks_held()

    def block_table(self, layer: int, head: int, seq: int) -> List[int]:
        return self._c.block_table(_int(layer, "layer"), _int(head, "head"), _int(seq, "seq"))

    def sealed_blocks(self, layer: int, head: int, seq: int) -> List[bool]:
        """Per entry of :meth:`block_table`: True where the block is quantized (kv_dtype)."""
        return [bool(x) for x in self._c.sealed_entries(_int(layer, "layer"), _int(head, "head"), _int(seq, "seq"))]

    def stats(self) -> dict:
        """Memory and per-sequence, per-layer, per-head live lengths and plans."""
        seqs = {}
        for s in self.sequences():
            seqs[s] = {
                "length": self.seq_length(s),
                "live": self.lengths(s),
                "plans": [[self._c.plan_name(l, h, s) for h in range(self.n_kv_heads)] for l in range(self.n_layers)],
            }
        return {
            "memory_bytes": self.memory_bytes(),
            "blocks_held": self.blocks_held(),
            "block_bytes": self._pool.block_bytes,
            "kv_dtype": self.kv_dtype,
            "kv_budget": self.kv_budget,
            "sealed_block_bytes": None if self._qpool is None else self._qpool.block_bytes,
            "sealed_blocks": None if self._qpool is None else self._qpool.used_blocks,
            "pool_used_blocks": self._pool.used_blocks,
            "pool_capacity_blocks": self._pool.capacity_blocks,
            "policy": self.policy_name,
            "sequences": seqs,
        }

    def __repr__(self) -> str:
        return (f"KVCache(n_layers={self.n_layers}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
                f"dtype={self._c.dtype}, device={self._device}, policy={self.policy_name}, sequences={len(self.sequences())}, "
                f"memory_bytes={self.memory_bytes()})")
