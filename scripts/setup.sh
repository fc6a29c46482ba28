#!/usr/bin/env bash
# One-command setup: a virtual environment in .venv with torch first (so no other package picks a torch build
# for you), then stylealigned with its test tools, the web app's among them (Gradio, gradio_client, Playwright; the
# browser test drives Debian's chromium). TORCH_SPEC picks the torch build, e.g. a CUDA wheel's spec.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install --quiet -e ".[dev]"
echo "ready: . .venv/bin/activate && stylealigned demo"
