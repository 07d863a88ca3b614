"""Rotation (QuaRot, Ashkboos et al. 2024; SpinQuant's R1/R2 without learning), a model-wide transform applied to the
float model before any statistics are collected: an orthogonal Q turns the residual stream h into h Q, and a
per-head H turns each value head v into H v. The function computed is unchanged (RMSNorm without mean subtraction
commutes with a rotation once its weight is folded into the linears that read it), but outlier channels are spread
over all channels, so the weights and activations the quantizer sees have far smaller ranges. Everything is folded
into the weights: the checkpoint is an ordinary model of its architecture, read by transformers and vLLM unchanged.

The math is pure functions over tensors (`random_hadamard`, `fold_norm`, `rotate_readers`, ...); `rotate_model`
applies them to a model through its family row (ptqlab.families), refusing in one line what it cannot make exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ptqlab.errors import PtqlabError
from ptqlab.families import ModelFamily, family_of, head_dim, text_config
from ptqlab.settings import Interval, setting


@dataclass(frozen=True)
class RotateStep:
    """Rotation's settings (YAML: `- rotate: {seed: 0}`, first of the steps)."""

    seed: int = setting(0, Interval(0, 2**63 - 1, words="an integer >= 0, e.g. 0"))
    """Seeds the random signs (and, for a width that is not a power of two, the random orthogonal factor): the same
    recipe gives the same checkpoint."""
    heads: bool = True
    """Also rotate each value head by a head_dim Hadamard (v rows, o columns per head): spreads v_proj's output and
    o_proj's input outliers, exactly (attention mixes tokens, never the channels of a head)."""


# ---- the math: pure functions over tensors ---------------------------------------------------------------------------

def hadamard(n: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix of order n (a power of two), scaled to be orthogonal, float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two order, not {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def random_hadamard(n: int, generator: torch.Generator) -> torch.Tensor:
    """An orthogonal n x n float64 matrix that spreads every channel over all others: (H_{2^k} ⊗ R_m) diag(s), with
    n = 2^k m (m odd), H Sylvester's Hadamard of the largest power-of-two factor, R_m a random orthogonal matrix
    (QR of a Gaussian, signs fixed) of the odd rest (1 when n is a power of two), s random ±1. The Kronecker product
    of orthogonal matrices is orthogonal; known Hadamard orders such as 12 or 20 (QuaRot's tables) would spread a
    little more evenly, but a random orthogonal factor needs no table and is exact all the same."""
    power = n & -n  # the largest power of two dividing n
    rest = n // power
    q = hadamard(power)
    if rest > 1:
        gaussian = torch.randn(rest, rest, generator=generator, dtype=torch.float64)
        r, upper = torch.linalg.qr(gaussian)
        diagonal = torch.diagonal(upper)
        r = r * torch.where(diagonal < 0, -1.0, 1.0).to(torch.float64)  # QR's signs fixed: Haar-distributed
        q = torch.kron(q, r.contiguous())
    signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
    return q * signs  # columns scaled: Q diag(s)


def norm_scale(weight: torch.Tensor, offset: float) -> torch.Tensor:
    """What an RMSNorm multiplies each channel by: its weight, or 1 + weight (Gemma-style, `offset` 1)."""
    return weight.double() + offset


def fold_norm(scale: torch.Tensor, readers: list[torch.Tensor]) -> list[torch.Tensor]:
    """The readers' weights [out, in] with the norm's per-channel scale folded into their columns: W diag(g)."""
    return [w.double() * scale for w in readers]


def rotate_readers(weight: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A linear (or embedding table) that reads the residual stream h Q in place of h: W -> W Q (columns)."""
    return weight.double() @ q


def rotate_writer(weight: torch.Tensor, bias: torch.Tensor | None, q: torch.Tensor):
    """A linear whose output adds into the residual stream, now h Q: W -> Qᵀ W (rows) and b -> Qᵀ b."""
    return q.T @ weight.double(), None if bias is None else q.T @ bias.double()


def rotate_heads_rows(weight: torch.Tensor, bias: torch.Tensor | None, h: torch.Tensor):
    """v_proj: each head's rows by H (v -> H v per head). weight [heads * head_dim, in]."""
    d = h.shape[0]
    w = weight.double().reshape(-1, d, weight.shape[1])
    w = torch.einsum("ij,hjk->hik", h, w).reshape(weight.shape)
    return w, None if bias is None else (bias.double().reshape(-1, d) @ h.T).reshape(-1)


def rotate_heads_columns(weight: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """o_proj: each head's columns by Hᵀ, undoing H on that head's attention output. weight [out, heads * head_dim]."""
    d = h.shape[0]
    w = weight.double().reshape(weight.shape[0], -1, d)
    return (w @ h.T).reshape(weight.shape)


# ---- applying it to a model ------------------------------------------------------------------------------------------

def refusal(family: ModelFamily) -> str | None:
    """Why rotation cannot be exact for this family (None: it can), as the end of one line."""
    norms = family.norms
    if family.experts is not None:
        return "mixture-of-experts models are not rotated yet (the router and every expert read the residual stream)"
    if family.vision:
        return "vision-language models are not rotated (the projector writes the residual stream unrotated)"
    if norms.attention_output or norms.mlp_output or norms.attention_input is None or norms.mlp_input is None:
        return ("its norms sit after the attention/MLP (post-norms), which normalize a block's output before it joins "
                "the residual stream, so a rotation cannot pass through them")
    if norms.low_rank or not family.linears.o_reads_v or family.keep or family.layer_kinds:
        return "its attention is not the q/k/v/o of the family table's roles (latent or linear attention)"
    return None


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(param.dtype))  # callers hold no_grad; a slice of a parameter is written through


def _check_norm(name: str, norm: nn.Module) -> None:
    if isinstance(norm, nn.LayerNorm) or getattr(norm, "bias", None) is not None:
        raise PtqlabError(f"rotate: {name} is a LayerNorm (subtracts the mean, adds a bias), which a rotation does "
                          "not pass through; remove the rotate step for this model")


@torch.no_grad()
def rotate_model(step: RotateStep, model: nn.Module) -> list[str]:
    """Rotate `model` (a float transformers causal LM, whole in memory) in place -> notes. Its norms become
    identities (their scales folded into the linears that read them); a tied head is untied, since the final norm's
    scale must be folded into the head but not into the embeddings (one table cannot be both)."""
    config = text_config(model.config)
    family = family_of(config, "rotate")
    why = refusal(family)
    if why is not None:
        raise PtqlabError(f"rotate: {config.model_type}: {why}; remove the rotate step for this model")
    generator = torch.Generator().manual_seed(step.seed)
    q = random_hadamard(config.hidden_size, generator)
    roles, norms = family.linears, family.norms
    notes = []

    embeddings = model.get_submodule(family.embeddings)
    head = model.get_submodule(family.head)
    if head.weight is embeddings.weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
        if config is not model.config:
            config.tie_word_embeddings = False
        notes.append("rotate: the head was tied to the embeddings and is now its own tensor (the final norm's scale "
                     "is folded into the head only)")
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not module.weight.is_floating_point():
            raise PtqlabError(f"rotate: {name} is already quantized; give the 16-bit original")

    _set(embeddings.weight, rotate_readers(embeddings.weight, q))
    offset = norms.offset
    for index, layer in enumerate(model.get_submodule(family.layers)):
        prefix = f"{family.layers}.{index}"
        for norm_name, readers, writer in ((norms.attention_input, roles.qkv, roles.o),
                                           (norms.mlp_input, roles.gate_up, roles.down)):
            norm = layer.get_submodule(norm_name)
            _check_norm(f"{prefix}.{norm_name}", norm)
            scale = norm_scale(norm.weight, offset)
            for reader in readers:
                linear = layer.get_submodule(reader)
                _set(linear.weight, rotate_readers(fold_norm(scale, [linear.weight])[0], q))
            norm.weight.fill_(1.0 - offset)
            out = layer.get_submodule(writer)
            weight, bias = rotate_writer(out.weight, out.bias, q)
            _set(out.weight, weight)
            if bias is not None:
                _set(out.bias, bias)
        if step.heads:
            _rotate_heads(layer, roles, config, generator)
    final = model.get_submodule(family.final_norm)
    _check_norm(family.final_norm, final)
    _set(head.weight, rotate_readers(fold_norm(norm_scale(final.weight, offset), [head.weight])[0], q))
    final.weight.fill_(1.0 - offset)
    kind = "Hadamard" if config.hidden_size & (config.hidden_size - 1) == 0 else "Hadamard ⊗ random orthogonal"
    notes.append(f"rotate: residual stream by a randomized {kind} of {config.hidden_size} (seed {step.seed})"
                 + (f", value heads by one of {head_dim(config)}" if step.heads else ""))
    return notes


def _rotate_heads(layer: nn.Module, roles, config, generator: torch.Generator) -> None:
    """v rows and o columns per head (a fused qkv: its v rows, the last kv_heads * head_dim)."""
    width = head_dim(config)
    h = random_hadamard(width, generator)
    v = layer.get_submodule(roles.v)
    kv_rows = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    rows = slice(v.weight.shape[0] - kv_rows * width, None) if roles.fused_qkv else slice(None)
    weight, bias = rotate_heads_rows(v.weight[rows], None if v.bias is None else v.bias[rows], h)
    _set(v.weight[rows], weight)
    if bias is not None:
        _set(v.bias[rows], bias)
    o = layer.get_submodule(roles.o)
    _set(o.weight, rotate_heads_columns(o.weight, h))
