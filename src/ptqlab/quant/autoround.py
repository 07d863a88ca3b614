"""AutoRound's rounding (Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent"): each weight is
rounded up or down by a learned offset, and each block's range is clipped by learned factors, both tuned by signed
gradient descent on a decoder layer's output error. Pure tensor math; engine/autoround.py runs the descent.

Round-to-nearest picks each weight's closest grid point alone; GPTQ corrects the rest of a row for each rounding
error, one linear at a time, through its input Hessian. AutoRound instead asks of every rounding decision of a whole
decoder layer (attention and MLP together, through the nonlinearities between them) what it does to the layer's
output, and moves it by the sign of that gradient: offsets v in [-0.5, 0.5] added before rounding (the choice between
the two neighbouring grid points), and range factors in [0.5, 1] on each block's max (and min, for zero-point grids).
With the learning rate 1/iters decayed linearly to 0, an offset can travel at most about 0.5, so it stays a rounding
choice and never jumps to a far grid point.

The descent can also start from GPTQ's rounding instead of the nearest one (`start: gptq`): GPTQ's grid values and
clipped scales become the starting offsets (fixed, `base`, in grid units: they may exceed half a step, as GPTQ's
error feedback moves weights) and range factors, and the tuned offsets move each rounding at most half a step from
there. Signed steps move every offset at the same rate whatever its gradient's size, so a descent from the nearest
rounding also flips weights that barely matter; starting from GPTQ, which already chose each rounding from the
layer's input Hessian, the layer-wide descent only has to correct what GPTQ's per-linear objective cannot see.
But GPTQ's per-linear objective is not the layer's: where GPTQ's rounding gives the layer a higher output error than
the nearest one (a layer whose inputs the Hessian of a small calibration set misdescribes), starting there is
starting behind. `start: better` (the default) measures both starts on the layer's output and takes the lower.

The grid is the checkpoint's (primitives.py): a symmetric int grid maps [-absmax, absmax] onto
[qmin - 0.5, qmax + 0.5], an asymmetric one [min, max] onto [qmin, qmax] with an integer zero point; scales are
rounded to their stored dtype in the forward pass too (straight-through), so the tuned weight is exactly the one
`rounded` stores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptqlab.quant.primitives import _broadcastable, _params_from_range, _stored_layout, block_view, grid_range, unblock
from ptqlab.schemes import QuantArgs
from ptqlab.settings import Interval, setting

OFFSET_BOUND = 0.5
"""|v| at most this: an offset chooses between the two grid points next to a weight."""
RANGE_FACTOR_BOUNDS = (0.5, 1.0)
"""A block's range is clipped to at most half, never widened."""


@dataclass(frozen=True)
class AutoRoundConfig:
    """AutoRound's settings (YAML: `- autoround: {iters: 200}`); the weights' format is the recipe's scheme."""

    iters: int = setting(200, Interval(1, words="a positive integer, e.g. 200"))
    """Signed-gradient steps per decoder layer."""
    samples_per_step: int = setting(8, Interval(1, words="a positive integer, e.g. 8"))
    """Calibration samples each step's loss is computed on, drawn at random (seeded per layer) from the set."""
    lr: float = setting(0.0, Interval(0, 1, open_high=True, words="a number in [0, 1), e.g. 0.005; 0: 1 / iters"))
    """Step size of the offsets and range factors, decayed linearly to 0 over the steps; 0: 1 / iters."""
    tune_range: bool = True
    """Tune each block's clipping factors too, not only the rounding offsets."""
    keep_best: bool = True
    """Keep the offsets of the step whose loss was lowest (AutoRound's choice), not the last step's; and the start's
    where that step's error on the probe samples is above the start's (a step is best on its own draw only)."""
    start: str = setting("better", ("better", "gptq", "nearest"))
    """Where the descent starts: GPTQ's rounding and clipped scales (from the layer's input Hessians, as the gptq step
    with scale_search computes them), round-to-nearest with min-max ranges (AutoRound's own start), or the better of
    the two for each decoder layer: the one whose layer output error on the probe samples is lower."""

    @property
    def step_size(self) -> float:
        return self.lr or 1.0 / self.iters


@dataclass
class RoundingParams:
    """The tunable part of one weight's quantization: offsets [block view of the weight] and range factors [blocks]."""

    offsets: torch.Tensor
    max_factor: torch.Tensor
    min_factor: torch.Tensor | None
    """Asymmetric grids only."""
    base: torch.Tensor | None = None
    """Fixed offsets the tuned ones add to (a GPTQ start's rounding), in grid units; None: 0."""
    factor_max: float = RANGE_FACTOR_BOUNDS[1]
    """The range factors' upper bound: 1, or the largest a start needs (an asymmetric start's zero point can need a
    min slightly beyond the block's)."""

    @staticmethod
    def initial(weight: torch.Tensor, args: QuantArgs) -> RoundingParams:
        """Round-to-nearest with min-max ranges: offsets 0, factors 1 (fp32, on the weight's device)."""
        blocks = block_view(weight, args)
        ones = torch.ones(blocks.shape[:-1], device=weight.device)
        return RoundingParams(torch.zeros(blocks.shape, device=weight.device), ones,
                              None if args.symmetric else ones.clone())

    @staticmethod
    def starting_at(weight: torch.Tensor, args: QuantArgs, q: torch.Tensor, scale: torch.Tensor,
                    zero_point: torch.Tensor | None, scale_dtype: torch.dtype) -> RoundingParams:
        """The params that give the grid values `q`, scales `scale` and zero points `zero_point` (a GPTQ result, in
        the checkpoint's layouts): range factors that give those scales (and put each zero point's defining value on
        an integer, not on a rounding tie), and the offsets that round each weight to its q under them."""
        blocks = block_view(weight.float(), args)
        lo, hi = _block_ranges(blocks, args, RoundingParams.initial(weight, args))
        qmin, qmax = grid_range(args)
        step = _broadcastable(scale, args).float().squeeze(-1)
        tiny = torch.finfo(torch.float32).tiny
        if lo is None:
            max_factor, min_factor = step * ((qmax - qmin) / 2) / hi.clamp(min=tiny), None
        else:  # lo·f_min = (qmin - zero)·scale, hi·f_max = lo·f_min + (qmax - qmin)·scale
            low = (qmin - _broadcastable(zero_point, args).float().squeeze(-1)) * step
            min_factor = torch.where(lo < 0, low / lo.clamp(max=-tiny), torch.ones_like(lo))
            max_factor = (low + (qmax - qmin) * step) / hi.clamp(min=tiny)
        factors = [f for f in (max_factor, min_factor) if f is not None]
        factor_max = max([RANGE_FACTOR_BOUNDS[1]] + [float(f.max()) for f in factors])
        params = RoundingParams(torch.zeros(blocks.shape, device=weight.device), max_factor, min_factor,
                                factor_max=factor_max)
        step, zero = _scale_and_zero(blocks, args, params, scale_dtype)
        params.base = block_view(q.float(), args) - zero - blocks / step
        return params

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.offsets, self.max_factor, self.min_factor) if t is not None]

    def clamp_(self) -> None:
        self.offsets.clamp_(-OFFSET_BOUND, OFFSET_BOUND)
        for factor in (self.max_factor, self.min_factor):
            if factor is not None:
                factor.clamp_(RANGE_FACTOR_BOUNDS[0], self.factor_max)

    def copy(self) -> RoundingParams:
        return RoundingParams(*(None if t is None else t.detach().clone()
                                for t in (self.offsets, self.max_factor, self.min_factor)), base=self.base,
                              factor_max=self.factor_max)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (the straight-through estimator)."""
    return x + (x.round() - x).detach()


def _block_ranges(blocks: torch.Tensor, args: QuantArgs, params: RoundingParams):
    if args.symmetric:
        return None, blocks.abs().amax(dim=-1) * params.max_factor
    return (blocks.amin(dim=-1).clamp(max=0) * params.min_factor,
            blocks.amax(dim=-1).clamp(min=0) * params.max_factor)


def _scale_and_zero(blocks: torch.Tensor, args: QuantArgs, params: RoundingParams, scale_dtype: torch.dtype):
    """Each block's scale and zero point (0 for symmetric grids), broadcastable against `blocks`, as
    primitives.quant_params computes them from the clipped ranges, rounded straight-through."""
    qmin, qmax = grid_range(args)
    lo, hi = _block_ranges(blocks, args, params)
    info = torch.finfo(scale_dtype)
    scale = (hi / ((qmax - qmin) / 2) if lo is None else (hi - lo) / (qmax - qmin)).clamp(min=info.tiny, max=info.max)
    scale = (scale + (scale.to(scale_dtype).float() - scale).detach()).unsqueeze(-1)
    zero = 0.0 if lo is None else _round_ste(qmin - lo.unsqueeze(-1) / scale).clamp(qmin, qmax)
    return scale, zero


def _offsets(params: RoundingParams) -> torch.Tensor:
    return params.offsets if params.base is None else params.base + params.offsets


def fake_rounded(weight: torch.Tensor, args: QuantArgs, params: RoundingParams, scale_dtype: torch.dtype) -> torch.Tensor:
    """The dequantized weight the params give, differentiable in them (fp32, the weight's shape)."""
    blocks = block_view(weight.float(), args)
    qmin, qmax = grid_range(args)
    scale, zero = _scale_and_zero(blocks, args, params, scale_dtype)
    q = (_round_ste(blocks / scale + _offsets(params)) + zero).clamp(qmin, qmax)
    return unblock((q - zero) * scale, args, weight.shape)


@torch.no_grad()
def rounded(weight: torch.Tensor, args: QuantArgs, params: RoundingParams, scale_dtype: torch.dtype):
    """The stored form of what `fake_rounded` computes -> (q int8, scale in `scale_dtype`, zero point int8 or None), in
    the checkpoint's layouts."""
    blocks = block_view(weight.float(), args)
    qmin, qmax = grid_range(args)
    scale, zero_point = _params_from_range(*_block_ranges(blocks, args, params), args, scale_dtype)
    scale, zero_point = _stored_layout(scale, args), None if zero_point is None else _stored_layout(zero_point, args)
    zero = 0.0 if zero_point is None else _broadcastable(zero_point, args).float()
    q = ((blocks / _broadcastable(scale, args).float() + _offsets(params)).round() + zero).clamp(qmin, qmax)
    return unblock(q.to(torch.int8), args, weight.shape), scale, zero_point


def sign_step_(params: list[RoundingParams], step_size: float) -> None:
    """One signed-gradient step on every tensor that has a gradient, then back into bounds; gradients cleared."""
    with torch.no_grad():
        for p in params:
            for t in p.tensors():
                if t.grad is not None:
                    t.sub_(step_size * t.grad.sign())
                    t.grad = None
            p.clamp_()
