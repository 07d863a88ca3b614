"""GGUF export for llama.cpp: the block formats against gguf-py's own reader and quantizers (and ggml's own where
llama-cpp-python is installed), the importance matrix, llama.cpp's tensor mix, whole files read back by transformers'
GGUF reader (and run by llama.cpp where installed) against the source model, tokenizers, the lab's GGUF variant, and
bad input. Tests that need llama.cpp skip without it; every other one runs everywhere."""

import ctypes
import json

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from typer.testing import CliRunner

from ptqlab.cli import app
from ptqlab.export_gguf import export_gguf, input_importance, read_record
from ptqlab.formats.gguf_file import ARCHITECTURES, architecture_of, gguf_tensors, permute_qk, tensor_type
from ptqlab.quant import gguf_quants
from tiny import CHATS, save_tiny_model, tiny_config, tiny_tokenizer, write_jsonl

REFERENCE_TYPES = (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)
"""The types gguf-py quantizes itself (ggml's reference quantizers)."""

# Relative RMS error bounds for Gaussian weights: about 1.4x the uniform-rounding error step / sqrt(12) of each
# format's step on Gaussian blocks (Q8_0: absmax/127 over 32 values; Q4_0: absmax/8; Q4_1: range/15; K-quants: the
# same per sub-block, plus their 6-bit scales). A wrong scale, code or layout is off by far more.
RELATIVE_RMS_BOUND = {T.Q8_0: 0.008, T.Q4_0: 0.12, T.Q4_1: 0.11, T.Q5_0: 0.06, T.Q5_1: 0.055, T.Q4_K: 0.11,
                      T.Q5_K: 0.055, T.Q6_K: 0.03}

# KL from the source model per token (mean over 2 x 48 random tokens) for the tiny models below (initializer_range
# 0.05: sharp enough that the layers matter), read by transformers or by llama.cpp. Measured: Q8_0 1-3e-4, Q4_0 and
# Q4_K_M 0.02-0.035. The source model with q/k rows permuted and not un-permuted is at 0.11: the Q8_0 bound is what
# checks the permutation.
KL_BOUND = {"Q8_0": 0.002, "Q4_0": 0.1, "Q4_K_M": 0.1}


def weights(rows=64, columns=512, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(rows, columns) * 0.02
    w[3, 5] = 0.3  # an outlier
    w[7, :32] = 0  # an all-zero block (and the first 32 of a 256 super-block)
    return w


def skewed_importance(columns=512, seed=1):
    """Mean squared activations as LLM inputs have them: a few channels orders of magnitude above the rest."""
    return torch.exp(torch.randn(columns, generator=torch.Generator().manual_seed(seed)) * 2)


@pytest.mark.parametrize("with_importance", [False, True], ids=["plain", "importance"])
@pytest.mark.parametrize("qtype", gguf_quants.TYPES, ids=lambda t: t.name)
def test_gguf_py_dequantizes_our_blocks_to_our_values_within_the_format_bound(qtype, with_importance):
    w = weights()
    blocks = gguf_quants.quantize(w, qtype, skewed_importance() if with_importance else None)
    ours = blocks.dequantize().numpy()
    theirs = gguf.quants.dequantize(blocks.to_bytes(), qtype)
    assert theirs.shape == ours.shape
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))  # bitwise
    error = torch.from_numpy(ours).double() - w.double()
    relative = float(error.pow(2).mean().sqrt() / w.double().pow(2).mean().sqrt())
    assert relative < RELATIVE_RMS_BOUND[qtype]
    assert float(error[7, :32].abs().max()) == 0  # an all-zero block stays exactly zero


def test_q8_0_error_is_at_most_half_a_step_plus_the_fp16_scale_rounding():
    w = weights()
    blocks = gguf_quants.quantize(w, T.Q8_0)
    error = (blocks.dequantize().double() - w.double()).reshape(-1, 32).abs().max(-1).values
    step = w.double().reshape(-1, 32).abs().max(-1).values / 127
    stored = blocks.fields["d"].double().flatten()
    assert bool((error <= step / 2 + 127 * (stored - step).abs() + 1e-12).all())


@pytest.mark.parametrize("qtype", REFERENCE_TYPES, ids=lambda t: t.name)
def test_reference_quantizers_write_the_bytes_gguf_py_writes(qtype):
    w = weights()
    assert np.array_equal(gguf_quants.quantize(w, qtype).to_bytes(), gguf.quants.quantize(w.numpy(), qtype))


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q4_0, T.Q6_K, T.Q5_0], ids=lambda t: t.name)
def test_importance_lowers_the_importance_weighted_error(qtype):
    w, importance = weights(), skewed_importance()

    def weighted_error(blocks):
        return float(((blocks.dequantize().double() - w.double()) ** 2 * importance.double()).sum())

    plain = weighted_error(gguf_quants.quantize(w, qtype))
    weighted = weighted_error(gguf_quants.quantize(w, qtype, importance))
    assert weighted < 0.8 * plain  # measured: 0.5-0.65 of it on this skew


def test_chunked_quantization_writes_the_same_bytes():
    w, importance = weights(), skewed_importance()
    whole = gguf_quants.quantize(w, T.Q4_K, importance).to_bytes()
    assert np.array_equal(gguf_quants.quantize_to_bytes(w, T.Q4_K, importance, chunk=3 * 512), whole)


def ggml_quantize(weight: torch.Tensor, qtype, importance: torch.Tensor | None = None) -> np.ndarray:
    """llama.cpp's own quantizer (ggml_quantize_chunk of the libggml that llama-cpp-python ships): what
    llama-quantize writes for this weight, uint8 [rows, bytes per row]."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from pathlib import Path

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_void_p]
    source = np.ascontiguousarray(weight.numpy(), dtype=np.float32)
    rows, columns = source.shape
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.zeros((rows, columns // block * size), dtype=np.uint8)
    weights = None if importance is None else np.ascontiguousarray(importance.numpy(), dtype=np.float32)
    lib.ggml_quantize_chunk(int(qtype), source.ctypes.data, out.ctypes.data, 0, rows, columns,
                            None if weights is None else weights.ctypes.data)
    return out


@pytest.mark.parametrize("with_importance", [False, True], ids=["plain", "importance"])
@pytest.mark.parametrize("qtype", gguf_quants.TYPES, ids=lambda t: t.name)
def test_blocks_are_llama_cpps(qtype, with_importance):
    """Against ggml's quantizers themselves: the reference quantizers byte for byte; the searches block for block
    except where float32 sums in another order (torch's, not C's left to right) tip a near-tie between two
    candidate scales: at most a few percent of blocks (measured 0-5 %), with the same total error (measured within
    0.1 %). A search that differs from ggml's differs in most blocks."""
    torch.manual_seed(0)
    w = torch.randn(256, 1024) * 0.02
    w[3, 5] = 0.3
    importance = skewed_importance(1024) if with_importance else None
    theirs = ggml_quantize(w, qtype, importance)
    ours = gguf_quants.quantize(w, qtype, importance).to_bytes()
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    differing = float((ours.reshape(-1, size) != theirs.reshape(-1, size)).any(-1).mean())
    searched = qtype in (T.Q4_K, T.Q5_K, T.Q6_K) or (with_importance and qtype != T.Q8_0)
    if not searched:
        assert differing == 0
        return
    assert differing < 0.1
    weight = 1.0 if importance is None else importance.double().repeat(w.shape[0])

    def error(data):
        return float((weight * (torch.from_numpy(gguf.quants.dequantize(data, qtype)).double() - w.double()).flatten() ** 2).sum())

    assert abs(error(ours) / error(theirs) - 1) < 0.005


def test_tensor_mix_follows_llama_cpp():
    n = 32  # use_more_bits: layers 0-3, 28-31, and every third from 6
    more_bits = [i for i in range(n) if i < 4 or i >= 28 or (i - 4) % 3 == 2]

    def mix(name, columns=4096, file_type="Q4_K_M", tied=False, importance=False):
        return tensor_type(name, columns, file_type, n, tied, importance)

    assert [i for i in range(n) if mix(f"blk.{i}.attn_v.weight") == T.Q6_K] == more_bits
    assert [i for i in range(n) if mix(f"blk.{i}.ffn_down.weight") == T.Q6_K] == more_bits
    assert {mix(f"blk.{i}.{part}.weight") for i in range(n) for part in ("attn_q", "attn_k", "attn_output", "ffn_up",
                                                                        "ffn_gate")} == {T.Q4_K}
    assert (mix("output.weight"), mix("token_embd.weight"), mix("token_embd.weight", tied=True)) == (T.Q6_K, T.Q4_K, T.Q6_K)
    # rows that 256 does not divide (SmolLM2's 576): llama.cpp's fallbacks
    assert (mix("blk.5.attn_q.weight", 576), mix("blk.0.attn_v.weight", 576), mix("output.weight", 576)) == (T.Q5_0, T.Q8_0, T.Q8_0)
    assert mix("blk.5.attn_q.weight", 100) == T.F16
    assert {mix(name, file_type="Q8_0") for name in ("output.weight", "blk.0.attn_v.weight", "token_embd.weight")} == {T.Q8_0}
    assert (mix("output.weight", file_type="Q4_0"), mix("blk.0.ffn_down.weight", file_type="Q4_0")) == (T.Q6_K, T.Q4_0)
    assert [i for i in range(n) if mix(f"blk.{i}.ffn_down.weight", file_type="Q4_0", importance=True) == T.Q4_1] == [0, 1, 2, 3]
    # a 70B model (80 layers): attn_v that gets no Q6_K gets Q5_K instead of Q4_K
    assert [tensor_type(f"blk.{i}.attn_v.weight", 8192, "Q4_K_M", 80, False, False, seventy_b=True) for i in (10, 12)] \
        == [T.Q5_K, T.Q6_K]


def test_permutation_is_llama_cpps():
    """convert_hf_to_gguf's LlamaModel.permute, on row indices: head h's rows (i, i + d/2) become neighbours."""
    rows = torch.arange(2 * 8).unsqueeze(1)  # 2 heads of 8
    assert permute_qk(rows, 2).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


# ---------------------------------------------------------------- whole files


@pytest.fixture(scope="module")
def sharp_model(tmp_path_factory):
    """Tiny models with weights large enough that attention and the head are not uniform (the default 0.02 init
    would hide a wrong q/k permutation), and a tokenizer with a BOS token (transformers' GGUF tokenizer reader
    needs one)."""
    made = {}

    def make(arch):
        if arch not in made:
            folder = save_tiny_model(tmp_path_factory.mktemp(f"sharp-{arch}"), arch, initializer_range=0.05)
            tokenizer = tiny_tokenizer()
            tokenizer.bos_token = "<|im_start|>"
            tokenizer.save_pretrained(folder)
            made[arch] = folder
        return made[arch]

    return make


def kl_per_token(reference, logits):
    base, other = reference.double().log_softmax(-1), logits.double().log_softmax(-1)
    return (base.exp() * (base - other)).sum(-1)


def probe_ids():
    return torch.randint(3, 384, (2, 48), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def source_logits(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()(probe_ids()).logits


@torch.no_grad()
def gguf_logits(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()(probe_ids()).logits


DEFAULT_CASES = {("llama", "Q8_0"), ("llama", "Q4_K_M"), ("qwen2", "Q4_K_M"), ("mistral", "Q4_0")}
"""Every type and every architecture once in the default suite (a second or two each); the rest with -m slow."""


@pytest.mark.parametrize("arch,file_type", [
    pytest.param(arch, file_type, marks=() if (arch, file_type) in DEFAULT_CASES else pytest.mark.slow)
    for arch in ("llama", "qwen2", "mistral") for file_type in ("Q8_0", "Q4_0", "Q4_K_M")])
def test_export_reads_back_in_transformers_with_the_source_logits(sharp_model, tmp_path, arch, file_type):
    source = sharp_model(arch)
    result = export_gguf(str(source), file_type, tmp_path / "m.gguf", quiet=True)
    kl = kl_per_token(source_logits(source), gguf_logits(result.path))
    assert float(kl.mean()) < KL_BOUND[file_type]
    reader = gguf.GGUFReader(result.path)
    assert reader.fields["general.architecture"].contents() == gguf.MODEL_ARCH_NAMES[architecture_of(tiny_config(arch)).arch]
    assert reader.fields["general.file_type"].contents() == {"Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15}[file_type]
    assert reader.fields["tokenizer.chat_template"].contents() == tiny_tokenizer().chat_template
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    # transformers gives a Qwen2 model its Qwen2Tokenizer, whose pre-tokenizer is Qwen2's regex split
    assert reader.fields["tokenizer.ggml.pre"].contents() == ("qwen2" if arch == "qwen2" else "gpt-2")
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.1.attn_q.weight", "blk.1.ffn_down.weight"} <= names


def test_q8_0_bound_catches_a_missing_permutation(sharp_model):
    """The KL bound is tight enough to fail if the reader's un-permutation had nothing to undo (or undid it twice)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sharp_model("llama")).eval()
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight.data = permute_qk(layer.self_attn.q_proj.weight.data, 4)
        layer.self_attn.k_proj.weight.data = permute_qk(layer.self_attn.k_proj.weight.data, 2)
    with torch.no_grad():
        wrong = model(probe_ids()).logits
    assert float(kl_per_token(source_logits(sharp_model("llama")), wrong).mean()) > 10 * KL_BOUND["Q8_0"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_tokenizer_encodes_chats_like_the_source(sharp_model, tmp_path, arch):
    from transformers import AutoTokenizer

    source = sharp_model(arch)
    path = export_gguf(str(source), "Q8_0", tmp_path / "m.gguf", quiet=True).path
    mine, theirs = AutoTokenizer.from_pretrained(source), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for chat in CHATS[:6]:
        expected = mine.apply_chat_template(chat["messages"], tokenize=True, return_dict=True)["input_ids"]
        assert theirs.apply_chat_template(chat["messages"], tokenize=True, return_dict=True)["input_ids"] == expected


def english_lines() -> list[str]:
    """Real English text that ships with Python: a few standard-library modules' docstrings, line by line."""
    import argparse, collections, inspect, textwrap  # noqa: E401

    from tiny import TEXT

    text = TEXT + "\n".join(module.__doc__ or "" for module in (json, collections, textwrap, inspect, argparse))
    return [line.strip() for line in text.splitlines() if line.strip()]


SPM_VOCAB = 1024
"""Large enough that the order of merges decides how many words split (with a few hundred tokens it hardly does)."""


def sentencepiece_tokenizer(vocab_size=SPM_VOCAB):
    """A small Llama-2-style tokenizer: BPE over "▁"-joined words with byte fallback (<0x00>..<0xFF>), BOS added."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from tiny import CHAT_TEMPLATE

    special = ["<unk>", "<s>", "</s>"]
    normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    trainer = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer.normalizer = normalizer
    trainer.train_from_iterator(english_lines(), trainers.BpeTrainer(vocab_size=vocab_size - 219))
    vocab = {token: i for i, token in enumerate(special + [f"<0x{i:02X}>" for i in range(256)])}
    for token, _ in sorted(trainer.get_vocab().items(), key=lambda item: item[1]):
        if token not in vocab and len(vocab) < vocab_size:
            vocab[token] = len(vocab)
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" "))
              for m in json.loads(trainer.to_str())["model"]["merges"]]
    merges = [m for m in merges if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizer
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   chat_template=CHAT_TEMPLATE.replace("<|im_start|>", "<s>").replace("<|im_end|>", "</s>"))


def test_a_sentencepiece_style_tokenizer_is_written_as_llamas(tmp_path):
    """A tokenizer.json Llama-2-style tokenizer becomes llama.cpp's `llama` model, and both transformers' GGUF reader
    and llama.cpp encode text with it as the source does: its merges' order is carried in the scores."""
    from transformers import AutoTokenizer

    folder = save_tiny_model(tmp_path / "spm", "llama", vocab_size=SPM_VOCAB, bos_token_id=1, eos_token_id=2,
                             pad_token_id=None)
    sentencepiece_tokenizer().save_pretrained(folder)
    path = export_gguf(str(folder), "Q8_0", tmp_path / "m.gguf", quiet=True).path
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert (fields["tokenizer.ggml.bos_token_id"].contents(), fields["tokenizer.ggml.eos_token_id"].contents()) == (1, 2)
    mine, theirs = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert fields["tokenizer.chat_template"].contents() == mine.chat_template
    texts = english_lines()[:200] + ["zq 42 \u00fc \u65e5\u672c"]  # the last through byte fallback
    for text in texts:
        assert theirs(text, add_special_tokens=False)["input_ids"] == mine(text, add_special_tokens=False)["input_ids"]
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        assert [llm.tokenize(text.encode(), add_bos=True) for text in texts] == [mine(text)["input_ids"] for text in texts]
    finally:
        llm.close()


def test_imatrix_export_records_its_settings(sharp_model, tmp_path):
    calibration = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    out = tmp_path / "m.gguf"
    result = CliRunner().invoke(app, ["export-gguf", str(sharp_model("llama")), "--type", "Q4_K_M", "--out", str(out),
                                      "--imatrix-from-calibration", "--dataset", str(calibration), "--num-samples", "8",
                                      "--max-seq-len", "32", "--seed", "3", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "with an importance matrix" in result.output
    record = read_record(out)
    assert record["ptqlab.imatrix"] is True and record["ptqlab.type"] == "Q4_K_M" and record["ptqlab.seed"] == 3
    assert json.loads(record["ptqlab.calibration"])["num_samples"] == 8
    fields = gguf.GGUFReader(out).fields
    assert fields["quantize.imatrix.chunks_count"].contents() == 8
    assert float(kl_per_token(source_logits(sharp_model("llama")), gguf_logits(out)).mean()) < KL_BOUND["Q4_K_M"]


def test_q8_0_gathers_no_importance_matrix_and_says_so(tiny_model_dir, tmp_path):
    from ptqlab.data import CalibrationConfig

    calibration = CalibrationConfig(dataset=str(write_jsonl(tmp_path / "c.jsonl", CHATS)), num_samples=4, max_seq_len=16)
    result = export_gguf(str(tiny_model_dir("llama")), "Q8_0", tmp_path / "m.gguf", importance=True,
                         calibration=calibration, quiet=True)
    assert not result.importance and read_record(result.path)["ptqlab.imatrix"] is False
    assert any("Q8_0 ignores one" in note for note in result.notes)


def test_importance_is_the_mean_squared_input_of_each_linear(sharp_model, tmp_path):
    from ptqlab.data import CalibrationConfig, load_calibration
    from ptqlab.models import load_model

    loaded = load_model(str(sharp_model("llama")))
    calibration = load_calibration(loaded.tokenizer, CalibrationConfig(
        dataset=str(write_jsonl(tmp_path / "c.jsonl", CHATS)), num_samples=6, max_seq_len=24))
    importance = input_importance(loaded.model, calibration, 4, torch.device("cpu"))
    seen = {}
    hooks = [loaded.model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: seen.setdefault(name, []).append(args[0][0])) for name in
        ("model.layers.1.mlp.down_proj", "lm_head")]
    with torch.no_grad():
        for sample in calibration.samples:  # one at a time: no padding
            loaded.model(sample.unsqueeze(0))
    for hook in hooks:
        hook.remove()
    for name, inputs in seen.items():
        rows = torch.cat(inputs).double()
        torch.testing.assert_close(importance[name].double(), (rows * rows).mean(0), rtol=1e-4, atol=1e-7)


def test_a_checkpoint_is_exported_from_its_dequantized_weights(sharp_model, tmp_path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from ptqlab import quantize

    checkpoint = quantize(str(sharp_model("llama")), "w8a8-rtn", tmp_path / "ckpt", quiet=True)
    result = export_gguf(str(checkpoint), "Q8_0", tmp_path / "m.gguf", quiet=True)
    assert any("dequantized" in note for note in result.notes)
    dequantized = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=CompressedTensorsConfig(dequantize=True))
    for module in dequantized.modules():  # weights only: the checkpoint's activation quantization is not in a GGUF file
        if getattr(module, "quantization_scheme", None) is not None:
            module.quantization_scheme.input_activations = None
    with torch.no_grad():
        reference = dequantized.eval()(probe_ids()).logits
    assert float(kl_per_token(reference, gguf_logits(result.path)).mean()) < KL_BOUND["Q8_0"]


# ---------------------------------------------------------------- the lab's GGUF variant


def bench_in_process(name, path, settings, result_json, topk_out=None, topk_in=None, quiet=False):
    """benchmark.run_isolated without the fresh process (each costs ~15 s of imports on two cores; test_lab.py runs the
    real one): the same measurement, written where the lab reads it."""
    from ptqlab.measure.variant import bench_variant

    result = bench_variant(name, path, settings, topk_out, topk_in, quiet)
    result_json.write_text(json.dumps(result))
    return result


def test_lab_measures_gguf_variants_for_quality_and_not_for_speed(sharp_model, tmp_path, monkeypatch):
    """gguf-TYPE in --recipes: exported from the baseline, scored through transformers' GGUF reader on the baseline's
    token ids (Q8_0 within its bound, Q4_K_M further off), sized by the file, its speed not measured and never
    ranked; a second run reuses the files and the measurements."""
    import ptqlab.benchmark
    from ptqlab.measure.variant import BenchSettings
    from ptqlab.suite import lab

    monkeypatch.setattr(ptqlab.benchmark, "run_isolated", bench_in_process)

    text = tmp_path / "text.txt"  # a short text: tokenizing the whole python-docs fallback takes seconds per variant
    text.write_text("\n".join(english_lines()[:200]))
    fast = BenchSettings(ppl_text=str(text), ppl_context=64, ppl_windows=4, max_new_tokens=4, batch_size=2,
                         batch_sizes=(1, 2), repeats=1, sample_tokens=4, device="cpu")
    out = tmp_path / "lab"
    lab(str(sharp_model("llama")), ["gguf-q8_0", "gguf-Q4_K_M"], out, fast, quiet=True)
    results = json.loads((out / "results.json").read_text())
    base, q8, q4 = results["variants"]
    assert (base["name"], q8["name"], q4["name"]) == ("baseline", "gguf-Q8_0", "gguf-Q4_K_M")
    assert q8["kl"]["mean"] < KL_BOUND["Q8_0"] < q4["kl"]["mean"] < KL_BOUND["Q4_K_M"]
    for v, file_type in ((q8, "Q8_0"), (q4, "Q4_K_M")):
        file = out / "checkpoints" / v["name"] / "model.gguf"
        assert read_record(file)["ptqlab.type"] == file_type and v["format"] == f"gguf {file_type}"
        assert v["size"]["weights_bytes"] == file.stat().st_size
        assert v["perplexity"]["tokens_scored"] == base["perplexity"]["tokens_scored"] and len(v["samples"]) == 4
        assert v["speed"]["decode_tok_s"] is None and "not llama.cpp's" in v["speed"]["note"]
    recommendation = results["recommendation"]
    assert recommendation["fastest_decode"]["variant"] == recommendation["fastest_throughput"]["variant"] == "baseline"
    summary = (out / "summary.md").read_text()
    assert "transformers (GGUF dequantized)" in summary and "speed not measured" in summary
    assert (out / "report.html").read_text().count("<svg") == 4
    lab(str(sharp_model("llama")), ["gguf-Q8_0", "gguf-Q4_K_M"], out, fast, quiet=True)
    events = [json.loads(line)["event"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert events.count("export.start") == 2 and events.count("export.reused") == 2 and events.count("bench.reused") == 3


@pytest.mark.parametrize("name,message", [
    ("gguf-Q3_K", "a GGUF variant is gguf-TYPE or gguf-TYPE-imatrix with TYPE one of Q8_0, Q4_0, Q4_K_M"),
    ("gguf-Q8_0-imatrix", "Q8_0 ignores an importance matrix"),
])
def test_a_wrong_gguf_variant_is_refused_before_any_work(tiny_model_dir, tmp_path, name, message):
    code, output = run("lab", tiny_model_dir("llama"), "--recipes", f"w4a16-rtn,{name}", "--out", tmp_path / "lab",
                       "--quiet")
    assert code == 2 and message in one_error_line(output)
    assert not (tmp_path / "lab").exists()


# ---------------------------------------------------------------- bad input and faults


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def one_error_line(output):
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in output, output
    return lines[0]


@pytest.mark.parametrize("args,message", [
    (["--type", "Q3_K_S"], "unknown --type 'Q3_K_S': choose one of Q8_0, Q4_0, Q4_K_M"),
    (["--out", "model.bin"], "a GGUF file's name ends in .gguf"),
    (["--imatrix-from-calibration", "--num-samples", "0"], "--num-samples 0: must be at least 1"),
])
def test_bad_options_get_one_clear_line(tiny_model_dir, tmp_path, args, message):
    code, output = run("export-gguf", tiny_model_dir("llama"), "--out", tmp_path / "m.gguf", *args)
    assert code == 2 and message in one_error_line(output)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*"))


def test_an_unsupported_architecture_is_refused_before_loading(tiny_model_dir, tmp_path):
    code, output = run("export-gguf", tiny_model_dir("gemma2"), "--out", tmp_path / "m.gguf")
    assert code == 2 and "GGUF export supports llama, mistral, qwen2 models; this one is 'gemma2'" in one_error_line(output)


def test_a_tokenizer_larger_than_the_model_is_refused(tiny_model_dir, tmp_path):
    code, output = run("export-gguf", tiny_model_dir("llama", vocab_size=256), "--out", tmp_path / "m.gguf")
    assert code == 2 and "past the model's vocab_size 256 (config.json)" in one_error_line(output)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_needs_overwrite_and_only_ptqlabs_is_replaced(tiny_model_dir, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"someone else's file")
    code, output = run("export-gguf", tiny_model_dir("llama"), "--type", "Q8_0", "--out", out)
    assert code == 2 and "exists: choose another file or pass --overwrite" in one_error_line(output)
    code, output = run("export-gguf", tiny_model_dir("llama"), "--type", "Q8_0", "--out", out, "--overwrite")
    assert code == 2 and "not a GGUF file ptqlab wrote" in one_error_line(output)
    assert out.read_bytes() == b"someone else's file"
    out.unlink()
    assert run("export-gguf", tiny_model_dir("llama"), "--type", "Q8_0", "--out", out, "--quiet")[0] == 0
    code, output = run("export-gguf", tiny_model_dir("llama"), "--type", "q4_0", "--out", out, "--overwrite", "--quiet")
    assert code == 0, output  # the type in any case
    assert read_record(out)["ptqlab.type"] == "Q4_0"


def test_a_failed_export_leaves_no_file(tiny_model_dir, tmp_path, monkeypatch):
    calls = []

    def fail_on_the_fifth(weight, qtype, importance=None, chunk=0):
        calls.append(qtype)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(weight, qtype, importance)

    original = gguf_quants.quantize_to_bytes
    monkeypatch.setattr(gguf_quants, "quantize_to_bytes", fail_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(str(tiny_model_dir("llama")), "Q8_0", tmp_path / "m.gguf", quiet=True)
    assert len(calls) == 5 and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- llama.cpp itself


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_llama_cpp_runs_the_file_with_the_source_logits(sharp_model, tmp_path, arch):
    llama_cpp = pytest.importorskip("llama_cpp")
    source = sharp_model(arch)
    reference = source_logits(source)[0]
    for file_type in ("Q8_0", "Q4_K_M"):
        path = export_gguf(str(source), file_type, tmp_path / f"{file_type}.gguf", quiet=True).path
        llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
        llm.eval(probe_ids()[0].tolist())
        logits = torch.tensor(np.array(llm.scores[:48]))
        llm.close()
        # llama.cpp also rounds activations to 8 bits in its quantized matmuls: the same bounds hold
        assert float(kl_per_token(reference, logits).mean()) < KL_BOUND[file_type]


def _llama_cpp_quantize(llama_cpp, source_file, out_file, file_type, importance):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = {"Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15}[file_type], 1
    keep = []
    if importance:
        entries = (llama_cpp.llama_model_imatrix_data * (len(importance) + 1))()
        for i, (name, values) in enumerate(importance.items()):
            buffer = (ctypes.c_float * values.numel())(*values.tolist())
            keep.append(buffer)
            entries[i].name, entries[i].size = name.encode(), values.numel()
            entries[i].data = ctypes.cast(buffer, ctypes.POINTER(ctypes.c_float))
        entries[len(importance)].name = None
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(entries)
    assert llama_cpp.llama_model_quantize(str(source_file).encode(), str(out_file).encode(), ctypes.byref(params)) == 0


@pytest.mark.parametrize("with_importance", [False, True], ids=["plain", "importance"])
@pytest.mark.parametrize("file_type", ["Q8_0", "Q4_0", "Q4_K_M"])
def test_llama_cpps_quantize_picks_the_same_types_and_errors(sharp_model, tmp_path, file_type, with_importance):
    """llama.cpp's own quantize of our F32 file against our export: the same type for every tensor, Q8_0 byte for
    byte, the other types' error within 1 % (their searches sum float32 in another order than torch: a few blocks
    differ where two candidate scales nearly tie; test_blocks_are_llama_cpps)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from ptqlab.data import CalibrationConfig, load_calibration
    from ptqlab.models import load_model

    source = sharp_model("llama")
    f32 = export_gguf(str(source), "F32", tmp_path / "f32.gguf", quiet=True).path
    calibration = CalibrationConfig(dataset=str(write_jsonl(tmp_path / "c.jsonl", CHATS)), num_samples=8, max_seq_len=32)
    importance = {}
    if with_importance:
        loaded = load_model(str(source))
        by_module = input_importance(loaded.model, load_calibration(loaded.tokenizer, calibration), 16, torch.device("cpu"))
        for hf_name, name, tensor in gguf_tensors(loaded.model.state_dict().items(), loaded.model.config, ARCHITECTURES["llama"]):
            if tensor.ndim == 2 and hf_name.removesuffix(".weight") in by_module:
                importance[name] = by_module[hf_name.removesuffix(".weight")]
    _llama_cpp_quantize(llama_cpp, f32, tmp_path / "theirs.gguf", file_type, importance)
    ours = export_gguf(str(source), file_type, tmp_path / "ours.gguf", importance=with_importance,
                       calibration=calibration, quiet=True).path
    theirs = {t.name: t for t in gguf.GGUFReader(tmp_path / "theirs.gguf").tensors}
    mine = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    reference = {t.name: np.array(t.data, dtype=np.float64) for t in gguf.GGUFReader(f32).tensors}
    assert {n: t.tensor_type for n, t in mine.items()} == {n: t.tensor_type for n, t in theirs.items()}
    for name, tensor in mine.items():
        if tensor.tensor_type == T.F32:
            continue
        if tensor.tensor_type == T.Q8_0:
            assert np.array_equal(np.asarray(tensor.data), np.asarray(theirs[name].data))
        weight = np.tile(importance[name].numpy(), reference[name].size // importance[name].numel()) \
            if name in importance else 1.0

        def error(t):
            values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(-1)
            return float((weight * (values - reference[name].reshape(-1)) ** 2).sum())

        assert error(tensor) < 1.01 * error(theirs[name])
