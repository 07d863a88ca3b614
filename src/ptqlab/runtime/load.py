"""Reading a checkpoint folder into a RuntimeModel: 16-bit models and compressed-tensors checkpoints (ptqlab's and
llm-compressor's: float-quantized, int-quantized, pack-quantized, nvfp4- and mxfp4-pack-quantized).

Each linear's tensors say how it is stored (`weight_packed`: a packed format, unpacked as its row of
number_formats says; `weight` int8 or float8 with `weight_scale`: int- or float-quantized; a float `weight`:
16-bit); its number formats come from the
`quantization_config` group whose targets match it, as compressed-tensors resolves them (ignore list first; then
an exact name, a regex, the class Linear: schemes.claiming_group).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from ptqlab.errors import PtqlabError
from ptqlab.runtime.choice import choose_kernels
from ptqlab.runtime.kernels import RuntimeOptions
from ptqlab.runtime.linear import StoredLinear, build_linear, concat_linears
from ptqlab.runtime.model import Architecture, Block, Concat, RuntimeModel
from ptqlab.runtime.moe import Expert, MoEMLP, stack_experts
from ptqlab.families import ModelFamily
from ptqlab.models import check_model_folder
from ptqlab.quant.kv_cache import format_of_strategy, per_head
from ptqlab.number_formats import is_fp4, packed_format
from ptqlab.schemes import QuantArgs, Scheme, claiming_group, matches

STRATEGIES = ("tensor", "channel", "group", "tensor_group", "block", "token")


def projections(family: ModelFamily) -> dict[str, tuple[str, ...]]:
    """Per decoder layer: the runtime's four matmuls and the checkpoint layers each is made of (separate or fused)."""
    linears = family.linears
    return {"qkv": linears.qkv, "o": (linears.o,), "gate_up": linears.gate_up, "down": (linears.down,)}


def read_tensors(folder: Path, device: torch.device) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise PtqlabError(f"{folder}: no .safetensors weights (the runtime reads safetensors checkpoints)")
    tensors = {}
    for file in files:
        with safe_open(file, framework="pt", device=str(device)) as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                tensors[key] = f.get_tensor(key)
    return tensors


def _quant_args(raw: dict | None, where: str) -> QuantArgs | None:
    if raw is None:
        return None
    strategy = raw.get("strategy")
    if strategy not in STRATEGIES:
        raise PtqlabError(f"{where}: quantization strategy {strategy!r} is not supported by the fast runtime "
                          f"(it runs {', '.join(STRATEGIES)}); benchmark with --runtime transformers")
    float4 = is_fp4({"type": raw.get("type"), "num_bits": raw.get("num_bits")})  # NVFP4, MXFP4: their scales' dtype
    try:
        return QuantArgs(num_bits=raw["num_bits"], type=raw.get("type", "int"), symmetric=raw.get("symmetric", True),
                         strategy=strategy, group_size=raw.get("group_size") if "group" in strategy else None,
                         dynamic="local" if raw.get("dynamic") == "local" else bool(raw.get("dynamic", False)),
                         block_structure=raw.get("block_structure") if strategy == "block" else None,
                         scale_dtype=str(raw.get("scale_dtype")).removeprefix("torch.") if float4 else None)
    except ValueError as e:
        raise PtqlabError(f"{where}: {e}") from e


class SchemeResolver:
    """The scheme of each linear layer by name, from a config.json `quantization_config` (None: 16-bit)."""

    def __init__(self, quantization_config: dict | None) -> None:
        qc = quantization_config or {}
        if qc and qc.get("quant_method") != "compressed-tensors":
            raise PtqlabError(f"quantization method {qc.get('quant_method')!r} is not supported by the fast runtime "
                              "(it reads compressed-tensors checkpoints); benchmark with --runtime transformers")
        if qc.get("sparsity_config") or qc.get("transform_config"):
            raise PtqlabError("sparse or transformed compressed-tensors checkpoints are not supported by the fast runtime; "
                              "benchmark with --runtime transformers")
        self.ignore = list(qc.get("ignore") or [])
        self.kv_cache = _kv_cache_format(qc.get("kv_cache_scheme"))
        """The checkpoint's quantized KV cache (quant/kv_cache.KVCacheFormat), or None."""
        self.groups = []
        for key, group in (qc.get("config_groups") or {}).items():
            where = f"quantization_config.config_groups.{key}"
            weights = _quant_args(group.get("weights"), where)
            if weights is not None:
                scheme = Scheme(weights, _quant_args(group.get("input_activations"), where))
                self.groups.append((list(group.get("targets") or []), scheme))

    def __call__(self, name: str) -> Scheme | None:
        if any(matches(name, t) for t in self.ignore):
            return None
        index = claiming_group(name, [targets for targets, _ in self.groups])  # names and regexes before Linear
        return None if index is None else self.groups[index][1]


def _kv_cache_format(raw: dict | None):
    """The format a `kv_cache_scheme` declares; PtqlabError for one the runtime does not run (it runs llm-compressor's
    FP8 caches: 8-bit float, symmetric, static, per tensor or per attention head)."""
    if raw is None:
        return None
    fmt = format_of_strategy(raw.get("strategy"))
    if fmt is None or raw.get("num_bits") != 8 or raw.get("type") != "float" or not raw.get("symmetric", True) \
            or raw.get("dynamic"):
        declared = ", ".join(f"{key} {raw.get(key)}" for key in ("num_bits", "type", "strategy", "symmetric", "dynamic"))
        raise PtqlabError(f"quantization_config.kv_cache_scheme ({declared}): the fast runtime runs static symmetric FP8 "
                          "KV caches (num_bits 8, type float, strategy tensor or attn_head); benchmark with --runtime "
                          "transformers")
    return fmt


def _kv_scales(tensors: dict[str, torch.Tensor], prefix: str, arch: Architecture, resolve: SchemeResolver):
    """Decoder layer `prefix`'s (k_scale, v_scale) as float32 [kv_heads] (consumed from `tensors`), or None for a
    checkpoint without a quantized KV cache (scales it does not declare are left unused, as vLLM leaves them)."""
    attention = f"{prefix}{arch.family.attention}"
    k, v = (tensors.pop(f"{attention}.{name}", None) for name in ("k_scale", "v_scale"))
    if resolve.kv_cache is None:
        return None
    expected = resolve.kv_cache.scale_shape(arch.num_kv_heads)
    for name, scale in (("k_scale", k), ("v_scale", v)):
        if scale is None or scale.numel() != math.prod(expected):
            got = "nothing" if scale is None else f"shape {list(scale.shape)}"
            raise PtqlabError(f"{attention}.{name}: the kv_cache_scheme ({resolve.kv_cache.strategy}) needs "
                              f"shape {list(expected)}, the checkpoint has {got}; quantize it again")
    return per_head(k, arch.num_kv_heads), per_head(v, arch.num_kv_heads)


def stored_linear(tensors: dict[str, torch.Tensor], name: str, scheme: Scheme | None) -> StoredLinear:
    """Take one linear's tensors out of `tensors` (consumed) as a StoredLinear."""
    def take(suffix):
        return tensors.pop(f"{name}.{suffix}", None)

    bias = take("bias")
    packed = take("weight_packed")
    weight = tensors.get(f"{name}.weight")
    if packed is None and weight is None:
        raise PtqlabError(f"the checkpoint has no weights for {name}")
    if packed is None and weight.dtype not in (torch.int8, torch.float8_e4m3fn):
        return StoredLinear(take("weight"), bias)
    if scheme is None:
        raise PtqlabError(f"{name} is stored quantized but no quantization_config group targets it")
    args = scheme.weights
    scale, zero_point = take("weight_scale"), take("weight_zero_point")
    if take("weight_g_idx") is not None:
        raise PtqlabError(f"{name}: activation-ordered groups (weight_g_idx) are not supported by the fast runtime; "
                          "benchmark with --runtime transformers")
    if packed is not None:  # several values per word, in the format its weights take (number_formats)
        fmt = packed_format(args)
        shape = torch.Size(take("weight_shape").tolist()) if fmt.stores_shape else None
        weight = fmt.unpack(packed, args.num_bits, shape)
        if fmt.global_scales:  # NVFP4: the group scales are relative to these
            return StoredLinear(weight, bias, scheme, scale, zero_point, take("weight_global_scale"),
                                take("input_global_scale"))
        if zero_point is not None:
            zero_point = fmt.read_zero_point(zero_point, args.num_bits, torch.Size([weight.shape[0], scale.shape[-1]]))
    else:
        take("weight")
    if zero_point is not None:  # unpacked along dim 0 it is a transposed view: row-major, as the int4 kernels read it
        zero_point = zero_point.to(torch.int8).reshape(scale.shape).contiguous()
    return StoredLinear(weight, bias, scheme, scale, zero_point)


def _projection(tensors, prefix: str, names: tuple[str, ...], resolve: SchemeResolver, dtype: torch.dtype,
                options: RuntimeOptions) -> tuple[torch.nn.Module, str]:
    """One of the runtime's matmuls from the checkpoint layers it is made of (one, or several that read the same
    input, side by side): (module, the kernel it runs)."""
    parts = [stored_linear(tensors, prefix + n, resolve(prefix + n)) for n in names]
    stacked = concat_linears(parts)
    if stacked is not None:
        module = build_linear(stacked, dtype, options)
    else:
        module = Concat([build_linear(p, dtype, options) for p in parts])
    return module, getattr(module, "kernel", "mixed")


def _moe_mlp(config, arch: Architecture, tensors, prefix: str, resolve: SchemeResolver, dtype: torch.dtype,
             options: RuntimeOptions, kernels: dict[str, str]) -> MoEMLP | None:
    """Decoder layer `prefix`'s MoE MLP from its router, per-expert and shared-expert tensors (None: a dense
    layer, as in a model whose MoE layers are interleaved with dense ones)."""
    layout = arch.family.experts
    if arch.routing is None or layout is None:
        return None
    block = layout.block
    router = tensors.pop(f"{prefix}{block}.{layout.router}.weight", None)
    if router is None:
        return None
    from transformers.activations import ACT2FN  # start-up time: imported on first use

    act = ACT2FN[arch.activation]
    gate, up, down = layout.projections

    def expert(name: str, projections: tuple[str, str, str]) -> Expert:
        g, u, d = (f"{name}.{p}" for p in projections)
        gate_up, kernels["experts"] = _projection(tensors, "", (g, u), resolve, dtype, options)
        return Expert(gate_up, _projection(tensors, "", (d,), resolve, dtype, options)[0], act)

    experts = [expert(f"{prefix}{block}.experts.{e}", (gate, up, down)) for e in range(arch.routing.experts)]
    shared = shared_gate = None
    if layout.shared_expert and f"{prefix}{block}.{layout.shared_expert_gate}.weight" in tensors:
        shared = expert(f"{prefix}{block}.{layout.shared_expert}", layout.shared_projections)
        shared_gate = tensors.pop(f"{prefix}{block}.{layout.shared_expert_gate}.weight").to(dtype)
    stacked = stack_experts(experts, arch.activation, options)
    if stacked is not None:
        kernels["experts"] += f"; decode: stacked {stacked.format} experts"
    return MoEMLP(arch.routing, router.to(dtype), experts, shared, shared_gate, stacked)


def read_config(folder: Path) -> tuple[object, Architecture, SchemeResolver]:
    """A model folder's HF config, its Architecture and its layers' schemes; PtqlabError for what the runtime
    cannot run."""
    from transformers import AutoConfig  # start-up time: imported on first use

    check_model_folder(folder, "the fast runtime runs local checkpoint folders")
    config = AutoConfig.from_pretrained(folder)
    resolve = SchemeResolver(json.loads((folder / "config.json").read_text()).get("quantization_config"))
    return config, Architecture.from_config(config), resolve


def check_supported(path: str | Path) -> None:
    """Raise PtqlabError, saying why, if the fast runtime cannot run this folder (reads config and tensor names only)."""
    folder = Path(path)
    read_config(folder)
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            if any(key.endswith(".weight_g_idx") for key in f.keys()):  # noqa: SIM118 (a safetensors handle)
                raise PtqlabError(f"{folder}: activation-ordered groups (weight_g_idx) are not supported by the fast "
                                  "runtime; benchmark with --runtime transformers")


def load_runtime(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 max_positions: int | None = None, options: RuntimeOptions = RuntimeOptions()) -> RuntimeModel:
    """Load a model folder (16-bit or compressed-tensors) for the fast runtime.

    dtype: activation and 16-bit weight dtype (default: the checkpoint's). max_positions: the longest sequence it
    will see (default: min(config's context, 8192)); rotary tables are built for that many positions. options: how
    the GPU kernels run (programmatic dependent launch, FP8 accumulation, the one-row int4 tile)."""
    folder = Path(path)
    config, arch, resolve = read_config(folder)
    device = torch.device(device)
    try:
        tensors = read_tensors(folder, device)
        return build_model(config, arch, tensors, resolve, device, dtype, max_positions, options)
    except torch.OutOfMemoryError as e:
        free, total = torch.cuda.mem_get_info(device)
        raise PtqlabError(f"not enough GPU memory to load {folder} on {device} ({free / 2**30:.1f} of {total / 2**30:.1f} GiB "
                          "free): free the GPU, pick another with --device cuda:N, or benchmark on --device cpu") from e


def build_model(config, arch: Architecture, tensors: dict[str, torch.Tensor], resolve: SchemeResolver,
                device: torch.device, dtype: torch.dtype | None = None, max_positions: int | None = None,
                options: RuntimeOptions = RuntimeOptions()) -> RuntimeModel:
    """A RuntimeModel from checkpoint tensors by name (consumed), e.g. what `checkpoint_tensors` gives in memory."""
    family = arch.family
    embed = tensors.pop(f"{family.embeddings}.weight", None)
    if embed is None:
        raise PtqlabError(f"the checkpoint has no {family.embeddings}.weight")
    dtype = dtype or embed.dtype
    blocks, kernels = [], {}
    for i in range(arch.num_layers):
        prefix = f"{family.layers}.{i}."
        moe = _moe_mlp(config, arch, tensors, prefix, resolve, dtype, options, kernels)
        modules = {}
        for role, names in projections(family).items():
            if moe is None or role in ("qkv", "o"):
                modules[role], kernels[role] = _projection(tensors, prefix, names, resolve, dtype, options)
        norms = {role: tensors.pop(prefix + name + ".weight").to(dtype)
                 for role, name in family.norms.by_role().items() if prefix + name + ".weight" in tensors}
        blocks.append(Block(arch, i, modules["qkv"], modules["o"], modules.get("gate_up"), modules.get("down"), norms,
                            moe))
    norm = tensors.pop(f"{family.final_norm}.weight").to(dtype)
    if f"{family.head}.weight" in tensors or f"{family.head}.weight_packed" in tensors:
        head, kernels["lm_head"] = _projection(tensors, "", (family.head,), resolve, dtype, options)
    else:  # tied to the embedding
        head = build_linear(StoredLinear(embed), dtype, options)
        kernels["lm_head"] = head.kernel
    positions = max_positions or min(getattr(config, "max_position_embeddings", 8192) or 8192, 8192)
    model = RuntimeModel(config, arch, embed.to(dtype), blocks, norm, head, positions, kernels, options)
    model.kv_scales = [_kv_scales(tensors, f"{family.layers}.{i}.", arch, resolve) for i in range(arch.num_layers)]
    if resolve.kv_cache is not None:  # as vLLM does for a checkpoint with a kv_cache_scheme: an FP8 cache
        model.use_kv_scales()
        kernels["kv_cache"] = f"fp8 ({resolve.kv_cache.strategy} scales)"
    if options.choose_kernels:
        model.kernel_choices = choose_kernels(model)
    return model.eval()

