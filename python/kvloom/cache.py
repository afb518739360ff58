"""Python face of the C++ paged KV cache."""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import _core
from ._tensors import as_tensor, kv_dtype_name, torch_dtype

__all__ = ["BlockPool", "KVCache", "Full", "Window", "HeavyHitter", "FastGen", "TaskKV", "default_capacity_bytes",
           "make_policy"]

BlockPool = _core.BlockPool
CapacityError = _core.CapacityError
Full = _core.FullPolicy
Window = _core.WindowPolicy
HeavyHitter = _core.HeavyHitterPolicy


def default_capacity_bytes() -> int:
    """Default hard limit of a pool: half the machine's physical memory (the arena grows
    lazily, so an unused limit costs nothing). KVLOOM_POOL_BYTES overrides it."""
    env = os.environ.get("KVLOOM_POOL_BYTES")
    if env:
        try:
            val = int(float(env))
        except ValueError:
            raise ValueError(f"KVLOOM_POOL_BYTES must be a number of bytes, got {env!r}") from None
        if val <= 0:
            raise ValueError(f"KVLOOM_POOL_BYTES must be positive, got {env!r}")
        return val
    try:
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        phys = 8 << 30
    return max(phys // 2, 64 << 20)


class FastGen:
    """FastGen (Ge et al., ICLR 2024, "Model Tells You What to Discard: Adaptive KV Cache
    Compression for LLMs").

    Each kv head is profiled once on the prompt (its query group's attention, aggregated):
    kvloom picks the first of the nested hybrids special → +punctuation → +frequent → +local
    → full whose kept keys hold at least ``recovery`` of the attention mass (averaged over
    the prompt's queries), then applies it while decoding, freeing the rest for real.
    "frequent" keeps the ``r_frequent`` fraction of tokens with the most accumulated
    attention; "local" the tokens within ``r_local`` × prompt length of the current one.
    Used through :class:`kvloom.Cache`, which needs the tokenizer for the special and
    punctuation ids. Until a head is profiled it keeps everything.
    """

    HYBRIDS = ("special", "special+punct", "special+punct+frequent", "special+punct+frequent+local", "full")

    def __init__(self, recovery: float = 0.95, r_local: float = 0.3, r_frequent: float = 0.3):
        for name, val in (("recovery", recovery), ("r_local", r_local), ("r_frequent", r_frequent)):
            if not (isinstance(val, (int, float)) and 0.0 < float(val) <= 1.0):
                raise ValueError(f"FastGen: {name} must be in (0, 1], got {val!r}")
        self.recovery, self.r_local, self.r_frequent = float(recovery), float(r_local), float(r_frequent)

    @property
    def name(self) -> str:
        return f"fastgen(recovery={self.recovery:g}, r_local={self.r_local:g}, r_frequent={self.r_frequent:g})"

    def __repr__(self) -> str:
        return self.name

    def local_window(self, prompt_len: int) -> int:
        return max(1, math.ceil(self.r_local * prompt_len))

    def choose(self, masses) -> int:
        """Index of the first hybrid whose recovered mass reaches `recovery` (4: full)."""
        for level, mass in enumerate(masses):
            if mass >= self.recovery - 1e-9:
                return level
        return 4

    def plan(self, level: int, prompt_len: int):
        return _core.FastGenPlan(int(level), self.local_window(prompt_len), self.r_frequent)


class TaskKV:
    """Task-KV (He et al., 2025): semantic separation of heads.

    Per layer, over an observation window of the last ``window`` prompt queries: each kv
    head's column-mean attention C, its top-``top_t`` tokens I and its semantic vector
    v = C[I]·V[I]; the layer centre is the mean vector. Heterogeneous heads (the f(r) farthest
    from the centre, f falling linearly from n·beta at the first layer to ``m`` at the last,
    plus the single nearest head) keep the full cache; the others keep ``sinks`` first tokens,
    ``recent`` newest tokens and the middle activations (highest max-pooled C, kernel
    ``pool``) up to ``budget`` × prompt length tokens. If the budget is smaller than
    sinks + recent, those heads keep sinks + recent only (no middle tokens).
    """

    def __init__(self, beta: float = 0.25, m: int = 4, sinks: int = 16, recent: int = 256, budget: float = 0.4,
                 window: int = 32, top_t: int = 256, pool: int = 7):
        if not (0.0 < float(budget) <= 1.0):
            raise ValueError(f"TaskKV: budget must be in (0, 1] (a fraction of the prompt), got {budget!r}")
        if beta < 0 or m < 0:
            raise ValueError(f"TaskKV: beta and m must be >= 0, got beta={beta}, m={m}")
        for name, val in (("sinks", sinks), ("recent", recent)):
            if int(val) < 0:
                raise ValueError(f"TaskKV: {name} must be >= 0, got {val}")
        for name, val in (("window", window), ("top_t", top_t), ("pool", pool)):
            if int(val) < 1:
                raise ValueError(f"TaskKV: {name} must be >= 1, got {val}")
        self.beta, self.m, self.sinks, self.recent = float(beta), int(m), int(sinks), int(recent)
        self.budget, self.window, self.top_t, self.pool = float(budget), int(window), int(top_t), int(pool)

    @property
    def name(self) -> str:
        return f"taskkv(budget={self.budget:g}, beta={self.beta:g}, m={self.m}, sinks={self.sinks}, recent={self.recent})"

    def __repr__(self) -> str:
        return self.name

    def decide(self, col_means, values, layer: int, n_layers: int):
        """The layer's split from each kv head's observation-window column means C [T] and
        values [T, D] (both in prompt order): (heterogeneous heads, {head: middle positions})."""
        vecs = []
        for C, v in zip(col_means, values):
            top = torch.topk(C, min(self.top_t, C.numel())).indices
            vecs.append((C[top, None].double() * v.double()[top]).sum(0))
        vecs = torch.stack(vecs)
        dist = (vecs - vecs.mean(0)).norm(dim=1)
        order = torch.argsort(dist, descending=True).tolist()
        hetero = set(order[: self.n_heterogeneous(layer, n_layers, len(col_means))]) | {order[-1]}
        middles = {}
        for h, C in enumerate(col_means):
            if h in hetero:
                continue
            T = C.numel()
            k_mid = max(0, math.ceil(self.budget * T) - self.sinks - self.recent)
            lo, hi = self.sinks, T - self.recent
            if k_mid == 0 or hi <= lo:
                middles[h] = []
                continue
            pooled = torch.nn.functional.max_pool1d(C[None, None].float(), self.pool, stride=1,
                                                    padding=self.pool // 2)[0, 0][:T]
            cand = pooled[lo:hi]
            middles[h] = sorted((torch.topk(cand, min(k_mid, cand.numel())).indices + lo).tolist())
        return sorted(hetero), middles

    def n_heterogeneous(self, layer: int, n_layers: int, n_heads: int) -> int:
        """f(r): n·beta at the first layer, falling linearly to m at the last."""
        start = n_heads * self.beta
        f = start if n_layers == 1 else start + (self.m - start) * layer / (n_layers - 1)
        return max(0, min(n_heads, int(round(f))))


class NAtS:
    """NAtS (Neural Attention Search): learned per-token, per-kv-head types (global / local /
    sliding window) from a small scorer on each layer's input hidden states; the C++ ``nats``
    policy frees local tokens once a newer global token has been attended and sliding
    tokens after ``window`` queries. The prompt attends with the same visibility rules.
    Used through :class:`kvloom.Cache`.

    Args:
        scorer: a :class:`kvloom.nats.Scorer`, a path to a saved one, or None for the scorer
            shipped for SmolLM2-135M-Instruct.
        window: sliding-window length (default: the scorer's training window).
    """

    def __init__(self, scorer=None, window: Optional[int] = None):
        from .nats import Scorer

        self.scorer = scorer if isinstance(scorer, Scorer) else Scorer.load(scorer)
        self.window = int(window if window is not None else self.scorer.window)
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {window}")

    @property
    def name(self) -> str:
        return f"nats(window={self.window})"

    def __repr__(self) -> str:
        return self.name


def make_policy(policy) -> "_core.Policy":
    """A policy object from a policy, None (full) or a name ('full', 'window', 'h2o')."""
    if policy is None or isinstance(policy, (FastGen, TaskKV)):  # profiled policies keep all until profiled
        return Full()
    if isinstance(policy, NAtS):
        return _core.NatsPolicy(policy.window)
    if isinstance(policy, _core.Policy):
        return policy
    if isinstance(policy, str):
        name = policy.lower()
        if name == "full":
            return Full()
        if name == "window":
            return Window()
        if name in ("h2o", "heavy_hitter", "heavyhitter"):
            return HeavyHitter()
        raise ValueError(f"unknown policy {policy!r}; known: 'full', 'window', 'h2o'")
    raise TypeError(f"policy must be a kvloom policy or a name, got {type(policy).__name__}")


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
        policy: eviction policy (``kvloom.Full()``, ``kvloom.Window(sinks, recent)``, or a name).
        block_size: tokens per block.
        capacity_bytes: hard limit of the block pool (default: :func:`default_capacity_bytes`).
        layer_store: cross-layer KV sharing (CLA): ``layer_store[l]`` is the layer whose KV
            layer l reads (an earlier owner, or l itself). Readers hold no memory; appends go
            to owners. Default: no sharing.
        pool: share an existing :class:`kvloom.BlockPool` instead of making one.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, *, dtype=torch.float32, policy=None,
                 block_size: int = 16, capacity_bytes: Optional[int] = None, pool: Optional[BlockPool] = None,
                 layer_store: Optional[Sequence[int]] = None):
        if pool is None:
            name = kv_dtype_name(dtype)
            if capacity_bytes is None:
                capacity_bytes = default_capacity_bytes()
            if int(block_size) <= 0:
                raise ValueError(f"block_size must be >= 1, got {block_size}")
            elt = 4 if name == "float32" else 2
            block_bytes = 2 * int(block_size) * int(head_dim) * elt
            capacity_blocks = int(capacity_bytes) // max(block_bytes, 1)
            if capacity_blocks < 1:
                raise ValueError(f"capacity_bytes={capacity_bytes} holds no block of {block_bytes} bytes")
            pool = BlockPool(name, int(head_dim), int(block_size), min(capacity_blocks, 1 << 30))
        elif pool.head_dim != head_dim:
            raise ValueError(f"pool head_dim {pool.head_dim} != head_dim {head_dim}")
        self._pool = pool
        self._c = _core.Cache(pool, int(n_layers), int(n_kv_heads), make_policy(policy))
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
    def policy(self) -> str:
        return self._c.policy

    def set_layer_policy(self, layer: int, policy) -> None:
        """Policy of one layer for sequences added from now on (None: the cache-wide one)."""
        self._c.set_layer_policy(layer, None if policy is None else make_policy(policy))

    def set_policy(self, policy) -> None:
        """Policy for sequences added from now on (existing heads keep their plans)."""
        self._c.set_policy(make_policy(policy))

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
            positions = as_tensor(positions, "positions")
            if positions.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"positions must be an integer tensor, got {positions.dtype}")
            positions = positions.to(torch.int32).contiguous()
        if classes is not None:
            classes = as_tensor(classes, "classes").to(torch.uint8).contiguous()
        self._c.append(layer, seq, k, v, positions, classes)

    def evict(self, layer: int, head: int, seq: int, slots) -> None:
        """Frees the given live slots of one head (see :meth:`slots`)."""
        if isinstance(slots, torch.Tensor):
            slots = slots.tolist()
        self._c.evict(layer, head, seq, np.asarray(slots, dtype=np.int64).reshape(-1).tolist())

    def apply_policy(self, layer: int, seq: int) -> int:
        """Runs each head's policy plan for (layer, seq); returns the number of slots freed."""
        return self._c.apply_policy(layer, seq)

    def length(self, layer: int, head: int, seq: int) -> int:
        """Live tokens of one head."""
        return self._c.length(layer, head, seq)

    def lengths(self, seq: int) -> List[List[int]]:
        """Live tokens per [layer][kv head]."""
        return self._c.lengths(seq)

    def slots(self, layer: int, head: int, seq: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(slot, ord, pos) int32 arrays of the live slots of one head, in slot order."""
        return self._c.slots(layer, head, seq)

    def gather(self, layer: int, head: int, seq: int, dtype=None):
        """(k, v, ord, pos) of one head's live tokens in append order: k, v [len, head_dim]."""
        n = self.length(layer, head, seq)
        dt = self.dtype if dtype is None else dtype
        k = torch.empty(n, self.head_dim, dtype=dt)
        v = torch.empty(n, self.head_dim, dtype=dt)
        ords = torch.empty(n, dtype=torch.int32)
        pos = torch.empty(n, dtype=torch.int32)
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
            inv_freq = as_tensor(inv_freq, "inv_freq").float().contiguous()
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        self._c.attend(layer, q, out, list(seqs), 0.0 if scale is None else _check_scale(scale), inv_freq)
        return out

    def accumulate_attention(self, layer: int, q, seqs: Sequence[int], *, scale: Optional[float] = None) -> None:
        """Adds to each live slot of (layer, seqs[b]) the attention it receives from q[b]
        [B, Hq, Tq, head_dim] (causal: query i is the (len - Tq + i)-th token), summed over
        each kv head's query group: H2O's accumulated-attention statistic."""
        from .ops import _check_scale

        q = as_tensor(q, "q")
        if q.dim() != 4:
            raise ValueError(f"q must be [batch, q_heads, tokens, head_dim], got shape {tuple(q.shape)}")
        self._c.accumulate_attention(layer, [int(s) for s in seqs], q, 0.0 if scale is None else _check_scale(scale))

    def hybrid_recovery(self, layer: int, q, seqs: Sequence[int], *, r_frequent: float, local_window: int,
                        scale: Optional[float] = None) -> np.ndarray:
        """FastGen profiling: [B, n_kv_heads, 4] attention mass (mean over q's queries and each
        head's group, causal) kept by the hybrids special, +punct, +frequent, +local."""
        from .ops import _check_scale

        q = as_tensor(q, "q")
        if q.dim() != 4:
            raise ValueError(f"q must be [batch, q_heads, tokens, head_dim], got shape {tuple(q.shape)}")
        return self._c.hybrid_recovery(layer, [int(s) for s in seqs], q, 0.0 if scale is None else _check_scale(scale),
                                       float(r_frequent), int(local_window))

    def set_head_plan(self, layer: int, head: int, seq: int, plan) -> None:
        """Replaces one head's eviction plan (e.g. ``FastGen.plan(...)``)."""
        self._c.set_head_plan(layer, head, seq, plan)

    def classes(self, layer: int, head: int, seq: int) -> np.ndarray:
        """Token-class bits of the live slots of one head, in slot order."""
        return self._c.classes(layer, head, seq)

    def scores(self, layer: int, head: int, seq: int) -> np.ndarray:
        """Accumulated attention of the live slots of one head, in slot order (see :meth:`slots`)."""
        return self._c.scores(layer, head, seq)

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
            "policy": self.policy,
            "sequences": seqs,
        }

    def __repr__(self) -> str:
        return (f"KVCache(n_layers={self.n_layers}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
                f"dtype={self._c.dtype}, policy={self.policy}, sequences={len(self.sequences())}, "
                f"memory_bytes={self.memory_bytes()})")
