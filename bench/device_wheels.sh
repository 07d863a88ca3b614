#!/usr/bin/env bash
# The wheels a GPU machine of this workplace lacks for ptqlab's benchmarks (its image has torch, Triton, transformers,
# numpy, ...): ptqlab's own dependencies that are not there, and the kernel libraries bench/runtime_profile.py
# compares with. Downloads them into .whl/ (add "/.whl/" to .git/info/exclude), for a device call that starts with
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD/.whl/py
# gemlite ships as a source archive of pure Python: its package folder goes to .whl/py.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl/py
platform=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps "${platform[@]}" -d .whl gguf==0.19.0 compressed-tensors==0.19.0 \
    pydantic==2.14.4 pydantic-core==2.50.5 loguru==0.8.0 annotated-types==0.8.0 typing-inspection==0.4.5 \
    torchao==0.17.0
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps -d "$tmp" gemlite==0.6.0.post2
tar xzf "$tmp"/gemlite-*.tar.gz -C "$tmp"
rm -rf .whl/py/gemlite && cp -r "$tmp"/gemlite-*/gemlite .whl/py/
rm -rf "$tmp"
du -sh .whl
