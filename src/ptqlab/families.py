"""Model families: one row per architecture (a config's `model_type`) saying where its decoder layers live, which
linears play which role (q/k/v/o, gate/up/down, the experts and their router), which norms it has, for a
mixture of experts how its MoE block is laid out and which config keys size it, and for a vision-language model
which modules beside its text decoder stay 16-bit.

Everything that differs between architectures reads its row here: the engine (decoder layers, per-expert linears,
the checkpoint's names), the smoothing mappings (engine/smoothing.py derives them from the roles), the memory
plan's shape, the fast runtime, the GGUF export and the tests' tiny models. A new architecture is one row of
`FAMILIES` and a tiny-model test (tests/test_families.py checks every row against a tiny model of its family).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ptqlab.errors import PtqlabError


@dataclass(frozen=True)
class Linears:
    """A decoder layer's linears by role, as module names inside the layer (what the checkpoint names them too)."""

    qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    """q, k and v; or the one linear that computes them side by side, rows [q | k | v] (Phi-3)."""
    o: str = "self_attn.o_proj"
    gate_up: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    """The MLP's gate and up; or the one linear that computes both, rows [gate | up] (Phi-3). A mixture of experts
    has these per expert (`ExpertLayout`)."""
    down: str = "mlp.down_proj"
    o_reads_v: bool = True
    """o's input channels are v's output channels, head by head (False for multi-head latent attention, whose values
    come out of kv_b_proj interleaved with the keys' no-rope part)."""

    @property
    def v(self) -> str:
        """The linear whose output rows o reads: v, or the fused qkv (its v rows)."""
        return self.qkv[-1]

    @property
    def up(self) -> str:
        """The linear whose output rows multiply act(gate): up, or the fused gate_up (its up half)."""
        return self.gate_up[-1]

    @property
    def fused_qkv(self) -> bool:
        return len(self.qkv) == 1

    @property
    def fused_gate_up(self) -> bool:
        return len(self.gate_up) == 1


@dataclass(frozen=True)
class Norms:
    """A decoder layer's RMSNorms by role, as module names inside the layer."""

    attention_input: str | None = "input_layernorm"
    """None: the block is normed after it, not before (OLMo 2), so no norm feeds the attention's input linears."""
    mlp_input: str | None = "post_attention_layernorm"
    attention_output: str | None = None
    """Gemma's sandwich norms: the attention's output is normed before the residual add (and `mlp_output` too)."""
    mlp_output: str | None = None
    query: str | None = None
    """A per-head norm of q and of k before the rotary embedding (Qwen3, Gemma 3)."""
    key: str | None = None
    offset: float = 0.0
    """Gemma's (and Qwen3-Next's) norms scale by (1 + w) where others scale by w."""
    low_rank: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """Norms inside the attention between a low-rank projection and the linear that expands it (multi-head latent
    attention: q_a_layernorm -> q_b_proj, kv_a_layernorm -> kv_b_proj), as (norm, the linears that read it)."""

    def by_role(self) -> dict[str, str]:
        """Every norm the layer has: role -> module name."""
        roles = ("attention_input", "attention_output", "mlp_input", "mlp_output", "query", "key")
        named = {role: getattr(self, role) for role in roles if getattr(self, role) is not None}
        return named | {norm: norm for norm, _ in self.low_rank}


TRANSFORMERS_MLP = "mlp"
"""What transformers 5 calls every decoder layer's MLP block, an MoE one included."""


@dataclass(frozen=True)
class ExpertLayout:
    """A mixture-of-experts MLP block: its experts' and router's names in the checkpoint, and the config keys that
    size and route it."""

    projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    """An expert's gate, up and down projection, as the checkpoint names them (block.experts.E.<name>)."""
    block: str = TRANSFORMERS_MLP
    """The MoE block's name in the checkpoint (Mixtral: block_sparse_moe, which transformers renamed mlp)."""
    router: str = "gate"
    """The router's linear inside the block, as transformers names it; it stays 16-bit."""
    stored_router: str | None = None
    """The router's name inside the block in the checkpoint where the hub's differs from transformers' (Phi-3.5-MoE:
    gate for transformers' router; Granite MoE: router.layer)."""
    shared_expert: str | None = None
    """A dense MLP beside the routed experts inside the block (Qwen2-MoE)."""
    shared_projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    """The shared expert's gate, up and down projection."""
    shared_expert_gate: str | None = None
    """The shared expert's gate inside the block (a linear to one output; it stays 16-bit)."""
    count_key: str = "num_experts"
    """The config key giving the routed experts per MoE layer."""
    width_key: str = "moe_intermediate_size"
    """The config key giving one expert's MLP width."""
    shared_width_key: str | None = None
    """The config key giving the shared expert's MLP width."""
    shared_count_key: str | None = None
    """Instead, the config key giving how many experts' widths the shared MLP has (DeepSeek: n_shared_experts)."""
    top_k_key: str = "num_experts_per_tok"
    """The config key giving how many experts each token is routed to."""
    normalize: bool | str = "norm_topk_prob"
    """Whether the top-k routing probabilities are renormalized to sum to one: always (True), or as this config key
    says."""
    fp32_routing_weights: bool = False
    """The routing weights stay fp32 (Mixtral) instead of being cast to the model dtype."""
    module: str = TRANSFORMERS_MLP
    """The MoE block's module name in transformers' model (Llama 4: feed_forward, as its checkpoints name it; Granite
    MoE keeps block_sparse_moe)."""
    transposed: bool = False
    """transformers' fused experts compute x @ W: gate_up_proj [E, H, 2I], down_proj [E, I, H] (Llama 4, gpt-oss),
    not x @ W.T from [E, 2I, H] and [E, H, I]."""
    interleaved: bool = False
    """gate and up alternate along the fused 2I axis (gpt-oss: gate = gate_up_proj[..., ::2]) instead of being its
    halves."""
    activation: str = "gated"
    """How an expert combines gate and up: "gated", act(gate) * up with the config's activation; "clamped_swiglu",
    gpt-oss's (clamp(up) + 1) * g * sigmoid(alpha * g), g = gate clamped from above, alpha and the clamp the fused
    module's (up does not reach down linearly)."""
    router_weight_on_input: bool = False
    """The routing weight scales an expert's input, not its output (Llama 4: x * sigmoid(top-k logit), vLLM's
    apply_router_weight_on_input)."""
    decoded_formats: tuple[str, ...] = ()
    """quantization_config quant_methods a source checkpoint may ship its experts in (gpt-oss: mxfp4), which
    transformers decodes exactly to 16-bit on loading and ptqlab then quantizes with the recipe."""

    @property
    def keep(self) -> tuple[str, ...]:
        """What stays 16-bit (the router, a shared expert's gate), as ignore patterns over the names `module_name`
        gives."""
        kept = (self.router,) + ((self.shared_expert_gate,) if self.shared_expert_gate else ())
        return tuple(rf"re:.*{self.block}\.{name}$" for name in kept)

    @property
    def block_renames(self) -> tuple[tuple[str, str], ...]:
        """(transformers' module-name part, the checkpoint's) where transformers renamed the block: the names an
        `ignore` list gives modules (llm-compressor's: the hub's block, transformers' router)."""
        return () if self.block == self.module else ((f".{self.module}.", f".{self.block}."),)

    @property
    def renames(self) -> tuple[tuple[str, str], ...]:
        """The same for tensor names, which also take the hub's name of a renamed router."""
        router = ((f".{self.module}.{self.router}.", f".{self.module}.{self.stored_router}."),) if self.stored_router \
            else ()
        return router + self.block_renames

    def count(self, config) -> int:
        return getattr(text_config(config), self.count_key, None) or 0

    def shared_width(self, config) -> int:
        """The shared expert's MLP width (0: none)."""
        config = text_config(config)
        if self.shared_count_key:
            return (getattr(config, self.shared_count_key, None) or 0) * getattr(config, self.width_key)
        return (getattr(config, self.shared_width_key, None) or 0) if self.shared_width_key else 0

    def renormalizes(self, config) -> bool:
        return self.normalize if isinstance(self.normalize, bool) else bool(getattr(text_config(config), self.normalize, False))


def text_config(config):
    """The config that holds a decoder's keys: a vision-language model's text config, else the config itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


@dataclass(frozen=True)
class KeptModules:
    """Linears a family keeps 16-bit in every recipe: a pattern over their names (as an `ignore` entry) and why."""

    pattern: str
    why: str


@dataclass(frozen=True)
class ModelFamily:
    """One architecture: everything ptqlab needs to know about its modules and config that differs between them."""

    layers: str = "model.layers"
    """The dotted path of the decoder-layer list."""
    attention: str = "self_attn"
    """The attention module inside a decoder layer (where a quantized KV cache's k_scale and v_scale live)."""
    linears: Linears = field(default_factory=Linears)
    norms: Norms = field(default_factory=Norms)
    experts: ExpertLayout | None = None
    """The MoE block of a mixture-of-experts family (its MLP linears are then per expert); None: a dense MLP."""
    embeddings: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    head: str = "lm_head"
    scaled_embeddings: bool = False
    """The embeddings are multiplied by sqrt(hidden_size) (Gemma)."""
    fast_runtime: bool = True
    """runtime/model.py runs it (a decoder in these roles, with the config's rotary, window and softcap keys)."""
    gguf_architecture: str | None = None
    """llama.cpp's architecture for it (its general.architecture: llama, qwen2; formats/gguf_file.ARCHITECTURES);
    None: no GGUF export."""
    keep: tuple[KeptModules, ...] = ()
    """Linears of the decoder layers that stay 16-bit in every recipe, and why (besides an MoE's routers)."""
    layer_kinds: tuple[str, ...] = ()
    """What the decoder layers' linears may differ in, one phrase each (the first dense layers of an MoE, linear
    attention beside full attention): the row's roles name the modules of each kind, a layer has those of its kind."""
    vision: tuple[str, ...] = ()
    """A vision-language model's modules beside its text decoder (the vision tower, the projector), by module name;
    () for a text-only model. Its row keeps their linears 16-bit (`keep`, from `vision_language`)."""

    @property
    def auto_class(self) -> str:
        """transformers' auto class that loads the whole model (a vision-language model with its vision part)."""
        return "AutoModelForImageTextToText" if self.vision else "AutoModelForCausalLM"


_MLA = dict(linears=Linears(qkv=("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"), o_reads_v=False),
            norms=Norms(low_rank=(("self_attn.q_a_layernorm", ("self_attn.q_b_proj",)),
                                  ("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",)))))
"""Multi-head latent attention (DeepSeek-V2/V3): q and the compressed kv read the input norm; each low-rank part is
normed before the linear that expands it. (Without q_lora_rank, q_proj reads the input norm in q_a_proj's place.)"""
_SHARED_EXPERTS = dict(count_key="n_routed_experts", shared_expert="shared_experts", shared_count_key="n_shared_experts")
"""DeepSeek's MoE block and its descendants': n_routed_experts, and n_shared_experts shared ones as one MLP."""
_FIRST_DENSE = ("the first first_k_dense_replace layers have a dense MLP (the row's gate_up and down), the others "
                "the experts",)
_LINEAR_ATTENTION = KeptModules(r"re:.*linear_attn\..*", "the gated delta-net linear attention stays 16-bit (as "
                                "llm-compressor's and Qwen's own recipes keep it): its recurrent state carries each "
                                "projection's error through the whole sequence")
VISION_KEPT = ("as llm-compressor's vision-language recipes keep them: calibration is text only and never reaches "
               "them, and image understanding rests on them for a small share of the weights")


def vision_language(*vision: str) -> dict:
    """A transformers 5 vision-language model's row settings: its text decoder under model.language_model (the head at
    the top), and the modules `vision` names beside it (vision tower, projector) kept 16-bit, with why."""
    pattern = "re:(" + "|".join(re.escape(name) for name in vision) + r")\..*"
    return dict(layers="model.language_model.layers", embeddings="model.language_model.embed_tokens",
                final_norm="model.language_model.norm", vision=vision, fast_runtime=False,
                keep=(KeptModules(pattern, f"the vision tower and projector stay 16-bit, {VISION_KEPT}"),))


_QWEN_NEXT_EXPERTS = ExpertLayout(shared_expert="shared_expert", shared_expert_gate="shared_expert_gate",
                                  shared_width_key="shared_expert_intermediate_size")
_HYBRID_ATTENTION = ("linear attention (linear_attn) or full attention (the row's q, k, v, o)",)
_QWEN3_5 = vision_language("model.visual")
"""Qwen3.5 (MoE): Qwen3-Next's decoder (linear attention beside gated full attention, (1 + w) norms, experts with a
gated shared expert) as the text model of a vision-language model."""
_GEMMA_NORMS = dict(mlp_input="pre_feedforward_layernorm", attention_output="post_attention_layernorm",
                    mlp_output="post_feedforward_layernorm", offset=1.0)
_HEAD_NORMS = dict(query="self_attn.q_norm", key="self_attn.k_norm")

# model_type -> its family. Each row is checked against a tiny random model of its family (tests/tiny.py).
FAMILIES: dict[str, ModelFamily] = {
    "llama": ModelFamily(gguf_architecture="llama"),
    "mistral": ModelFamily(gguf_architecture="llama"),  # convert_hf_to_gguf: MistralForCausalLM is llama
    "qwen2": ModelFamily(gguf_architecture="qwen2"),
    "qwen3": ModelFamily(norms=Norms(**_HEAD_NORMS)),
    "gemma2": ModelFamily(norms=Norms(**_GEMMA_NORMS), scaled_embeddings=True),
    "gemma3_text": ModelFamily(norms=Norms(**_GEMMA_NORMS, **_HEAD_NORMS), scaled_embeddings=True),
    "phi3": ModelFamily(linears=Linears(qkv=("self_attn.qkv_proj",), gate_up=("mlp.gate_up_proj",))),
    "qwen2_moe": ModelFamily(experts=ExpertLayout(shared_expert="shared_expert", shared_expert_gate="shared_expert_gate",
                                                  shared_width_key="shared_expert_intermediate_size")),
    "qwen3_moe": ModelFamily(norms=Norms(**_HEAD_NORMS), experts=ExpertLayout()),
    "mixtral": ModelFamily(experts=ExpertLayout(("w1", "w3", "w2"), block="block_sparse_moe",
                                                count_key="num_local_experts", width_key="intermediate_size",
                                                normalize=True, fp32_routing_weights=True)),
    "deepseek_v2": ModelFamily(**_MLA, experts=ExpertLayout(**_SHARED_EXPERTS),
                               layer_kinds=_FIRST_DENSE, fast_runtime=False),
    "deepseek_v3": ModelFamily(**_MLA, experts=ExpertLayout(**_SHARED_EXPERTS), layer_kinds=_FIRST_DENSE,
                               fast_runtime=False),
    "glm4_moe": ModelFamily(experts=ExpertLayout(**_SHARED_EXPERTS), layer_kinds=_FIRST_DENSE, fast_runtime=False),
    "olmo2": ModelFamily(norms=Norms(attention_input=None, mlp_input=None, attention_output="post_attention_layernorm",
                                     mlp_output="post_feedforward_layernorm", **_HEAD_NORMS), fast_runtime=False),
    "olmoe": ModelFamily(norms=Norms(**_HEAD_NORMS), experts=ExpertLayout(width_key="intermediate_size"),
                         fast_runtime=False),
    "granite": ModelFamily(fast_runtime=False),  # its embedding, residual, attention and logit multipliers
    "granitemoe": ModelFamily(experts=ExpertLayout(block="block_sparse_moe", module="block_sparse_moe",
                                                   router="router", stored_router="router.layer",
                                                   count_key="num_local_experts", width_key="intermediate_size",
                                                   normalize=True),
                              fast_runtime=False),  # experts under llm-compressor's names
    "phimoe": ModelFamily(experts=ExpertLayout(("w1", "w3", "w2"), block="block_sparse_moe", router="router",
                                               stored_router="gate", count_key="num_local_experts",
                                               width_key="intermediate_size", normalize=True),
                          fast_runtime=False),  # LayerNorms with bias, sparsemixer routing
    "smollm3": ModelFamily(fast_runtime=False),  # no rotary embedding in every fourth layer
    "qwen3_next": ModelFamily(norms=Norms(**_HEAD_NORMS, offset=1.0), experts=_QWEN_NEXT_EXPERTS,
                              keep=(_LINEAR_ATTENTION,), layer_kinds=_HYBRID_ATTENTION, fast_runtime=False),
    # Llama 4 (text): MoE layers (moe_layers) interleaved with dense ones, whose MLP is feed_forward.{gate,up,down}_proj;
    # attention's NoPE layers, chunked attention and sigmoid routing are not the fast runtime's.
    "llama4_text": ModelFamily(
        linears=Linears(gate_up=("feed_forward.gate_proj", "feed_forward.up_proj"), down="feed_forward.down_proj"),
        experts=ExpertLayout(block="feed_forward", module="feed_forward", router="router", shared_expert="shared_expert",
                             count_key="num_local_experts", width_key="intermediate_size",
                             shared_width_key="intermediate_size", normalize=False, transposed=True,
                             router_weight_on_input=True),
        layer_kinds=("MoE layers every interleave_moe_layer_step, dense ones between",), fast_runtime=False),
    # gpt-oss: q/k/v/o and the experts have biases; self_attn.sinks (one logit per head) is no linear and stays as it is;
    # its router (a module with weight and bias) stays 16-bit. Sinks, biases and the clamped SwiGLU are not the fast
    # runtime's.
    "gpt_oss": ModelFamily(
        experts=ExpertLayout(router="router", count_key="num_local_experts", width_key="intermediate_size",
                             normalize=True, transposed=True, interleaved=True, activation="clamped_swiglu",
                             decoded_formats=("mxfp4",)),
        fast_runtime=False),
    # Vision-language models: their text decoder is quantized, their vision tower and projector stay 16-bit.
    "qwen2_5_vl": ModelFamily(**vision_language("model.visual")),
    "qwen3_vl": ModelFamily(**vision_language("model.visual"), norms=Norms(**_HEAD_NORMS)),
    "gemma3": ModelFamily(**vision_language("model.vision_tower", "model.multi_modal_projector"),
                          norms=Norms(**_GEMMA_NORMS, **_HEAD_NORMS), scaled_embeddings=True),
    "mistral3": ModelFamily(**vision_language("model.vision_tower", "model.multi_modal_projector")),
    "qwen3_5_moe": ModelFamily(**{**_QWEN3_5, "keep": _QWEN3_5["keep"] + (_LINEAR_ATTENTION,)},
                               norms=Norms(**_HEAD_NORMS, offset=1.0), experts=_QWEN_NEXT_EXPERTS,
                               layer_kinds=_HYBRID_ATTENTION),
}

EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
"""Config keys whose presence marks a mixture-of-experts model (of a family without a row, to refuse it)."""


def family_of(config, purpose: str = "ptqlab") -> ModelFamily:
    """The family row of `config`'s model_type; one line refusing a model_type without one (`purpose`: what needs
    it, for the message)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise PtqlabError(f"{purpose} needs the model family of {model_type!r}, which ptqlab does not know (known: "
                          f"{', '.join(FAMILIES)}): add a row to ptqlab.families.FAMILIES")
    return FAMILIES[model_type]


def expert_count(config) -> int:
    """Routed experts per MoE layer, from the family's count key (or, for a family without a row, whichever known
    key the config has); 0 for a dense model."""
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is not None:
        return family.experts.count(config) if family.experts else 0
    return next((n for n in (getattr(text_config(config), key, None) for key in EXPERT_COUNT_KEYS) if n), 0)


def moe_layout(config) -> ExpertLayout | None:
    """The MoE layout of a supported MoE family; None for a dense model; one line refusing an MoE without a row."""
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is not None and family.experts is not None:
        return family.experts
    if family is None and expert_count(config):
        supported = sorted(name for name, row in FAMILIES.items() if row.experts is not None)
        raise PtqlabError(f"{model_type} is a mixture-of-experts architecture ptqlab does not support yet (supported: "
                          f"{', '.join(supported)}): add a row to ptqlab.families.FAMILIES")
    return None


def checkpoint_name(name: str, layout: ExpertLayout | None) -> str:
    """A tensor's name in the checkpoint, from its name in the (unfused) model."""
    for ours, theirs in () if layout is None else layout.renames:
        name = name.replace(ours, theirs)
    return name


def module_name(name: str, layout: ExpertLayout | None) -> str:
    """A module's name in the checkpoint's quantization_config (its `ignore` list), from its name in the model."""
    for ours, theirs in () if layout is None else layout.block_renames:
        name = name.replace(ours, theirs)
    return name


def head_dim(config) -> int:
    """The width of one attention head: the config's head_dim where it sets one (Gemma, Qwen3), else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
