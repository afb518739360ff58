"""The shared policy suite: properties every registered policy must have, checked the same way
for all of them (tests/test_policies.py runs it over the registry; the README's toy policy
runs through it in tests/test_readme.py).

On the C++ cache (kvloom.KVCache, on the CPU or, in tests/test_cuda.py, on a GPU), for random
appends with random class bytes:
- bytes held == bytes of the kept slots (after a policy run, each unshared head holds
  ceil(live / block_size) blocks, and memory_bytes() is exactly those blocks);
- a fork holds the same tokens at no extra memory; writing to the fork leaves the parent
  unchanged; dropping the fork gives every byte back; rollback forgets exactly the newest
  tokens;
- a failed append (pool full) changes nothing.
On a tiny random-init Llama through kvloom.Cache: the policy's example runs generate() and holds
no more than Full; fork/close give memory back; the policy's keep-everything setting (where it
has one) produces Full's tokens exactly.
"""
import math
import random

import torch

import kvloom


def _contents(cache, seq):
    out = []
    for layer in range(cache.n_layers):
        for h in range(cache.n_kv_heads):
            k, v, ords, pos = cache.gather(layer, h, seq)
            out.append((k.cpu().clone(), v.cpu().clone(), ords.tolist(), pos.tolist()))
    return out


def _same(a, b):
    return all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2] and x[3] == y[3]
               for x, y in zip(a, b)) and len(a) == len(b)


def _step(cache, policy, seq, rng, n, gen):
    """Appends n tokens to every layer of seq (random K/V and class bytes) and runs the policy
    as the transformers path does (statistics first where the policy needs them)."""
    H, D, dev = cache.n_kv_heads, cache.head_dim, cache.device
    for layer in range(cache.n_layers):
        k, v = torch.randn(H, n, D, generator=gen).to(dev), torch.randn(H, n, D, generator=gen).to(dev)
        classes = torch.tensor([rng.choice([0, 0, 0, 1, 2]) for _ in range(n)], dtype=torch.uint8)
        cache.append(layer, seq, k, v, classes=classes)
        if policy.needs_scores:
            cache.accumulate_attention(layer, torch.randn(1, 2 * H, n, D, generator=gen).to(dev), [seq])
        cache.apply_policy(layer, seq)


def check_kvcache(policy, seed: int, device: str = "cpu") -> None:
    """The C++-cache properties of one policy instance, on one random scenario, with the
    cache's blocks on `device`."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    bs = rng.choice([2, 4, 8])
    cache = kvloom.KVCache(2, 2, 8, block_size=bs, policy=policy, device=device)
    s = cache.add_sequence()
    for _ in range(rng.randint(2, 6)):
        _step(cache, policy, s, rng, rng.randint(1, 12), gen)
    # bytes held == bytes of the kept slots
    held = sum(math.ceil(n / bs) for row in cache.lengths(s) for n in row)
    assert cache.blocks_held() == held, (cache.lengths(s), cache.blocks_held())
    assert cache.memory_bytes() == held * cache.pool.block_bytes
    assert all(n <= cache.seq_length(s) for row in cache.lengths(s) for n in row)
    # fork: same tokens, no extra memory; the fork's writes leave the parent alone
    before, mem = _contents(cache, s), cache.memory_bytes()
    f = cache.fork(s)
    assert _same(_contents(cache, f), before) and cache.memory_bytes() == mem
    _step(cache, policy, f, rng, rng.randint(1, 6), gen)
    assert _same(_contents(cache, s), before)
    cache.drop(f)
    assert cache.memory_bytes() == mem
    # rollback forgets exactly the newest tokens
    n = rng.randint(0, cache.seq_length(s))
    keep = cache.seq_length(s) - n
    want = [(k[[i for i, o in enumerate(ords) if o < keep]], v[[i for i, o in enumerate(ords) if o < keep]],
             [o for o in ords if o < keep], [p for o, p in zip(ords, pos) if o < keep]) for k, v, ords, pos in before]
    cache.rollback(s, n)
    assert _same(_contents(cache, s), want) and cache.seq_length(s) == keep
    # a failed append changes nothing
    small = kvloom.KVCache(1, 2, 8, block_size=bs, policy=policy, capacity_bytes=3 * 2 * bs * 8 * 4, device=device)
    t = small.add_sequence()
    small.append(0, t, torch.randn(2, bs, 8, generator=gen).to(device), torch.randn(2, bs, 8, generator=gen).to(device))
    snap, mem = _contents(small, t), small.memory_bytes()
    try:
        small.append(0, t, torch.randn(2, 2 * bs, 8, generator=gen).to(device),
                     torch.randn(2, 2 * bs, 8, generator=gen).to(device))
        raise AssertionError("an append past the pool's capacity must raise")
    except kvloom.CapacityError:
        pass
    assert _same(_contents(small, t), snap) and small.memory_bytes() == mem and small.seq_length(t) == bs


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return kvloom.enable(LlamaForCausalLM(cfg).eval())


class _Tok:
    """The smallest tokenizer FastGen's class table needs (ids 0..2 special, 3 punctuation)."""
    all_special_ids = [0, 1, 2]

    def __len__(self):
        return 128

    def decode(self, ids):
        return "." if ids[0] == 3 else f"w{ids[0]}"


def _greedy(model, cache, ids, n):
    from kvloom.hf import cache_kwargs

    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), max_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def check_hf(cls) -> None:
    """The transformers-path properties of one policy class, on a tiny random Llama."""
    model = tiny_llama()
    ids = torch.randint(4, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    full = kvloom.Cache(model)
    want = _greedy(model, full, ids, 12)
    cache = kvloom.Cache(model, policy=cls.example(model), tokenizer=_Tok())
    got = _greedy(model, cache, ids, 12)
    assert len(got) == len(want)
    assert cache.memory_bytes() <= full.memory_bytes()
    assert cache.get_seq_length() == full.get_seq_length()
    from kvloom.hf import cache_kwargs

    mem, lengths = cache.memory_bytes(), cache.kv.lengths(cache.seqs[0])
    fork = cache.fork()  # shares the C++ cache: memory_bytes() counts both until the fork closes
    with torch.no_grad():
        model(torch.tensor([[5]]), **cache_kwargs(fork), use_cache=True)
    assert cache.kv.lengths(cache.seqs[0]) == lengths and fork.get_seq_length() == cache.get_seq_length() + 1
    fork.close()
    assert cache.memory_bytes() == mem
    lossless = cls.keep_all(model)
    if lossless is not None:
        assert _greedy(model, kvloom.Cache(model, policy=lossless, tokenizer=_Tok()), ids, 12) == want
    # quantized storage: the policy runs on it, full blocks get quantized, forks give memory back.
    # (Against the same policy in full precision it may hold more: a sealed block is never
    # compacted, so tokens the policy drops one by one leave it partly live, e.g. NAtS's window.)
    full4 = kvloom.Cache(model, block_size=4)
    quant = kvloom.Cache(model, policy=cls.example(model), tokenizer=_Tok(), block_size=4, kv_dtype="int8")
    assert len(_greedy(model, full4, ids, 12)) == len(_greedy(model, quant, ids, 12)) == len(want)
    assert any(any(quant.kv.sealed_blocks(0, h, quant.seqs[0])) for h in range(quant.kv.n_kv_heads))
    assert quant.memory_bytes() < full4.memory_bytes()
    mem = quant.memory_bytes()
    fork = quant.fork()
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7, 8, 9]]), **cache_kwargs(fork), use_cache=True)
    fork.close()
    assert quant.memory_bytes() == mem
