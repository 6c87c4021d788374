"""Precision, memory layout, optimizer and allocator settings: the fast path every bundle shares."""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import weakref
from collections.abc import Iterable
from enum import Enum

import torch

__all__ = [
    "MALLOC_TUNABLES",
    "Precision",
    "autocast",
    "cast_for_inference",
    "check_precision",
    "cpu_has_fast_bf16",
    "dtype_of",
    "make_adamw",
    "reexec_with_malloc_tuning",
    "resolve_precision",
    "to_memory_format",
]

# glibc mmaps every allocation above 32 MiB and unmaps it on free, so large activations page-fault on each step
# (1.5-1.9x slower on CPU, see bench/README.md). Never mmap, never trim.
MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


class Precision(str, Enum):
    """Numeric precision of training and sampling ("auto" picks bf16 where the hardware is fast at it)."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


_DTYPES = {Precision.FP32: torch.float32, Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}


def cpu_has_fast_bf16() -> bool:
    """True when this CPU has bf16 matrix units (AMX or AVX512-BF16), where bf16 is several times faster than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str | Precision, device: torch.device | str) -> Precision:
    """Validate `precision` for `device` ("auto": bf16 on bf16-capable GPUs and AMX/AVX512-BF16 CPUs, else fp32).

    fp16 needs CUDA; bf16 needs a CPU or a GPU that supports it.
    """
    device = torch.device(device)
    if precision == "auto":
        fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()
        return Precision.BF16 if fast else Precision.FP32
    precision = Precision(precision)
    if precision is Precision.FP16 and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device; on CPU use bf16 (fast on AMX CPUs) or fp32.")
    if precision is Precision.BF16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU does not support bf16: use precision fp16 or fp32.")
    return precision


def check_precision(precision: str | Precision) -> str:
    """Return `precision` as a string after checking it names a precision or "auto"."""
    return "auto" if precision == "auto" else Precision(precision).value


def dtype_of(precision: str | Precision) -> torch.dtype:
    """The torch dtype of a precision."""
    return _DTYPES[Precision(precision)]


def autocast(device: torch.device | str, precision: str | Precision) -> contextlib.AbstractContextManager:
    """An autocast context for bf16/fp16, or a no-op for fp32 ("auto" is resolved for `device`)."""
    precision = resolve_precision(precision, device)
    if precision is Precision.FP32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=_DTYPES[precision])


def to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Return `x` in channels_last layout when asked and 4-D, else unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x


_CAST_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weights_version(network: torch.nn.Module) -> int:
    # every in-place update (optimizer step, load_state_dict) bumps a tensor's version counter
    return sum(p._version for p in network.parameters()) + sum(b._version for b in network.buffers())


def cast_for_inference(network: torch.nn.Module, precision: str | Precision, channels_last: bool) -> torch.nn.Module:
    """A copy of `network` with weights in `precision` and channels_last layout, or `network` itself for fp32 NCHW.

    The copy is cached per network and setting, and made anew when the network's weights have changed.
    """
    precision = resolve_precision(precision, next(network.parameters()).device)
    if precision is Precision.FP32 and not channels_last:
        return network
    source = network.module if hasattr(network, "module") else network
    key = (precision, channels_last, _weights_version(source))
    cached = _CAST_CACHE.get(source)
    if cached is not None and cached[0] == key:
        return cached[1]
    net = copy.deepcopy(source).eval().to(dtype=_DTYPES[precision])
    net = net.to(memory_format=torch.channels_last) if channels_last else net
    _CAST_CACHE[source] = (key, net)
    return net


def make_adamw(
    params: Iterable[torch.nn.Parameter], lr: float = 1e-4, weight_decay: float = 0.0, device: str | None = None
) -> torch.optim.AdamW:
    """AdamW with the fused kernel where the device supports it (CUDA, and CPU in torch >= 2.4), else foreach."""
    params = list(params)
    dev = torch.device(device) if device is not None else (params[0].device if params else torch.device("cpu"))
    fused_ok = dev.type in ("cuda", "cpu")
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused_ok)
    except (RuntimeError, TypeError):  # older builds without a fused kernel for this device
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def reexec_with_malloc_tuning() -> None:
    """Re-run this Python process with the glibc malloc setting if it is not set yet (Linux/glibc only)."""
    if os.environ.get("GLIBC_TUNABLES") or not sys.platform.startswith("linux") or os.environ.get("MEDDIFF_NO_REEXEC"):
        return
    env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES)
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
