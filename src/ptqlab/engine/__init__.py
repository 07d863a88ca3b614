"""The layer-sequential calibration engine: capture, statistics, transforms, quantize, propagate, one decoder layer
at a time (engine/calibrate.py runs the loop; each phase has its module).

1. capture.py: one forward of the base model per calibration batch yields layer 0's inputs and every layer's
   keyword arguments.
2. For each layer: statistics.py accumulates what the steps need of every linear's input; transforms.py applies the
   recipe's smoothing steps (smoothquant.py, awq.py, through smoothing.py's mappings), updating those statistics
   exactly; quantize.py turns the layer's targeted linears into QuantizedLinears (GPTQ from the Hessian, or
   round-to-nearest); propagate.py forwards the quantized layer to produce the next layer's inputs.
3. Only the current layer needs to be on the accelerator: with `offload`, the others stay on the CPU.

steps.py is the table of recipe steps (name, settings, statistics, function). A streaming loader, MoE experts and a
distributed backend belong beside these modules, each in its own.
"""

from ptqlab.engine.calibrate import EngineOptions, LayerReport, calibrate  # noqa: F401
from ptqlab.engine.plan import Plan  # noqa: F401
from ptqlab.engine.steps import STEPS, kind_of  # noqa: F401
