"""Python face of the C++ paged KV cache."""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import _core, policies
from ._tensors import as_tensor, host, kv_dtype_name, parse_device, torch_dtype, use_stream
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
        device: where the blocks live: "cpu" (default) or a CUDA device ("cuda", "cuda:1");
            tensors passed in must be on it (positions and classes may be anywhere). CUDA work
            runs on torch's current stream.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, *, dtype=torch.float32, policy=None,
                 block_size: int = 16, capacity_bytes: Optional[int] = None, pool: Optional[BlockPool] = None,
                 layer_store: Optional[Sequence[int]] = None, device=None):
        dev = parse_device(device)
        if pool is None:
            name = kv_dtype_name(dtype)
            if capacity_bytes is None:
                capacity_bytes = default_capacity_bytes(dev)
            if int(block_size) <= 0:
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
        self._device = torch.device(pool.device)
        self._policy = make_policy(policy)
        self._layer_policy: dict = {}  # layer -> Policy overriding self._policy
        self._c = _core.Cache(pool, int(n_layers), int(n_kv_heads), self._policy.plan())
        if layer_store is not None:
            self._c.set_layer_sharing([int(x) for x in layer_store])

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
        self._c.set_layer_plan(layer, None if pol is None else pol.plan())
        if pol is None:
            self._layer_policy.pop(int(layer), None)
        else:
            self._layer_policy[int(layer)] = pol

    def set_layer_window(self, layer: int, recent: int) -> None:
        """Keeps only the ``recent`` newest tokens of one layer (a model's own sliding-window
        layers), whatever the cache-wide policy; for sequences added from now on."""
        self._c.set_layer_plan(layer, _core.make_plan("window", {"sinks": 0, "recent": int(recent)}))
        self._layer_policy.pop(int(layer), None)

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
        return self._c.seq_fork(seq)

    def drop(self, seq: int) -> None:
        """Releases every block of ``seq``; its id is never reused."""
        self._c.seq_drop(seq)

    def rollback(self, seq: int, n_tokens: int) -> None:
        """Forgets the last ``n_tokens`` appended tokens of ``seq`` in every head."""
        self._c.seq_rollback(seq, int(n_tokens))

    def sequences(self) -> List[int]:
        return list(self._c.seq_ids())

    def seq_length(self, seq: int) -> int:
        """Logical length: tokens appended to ``seq`` (layer 0), evicted ones included."""
        return self._c.seq_length(seq)

    # --- tokens -------------------------------------------------------------------------
    def append(self, layer: int, seq: int, k, v, positions=None, classes=None) -> None:
        """Appends tokens to every kv head of ``layer``: k, v are [n_kv_heads, n, head_dim]
        (any float dtype; converted to the cache's); positions int [n] (default: the
        logical token index); classes uint8 [n] token-class bits (1 special, 2
        punctuation; FastGen uses them)."""
        k = as_tensor(k, "k")
        v = as_tensor(v, "v")
        if positions is not None:
            positions = host(as_tensor(positions, "positions"))
            if positions.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"positions must be an integer tensor, got {positions.dtype}")
            positions = positions.to(torch.int32).contiguous()
        if classes is not None:
            classes = host(as_tensor(classes, "classes")).to(torch.uint8).contiguous()
        use_stream(self._device)
        self._c.append(layer, seq, k, v, positions, classes)

    def evict(self, layer: int, head: int, seq: int, slots) -> None:
        """Frees the given live slots of one head (see :meth:`slots`)."""
        if isinstance(slots, torch.Tensor):
            slots = slots.tolist()
        self._c.evict(layer, head, seq, np.asarray(slots, dtype=np.int64).reshape(-1).tolist())

    def apply_policy(self, layer: int, seq: int) -> int:
        """Runs the policy of every head of (layer, seq) (the policy's Python ``evict`` hook,
        then each head's C++ plan and compaction); returns the number of slots freed."""
        freed = self._layer_policy.get(layer, self._policy).evict(self, layer, seq)
        use_stream(self._device)  # compaction moves rows on the device
        return freed + self._c.apply_policy(layer, seq)

    def length(self, layer: int, head: int, seq: int) -> int:
        """Live tokens of one head."""
        return self._c.length(layer, head, seq)

    def lengths(self, seq: int) -> List[List[int]]:
        """Live tokens per [layer][kv head]."""
        return self._c.lengths(seq)

    def slots(self, layer: int, head: int, seq: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(slot, ord, pos) int32 arrays of the live slots of one head, in slot order."""
        return self._c.live_slots(layer, head, seq)[:3]

    def gather(self, layer: int, head: int, seq: int, dtype=None):
        """(k, v, ord, pos) of one head's live tokens in append order: k, v [len, head_dim]."""
        n = self.length(layer, head, seq)
        dt = self.dtype if dtype is None else dtype
        k = torch.empty(n, self.head_dim, dtype=dt, device=self._device)
        v = torch.empty(n, self.head_dim, dtype=dt, device=self._device)
        ords = torch.empty(n, dtype=torch.int32)
        pos = torch.empty(n, dtype=torch.int32)
        use_stream(self._device)
        self._c.gather(layer, head, seq, k, v, ords, pos)
        return k, v, ords, pos

    def attend(self, layer: int, q, seqs: Sequence[View], *, scale: Optional[float] = None, inv_freq=None):
        """Decode attention of q [B, Hq, head_dim] over the cache at ``layer``.

        ``seqs[b]`` is the sequence row b attends to, or a list of segments
        ``[(seq, delta), ...]`` (Hogwild!-style views: the query is rotated by delta per
        segment, needs ``inv_freq``). Returns out [B, Hq, head_dim] in q's dtype.
        """
        from .ops import _check_q, _check_scale
        from ._tensors import kernel_ready

        q = kernel_ready(as_tensor(q, "q"))
        _check_q(q)
        if inv_freq is not None:
            inv_freq = host(as_tensor(inv_freq, "inv_freq")).float().contiguous()
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        use_stream(self._device)
        self._c.attend(layer, q, out, list(seqs), 0.0 if scale is None else _check_scale(scale), inv_freq)
        return out

    def chunk_attention(self, layer: int, q, seqs: Sequence[int], *, mask=None, scale: Optional[float] = None):
        """Attention of a chunk of query tokens over the cache at ``layer`` (chunked prefill, a
        continued conversation): q [B, Hq, Tq, head_dim]; the chunk's Tq tokens must already be
        appended to each ``seqs[b]``; query t sees the live keys up to its own position (causal
        by token index, whatever was evicted) that ``mask`` allows: an optional [B, Tq, K]
        bool/float attention mask indexed by token position (transformers' mask, without its
        head dimension). Returns out [B, Hq, Tq, head_dim] in q's dtype (CPU caches)."""
        from .ops import _check_scale

        q = as_tensor(q, "q")
        if q.dim() != 4:
            raise ValueError(f"q must be [batch, q_heads, tokens, head_dim], got shape {tuple(q.shape)}")
        if mask is not None:
            mask = as_tensor(mask, "mask")
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        self._c.chunk_attend(layer, q, out, [int(s) for s in seqs], mask, 0.0 if scale is None else _check_scale(scale))
        return out

    def accumulate_attention(self, layer: int, q, seqs: Sequence[int], *, scale: Optional[float] = None) -> None:
        """Adds to each live slot of (layer, seqs[b]) the attention it receives from q[b]
        [B, Hq, Tq, head_dim] (causal: query i is the (len - Tq + i)-th token), summed over
        each kv head's query group: H2O's accumulated-attention statistic."""
        from .ops import _check_scale

        q = as_tensor(q, "q")
        if q.dim() != 4:
            raise ValueError(f"q must be [batch, q_heads, tokens, head_dim], got shape {tuple(q.shape)}")
        if q.device.type == "cuda":
            q = q.contiguous()  # the statistic runs on the host from one copy of q
        use_stream(self._device)
        self._c.accumulate_attention(layer, [int(s) for s in seqs], q, 0.0 if scale is None else _check_scale(scale))

    def set_head_plan(self, layer: int, head: int, seq: int, plan) -> None:
        """Replaces one head's eviction plan (a ``kvloom._core.make_plan(...)``, e.g. the hybrid
        ``FastGen.hybrid_plan(...)`` chose)."""
        self._c.set_head_plan(layer, head, seq, plan)

    def classes(self, layer: int, head: int, seq: int) -> np.ndarray:
        """Class bytes of the live slots of one head, in slot order."""
        return self._c.live_slots(layer, head, seq)[3]

    def scores(self, layer: int, head: int, seq: int) -> np.ndarray:
        """Accumulated attention of the live slots of one head, in slot order (see :meth:`slots`)."""
        return self._c.live_slots(layer, head, seq)[4]

    # --- memory -------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Exact bytes held: distinct live blocks of this cache x block bytes."""
        return self._c.memory_bytes()

    def blocks_held(self) -> int:
        return self._c.blocks_held()

    def block_table(self, layer: int, head: int, seq: int) -> List[int]:
        return self._c.block_table(layer, head, seq)

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
            "pool_used_blocks": self._pool.used_blocks,
            "pool_capacity_blocks": self._pool.capacity_blocks,
            "policy": self.policy_name,
            "sequences": seqs,
        }

    def __repr__(self) -> str:
        return (f"KVCache(n_layers={self.n_layers}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
                f"dtype={self._c.dtype}, device={self._device}, policy={self.policy_name}, sequences={len(self.sequences())}, "
                f"memory_bytes={self.memory_bytes()})")
