"""CIFLEX side paths: forks of the conversation's cache give the same answers as a full
re-prefill, leave the main path exactly as it was, nest, and work on compressed caches;
the selector; random trees of side paths against fresh forwards."""
import pytest
import torch
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, initialize
from transformers import DynamicCache

import kvloom
from kvloom.hf import cache_kwargs
from kvloom import ciflex
from hf_helpers import smollm2

pytestmark = pytest.mark.hf  # drives transformers: also run against the oldest supported release

TURNS = [
    "I am planning a trip to Lisbon in May. What should I pack?",
    "And what about the food there, anything I must try?",
    "How long does it take to get there from Berlin by train?",
]


def _reference_reply(model, tok, messages, max_new_tokens):
    """Greedy answer after a full re-prefill of the templated messages (DynamicCache + sdpa)."""
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(DynamicCache()), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tok.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


def _grow(conv, turns, new_tokens=24):
    replies = []
    for t in turns:
        conv.user(t)
        replies.append(conv.assistant(max_new_tokens=new_tokens))
    return replies


@pytest.mark.slow
def test_side_path_equals_full_reprefill():
    model, tok = smollm2()
    conv = kvloom.Conversation(model, tok)
    _grow(conv, TURNS[:2])
    conv.user(TURNS[2]).prefill()
    for instruction in [ciflex.INSTRUCTIONS["summarise"], ciflex.INSTRUCTIONS["query rewrite"]]:
        before = conv.prefill_tokens
        with conv.side_path(instruction) as side:
            side.generate(max_new_tokens=32)
            got = side.generated
            prefilled = side.prefill_tokens
        want = _reference_reply(model, tok, conv.messages + [{"role": "user", "content": instruction}], 32)
        assert got == want[:len(got)] and (len(got) == len(want) or got[-1] in side._stop)
        # only the instruction turn (and the generation prompt) was prefilled on the side path
        full = ciflex._render(tok, conv.messages + [{"role": "user", "content": instruction}], True)
        assert prefilled == len(full) - len(conv.tokens) <= len(tok(instruction)["input_ids"]) + 10
        assert conv.prefill_tokens == before


@pytest.mark.slow
@pytest.mark.parametrize("policy, kv_dtype", [(None, None), (kvloom.Window(4, 96), None), (kvloom.FastGen(0.95), None),
                                              (kvloom.Window(4, 96), "int4")], ids=["full", "window", "fastgen", "window-int4"])
def test_main_path_unchanged_by_side_paths(policy, kv_dtype):
    model, tok = smollm2()
    plain = kvloom.Conversation(model, tok, policy=policy, kv_dtype=kv_dtype)
    want = _grow(plain, TURNS, new_tokens=20)
    conv = kvloom.Conversation(model, tok, policy=policy, kv_dtype=kv_dtype)
    got = []
    for i, turn in enumerate(TURNS):
        conv.user(turn).prefill()
        sealed = conv.cache.kv.sealed_pool
        state = (conv.tokens, conv.memory_bytes(), conv.cache.get_seq_length(), conv.cache.kv.pool.used_blocks,
                 sealed and sealed.used_blocks)
        with conv.side_path(ciflex.INSTRUCTIONS["query rewrite"]) as a:
            a.generate(max_new_tokens=6)
            with conv.side_path(ciflex.INSTRUCTIONS["summarise"]) as b:  # two open at once
                b.generate(max_new_tokens=6)
                with a.side_path("Say it again in French.") as c:  # nested
                    c.generate(max_new_tokens=4)
                    c.rollback(2)
                assert conv.memory_bytes() > state[1]  # side tokens cost memory while open
        assert (conv.tokens, conv.memory_bytes(), conv.cache.get_seq_length(), conv.cache.kv.pool.used_blocks,
                sealed and sealed.used_blocks) == state
        if i == 1:
            assert ciflex.Selector(tok).select(conv).choice in ("translate", "summarise", "query rewrite", "none")
            assert (conv.tokens, conv.memory_bytes()) == state[:2]
        got.append(conv.assistant(max_new_tokens=20))
    assert got == want
    assert conv.tokens == plain.tokens and conv.memory_bytes() == plain.memory_bytes()


def test_side_path_sees_only_its_fork_point():
    model, tok = smollm2()
    conv = kvloom.Conversation(model, tok)
    conv.user("My name is Ada.").prefill()
    with conv.side_path("Repeat my name.") as a:
        fork_tokens = conv.tokens
        assert a.tokens[:len(fork_tokens)] == fork_tokens
        conv.say("I live in Porto.", max_new_tokens=8)  # the main path moves on while `a` is open
        with conv.side_path("Where do I live?") as b:
            assert "Repeat my name." not in tok.decode(b.tokens)
        assert a.tokens[:len(fork_tokens)] == fork_tokens and "Porto" not in tok.decode(a.tokens)
        a.generate(max_new_tokens=8, stop_at_eos=False)
        assert len(a.generated) == 8


def test_side_path_bad_use_leaves_main_path_untouched():
    model, tok = smollm2()
    conv = kvloom.Conversation(model, tok)
    conv.user("Hello there.").prefill()
    state = (conv.tokens, conv.memory_bytes())
    side = conv.side_path("Summarise.")
    with pytest.raises(RuntimeError, match="enter the side path"):
        side.generate()
    with side:
        with pytest.raises(ValueError, match="fork point"):
            side.rollback(len(side) + 1)
        side.rollback(1)  # within its own tokens: fine
    with pytest.raises(RuntimeError, match="closed"):
        side.generate()
    with pytest.raises(RuntimeError, match="closed"):
        side.side_path("x")
    with pytest.raises(RuntimeError, match="once"):
        side.__enter__()
    with pytest.raises(ValueError, match="non-empty"):
        conv.side_path("  ")
    with pytest.raises(ValueError, match="max_new_tokens"):
        conv.assistant(max_new_tokens=0)
    with pytest.raises(ValueError, match="2 tokens|tokens in this vocabulary"):
        ciflex.Selector(tok, yes="Absolutely yes")
    with pytest.raises(TypeError, match="Question"):
        ciflex.Selector(tok, ciflex.Question("q?", yes=3, no="b"))
    assert (conv.tokens, conv.memory_bytes()) == state


def test_selector_walks_the_tree_by_yes_no_logits():
    model, tok = smollm2()
    conv = kvloom.Conversation(model, tok)
    conv.user("Bonjour, pouvez-vous m'aider à réserver une table pour ce soir ?").prefill()
    sel = ciflex.Selector(tok)
    tree = ciflex.Question("Q1?", yes=ciflex.Question("Q2?", yes="a", no="b"), no="c")
    custom = ciflex.Selector(tok, tree)
    res = custom.select(conv)
    p1 = custom.p_yes(conv, "Q1?")
    assert res.path[0] == ("Q1?", pytest.approx(p1, abs=1e-6))
    if p1 >= 0.5:
        p2 = custom.p_yes(conv, "Q2?")
        assert res.choice == ("a" if p2 >= 0.5 else "b") and len(res.path) == 2
    else:
        assert res.choice == "c" and len(res.path) == 1
    # the probability is the two-way softmax of the yes/no logits after the question
    with conv.side_path("Q1?" + custom.suffix) as side:
        lg = side.next_token_logits()
    assert p1 == pytest.approx(torch.softmax(torch.stack([lg[custom.yes_id], lg[custom.no_id]]), 0)[0].item(), abs=1e-6)
    assert sel.select(conv).choice in sel.leaves


# --- random trees of side paths on a tiny random model -----------------------------------------
class SidePathTrees(RuleBasedStateMachine):
    """Open / generate / rollback / close side paths at random (nested, several open); every
    open path's next-token logits equal a fresh forward over its tokens, and closing every
    side path gives the main path's memory back."""

    @initialize()
    def setup(self):
        from transformers import LlamaConfig, LlamaForCausalLM

        _, tok = smollm2()
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
        self.model = LlamaForCausalLM(cfg).eval()
        self.tok = tok
        self.conv = kvloom.Conversation(self.model, tok, block_size=4)
        self.conv.user("Tell me about caches.").prefill()
        self.main_bytes = self.conv.memory_bytes()
        self.paths = [self.conv]
        self.open = []

    @rule(data=st.data(), words=st.integers(1, 6))
    def open_side(self, data, words):
        parent = data.draw(st.sampled_from(self.paths))
        side = parent.side_path(" ".join(["alpha", "beta", "gamma", "delta", "eps", "zeta"][:words]))
        side.__enter__()
        self.paths.append(side)
        self.open.append(side)

    @precondition(lambda self: self.open)
    @rule(data=st.data(), n=st.integers(1, 5))
    def generate(self, data, n):
        side = data.draw(st.sampled_from(self.open))
        if side.messages[-1]["role"] != "assistant":
            side.generate(max_new_tokens=n, temperature=1.0, seed=n)

    @precondition(lambda self: self.open)
    @rule(data=st.data(), n=st.integers(0, 4))
    def rollback(self, data, n):
        side = data.draw(st.sampled_from(self.open))
        side.rollback(min(n, len(side) - side.fork_point))

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def close(self, data):
        side = data.draw(st.sampled_from(self.open))
        side.__exit__(None, None, None)
        self.open.remove(side)
        self.paths.remove(side)

    @invariant()
    def logits_match_fresh_forward(self):
        if not hasattr(self, "paths"):
            return
        for p in self.paths:
            if p is self.conv:
                continue
            ids = torch.tensor([p.tokens])
            with torch.no_grad():
                want = self.model(ids, **cache_kwargs(DynamicCache()), use_cache=True).logits[0, -1]
            torch.testing.assert_close(p.next_token_logits(), want, atol=1e-4, rtol=1e-4)
            assert p.cache.get_seq_length() == len(p)

    def teardown(self):
        if hasattr(self, "open"):
            for side in self.open:
                side.close()
            assert self.conv.memory_bytes() == self.main_bytes


TestSidePathTrees = SidePathTrees.TestCase
TestSidePathTrees.settings = settings(max_examples=12, stateful_step_count=10, deadline=None)
