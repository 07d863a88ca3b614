"""Streaming from disk: a model whose decoder layers live in their safetensors files until the engine needs them.

The model is built with its parameters on the meta device (no memory); the tensors outside the decoder layers
(embeddings, final norm, output head) are read at once, each decoder layer's when the engine reaches it, and a
finished layer is handed to `on_finish` (which writes its quantized tensors) and dropped back to meta. CPU memory
then holds the embeddings, the head, one layer and the calibration activations, whatever the depth of the model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ptqlab.engine.experts import unfuse
from ptqlab.errors import PtqlabError
from ptqlab.families import checkpoint_name, moe_layout
from ptqlab.models import decoder_layer_names, decoder_layers
from ptqlab.safetensors_files import header_tensors, weight_files

FIX = "copy or download the model again"


class DiskTensors:
    """Where each tensor of a safetensors model folder lives, and reading them one group at a time."""

    def __init__(self, folder: Path):
        files, weight_map = weight_files(Path(folder), FIX)
        if not files:
            raise PtqlabError(f"{folder}: no .safetensors weights; streaming reads safetensors models only (convert a "
                              f"pytorch_model.bin folder with transformers' save_pretrained first)")
        if weight_map is None:
            self.files = {name: file for file in files for name in header_tensors(file)}
        else:
            self.files = {name: Path(folder) / file for name, file in weight_map.items()}

    def read(self, names, dtypes: dict[str, torch.dtype], stored=lambda name: name) -> dict[str, torch.Tensor]:
        """The tensors `names` (as the model names them; `stored` gives the file's name), each cast to its dtype in
        `dtypes` (the model's parameter dtype) where it has one."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[stored(name)], []).append(name)
        out = {}
        for file, file_names in by_file.items():
            with safe_open(file, framework="pt") as f:
                for name in file_names:
                    tensor = f.get_tensor(stored(name))
                    out[name] = tensor.to(dtypes[name]) if name in dtypes else tensor
        return out


def _floating_meta_dtypes(module: nn.Module, prefix: str) -> dict[str, torch.dtype]:
    dot = f"{prefix}." if prefix else ""
    return {f"{dot}{name}": p.dtype for name, p in module.named_parameters(remove_duplicate=False)}


def _assign(module: nn.Module, prefix: str, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load `tensors` (full names) into `module` (named `prefix`), replacing its meta parameters."""
    dot = f"{prefix}." if prefix else ""
    state = {name.removeprefix(dot): tensor for name, tensor in tensors.items()}
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise PtqlabError(f"{dot}{name}: the weight holds NaN or Inf; the checkpoint {source!r} is damaged")
    try:
        module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # a shape that does not match the config
        first = " ".join(str(e).split())[:300]
        raise PtqlabError(f"the weights of {source!r} do not match its config.json ({first}); restore the model's own "
                          "files") from None


FUSED_EXPERTS = (".experts.gate_up_proj", ".block_sparse_moe.input_linear.")
"""Tensor names of the hub checkpoints that store a layer's experts in one tensor (Llama 4, gpt-oss; Granite MoE)."""


class StreamedModel:
    """A causal LM whose decoder layers are read from disk one at a time (see the module docstring)."""

    def __init__(self, folder: Path, config, dtype: torch.dtype, source: str):
        from accelerate import init_empty_weights  # start-up time: imported on first use
        from transformers import AutoModelForCausalLM  # start-up time: imported on first use

        self.folder, self.source = Path(folder), source
        self.disk = DiskTensors(self.folder)
        with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables) computed
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model.eval()
        unfuse(self.model)  # MoE: one linear per expert projection, named as the files name them
        layout = moe_layout(config)
        self.stored = lambda name: checkpoint_name(name, layout)
        self.layers = decoder_layers(self.model)
        self.layer_names = decoder_layer_names(self.model)
        expected = set(_floating_meta_dtypes(self.model, ""))
        tied = getattr(config, "tie_word_embeddings", False)
        head = next(n for n, m in self.model.named_modules() if m is self.model.get_output_embeddings())
        missing = sorted(name for name in expected - ({f"{head}.weight"} if tied else set())
                         if self.stored(name) not in self.disk.files)
        fused = next((name for name in self.disk.files if any(part in name for part in FUSED_EXPERTS)), None)
        if fused is not None and any(".experts." in name for name in missing):
            raise PtqlabError(f"{source!r} stores its experts fused ({fused}), and --stream reads one tensor per "
                              "expert projection: quantize it without --stream")
        if missing:
            raise PtqlabError(f"the weights of {source!r} lack {len(missing)} tensors its config.json describes (e.g. "
                              f"{missing[0]}); the config.json belongs to another model or the weights are incomplete: "
                              "restore the model's own files")
        outside = [name for name in expected if self.stored(name) in self.disk.files
                   and not any(name.startswith(f"{layer}.") for layer in self.layer_names)]
        _assign(self.model, "", self.disk.read(outside, _floating_meta_dtypes(self.model, ""), self.stored), source)
        if tied:
            self.model.tie_weights()

    def load_layer(self, index: int) -> nn.Module:
        """Decoder layer `index` with its weights read from disk (in the dtypes of the model's parameters now)."""
        layer, prefix = self.layers[index], self.layer_names[index]
        dtypes = _floating_meta_dtypes(layer, prefix)
        _assign(layer, prefix, self.disk.read(list(dtypes), dtypes, self.stored), self.source)
        return layer

    def release_layer(self, index: int) -> None:
        """Drop decoder layer `index`'s tensors (back to meta): its quantized form has been written."""
        self.layers[index].to("meta")

