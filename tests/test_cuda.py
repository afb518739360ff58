"""kvloom on a CUDA device: the same semantics, tests and API as on the CPU. Every test here
skips without a GPU (and a CUDA build of kvloom); bench/gpu_check.sh runs them on a GPU machine.

- the device cache holds exactly what a CPU cache holds after the same operations (hypothesis:
  appends, forks with copy-on-write, rollbacks, evictions, policy runs with compaction);
- decode attention (dense, over the cache, with segment views) equals the float64 reference
  on the same device within each dtype's tolerance;
- chunk attention (the kernel for short chunks, the gathering path for long ones) equals the
  CPU cache's;
- prompt statistics on a device cache equal the CPU cache's;
- through transformers on random-init Llama/Qwen2/Qwen3/Mistral/Gemma 3: greedy Full equals
  DynamicCache + sdpa token for token, and so do a continued turn's logits; every policy generates and frees memory
  (and passes the policy suite's cache properties on a device cache); CIFLEX side
  paths, Hogwild! and CLA run; Full's decode step issues no host synchronisation from Python.
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import kvloom
from kvloom import reference as ref

pytestmark = pytest.mark.skipif(not (kvloom._core.cuda_built and torch.cuda.is_available()),
                                reason="needs a GPU and a CUDA build of kvloom")

DEV = "cuda"
TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.float16: dict(atol=3e-3, rtol=3e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _pair(dtype=torch.float32, policy=None, block_size=4, n_layers=2, heads=2, D=16):
    return (kvloom.KVCache(n_layers, heads, D, dtype=dtype, policy=policy, block_size=block_size),
            kvloom.KVCache(n_layers, heads, D, dtype=dtype, policy=policy, block_size=block_size, device=DEV))


def _same(cpu, gpu, s, sd):
    for layer in range(cpu.n_layers):
        for h in range(cpu.n_kv_heads):
            k, v, o, p = cpu.gather(layer, h, s)
            kd, vd, od, pd = gpu.gather(layer, h, sd)
            assert kd.device.type == "cuda"
            assert torch.equal(k, kd.cpu()) and torch.equal(v, vd.cpu()) and torch.equal(o, od) and torch.equal(p, pd)


@settings(max_examples=25, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["append", "fork", "rollback", "evict", "policy", "drop"]),
                              st.integers(1, 9)), min_size=3, max_size=25),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 1000))
def test_device_cache_matches_cpu_cache(ops, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    cpu, gpu = _pair(dtype, kvloom.Window(2, 7))
    seqs = [(cpu.add_sequence(), gpu.add_sequence())]
    for op, n in ops:
        s, sd = seqs[n % len(seqs)]
        if op == "append":
            for layer in range(2):
                k, v = torch.randn(2, n, 16, generator=g), torch.randn(2, n, 16, generator=g)
                cpu.append(layer, s, k, v)
                gpu.append(layer, sd, k.to(DEV), v.to(DEV))
        elif op == "fork":
            seqs.append((cpu.fork(s), gpu.fork(sd)))
        elif op == "rollback":
            m = min(n, cpu.seq_length(s))
            cpu.rollback(s, m)
            gpu.rollback(sd, m)
        elif op == "evict" and cpu.length(0, 0, s):
            slots = cpu.slots(0, 0, s)[0][:: max(1, n)].tolist()
            cpu.evict(0, 0, s, slots)
            gpu.evict(0, 0, sd, slots)
        elif op == "policy":
            for layer in range(2):
                assert cpu.apply_policy(layer, s) == gpu.apply_policy(layer, sd)
        elif op == "drop" and len(seqs) > 1:
            cpu.drop(s)
            gpu.drop(sd)
            seqs.remove((s, sd))
    for s, sd in seqs:
        _same(cpu, gpu, s, sd)
    assert cpu.memory_bytes() == gpu.memory_bytes()


@settings(max_examples=20, deadline=None)
@given(heads=st.sampled_from([(8, 2), (9, 3), (4, 4), (32, 8), (9, 1)]), T=st.integers(1, 3000),
       D=st.sampled_from([64, 128, 40]), B=st.integers(1, 3),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 1000))
def test_dense_decode_attention_matches_reference(heads, T, D, B, dtype, seed):
    Hq, Hkv = heads
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, T, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, T, D, generator=g).to(dtype)
    out = kvloom.ops.decode_attention(q.to(DEV), k.to(DEV), v.to(DEV))
    assert out.device.type == "cuda" and out.dtype == dtype
    want = ref.decode_attention(q.double(), k.double(), v.double()).to(dtype)
    torch.testing.assert_close(out.cpu().float(), want.float(), **TOL[dtype])


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 600), heads=st.sampled_from([(8, 2), (9, 3), (6, 1)]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 1000),
       delta=st.integers(-50, 50))
def test_cache_attention_with_views_matches_cpu(n, heads, dtype, seed, delta):
    Hq, Hkv = heads
    g = torch.Generator().manual_seed(seed)
    cpu, gpu = _pair(dtype, block_size=16, n_layers=1, heads=Hkv, D=64)
    a, ad = cpu.add_sequence(), gpu.add_sequence()
    b, bd = cpu.add_sequence(), gpu.add_sequence()
    for (s, sd), m in (((a, ad), n), ((b, bd), 7)):
        k, v = torch.randn(Hkv, m, 64, generator=g), torch.randn(Hkv, m, 64, generator=g)
        cpu.append(0, s, k, v)
        gpu.append(0, sd, k.to(DEV), v.to(DEV))
    drop = cpu.slots(0, 0, a)[0][1::3].tolist()
    cpu.evict(0, 0, a, drop)
    gpu.evict(0, 0, ad, drop)
    inv = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    q = torch.randn(2, Hq, 64, generator=g).to(dtype)
    want = cpu.attend(0, q, [a, [(a, 0), (b, delta)]], inv_freq=inv)
    got = gpu.attend(0, q.to(DEV), [ad, [(ad, 0), (bd, delta)]], inv_freq=inv.to(DEV))
    torch.testing.assert_close(got.cpu().float(), want.float(), **TOL[dtype])


@settings(max_examples=20, deadline=None)
@given(heads=st.sampled_from([(8, 2), (9, 3), (4, 4), (6, 1)]), past=st.integers(1, 300),
       Tq=st.sampled_from([1, 3, 17, 40]), B=st.integers(1, 2),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), evict=st.floats(0, 0.6),
       masked=st.sampled_from([None, "bool", "float"]), seed=st.integers(0, 1000))
def test_chunk_attention_on_a_device_cache_equals_cpu(heads, past, Tq, B, dtype, evict, masked, seed):
    """Short chunks run kvloom's kernel over the device tables, long ones (Tq x group above
    KVCache.CUDA_CHUNK_KERNEL_ROWS) the gathering path: both equal the CPU cache's kernel."""
    Hq, Hkv = heads
    g = torch.Generator().manual_seed(seed)
    cpu, gpu = _pair(dtype, block_size=16, n_layers=1, heads=Hkv, D=64)
    seqs = [(cpu.add_sequence(), gpu.add_sequence()) for _ in range(B)]
    for s, sd in seqs:
        k, v = torch.randn(Hkv, past, 64, generator=g), torch.randn(Hkv, past, 64, generator=g)
        cpu.append(0, s, k, v)
        gpu.append(0, sd, k.to(DEV), v.to(DEV))
        for h in range(Hkv):
            drop = [int(x) for x in cpu.slots(0, h, s)[0] if torch.rand(1, generator=g).item() < evict]
            if drop:
                cpu.evict(0, h, s, drop)
                gpu.evict(0, h, sd, drop)
        k, v = torch.randn(Hkv, Tq, 64, generator=g), torch.randn(Hkv, Tq, 64, generator=g)
        cpu.append(0, s, k, v)
        gpu.append(0, sd, k.to(DEV), v.to(DEV))
    q = torch.randn(B, Hq, Tq, 64, generator=g).to(dtype)
    mask = None
    if masked:
        vis = torch.rand(B, Tq, past + Tq, generator=g) > 0.2
        mask = vis if masked == "bool" else torch.zeros(B, Tq, past + Tq).masked_fill(~vis, torch.finfo(torch.float32).min)
    want = cpu.chunk_attention(0, q, [s for s, _ in seqs], mask=mask)
    got = gpu.chunk_attention(0, q.to(DEV), [sd for _, sd in seqs], mask=None if mask is None else mask.to(DEV))
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu().float(), want.float(), **TOL[dtype])


@settings(max_examples=15, deadline=None)
@given(kv_dtype=st.sampled_from(["int8", "int4", "int2"]), dtype=st.sampled_from([torch.float32, torch.float16]),
       lengths=st.lists(st.integers(1, 40), min_size=1, max_size=6), evict=st.floats(0, 0.5), seed=st.integers(0, 1000))
def test_quantized_device_cache_matches_cpu(kv_dtype, dtype, lengths, evict, seed):
    # the device cache seals the same blocks into the same codes (gathers equal bit for bit),
    # and decode and chunk attention over its codes equal the CPU cache's quantized kernels
    g = torch.Generator().manual_seed(seed)
    cpu, gpu = (kvloom.KVCache(1, 3, 64, dtype=dtype, policy=kvloom.Window(4, 60), kv_dtype=kv_dtype, device=d)
                for d in ("cpu", DEV))
    s, sd = cpu.add_sequence(), gpu.add_sequence()
    for n in lengths:
        k, v = torch.randn(3, n, 64, generator=g).to(dtype), torch.randn(3, n, 64, generator=g).to(dtype)
        cpu.append(0, s, k, v)
        gpu.append(0, sd, k.to(DEV), v.to(DEV))
        assert cpu.apply_policy(0, s) == gpu.apply_policy(0, sd)
        live = cpu.slots(0, 1, s)[0].tolist()
        drop = live[1::2][: int(evict * len(live))]
        cpu.evict(0, 1, s, drop)
        gpu.evict(0, 1, sd, drop)
    _same(cpu, gpu, s, sd)
    assert cpu.memory_bytes() == gpu.memory_bytes()
    q = torch.randn(1, 9, 64, generator=g).to(dtype)
    torch.testing.assert_close(gpu.attend(0, q.to(DEV), [sd]).cpu().float(), cpu.attend(0, q, [s]).float(), **TOL[dtype])
    Tq = min(5, cpu.seq_length(s))
    qc = torch.randn(1, 9, Tq, 64, generator=g).to(dtype)
    torch.testing.assert_close(gpu.chunk_attention(0, qc.to(DEV), [sd]).cpu().float(),
                               cpu.chunk_attention(0, qc, [s]).float(), **TOL[dtype])


def test_prompt_statistics_on_a_device_cache_equal_the_cpu_ones():
    from kvloom.policies.fastgen import hybrid_recovery

    g = torch.Generator().manual_seed(0)
    cpu, gpu = _pair(n_layers=1, heads=3, D=64, block_size=16)
    s, sd = cpu.add_sequence(), gpu.add_sequence()
    k, v = torch.randn(3, 300, 64, generator=g), torch.randn(3, 300, 64, generator=g)
    cls = (torch.rand(300, generator=g) < 0.2).to(torch.uint8)
    cpu.append(0, s, k, v, classes=cls)
    gpu.append(0, sd, k.to(DEV), v.to(DEV), classes=cls)
    q = torch.randn(1, 9, 300, 64, generator=g)
    cpu.accumulate_attention(0, q, [s])
    gpu.accumulate_attention(0, q.to(DEV), [sd])
    for h in range(3):
        torch.testing.assert_close(torch.from_numpy(gpu.scores(0, h, sd)), torch.from_numpy(cpu.scores(0, h, s)))
    a = hybrid_recovery(cpu, 0, q, [s], r_frequent=0.3, local_window=50)
    b = hybrid_recovery(gpu, 0, q.to(DEV), [sd], r_frequent=0.3, local_window=50)
    torch.testing.assert_close(torch.from_numpy(b), torch.from_numpy(a))


def test_wrong_device_is_a_clear_error():
    cpu, gpu = _pair()
    s, sd = cpu.add_sequence(), gpu.add_sequence()
    with pytest.raises(ValueError, match="cuda:0.*lives on cpu|is on cuda"):
        cpu.append(0, s, torch.randn(2, 1, 16, device=DEV), torch.randn(2, 1, 16, device=DEV))
    with pytest.raises(ValueError, match="is on cpu"):
        gpu.append(0, sd, torch.randn(2, 1, 16), torch.randn(2, 1, 16))
    assert gpu.seq_length(sd) == 0


# --- through transformers ----------------------------------------------------------------------
def _tiny(name, dtype=torch.float32):
    from hf_helpers import tiny_model

    return tiny_model(name).to(device=DEV, dtype=dtype)


def _greedy(model, cache, ids, n=20):
    from kvloom.hf import cache_kwargs

    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), max_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gemma3"])
def test_full_equals_dynamic_cache_on_gpu(arch):
    from transformers import DynamicCache

    model = _tiny(arch)
    ids = torch.randint(3, 250, (1, 60), generator=torch.Generator().manual_seed(1)).to(DEV)
    want = _greedy(model, DynamicCache(), ids)
    kvloom.enable(model)
    cache = kvloom.Cache(model)
    assert cache.kv.device.type == "cuda"
    assert _greedy(model, cache, ids) == want


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_continued_turn_equals_dynamic_cache_on_gpu(arch):
    """A second chunk on a non-empty cache (a continued conversation) runs kvloom's chunk
    attention on the device: its logits equal DynamicCache + sdpa's."""
    from transformers import DynamicCache

    from kvloom.hf import cache_kwargs

    model = _tiny(arch)
    gen = torch.Generator().manual_seed(7)
    ids, more = torch.randint(3, 250, (1, 50), generator=gen).to(DEV), torch.randint(3, 250, (1, 9), generator=gen).to(DEV)

    def run(cache):
        with torch.no_grad():
            model(ids, **cache_kwargs(cache), use_cache=True)
            return model(more, **cache_kwargs(cache), use_cache=True).logits

    want = run(DynamicCache())
    kvloom.enable(model)
    torch.testing.assert_close(run(kvloom.Cache(model)), want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", kvloom.policies.names())
def test_policy_suite_on_a_device_cache(name, seed):
    """The policy suite's C++-cache properties (tests/policy_suite.py: bytes == kept blocks, forks
    share and copy on write, rollback, a failed append changes nothing) with blocks on the GPU."""
    import policy_suite

    policy_suite.check_kvcache(kvloom.policies.get(name).example(), seed, device=DEV)


@pytest.mark.parametrize("name", kvloom.policies.names())
def test_every_policy_runs_on_gpu(name):
    import policy_suite

    model = kvloom.enable(policy_suite.tiny_llama().to(DEV))
    ids = torch.randint(4, 128, (1, 40), generator=torch.Generator().manual_seed(2)).to(DEV)
    full = kvloom.Cache(model)
    _greedy(model, full, ids, 8)
    cache = kvloom.Cache(model, policy=kvloom.policies.get(name).example(model), tokenizer=policy_suite._Tok())
    assert len(_greedy(model, cache, ids, 8)) == 8
    assert cache.memory_bytes() <= full.memory_bytes()
    keep_all = kvloom.policies.get(name).keep_all(model)
    if keep_all is not None:
        same = kvloom.Cache(model, policy=keep_all, tokenizer=policy_suite._Tok())
        assert _greedy(model, same, ids, 8) == _greedy(model, kvloom.Cache(model), ids, 8)


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_quantized_cache_generates_on_gpu(kv_dtype):
    """generate() through a quantized cache on the device: it seals blocks (fewer bytes than
    Full), and at int8 its greedy tokens equal Full's (the tiny model's margins are wide)."""
    import policy_suite

    model = kvloom.enable(policy_suite.tiny_llama().to(DEV))
    ids = torch.randint(4, 128, (1, 90), generator=torch.Generator().manual_seed(4)).to(DEV)
    full = kvloom.Cache(model)
    want = _greedy(model, full, ids, 8)
    cache = kvloom.Cache(model, kv_dtype=kv_dtype)
    got = _greedy(model, cache, ids, 8)
    assert len(got) == 8 and cache.memory_bytes() < full.memory_bytes()
    if kv_dtype == "int8":
        assert got == want


def test_window_evicts_the_same_tokens_on_gpu_and_cpu():
    import policy_suite

    model = kvloom.enable(policy_suite.tiny_llama())
    ids = torch.randint(4, 128, (1, 50), generator=torch.Generator().manual_seed(3))
    cpu = kvloom.Cache(model, policy=kvloom.Window(2, 9))
    _greedy(model, cpu, ids, 6)
    model.to(DEV)
    gpu = kvloom.Cache(model, policy=kvloom.Window(2, 9))
    _greedy(model, gpu, ids.to(DEV), 6)
    assert gpu.kv.lengths(gpu.seqs[0]) == cpu.kv.lengths(cpu.seqs[0])


def test_side_paths_hogwild_and_cla_on_gpu():
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvloom import convert
    from kvloom.hf import cache_kwargs

    import policy_suite

    model = kvloom.enable(policy_suite.tiny_llama().to(DEV))
    cache = kvloom.Cache(model)
    ids = torch.randint(4, 128, (1, 30), generator=torch.Generator().manual_seed(4)).to(DEV)
    with torch.no_grad():
        model(ids, **cache_kwargs(cache), use_cache=True)
        mem = cache.memory_bytes()
        side = cache.fork()
        model(ids[:, :5], **cache_kwargs(side), use_cache=True)
        side.close()
    assert cache.memory_bytes() == mem
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cla = kvloom.enable(convert.to_cla(LlamaForCausalLM(cfg).eval(), 2))
    on_cpu = kvloom.Cache(cla)
    _greedy(cla, on_cpu, ids.cpu(), 4)
    cla.to(DEV)
    c = kvloom.Cache(cla)
    _greedy(cla, c, ids, 4)
    # generate feeds back all but the last new token: 30 + 3 positions, in half the layers' stores
    assert c.get_seq_length() == on_cpu.get_seq_length() == ids.shape[1] + 3
    assert c.memory_bytes() == on_cpu.memory_bytes() > 0


@pytest.mark.parametrize("policy", [kvloom.Full(), kvloom.Window(4, 16)], ids=["full", "window"])
def test_decode_step_does_not_synchronise_from_python(policy):
    """kvloom's per-token work for Full and Window (append, attention, policy run) issues no
    synchronising torch call (transformers' own mask code is not kvloom's and is left out)."""
    g = torch.Generator().manual_seed(5)
    kv = kvloom.KVCache(2, 2, 64, dtype=torch.float16, policy=policy, device=DEV)
    s = kv.add_sequence()
    for layer in range(2):
        kv.append(layer, s, torch.randn(2, 40, 64, generator=g).half().to(DEV), torch.randn(2, 40, 64).half().to(DEV))
        kv.apply_policy(layer, s)
    k, v, q = (torch.randn(2, 1, 64).half().to(DEV), torch.randn(2, 1, 64).half().to(DEV),
               torch.randn(1, 8, 64).half().to(DEV))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            for layer in range(2):
                kv.append(layer, s, k, v)
                out = kv.attend(layer, q, [s])
                kv.apply_policy(layer, s)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()


def test_hogwild_and_side_paths_with_a_real_tokenizer_on_gpu():
    """Needs SmolLM2's tokenizer files (bench/gpu_check.sh --assets carries them); the model is
    random-init with SmolLM2's vocabulary, so only the mechanics are checked."""
    import os

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kvloom import ciflex, hogwild

    assets = os.environ.get("KVLOOM_GPU_ASSETS")
    if not assets or not os.path.exists(os.path.join(assets, "tokenizer.json")):
        pytest.skip("no tokenizer assets (KVLOOM_GPU_ASSETS)")
    if not os.path.exists(os.path.join(assets, "chat_template.jinja")):
        pytest.fail(f"{assets} lacks chat_template.jinja (see bench/gpu_check.sh for the assets command)")
    tok = AutoTokenizer.from_pretrained(assets)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    model = kvloom.enable(LlamaForCausalLM(cfg).eval().to(DEV))
    res = hogwild.generate(model, tok, "Count to three.", workers=2, max_new_tokens=6, ignore_eos=True)
    assert sum(res.tokens.values()) == 12
    one = hogwild.generate(model, tok, "Count to three.", workers=1, max_new_tokens=6, ignore_eos=True)
    assert one.tokens["Alice"] == 6
    conv = kvloom.Conversation(model, tok)
    conv.user("Hello there.").prefill()
    before = conv.memory_bytes()
    with conv.side_path(ciflex.INSTRUCTIONS["query rewrite"]) as side:
        side.generate(max_new_tokens=4, stop_at_eos=False)
    assert conv.memory_bytes() == before
