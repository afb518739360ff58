"""MQA/GQA and CLA conversion: pooled weights against the reference, exactness when the
pooled heads were identical, CLA memory and cache equivalence, save/load round trips,
uptraining, bad input."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

import kvloom
from kvloom.hf import cache_kwargs
from kvloom import convert
from kvloom import reference as ref

pytestmark = pytest.mark.hf  # drives transformers: also run against the oldest supported release


def _tiny(hkv=4, layers=4, cls=LlamaForCausalLM, cfg_cls=LlamaConfig, **kw):
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=8, num_key_value_heads=hkv, max_position_embeddings=256, **kw)
    return cls(cfg).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@settings(max_examples=30, deadline=None)
@given(groups=st.sampled_from([(4, 1), (4, 2), (6, 3), (6, 2), (3, 1), (2, 2)]), head_dim=st.sampled_from([2, 8]),
       init=st.sampled_from(["mean", "first"]), bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_pooled_weights_match_reference(groups, head_dim, init, bias, seed):
    old, new = groups
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(old * head_dim, 5, generator=g) if not bias else torch.randn(old * head_dim, generator=g)
    got = convert.pooled_kv_weight(w, old, new, head_dim, init)
    torch.testing.assert_close(got.double(), ref.pool_kv_heads(w, old, new, head_dim, init))
    # the group mapping: query head i reads new kv head i // (Hq / new), which replaced the old
    # heads its old kv head belonged to
    hq = 12
    if hq % old == 0:
        for i in range(hq):
            assert ref.kv_head_of_query(i, hq, new) == ref.kv_head_of_query(i, hq, old) // (old // new)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_mean_of_identical_heads_equals_original(arch):
    cls, cfg_cls, kw = (LlamaForCausalLM, LlamaConfig, {}) if arch == "llama" else (Qwen3ForCausalLM, Qwen3Config, {"head_dim": 8})
    model = _tiny(4, cls=cls, cfg_cls=cfg_cls, **kw)
    D = model.config.head_dim if arch == "qwen3" else 64 // 8
    with torch.no_grad():  # make kv heads 2j and 2j+1 identical
        for layer in model.model.layers:
            for lin in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                w = lin.weight.view(4, D, -1)
                w[1::2] = w[0::2]
    ids = torch.randint(0, 128, (2, 20))
    before = _logits(model, ids)
    convert.to_gqa(model, 2, init="mean")
    assert model.config.num_key_value_heads == 2
    assert model.model.layers[0].self_attn.k_proj.weight.shape[0] == 2 * D
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-5, rtol=1e-5)


def test_gqa_init_variants_and_round_trip(tmp_path):
    ids = torch.randint(0, 128, (1, 16))
    outs = {}
    for init in ("mean", "first", "random"):
        m = convert.to_gqa(_tiny(4), 1, init=init)
        outs[init] = _logits(m, ids)
        m.save_pretrained(tmp_path / init)
        back = AutoModelForCausalLM.from_pretrained(tmp_path / init).eval()
        assert back.config.num_key_value_heads == 1
        torch.testing.assert_close(_logits(back, ids), outs[init])
    assert not torch.allclose(outs["mean"], outs["first"]) and not torch.allclose(outs["first"], outs["random"])


@pytest.mark.parametrize("factor,layers", [(2, 4), (3, 6), (2, 5)])
def test_cla_cache_bytes_fall_and_generation_matches(factor, layers):
    model = convert.to_cla(_tiny(2, layers=layers), factor)
    kvloom.enable(model)
    ids = torch.randint(0, 128, (2, 24))
    plain = kvloom.enable(_tiny(2, layers=layers))
    full = kvloom.Cache(plain)
    with torch.no_grad():
        plain(torch.cat([ids, ids[:, :8]], 1), **cache_kwargs(full), use_cache=True)  # 32 tokens, every layer
        cache = kvloom.Cache(model)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), max_new_tokens=8,
                             do_sample=False, pad_token_id=0)
        owners = len(range(0, layers, factor))
        assert cache.kv.layer_store == [convert.cla_owner(i, factor) for i in range(layers)]
        model.set_attn_implementation("sdpa")
        ref_out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(DynamicCache()),
                                 max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref_out)
    # the same 31 tokens held by the owner layers only: bytes fall by layers / owners
    assert cache.get_seq_length() == 31
    assert cache.memory_bytes() * layers == full.memory_bytes() * owners


def test_cla_save_load_round_trip(tmp_path):
    model = convert.to_cla(_tiny(2, layers=4), 2)
    assert not hasattr(model.model.layers[1].self_attn, "k_proj")
    ids = torch.randint(0, 128, (1, 12))
    want = _logits(model, ids)
    model.save_pretrained(tmp_path / "cla")
    back = convert.load(tmp_path / "cla").eval()
    assert back.config.kvloom_cla_factor == 2
    torch.testing.assert_close(_logits(back, ids), want)
    kvloom.enable(back)
    cache = kvloom.Cache(back)
    with torch.no_grad():
        out = back.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), max_new_tokens=5,
                            do_sample=False, pad_token_id=0)
    assert out.shape[1] == 17 and cache.kv.layer_store == [0, 0, 2, 2]


def test_uptrain_lowers_the_loss():
    model = convert.to_gqa(_tiny(4), 1, init="random")

    class Tok:
        eos_token_id = 1

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 128 for c in text]}

    texts = ["abcabcabc defdefdef " * 20]
    losses = convert.uptrain(model, Tok(), texts, steps=30, lr=3e-3, seq_len=32, batch_size=2, warmup=2,
                             progress=False)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_conversion_bad_input_leaves_model_untouched():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = _tiny(4)
    state = copy.deepcopy(model.state_dict())
    for bad in (3, 0, 8):  # 3: does not divide 8 query heads; 8: more than the 4 kv heads
        with pytest.raises(ValueError, match="num_kv_heads"):
            convert.to_gqa(model, bad)
    with pytest.raises(ValueError, match="init"):
        convert.to_gqa(model, 2, init="median")
    for bad in (0, 5, 2.0):
        with pytest.raises(ValueError, match="factor"):
            convert.to_cla(model, bad)
    assert model.config.num_key_value_heads == 4 and not hasattr(model.config, "kvloom_cla_factor")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4))
    with pytest.raises(NotImplementedError, match="gpt2"):
        convert.to_gqa(gpt2, 2)
    with pytest.raises(NotImplementedError, match="gpt2"):
        convert.to_cla(gpt2, 2)
    cla = convert.to_cla(_tiny(4), 2)
    with pytest.raises(ValueError, match="before CLA"):
        convert.to_gqa(cla, 2)
