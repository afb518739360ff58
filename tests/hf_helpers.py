"""Shared helpers for the transformers tests: the default model, prompts, tiny random models."""
import functools

import torch

from kvloom.hf import cache_kwargs


@functools.lru_cache(maxsize=1)
def smollm2():
    """(model, tokenizer) of the embedded default model, fp32, sdpa attention."""
    from kvloom import models

    return models.load()


@functools.lru_cache(maxsize=1)
def essay_text() -> str:
    from kvloom.corpus import essays

    texts = essays()
    if texts:
        return "\n\n".join(texts[:6])
    # fallback: still natural-ish text
    return ("The quick brown fox jumps over the lazy dog. " * 40 + "Notes on caching and memory. ") * 20


def prompt(tok, n_tokens: int, question: str = "Summarise the text above in one sentence.") -> str:
    """A chat prompt of about n_tokens tokens: a slice of essay text and a question."""
    ids = tok(essay_text(), add_special_tokens=False)["input_ids"]
    body = tok.decode(ids[: max(1, n_tokens - 30)])
    msgs = [{"role": "user", "content": body + "\n\n" + question}]
    return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def generate(model, enc, cache, **kw):
    kw.setdefault("max_new_tokens", 64)
    kw.setdefault("do_sample", False)
    with torch.no_grad():
        return model.generate(**enc, **cache_kwargs(cache), pad_token_id=kw.pop("pad_token_id", 0), **kw)


def with_attn(model, name):
    model.set_attn_implementation(name)
    return model


# tiny random-init configs of every supported architecture (no weights needed)
def tiny_configs():
    from transformers import (Gemma3TextConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config,
                              Qwen3Config)

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return {
        "llama": LlamaConfig(**common),
        "qwen2": Qwen2Config(**common),
        "qwen3": Qwen3Config(**{**common, "head_dim": 32}),
        "mistral": MistralConfig(**{**common, "sliding_window": 24}),
        "gemma3": Gemma3TextConfig(**{**common, "head_dim": 16, "sliding_window": 20, "num_hidden_layers": 4,
                                      "layer_types": ["sliding_attention", "full_attention"] * 2,
                                      "query_pre_attn_scalar": 16}),
        "gpt2": GPT2Config(vocab_size=256, n_embd=64, n_layer=3, n_head=4, n_positions=512),
    }


def tiny_model(name):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(tiny_configs()[name], attn_implementation="sdpa")
    m.eval()
    return m
