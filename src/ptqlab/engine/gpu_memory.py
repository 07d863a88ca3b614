"""What a run takes on a GPU besides the tensors the memory plan counts, and the one line a run gets when a GPU is too
small for it: refused before loading, or out of memory during the run.

Beside its tensors a process holds on the GPU its CUDA context, the libraries' handles and workspaces (cuBLAS,
cuSOLVER) and the kernels CUDA loads on first use. Both are measured once per device at start-up (`cuda_overhead`:
the context as NVML's used memory of the device across its creation, the libraries as the drop in free memory
across a first use of each on tiny tensors). The memory plan (engine/memory.py) adds them, the allocator's rounding
and its margin to its GPU peak, and compares the sum with what the GPU had free before this process took anything
(`free_gpu_bytes`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F

from ptqlab.engine.memory import (LIBRARIES_PART, MARGIN_PART, ROUNDING_PART, MemoryPlan, ModelShape, RunShape,
                                  estimate, format_bytes, size_flag)
from ptqlab.errors import PtqlabError


def non_tensor_bytes(free_bytes: Callable[[], int], use_libraries: Callable[[], None]) -> int:
    """What a first use of the libraries leaves taken on a device: the drop of `free_bytes()` across
    `use_libraries()`, which frees every tensor it makes (what stays is handles, workspaces, loaded kernels). Never
    below 0: another process on a shared GPU may free memory meanwhile."""
    before = free_bytes()
    use_libraries()
    return max(0, before - free_bytes())


_OVERHEAD: dict[int, int] = {}
"""cuda_overhead's measurement per device index: once per process, since the libraries stay loaded."""


def cuda_overhead(device: torch.device) -> int:
    """What this process takes on `device` beside its tensors: its CUDA context and what the libraries a calibration
    uses keep, measured the first time it is asked for (a few milliseconds, before the process has used the GPU
    otherwise) and kept for the process."""
    index = _index(device)
    if index not in _OVERHEAD:
        context = _context_bytes(index)
        _OVERHEAD[index] = context + non_tensor_bytes(lambda: _free_to_cudamalloc(index),
                                                      lambda: _use_libraries(index))
    return _OVERHEAD[index]


def free_gpu_bytes(device: torch.device) -> int:
    """What a run can have on `device`: cudaMemGetInfo's free memory (another process's share is not in it), plus
    what this process holds already that its plan counts: its context and libraries (cuda_overhead, measured first
    if they were not) and blocks torch has cached but no tensor uses. On a GPU another process shares, about what
    nvidia-smi showed free before this process started."""
    index = _index(device)
    overhead = cuda_overhead(device)
    cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
    return torch.cuda.mem_get_info(index)[0] + overhead + cached


def _index(device: torch.device) -> int:
    """The device's index, without creating a CUDA context where none exists yet (torch's default device is 0)."""
    if device.index is not None:
        return device.index
    return torch.cuda.current_device() if torch.cuda.is_initialized() else 0


def _context_bytes(index: int) -> int:
    """The memory this process's CUDA context takes on device `index`, created here: NVML's used memory of the
    device (read without a context) just before and after. 0 where it cannot be told (no NVML; a context made
    earlier): such a context is outside both the free figure and the plan, which still compare alike."""
    before = None
    if not torch.cuda.is_initialized():
        try:
            before = torch.cuda.device_memory_used(index)
        except Exception:  # noqa: BLE001 (pynvml missing, or NVML's own errors: the context is left out of both)
            before = None
    torch.cuda.mem_get_info(index)  # creates the context
    if before is None:
        return 0
    return max(0, torch.cuda.device_memory_used(index) - before)


def _free_to_cudamalloc(index: int) -> int:
    """The device's free memory with torch's unused cached blocks given back (what cudaMalloc could still have)."""
    torch.cuda.synchronize(index)
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(index)[0]


def _use_libraries(index: int) -> None:
    """Each library call a calibration makes, once, on tiny tensors: cuBLAS matmuls in every compute dtype (a handle
    and a workspace per dtype's kernels), scaled-dot-product attention, and GPTQ's cuSOLVER Cholesky, inverse and
    upper factor. Every tensor made here is let go."""
    device = torch.device("cuda", index)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.randn(64, 64, device=device, dtype=dtype)
        (x @ x).sum().item()
        q = torch.randn(1, 2, 16, 64, device=device, dtype=dtype)
        F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().item()
    hessian = torch.eye(64, device=device) * 2 + 0.01
    factor, _ = torch.linalg.cholesky_ex(hessian)
    upper, _ = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
    upper.sum().item()
    del x, q, hessian, factor, upper


def check_gpu_budget(model: ModelShape, run: RunShape, plan: MemoryPlan, free: int, allowed: int | None) -> None:
    """One line, before any weight is read, when the plan's GPU peak (its tensors in the placement chosen for the
    budget, the libraries' measured memory, the allocator's rounding, the margin) exceeds what the GPU has free
    (cudaMemGetInfo, another process's share not in it) or what --max-gpu-memory `allowed`: the figures, and the
    settings that would fit with what each needs."""
    limit = free if allowed is None else min(free, allowed)
    if plan.gpu_bytes is None or plan.gpu_bytes <= limit:
        return
    beside = [plan.parts.get(part, 0) for part in (LIBRARIES_PART, ROUNDING_PART, MARGIN_PART)]
    figures = (f"tensors {format_bytes(plan.gpu_bytes - sum(beside))} + CUDA context and libraries "
               f"{format_bytes(beside[0])} (measured) + allocator rounding {format_bytes(beside[1])} + margin "
               f"{format_bytes(beside[2])}")
    if allowed is not None and allowed < free:
        where = f"{format_bytes(allowed)} is allowed (--max-gpu-memory) of {format_bytes(free)} free on the GPU"
    else:
        where = (f"{format_bytes(free)} is free on the GPU (cudaMemGetInfo, with what this process holds: other "
                 "processes hold the rest, and --max-gpu-memory cannot raise it)")
    fixes = [f"--max-gpu-memory {size_flag(plan.gpu_bytes)}"] if allowed is not None and plan.gpu_bytes <= free else []
    for option, field, value in (("--calib-batch-size", "batch_size", run.batch_size),
                                 ("--num-samples", "samples", run.samples)):
        while value > 1 and not fixes:
            value //= 2
            smaller = replace(run, **{field: value, "batch_size": min(run.batch_size, value)})
            fitting = estimate(model, smaller, limit)
            if fitting.gpu_bytes <= limit:
                fixes.append(f"{option} {value} (peak {format_bytes(fitting.gpu_bytes)})")
    changes = [f"use {' or '.join(fixes)}"] if fixes else []
    if plan.gpu_bytes > free:
        changes.append(f"free {format_bytes(plan.gpu_bytes - free)} more on the GPU")
    raise PtqlabError(f"this run needs about {format_bytes(plan.gpu_bytes)} of GPU memory at its peak ({figures}; "
                      f"{plan.placement()}) and {where}: {', or '.join(changes)}; --stream lowers CPU memory, not "
                      "GPU memory (`--plan` shows where it goes)")


def tried_to_allocate(message: str) -> str | None:
    """'2.00 GiB' of torch's "CUDA out of memory. Tried to allocate 2.00 GiB. ..."; None where it says no size."""
    match = re.search(r"[Tt]ried to allocate ([0-9.]+ ?[KMGT]?i?B)", message)
    return match.group(1) if match else None


def out_of_memory_line(phase: str, layer: int | None, detail: str, planned: int | None, seen: int | None,
                       lower: tuple[str, str] | None, batch_size: int, kept: str | None, next_layer: int) -> str:
    """The one line a run that ran out of GPU memory ends with: what ran out (torch's size), where (`phase`, `layer`),
    the plan's GPU peak (`planned`) and the peak torch reserved (`seen`), what is `kept` (the partial folder, with
    the layers before `next_layer`), and what to change. `lower`: (--max-gpu-memory value, the placement the plan
    then picks) where a lower budget moves more to the CPU; that keeps the resume state. Else a smaller
    --calib-batch-size, which starts over (the kept hidden states are per batch)."""
    tried = tried_to_allocate(detail)
    figures = [f"tried to allocate {tried}" if tried else None,
               None if planned is None else f"the plan's GPU peak {format_bytes(planned)}",
               None if seen is None else f"the peak seen {format_bytes(seen)} (reserved by torch)"]
    where = f"{phase}{'' if layer is None else f' of layer {layer}'}"
    head = f"the GPU ran out of memory in {where} ({'; '.join(f for f in figures if f) or 'no size given'})"
    if kept is not None and next_layer > 0:
        state = f"decoder layers 0-{next_layer - 1} are kept in {kept}"
        resumes = f"resumes from layer {next_layer}"
    else:
        state, resumes = "no layer was finished, nothing kept", "starts over"
    smaller = max(1, batch_size // 2)
    restart = " (starts over: the kept state is per batch)" if kept is not None and next_layer > 0 else ""
    if lower is not None:
        change = (f"the same command with --max-gpu-memory {lower[0]} ({lower[1]}) {resumes}; or use "
                  f"--calib-batch-size {smaller}{restart}")
    elif batch_size > 1:
        change = f"use --calib-batch-size {smaller}{restart} or fewer --num-samples"
    else:
        change = "use fewer --num-samples or a shorter --max-seq-len, or free memory on the GPU"
    return f"{head}: {state}; {change}"
