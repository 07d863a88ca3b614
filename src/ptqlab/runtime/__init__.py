"""The fast runtime: checkpoints loaded into quantized linear modules that compute with the quantized weights,
a static KV cache and CUDA-graph decode. `load_runtime(folder, device)` gives a RuntimeModel (`model(ids).logits`
scores a sequence); `Generator(model, batch, max_length)` decodes greedily; `RuntimeOptions` (given to
`load_runtime`) switches how the GPU kernels run. On CPUs every layer computes with its dequantized weight (the
reference semantics), so the same code runs, correctly, everywhere.
"""

from ptqlab.runtime.generate import Generator
from ptqlab.runtime.kernels import RuntimeOptions
from ptqlab.runtime.load import load_runtime
from ptqlab.runtime.model import RuntimeModel

__all__ = ["Generator", "RuntimeModel", "RuntimeOptions", "load_runtime"]
