"""Kernel tests under Triton's CPU interpreter: Triton reads TRITON_INTERPRET=1 when the kernel modules are first
imported, so a test file's kernel tests run in a fresh `python -m pytest` of that file with the variable set
(`run_under_interpreter`), started by one test of the ordinary run; there they are skipped (`interpreted`)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ptqlab import triton_support

INTERPRETED = triton_support.interpreted()


def triton_version() -> tuple[int, int] | None:
    if triton_support.triton is None:
        return None
    major, minor = triton_support.triton.__version__.split(".")[:2]
    return int(major), int(minor)


def interpreted(starter: str):
    """Skip mark of a kernel test outside the interpreter's run (`starter`: the test that starts that run)."""
    return pytest.mark.skipif(not INTERPRETED, reason=f"runs under TRITON_INTERPRET=1, in the subprocess of {starter}")


_STARTER_MARKS = [
    pytest.mark.skipif(triton_version() is None, reason="needs Triton (pip install triton; `make test` installs it)"),
    pytest.mark.skipif((triton_version() or (3, 9)) < (3, 9),
                       reason="needs Triton 3.9 or newer (a CUDA torch may pin an older one): Triton 3.6's interpreter "
                              "fails on every loop whose bound is a kernel argument ('only 0-dimensional arrays can be "
                              "converted to Python scalars')"),
    pytest.mark.skipif(INTERPRETED, reason="this process is the interpreter's run"),
]


def starts_interpreter(test):
    """Marks the test that starts a file's interpreted run: skipped without Triton 3.9+ and inside that run."""
    for mark in reversed(_STARTER_MARKS):
        test = mark(test)
    return test


def run_under_interpreter(test_file: str, tmp_path: Path) -> None:
    """`test_file`'s tests in a fresh process whose Triton interprets the kernels on CPU; they must pass, and more
    than one must have run (not only skips)."""
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "pytest", str(Path(test_file).resolve()), "-q", "-p", "no:cacheprovider",
               f"--basetemp={tmp_path / 'interpreted'}"]
    result = subprocess.run(command, cwd=root, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True,
                            text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-12000:]
    passed = re.search(r"(\d+) passed", output)
    assert passed and int(passed.group(1)) > 1, output[-4000:]
