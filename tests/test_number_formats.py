"""The number-format registry (ptqlab/number_formats.py): each row is what the writer writes, what compressed-tensors
infers for the scheme, what the validator expects and what the runtime's loader unpacks."""

import ast
from pathlib import Path

import pytest
import torch

from ptqlab import get_recipe, load_model, number_formats, quantize_model
from ptqlab.formats.compressed_tensors import _ct_scheme, checkpoint_tensors
from ptqlab.number_formats import BY_NAME, FORMATS, format_of
from ptqlab.quant.linear import QuantizedLinear
from ptqlab.recipes import PRESETS, parse_recipe
from ptqlab.schemes import QuantArgs, Scheme

SCHEMES = {name: recipe.scheme for name, recipe in PRESETS.items()} | {
    "fp8 weight-only per tensor": Scheme(QuantArgs(num_bits=8, type="float", strategy="tensor")),
    "int8 weights, int8 activations per tensor": Scheme(QuantArgs(num_bits=8),
                                                        QuantArgs(num_bits=8, strategy="tensor", dynamic=True)),
    "int4 per channel, weight-only": Scheme(QuantArgs(num_bits=4, strategy="channel")),
}


@pytest.mark.parametrize("name", SCHEMES)
def test_each_scheme_is_stored_in_the_format_compressed_tensors_infers(name):
    """The first row that takes a scheme is the compressor compressed-tensors picks for it (its priority list), so
    that config.json declares what llm-compressor would."""
    from compressed_tensors.compressors.format import infer_module_format

    scheme = SCHEMES[name]
    theirs = _ct_scheme(scheme, ["Linear"])
    theirs.format = None  # inferred, not declared
    assert scheme.format == infer_module_format(torch.nn.Linear, theirs).value


def test_every_row_is_a_format_compressed_tensors_has():
    from compressed_tensors.config import CompressionFormat

    assert {f.name for f in FORMATS} <= {f.value for f in CompressionFormat}
    assert len(BY_NAME) == len(FORMATS)


def data_free(name: str):
    """The preset `name` with round-to-nearest steps only (the stored tensors depend on the scheme alone)."""
    return parse_recipe({**PRESETS[name].to_dict(), "steps": ["rtn"]})


@pytest.mark.parametrize("name", [n for n in PRESETS if not data_free(n).calibrated])
def test_the_writer_stores_exactly_the_tensors_the_format_row_declares(tiny_model_dir, name):
    """Names, shapes and dtypes of every quantized linear's stored tensors are the row's `tensors` (their first
    dtype: the one ptqlab writes), so the validator's expectations and the writer cannot drift apart."""
    loaded = load_model(str(tiny_model_dir("llama", torch.bfloat16)))
    recipe = data_free(name)
    quantize_model(loaded.model, recipe, quiet=True)
    stored = checkpoint_tensors(loaded.model)
    modules = {n: m for n, m in loaded.model.named_modules() if isinstance(m, QuantizedLinear)}
    assert modules
    for module_name, module in modules.items():
        fmt = module.scheme.number_format
        out, inp = module.weight_q.shape
        expected = fmt.tensors(module.scheme.weights, out, inp, "", "bfloat16",
                               input_global=module.scheme.input_activations is not None)
        ours = {k.removeprefix(module_name + "."): t for k, t in stored.items() if k.rpartition(".")[0] == module_name}
        assert {k: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for k, t in ours.items()} == {
            k: (layout.dtypes[0], layout.shape) for k, layout in expected.items()}, module_name


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f.pack is not None], ids=lambda f: f.name)
def test_unpack_inverts_pack(fmt):
    g = torch.Generator().manual_seed(0)
    number_type = fmt.number_types[0]
    for num_bits in fmt.bits:
        if number_type == "float":  # E2M1 values, either sign
            values = torch.tensor(number_formats.E2M1_VALUES)[torch.randint(0, 8, (6, 64), generator=g)]
            q = (values * (torch.randint(0, 2, (6, 64), generator=g) * 2 - 1)).to(torch.float8_e4m3fn)
        else:
            q = torch.randint(-(2 ** (num_bits - 1)), 2 ** (num_bits - 1), (6, 64), generator=g, dtype=torch.int8)
        stored = fmt.stored_weight(q, num_bits)
        assert tuple(stored["weight_packed"].shape) == (6, fmt.weight_columns(64, num_bits, number_type))
        shape = torch.Size(stored["weight_shape"].tolist()) if fmt.stores_shape else None
        assert torch.equal(fmt.unpack(stored["weight_packed"], num_bits, shape).to(q.dtype), q), (fmt.name, num_bits)


def test_fp4_formats_are_one_table_read_by_the_checks_and_the_descriptions():
    """NVFP4 and MXFP4 differ in more than their scales' granularity: group size and scale dtype come from their
    rows, in the checks' messages and the schemes' descriptions alike."""
    from ptqlab.schemes import FormatError

    nvfp4, mxfp4 = BY_NAME["nvfp4-pack-quantized"], BY_NAME["mxfp4-pack-quantized"]
    assert number_formats.FP4_FORMATS == (nvfp4, mxfp4)
    with pytest.raises(FormatError, match="16 is not MXFP4's: its groups are 32 columns"):
        QuantArgs(num_bits=4, type="float", strategy="group", group_size=16, scale_dtype="uint8")
    assert PRESETS["mxfp4a16"].scheme.describe().startswith("MXFP4: fp4 (E2M1) weights in groups of 32")
    assert format_of(PRESETS["nvfp4a16"].scheme.weights, False) is nvfp4


def test_runtime_kernel_names_are_kernels_the_runtime_builds():
    """Each row's `runtime_kernels` names a kernel runtime/linear.py's build_linear dispatches on."""
    source = (Path(number_formats.__file__).parent / "runtime" / "linear.py").read_text()
    tree = ast.parse(source)
    build = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "build_linear")
    dispatched = {node.comparators[0].value for node in ast.walk(build)
                  if isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id == "kernel"}
    assert {k for f in FORMATS for k in f.runtime_kernels} <= dispatched


def test_w8a16_fp8_is_fp8_weights_per_channel_with_16_bit_activations():
    recipe = get_recipe("w8a16-fp8")
    assert recipe.scheme == Scheme(QuantArgs(num_bits=8, type="float", strategy="channel"))
    assert not recipe.calibrated
    assert recipe.scheme.format == "naive-quantized"  # compressed-tensors' format for FP8 without FP8 activations
