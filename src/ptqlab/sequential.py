"""The layer-sequential calibration engine: capture, statistics, transforms, quantize, propagate — one decoder layer
at a time.

1. Capture: every decoder layer is swapped for a catcher that records its keyword arguments (attention masks of
   its own kind, position embeddings, ...) and passes the hidden states through; one forward of the base model
   per calibration batch then yields layer 0's inputs and every layer's arguments, with no wasted layer compute.
2. For each layer: forward the calibration batches while hooks accumulate, for every distinct input (q/k/v share
   one, gate/up share one) and over real tokens only (padding masked out), H = 2/n Σ XᵀX and, as the recipe's
   transforms need them, per-channel max |x| (SmoothQuant) and mean |x| (AWQ); apply the transforms
   (smoothing.py), updating those statistics exactly instead of forwarding again (x -> x/s: H -> H / (s sᵀ));
   quantize the layer's linears (GPTQ from H, or round-to-nearest); forward again with the quantized weights to
   produce the next layer's inputs, so that every layer is calibrated on what the quantized model really feeds it.
3. Only the current layer needs to be on the accelerator: with `offload`, the others stay on the CPU.

Hessians are accumulated with fp32 matmuls; where activations are bf16/fp16, TF32 tensor cores are exact for them
(a bf16 value has 8 significant bits, TF32 keeps 11), so the fast path loses nothing.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ptqlab import recipes, smoothing
from ptqlab.data import CalibrationSet
from ptqlab.errors import PtqlabError
from ptqlab.models import decoder_layers, model_device, model_dtype, names_by_layer, set_submodule, synchronizer
from ptqlab.progress import track
from ptqlab.quant.gptq import GPTQConfig, HessianError, gptq
from ptqlab.quant.linear import QuantizedLinear, reuse_dequantized_weights, rtn
from ptqlab.quant.primitives import dequantize
from ptqlab.schemes import QuantArgs


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T] 1 for real tokens
    layer_kwargs: list[dict] = field(default_factory=list)  # per decoder layer
    hidden: torch.Tensor | None = None  # the current layer's input [B, T, H]


# A sample joins a batch only if it is at least this fraction of the batch's longest one: padding, computed and
# thrown away, then stays under a quarter of each row, whatever the spread of lengths (chats and docstrings vary
# from tens to thousands of tokens).
MIN_FILL = 0.75


def make_batches(calibration: CalibrationSet, batch_size: int, pad_id: int) -> list[Batch]:
    """Length-bucketed batches of at most `batch_size` samples (sorted by length, each at least MIN_FILL of its
    batch's longest), right-padded with a mask."""
    samples = sorted(calibration.samples, key=len, reverse=True)
    groups: list[list[torch.Tensor]] = []
    for sample in samples:
        if groups and len(groups[-1]) < batch_size and len(sample) >= MIN_FILL * len(groups[-1][0]):
            groups[-1].append(sample)
        else:
            groups.append([sample])
    batches = []
    for group in groups:
        length = len(group[0])
        ids = torch.full((len(group), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), length), dtype=torch.long)
        for row, sample in enumerate(group):
            ids[row, :len(sample)] = sample
            mask[row, :len(sample)] = 1
        batches.append(Batch(ids, mask))
    return batches


class _LayerCatcher(nn.Module):
    """Stands in for a decoder layer during capture: records its kwargs, passes hidden states through."""

    def __init__(self, index: int, layer: nn.Module, sink: list):
        super().__init__()
        self.index, self.sink = index, sink
        self.attention_type = getattr(layer, "attention_type", None)  # models that pick masks per layer read this

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise PtqlabError("this architecture passes positional arguments to its decoder layers, which the calibration "
                              "engine does not support yet")
        self.sink.append((self.index, hidden_states, kwargs))
        return hidden_states


@torch.no_grad()
def capture(model: nn.Module, batches: list[Batch], device: torch.device) -> None:
    """Fill each batch's layer-0 input and every layer's keyword arguments."""
    layers = decoder_layers(model)
    base = model.get_decoder()
    originals = list(layers)
    sink: list = []
    for i, layer in enumerate(originals):
        layers[i] = _LayerCatcher(i, layer, sink)
    try:
        base.to(device)  # with the catchers in place: embeddings, rotary, final norm only
        for batch in batches:
            sink.clear()
            base(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False)
            batch.hidden = sink[0][1]
            batch.layer_kwargs = [kwargs for _, _, kwargs in sorted(sink, key=lambda item: item[0])]
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


class InputStats:
    """Per distinct input tensor the hooked linears read (q/k/v share one, gate/up share one), over real tokens:
    Σ XᵀX (GPTQ, AWQ), the per-channel max |x| (SmoothQuant) and Σ |x| (AWQ)."""

    def __init__(self, linears: dict[str, nn.Linear], device: torch.device, hessian: bool = True, absmax: bool = False,
                 abssum: bool = False):
        self.linears, self.device = linears, device
        self.want = {"hessian": hessian, "absmax": absmax, "abssum": abssum}
        self.sums: dict[str, torch.Tensor] = {}
        self.absmax: dict[str, torch.Tensor] = {}
        self.abssum: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.shared: dict[str, str] = {}  # linear -> the linear whose statistics it shares
        self.mask: torch.Tensor | None = None
        self.batches = 0
        self._seen: dict[tuple, tuple[str, torch.Tensor]] = {}
        self._handles = []

    def __enter__(self):
        for name, module in self.linears.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()

    def start_batch(self, mask: torch.Tensor | None) -> None:
        """`mask` [B, T] marks real tokens; None when the batch has no padding (no gather needed)."""
        self.mask = None if mask is None else mask.bool()
        self.batches += 1
        self._seen = {}  # only filled during the first batch, see _hook

    def _hook(self, name: str) -> Callable:
        def hook(module, args):
            x = args[0]
            if self.batches == 1:
                # Which linears read the very same tensor (q/k/v, gate/up) is decided once, on the first batch,
                # holding each input alive so that no later tensor can reuse its address within the forward.
                key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
                owner = self._seen.get(key)
                if owner is not None:
                    self.shared[name] = owner[0]
                    return
                self._seen[key] = (name, x)
            elif name in self.shared:
                return
            rows = x[self.mask] if self.mask is not None and x.shape[:2] == self.mask.shape else x.reshape(-1, x.shape[-1])
            if name not in self.counts:
                self.counts[name] = 0
                if self.want["hessian"]:
                    self.sums[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
                if self.want["absmax"]:
                    self.absmax[name] = torch.zeros(x.shape[-1], dtype=torch.float32, device=x.device)
                if self.want["abssum"]:
                    self.abssum[name] = torch.zeros(x.shape[-1], dtype=torch.float32, device=x.device)
            if self.want["hessian"]:
                self.sums[name] += _gram(rows)
            if self.want["absmax"] or self.want["abssum"]:
                magnitude = rows.abs().float()
                if self.want["absmax"]:
                    torch.maximum(self.absmax[name], magnitude.amax(dim=0), out=self.absmax[name])
                if self.want["abssum"]:
                    self.abssum[name] += magnitude.sum(dim=0)
            self.counts[name] += rows.shape[0]
        return hook

    def owner(self, name: str) -> str:
        owner = self.shared.get(name, name)
        if self.counts.get(owner, 0) == 0:
            raise PtqlabError(f"{name}: no calibration token reached this layer; check the calibration data")
        return owner

    def hessian(self, name: str) -> torch.Tensor:
        owner = self.owner(name)
        return self.sums[owner] * (2.0 / self.counts[owner])

    def channel_max(self, name: str) -> torch.Tensor:
        return self.absmax[self.owner(name)]

    def channel_mean(self, name: str) -> torch.Tensor:
        owner = self.owner(name)
        return self.abssum[owner] / self.counts[owner]

    def rescale(self, name: str, scales: torch.Tensor) -> None:
        """The input of `name` (and of every linear sharing it) is now x / scales per channel: update the statistics
        exactly (H -> H / (s sᵀ)) instead of forwarding the calibration set again."""
        owner = self.owner(name)
        s = scales.float().to(self.device)
        if owner in self.sums:
            self.sums[owner] /= torch.outer(s, s)
        if owner in self.absmax:
            self.absmax[owner] /= s
        if owner in self.abssum:
            self.abssum[owner] /= s


def _gram(rows: torch.Tensor) -> torch.Tensor:
    """rowsᵀ rows in fp32. bf16/fp16 inputs on a GPU: tensor-core matmul with fp32 accumulation and output, which is
    exact for the products; elsewhere an fp32 matmul (TF32 allowed only for bf16/fp16 values, where it is exact)."""
    if rows.is_cuda and rows.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(rows.T, rows, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch without mm(out_dtype=...)
            pass
    half = rows.dtype in (torch.bfloat16, torch.float16)
    rows = rows.float()
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = half
    try:
        return rows.T @ rows
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _output(result) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


@dataclass
class LayerReport:
    index: int
    seconds: dict[str, float]  # hessians (forward + statistics), transforms, quantize, propagate
    notes: list[str]
    details: list[str] = field(default_factory=list)  # per-mapping choices of the transforms (AWQ ratios, ...)


Quantizer = Callable[[str, nn.Linear, "torch.Tensor | None"], tuple[QuantizedLinear, list[str]]]


@torch.no_grad()
def quantize_sequential(model: nn.Module, targets: dict[str, nn.Linear], make_quantized: Quantizer,
                        calibration: CalibrationSet, pad_id: int, batch_size: int = 16, device: torch.device | None = None,
                        offload: bool | None = None, quiet: bool = False, label: str = "gptq", transforms: tuple = (),
                        needs_hessian: bool = True, weight_args: QuantArgs | None = None,
                        compute_dtype: torch.dtype | None = None) -> list[LayerReport]:
    """Calibrate and quantize `targets` layer by layer: statistics of every linear's input, then the `transforms`
    (recipes.SmoothQuantStep / AWQStep, through smoothing.py's mappings; AWQ searches against round-to-nearest in
    `weight_args`), then `make_quantized(name, linear, hessian)` on each target (the hessian None unless
    `needs_hessian`), then the next layer's inputs.

    `compute_dtype` (default: the model's) is what the forwards compute in: float32 for a bf16 model on a CPU that
    only emulates bf16. Each finished layer is then rounded back to the stored dtype before it propagates, so that
    the next layer is calibrated on exactly what the checkpoint will compute."""
    device = device or model_device(model)
    scale_dtype = model_dtype(model)
    stored = None if compute_dtype in (None, scale_dtype) else floating_dtypes(model)
    if stored is not None:
        model.to(compute_dtype)
    try:
        return _quantize_layers(model, targets, make_quantized, calibration, pad_id, batch_size, device, offload, quiet,
                                label, transforms, needs_hessian, weight_args, stored, scale_dtype)
    finally:
        if stored is not None:
            cast_back(model, stored, round_only=False)


def floating_dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    """The dtype of every floating parameter and buffer, by qualified name (a model can mix them: fp32 rotary
    tables beside bf16 weights)."""
    tensors = itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    return {name: t.dtype for name, t in tensors if t.is_floating_point()}


def cast_back(module: nn.Module, dtypes: dict[str, torch.dtype], prefix: str = "", round_only: bool = True) -> None:
    """Give each floating tensor of `module` named in `dtypes` its dtype back; `round_only`: keep the tensor's dtype
    but round its values to that dtype's (what the checkpoint will hold). Tensors made since (a quantized layer's
    scales, already in the stored dtype) are left alone."""
    for name, child in module.named_modules(prefix=prefix):
        for registry in (child._parameters, child._buffers):
            for key, tensor in registry.items():
                target = dtypes.get(f"{name}.{key}" if name else key)
                if tensor is None or target is None or tensor.dtype == target:
                    continue
                if round_only:
                    tensor.data.copy_(tensor.data.to(target))
                else:
                    tensor.data = tensor.data.to(target)


def _quantize_layers(model, targets, make_quantized, calibration, pad_id, batch_size, device, offload, quiet, label,
                     transforms, needs_hessian, weight_args, stored: dict[str, torch.dtype] | None,
                     scale_dtype: torch.dtype) -> list[LayerReport]:
    layers = decoder_layers(model)
    if offload is None:
        offload = device.type == "cuda" and _bytes(model) > 0.6 * torch.cuda.mem_get_info(device)[0]
    if not offload:
        model.to(device)
    batches = make_batches(calibration, batch_size, pad_id)
    capture(model, batches, device)  # with offload, the layers stay on the CPU; only the current one moves

    grouped, _ = names_by_layer(model, targets)
    prefixes = {id(module): name for name, module in model.named_modules()}
    want_absmax = any(isinstance(t, recipes.SmoothQuantStep) for t in transforms)
    want_abssum = any(isinstance(t, recipes.AWQStep) for t in transforms)
    needs_hessian = needs_hessian or want_abssum
    sync = synchronizer(device)
    masks = [None if bool(b.attention_mask.all()) else b.attention_mask.to(device) for b in batches]
    reports = []
    state = {"last": ""}
    for index in track(range(len(layers)), label, total=len(layers), quiet=quiet, status=lambda i: state["last"]):
        clock = [time.perf_counter()]

        def lap() -> float:
            sync()
            clock.append(time.perf_counter())
            return clock[-1] - clock[-2]

        layer = layers[index].to(device)
        prefix = prefixes[id(layers[index])]
        # Statistics of every linear of the layer (a transform may rescale an ignored one), targets quantized.
        linears = {f"{prefix}.{n}": m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        with InputStats(linears, device, hessian=needs_hessian, absmax=want_absmax, abssum=want_abssum) as stats:
            for batch, mask in zip(batches, masks):
                stats.start_batch(mask)
                layer(batch.hidden, **batch.layer_kwargs[index])
        seconds = {"hessians": lap()}
        notes, details = [], []
        if transforms:
            mappings, skipped = smoothing.resolve_mappings(layer, model.config)
            if index == 0 and any(isinstance(t, recipes.AWQStep) or t.mappings == "all" for t in transforms):
                notes += [f"smoothing: {reason}" for reason in skipped]
            for step in transforms:
                for m in mappings:
                    if isinstance(step, recipes.SmoothQuantStep) and step.mappings == "norms" and isinstance(m.smooth, nn.Linear):
                        continue
                    details.append(_transform(step, m, stats, f"{prefix}.{m.mapping.balance[0]}", weight_args, scale_dtype))
            seconds["transforms"] = lap()
        for name in grouped[index]:
            hessian = stats.hessian(name) if needs_hessian else None
            try:
                quantized, layer_notes = make_quantized(name, targets[name], hessian)
            except HessianError as e:
                raise PtqlabError(f"{name}: {e}; check the calibration data and the model dtype (fp16 overflow? try --dtype bfloat16)") from e
            notes += layer_notes
            set_submodule(model, name, quantized)
        del stats
        if stored is not None:  # the values the checkpoint will hold: smoothed norms, layers kept 16-bit
            cast_back(layer, stored, prefix)
        seconds["quantize"] = lap()
        with reuse_dequantized_weights(layer, batches[0].hidden.dtype):  # propagate through the quantized layer
            for batch in batches:
                batch.hidden = _output(layer(batch.hidden, **batch.layer_kwargs[index]))
        if offload:
            layers[index].to("cpu")
        seconds["propagate"] = lap()
        state["last"] = f"layer {index}: " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items())
        reports.append(LayerReport(index, seconds, notes, details))
    return reports


def _transform(step, m, stats: InputStats, balance_name: str, weight_args: QuantArgs, scale_dtype: torch.dtype) -> str:
    """Apply one smoothing step to one mapping of the layer; -> a line for the layer report."""
    weights = [linear.weight for linear in m.balance.values()]
    where = f"{m.mapping.smooth} -> {', '.join(m.balance)}"
    if isinstance(step, recipes.SmoothQuantStep):
        scales = smoothing.smoothquant_scales(stats.channel_max(balance_name), weights, step.smoothing_strength)
        detail = f"smoothquant {where}: s in [{float(scales.min()):.3g}, {float(scales.max()):.3g}]"
    else:
        def fake_quantize(w: torch.Tensor) -> torch.Tensor:
            q, scale, zero_point = rtn(w, weight_args, scale_dtype)
            return dequantize(q, scale, zero_point, weight_args, torch.float32)

        scales, ratio, relative = smoothing.awq_scales(
            stats.channel_mean(balance_name), weights, stats.hessian(balance_name), fake_quantize,
            weight_args.group_size, step.n_grid, step.duo_scaling)
        detail = f"awq {where}: " + ("no scaling" if ratio is None else f"r = {ratio:.2f}, output error x{relative:.3f}")
    smoothing.apply_scales(m, scales)
    stats.rescale(balance_name, scales)
    return detail


def _bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def gptq_quantizer(scheme, config: GPTQConfig, scale_dtype: torch.dtype | None = None) -> Quantizer:
    """The per-linear step for GPTQ: weight + Hessian -> QuantizedLinear, with notes on damping and dead inputs.
    Scales in `scale_dtype` (default: the weight's; the stored dtype when the engine computes in another)."""

    def make(name: str, linear: nn.Linear, hessian: torch.Tensor | None) -> tuple[QuantizedLinear, list[str]]:
        result = gptq(linear.weight, hessian, scheme.weights, config, scale_dtype=scale_dtype or linear.weight.dtype)
        module = QuantizedLinear.from_weight(linear.weight, linear.bias, scheme, result.q, result.scale, result.zero_point)
        notes = []
        if result.dampening_frac != config.dampening_frac:
            notes.append(f"{name}: Hessian not positive definite; dampening raised to {result.dampening_frac:g}")
        if result.dead_columns:
            notes.append(f"{name}: {result.dead_columns} input channels never active in calibration (quantized as 0)")
        return module, notes

    return make


def rtn_quantizer(scheme, scale_dtype: torch.dtype | None = None) -> Quantizer:
    """The per-linear step for round-to-nearest (after a calibrated transform such as AWQ): the Hessian is unused."""

    def make(name: str, linear: nn.Linear, hessian: torch.Tensor | None) -> tuple[QuantizedLinear, list[str]]:
        return QuantizedLinear.from_weight(linear.weight.detach(), linear.bias, scheme, scale_dtype=scale_dtype), []

    return make

