"""Entry point of the per-variant benchmark process: `python -m ptqlab.measure.worker SPEC.json`.

Kept apart from variant.py so that the package never imports the module it runs as __main__.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ptqlab.measure.variant import BenchSettings, bench_variant
from ptqlab.errors import PtqlabError
from ptqlab.output import write_atomically
from ptqlab.progress import VERBOSE_ENV, quiet_libraries


def _main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    quiet_libraries(verbose=os.environ.get(VERBOSE_ENV) == "1")
    settings = BenchSettings(**spec["settings"])
    try:
        result = bench_variant(spec["name"], spec["path"], settings, spec["topk_out"] and Path(spec["topk_out"]),
                               spec["topk_in"] and Path(spec["topk_in"]), spec["quiet"])
    except PtqlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_atomically(spec["result_json"], json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
