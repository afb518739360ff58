"""NAtS token types: the mask against the reference, C++ eviction against the reference
step by step, an all-global scorer equals Full, the prompt attends with the NAtS mask,
training moves only the scorers."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kvloom
from kvloom.hf import cache_kwargs
from kvloom import _core, nats
from kvloom import reference as ref
from hf_helpers import smollm2

pytestmark = pytest.mark.hf  # drives transformers: also run against the oldest supported release

types_st = st.lists(st.integers(0, 2), min_size=1, max_size=40)


@settings(max_examples=80, deadline=None)
@given(types=types_st, window=st.integers(1, 12))
def test_mask_matches_reference(types, window):
    oh = torch.nn.functional.one_hot(torch.tensor(types), 3).double()
    got = nats.soft_visibility(oh, window)
    want = ref.nats_visible(types, window)
    assert torch.equal(got > 0.5, want)
    assert torch.all((got == 0) | (got == 1))
    # the keep set after a prefix is what the next query may see
    for a in range(1, len(types)):
        vis_next = ref.nats_visible(types[:a] + [1], window)[a, :a]
        assert ref.nats_keep(types, a, window) == vis_next.nonzero().flatten().tolist()


@settings(max_examples=40, deadline=None)
@given(types=st.lists(st.lists(st.integers(0, 2), min_size=30, max_size=30), min_size=2, max_size=2),
       window=st.integers(1, 10), chunks=st.lists(st.integers(1, 6), min_size=1, max_size=12))
def test_cpp_eviction_equals_reference_step_by_step(types, window, chunks):
    H, D = 2, 8
    cache = kvloom.KVCache(1, H, D, block_size=4, policy=kvloom.NAtS(nats.Scorer(1, 8, H), window=window))
    s = cache.add_sequence()
    at = 0
    for n in chunks:
        n = min(n, 30 - at)
        if n == 0:
            break
        cls = torch.tensor([t[at:at + n] for t in types], dtype=torch.uint8)
        cache.append(0, s, torch.randn(H, n, D), torch.randn(H, n, D), classes=cls)
        at += n
        cache.apply_policy(0, s)
        for h in range(H):
            _, ords, _ = cache.slots(0, h, s)
            assert sorted(ords.tolist()) == ref.nats_keep(types[h], at, window)
    blocks = cache.blocks_held()
    assert blocks <= sum(-(-len(ref.nats_keep(types[h], at, window)) // 4) + 1 for h in range(H))


def _constant_scorer(kind, window=8):
    """A scorer that types every token `kind` (0 global, 2 sliding) whatever the input."""
    return nats.Scorer.constant(30, 576, 3, kind, window=window)


def test_all_global_scorer_equals_full():
    model, tok = smollm2()
    enc = tok.apply_chat_template([{"role": "user", "content": "Name three rivers in Europe."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    kvloom.enable(model)
    cache = kvloom.Cache(model, policy=kvloom.NAtS(_constant_scorer(nats.GLOBAL)))
    with torch.no_grad():
        got = model.generate(**enc, **cache_kwargs(cache), max_new_tokens=24, do_sample=False)
        model.set_attn_implementation("sdpa")
        want = model.generate(**enc, **cache_kwargs(DynamicCache()), max_new_tokens=24, do_sample=False)
    assert torch.equal(got, want)
    assert all(n == got.shape[1] - 1 for row in cache.kv.lengths(cache.seqs[0]) for n in row)


def test_prompt_attends_with_the_nats_mask_and_memory_is_freed():
    model, tok = smollm2()
    W = 8
    sc = _constant_scorer(nats.SLIDING, W)
    ids = tok("The quick brown fox jumps over the lazy dog. " * 6, return_tensors="pt")["input_ids"]
    kvloom.enable(model)
    cache = kvloom.Cache(model, policy=kvloom.NAtS(sc))
    with torch.no_grad():
        logits = model(ids, **cache_kwargs(cache), use_cache=True).logits
        hidden, frac = nats.masked_forward(model, sc, ids, hard=True)
        want = model.lm_head(hidden)
    torch.testing.assert_close(logits, want, atol=2e-4, rtol=2e-4)
    # after the prompt: the first token (global) and the window's W - 1 newest per head
    for row in cache.kv.lengths(cache.seqs[0]):
        assert row == [1 + (W - 1)] * 3
    full = kvloom.Cache(model)
    with torch.no_grad():
        model(ids, **cache_kwargs(full), use_cache=True)
    assert cache.memory_bytes() * 4 <= full.memory_bytes()  # 8 tokens in one block per head vs 61 in four
    # decoding keeps the rule: still 1 + W - 1 tokens per head
    with torch.no_grad():
        model(ids[:, -1:], **cache_kwargs(cache), use_cache=True)
    assert cache.kv.lengths(cache.seqs[0])[0] == [W] * 3


def test_training_moves_only_the_scorers():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    class Tok:
        eos_token_id = 1

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 64 for c in text]}

    sc0 = nats.Scorer(2, 32, 2, window=4)
    w0 = [p.clone() for p in sc0.parameters()]
    sc, hist = nats.train(model, Tok(), ["some text to train on, " * 30], steps=3, window=4, lam=0.5, lr=0.05,
                          seq_len=32, progress=False, scorer=sc0)
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert any(not torch.equal(a, b) for a, b in zip(w0, sc.parameters()))
    assert len(hist) == 3 and all(0 <= h["global_fraction"] <= 1 for h in hist)


def test_nats_bad_input(tmp_path):
    model, tok = smollm2()
    with pytest.raises(ValueError, match="window"):
        nats.Scorer(30, 576, 3, window=0)
    with pytest.raises(ValueError, match="made for"):
        kvloom.Cache(kvloom.enable(model), policy=kvloom.NAtS(nats.Scorer(4, 576, 3)))
    with pytest.raises(FileNotFoundError, match="nats train"):
        kvloom.NAtS(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="window"):
        _core.make_plan("nats", {"window": 0})
    sc = nats.Scorer(30, 576, 3, window=5)
    sc.save(tmp_path / "s.pt", note="x")
    back = nats.Scorer.load(tmp_path / "s.pt")
    assert back.window == 5 and back.meta["note"] == "x"
