"""The runtime's small-batch kernels compiled for Hopper (sm_90a) on a machine with no GPU, and what one iteration of
their K loop costs in machine instructions: registers, shared memory, the loop's instruction mix, and for int4 the
integer work per weight value that turns packed planes into 16-bit values. The instruction budget is what bounds a
small-batch kernel once its loads are pipelined: at 1-64 rows an H100 multiprocessor must finish a 64 x 128 int4 tile
(4 KiB) in about 380 cycles to stream 2.5 TB/s, and four schedulers issue about 1,500 warp instructions in that time.

    python bench/kernel_sass.py --out bench/results/kernel_sass_sm90.json

Needs Triton with its CUDA backend (its wheel ships ptxas and cuobjdump); no GPU and no CUDA driver. Compile with the
Triton version the GPU machine has (the code it generates differs between versions): install it beside the project's
(`pip install --target DIR triton==3.6.0`) and put DIR first on PYTHONPATH. Pointers and strides are compiled as
multiples of 16, as Triton specializes them at a launch with such shapes (without that hint it neither vectorizes
nor pipelines the 8-bit loads, and the counts mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

ARGUMENTS = ("X XS W WS Z Bias Y M N k_tiles tiles_per_split tiles_per_group stride_xm stride_wn stride_wsn stride_zn "
             "stride_ys stride_ym").split()
DEQUANT = ("LOP3", "SHF", "PRMT", "HFMA2", "HADD2", "FADD", "F2FP", "I2F", "STS", "LDS", "LDSM")
"""Instructions that turn loaded int4 words into tensor-core operands (the rest of a loop is addresses, loads,
products and bookkeeping)."""


def compile_sm90(fn, signature: dict, constexprs: dict, warps: int, stages: int) -> tuple[str, dict]:
    """(SASS text, resource usage) of `fn` compiled for sm_90a."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(signature)
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
               if signature[n].startswith("*") or n.startswith("stride") or n in ("M", "N")}
    kernel = triton.compile(ASTSource(fn=fn, signature={**signature, **{c: "constexpr" for c in constexprs}},
                                      constexprs=constexprs, attrs=aligned),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([str(tools / "cuobjdump"), "--dump-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout
    resources = {key.lower(): int(value) for key, value in re.findall(r"(REG|STACK|SHARED):(\d+)", usage)}
    resources["dynamic_shared"] = kernel.metadata.shared
    return sass, resources


def main_loop(sass: str) -> Counter:
    """Instruction counts of the kernel's longest backward branch's body (its K loop), by opcode."""
    instructions = [(int(address, 16), text.strip()) for address, text in
                    re.findall(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", sass, re.M)]
    loops = [(target, address) for address, text in instructions
             for match in [re.search(r"BRA\s+(?:`\()?0x([0-9a-f]+)", text)] if match
             for target in [int(match.group(1), 16)] if target < address]
    if not loops:
        return Counter()
    first, last = max(loops, key=lambda loop: loop[1] - loop[0])
    return Counter(re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]
                   for address, text in instructions if first <= address <= last)


def small_batch_rows(fmt: str, names: list[str]) -> list[dict]:
    from ptqlab.runtime import small_batch

    x, w, ws = {"int4": ("*bf16", "*i32", "*bf16"), "fp8": ("*fp8e4nv", "*fp8e4nv", "*fp32"),
                "int8": ("*i8", "*i8", "*fp32")}[fmt]
    signature = dict(zip(ARGUMENTS, [x, "*fp32", w, ws, ws, "*bf16", "*fp32"] + ["i32"] * 11))
    rows = []
    tiles = {**small_batch.TILES, **(small_batch.PREFILL_TILES if fmt == "int4" else {})}
    for name in names or tiles:
        tile = tiles[name]
        for block_m in ([tile.block_m] if tile.block_m else [16, 64]):
            constexprs = dict(FORMAT=small_batch.FORMATS.index(fmt), HAS_ZERO=False, HAS_BIAS=False,
                              BLOCK_N=tile.block_n, BLOCK_M=block_m, BLOCK_K=small_batch.BLOCK_K, PDL=False)
            sass, resources = compile_sm90(small_batch._small_batch_kernel, signature, constexprs, tile.warps,
                                           tile.stages)
            loop = main_loop(sass)
            values = tile.block_n * small_batch.BLOCK_K // (32 * tile.warps)  # weight values per thread per tile
            row = {"kernel": "small_batch", "format": fmt, "tile": name, "block_m": block_m, **resources,
                   "loop_instructions": sum(loop.values()), "loop_mix": dict(loop.most_common(16)),
                   "weight_values_per_thread": values}
            if fmt == "int4":
                row["unpack_instructions_per_value"] = round(sum(loop[op] for op in DEQUANT) / values, 2)
            rows.append(row)
    return rows


def dequantize_row() -> dict:
    from ptqlab.runtime import int4_kernels

    signature = dict(zip("P S Z W N K stride_pn stride_sn stride_zn stride_wn".split(),
                         ["*i32", "*bf16", "*bf16", "*bf16"] + ["i32"] * 6))
    sass, resources = compile_sm90(int4_kernels._int4_dequant_planes_kernel, signature,
                                   dict(GROUP=128, HAS_ZERO=False, BLOCK_N=64), 4, 1)
    mix = Counter(re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]
                  for text in re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(.*?);", sass, re.M))
    return {"kernel": "int4_dequant_planes", **resources, "instructions": sum(mix.values()),
            "mix": dict(mix.most_common(16)), "weight_values_per_thread": 64 * 128 // 128}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--formats", default="int4,fp8,int8")
    parser.add_argument("--tiles", default="", help="tile names (small_batch.TILES / PREFILL_TILES); default all")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    names = [t for t in args.tiles.split(",") if t]
    rows = [row for fmt in args.formats.split(",") for row in small_batch_rows(fmt, names)] + [dequantize_row()]
    print(f"{'kernel':20s} {'format':6s} {'tile':8s} {'rows':>4s} {'regs':>5s} {'smem KiB':>8s} {'loop instr':>10s} "
          f"{'unpack/value':>12s}")
    for row in rows:
        print(f"{row['kernel']:20s} {row.get('format', 'int4'):6s} {row.get('tile', ''):8s} {row.get('block_m', ''):>4} "
              f"{row['reg']:5d} {row['dynamic_shared'] / 1024:8.1f} {row.get('loop_instructions', row.get('instructions')):10d} "
              f"{row.get('unpack_instructions_per_value', ''):>12}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "target": "sm_90a (compiled on a CPU machine, no GPU)", "date": datetime.now(timezone.utc).isoformat(),
            "versions": {"triton": triton.__version__, "python": platform.python_version()},
            "command": [Path(sys.executable).name, *sys.argv], "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
