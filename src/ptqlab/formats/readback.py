"""The checkpoint read back by the official reader: transformers loads the folder just written and scores a few
sequences, whose logits must match those of the quantized model still in memory.

What this catches is a checkpoint that loads without an error and computes something else: expert tensors under
names the loader does not map (it then initializes those experts at random), a config that leaves layers out, a
layout read transposed. Mixture-of-experts checkpoints have shipped like that, loading fine and scoring at chance.
Both sides compute in float32 (the stored values are exact in it) and without quantizing activations (each
implementation rounds its dynamic activation scales its own way; the weights are what a checkpoint carries), so that
what differs is what the reader reads, not rounding. The match is judged on the logits' relative error
(scale-free, so a tiny random model is judged as a real one); the KL divergence and greedy agreement are recorded
beside it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ptqlab.errors import PtqlabError
from ptqlab.quant.linear import QuantizedLinear

MAX_RELATIVE_ERROR = 0.1
"""Largest ‖Δ logits‖ / ‖logits − their mean‖ accepted. A faithful read stays well below it even where the reader
dequantizes in bf16 (transformers does so for a bf16 checkpoint's experts); experts the reader did not map (left at
their random initialization) land well above it, on tiny random models as on real ones."""
SEQUENCES, LENGTH = 2, 32


def unreadable_experts(scheme) -> str | None:
    """Why transformers' loader cannot read back an MoE's per-expert tensors in `scheme`, or None when it can: it
    fuses the experts dequantized, from FP8 `weight` or packed `weight_packed` tensors with their scales, and maps
    neither INT8 `weight` tensors nor zero points."""
    if scheme.format not in ("pack-quantized", "float-quantized"):
        return f"{scheme.format} experts"
    if not scheme.weights.symmetric:
        return "experts with zero points (asymmetric)"
    return None


@dataclass(frozen=True)
class ReadBack:
    relative_error: float
    kl: float
    """Mean KL(in memory ‖ read back) per token, nats."""
    top1: float
    """Share of positions whose greedy next token agrees."""

    def to_dict(self) -> dict:
        return {k: round(v, 6) for k, v in asdict(self).items()}


def probe_tokens(vocab_size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(min(3, vocab_size - 1), vocab_size, (SEQUENCES, LENGTH), generator=g)


@torch.no_grad()
def compare(expected: torch.Tensor, actual: torch.Tensor) -> ReadBack:
    """How far `actual` logits [B, T, V] are from `expected`."""
    expected, actual = expected.double(), actual.double()
    centred = expected - expected.mean(-1, keepdim=True)
    relative = float((actual - expected).norm() / centred.norm().clamp_min(1e-30))
    log_p, log_q = expected.log_softmax(-1), actual.log_softmax(-1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    top1 = float((expected.argmax(-1) == actual.argmax(-1)).double().mean())
    return ReadBack(relative, kl, top1)


@torch.no_grad()
def read_back(folder: Path, model: nn.Module) -> ReadBack:
    """Load `folder` with transformers (on the CPU, cast to float32) and compare its logits with `model`'s (the quantized
    model in memory, moved to the CPU in float32 and its activations left unquantized: it is done with) on a few
    seeded sequences; PtqlabError when they differ."""
    from transformers import AutoModelForCausalLM

    tokens = probe_tokens(model.config.vocab_size)
    model.to("cpu", torch.float32)  # quantized layers keep their grid values (QuantizedLinear._apply)
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.scheme = replace(module.scheme, input_activations=None)
    expected = model(tokens).logits
    try:
        # In the checkpoint's dtype, then float32 (nn.Module's cast: transformers refuses to cast a quantized model,
        # whose weights it has dequantized here): asked for float32, it fuses dequantized experts in the
        # checkpoint's dtype anyway and then fails on the dtype mismatch.
        reloaded = nn.Module.float(AutoModelForCausalLM.from_pretrained(folder, dtype="auto", device_map="cpu"))
        for module in reloaded.modules():  # compressed-tensors' schemes on the reader's linears
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is not None:
                scheme.input_activations = None
        actual = reloaded(tokens).logits
    except Exception as e:  # whatever the reader raises, the run fails in one line
        first = " ".join(str(e).split())[:200]
        raise PtqlabError(f"transformers cannot read back the checkpoint written to {folder} ({type(e).__name__}: "
                          f"{first}): nothing was written; please report this with the model's config.json") from e
    result = compare(expected, actual)
    del reloaded
    if not result.relative_error <= MAX_RELATIVE_ERROR:
        raise PtqlabError(f"the checkpoint written to {folder} does not compute what the quantized model computed "
                          f"when transformers reads it back (logits off by {result.relative_error:.1%}, KL "
                          f"{result.kl:.3g}, top-1 agreement {result.top1:.0%}): nothing was written; please report "
                          "this with the model's config.json")
    return result
