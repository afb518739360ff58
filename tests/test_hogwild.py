"""Hogwild!: segment views (query rotated per segment) against explicitly re-rotated keys;
one worker equals plain greedy generation; workers see each other's tokens at once;
concurrent appends into separate segments."""
import threading

import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import DynamicCache

import kvloom
from kvloom.hf import cache_kwargs
from kvloom import hogwild
from kvloom import reference as ref
from hf_helpers import smollm2

pytestmark = pytest.mark.hf  # drives transformers: also run against the oldest supported release


def _inv_freq(D, theta=10000.0):
    return 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)


def _at(k0, start, inv):
    """Keys [H, n, D] rotated at positions start, start + 1, ..."""
    return ref.rotate(k0, (torch.arange(k0.shape[1]) + start)[None], inv) if k0.shape[1] else k0.double()


@settings(max_examples=25, deadline=None)
@given(
    heads=st.sampled_from([(4, 2), (9, 3), (2, 2), (8, 1)]),
    D=st.sampled_from([16, 64]),
    lens=st.lists(st.integers(0, 40), min_size=2, max_size=6),
    workers=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_segment_view_equals_rerotated_concatenation(heads, D, lens, workers, seed):
    """Keys stored at segment-local positions; each worker's view (common segments, others,
    own) equals attention over the keys rotated at their view positions."""
    Hq, Hkv = heads
    g = torch.Generator().manual_seed(seed)
    inv = _inv_freq(D)
    n_common = max(1, len(lens) - workers)
    lens = (lens + [3] * workers)[: n_common + workers]
    lens[n_common + workers - 1] = max(1, lens[-1])
    cache = kvloom.KVCache(1, Hkv, D, block_size=4)
    raw = []
    for n in lens:
        s = cache.add_sequence()
        k0, v = torch.randn(Hkv, n, D, generator=g), torch.randn(Hkv, n, D, generator=g)
        cache.append(0, s, _at(k0, 0, inv).float(), v)  # local positions 0..n-1
        raw.append((s, k0, v))
    common, current = raw[:n_common], raw[n_common:]
    for w in range(len(current)):
        order = common + [c for j, c in enumerate(current) if j != w] + [current[w]]
        offsets, o = [], 0
        for s, k0, _ in order:
            offsets.append(o)
            o += k0.shape[1]
        view = [(s, offsets[-1] - off) for (s, _, _), off in zip(order, offsets)]
        q0 = torch.randn(1, Hq, D, generator=g)
        own_pos = o - 1  # the query is the own segment's newest token
        q_local = ref.rotate(q0, torch.tensor(order[-1][1].shape[1] - 1), inv).float()
        got = cache.attend(0, q_local, [view], inv_freq=inv)
        keys = torch.cat([_at(k0, off, inv) for (_, k0, _), off in zip(order, offsets)], 1)
        vals = torch.cat([v for _, _, v in order], 1)
        want = ref.decode_attention(ref.rotate(q0, torch.tensor(own_pos), inv), keys[None], vals[None].double())
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_one_worker_equals_greedy_generation():
    model, tok = smollm2()
    problem = "Compute 17*23 and 19*21, then add the two results."
    res = hogwild.generate(model, tok, problem, workers=1, max_new_tokens=48)
    s = hogwild.Session(model, tok, problem, 1)
    ids = torch.cat([s.prompt, torch.tensor([tok.encode(hogwild.HEADER.format(name="Alice"), add_special_tokens=False)])], 1)
    s.close()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False,
                         **cache_kwargs(DynamicCache()), pad_token_id=tok.eos_token_id)
    assert res.workers["Alice"] == tok.decode(out[0, s.prompt.shape[1]:], skip_special_tokens=True)
    assert res.tokens["Alice"] == min(48, out.shape[1] - ids.shape[1])


@pytest.mark.slow
def test_workers_see_each_other():
    """Bob copies a code that Alice writes during the same steps: her tokens reach his view
    at once (and the views' segment lengths add up to the tokens each worker sees)."""
    model, tok = smollm2()
    s = hogwild.Session(model, tok, "Alice writes a secret code. Bob repeats Alice's code.", 2, check_every=0)
    alice, bob = s.workers
    alice.forced += tok.encode(" The secret code is 4821.", add_special_tokens=False)
    bob.forced += tok.encode(" I will read what Alice is writing right now. The secret code that Alice wrote is",
                             add_special_tokens=False)
    while len(bob.current) < 26 and s.active:
        s.step(max_new_tokens=40)
        for i in range(2):
            assert sum(s.cache.segment_length(seq) for seq, _ in s.cache.view(i)) == len(s.view_tokens(i))
    bob_text = tok.decode(bob.current)
    assert "4821" in bob_text.split("Alice wrote is")[1], bob_text
    s.close()
    # control: the same forced text with Alice silent (her code never written) gives no 4821
    s = hogwild.Session(model, tok, "Alice writes a secret code. Bob repeats Alice's code.", 2, check_every=0)
    s.workers[0].forced += tok.encode(" I am thinking.", add_special_tokens=False)
    s.workers[1].forced += tok.encode(" I will read what Alice is writing right now. The secret code that Alice "
                                      "wrote is", add_special_tokens=False)
    while len(s.workers[1].current) < 26 and s.active:
        s.step(max_new_tokens=40)
    assert "4821" not in tok.decode(s.workers[1].current)
    s.close()


def test_steps_join_the_common_prefix_and_transcript():
    model, tok = smollm2()
    steps = []
    res = hogwild.generate(model, tok, "List three fruits and three vegetables.", workers=2, max_new_tokens=40,
                           on_step=lambda name, text: steps.append((name, text)), ignore_eos=True)
    assert res.tokens == {"Alice": 40, "Bob": 40}
    assert set(res.workers) == {"Alice", "Bob"}
    assert steps and all(text.startswith("\n" + name + ":") for name, text in steps)
    for name, text in steps:
        assert text in res.transcript and text in res.workers[name]
    assert res.steps <= 2 + 40 + 2 * 30  # one batched forward per token of the slowest worker (+ headers)


def test_workers_over_quantized_segments():
    """kv_dtype: the prompt and every worker's steps are stored quantized (sealed blocks in the
    segments the views read), in fewer bytes, and the workers still write their steps."""
    model, tok = smollm2()
    held = {}
    for kd in (None, "int4"):
        s = hogwild.Session(model, tok, "List three fruits and three vegetables.", 2, check_every=0, ignore_eos=True,
                            kv_dtype=kd)
        while s.active and s.workers[0].generated < 40:
            s.step(max_new_tokens=40)
        held[kd] = s.cache.memory_bytes()
        if kd:
            assert s.cache.kv.kv_dtype == "int4"
            sealed = sum(any(s.cache.kv.sealed_blocks(0, 0, seq)) for seq in s.cache.common + s.cache.current)
            assert sealed >= 1
        assert all(w.generated == 40 for w in s.workers)
        s.close()
    assert held["int4"] < held[None]  # (every step is a segment whose open block stays fp32)


def test_hogwild_bad_input():
    model, tok = smollm2()
    with pytest.raises(ValueError, match="workers"):
        hogwild.generate(model, tok, "x", workers=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        hogwild.generate(model, tok, "x", workers=2, max_new_tokens=0)
    with pytest.raises(ValueError, match="Full and Window"):
        hogwild.generate(model, tok, "x", workers=2, policy=kvloom.HeavyHitter(0.1, 8))


def test_concurrent_appends_into_separate_segments_keep_every_token():
    """T Python threads (the GIL is released in append) x M appends into their own segments,
    forks of one shared prefix (copy-on-write under contention); then checksums."""
    H, D, T, M = 2, 16, 4, 60
    cache = kvloom.KVCache(2, H, D, block_size=4)
    root = cache.add_sequence()
    for layer in range(2):
        cache.append(layer, root, torch.zeros(H, 5, D), torch.zeros(H, 5, D))
    segs = [cache.fork(root) for _ in range(T)]
    start = threading.Barrier(T)
    errors = []

    def worker(t):
        try:
            start.wait()
            for m in range(M):
                n = 1 + (m % 3)
                val = torch.full((H, n, D), float(t * 1000 + m))
                for layer in range(2):
                    cache.append(layer, segs[t], val, -val)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(T)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for t in range(T):
        want = torch.cat([torch.zeros(5)] + [torch.full((1 + m % 3,), float(t * 1000 + m)) for m in range(M)])
        for layer in range(2):
            for h in range(H):
                k, v, _, _ = cache.gather(layer, h, segs[t])
                assert torch.equal(k[:, 0], want) and torch.equal(k.sum(1), want * D) and torch.equal(v, -k)
    for s in cache.sequences():
        cache.drop(s)
    assert cache.pool.used_blocks == 0
