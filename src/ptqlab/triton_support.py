"""Triton, when it is installed: the one place the kernel modules (runtime/kernels.py, runtime/fused.py,
quant/gptq_triton.py, quant/search_triton.py, quant/token_triton.py) import it from.

`triton`, `tl`, `libdevice`, `gdc_wait` and `gdc_launch_dependents` are None where Triton is absent (CPU-only
installs), so that those modules define their kernels under `if triton is not None:` and still import. Triton's
CPU interpreter (TRITON_INTERPRET=1 in the environment before this module is first imported: `triton.jit` reads it
when it decorates a kernel) runs the same kernels on CPU tensors; the runtime and the quantizers take the kernel
paths only for CUDA tensors (`available`).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import libdevice
except ImportError:  # pragma: no cover - CPU-only installs
    triton = tl = libdevice = None

gdc_wait = gdc_launch_dependents = None
"""Grid dependency control (programmatic dependent launch): None where this Triton has none."""
if triton is not None:
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    except ImportError:  # pragma: no cover - Triton without grid dependency control
        pass


_INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"


def interpreted() -> bool:
    """Whether Triton's CPU interpreter runs the kernels (it runs no inline PTX and no grid dependency control).
    Read once, at import, as `triton.jit` reads it: setting the variable later changes neither."""
    return _INTERPRETED


def available(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels compute with `tensor`: Triton is installed and the tensor is on a CUDA GPU."""
    return triton is not None and tensor.is_cuda
