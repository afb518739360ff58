"""Task-KV: the observation-window statistic from the C++ cache against the reference, the
head split and middle selection, and real memory savings inside generate()."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

import kvloom
from kvloom import reference as ref

pytestmark = pytest.mark.hf  # drives transformers: also run against the oldest supported release


@given(heads=st.sampled_from([(3, 3), (9, 3), (4, 1)]), T=st.integers(2, 120), L=st.integers(1, 40),
       seed=st.integers(0, 2**31 - 1))
def test_observation_window_column_means_match_reference(heads, T, L, seed):
    Hq, Hkv = heads
    G = Hq // Hkv
    L = min(L, T)
    g = torch.Generator().manual_seed(seed)
    cache = kvloom.KVCache(1, Hkv, 16, block_size=8)
    s = cache.add_sequence()
    k = torch.randn(Hkv, T, 16, generator=g)
    cache.append(0, s, k, torch.randn(Hkv, T, 16, generator=g))
    q = torch.randn(1, Hq, L, 16, generator=g)
    cache.accumulate_attention(0, q, [s])  # what kvloom.Cache does for Task-KV
    expect = ref.taskkv_column_means([q[0, h * G:(h + 1) * G] for h in range(Hkv)], list(k), T)
    for h in range(Hkv):
        got = torch.tensor(cache.scores(0, h, s).tolist(), dtype=torch.float64) / (G * L)  # slots are in ord order
        torch.testing.assert_close(got, expect[h], atol=1e-6, rtol=1e-5)


def test_head_split_and_middle_selection():
    cfg = kvloom.TaskKV(beta=0.5, m=0, sinks=2, recent=3, budget=0.5, top_t=4, pool=1)
    T, D = 20, 4
    base = torch.zeros(T, D)
    values = [base.clone() for _ in range(4)]
    values[2][:, 0] = 10.0  # head 2 is far from the others
    values[1][:, 1] = 0.1   # head 1 is nearest to the centre? (centre is pulled toward head 2)
    col = [torch.full((T,), 1.0 / T) for _ in range(4)]
    col[0][10] = 0.5  # a clear middle activation for head 0
    hetero, middles = cfg.decide(col, values, layer=0, n_layers=3)
    assert cfg.n_heterogeneous(0, 3, 4) == 2 and cfg.n_heterogeneous(2, 3, 4) == 0
    assert 2 in hetero and len(hetero) == 3  # two farthest + the nearest
    budget_middle = math.ceil(0.5 * T) - 2 - 3
    for h, mids in middles.items():
        assert len(mids) == budget_middle and all(2 <= o < T - 3 for o in mids)
    if 0 in middles:
        assert 10 in middles[0]
    # a budget smaller than sinks + recent keeps no middle tokens (documented fallback)
    _, small = kvloom.TaskKV(beta=0, m=0, sinks=8, recent=8, budget=0.1).decide(col, values, 1, 3)
    assert all(m == [] for m in small.values())


def test_taskkv_config_errors():
    for bad in (dict(budget=0), dict(budget=1.5), dict(beta=-1), dict(sinks=-1), dict(window=0), dict(pool=0)):
        with pytest.raises(ValueError):
            kvloom.TaskKV(**bad)


def test_taskkv_in_generate_frees_memory():
    from hf_helpers import generate, prompt, smollm2

    model, tok = smollm2()
    kvloom.enable(model)
    enc = tok([prompt(tok, 400)], return_tensors="pt", add_special_tokens=False)
    full = kvloom.Cache(model)
    # SmolLM2 has 3 kv heads: the paper's m=4 would make every head heterogeneous; keep only the nearest
    tk = kvloom.Cache(model, policy=kvloom.TaskKV(beta=0.0, m=0, budget=0.3, sinks=4, recent=32))
    generate(model, enc, full, max_new_tokens=8, pad_token_id=tok.pad_token_id)
    generate(model, enc, tk, max_new_tokens=8, pad_token_id=tok.pad_token_id)
    st_ = tk.stats()
    plans = st_["sequences"][tk.seqs[0]]["plans"]
    assert st_["policy"].startswith("taskkv")
    kinds = {p for layer in plans for p in layer}
    assert kinds <= {"taskkv:heterogeneous", "taskkv:sinks+recent+middle"}
    T = enc["input_ids"].shape[1]
    lengths = tk.kv.lengths(tk.seqs[0])
    for layer, row in enumerate(plans):
        assert "taskkv:heterogeneous" in row  # at least the nearest head
        for h, p in enumerate(row):
            if p == "taskkv:sinks+recent+middle":
                assert lengths[layer][h] <= math.ceil(0.3 * T) + 8
            else:
                assert lengths[layer][h] == T + 7
    assert tk.memory_bytes() < 0.7 * full.memory_bytes()
    model.set_attn_implementation("sdpa")
