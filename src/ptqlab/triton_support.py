"""Triton, when it is installed: the one place the kernel modules (runtime/kernels.py, runtime/int4_kernels.py,
runtime/fused.py, quant/gptq_triton.py, quant/search_triton.py, quant/token_triton.py) import it from.

`triton`, `tl`, `libdevice`, `gdc_wait` and `gdc_launch_dependents` are None where Triton is absent (CPU-only
installs), so that those modules define their kernels under `if triton is not None:` and still import. Triton's
CPU interpreter (TRITON_INTERPRET=1 in the environment before this module is first imported: `triton.jit` reads it
when it decorates a kernel) runs the same kernels on CPU tensors, which is how the test suite checks their logic
without a GPU; the runtime and the quantizers still take the kernel paths only for CUDA tensors (`available`).
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
    """Whether Triton's CPU interpreter runs the kernels (it runs no inline PTX, no grid dependency control and no
    libdevice). Read once, at import, as `triton.jit` reads it: setting the variable later changes neither."""
    return _INTERPRETED


if _INTERPRETED:

    @triton.jit
    def _rint(x):
        """Round half to even, as libdevice's rint: below 2^23 adding and subtracting 2^23 leaves exactly the
        rounded value (fp32 addition rounds to nearest even at a unit in the last place of 1); from 2^23 up every
        fp32 is already an integer."""
        magnitude = tl.abs(x)
        rounded = tl.where(magnitude < 8388608.0, (magnitude + 8388608.0) - 8388608.0, magnitude)
        return tl.where(x < 0, -rounded, rounded)

    @triton.jit
    def _div_rn(x, y):
        """IEEE division rounded to nearest, as libdevice's div_rn."""
        return tl.div_rn(x, y)

    class _InterpretedLibdevice:
        """The libdevice functions the kernels use, for the interpreter, which runs no extern (libdevice) calls: the
        same values from Triton's own operations. A kernel that needs another one fails here by name."""

        rint = _rint
        div_rn = _div_rn

    libdevice = _InterpretedLibdevice


def available(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels compute with `tensor`: Triton is installed and the tensor is on a CUDA GPU."""
    return triton is not None and tensor.is_cuda
