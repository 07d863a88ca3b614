"""AWQ (Lin et al., 2024), a transform: per input channel, the scale s (on a grid) whose quantized weights err least
on the calibration inputs, which enlarges the weight columns of salient inputs before weight-only quantization."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
import torch

from ptqlab.engine.plan import Plan
from ptqlab.engine.smoothing import ResolvedMapping
from ptqlab.engine.statistics import InputStats
from ptqlab.quant import fp4
from ptqlab.quant.linear import rtn
from ptqlab.quant.primitives import dequantize
from ptqlab.settings import Interval, setting


@dataclass(frozen=True)
class AWQStep:
    """AWQ's settings (YAML: `- awq: {n_grid: 20}`); the weights' format is the recipe's scheme."""

    n_grid: int = setting(20, Interval(1, words="a positive integer, e.g. 20"))
    """Grid points r = 0, 1/n, ..., (n-1)/n of s = x_mean^r / w_mean^(1-r)."""
    duo_scaling: bool = True
    """Divide by the weights' mean magnitude too (llm-compressor's default); False: s = x_mean^r."""

    def smooths_linears(self) -> bool:
        """AWQ scales every exact mapping, a linear's output (v -> o, up -> down) as well as the norms."""
        return True


def awq_scales(x_mean: torch.Tensor, weights: list[torch.Tensor], hessian: torch.Tensor,
               fake_quantize: Callable[[torch.Tensor], torch.Tensor], group_size: int | None, n_grid: int = 20,
               duo_scaling: bool = True) -> tuple[torch.Tensor, float | None, float]:
    """AWQ's grid search: s = x_mean^r / w_mean^(1-r) (duo scaling; x_mean^r otherwise) for r = 0, 1/n, ..., and
    no scaling at all; keep the s whose quantized balance linears have the least output error on the calibration
    inputs. The error Σ_b ||X Wbᵀ - X Ŵbᵀ||² is computed exactly from the inputs' Hessian, tr(ΔW H ΔWᵀ), so no
    activations are kept. -> (scales, the chosen r or None for no scaling, error relative to no scaling)."""
    device = hessian.device
    W = [w.detach().float().to(device) for w in weights]
    x_mean = x_mean.float().to(device)
    w_mean = None
    if duo_scaling:
        stacked = torch.cat(W).abs()
        blocks = stacked.unflatten(-1, (-1, group_size)) if group_size else stacked.unsqueeze(-2)
        w_mean = (blocks / (blocks.amax(dim=-1, keepdim=True) + 1e-6)).flatten(-2).mean(dim=0)

    def loss(s: torch.Tensor) -> float:
        total = 0.0
        for w in W:
            delta = w - fake_quantize(w * s) / s
            total += float(((delta @ hessian) * delta).sum())
        return total

    ones = torch.ones_like(x_mean)
    base = loss(ones)
    best = (base, ones, None)
    for i in range(n_grid):
        r = i / n_grid
        s = x_mean.pow(r) / (w_mean.pow(1 - r) + 1e-4) if duo_scaling else x_mean.pow(r)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        if not torch.isfinite(s).all():
            continue
        value = loss(s)
        if value < best[0]:
            best = (value, s, r)
    return best[1], best[2], best[0] / base if base > 0 else 1.0


def awq(step: AWQStep, mapping: ResolvedMapping, stats: InputStats, input_name: str,
        plan: Plan) -> tuple[torch.Tensor, str]:
    """The scales for one mapping of a layer, searched against round-to-nearest in the weight format of the linears
    it balances (the first one's: Plan.scheme_of; scales in the stored dtype), and a line for the layer report."""
    weights_format = plan.scheme_of(input_name).weights

    def fake_quantize(w: torch.Tensor) -> torch.Tensor:
        # NVFP4: relative to the weight's own global scale, for the search (the quantizer step shares it among the
        # layers vLLM fuses, engine/global_scales.py)
        global_scale = fp4.globals_of(w, plan.scale_dtype) if fp4.has_global_scale(weights_format) else None
        q, scale, zero_point = rtn(w, weights_format, plan.scale_dtype, global_scale)
        return dequantize(q, scale, zero_point, weights_format, torch.float32, global_scale)

    weights = [linear.weight for linear in mapping.balance.values()]
    scales, ratio, relative = awq_scales(stats.channel_mean(input_name), weights, stats.hessian(input_name),
                                         fake_quantize, weights_format.group_size, step.n_grid, step.duo_scaling)
    return scales, "no scaling" if ratio is None else f"r = {ratio:.2f}, output error x{relative:.3f}"
