#!/usr/bin/env bash
# The GPU check in one command, for the first machine with a CUDA GPU (under 8 minutes on an H100):
# installs srigl with a CUDA torch and Triton from the registry into its own virtualenv, runs the GPU
# tests (Triton kernels for real, not under the interpreter), then benchmarks/gpu_check.py, which
# checks correctness against the CPU reference before timing anything and writes results/gpu.md.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run  # anywhere: the same script on the CPU at tiny sizes (CI runs this)
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--dry-run" ]]; then
    # The local environment (make install); figures of a dry run mean nothing and go to a temp file.
    exec "${PY:-.venv/bin/python}" benchmarks/gpu_check.py --dry-run --out "${OUT:-$(mktemp -d)/gpu.md}"
fi

VENV=${GPU_VENV:-.venv-gpu}
started=$(date +%s)
test -x "$VENV/bin/python" || "${PYTHON:-python3}" -m venv "$VENV"
# The registry's default torch wheel is the CUDA build: what a GPU machine wants (unlike the CPU pin
# of the Makefile). The test extra brings the pinned Triton and the test tools.
"$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test]'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$VENV/bin/python" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print(torch.__version__, torch.version.cuda)"
echo "installed in $(( $(date +%s) - started )) s"

# The kernel tests, with the Triton kernels compiled for the GPU instead of interpreted.
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/kernels tests/condensed tests/storage
"$VENV/bin/python" benchmarks/gpu_check.py --out results/gpu.md
echo "gpu check done in $(( $(date +%s) - started )) s: results/gpu.md"
