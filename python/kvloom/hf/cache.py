"""`kvloom.Cache`: a `transformers.Cache` backed by kvloom's C++ paged cache."""
from __future__ import annotations

import hashlib
import threading
import warnings
import weakref
from typing import List, Optional

import torch
from transformers.cache_utils import Cache as _HFCache
from transformers.cache_utils import CacheLayerMixin

from .. import _core
from ..cache import KVCache, make_policy
from . import arch

# The attention function learns which cache (and layer) it serves from the update() that
# runs right before it in the same attention module and thread.
_active = threading.local()


def _take_active(layer_idx: int, key_states):
    """The cache whose update() produced exactly these key states for this layer, if any
    (the identity check ignores a stale entry left by a forward that raised)."""
    entry = getattr(_active, "entry", None)
    _active.entry = None
    if entry is None or entry[1] != layer_idx or entry[2] is not key_states:
        return None
    return entry[0]


class LoomLayer(CacheLayerMixin):
    """One model layer's view of a :class:`LoomCache` (what transformers' Cache API expects)."""

    is_compileable = False
    is_croppable = True
    supports_early_init = False

    def __init__(self, parent: "LoomCache", layer_idx: int, window: Optional[int]):
        super().__init__()
        self._parent = weakref.proxy(parent)
        self.layer_idx = layer_idx
        self.window = window
        self.is_sliding = window is not None
        self.cumulative_length = 0  # logical tokens appended to this layer (evicted ones included)

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return self._parent._update(self.layer_idx, key_states, value_states)

    def get_mask_sizes(self, query_length):
        if isinstance(query_length, torch.Tensor):  # transformers < 5.4 passes the cache positions
            query_length = query_length.shape[0]
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # the name of get_max_length before transformers 5.13
        return -1

    def reset(self) -> None:
        self.cumulative_length = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("crop a kvloom.Cache as a whole: cache.crop(n)")

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("beam search is not supported by kvloom.Cache (reorder_cache); use greedy or sampling")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("call batch_repeat_interleave on the kvloom.Cache itself")

    def batch_select_indices(self, indices) -> None:
        self._run_deferred_policies()
        raise NotImplementedError("call batch_select_indices on the kvloom.Cache itself")


def model_fingerprint(model) -> dict:
    """What a snapshot records about its model: the KV geometry and a digest of a few weights
    (enough to tell two checkpoints of one architecture apart)."""
    geo = arch.geometry(model)
    h = hashlib.sha256()
    emb = model.get_input_embeddings().weight
    for t in (emb[:4], list(model.parameters())[-1]):
        h.update(t.detach().reshape(-1)[:1024].float().cpu().numpy().tobytes())
    return {"model_type": geo.model_type, "n_layers": geo.n_layers, "n_kv_heads": geo.n_kv_heads,
            "head_dim": geo.head_dim, "vocab": int(emb.shape[0]), "weights": h.hexdigest()[:32]}


class LoomCache(_HFCache):
    """A drop-in `transformers.Cache` whose KV lives in kvloom's C++ paged cache.

    Use it with kvloom's attention (``kvloom.enable(model)``, or load the model with
    ``attn_implementation="kvloom"`` after ``import kvloom``)::

        cache = kvloom.Cache(model, policy=kvloom.Window(sinks=4, recent=1024))
        model.generate(**inputs, cache=cache)   # transformers < 5.24: past_key_values=cache

    One C++ sequence per batch row. Left padding is evicted right after the prompt, so it
    costs no memory. ``get_seq_length()`` is the *logical* length (every token ever seen,
    evicted ones included), which is what ``generate()`` needs to continue a conversation
    with the same cache; the physical per-head lengths are in :meth:`stats`. Sliding-window
    layers (Gemma 3, Mistral, ...) keep their window whatever the policy.

    Args:
        model: the (supported) transformers model the cache is for.
        policy: eviction policy for full-attention layers (``kvloom.Full()`` by default).
        dtype: KV storage dtype (default: the model's dtype).
        kv_dtype: quantized storage, ``"int8"``, ``"int4"`` or ``"int2"`` (default None): blocks are
            quantized once full, after the policy has evicted from the prompt (the block being
            filled stays in ``dtype``; see :class:`kvloom.KVCache` and the README's *Quantized KV*).
        kv_budget: a memory budget, a fraction in (0, 1] of the bytes ``Full`` holds in ``dtype``
            (default None). After every forward each layer of each row holds at most that fraction
            of what ``Full`` would hold for the row's tokens (padding excluded; never less than
            one block per kv head): whatever the policy and ``kv_dtype`` leave above it gives way
            by the policy's rule (README, *Memory budget*).
        block_size, capacity_bytes: see :class:`kvloom.KVCache` (block size: 16, or 32 with kv_dtype int8 or int4).
    """

    def __init__(self, model, policy=None, *, tokenizer=None, dtype=None, block_size: Optional[int] = None,
                 capacity_bytes: Optional[int] = None, kv_dtype: Optional[str] = None,
                 kv_budget: Optional[float] = None):
        geo = arch.local_geometry(model)  # under tensor parallelism: this rank's heads
        self.geometry = geo
        dtype = dtype or getattr(model, "dtype", torch.float32)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"KV dtype {dtype} is not supported; use float32, float16 or bfloat16")
        self.policy = make_policy(policy)
        self._tp_group = arch.tensor_parallel_group(model)
        self.n_kv_heads_total = arch.geometry(model).n_kv_heads
        self.head_offset = 0  # the model's index of this rank's first kv head
        if self._tp_group is not None:
            import torch.distributed as dist

            self.head_offset = dist.get_rank(self._tp_group) * geo.n_kv_heads
        if self.policy.needs_tokenizer and tokenizer is None:
            raise ValueError(f"{type(self.policy).__name__} needs the tokenizer (its token classes come from it): "
                             f"kvloom.Cache(model, policy=..., tokenizer=tok)")
        self._store = arch.layer_store(model) or list(range(geo.n_layers))  # CLA: the layer each layer reads
        device = next(model.parameters()).device
        self.kv = KVCache(geo.n_layers, geo.n_kv_heads, geo.head_dim, dtype=dtype, policy=self.policy,
                          block_size=block_size, capacity_bytes=capacity_bytes, device=device, kv_dtype=kv_dtype,
                          kv_budget=kv_budget, layer_store=None if self._store == list(range(geo.n_layers)) else self._store)
        self._class_table = None
        self._ids = None
        self._ids_classes = None  # the classes of _ids (computed on first use)
        self._hook = None
        self._flush_hook = None
        # A decode step's policy runs after the whole forward when it ranks by accumulated
        # attention and no layer reads another's KV (CLA): on CUDA the step's scores then reach
        # the host once per step instead of once per layer (kvloom/cache.h: defer_scores). Layer
        # l's eviction only changes what layer l reads next step, so the result is the same.
        self._deferred_policy: list = []  # (layer, full_tokens) waiting for _flush
        self._defer_policies = self.policy.needs_scores and self._store == list(range(geo.n_layers))
        if self._tp_group is not None:  # the budget counts the whole layer, across the ranks
            # settled once per forward, in one exchange, unless a later layer reads an earlier
            # one's KV in the same forward (CLA)
            defer = kv_budget is not None and self._store == list(range(geo.n_layers))
            self.kv.share_heads(self._tp_group, self.head_offset, self.n_kv_heads_total, defer=defer)
            if defer:
                self._install_flush_hook(model)
        if self._defer_policies and self._flush_hook is None:
            self._install_flush_hook(model)
        self._embed = None
        self._closed = False
        self.policy_state = None
        self._model = weakref.ref(model)
        if tokenizer is not None:
            vocab = model.get_input_embeddings().weight.shape[0]
            self._class_table = self.policy.token_classes(tokenizer, vocab)
        if self._class_table is not None:
            self._class_table = self._class_table.to(device)  # looked up with the model's token ids
            self._embed = model.get_input_embeddings()
            self._install_ids_hook()
        self.policy_state = self.policy.attach(self, model)  # e.g. NAtS's hidden-state hooks
        for i, w in enumerate(geo.windows):
            if w is not None:
                # after attention, keep the W-1 newest tokens: with the next token that is W
                self.kv.set_layer_window(i, w - 1)
        super().__init__(layers=[LoomLayer(self, i, w) for i, w in enumerate(geo.windows)])
        self._config = arch.text_config(model)
        self._attn_ids = {id(m) for m in arch.attention_modules(model)}
        self.seqs: Optional[List[int]] = None  # one C++ sequence per batch row

    # --- a layer-wide view under tensor parallelism ------------------------------------
    def local_heads(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The part of `x` (one entry per kv head of the model along `dim`) that belongs to this
        rank's heads; `x` itself without tensor parallelism."""
        if self._tp_group is None:
            return x
        return x.narrow(dim, self.head_offset, self.kv.n_kv_heads)

    def all_heads(self, x: torch.Tensor) -> torch.Tensor:
        """`x` holds one row per kv head of this rank; returns the rows of every kv head of the
        model, in the model's order, gathered from the ranks that share the heads (every rank
        must call it at the same point). `x` itself without tensor parallelism."""
        if self._tp_group is None:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(self._tp_group))]
        dist.all_gather(parts, x.contiguous(), group=self._tp_group)
        return torch.cat(parts)

    def _install_flush_hook(self, model) -> None:
        me = weakref.ref(self)

        def flush(_module, _args, _out):  # every rank runs the forward: a safe place for a collective
            cache = me()
            if cache is not None and not cache._closed:
                cache._run_deferred_policies()
                cache.kv.flush_budget()

        self._flush_hook = model.register_forward_hook(flush)

    def _run_deferred_policies(self) -> None:
        """Runs the policies of the decode steps' layers that waited for the end of the forward
        (in layer order, as the forward would have); a no-op when none waits."""
        work, self._deferred_policy = self._deferred_policy, []
        for layer, full in work:
            for b, s in enumerate(self.seqs or []):
                self.kv.apply_policy(layer, s, full_tokens=None if full is None else full[b])

    def _remove_hooks(self) -> None:
        for name in ("_hook", "_flush_hook"):  # (getattr: __del__ may see a half-built cache)
            hook = getattr(self, name, None)
            if hook is not None:
                hook.remove()
                setattr(self, name, None)

    def _install_ids_hook(self) -> None:
        me = weakref.ref(self)

        def remember_ids(_module, args):  # the token ids of this forward, for the classes
            cache = me()
            if cache is not None:
                cache._ids = args[0] if args and isinstance(args[0], torch.Tensor) else None
                cache._ids_classes = None

        self._hook = self._embed.register_forward_pre_hook(remember_ids)

    # --- what the model calls -----------------------------------------------------------
    def _update(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        if self._closed:
            raise RuntimeError("this kvloom.Cache was closed (its sequences were dropped); fork or build a new one")
        if getattr(self._config, "_attn_implementation", None) != "kvloom":
            raise RuntimeError(
                "kvloom.Cache needs kvloom's attention function: call kvloom.enable(model) (or load the model with "
                f"attn_implementation='kvloom'); the model uses {self._config._attn_implementation!r}")
        if not 0 <= layer_idx < self.geometry.n_layers:
            raise IndexError(f"layer {layer_idx} out of range: this cache was built for {self.geometry.n_layers} layers")
        if layer_idx == 0 and (self.kv._pending or self._deferred_policy):  # a forward whose end the hook did not see
            self._run_deferred_policies()
            self.kv.flush_budget()
        if key_states.dim() != 4 or key_states.shape != value_states.shape:
            raise ValueError(f"expected key/value states [batch, kv_heads, tokens, head_dim], got "
                             f"{tuple(key_states.shape)} and {tuple(value_states.shape)}")
        B, H, n, D = key_states.shape
        if H != self.geometry.n_kv_heads or D != self.geometry.head_dim:
            raise ValueError(
                f"this kvloom.Cache was built for {self.geometry.n_kv_heads} kv heads of dim {self.geometry.head_dim} "
                f"({self.geometry.model_type}), got {H} x {D}: was it built for another model?")
        if self.seqs is not None and B != len(self.seqs):
            raise ValueError(f"batch size {B} does not match the cache's {len(self.seqs)} sequences "
                             "(a cache holds one conversation batch; make a new one or use batch_select_indices)")
        if key_states.device != self.kv.device:
            raise ValueError(f"this kvloom.Cache lives on {self.kv.device} but the key states are on "
                             f"{key_states.device}: build the cache after moving the model (kvloom.Cache(model))")
        # (on CUDA this check would wait for the GPU at every layer: it runs on CPU caches only)
        if key_states.device.type == "cpu" and not (_core.all_finite(key_states.detach()) and _core.all_finite(value_states.detach())):
            raise ValueError(f"non-finite values (NaN/inf) in the key/value states of layer {layer_idx}; nothing was cached")
        if self.seqs is None:
            self._check_capacity(B, n)
            self.seqs = [self.kv.add_sequence() for _ in range(B)]
        elif layer_idx == 0:
            self._check_capacity(B, n)
        if layer_idx == 0:
            self._warn_past_max_positions(self.layers[0].cumulative_length + n)
        classes = self.policy.append_classes(self, layer_idx, B, n)
        if classes is None:
            classes = self._classes(B, n)
        for b, s in enumerate(self.seqs):
            self.kv.append(layer_idx, s, key_states[b], value_states[b], classes=None if classes is None else classes[b])
        self.layers[layer_idx].cumulative_length += n
        self.layers[layer_idx].is_initialized = True
        _active.entry = (self, layer_idx, key_states)
        return key_states, value_states

    def owns(self, layer_idx: int) -> bool:
        """False for a CLA reader layer (it reads an earlier layer's KV and stores none)."""
        return self._store[layer_idx] == layer_idx

    def owner(self, layer_idx: int) -> int:
        """The layer whose KV `layer_idx` reads (itself unless layers share KV, CLA)."""
        return self._store[layer_idx]

    def read_shared(self, layer_idx: int, key_states, value_states, q_len: int):
        """Called by a CLA reader layer instead of update(): nothing is stored (the C++ cache
        maps the layer to its owner's store); the attention learns its cache from here."""
        self._check_open()
        if self.owns(layer_idx):
            raise ValueError(f"layer {layer_idx} owns its KV; call update()")
        layer = self.layers[layer_idx]
        layer.cumulative_length = self.layers[self._store[layer_idx]].cumulative_length
        layer.is_initialized = True
        _active.entry = (self, layer_idx, key_states)
        return key_states, value_states

    def _classes(self, batch: int, n: int):
        """uint8 [batch, n] classes of the tokens being appended, from the policy's token-class
        table (FastGen's special/punctuation ids), if it has one."""
        ids = self._ids
        if self._class_table is None or ids is None or tuple(ids.shape) != (batch, n):
            return None
        if self._ids_classes is None:  # once per forward, not once per layer
            self._ids_classes = self._class_table[ids.clamp(0, self._class_table.numel() - 1)].contiguous()
        return self._ids_classes

    def __del__(self):
        self._remove_hooks()
        state = getattr(self, "policy_state", None)
        if state is not None:
            state.remove()
        try:  # a cache that goes away gives its sequences back (forks share the C++ cache)
            if not getattr(self, "_closed", True) and self.seqs is not None:
                for s in self.seqs:
                    self.kv.drop(s)
        except Exception:  # interpreter shutdown
            pass

    def _warn_past_max_positions(self, total: int) -> None:
        """Warns once when the sequence grows past the model's trained positions."""
        limit = getattr(self._config, "max_position_embeddings", None)
        if isinstance(limit, int) and total > limit and not getattr(self, "_warned_positions", False):
            self._warned_positions = True
            warnings.warn(f"the sequence reaches {total} tokens, past the model's max_position_embeddings={limit}; "
                          "the model was not trained on these positions, so what follows is unreliable",
                          UserWarning, stacklevel=4)

    def _check_capacity(self, batch: int, n_tokens: int) -> None:
        """Refuses a forward pass the pool cannot hold before any layer is touched, so a
        too-long prompt leaves the cache intact (upper bound: one extra block per head)."""
        pool = self.kv.pool
        need = batch * self.geometry.n_layers * self.geometry.n_kv_heads * (-(-n_tokens // pool.block_size) + 1)
        if need > pool.free_blocks:
            from .. import CapacityError

            raise CapacityError(
                f"a forward pass of {n_tokens} tokens x batch {batch} may need {need} blocks; the pool has "
                f"{pool.free_blocks} of {pool.capacity_blocks} free (raise capacity_bytes); nothing was cached")

    # --- transformers Cache API -----------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self._closed or layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].cumulative_length

    def crop(self, max_length: int) -> None:
        """Rolls every sequence back. ``max_length < 0`` removes that many tokens; otherwise
        keeps the first ``max_length``. Evicted tokens stay evicted."""
        self._check_open()
        self._run_deferred_policies()
        length = self.get_seq_length()
        n = -max_length if max_length < 0 else length - max_length
        if n < 0 or n > length:
            raise ValueError(f"cannot crop {max_length}: the cache holds {length} tokens")
        if n == 0 or self.seqs is None:
            return
        for s in self.seqs:
            self.kv.rollback(s, n)
        for layer in self.layers:
            layer.cumulative_length -= n

    def reset(self) -> None:
        self._deferred_policy = []  # (the sequences they would run on are dropped)
        if self.seqs is not None:
            for s in self.seqs:
                self.kv.drop(s)
        self.seqs = None
        for layer in self.layers:
            layer.reset()

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("beam search is not supported by kvloom.Cache; use greedy or sampling")

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row repeated `repeats` times (forks: the rows share their blocks)."""
        self._run_deferred_policies()
        if self.seqs is None:
            return
        new = []
        for s in self.seqs:
            new.append(s)
            new.extend(self.kv.fork(s) for _ in range(repeats - 1))
        self.seqs = new

    def batch_select_indices(self, indices) -> None:
        self._run_deferred_policies()
        if self.seqs is None:
            return
        idx = [int(i) for i in (indices.tolist() if hasattr(indices, "tolist") else indices)]
        keep = [self.seqs[i] for i in idx]
        for s in set(self.seqs) - set(keep):
            self.kv.drop(s)
        if len(set(keep)) != len(keep):
            raise NotImplementedError("selecting a batch row twice is not supported")
        self.seqs = keep

    @property
    def is_compileable(self) -> bool:
        return False

    def _decode_targets(self, layer: int):
        """What each batch row attends to in a decode step (and the RoPE inv_freq when rows
        are segment views): one sequence per row here."""
        return self.seqs, None

    # --- kvloom extras ----------------------------------------------------------------------
    def fork(self) -> "LoomCache":
        """A cache that continues from this one's current state: every sequence is forked in
        the C++ cache (blocks shared, copy-on-write), so the fork costs no KV memory until
        either side appends. Both then evolve independently, with the same policy (per-head
        plans included, so a compressed cache forks too). :meth:`close` the fork to give its
        memory back; this cache is untouched by anything done to the fork."""
        self._check_open()
        self._run_deferred_policies()
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)  # shares the C++ cache, geometry, config and policy
        new.seqs = None if self.seqs is None else [self.kv.fork(s) for s in self.seqs]
        new.layers = []
        for old in self.layers:
            layer = LoomLayer(new, old.layer_idx, old.window)
            layer.cumulative_length = old.cumulative_length
            layer.is_initialized = old.is_initialized
            new.layers.append(layer)
        new._ids = None
        new._ids_classes = None
        new._hook = None
        new._flush_hook = None
        new._deferred_policy = []
        if new._embed is not None:
            new._install_ids_hook()
        if self._flush_hook is not None:
            new._install_flush_hook(self._model())
        new.policy_state = None if self.policy_state is None else self.policy.attach(new, self._model())
        return new

    def rollback(self, n_tokens: int) -> None:
        """Forgets the last ``n_tokens`` tokens of every sequence (``crop(-n_tokens)``)."""
        self._check_open()
        if n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
        if n_tokens:
            self.crop(-int(n_tokens))

    def close(self) -> None:
        """Drops this cache's sequences (their blocks return to the pool unless another
        fork still shares them). The cache cannot be used afterwards."""
        if self._closed:
            return
        self._deferred_policy = []
        if self.seqs is not None:
            for s in self.seqs:
                self.kv.drop(s)
        self.seqs = None
        self._closed = True
        for layer in self.layers:
            layer.cumulative_length = 0
        self._remove_hooks()
        if self.policy_state is not None:
            self.policy_state.remove()
            self.policy_state = None

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this kvloom.Cache was closed (its sequences were dropped)")

    @property
    def policy_name(self) -> str:
        """The policy and its parameters, e.g. ``window(sinks=4, recent=1024)``."""
        return self.policy.label

    # --- snapshots ----------------------------------------------------------------------
    def save(self, path) -> int:
        """Writes this cache (its sequences, per-head plans, statistics and logical length) to a
        snapshot file, atomically; returns the file's size. :meth:`load` continues from it
        exactly: the same attention outputs and the same greedy tokens as this cache."""
        from .. import snapshot

        return snapshot.write(path, "cache", *self._snapshot_parts())

    def dumps(self) -> bytes:
        """:meth:`save` into memory: the snapshot's bytes, for a transport of your own
        (:func:`kvloom.distributed.send_cache` sends them over torch.distributed)."""
        from .. import snapshot

        return bytes(snapshot.dumps("cache", *self._snapshot_parts()))

    @classmethod
    def load(cls, path, model, *, tokenizer=None, capacity_bytes: Optional[int] = None) -> "LoomCache":
        """A cache rebuilt from :meth:`save`'s file for `model` (the same model: its geometry
        and a digest of its weights are checked). ``tokenizer`` as for the constructor (FastGen
        needs it). Raises :class:`kvloom.SnapshotError` for a file that cannot be loaded."""
        from .. import snapshot

        meta, sections = snapshot.read(path, "cache")
        return cls._from_snapshot_parts(meta, sections, model, f"snapshot {path}", tokenizer, capacity_bytes)

    @classmethod
    def loads(cls, data, model, *, tokenizer=None, capacity_bytes: Optional[int] = None) -> "LoomCache":
        """:meth:`load` from the bytes :meth:`dumps` made."""
        from .. import snapshot

        meta, sections = snapshot.parse(data, "cache")
        return cls._from_snapshot_parts(meta, sections, model, "snapshot bytes", tokenizer, capacity_bytes)

    def _snapshot_parts(self, extra=None):
        self._check_open()
        self._run_deferred_policies()
        seqs = list(self.seqs or [])
        meta = {"model": model_fingerprint(self._model()), "kv": self.kv._snapshot_meta(), "seqs": seqs,
                "lengths": [layer.cumulative_length for layer in self.layers]}
        if extra is not None:
            meta["extra"] = extra
        return meta, {"kv": self.kv._c.export_sequences(seqs)}

    @classmethod
    def _from_snapshot_parts(cls, meta, sections, model, where, tokenizer, capacity_bytes) -> "LoomCache":
        from ..snapshot import SnapshotError, need, policy_from
        from .._tensors import torch_dtype

        saved = need(meta, "model", dict, where)
        here = model_fingerprint(model)
        if saved != here:
            diff = ", ".join(f"{k} {saved.get(k)!r} vs {here[k]!r}" for k in here if saved.get(k) != here[k])
            raise SnapshotError(f"{where}: made for another model ({diff})")
        kvm = need(meta, "kv", dict, where)
        lengths = need(meta, "lengths", list, where)
        seqs = need(meta, "seqs", list, where)
        if len(lengths) != len(arch.geometry(model).windows) or not all(isinstance(n, int) and n >= 0 for n in lengths):
            raise SnapshotError(f"{where}: bad layer lengths")
        policy = policy_from(kvm.get("policy"), where)
        try:
            cache = cls(model, policy, tokenizer=tokenizer, dtype=torch_dtype(kvm["dtype"]),
                        block_size=kvm["block_size"], capacity_bytes=capacity_bytes, kv_dtype=kvm.get("kv_dtype"),
                        kv_budget=kvm.get("kv_budget"))
        except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
            raise SnapshotError(f"{where}: its cache settings cannot be used here: {e}") from None
        ids = cache.kv._import(sections, where, keep_ids=True)
        if ids != seqs:
            raise SnapshotError(f"{where}: the header's sequence list does not match its KV")
        cache.seqs = ids or None
        for layer, n in zip(cache.layers, lengths):
            layer.cumulative_length = n
            layer.is_initialized = n > 0
        return cache

    def memory_bytes(self) -> int:
        """Exact bytes of KV held (live blocks x block bytes); 0 once closed."""
        if self._closed:
            return 0
        self._run_deferred_policies()
        return self.kv.memory_bytes()

    def stats(self) -> dict:
        """Logical length, bytes, and per sequence the live tokens and plan per [layer][kv head]."""
        self._run_deferred_policies()
        st = self.kv.stats()
        st["logical_length"] = self.get_seq_length()
        st["batch_sequences"] = list(self.seqs or [])
        st["windows"] = list(self.geometry.windows)
        st["policy"] = self.policy_name
        return st

    def __repr__(self) -> str:
        return (f"kvloom.Cache({self.geometry.model_type}, layers={self.geometry.n_layers}, "
                f"kv_heads={self.geometry.n_kv_heads}, policy={self.policy_name}, length={self.get_seq_length()}, "
                f"memory_bytes={self.memory_bytes()})")
