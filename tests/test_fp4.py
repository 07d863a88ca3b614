"""FP4 formats (NVFP4, NVFP4A16, MXFP4A16): the arithmetic against a float64 reference and against compressed-tensors'
own functions bit for bit, the formats' one-line errors, GPTQ on the FP4 grid, global scales shared by fused layers,
and checkpoints that compressed-tensors' FP4 decompressors and ptqlab's runtime read as ptqlab computed them.

Hard inputs as in test_primitives: outliers, an all-zero row, tiny and huge rows, a half-zero row.
"""

import json
from pathlib import Path

import pytest
import torch

from ptqlab import get_recipe, load_model, number_formats, quantize, quantize_model
from ptqlab.data import CalibrationConfig, load_calibration
from ptqlab.engine.global_scales import fused_groups, weight_global_scales
from ptqlab.errors import PtqlabError
from ptqlab.formats.compressed_tensors import write_checkpoint
from ptqlab.formats.validate import validate_checkpoint
from ptqlab.quant import fp4
from ptqlab.quant.gptq import GPTQConfig, gptq
from ptqlab.quant.linear import QuantizedLinear, rtn
from ptqlab.quant.primitives import dequantize
from ptqlab.recipes import PRESETS, parse_recipe
from ptqlab.schemes import MXFP4A16, NVFP4, NVFP4A16, FormatError, QuantArgs
from test_gptq import correlated_inputs, hessian_of
from test_primitives import hard_matrix

E2M1 = torch.tensor(number_formats.E2M1_VALUES, dtype=torch.float64)
EVEN = torch.tensor([0.0, 1.0, 2.0, 4.0], dtype=torch.float64)
"""The E2M1 values with an even mantissa: where a tie goes."""
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
WEIGHT_FORMATS = {"nvfp4": NVFP4.weights, "mxfp4": MXFP4A16.weights}


def reference_e2m1(y: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value of each element of y (float64, within ±6), ties to the even mantissa, by search."""
    magnitude = y.abs().unsqueeze(-1)
    distance = (magnitude - E2M1).abs()
    best = distance.min(dim=-1, keepdim=True).values
    tied = distance == best
    even = tied & torch.isin(E2M1, EVEN)
    choice = torch.where(even.any(-1, keepdim=True), even, tied).double().argmax(-1)
    return E2M1[choice] * torch.sign(y)


# ---- the E2M1 grid and its packing ---------------------------------------------------------------------------------

def test_e2m1_rounding_is_nearest_with_ties_to_even_as_compressed_tensors_rounds():
    from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4

    g = torch.Generator().manual_seed(0)
    midpoints = (E2M1[1:] + E2M1[:-1]) / 2
    y = torch.cat([torch.rand(4000, generator=g, dtype=torch.float64) * 12 - 6, midpoints, -midpoints, E2M1, -E2M1])
    ours = fp4.round_to_e2m1(y.float())
    assert torch.equal(ours.double(), reference_e2m1(y.float().double()))
    assert torch.equal(ours, cast_to_fp4(y.float().clone()))


def test_packing_is_compressed_tensors_and_round_trips():
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8

    g = torch.Generator().manual_seed(1)
    values = torch.cat([E2M1, -E2M1]).float()
    q = values[torch.randint(0, len(values), (24, 64), generator=g)]  # -0.0 included: its sign is packed too
    packed = number_formats.pack_fp4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (24, 32)
    assert torch.equal(packed, pack_fp4_to_uint8(q))
    assert torch.equal(packed[:, 0] & 0x0F, number_formats.pack_fp4(q[:, :2])[:, 0] & 0x0F)  # the even column in the low nibble
    unpacked = number_formats.unpack_fp4(packed)
    assert unpacked.dtype == torch.float8_e4m3fn
    assert torch.equal(unpacked.float(), q) and torch.equal(torch.signbit(unpacked.float()), torch.signbit(q))
    assert torch.equal(unpacked.float(), unpack_fp4_from_uint8(packed, 24, 64, dtype=torch.float32))


# ---- scales and grid values: a float64 reference, and compressed-tensors bit for bit --------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", list(WEIGHT_FORMATS))
def test_fp4_grid_values_are_the_float64_nearest_and_the_error_within_half_a_step(fmt, dtype):
    args = WEIGHT_FORMATS[fmt]
    x = hard_matrix(24, 256, dtype)
    gscale = fp4.globals_of(x, dtype) if fmt == "nvfp4" else None
    q, scale, _ = rtn(x, args, dtype, gscale)
    values = fp4.scale_values(scale, args, gscale).double().repeat_interleave(args.group_size, dim=1)
    assert torch.isfinite(values).all() and (values > 0).all()
    exact = (x.double() / values).clamp(-6, 6)
    assert torch.equal(q.double(), reference_e2m1(exact))
    # Each element within half the E2M1 step at its magnitude (1 between 4 and 6), unless clipped at ±6.
    error = (dequantize(q, scale, None, args, torch.float64, gscale) - x.double()).abs()
    half_step = torch.where(exact.abs() > 4, 1.0, torch.where(exact.abs() > 2, 0.5, 0.25)) * values
    clipped = (x.double() / values).abs() > 6
    assert (error[~clipped] <= half_step[~clipped] * (1 + 1e-6)).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_nvfp4_scales_and_values_are_compressed_tensors_bit_for_bit(dtype):
    """generate_gparam and calculate_qparams (global scale, FP8 group scales), then quantize and the packer, on the
    weight's own dtype as llm-compressor computes them; and the dynamic activation quantization with a global scale."""
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
    from compressed_tensors.quantization.utils import calculate_qparams, compute_dynamic_scales_and_zp, generate_gparam

    scheme = preset_name_to_scheme("NVFP4", ["Linear"])
    w = hard_matrix(24, 256, dtype)
    absmax = w.abs().amax().reshape(1)
    global_scale = generate_gparam(-absmax, absmax)
    groups = w.unflatten(-1, (16, 16))
    scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), scheme.weights, global_scale=global_scale)
    scale = scale.to(dtype)  # the module's weight_scale parameter has the weight's dtype
    theirs = pack_fp4_to_uint8(ct_quantize(w, scale, zero_point, scheme.weights, global_scale=global_scale))

    q, our_scale, _ = rtn(w, NVFP4.weights, dtype, fp4.globals_of(w, dtype))
    assert torch.equal(fp4.globals_of(w, dtype), global_scale)
    assert torch.equal(our_scale, scale.to(torch.float8_e4m3fn)) and torch.equal(number_formats.pack_fp4(q), theirs)

    x = hard_matrix(10, 256, dtype, seed=2).reshape(2, 5, 256)
    input_global = generate_gparam(-x.abs().amax().reshape(1) / 2, x.abs().amax().reshape(1) / 2)  # some clip at 6
    scale, zero_point = compute_dynamic_scales_and_zp(x, scheme.input_activations, module=None, global_scale=input_global)
    expected = ct_fake_quantize(x, scale, zero_point, scheme.input_activations, global_scale=input_global)
    assert torch.equal(fp4.fake_quantize(x, NVFP4.input_activations, input_global), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mxfp4_scales_and_values_are_compressed_tensors_bit_for_bit(dtype):
    """generate_mx_scales via calculate_qparams (a power of two, stored as an E8M0 exponent), quantize, the packer."""
    from compressed_tensors.compressors.mx_utils import compress_mx_scale
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = preset_name_to_scheme("MXFP4A16", ["Linear"]).weights
    w = hard_matrix(24, 256, dtype)
    groups = w.unflatten(-1, (8, 32))
    scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    scale = scale.to(dtype)
    q, our_scale, _ = rtn(w, MXFP4A16.weights, dtype)
    assert our_scale.dtype == torch.uint8 and torch.equal(our_scale, compress_mx_scale(scale, torch.uint8))
    assert torch.equal(number_formats.pack_fp4(q), pack_fp4_to_uint8(ct_quantize(w, scale, zero_point, args)))
    # a scale is exactly a power of two: 2^(exponent - 127)
    assert torch.equal(fp4.scale_values(our_scale, MXFP4A16.weights, None).double(),
                       2.0 ** (our_scale.double() - 127))


# ---- the formats as a recipe names them ----------------------------------------------------------------------------

def test_fp4_presets_are_compressed_tensors_schemes():
    assert PRESETS["nvfp4"].scheme == NVFP4 and PRESETS["nvfp4"].calibrated
    assert PRESETS["nvfp4a16"].scheme == NVFP4A16 and not PRESETS["nvfp4a16"].calibrated
    assert PRESETS["mxfp4a16"].scheme == MXFP4A16 and not PRESETS["mxfp4a16"].calibrated
    assert [PRESETS[n].scheme.format for n in ("nvfp4", "nvfp4a16", "mxfp4a16")] == [
        "nvfp4-pack-quantized", "nvfp4-pack-quantized", "mxfp4-pack-quantized"]
    assert NVFP4.input_activations.dynamic == "local"
    spelled = parse_recipe({"name": "x", "steps": ["rtn"], "scheme": {
        "weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
                    "scale_dtype": "float8_e4m3fn"},
        "input_activations": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
                              "dynamic": "local", "scale_dtype": "float8_e4m3fn"}}})
    assert spelled.scheme == NVFP4


FP4 = dict(num_bits=4, type="float")


@pytest.mark.parametrize("kwargs,role,message", [
    (dict(FP4, strategy="channel"), "weights", "num_bits: 4 is not supported for type float with strategy 'channel'"),
    (dict(FP4, strategy="tensor_group", group_size=32, scale_dtype="float8_e4m3fn"), "weights",
     "group_size: 32 is not NVFP4's: its groups are 16 columns"),
    (dict(FP4, strategy="group", group_size=16, scale_dtype="uint8"), "weights", "group_size: 16 is not MXFP4's"),
    (dict(FP4, strategy="tensor_group", group_size=16), "weights", "scale_dtype: null is not NVFP4's"),
    (dict(FP4, strategy="group", group_size=32, scale_dtype="float8_e4m3fn"), "weights",
     "scale_dtype: 'float8_e4m3fn' is not MXFP4's: it stores power-of-two E8M0 scales; use uint8"),
    (dict(FP4, strategy="group", group_size=32, scale_dtype="uint8", dynamic=True), "input_activations",
     "num_bits: 4 is not supported for type float with strategy 'group'"),
    (dict(FP4, strategy="tensor_group", group_size=16, scale_dtype="float8_e4m3fn", dynamic=True), "input_activations",
     "dynamic: true is not supported for NVFP4 input_activations"),
    (dict(FP4, strategy="tensor_group", group_size=16, scale_dtype="float8_e4m3fn", dynamic="local"), "weights",
     "dynamic: 'local' is not allowed for weights"),
    (dict(num_bits=8, type="float", strategy="tensor_group", group_size=16), "weights",
     "strategy: 'tensor_group' is NVFP4's"),
    (dict(num_bits=8, type="float", strategy="channel", scale_dtype="uint8"), "weights",
     "scale_dtype: 'uint8' applies only to FP4 formats"),
    (dict(num_bits=8, type="float", strategy="token", dynamic="local"), "input_activations", "dynamic: local applies only"),
    (dict(FP4, strategy="tensor_group", group_size=16, scale_dtype=8), "weights", "scale_dtype: 8 is not a string"),
])
def test_a_format_the_fp4_arithmetic_does_not_compute_is_refused_in_one_line(kwargs, role, message):
    doc = {"name": "x", "steps": ["rtn"], "scheme": {"weights": kwargs} if role == "weights" else {
        "weights": {"num_bits": 8}, "input_activations": kwargs}}
    with pytest.raises(PtqlabError) as e:
        parse_recipe(doc)
    text = str(e.value)
    assert f"scheme.{role}.{message}" in text and "\n" not in text, text


def test_fp4_activations_go_with_nvfp4_weights_only():
    with pytest.raises(PtqlabError, match="NVFP4 activations\\) goes with NVFP4 weights only"):
        parse_recipe({"name": "x", "steps": ["rtn"], "scheme": {"weights": {"num_bits": 8},
                                                                "input_activations": NVFP4.input_activations.values()}})
    with pytest.raises(PtqlabError, match="FP4 weights take 16-bit activations"):
        parse_recipe({"name": "x", "steps": ["rtn"], "scheme": {
            "weights": MXFP4A16.weights.values(), "input_activations": {"num_bits": 8, "strategy": "token", "dynamic": True}}})
    with pytest.raises(FormatError):
        QuantArgs(num_bits=4, type="float", strategy="group", group_size=32)  # no scale_dtype


def test_the_group_size_of_an_fp4_recipe_is_fixed():
    with pytest.raises(PtqlabError, match="nvfp4a16: NVFP4's groups are 16 columns, fixed by the format"):
        get_recipe("nvfp4a16").with_overrides(group_size=32)
    with pytest.raises(PtqlabError, match="MXFP4's groups are 32 columns"):
        parse_recipe({"name": "x", "scheme": "MXFP4A16", "group_size": 64, "steps": ["rtn"]})


# ---- fused layers share one global scale --------------------------------------------------------------------------

def test_fused_layers_share_the_smallest_of_their_global_scales():
    names = [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"] + [f"model.layers.0.mlp.{p}_proj" for p in
                                                                       ("gate", "up", "down")]
    names += ["model.layers.0.mlp.experts.3.w1", "model.layers.0.mlp.experts.3.w3", "model.layers.0.mlp.experts.3.w2"]
    assert fused_groups(names) == [names[:3], [names[3]], names[4:6], [names[6]], names[7:9], [names[9]]]
    g = torch.Generator().manual_seed(0)
    linears = {name: torch.nn.Linear(64, 32, bias=False) for name in names}
    for i, linear in enumerate(linears.values()):
        torch.nn.init.normal_(linear.weight, std=0.01 * (1 + i), generator=g)
    shared = weight_global_scales(linears, torch.float32)
    own = {name: fp4.globals_of(linear.weight.detach(), torch.float32) for name, linear in linears.items()}
    for group in fused_groups(names):
        smallest = min(own[name] for name in group)
        assert all(torch.equal(shared[name], smallest) for name in group), group


# ---- GPTQ on the FP4 grid ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", list(WEIGHT_FORMATS))
@pytest.mark.parametrize("act_order,static_groups", [(True, True), (False, False)])
def test_gptq_output_error_below_rtn(fmt, act_order, static_groups):
    """The layer output error against the float64 output of the original weight, on inputs with correlated channels
    (a Hessian GPTQ can use): GPTQ's below 0.8 x round-to-nearest's, its grid values on the E2M1 grid and its static
    scales (and NVFP4 global scale) those of round-to-nearest."""
    args = WEIGHT_FORMATS[fmt]
    x = correlated_inputs()
    weight = torch.randn(96, 128, generator=torch.Generator().manual_seed(3)) * 0.05
    global_scale = fp4.globals_of(weight, torch.float32) if fmt == "nvfp4" else None
    result = gptq(weight, hessian_of(x), args, GPTQConfig(act_order=act_order, static_groups=static_groups),
                  global_scale=global_scale)
    q_rtn, s_rtn, _ = rtn(weight, args, torch.float32, global_scale)

    def error(q, scale):
        approx = dequantize(q, scale, None, args, torch.float64, global_scale)
        reference = x.double() @ weight.double().T
        return float((x.double() @ approx.T - reference).square().sum() / reference.square().sum())

    assert torch.equal(fp4.round_to_e2m1(result.q.float()), result.q.float())
    assert error(result.q, result.scale) < 0.8 * error(q_rtn, s_rtn)
    if static_groups:
        assert torch.equal(result.scale, s_rtn)
    if fmt == "nvfp4":
        assert torch.equal(result.global_scale, global_scale)


def test_a_gptq_recipe_with_nvfp4a16_weights_writes_a_checkpoint_that_reads_back(tiny_model_dir, tmp_path,
                                                                                  calibration_file):
    recipe = parse_recipe({"name": "nvfp4a16-gptq", "scheme": "NVFP4A16",
                           "steps": [{"gptq": {"dampening_frac": 0.01, "actorder": "static"}}]})
    out = quantize(str(tiny_model_dir("llama")), recipe, out=tmp_path / "q", quiet=True,
                   calibration=CalibrationConfig(dataset=str(calibration_file), num_samples=4, max_seq_len=32))
    validate_checkpoint(out)
    record = json.loads((out / "ptqlab.json").read_text())
    assert record["format"] == "nvfp4-pack-quantized" and "gptq" in record["recipe"]["steps"][0]
    assert {check["reader"] for check in record["verification"]} == {"transformers", "ptqlab runtime"}


# ---- checkpoints: compressed-tensors' decompressors and ptqlab's runtime read what ptqlab computed -----------------

@pytest.fixture(scope="module")
def fp4_checkpoints(tiny_model_dir, tmp_path_factory):
    """Per FP4 preset: the tiny llama quantized in memory (its logits on a few sequences, NVFP4's activations
    quantized) and its checkpoint folder."""
    from tiny import CHATS, write_jsonl

    root = tmp_path_factory.mktemp("fp4")
    data = write_jsonl(root / "chats.jsonl", CHATS)
    ids = torch.randint(3, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    made = {}
    for name in ("nvfp4a16", "mxfp4a16", "nvfp4"):
        loaded, recipe = load_model(str(tiny_model_dir("llama"))), get_recipe(name)
        calibration = load_calibration(loaded.tokenizer, CalibrationConfig(dataset=str(data), num_samples=8,
                                                                           max_seq_len=32)) if recipe.calibrated else None
        quantize_model(loaded.model, recipe, calibration, quiet=True, batch_size=4, device=torch.device("cpu"))
        folder = root / name
        folder.mkdir()
        write_checkpoint(folder, loaded.model, loaded.tokenizer, recipe)
        with torch.no_grad():
            made[name] = (folder, ids, loaded.model(ids).logits)
    return made


@pytest.mark.parametrize("name", ["nvfp4a16", "mxfp4a16", "nvfp4"])
def test_compressed_tensors_decompressors_give_ptqlabs_dequantized_weights(fp4_checkpoints, name):
    """Every linear of the checkpoint through NVFP4PackedCompressor / MXFP4PackedCompressor.decompress, as the config
    declares it, against ptqlab's dequantize of the same stored tensors (its scheme from the config as ptqlab's
    runtime reads it); both in bf16, the dtype the decompressors give."""
    from compressed_tensors.compressors import MXFP4PackedCompressor, NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    from ptqlab.runtime.load import SchemeResolver

    folder = fp4_checkpoints[name][0]
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    compressor = {"nvfp4-pack-quantized": NVFP4PackedCompressor,
                  "mxfp4-pack-quantized": MXFP4PackedCompressor}[config["format"]]
    ct_scheme = QuantizationScheme.model_validate(config["config_groups"]["group_0"])
    resolve = SchemeResolver(config)
    tensors = load_file(folder / "model.safetensors")
    modules = sorted(k.removesuffix(".weight_packed") for k in tensors if k.endswith(".weight_packed"))
    assert len(modules) == 14
    for module in modules:
        stored = {k.removeprefix(module + "."): t for k, t in tensors.items() if k.rpartition(".")[0] == module}
        theirs = compressor.decompress(stored, ct_scheme)["weight"]
        ours = dequantize(number_formats.unpack_fp4(stored["weight_packed"]), stored["weight_scale"], None, resolve(module).weights,
                          theirs.dtype, stored.get("weight_global_scale"))
        assert theirs.dtype == torch.bfloat16 and torch.equal(theirs, ours), module


@pytest.mark.parametrize("name", ["nvfp4a16", "mxfp4a16", "nvfp4"])
def test_the_runtime_computes_what_ptqlab_computed(fp4_checkpoints, name):
    """ptqlab's runtime (dequantized weights; NVFP4 activations fake-quantized per group of 16 with the stored
    input_global_scale) against the quantized model in memory, float32: within 1e-5 relative for weight-only; with
    FP4 activations 1e-3, room for an activation that fp32 rounding (the runtime's own attention and norms) moves
    across a rounding boundary of its grid (measured: equal)."""
    from ptqlab.runtime import load_runtime
    from ptqlab.runtime.linear import DequantizedLinear

    folder, ids, expected = fp4_checkpoints[name]
    runtime = load_runtime(folder, dtype=torch.float32)
    layers = [m for m in runtime.modules() if isinstance(m, DequantizedLinear) and m.input_args is not None]
    assert bool(layers) == (name == "nvfp4") and all(m.input_global_scale is not None for m in layers)
    with torch.no_grad():
        logits = runtime(ids).logits
    relative = float((logits.double() - expected.double()).norm() / expected.double().norm())
    assert relative <= (1e-3 if name == "nvfp4" else 1e-5)


def test_an_nvfp4_layer_keeps_its_scales_in_their_dtypes_through_a_model_cast():
    """QuantizedLinear keeps the stored dtypes (E2M1 values and scales in FP8, global scales fp32) when the model it
    sits in is cast, as readback casts it to float32."""
    layer = QuantizedLinear.from_weight(torch.randn(32, 64), None, NVFP4, input_global_scale=torch.tensor([100.0]))
    before = layer.dequantized_weight(torch.float32)
    layer.to(torch.bfloat16)
    assert (layer.weight_q.dtype, layer.weight_scale.dtype) == (torch.float8_e4m3fn,) * 2
    assert (layer.weight_global_scale.dtype, layer.input_global_scale.dtype) == (torch.float32,) * 2
    assert torch.equal(layer.dequantized_weight(torch.float32), before)
