"""The memory plan: what a run will hold at its peak on the GPU and in CPU memory, what it writes to disk and about
how long it takes, from config.json, the recipe and the calibration size alone, so that a run that cannot fit is
refused in seconds (before any weight is read) and `quantize --plan` can say it without running.

Peak GPU memory of a calibrated run = the embeddings (moved there for the capture) + the calibration activations
(every sample's hidden states, position tables and masks) + the decoder layers it holds + the input statistics of
one layer (one fp32 Hessian per distinct input) + the larger of one batch's forward and one linear's GPTQ work.
AutoRound adds two more copies of the hidden states (the float model's, and each layer's targets) and one step of
its descent competes with that forward and GPTQ. Beside its tensors the GPU holds the process's CUDA context and
libraries (measured at start-up: engine/gpu_memory.py), the allocator's rounding of each tensor and a margin: the
plan counts all three, and compares the sum with what the GPU has free.
Where things live is the plan's choice, the first of these that fits the GPU budget: every layer on the GPU; one
layer at a time with the next one prefetched (layers wait in CPU memory, or on disk when streaming); that, with the
hidden states in pinned CPU memory, streamed to the GPU a batch at a time. The engine follows the plan
(`EngineOptions.offload`, `activations_on_gpu`). CPU memory holds the model (or, streaming, the embeddings and head
and two layers: the current and the prefetched one), the checkpoint being built and, where the plan puts them
there, the activations. The time is a rough figure: the forwards' (and AutoRound's steps') and GPTQ's FLOPs at a
nominal rate per device kind.
What the model holds (`ModelShape`) is counted on the model transformers builds from the config on the meta device,
layer by layer: every family's parameters as they are (latent attention, fused experts, hybrid layers, a
vision-language model's vision tower), without a formula per family.
"""

from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ptqlab.data import check_sizes
from ptqlab.errors import PtqlabError
from ptqlab.families import expert_count, family_of, head_dim
from ptqlab.safetensors_files import STREAM_SHARD_BYTES

GIB = 2**30
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
         "tib": 2**40}
MAX_BYTES = 2**70
"""No size given in bytes is this large (a zebibyte): a larger one is a typo or an overflow."""
MARGIN = 0.9
"""The CPU budget's default takes this share of what is available now: the rest is left to the allocator's
fragmentation and to others. (The GPU plan counts its own margin beside what it measures: engine/gpu_memory.py.)"""
ALLOCATION_ROUNDING = 2 * 2**20
"""What one tensor can cost beyond its bytes in PyTorch's caching allocator: a request above 1 MiB is rounded up to
a multiple of 2 MiB and the small ones share 2 MiB blocks, so the plan counts at most this much per tensor it places
on the GPU."""
GPU_MARGIN_SHARE = 0.05
"""The plan keeps this share of its GPU tensors free, and at least GPU_MARGIN_MIN: kernels CUDA loads on first use
beyond those the start-up probe ran (attention, norms, the engine's own), blocks the allocator cannot reuse between
layers of different shapes (expandable segments reduce that, do not remove it), and a little growth of another
process on a shared GPU between the plan and the peak."""
GPU_MARGIN_MIN = 512 * 2**20
"""The least margin, whatever the run's size: the lazily loaded kernels do not shrink with a small run."""


def gpu_margin(tensor_bytes: int) -> int:
    """The margin a plan of `tensor_bytes` on the GPU keeps (GPU_MARGIN_SHARE, at least GPU_MARGIN_MIN)."""
    return max(GPU_MARGIN_MIN, int(GPU_MARGIN_SHARE * tensor_bytes))


FLOP_RATE = {"cuda": 2e14, "cpu": 1e11}
"""Nominal FLOP/s of the calibration forwards and Hessian sums per device kind, for the rough time figure only (set
from the 32B-shape runs of bench/results/big_models.json)."""
PROCESS_BYTES = {"cuda": 5 * GIB // 2, "cpu": GIB // 2}
"""What the process itself keeps resident besides the tensors: Python, torch, transformers and, on a GPU machine, the
CUDA libraries and context's host side (set from a streamed run's peak RSS beyond its tensors,
bench/results/big_models.json)."""
GPTQ_RATE = {"cuda": 7e12, "cpu": 3e10}
"""GPTQ's column sweep runs far below the matmul rate (one column at a time)."""


def parse_bytes(text: str, option: str) -> int:
    """'24GiB', '8GB', '12000MiB', '1e9' -> bytes; one line naming the option otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in UNITS or float(match.group(1)) <= 0:
        raise PtqlabError(f"{option} {text!r}: give a size such as 24GiB, 8GB or 12000MiB")
    size = float(match.group(1)) * UNITS[match.group(2).lower()]
    if not size < MAX_BYTES:  # 1e400 reads as infinity, which no int holds
        raise PtqlabError(f"{option} {text!r}: larger than any machine's memory or disk; give a size such as 24GiB, "
                          "8GB or 12000MiB")
    if size < 1:
        raise PtqlabError(f"{option} {text!r}: less than a byte; give a size such as 24GiB, 8GB or 12000MiB")
    return int(size)


def _proc_kib(path: str, key: str) -> int | None:
    """A `KEY: N kB` line of a Linux /proc file, in bytes; None where there is none."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def free_cpu_bytes() -> int:
    """MemAvailable of /proc/meminfo (Linux); elsewhere the physical memory."""
    found = _proc_kib("/proc/meminfo", "MemAvailable:")
    return found if found is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resident_bytes() -> int:
    """This process's resident memory now (VmRSS of /proc/self/status, Linux); 0 where it cannot be read."""
    return _proc_kib("/proc/self/status", "VmRSS:") or 0


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer as transformers builds it: what the plan counts in it."""

    params: int
    """Every tensor of the layer: linears, biases, norms, routers, persistent buffers."""
    linears: dict[str, tuple[int, int, int]]
    """(out, in, how many) of each linear the engine quantizes, by module name in the layer; a routed experts'
    projection (a 3-D [experts, ., .] parameter) comes `experts` times. An MoE block's own linears (a router, a
    shared expert's gate) stay 16-bit and are not listed."""
    inputs: tuple[int, ...]
    """Widths of the distinct inputs of its linears but the routed experts' (q/k/v share one, gate/up share one)."""
    mlp_width: int
    """The MLP width one token's forward computes (its routed experts' and the shared one's): the weights a token
    reads in the layer's widest block, as a gated MLP's width."""
    experts: int = 0
    """Routed experts (0: a dense layer)."""
    active_experts: int = 0
    """Experts each token is routed to (top-k)."""
    expert_params: int = 0
    """Parameters of all its routed experts (weights and biases)."""
    expert_inputs: tuple[int, ...] = ()
    """Widths of one routed expert's distinct inputs (its gate/up's, its down's)."""
    tensors: int = 0
    """How many tensors the engine holds of the layer (a fused experts' projection as one per expert, as the engine
    unfuses it): each is one allocation, rounded up by the allocator."""

    def active_params(self) -> int:
        """The parameters one token's forward through the layer reads (its routed experts only)."""
        return self.params - self.expert_params + self.expert_params * self.active_experts // max(self.experts, 1)

    def distinct_inputs(self, experts: int | None = None) -> list[int]:
        """Widths of the inputs whose statistics the layer keeps: of all `experts` (default: every one)."""
        return list(self.inputs) + list(self.expert_inputs) * (self.experts if experts is None else experts)


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on in a decoder-only transformer (or a vision-language model's decoder): its
    parameters counted layer by layer as transformers builds them (`from_config`)."""

    hidden: int
    head_dim: int
    vocab: int
    outside: int
    """Every tensor outside the decoder layers: the embeddings, the final norm, the untied head and a
    vision-language model's vision tower and projector (all of which stay 16-bit)."""
    layers: tuple[LayerShape, ...]

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """The shape of the model transformers builds from `config`, counted on the meta device (no memory, no
        weights read; DeepSeek-V3's 671B in well under a second, its experts being one 3-D tensor per projection)
        and kept per config, since a run's checks and `quantize --plan` ask for it more than once. A model_type
        transformers does not know is planned, when dense, as the Llama its standard keys describe; an MoE of that
        kind is refused, since its layout is unknown."""
        from transformers import CONFIG_MAPPING  # start-up time: imported on first use

        if getattr(config, "model_type", None) not in CONFIG_MAPPING:
            if expert_count(config):
                family_of(config, "the memory plan")  # refuses, in one line that says what to add
            config = _standard_config(config)
        key = f"{type(config).__name__}:{config.to_json_string(use_diff=False)}"
        if key not in _SHAPES:
            _SHAPES[key] = _counted(config)
        return _SHAPES[key]

    def layer_params(self) -> int:
        """Every decoder layer's parameters together."""
        return sum(layer.params for layer in self.layers)

    def largest_layer_params(self) -> int:
        """The parameters of the largest decoder layer (what one layer held at a time needs room for)."""
        return max(layer.params for layer in self.layers)

    def active_layer_params(self) -> int:
        """The parameters one token's forward through every decoder layer reads (its routed experts only)."""
        return sum(layer.active_params() for layer in self.layers)

    def params(self) -> int:
        return self.outside + self.layer_params()

    def linears(self) -> list[tuple[int, int, int]]:
        """(out, in, how many) of every decoder layer's quantized linears."""
        return [shape for layer in self.layers for shape in layer.linears.values()]

    def mlp_width(self) -> int:
        """The widest MLP one token's forward computes in a layer."""
        return max(layer.mlp_width for layer in self.layers)

    def statistics_bytes(self) -> int:
        """The fp32 input statistics (one Hessian per distinct input) of the layer that keeps the most."""
        return max(sum(w * w * 4 for w in layer.distinct_inputs()) for layer in self.layers)

    def statistics_flops_per_token(self) -> int:
        """FLOPs of Σ XᵀX per calibration token over every layer: every input a token reaches (its routed experts'
        only)."""
        return sum(2 * w * w for layer in self.layers for w in layer.distinct_inputs(layer.active_experts))


_SHAPES: dict[str, ModelShape] = {}
"""ModelShape.from_config's count per config (its class and JSON)."""

STANDARD_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "tie_word_embeddings")
"""The keys every decoder config has, which describe a Llama."""


def _standard_config(config):
    """A Llama config of `config`'s standard keys: how a dense model_type transformers does not know is planned."""
    from transformers import LlamaConfig  # start-up time: imported on first use

    return LlamaConfig(**{key: getattr(config, key) for key in STANDARD_KEYS if getattr(config, key, None) is not None})


def _counted(config) -> ModelShape:
    """Build the model of `config` on the meta device (a vision-language model with its vision tower) and count
    it: every tensor, and per decoder layer its linears, inputs and experts."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText  # start-up time: on first use
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    text = config.get_text_config()
    vision = getattr(config, "vision_config", None) is not None
    auto = AutoModelForImageTextToText if vision and config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES \
        else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            model = auto.from_config(copy.deepcopy(config))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise PtqlabError(f"the memory plan cannot build {config.model_type!r} from its config in transformers: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    embeddings = model.get_input_embeddings()
    owner = next(m for m in model.modules() if any(child is embeddings for child in m.children()))
    layers = next((c for c in owner.children() if isinstance(c, nn.ModuleList) and len(c) == text.num_hidden_layers),
                  None)
    if layers is None:
        raise PtqlabError(f"the memory plan cannot find the {text.num_hidden_layers} decoder layers of "
                          f"{config.model_type!r} beside its embeddings ({type(owner).__name__})")
    hidden = text.hidden_size
    top_k = getattr(text, "num_experts_per_tok", None) or 0
    shapes = tuple(_layer_shape(layer, hidden, top_k) for layer in layers)
    if not any(layer.linears for layer in shapes):  # GPT-2's Conv1D, for one: nothing the engine quantizes
        kinds = sorted({type(m).__name__ for m in layers[0].modules() if m is not layers[0] and not list(m.children())
                        and any(True for _ in m.parameters(recurse=False))})
        raise PtqlabError(f"{config.model_type!r} models are not supported: their decoder layers hold no torch Linear "
                          f"layers (they hold {', '.join(kinds) or 'no weights'}), and ptqlab quantizes Linear layers; "
                          "give a model of a supported architecture (Llama, Qwen, Mistral, Gemma, Phi-3, OPT, ...)")
    routed = [layer for layer in shapes if layer.experts]
    if (expert_count(text) and not routed) or (routed and not top_k):
        raise PtqlabError(f"the memory plan cannot count the experts of {config.model_type!r}: transformers builds "
                          "no fused experts module for it (a 3-D down_proj [experts, ., .]), or its config has no "
                          "num_experts_per_tok")
    return ModelShape(hidden, head_dim(text), embeddings.weight.shape[0], _tensor_count(model) - sum(
        _tensor_count(layer) for layer in layers), shapes)


def _tensor_count(module: nn.Module) -> int:
    """Values of every tensor `module` stores (its state dict: parameters and persistent buffers, a tied one once)."""
    return sum(t.numel() for t in {id(t): t for t in module.state_dict(keep_vars=True).values()}.values())


def _fused_experts(module: nn.Module) -> torch.Tensor | None:
    """The down projection of transformers' fused experts module ([experts, ., .]: the experts interface's
    gate_up_proj or up_proj, and down_proj); None for any other module."""
    down = getattr(module, "down_proj", None)
    return down if isinstance(down, torch.Tensor) and down.dim() == 3 else None


def _layer_shape(layer: nn.Module, hidden: int, top_k: int) -> LayerShape:
    """Count one decoder layer. A block reads the residual stream (`hidden` wide) and writes back to it through its
    output projection: of its linears `hidden` wide out, the one that reads another width (o, down, a delta net's
    out_proj), or where all read `hidden` (a square o or down), the last. The block's other linears that read
    `hidden` share its input (q/k/v; gate/up; MLA's q_a and kv_a; a delta net's in_proj); every other linear (the
    output projection, MLA's q_b and kv_b) reads an input of its own. Each routed expert reads the tokens routed to
    it."""
    linears, inputs, expert_inputs, blocks = {}, [], (), {}
    experts = expert_params = 0
    for name, module in layer.named_modules():
        down = _fused_experts(module)
        if down is not None:
            experts, width = down.shape[0], down[0].numel() // hidden
            for part, p in module.named_parameters(recurse=False):
                expert_params += p.numel()
                if p.dim() == 3:  # [E, out, in] or [E, in, out] (gpt-oss, Llama 4): the non-hidden side is the width
                    side = p[0].numel() // hidden
                    linears[f"{name}.{part}"] = (hidden, side, experts) if p is down else (side, hidden, experts)
            expert_inputs = (hidden, width)
            continue
        children = [(f"{name}.{n}" if name else n, c) for n, c in module.named_children() if isinstance(c, nn.Linear)]
        if not children or any(_fused_experts(c) is not None for c in module.children()):
            continue  # an MoE block's own linears route tokens (a router, a shared expert's gate): 16-bit
        writes = [(n, c) for n, c in children if c.out_features == hidden]
        out = ([n for n, c in writes if c.in_features != hidden] or [n for n, c in writes])[-1:]
        shared = [n for n, c in children if c.in_features == hidden and n not in out]
        inputs += [hidden] * bool(shared) + [c.in_features for n, c in children if n not in shared]
        linears |= {n: (c.out_features, c.in_features, 1) for n, c in children}
    for n, (o, i, count) in linears.items():  # each block's weights one token reads
        block = n.split(".")[0]
        blocks[block] = blocks.get(block, 0) + o * i * (top_k if count > 1 else 1)
    # a gated MLP of width I holds 3 * hidden * I weights: the widest block read as one, which the MLP is (attention
    # rarely outweighs it; where it does, the forward's figure errs high)
    mlp_width = max(blocks.values(), default=0) // (3 * hidden)
    tensors = len({id(t) for t in layer.state_dict(keep_vars=True).values()}) + sum(
        count - 1 for _, _, count in linears.values())
    return LayerShape(_tensor_count(layer), linears, tuple(inputs), mlp_width, experts, top_k if experts else 0,
                      expert_params, expert_inputs, tensors)


@dataclass(frozen=True)
class RunShape:
    """What memory depends on in a run's settings."""

    samples: int
    seq_len: int
    batch_size: int
    stored_bytes: int
    """Bytes per element of the stored (checkpoint) dtype."""
    compute_bytes: int
    """Bytes per element the engine computes in (4 where a CPU upcasts bf16)."""
    calibrated: bool
    statistics: bool
    """Whether layers keep fp32 Hessians (GPTQ, AWQ)."""
    weight_bits: int
    group_size: int | None
    stream: bool
    device: str
    """cuda or cpu."""
    descent_steps: int = 0
    """A layer-wide quantizer's (AutoRound's) gradient steps per layer; 0: the quantizer works linear by linear."""
    descent_samples: int = 0
    """The samples each of those steps computes on."""
    gpu_overhead: int = 0
    """What the process takes on the GPU besides its tensors: its CUDA context and, once in use, the libraries'
    (cuBLAS and cuSOLVER workspaces, kernels loaded on first use); measured once per device at start-up
    (gpu_memory.cuda_overhead)."""

    def __post_init__(self) -> None:
        if self.calibrated:  # the plan divides by them (`quantize` has checked them already; `--plan` has not)
            check_sizes(self.samples, self.seq_len, self.batch_size)

    @property
    def hidden_copies(self) -> int:
        """Copies of the calibration hidden states a run holds: the quantized model's, and with AutoRound also the
        float model's and each layer's targets (engine/autoround.py)."""
        return 3 if self.descent_steps else 1


@dataclass(frozen=True)
class MemoryPlan:
    gpu_bytes: int | None
    """Peak on the GPU: the tensors, and beside them the CUDA context and libraries' measured memory, the allocator's
    rounding and the margin; None for a run on the CPU."""
    cpu_bytes: int
    disk_bytes: int
    seconds: float
    parts: dict[str, int] = field(default_factory=dict)
    """The named contributions, for the printed plan and the run record."""
    layers_on_gpu: bool = False
    """Every decoder layer on the GPU for the whole run; else one at a time, the next one prefetched."""
    activations_on_gpu: bool = True
    """The calibration hidden states on the GPU; else in pinned CPU memory, copied over a batch at a time."""
    read_back_bytes: int = 0
    """CPU memory of the verification after writing (formats/readback.py: the model in memory in float32 and one
    reader's float32 copy at a time), a phase of its own after the calibration's peak; 0 when a streamed run is not
    read back. The run skips it, and says so, when it does not fit."""

    def placement(self) -> str:
        if self.gpu_bytes is None:
            return "everything in CPU memory"
        layers = "every layer on the GPU" if self.layers_on_gpu else "one layer at a time on the GPU, the next prefetched"
        hidden = "activations on the GPU" if self.activations_on_gpu else "activations in pinned CPU memory, a batch at a time"
        return f"{layers}; {hidden}"

    def lines(self) -> list[str]:
        gpu = "" if self.gpu_bytes is None else (
            f"GPU {format_bytes(self.gpu_bytes)} (with {format_bytes(self.parts.get(LIBRARIES_PART, 0))} of CUDA "
            f"context and libraries measured, {format_bytes(self.parts.get(ROUNDING_PART, 0))} of allocator "
            f"rounding and a {format_bytes(self.parts.get(MARGIN_PART, 0))} margin), ")
        head = (f"memory plan: peak {gpu}CPU {format_bytes(self.cpu_bytes)}; writes {format_bytes(self.disk_bytes)}; "
                f"about {self.seconds / 60:.0f} min (rough); {self.placement()}")
        lines = [head] + [f"  {name}: {format_bytes(size)}" for name, size in self.parts.items()]
        if self.read_back_bytes:
            lines.append(f"  then, reading the checkpoint back: CPU {format_bytes(self.read_back_bytes)}")
        return lines

    def to_dict(self) -> dict:
        return {"gpu_bytes": self.gpu_bytes, "cpu_bytes": self.cpu_bytes, "disk_bytes": self.disk_bytes,
                "seconds": round(self.seconds, 1), "layers_on_gpu": self.layers_on_gpu,
                "activations_on_gpu": self.activations_on_gpu, "parts": self.parts,
                "read_back_bytes": self.read_back_bytes}


def estimate(model: ModelShape, run: RunShape, gpu_budget: int | None = None) -> MemoryPlan:
    """The memory plan of quantizing `model` as `run` says (see the module docstring); the placement is the first
    that fits `gpu_budget` (None: one layer at a time, activations on the GPU)."""
    c, s = run.compute_bytes, run.stored_bytes
    tokens = run.samples * run.seq_len if run.calibrated else 0
    scales = model.layer_params() // run.group_size * s if run.group_size else 0
    quantized = model.layer_params() * run.weight_bits // 8 + scales  # packed, on disk
    unpacked = model.layer_params() + scales  # in memory: one byte per value (QuantizedLinear)
    held: dict[str, int] = {"the process (Python, torch, CUDA libraries)": PROCESS_BYTES[
        "cuda" if run.device == "cuda" else "cpu"]}
    in_memory = c if run.calibrated else s  # a calibrated run holds the model in its compute dtype (engine/calibrate.py)
    if run.stream:
        held["embeddings and head (streaming)"] = model.outside * in_memory
        read = s + (c if run.calibrated and c != s else 0)  # as stored, and its cast to the compute dtype
        held["two layers read from disk (current, prefetched)"] = 2 * model.largest_layer_params() * read
        held["checkpoint shard being written"] = min(quantized, STREAM_SHARD_BYTES)
    else:
        held["the model"] = model.params() * in_memory
        if not run.calibrated:  # the engine lets each float layer go as its quantized form replaces it
            held["the quantized layers"] = unpacked
    work, on_device, layers_on_gpu, activations_on_gpu = {}, 0, False, True
    if run.calibrated:
        work, on_device, layers_on_gpu, activations_on_gpu = _device_work(model, run, gpu_budget)
        if not activations_on_gpu:
            held["calibration hidden states (pinned)"] = run.hidden_copies * tokens * model.hidden * c
        held["one batch's inputs, saved for resume"] = 2 * run.batch_size * run.seq_len * model.hidden * c
    cpu = sum(held.values()) + (on_device if run.device == "cpu" else 0)
    disk = quantized + model.outside * s
    forward_flops = 2 * 2 * tokens * model.active_layer_params()  # two passes: statistics, propagate
    if run.statistics:  # Σ XᵀX of every distinct input
        forward_flops += tokens * model.statistics_flops_per_token()
    gptq_flops = sum(2 * o * i * i * n for o, i, n in model.linears()) if run.statistics else 0
    device = "cuda" if run.device == "cuda" else "cpu"
    # AutoRound: each step a forward and a backward (twice the forward's FLOPs) of its samples through the layer
    descent_flops = 3 * 2 * run.descent_steps * run.descent_samples * run.seq_len * model.active_layer_params()
    seconds = (forward_flops + descent_flops) / FLOP_RATE[device] + gptq_flops / GPTQ_RATE[device]
    read_back = 0 if run.stream else PROCESS_BYTES[device] + 2 * model.params() * 4
    return MemoryPlan(on_device if run.device == "cuda" else None, cpu, disk, seconds, {**work, **held},
                      layers_on_gpu, activations_on_gpu, read_back)


def _device_work(model: ModelShape, run: RunShape, gpu_budget: int | None) -> tuple[dict[str, int], int, bool, bool]:
    """What the calibration keeps on its device, in the first placement that fits `gpu_budget` -> (parts, peak,
    every layer on the GPU, activations on the GPU). Offloading, the embeddings leave the device once the capture is
    done, so the peak is the activations plus the larger of the capture and one layer's work. The last placement is
    returned even when it does not fit: the budget check then refuses it in one line."""
    c = run.compute_bytes
    tokens = run.samples * run.seq_len
    batches = -(-run.samples // run.batch_size)
    hidden = tokens * model.hidden * c
    tables = tokens * 2 * model.head_dim * c + batches * run.batch_size * run.seq_len ** 2  # rotary tables, masks
    embeddings = {"embeddings (for the capture)": model.vocab * model.hidden * c}
    forward = run.batch_size * run.seq_len * (3 * model.mlp_width() + 4 * model.hidden) * c
    out, inp, _ = max(model.linears(), key=lambda oin: oin[1] * (oin[0] + oin[1]))
    gptq = (4 * out * inp + 3 * inp * inp) * 4 if run.statistics else 0
    descent = _descent_bytes(model, run) if run.descent_steps else 0  # AutoRound's step
    work = {"input statistics": model.statistics_bytes() if run.statistics else 0,
            "one batch's forward or one GPTQ": max(forward, gptq, descent)}
    float_hidden = {"the float model's hidden states and the layer's targets (autoround)":
                    (run.hidden_copies - 1) * hidden} if run.descent_steps else {}
    every_layer = {"every decoder layer": model.layer_params() * c,
                   "the output head": model.outside * c - embeddings["embeddings (for the capture)"]}
    two_layers = {"two decoder layers (current, prefetched)": 2 * model.largest_layer_params() * c}
    on_gpu = {"calibration activations": hidden + tables, **float_hidden}
    streamed = {"calibration position tables and masks": tables,
                "hidden states of three batches (in, next, out)": 3 * run.batch_size * run.seq_len * model.hidden * c}
    # tensors of each (for the allocator's rounding): per batch its hidden states, rotary cos and sin, mask (and
    # AutoRound's copies); a layer's own; the embeddings, each input's statistics and a GPTQ's few
    largest = max(model.layers, key=lambda layer: layer.tensors)
    on_gpu_tensors = batches * (3 + run.hidden_copies)
    streamed_tensors = 3 + 3 * batches
    fixed_tensors = 1 + len(largest.distinct_inputs()) + WORK_TENSORS
    choices = [(two_layers, on_gpu, False, True, 2 * largest.tensors + on_gpu_tensors),
               (two_layers, streamed, False, False, 2 * largest.tensors + streamed_tensors)]
    if not run.stream and run.device == "cuda":
        choices.insert(0, (every_layer, on_gpu, True, True,
                           sum(layer.tensors for layer in model.layers) + 2 + on_gpu_tensors))
    if run.device != "cuda":  # the model is in CPU memory already: the layer computing is its compute-dtype copy
        choices = [({"one decoder layer": model.largest_layer_params() * c}, on_gpu, False, True, 0)]
    elif gpu_budget is None:
        choices = choices[-2:-1]  # one layer at a time, the activations on the GPU
    for layers, activations, layers_on_gpu, activations_on_gpu, tensors in choices:
        parts = {**embeddings, **activations, **work, **layers}
        if layers_on_gpu or run.device != "cuda":
            peak = sum(parts.values())
        else:
            peak = sum(activations.values()) + max(sum(embeddings.values()), sum(work.values()) + sum(layers.values()))
        if run.device == "cuda":
            beside = beside_tensors(run.gpu_overhead, peak, fixed_tensors + tensors)
            parts, peak = {**parts, **beside}, peak + sum(beside.values())
        if gpu_budget is None or peak <= gpu_budget:
            break
    return parts, peak, layers_on_gpu, activations_on_gpu


WORK_TENSORS = 8
"""Tensors of one linear's GPTQ (its weight, Hessian, factors, quantized values, errors) or one batch's forward, at
once: for the allocator's rounding."""
LIBRARIES_PART = "the CUDA context and libraries' workspaces and kernels (measured at start-up)"
ROUNDING_PART = f"allocator rounding (up to {ALLOCATION_ROUNDING // 2**20} MiB a tensor)"
MARGIN_PART = f"margin ({GPU_MARGIN_SHARE:.0%} of the tensors, at least {GPU_MARGIN_MIN // 2**20} MiB)"


def beside_tensors(overhead: int, tensor_bytes: int, tensors: int) -> dict[str, int]:
    """What a GPU holds beside `tensor_bytes` in `tensors` tensors (engine/gpu_memory.py): the libraries' measured
    `overhead`, the allocator's rounding of each tensor, and the margin."""
    return {LIBRARIES_PART: overhead, ROUNDING_PART: ALLOCATION_ROUNDING * tensors,
            MARGIN_PART: gpu_margin(tensor_bytes)}


def _descent_bytes(model: ModelShape, run: RunShape) -> int:
    """One AutoRound step (engine/autoround.py): the layer's forward and backward on `descent_samples` samples, with
    what autograd keeps per token (the inputs of every matmul, attention's output, the MLP's wide activations), and
    per weight the fp32 offsets, their gradient, the fixed start and the fake-rounded weight with its gradient."""
    activations = run.descent_samples * run.seq_len * (6 * model.hidden + 4 * model.mlp_width()) * run.compute_bytes
    return activations + 5 * 4 * model.largest_layer_params()


def size_flag(n: int) -> str:
    """`n` bytes as a size the command line reads back, rounded up (7.9GiB, 700MiB)."""
    return f"{math.ceil(n / GIB * 10) / 10:g}GiB" if n >= GIB else f"{math.ceil(n / 2**20)}MiB"


def check_cpu_budget(plan: MemoryPlan, cpu_budget: int | None, stream: bool) -> None:
    """One line saying what to change when the plan does not fit the CPU budget (the GPU's: gpu_memory.py)."""
    if cpu_budget is not None and plan.cpu_bytes > cpu_budget:
        advice = "" if stream else "--stream (read the model layer by layer from disk), "
        raise PtqlabError(f"this run needs about {format_bytes(plan.cpu_bytes)} of CPU memory at its peak and "
                          f"{format_bytes(cpu_budget)} is allowed (--max-cpu-memory, default: 90 % of what is free): "
                          f"use {advice}fewer --num-samples, or a larger --max-cpu-memory (`--plan` shows where it goes)")
