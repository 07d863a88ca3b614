"""The runtime's kernel choice table alone (runtime/choice.py), for the linears of one model shape: int4 (W4A16,
group 128) at a decode step's rows and INT8 (W8A8) at a prefill's, each candidate timed as `runtime_speed` times it
(CUDA graphs, weights out of L2). A minute where `runtime_speed` takes several: what to run first when a kernel's
tiles change, before the end-to-end sweep.

    python bench/kernel_table.py --shape llama-3-8b --out bench/results/kernel_table_llama-3-8b.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SHAPES = {"llama-3-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
          "tiny": {"qkv": (384, 256), "down": (256, 512)}}


def layers(shape: str, device: torch.device) -> torch.nn.ModuleDict:
    """One Int4Linear and one Int8Linear per linear of the shape, random weights (speed does not depend on them)."""
    from ptqlab.quant.linear import rtn
    from ptqlab.recipes import get_recipe
    from ptqlab.runtime import RuntimeOptions
    from ptqlab.runtime.linear import Int4Linear, Int8Linear

    options, out = RuntimeOptions(), torch.nn.ModuleDict()
    g = torch.Generator(device).manual_seed(0)
    for name, (n, k) in SHAPES[shape].items():
        w = torch.randn(n, k, generator=g, device=device, dtype=torch.bfloat16) * 0.02
        q, scale, _ = rtn(w, get_recipe("w4a16").scheme.weights, torch.bfloat16)
        out[f"{name}_int4"] = Int4Linear(q, scale, None, None, options.gemv_tile, options.pdl, torch.bfloat16)
        amax = w.float().abs().amax(1, keepdim=True)
        out[f"{name}_int8"] = Int8Linear(torch.round(w.float() / (amax / 127)).clamp(-128, 127).to(torch.int8),
                                         (amax / 127).float(), None, torch.bfloat16)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3-8b")
    parser.add_argument("--rows", default="1,8,32,2048")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from ptqlab.runtime.choice import choose_kernels, print_table

    device = torch.device("cuda")
    entries = choose_kernels(layers(args.shape, device), tuple(int(r) for r in args.rows.split(",")))
    print(print_table(entries))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "shape": args.shape, "device": torch.cuda.get_device_name(device),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": {"torch": torch.__version__, "python": platform.python_version(),
                         "triton": __import__("triton").__version__},
            "command": ["python3", "bench/kernel_table.py", *sys.argv[1:]], "table": entries}, indent=1) + "\n")


if __name__ == "__main__":
    main()
