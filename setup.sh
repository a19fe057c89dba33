#!/usr/bin/env bash
# Creates .venv and installs qpipe with its test tools and the Hugging Face extra the tests use. torch 2.13.0 goes first: on machines that keep its
# CPU wheel locally pip takes that file; qpipe's own torch range is then already satisfied.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test,hf]"
.venv/bin/python -c "import qpipe, torch, onnxruntime; print('qpipe', qpipe.__version__, '| torch', torch.__version__, '| onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"
