"""What a policy is: a frozen config (its parameters, validated from one schema) plus the
hooks kvloom's cache and its transformers adapter call. A policy lives in one file of this
package and registers itself with :func:`register`; the registry feeds ``make_policy``, the
CLI's ``--policy`` and its parameters, and the shared policy test suite.

Hooks, all optional (the defaults do nothing):

========================  ==============================================================
``plan()``                the C++ plan every head starts with (``kvloom._core.make_plan``)
``needs_scores``          keep accumulated attention per slot up to date every step (H2O)
``scores_prompt``         with ``needs_scores``: ``after_prompt`` adds the prompt's
                          accumulated attention itself (FastGen, from its profiling pass)
``token_classes(tok, n)`` a uint8 class table over the vocabulary (FastGen's special and
                          punctuation ids); set ``needs_tokenizer`` if it is required
``evict(kv, layer, seq)`` Python-side evictions after each step (prototyping a policy
                          without C++); returns the number of slots freed
``attach(cache, model)``  per-cache state on the transformers path (e.g. NAtS's hooks);
                          must have ``remove()``; called again for each fork
``append_classes(...)``   class bytes for the tokens being appended (NAtS types)
``prompt_attention(...)`` attention of the prompt instead of SDPA (NAtS's mask)
``after_prompt(...)``     profiling once the prompt's attention ran (FastGen, Task-KV)
========================  ==============================================================
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Type

__all__ = ["Policy", "Param", "param", "register", "get", "names", "make", "REGISTRY"]

REGISTRY: Dict[str, Type["Policy"]] = {}
_ALIASES: Dict[str, str] = {}


def param(default, help: str, *, lo=None, hi=None, lo_open: bool = False, kind=None):
    """A policy parameter: its default, a one-line help and its valid range (``lo``/``hi``
    inclusive unless ``lo_open``). ``kind`` is the CLI type (default: the default's type)."""
    return field(default=default, metadata={"help": help, "lo": lo, "hi": hi, "lo_open": lo_open, "kind": kind})


@dataclass(frozen=True)
class Param:
    name: str
    kind: type
    default: Any
    help: str
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False

    def describe_range(self) -> str:
        if self.lo is None and self.hi is None:
            return ""
        lo = "" if self.lo is None else f"{'(' if self.lo_open else '['}{self.lo:g}"
        hi = "" if self.hi is None else f"{self.hi:g}]"
        return f"{lo or '(-inf'}, {hi or 'inf)'}"


@dataclass(frozen=True, eq=False)
class Policy:
    """Base class of eviction policies. Subclasses are frozen dataclasses whose fields are
    the parameters (declared with :func:`param`), decorated with :func:`register`."""

    name: ClassVar[str] = ""
    aliases: ClassVar[Tuple[str, ...]] = ()
    needs_scores: ClassVar[bool] = False
    scores_prompt: ClassVar[bool] = False
    needs_tokenizer: ClassVar[bool] = False

    def __post_init__(self):
        for p in self.params():
            value = getattr(self, p.name)
            if value is None or p.kind not in (int, float):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{type(self).__name__}: {p.name} must be a finite number, got {value!r}")
            if p.kind is int and float(value) != int(value):
                raise ValueError(f"{type(self).__name__}: {p.name} must be an integer, got {value!r}")
            ok = (p.lo is None or (value > p.lo if p.lo_open else value >= p.lo)) and (p.hi is None or value <= p.hi)
            if not ok:
                raise ValueError(f"{type(self).__name__}: {p.name} must be in {p.describe_range()}, got {value!r}")
            object.__setattr__(self, p.name, p.kind(value))
        self.check()

    # --- schema ---------------------------------------------------------------------------
    @classmethod
    def params(cls) -> List[Param]:
        out = []
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            md = f.metadata
            kind = md.get("kind") or (type(f.default) if f.default is not None else str)
            out.append(Param(f.name, kind, f.default, md.get("help", ""), md.get("lo"), md.get("hi"),
                             md.get("lo_open", False)))
        return out

    def values(self) -> Dict[str, Any]:
        return {p.name: getattr(self, p.name) for p in self.params()}

    def check(self) -> None:
        """Checks that involve several parameters (single-parameter ranges come from the schema)."""

    def saved_values(self) -> Dict[str, Any]:
        """The parameters as JSON values, for snapshots: ``make(name, **saved_values())``
        re-makes the policy. Raises ValueError for a parameter that has no such form."""
        out = {}
        for k, v in self.values().items():
            if v is not None and not isinstance(v, (bool, int, float, str)):
                raise ValueError(f"{self.label}: parameter {k} ({type(v).__name__}) cannot be written to a snapshot")
            out[k] = v
        return out

    @property
    def label(self) -> str:
        """``window(sinks=4, recent=1024)``: the name and every parameter."""
        def fmt(v):
            return f"{v:g}" if isinstance(v, float) else str(v)

        inner = ", ".join(f"{k}={fmt(v)}" for k, v in self.values().items() if v is not None and not hasattr(v, "forward"))
        return f"{self.name}({inner})" if inner else self.name

    def __repr__(self) -> str:
        return self.label

    # --- hooks ------------------------------------------------------------------------------
    def plan(self):
        """The C++ plan every head starts with."""
        from .. import _core

        return _core.make_plan("full")

    def token_classes(self, tokenizer, vocab_size: int):
        """uint8 [vocab_size] class bits per token id, or None (no classes needed)."""
        return None

    def evict(self, kv, layer: int, seq: int) -> int:
        """Python-side evictions for (layer, seq) before the C++ plan runs; returns slots freed."""
        return 0

    def attach(self, cache, model):
        """Per-cache state on the transformers path (an object with ``remove()``), or None."""
        return None

    def append_classes(self, cache, layer: int, batch: int, n: int):
        """uint8 classes [batch, n] or [batch, n_kv_heads, n] for the tokens being appended,
        or None (then the token-class table, if any, is used)."""
        return None

    def prompt_attention(self, cache, layer: int, query, key, value, attention_mask, scaling):
        """Output [B, T, Hq, D] of the prompt's attention instead of SDPA's, or None."""
        return None

    def after_prompt(self, cache, layer: int, query, scaling) -> None:
        """Runs once per full-attention layer after a prompt's attention (per-head plans)."""

    # --- for the shared test suite ----------------------------------------------------------
    @classmethod
    def example(cls, model=None) -> "Policy":
        """An instance that evicts something on a short prompt of `model` (tests, CLI docs)."""
        return cls()

    @classmethod
    def keep_all(cls, model=None) -> Optional["Policy"]:
        """An instance that keeps every token (must then match ``Full``), or None."""
        return None


def register(cls: Type[Policy]) -> Type[Policy]:
    """Class decorator: puts a policy in the registry under its ``name`` and ``aliases``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a class attribute `name`")
    for key in (cls.name, *cls.aliases):
        owner = _ALIASES.get(key)
        if owner is not None and REGISTRY[owner].__qualname__ != cls.__qualname__:
            raise ValueError(f"policy name {key!r} is taken by {REGISTRY[owner].__name__}")
        _ALIASES[key] = cls.name
    REGISTRY[cls.name] = cls
    cls.__repr__ = Policy.__repr__  # a policy shows as its label, not as the dataclass repr
    return cls


def unregister(name: str) -> None:
    """Removes a policy (and its aliases) from the registry (tests register toy policies)."""
    cls = REGISTRY.pop(name)
    for key in (cls.name, *cls.aliases):
        _ALIASES.pop(key, None)


def names() -> List[str]:
    """The registered policy names, in registration order."""
    return list(REGISTRY)


def get(name: str) -> Type[Policy]:
    """The policy class for a name or alias (case-insensitive)."""
    key = _ALIASES.get(str(name).lower())
    if key is None:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(names())}")
    return REGISTRY[key]


def make(name: str, **params) -> Policy:
    """A policy by name, e.g. ``make("window", recent=256)``; unknown parameters are errors."""
    cls = get(name)
    known = {p.name for p in cls.params()}
    bad = sorted(set(params) - known)
    if bad:
        raise ValueError(f"policy {cls.name!r} has no parameter {', '.join(map(repr, bad))}; "
                         f"its parameters: {', '.join(sorted(known)) or 'none'}")
    return cls(**params)
