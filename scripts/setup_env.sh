#!/usr/bin/env bash
# Sets up everything Audex needs on a fresh machine: a .venv with torch 2.13.0 (CPU wheel), NeMo, Lhotse,
# transformers, megatron-core (engine megatron) and Audex itself (editable), plus Debian's espeak-ng and sox for the demo and test audio.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  pip install -q torch==2.13.0          # first: anything asking for a newer torch pulls a multi-GB CUDA build
fi
# pytriton is looked up, not imported: the wheel goes in with --no-deps (below), so its own imports are not all there
if ! python -c "import importlib.util as u, sys, audex, nemo, lhotse, transformers, pytest, tritonclient, megatron.core
sys.exit(0 if u.find_spec('pytriton') else 1)" 2>/dev/null \
   || [ setup.py -nt .venv/.audex-installed ] || [ scripts/constraints.txt -nt .venv/.audex-installed ]; then
  # the tested versions (scripts/constraints.txt), so that a release made since cannot change what CI runs
  pip install -q -e ".[dev,export,megatron]" -c scripts/constraints.txt
  # the Triton server binary; --no-deps because its numpy<2 pin would downgrade the whole environment
  pip install -q --no-deps nvidia-pytriton==0.7.0
  touch .venv/.audex-installed
fi
# the NumPy 1.26 of the Triton python-backend stub (its pybind11 predates NumPy 2's ABI), installed now so that
# starting a server needs no network: audex.serving.triton.launcher puts this folder first on the stub's path
if [ ! -f .venv/triton-numpy1/numpy/__init__.py ]; then
  pip install -q --no-deps --target .venv/triton-numpy1 numpy==1.26.4
fi
if ! command -v espeak-ng >/dev/null 2>&1 || ! command -v sox >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng sox >/dev/null) \
      || echo "warning: could not install espeak-ng/sox with apt; tests that need real speech will be skipped" >&2
  else
    echo "warning: espeak-ng/sox missing; install them with: sudo apt-get install espeak-ng sox" >&2
  fi
fi
echo "audex environment ready: $(python -c 'from importlib.metadata import version as v
print(", ".join(f"{p} {v(q)}" for p, q in (("torch", "torch"), ("nemo", "nemo_toolkit"), ("lhotse", "lhotse"), ("transformers", "transformers"))))')"
