"""The first bar of every change: with policy Full, greedy generation on the real default
model (SmolLM2-135M-Instruct) equals DynamicCache + sdpa token for token, and the logits
agree within LOGIT_ATOL."""
import pytest
import torch
from transformers import DynamicCache

import kvloom
from hf_helpers import generate, prompt, smollm2, with_attn

pytestmark = pytest.mark.hf  # drives transformers: also run against the oldest supported release

LOGIT_ATOL = 5e-4  # fp32, 30 layers; measured max 3.8e-5 (kvloom decode kernel vs SDPA rounding)
PROMPT_TOKENS = [40, 200, 700, 1300, 2000]


@pytest.fixture(scope="module")
def model_tok():
    return smollm2()


def _run(model, tok, texts, new_tokens=64):
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with_attn(model, "sdpa")
    ref = generate(model, enc, DynamicCache(), max_new_tokens=new_tokens, output_logits=True,
                   return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    kvloom.enable(model)
    cache = kvloom.Cache(model)
    out = generate(model, enc, cache, max_new_tokens=new_tokens, output_logits=True, return_dict_in_generate=True,
                   pad_token_id=tok.pad_token_id)
    with_attn(model, "sdpa")
    return enc, ref, out, cache


@pytest.mark.slow
@pytest.mark.parametrize("n", PROMPT_TOKENS)
def test_greedy_equals_dynamic_cache_batch1(model_tok, n):
    model, tok = model_tok
    enc, ref, out, cache = _run(model, tok, [prompt(tok, n)])
    assert out.sequences.shape == ref.sequences.shape
    assert torch.equal(out.sequences, ref.sequences), (
        tok.decode(ref.sequences[0, enc["input_ids"].shape[1]:]), tok.decode(out.sequences[0, enc["input_ids"].shape[1]:]))
    worst = max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits))
    assert worst <= LOGIT_ATOL, f"max |logit difference| {worst}"
    assert cache.memory_bytes() > 0


@pytest.mark.slow
def test_greedy_equals_dynamic_cache_batch4_left_padded(model_tok):
    model, tok = model_tok
    texts = [prompt(tok, 60, "Name three colours."), prompt(tok, 900), prompt(tok, 300, "What is this about?"),
             prompt(tok, 1500)]
    enc, ref, out, cache = _run(model, tok, texts)
    assert torch.equal(out.sequences, ref.sequences)
    worst = max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits))
    assert worst <= LOGIT_ATOL, f"max |logit difference| {worst}"
    # left padding costs no KV memory: each row holds its own tokens only
    real = enc["attention_mask"].sum(dim=1).tolist()
    for row, n in zip(cache.seqs, real):
        assert cache.kv.lengths(row)[0][0] == n + 63
