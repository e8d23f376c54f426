#!/usr/bin/env bash
# The GPU checks of the TensorRT-LLM path, for a host with a CUDA GPU and tensorrt_llm==1.2.0rc2 installed
# (pip install -e ".[trtllm]"): tiny engine vs PyTorch greedy equality, CFG pairs on TensorRT-LLM's executor, two
# different clips back to back under KV block reuse, seeded sampling, a CFG pair on a cold cache; the LLM API path
# (PyTorch backend) on the dense and Nemotron-H tiny models (tests/gpu/test_llm_api.py); then the throughput bench
# of the LLM API path against PyTorch eager (goal >= 3x).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU here')"
"$PY" -c "import tensorrt_llm, sys; v = tensorrt_llm.__version__; sys.exit(0 if v == '1.2.0rc2' else f'tensorrt_llm {v}: the code is pinned to 1.2.0rc2')"
"$PY" -m pytest -q -p no:cacheprovider -m gpu tests/gpu tests/export/test_trtllm_checkpoint.py tests/serving/test_guided_executor.py
"$PY" bench/serve.py --layout gpu --runtime pytorch --executor tensorrt_llm --requests 256 --concurrency 64
