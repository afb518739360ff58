"""CIFLEX-style side paths: one small model serves a conversation and runs sub-tasks on it
without re-prefilling the conversation.

The main path (:class:`Conversation`) grows turn by turn in a :class:`kvloom.Cache`. A
side path forks that cache (blocks shared, copy-on-write), prefills only its instruction,
decodes the sub-task and, when its ``with`` block ends, drops the fork: the main path's
cache, positions and memory are exactly what they were. Side paths nest and several can be
open at once; each sees the conversation up to its fork point and nothing of the others.

:class:`Selector` picks a sub-task with a tree of yes/no questions, each answered by one
forward pass on a side path (the logits of the yes and no tokens compared).

    conv = kvloom.Conversation(model, tok)
    conv.user("What is a KV cache?")
    conv.assistant(max_new_tokens=64)
    conv.user("And how big is it for a 4k prompt?")
    choice = kvloom.ciflex.Selector(tok).select(conv)       # e.g. 'query rewrite'
    with conv.side_path(kvloom.ciflex.INSTRUCTIONS[choice.choice]) as side:
        query = side.generate(max_new_tokens=32)
    answer = conv.assistant()                                 # no side-path trace in it
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import torch

from ..hf.compat import cache_kwargs

__all__ = ["Conversation", "SidePath", "Question", "Selection", "Selector", "DEFAULT_TREE", "INSTRUCTIONS"]


def _render(tokenizer, messages: List[dict], generation_prompt: bool) -> List[int]:
    """Token ids of the chat-templated messages."""
    if not messages:
        return []
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                        return_dict=True)["input_ids"]
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(i) for i in ids]


def _stop_ids(model, tokenizer) -> set:
    ids = set()
    for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src is not None:
            ids.update(int(i) for i in src)
    # ChatML's end of turn, where the vocabulary has it (an unknown token maps to the unk id;
    # one lookup, not a copy of the vocabulary: side paths build this per sub-task)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end, int) and end != tokenizer.unk_token_id:
        ids.add(int(end))
    return ids


class _Path:
    """Shared machinery of the main path and side paths: a cache, the token ids it holds and
    the next-token logits after them."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.cache = None
        self.messages: List[dict] = []
        self._ids: List[int] = []
        self._logits: Optional[torch.Tensor] = None  # next-token logits after _ids (None: unknown)
        self.prefill_tokens = 0  # tokens this path has run through the model as prompt chunks
        self.generated: List[int] = []  # token ids of the last reply (its end-of-turn token included)
        self._stop = _stop_ids(model, tokenizer)

    # --- state ----------------------------------------------------------------------------
    @property
    def tokens(self) -> List[int]:
        """The token ids this path's cache holds (a copy)."""
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def memory_bytes(self) -> int:
        """Bytes of KV held by the whole C++ cache (main path and every open side path)."""
        return self.cache.memory_bytes()

    def _usable(self) -> None:
        pass

    # --- model calls ----------------------------------------------------------------------
    @torch.no_grad()
    def _forward(self, ids: List[int]) -> torch.Tensor:
        out = self.model(torch.tensor([ids], dtype=torch.long, device=self.model.device), **cache_kwargs(self.cache),
                         use_cache=True)
        return out.logits[0, -1].float().cpu()  # tokens are chosen on the host

    def _sync(self, target: List[int]) -> torch.Tensor:
        """Makes the cache hold exactly `target` and returns the next-token logits after it:
        keeps the longest cached prefix of `target`, rolls back the rest (a chat template
        that re-tokenises a reply differently), prefills what is missing."""
        if not target:
            raise ValueError("nothing to run: the conversation is empty")
        c = 0
        n = min(len(self._ids), len(target))
        while c < n and self._ids[c] == target[c]:
            c += 1
        if c == len(target) == len(self._ids) and self._logits is not None:
            return self._logits
        if c == len(target):
            c -= 1  # re-run the last token to get its logits
        if c < len(self._ids):
            self.cache.rollback(len(self._ids) - c)
            self._ids = self._ids[:c]
            self._logits = None
        new = target[c:]
        logits = self._forward(new)
        self._ids = list(target)
        self._logits = logits
        self.prefill_tokens += len(new)
        return logits

    @staticmethod
    def _check_decode_args(max_new_tokens: int, temperature: float) -> None:
        if int(max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")

    @torch.no_grad()
    def _decode(self, max_new_tokens: int, temperature: float, seed: Optional[int], stop: bool = True) -> List[int]:
        """Greedy (temperature 0) or sampled decoding from the current logits; stops at an
        end-of-turn token (returned, not fed) or after max_new_tokens."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        out: List[int] = []
        logits = self._logits
        for i in range(max_new_tokens):
            if temperature == 0:
                t = int(torch.argmax(logits))
            else:
                t = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
            out.append(t)
            if (stop and t in self._stop) or i == max_new_tokens - 1:
                break
            logits = self._forward([t])
            self._ids.append(t)
            self._logits = logits
        self.generated = out
        return out

    def _reply(self, max_new_tokens: int, temperature: float, seed: Optional[int]) -> str:
        self._check_decode_args(max_new_tokens, temperature)
        self._sync(_render(self.tokenizer, self.messages, False))  # the turns so far, then the prompt
        self._sync(_render(self.tokenizer, self.messages, True))
        toks = self._decode(max_new_tokens, temperature, seed)
        text = self.tokenizer.decode([t for t in toks if t not in self._stop], skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": text})
        return text

    # --- side paths -----------------------------------------------------------------------
    def side_path(self, instruction: str, *, role: str = "user") -> "SidePath":
        """A context manager: a fork of this path's cache with `instruction` appended as a
        `role` turn (prefilled on entry). See :class:`SidePath`."""
        self._usable()
        return SidePath(self, instruction, role=role)

    def subtask(self, instruction: str, max_new_tokens: int = 64, **kw) -> str:
        """Runs `instruction` on a side path and returns its answer; this path is unchanged."""
        with self.side_path(instruction) as side:
            return side.generate(max_new_tokens=max_new_tokens, **kw)


class Conversation(_Path):
    """The main path of a multi-turn conversation, its KV cache kept between turns.

    Args:
        model: a supported transformers causal LM (switched to kvloom's attention).
        tokenizer: its tokenizer, with a chat template.
        policy: the cache policy (``kvloom.Full()`` by default; Window/FastGen/... work, side
            paths fork the compressed cache).
        system: an optional system message.
        **cache_options: passed to :class:`kvloom.Cache` (dtype, kv_dtype, kv_budget, block_size, capacity_bytes).
    """

    def __init__(self, model, tokenizer, policy=None, *, system: Optional[str] = None, **cache_options):
        import kvloom

        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("kvloom.Conversation needs a tokenizer with a chat template")
        super().__init__(model, tokenizer)
        if getattr(getattr(model, "config", None), "_attn_implementation", None) != "kvloom":
            kvloom.enable(model)
        self.cache = kvloom.Cache(model, policy=policy, tokenizer=tokenizer, **cache_options)
        if system is not None:
            self.messages.append({"role": "system", "content": system})

    def user(self, text: str) -> "Conversation":
        """Adds a user turn (prefilled lazily: at the next reply or side path)."""
        return self.add_turn("user", text)

    def add_turn(self, role: str, text: str) -> "Conversation":
        """Adds a turn of any role without generating (e.g. a recorded assistant reply)."""
        if not isinstance(text, str):
            raise TypeError(f"a turn is text, got {type(text).__name__}")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"role must be 'system', 'user' or 'assistant', got {role!r}")
        self.messages.append({"role": role, "content": text})
        return self

    def assistant(self, max_new_tokens: int = 256, *, temperature: float = 0.0, seed: Optional[int] = None) -> str:
        """Decodes the assistant's reply to the turns so far (greedy by default) and adds it."""
        return self._reply(max_new_tokens, temperature, seed)

    def say(self, text: str, **kw) -> str:
        """``user(text)`` then ``assistant(**kw)``."""
        return self.user(text).assistant(**kw)

    def prefill(self) -> "Conversation":
        """Runs the turns added so far through the model (side paths and replies do it too)."""
        if self.messages:
            self._sync(_render(self.tokenizer, self.messages, False))
        return self

    def side_path(self, instruction: str, *, role: str = "user") -> "SidePath":
        if self.messages:
            self._sync(_render(self.tokenizer, self.messages, False))  # the fork point holds every turn
        return super().side_path(instruction, role=role)

    # --- snapshots ----------------------------------------------------------------------
    def save(self, path) -> int:
        """Writes the conversation (its turns, the tokens its cache holds, the cache itself and
        the next-token logits) to a snapshot file, atomically; returns its size. Side paths
        are not part of it. :meth:`load` continues exactly where this one stands."""
        from .. import snapshot

        meta, sections = self.cache._snapshot_parts()
        logits = None if self._logits is None else self._logits.float().contiguous()
        state = {"messages": self.messages, "ids": self._ids, "prefill_tokens": self.prefill_tokens,
                 "generated": self.generated, "logits": None if logits is None else int(logits.numel())}
        if logits is not None:
            sections["logits"] = logits.numpy().tobytes()
        return snapshot.write(path, "conversation", {"cache": meta, "conversation": state}, sections)

    @classmethod
    def load(cls, path, model, tokenizer, *, capacity_bytes: Optional[int] = None) -> "Conversation":
        """The conversation saved by :meth:`save`, on `model` (the same model: checked) and its
        tokenizer. Raises :class:`kvloom.SnapshotError` for a file that cannot be loaded."""
        import kvloom
        from ..snapshot import SnapshotError, need, read

        meta, sections = read(path, "conversation")
        where = f"snapshot {path}"
        state = need(meta, "conversation", dict, where)
        try:
            messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in state["messages"]]
            ids = [int(t) for t in state["ids"]]
            generated = [int(t) for t in state["generated"]]
            prefill = int(state["prefill_tokens"])
            n_logits = state["logits"]
        except (KeyError, TypeError, ValueError) as e:
            raise SnapshotError(f"{where}: unreadable conversation state ({e})") from None
        logits = None
        if n_logits is not None:
            raw = sections.get("logits")
            if not isinstance(n_logits, int) or raw is None or len(raw) != 4 * n_logits:
                raise SnapshotError(f"{where}: the logits section does not match its header")
            logits = torch.frombuffer(bytearray(raw), dtype=torch.float32)
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("kvloom.Conversation needs a tokenizer with a chat template")
        if getattr(getattr(model, "config", None), "_attn_implementation", None) != "kvloom":
            kvloom.enable(model)
        cache = kvloom.Cache._from_snapshot_parts(need(meta, "cache", dict, where), sections, model, where, tokenizer,
                                                  capacity_bytes)
        if cache.get_seq_length() != len(ids):
            cache.close()
            raise SnapshotError(f"{where}: the cache holds {cache.get_seq_length()} tokens, the conversation {len(ids)}")
        conv = cls.__new__(cls)
        _Path.__init__(conv, model, tokenizer)
        conv.cache, conv.messages, conv._ids, conv._logits = cache, messages, ids, logits
        conv.prefill_tokens, conv.generated = prefill, generated
        return conv


class SidePath(_Path):
    """A sub-task on a fork of a path's cache; use it as a context manager::

        with conv.side_path("Summarise the conversation in one sentence.") as side:
            summary = side.generate(max_new_tokens=48)

    On entry the parent's cache is forked (no KV copied) and only the instruction is
    prefilled; on exit the fork is dropped. The parent is never modified by what happens
    here. Nest with ``side.side_path(...)``.
    """

    def __init__(self, parent: _Path, instruction: str, *, role: str = "user"):
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError("a side path needs a non-empty instruction")
        super().__init__(parent.model, parent.tokenizer)
        self._parent = parent
        self.instruction = instruction
        self.role = role
        self._state = "new"
        self.fork_point = 0

    def __enter__(self) -> "SidePath":
        if self._state != "new":
            raise RuntimeError("a side path can be entered once; open a new one with side_path(...)")
        self._parent._usable()
        self.cache = self._parent.cache.fork()
        try:
            self._ids = list(self._parent._ids)
            self._logits = self._parent._logits
            self.fork_point = len(self._ids)
            self.messages = [dict(m) for m in self._parent.messages] + [{"role": self.role, "content": self.instruction}]
            self._sync(_render(self.tokenizer, self.messages, True))
        except BaseException:
            self.cache.close()
            self._state = "closed"
            raise
        self._state = "open"
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Drops the fork (also what leaving the ``with`` block does)."""
        if self._state == "open":
            self.cache.close()
        self._state = "closed"

    def _usable(self) -> None:
        if self._state == "new":
            raise RuntimeError("enter the side path first: `with conv.side_path(...) as side:`")
        if self._state == "closed":
            raise RuntimeError("this side path was closed (its `with` block ended); open a new one")

    def generate(self, max_new_tokens: int = 64, *, temperature: float = 0.0, seed: Optional[int] = None,
                 stop_at_eos: bool = True) -> str:
        """Decodes the sub-task's answer (greedy by default) and returns its text;
        ``stop_at_eos=False`` always decodes max_new_tokens (benchmarks)."""
        self._usable()
        self._check_decode_args(max_new_tokens, temperature)
        if self.messages[-1]["role"] == "assistant":  # a second generate continues as a new reply
            raise RuntimeError("this side path already answered; nest a new side path for another sub-task")
        self._sync(_render(self.tokenizer, self.messages, True))
        toks = self._decode(max_new_tokens, temperature, seed, stop=stop_at_eos)
        text = self.tokenizer.decode([t for t in toks if t not in self._stop], skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": text})
        return text

    def next_token_logits(self) -> torch.Tensor:
        """fp32 logits of the token that would come next (after the instruction)."""
        self._usable()
        if self._logits is None:
            self._sync(list(self._ids))
        return self._logits.clone()

    def rollback(self, n_tokens: int) -> None:
        """Forgets this side path's last `n_tokens` tokens (never past the fork point)."""
        self._usable()
        n_tokens = int(n_tokens)
        own = len(self._ids) - self.fork_point
        if not 0 <= n_tokens <= own:
            raise ValueError(f"cannot roll back {n_tokens} tokens: this side path added {own} since its fork point")
        if n_tokens:
            self.cache.rollback(n_tokens)
            self._ids = self._ids[:-n_tokens]
            self._logits = None


# --- sub-task selection ----------------------------------------------------------------------
@dataclass(frozen=True)
class Question:
    """A node of a selector tree: a yes/no question and what each answer leads to (another
    Question or a leaf: the sub-task's name)."""

    text: str
    yes: Union["Question", str]
    no: Union["Question", str]


@dataclass
class Selection:
    choice: str
    path: List[Tuple[str, float]] = field(default_factory=list)  # (question, P(yes)) per node asked

    @property
    def probabilities(self) -> Dict[str, float]:
        return dict(self.path)


DEFAULT_TREE = Question(
    "Is the user's last message written in a language other than English, or does it ask for a translation?",
    yes="translate",
    no=Question(
        "Does the user's last message ask for a summary of the conversation or of a text?",
        yes="summarise",
        no=Question(
            "Does the user's last message depend on earlier turns to be understood, for example by saying "
            "'it', 'that' or 'them' instead of naming the subject?",
            yes="query rewrite",
            no="none",
        ),
    ),
)

INSTRUCTIONS = {
    "query rewrite": "Rewrite my last message as one standalone question that names its subject, so it can be "
                     "understood without the conversation. Reply with the question only.",
    "summarise": "Summarise our conversation so far in at most two sentences.",
    "translate": "Translate my last message into English. Reply with the translation only.",
}


def _leaves(node, seen=None) -> List[str]:
    seen = set() if seen is None else seen
    if isinstance(node, str):
        return [node]
    if not isinstance(node, Question):
        raise TypeError(f"a selector tree holds Question nodes and str leaves, got {type(node).__name__}")
    if id(node) in seen:
        raise ValueError("the selector tree has a cycle")
    if not node.text.strip():
        raise ValueError("a selector question is empty")
    seen = seen | {id(node)}
    return _leaves(node.yes, seen) + _leaves(node.no, seen)


class Selector:
    """Chooses a sub-task by walking a tree of yes/no questions (a multi-choice decision
    split into binary ones). Each question is asked on a side path of the conversation and
    answered by one forward pass: P(yes) = softmax over the logits of the `yes` and `no`
    tokens; the walk follows yes when P(yes) >= 0.5.

    Args:
        tokenizer: the model's tokenizer (the answer words must be single tokens in it).
        tree: the root :class:`Question` (default :data:`DEFAULT_TREE`: translate /
            summarise / query rewrite / none).
        yes, no: the answer words (default "Yes" / "No").
        suffix: appended to every question.
    """

    def __init__(self, tokenizer, tree: Question = DEFAULT_TREE, *, yes: str = "Yes", no: str = "No",
                 suffix: str = " Answer with Yes or No only."):
        self.leaves = _leaves(tree)
        self.tree = tree
        self.suffix = suffix
        self.yes_id = self._single(tokenizer, yes)
        self.no_id = self._single(tokenizer, no)
        if self.yes_id == self.no_id:
            raise ValueError(f"the answers {yes!r} and {no!r} are the same token")

    @staticmethod
    def _single(tokenizer, word: str) -> int:
        ids = tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"the answer {word!r} is {len(ids)} tokens in this vocabulary ({ids}); a selector "
                             "compares the logits of single tokens: pick answer words that are one token each")
        return int(ids[0])

    def p_yes(self, path: _Path, question: str) -> float:
        """P(yes) for one question, asked on a side path of `path`."""
        with path.side_path(question + self.suffix) as side:
            logits = side.next_token_logits()
        pair = torch.stack([logits[self.yes_id], logits[self.no_id]])
        return float(torch.softmax(pair, 0)[0])

    def select(self, path: _Path) -> Selection:
        """Walks the tree on `path` (a Conversation or an open SidePath); the path is unchanged."""
        node, sel = self.tree, Selection(choice="")
        while isinstance(node, Question):
            p = self.p_yes(path, node.text)
            sel.path.append((node.text, p))
            node = node.yes if p >= 0.5 else node.no
        sel.choice = node
        return sel
