"""Hogwild!-style parallel inference: N workers (instances of one model) decode at the same
time over one shared KV cache and see each other's tokens as soon as they are written.

Cache layout (no key is ever copied or re-rotated):

- the *common* prefix is a list of segments: the prompt, then every finished step in the
  order the steps finished;
- each worker has one *current* segment, the step it is writing;
- worker i's view is ``common ⊕ the other workers' current segments (ascending) ⊕ its own``.

Each segment is its own sequence in the C++ cache and its keys are rotated at
segment-local positions (0, 1, ...). When worker i attends, its query is rotated by
``offset(own segment) − offset(segment)`` for each segment (the model's own ``inv_freq``),
which puts every key at its position in that worker's view. When a worker ends a step (a
blank line after a sentence), its segment is appended to the common list: an offset change,
no recompute. All workers advance one token per batched forward pass, and every worker's
new token is written at a layer before any worker attends at that layer, so the workers see
each other's tokens of the very same step.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .ciflex import _stop_ids
from ..hf.cache import LoomCache
from ..hf.compat import cache_kwargs

NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi"]

SYSTEM = (
    "You are {n} assistants, {names}, working on the same problem at the same time. Every one of you sees "
    "what the others are writing while they write it, even half-finished sentences. Work as a team: split the "
    "problem into parts, take a part nobody else is doing, and never redo what another assistant has already "
    "done. Write in short steps and end each step with a blank line. When the problem is solved, one of you "
    "writes the final answer as \"Final answer: ...\"."
)
SOLO_SYSTEM = "Solve the problem step by step. When it is solved, write the final answer as \"Final answer: ...\"."
HEADER = "\n{name}:"  # the newline keeps an unfinished step of another worker apart in a view
CHECK = " (Is another assistant already doing this? yes/no):"

_STEP_END = re.compile(r"[.!?:)\]]\s*\n\n$")


class HogwildCache(LoomCache):
    """A :class:`kvloom.Cache` whose decode steps attend over per-worker segment views."""

    def __init__(self, model, workers: int, policy=None, **kw):
        super().__init__(model, policy=policy, **kw)
        rot = _rotary(model)
        self.inv_freq = rot.inv_freq.detach().float().cpu().contiguous()  # read on the host, once
        self.common: List[int] = []
        self.current: List[int] = []
        self.rows: List[int] = []  # worker of each batch row in the current forward
        self._views = None

    def set_rows(self, workers: Sequence[int]) -> None:
        self.rows = list(workers)
        self.seqs = [self.current[w] for w in self.rows]
        self._views = None

    def segment_length(self, seq: int) -> int:
        return self.kv.seq_length(seq)

    def view(self, worker: int):
        """[(seq, rope delta)] of worker's view, common segments first, own segment last."""
        order = list(self.common) + [self.current[w] for w in range(len(self.current)) if w != worker]
        own = self.current[worker]
        offsets, o = [], 0
        for s in order:
            offsets.append(o)
            o += self.segment_length(s)
        return [(s, o - off) for s, off in zip(order, offsets)] + [(own, 0)]

    def close(self) -> None:
        """Drops every segment (common and current)."""
        if not self.closed:
            self.seqs = sorted(set(self.common) | set(self.current))
            self.common, self.current = [], []
        super().close()

    def _decode_targets(self, layer: int):
        if self._views is None or layer == 0:
            self._views = [self.view(w) for w in self.rows]
        return self._views, self.inv_freq


def _rotary(model):
    base = getattr(model, "model", model)
    rot = getattr(base, "rotary_emb", None)
    if rot is None or not hasattr(rot, "inv_freq"):
        raise NotImplementedError("kvloom.hogwild needs a RoPE model with a shared rotary_emb (Llama family)")
    return rot


@dataclass
class Worker:
    name: str
    segments: List[List[int]] = field(default_factory=list)  # token ids per step (finished + current)
    forced: List[int] = field(default_factory=list)  # tokens to feed before sampling again
    generated: int = 0
    steps: int = 0
    done: bool = False

    @property
    def current(self) -> List[int]:
        return self.segments[-1]


@dataclass
class HogwildResult:
    workers: Dict[str, str]  # each worker's own text (all its steps)
    transcript: str  # the shared history: finished steps in the order they finished, then unfinished ones
    tokens: Dict[str, int]  # tokens each worker generated
    steps: int  # batched forward passes
    prompt_tokens: int


class Session:
    """Low-level Hogwild! driver (``generate`` uses it): a prompt, N workers, one batched
    forward per :meth:`step`."""

    def __init__(self, model, tokenizer, problem: str, workers: int = 2, *, policy=None, temperature: float = 0.0,
                 seed: Optional[int] = None, check_every: int = 3, system: Optional[str] = None,
                 ignore_eos: bool = False, kv_dtype: Optional[str] = None):
        import kvloom

        if not 1 <= int(workers) <= len(NAMES):
            raise ValueError(f"workers must be between 1 and {len(NAMES)}, got {workers}")
        if policy is not None and not isinstance(policy, (kvloom.Full, kvloom.Window)):
            raise ValueError("hogwild caches support the Full and Window policies (applied per segment)")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if getattr(getattr(model, "config", None), "_attn_implementation", None) != "kvloom":
            kvloom.enable(model)
        self.model, self.tok = model, tokenizer
        self.device = model.device
        self.n = int(workers)
        self.temperature = temperature
        self.gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.check_every = int(check_every)
        self.cache = HogwildCache(model, self.n, policy=policy, kv_dtype=kv_dtype)  # kv_dtype: quantized segments
        self.workers = [Worker(NAMES[i]) for i in range(self.n)]
        names = ", ".join(NAMES[: self.n])
        if system is None:
            system = SYSTEM.format(n=self.n, names=names) if self.n > 1 else SOLO_SYSTEM
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": problem}]
        self.prompt = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True)["input_ids"].to(self.device)
        self._stop = _stop_ids(model, tokenizer)
        self.ignore_eos = ignore_eos
        self.forwards = 0
        self.logits: Dict[int, torch.Tensor] = {}
        self.finished_order: List[tuple] = []  # (worker, step index) in the order steps joined the common prefix
        self._prefill()

    def _ids(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False)

    @torch.no_grad()
    def _prefill(self) -> None:
        kv = self.cache.kv
        prompt_seq = kv.add_sequence()
        self.cache.common = [prompt_seq]
        self.cache.seqs = [prompt_seq]
        out = self.model(self.prompt, **cache_kwargs(self.cache), use_cache=True)
        self.forwards += 1
        first = out.logits[0, -1].float()
        for i, w in enumerate(self.workers):
            self.cache.current.append(kv.add_sequence())
            w.segments.append([])
            w.forced = self._ids(HEADER.format(name=w.name))
            self.logits[i] = first

    def _pick(self, logits: torch.Tensor) -> int:
        logits = logits.cpu()  # the next token is chosen on the host (it steers the prompt)
        if self.ignore_eos:
            logits = logits.clone()
            logits[list(self._stop)] = float("-inf")
        if self.temperature == 0:
            return int(torch.argmax(logits))
        return int(torch.multinomial(torch.softmax(logits / self.temperature, -1), 1, generator=self.gen))

    def _end_step(self, i: int) -> None:
        """Worker i's current segment joins the common prefix; it starts a new one."""
        w = self.workers[i]
        if not w.current:
            return
        self.cache.common.append(self.cache.current[i])
        self.finished_order.append((i, len(w.segments) - 1))
        self.cache.current[i] = self.cache.kv.add_sequence()
        w.segments.append([])
        w.steps += 1
        if not w.done and self.n > 1:
            w.forced = self._ids(HEADER.format(name=w.name))
            if self.check_every > 0 and w.steps % self.check_every == 0:
                w.forced += self._ids(CHECK)

    @torch.no_grad()
    def step(self, max_new_tokens: int) -> List[tuple]:
        """One batched forward: every active worker feeds one token (a forced one, or one
        sampled from its last logits). Returns [(worker, token, sampled)] fed."""
        rows, feed, fed = [], [], []
        for i, w in enumerate(self.workers):
            if w.done:
                continue
            if w.forced:
                t, sampled = w.forced.pop(0), False
            else:
                if w.generated >= max_new_tokens:
                    w.done = True
                    self._end_step(i)
                    continue
                t, sampled = self._pick(self.logits[i]), True
                w.generated += 1
                if t in self._stop:
                    w.done = True
                    self._end_step(i)
                    continue
            rows.append(i)
            feed.append(t)
            fed.append((i, t, sampled))
        if not rows:
            return []
        positions = torch.tensor([[len(self.workers[i].current)] for i in rows], dtype=torch.long, device=self.device)
        self.cache.set_rows(rows)
        out = self.model(torch.tensor(feed, dtype=torch.long, device=self.device).view(-1, 1), position_ids=positions,
                         **cache_kwargs(self.cache), use_cache=True)
        self.forwards += 1
        for b, (i, t, _) in enumerate(fed):
            self.workers[i].current.append(t)
            self.logits[i] = out.logits[b, -1].float()
        for i, t, sampled in fed:
            if sampled and _STEP_END.search(self.tok.decode(self.workers[i].current[-4:])):
                self._end_step(i)
        return fed

    @property
    def active(self) -> bool:
        return any(not w.done for w in self.workers)

    def view_tokens(self, i: int) -> List[int]:
        """The token ids of worker i's view, in view order (prompt first, own segment last)."""
        ids = self.prompt[0].tolist()
        seg_tokens = {self.cache.current[j]: self.workers[j].current for j in range(self.n)}
        for wi, si in self.finished_order:
            ids += self.workers[wi].segments[si]
        for j in range(self.n):
            if j != i:
                ids += seg_tokens[self.cache.current[j]]
        return ids + self.workers[i].current

    def result(self) -> HogwildResult:
        texts = {w.name: self.tok.decode([t for s in w.segments for t in s], skip_special_tokens=True)
                 for w in self.workers}
        parts = [self.workers[wi].segments[si] for wi, si in self.finished_order]
        parts += [w.current for w in self.workers if w.current]
        transcript = "".join(self.tok.decode(p, skip_special_tokens=True) for p in parts)
        return HogwildResult(texts, transcript, {w.name: w.generated for w in self.workers}, self.forwards,
                             int(self.prompt.shape[1]))

    def close(self) -> None:
        self.cache.close()


def generate(model, tokenizer, problem: str, workers: int = 2, max_new_tokens: int = 256, *, policy=None,
             temperature: float = 0.0, seed: Optional[int] = None, check_every: int = 3,
             on_step: Optional[Callable[[str, str], None]] = None,
             on_text: Optional[Callable[[str, str], None]] = None, progress: bool = False,
             ignore_eos: bool = False, kv_dtype: Optional[str] = None) -> HogwildResult:
    """Runs `workers` collaborating instances of `model` on `problem` over one shared cache.

    Each worker generates up to `max_new_tokens` tokens (greedy unless `temperature` > 0).
    ``on_text(name, new_text)`` streams each worker's text as it is written (called after
    every batched forward with what each worker added); ``on_step(name, text)`` is called
    whenever a worker finishes a step;
    ``progress`` shows a progress bar; ``ignore_eos`` keeps every worker going to
    `max_new_tokens` (benchmarks); ``kv_dtype`` ("int8", "int4", "int2") stores every segment
    quantized (README, *Quantized KV*). Returns each worker's text and the merged transcript.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    s = Session(model, tokenizer, problem, workers, policy=policy, temperature=temperature, seed=seed,
                check_every=check_every, ignore_eos=ignore_eos, kv_dtype=kv_dtype)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=workers * max_new_tokens, desc=f"hogwild x{workers}", unit="tok")
    emitted = [0] * workers  # characters of each worker's text already streamed

    def stream():
        for i, w in enumerate(s.workers):
            text = "".join(tokenizer.decode(seg, skip_special_tokens=True) for seg in w.segments)
            if not w.done:
                text = text.rstrip("\ufffd")  # a multi-byte character still being written
            if len(text) > emitted[i]:
                on_text(w.name, text[emitted[i]:])
                emitted[i] = len(text)

    try:
        seen = 0
        while s.active:
            fed = s.step(max_new_tokens)
            if bar is not None:
                bar.update(sum(1 for _, _, sampled in fed if sampled))
            if on_text is not None:
                stream()
            if on_step is not None:
                for wi, si in s.finished_order[seen:]:
                    on_step(s.workers[wi].name, tokenizer.decode(s.workers[wi].segments[si], skip_special_tokens=True))
            seen = len(s.finished_order)
        return s.result()
    finally:
        if bar is not None:
            bar.close()
        s.close()
