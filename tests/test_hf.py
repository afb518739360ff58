"""The drop-in: kvloom.Cache + kvloom attention inside model.generate()."""
import pytest
import torch
from transformers import DynamicCache

import kvloom
from kvloom.hf import cache_kwargs
from hf_helpers import generate, tiny_configs, tiny_model, with_attn

pytestmark = pytest.mark.hf  # drives transformers: also run against the oldest supported release

ARCHS = list(tiny_configs())
LOGIT_ATOL = 1e-4  # fp32 logits: kvloom's decode kernel vs torch SDPA, same inputs


def _compare(model, enc, new_tokens=24, policy=None, **kw):
    with_attn(model, "sdpa")
    ref = generate(model, enc, DynamicCache(), max_new_tokens=new_tokens, output_logits=True,
                   return_dict_in_generate=True, **kw)
    kvloom.enable(model)
    cache = kvloom.Cache(model, policy=policy)
    out = generate(model, enc, cache, max_new_tokens=new_tokens, output_logits=True, return_dict_in_generate=True, **kw)
    with_attn(model, "sdpa")
    return ref, out, cache


@pytest.mark.parametrize("arch", ARCHS)
def test_random_init_architectures_match_dynamic_cache(arch):
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 250, (1, 45), generator=g)
    ref, out, cache = _compare(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, new_tokens=40)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=LOGIT_ATOL, rtol=1e-4)
    # sliding-window layers hold only their window; full layers hold everything
    geo = cache.geometry
    for layer, w in enumerate(geo.windows):
        expect = 84 if w is None else w - 1  # 45 prompt + 39 fed-back tokens
        assert cache.kv.lengths(cache.seqs[0])[layer] == [expect] * geo.n_kv_heads


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_random_init_left_padded_batch(arch):
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(2)
    lens = [30, 12, 41, 5]
    ids = torch.zeros(4, max(lens), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lens):
        ids[i, -n:] = torch.randint(3, 250, (n,), generator=g)
        mask[i, -n:] = 1
    ref, out, cache = _compare(model, {"input_ids": ids, "attention_mask": mask}, new_tokens=20)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=LOGIT_ATOL, rtol=1e-4)
    # padding was evicted: row i holds its own tokens only (full layers)
    full = [l for l, w in enumerate(cache.geometry.windows) if w is None]
    for i, n in enumerate(lens):
        assert cache.kv.lengths(cache.seqs[i])[full[0]][0] == n + 19


def test_sampling_runs_and_is_reproducible():
    model = tiny_model("llama")
    ids = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(3))
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with_attn(model, "sdpa")
    torch.manual_seed(5)
    ref = generate(model, enc, DynamicCache(), max_new_tokens=20, do_sample=True, top_k=20)
    kvloom.enable(model)
    torch.manual_seed(5)
    out = generate(model, enc, kvloom.Cache(model), max_new_tokens=20, do_sample=True, top_k=20)
    assert torch.equal(out, ref)


def test_chunked_prefill_and_continuing_conversation():
    model = tiny_model("qwen2")
    ids = torch.randint(3, 250, (1, 60), generator=torch.Generator().manual_seed(4))
    with_attn(model, "sdpa")
    with torch.no_grad():
        ref = model(ids).logits
    kvloom.enable(model)
    cache = kvloom.Cache(model)
    with torch.no_grad():
        parts = [model(ids[:, a:b], **cache_kwargs(cache), use_cache=True).logits
                 for a, b in [(0, 25), (25, 26), (26, 50), (50, 60)]]
    torch.testing.assert_close(torch.cat(parts, dim=1), ref, atol=LOGIT_ATOL, rtol=1e-4)
    assert cache.get_seq_length() == 60
    # continue with the same cache object through generate(): only the new turn is prefilled
    more = torch.randint(3, 250, (1, 7), generator=torch.Generator().manual_seed(6))
    full = torch.cat([ids, more], dim=1)
    out = generate(model, {"input_ids": full, "attention_mask": torch.ones_like(full)}, cache, max_new_tokens=10)
    with_attn(model, "sdpa")
    expect = generate(model, {"input_ids": full, "attention_mask": torch.ones_like(full)}, DynamicCache(),
                      max_new_tokens=10)
    assert torch.equal(out, expect)


def test_crop_rolls_back():
    model = kvloom.enable(tiny_model("llama"))
    ids = torch.randint(3, 250, (1, 30), generator=torch.Generator().manual_seed(7))
    cache = kvloom.Cache(model)
    with torch.no_grad():
        model(ids, **cache_kwargs(cache), use_cache=True)
        before = cache.memory_bytes()
        logits_a = model(ids[:, :1], **cache_kwargs(cache), use_cache=True).logits
        cache.crop(-1)
        assert cache.get_seq_length() == 30 and cache.memory_bytes() == before
        logits_b = model(ids[:, :1], **cache_kwargs(cache), use_cache=True).logits
    torch.testing.assert_close(logits_a, logits_b, atol=0, rtol=0)
    cache.crop(10)
    assert cache.get_seq_length() == 10 and cache.kv.lengths(cache.seqs[0])[0] == [10, 10]


def test_window_policy_saves_memory_in_generate():
    model = kvloom.enable(tiny_model("llama"))
    ids = torch.randint(3, 250, (1, 200), generator=torch.Generator().manual_seed(8))
    full, win = kvloom.Cache(model), kvloom.Cache(model, policy=kvloom.Window(4, 60))
    generate(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, full, max_new_tokens=10)
    generate(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, win, max_new_tokens=10)
    assert win.get_seq_length() == full.get_seq_length() == 209
    assert all(n == [64, 64] for n in win.kv.lengths(win.seqs[0]))
    assert win.memory_bytes() <= full.memory_bytes() * 0.4
    assert win.stats()["sequences"][win.seqs[0]]["plans"][0] == ["window", "window"]


# --- bad input ------------------------------------------------------------------------

def test_cache_without_kvloom_attention_is_a_clear_error():
    model = with_attn(tiny_model("llama"), "sdpa")
    ids = torch.randint(3, 250, (1, 8))
    with pytest.raises(RuntimeError, match="kvloom.enable"):
        model(ids, **cache_kwargs(kvloom.Cache(model)), use_cache=True)


def test_unsupported_architecture():
    from transformers import BertConfig, BertModel

    with pytest.raises(NotImplementedError, match="'bert' architecture"):
        kvloom.Cache(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=32)))
    with pytest.raises(NotImplementedError, match="beam search"):
        model = kvloom.enable(tiny_model("llama"))
        ids = torch.randint(3, 250, (1, 8))
        generate(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, kvloom.Cache(model),
                 max_new_tokens=3, num_beams=2)


def test_cache_from_another_model_and_batch_mismatch():
    a, b = kvloom.enable(tiny_model("llama")), kvloom.enable(tiny_model("qwen3"))
    ids = torch.randint(3, 250, (1, 8))
    with pytest.raises(ValueError, match="another model"):
        b(ids, **cache_kwargs(kvloom.Cache(a)), use_cache=True)
    a2 = kvloom.enable(tiny_model("llama"))
    with pytest.raises(ValueError, match="another model"):  # same config, other instance
        a2(ids, **cache_kwargs(kvloom.Cache(a)), use_cache=True)
    cache = kvloom.Cache(a)
    with torch.no_grad():
        a(ids, **cache_kwargs(cache), use_cache=True)
        before = cache.memory_bytes()
        with pytest.raises(ValueError, match="batch size 2"):
            a(torch.randint(3, 250, (2, 1)), **cache_kwargs(cache), use_cache=True)
    assert cache.memory_bytes() == before and cache.get_seq_length() == 8


def test_nan_and_capacity_leave_cache_intact():
    model = kvloom.enable(tiny_model("llama"))
    ids = torch.randint(3, 250, (1, 8))
    cache = kvloom.Cache(model, capacity_bytes=64 * 1024)
    with torch.no_grad():
        model(ids, **cache_kwargs(cache), use_cache=True)
        before = (cache.memory_bytes(), cache.get_seq_length())
        with pytest.raises(kvloom.CapacityError, match="nothing was cached"):
            model(torch.randint(3, 250, (1, 400)), **cache_kwargs(cache), use_cache=True)
        assert (cache.memory_bytes(), cache.get_seq_length()) == before
        emb = model.get_input_embeddings()(ids[:, :1]).clone()
        emb[..., 0] = float("nan")
        with pytest.raises(ValueError, match="non-finite"):
            model(inputs_embeds=emb, **cache_kwargs(cache), use_cache=True)
        assert (cache.memory_bytes(), cache.get_seq_length()) == before
