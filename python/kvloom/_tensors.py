"""Small helpers for getting user tensors across the DLPack boundary."""
from __future__ import annotations

import numpy as np
import torch

_KV_DTYPES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}
_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def kv_dtype_name(dtype) -> str:
    """Canonical name ('float32' | 'float16' | 'bfloat16') of a torch dtype or string."""
    if isinstance(dtype, str):
        if dtype in _NAMES:
            return _KV_DTYPES[_NAMES[dtype]]
        raise TypeError(f"unknown KV dtype {dtype!r}; use float32, float16 or bfloat16")
    if dtype in _KV_DTYPES:
        return _KV_DTYPES[dtype]
    raise TypeError(f"unsupported KV dtype {dtype}; use torch.float32, torch.float16 or torch.bfloat16")


QUANT_KV_DTYPES = {"int8": 8, "int4": 4, "int2": 2}


def quant_bits(kv_dtype) -> int:
    """Bits of a quantized KV storage name ("int8" | "int4" | "int2"); 0 for None."""
    if kv_dtype is None:
        return 0
    if isinstance(kv_dtype, str) and kv_dtype.lower() in QUANT_KV_DTYPES:
        return QUANT_KV_DTYPES[kv_dtype.lower()]
    raise ValueError(f"kv_dtype must be one of {', '.join(QUANT_KV_DTYPES)} or None, got {kv_dtype!r}")


def torch_dtype(name: str) -> torch.dtype:
    return _NAMES[name]


def as_tensor(x, what: str) -> torch.Tensor:
    """A detached tensor view of `x` (torch tensor or numpy array), no copy when possible; CPU
    or CUDA (the C++ side checks it is on the device it works on)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(x if x.flags.writeable else x.copy())
    elif hasattr(x, "__dlpack__"):
        t = torch.from_dlpack(x)
    else:
        raise TypeError(f"{what} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{what} is on {t.device}; kvloom works on CPU and CUDA tensors")
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    return t


def kernel_ready(t: torch.Tensor) -> torch.Tensor:
    """Contiguous in the last dimension (what the kernels stream over)."""
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        return t.contiguous()
    return t


def host(t: torch.Tensor) -> torch.Tensor:
    """Metadata tensors (positions, classes, inverse frequencies) are read on the host."""
    return t if t.device.type == "cpu" else t.cpu()


def use_stream(device: torch.device) -> None:
    """Points kvloom's C++ work on `device` at torch's current stream there (CUDA), so it is
    ordered with the caller's work without waiting for the GPU."""
    if device.type == "cuda":
        from . import _core

        _core.set_current_stream(torch.cuda.current_stream(device).cuda_stream)


def parse_device(device) -> torch.device:
    """torch.device of a device spec ("cpu", "cuda", "cuda:1", torch.device); "cuda" means the
    current CUDA device."""
    d = torch.device(device if device is not None else "cpu")
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"kvloom caches live on the CPU or a CUDA device, got {device!r}")
    if d.type == "cuda":
        from . import _core

        if not _core.cuda_built:
            raise ValueError(f"device {device!r}: this build of kvloom has no CUDA backend (it is built when nvcc "
                             "is found; KVLOOM_CUDA=1 makes that required)")
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: torch sees no CUDA device on this machine")
        if d.index is None:
            d = torch.device("cuda", torch.cuda.current_device())
    return d
