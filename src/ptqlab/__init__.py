"""ptqlab: post-training quantization of Hugging Face causal LMs into compressed-tensors checkpoints."""

from ptqlab.version import __version__  # noqa: F401
from ptqlab.api import quantize  # noqa: E402
from ptqlab.export_gguf import export_gguf  # noqa: E402
from ptqlab.benchmark import bench  # noqa: E402
from ptqlab.suite import lab  # noqa: E402
from ptqlab.errors import PtqlabError  # noqa: E402
from ptqlab.models import load_model  # noqa: E402
from ptqlab.pipeline import quantize_model  # noqa: E402
from ptqlab.recipe import Recipe  # noqa: E402
from ptqlab.recipes import PRESETS, get_recipe  # noqa: E402
from ptqlab.schemes import QuantArgs, Scheme  # noqa: E402

__all__ = [
    "quantize", "export_gguf", "bench", "lab", "quantize_model", "load_model", "get_recipe", "PRESETS", "Recipe", "Scheme", "QuantArgs", "PtqlabError",
]
