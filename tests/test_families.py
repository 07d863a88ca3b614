"""The model-family registry (ptqlab.families): every row names exactly the modules a tiny model of its family has,
its MoE layout keeps the routers 16-bit under the checkpoint's names, and what reads config keys (the memory plan)
reads the row's and refuses a family without one."""

import pytest
import torch

from ptqlab.engine.experts import unfuse
from ptqlab.engine.memory import ModelShape
from ptqlab.errors import PtqlabError
from ptqlab.families import FAMILIES, checkpoint_name, module_name, moe_layout
from ptqlab.models import decoder_layers
from ptqlab.pipeline import kept_16_bit
from ptqlab.schemes import matches
from tiny import ARCHS, MOE_ARCHS, VLM_ARCHS, tiny_config, tiny_model


def row_linears(arch: str, experts: int, moe: bool = True, attention: bool = True) -> set[str]:
    """The linears (and routers) one decoder layer has according to its family's row, by module name inside the layer
    (the experts unfused, engine/experts.py): a layer with the experts (`moe`) or the row's dense MLP, and the row's
    attention or (`attention` False) none of its roles (a linear-attention layer, whose linears the row keeps)."""
    family = FAMILIES[arch]
    linears = {*family.linears.qkv, family.linears.o,
               *(reader for _, readers in family.norms.low_rank for reader in readers)} if attention else set()
    layout = family.experts
    if layout is None or not moe:
        return linears | {*family.linears.gate_up, family.linears.down}
    block = layout.module
    linears |= {f"{block}.{layout.router}"}
    linears |= {f"{block}.experts.{e}.{p}" for e in range(experts) for p in layout.projections}
    if layout.shared_expert:
        linears |= {f"{block}.{layout.shared_expert}.{p}" for p in layout.shared_projections}
        if layout.shared_expert_gate:
            linears |= {f"{block}.{layout.shared_expert_gate}"}
    return linears


def test_the_tiny_factory_builds_every_family():
    assert sorted(ARCHS + MOE_ARCHS + VLM_ARCHS) == sorted(FAMILIES)


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_each_row_names_exactly_the_modules_of_its_family(arch):
    """Every layer has the linears and norms of the row's roles for its kind; a family of several layer kinds (the
    first dense layers of an MoE, linear attention) shows each kind in its two-layer tiny model."""
    model = tiny_model(arch)
    unfuse(model)
    family = FAMILIES[arch]
    assert decoder_layers(model) is model.get_submodule(family.layers)
    kinds = set()
    for layer in decoder_layers(model):
        modules = dict(layer.named_modules())
        kept = {name for name in modules if any(matches(name, entry.pattern) for entry in family.keep)}
        # a linear or a router (some transformers routers are modules of their own): a module with a 2-D weight
        linears = {name for name, module in modules.items()
                   if isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2}
        norms = {name for name, module in modules.items()
                 if type(module).__name__.endswith(("RMSNorm", "LayerNorm")) and name not in kept}
        moe = any(".experts." in name for name in linears)
        attention = family.linears.o in modules
        kinds.add((moe, attention))
        experts = family.experts.count(model.config) if family.experts else 0
        assert linears - kept == row_linears(arch, experts, moe, attention)
        roles = family.norms.by_role().values()
        assert norms == ({*roles} if attention else {*roles} - {family.norms.query, family.norms.key})
    assert len(kinds) == 1 + len(family.layer_kinds)
    decoder = model.get_submodule(family.layers.rpartition(".")[0])  # Llama 4's get_decoder() is the model itself
    assert {model.get_submodule(family.embeddings), model.get_submodule(family.final_norm),
            model.get_submodule(family.head)} == {model.get_input_embeddings(), decoder.norm,
                                                  model.get_output_embeddings()}


@pytest.mark.parametrize("arch", VLM_ARCHS)
def test_a_vlm_row_keeps_every_linear_outside_its_text_decoder(arch):
    """A vision-language row's `vision` names the modules beside the text decoder: the linears its row keeps 16-bit are
    exactly the model's linears outside the decoder layers but the output head, and its auto class builds the whole
    model."""
    model = tiny_model(arch)
    family = FAMILIES[arch]
    assert type(model).__name__.endswith("ForConditionalGeneration") and family.auto_class == "AutoModelForImageTextToText"
    assert all(isinstance(model.get_submodule(name), torch.nn.Module) for name in family.vision)
    linears = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    outside = [name for name in linears if not name.startswith(f"{family.layers}.") and name != family.head]
    kept, notes = kept_16_bit(model)
    assert kept == outside and outside and len(notes) == 1


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_an_moe_row_keeps_its_routers_16_bit_under_the_checkpoint_names(arch):
    layout = FAMILIES[arch].experts
    kept = [f"{layout.module}.{layout.router}"]
    if layout.shared_expert_gate:
        kept.append(f"{layout.module}.{layout.shared_expert_gate}")
    for name in kept:
        assert checkpoint_name(f"model.layers.3.{name}.weight", layout).startswith(f"model.layers.3.{layout.block}.")
        assert any(matches(module_name(f"model.layers.3.{name}", layout), pattern) for pattern in layout.keep)
    expert = module_name(f"model.layers.3.{layout.module}.experts.0.{layout.projections[0]}", layout)
    assert not any(matches(expert, pattern) for pattern in layout.keep)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_the_memory_plan_counts_the_experts_its_row_names(arch):
    """The plan counts the model transformers builds (tests/test_memory_families.py); its experts are the ones the
    row's config keys size."""
    config = tiny_config(arch)
    layout = FAMILIES[arch].experts
    layer = next(layer for layer in ModelShape.from_config(config).layers if layer.experts)  # past any dense ones
    text = config.get_text_config()  # a vision-language model's decoder keys (Qwen3.5)
    width, top_k = getattr(text, layout.width_key), getattr(text, layout.top_k_key)
    assert (layer.experts, layer.active_experts, layer.expert_inputs) == (
        getattr(text, layout.count_key), top_k, (text.hidden_size, width))
    shared = layout.shared_width(config)
    assert layer.mlp_width == top_k * width + shared


def test_a_family_without_a_row_is_refused_by_the_memory_plan():
    """A new MoE's config keys are unknown until its row names them: the plan refuses rather than guess."""
    config = tiny_config("qwen3_moe")
    config.model_type = "qwen9_moe"
    with pytest.raises(PtqlabError, match="memory plan.*'qwen9_moe'.*ptqlab.families.FAMILIES"):
        ModelShape.from_config(config)
    with pytest.raises(PtqlabError, match="qwen9_moe is a mixture-of-experts architecture.*ptqlab.families.FAMILIES"):
        moe_layout(config)


def test_a_dense_model_without_a_row_is_planned_from_the_standard_keys():
    """A new dense architecture (a Llama-like model_type ptqlab has no row for) keeps being planned as it was."""
    config = tiny_config("llama")
    known = ModelShape.from_config(config)
    config.model_type = "llama9"
    assert ModelShape.from_config(config) == known


def test_a_dense_model_has_no_moe_layout():
    assert all(moe_layout(tiny_config(arch)) is None for arch in ARCHS)
