"""The `autoround` quantizer in the engine: a whole decoder layer's rounding tuned at once (quant/autoround.py) on its
calibration inputs, which the engine already holds, against the float layer's outputs on those same inputs.

The objective is the layer's output, not each linear's: what rounding the q, k, v projections does to the attention
that o_proj then sees, and through the MLP's gate. The layer computes on the inputs the quantized layers before it
produced, and its targets are the float model's outputs of this layer (the float layer on the float model's inputs,
carried beside the quantized ones as `Batch.float_hidden`): so each layer's rounding also makes up for the error
that reaches it from the layers before, which GPTQ's per-linear objective, on the inputs as they are, cannot. Each step draws
`samples_per_step` samples of one calibration batch (seeded by the layer's index: a run repeats exactly) and takes
a signed-gradient step of the offsets and range factors; the layer's own weights get no gradient. The start is
GPTQ's rounding of each linear from its input Hessian (the statistics phase collects them), round-to-nearest, or
(`start: better`, the default) whichever of the two gives the layer the lower output error on the probe samples,
chosen per layer (quant/autoround.py says why). Several ranks each draw from their share and sum their gradients
(and the start's errors), so every rank takes the same step and ends with the same rounding: nothing to send.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ptqlab.engine.capture import Batch
from ptqlab.engine.distributed import SINGLE, World, sum_over_ranks
from ptqlab.engine.statistics import InputStats
from ptqlab.errors import PtqlabError
from ptqlab.models import set_submodule
from ptqlab.quant.autoround import AutoRoundConfig, RoundingParams, fake_rounded, rounded, sign_step_
from ptqlab.quant.gptq import GPTQConfig, HessianError, gptq_many
from ptqlab.quant.linear import QuantizedLinear
from ptqlab.schemes import QuantArgs


class _TunedLinear(nn.Module):
    """A linear computing with the weight its rounding params give, while they are tuned."""

    def __init__(self, linear: nn.Linear, args: QuantArgs, params: RoundingParams, scale_dtype: torch.dtype):
        super().__init__()
        self.linear, self.args, self.params, self.scale_dtype = linear, args, params, scale_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = fake_rounded(self.linear.weight, self.args, self.params, self.scale_dtype)
        return F.linear(x, weight.to(x.dtype), self.linear.bias)


def _rows(value, rows: torch.Tensor, batch_rows: int):
    """A layer keyword argument restricted to `rows` of its batch: tensors of two or more dimensions whose first is
    the batch's (masks, position ids, rotary tables per sample); one-dimensional ones (cache positions) and tensors
    shared by the batch are left whole."""
    if isinstance(value, torch.Tensor):
        return value[rows.to(value.device)] if value.dim() >= 2 and value.shape[0] == batch_rows else value
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, rows, batch_rows) for v in value)
    return value


def _output(result) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


def _gptq_start(config: AutoRoundConfig, name: str, linear: nn.Linear, args: QuantArgs, stats: InputStats,
                scale_dtype: torch.dtype) -> tuple[RoundingParams, list[str]]:
    """The params of GPTQ's rounding of one linear (with its clipping search) -> (params, notes)."""
    gptq = GPTQConfig(scale_search=True)
    try:
        result, = gptq_many(linear.weight.detach()[None], stats.hessian(name)[None], args, gptq, scale_dtype=scale_dtype)
    except HessianError as e:
        raise PtqlabError(f"{name}: {e}; check the calibration data and the model dtype (fp16 overflow? try "
                          "--dtype bfloat16)") from e
    notes = [f"{name}: {result.dead_columns} input channels never active in calibration"] if result.dead_columns else []
    if result.dampening_frac != gptq.dampening_frac:
        notes.append(f"{name}: Hessian not positive definite; dampening raised to {result.dampening_frac:g}")
    return RoundingParams.starting_at(linear.weight.detach(), args, result.q, result.scale,
                                     result.zero_point, scale_dtype), notes


def autoround_layer(config: AutoRoundConfig, model: nn.Module, layer: nn.Module, targets: dict[str, nn.Linear],
                    plan, batches: list[Batch], index: int, device: torch.device, world: World = SINGLE,
                    stats: InputStats | None = None) -> tuple[list[str], list[str]]:
    """Tune and quantize `targets` (the linears of decoder layer `index`, by qualified name in `model`), replacing
    each by its QuantizedLinear -> (notes, details). `stats`: the layers' input Hessians, for a GPTQ start."""
    kwargs = [batch.layer_kwargs[index] for batch in batches]
    with torch.no_grad():  # the float model's outputs of this layer: the targets, and the next layer's float inputs
        references = [_output(layer((batch.hidden if batch.float_hidden is None else batch.float_hidden).to(device),
                                    **kw)).to(batch.hidden.device)
                      for batch, kw in zip(batches, kwargs)]
    frozen = [p for p in layer.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    starts = ("gptq", "nearest") if config.start == "better" else (config.start,)
    start_params: dict[str, dict[str, RoundingParams]] = {start: {} for start in starts}  # start -> linear -> params
    notes = []
    for name, linear in targets.items():
        args = plan.scheme_of(name).weights
        if "gptq" in starts:
            start_params["gptq"][name], linear_notes = _gptq_start(config, name, linear, args, stats, plan.scale_dtype)
            notes += linear_notes
        if "nearest" in starts:
            start_params["nearest"][name] = RoundingParams.initial(linear.weight, args)

    def install(start: str) -> None:
        for name, linear in targets.items():
            set_submodule(model, name, _TunedLinear(linear, plan.scheme_of(name).weights, start_params[start][name],
                                                    plan.scale_dtype))

    generator = torch.Generator().manual_seed(index)
    rows_per_batch = torch.tensor([len(batch.input_ids) for batch in batches], dtype=torch.float)

    def draw() -> tuple[int, torch.Tensor]:
        b = int(torch.multinomial(rows_per_batch, 1, generator=generator))
        rows = torch.randperm(len(batches[b].input_ids), generator=generator)[:config.samples_per_step]
        return b, rows.sort().values

    def output_error(b: int, rows: torch.Tensor) -> torch.Tensor:
        """Mean squared error per hidden value over the real tokens of `rows` of batch `b`."""
        batch = batches[b]
        mask = batch.attention_mask[rows].to(device)
        where = rows.to(batch.hidden.device)
        output = _output(layer(batch.hidden[where].to(device),
                               **{k: _rows(v, rows, len(batch.input_ids)) for k, v in kwargs[b].items()}))
        error = (output.float() - references[b][where].to(device).float()).square().sum(-1)
        return (error * mask).sum() / (mask.sum() * output.shape[-1])

    probe = draw()  # the rounding's error before and after (and each start's), on the same samples
    best, best_loss, best_step = None, float("inf"), config.iters - 1
    try:
        start_losses = torch.zeros(len(starts), device=device)
        for i, start in enumerate(starts):
            install(start)
            with torch.no_grad():
                start_losses[i] = output_error(*probe)
        own_losses = start_losses.clone()  # on this rank's probe, as `last_loss`
        if world.several:  # every rank chooses the same start: the error over all ranks' probes
            sum_over_ranks([start_losses])
        chosen = starts[int(start_losses.argmin())]  # a tie keeps the first, GPTQ's
        first_loss = float(own_losses[starts.index(chosen)])
        if chosen != starts[-1]:
            install(chosen)
        tuned = {name: (linear, plan.scheme_of(name).weights, start_params[chosen][name])
                 for name, linear in targets.items()}
        del start_params  # the other start's offsets, weight-sized: not held through the descent
        for _, _, params in tuned.values():
            for t in params.tensors() if config.tune_range else [params.offsets]:
                t.requires_grad_(True)
        tensors = [t for _, _, p in tuned.values() for t in p.tensors() if t.requires_grad]
        # Every start's offsets are 0 (a GPTQ start's rounding is in its fixed `base`): only the factors are kept.
        at_start = {n: [t.detach().clone() for t in p.tensors()[1:]] for n, (_, _, p) in tuned.items()}
        for step in range(config.iters):
            with torch.enable_grad():
                loss = output_error(*draw())
                loss.backward()
            loss = loss.detach()
            if world.several:  # every rank steps with the gradient of all ranks' samples
                for t in tensors:
                    t.grad = torch.zeros_like(t) if t.grad is None else t.grad
                sum_over_ranks([loss, *(t.grad for t in tensors)])
            if config.keep_best and float(loss) < best_loss:
                best, best_loss, best_step = {n: p.copy() for n, (_, _, p) in tuned.items()}, float(loss), step
            sign_step_([p for _, _, p in tuned.values()], config.step_size * (1 - step / config.iters))
        if best is not None:
            for name, (_, _, params) in tuned.items():
                for t, kept in zip(params.tensors(), best[name].tensors()):
                    t.data.copy_(kept)
        last_loss = float(output_error(*probe))
        # The kept step was the best on its own draw; on the probe it can still be worse than the start (a GPTQ start
        # is often near a local optimum already), and then the start is kept: tuning never raises the probe's error.
        probe_losses = torch.tensor([first_loss, last_loss], device=device)
        if world.several:  # every rank decides alike
            sum_over_ranks([probe_losses])
        start_kept = config.keep_best and bool(probe_losses[1] > probe_losses[0])
        if start_kept:
            for name, (_, _, params) in tuned.items():
                params.offsets.data.zero_()
                for t, kept in zip(params.tensors()[1:], at_start[name]):
                    t.data.copy_(kept)
            last_loss = first_loss
    finally:
        for name, linear in targets.items():
            set_submodule(model, name, linear)
        for p in frozen:
            p.requires_grad_(True)
    for name, (linear, args, params) in tuned.items():
        q, scale, zero_point = rounded(linear.weight.detach(), args, params, plan.scale_dtype)
        set_submodule(model, name, QuantizedLinear(q, scale, zero_point,
                                                   None if linear.bias is None else linear.bias.detach(),
                                                   plan.scheme_of(name)))
        linear.to("meta")
    for batch, reference in zip(batches, references):
        batch.float_hidden = reference
    details = [f"autoround: layer output error {first_loss:.4g} at the start ({chosen}), {last_loss:.4g} tuned "
               + ("(the start kept: tuning raised the probe's error)" if start_kept else
                  f"(step {best_step + 1} of {config.iters} kept)")]
    if len(starts) > 1:
        details.append("autoround: start errors " + ", ".join(f"{start} {float(loss):.4g}"
                                                              for start, loss in zip(starts, own_losses))
                       + f"; started from {chosen}, the lower" + (" over all ranks' probes" if world.several else ""))
    return notes, details
